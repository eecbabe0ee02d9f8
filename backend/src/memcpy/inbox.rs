//! An endpoint's inbox: requests and answers carried to it, and the requests that wait
//! for one of its receivers.

use std::collections::VecDeque;
use std::time::Instant;

use super::OwnedRequest;
use crate::{Outcome, RemoteError, RetryPolicy};

/// A request on its way to its responder.
#[derive(Debug)]
pub struct Carried {
    /// The requester's port.
    pub from: usize,
    pub request: OwnedRequest,
    /// Bytes of it already executed (a WRITE or READ goes in pieces).
    pub done: u64,
    /// Set once the responder refused it for receiver-not-ready.
    pub rnr: Option<Rnr>,
}

/// A refused request's receiver-not-ready state.
#[derive(Debug, Clone, Copy)]
pub struct Rnr {
    /// Timer retries left ([`RetryPolicy::RNR_FOR_EVER`]: no limit).
    pub left: u8,
    /// When its RNR timer ends: the next retry that spends one of `left`.
    pub due: Instant,
    /// The attempt now under way is a timer retry (one that spends).
    pub timed: bool,
}

impl Carried {
    pub fn new(from: usize, request: OwnedRequest) -> Carried {
        Carried {
            from,
            request,
            done: 0,
            rnr: None,
        }
    }

    /// The requesting QP, as created (a QP reset or made anew has a new epoch).
    fn key(&self) -> QpKey {
        (self.from, self.request.source.qpn, self.request.epoch)
    }
}

/// A requesting QP as created: its port, its number, its epoch.
pub type QpKey = (usize, u32, u32);

#[derive(Debug)]
pub enum Work {
    Request(Carried),
    /// The answer to a request this endpoint's device issued.
    Answer {
        qpn: u32,
        ticket: u64,
        result: Result<Outcome, RemoteError>,
    },
    /// A request of this endpoint's QP `qpn` waits at its responder for a receiver.
    NotReady {
        qpn: u32,
    },
}

/// The requesting QPs (as created) a request of which failed here, newest last: their
/// later requests are dropped unexecuted, as a responder does once it answered a QP with
/// an error. Bounded; the epoch in the key makes an old entry harmless to a new QP.
const FAILED_KEPT: usize = 1024;

#[derive(Debug, Default)]
pub struct Inbox {
    work: VecDeque<Work>,
    /// Reliable requests waiting for a receiver: per requesting QP, the refused one first,
    /// then the later ones (which have not been tried), in order.
    parked: Vec<Carried>,
    failed: VecDeque<QpKey>,
}

impl Inbox {
    pub fn push(&mut self, work: Work) {
        self.work.push_back(work);
    }

