//! Every error status the data path produces (device-abi §9.4), and what follows an error: the failing
//! WQE completes with its status whether signaled or not, the QP goes to ERR (QUERY_QP says
//! so), the rest of its queues is flushed with WR_FLUSH_ERR, and later work is flushed as
//! soon as it is posted.

use vfio_user_pvrdma::abi::{
    Eqe, PAGE_SIZE, RecvWqeHeader, access, event, qp_state, qp_type, uar, wc_opcode, wc_status,
    wr_opcode,
};
use zerocopy::IntoBytes;

use crate::driver::bus::Bus;
use crate::harness::{ALL_ACCESS, Net, Pair, QpOpts, Wr, av, gid_nowhere, sge};
use crate::operations::summary;

/// The completion opcode of a send opcode the device executes.
fn completion_opcode(opcode: u32) -> Option<u32> {
    match opcode {
        wr_opcode::SEND | wr_opcode::SEND_WITH_IMM => Some(wc_opcode::SEND),
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => Some(wc_opcode::RDMA_WRITE),
        wr_opcode::RDMA_READ => Some(wc_opcode::RDMA_READ),
        wr_opcode::ATOMIC_CMP_AND_SWP => Some(wc_opcode::COMP_SWAP),
        wr_opcode::ATOMIC_FETCH_AND_ADD => Some(wc_opcode::FETCH_ADD),
        _ => None,
    }
}

/// Posts `bad` followed by two SENDs (one unsignaled) in one doorbell and checks the error
/// sequence: `bad` completes with `status`, the two SENDs are flushed, the QP is in ERR,
/// and a WQE posted afterwards is flushed at once. `what` names the case in messages.
fn expect_failure<B: Bus>(p: &mut Pair<B>, what: &str, bad: Wr, status: u32) {
    let (wr_id, opcode) = (bad.hdr.wr_id, bad.hdr.opcode);
    p.post_a(&[
        bad.flags(0),
        Wr::new(901, wr_opcode::SEND, &[]),
        Wr::new(902, wr_opcode::SEND, &[]).flags(0),
    ]);
    let sends = p.sends_a();
    assert_eq!(sends.len(), 3, "{what}: {sends:?}");
    assert_eq!(
        (sends[0].wr_id, sends[0].status),
        (wr_id, status),
        "{what}: the failing WQE's completion"
    );
    if let Some(op) = completion_opcode(opcode) {
        assert_eq!(sends[0].opcode, op, "{what}");
    }
    assert_eq!(sends[0].qp, u64::from(p.qa.handle), "{what}");
    assert_eq!(
        summary(&sends[1..]),
        [
            (901, wc_opcode::SEND, wc_status::WR_FLUSH_ERR),
            (902, wc_opcode::SEND, wc_status::WR_FLUSH_ERR)
        ],
        "{what}: the rest of the queue is flushed"
    );
    assert_eq!(p.state_a(), qp_state::ERR, "{what}: QUERY_QP reports ERR");
    let (prod, cons) = p.net.sq(&p.a, &p.qa);
    assert_eq!(prod, cons, "{what}: the send queue was consumed");
    p.post_a(&[Wr::new(903, wr_opcode::SEND, &[]).flags(0)]);
    assert_eq!(
        summary(&p.sends_a()),
        [(903, wc_opcode::SEND, wc_status::WR_FLUSH_ERR)],
        "{what}: work posted in ERR is flushed"
    );
}

/// B's receive side saw nothing: no completion, `posted` receives still posted.
fn receiver_untouched<B: Bus>(p: &mut Pair<B>, what: &str, posted: u32) {
    assert_eq!(p.recvs_b(), [], "{what}: the receiver completes nothing");
    let (prod, cons) = p.net.rq(&p.b, &p.qb);
    assert_eq!(
        prod.wrapping_sub(cons) & 0x1f,
        posted,
        "{what}: receives consumed"
    );
}

