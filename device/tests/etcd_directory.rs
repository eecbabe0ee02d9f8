//! Servers that find each other and each other's GIDs in etcd (`--directory`) instead of a
//! `--peer` list: three server processes, each in a network namespace of its own, register
//! in a real etcd (Debian's etcd-server) running in a fourth; the guests' GIDs converge on
//! every server, a GID one server holds cannot be bound on another, servers link only
//! when a QP needs them and carry every RC verb, a killed server's GIDs vanish when its
//! lease ends, and a restarted one takes its GIDs back and is reached again. Ignored by a
//! plain `cargo test` (it needs etcd and root for the namespaces); scripts/test runs it
//! with `--ignored` after installing etcd.

mod driver;
mod netns;
#[allow(dead_code)] // Shared with the TCP suites.
mod two_servers;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::Driver;
use driver::commands::CmdError;
use driver::socket_bus::SocketServer;
use driver::verbs::{PINGPONG_SIZES, ipv4_gid};
use netns::{Star, in_netns};
use nix::sys::signal::Signal;
use pvrdma_backend::directory::etcd::Etcd;
use serde_json::Value;
use two_servers::{LOG, connect, rc_verbs_cross, side_on};
use vfio_user_pvrdma::abi::GID_TYPE_ROCE_V1;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The port the servers' transport listens on in their namespaces.
const TRANSPORT_PORT: u16 = 4791;

/// etcd in the hub namespace of `star`, its data in a temp folder; killed on drop.
struct EtcdServer {
    child: Child,
    dir: PathBuf,
    endpoint: String,
    netns: String,
}

