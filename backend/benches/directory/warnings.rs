//! The directory's warnings during the run: counted (a lease that lapsed while its server
//! was claiming GIDs is a finding, not noise) and the first few shown on stderr.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Warnings shown on stderr before the rest are only counted.
const SHOWN: usize = 20;

struct Counter;

static WARNINGS: AtomicUsize = AtomicUsize::new(0);
static LEASES_LOST: AtomicUsize = AtomicUsize::new(0);
static MUTED: AtomicBool = AtomicBool::new(false);
static COUNTER: Counter = Counter;

impl Log for Counter {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) || MUTED.load(Ordering::Relaxed) {
            return;
        }
        let text = record.args().to_string();
        // membership.rs says this when a renewal finds the lease gone.
        if text.contains("lease expired") {
            LEASES_LOST.fetch_add(1, Ordering::Relaxed);
        }
        if WARNINGS.fetch_add(1, Ordering::Relaxed) < SHOWN {
            eprintln!("[directory] {}: {text}", record.level());
        }
    }

    fn flush(&self) {}
}

/// Routes the log to the counter (once per process; a second call keeps the first).
pub fn install() {
    if log::set_logger(&COUNTER).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}

/// Warnings so far, and how many of them were a lease found expired.
pub fn counts() -> (usize, usize) {
    (
        WARNINGS.load(Ordering::Relaxed),
        LEASES_LOST.load(Ordering::Relaxed),
    )
}

/// Silences and stops counting while the run is taken down: with etcd gone first, every
/// server's last revoke fails, and says so.
pub struct MuteOnDrop;

impl Drop for MuteOnDrop {
    fn drop(&mut self) {
        MUTED.store(true, Ordering::Relaxed);
    }
}

/// Counts again (the next run in one process, as the smoke test's).
pub fn unmute() {
    MUTED.store(false, Ordering::Relaxed);
}
