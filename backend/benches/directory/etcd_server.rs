//! The benchmark's own etcd: one member with a data folder under the temp folder and two
//! free loopback ports, killed and its folder removed when the guard is dropped (an error
//! or a panic of the run included).

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pvrdma_backend::directory::etcd::Etcd;

/// What an etcd client of the benchmark waits for one answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct EtcdServer {
    child: Child,
    dir: PathBuf,
    pub endpoint: String,
    pub version: String,
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// The data folders' names: this and the benchmark's process id.
const FOLDER: &str = "pvrdma-directory-bench-";

/// Removes the data folders of earlier runs that were killed (their process is gone): a
/// killed run's etcd dies with it, but no destructor removes its folder.
fn remove_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(FOLDER));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

const MISSING: &str = "etcd is not installed (no `etcd` on PATH): install Debian's etcd-server \
                       (apt-get install etcd-server), which scripts/test installs too";

impl EtcdServer {
    pub fn start() -> Result<EtcdServer, String> {
        let version = match Command::new("etcd").arg("--version").output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("etcd")
                .trim()
                // "etcd Version: 3.4.23" → "etcd 3.4.23"
                .replace("Version: ", "")
                .to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MISSING.into()),
            Err(e) => return Err(format!("cannot run etcd --version: {e}")),
        };
        remove_stale_folders();
        let dir = std::env::temp_dir().join(format!("{FOLDER}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join("etcd.log"))
            .map_err(|e| format!("{}: {e}", dir.join("etcd.log").display()))?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "bench", "--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // async-signal-safe system call. It ends etcd with the benchmark even when no
        // destructor runs (the benchmark interrupted by Ctrl-C or killed).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MISSING.into()),
            Err(e) => return Err(format!("cannot start etcd: {e}")),
        };
        let mut server = EtcdServer {
            child,
            dir,
            endpoint,
            version,
        };
        let client = server.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.list(b"probe/").is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("etcd exited ({status}): {}", server.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd did not answer within 30 s: {}",
                    server.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn client(&self) -> Etcd {
        Etcd::new(std::slice::from_ref(&self.endpoint), CLIENT_TIMEOUT)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// etcd's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        crate::metrics::status_kib(&status, "VmHWM:").map(|kib| kib * 1024)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
