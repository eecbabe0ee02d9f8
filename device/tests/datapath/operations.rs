//! Every operation on its success path: SEND (with and without immediate data, empty,
//! scattered over several SGEs and pages), RDMA WRITE (with and without immediate data),
//! RDMA READ, both atomics; signaled and unsignaled completions; CQ notifications for ARM
//! and ARM_SOL; UD datagrams with their GRH and Q_Key; SRQs shared by two QPs; a datagram
//! to the GSI QP.

use vfio_user_pvrdma::abi::{
    Cqe, Cqne, PAGE_SIZE, access, qp_type, send_flags, uar, vector, wc_flags, wc_opcode, wc_status,
    wr_opcode,
};

use crate::driver::bus::Bus;
use crate::driver::verbs::{GSI_SIZES, QP1_QKEY};
use crate::harness::{ALL_ACCESS, Net, Pair, QpOpts, Wr, av, pattern, sge};

/// `(wr_id, opcode, status)` of each completion.
pub fn summary(cqes: &[Cqe]) -> Vec<(u64, u32, u32)> {
    cqes.iter().map(|c| (c.wr_id, c.opcode, c.status)).collect()
}

const OK: u32 = wc_status::SUCCESS;

both_topologies!(
    send_scatters_across_sges_and_pages,
    send_with_imm_reports_the_immediate,
    zero_length_send_completes_both_sides,
    rdma_write_lands_without_consuming_a_receive,
    rdma_write_with_imm_consumes_a_receive,
    rdma_write_with_imm_reports_the_length_written,
    rdma_read_returns_the_remote_bytes,
    compare_and_swap_swaps_only_on_a_match,
    fetch_and_add_returns_the_original_value,
    unsignaled_successes_complete_silently,
    sq_sig_all_signals_every_wqe,
    solicited_message_notifies_an_arm_sol_cq,
    arm_notifies_on_the_next_completion,
    ud_send_carries_a_grh,
    ud_qkey_mismatch_is_dropped_silently,
    srq_receives_are_shared_by_two_qps,
    datagram_to_the_gsi_qp,
);

fn send_scatters_across_sges_and_pages<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    // A SEND only reads its buffers: they need no LOCAL_WRITE.
    let src = p.net.mr(&p.a, 3 * PAGE_SIZE, 0);
    let src2 = p.net.mr(&p.a, PAGE_SIZE, access::LOCAL_WRITE);
    let dst = p.net.mr(&p.b, 4 * PAGE_SIZE, access::LOCAL_WRITE);
    let data = pattern(7, 9000);
    p.net.write(&src, 1000, &data[..5000]);
    p.net.write(&src2, 3000, &data[5000..6000]);
    p.net.write(&src, 8000, &data[6000..]);
    let before = p.net.fill(&dst, 0x33);

    // Receive: 10 bytes across a page end, then 3000, then 7000 (more than needed).
    p.recv_b(
        77,
        &[dst.sge(4090, 10), dst.sge(100, 3000), dst.sge(9000, 7000)],
    );
    p.post_a(&[Wr::new(
        1,
        wr_opcode::SEND,
        &[
            src.sge(1000, 5000),
            src2.sge(3000, 1000),
            src.sge(8000, 3000),
        ],
    )]);

    let sends = p.sends_a();
    assert_eq!(summary(&sends), [(1, wc_opcode::SEND, OK)]);
    assert_eq!(sends[0].qp, u64::from(p.qa.handle));
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(77, wc_opcode::RECV, OK)]);
    let r = recvs[0];
    assert_eq!(r.qp, u64::from(p.qb.handle));
    assert_eq!(r.byte_len, 9000);
    assert_eq!(r.src_qp, p.qa.qpn);
    assert_eq!(r.wc_flags, 0, "an RC receive has no GRH and no immediate");

    let mut expected = before;
    expected[4090..4100].copy_from_slice(&data[..10]);
    expected[100..3100].copy_from_slice(&data[10..3010]);
    expected[9000..9000 + 5990].copy_from_slice(&data[3010..]);
    assert!(
        p.net.contents(&dst) == expected,
        "the payload is scattered in order, the rest of the buffer untouched"
    );
    assert_eq!(p.net.sq(&p.a, &p.qa), (1, 1));
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 1));
}

