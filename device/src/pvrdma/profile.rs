//! The queue-pair profiler's device-side half: per-QP counters and per-stage latency
//! histograms, kept in each QP's state and updated on the data path (docs/profiler.md).
//!
//! The device model stays sans-IO: it never reads a clock itself but asks the [`Clock`] it
//! was given (the server gives it a monotonic clock, tests a fake one), and only while
//! profiling is on. Counters are plain integers, always kept; a histogram is a fixed array of
//! log2 buckets, so recording allocates nothing and takes no lock.

use std::fmt;
use std::sync::Arc;

/// Where the device model gets the time from, in nanoseconds of an arbitrary monotonic
/// origin.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_ns(&self) -> u64;
}

/// The clock of a device nobody gave one: always 0 (every stage then takes 0 ns).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoClock;

impl Clock for NoClock {
    fn now_ns(&self) -> u64 {
        0
    }
}

/// Buckets of a [`Histogram`]: bucket `i` holds latencies in `[2^i, 2^(i+1))` ns (bucket 0
/// also holds 0 ns, the last one everything from 2^31 ns ≈ 2.1 s up).
pub const BUCKETS: usize = 32;

/// A latency histogram of log2 buckets of nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub count: u64,
    pub sum_ns: u64,
    /// Meaningless (`u64::MAX`) while `count` is 0; see [`Histogram::min_ns`].
    min: u64,
    pub max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            count: 0,
            sum_ns: 0,
            min: u64::MAX,
            max_ns: 0,
        }
    }
}

impl Histogram {
    /// The bucket `ns` falls in.
    pub fn bucket_of(ns: u64) -> usize {
        ((u64::BITS - 1 - (ns | 1).leading_zeros()) as usize).min(BUCKETS - 1)
    }

    /// The range of bucket `i` in ns: `[low, high)`, `high` `None` for the last bucket.
    pub fn bucket_range(i: usize) -> (u64, Option<u64>) {
        let low = if i == 0 { 0 } else { 1u64 << i };
        let high = (i + 1 < BUCKETS).then(|| 1u64 << (i + 1));
        (low, high)
    }

    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::bucket_of(ns)] += 1;
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.min = self.min.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// The smallest latency recorded (0 when empty).
    pub fn min_ns(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min }
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    /// An upper bound of the `p` quantile (0 < p ≤ 1): the top of the bucket holding it,
    /// capped by the largest latency recorded. 0 when empty.
    pub fn quantile_ns(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let top = Self::bucket_range(i).1.map_or(u64::MAX, |high| high - 1);
                return top.min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// The stages of a send work request, each timed from the end of the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Doorbell → WQE picked up: the wait behind earlier WQEs of the same doorbell.
    Pickup = 0,
    /// WQE picked up → data placed: parsing, key checks, and the copy into the target.
    Place = 1,
    /// Data placed → CQE written (signaled WQEs only).
    Complete = 2,
    /// CQE written → interrupt raised (only when the CQ was armed and the vector unmasked).
    Interrupt = 3,
}

/// Number of [`Stage`]s.
pub const STAGES: usize = 4;

impl Stage {
    pub const ALL: [Stage; STAGES] = [
        Stage::Pickup,
        Stage::Place,
        Stage::Complete,
        Stage::Interrupt,
    ];

    /// Short name used in tables, JSON keys and the SVG.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pickup => "pickup",
            Stage::Place => "place",
            Stage::Complete => "cqe",
            Stage::Interrupt => "irq",
        }
    }

    /// What the stage spans.
    pub fn span(self) -> &'static str {
        match self {
            Stage::Pickup => "doorbell → WQE picked up",
            Stage::Place => "WQE picked up → data placed",
            Stage::Complete => "data placed → CQE written",
            Stage::Interrupt => "CQE written → interrupt raised",
        }
    }
}

/// Everything the profiler knows about one QP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QpStats {
    /// Doorbells rung for this QP (send and receive).
    pub doorbells: u64,
    /// WQEs the device took off the QP's send and receive queues (done, failed or flushed).
    pub wqes_posted: u64,
    /// WQEs that finished successfully, signaled or not.
    pub wqes_completed: u64,
    /// Completions written for this QP with an error status (flushes included).
    pub completion_errors: u64,
    /// Payload bytes that left through this QP (SEND and WRITE as requester, READ and
    /// atomic replies as responder).
    pub bytes_sent: u64,
    /// Payload bytes that arrived through this QP (SEND and WRITE as responder, READ and
    /// atomic replies as requester).
    pub bytes_received: u64,
    /// Sends that found the receiver not ready.
    pub rnr_stalls: u64,
    /// Stage latencies of send WQEs, indexed by [`Stage`] (recorded while profiling is on).
    pub stages: [Histogram; STAGES],
}

impl QpStats {
    pub fn stage(&self, stage: Stage) -> &Histogram {
        &self.stages[stage as usize]
    }