both_topologies!(
    too_many_sges_is_loc_len_err_and_flushes_both_queues,
    short_receive_is_loc_len_err_and_rem_inv_req_err,
    bad_local_keys_and_ranges_are_loc_prot_err,
    bad_remote_keys_rights_and_ranges_are_rem_access_err,
    requests_a_responder_cannot_take_are_rem_inv_req_err,
    unknown_gid_is_retry_exc_err,
    unsupported_opcodes_are_loc_qp_op_err,
    ud_qp_refuses_rdma_and_atomics,
    ud_datagram_larger_than_the_mtu_is_loc_len_err,
    ud_short_receive_fails_only_at_the_receiver,
    corrupt_receive_queue_is_rem_op_err,
    rc_responder_checks_the_senders_gid,
    user_qp_opcode_8_is_unsupported,
    ud_send_from_an_unbound_gid_index_fails,
    receive_with_too_many_sges_completes_with_an_error,
    corrupt_receive_queue_breaks_the_responder_qp,
);

fn too_many_sges_is_loc_len_err_and_flushes_both_queues<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, 0);
    let own = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    for i in 0..2 {
        p.recv_b(800 + i, &[]);
    }
    // A's own receive queue holds two receives: the error flushes them too (device-abi §9.2).
    p.net.recv(&p.a, &p.qa, 700, &[own.sge(0, 32)]);
    p.net.recv(&p.a, &p.qa, 701, &[]);
    let five: Vec<_> = (0..5).map(|i| src.sge(i * 16, 16)).collect();
    expect_failure(
        &mut p,
        "5 SGEs on a QP of 4",
        Wr::new(1, wr_opcode::SEND, &five),
        wc_status::LOC_LEN_ERR,
    );
    assert_eq!(
        summary(&p.net.recvs(&p.a)),
        [
            (700, wc_opcode::RECV, wc_status::WR_FLUSH_ERR),
            (701, wc_opcode::RECV, wc_status::WR_FLUSH_ERR)
        ]
    );
    receiver_untouched(&mut p, "5 SGEs", 2);

    // A num_sge far beyond anything (the SGEs are not even there).
    p.recover_a();
    let mut huge = Wr::new(2, wr_opcode::RDMA_WRITE, &[]);
    huge.hdr.num_sge = u32::MAX;
    expect_failure(&mut p, "num_sge = u32::MAX", huge, wc_status::LOC_LEN_ERR);
    receiver_untouched(&mut p, "num_sge = u32::MAX", 2);
}

fn short_receive_is_loc_len_err_and_rem_inv_req_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 128, 0);
    let dst = p.net.mr(&p.b, 128, access::LOCAL_WRITE);
    p.net.fill(&src, 31);
    let before = p.net.fill(&dst, 0x51);
    p.recv_b(40, &[dst.sge(0, 16), dst.sge(64, 16)]);
    expect_failure(
        &mut p,
        "100 bytes into 32",
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 100)]),
        wc_status::REM_INV_REQ_ERR,
    );
    assert_eq!(
        summary(&p.recvs_b()),
        [(40, wc_opcode::RECV, wc_status::LOC_LEN_ERR)],
        "the receive completes with LOC_LEN_ERR"
    );
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 1));
    assert_eq!(p.net.contents(&dst), before, "nothing was written");
}

fn bad_local_keys_and_ranges_are_loc_prot_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 2 * PAGE_SIZE, access::LOCAL_WRITE);
    let other_pd = p.net.another_pd(&p.a);
    let foreign = p.net.mr_in(&p.a, other_pd, 256, ALL_ACCESS);
    let read_only = p.net.mr(&p.a, 256, access::REMOTE_READ);
    let remote = p.net.mr(&p.b, 256, ALL_ACCESS);
    p.recv_b(800, &[]);
    let read_only_before = p.net.fill(&read_only, 0x52);

    let send = |sges: &[_]| Wr::new(1, wr_opcode::SEND, sges);
    let cases = [
        (
            "an lkey no MR has",
            send(&[sge(src.at(0), 8, src.lkey() ^ 0x3300)]),
        ),
        ("the lkey of another PD's MR", send(&[foreign.sge(0, 8)])),
        ("one byte past the MR", send(&[src.sge(src.len - 8, 9)])),
        (
            "one byte before the MR",
            send(&[sge(src.at(0) - 1, 8, src.lkey())]),
        ),
        (
            "an address range that wraps",
            send(&[sge(u64::MAX - 3, 8, src.lkey())]),
        ),
        (
            "a good SGE, then a bad one",
            send(&[src.sge(0, 8), sge(src.at(0), 8, 0)]),
        ),
        (
            "a READ into an MR without LOCAL_WRITE",
            Wr::new(1, wr_opcode::RDMA_READ, &[read_only.sge(0, 64)])
                .rdma(remote.at(0), remote.rkey()),
        ),
        (
            "an atomic reply into an MR without LOCAL_WRITE",
            Wr::new(1, wr_opcode::ATOMIC_FETCH_AND_ADD, &[read_only.sge(8, 8)]).atomic(
                remote.at(0),
                1,
                0,
                remote.rkey(),
            ),
        ),
    ];
    let remote_before = p.net.fill(&remote, 0x53);
    for (what, wr) in cases {
        expect_failure(&mut p, what, wr, wc_status::LOC_PROT_ERR);
        receiver_untouched(&mut p, what, 1);
        p.recover_a();
    }
    assert_eq!(p.net.contents(&read_only), read_only_before);
    assert_eq!(p.net.contents(&remote), remote_before);
}

