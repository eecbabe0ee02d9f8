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
//! A device that sends to itself (loopback) goes through its own inbox the same way, after
//! the turn that sent it: the same order and the same receiver-not-ready timers.

mod inbox;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::{
    Completion, Delivery, Gid, HostPort, HostQps, Network, Outcome, OwnedRequest, RemoteError,
    Request, Responder,
};
use inbox::{Carried, Inbox, QpKey, Work};

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
    endpoint: Mutex<Held<E>>,
    /// The endpoint's wake events moved in work done outside its turns (a request executed
    /// on the fast path): its next turn counts as woken.
    woken: AtomicBool,
    /// Held only to put work in or take it out, never while another lock is taken.
    inbox: Mutex<Inbox>,
}

/// An endpoint with what the directory shows of it, both under the endpoint's lock, so
/// a turn learns whether its GIDs changed without touching the shared directory.
struct Held<E> {
    endpoint: E,
    published: Vec<Gid>,
}

pub struct MemcpyFabric<E> {
    ports: RwLock<Vec<Arc<Port<E>>>>,
    /// The GIDs each port holds, by port index: published after each of its turns, and
    /// claimed while it binds one (so two ports cannot bind the same GID at once).
    directory: RwLock<Vec<Vec<Gid>>>,
    remote: Mutex<Option<Remote>>,
    /// The host RDMA device's QPs (the rdma path), when this process has one.
    host: std::sync::OnceLock<Arc<dyn HostQps>>,
}

