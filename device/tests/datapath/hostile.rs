//! A hostile requester: thousands of random send WQEs (opcodes, SGE counts, keys, addresses,
//! lengths, flags, union bytes) on a connected RC pair. The device must not panic, every WQE
//! must complete exactly once (the QP signals all) or wait for a receive, and no byte of any
//! guest's RAM may change outside the regions registered for the device to write: the
//! requester's LOCAL_WRITE MR, the responder's remote-writable MR and its receive buffers
//! (plus rings and CQs).

use std::collections::VecDeque;

use vfio_user_pvrdma::abi::{
    Cqe, PAGE_SIZE, SendWqeHeader, Sge, access, qp_state, uar, wc_opcode, wc_status,
};
use zerocopy::IntoBytes;

use crate::driver::bus::Bus;
use crate::driver::memory::DEFAULT_BASE;
use crate::harness::{ALL_ACCESS, Buf, Net, Pair, QpOpts, Rng, SIZES, sge};

/// Random WQEs per topology.
const WQES: u64 = 8000;

both_topologies!(random_wqes_stay_inside_registered_memory);

/// A key and the range it covers (or pretends to).
#[derive(Clone, Copy)]
struct Region {
    key: u32,
    va: u64,
    len: u64,
}

impl Region {
    fn of(buf: &Buf, key: u32) -> Region {
        Region {
            key,
            va: buf.va,
            len: buf.len,
        }
    }
}

/// An address near, inside or far from `r`.
fn address(rng: &mut Rng, r: Region) -> u64 {
    match rng.below(10) {
        0..=3 => r.va + rng.below(r.len),
        4 => r.va.wrapping_sub(rng.below(64)),
        5 => (r.va + r.len).wrapping_sub(32).wrapping_add(rng.below(64)),
        6 => rng.next(),
        7 => DEFAULT_BASE + rng.below(16 << 20),
        8 => u64::MAX - rng.below(64),
        _ => r.va + rng.below(r.len) / 8 * 8,
    }
}

fn length(rng: &mut Rng, r: Region) -> u32 {
    match rng.below(10) {
        0..=3 => rng.below(64) as u32,
        4 | 5 => rng.below(r.len + 64) as u32,
        6 => 0,
        7 => rng.next() as u32,
        _ => rng.below(4 * PAGE_SIZE) as u32,
    }
}

fn key(rng: &mut Rng, r: Region) -> u32 {
    match rng.below(20) {
        0 => rng.next() as u32,
        1 => r.key ^ (1 << rng.below(32)),
        _ => r.key,
    }
}

/// One random send WQE, at most one stride long. Half are wild (any opcode, SGE count,
/// key, address, length); half are plausible (a real opcode, a few SGEs inside the first
/// local region, the first remote region's key and an address inside it), so that
/// successes and receiver-not-ready waits mix with the failures.
fn random_wqe(rng: &mut Rng, wr_id: u64, local: &[Region], remote: &[Region]) -> Vec<u8> {
    let tame = rng.chance(50);
    let opcode = match rng.below(10) {
        _ if tame => rng.below(7) as u32,
        0..=7 => rng.below(7) as u32,
        8 => 7 + rng.below(10) as u32,
        _ => rng.next() as u32,
    };
    let max = u64::from(SIZES.max_send_sge);
    // Room for SGEs in the stride (80-byte header, 16-byte SGEs).
    let room = (max * 16 + 80).next_power_of_two().saturating_sub(80) / 16;
    let (num_sge, written) = match rng.below(20) {
        _ if tame => {
            let n = rng.below(3);
            (n as u32, n)
        }
        0 | 1 => {
            let n = max + 1 + rng.below(room - max);
            (n as u32, n)
        }
        2 => (rng.next() as u32, 0),
        _ => {
            let n = rng.below(max + 1);
            (n as u32, n)
        }
    };
    let sges: Vec<Sge> = (0..written)
        .map(|_| {
            if tame {
                let r = local[0];
                let len = 8 + rng.below(248);
                sge(r.va + rng.below(r.len - len), len as u32, r.key)
            } else {
                let r = rng.pick(local);
                sge(address(rng, r), length(rng, r), key(rng, r))
            }
        })
        .collect();
    let mut wr = [0u8; 48];
    let r = if tame { remote[0] } else { rng.pick(remote) };
    let addr = if tame {
        r.va + rng.below(r.len - 1024) / 8 * 8
    } else {
        address(rng, r)
    };
    let rkey = if tame { r.key } else { key(rng, r) };
    wr[0..8].copy_from_slice(&addr.to_le_bytes());
    if opcode == 5 || opcode == 6 || (!tame && rng.chance(50)) {
        // Atomic layout: compare_add at 40, swap at 48, rkey at 56.
        wr[8..16].copy_from_slice(&rng.next().to_le_bytes());
        wr[16..24].copy_from_slice(&rng.next().to_le_bytes());
        wr[24..28].copy_from_slice(&rkey.to_le_bytes());
    } else {
        // RDMA layout: rkey at 40.
        wr[8..12].copy_from_slice(&rkey.to_le_bytes());
    }
    if !tame && rng.chance(10) {
        wr.iter_mut().for_each(|b| *b = rng.next() as u8);
    }
    let hdr = SendWqeHeader {
        wr_id,
        num_sge,
        total_len: rng.next() as u32,
        opcode,
        send_flags: rng.next() as u32 & 0x1f,
        ex: rng.next() as u32,
        reserved: rng.next() as u32,
        wr,
    };
    let mut bytes = hdr.as_bytes().to_vec();
    for s in &sges {
        bytes.extend_from_slice(s.as_bytes());
    }
    bytes
}

