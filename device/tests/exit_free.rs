//! Exit-free doorbells (docs/doorbells.md) in process: the guest's doorbell stores only land
//! in the UAR words of an [`ExitFreeBus`], and nothing happens until the test polls them the
//! way the server's poller does (`PvrdmaDevice::poll_uar`). Every scenario runs on one
//! device in loopback: context A sends, context B receives, each with its own UAR page, GID,
//! PD and a send and a receive CQ.

mod driver;

use vfio_user_pvrdma::abi::{
    Cqe, Eqe, GID_TYPE_ROCE_V1, PAGE_SIZE, Sge, access, event, qp_state, qp_type, send_flags, uar,
    vector, wc_opcode, wc_status, wr_opcode,
};

use driver::layout::QpOwner;
use driver::memory;
use driver::queues::send_wqe;
use driver::uar_bus::ExitFreeBus;
use driver::verbs::{QpSpec, ipv4_gid};
use driver::{Cq, Driver, Mr, Qp, QpSizes, Uc};

type D = Driver<ExitFreeBus>;

const OK: u32 = wc_status::SUCCESS;

const NO_IRQS: [u16; 0] = [];
const NO_WORDS: [(u64, u32); 0] = [];
const NO_OFFSETS: [u64; 0] = [];

/// The poller's safety net: every send queue is scanned at least once per this many polls.
const SCAN_EVERY: usize = 256;

const SIZES: QpSizes = QpSizes {
    max_send_wr: 16,
    max_recv_wr: 16,
    max_send_sge: 2,
    max_recv_sge: 2,
    srq: false,
};

fn gid_a() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 1])
}

fn gid_b() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 2])
}

/// `(wr_id, opcode, status)` of each completion.
fn summary(cqes: &[Cqe]) -> Vec<(u64, u32, u32)> {
    cqes.iter().map(|c| (c.wr_id, c.opcode, c.status)).collect()
}

/// `len` bytes no two buffers share by accident.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A user context with a PD, a send CQ and a receive CQ.
#[derive(Debug, Clone)]
struct Ctx {
    uc: Uc,
    pd: u32,
    scq: Cq,
    rcq: Cq,
    /// The GID index its QPs send from.
    gid_index: u8,
}

impl Ctx {
    /// BAR2 offset of `word` on this context's UAR page.
    fn word(&self, word: u64) -> u64 {
        u64::from(self.uc.uar) * PAGE_SIZE + word
    }
}

/// A registered user buffer on one page.
#[derive(Debug, Clone)]
struct Buf {
    mr: Mr,
    va: u64,
    len: usize,
}

impl Buf {
    fn sge(&self) -> Sge {
        Sge {
            addr: self.va,
            length: self.len as u32,
            lkey: self.mr.lkey,
        }
    }

    fn phys(&self) -> u64 {
        self.mr.buffer.as_ref().unwrap().translate(self.va)
    }

    fn write(&self, d: &D, bytes: &[u8]) {
        assert!(bytes.len() <= self.len);
        memory::write_bytes(d.ram(), self.phys(), bytes);
    }

    fn read(&self, d: &D) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        memory::read_bytes(d.ram(), self.phys(), &mut out);
        out
    }
}

/// A probed exit-free device with contexts A (GID index 0) and B (GID index 1).
struct Setup {
    d: D,
    a: Ctx,
    b: Ctx,
    next_va: u64,
}

impl Setup {
    fn new() -> Setup {
        let mut d = D::exit_free();
        d.probe();
        d.create_bind(0, gid_a(), GID_TYPE_ROCE_V1)
            .expect("CREATE_BIND A");
        d.create_bind(1, gid_b(), GID_TYPE_ROCE_V1)
            .expect("CREATE_BIND B");
        let a = ctx(&mut d, 0);
        let b = ctx(&mut d, 1);
        assert_ne!(a.uc.uar, b.uc.uar, "each context has its own UAR page");
        d.take_irqs();
        Setup {
            d,
            a,
            b,
            next_va: 0x7f00_0000_0000,
        }
    }

    /// An RC QP of `ctx`, still in RESET.
    fn qp(&mut self, ctx: &Ctx) -> Qp {
        let spec = QpSpec {
            owner: QpOwner::User,
            qp_type: qp_type::RC,
            uc: ctx.uc,
            pd: ctx.pd,
            send_cq: ctx.scq.handle,
            recv_cq: ctx.rcq.handle,
            srq: None,
            sizes: SIZES,
            sq_sig_all: false,
        };
        self.d.create_qp_with(spec).expect("CREATE_QP")
    }

