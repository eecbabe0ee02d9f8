//! One server's end of the TCP transport, without sockets, threads or clocks of its own
//! (docs/tcp-transport.md). The runtime feeds it frames and the time, and carries out the
//! [`Event`]s it produces; tests drive two nodes through an in-memory pipe.
//!
//! Reliable (RC) work follows what rxe does per QP, so a broken and restored connection
//! loses nothing and completes nothing twice:
//! - each request frame of a requesting QP has a sequence number, and is kept until the
//!   responder's answer to it arrives; answers come in order, one per frame;
//! - the responder executes a frame only when it is the next one in sequence; an older one
//!   is a retransmission, answered again from a small cache (atomics, statuses) or, for a
//!   READ, by reading again; a newer one (after a receiver-not-ready answer) is dropped;
//! - no answer within the QP's `timeout` resends everything unanswered, at most
//!   `retry_cnt` times, then the head request completes with `Unreachable`
//!   (RETRY_EXC_ERR); receiver-not-ready resends after `min_rnr_timer`, at most
//!   `rnr_retry` times (7: for ever);
//! - a link that comes back resends everything unanswered at once.
//!
//! Datagrams (UD, GSI) are sent once and complete at once, as on a real fabric.
//!
//! A reliable piece keeps no bytes while it waits for its answer: it names its request (the
//! requester's lists and a handle on its memory) and offset, and its frame is gathered when
//! the link has room for it, again for every resend. So what a link holds is bounded by
//! [`PRODUCE_AHEAD`] and the answers it queues ([`LINK_QUEUE`]), whatever its QPs have in
//! flight; each QP's window bounds what it may have unanswered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::out_queue::OutQueue;
use super::wire::{self, Frame, Op, RequestFrame, ResponseFrame, flags};
use crate::directory::GidHolders;
use crate::{
    AtomicKind, Delivery, Gid, Operation, Outcome, OwnedRequest, RemoteError, Request, RetryPolicy,
    Service, gather,
};

/// A peer server, named by the random id it announced in its HELLO.
pub type PeerId = u64;

/// Bytes one QP may have unanswered on a link before it is told to wait ([`Delivery::Busy`]):
/// a slow responder holds back that QP, not the link.
pub const QP_WINDOW: u64 = 4 << 20;
/// Bytes queued for one link's socket beyond which datagrams are dropped (reliable frames
/// are kept for resending anyway) and nothing more is read from that peer.
pub const LINK_QUEUE: usize = 64 << 20;
/// Bytes of request frames made ahead of a link's socket: frames are gathered from the
/// requesters' memory as the socket drains, so what the server holds for a link is this
/// (and one frame), whatever its QPs have in flight.
pub const PRODUCE_AHEAD: usize = 1 << 20;
/// A peer that sent nothing for this long is considered gone.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle link says it is alive.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// The shortest retransmission timeout, whatever the QP asks: a busy peer server may take
/// milliseconds to answer, and a spurious resend costs a retry.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Answers a responder remembers per requesting QP, for retransmissions.
const ANSWER_CACHE: usize = 64;
/// How long an answer that carries no data (a SEND's or WRITE's acknowledgement) may wait
/// for a request going the same way to share its write: in a ping-pong the guest answers
/// within microseconds, and one write and one read of the link are saved per message. A
/// requester's completion is late by at most this; READ and atomic replies never wait.
pub const ANSWER_HOLD: Duration = Duration::from_micros(50);
/// Remote requesting QPs this node keeps state for, all peers together: a peer that makes
/// up QP numbers cannot grow the table without bound.
const MAX_RECEIVERS: usize = 64 * 1024;
/// Datagrams kept for a peer whose link is being dialed (a directory named its server, but
/// no link is up yet), sent when it comes up: rdma_cm's first MAD is a datagram, and losing
/// it costs the guest a CM timeout of seconds.
const PARKED_BYTES: usize = 256 * 1024;
/// How long a peer a QP wanted is dialed for while its link is down.
pub const WANTED_FOR: Duration = Duration::from_secs(30);

/// What the runtime must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Execute `request` on the local device that holds `request.dst_gid`, then report the
    /// result with [`Node::answer`]. `replay`: a READ
    /// the requester sent again (its answer was lost), read again without changing state.
    Execute {
        peer: PeerId,
        request: RequestFrame,
        replay: bool,
    },
    /// Complete the local requester's work request.
    Complete {
        gid: Gid,
        qpn: u32,
        ticket: u64,
        result: Result<Outcome, RemoteError>,
        reply: Vec<u8>,
        reply_offset: u64,
        last: bool,
    },
}

struct Peer {
    up: bool,
    /// The GIDs this peer announced and we accepted.
    gids: Vec<Gid>,
    /// Which of them its host RDMA device holds (it said so; a subset of `gids`).
    rdma_gids: Vec<Gid>,
    out: OutQueue,
    /// Senders with pieces to write on this link, taken in turn as the socket drains.
    ready: VecDeque<QpKey>,
    last_heard: Instant,
    last_sent: Instant,
    down_since: Option<Instant>,
    /// Answers without data are held back until this, if `out` holds nothing but them:
    /// `out`'s length when the last was queued (anything queued since voids the hold).
    hold: Option<(Instant, usize)>,
    /// Datagram frames waiting for the link to come up (at most [`PARKED_BYTES`]).
    parked: Vec<u8>,
}

impl Peer {
    /// A peer with no link yet (or any more).
    fn down(now: Instant) -> Peer {
        Peer {
            up: false,
            gids: Vec::new(),
            rdma_gids: Vec::new(),
            out: OutQueue::default(),
            ready: VecDeque::new(),
            last_heard: now,
            last_sent: now,
            down_since: Some(now),
            hold: None,
            parked: Vec::new(),
        }
    }
}

