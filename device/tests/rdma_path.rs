//! The server with a host RDMA device (docs/rdma-transport.md). These tests need one: they
//! run inside a lab guest that plays a host with Soft-RoCE (guest-tests/tests/rdma_host.rs
//! sets `PVRDMA_RDMA_DEVICE`). Anywhere else they say so and pass without checking.

mod driver;

#[path = "../benches/fabric/baseline.rs"]
mod baseline;
#[path = "../benches/fabric/guests.rs"]
#[allow(dead_code)] // The benchmark's other figures are not smoke-tested here.
mod guests;
#[path = "../benches/fabric/rdma.rs"]
mod rdma;
#[path = "../benches/fabric/report.rs"]
#[allow(dead_code)]
mod report;
#[path = "../benches/fabric/suite.rs"]
#[allow(dead_code)]
mod suite;
#[path = "../benches/fabric/tcp.rs"]
#[allow(dead_code)]
mod tcp;
#[allow(dead_code)] // The suites share the module; this one uses its servers only.
mod two_servers;

use std::sync::Arc;
use std::time::Duration;

use driver::Driver;
use driver::memory;
use driver::socket_bus::SocketServer;
use driver::verbs::ipv4_gid;
use pvrdma_backend::rdma::{Verbs, devices};
use two_servers::{BUF_VA, Side, buffer, sge, wait_cqes};
use vfio_user_pvrdma::abi::{
    self, GID_TYPE_ROCE_V1, PAGE_SIZE, access, qp_state, send_flags, wc_status, wr_opcode,
};

/// The device named by `PVRDMA_RDMA_DEVICE`, or `None` (said loudly).
fn rdma_device(test: &str) -> Option<String> {
    let device = std::env::var("PVRDMA_RDMA_DEVICE").ok();
    if device.is_none() {
        eprintln!(
            "NOT RUN: {test} needs a host RDMA device (PVRDMA_RDMA_DEVICE); \
             guest-tests/tests/rdma_host.rs runs it inside a lab guest with Soft-RoCE"
        );
    }
    device
}

/// A guest GID the host device holds (its IPv4 RoCE GID) and one it does not: binding each
/// in a guest device makes the server say which is in the device's GID table, with the
/// sandbox on (the table is read through the device after the sandbox is entered).
#[test]
fn the_server_says_which_guest_gids_its_rdma_device_holds() {
    let Some(name) = rdma_device("the_server_says_which_guest_gids_its_rdma_device_holds") else {
        return;
    };
    let held = held_gid(&name);
    let absent = ipv4_gid([10, 200, 0, 1]);

    // The driver waits for the server's debug lines of its DMA maps.
    let server = SocketServer::start_with(
        1,
        "info,vfio_user_pvrdma::vfio=debug",
        &["--rdma-device", &name],
    );
    server.wait_for_server_line(&format!("rdma path: {name} port 1"));
    // Landlock stays on: the device is opened after it, under the credentials it gives.
    server.wait_for_server_line(
        "Landlock limits files and TCP ports (and lets the rdma path read sysfs",
    );
    let mut d = Driver::on_socket(&server, 0);
    d.probe();
    d.create_bind(0, held.gid, GID_TYPE_ROCE_V1)
        .expect("bind the GID the host device holds");
    d.create_bind(1, absent, GID_TYPE_ROCE_V1)
        .expect("bind a GID the host device does not hold");
    let held_addr = std::net::Ipv6Addr::from(held.gid);
    server.wait_for_server_line(&format!(
        "rdma path: guest GID {held_addr} is in {name}'s GID table (index {})",
        held.index
    ));
    server.wait_for_server_line(&format!(
        "rdma path: guest GID {} is not in {name}'s GID table",
        std::net::Ipv6Addr::from(absent)
    ));
}

/// The GID entry of `name` that holds an IPv4 address (the VM's own).
fn held_gid(name: &str) -> devices::GidEntry {
    let verbs = Verbs::load().expect("libibverbs");
    let listed = devices::list(&verbs).expect("the host's RDMA devices");
    let device = listed
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no RDMA device {name} in {listed:?}"));
    *device.ports[0]
        .gids
        .iter()
        .find(|g| g.gid[..12] == ipv4_gid([0, 0, 0, 0])[..12])
        .unwrap_or_else(|| panic!("{name} has no IPv4 GID: {device}"))
}

