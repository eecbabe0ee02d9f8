//! One guest cannot stall another device of the same server process: while one guest makes
//! the server do a lot of work for it, a bystander guest on a third device of the same
//! process keeps getting its reads answered within [`THRESHOLD`].
//!
//! * A doorbell that copies 4 GiB: one SQ doorbell on device A rings 64 RDMA WRITEs of
//!   64 MiB each into an MR of device B.
//! * Sixty-four queues parked in RNR: 64 SENDs of A wait for receives B has not posted (RNR,
//!   `rnr_retry` 7), while receives posted and consumed on another QP pair keep making the
//!   server retry them.
//!
//! (The third stall, a blocking MSI-X eventfd, is in `hostile_clients.rs`.)
//!
//! Everything runs against the real `vfio-user-pvrdma` process over its sockets, the guests
//! played by the host-side test driver ([`SocketBus`]). The bystander, device C, reads its
//! VERSION register (BAR1, answered by the device model) and its vendor ID (configuration
//! space) in a loop on a thread of its own; the samples that overlap the other guest's work
//! are the ones that count, and the worst of them must stay under [`THRESHOLD`].
//!
//! A small VM's scheduler alone delays a read by a few milliseconds now and then (reads no
//! lock can delay peak at 3–8 ms on an idle 2-core VM). So a measurement whose worst read is
//! over the threshold is repeated, up to [`ATTEMPTS`] times in all, and the test fails only
//! if every attempt saw a read that slow: a device really stalled by another guest's work is
//! stalled every time. The tests of this file run one at a time, for the same reason. A
//! machine busy with other work the whole time (another test suite on both cores) can still
//! fail them; the failure then says that the config reads, which no device lock delays, were
//! slow too.

mod driver;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use driver::bus::{BAR_REGS, Bus};
use driver::memory::{self, GuestMemory};
use driver::queues::rdma_wqe;
use driver::socket_bus::{QUIET_LOG, SocketBus, SocketServer};
use driver::verbs::{self, QpSpec, RC_INIT_MASK, RC_RTR_MASK, RC_RTS_MASK, ipv4_gid};
use driver::{Cq, Driver, Mr, Qp, QpSizes, Uc};
use vfio_user_pvrdma::abi::{
    Cqe, GID_TYPE_ROCE_V1, PAGE_SIZE, QpAttr, Sge, access, qp_type, regs, send_flags, uar,
    wc_opcode, wc_status, wr_opcode,
};
use vfio_user_pvrdma::pci::ids;
use vfio_user_pvrdma::pvrdma::caps::DEVICE_VERSION;

type D = Driver<SocketBus>;

const MIB: u64 = 1 << 20;

/// The longest a bystander's read may take while another guest keeps the server busy: a
/// vCPU stalled that long on an MMIO read is a visible hiccup in the guest.
const THRESHOLD: Duration = Duration::from_millis(10);

/// Measurements per test at most (see the module docs).
const ATTEMPTS: usize = 3;

/// Bystander reads before measuring starts (a fresh connection's first accesses), not
/// counted.
const WARMUP: usize = 10;

/// The bystander's pause between two samples: it reads every millisecond or so, so any
/// stall longer than [`THRESHOLD`] is seen, and leaves the CPU to the server in between.
const PAUSE: Duration = Duration::from_millis(1);

/// Serialises the tests of this file (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------------------

/// One guest's port: a bound GID, a user context, a PD and one CQ for both queues.
struct Port {
    gid: [u8; 16],
    uc: Uc,
    pd: u32,
    cq: Cq,
}

fn port(d: &mut D, ip: [u8; 4], cqe: u32) -> Port {
    let gid = ipv4_gid(ip);
    d.create_bind(0, gid, GID_TYPE_ROCE_V1)
        .expect("CREATE_BIND");
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    let cq = d.create_cq_on(uc, cqe).expect("CREATE_CQ");
    Port { gid, uc, pd, cq }
}

fn rc_qp(d: &mut D, port: &Port, sizes: QpSizes) -> Qp {
    d.create_qp_with(QpSpec::user(
        qp_type::RC,
        port.uc,
        port.pd,
        port.cq.handle,
        sizes,
    ))
    .expect("CREATE_QP")
}