/// A piece sent (or to send) and not answered yet. It holds no bytes: its frame is
/// gathered from the requester's memory whenever it is written, the first time and for
/// every resend, as rxe does.
struct Outstanding {
    seq: u32,
    /// What it holds of the QP's window (see [`piece_cost`]).
    cost: u64,
    request: Arc<OwnedRequest>,
    offset: u64,
}

/// A request taken whose later pieces wait for room in its QP's window (each piece is
/// gathered only when it is written to the link).
struct Unframed {
    request: Arc<OwnedRequest>,
    /// The offset of its next piece.
    next: u64,
}

/// A requesting QP's reliable state.
struct Sender {
    peer: PeerId,
    epoch: u32,
    next_seq: u32,
    unanswered: VecDeque<Outstanding>,
    unanswered_bytes: u64,
    policy: RetryPolicy,
    retries_left: u8,
    rnr_left: u8,
    deadline: Option<Instant>,
    rnr_until: Option<Instant>,
    /// The request being framed, if its pieces did not all fit the window yet: the QP's
    /// next request waits behind it ([`Delivery::Busy`]).
    unframed: Option<Unframed>,
    /// How many of `unanswered`, from the head, are written to the link since the last
    /// (re)send; the rest wait for their turn on it.
    written: usize,
    /// On its peer's `ready` list.
    ready: bool,
}

impl Sender {
    /// A requesting QP's state at the start of a connection to `peer`.
    fn new(peer: PeerId, request: &Request<'_>) -> Sender {
        Sender {
            peer,
            epoch: request.epoch,
            next_seq: 0,
            unanswered: VecDeque::new(),
            unanswered_bytes: 0,
            policy: request.retry,
            retries_left: request.retry.retry_cnt,
            rnr_left: request.retry.rnr_retry,
            deadline: None,
            rnr_until: None,
            unframed: None,
            written: 0,
            ready: false,
        }
    }

    /// Whether a piece costing `cost` fits the window now; an empty window takes any one
    /// piece, so a request larger than the window still goes.
    fn has_room(&self, cost: u64) -> bool {
        self.unanswered.is_empty() || self.unanswered_bytes.saturating_add(cost) <= QP_WINDOW
    }

    /// Takes `request`'s piece at `offset` with the next sequence number; it is written
    /// when its link has room, and kept until answered. Returns the offset of the next
    /// piece, `None` after the last.
    fn push_piece(&mut self, request: &Arc<OwnedRequest>, offset: u64) -> Option<u64> {
        let view = request.view();
        let cost = piece_cost(&view, offset);
        self.unanswered_bytes += cost;
        self.unanswered.push_back(Outstanding {
            seq: self.next_seq,
            cost,
            request: Arc::clone(request),
            offset,
        });
        self.next_seq = self.next_seq.wrapping_add(1);
        next_piece(&view, offset)
    }

    /// Takes as much of the request still being framed as the window has room for.
    fn fill(&mut self) {
        let Some(mut unframed) = self.unframed.take() else {
            return;
        };
        while self.has_room(piece_cost(&unframed.request.view(), unframed.next)) {
            match self.push_piece(&unframed.request, unframed.next) {
                Some(next) => unframed.next = next,
                None => return,
            }
        }
        self.unframed = Some(unframed);
    }

    /// Everything unanswered goes again: a resend, or a link that came back.
    fn rewind(&mut self) {
        self.written = 0;
    }

    fn has_unwritten(&self) -> bool {
        self.written < self.unanswered.len()
    }
}

/// Puts `key`'s sender on its peer's list of senders with something to write.
fn mark_ready(peers: &mut HashMap<PeerId, Peer>, key: QpKey, sender: &mut Sender) {
    if sender.ready || !sender.has_unwritten() {
        return;
    }
    if let Some(peer) = peers.get_mut(&sender.peer) {
        peer.ready.push_back(key);
        sender.ready = true;
    }
}

#[derive(Clone)]
struct Answer {
    seq: u32,
    response: ResponseFrame,
}

/// A responding QP's view of one remote requesting QP.
#[derive(Default)]
struct Receiver {
    epoch: u32,
    expected: u32,
    answers: VecDeque<Answer>,
    /// An error was answered: the requester's QP is in the error state and flushes what it
    /// sent behind, so nothing more of this epoch is executed (as one device's responder
    /// never sees work behind a failed request on the memcpy fabric).
    failed: bool,
}

type QpKey = (Gid, u32);

pub struct Node {
    id: u64,
    peers: HashMap<PeerId, Peer>,
    senders: HashMap<QpKey, Sender>,
    receivers: HashMap<(PeerId, Gid, u32), Receiver>,
    local_gids: Vec<Gid>,
    /// Which of `local_gids` this server's host RDMA device holds.
    local_rdma_gids: Vec<Gid>,
    events: VecDeque<Event>,
    /// Requests of peers whose links are backlogged, in arrival order: executed once the
    /// link drains, so answers nobody reads do not pile up.
    deferred: VecDeque<Event>,
    /// The peers `deferred` holds requests of (a handful), so that checking whether any of
    /// them drained costs nothing per event, however many requests wait.
    deferred_peers: Vec<PeerId>,
    /// Which server holds each GID, when a directory keeps GIDs (etcd): such a GID is
    /// routed to that server alone, whatever a peer announces.
    holders: Option<GidHolders>,
    /// Peers a QP sent to while their link was down, and when it last did: the runtime
    /// dials them.
    wanted: HashMap<PeerId, Instant>,
    /// A peer was added to `wanted` since the runtime last looked: dial without waiting
    /// for the redial period.
    fresh_wants: bool,
}