/// Two servers joined by TCP, each with the RDMA device: when a guest of A binds a GID the
/// device holds, B hears of it (its log and `stats`), which is what B's rdma path will ask.
#[test]
fn a_peer_server_hears_which_guest_gids_the_rdma_device_holds() {
    let Some(name) = rdma_device("a_peer_server_hears_which_guest_gids_the_rdma_device_holds")
    else {
        return;
    };
    let held = held_gid(&name);
    let (server_a, server_b) =
        two_servers::two_servers_with(|addr| addr.to_string(), &["--rdma-device", &name]);
    let mut d = Driver::on_socket(&server_a, 0);
    d.probe();
    d.create_bind(0, held.gid, GID_TYPE_ROCE_V1)
        .expect("bind the GID the host device holds");
    server_a.wait_for_server_line(&format!("is in {name}'s GID table"));
    server_b.wait_for_server_line(": 1 of its GIDs are on its RDMA device");
    let stats = vfio_user_pvrdma::profiler::control::request(
        server_b.control(),
        "stats json",
        std::time::Duration::from_secs(10),
    )
    .expect("stats from B");
    let json: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert_eq!(json["peers"][0]["rdma_gids"], 1, "{stats}");
}

/// A device name the host does not have stops the server at start, naming what it has.
#[test]
fn a_named_device_the_host_lacks_stops_the_server() {
    if rdma_device("a_named_device_the_host_lacks_stops_the_server").is_none() {
        return;
    }
    let out = std::process::Command::new(driver::socket_bus::server_binary())
        .args(["--rdma-device", "no-such-device", "--socket"])
        .arg(std::env::temp_dir().join(format!("pvrdma-rdma-{}.sock", std::process::id())))
        .output()
        .expect("run the server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--rdma-device no-such-device: no RDMA device of this host is called no-such-device; it has "),
        "{stderr}"
    );
}

/// The Soft-RoCE device on the VM's loopback interface that `rdma_host.rs` makes, with two
/// addresses for two servers' guests (`PVRDMA_RDMA_LOOP_DEVICE`): traffic between two
/// local addresses goes through the loopback interface, so only a device there carries it.
fn loop_device(test: &str) -> Option<String> {
    let device = std::env::var("PVRDMA_RDMA_LOOP_DEVICE").ok();
    if device.is_none() {
        eprintln!(
            "NOT RUN: {test} needs Soft-RoCE on a loopback interface (PVRDMA_RDMA_LOOP_DEVICE); \
             guest-tests/tests/rdma_host.rs runs it inside a lab guest"
        );
    }
    device
}

/// The guests' addresses on the loop device (`rdma_host.rs` adds them to `lo`).
const LOOP_A: [u8; 4] = [127, 0, 0, 11];
const LOOP_B: [u8; 4] = [127, 0, 0, 12];

