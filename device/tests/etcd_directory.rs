//! Servers that find each other in etcd (`--directory`) instead of a `--peer` list: two
//! server processes on one loopback port at two addresses register in a real etcd (Debian's
//! etcd-server), link, and carry every RC verb between their guests; a killed server leaves
//! the other's view when its lease ends, and a restarted one comes back. Ignored by a plain
//! `cargo test`; scripts/test runs it with `--ignored` after installing etcd.

mod driver;
#[allow(dead_code)] // Shared with the TCP suites.
mod two_servers;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::socket_bus::SocketServer;
use driver::verbs::PINGPONG_SIZES;
use nix::sys::signal::Signal;
use pvrdma_backend::directory::etcd::Etcd;
use two_servers::{LOG, connect, rc_verbs_cross, side_with};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// etcd on loopback ports of its own, its data in a temp folder; killed on drop.
struct EtcdServer {
    child: Child,
    dir: PathBuf,
    endpoint: String,
}

impl EtcdServer {
    fn start() -> EtcdServer {
        let dir = std::env::temp_dir().join(format!("pvrdma-etcd-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "lab"])
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lab={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install Debian's etcd-server (scripts/test does)")
            });
        let server = EtcdServer {
            child,
            dir,
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.client().list(b"/").is_err() {
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn client(&self) -> Etcd {
        Etcd::new(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
    }

    /// The addresses registered under the test's prefix.
    fn registered(&self) -> Vec<String> {
        let listing = self.client().list(b"/lab/servers/").expect("list");
        listing
            .kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server(etcd: &EtcdServer, listen: &str) -> Arc<SocketServer> {
    let directory = format!("etcd://{}", etcd.endpoint);
    SocketServer::start_with(
        1,
        LOG,
        &[
            "--listen",
            listen,
            "--directory",
            &directory,
            "--directory-prefix",
            "/lab/",
        ],
    )
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn servers_found_in_etcd_link_carry_verbs_and_a_dead_one_leaves_when_its_lease_ends() {
    let etcd = EtcdServer::start();
    // One port on two loopback addresses: under the sandbox a server dials peers on its
    // own --listen port only.
    let port = free_port();
    let (addr_a, addr_b) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let server_a = server(&etcd, &addr_a);
    let server_b = server(&etcd, &addr_b);
    // No --peer: they link because etcd lists them, then tell each other their GIDs.
    server_a.wait_for_server_line("is up");
    server_b.wait_for_server_line("is up");
    wait_until("both servers registered", Duration::from_secs(10), || {
        etcd.registered()
            == [
                format!("/lab/servers/{addr_a}"),
                format!("/lab/servers/{addr_b}"),
            ]
    });
    let mut a = side_with(&server_a, [10, 1, 0, 1], PINGPONG_SIZES);
    let mut b = side_with(&server_b, [10, 2, 0, 1], PINGPONG_SIZES);
    server_a.wait_for_server_line("holds 1 GIDs");
    server_b.wait_for_server_line("holds 1 GIDs");
    connect(&mut a, b.qp.qpn, b.gid);
    connect(&mut b, a.qp.qpn, a.gid);
    rc_verbs_cross(&mut a, &mut b);
    // `stats` shows the directory and the server it learned.
    let stats = vfio_user_pvrdma::profiler::control::request(
        server_a.control(),
        "stats",
        Duration::from_secs(10),
    )
    .expect("stats");
    assert!(
        stats.contains(&format!(
            "directory etcd://{}/lab/ at revision",
            etcd.endpoint
        )) && stats.contains(&format!("1 other servers: {addr_b}")),
        "{stats}"
    );

    // B dies without a word: its registration goes when its lease ends (10 s), and A's
    // view follows.
    drop((a, b));
    server_b.stop_with(Signal::SIGKILL);
    let killed = Instant::now();
    server_a.wait_for_server_line(&format!("directory: server {addr_b} left"));
    let gone_after = killed.elapsed();
    eprintln!("a killed server left the directory after {gone_after:?}");
    assert!(gone_after < Duration::from_secs(25), "{gone_after:?}");
    assert_eq!(etcd.registered(), [format!("/lab/servers/{addr_a}")]);

    // A new B registers again and links again.
    let server_b = server(&etcd, &addr_b);
    server_b.wait_for_server_line("is up");
    server_a.wait_for_server_line("is up");
    wait_until("B registered again", Duration::from_secs(10), || {
        etcd.registered().len() == 2
    });
    // Stopped cleanly, a server leaves at once (its lease is revoked).
    server_b.stop_with(Signal::SIGTERM);
    wait_until(
        "a stopped server's registration revoked",
        Duration::from_secs(5),
        || etcd.registered().len() == 1,
    );
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn without_etcd_a_server_says_so_and_serves_its_own_guests() {
    let nobody = format!("etcd://127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let server = SocketServer::start_with(
        2,
        LOG,
        &[
            "--listen",
            &listen,
            "--directory",
            &nobody,
            "--directory-prefix",
            "/lab/",
        ],
    );
    server.wait_for_server_line("cannot reach etcd");
    // Its two devices still reach each other by memcpy.
    let mut a = two_servers::side_on(&server, 0, [10, 3, 0, 1], PINGPONG_SIZES);
    let mut b = two_servers::side_on(&server, 1, [10, 3, 0, 2], PINGPONG_SIZES);
    connect(&mut a, b.qp.qpn, b.gid);
    connect(&mut b, a.qp.qpn, a.gid);
    rc_verbs_cross(&mut a, &mut b);
}