impl Node {
    pub fn new(id: u64) -> Node {
        Node {
            id,
            peers: HashMap::new(),
            senders: HashMap::new(),
            receivers: HashMap::new(),
            local_gids: Vec::new(),
            local_rdma_gids: Vec::new(),
            events: VecDeque::new(),
            deferred: VecDeque::new(),
            deferred_peers: Vec::new(),
            holders: None,
            wanted: HashMap::new(),
            fresh_wants: false,
        }
    }

    /// Routes the GIDs `holders` names to the servers it names (a directory's word, which
    /// overrides what peers announce); `None` routes by announcements alone.
    pub fn set_gid_holders(&mut self, holders: Option<GidHolders>) {
        self.holders = holders;
    }

    /// The version of the directory's holders this node routes by (0: none yet).
    pub fn holders_version(&self) -> u64 {
        self.holders.as_ref().map_or(0, |h| h.version)
    }

    /// The peers a QP has sent to while their link was down, within [`WANTED_FOR`]: the
    /// runtime dials them (the directory knows where they listen).
    pub fn wanted(&mut self, now: Instant) -> Vec<PeerId> {
        let peers = &self.peers;
        self.wanted.retain(|id, since| {
            now.duration_since(*since) < WANTED_FOR && !peers.get(id).is_some_and(|p| p.up)
        });
        self.wanted.keys().copied().collect()
    }

    /// Whether a peer was wanted anew since the last call.
    pub fn take_fresh_wants(&mut self) -> bool {
        std::mem::take(&mut self.fresh_wants)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    // ---- links ----

    /// The link to `peer` is established (HELLO and AUTH done): announce our GIDs and resend
    /// everything unanswered.
    pub fn link_up(&mut self, peer: PeerId, now: Instant) {
        let gids = self.local_gids.clone();
        self.wanted.remove(&peer);
        let entry = self.peers.entry(peer).or_insert_with(|| Peer::down(now));
        entry.up = true;
        entry.down_since = None;
        entry.last_heard = now;
        entry.out.clear();
        entry.ready.clear();
        wire::encode(&Frame::Gids(gids), entry.out.tail());
        wire::encode(
            &Frame::RdmaGids(self.local_rdma_gids.clone()),
            entry.out.tail(),
        );
        // Datagrams sent while it was dialed go right behind the GIDs they come from.
        let parked = std::mem::take(&mut entry.parked);
        entry.out.tail().extend_from_slice(&parked);
        entry.last_sent = now;
        for (key, sender) in self.senders.iter_mut().filter(|(_, s)| s.peer == peer) {
            sender.ready = false;
            sender.rewind();
            mark_ready(&mut self.peers, *key, sender);
            if !sender.unanswered.is_empty() {
                sender.deadline = deadline(now, sender.policy.timeout);
            }
        }
    }

    /// The link to `peer` broke. Unanswered requests wait for it to come back (or for their
    /// QP's retry budget); the peer's GIDs are kept for [`PEER_TIMEOUT`].
    pub fn link_down(&mut self, peer: PeerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.up
        {
            p.up = false;
            p.out.clear();
            p.ready.clear();
            p.down_since = Some(now);
            for sender in self.senders.values_mut().filter(|s| s.peer == peer) {
                sender.ready = false;
            }
        }
    }

    pub fn is_up(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Bytes to write to `peer`'s socket; call [`Node::sent`] with how many were written.
    /// Request frames are gathered here, [`PRODUCE_AHEAD`] at a time, the senders of the
    /// link taking turns piece by piece.
    pub fn outgoing(&mut self, peer: PeerId) -> &[u8] {
        self.produce(peer);
        self.peers.get(&peer).map_or(&[], |p| p.out.unwritten())
    }

    /// Whether `peer` has something to write, made or to be made.
    pub fn has_output(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.up && (!p.out.is_empty() || !p.ready.is_empty()))
    }

    /// Whether `peer`'s link has as much queued as it may ([`LINK_QUEUE`]): read nothing
    /// more from that peer until it drains, so a peer that sends requests without reading
    /// the answers is held back by TCP's own flow control instead of filling this server's
    /// memory.
    pub fn backlogged(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.out.len() >= LINK_QUEUE)
    }

    /// Writes the ready senders' next pieces into `peer`'s queue while it holds less than
    /// [`PRODUCE_AHEAD`]. A piece whose memory cannot be read fails its request.
    fn produce(&mut self, peer_id: PeerId) {
        let mut failed = Vec::new();
        {
            let Some(peer) = self.peers.get_mut(&peer_id).filter(|p| p.up) else {
                return;
            };
            while peer.out.len() < PRODUCE_AHEAD {
                let Some(key) = peer.ready.pop_front() else {
                    break;
                };
                let Some(sender) = self.senders.get_mut(&key).filter(|s| s.peer == peer_id) else {
                    continue;
                };
                let Some(piece) = sender.unanswered.get(sender.written) else {
                    sender.ready = false;
                    continue;
                };
                if let Err(error) = encode_piece(piece, peer.out.tail()) {
                    failed.push((key, piece.request.ticket, error));
                    sender.ready = false;
                    continue;
                }
                sender.written += 1;
                if sender.has_unwritten() {
                    peer.ready.push_back(key);
                } else {
                    sender.ready = false;
                }
            }
        }
        for (key, ticket, error) in failed {
            self.fail_sender(key, ticket, error);
        }
    }