    pub fn take(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// Puts a request that is part done back at the front: it goes on first next time.
    pub fn put_back(&mut self, carried: Carried) {
        self.work.push_front(Work::Request(carried));
    }

    /// Whether no work waits (parked requests wait for a receiver, not for a visit).
    pub fn is_idle(&self) -> bool {
        self.work.is_empty()
    }

    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// Whether a request of `key` is queued, parked or failed here: a later one must then
    /// go through the inbox, behind it.
    pub fn holds(&self, key: QpKey) -> bool {
        self.failed.contains(&key)
            || self.parked.iter().any(|carried| carried.key() == key)
            || self.work.iter().any(|work| match work {
                Work::Request(carried) => carried.key() == key,
                Work::Answer { .. } | Work::NotReady { .. } => false,
            })
    }

    /// Records that a request of `key` failed here without passing through the inbox.
    pub fn failed_key(&mut self, key: QpKey) {
        if !self.failed.contains(&key) {
            if self.failed.len() == FAILED_KEPT {
                self.failed.pop_front();
            }
            self.failed.push_back(key);
        }
    }

    /// Gives `carried` back to execute, unless a request of its QP failed here (it is
    /// dropped) or waits for a receiver (it parks behind it: it must not overtake it).
    pub fn admit(&mut self, carried: Carried) -> Option<Carried> {
        if !carried.request.is_reliable() {
            return Some(carried);
        }
        let key = carried.key();
        if self.failed.contains(&key) {
            return None;
        }
        if self.parked.iter().any(|p| p.key() == key) {
            self.parked.push(carried);
            return None;
        }
        Some(carried)
    }

    /// A request of `carried`'s QP failed: what of that QP waits here is dropped, and so
    /// is what comes later.
    pub fn failed(&mut self, carried: &Carried) {
        let key = carried.key();
        self.drop_qp(key);
        self.failed_key(key);
    }

    /// Parks a request the responder refused for receiver-not-ready, ahead of its QP's later
    /// ones. Gives it back when its QP's `rnr_retry` is spent (and drops those later ones:
    /// the requester's QP fails, and nothing of it may execute after).
    pub fn park(&mut self, mut carried: Carried, now: Instant) -> Option<Carried> {
        let policy = carried.request.retry;
        let rnr = match carried.rnr {
            None if policy.rnr_retry == 0 => return Some(carried),
            None => Rnr {
                left: policy.rnr_retry,
                due: now + policy.rnr_delay(),
                timed: false,
            },
            Some(Rnr {
                left: 0,
                timed: true,
                ..
            }) => {
                self.failed(&carried);
                return Some(carried);
            }
            // After a timer retry the timer starts again; after an early one (a receive
            // may have been posted) it runs on.
            Some(rnr) if rnr.timed => Rnr {
                due: now + policy.rnr_delay(),
                timed: false,
                ..rnr
            },
            Some(rnr) => rnr,
        };
        carried.rnr = Some(rnr);
        let key = carried.key();
        let at = self
            .parked
            .iter()
            .position(|p| p.key() == key)
            .unwrap_or(self.parked.len());
        self.parked.insert(at, carried);
        None
    }

    /// Every parked request goes again, first (a receive may have been posted); returns
    /// whether there was any. Such an early retry spends nothing.
    pub fn unpark_all(&mut self) -> bool {
        if self.parked.is_empty() {
            return false;
        }
        let parked = std::mem::take(&mut self.parked);
        for carried in parked.into_iter().rev() {
            self.work.push_front(Work::Request(carried));
        }
        true
    }

    /// The QPs whose RNR timer ended by `now` go again, each spending one retry; returns
    /// whether any did.
    pub fn unpark_due(&mut self, now: Instant) -> bool {
        let mut due = Vec::new();
        for carried in &mut self.parked {
            if let Some(rnr) = carried.rnr.as_mut()
                && rnr.due <= now
            {
                if rnr.left != RetryPolicy::RNR_FOR_EVER {
                    rnr.left = rnr.left.saturating_sub(1);
                }
                rnr.timed = true;
                due.push(carried.key());
            }
        }
        if due.is_empty() {
            return false;
        }
        let (going, staying): (Vec<Carried>, Vec<Carried>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|carried| due.contains(&carried.key()));
        self.parked = staying;
        for carried in going.into_iter().rev() {
            self.work.push_front(Work::Request(carried));
        }
        true
    }

    /// When the next RNR timer ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.parked
            .iter()
            .filter_map(|carried| carried.rnr.map(|rnr| rnr.due))
            .min()
    }

    /// Drops what requester port `from`'s QP `qpn` still has here: the QP went to the
    /// error state, to reset, or away.
    pub fn forget(&mut self, from: usize, qpn: u32) {
        let of_qp = |carried: &Carried| carried.from == from && carried.request.source.qpn == qpn;
        self.parked.retain(|carried| !of_qp(carried));
        self.work.retain(|work| match work {
            Work::Request(carried) => !of_qp(carried),
            Work::Answer { .. } | Work::NotReady { .. } => true,
        });
    }

    fn drop_qp(&mut self, key: QpKey) {
        self.parked.retain(|carried| carried.key() != key);
        self.work.retain(|work| match work {
            Work::Request(carried) => carried.key() != key,
            Work::Answer { .. } | Work::NotReady { .. } => true,
        });
    }
}