/// A counter of the host device's port (`hw_counters`).
fn port_counter(device: &str, counter: &str) -> u64 {
    let path = format!("/sys/class/infiniband/{device}/ports/1/hw_counters/{counter}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Two servers with the host device `name` (B's arguments replaced by `b_args` if given),
/// one guest each whose GID the device holds, their RC QPs connected once each server
/// heard that the other's guest GID is on the other's device.
fn connected_over(
    name: &str,
    b_args: Option<&[&str]>,
) -> (Arc<SocketServer>, Arc<SocketServer>, Side, Side) {
    connected_retrying(name, b_args, 7)
}

/// As [`connected_over`], the QPs with `retry_cnt` transport retries.
fn connected_retrying(
    name: &str,
    b_args: Option<&[&str]>,
    retry_cnt: u8,
) -> (Arc<SocketServer>, Arc<SocketServer>, Side, Side) {
    let a_args = ["--rdma-device", name];
    let (server_a, server_b) =
        two_servers::two_servers_each(|addr| addr.to_string(), &a_args, b_args.unwrap_or(&a_args));
    let mut a = two_servers::side(&server_a, LOOP_A);
    let mut b = two_servers::side(&server_b, LOOP_B);
    if b_args.is_none() {
        server_a.wait_for_server_line(": 1 of its GIDs are on its RDMA device");
        server_b.wait_for_server_line(": 1 of its GIDs are on its RDMA device");
    } else {
        server_a.wait_for_server_line("holds 1 GIDs");
        server_b.wait_for_server_line("holds 1 GIDs");
    }
    two_servers::connect_retrying(&mut a, b.qp.qpn, b.gid, retry_cnt);
    two_servers::connect_retrying(&mut b, a.qp.qpn, a.gid, retry_cnt);
    (server_a, server_b, a, b)
}

/// Waits until both servers said their QP is carried by the host device.
fn carried(server_a: &SocketServer, a: &Side, server_b: &SocketServer, b: &Side) {
    for (server, side) in [(server_a, a), (server_b, b)] {
        server.wait_for_server_line(&format!(
            "rdma path: QP {:#x} is carried by the host's RDMA device",
            side.qp.qpn
        ));
    }
}

/// Runs `work`; if it panics, prints both servers' rdma path lines and the device's
/// counters and QPs first.
fn explained(name: &str, servers: [&SocketServer; 2], work: impl FnOnce()) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    if let Err(panic) = outcome {
        for (side, server) in ["A", "B"].iter().zip(servers) {
            let log = server.log();
            let rdma: Vec<&str> = log.lines().filter(|l| l.contains("rdma")).collect();
            eprintln!("server {side}'s rdma path lines:\n{}", rdma.join("\n"));
        }
        let shown = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "rdma statistic show link {name}/1; rdma resource show qp link {name}/1"
            ))
            .output();
        if let Ok(out) = shown {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        std::panic::resume_unwind(panic);
    }
}

/// Two servers with the host device, one guest each whose GID the device holds: their RC
/// QPs take the host's QP numbers, connect through the host device, and SEND, WRITE, READ
/// and fetch-and-add cross with the same completions as over memcpy and TCP, the packets
/// counted by the device; `stats` names the path.
#[test]
fn rc_verbs_cross_two_servers_through_the_host_rdma_device() {
    let Some(name) = loop_device("rc_verbs_cross_two_servers_through_the_host_rdma_device") else {
        return;
    };
    let (server_a, server_b, a, b) = connected_over(&name, None);
    carried(&server_a, &a, &server_b, &b);
    let stats = vfio_user_pvrdma::profiler::control::request(
        server_a.control(),
        "stats",
        Duration::from_secs(10),
    )
    .expect("stats from A");
    let row = format!("  0 {:>5} rdma", a.qp.qpn);
    assert!(
        stats.contains(&row),
        "A's RC QP takes the rdma path ({row:?}):\n{stats}"
    );
    let sent = port_counter(&name, "sent_pkts");
    explained(&name, [&server_a, &server_b], || {
        two_servers::every_rc_verb_crosses(a, b)
    });
    let carried = port_counter(&name, "sent_pkts") - sent;
    // SEND, three WRITE packets, READ and its reply, the atomic and its reply, and acks.
    assert!(carried >= 8, "{name} carried {carried} packets");
}

/// A WRITE with a key the peer never issued: the peer's host device refuses it, and the
/// guest sees REM_ACCESS_ERR with its QP in the error state, as over memcpy and TCP.
#[test]
fn protection_is_checked_by_the_peers_host_device() {
    let Some(name) = loop_device("protection_is_checked_by_the_peers_host_device") else {
        return;
    };
    let (server_a, server_b, mut a, b) = connected_over(&name, None);
    carried(&server_a, &a, &server_b, &b);
    explained(&name, [&server_a, &server_b], || {
        let write = driver::queues::rdma_wqe(
            31,
            wr_opcode::RDMA_WRITE,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 64, a.mr.lkey)],
            BUF_VA,
            b.mr.rkey ^ 0xffff_ff00,
        );
        a.d.post_send_raw(&a.qp, &write).unwrap();
        a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
        let cqes = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!(
            (cqes[0].wr_id, cqes[0].status),
            (31, wc_status::REM_ACCESS_ERR)
        );
        assert_eq!(
            a.d.query_qp(a.qp.handle, 0).expect("QUERY_QP").qp_state,
            qp_state::ERR
        );
    });
}