    pub(crate) fn record(&mut self, stage: Stage, ns: u64) {
        self.stages[stage as usize].record(ns);
    }
}

/// With timing on, one pass over a send queue in this many is timed, by default: reading the
/// clock costs ~27 ns on a VM, about 1.5 % of a 64-byte message's time per read, so timing
/// every pass costs ~3 % of the message rate; one in 8 keeps the cost well under 1 % and the
/// histograms' shape (docs/profiler.md).
pub const DEFAULT_SAMPLE_EVERY: u32 = 8;

/// The device's profiler switch, clock and sampling.
#[derive(Debug, Clone)]
pub(crate) struct Profiler {
    pub enabled: bool,
    pub clock: Arc<dyn Clock>,
    /// One pass in `sample_every` is timed (1: all).
    pub sample_every: u32,
    /// Passes left until the next timed one.
    countdown: u32,
}

impl Default for Profiler {
    fn default() -> Self {
        Profiler {
            enabled: false,
            clock: Arc::new(NoClock),
            sample_every: DEFAULT_SAMPLE_EVERY,
            countdown: 1,
        }
    }
}

impl Profiler {
    /// Times one pass in `every` (0 counts as 1), starting with the next one.
    pub fn set_sampling(&mut self, every: u32) {
        self.sample_every = every.max(1);
        self.countdown = 1;
    }

    /// The start of a pass over a send queue: its time if profiling is on and this pass is
    /// the one in [`Profiler::sample_every`] to time, else `None` (and no clock read).
    #[inline]
    pub fn sample(&mut self) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        self.countdown = self.countdown.saturating_sub(1);
        if self.countdown > 0 {
            return None;
        }
        self.countdown = self.sample_every.max(1);
        Some(self.clock.now_ns())
    }

    /// The time, if profiling is on.
    #[inline]
    pub fn now(&self) -> Option<u64> {
        if self.enabled {
            Some(self.clock.now_ns())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_nanoseconds() {
        assert_eq!(Histogram::bucket_of(0), 0);
        assert_eq!(Histogram::bucket_of(1), 0);
        assert_eq!(Histogram::bucket_of(2), 1);
        assert_eq!(Histogram::bucket_of(3), 1);
        assert_eq!(Histogram::bucket_of(1023), 9);
        assert_eq!(Histogram::bucket_of(1024), 10);
        assert_eq!(Histogram::bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(Histogram::bucket_range(0), (0, Some(2)));
        assert_eq!(Histogram::bucket_range(10), (1024, Some(2048)));
        assert_eq!(Histogram::bucket_range(BUCKETS - 1), (1 << 31, None));
        for ns in [0, 1, 5, 1000, 1 << 20, (1 << 31) - 1] {
            let (low, high) = Histogram::bucket_range(Histogram::bucket_of(ns));
            assert!(low <= ns && high.is_none_or(|h| ns < h), "{ns}");
        }
    }

    #[test]
    fn records_count_sum_min_max_and_quantiles() {
        let mut h = Histogram::default();
        assert_eq!((h.min_ns(), h.mean_ns(), h.quantile_ns(0.5)), (0, 0.0, 0));
        for ns in [100, 200, 300, 5000] {
            h.record(ns);
        }
        assert_eq!(h.count, 4);
        assert_eq!(h.sum_ns, 5600);
        assert_eq!((h.min_ns(), h.max_ns), (100, 5000));
        assert_eq!(h.mean_ns(), 1400.0);
        assert_eq!(h.buckets[6], 1); // 64..128
        assert_eq!(h.buckets[7], 1); // 128..256
        assert_eq!(h.buckets[8], 1); // 256..512
        assert_eq!(h.buckets[12], 1); // 4096..8192
        assert_eq!(h.buckets.iter().sum::<u64>(), 4);
        assert_eq!(h.quantile_ns(0.5), 255);
        assert_eq!(h.quantile_ns(1.0), 5000);
    }

    #[test]
    fn the_profiler_reads_the_clock_only_when_on() {
        #[derive(Debug)]
        struct Fixed;
        impl Clock for Fixed {
            fn now_ns(&self) -> u64 {
                42
            }
        }
        let mut p = Profiler {
            enabled: false,
            clock: Arc::new(Fixed),
            ..Profiler::default()
        };
        assert_eq!(p.now(), None);
        assert_eq!(p.sample(), None);
        p.enabled = true;
        assert_eq!(p.now(), Some(42));
        // The first pass is timed, then one in `sample_every`.
        p.set_sampling(3);
        let timed: Vec<bool> = (0..7).map(|_| p.sample().is_some()).collect();
        assert_eq!(timed, [true, false, false, true, false, false, true]);
        p.set_sampling(1);
        assert!((0..4).all(|_| p.sample().is_some()), "1 times every pass");
    }
}