/// RESET → INIT (remote writes allowed) → RTR → RTS with `ibv_rc_pingpong`'s masks; RTS
/// sets `rnr_retry` 7, "retry forever".
fn connect(d: &mut D, qp: &Qp, peer_gid: [u8; 16], peer_qpn: u32) {
    let init = QpAttr {
        qp_access_flags: access::REMOTE_WRITE,
        ..verbs::rc_init_attrs()
    };
    d.modify_qp(qp.handle, RC_INIT_MASK, &init)
        .expect("MODIFY_QP to INIT");
    let rtr = verbs::rc_rtr_attrs(peer_qpn, 0x1234, peer_gid, 0);
    d.modify_qp(qp.handle, RC_RTR_MASK, &rtr)
        .expect("MODIFY_QP to RTR");
    let rts = verbs::rc_rts_attrs(0x5678);
    assert_eq!(rts.rnr_retry, 7);
    d.modify_qp(qp.handle, RC_RTS_MASK, &rts)
        .expect("MODIFY_QP to RTS");
}

fn sge(mr: &Mr, va: u64, length: u32) -> Sge {
    Sge {
        addr: va,
        length,
        lkey: mr.lkey,
    }
}

/// Page `index` of the pattern the sources hold: differs from page to page, so a page
/// copied to the wrong place shows.
fn pattern_page(index: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ (index as u8).wrapping_mul(7) ^ (index >> 8) as u8)
        .collect()
}

/// Writes `page(i)` into page `i` of the MR's buffer (user address `va`, `len` bytes).
fn fill_pages(d: &D, mr: &Mr, va: u64, len: u64, page: impl Fn(u64) -> Vec<u8>) {
    let buffer = mr.buffer.as_ref().expect("a user MR");
    for index in 0..len / PAGE_SIZE {
        let at = buffer.translate(va + index * PAGE_SIZE);
        memory::write_bytes(d.ram(), at, &page(index));
    }
}

/// The first page of the MR's buffer that does not hold the pattern, if any.
fn first_wrong_page(d: &D, mr: &Mr, va: u64, len: u64) -> Option<u64> {
    let buffer = mr.buffer.as_ref().expect("a user MR");
    let mut page_bytes = vec![0u8; PAGE_SIZE as usize];
    (0..len / PAGE_SIZE).find(|&page| {
        let at = buffer.translate(va + page * PAGE_SIZE);
        memory::read_bytes(d.ram(), at, &mut page_bytes);
        page_bytes != pattern_page(page)
    })
}

/// `(wr_id, opcode, status, byte_len)` of each CQE.
fn summary(cqes: &[Cqe]) -> Vec<(u64, u32, u32, u32)> {
    cqes.iter()
        .map(|c| (c.wr_id, c.opcode, c.status, c.byte_len))
        .collect()
}

/// How long a completion the device owes may take to show up.
const CQE_WAIT: Duration = Duration::from_secs(10);

/// `count` CQEs of `cq`, polled from guest memory (no message to the device): a server may
/// finish a doorbell's work after the doorbell's reply.
fn wait_cqes(d: &mut D, cq: &Cq, count: usize, what: &str) -> Vec<Cqe> {
    let started = Instant::now();
    let mut cqes = d.drain_cq(cq);
    while cqes.len() < count {
        assert!(
            started.elapsed() < CQE_WAIT,
            "{what}: {} of {count} completions within {CQE_WAIT:?}: {:?}",
            cqes.len(),
            summary(&cqes)
        );
        thread::sleep(Duration::from_micros(50));
        cqes.extend(d.drain_cq(cq));
    }
    cqes
}

// ---------------------------------------------------------------------------------------
// The bystander
// ---------------------------------------------------------------------------------------

/// One bystander sample: a register read and a configuration space read, timed apart.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    register: Duration,
    config: Duration,
}

impl Sample {
    fn end(&self) -> Instant {
        self.start + self.register + self.config
    }
}

/// One sample on device C: its VERSION register, then its vendor ID, each checked.
fn sample(c: &mut D) -> Sample {
    let start = Instant::now();
    let version = c.bus.read32(BAR_REGS, regs::VERSION);
    let register = start.elapsed();
    let at = Instant::now();
    let vendor = c.bus.config_read16(0);
    let config = at.elapsed();
    assert_eq!(version, DEVICE_VERSION, "device C's VERSION register");
    assert_eq!(vendor, ids::VENDOR_ID, "device C's vendor ID");
    Sample {
        start,
        register,
        config,
    }
}