/// Each guest PD is a PD of its own on the host device: a WRITE to B's QP with the rkey of
/// an MR in another PD of B's (one that grants remote writes) is refused, and the MR's
/// bytes stay as they were.
#[test]
fn an_rkey_of_another_pd_does_not_reach_through_the_host_device() {
    let Some(name) = loop_device("an_rkey_of_another_pd_does_not_reach_through_the_host_device")
    else {
        return;
    };
    let (server_a, server_b, mut a, mut b) = connected_over(&name, None);
    carried(&server_a, &a, &server_b, &b);
    let other_va = 0x40_0000;
    let uc = b.d.open_context().expect("a second context on B");
    let pd = b.d.create_pd(uc.handle).expect("a second PD on B");
    let other =
        b.d.reg_user_mr(
            pd,
            other_va,
            PAGE_SIZE,
            access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
        )
        .expect("an MR in the second PD");
    let before = memory::snapshot(
        b.d.ram(),
        other.buffer.as_ref().unwrap().translate(other_va),
        64,
    );
    explained(&name, [&server_a, &server_b], || {
        memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), &[0x5a; 64]);
        let write = driver::queues::rdma_wqe(
            32,
            wr_opcode::RDMA_WRITE,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 64, a.mr.lkey)],
            other_va,
            other.rkey,
        );
        a.d.post_send_raw(&a.qp, &write).unwrap();
        a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
        let cqes = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!(
            (cqes[0].wr_id, cqes[0].status),
            (32, wc_status::REM_ACCESS_ERR)
        );
    });
    assert_eq!(
        memory::snapshot(
            b.d.ram(),
            other.buffer.as_ref().unwrap().translate(other_va),
            64
        ),
        before
    );
}

/// A UD QP of each guest: a datagram from A to B goes through the host device (rxe counts
/// it), and B's receive holds the GRH naming A's GID and the payload, as over memcpy and
/// TCP; B's receive queue stays the device's (the host QP receives into the server's
/// buffers).
#[test]
fn datagrams_cross_two_servers_through_the_host_rdma_device() {
    let Some(name) = loop_device("datagrams_cross_two_servers_through_the_host_rdma_device") else {
        return;
    };
    let (server_a, server_b, mut a, mut b) = connected_over(&name, None);
    let ud = |side: &mut Side| {
        let spec = driver::verbs::QpSpec::user(
            abi::qp_type::UD,
            side.qp.uc,
            side.qp.pd,
            side.cq.handle,
            driver::verbs::PINGPONG_SIZES,
        );
        let qp = side.d.create_qp_with(spec).expect("CREATE_QP UD");
        side.d.ud_activate(&qp, 0x2222).expect("UD to RTS");
        qp
    };
    let (qa, qb) = (ud(&mut a), ud(&mut b));
    for (server, qp) in [(&server_a, &qa), (&server_b, &qb)] {
        server.wait_for_server_line(&format!(
            "rdma path: UD QP {:#x} sends through the host's RDMA device",
            qp.qpn
        ));
    }
    let sent_before = port_counter(&name, "sent_pkts");
    explained(&name, [&server_a, &server_b], || {
        b.d.post_recv(&qb, 51, &[sge(BUF_VA, 256, b.mr.lkey)])
            .unwrap();
        memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), b"a datagram");
        let mut wqe = driver::queues::send_wqe(
            52,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 10, a.mr.lkey)],
        );
        let av = abi::AddressVector {
            port_pd: a.qp.pd | 1 << 24,
            dgid: b.gid,
            hop_limit: 64,
            ..abi::AddressVector::default()
        };
        // The UD union: remote QPN, remote Q_Key, then the address vector.
        wqe[32..36].copy_from_slice(&qb.qpn.to_le_bytes());
        wqe[36..40].copy_from_slice(&0x2222u32.to_le_bytes());
        wqe[40..80].copy_from_slice(zerocopy::IntoBytes::as_bytes(&av));
        a.d.post_send_raw(&qa, &wqe).unwrap();
        a.d.ring_qp(&qa, abi::uar::QP_SEND);
        let sent = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!((sent[0].wr_id, sent[0].status), (52, wc_status::SUCCESS));
        let received = wait_cqes(&mut b.d, &b.cq, 1);
        assert_eq!(
            (
                received[0].wr_id,
                received[0].status,
                received[0].src_qp,
                received[0].byte_len
            ),
            (51, wc_status::SUCCESS, qa.qpn, 50)
        );
        let landed = memory::snapshot(b.d.ram(), buffer(&b, BUF_VA), 50);
        assert_eq!(&landed[8..24], &a.gid, "the GRH names the sender");
        assert_eq!(&landed[40..50], b"a datagram");
    });
    assert!(
        port_counter(&name, "sent_pkts") > sent_before,
        "the datagram went through {name}"
    );
}

