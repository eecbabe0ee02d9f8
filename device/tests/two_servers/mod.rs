//! Two server processes joined by the TCP transport on loopback, one device on each,
//! played by the host-side test driver: what the TCP suites share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::socket_bus::{SocketBus, SocketServer};
use crate::driver::verbs::{self, PINGPONG_SIZES, QpSpec, ipv4_gid};
use crate::driver::{self, Cq, Driver, Qp, QpSizes};
use vfio_user_pvrdma::abi::{
    self, GID_TYPE_ROCE_V1, PAGE_SIZE, access, qp_type, send_flags, wc_status, wr_opcode,
};

pub type D = Driver<SocketBus>;

pub const LOG: &str = "info,vfio_user_pvrdma::vfio=debug";
pub const BUF_VA: u64 = 0x20_0000;

/// Server A listens on a free loopback port; server B dials it.
pub fn two_servers() -> (Arc<SocketServer>, Arc<SocketServer>) {
    two_servers_via(|addr| addr.to_string())
}

/// As [`two_servers`], with B dialing `route(A's address)` (a proxy in between, say).
pub fn two_servers_via(
    route: impl FnOnce(&str) -> String,
) -> (Arc<SocketServer>, Arc<SocketServer>) {
    two_servers_with(route, &[])
}

/// As [`two_servers_via`], with `args` for both servers.
pub fn two_servers_with(
    route: impl FnOnce(&str) -> String,
    args: &[&str],
) -> (Arc<SocketServer>, Arc<SocketServer>) {
    two_servers_each(route, args, args)
}

/// As [`two_servers_via`], with `args_a` for A and `args_b` for B.
pub fn two_servers_each(
    route: impl FnOnce(&str) -> String,
    args_a: &[&str],
    args_b: &[&str],
) -> (Arc<SocketServer>, Arc<SocketServer>) {
    let a_args: Vec<&str> = ["--listen", "127.0.0.1:0"]
        .iter()
        .chain(args_a)
        .copied()
        .collect();
    let a = SocketServer::start_with(1, LOG, &a_args);
    let line = a.wait_for_server_line("listening on 127.0.0.1:");
    let addr = line
        .rsplit("listening on ")
        .next()
        .expect("the address")
        .trim()
        .to_string();
    let peer = route(&addr);
    let b_args: Vec<&str> = ["--listen", "127.0.0.1:0", "--peer", &peer]
        .iter()
        .chain(args_b)
        .copied()
        .collect();
    let b = SocketServer::start_with(1, LOG, &b_args);
    a.wait_for_server_line("is up");
    b.wait_for_server_line("is up");
    (a, b)
}

pub struct Side {
    pub d: D,
    pub cq: Cq,
    pub mr: driver::Mr,
    pub qp: Qp,
    pub gid: [u8; 16],
}

pub fn side(server: &Arc<SocketServer>, ip: [u8; 4]) -> Side {
    side_with(server, ip, PINGPONG_SIZES)
}

/// A side whose RC QP has `sizes`.
pub fn side_with(server: &Arc<SocketServer>, ip: [u8; 4], sizes: QpSizes) -> Side {
    side_on(server, 0, ip, sizes)
}

/// A side on the server's socket `socket`.
pub fn side_on(server: &Arc<SocketServer>, socket: usize, ip: [u8; 4], sizes: QpSizes) -> Side {
    let mut d = Driver::on_socket(server, socket);
    d.probe();
    let gid = ipv4_gid(ip);
    d.create_bind(0, gid, GID_TYPE_ROCE_V1)
        .expect("CREATE_BIND");
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    let cq = d.create_cq_on(uc, 64).expect("CREATE_CQ");
    let mr = d
        .reg_user_mr(
            pd,
            BUF_VA,
            4 * PAGE_SIZE,
            access::LOCAL_WRITE
                | access::REMOTE_WRITE
                | access::REMOTE_READ
                | access::REMOTE_ATOMIC,
        )
        .expect("REG_MR");
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, sizes);
    let qp = d.create_qp_with(spec).expect("CREATE_QP");
    Side { d, cq, mr, qp, gid }
}