fn bad_remote_keys_rights_and_ranges_are_rem_access_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let local = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let target = p.net.mr(&p.b, 2 * PAGE_SIZE, ALL_ACCESS);
    let other_pd = p.net.another_pd(&p.b);
    let foreign = p.net.mr_in(&p.b, other_pd, 256, ALL_ACCESS);
    let read_only = p.net.mr(&p.b, 256, access::REMOTE_READ);
    let write_only = p
        .net
        .mr(&p.b, 256, access::LOCAL_WRITE | access::REMOTE_WRITE);
    let no_atomic = p.net.mr(
        &p.b,
        256,
        access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
    );
    let recv = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    p.recv_b(800, &[recv.sge(0, 64)]);

    let write = |addr: u64, rkey: u32| {
        Wr::new(1, wr_opcode::RDMA_WRITE, &[local.sge(0, 16)]).rdma(addr, rkey)
    };
    let read = |addr: u64, rkey: u32| {
        Wr::new(1, wr_opcode::RDMA_READ, &[local.sge(0, 16)]).rdma(addr, rkey)
    };
    let cas = |addr: u64, rkey: u32| {
        Wr::new(1, wr_opcode::ATOMIC_CMP_AND_SWP, &[local.sge(0, 8)]).atomic(addr, 0, 1, rkey)
    };
    let faa = |addr: u64, rkey: u32| {
        Wr::new(1, wr_opcode::ATOMIC_FETCH_AND_ADD, &[local.sge(0, 8)]).atomic(addr, 1, 0, rkey)
    };
    let cases = [
        ("an rkey no MR has", write(target.at(0), 0x00ee_ee00)),
        (
            "an rkey with the wrong tag",
            write(target.at(0), target.rkey() ^ 0x80),
        ),
        ("another PD's rkey", write(foreign.at(0), foreign.rkey())),
        (
            "WRITE without REMOTE_WRITE",
            write(read_only.at(0), read_only.rkey()),
        ),
        (
            "WRITE_WITH_IMM without REMOTE_WRITE",
            Wr::new(1, wr_opcode::RDMA_WRITE_WITH_IMM, &[local.sge(0, 16)])
                .rdma(read_only.at(0), read_only.rkey()),
        ),
        (
            "READ without REMOTE_READ",
            read(write_only.at(0), write_only.rkey()),
        ),
        (
            "CMP_AND_SWP without REMOTE_ATOMIC",
            cas(no_atomic.at(0), no_atomic.rkey()),
        ),
        (
            "FETCH_AND_ADD without REMOTE_ATOMIC",
            faa(no_atomic.at(8), no_atomic.rkey()),
        ),
        ("WRITE past the end", write(target.end() - 8, target.rkey())),
        (
            "WRITE before the start",
            write(target.at(0) - 8, target.rkey()),
        ),
        ("READ past the end", read(target.end() - 15, target.rkey())),
        (
            "READ at an address that wraps",
            read(u64::MAX - 7, target.rkey()),
        ),
        ("atomic past the end", faa(target.end(), target.rkey())),
    ];
    let targets = [
        &target,
        &foreign,
        &read_only,
        &write_only,
        &no_atomic,
        &recv,
    ];
    let before: Vec<_> = targets.iter().map(|b| p.net.contents(b)).collect();
    for (what, wr) in cases {
        expect_failure(&mut p, what, wr, wc_status::REM_ACCESS_ERR);
        receiver_untouched(&mut p, what, 1);
        p.recover_a();
    }
    let after: Vec<_> = targets.iter().map(|b| p.net.contents(b)).collect();
    assert!(
        before == after,
        "no refused request changed the responder's MRs"
    );
}

