//! One benchmark run: the raw baselines first, then the server and its two guests.

use std::path::Path;
use std::time::{Duration, Instant};

use vfio_user_pvrdma::profiler::control;

use crate::baseline;
use crate::guests::{self, Buffer, Fabric, Mode};
use crate::report::{Baselines, Dist, Results};

/// How long and how often each figure is measured.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// A short run: rougher figures.
    pub quick: bool,
    /// Unrecorded round trips before each latency measurement.
    pub warmup: usize,
    /// Recorded RC SEND round trips (and empty doorbells, and raw UNIX round trips).
    pub round_trips: usize,
    /// Recorded cache-line round trips.
    pub cacheline_round_trips: usize,
    /// memcpy: runs per size (the median is reported) and the length of each.
    pub memcpy_runs: usize,
    pub memcpy_run: Duration,
    /// RDMA WRITE bandwidth: time per size (split into [`RUNS`] runs).
    pub write_time: Duration,
    /// 64-byte message rate: time (split into [`RUNS`] runs).
    pub rate_time: Duration,
    /// QPs timed from CREATE_QP to RTS.
    pub qps: usize,
    /// Size of the big MR (1 GiB unless a test shrinks it).
    pub big_mr: u64,
    /// Idle time over which the server's CPU use is measured.
    pub idle_time: Duration,
    /// The doorbell modes to run the server in, one after the other.
    pub modes: &'static [Mode],
}

/// Both doorbell modes, trapped (the server's default) first.
pub const BOTH_MODES: &[Mode] = &[Mode::Trapped, Mode::ExitFree];

impl Config {
    /// The full run (about 15 s on two cores), or with `quick` a short one for smoke tests
    /// (a few seconds; the figures are rougher).
    pub fn new(quick: bool) -> Config {
        if quick {
            Config {
                quick,
                warmup: 200,
                round_trips: 2_000,
                cacheline_round_trips: 20_000,
                memcpy_runs: 3,
                memcpy_run: Duration::from_millis(20),
                write_time: Duration::from_millis(100),
                rate_time: Duration::from_millis(100),
                qps: 20,
                big_mr: 1 << 30,
                idle_time: Duration::from_millis(500),
                modes: BOTH_MODES,
            }
        } else {
            Config {
                quick,
                warmup: 2_000,
                round_trips: 30_000,
                cacheline_round_trips: 200_000,
                memcpy_runs: 7,
                memcpy_run: Duration::from_millis(60),
                write_time: Duration::from_millis(700),
                rate_time: Duration::from_millis(700),
                qps: 100,
                big_mr: 1 << 30,
                idle_time: Duration::from_secs(3),
                modes: BOTH_MODES,
            }
        }
    }
}

/// The transfer sizes of the bandwidth figures, and the WQEs posted per doorbell for each.
pub const WRITE_SIZES: [(usize, u32); 3] = [(4 << 10, 32), (64 << 10, 16), (1 << 20, 4)];
/// 64-byte SENDs per doorbell for the message rate.
pub const SEND_BATCH: u32 = 32;

/// Throughput figures are the median of this many runs (the VM's noise is bursty).
const RUNS: usize = 5;

/// Pairs of back-to-back message-rate runs (profiler on, profiler off), each a tenth of
/// the message-rate time: the profiler's cost is the median of the pairs' ratios, which
/// cancels the slow drift of a shared machine.
const PROFILER_PAIRS: usize = 21;

/// If set, the benchmark writes the SVG histogram of guest A's QP (device 0) there after
/// the profiler runs, and prints the stats table on stderr (docs/profiler-example.svg is
/// made this way).
pub const SVG_ENV: &str = "PVRDMA_BENCH_PROFILER_SVG";

/// Switches the server's stage timing through its control socket.
fn set_profiling(control_path: &Path, on: bool) {
    let request = if on { "profile on" } else { "profile off" };
    let answer = control::request(control_path, request, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("control socket {}: {e}", control_path.display()));
    assert!(answer.starts_with("ok:"), "{request}: {answer}");
}