fn send_with_imm_reports_the_immediate<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 64, 0);
    let dst = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 9);
    p.recv_b(5, &[dst.sge(0, 64)]);
    // imm_data is big-endian on the wire: the CQE carries the WQE's bytes unchanged.
    let imm = u32::from_ne_bytes([0xde, 0xad, 0xbe, 0xef]);
    p.post_a(&[Wr::new(2, wr_opcode::SEND_WITH_IMM, &[src.sge(0, 40)]).imm(imm)]);

    assert_eq!(summary(&p.sends_a()), [(2, wc_opcode::SEND, OK)]);
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(5, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].imm_data, imm);
    assert_eq!(recvs[0].wc_flags, wc_flags::WITH_IMM);
    assert_eq!(recvs[0].byte_len, 40);
    assert_eq!(p.net.read(&dst, 0, 40), data[..40]);
}

fn zero_length_send_completes_both_sides<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let dst = p.net.mr(&p.b, 32, access::LOCAL_WRITE);
    let before = p.net.fill(&dst, 4);
    p.recv_b(6, &[dst.sge(0, 32)]);
    p.recv_b(7, &[]);
    p.post_a(&[
        Wr::new(3, wr_opcode::SEND, &[]),
        Wr::new(4, wr_opcode::SEND_WITH_IMM, &[]).imm(0x55),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [(3, wc_opcode::SEND, OK), (4, wc_opcode::SEND, OK)]
    );
    let recvs = p.recvs_b();
    assert_eq!(
        summary(&recvs),
        [(6, wc_opcode::RECV, OK), (7, wc_opcode::RECV, OK)]
    );
    assert_eq!((recvs[0].byte_len, recvs[1].byte_len), (0, 0));
    assert_eq!(recvs[1].imm_data, 0x55);
    assert_eq!(p.net.contents(&dst), before);
}

fn rdma_write_lands_without_consuming_a_receive<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 2 * PAGE_SIZE, 0);
    let target = p.net.mr(&p.b, 3 * PAGE_SIZE, ALL_ACCESS);
    let recv = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 21);
    let before = p.net.fill(&target, 0x44);
    let recv_before = p.net.fill(&recv, 0x45);
    p.recv_b(50, &[recv.sge(0, 64)]);

    p.post_a(&[Wr::new(
        8,
        wr_opcode::RDMA_WRITE,
        &[src.sge(10, 4000), src.sge(5000, 2000)],
    )
    .rdma(target.at(1500), target.rkey())]);
    let sends = p.sends_a();
    assert_eq!(summary(&sends), [(8, wc_opcode::RDMA_WRITE, OK)]);

    let mut expected = before;
    expected[1500..5500].copy_from_slice(&data[10..4010]);
    expected[5500..7500].copy_from_slice(&data[5000..7000]);
    assert!(
        p.net.contents(&target) == expected,
        "exactly the range lands"
    );
    assert_eq!(
        p.recvs_b(),
        [],
        "a plain WRITE completes nothing at the responder"
    );
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 0), "and consumes no receive");
    assert_eq!(p.net.contents(&recv), recv_before);
}

fn rdma_write_with_imm_consumes_a_receive<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, PAGE_SIZE, 0);
    let target = p.net.mr(&p.b, 2 * PAGE_SIZE, ALL_ACCESS);
    let recv = p.net.mr(&p.b, 256, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 22);
    let before = p.net.fill(&target, 0x46);
    let recv_before = p.net.fill(&recv, 0x47);
    p.recv_b(9, &[recv.sge(0, 256)]);

    p.post_a(&[
        Wr::new(10, wr_opcode::RDMA_WRITE_WITH_IMM, &[src.sge(0, 3000)])
            .rdma(target.at(100), target.rkey())
            .imm(0x0102_0304),
    ]);
    assert_eq!(summary(&p.sends_a()), [(10, wc_opcode::RDMA_WRITE, OK)]);
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(9, wc_opcode::RECV_RDMA_WITH_IMM, OK)]);
    let r = recvs[0];
    assert_eq!(r.imm_data, 0x0102_0304);
    assert_eq!(r.wc_flags, wc_flags::WITH_IMM);
    assert_eq!(r.src_qp, p.qa.qpn);
    assert_eq!(r.qp, u64::from(p.qb.handle));

    let mut expected = before;
    expected[100..3100].copy_from_slice(&data[..3000]);
    assert!(p.net.contents(&target) == expected);
    assert_eq!(
        p.net.contents(&recv),
        recv_before,
        "the receive buffer itself is not written"
    );
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 1));
}

