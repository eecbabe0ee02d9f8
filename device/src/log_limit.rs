//! Log lines a guest or client can make the server write, limited per line of code: a
//! guest that rings a corrupt doorbell a million times a second must not fill the host's
//! disk or drown the lines of every other device. Each call site may write
//! [`LINES_PER_WINDOW`] lines per [`WINDOW`]; the rest are counted, and the site's next line
//! after the window says how many were left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Log, Metadata, Record};

/// How many lines one call site may write per window.
pub const LINES_PER_WINDOW: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// What happens to one line of a call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Written; `suppressed` lines of this site were left out since it last wrote.
    Write { suppressed: u64 },
    /// Left out (counted).
    Drop,
}

/// One call site's window.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    window_start: Instant,
    written: u32,
    suppressed: u64,
}

impl Site {
    pub fn new(now: Instant) -> Site {
        Site {
            window_start: now,
            written: 0,
            suppressed: 0,
        }
    }

    /// Whether a line of this site at `now` is written.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.written = 0;
        }
        if self.written >= LINES_PER_WINDOW {
            self.suppressed += 1;
            return Admit::Drop;
        }
        self.written += 1;
        Admit::Write {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }
}

/// A logger that limits each call site of `inner` (see the module docs).
pub struct RateLimited<L> {
    inner: L,
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

impl<L: Log> RateLimited<L> {
    pub fn new(inner: L) -> RateLimited<L> {
        RateLimited {
            inner,
            sites: Mutex::new(HashMap::new()),
        }
    }
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        // Sites are lines of this program's code: their number is bounded by it.
        let site = (
            record.file_static().unwrap_or("?"),
            record.line().unwrap_or(0),
        );
        let admitted = {
            let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            sites
                .entry(site)
                .or_insert_with(|| Site::new(now))
                .admit(now)
        };
        match admitted {
            Admit::Drop => {}
            Admit::Write { suppressed: 0 } => self.inner.log(record),
            Admit::Write { suppressed } => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} ({suppressed} more like it left out)",
                        record.args()
                    ))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_its_quota_per_window_and_then_says_what_it_left_out() {
        let start = Instant::now();
        let mut site = Site::new(start);
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(site.admit(start), Admit::Write { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(site.admit(start + WINDOW / 2), Admit::Drop);
        }
        assert_eq!(
            site.admit(start + WINDOW),
            Admit::Write { suppressed: 1000 }
        );
        assert_eq!(site.admit(start + WINDOW), Admit::Write { suppressed: 0 });
    }

    /// Counts what reaches it.
    struct Count(Mutex<Vec<String>>);

    impl Log for Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &Record<'_>) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    #[test]
    fn a_flooding_site_does_not_silence_another() {
        let logger = RateLimited::new(Count(Mutex::new(Vec::new())));
        let record = |line: u32| {
            logger.log(
                &Record::builder()
                    .args(format_args!("line {line}"))
                    .file_static(Some("x.rs"))
                    .line(Some(line))
                    .build(),
            )
        };
        for _ in 0..10_000 {
            record(1);
        }
        record(2);
        let written = logger.inner.0.lock().unwrap();
        assert_eq!(written.len(), LINES_PER_WINDOW as usize + 1);
        assert_eq!(written.last().map(String::as_str), Some("line 2"));
    }
}