    /// An RC QP of A connected to a new RC QP of B: `(A's, B's)`.
    fn pair(&mut self) -> (Qp, Qp) {
        let (a, b) = (self.a.clone(), self.b.clone());
        let qa = self.qp(&a);
        let qb = self.qp(&b);
        self.d
            .rc_connect(&qa, qb.qpn, gid_b(), a.gid_index)
            .expect("connect A");
        self.d
            .rc_connect(&qb, qa.qpn, gid_a(), b.gid_index)
            .expect("connect B");
        self.d.take_irqs();
        (qa, qb)
    }

    /// A page-aligned buffer of `len` bytes registered in `ctx`'s PD.
    fn buf(&mut self, ctx: &Ctx, len: usize) -> Buf {
        assert!(len as u64 <= PAGE_SIZE);
        let va = self.next_va;
        self.next_va += 2 * PAGE_SIZE;
        let mr = self
            .d
            .reg_user_mr(ctx.pd, va, len as u64, access::LOCAL_WRITE)
            .expect("CREATE_MR");
        // Forget the command's interrupt: tests look at the data path's.
        self.d.take_irqs();
        Buf { mr, va, len }
    }

    /// A source buffer holding a pattern and a destination buffer filled with `0xee`.
    fn bufs(&mut self, seed: u8, len: usize) -> (Buf, Buf, Vec<u8>) {
        let (a, b) = (self.a.clone(), self.b.clone());
        let src = self.buf(&a, len);
        let dst = self.buf(&b, len);
        let data = pattern(seed, len);
        src.write(&self.d, &data);
        dst.write(&self.d, &vec![0xee; len]);
        (src, dst, data)
    }

    /// Writes a signaled SEND of `src` into `qp`'s send queue; no doorbell.
    fn post_send(&mut self, qp: &Qp, wr_id: u64, src: &Buf) {
        let wqe = send_wqe(wr_id, wr_opcode::SEND, send_flags::SIGNALED, &[src.sge()]);
        self.d.post_send_raw(qp, &wqe).expect("SQ has room");
    }

    /// Posts a receive into `dst` and stores its doorbell word.
    fn post_recv(&mut self, qp: &Qp, wr_id: u64, dst: &Buf) {
        self.d
            .post_recv(qp, wr_id, &[dst.sge()])
            .expect("RQ has room");
    }

    /// The producer index of `cq`: how many CQEs the device ever wrote (without consuming).
    fn cq_written(&self, cq: &Cq) -> u32 {
        self.d.cq_indices(cq).0
    }

    /// Completions of `ctx`'s send CQ, then of its receive CQ (consumed).
    fn drain(&mut self, ctx: &Ctx) -> (Vec<Cqe>, Vec<Cqe>) {
        let sends = self.d.drain_cq(&ctx.scq);
        let recvs = self.d.drain_cq(&ctx.rcq);
        (sends, recvs)
    }

    /// Vectors raised since the last look, and the CQ handles notified.
    fn notifications(&mut self) -> (Vec<u16>, Vec<u32>) {
        let irqs = self.d.take_irqs();
        let cqnes = self
            .d
            .poll_cq_notifications()
            .expect("CQ notification ring");
        (irqs, cqnes.iter().map(|c| c.info).collect())
    }

    fn pending(&self) -> Vec<(u64, u32)> {
        self.d.bus.pending()
    }

    fn qp_state(&mut self, qp: &Qp) -> u32 {
        let state = self.d.query_qp(qp.handle, 0).expect("QUERY_QP").qp_state;
        self.d.take_irqs();
        state
    }
}

fn ctx(d: &mut D, gid_index: u8) -> Ctx {
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    let scq = d.create_cq_on(uc, 64).expect("CREATE_CQ");
    let rcq = d.create_cq_on(uc, 64).expect("CREATE_CQ");
    Ctx {
        uc,
        pd,
        scq,
        rcq,
        gid_index,
    }
}