    pub fn sent(&mut self, peer: PeerId, bytes: usize) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.out.consume(bytes);
            if p.out.is_empty() {
                p.hold = None;
            }
        }
    }

    /// Whether what is queued for `peer` is only answers that may still wait for a request
    /// to share their write ([`ANSWER_HOLD`]).
    pub fn holds(&self, peer: PeerId, now: Instant) -> bool {
        self.peers.get(&peer).is_some_and(|p| {
            p.ready.is_empty()
                && p.hold
                    .is_some_and(|(until, len)| now < until && p.out.len() == len)
        })
    }

    /// When the first held answer must be written, if one is held.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.hold.filter(|&(_, len)| p.out.len() == len))
            .map(|(until, _)| until)
            .min()
    }

    /// Peers with something to write.
    pub fn peers_with_output(&self) -> Vec<PeerId> {
        self.peers
            .keys()
            .filter(|id| self.has_output(**id))
            .copied()
            .collect()
    }

    // ---- GIDs ----

    /// The GIDs of this server's devices; peers hear of every change.
    pub fn set_local_gids(&mut self, mut gids: Vec<Gid>, now: Instant) {
        gids.sort_unstable();
        gids.dedup();
        if gids == self.local_gids {
            return;
        }
        self.local_gids = gids;
        // Which of them the rdma path reaches follows (a GID gone cannot stay in it).
        let rdma = std::mem::take(&mut self.local_rdma_gids);
        let frame = Frame::Gids(self.local_gids.clone());
        for peer in self.peers.values_mut().filter(|p| p.up) {
            wire::encode(&frame, peer.out.tail());
            peer.last_sent = now;
        }
        self.announce_rdma_gids(rdma, now, true);
    }

    /// Which of this server's GIDs its host RDMA device holds; peers hear of every change
    /// (each announcement is followed by this one, so a peer never sees a stale subset).
    pub fn set_local_rdma_gids(&mut self, gids: Vec<Gid>, now: Instant) {
        self.announce_rdma_gids(gids, now, false);
    }

    fn announce_rdma_gids(&mut self, mut gids: Vec<Gid>, now: Instant, always: bool) {
        gids.retain(|gid| self.local_gids.contains(gid));
        gids.sort_unstable();
        gids.dedup();
        if gids == self.local_rdma_gids && !always {
            return;
        }
        self.local_rdma_gids = gids;
        let frame = Frame::RdmaGids(self.local_rdma_gids.clone());
        for peer in self.peers.values_mut().filter(|p| p.up) {
            wire::encode(&frame, peer.out.tail());
            peer.last_sent = now;
        }
    }

    /// Whether the peer that holds `gid` said its host RDMA device holds it too: the rdma
    /// path can reach it.
    /// With a directory that names the GID's holder, the directory says (no link needed).
    pub fn rdma_reachable(&self, gid: &Gid) -> bool {
        if let Some(holders) = &self.holders
            && let Some(holder) = holders.holders.get(gid)
        {
            return holder.server != self.id && holders.rdma.contains(gid);
        }
        self.peers
            .values()
            .any(|p| p.gids.contains(gid) && p.rdma_gids.contains(gid))
    }

    /// Whether a peer server holds `gid` (so no local device may bind it).
    pub fn gid_taken(&self, gid: &Gid) -> bool {
        self.peer_of(gid).is_some()
    }

    /// The peer that holds `gid`: the server the directory names if it names one (`None`
    /// if that is this server), else the peer that announced it and was heard from lately.
    pub fn peer_of(&self, gid: &Gid) -> Option<PeerId> {
        if let Some(holder) = self.holders.as_ref().and_then(|h| h.holders.get(gid)) {
            return (holder.server != self.id).then_some(holder.server);
        }
        self.peers
            .iter()
            .find(|(_, p)| p.gids.contains(gid))
            .map(|(id, _)| *id)
    }

    /// How many of each peer's GIDs it said its host RDMA device holds.
    pub fn peer_rdma_gids(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.rdma_gids.len())
    }

    /// Each peer, whether its link is up, and how many GIDs it holds.
    pub fn peer_summary(&self) -> Vec<(PeerId, bool, usize)> {
        let mut out: Vec<_> = self
            .peers
            .iter()
            .map(|(id, p)| (*id, p.up, p.gids.len()))
            .collect();
        out.sort_unstable();
        out
    }

    fn accept_gids(&mut self, from: PeerId, announced: Vec<Gid>) {
        let mut accepted = Vec::new();
        for gid in announced {
            let elsewhere = self.local_gids.contains(&gid)
                || self
                    .peers
                    .iter()
                    .any(|(id, p)| *id != from && p.gids.contains(&gid));
            if elsewhere {
                warn!(
                    "peer {from:016x} announced GID {} that another port holds; refused",
                    std::net::Ipv6Addr::from(gid)
                );
            } else {
                accepted.push(gid);
            }
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            if peer.gids != accepted {
                info!("peer {from:016x} holds {} GIDs", accepted.len());
            }
            // Its rdma subset is announced after this; until then none is assumed.
            peer.rdma_gids.clear();
            peer.gids = accepted;
        }
    }

    /// A peer's word on which of its GIDs its host RDMA device holds: only GIDs it holds
    /// (and we accepted) count.
    fn accept_rdma_gids(&mut self, from: PeerId, mut announced: Vec<Gid>) {
        if let Some(peer) = self.peers.get_mut(&from) {
            // A set, not a scan per entry: a peer may announce thousands of GIDs, and this
            // runs on the thread that serves every device's links.
            let held: std::collections::HashSet<&Gid> = peer.gids.iter().collect();
            announced.retain(|gid| held.contains(gid));
            drop(held);
            announced.sort_unstable();
            announced.dedup();
            if peer.rdma_gids != announced {
                info!(
                    "peer {from:016x}: {} of its GIDs are on its RDMA device",
                    announced.len()
                );
            }
            peer.rdma_gids = announced;
        }
    }

    // ---- requester ----

    /// Sends `request` toward the peer that holds its destination GID.
    pub fn deliver(&mut self, request: &Request<'_>, now: Instant) -> Delivery {
        let Some(peer_id) = self.peer_of(&request.destination.gid) else {
            return Delivery::Done(Err(RemoteError::Unreachable));
        };
        // A server the directory names may have no link yet: it is dialed, and its work
        // waits as on a link that broke.
        let peer = self.peers.entry(peer_id).or_insert_with(|| Peer::down(now));
        if !peer.up && self.wanted.insert(peer_id, now).is_none() {
            self.fresh_wants = true;
        }
        if let Service::Datagram { .. } = request.service {
            let frames = match frames_of(request) {
                Ok(frames) => frames,
                Err(error) => return Delivery::Done(Err(error)),
            };
            // Unreliable: sent if the link can take it (or kept briefly while it is being
            // dialed), and complete either way.
            if peer.up && peer.out.len() < LINK_QUEUE {
                for frame in &frames {
                    wire::encode(&Frame::Request(frame.clone()), peer.out.tail());
                }
                peer.last_sent = now;
            } else if !peer.up && peer.parked.len() < PARKED_BYTES {
                for frame in &frames {
                    wire::encode(&Frame::Request(frame.clone()), &mut peer.parked);
                }
            }
            let bytes = frames.iter().map(|f| f.payload.len() as u64).sum();
            return Delivery::Done(Ok(Outcome { bytes }));
        }
        let key = (request.source.gid, request.source.qpn);
        let sender = self
            .senders
            .entry(key)
            .or_insert_with(|| Sender::new(peer_id, request));
        if sender.epoch != request.epoch || sender.peer != peer_id {
            // A new QP with an old number, or a connection to another server: start over.
            *sender = Sender::new(peer_id, request);
        }
        sender.policy = request.retry;
        if sender.unframed.is_some() || !sender.has_room(piece_cost(request, 0)) {
            return Delivery::Busy;
        }
        if let Operation::Send { payload, .. } = &request.operation
            && payload.len() > wire::MAX_PAYLOAD as u64
        {
            return Delivery::Done(Err(RemoteError::OperationError));
        }
        // Its lists and a handle on the requester's memory: the bytes are gathered when a
        // piece is written, as often as it is.
        let owned = Arc::new(OwnedRequest::new(request));
        if let Some(next) = sender.push_piece(&owned, 0) {
            sender.unframed = Some(Unframed {
                request: owned,
                next,
            });
            sender.fill();
        }
        if sender.deadline.is_none() && sender.rnr_until.is_none() {
            sender.deadline = deadline(now, sender.policy.timeout);
        }
        mark_ready(&mut self.peers, key, sender);
        if let Some(peer) = self.peers.get_mut(&peer_id) {
            peer.last_sent = now;
        }
        Delivery::Pending
    }

    /// A requesting QP's request `ticket` failed before all of it was sent: it completes
    /// with `error`, and nothing more of the QP is sent (it goes to the error state).
    fn fail_sender(&mut self, key: QpKey, ticket: u64, error: RemoteError) {
        self.senders.remove(&key);
        self.events.push_back(Event::Complete {
            gid: key.0,
            qpn: key.1,
            ticket,
            result: Err(error),
            reply: Vec::new(),
            reply_offset: 0,
            last: true,
        });
    }

    fn on_response(&mut self, from: PeerId, response: ResponseFrame, now: Instant) {
        let key = (response.src_gid, response.src_qpn);
        let Some(sender) = self.senders.get_mut(&key) else {
            return;
        };
        if sender.peer != from || sender.epoch != response.epoch {
            return;
        }
        // Answers come in order; anything but the head's is a duplicate or stale.
        if sender
            .unanswered
            .front()
            .is_none_or(|head| head.seq != response.seq)
        {
            return;
        }
        let result = wire::status_result(response.status, response.bytes);
        let complete = |result, reply: Vec<u8>, last| Event::Complete {
            gid: response.src_gid,
            qpn: response.src_qpn,
            ticket: response.ticket,
            result,
            reply,
            reply_offset: response.reply_offset,
            last,
        };
        match result {
            Err(RemoteError::ReceiverNotReady) => {
                // rnr_retry 7 retries for ever; otherwise each RNR answer spends one.
                if sender.policy.rnr_retry != 7 {
                    if sender.rnr_left == 0 {
                        self.events.push_back(complete(result, Vec::new(), true));
                        self.senders.remove(&key);
                        return;
                    }
                    sender.rnr_left -= 1;
                }
                sender.deadline = None;
                sender.rnr_until = Some(now + sender.policy.rnr_delay());
            }
            Err(_) => {
                // The QP goes to the error state and flushes the rest: nothing more of it
                // is worth resending.
                self.events.push_back(complete(result, Vec::new(), true));
                self.senders.remove(&key);
            }
            Ok(_) => {
                if let Some(head) = sender.unanswered.pop_front() {
                    sender.unanswered_bytes -= head.cost;
                    sender.written = sender.written.saturating_sub(1);
                }
                // The window opened: the rest of a large request may go now.
                sender.fill();
                mark_ready(&mut self.peers, key, sender);
                // Progress restores the budgets, as IB's retry counters do.
                sender.retries_left = sender.policy.retry_cnt;
                sender.rnr_left = sender.policy.rnr_retry;
                sender.deadline = if sender.unanswered.is_empty() {
                    None
                } else {
                    deadline(now, sender.policy.timeout)
                };
                let last = response.flags & flags::LAST != 0;
                self.events
                    .push_back(complete(result, response.reply, last));
            }
        }
    }

    // ---- responder ----

    /// Whether an [`Event::Execute`] still stands: a receiver-not-ready answer to an older
    /// request of the same QP voids the ones already queued behind it.
    pub fn still_wanted(&self, peer: PeerId, request: &RequestFrame, replay: bool) -> bool {
        if request.flags & flags::DATAGRAM != 0 || replay {
            return true;
        }
        self.receivers
            .get(&(peer, request.src_gid, request.src_qpn))
            .is_some_and(|r| {
                r.epoch == request.epoch && !r.failed && seq_before(request.seq, r.expected)
            })
    }

    fn on_request(&mut self, from: PeerId, request: RequestFrame) {
        let owner_ok = self.peer_of(&request.src_gid) == Some(from);
        if !owner_ok {
            warn!(
                "peer {from:016x} sent a request from GID {}, which it does not hold; dropped",
                std::net::Ipv6Addr::from(request.src_gid)
            );
            return;
        }
        if request.flags & flags::DATAGRAM != 0 {
            self.events.push_back(Event::Execute {
                peer: from,
                request,
                replay: false,
            });
            return;
        }
        let key = (from, request.src_gid, request.src_qpn);
        if self.receivers.len() >= MAX_RECEIVERS && !self.receivers.contains_key(&key) {
            warn!("peer {from:016x}: {MAX_RECEIVERS} remote QPs already known; request dropped");
            return;
        }
        let receiver = self.receivers.entry(key).or_default();
        if receiver.epoch != request.epoch {
            *receiver = Receiver {
                epoch: request.epoch,
                ..Receiver::default()
            };
        }
        if receiver.failed {
            // Sent behind a request that failed: the requester flushes it.
        } else if request.seq == receiver.expected {
            receiver.expected = receiver.expected.wrapping_add(1);
            self.events.push_back(Event::Execute {
                peer: from,
                request,
                replay: false,
            });
        } else if seq_before(request.seq, receiver.expected) {
            // A retransmission: the answer was lost with a broken link.
            let cached = receiver
                .answers
                .iter()
                .find(|a| a.seq == request.seq)
                .map(|a| a.response.clone());
            match cached {
                // A READ is answered by reading again (its data is not cached).
                Some(_) | None if request.op == Op::Read => {
                    self.events.push_back(Event::Execute {
                        peer: from,
                        request,
                        replay: true,
                    });
                }
                Some(response) => self.queue(from, &Frame::Response(response)),
                None => {}
            }
        }
        // Newer than expected: sent behind a request that got receiver-not-ready; the
        // requester resends it in order.
    }

    /// The result of an [`Event::Execute`]: answers the requester (datagrams get none).
    pub fn answer(
        &mut self,
        peer: PeerId,
        request: &RequestFrame,
        replay: bool,
        result: Result<Outcome, RemoteError>,
        reply: Vec<u8>,
        now: Instant,
    ) {
        if request.flags & flags::DATAGRAM != 0 {
            return;
        }
        let may_wait = reply.is_empty();
        let response = ResponseFrame {
            src_gid: request.src_gid,
            src_qpn: request.src_qpn,
            epoch: request.epoch,
            seq: request.seq,
            ticket: request.ticket,
            status: wire::status_code(&result),
            flags: request.flags & flags::LAST,
            bytes: result.map_or(0, |o| o.bytes),
            reply_offset: request.reply_offset,
            reply,
        };
        if let Some(receiver) = self
            .receivers
            .get_mut(&(peer, request.src_gid, request.src_qpn))
        {
            if replay || receiver.epoch != request.epoch {
                // Nothing to remember.
            } else if matches!(result, Err(RemoteError::Dropped)) {
                // Dropped on the floor, as a fabric drops a packet for a QP not ready yet:
                // no answer; the requester resends it (and what followed) after its timeout.
                receiver.expected = request.seq;
                return;
            } else if matches!(result, Err(RemoteError::ReceiverNotReady)) {
                // Not executed: the requester resends it (and what followed) later.
                receiver.expected = request.seq;
            } else {
                receiver.failed |= result.is_err();
                let mut cached = response.clone();
                if request.op == Op::Read {
                    cached.reply = Vec::new();
                }
                receiver.answers.push_back(Answer {
                    seq: request.seq,
                    response: cached,
                });
                if receiver.answers.len() > ANSWER_CACHE {
                    receiver.answers.pop_front();
                }
            }
        }
        let held = self.holds(peer, now);
        let Some(p) = self.peers.get_mut(&peer).filter(|p| p.up) else {
            return;
        };
        let nothing_else = p.out.is_empty() || held;
        wire::encode(&Frame::Response(response), p.out.tail());
        p.hold = match p.hold {
            _ if !may_wait || !nothing_else => None,
            Some((until, _)) if held => Some((until, p.out.len())),
            _ => Some((now + ANSWER_HOLD, p.out.len())),
        };
    }

    fn queue(&mut self, peer: PeerId, frame: &Frame) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.up
        {
            wire::encode(frame, p.out.tail());
        }
    }

    // ---- input and time ----

    /// A frame from `peer`'s link (after the handshake).
    pub fn receive(&mut self, peer: PeerId, frame: Frame, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_heard = now;
        }
        match frame {
            Frame::Gids(gids) => self.accept_gids(peer, gids),
            Frame::RdmaGids(gids) => self.accept_rdma_gids(peer, gids),
            Frame::Request(request) => self.on_request(peer, request),
            Frame::Response(response) => self.on_response(peer, response, now),
            Frame::Ping => {}
            Frame::Hello { .. } | Frame::Auth { .. } => {
                warn!("peer {peer:016x} sent a handshake frame on an open link; ignored");
            }
        }
    }

    /// Timers: resends, retry budgets, liveness. Returns the peers whose links must be
    /// closed (heard nothing for [`PEER_TIMEOUT`]).
    pub fn tick(&mut self, now: Instant) -> Vec<PeerId> {
        let mut silent = Vec::new();
        let mut forget = Vec::new();
        for (id, peer) in &mut self.peers {
            if peer.up {
                if now.duration_since(peer.last_heard) > PEER_TIMEOUT {
                    silent.push(*id);
                } else if now.duration_since(peer.last_sent) >= PING_EVERY {
                    wire::encode(&Frame::Ping, peer.out.tail());
                    peer.last_sent = now;
                }
            } else if peer
                .down_since
                .is_some_and(|since| now.duration_since(since) > PEER_TIMEOUT)
            {
                // Datagrams are not kept for a link that does not come.
                peer.parked = Vec::new();
                if !peer.gids.is_empty() {
                    forget.push(*id);
                }
            }
        }
        for id in &silent {
            warn!("peer {id:016x} is silent; closing its link");
            self.link_down(*id, now);
        }
        for id in forget {
            info!("peer {id:016x} is gone; forgetting its GIDs");
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.gids.clear();
            }
            self.receivers.retain(|(peer, _, _), _| *peer != id);
        }
        let mut failed = Vec::new();
        for (key, sender) in &mut self.senders {
            if let Some(until) = sender.rnr_until
                && now >= until
            {
                sender.rnr_until = None;
                sender.deadline = deadline(now, sender.policy.timeout);
                resend(&mut self.peers, *key, sender, now);
                continue;
            }
            let Some(due) = sender.deadline else { continue };
            if now < due || sender.unanswered.is_empty() {
                continue;
            }
            if sender.retries_left == 0 {
                failed.push(*key);
                continue;
            }
            sender.retries_left -= 1;
            sender.deadline = deadline(now, sender.policy.timeout);
            resend(&mut self.peers, *key, sender, now);
        }
        for key in failed {
            let Some(sender) = self.senders.remove(&key) else {
                continue;
            };
            let Some(head) = sender.unanswered.front() else {
                continue;
            };
            let ticket = head.request.ticket;
            warn!(
                "QP {} of GID {}: no answer after {} retries; giving up",
                key.1,
                std::net::Ipv6Addr::from(key.0),
                sender.policy.retry_cnt
            );
            self.events.push_back(Event::Complete {
                gid: key.0,
                qpn: key.1,
                ticket,
                result: Err(RemoteError::Unreachable),
                reply: Vec::new(),
                reply_offset: 0,
                last: true,
            });
        }
        silent
    }

    /// The next thing for the runtime to do. An [`Event::Execute`] that no longer stands
    /// (see [`Node::still_wanted`]) is dropped here, so callers carry out what they get.
    ///
    /// A peer's requests wait while its link is [backlogged](Node::backlogged): executing
    /// them would queue answers it is not taking. They go, in order, once it drains.
    pub fn next_event(&mut self) -> Option<Event> {
        self.restore_deferred();
        loop {
            let event = self.events.pop_front()?;
            if let Event::Execute {
                peer,
                request,
                replay,
            } = &event
            {
                if !self.still_wanted(*peer, request, *replay) {
                    continue;
                }
                if self.backlogged(*peer) {
                    if !self.deferred_peers.contains(peer) {
                        self.deferred_peers.push(*peer);
                    }
                    self.deferred.push_back(event);
                    continue;
                }
            }
            return Some(event);
        }
    }

    /// Puts the deferred requests of peers no longer backlogged back at the head of the
    /// queue, in their order, before anything of theirs that came later.
    fn restore_deferred(&mut self) {
        if !self.deferred_peers.iter().any(|p| !self.backlogged(*p)) {
            return;
        }
        let (ready, waiting): (VecDeque<Event>, VecDeque<Event>) =
            std::mem::take(&mut self.deferred)
                .into_iter()
                .partition(|event| match event {
                    Event::Execute { peer, .. } => !self.backlogged(*peer),
                    Event::Complete { .. } => true,
                });
        self.deferred = waiting;
        let peers = std::mem::take(&mut self.deferred_peers);
        self.deferred_peers = peers.into_iter().filter(|p| self.backlogged(*p)).collect();
        for event in ready.into_iter().rev() {
            self.events.push_front(event);
        }
    }

    /// Forgets a requesting QP (destroyed, or in the error state): nothing of it is resent.
    pub fn forget_qp(&mut self, gid: Gid, qpn: u32) {
        self.senders.remove(&(gid, qpn));
    }
}