/// A SEND before the peer posted a receive waits (receiver not ready, retried for ever
/// with rnr_retry 7) and lands once the receive is posted.
#[test]
fn a_send_waits_for_a_receive_on_the_peers_host_device() {
    let Some(name) = loop_device("a_send_waits_for_a_receive_on_the_peers_host_device") else {
        return;
    };
    let (server_a, server_b, mut a, mut b) = connected_over(&name, None);
    carried(&server_a, &a, &server_b, &b);
    explained(&name, [&server_a, &server_b], || {
        memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), b"late receive");
        a.d.post_send(
            &a.qp,
            41,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 12, a.mr.lkey)],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(a.d.drain_cq(&a.cq), []);
        b.d.post_recv(&b.qp, 42, &[sge(BUF_VA, 64, b.mr.lkey)])
            .unwrap();
        let sent = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!((sent[0].wr_id, sent[0].status), (41, wc_status::SUCCESS));
        let received = wait_cqes(&mut b.d, &b.cq, 1);
        assert_eq!((received[0].wr_id, received[0].byte_len), (42, 12));
        assert_eq!(
            memory::snapshot(b.d.ram(), buffer(&b, BUF_VA), 12),
            b"late receive"
        );
    });
}

/// The peer server is killed: its host QPs go with it, the host device's retries run out,
/// and the guest sees RETRY_EXC_ERR with its QP in the error state; the server goes on.
/// (Soft-RoCE reads retry_cnt 7 as "for ever", as IB does only for rnr_retry: 3 here.)
#[test]
fn a_vanished_peer_fails_work_with_retry_exceeded() {
    let Some(name) = loop_device("a_vanished_peer_fails_work_with_retry_exceeded") else {
        return;
    };
    let (server_a, server_b, mut a, b) = connected_retrying(&name, None, 3);
    carried(&server_a, &a, &server_b, &b);
    nix::sys::signal::kill(server_b.pid(), nix::sys::signal::Signal::SIGKILL).expect("kill B");
    server_a.wait_for_server_line("is down");
    explained(&name, [&server_a, &server_b], || {
        memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), b"to a dead server");
        a.d.post_send(
            &a.qp,
            61,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 16, a.mr.lkey)],
        )
        .unwrap();
        let cqes = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!(
            (cqes[0].wr_id, cqes[0].status),
            (61, wc_status::RETRY_EXC_ERR)
        );
        assert_eq!(
            a.d.query_qp(a.qp.handle, 0).expect("QUERY_QP").qp_state,
            qp_state::ERR
        );
        a.d.query_port(1).expect("QUERY_PORT after the peer died");
    });
}