/// The median of `runs` results of `measure`.
fn median(runs: usize, mut measure: impl FnMut() -> f64) -> f64 {
    let mut results: Vec<f64> = (0..runs).map(|_| measure()).collect();
    results.sort_by(f64::total_cmp);
    results[results.len() / 2]
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, `sysconf(_SC_CLK_TCK)`): 100 on
/// every Linux architecture.
const USER_HZ: f64 = 100.0;

/// A progress line on stderr.
fn step(started: Instant, what: &str) {
    eprintln!("[bench +{:.1}s] {what}", started.elapsed().as_secs_f64());
}

/// Measures the baselines, then runs every measurement once per doorbell mode.
pub fn run(config: &Config) -> Vec<Results> {
    let started = Instant::now();
    let baselines = measure_baselines(config, started);
    config
        .modes
        .iter()
        .map(|&mode| run_mode(config, mode, &baselines, started))
        .collect()
}

/// The raw baselines, once for all modes.
fn measure_baselines(c: &Config, started: Instant) -> Baselines {
    step(
        started,
        "baseline: cache-line ping-pong between two threads",
    );
    let cacheline = Dist::of(baseline::cacheline_rtt(
        c.warmup * 10,
        c.cacheline_round_trips,
    ));
    step(started, "baseline: single-core memcpy");
    let memcpy = WRITE_SIZES
        .map(|(size, _)| baseline::memcpy_gbytes_per_s(size, c.memcpy_runs, c.memcpy_run));
    step(
        started,
        "baseline: UNIX socketpair 64 B ping-pong, threads on one core and on two",
    );
    let unix_same = Dist::of(baseline::unix_rtt(64, 0, c.warmup, c.round_trips));
    let unix_cross = Dist::of(baseline::unix_rtt(64, 1, c.warmup, c.round_trips));
    // The baseline is the faster placement: the best a socket round trip does here.
    let unix = if unix_same.p50 <= unix_cross.p50 {
        unix_same
    } else {
        unix_cross
    };
    Baselines {
        cacheline,
        memcpy,
        unix,
        unix_same,
        unix_cross,
        clock_read_ns: baseline::clock_read_ns(),
    }
}