fn rdma_write_with_imm_reports_the_length_written<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, PAGE_SIZE, 0);
    let target = p.net.mr(&p.b, PAGE_SIZE, ALL_ACCESS);
    p.recv_b(9, &[]);
    p.post_a(&[
        Wr::new(10, wr_opcode::RDMA_WRITE_WITH_IMM, &[src.sge(0, 3000)])
            .rdma(target.at(0), target.rkey())
            .imm(1),
    ]);
    assert_eq!(summary(&p.sends_a()), [(10, wc_opcode::RDMA_WRITE, OK)]);
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(9, wc_opcode::RECV_RDMA_WITH_IMM, OK)]);
    // ibv_wc.byte_len: "the number of bytes transferred" for RDMA WRITE with immediate too.
    assert_eq!(recvs[0].byte_len, 3000);
}

fn rdma_read_returns_the_remote_bytes<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let remote = p.net.mr(&p.b, 3 * PAGE_SIZE, access::REMOTE_READ);
    let local = p.net.mr(&p.a, 3 * PAGE_SIZE, access::LOCAL_WRITE);
    let remote_data = p.net.fill(&remote, 23);
    let before = p.net.fill(&local, 0x48);

    p.post_a(&[Wr::new(
        11,
        wr_opcode::RDMA_READ,
        &[
            local.sge(4000, 100),
            local.sge(10, 3000),
            local.sge(6000, 3900),
        ],
    )
    .rdma(remote.at(2000), remote.rkey())]);
    let sends = p.sends_a();
    assert_eq!(summary(&sends), [(11, wc_opcode::RDMA_READ, OK)]);
    assert_eq!(sends[0].byte_len, 7000);

    let mut expected = before;
    expected[4000..4100].copy_from_slice(&remote_data[2000..2100]);
    expected[10..3010].copy_from_slice(&remote_data[2100..5100]);
    expected[6000..9900].copy_from_slice(&remote_data[5100..9000]);
    assert!(p.net.contents(&local) == expected);
    assert!(
        p.net.contents(&remote) == remote_data,
        "a READ changes nothing remotely"
    );
    assert_eq!(p.recvs_b(), []);
}

fn compare_and_swap_swaps_only_on_a_match<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let atom = p.net.mr(&p.b, PAGE_SIZE, ALL_ACCESS);
    let reply = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    p.net.fill(&reply, 0x49);
    p.net.write_u64(&atom, 64, 0x1111);

    p.post_a(&[
        Wr::new(12, wr_opcode::ATOMIC_CMP_AND_SWP, &[reply.sge(0, 8)]).atomic(
            atom.at(64),
            0x1111,
            0x2222,
            atom.rkey(),
        ),
        Wr::new(13, wr_opcode::ATOMIC_CMP_AND_SWP, &[reply.sge(8, 8)]).atomic(
            atom.at(64),
            0x1111,
            0x3333,
            atom.rkey(),
        ),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [
            (12, wc_opcode::COMP_SWAP, OK),
            (13, wc_opcode::COMP_SWAP, OK)
        ]
    );
    assert_eq!(
        p.net.read_u64(&reply, 0),
        0x1111,
        "original value on a match"
    );
    assert_eq!(
        p.net.read_u64(&reply, 8),
        0x2222,
        "original value on a mismatch"
    );
    assert_eq!(
        p.net.read_u64(&atom, 64),
        0x2222,
        "swapped once, not on the mismatch"
    );
    assert_eq!(p.net.read(&reply, 16, 48), pattern(0x49, 64)[16..]);
}

fn fetch_and_add_returns_the_original_value<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let atom = p.net.mr(&p.b, 2 * PAGE_SIZE, ALL_ACCESS);
    let reply = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    let before = p.net.fill(&atom, 0x4a);
    // The counter sits at the start of the MR's second page.
    let at = PAGE_SIZE - atom.va % PAGE_SIZE;
    p.net.write_u64(&atom, at, 40);

    p.post_a(&[
        Wr::new(14, wr_opcode::ATOMIC_FETCH_AND_ADD, &[reply.sge(0, 8)]).atomic(
            atom.at(at),
            2,
            0xffff,
            atom.rkey(),
        ),
        Wr::new(15, wr_opcode::ATOMIC_FETCH_AND_ADD, &[reply.sge(8, 8)]).atomic(
            atom.at(at),
            u64::MAX,
            0,
            atom.rkey(),
        ),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [
            (14, wc_opcode::FETCH_ADD, OK),
            (15, wc_opcode::FETCH_ADD, OK)
        ]
    );
    assert_eq!(p.net.read_u64(&reply, 0), 40);
    assert_eq!(p.net.read_u64(&reply, 8), 42);
    assert_eq!(p.net.read_u64(&atom, at), 41, "40 + 2 - 1, wrapping");
    let mut expected = before;
    expected[at as usize..at as usize + 8].copy_from_slice(&41u64.to_le_bytes());
    assert!(p.net.contents(&atom) == expected, "only the 8 bytes change");
}