#[test]
fn a_send_doorbell_is_only_a_store_until_the_poll() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, data) = s.bufs(1, 300);
    s.post_recv(&qb, 70, &dst);
    s.post_send(&qa, 7, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);

    // Nothing but two words in BAR2.
    assert_eq!(
        s.pending(),
        [
            (s.a.word(uar::QP_OFFSET), qa.handle | uar::QP_SEND),
            (s.b.word(uar::QP_OFFSET), qb.handle | uar::QP_RECV),
        ]
    );
    assert_eq!(s.d.sq_indices(&qa), (1, 0), "the device took no WQE");
    assert_eq!(s.d.rq_indices(&qb), (1, 0));
    assert_eq!((s.cq_written(&s.a.scq), s.cq_written(&s.b.rcq)), (0, 0));
    assert_eq!(dst.read(&s.d), vec![0xee; 300], "no byte was delivered");
    assert_eq!(s.d.take_irqs(), NO_IRQS);

    assert!(s.d.poll(), "a poll that delivers reports activity");
    assert_eq!(
        s.pending(),
        NO_WORDS,
        "the poll read and cleared both words"
    );
    let taken = s.d.bus.taken().to_vec();
    for offset in [s.a.word(uar::QP_OFFSET), s.b.word(uar::QP_OFFSET)] {
        assert!(
            taken.contains(&offset),
            "{offset:#x} not polled: {taken:x?}"
        );
    }

    let (sends, _) = s.drain(&s.a.clone());
    let (_, recvs) = s.drain(&s.b.clone());
    assert_eq!(summary(&sends), [(7, wc_opcode::SEND, OK)]);
    assert_eq!(sends[0].qp, u64::from(qa.handle));
    assert_eq!(summary(&recvs), [(70, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].qp, u64::from(qb.handle));
    assert_eq!(recvs[0].byte_len, 300);
    assert_eq!(recvs[0].src_qp, qa.qpn);
    assert_eq!(dst.read(&s.d), data, "the payload landed");
    assert_eq!((s.d.sq_indices(&qa), s.d.rq_indices(&qb)), ((1, 1), (1, 1)));
    assert_eq!(s.d.take_irqs(), NO_IRQS, "no CQ was armed: no notification");

    assert!(!s.d.poll(), "nothing pending: an idle poll");
    assert_eq!((s.cq_written(&s.a.scq), s.cq_written(&s.b.rcq)), (1, 1));
}

#[test]
fn one_poll_delivers_a_send_whose_doorbell_was_overwritten_by_another_qps() {
    let mut s = Setup::new();
    let (qa1, qb1) = s.pair();
    let (qa2, qb2) = s.pair();
    let (src1, dst1, data1) = s.bufs(11, 200);
    let (src2, dst2, data2) = s.bufs(22, 400);
    s.post_recv(&qb1, 101, &dst1);
    s.post_recv(&qb2, 102, &dst2);
    assert!(s.d.poll(), "the receive doorbells");

    s.post_send(&qa1, 1, &src1);
    s.d.ring_qp(&qa1, uar::QP_SEND);
    s.post_send(&qa2, 2, &src2);
    s.d.ring_qp(&qa2, uar::QP_SEND);
    assert_eq!(
        s.pending(),
        [(s.a.word(uar::QP_OFFSET), qa2.handle | uar::QP_SEND)],
        "both QPs ring on A's page: the second doorbell replaced the first"
    );
    assert_eq!(
        (s.d.sq_indices(&qa1), s.d.sq_indices(&qa2)),
        ((1, 0), (1, 0))
    );

    assert!(s.d.poll());
    let (sends, _) = s.drain(&s.a.clone());
    let (_, recvs) = s.drain(&s.b.clone());
    // The surviving word's QP goes first, then the scan finds the one whose word was lost.
    assert_eq!(
        sends
            .iter()
            .map(|c| (c.wr_id, c.qp, c.status))
            .collect::<Vec<_>>(),
        [
            (2, u64::from(qa2.handle), OK),
            (1, u64::from(qa1.handle), OK)
        ]
    );
    assert_eq!(
        recvs
            .iter()
            .map(|c| (c.wr_id, c.qp, c.byte_len, c.status))
            .collect::<Vec<_>>(),
        [
            (102, u64::from(qb2.handle), 400, OK),
            (101, u64::from(qb1.handle), 200, OK)
        ]
    );
    assert_eq!(dst1.read(&s.d), data1);
    assert_eq!(dst2.read(&s.d), data2);
    assert_eq!(
        (s.d.sq_indices(&qa1), s.d.sq_indices(&qa2)),
        ((1, 1), (1, 1))
    );
    assert!(!s.d.poll());
}

