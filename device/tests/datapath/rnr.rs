//! Receiver not ready: an RC message that needs a receive the responder has not posted
//! waits at the head of the send queue (every guest tool sets rnr_retry 7, "forever") and
//! goes as soon as a receive is posted — on the same device, or on the other device of the
//! fabric.

use vfio_user_pvrdma::abi::{PAGE_SIZE, access, qp_state, uar, wc_opcode, wc_status, wr_opcode};

use crate::driver::bus::Bus;
use crate::harness::{ALL_ACCESS, Net, Pair, QpOpts, Wr};
use crate::operations::summary;

const OK: u32 = wc_status::SUCCESS;

both_topologies!(
    send_waits_for_a_receive,
    write_with_imm_writes_nothing_until_a_receive,
    waiting_work_is_flushed_when_the_qp_fails,
    rnr_retry_zero_fails_at_once,
);

fn rnr_retry_zero_fails_at_once<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    // RTS → RTS with rnr_retry 0: the first RNR NAK is fatal.
    let attrs = vfio_user_pvrdma::abi::QpAttr {
        qp_state: qp_state::RTS,
        rnr_retry: 0,
        ..Default::default()
    };
    let mask =
        vfio_user_pvrdma::abi::qp_attr_mask::STATE | vfio_user_pvrdma::abi::qp_attr_mask::RNR_RETRY;
    let (a, qa) = (p.a.clone(), p.qa.clone());
    p.net
        .dev(a.dev())
        .modify_qp(qa.handle, mask, &attrs)
        .expect("MODIFY_QP rnr_retry 0");
    let src = p.net.mr(&p.a, 64, 0);
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[src.sge(0, 20)])]);
    assert_eq!(
        summary(&p.sends_a()),
        [(1, wc_opcode::SEND, wc_status::RNR_RETRY_EXC_ERR)]
    );
    assert_eq!(p.state_a(), qp_state::ERR);
    assert_eq!(p.recvs_b(), [], "nothing was delivered");
}

fn send_waits_for_a_receive<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 64, 0);
    let dst = p.net.mr(&p.b, 128, access::LOCAL_WRITE);
    let data = p.net.fill(&src, 41);
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 20)]),
        Wr::new(2, wr_opcode::SEND, &[src.sge(20, 30)]),
    ]);
    assert_eq!(
        p.sends_a(),
        [],
        "no completion while the receiver is not ready"
    );
    assert_eq!(p.recvs_b(), []);
    assert_eq!(p.net.sq(&p.a, &p.qa), (2, 0), "both WQEs wait, unconsumed");
    assert_eq!(p.state_a(), qp_state::RTS, "RNR is no error");

    // Doorbells that bring no receive change nothing.
    let (a, qa) = (p.a.clone(), p.qa.clone());
    p.net.dev(a.dev()).ring_qp(&qa, uar::QP_SEND);
    p.net.dev(p.b.dev()).ring_cq(&p.b.rcq.clone(), uar::CQ_POLL);
    assert_eq!(p.sends_a(), []);

    // One receive: the first SEND goes, the second waits again.
    p.recv_b(50, &[dst.sge(0, 64)]);
    assert_eq!(summary(&p.sends_a()), [(1, wc_opcode::SEND, OK)]);
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(50, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].byte_len, 20);
    assert_eq!(p.net.sq(&p.a, &p.qa), (2, 1));

    p.recv_b(51, &[dst.sge(64, 64)]);
    assert_eq!(summary(&p.sends_a()), [(2, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&p.recvs_b()), [(51, wc_opcode::RECV, OK)]);
    assert_eq!(p.net.read(&dst, 0, 20), data[..20]);
    assert_eq!(p.net.read(&dst, 64, 30), data[20..50]);
    assert_eq!(p.sends_a(), [], "each WQE completed exactly once");
}

fn write_with_imm_writes_nothing_until_a_receive<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, PAGE_SIZE, 0);
    let target = p.net.mr(&p.b, PAGE_SIZE, ALL_ACCESS);
    let data = p.net.fill(&src, 42);
    let before = p.net.fill(&target, 0x61);
    p.post_a(&[
        Wr::new(1, wr_opcode::RDMA_WRITE_WITH_IMM, &[src.sge(0, 1000)])
            .rdma(target.at(500), target.rkey())
            .imm(7),
    ]);
    assert_eq!(p.sends_a(), []);
    assert_eq!(
        p.net.contents(&target),
        before,
        "no byte lands before the receive that goes with it"
    );

    p.recv_b(60, &[]);
    assert_eq!(summary(&p.sends_a()), [(1, wc_opcode::RDMA_WRITE, OK)]);
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(60, wc_opcode::RECV_RDMA_WITH_IMM, OK)]);
    assert_eq!(recvs[0].imm_data, 7);
    let mut expected = before;
    expected[500..1500].copy_from_slice(&data[..1000]);
    assert_eq!(p.net.contents(&target), expected);
}

fn waiting_work_is_flushed_when_the_qp_fails<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    p.post_a(&[
        Wr::new(1, wr_opcode::SEND, &[]),
        Wr::new(2, wr_opcode::SEND, &[]).flags(0),
    ]);
    assert_eq!(p.sends_a(), []);
    let (a, qa) = (p.a.clone(), p.qa.clone());
    p.net
        .dev(a.dev())
        .modify_qp_state(&qa, qp_state::ERR)
        .unwrap();
    assert_eq!(
        summary(&p.sends_a()),
        [
            (1, wc_opcode::SEND, wc_status::WR_FLUSH_ERR),
            (2, wc_opcode::SEND, wc_status::WR_FLUSH_ERR)
        ]
    );
    // A receive posted later finds no waiting sender to resume.
    p.recv_b(70, &[]);
    assert_eq!(p.sends_a(), []);
    assert_eq!(p.recvs_b(), []);
    assert_eq!(p.net.rq(&p.b, &p.qb), (1, 0));
}
