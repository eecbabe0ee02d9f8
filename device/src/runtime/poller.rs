//! The exit-free doorbell poller: one thread that polls every device's UAR pages and rings
//! ([`Fabric::poll_doorbells`]) while guests are busy and backs off when they are not
//! (docs/doorbells.md). With the TCP transport, the same thread serves the links to peer
//! servers between polls: a request crossing two servers then wakes no thread on either
//! side, and the server has one busy thread, not two.

use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use pvrdma_backend::tcp::runtime::Pump;

use super::fabric::Fabric;

/// Runs the poller on the calling thread, pinned to `cpu` if given, serving the TCP
/// transport's links too when `links` is given; never returns.
pub fn run(fabric: &Fabric, cpu: Option<usize>, links: Option<Pump>) -> ! {
    if let Some(cpu) = cpu {
        pin_to(cpu);
    }
    poll(fabric, links)
}

/// The poll loop: spins while guests or links are busy, then sleeps between polls, longer
/// the longer the devices stay idle (see [`idle_sleep`]), so an idle server costs almost
/// nothing and a busy one answers in microseconds. The sleep is a wait on the links, so
/// a peer's frame ends it at once.
fn poll(fabric: &Fabric, mut links: Option<Pump>) -> ! {
    let mut idle_polls = 0u32;
    let mut idle_since = Instant::now();
    // How many empty polls between yields of the core. A request over TCP costs tens of
    // µs in the network stack, so a poller serving links gives its core away after every
    // empty poll (on two cores, with the guests' vCPUs spinning too, this took the TCP
    // round trip from 390 µs to 60 µs); the memcpy fabric's round trip is about a µs,
    // which a yield per poll would visibly lengthen.
    let yield_every = if links.is_some() { 1 } else { 64 };
    loop {
        let mut active = fabric.poll_doorbells();
        if let Some(pump) = &mut links {
            active |= pump.turn(Duration::ZERO).unwrap_or(false);
        }
        if active {
            idle_polls = 0;
            continue;
        }
        idle_polls = idle_polls.saturating_add(1);
        if idle_polls == SPIN_POLLS {
            idle_since = Instant::now();
        }
        // The clock is read only once spinning is over: a read costs as much as a poll.
        let idle_for = if idle_polls >= SPIN_POLLS {
            idle_since.elapsed()
        } else {
            Duration::ZERO
        };
        match idle_sleep(idle_polls, idle_for) {
            None => {
                std::hint::spin_loop();
                if idle_polls.is_multiple_of(yield_every) {
                    // Let a guest's vCPU have this core if it needs it.
                    thread::yield_now();
                }
            }
            Some(pause) => match &mut links {
                Some(pump) => {
                    if pump.turn(pause).unwrap_or(false) {
                        idle_polls = 0;
                    }
                }
                None => thread::sleep(pause),
            },
        }
    }
}

/// Pins the calling thread to `cpu`; a CPU this process may not use is logged and ignored.
fn pin_to(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match pinned {
        Ok(()) => info!("doorbell poller pinned to CPU {cpu}"),
        Err(e) => warn!("cannot pin the doorbell poller to CPU {cpu} ({e}); it runs anywhere"),
    }
}

/// Empty polls the poller spins through before it starts sleeping (a few hundred µs).
const SPIN_POLLS: u32 = 2_000;
/// The longest pause between polls in the first [`SHORT_IDLE`] of idleness: a doorbell
/// then waits at most this long, while a waking timer costs ~30 µs of CPU on a VM.
const SHORT_PAUSE: Duration = Duration::from_millis(1);
const SHORT_IDLE: Duration = Duration::from_millis(100);
/// The longest pause once the device has been idle longer: ~60 wake-ups per second, about
/// 0.2 % of a core; the first doorbell after a quiet spell may wait this long.
const LONG_PAUSE: Duration = Duration::from_millis(16);

/// The pause before the next poll after `idle_polls` empty polls over `idle_for`: none
/// while spinning, then doubling from 1 µs up to [`SHORT_PAUSE`], then [`LONG_PAUSE`].
fn idle_sleep(idle_polls: u32, idle_for: Duration) -> Option<Duration> {
    let past_spin = idle_polls.checked_sub(SPIN_POLLS)?;
    let cap = if idle_for < SHORT_IDLE {
        SHORT_PAUSE
    } else {
        LONG_PAUSE
    };
    let doubling = Duration::from_micros(1u64 << past_spin.min(20));
    Some(doubling.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_poller_spins_then_doubles_its_pause_up_to_a_cap_that_grows_with_idleness() {
        assert_eq!(idle_sleep(1, Duration::ZERO), None);
        assert_eq!(idle_sleep(SPIN_POLLS - 1, Duration::ZERO), None);
        assert_eq!(
            idle_sleep(SPIN_POLLS, Duration::ZERO),
            Some(Duration::from_micros(1))
        );
        assert_eq!(
            idle_sleep(SPIN_POLLS + 3, Duration::ZERO),
            Some(Duration::from_micros(8))
        );
        assert_eq!(idle_sleep(u32::MAX, Duration::ZERO), Some(SHORT_PAUSE));
        assert_eq!(idle_sleep(u32::MAX, SHORT_IDLE), Some(LONG_PAUSE));
    }
}