#[test]
fn one_poll_delivers_a_send_whose_doorbell_was_overwritten_by_a_receive_doorbell() {
    let mut s = Setup::new();
    let (qa1, qb1) = s.pair();
    let (qa2, _qb2) = s.pair();
    let (src, dst, data) = s.bufs(33, 128);
    let a = s.a.clone();
    let spare = s.buf(&a, 64);
    s.post_recv(&qb1, 9, &dst);
    assert!(s.d.poll());

    // A's first QP sends, then A posts a receive on its second QP: same page, same word.
    s.post_send(&qa1, 3, &src);
    s.d.ring_qp(&qa1, uar::QP_SEND);
    s.d.post_recv(&qa2, 4, &[spare.sge()]).expect("RQ has room");
    assert_eq!(
        s.pending(),
        [(s.a.word(uar::QP_OFFSET), qa2.handle | uar::QP_RECV)]
    );

    assert!(s.d.poll());
    let (sends, recvs_a) = s.drain(&s.a.clone());
    let (_, recvs_b) = s.drain(&s.b.clone());
    assert_eq!(summary(&sends), [(3, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&recvs_b), [(9, wc_opcode::RECV, OK)]);
    assert_eq!(recvs_a, [], "the receive posted on A's second QP waits");
    assert_eq!(dst.read(&s.d), data);
}

#[test]
fn a_send_without_any_doorbell_waits_for_the_safety_scan() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, data) = s.bufs(44, 512);
    s.post_recv(&qb, 80, &dst);
    // The receive doorbell is a QP word: this poll scans the send queues (all empty) and
    // restarts the count to the next safety scan.
    assert!(s.d.poll());
    assert_eq!(s.cq_written(&s.b.rcq), 0);

    // The WQE and its producer index, but the doorbell store never happens.
    s.post_send(&qa, 8, &src);
    assert_eq!(s.pending(), NO_WORDS);

    let mut delivered_at = None;
    for poll in 1..=SCAN_EVERY {
        let busy = s.d.poll();
        let written = (s.cq_written(&s.a.scq), s.cq_written(&s.b.rcq));
        if busy {
            assert_eq!(written, (1, 1), "poll {poll} was busy: it delivered");
            delivered_at = Some(poll);
            break;
        }
        assert_eq!(written, (0, 0), "an idle poll {poll} delivered nothing");
        assert_eq!(s.d.sq_indices(&qa), (1, 0));
        assert_eq!(dst.read(&s.d), vec![0xee; 512]);
    }
    let delivered_at = delivered_at.expect("the scan drained the queue by poll 256");
    assert!(
        delivered_at > 1,
        "a poll with no QP doorbell word does not scan the send queues"
    );

    let (sends, _) = s.drain(&s.a.clone());
    let (_, recvs) = s.drain(&s.b.clone());
    assert_eq!(summary(&sends), [(8, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&recvs), [(80, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].byte_len, 512);
    assert_eq!(dst.read(&s.d), data);
    assert!(!s.d.poll());
}

#[test]
fn the_safety_scan_comes_every_256_polls() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, _) = s.bufs(45, 64);
    for i in 0..2 {
        s.post_recv(&qb, 90 + i, &dst);
    }
    assert!(s.d.poll(), "the receive doorbells; the scan count restarts");
    // Two rounds: each undoorbelled send is drained by exactly the 256th poll after the
    // last scan.
    for round in 0..2u64 {
        s.post_send(&qa, round, &src);
        let busy: Vec<usize> = (1..=SCAN_EVERY).filter(|_| s.d.poll()).collect();
        assert_eq!(busy, [SCAN_EVERY], "round {round}");
        assert_eq!(s.cq_written(&s.b.rcq), round as u32 + 1);
    }
}

