//! The results of one run, the targets of issue 5, and the two ways of printing them: a
//! table for people and one JSON object for machines.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::baseline::cpus;
use crate::guests::Mode;
use crate::suite::{SEND_BATCH, WRITE_SIZES};
use vfio_user_pvrdma::pvrdma::DEFAULT_SAMPLE_EVERY;

/// RC 64 B round trip ≤ 2× a raw UNIX-socket round trip (trapped doorbells).
pub const RC_RTT_TO_UNIX_MAX: f64 = 2.0;
/// RC 64 B round trip ≤ 2× the shared-cache-line ping-pong (exit-free doorbells).
pub const RC_RTT_TO_CACHELINE_MAX: f64 = 2.0;
/// RDMA WRITE at 64 KiB ≥ 0.8× single-core memcpy.
pub const WRITE_64K_TO_MEMCPY_MIN: f64 = 0.8;
/// QP create to RTS ≤ 100 µs.
pub const QP_CREATE_TO_RTS_US_MAX: f64 = 100.0;
/// 1 GiB MR registration ≤ 50 ms.
pub const MR_REGISTER_MS_MAX: f64 = 50.0;
/// Idle CPU < 1 % of a core.
pub const IDLE_CPU_PERCENT_MAX: f64 = 1.0;
/// The profiler's stage timing costs ≤ 2 % of the 64 B message rate (issue 5, deliverable 3).
pub const PROFILER_COST_PERCENT_MAX: f64 = 2.0;