fn unsignaled_successes_complete_silently<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let target = p.net.mr(&p.b, 64, ALL_ACCESS);
    for i in 0..3 {
        p.recv_b(100 + i, &[]);
    }
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[]).flags(0),
        Wr::new(2, wr_opcode::SEND, &[]).flags(send_flags::SIGNALED),
        Wr::new(3, wr_opcode::SEND, &[]).flags(send_flags::SOLICITED),
        Wr::new(4, wr_opcode::RDMA_WRITE, &[])
            .flags(0)
            .rdma(target.at(0), target.rkey()),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [(2, wc_opcode::SEND, OK)],
        "only the SIGNALED WQE completes"
    );
    assert_eq!(p.net.sq(&p.a, &p.qa), (4, 4), "all four were executed");
    assert_eq!(p.recvs_b().len(), 3, "receives always complete");

    // A failure completes whether signaled or not.
    p.post_a(&[Wr::new(5, wr_opcode::RDMA_WRITE, &[])
        .flags(0)
        .rdma(target.at(0), target.rkey() ^ 0x100)]);
    assert_eq!(
        summary(&p.sends_a()),
        [(5, wc_opcode::RDMA_WRITE, wc_status::REM_ACCESS_ERR)]
    );
}

fn sq_sig_all_signals_every_wqe<B: Bus>(net: Net<B>) {
    let opts = QpOpts {
        sq_sig_all: true,
        ..QpOpts::default()
    };
    let mut p = Pair::rc(net, opts);
    let target = p.net.mr(&p.b, 64, ALL_ACCESS);
    p.recv_b(100, &[]);
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[]).flags(0),
        Wr::new(2, wr_opcode::RDMA_WRITE, &[])
            .flags(0)
            .rdma(target.at(0), target.rkey()),
        Wr::new(3, wr_opcode::SEND_WITH_IMM, &[]).flags(send_flags::SIGNALED),
    ]);
    // The third SEND has no receive: it waits (RNR), the first two completed.
    assert_eq!(
        summary(&p.sends_a()),
        [(1, wc_opcode::SEND, OK), (2, wc_opcode::RDMA_WRITE, OK)]
    );
    p.recv_b(101, &[]);
    assert_eq!(summary(&p.sends_a()), [(3, wc_opcode::SEND, OK)]);
}

/// Vectors raised on `dev` since the last look, and the CQ notifications it posted.
fn notifications<B: Bus>(net: &mut Net<B>, dev: usize) -> (Vec<u16>, Vec<u32>) {
    let d = net.dev(dev);
    let irqs = d.take_irqs();
    let cqnes = d.poll_cq_notifications().expect("CQ notification ring");
    (irqs, cqnes.iter().map(|c: &Cqne| c.info).collect())
}