fn requests_a_responder_cannot_take_are_rem_inv_req_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let b = p.b.clone();
    let gid_b = b.host.gid;
    let target = p.net.mr(&b, 64, ALL_ACCESS);
    let local = p.net.mr(&p.a, 64, access::LOCAL_WRITE);

    // Across hosts, a reliable request no QP of B takes from A is dropped as a fabric drops
    // such a packet (no answer), and resent until the requester's retries run out; within
    // one process the responder refuses it at once.
    let dropped = if p.net.crosses_hosts() {
        wc_status::RETRY_EXC_ERR
    } else {
        wc_status::REM_INV_REQ_ERR
    };

    // A QP number nobody has.
    p.retarget_a(gid_b, 0x3ff);
    expect_failure(
        &mut p,
        "no such QP",
        Wr::new(1, wr_opcode::SEND, &[]),
        dropped,
    );

    // QPs of B that are not ready to receive from A.
    let reset = p.net.qp(&b, qp_type::RC, QpOpts::default());
    let init = p.net.qp(&b, qp_type::RC, QpOpts::default());
    p.net.bring_to_init(&b, &init);
    let elsewhere = p.net.qp(&b, qp_type::RC, QpOpts::default());
    p.net.connect(&b, &elsewhere, p.a.host.gid, p.qa.qpn + 7);
    let ud = p.net.qp(&b, qp_type::UD, QpOpts::default());
    p.net.activate_ud(&b, &ud, 0x1111);
    for (what, qp) in [
        ("a QP in RESET", &reset),
        ("a QP in INIT", &init),
        ("a QP connected to another QP", &elsewhere),
        ("a UD QP", &ud),
    ] {
        p.net.recv(&b, qp, 1, &[]);
        p.retarget_a(gid_b, qp.qpn);
        expect_failure(&mut p, what, Wr::new(1, wr_opcode::SEND, &[]), dropped);
        assert_eq!(p.net.recvs(&b), [], "{what}");
    }

    // A misaligned atomic.
    p.recover_a();
    expect_failure(
        &mut p,
        "a misaligned atomic",
        Wr::new(1, wr_opcode::ATOMIC_FETCH_AND_ADD, &[local.sge(0, 8)]).atomic(
            target.at(4),
            1,
            0,
            target.rkey(),
        ),
        wc_status::REM_INV_REQ_ERR,
    );
}

fn unknown_gid_is_retry_exc_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let qpn = p.qb.qpn;
    p.retarget_a(gid_nowhere(), qpn);
    p.recv_b(1, &[]);
    expect_failure(
        &mut p,
        "a GID nobody has",
        Wr::new(1, wr_opcode::SEND, &[]),
        wc_status::RETRY_EXC_ERR,
    );
    receiver_untouched(&mut p, "a GID nobody has", 1);
}

fn unsupported_opcodes_are_loc_qp_op_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let local = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    p.recv_b(1, &[]);
    // 7 = LSO (ibverbs LOCAL_INV), 9 = READ_WITH_INV (ibverbs SEND_WITH_INV),
    // 10 = LOCAL_INV, 11 = FAST_REG_MR, 12..=16 = masked atomics, BIND_MW, REG_SIG_MR, ERROR.
    for opcode in [7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 0x8000_0000, u32::MAX] {
        let what = format!("opcode {opcode}");
        expect_failure(
            &mut p,
            &what,
            Wr::new(1, opcode, &[local.sge(0, 8)]).rdma(local.at(0), local.rkey()),
            wc_status::LOC_QP_OP_ERR,
        );
        receiver_untouched(&mut p, &what, 1);
        p.recover_a();
    }
}

/// A UD QP in the error state back to RTS.
fn recover_ud<B: Bus>(p: &mut Pair<B>, qkey: u32) {
    let d = p.net.dev(p.a.dev());
    d.modify_qp_state(&p.qa, qp_state::RESET).unwrap();
    d.set_sq_prod(&p.qa, 0);
    d.set_rq_prod(&p.qa, 0);
    p.net.activate_ud(&p.a.clone(), &p.qa.clone(), qkey);
}