impl<E> Default for MemcpyFabric<E> {
    fn default() -> Self {
        MemcpyFabric {
            ports: RwLock::new(Vec::new()),
            directory: RwLock::new(Vec::new()),
            remote: Mutex::new(None),
            host: std::sync::OnceLock::new(),
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
            endpoint: Mutex::new(Held {
                endpoint,
                published: gids.clone(),
            }),
            woken: AtomicBool::new(false),
            inbox: Mutex::new(Inbox::default()),
        }));
        write(&self.directory).push(gids);
        ports.len() - 1
    }

    /// Sends requests for GIDs outside the fabric to `remote` (none: they are unreachable).
    pub fn set_remote(&self, remote: Remote) {
        *lock(&self.remote) = Some(remote);
    }

    /// Lets the devices drive the host RDMA device's QPs (the rdma path); once.
    pub fn set_host(&self, host: Arc<dyn HostQps>) {
        let _ = self.host.set(host);
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
        self.with_endpoint_waking(index, |endpoint, net| (work(endpoint, net), false))
    }

    /// As [`with_endpoint`](Self::with_endpoint), for work that knows it may have posted
    /// receives the endpoint's wake events do not show (exit-free doorbells overwrite each
    /// other): when it says so, the endpoint's waiting senders and the requests parked at it
    /// are tried again.
    pub fn with_endpoint_waking<R>(
        &self,
        index: usize,
        work: impl FnOnce(&mut E, &mut dyn Network) -> (R, bool),
    ) -> Option<R> {
        let mut visits = VecDeque::new();
        let result = self.turn(index, &mut visits, |endpoint, outbox| {
            work(endpoint, outbox)
        });
        self.carry(&mut visits);
        result
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

    /// One turn on endpoint `index` under its lock. `work` also says whether the endpoint
    /// may have posted receives whatever its wake events say.
    fn turn<R>(
        &self,
        index: usize,
        visits: &mut VecDeque<usize>,
        work: impl FnOnce(&mut E, &mut Outbox<'_, E>) -> (R, bool),
    ) -> Option<R> {
        let port = self.port(index)?;
        let mut held = lock(&port.endpoint);
        let Held {
            endpoint,
            published,
        } = &mut *held;
        let before = endpoint.wake_events();
        let mut outbox = Outbox {
            fabric: self,
            from: index,
            visits,
            claimed: Cell::new(false),
        };
        let (result, woken) = work(endpoint, &mut outbox);
        let woken = woken || port.woken.swap(false, Ordering::AcqRel);
        if woken || endpoint.wake_events() != before {
            // A receive may be there now: what waits for one here goes again.
            if lock(&port.inbox).unpark_all() {
                push_visit(outbox.visits, index);
            }
            endpoint.resume_stalled(&mut outbox);
        }
        // The directory shows what the port holds after its turn (a claim its device did
        // not bind after all lapses).
        if outbox.claimed.get() || !endpoint.same_gids(published) {
            *published = endpoint.gids();
            if let Some(entry) = write(&self.directory).get_mut(index) {
                entry.clone_from(published);
            }
        }
        Some(result)
    }

    /// Visits the inboxes in `visits` (and those the visits fill) until all are empty.
    fn carry(&self, visits: &mut VecDeque<usize>) {
        while let Some(index) = visits.pop_front() {
            self.turn(index, visits, |endpoint, outbox| {
                (self.drain(index, endpoint, outbox), false)
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

impl<E: Endpoint> Outbox<'_, E> {
    /// The fast path: when the responder's lock is free and nothing of the requesting QP
    /// waits in its inbox, a request of at most one piece executes at once, with no copy
    /// of it and no second visit. The responder's lock is only tried, never waited for,
    /// while the requester's is held, so no two threads can wait for each other; and the
    /// work is one bounded piece, as on a visit. `None`: go through the inbox.
    fn execute_now(
        &mut self,
        port: &Port<E>,
        to: usize,
        request: &Request<'_>,
    ) -> Option<Delivery> {
        if request_bytes(request) > PIECE {
            return None;
        }
        let key: QpKey = (self.from, request.source.qpn, request.epoch);
        let mut held = port.endpoint.try_lock().ok()?;
        if lock(&port.inbox).holds(key) {
            return None;
        }
        let endpoint = &mut held.endpoint;
        if !endpoint.has_gid(&request.destination.gid) {
            return Some(Delivery::Done(Err(RemoteError::Unreachable)));
        }
        let before = endpoint.wake_events();
        let result = endpoint.respond(request);
        if endpoint.wake_events() != before {
            port.woken.store(true, Ordering::Release);
            push_visit(self.visits, to);
        }
        drop(held);
        if request.service != crate::Service::Reliable {
            return Some(Delivery::Done(result));
        }
        match result {
            Err(RemoteError::ReceiverNotReady) if request.retry.rnr_retry != 0 => {
                // Waits at the responder as if it had come through the inbox.
                let carried = Carried::new(self.from, OwnedRequest::new(request));
                lock(&port.inbox).park(carried, Instant::now());
                notify(
                    self,
                    self.from,
                    Work::NotReady {
                        qpn: request.source.qpn,
                    },
                );
                Some(Delivery::Pending)
            }
            Err(_) => {
                lock(&port.inbox).failed_key(key);
                Some(Delivery::Done(result))
            }
            Ok(_) => Some(Delivery::Done(result)),
        }
    }
}

/// Bytes `request` moves (payload or reply).
fn request_bytes(request: &Request<'_>) -> u64 {
    match request.operation {
        crate::Operation::Send { payload, .. } | crate::Operation::Write { payload, .. } => {
            payload.len()
        }
        crate::Operation::Read { reply, .. } | crate::Operation::Atomic { reply, .. } => {
            reply.len()
        }
    }
}

impl<E: Endpoint> Network for Outbox<'_, E> {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery {
        let to = match self.fabric.holder(&request.destination.gid) {
            // Its own GID too (loopback): it goes through its own inbox, after this turn.
            Holder::One(to) => to,
            // Not in this process: another host's, if a transport knows it.
            Holder::None => {
                return match lock(&self.fabric.remote).as_mut() {
                    Some(remote) => remote.deliver(request),
                    None => Delivery::Done(Err(RemoteError::Unreachable)),
                };
            }
            Holder::Several => return Delivery::Done(Err(RemoteError::Unreachable)),
        };
        let Some(port) = self.fabric.port(to) else {
            return Delivery::Done(Err(RemoteError::Unreachable));
        };
        // Not for loopback: this port's lock is held, by this very turn.
        if to != self.from
            && let Some(delivery) = self.execute_now(&port, to, request)
        {
            return delivery;
        }
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

    fn carries_loopback(&self) -> bool {
        true
    }

    fn host(&self) -> Option<HostPort<'_>> {
        let qps = self.fabric.host.get()?;
        Some(HostPort {
            qps: qps.as_ref(),
            owner: self.from,
        })
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