fn solicited_message_notifies_an_arm_sol_cq<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    for i in 0..4 {
        p.recv_b(i, &[]);
    }
    let (dev_a, dev_b) = (p.a.dev(), p.b.dev());
    p.net.dev(dev_b).ring_cq(&p.b.rcq, uar::CQ_ARM_SOL);
    p.net.take_irqs();

    // An unsolicited success does not satisfy a solicited-only arm.
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[])]);
    assert_eq!(p.recvs_b().len(), 1);
    assert_eq!(notifications(&mut p.net, dev_b), (vec![], vec![]));

    // A solicited one does: one CQNE for the receive CQ, vector 2.
    p.post_a(&[
        Wr::new(2, wr_opcode::SEND, &[]).flags(send_flags::SIGNALED | send_flags::SOLICITED)
    ]);
    assert_eq!(summary(&p.recvs_b()), [(1, wc_opcode::RECV, OK)]);
    assert_eq!(
        notifications(&mut p.net, dev_b),
        (vec![vector::CQ_NOTIFY], vec![p.b.rcq.handle])
    );
    if dev_a != dev_b {
        assert_eq!(notifications(&mut p.net, dev_a), (vec![], vec![]));
    }

    // The arm is spent: the next solicited message completes silently.
    p.post_a(&[Wr::new(3, wr_opcode::SEND_WITH_IMM, &[])
        .flags(send_flags::SOLICITED)
        .imm(1)]);
    assert_eq!(p.recvs_b().len(), 1);
    assert_eq!(notifications(&mut p.net, dev_b), (vec![], vec![]));

    // Armed again, a solicited RDMA WRITE with immediate notifies too.
    let target = p.net.mr(&p.b, 8, ALL_ACCESS);
    p.net.dev(dev_b).ring_cq(&p.b.rcq, uar::CQ_ARM_SOL);
    p.post_a(&[Wr::new(4, wr_opcode::RDMA_WRITE_WITH_IMM, &[])
        .flags(send_flags::SOLICITED)
        .rdma(target.at(0), target.rkey())]);
    assert_eq!(
        summary(&p.recvs_b()),
        [(3, wc_opcode::RECV_RDMA_WITH_IMM, OK)]
    );
    assert_eq!(
        notifications(&mut p.net, dev_b).1,
        [p.b.rcq.handle],
        "solicited WRITE_WITH_IMM"
    );
}

fn arm_notifies_on_the_next_completion<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    for i in 0..3 {
        p.recv_b(i, &[]);
    }
    let (dev_a, dev_b) = (p.a.dev(), p.b.dev());
    p.net.dev(dev_b).ring_cq(&p.b.rcq, uar::CQ_ARM);
    p.net.dev(dev_a).ring_cq(&p.a.scq, uar::CQ_ARM);
    p.net.take_irqs();

    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[])]);
    if dev_a == dev_b {
        // The responder completes first, then the requester.
        assert_eq!(
            notifications(&mut p.net, dev_a),
            (
                vec![vector::CQ_NOTIFY, vector::CQ_NOTIFY],
                vec![p.b.rcq.handle, p.a.scq.handle]
            )
        );
    } else {
        assert_eq!(
            notifications(&mut p.net, dev_b),
            (vec![vector::CQ_NOTIFY], vec![p.b.rcq.handle])
        );
        assert_eq!(
            notifications(&mut p.net, dev_a),
            (vec![vector::CQ_NOTIFY], vec![p.a.scq.handle])
        );
    }
    assert_eq!(p.sends_a().len(), 1);
    assert_eq!(p.recvs_b().len(), 1);

    // One notification per arm.
    p.post_a(&[Wr::new(2, wr_opcode::SEND, &[])]);
    assert_eq!(p.recvs_b().len(), 1);
    for dev in [dev_a, dev_b] {
        assert_eq!(notifications(&mut p.net, dev), (vec![], vec![]));
    }
}

/// The 40-byte GRH of a RoCE v1 datagram (device-abi §9.5): `(version, payload length, next header,
/// sgid, dgid)`.
fn parse_grh(grh: &[u8]) -> (u8, u16, u8, [u8; 16], [u8; 16]) {
    (
        grh[0] >> 4,
        u16::from_be_bytes([grh[4], grh[5]]),
        grh[6],
        grh[8..24].try_into().unwrap(),
        grh[24..40].try_into().unwrap(),
    )
}

