//! Devices added to and removed from a running server with the binary's own `device`
//! subcommands: an added device's guest reaches the others by memcpy at once, with the
//! node GUID it was given; removing a device with a client attached is refused unless
//! forced, and the other devices go on as if nothing happened.

mod driver;
#[allow(dead_code)] // Shared with the TCP suites.
mod two_servers;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use driver::socket_bus::SocketServer;
use driver::verbs::PINGPONG_SIZES;
use two_servers::{LOG, Side, connect, rc_verbs_cross, side_on};

/// Runs `vfio-user-pvrdma device <verb> --control <server's> <args>`; whether it succeeded,
/// and what it printed (stdout on success, stderr otherwise).
fn device(server: &SocketServer, verb: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .args(["device", verb, "--control"])
        .arg(server.control())
        .args(args)
        .output()
        .expect("run vfio-user-pvrdma device");
    let shown = if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    };
    (
        out.status.success(),
        String::from_utf8_lossy(shown).into_owned(),
    )
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// The node GUID the device told the driver at probe, as `ibv_devinfo` prints it.
fn guid_seen(side: &mut Side) -> String {
    let bytes = side.d.session().caps.node_guid.to_le_bytes();
    format!(
        "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7]
    )
}

/// Twenty register reads, each within milliseconds: the device answers as before.
fn answers_promptly(side: &mut Side) {
    for _ in 0..20 {
        let started = Instant::now();
        side.d.read_version();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "a register read took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_device_added_at_run_time_joins_the_fabric_and_removing_one_leaves_the_others_be() {
    let server = SocketServer::start_partly(3, 1, LOG, &[]);
    let (b_path, c_path) = (
        server.socket(1).to_path_buf(),
        server.socket(2).to_path_buf(),
    );
    let mut a = side_on(&server, 0, [10, 1, 0, 1], PINGPONG_SIZES);

    let (ok, said) = device(
        &server,
        "add",
        &["--socket", text(&b_path), "--guid", "5254:00ff:fe5e:0b0b"],
    );
    assert!(ok, "device add: {said}");
    assert!(said.contains("device 1 serves"), "{said}");
    // The same socket twice, or the same GUID for another socket, is refused by name and
    // makes no file.
    let (ok, said) = device(&server, "add", &["--socket", text(&b_path)]);
    assert!(!ok && said.contains("is already served"), "{said}");
    let (ok, said) = device(
        &server,
        "add",
        &["--socket", text(&c_path), "--guid", "5254:00ff:fe5e:0b0b"],
    );
    assert!(!ok && said.contains("is already the GUID of"), "{said}");
    assert!(!c_path.exists(), "a refused device leaves no socket");

    // B's guest probes the new device and reaches A's by memcpy, every verb.
    let mut b = side_on(&server, 1, [10, 1, 0, 2], PINGPONG_SIZES);
    assert_eq!(guid_seen(&mut b), "5254:00ff:fe5e:0b0b");
    connect(&mut a, b.qp.qpn, b.gid);
    connect(&mut b, a.qp.qpn, a.gid);
    rc_verbs_cross(&mut a, &mut b);
    rc_verbs_cross(&mut b, &mut a);

    let (ok, list) = device(&server, "list", &[]);
    assert!(ok, "{list}");
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0][0], "0");
    assert_eq!(
        rows[0][1],
        guid_seen(&mut a),
        "A's GUID, derived from its path"
    );
    assert_eq!(rows[0][2..], ["attached", text(server.socket(0))]);
    assert_eq!(
        rows[1],
        ["1", "5254:00ff:fe5e:0b0b", "attached", text(&b_path)]
    );

    // Removing B while its QEMU is attached is refused; forced, B's client is cut off,
    // its socket goes, and A does not notice.
    let (ok, said) = device(&server, "remove", &["--socket", text(&b_path)]);
    assert!(!ok && said.contains("is attached"), "{said}");
    assert!(b_path.exists());
    let (ok, said) = device(&server, "remove", &["--socket", text(&b_path), "--force"]);
    assert!(ok, "{said}");
    assert!(said.contains("its client was disconnected"), "{said}");
    assert!(!b_path.exists(), "the removed device's socket file is gone");
    server.wait_for_line(1, "client disconnected");
    answers_promptly(&mut a);

    // The next device added takes the freed slot, with a GUID derived from its path.
    let (ok, said) = device(&server, "add", &["--socket", text(&c_path)]);
    assert!(ok && said.contains("device 1 serves"), "{said}");
    let mut c = side_on(&server, 2, [10, 1, 0, 3], PINGPONG_SIZES);
    let (_, list) = device(&server, "list", &[]);
    assert!(
        list.contains(&format!(
            "1\t{}\tattached\t{}",
            guid_seen(&mut c),
            text(&c_path)
        )),
        "{list}"
    );
    answers_promptly(&mut a);
    let (ok, said) = device(&server, "remove", &["--socket", "/nowhere/x.sock"]);
    assert!(
        !ok && said.contains("no device is served on /nowhere/x.sock"),
        "{said}"
    );
}

#[test]
fn with_the_sandbox_on_devices_are_added_only_where_it_lets_the_server_make_sockets() {
    let server = SocketServer::start_partly(1, 1, LOG, &[]);
    let elsewhere =
        std::env::temp_dir().join(format!("pvrdma-elsewhere-{}.sock", std::process::id()));
    let (ok, said) = device(&server, "add", &["--socket", text(&elsewhere)]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("the sandbox lets the server make sockets only in")
            && said.contains("--sandbox off"),
        "{said}"
    );
    assert!(!elsewhere.exists());
}