fn ud_qp_refuses_rdma_and_atomics<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let local = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    let target = p.net.mr(&p.b, 64, ALL_ACCESS);
    let before = p.net.fill(&target, 0x54);
    p.recv_b(1, &[]);
    let av = p.av_to_b();
    for opcode in [
        wr_opcode::RDMA_WRITE,
        wr_opcode::RDMA_WRITE_WITH_IMM,
        wr_opcode::RDMA_READ,
        wr_opcode::ATOMIC_CMP_AND_SWP,
        wr_opcode::ATOMIC_FETCH_AND_ADD,
    ] {
        let what = format!("opcode {opcode} on UD");
        // The address vector and the RDMA fields overlap in the union; neither may count.
        let mut wr = Wr::new(1, opcode, &[local.sge(0, 8)]).ud(p.qb.qpn, 0x2222, av);
        wr.hdr.wr[0..8].copy_from_slice(&target.at(0).to_le_bytes());
        expect_failure(&mut p, &what, wr, wc_status::LOC_QP_OP_ERR);
        receiver_untouched(&mut p, &what, 1);
        recover_ud(&mut p, 0x1111);
    }
    assert_eq!(p.net.contents(&target), before);
}

fn ud_datagram_larger_than_the_mtu_is_loc_len_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let src = p.net.mr(&p.a, 8192, 0);
    let recv = p.net.mr(&p.b, 8192, access::LOCAL_WRITE);
    let before = p.net.fill(&recv, 0x57);
    p.recv_b(1, &[recv.sge(0, 8192)]);
    let av = p.av_to_b();
    // 4096 + 1 bytes over two SGEs: one byte more than any datagram may carry.
    let wr =
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 4096), src.sge(4096, 1)]).ud(p.qb.qpn, 0x2222, av);
    expect_failure(&mut p, "a 4097-byte datagram", wr, wc_status::LOC_LEN_ERR);
    receiver_untouched(&mut p, "a 4097-byte datagram", 1);
    assert_eq!(p.net.contents(&recv), before);
    recover_ud(&mut p, 0x1111);
    // Exactly the MTU is fine.
    let wr = Wr::new(2, wr_opcode::SEND, &[src.sge(0, 4096)]).ud(p.qb.qpn, 0x2222, av);
    p.post_a(&[wr]);
    let recvs = summary(&p.recvs_b());
    assert_eq!(recvs.len(), 1, "{recvs:?}");
    assert_eq!(recvs[0].2, wc_status::SUCCESS);
}

fn ud_short_receive_fails_only_at_the_receiver<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let src = p.net.mr(&p.a, 128, 0);
    let recv = p.net.mr(&p.b, 128, access::LOCAL_WRITE);
    let before = p.net.fill(&recv, 0x55);
    // 40 bytes of GRH + 60 of payload do not fit in 90.
    p.recv_b(5, &[recv.sge(0, 90)]);
    let av = p.av_to_b();
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[src.sge(0, 60)]).ud(p.qb.qpn, 0x2222, av)]);
    assert_eq!(
        summary(&p.sends_a()),
        [(1, wc_opcode::SEND, wc_status::SUCCESS)],
        "a datagram's sender never learns"
    );
    assert_eq!(
        summary(&p.recvs_b()),
        [(5, wc_opcode::RECV, wc_status::LOC_LEN_ERR)]
    );
    assert_eq!(p.net.contents(&recv), before);
    assert_eq!(p.state_a(), qp_state::RTS);
}

fn rc_responder_checks_the_senders_gid<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let dst = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    let before = p.net.fill(&dst, 0x56);
    // B's QP is connected to QPN `qa.qpn` at another GID: A's QP has the same number but is
    // not B's peer, so its requests must be refused.
    let (b, qb, qpn) = (p.b.clone(), p.qb.clone(), p.qa.qpn);
    p.net.reconnect(&b, &qb, gid_nowhere(), qpn);
    p.recv_b(1, &[dst.sge(0, 64)]);
    // Across hosts the request is dropped unanswered, as a fabric drops a packet from a QP
    // that is not the connection's peer.
    let status = if p.net.crosses_hosts() {
        wc_status::RETRY_EXC_ERR
    } else {
        wc_status::REM_INV_REQ_ERR
    };
    expect_failure(
        &mut p,
        "a sender with the peer's QPN but another GID",
        Wr::new(1, wr_opcode::SEND, &[]),
        status,
    );
    receiver_untouched(&mut p, "the wrong GID", 1);
    assert_eq!(p.net.contents(&dst), before);
}