fn ud_send_carries_a_grh<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let src = p.net.mr(&p.a, 256, 0);
    let recv = p.net.mr(&p.b, 512, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 24);
    p.net.fill(&recv, 0x4b);
    // The GRH area straddles two SGEs: 30 bytes, then 10 more before the payload.
    p.recv_b(20, &[recv.sge(0, 30), recv.sge(100, 300)]);
    p.recv_b(21, &[recv.sge(400, 112)]);
    let av = p.av_to_b();
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 100)]).ud(p.qb.qpn, 0x2222, av),
        Wr::new(2, wr_opcode::SEND_WITH_IMM, &[src.sge(100, 72)])
            .imm(0xabcd)
            .ud(p.qb.qpn, 0x2222, av),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [(1, wc_opcode::SEND, OK), (2, wc_opcode::SEND, OK)]
    );
    let recvs = p.recvs_b();
    assert_eq!(
        summary(&recvs),
        [(20, wc_opcode::RECV, OK), (21, wc_opcode::RECV, OK)]
    );
    for r in &recvs {
        assert_eq!(r.src_qp, p.qa.qpn);
        assert_eq!(r.qp, u64::from(p.qb.handle));
    }
    assert_eq!(recvs[0].byte_len, 40 + 100, "byte_len includes the GRH");
    assert_eq!(recvs[0].wc_flags, wc_flags::GRH);
    assert_eq!(recvs[1].byte_len, 40 + 72);
    assert_eq!(recvs[1].wc_flags, wc_flags::GRH | wc_flags::WITH_IMM);
    assert_eq!(recvs[1].imm_data, 0xabcd);

    let mut grh = p.net.read(&recv, 0, 30);
    grh.extend(p.net.read(&recv, 100, 10));
    assert_eq!(parse_grh(&grh), (6, 100, 0x1b, p.a.host.gid, p.b.host.gid));
    assert_eq!(p.net.read(&recv, 110, 100), data[..100]);
    let grh = p.net.read(&recv, 400, 40);
    assert_eq!(parse_grh(&grh), (6, 72, 0x1b, p.a.host.gid, p.b.host.gid));
    assert_eq!(p.net.read(&recv, 440, 72), data[100..172]);
}

fn ud_qkey_mismatch_is_dropped_silently<B: Bus>(net: Net<B>) {
    let mut p = Pair::ud(net, 0x1111, 0x2222);
    let src = p.net.mr(&p.a, 64, 0);
    let recv = p.net.mr(&p.b, 256, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 25);
    let before = p.net.fill(&recv, 0x4c);
    p.recv_b(30, &[recv.sge(0, 256)]);
    let av = p.av_to_b();

    // Wrong Q_Key, and a QPN nobody has: the sender succeeds, the receiver sees nothing.
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 64)]).ud(p.qb.qpn, 0x2223, av),
        Wr::new(2, wr_opcode::SEND, &[src.sge(0, 64)]).ud(0x3ff, 0x2222, av),
    ]);
    assert_eq!(
        summary(&p.sends_a()),
        [(1, wc_opcode::SEND, OK), (2, wc_opcode::SEND, OK)]
    );
    assert_eq!(p.recvs_b(), []);
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 0), "the receive is still posted");
    assert_eq!(p.net.contents(&recv), before);

    // The right Q_Key gets the very same receive.
    p.post_a(&[Wr::new(3, wr_opcode::SEND, &[src.sge(0, 10)]).ud(p.qb.qpn, 0x2222, av)]);
    assert_eq!(summary(&p.recvs_b()), [(30, wc_opcode::RECV, OK)]);
    assert_eq!(p.net.read(&recv, 40, 10), data[..10]);
}