/// The responder's receives, posted and not yet completed, in order.
struct Receiver {
    posted: VecDeque<u64>,
    next: u64,
}

impl Receiver {
    /// Posts a random receive into `buf` (now and then with a bad lkey).
    fn post<B: Bus>(&mut self, p: &mut Pair<B>, rng: &mut Rng, buf: &Buf) {
        if self.posted.len() >= SIZES.max_recv_wr as usize {
            return;
        }
        let sges: Vec<Sge> = (0..rng.below(SIZES.max_recv_sge as u64 + 1))
            .map(|_| {
                let len = rng.below(256) + 1;
                let offset = rng.below(buf.len - len);
                let lkey = if rng.chance(5) {
                    rng.next() as u32
                } else {
                    buf.lkey()
                };
                sge(buf.at(offset), len as u32, lkey)
            })
            .collect();
        p.recv_b(self.next, &sges);
        self.posted.push_back(self.next);
        self.next += 1;
    }

    /// Checks the responder's completions against what was posted.
    fn complete(&mut self, cqes: &[Cqe]) -> usize {
        for c in cqes {
            assert_eq!(Some(c.wr_id), self.posted.pop_front(), "{c:?}");
            assert!(
                matches!(c.opcode, wc_opcode::RECV | wc_opcode::RECV_RDMA_WITH_IMM),
                "{c:?}"
            );
            assert!(
                matches!(
                    c.status,
                    wc_status::SUCCESS | wc_status::LOC_LEN_ERR | wc_status::LOC_PROT_ERR
                ),
                "{c:?}"
            );
        }
        cqes.len()
    }
}

