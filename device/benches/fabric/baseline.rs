//! The raw baselines every figure is compared with, measured in the same run on the same
//! machine: two threads ping-ponging one shared cache line, single-core memcpy of warm
//! buffers, and a blocking UNIX-socket round trip between two threads (the transport a
//! trapped doorbell rides on).
//!
//! The two-thread baselines pin their threads (never the caller's), so the scheduler cannot
//! decide what is measured: the cache line crosses cores; the socket round trip is measured
//! both with the threads on one core and on two, and the faster is the baseline.

use std::hint::{black_box, spin_loop};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// Pins the calling thread to `cpu` (best effort: without it the figure is merely noisier).
pub fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() {
    let mut set = CpuSet::new();
    for cpu in 0..cpus() {
        let _ = set.set(cpu);
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &set);
}

/// How many CPUs this process may use, as found at the first call (before the benchmark
/// pins any thread of its own: a pinned thread sees one).
pub fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| thread::available_parallelism().map_or(1, usize::from))
}

/// A cache line of its own (128 bytes: adjacent-line prefetch pairs lines).
#[repr(align(128))]
struct Line(AtomicU64);

/// Round-trip times (ns) of `iterations` ping-pongs of one cache line between two spinning
/// threads on CPUs 0 and 1, after `warmup` unrecorded ones. The pinger writes an odd value
/// and spins until the ponger has answered with the next even one.
pub fn cacheline_rtt(warmup: usize, iterations: usize) -> Vec<u64> {
    let line = Line(AtomicU64::new(0));
    let abort = AtomicBool::new(false);
    let total = (warmup + iterations) as u64;
    let cross = cpus() >= 2;
    thread::scope(|s| {
        s.spawn(|| {
            if cross {
                pin(1);
            }
            for i in 0..total {
                if !spin_until(&line.0, 2 * i + 1, &abort) {
                    return;
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
        });
        s.spawn(|| {
            if cross {
                pin(0);
            }
            let mut samples = Vec::with_capacity(iterations);
            for i in 0..total {
                let start = Instant::now();
                line.0.store(2 * i + 1, Ordering::Release);
                if !spin_until(&line.0, 2 * i + 2, &abort) {
                    abort.store(true, Ordering::Relaxed);
                    panic!("the cache-line ponger stopped answering");
                }
                let rtt = start.elapsed();
                if i >= warmup as u64 {
                    samples.push(rtt.as_nanos() as u64);
                }
            }
            samples
        })
        .join()
        .expect("the cache-line pinger")
    })
}

/// Spins until `line` holds `value`; false after 10 s or when `abort` is set.
fn spin_until(line: &AtomicU64, value: u64, abort: &AtomicBool) -> bool {
    let mut spins = 0u32;
    let mut since: Option<Instant> = None;
    while line.load(Ordering::Acquire) != value {
        spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1 << 16) {
            if abort.load(Ordering::Relaxed) {
                return false;
            }
            let started = *since.get_or_insert_with(Instant::now);
            if started.elapsed() > Duration::from_secs(10) {
                return false;
            }
        }
    }
    true
}

/// Single-core memcpy bandwidth (GB/s, 10^9 bytes) for `size`-byte copies between two warm,
/// page-aligned buffers (anonymous mappings, as guest pages are): `runs` runs of at least
/// `per_run` each, the median run. Page alignment keeps the figure steady: heap buffers
/// whose relative alignment changes from run to run made it swing between 31 and 55 GB/s
/// at 64 KiB on this VM.
pub fn memcpy_gbytes_per_s(size: usize, runs: usize, per_run: Duration) -> f64 {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    let map = |fill: u8| {
        let m: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
            .expect("an anonymous mapping for the memcpy baseline");
        m.write_slice(&vec![fill; size], GuestAddress(0))
            .expect("fill the buffer");
        m
    };
    let (src_mem, dst_mem) = (map(0x5a), map(0));
    let src = src_mem
        .get_slice(GuestAddress(0), size)
        .expect("the whole source");
    let dst = dst_mem
        .get_slice(GuestAddress(0), size)
        .expect("the whole target");
    // Warm both buffers. (`copy_to_volatile_slice` is one memcpy, as the server's copy is.)
    for _ in 0..4 {
        black_box(&src).copy_to_volatile_slice(black_box(dst));
    }
    // Copies per clock read: about 1 MiB.
    let chunk = (1 << 20) / size.max(1) + 1;
    let mut rates: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            let mut copies = 0u64;
            loop {
                for _ in 0..chunk {
                    black_box(&src).copy_to_volatile_slice(black_box(dst));
                }
                copies += chunk as u64;
                let elapsed = start.elapsed();
                if elapsed >= per_run {
                    break copies as f64 * size as f64 / elapsed.as_secs_f64() / 1e9;
                }
            }
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Round-trip times (ns) of `size`-byte messages between two threads over a blocking UNIX
/// stream socketpair: write, then block in read for the echo, as a vfio-user client and
/// server do. The pinger runs on CPU 0, the echoing thread on `echo_cpu`.
pub fn unix_rtt(size: usize, echo_cpu: usize, warmup: usize, iterations: usize) -> Vec<u64> {
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    let total = warmup + iterations;
    let echo_cpu = echo_cpu.min(cpus() - 1);
    thread::scope(|s| {
        s.spawn(move || {
            pin(echo_cpu);
            let mut buf = vec![0u8; size];
            for _ in 0..total {
                server.read_exact(&mut buf).expect("echo read");
                server.write_all(&buf).expect("echo write");
            }
        });
        s.spawn(move || {
            pin(0);
            let out = vec![0x5au8; size];
            let mut back = vec![0u8; size];
            let mut samples = Vec::with_capacity(iterations);
            for i in 0..total {
                let start = Instant::now();
                client.write_all(&out).expect("ping write");
                client.read_exact(&mut back).expect("pong read");
                let rtt = start.elapsed();
                if i >= warmup {
                    samples.push(rtt.as_nanos() as u64);
                }
            }
            samples
        })
        .join()
        .expect("the socket pinger")
    })
}

/// One read of the clock the server gives its devices' profilers, in ns (the median of 5
/// runs of 200 000 reads through `dyn Clock`, as the device calls it).
pub fn clock_read_ns() -> f64 {
    use vfio_user_pvrdma::pvrdma::Clock;
    use vfio_user_pvrdma::runtime::fabric::MonotonicClock;
    const READS: u32 = 200_000;
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(MonotonicClock::new());
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut sum = 0u64;
            for _ in 0..READS {
                sum = sum.wrapping_add(black_box(&clock).now_ns());
            }
            black_box(sum);
            start.elapsed().as_nanos() as f64 / f64::from(READS)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}
