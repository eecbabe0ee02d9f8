//! The receiver-not-ready timer: one thread that retries, when their `min_rnr_timer` ends,
//! the requests a device refused for want of a receive ([`Fabric::tick`]). A receive posted
//! retries them at once without it; the timer is what spends a QP's `rnr_retry`.

use std::thread;
use std::time::{Duration, Instant};

use super::fabric::Fabric;

/// The longest sleep: a request parked meanwhile waits at most this much past its timer,
/// which IB allows (the timer is a minimum), and an idle server wakes 20 times a second.
const LONGEST_SLEEP: Duration = Duration::from_millis(50);
/// The shortest sleep, so a storm of short timers cannot spin the thread.
const SHORTEST_SLEEP: Duration = Duration::from_micros(50);

/// Runs the timer on the calling thread; never returns.
pub fn run(fabric: &Fabric) -> ! {
    loop {
        let next = fabric.tick();
        thread::sleep(sleep_until(next, Instant::now()));
    }
}

/// How long to sleep before the next tick when the next timer ends at `next`.
fn sleep_until(next: Option<Instant>, now: Instant) -> Duration {
    next.map_or(LONGEST_SLEEP, |due| {
        due.saturating_duration_since(now)
            .clamp(SHORTEST_SLEEP, LONGEST_SLEEP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_sleeps_until_the_next_end_within_its_bounds() {
        let now = Instant::now();
        assert_eq!(sleep_until(None, now), LONGEST_SLEEP);
        assert_eq!(sleep_until(Some(now), now), SHORTEST_SLEEP);
        let soon = now + Duration::from_millis(3);
        assert_eq!(sleep_until(Some(soon), now), Duration::from_millis(3));
        assert_eq!(
            sleep_until(Some(now + Duration::from_secs(9)), now),
            LONGEST_SLEEP
        );
    }
}
