//! The memcpy fabric: the devices served by one process, joined like ports of one switch.
//!
//! Each endpoint (a device with its guest memory and interrupts) sits behind a lock of its
//! own, and a thread holds at most one endpoint's lock at a time. So no device's work runs
//! under a lock another device needs, and no order of locking can deadlock:
//!
//! - Work on an endpoint (a doorbell, a command, a peer's answer) runs under its lock. A
//!   request for another endpoint goes into that endpoint's inbox and the requester goes on
//!   ([`Delivery::Pending`]); the answer comes back through the requester's inbox as a
//!   [`Completion`]. Datagrams are answered at once: nothing comes back for them.
//! - After its turn the thread carries what it queued: it takes each filled inbox's endpoint
//!   lock in turn and executes what waits there. The responder copies straight between the
//!   two guests' memories ([`crate::copy`]); nothing is staged. One visit does at most
//!   [`BYTES_PER_VISIT`] bytes and [`ITEMS_PER_VISIT`] items, and a large WRITE or READ goes
//!   in pieces of [`PIECE`] bytes, so no endpoint's lock is held long whatever a guest asks.
//! - A reliable request refused for receiver-not-ready waits in the responder's inbox, with
//!   the later requests of the same QP behind it (a QP's requests execute in order). It is
//!   tried again whenever the responder may have posted a receive (its wake events moved),
//!   and when its RNR timer (`min_rnr_timer`) ends ([`MemcpyFabric::tick`]); each timer
//!   retry spends one of the QP's `rnr_retry` (7: for ever), and when none is left the
//!   request fails with [`RemoteError::ReceiverNotReady`].
//!
//! A device that sends to itself (loopback) answers its own requests without the fabric.

mod inbox;
mod owned;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

pub use owned::OwnedRequest;

use super::{Completion, Delivery, Gid, Network, Outcome, RemoteError, Request, Responder};
use inbox::{Carried, Inbox, Work};

/// Where requests for GIDs no endpoint of the fabric holds go: the transports to other
/// hosts (TCP), chained behind the fabric.
pub type Remote = Box<dyn Network + Send>;

/// Bytes one visit to an endpoint executes before its lock is let go (the rest waits for
/// the next visit, which the same thread makes after the other inboxes it filled).
pub const BYTES_PER_VISIT: u64 = 8 << 20;
/// Requests and answers one visit takes before its lock is let go.
pub const ITEMS_PER_VISIT: usize = 256;
/// The largest piece of a WRITE or READ executed at once.
pub const PIECE: u64 = 2 << 20;

/// What the fabric needs of an endpoint beyond answering requests.
pub trait Endpoint: Responder {
    /// The answer to a request this endpoint's device issued and the fabric carried.
    fn complete(&mut self, completion: &Completion<'_>, net: &mut dyn Network);

    /// A count that moves whenever something happened that a sender waiting for this
    /// endpoint's receiver may wait for (a receive posted, a QP changed or gone).
    fn wake_events(&self) -> u64;

    /// A responder refused request of this endpoint's QP `qpn` for receiver-not-ready and
    /// keeps it to retry (once per request; for the requester's counters).
    fn receiver_not_ready(&mut self, _qpn: u32) {}

    /// Retries this endpoint's own send queues that wait (loopback receiver-not-ready).
    fn resume_stalled(&mut self, net: &mut dyn Network);

    /// The GIDs the endpoint's port holds.
    fn gids(&self) -> Vec<Gid>;

    /// Whether the port holds exactly `gids`, in this order (cheap: asked after each turn).
    fn same_gids(&self, gids: &[Gid]) -> bool;
}

struct Port<E> {
    endpoint: Mutex<E>,
    /// Held only to put work in or take it out, never while another lock is taken.
    inbox: Mutex<Inbox>,
}

pub struct MemcpyFabric<E> {
    ports: RwLock<Vec<Arc<Port<E>>>>,
    /// The GIDs each port holds, by port index: published after each of its turns, and
    /// claimed while it binds one (so two ports cannot bind the same GID at once).
    directory: RwLock<Vec<Vec<Gid>>>,
    remote: Mutex<Option<Remote>>,
}

impl<E> Default for MemcpyFabric<E> {
    fn default() -> Self {
        MemcpyFabric {
            ports: RwLock::new(Vec::new()),
            directory: RwLock::new(Vec::new()),
            remote: Mutex::new(None),
        }
    }
}

/// Who holds a GID.
enum Holder {
    None,
    One(usize),
    /// Binding refuses a GID another port holds, so this cannot arise; if it ever did,
    /// neither holder gets the traffic rather than the wrong one.
    Several,
}

impl<E: Endpoint> MemcpyFabric<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an endpoint; returns its index.
    pub fn add(&self, endpoint: E) -> usize {
        let gids = endpoint.gids();
        let mut ports = write(&self.ports);
        ports.push(Arc::new(Port {
            endpoint: Mutex::new(endpoint),
            inbox: Mutex::new(Inbox::default()),
        }));
        write(&self.directory).push(gids);
        ports.len() - 1
    }