fn random_wqes_stay_inside_registered_memory<B: Bus>(net: Net<B>) {
    let opts = QpOpts {
        sq_sig_all: true,
        ..QpOpts::default()
    };
    let mut p = Pair::rc(net, opts);
    let (a, b) = (p.a.clone(), p.b.clone());

    // The requester's buffers: one it may write, one read-only, one of another PD.
    let a_rw = p.net.mr(&a, 3 * PAGE_SIZE, access::LOCAL_WRITE);
    let a_ro = p.net.mr(&a, PAGE_SIZE, access::REMOTE_READ);
    let a_pd2 = p.net.another_pd(&a);
    let a_other = p.net.mr_in(&a, a_pd2, PAGE_SIZE, ALL_ACCESS);
    // The responder's: the remote-writable target, a read-only one, another PD's, the
    // receive buffers (no remote rights), a destroyed MR, and the kernel's DMA MR.
    let b_target = p.net.mr(&b, 3 * PAGE_SIZE, ALL_ACCESS);
    let b_ro = p.net.mr(&b, PAGE_SIZE, access::REMOTE_READ);
    let b_pd2 = p.net.another_pd(&b);
    let b_other = p.net.mr_in(&b, b_pd2, PAGE_SIZE, ALL_ACCESS);
    let b_recv = p.net.mr(&b, 2 * PAGE_SIZE, access::LOCAL_WRITE);
    let b_stale = p.net.mr(&b, PAGE_SIZE, ALL_ACCESS);
    p.net.dev(b.dev()).destroy_mr(b_stale.mr.handle).unwrap();
    let d = p.net.dev(b.dev());
    let kernel_pd = d.create_pd(0).unwrap();
    let dma = d.get_dma_mr(kernel_pd).unwrap();

    let local = [
        Region::of(&a_rw, a_rw.lkey()),
        Region::of(&a_rw, a_rw.lkey()),
        Region::of(&a_rw, a_rw.lkey()),
        Region::of(&a_ro, a_ro.lkey()),
        Region::of(&a_other, a_other.lkey()),
        Region::of(&b_target, b_target.lkey()),
    ];
    let remote = [
        Region::of(&b_target, b_target.rkey()),
        Region::of(&b_target, b_target.rkey()),
        Region::of(&b_target, b_target.rkey()),
        Region::of(&b_ro, b_ro.rkey()),
        Region::of(&b_other, b_other.rkey()),
        Region::of(&b_recv, b_recv.rkey()),
        Region::of(&b_stale, b_stale.rkey()),
        Region::of(&a_rw, a_rw.rkey()),
        Region {
            key: dma.rkey,
            va: DEFAULT_BASE,
            len: 16 << 20,
        },
    ];
    for (i, buf) in [
        &a_rw, &a_ro, &a_other, &b_target, &b_ro, &b_other, &b_recv, &b_stale,
    ]
    .into_iter()
    .enumerate()
    {
        p.net.fill(buf, 0x80 + i as u8);
    }
    let watch = p.net.watch();

    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut receiver = Receiver {
        posted: VecDeque::new(),
        next: 1 << 32,
    };
    let mut waiting: VecDeque<u64> = VecDeque::new();
    let (mut posted, mut successes, mut failures, mut rnr_waits) = (0u64, 0u64, 0u64, 0u64);
    while posted < WQES {
        // Receives trickle in slower than messages, so that some messages find none.
        if rng.chance(30) {
            receiver.post(&mut p, &mut rng, &b_recv);
        }
        // The queue is empty here (see below): a batch of at most 8 always fits its 16.
        for _ in 0..1 + rng.below(8) {
            let wqe = random_wqe(&mut rng, posted, &local, &remote);
            p.net
                .dev(a.dev())
                .post_send_raw(&p.qa, &wqe)
                .expect("the SQ has room");
            waiting.push_back(posted);
            posted += 1;
        }
        p.net.dev(a.dev()).ring_qp(&p.qa, uar::QP_SEND);

        // Drain; whatever is left must be waiting for a receive, which posting one frees.
        let mut failed = false;
        let mut stuck = 0;
        loop {
            let cqes = p.sends_a();
            for c in &cqes {
                assert_eq!(
                    Some(c.wr_id),
                    waiting.pop_front(),
                    "completions in order: {c:?}"
                );
                assert_eq!(c.qp, u64::from(p.qa.handle));
                if failed {
                    assert_eq!(c.status, wc_status::WR_FLUSH_ERR, "after an error: {c:?}");
                } else if c.status == wc_status::SUCCESS {
                    successes += 1;
                } else {
                    failed = true;
                    failures += 1;
                }
            }
            let received = receiver.complete(&p.recvs_b());
            if waiting.is_empty() || failed {
                break;
            }
            if cqes.is_empty() && received == 0 {
                stuck += 1;
                assert!(
                    stuck < 4,
                    "WQE {:?} neither completes nor takes a receive",
                    waiting.front()
                );
            } else {
                stuck = 0;
            }
            rnr_waits += 1;
            receiver.post(&mut p, &mut rng, &b_recv);
        }
        assert!(
            waiting.is_empty(),
            "an error flushes everything: {waiting:?}"
        );
        if failed {
            assert_eq!(p.state_a(), qp_state::ERR);
            p.recover_a();
        } else {
            let (prod, cons) = p.net.sq(&a, &p.qa);
            assert_eq!(prod, cons, "every completed WQE was consumed");
        }
    }
    eprintln!("{posted} WQEs: {successes} succeeded, {failures} failed, {rnr_waits} RNR waits");
    p.net
        .assert_unchanged_except(&watch, &[&a_rw, &b_target, &b_recv]);
    assert!(failures > WQES / 20, "the mix exercises errors: {failures}");
    assert!(rnr_waits > 0, "and receiver-not-ready waits");
    assert!(successes > WQES / 20, "and successes: {successes}");
}
