//! The etcd of a two-server lab whose servers find each other in a directory (`--directory`)
//! instead of a `--peer` list: Debian's etcd as a one-member cluster inside host 0's
//! namespace, listening on host 0's veth address, so the server of host 1 reaches it across
//! the link as a server of another host would. Its data lives in the lab's run folder and
//! goes with the lab (also when a test fails); its log stays there with the servers' logs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use super::child;
use super::error::{LabError, Result};

/// etcd's own ports. The namespace is the lab's alone, so the usual ones cannot collide with
/// another lab or anything else on the machine.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// How long etcd may take to answer: it starts in about a second, but the guests of other
/// labs may be keeping both cores busy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EtcdProcess {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
    endpoint: String,
}

impl EtcdProcess {
    /// Starts etcd in namespace `netns` on `addr` (host 0's veth address), its data and log
    /// under `run_dir`, and waits until it answers a request.
    pub fn start_in(netns: &str, addr: &str, run_dir: &Path) -> Result<EtcdProcess> {
        let binary = find_in_path("etcd").ok_or_else(|| {
            LabError::Setup(
                "etcd is not installed, and this lab's servers find each other in etcd: \
                 install Debian's etcd-server (apt-get install etcd-server; scripts/test does)"
                    .into(),
            )
        })?;
        let data_dir = run_dir.join("etcd.data");
        let log = run_dir.join("etcd.log");
        let log_file =
            File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let endpoint = format!("{addr}:{CLIENT_PORT}");
        let client_url = format!("http://{endpoint}");
        let peer_url = format!("http://{addr}:{PEER_PORT}");
        let mut command = Command::new("ip");
        // `ip netns exec` execs etcd in the namespace: the child is etcd, as with the servers.
        command
            .args(["netns", "exec", netns])
            .arg(&binary)
            .args(["--name", "lab"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lab={peer_url}")])
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(LabError::io("duplicating etcd's log"))?,
            )
            .stderr(log_file);
        let child = child::spawn_tied(&mut command)
            .map_err(LabError::io(format!("starting {}", binary.display())))?;
        let mut etcd = EtcdProcess {
            child,
            data_dir,
            log,
            endpoint,
        };
        etcd.wait_answering(netns)?;
        Ok(etcd)
    }

    /// `HOST:PORT` of the client port, as `--directory etcd://…` wants it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Polls with a real request until etcd answers one: a listening port is not yet a
    /// working etcd (a member serves once it has elected itself), and a server that reaches
    /// no etcd logs a warning and tries again only a second later.
    fn wait_answering(&mut self, netns: &str) -> Result<()> {
        let addr: SocketAddr = self
            .endpoint
            .parse()
            .map_err(|e| LabError::Setup(format!("etcd's endpoint {}: {e}", self.endpoint)))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let Err(last) = probe_in(netns, addr) else {
                return Ok(());
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LabError::Setup(format!(
                    "etcd exited with {status} before answering:\n{}",
                    self.log_text()
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::Setup(format!(
                    "etcd did not answer within {START_TIMEOUT:?} ({last}):\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        // Nothing in it outlives the lab, so there is no clean shutdown to wait for.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its write-ahead log preallocates tens of MiB: gone even when the run folder is kept
        // for a failed test (etcd.log stays).
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// One range request on etcd's JSON gateway (`POST /v3/kv/range`, the key `/` in base64),
/// made from inside `netns`: host 0's veth address is reachable only there. The thread that
/// joins the namespace exists for this one request, so nothing else of the test moves.
fn probe_in(netns: &str, addr: SocketAddr) -> std::result::Result<(), String> {
    let path = Path::new("/run/netns").join(netns);
    let joined = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace =
                    File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
                setns(&namespace, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("joining {netns}: {e}"))?;
                range_request(addr)
            })
            .join()
    });
    joined.unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

fn range_request(addr: SocketAddr) -> std::result::Result<(), String> {
    let timeout = Duration::from_secs(2);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connecting: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    let body = r#"{"key":"Lw=="}"#;
    let request = format!(
        "POST /v3/kv/range HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::new();
    // An empty store's answer is a few hundred bytes; the bound only guards the lab.
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.1 200") && answer.contains("\"header\"") {
        Ok(())
    } else {
        Err(format!("answered {status:?}"))
    }
}

/// The first executable `name` on `PATH`, as `ip netns exec` would find it.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
