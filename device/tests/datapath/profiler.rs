//! The queue-pair profiler on the data path: per-QP counters, and exact stage latencies of
//! SENDs measured with a fake clock that advances a fixed step on every read (so the test
//! also proves how many times, and where, the device reads the clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vfio_user_pvrdma::abi::{access, qp_state, send_flags, uar, wc_opcode, wc_status, wr_opcode};
use vfio_user_pvrdma::pvrdma::{Clock, PvrdmaDevice, QpStats, Stage};

use crate::driver::bus::{Bus, InProcessBus};
use crate::driver::fabric_bus::FabricBus;
use crate::harness::{Net, Pair, QpOpts, Wr};
use crate::operations::summary;

memcpy_topologies!(
    send_stages_are_timed_exactly,
    counters_count_bytes_errors_and_rnr_stalls,
);

/// Every read returns the previous value plus `STEP`.
#[derive(Debug, Default)]
struct StepClock {
    now: AtomicU64,
}

const STEP: u64 = 1000;

impl Clock for StepClock {
    fn now_ns(&self) -> u64 {
        self.now.fetch_add(STEP, Ordering::Relaxed) + STEP
    }
}

impl StepClock {
    fn reads(&self) -> u64 {
        self.now.load(Ordering::Relaxed) / STEP
    }
}

/// Reaching into the device models of either topology.
pub trait Devices {
    fn with_device<R>(&mut self, dev: usize, f: impl FnOnce(&mut PvrdmaDevice) -> R) -> R;
}

impl Devices for Net<InProcessBus> {
    fn with_device<R>(&mut self, dev: usize, f: impl FnOnce(&mut PvrdmaDevice) -> R) -> R {
        f(self.d[dev].bus.device_mut())
    }
}

impl Devices for Net<FabricBus> {
    fn with_device<R>(&mut self, dev: usize, f: impl FnOnce(&mut PvrdmaDevice) -> R) -> R {
        self.d[dev].with_device(f)
    }
}

fn stats<B: Bus>(net: &mut Net<B>, dev: usize, qp: u32) -> QpStats
where
    Net<B>: Devices,
{
    net.with_device(dev, |d| d.qp_stats_of(qp).expect("the QP exists"))
}

fn send_stages_are_timed_exactly<B: Bus>(net: Net<B>)
where
    Net<B>: Devices,
{
    let mut p = Pair::rc(net, QpOpts::default());
    let (dev_a, dev_b) = (p.a.dev(), p.b.dev());
    let clock = Arc::new(StepClock::default());
    p.net.with_device(dev_a, |d| {
        d.set_clock(clock.clone());
        d.set_profiling(true);
    });
    let src = p.net.mr(&p.a, 256, 0);
    let dst = p.net.mr(&p.b, 256, access::LOCAL_WRITE);
    for i in 0..6 {
        p.recv_b(i, &[dst.sge(0, 64)]);
    }
    p.net.dev(dev_a).ring_cq(&p.a.scq, uar::CQ_ARM);
    p.net.take_irqs();
    assert_eq!(clock.reads(), 0, "receives and arming read no clock");

    // Three SENDs on one doorbell, the last one signaled, to an armed CQ.
    let batch = [
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 64)]).flags(0),
        Wr::new(2, wr_opcode::SEND, &[src.sge(64, 64)]).flags(0),
        Wr::new(3, wr_opcode::SEND, &[src.sge(128, 64)]).flags(send_flags::SIGNALED),
    ];
    p.post_a(&batch);
    assert_eq!(
        summary(&p.sends_a()),
        [(3, wc_opcode::SEND, wc_status::SUCCESS)]
    );
    assert_eq!(p.recvs_b().len(), 3);
    // Reads: the doorbell (t=1000), data placed ×3 (2000, 3000, 4000), the CQE (5000) and
    // the interrupt (6000).
    assert_eq!(clock.reads(), 6);
    let s = stats(&mut p.net, dev_a, p.qa.handle);
    let pickup = s.stage(Stage::Pickup);
    assert_eq!(pickup.count, 3);
    assert_eq!(
        (pickup.min_ns(), pickup.max_ns, pickup.sum_ns),
        (0, 2 * STEP, 3 * STEP)
    );
    assert_eq!(
        pickup.buckets[0], 1,
        "the first WQE is picked up at the doorbell"
    );
    let place = s.stage(Stage::Place);
    assert_eq!((place.count, place.min_ns(), place.max_ns), (3, STEP, STEP));
    let cqe = s.stage(Stage::Complete);
    assert_eq!(
        (cqe.count, cqe.sum_ns),
        (1, STEP),
        "only the signaled WQE has a CQE"
    );
    let irq = s.stage(Stage::Interrupt);
    assert_eq!((irq.count, irq.sum_ns), (1, STEP));
    assert_eq!(
        s.doorbells, 1,
        "one SQ doorbell (CQ doorbells are the CQ's)"
    );

    // Profiling off: counters go on, the clock is never read, the histograms stay.
    p.net.with_device(dev_a, |d| d.set_profiling(false));
    p.post_a(&batch);
    assert_eq!(p.sends_a().len(), 1);
    assert_eq!(clock.reads(), 6, "no clock read while profiling is off");
    let off = stats(&mut p.net, dev_a, p.qa.handle);
    assert_eq!(off.stages, s.stages);
    assert_eq!(off.wqes_completed, 6);
    assert_eq!(off.bytes_sent, 6 * 64);

    // The receiving side counts what arrived, and times nothing.
    let b = stats(&mut p.net, dev_b, p.qb.handle);
    assert_eq!((b.wqes_posted, b.wqes_completed), (6, 6));
    assert_eq!(b.bytes_received, 6 * 64);
    assert!(b.stages.iter().all(|h| h.count == 0));

    // Sampling: one pass in three is timed, from the next one; counters still count all.
    p.net.with_device(dev_a, |d| {
        d.set_profiling(true);
        d.set_profile_sampling(3);
    });
    for round in 0..6 {
        for i in 0..3 {
            p.recv_b(100 + round * 3 + i, &[dst.sge(0, 64)]);
        }
        p.post_a(&batch);
        assert_eq!(p.sends_a().len(), 1);
    }
    // Passes 1 and 4 are timed: the doorbell, 3 placed, the CQE (the CQ is not armed).
    assert_eq!(clock.reads(), 6 + 2 * 5);
    let sampled = stats(&mut p.net, dev_a, p.qa.handle);
    assert_eq!(sampled.stage(Stage::Place).count, 3 + 2 * 3);
    assert_eq!(sampled.stage(Stage::Complete).count, 1 + 2);
    assert_eq!(sampled.wqes_completed, 6 + 18);
    assert_eq!(sampled.doorbells, 1 + 1 + 6);
}