/// Fallback: the peer server has no RDMA device (`--rdma-device off`), so A's QP cannot
/// take the rdma path; it says why and every verb crosses over TCP instead, with the host
/// QP number and keys it adopted.
#[test]
fn without_a_device_on_the_peer_the_verbs_take_tcp() {
    let Some(name) = loop_device("without_a_device_on_the_peer_the_verbs_take_tcp") else {
        return;
    };
    let (server_a, server_b, a, b) = connected_over(&name, Some(&["--rdma-device", "off"]));
    server_a.wait_for_server_line(&format!(
        "rdma path: QP {:#x} takes another path: no peer server said its RDMA device holds ::ffff:127.0.0.12 (TCP carries it)",
        a.qp.qpn
    ));
    let stats = vfio_user_pvrdma::profiler::control::request(
        server_a.control(),
        "stats",
        Duration::from_secs(10),
    )
    .expect("stats from A");
    let row = format!("  0 {:>5} tcp", a.qp.qpn);
    assert!(
        stats.contains(&row),
        "A's RC QP takes TCP ({row:?}):\n{stats}"
    );
    let sent = port_counter(&name, "sent_pkts");
    explained(&name, [&server_a, &server_b], || {
        two_servers::every_rc_verb_crosses(a, b)
    });
    assert_eq!(
        port_counter(&name, "sent_pkts"),
        sent,
        "nothing went through {name}"
    );
}

/// Registering pins guest pages and maps them again for the host device, one mapping per
/// run of adjacent pages: a guest registering scattered pages gets at most its share of
/// the process's mappings, then its MRs stay off the host device (they keep the device's
/// own keys and still serve the other paths), and the log says why.
#[test]
fn a_guest_cannot_use_up_the_servers_mappings() {
    let Some(name) = loop_device("a_guest_cannot_use_up_the_servers_mappings") else {
        return;
    };
    let server = SocketServer::start_with(1, two_servers::LOG, &["--rdma-device", &name]);
    let mut d = Driver::on_socket(&server, 0);
    d.probe();
    d.create_bind(0, ipv4_gid(LOOP_A), GID_TYPE_ROCE_V1)
        .expect("bind a GID the loop device holds");
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    // The driver hands out a buffer's pages in descending order: each is a run of its own.
    let pages = 3000u64;
    for i in 0..3u64 {
        d.reg_user_mr(
            pd,
            0x100_0000 * (i + 1),
            pages * PAGE_SIZE,
            access::LOCAL_WRITE,
        )
        .expect("REG_MR succeeds on or off the host device");
    }
    let line = server.wait_for_line(0, "stays off the host device");
    assert!(
        line.contains("its 3000 runs of pages would pass the mappings registrations may take (6000 of 8192 for this device"),
        "{line}"
    );
}

/// Brings `lo` back up when dropped (a test took it down to take the loop device's port
/// down), and waits for the loop device's port to be active again.
struct LoopUp(String);

impl Drop for LoopUp {
    fn drop(&mut self) {
        let name = &self.0;
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip link set lo up; \
                 for i in $(seq 100); do grep -q ACTIVE /sys/class/infiniband/{name}/ports/1/state && break; sleep 0.1; done"
            ))
            .status();
    }
}

/// The host device's port goes down under carried QPs (Soft-RoCE follows its interface:
/// `lo` is taken down for a moment): each guest QP goes to the error state with a QP_FATAL
/// event, the server says why and goes on serving. (Removing a Soft-RoCE device is not
/// the same test: rxe cannot take its objects away from a process, so the removal waits
/// until every process closes the device, and tells it nothing; drivers that can,
/// real HCAs among them, send DEVICE_FATAL, which the server handles as this event.)
#[test]
fn a_port_that_goes_down_fails_the_qps_it_carries() {
    let Some(name) = loop_device("a_port_that_goes_down_fails_the_qps_it_carries") else {
        return;
    };
    let (server_a, server_b, mut a, b) = connected_over(&name, None);
    carried(&server_a, &a, &server_b, &b);
    {
        let _up = LoopUp(name.clone());
        let down = std::process::Command::new("ip")
            .args(["link", "set", "lo", "down"])
            .status()
            .expect("ip link set lo down");
        assert!(down.success(), "ip link set lo down: {down}");
        server_a.wait_for_server_line(&format!("rdma path: {name}: port 1 is down"));
    }
    explained(&name, [&server_a, &server_b], || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut events = Vec::new();
        while !events
            .iter()
            .any(|e: &abi::Eqe| e.event_type == abi::event::QP_FATAL && e.info == a.qp.handle)
        {
            events.extend(a.d.poll_async().expect("the async ring"));
            assert!(
                std::time::Instant::now() < deadline,
                "no QP_FATAL for QP {} within 10 s: {events:?}",
                a.qp.handle
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            a.d.query_qp(a.qp.handle, 0).expect("QUERY_QP").qp_state,
            qp_state::ERR
        );
        // Work posted now flushes at once; the device goes on answering.
        a.d.post_send(
            &a.qp,
            71,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 8, a.mr.lkey)],
        )
        .unwrap();
        let cqes = wait_cqes(&mut a.d, &a.cq, 1);
        assert_eq!(
            (cqes[0].wr_id, cqes[0].status),
            (71, wc_status::WR_FLUSH_ERR)
        );
        a.d.query_port(1)
            .expect("QUERY_PORT after the port went down");
    });
}