    /// Sends requests for GIDs outside the fabric to `remote` (none: they are unreachable).
    pub fn set_remote(&self, remote: Remote) {
        *lock(&self.remote) = Some(remote);
    }

    /// Whether the remote transport knows a peer that holds `gid`.
    pub fn remote_holds(&self, gid: &Gid) -> bool {
        lock(&self.remote)
            .as_ref()
            .is_some_and(|remote| remote.gid_taken(gid))
    }

    /// The endpoint that holds `gid`, if exactly one does.
    pub fn find(&self, gid: &Gid) -> Option<usize> {
        match self.holder(gid) {
            Holder::One(index) => Some(index),
            Holder::None | Holder::Several => None,
        }
    }

    /// Every GID the endpoints hold.
    pub fn gids(&self) -> Vec<Gid> {
        read(&self.directory).iter().flatten().copied().collect()
    }

    pub fn len(&self) -> usize {
        read(&self.ports).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every endpoint index, for work that visits them all.
    pub fn indices(&self) -> std::ops::Range<usize> {
        0..self.len()
    }

    /// Runs `work` on endpoint `index` with the rest of the fabric as its network, then
    /// carries the requests and answers it produced (see the module docs). `None` if there
    /// is no such endpoint.
    pub fn with_endpoint<R>(
        &self,
        index: usize,
        work: impl FnOnce(&mut E, &mut dyn Network) -> R,
    ) -> Option<R> {
        let mut visits = VecDeque::new();
        let result = self.turn(index, &mut visits, false, |endpoint, outbox| {
            work(endpoint, outbox)
        });
        self.carry(&mut visits);
        result
    }

    /// Tells endpoint `index` that it may have posted receives the fabric could not see
    /// (exit-free doorbells overwrite each other): its waiting senders and the requests
    /// parked at it are tried again.
    pub fn wake(&self, index: usize) {
        let mut visits = VecDeque::new();
        self.turn(index, &mut visits, true, |_, _| ());
        self.carry(&mut visits);
    }

    /// Tries again the parked requests whose RNR timer ended by `now`; returns when the
    /// next timer ends, if any request is parked.
    pub fn tick(&self, now: Instant) -> Option<Instant> {
        let ports: Vec<Arc<Port<E>>> = read(&self.ports).clone();
        let mut visits = VecDeque::new();
        for (index, port) in ports.iter().enumerate() {
            if lock(&port.inbox).unpark_due(now) {
                push_visit(&mut visits, index);
            }
        }
        self.carry(&mut visits);
        ports
            .iter()
            .filter_map(|port| lock(&port.inbox).next_due())
            .min()
    }

    /// Requests waiting at their responders for receiver-not-ready.
    pub fn parked(&self) -> usize {
        read(&self.ports)
            .iter()
            .map(|port| lock(&port.inbox).parked_len())
            .sum()
    }

    fn port(&self, index: usize) -> Option<Arc<Port<E>>> {
        read(&self.ports).get(index).cloned()
    }

    fn holder(&self, gid: &Gid) -> Holder {
        let directory = read(&self.directory);
        let mut holders = directory
            .iter()
            .enumerate()
            .filter(|(_, gids)| gids.contains(gid));
        match (holders.next(), holders.next()) {
            (None, _) => Holder::None,
            (Some((index, _)), None) => Holder::One(index),
            (Some(_), Some(_)) => Holder::Several,
        }
    }

    /// One turn on endpoint `index` under its lock; `woken` says it may have posted
    /// receives whatever its wake events say.
    fn turn<R>(
        &self,
        index: usize,
        visits: &mut VecDeque<usize>,
        woken: bool,
        work: impl FnOnce(&mut E, &mut Outbox<'_, E>) -> R,
    ) -> Option<R> {
        let port = self.port(index)?;
        let mut endpoint = lock(&port.endpoint);
        let before = endpoint.wake_events();
        let mut outbox = Outbox {
            fabric: self,
            from: index,
            visits,
            claimed: Cell::new(false),
        };
        let result = work(&mut endpoint, &mut outbox);
        if woken || endpoint.wake_events() != before {
            // A receive may be there now: what waits for one here goes again.
            if lock(&port.inbox).unpark_all() {
                push_visit(outbox.visits, index);
            }
            endpoint.resume_stalled(&mut outbox);
        }
        self.publish_gids(index, &endpoint, outbox.claimed.get());
        Some(result)
    }

    /// Makes the directory show the GIDs endpoint `index` holds after its turn (dropping
    /// a claim its device did not bind after all).
    fn publish_gids(&self, index: usize, endpoint: &E, claimed: bool) {
        let current = read(&self.directory)
            .get(index)
            .is_some_and(|gids| endpoint.same_gids(gids));
        if (claimed || !current)
            && let Some(entry) = write(&self.directory).get_mut(index)
        {
            *entry = endpoint.gids();
        }
    }

    /// Visits the inboxes in `visits` (and those the visits fill) until all are empty.
    fn carry(&self, visits: &mut VecDeque<usize>) {
        while let Some(index) = visits.pop_front() {
            self.turn(index, visits, false, |endpoint, outbox| {
                self.drain(index, endpoint, outbox)
            });
            if visits.contains(&index) {
                // That inbox holds more than one visit's worth (a large copy): the thread
                // lets other threads have its core before it goes on, the copy being the
                // one guest's affair.
                std::thread::yield_now();
            }
        }
    }

    /// Executes what waits in endpoint `index`'s inbox, up to one visit's budget.
    fn drain(&self, index: usize, endpoint: &mut E, outbox: &mut Outbox<'_, E>) {
        let Some(port) = self.port(index) else { return };
        let mut bytes = BYTES_PER_VISIT;
        for _ in 0..ITEMS_PER_VISIT {
            let Some(work) = lock(&port.inbox).take() else {
                return;
            };
            match work {
                Work::Answer {
                    qpn,
                    ticket,
                    result,
                } => endpoint.complete(
                    &Completion {
                        qpn,
                        ticket,
                        result,
                        reply: &[],
                        reply_offset: 0,
                        last: true,
                    },
                    outbox,
                ),
                Work::NotReady { qpn } => endpoint.receiver_not_ready(qpn),
                Work::Request(carried) => {
                    self.execute(&port, endpoint, outbox, carried, &mut bytes);
                }
            }
            if bytes == 0 {
                break;
            }
        }
        // Out of budget with work left: the next visit goes on, after the others.
        if !lock(&port.inbox).is_idle() {
            push_visit(outbox.visits, index);
        }
    }

    /// Executes one carried request at its responder (as much of it as `bytes` allows).
    fn execute(
        &self,
        port: &Port<E>,
        endpoint: &mut E,
        outbox: &mut Outbox<'_, E>,
        carried: Carried,
        bytes: &mut u64,
    ) {
        // Behind a request of the same QP that waits for a receiver, it waits too; behind
        // one that failed, it is dropped (the requester flushes it).
        let Some(mut carried) = lock(&port.inbox).admit(carried) else {
            return;
        };
        if !endpoint.has_gid(&carried.request.destination.gid) {
            // The GID left this port after the request was addressed to it.
            return answer(outbox, &carried, Err(RemoteError::Unreachable));
        }
        match run(endpoint, &carried.request, carried.done, bytes) {
            Step::Partial(done) => {
                carried.done = done;
                lock(&port.inbox).put_back(carried);
            }
            Step::Finished(Err(RemoteError::ReceiverNotReady)) if carried.request.is_reliable() => {
                let (from, qpn, first) = (
                    carried.from,
                    carried.request.source.qpn,
                    carried.rnr.is_none(),
                );
                let parked = lock(&port.inbox).park(carried, Instant::now());
                if first {
                    notify(outbox, from, Work::NotReady { qpn });
                }
                if let Some(carried) = parked {
                    answer(outbox, &carried, Err(RemoteError::ReceiverNotReady));
                }
            }
            Step::Finished(result) => {
                if result.is_err() && carried.request.is_reliable() {
                    lock(&port.inbox).failed(&carried);
                }
                answer(outbox, &carried, result);
            }
        }
    }
}

/// How far a request got in one go.
enum Step {
    Finished(Result<Outcome, RemoteError>),
    /// A WRITE or READ out of budget: bytes done so far.
    Partial(u64),
}

/// Executes `request` from byte `done` on, spending `bytes` of the visit's budget: whole if
/// it is indivisible, else in pieces of at most [`PIECE`] until done or out of budget.
fn run<E: Endpoint>(endpoint: &mut E, request: &OwnedRequest, done: u64, bytes: &mut u64) -> Step {
    let total = request.bytes();
    if !request.divisible() {
        *bytes = bytes.saturating_sub(total);
        return Step::Finished(endpoint.respond(&request.view()));
    }
    let mut done = done;
    loop {
        let len = (total - done.min(total)).min(PIECE);
        let mut local = crate::Sgl::new();
        if let Err(error) = endpoint.respond(&request.piece(done, len, &mut local)) {
            return Step::Finished(Err(error));
        }
        done += len;
        *bytes = bytes.saturating_sub(len);
        if done >= total {
            return Step::Finished(Ok(Outcome { bytes: total }));
        }
        if *bytes == 0 {
            return Step::Partial(done);
        }
    }
}

/// Sends the answer to a reliable request back to its requester's inbox (a datagram was
/// answered when it was sent).
fn answer<E: Endpoint>(
    outbox: &mut Outbox<'_, E>,
    carried: &Carried,
    result: Result<Outcome, RemoteError>,
) {
    if !carried.request.is_reliable() {
        return;
    }
    let work = Work::Answer {
        qpn: carried.request.source.qpn,
        ticket: carried.request.ticket,
        result,
    };
    notify(outbox, carried.from, work);
}

/// Puts `work` in requester port `from`'s inbox.
fn notify<E: Endpoint>(outbox: &mut Outbox<'_, E>, from: usize, work: Work) {
    let Some(requester) = outbox.fabric.port(from) else {
        return;
    };
    lock(&requester.inbox).push(work);
    push_visit(outbox.visits, from);
}

/// The network of endpoint `from` during its turn: the other endpoints' inboxes, then the
/// transports to other hosts.
struct Outbox<'f, E> {
    fabric: &'f MemcpyFabric<E>,
    from: usize,
    /// Inboxes this turn filled, to visit after it.
    visits: &'f mut VecDeque<usize>,
    /// Whether the endpoint claimed a GID (it is binding one).
    claimed: Cell<bool>,
}

impl<E: Endpoint> Network for Outbox<'_, E> {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery {
        let to = match self.fabric.holder(&request.destination.gid) {
            Holder::One(to) if to != self.from => to,
            // Not in this process: another host's, if a transport knows it.
            Holder::None => {
                return match lock(&self.fabric.remote).as_mut() {
                    Some(remote) => remote.deliver(request),
                    None => Delivery::Done(Err(RemoteError::Unreachable)),
                };
            }
            // The asking port itself (its device answers those alone), or several.
            Holder::One(_) | Holder::Several => {
                return Delivery::Done(Err(RemoteError::Unreachable));
            }
        };
        let Some(port) = self.fabric.port(to) else {
            return Delivery::Done(Err(RemoteError::Unreachable));
        };
        let carried = Carried::new(self.from, OwnedRequest::new(request));
        let reliable = carried.request.is_reliable();
        let bytes = carried.request.bytes();
        lock(&port.inbox).push(Work::Request(carried));
        push_visit(self.visits, to);
        if reliable {
            Delivery::Pending
        } else {
            // A datagram is sent once it leaves: whether it lands is not the sender's to
            // learn.
            Delivery::Done(Ok(Outcome { bytes }))
        }
    }

    fn gid_taken(&self, gid: &Gid) -> bool {
        // The remote first, without the directory: a transport may call into the fabric
        // while it holds its own locks.
        if lock(&self.fabric.remote)
            .as_ref()
            .is_some_and(|remote| remote.gid_taken(gid))
        {
            return true;
        }
        let mut directory = write(&self.fabric.directory);
        let taken = directory
            .iter()
            .enumerate()
            .any(|(index, gids)| index != self.from && gids.contains(gid));
        if !taken && let Some(own) = directory.get_mut(self.from) {
            // Claimed until the turn ends, when the directory shows what the port holds.
            own.push(*gid);
            self.claimed.set(true);
        }
        taken
    }

    fn forget_qp(&self, gid: &Gid, qpn: u32) {
        if let Some(remote) = lock(&self.fabric.remote).as_ref() {
            remote.forget_qp(gid, qpn);
        }
        let ports: Vec<Arc<Port<E>>> = read(&self.fabric.ports).clone();
        for port in ports {
            lock(&port.inbox).forget(self.from, qpn);
        }
    }
}

fn push_visit(visits: &mut VecDeque<usize>, index: usize) {
    if !visits.contains(&index) {
        visits.push_back(index);
    }
}

/// Locks that survive a thread that panicked while holding them: every piece of work on
/// the fabric is self-contained.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