/// Percentiles of a set of durations, in µs (nearest rank).
#[derive(Debug, Clone, Copy)]
pub struct Dist {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Dist {
    pub fn of(mut ns: Vec<u64>) -> Dist {
        assert!(!ns.is_empty(), "no samples");
        ns.sort_unstable();
        let at = |p: f64| {
            let rank = (p * ns.len() as f64).ceil() as usize;
            ns[rank.clamp(1, ns.len()) - 1] as f64 / 1e3
        };
        Dist {
            n: ns.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// The raw baselines, measured once per benchmark run.
#[derive(Debug, Clone, Copy)]
pub struct Baselines {
    pub cacheline: Dist,
    /// Single-core memcpy GB/s at each of [`WRITE_SIZES`].
    pub memcpy: [f64; 3],
    /// The UNIX-socket baseline: the faster of `unix_same` (both threads on one core) and
    /// `unix_cross` (on two).
    pub unix: Dist,
    pub unix_same: Dist,
    pub unix_cross: Dist,
    /// One read of the server's profiler clock (`MonotonicClock::now_ns`), ns.
    pub clock_read_ns: f64,
}

/// Everything one server run (one doorbell mode) measured, with the run's baselines.
#[derive(Debug, Clone)]
pub struct Results {
    pub mode: Mode,
    pub quick: bool,
    /// RC SEND 64 B round trips between the guests, and the threads that played them.
    pub rc_send: Dist,
    pub rc_threads: usize,
    /// A trapped doorbell that finds nothing to do (trapped mode only).
    pub doorbell: Option<Dist>,
    /// RDMA WRITE GB/s at each of [`WRITE_SIZES`], between buffers of 4 KiB pages scattered
    /// in guest-physical memory (judged), and between physically contiguous buffers.
    pub write: [f64; 3],
    pub write_contiguous: [f64; 3],
    /// 64 B SENDs per second.
    pub msg_rate: f64,
    /// The same, in the interleaved runs with the profiler's stage timing on and off.
    pub msg_rate_profiler_on: f64,
    pub msg_rate_profiler_off: f64,
    /// The median over the interleaved pairs of 1 − on/off, in percent (negative: within
    /// the noise).
    pub profiler_cost_percent: f64,
    /// One command (QUERY_PORT).
    pub command: Dist,
    /// CREATE_QP to RTS.
    pub qp: Dist,
    /// The big MR: its size, and the CREATE_MR times (first, and again once the server has
    /// the pages mapped).
    pub mr_bytes: u64,
    pub mr_first_ns: u64,
    pub mr_again_ns: u64,
    /// Server CPU while idle, from utime + stime (clock ticks) and from schedstat (ns).
    pub idle_cpu_percent: f64,
    pub idle_cpu_percent_schedstat: f64,
    pub idle_secs: f64,
    pub baselines: Baselines,
    /// Length of this mode's run.
    pub seconds: f64,
}

/// One target: the figure it judges, its bound, and whether the run met it.
struct Target {
    key: &'static str,
    bound_key: &'static str,
    bound: f64,
    met: bool,
}

impl Results {
    pub fn rc_to_unix(&self) -> f64 {
        self.rc_send.p50 / self.baselines.unix.p50
    }

    pub fn rc_to_cacheline(&self) -> f64 {
        self.rc_send.p50 / self.baselines.cacheline.p50
    }

    pub fn write_to_memcpy(&self, i: usize) -> f64 {
        self.write[i] / self.baselines.memcpy[i]
    }

    /// The RC round-trip target of this mode: its baseline's name, the ratio to it and the
    /// bound.
    fn rc_target(&self) -> (&'static str, f64, f64) {
        match self.mode {
            Mode::Trapped => ("raw_unix", self.rc_to_unix(), RC_RTT_TO_UNIX_MAX),
            Mode::ExitFree => (
                "raw_cacheline",
                self.rc_to_cacheline(),
                RC_RTT_TO_CACHELINE_MAX,
            ),
        }
    }

    /// What the profiler's stage timing costs, in percent of the message rate without it.
    pub fn profiler_cost_percent(&self) -> f64 {
        self.profiler_cost_percent
    }

    /// The cost the clock reads alone explain, in percent of the time of one message: the
    /// server times one doorbell's pass in [`DEFAULT_SAMPLE_EVERY`], and a timed pass of 32
    /// SENDs reads the clock 1 + 32 + 2 times (the doorbell, each data placement, the CQE
    /// and interrupt of the batch).
    pub fn profiler_clock_percent(&self) -> f64 {
        let reads = (1.0 + 3.0 / f64::from(SEND_BATCH)) / f64::from(DEFAULT_SAMPLE_EVERY);
        reads * self.baselines.clock_read_ns * self.msg_rate_profiler_off / 1e9 * 100.0
    }

    pub fn mr_first_ms(&self) -> f64 {
        self.mr_first_ns as f64 / 1e6
    }

    pub fn mr_again_ms(&self) -> f64 {
        self.mr_again_ns as f64 / 1e6
    }

    fn targets(&self) -> [Target; 5] {
        let (baseline, ratio, bound) = self.rc_target();
        [
            Target {
                key: "rc_send_64_rtt",
                bound_key: match baseline {
                    "raw_unix" => "ratio_rc_send_64_rtt_to_raw_unix_max",
                    _ => "ratio_rc_send_64_rtt_to_raw_cacheline_max",
                },
                bound,
                met: ratio <= bound,
            },
            Target {
                key: "write_64k",
                bound_key: "ratio_write_64k_to_memcpy_min",
                bound: WRITE_64K_TO_MEMCPY_MIN,
                met: self.write_to_memcpy(1) >= WRITE_64K_TO_MEMCPY_MIN,
            },
            Target {
                key: "qp_create_to_rts",
                bound_key: "qp_create_to_rts_us_max",
                bound: QP_CREATE_TO_RTS_US_MAX,
                met: self.qp.p50 <= QP_CREATE_TO_RTS_US_MAX,
            },
            Target {
                key: "mr_register_1gib",
                bound_key: "mr_register_1gib_ms_max",
                bound: MR_REGISTER_MS_MAX,
                met: self.mr_first_ms() <= MR_REGISTER_MS_MAX,
            },
            Target {
                key: "idle_cpu",
                bound_key: "idle_cpu_percent_max",
                bound: IDLE_CPU_PERCENT_MAX,
                met: self.idle_cpu_percent < IDLE_CPU_PERCENT_MAX,
            },
        ]
    }

    /// The machine-readable form: one JSON object on one line (a run of several modes
    /// prints one line per mode: JSON Lines).
    pub fn json(&self) -> String {
        let mut m = Map::new();
        let mut put = |key: &str, value: Value| {
            m.insert(key.to_string(), value);
        };
        let num = |x: f64| Value::from(round(x));
        let b = &self.baselines;
        put("doorbell_mode", self.mode.name().into());
        put("quick", self.quick.into());
        put("cpus", cpus().into());
        put("run_seconds", num(self.seconds));

        put("rc_send_64_rtt_us_p50", num(self.rc_send.p50));
        put("rc_send_64_rtt_us_p99", num(self.rc_send.p99));
        put("rc_send_64_rtt_us_p999", num(self.rc_send.p999));
        put("rc_send_64_rtt_samples", self.rc_send.n.into());
        put("rc_send_64_guest_threads", self.rc_threads.into());
        if let Some(doorbell) = self.doorbell {
            put("trapped_doorbell_rtt_us_p50", num(doorbell.p50));
            put("trapped_doorbell_rtt_us_p99", num(doorbell.p99));
            put(
                "ratio_trapped_doorbell_to_raw_unix",
                num(doorbell.p50 / b.unix.p50),
            );
        }
        for (i, name) in SIZE_KEYS.iter().enumerate() {
            put(&format!("write_{name}_gbytes_per_s"), num(self.write[i]));
            put(&format!("raw_memcpy_{name}_gbytes_per_s"), num(b.memcpy[i]));
            put(
                &format!("ratio_write_{name}_to_memcpy"),
                num(self.write_to_memcpy(i)),
            );
            put(
                &format!("write_{name}_contiguous_gbytes_per_s"),
                num(self.write_contiguous[i]),
            );
            put(
                &format!("ratio_write_{name}_contiguous_to_memcpy"),
                num(self.write_contiguous[i] / b.memcpy[i]),
            );
        }
        put("msg_rate_64_mpps", num(self.msg_rate / 1e6));
        put("msg_rate_64_per_doorbell", SEND_BATCH.into());
        put(
            "msg_rate_64_profiler_on_mpps",
            num(self.msg_rate_profiler_on / 1e6),
        );
        put(
            "msg_rate_64_profiler_off_mpps",
            num(self.msg_rate_profiler_off / 1e6),
        );
        put("profiler_cost_percent", num(self.profiler_cost_percent()));
        put("profiler_cost_percent_max", num(PROFILER_COST_PERCENT_MAX));
        put("profiler_clock_read_ns", num(b.clock_read_ns));
        put(
            "profiler_clock_reads_percent",
            num(self.profiler_clock_percent()),
        );
        put("command_us_p50", num(self.command.p50));
        put("qp_create_to_rts_us", num(self.qp.p50));
        put("qp_create_to_rts_us_p90", num(self.qp.p90));
        put("qp_create_to_rts_qps", self.qp.n.into());
        put("mr_register_1gib_ms", num(self.mr_first_ms()));
        put("mr_reregister_1gib_ms", num(self.mr_again_ms()));
        put("mr_register_bytes", self.mr_bytes.into());
        put("idle_cpu_percent", num(self.idle_cpu_percent));
        put(
            "idle_cpu_percent_schedstat",
            num(self.idle_cpu_percent_schedstat),
        );
        put("idle_seconds", num(self.idle_secs));

        put("raw_cacheline_rtt_us_p50", num(b.cacheline.p50));
        put("raw_cacheline_rtt_us_p99", num(b.cacheline.p99));
        put("raw_unix_rtt_us_p50", num(b.unix.p50));
        put("raw_unix_rtt_us_p99", num(b.unix.p99));
        put("raw_unix_rtt_same_core_us_p50", num(b.unix_same.p50));
        put("raw_unix_rtt_cross_core_us_p50", num(b.unix_cross.p50));
        put("ratio_rc_send_64_rtt_to_raw_unix", num(self.rc_to_unix()));
        put(
            "ratio_rc_send_64_rtt_to_raw_cacheline",
            num(self.rc_to_cacheline()),
        );

        let targets = self.targets();
        let mut bounds = Map::new();
        let mut met = Map::new();
        for t in &targets {
            bounds.insert(t.bound_key.to_string(), num(t.bound));
            met.insert(t.key.to_string(), t.met.into());
        }
        put("targets", Value::Object(bounds));
        put("targets_met", Value::Object(met));
        put(
            "targets_met_count",
            targets.iter().filter(|t| t.met).count().into(),
        );
        serde_json::to_string(&Value::Object(m)).expect("JSON of plain numbers")
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let t = self.targets();
        let b = &self.baselines;
        let verdict = |i: usize| if t[i].met { "PASS" } else { "MISS" };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vfio-user-pvrdma memcpy fabric benchmark: two host-side guests, one server process"
        );
        let _ = writeln!(
            out,
            "doorbell mode: {} ({}); {} CPUs; {} run, {:.1} s",
            self.mode.name(),
            match self.mode {
                Mode::Trapped => "each doorbell is a vfio-user REGION_WRITE and its reply",
                Mode::ExitFree => "each doorbell is a store into BAR2, which the server polls",
            },
            cpus(),
            if self.quick { "quick" } else { "full" },
            self.seconds
        );
        let _ = writeln!(out);
        let row = |out: &mut String, cols: [&str; 6]| {
            let line = format!(
                "{:<32} {:>13}  {:<30} {:>7}  {:<9} {}",
                cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
            );
            let _ = writeln!(out, "{}", line.trim_end());
        };
        row(
            &mut out,
            [
                "Figure", "Measured", "Baseline", "Ratio", "Target", "Result",
            ],
        );
        let rule = [32, 13, 30, 7, 9, 6].map(|width| "-".repeat(width));
        row(&mut out, rule.each_ref().map(String::as_str));
        let us = |x: f64| format!("{x:.2} µs");
        let gbs = |x: f64| format!("{x:.2} GB/s");
        let ratio = |x: f64| format!("{x:.2}×");
        let (rc_baseline, rc_baseline_p99) = match self.mode {
            Mode::Trapped => (
                format!("raw UNIX round trip {}", us(b.unix.p50)),
                ("raw UNIX p99", b.unix.p99),
            ),
            Mode::ExitFree => (
                format!("cache-line round trip {:.3} µs", b.cacheline.p50),
                ("cache-line p99", b.cacheline.p99),
            ),
        };
        let (_, rc_ratio, rc_bound) = self.rc_target();
        row(
            &mut out,
            [
                "RC SEND 64 B round trip p50",
                &us(self.rc_send.p50),
                &rc_baseline,
                &ratio(rc_ratio),
                &format!("≤ {rc_bound}×"),
                verdict(0),
            ],
        );
        row(
            &mut out,
            [
                "RC SEND 64 B round trip p99",
                &us(self.rc_send.p99),
                &format!("{} {:.3} µs", rc_baseline_p99.0, rc_baseline_p99.1),
                &ratio(self.rc_send.p99 / rc_baseline_p99.1),
                "",
                "",
            ],
        );
        row(
            &mut out,
            [
                "RC SEND 64 B round trip p99.9",
                &us(self.rc_send.p999),
                "",
                "",
                "",
                "",
            ],
        );
        for (i, (size, batch)) in WRITE_SIZES.iter().enumerate() {
            let label = format!("RDMA WRITE {} ({batch}/doorbell)", size_label(*size));
            row(
                &mut out,
                [
                    &label,
                    &gbs(self.write[i]),
                    &format!("memcpy {} {}", size_label(*size), gbs(b.memcpy[i])),
                    &ratio(self.write_to_memcpy(i)),
                    if i == 1 { "≥ 0.8×" } else { "" },
                    if i == 1 { verdict(1) } else { "" },
                ],
            );
        }
        for (i, (size, _)) in WRITE_SIZES.iter().enumerate() {
            row(
                &mut out,
                [
                    &format!("  contiguous pages, {}", size_label(*size)),
                    &gbs(self.write_contiguous[i]),
                    "",
                    &ratio(self.write_contiguous[i] / b.memcpy[i]),
                    "",
                    "",
                ],
            );
        }
        row(
            &mut out,
            [
                &format!("64 B SEND rate ({SEND_BATCH}/doorbell)"),
                &format!("{:.3} Mmsg/s", self.msg_rate / 1e6),
                "",
                "",
                "",
                "",
            ],
        );
        row(
            &mut out,
            [
                "64 B SEND rate profiler on / off",
                &format!(
                    "{:.3} / {:.3}",
                    self.msg_rate_profiler_on / 1e6,
                    self.msg_rate_profiler_off / 1e6
                ),
                &format!("cost {:.2} %", self.profiler_cost_percent()),
                &ratio(self.msg_rate_profiler_on / self.msg_rate_profiler_off),
                "≤ 2 %",
                if self.profiler_cost_percent() <= PROFILER_COST_PERCENT_MAX {
                    "PASS"
                } else {
                    "MISS"
                },
            ],
        );
        row(
            &mut out,
            [
                "RC QP create → RTS (median)",
                &us(self.qp.p50),
                "",
                "",
                "≤ 100 µs",
                verdict(2),
            ],
        );
        row(
            &mut out,
            [
                &format!("{} MR registration", bytes_label(self.mr_bytes)),
                &format!("{:.2} ms", self.mr_first_ms()),
                "",
                "",
                "≤ 50 ms",
                verdict(3),
            ],
        );
        row(
            &mut out,
            [
                "Server CPU while idle",
                &format!("{:.2} %", self.idle_cpu_percent),
                "",
                "",
                "< 1 %",
                verdict(4),
            ],
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "Raw baselines and breakdown");
        let line = |out: &mut String, what: &str, value: String| {
            let _ = writeln!(out, "  {what:<56} {value}");
        };
        line(
            &mut out,
            "cache-line ping-pong, two threads, RTT p50 / p99",
            format!(
                "{:.3} / {:.3} µs  (RC SEND p50 is {:.1}× this)",
                b.cacheline.p50,
                b.cacheline.p99,
                self.rc_to_cacheline()
            ),
        );
        line(
            &mut out,
            "threads playing the two guests in the RC ping-pong",
            match self.rc_threads {
                1 => "1 (the exit-free poller is a third busy thread on two CPUs)".to_string(),
                n => n.to_string(),
            },
        );
        line(
            &mut out,
            "UNIX socketpair 64 B ping-pong, one core, RTT p50 / p99",
            format!("{:.2} / {:.2} µs", b.unix_same.p50, b.unix_same.p99),
        );
        line(
            &mut out,
            "UNIX socketpair 64 B ping-pong, two cores, RTT p50 / p99",
            format!("{:.2} / {:.2} µs", b.unix_cross.p50, b.unix_cross.p99),
        );
        if let Some(doorbell) = self.doorbell {
            line(
                &mut out,
                "trapped doorbell with nothing to do, RTT p50 / p99",
                format!(
                    "{:.2} / {:.2} µs  ({:.2}× the one-core, {:.2}× the two-core socket RTT)",
                    doorbell.p50,
                    doorbell.p99,
                    doorbell.p50 / b.unix_same.p50,
                    doorbell.p50 / b.unix_cross.p50
                ),
            );
        }
        line(
            &mut out,
            "single-core memcpy 4 KiB / 64 KiB / 1 MiB",
            format!(
                "{:.1} / {:.1} / {:.1} GB/s",
                b.memcpy[0], b.memcpy[1], b.memcpy[2]
            ),
        );
        line(
            &mut out,
            "profiler clock read; its share of one 64 B SEND's time",
            format!(
                "{:.1} ns; {:.2} %",
                b.clock_read_ns,
                self.profiler_clock_percent()
            ),
        );
        line(
            &mut out,
            "one command (QUERY_PORT: REQUEST write + ERR read) p50",
            format!("{:.2} µs", self.command.p50),
        );
        line(
            &mut out,
            "RC QP create → RTS p90",
            format!("{:.2} µs over {} QPs", self.qp.p90, self.qp.n),
        );
        line(
            &mut out,
            &format!(
                "{} MR registered again (server has it mapped)",
                bytes_label(self.mr_bytes)
            ),
            format!("{:.2} ms", self.mr_again_ms()),
        );
        line(
            &mut out,
            "server CPU while idle, from schedstat (ns)",
            format!(
                "{:.4} % over {:.1} s",
                self.idle_cpu_percent_schedstat, self.idle_secs
            ),
        );
        let _ = writeln!(
            out,
            "\nTargets met: {} of {}",
            t.iter().filter(|t| t.met).count(),
            t.len()
        );
        out
    }
}

/// JSON name parts of [`WRITE_SIZES`].
const SIZE_KEYS: [&str; 3] = ["4k", "64k", "1m"];

fn size_label(size: usize) -> String {
    bytes_label(size as u64)
}

fn bytes_label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Four decimals are plenty (and keep the JSON readable).
fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