/// One server in `mode` and its two guests, every figure once.
fn run_mode(c: &Config, mode: Mode, baselines: &Baselines, started: Instant) -> Results {
    let mode_started = Instant::now();
    let step = |what: &str| step(started, &format!("{}: {what}", mode.name()));
    // Exit-free with two CPUs or more: the server's poller gets CPU 1 (`--poller-cpu`) and
    // this thread, which plays the guests, CPU 0, as the baselines pin their threads, so
    // the scheduler cannot put the two busy threads on one core.
    let pinned = mode == Mode::ExitFree && baseline::cpus() >= 2;
    let args: &[&str] = if pinned { &["--poller-cpu", "1"] } else { &[] };
    step("starting the server and two guests");
    let mut fabric = Fabric::start_with(c.big_mr, mode, args);
    if pinned {
        baseline::pin(0);
    }

    step("server CPU use while idle");
    let (ns0, ticks0) = guests::server_cpu(&fabric.server);
    let idle_start = Instant::now();
    std::thread::sleep(c.idle_time);
    let (ns1, ticks1) = guests::server_cpu(&fabric.server);
    let idle_secs = idle_start.elapsed().as_secs_f64();
    let idle_cpu_percent = (ticks1 - ticks0) as f64 / USER_HZ / idle_secs * 100.0;
    let idle_cpu_percent_schedstat = (ns1 - ns0) as f64 / 1e9 / idle_secs * 100.0;

    let doorbell = (mode == Mode::Trapped).then(|| {
        step("trapped doorbell round trip (empty SQ)");
        Dist::of(fabric.empty_doorbell(c.warmup, c.round_trips))
    });
    // Exit-free, the server's poller is a busy thread: with fewer than three CPUs one thread
    // plays both guests (see `rc_send_pingpong`).
    let rc_threads = match mode {
        Mode::ExitFree if baseline::cpus() < 3 => 1,
        _ => 2,
    };
    step(&format!(
        "RC SEND 64 B ping-pong between the guests ({rc_threads} guest thread{})",
        if rc_threads == 1 { "" } else { "s" }
    ));
    let rc_send = Dist::of(fabric.rc_send_pingpong(c.warmup, c.round_trips, rc_threads));
    step("64 B SEND message rate");
    fabric.send_rate(SEND_BATCH, c.rate_time / 10);
    let msg_rate = median(RUNS, || {
        fabric.send_rate(SEND_BATCH, c.rate_time / RUNS as u32)
    });
    step("64 B SEND message rate with the profiler's timing on and off");
    let control_path = fabric.server.control().to_path_buf();
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PROFILER_PAIRS {
        // Alternate the order so that drift favours neither.
        let mut rates = [0.0; 2];
        for profiling in [pair % 2 == 0, pair % 2 != 0] {
            set_profiling(&control_path, profiling);
            rates[usize::from(profiling)] = fabric.send_rate(SEND_BATCH, c.rate_time / 10);
        }
        off.push(rates[0]);
        on.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    let median_of = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (msg_rate_profiler_on, msg_rate_profiler_off) = (median_of(&mut on), median_of(&mut off));
    let profiler_cost_percent = (1.0 - median_of(&mut ratios)) * 100.0;
    if let Some(path) = std::env::var_os(SVG_ENV) {
        set_profiling(&control_path, true);
        // The table goes to stderr with the progress lines.
        match control::request(&control_path, "stats", Duration::from_secs(10)) {
            Ok(table) => eprint!("{table}"),
            Err(e) => eprintln!("stats: {e}"),
        }
        let request = format!("svg 0 {}", fabric.a.qp.qpn);
        match control::request(&control_path, &request, Duration::from_secs(10)) {
            Ok(svg) if svg.starts_with("<svg") => match std::fs::write(&path, svg) {
                Ok(()) => step(&format!("wrote {}", Path::new(&path).display())),
                Err(e) => eprintln!("cannot write {}: {e}", Path::new(&path).display()),
            },
            Ok(answer) => eprintln!("{request}: {answer}"),
            Err(e) => eprintln!("{request}: {e}"),
        }
    }
    // The server's default.
    set_profiling(&control_path, false);
    step("RDMA WRITE bandwidth");
    let mut write_gbytes = |buffer: Buffer| {
        WRITE_SIZES.map(|(size, batch)| {
            fabric.write_bandwidth(size as u32, batch, c.write_time / 10, buffer);
            median(RUNS, || {
                fabric.write_bandwidth(size as u32, batch, c.write_time / RUNS as u32, buffer) / 1e9
            })
        })
    };
    let write = write_gbytes(Buffer::Scattered);
    step("RDMA WRITE bandwidth, physically contiguous buffers");
    let write_contiguous = write_gbytes(Buffer::Contiguous);
    step("one command (QUERY_PORT)");
    let command = Dist::of(fabric.query_port_commands(c.qps / 10, c.qps));
    step("QP create to RTS");
    let qp = Dist::of(fabric.qp_create_to_rts(c.qps));
    step("big MR registration");
    let (mr_first, mr_again) = fabric.register_big_mr();
    step("done");
    drop(fabric);
    if pinned {
        baseline::unpin();
    }

    Results {
        mode,
        quick: c.quick,
        rc_send,
        rc_threads,
        doorbell,
        write,
        write_contiguous,
        msg_rate,
        msg_rate_profiler_on,
        msg_rate_profiler_off,
        profiler_cost_percent,
        command,
        qp,
        mr_bytes: c.big_mr,
        mr_first_ns: mr_first,
        mr_again_ns: mr_again,
        idle_cpu_percent,
        idle_cpu_percent_schedstat,
        idle_secs,
        baselines: *baselines,
        seconds: mode_started.elapsed().as_secs_f64(),
    }
}
