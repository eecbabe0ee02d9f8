//! One real etcd (Debian's etcd-server, which scripts/test installs) per test, on loopback
//! ports of its own: what the etcd suites share.
#![allow(dead_code)] // Each suite uses part of it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pvrdma_backend::directory::etcd::{Etcd, EtcdConfig, EtcdTls, EtcdUser};

/// One etcd process with a data folder of its own; killed and removed on drop.
pub struct EtcdServer {
    child: Child,
    pub dir: PathBuf,
    pub endpoint: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A fresh folder of the test's own under the temp folder.
pub fn temp_folder(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvrdma-etcd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp folder");
    dir
}

impl EtcdServer {
    pub fn start(tag: &str) -> EtcdServer {
        let server = EtcdServer::spawn(tag, "http", &[]);
        server.wait_for(&server.client());
        server
    }

    /// etcd serving clients on `scheme` (http or https), with `extra` arguments; not yet
    /// answering.
    pub fn spawn(tag: &str, scheme: &str, extra: &[String]) -> EtcdServer {
        let dir = temp_folder(tag);
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "lab", "--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lab={peer_url}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).expect("etcd's log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install Debian's etcd-server (scripts/test does)")
            });
        EtcdServer {
            child,
            dir,
            endpoint,
        }
    }

    /// Waits until etcd answers `client`.
    pub fn wait_for(&self, client: &Etcd) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = client.list(b"probe/") {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s ({e}): {}",
                std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn client(&self) -> Etcd {
        Etcd::new(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
    }

    /// A client of this etcd with `tls` and `user`.
    pub fn client_with(&self, tls: Option<EtcdTls>, user: Option<EtcdUser>) -> Etcd {
        Etcd::with_config(EtcdConfig {
            tls,
            user,
            ..EtcdConfig::new(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
        })
    }

    /// POSTs `body` to the gateway's `path` as etcd's administrator would (no TLS, no
    /// token: for setting up authentication before it is enabled); the answer.
    pub fn admin(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let mut answer = ureq::post(&format!("{}{path}", self.endpoint))
            .send_json(body)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        answer.body_mut().read_json().expect("a JSON answer")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
