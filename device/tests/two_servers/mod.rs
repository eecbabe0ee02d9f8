//! Two server processes joined by the TCP transport on loopback, one device on each,
//! played by the host-side test driver: what the TCP suites share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::socket_bus::{SocketBus, SocketServer};
use crate::driver::verbs::{self, PINGPONG_SIZES, QpSpec, ipv4_gid};
use crate::driver::{self, Cq, Driver, Qp, QpSizes};
use vfio_user_pvrdma::abi::{self, GID_TYPE_ROCE_V1, PAGE_SIZE, access, qp_type};

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
    let a_args: Vec<&str> = ["--listen", "127.0.0.1:0"]
        .iter()
        .chain(args)
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
        .chain(args)
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
    let mut d = Driver::on_socket(server, 0);
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
    d.modify_qp(
        side.qp.handle,
        verbs::RC_RTS_MASK,
        &verbs::rc_rts_attrs(0x5678),
    )
    .expect("RTS");
}

pub fn buffer(side: &Side, va: u64) -> u64 {
    side.mr.buffer.as_ref().expect("user MR").translate(va)
}