/// Polls `cq` until `count` completions came (the TCP answer arrives on the transport's
/// thread, not within the doorbell).
pub fn wait_cqes(d: &mut D, cq: &Cq, count: usize) -> Vec<abi::Cqe> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cqes = Vec::new();
    while cqes.len() < count {
        cqes.extend(d.drain_cq(cq));
        assert!(
            Instant::now() < deadline,
            "{} of {count} completions within 10 s: {cqes:?}",
            cqes.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    cqes
}

pub fn sge(addr: u64, length: u32, lkey: u32) -> abi::Sge {
    abi::Sge { addr, length, lkey }
}

pub fn connected_pair() -> (Arc<SocketServer>, Arc<SocketServer>, Side, Side) {
    connected_pair_with(&[])
}

/// As [`connected_pair`], with `args` for both servers.
pub fn connected_pair_with(args: &[&str]) -> (Arc<SocketServer>, Arc<SocketServer>, Side, Side) {
    let (server_a, server_b) = two_servers_with(|addr| addr.to_string(), args);
    let (a, b) = connect_sides(&server_a, &server_b, PINGPONG_SIZES);
    (server_a, server_b, a, b)
}

/// One side on each server, RC QPs of `sizes` connected to each other.
pub fn connect_sides(
    server_a: &Arc<SocketServer>,
    server_b: &Arc<SocketServer>,
    sizes: QpSizes,
) -> (Side, Side) {
    let mut a = side_with(server_a, [10, 1, 0, 1], sizes);
    let mut b = side_with(server_b, [10, 2, 0, 1], sizes);
    // Each server announces its GIDs within 50 ms of a change.
    server_a.wait_for_server_line("holds 1 GIDs");
    server_b.wait_for_server_line("holds 1 GIDs");
    connect(&mut a, b.qp.qpn, b.gid);
    connect(&mut b, a.qp.qpn, a.gid);
    (a, b)
}

/// `ibv_rc_pingpong`'s RESET → INIT → RTR → RTS, with remote WRITE, READ and atomics
/// allowed on the QP (pingpong allows none).
pub fn connect(side: &mut Side, dest_qpn: u32, dgid: [u8; 16]) {
    connect_retrying(side, dest_qpn, dgid, 7);
}

/// As [`connect`], with `retry_cnt` transport retries.
pub fn connect_retrying(side: &mut Side, dest_qpn: u32, dgid: [u8; 16], retry_cnt: u8) {
    let init = abi::QpAttr {
        qp_access_flags: access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC,
        ..verbs::rc_init_attrs()
    };
    let d = &mut side.d;
    d.modify_qp(side.qp.handle, verbs::RC_INIT_MASK, &init)
        .expect("INIT");
    d.modify_qp(
        side.qp.handle,
        verbs::RC_RTR_MASK,
        &verbs::rc_rtr_attrs(dest_qpn, 0x1234, dgid, 0),
    )
    .expect("RTR");
    // The peer's receive PSN: a real fabric (the rdma path) drops packets numbered
    // otherwise.
    d.modify_qp(
        side.qp.handle,
        verbs::RC_RTS_MASK,
        &abi::QpAttr {
            retry_cnt,
            ..verbs::rc_rts_attrs(0x1234)
        },
    )
    .expect("RTS");
}

pub fn buffer(side: &Side, va: u64) -> u64 {
    side.mr.buffer.as_ref().expect("user MR").translate(va)
}

/// SEND with immediate, a 10 KiB WRITE, a READ and a fetch-and-add from A to B.
pub fn every_rc_verb_crosses(mut a: Side, mut b: Side) {
    rc_verbs_cross(&mut a, &mut b);
}

/// [`every_rc_verb_crosses`], leaving both sides to the caller.
pub fn rc_verbs_cross(a: &mut Side, b: &mut Side) {
    // SEND with immediate: lands in B's receive buffer.
    let message = b"across two servers";
    let len = message.len() as u32;
    b.d.post_recv(&b.qp, 77, &[sge(BUF_VA, 256, b.mr.lkey)])
        .unwrap();
    crate::driver::memory::write_bytes(a.d.ram(), buffer(a, BUF_VA), message);
    let mut wqe = crate::driver::queues::send_wqe(
        11,
        wr_opcode::SEND_WITH_IMM,
        send_flags::SIGNALED,
        &[sge(BUF_VA, len, a.mr.lkey)],
    );
    // The immediate sits in the header's `ex` word.
    let ex = std::mem::offset_of!(abi::SendWqeHeader, ex);
    wqe[ex..ex + 4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    a.d.post_send_raw(&a.qp, &wqe).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let sent = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((sent[0].wr_id, sent[0].status), (11, wc_status::SUCCESS));
    let received = wait_cqes(&mut b.d, &b.cq, 1);
    assert_eq!(
        (
            received[0].wr_id,
            received[0].status,
            received[0].byte_len,
            received[0].imm_data
        ),
        (77, wc_status::SUCCESS, len, 0x1234_5678)
    );
    assert_eq!(
        crate::driver::memory::snapshot(b.d.ram(), buffer(b, BUF_VA), message.len()),
        message
    );

    // RDMA WRITE of 10 KiB into B's MR, then READ it back into another part of A's.
    let data: Vec<u8> = (0..10_240u32).map(|i| (i * 13 % 251) as u8).collect();
    for (i, chunk) in data.chunks(PAGE_SIZE as usize).enumerate() {
        let va = BUF_VA + i as u64 * PAGE_SIZE;
        crate::driver::memory::write_bytes(a.d.ram(), buffer(a, va), chunk);
    }
    let write = crate::driver::queues::rdma_wqe(
        21,
        wr_opcode::RDMA_WRITE,
        send_flags::SIGNALED,
        &[sge(BUF_VA, data.len() as u32, a.mr.lkey)],
        BUF_VA,
        b.mr.rkey,
    );
    a.d.post_send_raw(&a.qp, &write).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (21, wc_status::SUCCESS));
    let mut landed = Vec::new();
    for i in 0..3u64 {
        let take = (data.len() as u64 - i * PAGE_SIZE).min(PAGE_SIZE) as usize;
        landed.extend(crate::driver::memory::snapshot(
            b.d.ram(),
            buffer(b, BUF_VA + i * PAGE_SIZE),
            take,
        ));
    }
    assert_eq!(landed, data, "the WRITE's bytes in B's memory");
    assert_eq!(
        b.d.drain_cq(&b.cq),
        [],
        "a WRITE without immediate consumes no receive"
    );

    let read = crate::driver::queues::rdma_wqe(
        22,
        wr_opcode::RDMA_READ,
        send_flags::SIGNALED,
        &[sge(BUF_VA + 3 * PAGE_SIZE, 100, a.mr.lkey)],
        BUF_VA + 50,
        b.mr.rkey,
    );
    a.d.post_send_raw(&a.qp, &read).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status, cqes[0].byte_len),
        (22, wc_status::SUCCESS, 100)
    );
    assert_eq!(
        crate::driver::memory::snapshot(a.d.ram(), buffer(a, BUF_VA + 3 * PAGE_SIZE), 100),
        &data[50..150]
    );

    // Fetch-and-add on B's first word: A gets the old value, B's memory the sum.
    crate::driver::memory::write_bytes(b.d.ram(), buffer(b, BUF_VA), &40u64.to_le_bytes());
    let faa = crate::driver::queues::atomic_wqe(
        23,
        wr_opcode::ATOMIC_FETCH_AND_ADD,
        send_flags::SIGNALED,
        &[sge(BUF_VA + 3 * PAGE_SIZE, 8, a.mr.lkey)],
        BUF_VA,
        b.mr.rkey,
        2,
        0,
    );
    a.d.post_send_raw(&a.qp, &faa).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (23, wc_status::SUCCESS));
    assert_eq!(
        crate::driver::memory::snapshot(a.d.ram(), buffer(a, BUF_VA + 3 * PAGE_SIZE), 8),
        40u64.to_le_bytes()
    );
    assert_eq!(
        crate::driver::memory::snapshot(b.d.ram(), buffer(b, BUF_VA), 8),
        42u64.to_le_bytes()
    );
}