fn counters_count_bytes_errors_and_rnr_stalls<B: Bus>(net: Net<B>)
where
    Net<B>: Devices,
{
    let mut p = Pair::rc(net, QpOpts::default());
    let (dev_a, dev_b) = (p.a.dev(), p.b.dev());
    let src = p.net.mr(&p.a, 4096, access::LOCAL_WRITE);
    let dst = p.net.mr(
        &p.b,
        4096,
        access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
    );
    // A SEND with no receive posted stalls (RNR), then goes once one is posted.
    p.post_a(&[Wr::new(1, wr_opcode::SEND, &[src.sge(0, 100)]).flags(send_flags::SIGNALED)]);
    assert_eq!(p.sends_a(), []);
    assert_eq!(stats(&mut p.net, dev_a, p.qa.handle).rnr_stalls, 1);
    p.recv_b(9, &[dst.sge(0, 128)]);
    assert_eq!(p.sends_a().len(), 1);
    // An RDMA WRITE and an RDMA READ.
    p.post_a(&[
        Wr::new(2, wr_opcode::RDMA_WRITE, &[src.sge(0, 1000)]).rdma(dst.at(0), dst.rkey()),
        Wr::new(3, wr_opcode::RDMA_READ, &[src.sge(1000, 500)]).rdma(dst.at(0), dst.rkey()),
    ]);
    let a = stats(&mut p.net, dev_a, p.qa.handle);
    assert_eq!(a.bytes_sent, 100 + 1000);
    assert_eq!(a.bytes_received, 500);
    assert_eq!(
        (a.wqes_posted, a.wqes_completed, a.completion_errors),
        (3, 3, 0)
    );
    let b = stats(&mut p.net, dev_b, p.qb.handle);
    assert_eq!(b.bytes_received, 100 + 1000);
    assert_eq!(b.bytes_sent, 500);
    // A bad key fails the WQE; the QP goes to the error state and flushes the rest.
    p.post_a(&[
        Wr::new(4, wr_opcode::RDMA_WRITE, &[src.sge(0, 8)]).rdma(dst.at(0), dst.rkey() ^ 0x100),
        Wr::new(5, wr_opcode::SEND, &[src.sge(0, 8)]),
    ]);
    assert_eq!(p.state_a(), qp_state::ERR);
    let a = stats(&mut p.net, dev_a, p.qa.handle);
    assert_eq!(a.completion_errors, 2, "the failure and the flush");
    assert_eq!((a.wqes_posted, a.wqes_completed), (5, 3));
    assert!(a.doorbells >= 3);
}
