//! Two server processes joined by the TCP transport on loopback, each with one device
//! driven by the host-side test driver: RC SEND, WRITE, READ and atomics, and UD, cross
//! between the servers with the same completions as on one server, and the path is chosen
//! per GID without the user naming it.

mod driver;
#[allow(dead_code)] // Shared with the other TCP suite.
mod two_servers;

use std::time::{Duration, Instant};

use driver::Qp;
use driver::memory;
use driver::verbs::{PINGPONG_SIZES, QpSpec};
use two_servers::{
    BUF_VA, Side, buffer, connected_pair, connected_pair_with, every_rc_verb_crosses, sge,
    wait_cqes,
};
use vfio_user_pvrdma::abi::{
    self, GID_TYPE_ROCE_V1, qp_state, qp_type, send_flags, wc_status, wr_opcode,
};

#[test]
fn rc_send_write_read_and_atomics_cross_two_servers() {
    let (_server_a, _server_b, a, b) = connected_pair();
    every_rc_verb_crosses(a, b);
}

/// With exit-free doorbells the servers' pollers serve the links too (no transport thread):
/// the same verbs, the same completions. (The driver still rings over the socket, which an
/// exit-free server serves as well; the frames, answers and completions are the poller's.)
#[test]
fn the_same_verbs_cross_servers_whose_pollers_serve_the_links() {
    let (server_a, server_b, a, b) = connected_pair_with(&["--doorbells", "exit-free"]);
    for server in [&server_a, &server_b] {
        let threads = thread_names(server.pid().as_raw());
        assert!(
            threads.iter().any(|t| t == "doorbell poller")
                && !threads.iter().any(|t| t == "pvrdma-tcp"),
            "the poller serves the links, no transport thread: {threads:?}"
        );
    }
    every_rc_verb_crosses(a, b);
}

/// The names of a process's threads.
fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn protection_is_checked_at_the_remote_responder() {
    let (_server_a, _server_b, mut a, _b) = connected_pair();
    // A WRITE with a key B never issued: REM_ACCESS_ERR, and A's QP goes to the error
    // state, exactly as between two devices of one server.
    let write = driver::queues::rdma_wqe(
        31,
        wr_opcode::RDMA_WRITE,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 64, a.mr.lkey)],
        BUF_VA,
        0xdead_beef,
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
}

#[test]
fn a_send_waits_for_a_receive_across_servers() {
    let (_server_a, _server_b, mut a, mut b) = connected_pair();
    memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), b"late receive");
    a.d.post_send(
        &a.qp,
        41,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 12, a.mr.lkey)],
    )
    .unwrap();
    // Receiver not ready: rnr_retry 7 retries for ever, spaced by min_rnr_timer.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.d.drain_cq(&a.cq), []);
    b.d.post_recv(&b.qp, 42, &[sge(BUF_VA, 64, b.mr.lkey)])
        .unwrap();
    let sent = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((sent[0].wr_id, sent[0].status), (41, wc_status::SUCCESS));
    let received = wait_cqes(&mut b.d, &b.cq, 1);
    assert_eq!((received[0].wr_id, received[0].byte_len), (42, 12));
}

#[test]
fn a_gid_another_server_holds_cannot_be_bound() {
    let (server_a, _server_b, mut a, b) = connected_pair();
    let refused = a.d.create_bind(3, b.gid, GID_TYPE_ROCE_V1);
    assert!(
        matches!(refused, Err(driver::commands::CmdError::Device(98))),
        "{refused:?}"
    );
    server_a.wait_for_line(0, "another port holds it");
}

/// A UD QP on `side`'s context (it has its own PD and CQ).
fn ud_qp(side: &mut Side, qkey: u32) -> Qp {
    let d = &mut side.d;
    let uc = side.qp.uc;
    let spec = QpSpec::user(qp_type::UD, uc, side.qp.pd, side.cq.handle, PINGPONG_SIZES);
    let qp = d.create_qp_with(spec).expect("CREATE_QP UD");
    d.ud_activate(&qp, qkey).expect("UD to RTS");
    qp
}

#[test]
fn datagrams_cross_two_servers_with_their_grh() {
    let (_server_a, _server_b, mut a, mut b) = connected_pair();
    let qa = ud_qp(&mut a, 0x2222);
    let qb = ud_qp(&mut b, 0x2222);
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
        (received[0].wr_id, received[0].status, received[0].src_qp),
        (51, wc_status::SUCCESS, qa.qpn)
    );
    // 40 bytes of GRH (the sender's GID at offset 8), then the payload.
    let landed = memory::snapshot(b.d.ram(), buffer(&b, BUF_VA), 50);
    assert_eq!(
        &landed[8..24],
        &a.gid,
        "the GRH names the sender on the other server"
    );
    assert_eq!(&landed[40..50], b"a datagram");
}

#[test]
fn a_dead_peer_server_fails_waiting_work_and_spares_the_rest() {
    let (server_a, server_b, mut a, _b) = connected_pair();
    let server_b_pid = server_b.pid();
    nix::sys::signal::kill(server_b_pid, nix::sys::signal::Signal::SIGKILL).expect("kill B");
    server_a.wait_for_server_line("is down");
    memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), b"to a dead server");
    a.d.post_send(
        &a.qp,
        61,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 16, a.mr.lkey)],
    )
    .unwrap();
    // timeout 14 (67 ms, at least 100 ms) and retry_cnt 7: about a second, then
    // RETRY_EXC_ERR; the QP goes to the error state; nothing hangs.
    let started = Instant::now();
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (61, wc_status::RETRY_EXC_ERR)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        a.d.query_qp(a.qp.handle, 0).expect("QUERY_QP").qp_state,
        qp_state::ERR
    );
    // Server A is alive and its device answers commands.
    assert!(server_a.exited().is_none());
    a.d.query_port(1).expect("QUERY_PORT after the peer died");
}

#[test]
fn stats_show_each_peer_and_the_path_each_qp_takes() {
    let (server_a, _server_b, a, _b) = connected_pair();
    let answer = vfio_user_pvrdma::profiler::control::request(
        server_a.control(),
        "stats",
        Duration::from_secs(10),
    )
    .expect("stats from the control socket");
    assert!(answer.contains(" up "), "the peer's link is up:\n{answer}");
    let row = format!("  0 {:>5} tcp", a.qp.qpn);
    assert!(
        answer.contains(&row),
        "A's RC QP goes over TCP ({row:?}):\n{answer}"
    );
}
