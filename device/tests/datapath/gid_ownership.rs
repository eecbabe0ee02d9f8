//! A GID names one port of the whole fabric. A device that could bind its neighbour's GID
//! would receive the neighbour's datagrams and pass the RC peer check as the neighbour, so
//! CREATE_BIND refuses a GID another device holds (EADDRINUSE), and the GID is free again
//! once its holder lets it go.

use vfio_user_pvrdma::abi::{GID_TYPE_ROCE_V1, wc_status, wr_opcode};

use crate::driver::commands::CmdError;
use crate::harness::{Net, Pair, Wr, av};
use crate::operations::summary;

const EADDRINUSE: u32 = 98;

#[test]
fn a_gid_another_device_holds_cannot_be_bound() {
    let mut net = Net::two_devices();
    let (a, b) = (net.host_a(), net.host_b());
    let refused = net.dev(a.dev).create_bind(5, b.gid, GID_TYPE_ROCE_V1);
    assert!(
        matches!(refused, Err(CmdError::Device(EADDRINUSE))),
        "A bound B's GID: {refused:?}"
    );
    // A device may hold its own GID at several indices: that is one port.
    net.dev(b.dev)
        .create_bind(6, b.gid, GID_TYPE_ROCE_V1)
        .expect("B's own GID at a second index");
}

#[test]
fn a_refused_bind_leaves_the_owner_its_traffic() {
    let mut net = Net::two_devices();
    let (a, b) = (net.host_a(), net.host_b());
    assert!(
        net.dev(a.dev)
            .create_bind(5, b.gid, GID_TYPE_ROCE_V1)
            .is_err()
    );
    let mut p = Pair::ud(net, 0x1111, 0x1111);
    let recv = p
        .net
        .mr(&p.b, 256, vfio_user_pvrdma::abi::access::LOCAL_WRITE);
    p.recv_b(1, &[recv.sge(0, 128)]);
    p.recv_b(2, &[recv.sge(128, 128)]);
    // From its own GID, A reaches B as usual.
    let honest = av(p.a.pd, a.gid_index, b.gid);
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[]).ud(p.qb.qpn, 0x1111, honest)]);
    assert_eq!(p.recvs_b().len(), 1, "B receives A's honest datagram");
    // A sends from its GID index 5, where the refused bind would have put B's GID: nothing
    // is bound there, so A cannot pose as B either.
    let posing = av(p.a.pd, 5, b.gid);
    p.post_a(&[Wr::new(2, wr_opcode::SEND, &[]).ud(p.qb.qpn, 0x1111, posing)]);
    let sends = summary(&p.sends_a());
    let posed: Vec<_> = sends.iter().filter(|send| send.0 == 2).collect();
    assert_eq!(posed.len(), 1, "{sends:?}");
    assert_ne!(
        posed[0].2,
        wc_status::SUCCESS,
        "sent as B from an unbound index"
    );
    assert_eq!(p.recvs_b(), [], "B received a datagram posing as itself");
}

#[test]
fn a_released_gid_can_be_bound_by_another_device() {
    let mut net = Net::two_devices();
    let (a, b) = (net.host_a(), net.host_b());
    net.dev(b.dev)
        .destroy_bind(u32::from(b.gid_index), b.gid)
        .expect("B lets its GID go");
    net.dev(a.dev)
        .create_bind(5, b.gid, GID_TYPE_ROCE_V1)
        .expect("the GID is free now");
    let refused = net.dev(b.dev).create_bind(0, b.gid, GID_TYPE_ROCE_V1);
    assert!(
        matches!(refused, Err(CmdError::Device(EADDRINUSE))),
        "B took its old GID back from A: {refused:?}"
    );
}