#[test]
fn a_cq_armed_by_a_stored_word_is_notified_by_the_poll_that_completes() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, _) = s.bufs(55, 32);
    let (a, b) = (s.a.clone(), s.b.clone());
    s.d.ring_cq(&b.rcq, uar::CQ_ARM);
    s.d.ring_cq(&a.scq, uar::CQ_ARM);
    assert!(s.d.poll(), "the arms are activity");
    assert_eq!(
        s.notifications(),
        (vec![], vec![]),
        "empty CQs: the arms wait"
    );

    s.post_recv(&qb, 1, &dst);
    s.post_send(&qa, 2, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    assert_eq!(
        s.notifications(),
        (vec![], vec![]),
        "a stored doorbell does nothing"
    );
    assert!(s.d.poll());
    // The responder completes first, then the requester.
    assert_eq!(
        s.notifications(),
        (
            vec![vector::CQ_NOTIFY, vector::CQ_NOTIFY],
            vec![b.rcq.handle, a.scq.handle]
        )
    );
    assert_eq!(s.drain(&a).0.len(), 1);
    assert_eq!(s.drain(&b).1.len(), 1);

    // One notification per arm.
    s.post_recv(&qb, 3, &dst);
    s.post_send(&qa, 4, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    assert!(s.d.poll());
    assert_eq!(s.notifications(), (vec![], vec![]));
    assert_eq!(s.drain(&b).1.len(), 1, "the second message arrived");
}

#[test]
fn a_poll_word_that_overwrote_the_arm_still_arms() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, _) = s.bufs(66, 32);
    let (a, b) = (s.a.clone(), s.b.clone());
    // ibv_req_notify_cq, then the poller's ibv_poll_cq finds B's receive CQ empty.
    s.d.ring_cq(&b.rcq, uar::CQ_ARM);
    s.d.ring_cq(&b.rcq, uar::CQ_POLL);
    assert_eq!(
        s.pending(),
        [(b.word(uar::CQ_OFFSET), b.rcq.handle | uar::CQ_POLL)]
    );
    assert!(s.d.poll());
    assert_eq!(s.notifications(), (vec![], vec![]));

    s.post_recv(&qb, 1, &dst);
    s.post_send(&qa, 2, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    assert!(s.d.poll());
    assert_eq!(
        s.notifications(),
        (vec![vector::CQ_NOTIFY], vec![b.rcq.handle]),
        "B's receive CQ was armed; A's send CQ never was"
    );
    assert_eq!(summary(&s.drain(&a).0), [(2, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&s.drain(&b).1), [(1, wc_opcode::RECV, OK)]);
}

#[test]
fn an_arm_seen_in_the_same_poll_as_its_completion_notifies() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, _) = s.bufs(77, 32);
    let (a, b) = (s.a.clone(), s.b.clone());
    s.post_recv(&qb, 1, &dst);
    assert!(s.d.poll());

    // The guest arms (then polls, overwriting the arm) B's receive CQ and A's send CQ, and
    // sends; the device sees all of it at once. A's page comes first: the completions are
    // in the CQs before the arms are read, so the arms must notify at once.
    s.d.ring_cq(&b.rcq, uar::CQ_ARM);
    s.d.ring_cq(&b.rcq, uar::CQ_POLL);
    s.post_send(&qa, 2, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    s.d.ring_cq(&a.scq, uar::CQ_ARM);
    assert!(a.uc.uar < b.uc.uar);
    assert!(s.d.poll());
    let (irqs, mut notified) = s.notifications();
    notified.sort_unstable();
    let mut expected = vec![a.scq.handle, b.rcq.handle];
    expected.sort_unstable();
    assert_eq!(
        (irqs, notified),
        (vec![vector::CQ_NOTIFY, vector::CQ_NOTIFY], expected)
    );
    assert_eq!(summary(&s.drain(&a).0), [(2, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&s.drain(&b).1), [(1, wc_opcode::RECV, OK)]);
}

#[test]
fn polls_before_activation_and_after_a_reset_take_nothing() {
    let mut d = D::exit_free();
    // Stores into the UAR before the driver activated the device.
    let words = [
        (uar::QP_OFFSET, 0x4000_0001),
        (uar::CQ_OFFSET, uar::CQ_ARM | 1),
        (uar::SRQ_OFFSET, 0xffff_ffff),
    ];
    for (word, value) in words {
        d.doorbell(0, word, value);
    }
    let before = d.bus.pending();
    assert_eq!(before.len(), 3);
    for _ in 0..3 {
        assert!(!d.poll(), "an inactive device does nothing");
    }
    assert_eq!(d.bus.taken(), NO_OFFSETS, "and reads no word");
    assert_eq!(d.bus.pending(), before);
    assert!(!d.device().is_active());
    assert_eq!(d.take_irqs(), NO_IRQS);

    // After the probe, the stale words are read once, name nothing, and change nothing.
    d.probe();
    assert!(d.device().is_active());
    assert!(d.poll());
    assert_eq!(d.bus.pending(), NO_WORDS);
    assert_eq!(d.take_irqs(), NO_IRQS);
    assert!(!d.poll());

    // The device works.
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    assert_ne!(pd, 0);

    // Removal resets the device: polls stop again, whatever the words say.
    d.remove();
    assert!(!d.device().is_active());
    d.doorbell(uc.uar, uar::QP_OFFSET, uar::QP_SEND | 1);
    d.doorbell(0, uar::CQ_OFFSET, uar::CQ_POLL | 1);
    assert!(!d.poll());
    assert_eq!(d.bus.taken(), NO_OFFSETS);
    assert_eq!(d.bus.pending().len(), 2);
}

#[test]
fn garbage_doorbell_words_are_dropped_and_the_qps_keep_working() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, data) = s.bufs(88, 256);
    let (a, b) = (s.a.clone(), s.b.clone());
    s.post_recv(&qb, 5, &dst);
    assert!(s.d.poll());

    // Handles nobody has, every bit set, objects rung on a page that is not theirs (A's send
    // CQ armed from B's page, A's QP rung from the kernel's page), a word between the three,
    // and a page no context owns.
    let unused_word = a.word(0xc);
    let unowned_page = 100 * PAGE_SIZE;
    s.d.doorbell(a.uc.uar, uar::QP_OFFSET, 0xffff_ffff);
    s.d.doorbell(a.uc.uar, uar::CQ_OFFSET, 0x00ff_fff0 | uar::CQ_ARM);
    s.d.doorbell(a.uc.uar, uar::SRQ_OFFSET, 0xdead_beef);
    s.d.doorbell(b.uc.uar, uar::QP_OFFSET, qa.handle | uar::QP_SEND);
    s.d.doorbell(b.uc.uar, uar::CQ_OFFSET, a.scq.handle | uar::CQ_ARM);
    s.d.doorbell(b.uc.uar, uar::SRQ_OFFSET, uar::HANDLE_MASK | uar::SRQ_RECV);
    s.d.doorbell(0, uar::QP_OFFSET, qa.handle | uar::QP_SEND | uar::QP_RECV);
    s.d.doorbell(
        0,
        uar::CQ_OFFSET,
        b.rcq.handle | uar::CQ_ARM | uar::CQ_ARM_SOL,
    );
    s.d.doorbell(a.uc.uar, 0xc, 0x1234_5678);
    s.d.doorbell(100, uar::QP_OFFSET, qb.handle | uar::QP_RECV);

    assert!(
        s.d.poll(),
        "non-zero words are activity even when they name nothing"
    );
    assert_eq!(
        s.pending(),
        [
            (unused_word, 0x1234_5678),
            (unowned_page, qb.handle | uar::QP_RECV)
        ],
        "the poller reads only the three words of the pages in use"
    );
    assert_eq!(s.d.take_irqs(), NO_IRQS);
    assert_eq!(s.d.poll_async().expect("async ring"), []);
    assert_eq!((s.cq_written(&a.scq), s.cq_written(&b.rcq)), (0, 0));
    assert_eq!(s.d.sq_indices(&qa), (0, 0));
    assert_eq!(
        (s.qp_state(&qa), s.qp_state(&qb)),
        (qp_state::RTS, qp_state::RTS)
    );

    // A real SEND goes through; no CQ was armed by the foreign-page arms.
    s.post_send(&qa, 6, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    assert!(s.d.poll());
    assert_eq!(summary(&s.drain(&a).0), [(6, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&s.drain(&b).1), [(5, wc_opcode::RECV, OK)]);
    assert_eq!(dst.read(&s.d), data);
    assert_eq!(s.notifications(), (vec![], vec![]));
}

#[test]
fn a_corrupt_send_queue_breaks_only_its_own_qp() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (qbad, _) = s.pair();
    let (src, dst, data) = s.bufs(99, 100);
    s.post_recv(&qb, 1, &dst);
    assert!(s.d.poll());

    // A good send, and a QP of the same page whose producer index is out of range. The bad
    // QP rings last, so its word is the one the poller sees.
    s.post_send(&qa, 2, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    s.d.set_sq_prod(&qbad, 0xffff_0000);
    s.d.ring_qp(&qbad, uar::QP_SEND);
    assert_eq!(
        s.pending(),
        [(s.a.word(uar::QP_OFFSET), qbad.handle | uar::QP_SEND)]
    );

    assert!(s.d.poll());
    assert_eq!(
        summary(&s.drain(&s.a.clone()).0),
        [(2, wc_opcode::SEND, OK)]
    );
    assert_eq!(
        summary(&s.drain(&s.b.clone()).1),
        [(1, wc_opcode::RECV, OK)]
    );
    assert_eq!(dst.read(&s.d), data);
    assert_eq!(
        s.d.poll_async().expect("async ring"),
        [Eqe {
            event_type: event::QP_FATAL,
            info: qbad.handle
        }]
    );
    assert_eq!(s.d.take_irqs(), [vector::ASYNC_EVENT]);
    assert_eq!(
        (s.qp_state(&qa), s.qp_state(&qbad)),
        (qp_state::RTS, qp_state::ERR)
    );
    // Later polls keep going: the broken QP is not scanned forever.
    for _ in 0..SCAN_EVERY {
        assert!(!s.d.poll());
    }
}

#[test]
fn a_sender_waiting_for_a_receiver_goes_when_the_receive_doorbell_is_polled() {
    let mut s = Setup::new();
    let (qa, qb) = s.pair();
    let (src, dst, data) = s.bufs(12, 64);
    s.post_send(&qa, 1, &src);
    s.d.ring_qp(&qa, uar::QP_SEND);
    assert!(s.d.poll());
    assert_eq!(
        s.d.sq_indices(&qa),
        (1, 0),
        "receiver not ready: the WQE waits"
    );
    assert_eq!(s.cq_written(&s.a.scq), 0);
    assert_eq!(s.qp_state(&qa), qp_state::RTS);
    for _ in 0..SCAN_EVERY {
        assert!(!s.d.poll(), "a waiting sender is not busy work");
    }

    s.post_recv(&qb, 2, &dst);
    assert_eq!(
        s.cq_written(&s.b.rcq),
        0,
        "a stored receive doorbell does nothing"
    );
    assert!(s.d.poll());
    assert_eq!(
        summary(&s.drain(&s.a.clone()).0),
        [(1, wc_opcode::SEND, OK)]
    );
    assert_eq!(
        summary(&s.drain(&s.b.clone()).1),
        [(2, wc_opcode::RECV, OK)]
    );
    assert_eq!(dst.read(&s.d), data);
}

#[test]
fn a_waiting_sender_goes_even_when_the_receive_doorbell_was_overwritten() {
    let mut s = Setup::new();
    let (qa1, qb1) = s.pair();
    let (qa2, qb2) = s.pair();
    let (src1, dst1, data1) = s.bufs(13, 64);
    let (b, a) = (s.b.clone(), s.a.clone());
    // B's second QP sends to A's second QP (the other way round).
    let src2 = s.buf(&b, 32);
    let dst2 = s.buf(&a, 32);
    src2.write(&s.d, &pattern(14, 32));
    s.post_recv(&qa2, 20, &dst2);
    s.post_send(&qa1, 1, &src1);
    s.d.ring_qp(&qa1, uar::QP_SEND);
    assert!(s.d.poll());
    assert_eq!(
        s.d.sq_indices(&qa1),
        (1, 0),
        "A's first QP waits for a receive"
    );

    // B posts the receive, then sends on its other QP: the send doorbell replaces the
    // receive doorbell in B's word. Only the server's retry of waiting senders after a busy
    // poll (mirrored by the bus) can find the receive now.
    s.post_recv(&qb1, 10, &dst1);
    s.post_send(&qb2, 2, &src2);
    s.d.ring_qp(&qb2, uar::QP_SEND);
    assert_eq!(
        s.pending(),
        [(b.word(uar::QP_OFFSET), qb2.handle | uar::QP_SEND)]
    );
    assert!(s.d.poll());
    let (sends_a, recvs_a) = s.drain(&a);
    let (sends_b, recvs_b) = s.drain(&b);
    assert_eq!(summary(&sends_b), [(2, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&recvs_a), [(20, wc_opcode::RECV, OK)]);
    assert_eq!(summary(&sends_a), [(1, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&recvs_b), [(10, wc_opcode::RECV, OK)]);
    assert_eq!(dst1.read(&s.d), data1);
    assert_eq!(dst2.read(&s.d), pattern(14, 32));
}