fn user_qp_opcode_8_is_unsupported<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let local = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    let dst = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    p.recv_b(1, &[dst.sge(0, 64)]);
    // rdma-core casts ibv_wr_opcode straight through: 8 is IBV_WR_BIND_MW there (device-abi §9.4).
    expect_failure(
        &mut p,
        "opcode 8 from a user QP",
        Wr::new(1, wr_opcode::SEND_WITH_INV, &[local.sge(0, 8)]),
        wc_status::LOC_QP_OP_ERR,
    );
    receiver_untouched(&mut p, "opcode 8", 1);
}

fn ud_send_from_an_unbound_gid_index_fails<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let recv = p.net.mr(&p.b, 128, access::LOCAL_WRITE);
    p.recv_b(1, &[recv.sge(0, 128)]);
    // Rule 13: av.gid_index must name a populated GID entry.
    let av = av(p.a.pd, 50, p.b.host.gid);
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[]).ud(p.qb.qpn, 0x2222, av)]);
    let sends = summary(&p.sends_a());
    let recvs = p.recvs_b();
    let sgid = p.net.read(&recv, 8, 16);
    assert_eq!(recvs, [], "delivered with GRH source GID {sgid:?}");
    assert_eq!(sends.len(), 1);
    assert_ne!(
        sends[0].2,
        wc_status::SUCCESS,
        "sent from GID index 50, which is not bound"
    );
}

fn receive_with_too_many_sges_completes_with_an_error<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let dst = p.net.mr(&p.b, 256, access::LOCAL_WRITE);
    // Five SGEs on a QP created for four: the WQE still fits the 128-byte stride.
    let mut wqe = RecvWqeHeader {
        wr_id: 60,
        num_sge: 5,
        total_len: 0,
    }
    .as_bytes()
    .to_vec();
    for i in 0..5 {
        wqe.extend_from_slice(dst.sge(i * 16, 16).as_bytes());
    }
    let (b, qb) = (p.b.clone(), p.qb.clone());
    {
        let d = p.net.dev(b.dev());
        let rq = qb.layout.rq.unwrap();
        let (prod, _) = d.rq_indices(&qb);
        qb.layout
            .ring
            .buf
            .write(d.ram(), rq.elem_offset(prod), &wqe);
        d.set_rq_prod(&qb, rq.idx.next(prod));
        d.ring_qp(&qb, uar::QP_RECV);
    }
    p.recv_b(61, &[dst.sge(128, 64)]);
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[])]);
    // Rules 17/18: the bad receive is consumed and completed with an error; the SEND
    // fails or goes to the next receive, but nothing stays stuck at the head.
    let sends = summary(&p.sends_a());
    let recvs = p.recvs_b();
    assert_eq!(
        recvs.first().map(|c| (c.wr_id, c.status)),
        Some((60, wc_status::LOC_LEN_ERR)),
        "receiver {recvs:?}, sender {sends:?}"
    );
    let (prod, cons) = p.net.rq(&b, &qb);
    assert_ne!(cons, 0, "prod {prod}: the bad receive is still at the head");
}

/// Makes B's receive queue producer index invalid (a buggy or hostile receiver).
fn corrupt_rq_of_b<B: Bus>(p: &mut Pair<B>) {
    let (b, qb) = (p.b.clone(), p.qb.clone());
    p.net.dev(b.dev()).set_rq_prod(&qb, 0xffff);
}

fn corrupt_receive_queue_is_rem_op_err<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    corrupt_rq_of_b(&mut p);
    expect_failure(
        &mut p,
        "a responder whose receive queue is corrupt",
        Wr::new(1, wr_opcode::SEND, &[]),
        wc_status::REM_OP_ERR,
    );
    assert_eq!(p.recvs_b(), []);
}

fn corrupt_receive_queue_breaks_the_responder_qp<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    corrupt_rq_of_b(&mut p);
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[])]);
    // Rule 16: an invalid index marks the queue broken: QP -> ERR and QP_FATAL.
    let (b, qb) = (p.b.clone(), p.qb.clone());
    let events = p.net.dev(b.dev()).poll_async().expect("async ring");
    let state = p.net.qp_state(&b, &qb);
    assert_eq!(
        (state, events),
        (
            qp_state::ERR,
            vec![Eqe {
                event_type: event::QP_FATAL,
                info: qb.handle
            }]
        )
    );
}