/// Samples device C until `stop`: [`WARMUP`] reads first, then `ready` is passed and every
/// sample recorded.
fn bystander(c: &mut D, ready: &Barrier, stop: &AtomicBool) -> Vec<Sample> {
    for _ in 0..WARMUP {
        sample(c);
    }
    ready.wait();
    let mut samples = Vec::with_capacity(1 << 12);
    while !stop.load(Ordering::Acquire) {
        samples.push(sample(c));
        thread::sleep(PAUSE);
    }
    samples
}

/// What the bystander saw.
#[derive(Debug, Clone, Copy)]
struct Figures {
    samples: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    config_p50: Duration,
    config_max: Duration,
}

impl Figures {
    /// The worst read of either kind.
    fn worst(&self) -> Duration {
        self.max.max(self.config_max)
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} samples; register read p50 {:?}, p99 {:?}, max {:?}; config read p50 {:?}, \
             max {:?}",
            self.samples, self.p50, self.p99, self.max, self.config_p50, self.config_max
        )
    }
}

fn figures(samples: &[Sample]) -> Figures {
    let sorted = |pick: fn(&Sample) -> Duration| -> Vec<Duration> {
        let mut times: Vec<Duration> = samples.iter().map(pick).collect();
        times.sort();
        times
    };
    let at = |times: &[Duration], q: f64| -> Duration {
        if times.is_empty() {
            return Duration::ZERO;
        }
        times[((times.len() - 1) as f64 * q).round() as usize]
    };
    let register = sorted(|s| s.register);
    let config = sorted(|s| s.config);
    Figures {
        samples: samples.len(),
        p50: at(&register, 0.5),
        p99: at(&register, 0.99),
        max: at(&register, 1.0),
        config_p50: at(&config, 0.5),
        config_max: at(&config, 1.0),
    }
}

/// The figures of the samples that overlap `[from, to]` (a read that started before the
/// window and was still waiting in it counts).
fn during(samples: &[Sample], from: Instant, to: Instant) -> Figures {
    let inside: Vec<Sample> = samples
        .iter()
        .filter(|s| s.start <= to && s.end() >= from)
        .copied()
        .collect();
    figures(&inside)
}

/// The bystander's figures with nothing else going on: [`WARMUP`] reads, then 100.
fn at_rest(c: &mut D) -> Figures {
    for _ in 0..WARMUP {
        sample(c);
    }
    let samples: Vec<Sample> = (0..100)
        .map(|_| {
            let s = sample(c);
            thread::sleep(PAUSE);
            s
        })
        .collect();
    figures(&samples)
}

/// Runs `work` while device C's bystander samples on a thread of its own; returns what
/// `work` returned and every sample taken. Sampling starts before `work` and stops after
/// it.
fn with_bystander<R>(c: &mut D, work: impl FnOnce() -> R) -> (R, Vec<Sample>) {
    /// Stops the sampler even if `work` panics, so the scope can end.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let ready = Barrier::new(2);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let sampler = s.spawn(|| bystander(c, &ready, &stop));
        ready.wait();
        let guard = StopOnDrop(&stop);
        let result = work();
        drop(guard);
        let samples = sampler.join().expect("the bystander thread panicked");
        (result, samples)
    })
}

/// One measurement: the other guest's work and what the bystander saw, at rest just before
/// and during the work.
struct Attempt {
    /// What the work did, for the report.
    work: String,
    /// How long it took.
    took: Duration,
    rest: Figures,
    during: Figures,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n    bystander at rest: {}\n    bystander meanwhile: {}",
            self.work, self.rest, self.during
        )
    }
}

/// Measures with `measure` until the bystander's worst read stays under [`THRESHOLD`], at
/// most [`ATTEMPTS`] times; panics if it never did, with every attempt's figures and
/// `stalled` saying what the bystander waited for. Returns the passing attempt.
fn measure_until_answered(
    test: &str,
    stalled: &str,
    mut measure: impl FnMut() -> Attempt,
) -> Attempt {
    let mut failed = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let result = measure();
        println!("{test}, attempt {attempt}: {result}");
        if result.during.worst() < THRESHOLD {
            return result;
        }
        failed.push(result);
    }
    let report: Vec<String> = failed
        .iter()
        .map(|a| {
            // The socket thread answers config reads from the function's own config space:
            // slow ones mean a busy machine rather than a device waiting for another.
            let busy = if a.during.config_max >= THRESHOLD {
                "; config reads were slow too: a busy machine?"
            } else {
                ""
            };
            format!(
                "worst register read {:?} (median {:?}, at rest {:?}), worst config read {:?}, \
                 over {} samples in {:?}{busy}",
                a.during.max,
                a.during.p50,
                a.rest.p50,
                a.during.config_max,
                a.during.samples,
                a.took
            )
        })
        .collect();
    panic!(
        "device C's reads waited for {stalled} in all {ATTEMPTS} attempts (the limit is \
         {THRESHOLD:?}):\n  {}",
        report.join("\n  ")
    );
}