fn srq_receives_are_shared_by_two_qps<B: Bus>(mut net: Net<B>) {
    let (ha, hb) = (net.host_a(), net.host_b());
    let a = net.ctx(ha);
    let b = net.ctx(hb);
    let srq = net.srq(&b, 16, 2);
    let srq_opts = QpOpts {
        srq: Some(srq.handle),
        ..QpOpts::default()
    };
    let (a1, a2) = (
        net.qp(&a, qp_type::RC, QpOpts::default()),
        net.qp(&a, qp_type::RC, QpOpts::default()),
    );
    let (b1, b2) = (
        net.qp(&b, qp_type::RC, srq_opts),
        net.qp(&b, qp_type::RC, srq_opts),
    );
    for (qa, qb) in [(&a1, &b1), (&a2, &b2)] {
        net.connect(&a, qa, hb.gid, qb.qpn);
        net.connect(&b, qb, ha.gid, qa.qpn);
    }
    let src = net.mr(&a, 64, 0);
    let dst = net.mr(&b, 4 * 64, access::LOCAL_WRITE);
    let data = net.fill(&src, 26);
    for i in 0..3 {
        net.srq_recv(
            &b,
            &srq,
            100 + i,
            &[dst.sge(i * 64, 32), dst.sge(i * 64 + 32, 32)],
        );
    }

    net.post(&a, &a1, &[Wr::new(1, wr_opcode::SEND, &[src.sge(0, 10)])]);
    net.post(&a, &a2, &[Wr::new(2, wr_opcode::SEND, &[src.sge(10, 50)])]);
    net.post(&a, &a1, &[Wr::new(3, wr_opcode::SEND, &[src.sge(60, 4)])]);
    let recvs = net.recvs(&b);
    assert_eq!(
        summary(&recvs),
        [
            (100, wc_opcode::RECV, OK),
            (101, wc_opcode::RECV, OK),
            (102, wc_opcode::RECV, OK)
        ],
        "the SRQ's receives are taken in order, whichever QP receives"
    );
    let by_qp: Vec<(u64, u32, u32)> = recvs.iter().map(|c| (c.qp, c.src_qp, c.byte_len)).collect();
    assert_eq!(
        by_qp,
        [
            (u64::from(b1.handle), a1.qpn, 10),
            (u64::from(b2.handle), a2.qpn, 50),
            (u64::from(b1.handle), a1.qpn, 4)
        ]
    );
    assert_eq!(net.read(&dst, 0, 10), data[..10]);
    assert_eq!(net.read(&dst, 64, 50), data[10..60]);
    assert_eq!(net.read(&dst, 128, 4), data[60..64]);
    assert_eq!(net.sends(&a).len(), 3);

    // The SRQ is empty: the next SEND waits until the SRQ gets a receive.
    net.post(&a, &a2, &[Wr::new(4, wr_opcode::SEND, &[src.sge(0, 8)])]);
    assert_eq!(net.sends(&a), []);
    net.srq_recv(&b, &srq, 103, &[dst.sge(192, 64)]);
    assert_eq!(summary(&net.sends(&a)), [(4, wc_opcode::SEND, OK)]);
    let recvs = net.recvs(&b);
    assert_eq!(summary(&recvs), [(103, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].qp, u64::from(b2.handle));
}

fn datagram_to_the_gsi_qp<B: Bus>(mut net: Net<B>) {
    let (ha, hb) = (net.host_a(), net.host_b());
    // The kernel MAD layer's QP1 on B (device-abi §9.6): DMA lkey, 296-byte receives.
    let k = net.kernel_ctx(hb);
    let gsi = net.qp(
        &k,
        qp_type::GSI,
        QpOpts {
            sizes: GSI_SIZES,
            sq_sig_all: true,
            srq: None,
        },
    );
    assert_eq!(gsi.qpn, 1);
    net.activate_ud(&k, &gsi, QP1_QKEY);
    let d = net.dev(hb.dev);
    let dma = d.get_dma_mr(k.pd).expect("DMA MR");
    let bufs = d.alloc.block(d.bus.ram(), 1);
    crate::driver::memory::fill(d.ram(), bufs, 0x4d, PAGE_SIZE);
    for i in 0..2u64 {
        d.post_recv(&gsi, i, &[sge(bufs + i * 296, 296, dma.lkey)])
            .unwrap();
    }

    let a = net.ctx(ha);
    let qa = net.qp(&a, qp_type::UD, QpOpts::default());
    net.activate_ud(&a, &qa, 0x1111);
    let mad = net.mr(&a, 256, 0);
    let data = net.fill(&mad, 27);
    let to_qp1 = |wr_id: u64, qkey: u32| {
        Wr::new(wr_id, wr_opcode::SEND, &[mad.sge(0, 24), mad.sge(24, 232)]).ud(
            1,
            qkey,
            av(a.pd, ha.gid_index, hb.gid),
        )
    };
    // A datagram with another Q_Key is dropped; one with QP1's is received.
    net.post(&a, &qa, &[to_qp1(1, 0x1111), to_qp1(2, QP1_QKEY)]);
    assert_eq!(
        summary(&net.sends(&a)),
        [(1, wc_opcode::SEND, OK), (2, wc_opcode::SEND, OK)]
    );
    let recvs = net.recvs(&k);
    assert_eq!(summary(&recvs), [(0, wc_opcode::RECV, OK)]);
    let r = recvs[0];
    assert_eq!(r.qp, 1, "QP1's completions carry its handle, 1");
    assert_eq!(r.byte_len, 296);
    assert_eq!(r.wc_flags, wc_flags::GRH);
    assert_eq!(r.src_qp, qa.qpn);
    let mut got = vec![0u8; 296];
    crate::driver::memory::read_bytes(net.dev(hb.dev).ram(), bufs, &mut got);
    assert_eq!(parse_grh(&got[..40]), (6, 256, 0x1b, ha.gid, hb.gid));
    assert_eq!(got[40..], data[..]);
    assert_eq!(net.rq(&k, &gsi), (2, 1));
}