/// Everything `sender` has unanswered is written again, gathered anew, in its turn.
fn resend(peers: &mut HashMap<PeerId, Peer>, key: QpKey, sender: &mut Sender, now: Instant) {
    sender.rewind();
    mark_ready(peers, key, sender);
    if let Some(peer) = peers.get_mut(&sender.peer) {
        peer.last_sent = now;
    }
}

/// Appends the frame of `piece`, gathered from its requester's memory now.
fn encode_piece(piece: &Outstanding, out: &mut Vec<u8>) -> Result<(), RemoteError> {
    let (mut frame, _) = piece_frame(&piece.request.view(), piece.offset)?;
    frame.seq = piece.seq;
    wire::encode(&Frame::Request(frame), out);
    Ok(())
}

/// The offset of the piece after `request`'s piece at `offset`; `None` after the last.
fn next_piece(request: &Request<'_>, offset: u64) -> Option<u64> {
    let total = match &request.operation {
        Operation::Write { payload, .. } => payload.len(),
        Operation::Read { reply, .. } => reply.len(),
        Operation::Send { .. } | Operation::Atomic { .. } => 0,
    };
    Some(offset + piece_len(request, offset)).filter(|&next| next < total)
}

/// Whether sequence number `a` comes before `b` (modulo 2^32).
fn seq_before(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// When an answer is due: 4.096 µs × 2^timeout (IB), at least [`MIN_TIMEOUT`]; timeout 0
/// waits for ever.
fn deadline(now: Instant, timeout: u8) -> Option<Instant> {
    if timeout == 0 {
        return None;
    }
    let nanos = 4096u64
        .checked_shl(u32::from(timeout.min(31)))
        .unwrap_or(u64::MAX);
    Some(now + Duration::from_nanos(nanos).max(MIN_TIMEOUT))
}

/// Bytes of transfer a piece of `request` at `offset` moves: payload it carries, or a
/// reply it asks for. The window counts these, so READs are bounded like WRITEs (a peer
/// answering a 2 GiB READ at once would queue 2 GiB).
fn piece_len(request: &Request<'_>, offset: u64) -> u64 {
    match &request.operation {
        Operation::Send { payload, .. } => payload.len(),
        Operation::Write { payload, .. } => payload.len().saturating_sub(offset).min(wire::CHUNK),
        Operation::Read { reply, .. } => reply.len().saturating_sub(offset).min(wire::CHUNK),
        Operation::Atomic { .. } => 8,
    }
}

/// What a piece holds of its QP's window: its transfer and its frame's fixed part.
fn piece_cost(request: &Request<'_>, offset: u64) -> u64 {
    piece_len(request, offset) + (wire::HEADER + wire::REQUEST_FIXED) as u64
}

/// The request frame (sequence number still 0) of `request`'s piece at `offset`, and the
/// offset of the next piece (`None` after the last). SENDs and atomics are one piece; a
/// WRITE or READ travels in pieces of [`wire::CHUNK`] (an empty one in one empty piece).
fn piece_frame(
    request: &Request<'_>,
    offset: u64,
) -> Result<(RequestFrame, Option<u64>), RemoteError> {
    let datagram = matches!(request.service, Service::Datagram { .. });
    let mut frame = RequestFrame {
        src_gid: request.source.gid,
        src_qpn: request.source.qpn,
        epoch: request.epoch,
        dst_gid: request.destination.gid,
        dst_qpn: request.destination.qpn,
        seq: 0,
        ticket: request.ticket,
        op: Op::Send,
        flags: if datagram { flags::DATAGRAM } else { 0 },
        qkey: match request.service {
            Service::Datagram { qkey } => qkey,
            Service::Reliable => 0,
        },
        imm: 0,
        invalidate: 0,
        rkey: 0,
        remote_addr: 0,
        read_len: 0,
        compare_add: 0,
        swap: 0,
        reply_offset: 0,
        payload: Vec::new(),
    };
    let read_payload = |sgl: &crate::Sgl, len: u64| {
        let mut out = Vec::with_capacity(len as usize);
        gather(request.memory, sgl, offset, len, &mut out)
            .map(|()| out)
            .map_err(|_| RemoteError::OperationError)
    };
    let solicited_flag = |solicited: bool| if solicited { flags::SOLICITED } else { 0 };
    let len = piece_len(request, offset);
    let next = next_piece(request, offset);
    if next.is_none() {
        frame.flags |= flags::LAST;
    }
    match &request.operation {
        Operation::Send {
            payload,
            imm,
            invalidate,
            solicited,
        } => {
            if payload.len() > wire::MAX_PAYLOAD as u64 {
                return Err(RemoteError::OperationError);
            }
            frame.op = Op::Send;
            frame.flags |= solicited_flag(*solicited);
            if let Some(imm) = imm {
                frame.flags |= flags::IMM;
                frame.imm = *imm;
            }
            if let Some(key) = invalidate {
                frame.flags |= flags::INVALIDATE;
                frame.invalidate = *key;
            }
            frame.payload = read_payload(payload, len)?;
        }
        Operation::Write {
            payload,
            remote_addr,
            rkey,
            imm,
            solicited,
        } => {
            frame.op = Op::Write;
            frame.rkey = *rkey;
            frame.remote_addr = remote_addr.wrapping_add(offset);
            frame.payload = read_payload(payload, len)?;
            if next.is_none() {
                frame.flags |= solicited_flag(*solicited);
                if let Some(imm) = imm {
                    frame.flags |= flags::IMM;
                    frame.imm = *imm;
                }
            }
        }
        Operation::Read {
            remote_addr, rkey, ..
        } => {
            frame.op = Op::Read;
            frame.rkey = *rkey;
            frame.remote_addr = remote_addr.wrapping_add(offset);
            // A piece is at most CHUNK (256 KiB) long.
            frame.read_len = len as u32;
            frame.reply_offset = offset;
        }
        Operation::Atomic {
            kind,
            remote_addr,
            rkey,
            ..
        } => {
            frame.rkey = *rkey;
            frame.remote_addr = *remote_addr;
            match kind {
                AtomicKind::CompareSwap { compare, swap } => {
                    frame.op = Op::CompareSwap;
                    frame.compare_add = *compare;
                    frame.swap = *swap;
                }
                AtomicKind::FetchAdd { add } => {
                    frame.op = Op::FetchAdd;
                    frame.compare_add = *add;
                }
            }
        }
    }
    Ok((frame, next))
}

/// Every frame of a datagram (a UD SEND: one), sent at once.
fn frames_of(request: &Request<'_>) -> Result<Vec<RequestFrame>, RemoteError> {
    let mut frames = Vec::new();
    let mut offset = Some(0);
    while let Some(at) = offset {
        let (frame, next) = piece_frame(request, at)?;
        frames.push(frame);
        offset = next;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests;