/// The bystander kept reading throughout the work: a sample at least every 20 ms.
fn assert_overlapped(attempt: &Attempt) {
    let at_least = (attempt.took.as_millis() / 20).max(5) as usize;
    assert!(
        attempt.during.samples >= at_least,
        "only {} bystander samples in the {:?} of the work (expected {at_least})",
        attempt.during.samples,
        attempt.took
    );
}

// ---------------------------------------------------------------------------------------
// (1) A doorbell that copies 4 GiB
// ---------------------------------------------------------------------------------------

/// RDMA WRITEs behind the one doorbell, each of [`WRITE_LEN`] bytes.
const WRITES: u64 = 64;
/// Each WRITE copies the whole source buffer onto the whole target MR: 64 × 64 MiB = 4 GiB.
const WRITE_LEN: u64 = 64 * MIB;
/// RAM of A and B: the 64 MiB buffer and room for the rings and page tables.
const COPY_RAM: u64 = 128 * MIB;
/// User address of the buffers on both sides.
const COPY_VA: u64 = 0x7f10_0000_0000;
/// The copy must last at least this long for the window to say anything.
const MIN_COPY: Duration = Duration::from_millis(100);
/// Longest the copy may take before the test gives up.
const COPY_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn a_doorbell_that_copies_4_gib_leaves_other_devices_answering() {
    let _serial = serial();
    let server = SocketServer::start_logging(3, QUIET_LOG);
    // A server that serialises its devices holds C's read for the whole copy: the
    // watchdog must not kill it for that, the assertion reports it.
    server.set_call_timeout(COPY_DEADLINE + Duration::from_secs(10));
    let base = memory::DEFAULT_BASE;
    let ram = || GuestMemory::new(base, COPY_RAM);
    let mut a = Driver::new(SocketBus::connect(&server, 0, ram()));
    let mut b = Driver::new(SocketBus::connect(&server, 1, ram()));
    let mut c = Driver::on_socket(&server, 2);
    a.probe();
    b.probe();
    c.probe();

    let sizes = QpSizes {
        max_send_wr: 128,
        max_recv_wr: 8,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let pa = port(&mut a, [10, 0, 0, 1], 256);
    let pb = port(&mut b, [10, 0, 0, 2], 256);
    let qa = rc_qp(&mut a, &pa, sizes);
    let qb = rc_qp(&mut b, &pb, sizes);
    connect(&mut a, &qa, pb.gid, qb.qpn);
    connect(&mut b, &qb, pa.gid, qa.qpn);
    let source = a
        .reg_user_mr(pa.pd, COPY_VA, WRITE_LEN, access::LOCAL_WRITE)
        .expect("CREATE_MR of A's 64 MiB source");
    let target = b
        .reg_user_mr(
            pb.pd,
            COPY_VA,
            WRITE_LEN,
            access::LOCAL_WRITE | access::REMOTE_WRITE,
        )
        .expect("CREATE_MR of B's 64 MiB target");
    fill_pages(&a, &source, COPY_VA, WRITE_LEN, pattern_page);
    let length = u32::try_from(WRITE_LEN).expect("an SGE length");

    let passed = measure_until_answered("4 GiB in one doorbell", "device A's copy", || {
        fill_pages(&b, &target, COPY_VA, WRITE_LEN, |_| {
            vec![0; PAGE_SIZE as usize]
        });
        // 64 signaled RDMA WRITEs of the whole source onto the whole target, one doorbell.
        for i in 0..WRITES {
            let wqe = rdma_wqe(
                i,
                wr_opcode::RDMA_WRITE,
                send_flags::SIGNALED,
                &[sge(&source, COPY_VA, length)],
                COPY_VA,
                target.rkey,
            );
            a.post_send_raw(&qa, &wqe).expect("room in the SQ");
        }
        let rest = at_rest(&mut c);
        let ((started, finished, cqes), samples) = with_bystander(&mut c, || {
            let started = Instant::now();
            a.ring_qp(&qa, uar::QP_SEND);
            // A's completions, read from A's memory: no message on A's socket meanwhile.
            let mut cqes = Vec::new();
            loop {
                cqes.extend(a.drain_cq(&pa.cq));
                if cqes.len() as u64 >= WRITES {
                    break;
                }
                assert!(
                    started.elapsed() < COPY_DEADLINE,
                    "{} of {WRITES} WRITEs completed within {COPY_DEADLINE:?}",
                    cqes.len()
                );
                thread::sleep(Duration::from_millis(1));
            }
            (started, Instant::now(), cqes)
        });

        // The copy really happened: 64 successful WRITEs of 64 MiB, the bytes in B's MR.
        let expected: Vec<_> = (0..WRITES)
            .map(|i| (i, wc_opcode::RDMA_WRITE, wc_status::SUCCESS, length))
            .collect();
        assert_eq!(summary(&cqes), expected, "A's completions");
        let copied: u64 = cqes.iter().map(|c| u64::from(c.byte_len)).sum();
        assert_eq!(copied, 4 << 30, "bytes written");
        assert_eq!(
            first_wrong_page(&b, &target, COPY_VA, WRITE_LEN),
            None,
            "B's MR holds A's buffer"
        );
        let took = finished - started;
        assert!(
            took >= MIN_COPY,
            "the copy took only {took:?}: too short a window to measure in"
        );
        Attempt {
            work: format!(
                "{WRITES} RDMA WRITEs of {} MiB copied in {took:?} ({:.2} GB/s)",
                WRITE_LEN / MIB,
                copied as f64 / took.as_secs_f64() / 1e9
            ),
            took,
            rest,
            during: during(&samples, started, finished),
        }
    });
    assert_overlapped(&passed);
}

// ---------------------------------------------------------------------------------------
// (2) Sixty-four queues parked in RNR
// ---------------------------------------------------------------------------------------

/// QP pairs whose SENDs wait for a receive.
const PARKED: usize = 64;
/// Each parked SEND: 1 MiB (256 pages to translate every time the queue is retried).
const PARKED_LEN: u64 = MIB;
/// User address of the buffers on both sides.
const PARKED_VA: u64 = 0x7f20_0000_0000;
/// How long receives keep being posted and consumed next to the parked queues …
const WAKING: Duration = Duration::from_secs(2);
/// … and at least how many rounds.
const MIN_ROUNDS: u64 = 50;
/// The waking pair's SENDs.
const WAKE_LEN: u32 = 64;

#[test]
fn sixty_four_queues_parked_in_rnr_leave_other_devices_answering() {
    let _serial = serial();
    let server = SocketServer::start_logging(3, QUIET_LOG);
    let mut a = Driver::on_socket(&server, 0);
    let mut b = Driver::on_socket(&server, 1);
    let mut c = Driver::on_socket(&server, 2);
    a.probe();
    b.probe();
    c.probe();

    let sizes = QpSizes {
        max_send_wr: 4,
        max_recv_wr: 4,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let pa = port(&mut a, [10, 0, 0, 1], 512);
    let pb = port(&mut b, [10, 0, 0, 2], 512);
    // PARKED pairs, then the pair that wakes them.
    let qa: Vec<Qp> = (0..=PARKED).map(|_| rc_qp(&mut a, &pa, sizes)).collect();
    let qb: Vec<Qp> = (0..=PARKED).map(|_| rc_qp(&mut b, &pb, sizes)).collect();
    for (x, y) in qa.iter().zip(&qb) {
        connect(&mut a, x, pb.gid, y.qpn);
        connect(&mut b, y, pa.gid, x.qpn);
    }
    let (parked_a, parked_b) = (&qa[..PARKED], &qb[..PARKED]);
    let (waker_a, waker_b) = (&qa[PARKED], &qb[PARKED]);
    let source = a
        .reg_user_mr(pa.pd, PARKED_VA, PARKED_LEN, access::LOCAL_WRITE)
        .expect("CREATE_MR of A's source");
    let target = b
        .reg_user_mr(pb.pd, PARKED_VA, PARKED_LEN, access::LOCAL_WRITE)
        .expect("CREATE_MR of B's receive buffer");
    fill_pages(&a, &source, PARKED_VA, PARKED_LEN, pattern_page);
    let length = u32::try_from(PARKED_LEN).expect("an SGE length");

    // One SEND on each parked QP; B has no receive posted on any of them.
    for (i, qp) in (0u64..).zip(parked_a) {
        a.post_send(
            qp,
            i,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(&source, PARKED_VA, length)],
        )
        .expect("room in the SQ");
    }
    let still_parked = |a: &mut D, b: &mut D, when: &str| {
        assert_eq!(summary(&a.drain_cq(&pa.cq)), [], "A's completions {when}");
        assert_eq!(summary(&b.drain_cq(&pb.cq)), [], "B's completions {when}");
        for (i, qp) in parked_a.iter().enumerate() {
            assert_eq!(
                a.sq_indices(qp),
                (1, 0),
                "QP {i}'s SEND waits at the head of its SQ {when}"
            );
        }
    };
    still_parked(&mut a, &mut b, "after posting");

    // Receives posted on B and consumed by SENDs of A on the waking pair, back to back:
    // every receive is something a parked sender may have waited for, so the server
    // retries the 64 parked queues each time.
    let mut round = 0u64;
    let test = format!("{PARKED} queues parked in RNR");
    let passed = measure_until_answered(&test, "the retries of the parked queues", || {
        let rest = at_rest(&mut c);
        let ((rounds, started, finished), samples) = with_bystander(&mut c, || {
            let started = Instant::now();
            let first = round;
            while round - first < MIN_ROUNDS || started.elapsed() < WAKING {
                let id = 10_000 + round;
                b.post_recv(waker_b, id, &[sge(&target, PARKED_VA, WAKE_LEN)])
                    .expect("room in the waking RQ");
                a.post_send(
                    waker_a,
                    id,
                    wr_opcode::SEND,
                    send_flags::SIGNALED,
                    &[sge(&source, PARKED_VA, WAKE_LEN)],
                )
                .expect("room in the waking SQ");
                let what = format!("round {round}");
                assert_eq!(
                    summary(&wait_cqes(&mut a, &pa.cq, 1, &what)),
                    [(id, wc_opcode::SEND, wc_status::SUCCESS, WAKE_LEN)],
                    "round {round}: only the waking SEND completes on A"
                );
                assert_eq!(
                    summary(&wait_cqes(&mut b, &pb.cq, 1, &what)),
                    [(id, wc_opcode::RECV, wc_status::SUCCESS, WAKE_LEN)],
                    "round {round}: only the waking receive completes on B"
                );
                round += 1;
            }
            (round - first, started, Instant::now())
        });
        still_parked(&mut a, &mut b, "after the waking rounds");
        let took = finished - started;
        Attempt {
            work: format!(
                "{rounds} waking rounds in {took:?} ({:.0}/s)",
                rounds as f64 / took.as_secs_f64()
            ),
            took,
            rest,
            during: during(&samples, started, finished),
        }
    });
    assert_overlapped(&passed);

    // B posts the receives: every parked SEND goes, and all of them succeed.
    for (i, qp) in (0u64..).zip(parked_b) {
        b.post_recv(qp, 1000 + i, &[sge(&target, PARKED_VA, length)])
            .expect("room in the RQ");
    }
    let mut sent = summary(&wait_cqes(&mut a, &pa.cq, PARKED, "the parked SENDs"));
    sent.sort();
    let expected: Vec<_> = (0..PARKED as u64)
        .map(|i| (i, wc_opcode::SEND, wc_status::SUCCESS, length))
        .collect();
    assert_eq!(
        sent, expected,
        "the parked SENDs complete once B posts receives"
    );
    let mut received = summary(&wait_cqes(&mut b, &pb.cq, PARKED, "B's receives"));
    received.sort();
    let expected: Vec<_> = (0..PARKED as u64)
        .map(|i| (1000 + i, wc_opcode::RECV, wc_status::SUCCESS, length))
        .collect();
    assert_eq!(received, expected, "B's receives");
    for (i, qp) in parked_a.iter().enumerate() {
        assert_eq!(a.sq_indices(qp), (1, 1), "QP {i}'s SQ is empty");
    }
    assert_eq!(
        first_wrong_page(&b, &target, PARKED_VA, PARKED_LEN),
        None,
        "B's buffer holds A's message"
    );
}