/// `scripts/bench --transport rdma`'s own code, very short, against real servers on the
/// loop device and perftest on the same device: every figure is measured and printed.
/// Nothing about timing is asserted (a debug build under TCG).
#[test]
fn the_rdma_bench_measures_every_figure() {
    let Some(name) = loop_device("the_rdma_bench_measures_every_figure") else {
        return;
    };
    let config = suite::Config {
        warmup: 20,
        round_trips: 200,
        write_time: Duration::from_millis(200),
        big_mr: 16 << 20,
        modes: &[guests::Mode::ExitFree],
        ..suite::Config::new(true)
    };
    let runs = rdma::run(&config, &name).unwrap_or_else(|e| panic!("the rdma bench: {e}"));
    assert_eq!(runs.len(), 1);
    let json: serde_json::Value = serde_json::from_str(&runs[0].json()).expect("JSON");
    for key in [
        "rdma_rc_send_64_rtt_us_p50",
        "raw_ib_send_lat_rtt_us",
        "ratio_rdma_rc_send_to_raw",
        "rdma_write_64k_gbytes_per_s",
        "raw_ib_write_bw_gbytes_per_s",
        "ratio_rdma_write_64k_to_raw",
    ] {
        let value = &json[key];
        assert!(
            value.as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
            "{key} is not a positive number: {json}"
        );
    }
    let table = runs[0].table();
    eprintln!("{table}");
    assert!(table.contains("ib_send_lat 2 × "), "{table}");
}

/// A host QP costs the host device queues as deep as the guest asks, and a host UD QP pins
/// its receive buffers: one guest gets at most 256 host QPs, 32 of them UD. Past that its
/// QPs take the other paths, and the log says why.
#[test]
fn a_guest_cannot_take_more_than_its_share_of_host_qps() {
    let Some(name) = loop_device("a_guest_cannot_take_more_than_its_share_of_host_qps") else {
        return;
    };
    let server = SocketServer::start_with(1, two_servers::LOG, &["--rdma-device", &name]);
    let mut side = two_servers::side(&server, LOOP_A);
    let spec = |qp_type| {
        driver::verbs::QpSpec::user(
            qp_type,
            side.qp.uc,
            side.qp.pd,
            side.cq.handle,
            driver::QpSizes {
                max_recv_wr: 4,
                ..driver::verbs::PINGPONG_SIZES
            },
        )
    };
    let ud = spec(abi::qp_type::UD);
    for _ in 0..33 {
        side.d
            .create_qp_with(ud)
            .expect("CREATE_QP UD, on the host or not");
    }
    server.wait_for_line(0, "the device has 32 host UD QPs already");
    // The side's own RC QP and the 32 UD QPs are host QPs: 223 more RC QPs fill the share.
    let rc = spec(abi::qp_type::RC);
    for _ in 0..224 {
        side.d
            .create_qp_with(rc)
            .expect("CREATE_QP RC, on the host or not");
    }
    server.wait_for_line(0, "the device has 256 host QPs already");
}
