//! One real etcd (Debian's etcd-server, which scripts/test installs) per test, on loopback
//! ports of its own: what the etcd suites share.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pvrdma_backend::directory::etcd::Etcd;

/// One etcd process with a data folder of its own; killed and removed on drop.
pub struct EtcdServer {
    child: Child,
    dir: PathBuf,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl EtcdServer {
    pub fn start(tag: &str) -> EtcdServer {
        let dir = std::env::temp_dir().join(format!("pvrdma-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "lab", "--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lab={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).expect("etcd's log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install Debian's etcd-server (scripts/test does)")
            });
        let server = EtcdServer {
            child,
            dir,
            endpoint,
        };
        let client = server.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.list(b"probe/").is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s: {}",
                std::fs::read_to_string(server.dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn client(&self) -> Etcd {
        Etcd::new(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