impl EtcdServer {
    fn start(star: &Star) -> EtcdServer {
        let dir = std::env::temp_dir().join(format!("pvrdma-etcd-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        let host = star.hub_addr();
        let endpoint = format!("{host}:2379");
        let peer_url = format!("http://{host}:2380");
        let child = Command::new("ip")
            .args(["netns", "exec", star.hub(), "etcd"])
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
            .unwrap_or_else(|e| panic!("cannot start etcd ({e})"));
        let server = EtcdServer {
            child,
            dir,
            endpoint,
            netns: star.hub().to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.query(|etcd| etcd.list(b"/").is_err()) {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s: is Debian's etcd-server installed? \
                 (scripts/test installs it)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Runs `f` with a client of this etcd, from its namespace.
    fn query<T: Send>(&self, f: impl FnOnce(&Etcd) -> T + Send) -> T {
        let endpoint = self.endpoint.clone();
        in_netns(&self.netns, move || {
            f(&Etcd::new(&[endpoint], Duration::from_secs(5)))
        })
    }

    /// The keys under the test's prefix that start with `kind` (`servers/`, `gids/`).
    fn keys(&self, kind: &str) -> Vec<String> {
        let prefix = format!("/lab/{kind}");
        let listing = self.query(|etcd| etcd.list(prefix.as_bytes()).expect("list"));
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

/// Server `host` of `star`, with two device sockets, registered in `etcd`.
fn server(star: &Star, etcd: &EtcdServer, key: &std::path::Path, host: usize) -> Arc<SocketServer> {
    let listen = format!("{}:{TRANSPORT_PORT}", star.addr(host));
    let directory = format!("etcd://{}", etcd.endpoint);
    let key = key.display().to_string();
    let args = [
        "--listen",
        &listen,
        "--directory",
        &directory,
        "--directory-prefix",
        "/lab/",
        "--cluster-key",
        &key,
    ];
    SocketServer::start_in(Some(star.netns(host)), 2, 2, LOG, &args)
}

/// A server's `stats json`.
fn stats(server: &SocketServer) -> Value {
    let text = vfio_user_pvrdma::profiler::control::request(
        server.control(),
        "stats json",
        Duration::from_secs(10),
    )
    .expect("stats json");
    serde_json::from_str(&text).expect("stats JSON")
}

/// Waits until `server`'s view of the directory has `gids` GIDs and `servers` other
/// servers; returns how long that took.
fn converge(server: &SocketServer, gids: usize, servers: usize, within: Duration) -> Duration {
    let started = Instant::now();
    wait_until(
        &format!("{gids} GIDs and {servers} other servers in the view"),
        within,
        || {
            let v = stats(server);
            v["directory"]["gids"] == gids
                && v["directory"]["servers"].as_array().map(Vec::len) == Some(servers)
        },
    );
    started.elapsed()
}

/// The peer servers `server` has a link up with.
fn links_up(server: &SocketServer) -> usize {
    stats(server)["peers"].as_array().map_or(0, |peers| {
        peers.iter().filter(|p| p["link_up"] == true).count()
    })
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "starts etcd and network namespaces (root); run by scripts/test"]
fn three_hosts_share_one_directory_of_gids_and_link_on_demand() {
    let star = Star::new(3);
    let etcd = EtcdServer::start(&star);
    let key = std::env::temp_dir().join(format!("pvrdma-etcd-key-{}", std::process::id()));
    std::fs::write(&key, "a secret of this test's cluster").expect("the cluster key");
    let servers: Vec<_> = (0..3).map(|h| server(&star, &etcd, &key, h)).collect();
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);

    // One guest on each host adds its GID: every server's view converges on all three.
    let mut side_a = side_on(a, 0, [10, 1, 0, 1], PINGPONG_SIZES);
    let mut side_b = side_on(b, 0, [10, 2, 0, 1], PINGPONG_SIZES);
    let side_c = side_on(c, 0, [10, 3, 0, 1], PINGPONG_SIZES);
    let added = Instant::now();
    for server in &servers {
        converge(server, 3, 2, Duration::from_secs(10));
        eprintln!(
            "a server's view had the 3 GIDs {:?} after the last was added",
            added.elapsed()
        );
    }
    assert_eq!(etcd.keys("gids/").len(), 3);
    assert_eq!(etcd.keys("servers/").len(), 3);

    // A guest on C adding A's GID is refused: etcd says A holds it.
    let mut intruder = Driver::on_socket(c, 1);
    intruder.probe();
    match intruder.create_bind(0, side_a.gid, GID_TYPE_ROCE_V1) {
        Err(CmdError::Device(errno)) => assert_eq!(errno, libc::EADDRINUSE as u32),
        other => panic!("binding A's GID on C: {other:?}"),
    }
    drop(intruder);

    // Nobody linked yet: a link comes when a QP sends. A and B then carry every RC verb;
    // C, which sent nothing, stays unlinked (no full mesh).
    assert_eq!(links_up(a) + links_up(b) + links_up(c), 0);
    connect(&mut side_a, side_b.qp.qpn, side_b.gid);
    connect(&mut side_b, side_a.qp.qpn, side_a.gid);
    rc_verbs_cross(&mut side_a, &mut side_b);
    assert_eq!((links_up(a), links_up(b), links_up(c)), (1, 1, 0));

    // B dies without a word: its GID and address leave every view when its lease ends.
    // (A's first guest stays: a guest that goes takes its GIDs out of the directory.)
    drop(side_b);
    b.stop_with(Signal::SIGKILL);
    let killed = Instant::now();
    converge(a, 2, 1, Duration::from_secs(25));
    converge(c, 2, 1, Duration::from_secs(5));
    let gone_after = killed.elapsed();
    eprintln!("a killed server's GIDs left the directory after {gone_after:?}");
    assert_eq!(etcd.keys("gids/").len(), 2);

    // A new B on the same address: its guest takes the GID again, and A reaches it.
    let b = server(&star, &etcd, &key, 1);
    let mut side_b = side_on(&b, 0, [10, 2, 0, 1], PINGPONG_SIZES);
    let mut side_a2 = side_on(a, 1, [10, 1, 0, 2], PINGPONG_SIZES);
    converge(a, 4, 2, Duration::from_secs(10));
    connect(&mut side_a2, side_b.qp.qpn, side_b.gid);
    connect(&mut side_b, side_a2.qp.qpn, side_a2.gid);
    rc_verbs_cross(&mut side_a2, &mut side_b);

    // A server stopped cleanly leaves at once (its lease is revoked), GIDs and all.
    drop(side_c);
    c.stop_with(Signal::SIGTERM);
    converge(a, 3, 1, Duration::from_secs(5));
    let _ = std::fs::remove_file(&key);
    drop(servers);
    // B's guest's GID is B's again in etcd: the restarted server's own registration.
    assert!(etcd.keys("gids/").contains(&format!(
        "/lab/gids/{}",
        std::net::Ipv6Addr::from(ipv4_gid([10, 2, 0, 1]))
    )));
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
