//! The TCP transport's thread: the listening socket, the links to peer servers, the
//! handshake that proves a peer holds the cluster key, and the [`Node`] they feed.
//!
//! One thread serves every link with non-blocking sockets and `poll`. Requests from local
//! devices reach the node through [`RemoteNetwork`] (under the fabric's lock, so the node
//! is locked after the fabric, never before); the thread never holds the node's lock while
//! it calls into the [`Host`], which takes the fabric's.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use log::{debug, info, warn};
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use sha2::Sha256;

use super::execute::Staging;
use super::node::{Event, Node, PeerId};
use super::wire::{self, Decoder, Frame};
use crate::{Completion, Delivery, Gid, Network, Outcome, RemoteError, Request};

/// What the transport needs from the server it belongs to.
pub trait Host: Send + Sync + 'static {
    /// The GIDs the local devices hold now.
    fn local_gids(&self) -> Vec<Gid>;
    /// Which of them this server's host RDMA device holds (the rdma path); none by default.
    fn local_rdma_gids(&self) -> Vec<Gid> {
        Vec::new()
    }
    /// Runs a peer's request against the local device that holds its destination GID.
    fn respond(&self, request: &Request<'_>) -> Result<Outcome, RemoteError>;
    /// Hands an answer to the local device that holds `gid` (the requester).
    fn complete(&self, gid: &Gid, completion: &Completion<'_>);
}

/// How the transport is set up (`--listen`, `--peer`, `--cluster-key`).
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub peers: Vec<SocketAddr>,
    /// More peers, and who holds which GID (the etcd directory): see
    /// [`Transport::set_directory`].
    pub directory: Option<Arc<dyn crate::directory::Directory>>,
    /// The shared secret every server of the cluster holds. Without one, only peers on
    /// loopback are accepted.
    pub cluster_key: Option<Vec<u8>>,
}

/// How often the thread looks at timers and at the local GIDs.
const TICK: Duration = Duration::from_millis(10);
const GID_REFRESH: Duration = Duration::from_millis(50);
const REDIAL: Duration = Duration::from_millis(500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The transport, running.
pub struct Transport {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    local: Option<SocketAddr>,
}

struct Shared {
    node: Mutex<Node>,
    stop: AtomicBool,
    /// Written when a device queues work the device's own thread could not write, so the
    /// thread sends it without waiting a tick.
    wake: EventFd,
    /// A second handle on each up link's socket: a device's thread writes its request
    /// straight to the link (one wake-up less per request than handing it to the thread).
    /// Locked after the node, never before.
    streams: Mutex<HashMap<PeerId, TcpStream>>,
    /// Peers found at run time ([`Transport::set_directory`]), besides the configured ones.
    directory: Mutex<Option<Arc<dyn crate::directory::Directory>>>,
}

impl Shared {
    fn node(&self) -> MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<PeerId, TcpStream>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link to `peer` is gone: no handle on it stays for devices to write to.
    fn link_down(&self, peer: PeerId, now: Instant) {
        self.streams().remove(&peer);
        self.node().link_down(peer, now);
    }

    /// The directory in use, if any.
    fn directory(&self) -> Option<Arc<dyn crate::directory::Directory>> {
        self.directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The node, with the directory's holders handed to it first if they changed since
    /// it last got them (and whether they did). The transport's thread does this every
    /// [`GID_REFRESH`]; a device that finds no route, or binds a GID, asks at once, so a
    /// GID registered a moment ago is not taken for unknown. The holders are read (and
    /// copied, if they changed) before the node is locked: other devices need that lock.
    fn node_with_fresh_holders(&self, known: u64) -> (MutexGuard<'_, Node>, bool) {
        let fresh = self
            .directory()
            .and_then(|d| d.gid_holders())
            .filter(|holders| holders.version != known);
        let mut node = self.node();
        let changed = fresh.is_some_and(|holders| {
            let newer = holders.version != node.holders_version();
            if newer {
                node.set_gid_holders(Some(holders));
            }
            newer
        });
        (node, changed)
    }
}

impl Transport {
    /// Binds the listening socket and starts the transport's own thread.
    pub fn start(config: Config, host: Arc<dyn Host>) -> io::Result<Transport> {
        let (mut transport, mut pump) = Transport::start_driven(config, host)?;
        let thread = std::thread::Builder::new()
            .name("pvrdma-tcp".into())
            .spawn(move || {
                while pump.turn(TICK).is_some() {}
                pump.runtime.shut_down();
            })?;
        transport.thread = Some(thread);
        Ok(transport)
    }

    /// Binds the listening socket; the links are served by whoever calls [`Pump::turn`]
    /// (the exit-free doorbell poller, so that one busy thread both finds doorbells and
    /// reads frames, and a request crossing the servers wakes no thread on either side).
    pub fn start_driven(config: Config, host: Arc<dyn Host>) -> io::Result<(Transport, Pump)> {
        let listener = match config.listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let local = listener.as_ref().and_then(|l| l.local_addr().ok());
        let id = u64::from_le_bytes(random_bytes()?);
        if config.cluster_key.is_none() {
            info!("TCP transport: no --cluster-key, so only peers on loopback are accepted");
        }
        let shared = Arc::new(Shared {
            node: Mutex::new(Node::new(id)),
            stop: AtomicBool::new(false),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(io::Error::from)?,
            streams: Mutex::new(HashMap::new()),
            directory: Mutex::new(config.directory.clone()),
        });
        let staging = Staging::new()?;
        let now = Instant::now();
        let runtime = Runtime {
            id,
            config,
            listener,
            shared: Arc::clone(&shared),
            host,
            staging,
            conns: Vec::new(),
            next_dial: HashMap::new(),
            known: HashMap::new(),
            targets: Vec::new(),
            // Read on the first turn.
            targets_read: now - REDIAL,
            last_gids: now - GID_REFRESH,
            last_tick: now,
            fds: Vec::new(),
            quick_turns: 0,
        };
        info!(
            "TCP transport {id:016x} started{}",
            local.map_or(String::new(), |a| format!(", listening on {a}"))
        );
        Ok((
            Transport {
                shared,
                thread: None,
                local,
            },
            Pump { runtime },
        ))
    }

    /// Takes `directory` into account from now on (the etcd directory, which needs the
    /// transport's id and address before it can register them): the local GIDs are
    /// published to it, the GIDs it names are routed to the servers it names, and those
    /// servers are dialed when a QP sends to them.
    pub fn set_directory(&self, directory: Arc<dyn crate::directory::Directory>) {
        *self
            .shared
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(directory);
    }

    /// The id this transport's handshake names it by (random, new at every start).
    pub fn id(&self) -> u64 {
        self.shared.node().id()
    }

    /// Where the transport listens (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The [`Network`] a fabric chains behind its own devices.
    pub fn network(&self) -> RemoteNetwork {
        RemoteNetwork {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Each peer: its id, whether its link is up, and how many GIDs it holds.
    pub fn peers(&self) -> Vec<(PeerId, bool, usize)> {
        self.shared.node().peer_summary()
    }

    /// Whether a peer announced `gid` as held by its host RDMA device.
    pub fn rdma_reachable(&self, gid: &Gid) -> bool {
        self.shared.node().rdma_reachable(gid)
    }

    /// A handle that reads [`Transport::peers`] from elsewhere (the profiler).
    pub fn peer_view(&self) -> PeerView {
        PeerView {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Reads the transport's peers without owning the transport.
#[derive(Clone)]
pub struct PeerView {
    shared: Arc<Shared>,
}

impl PeerView {
    /// Each peer: its id, whether its link is up, and how many GIDs it holds.
    pub fn peers(&self) -> Vec<(PeerId, bool, usize)> {
        self.shared.node().peer_summary()
    }

    /// How many of `peer`'s GIDs it said its host RDMA device holds.
    pub fn rdma_gids(&self, peer: PeerId) -> usize {
        self.shared.node().peer_rdma_gids(peer)
    }

    /// Whether a peer announced `gid` as held by its host RDMA device.
    pub fn rdma_reachable(&self, gid: &Gid) -> bool {
        self.shared.node().rdma_reachable(gid)
    }
}

impl std::fmt::Debug for PeerView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerView")
    }
}

/// The links of a transport started with [`Transport::start_driven`], served on the thread
/// that owns this.
pub struct Pump {
    runtime: Runtime,
}

impl Pump {
    /// One pass over the links: waits up to `timeout` for a socket or a device's work,
    /// then reads, runs what the frames ask, keeps time and writes. Returns whether
    /// anything arrived or was done, or `None` once the transport was dropped.
    pub fn turn(&mut self, timeout: Duration) -> Option<bool> {
        if self.runtime.shared.stop.load(Ordering::Acquire) {
            return None;
        }
        Some(self.runtime.turn(timeout))
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.runtime.shut_down();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The transport as the fabric's network for GIDs of other hosts.
pub struct RemoteNetwork {
    shared: Arc<Shared>,
}

impl Network for RemoteNetwork {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery {
        let mut node = self.shared.node();
        let mut delivery = node.deliver(request, Instant::now());
        if delivery == Delivery::Done(Err(RemoteError::Unreachable)) {
            let known = node.holders_version();
            drop(node);
            let changed;
            (node, changed) = self.shared.node_with_fresh_holders(known);
            if changed {
                delivery = node.deliver(request, Instant::now());
            }
        }
        let Some(peer) = node.peer_of(&request.destination.gid) else {
            return delivery;
        };
        // Write what is queued for that link now, from this thread; what the socket does
        // not take (or a link without a handle yet) is left to the transport's thread.
        let written = {
            let mut streams = self
                .shared
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match streams.get_mut(&peer) {
                Some(stream) => loop {
                    let out = node.outgoing(peer);
                    if out.is_empty() {
                        break true;
                    }
                    match stream.write(out) {
                        Ok(n) => node.sent(peer, n),
                        Err(_) => break false,
                    }
                },
                None => false,
            }
        };
        drop(node);
        if !written {
            // Non-blocking; a full counter means the thread is being woken anyway.
            let _ = self.shared.wake.write(1);
        }
        delivery
    }

    fn gid_taken(&self, gid: &Gid) -> bool {
        let known = self.shared.node().holders_version();
        self.shared.node_with_fresh_holders(known).0.gid_taken(gid)
    }

    fn forget_qp(&self, gid: &Gid, qpn: u32) {
        self.shared.node().forget_qp(*gid, qpn);
    }
}

enum State {
    /// Waiting for the peer's HELLO (ours is sent).
    Hello,
    /// HELLO seen; waiting for the peer's AUTH.
    Auth {
        peer: PeerId,
        nonce: [u8; 16],
    },
    Up {
        peer: PeerId,
    },
}

struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    dialed: bool,
    /// The configured peer address this connection was dialed to.
    target: Option<SocketAddr>,
    decoder: Decoder,
    /// Handshake bytes not yet written (links write from the node's queue).
    out: Vec<u8>,
    nonce: [u8; 16],
    state: State,
    opened: Instant,
    closed: bool,
}

struct Runtime {
    id: u64,
    config: Config,
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    host: Arc<dyn Host>,
    staging: Staging,
    conns: Vec<Conn>,
    next_dial: HashMap<SocketAddr, Instant>,
    /// The peer each configured address turned out to be, so a peer already linked (by
    /// its own dialing) is not dialed again.
    known: HashMap<SocketAddr, PeerId>,
    /// The addresses to dial: the configured peers and the directory's.
    targets: Vec<SocketAddr>,
    targets_read: Instant,
    last_gids: Instant,
    last_tick: Instant,
    /// The poll set of the last wait, reused.
    fds: Vec<Ready>,
    /// Zero-timeout turns since the sockets were last polled.
    quick_turns: u32,
}

/// What the last wait found ready.
#[derive(Debug, Clone, Copy, Default)]
struct Ready {
    readable: bool,
}

/// How much one read takes from a link.
const READ_CHUNK: usize = 256 * 1024;
/// Turns with a zero timeout between two real polls of the sockets (see [`Runtime::wait`]).
const QUICK_TURNS: u32 = 63;

impl Runtime {
    /// One pass of the loop (see [`Pump::turn`]).
    fn turn(&mut self, timeout: Duration) -> bool {
        self.dial();
        let listener_ready = self.wait(timeout);
        let mut progress = false;
        if listener_ready {
            progress |= self.accept();
        }
        let now = Instant::now();
        for i in 0..self.conns.len() {
            // A connection opened in this pass was not polled: try it anyway.
            if self.fds.get(i).is_none_or(|r| r.readable) {
                progress |= self.read(i, now);
            }
        }
        progress |= self.run_events();
        if now.duration_since(self.last_gids) >= GID_REFRESH {
            self.last_gids = now;
            let gids = self.host.local_gids();
            let rdma_gids = self.host.local_rdma_gids();
            let holders = self.directories().into_iter().find_map(|directory| {
                directory.publish_gids(&gids, &rdma_gids);
                directory.gid_holders()
            });
            let mut node = self.shared.node();
            if let Some(holders) = holders
                && holders.version != node.holders_version()
            {
                node.set_gid_holders(Some(holders));
            }
            node.set_local_gids(gids, now);
            node.set_local_rdma_gids(rdma_gids, now);
        }
        if now.duration_since(self.last_tick) >= TICK {
            self.last_tick = now;
            let silent = self.shared.node().tick(now);
            for conn in &mut self.conns {
                if let State::Up { peer } = conn.state
                    && silent.contains(&peer)
                {
                    conn.closed = true;
                }
            }
            progress |= self.run_events();
        }
        for i in 0..self.conns.len() {
            progress |= self.write(i, now);
        }
        self.reap(now);
        progress
    }

    /// Takes every link down in the node (the transport is going away).
    fn shut_down(&mut self) {
        let now = Instant::now();
        for conn in self.conns.drain(..) {
            if let State::Up { peer } = conn.state {
                self.shared.link_down(peer, now);
            }
        }
    }

    /// Sleeps until a socket is ready, a device queued work (the eventfd) or `timeout`
    /// passed; records which links are readable and returns whether a peer is waiting to
    /// be accepted.
    fn wait(&mut self, timeout: Duration) -> bool {
        if timeout.is_zero() && self.quick_turns < QUICK_TURNS {
            // Spinning: each link is read without asking poll first (one system call per
            // turn instead of two); the listener and the eventfd wait for a real poll.
            self.quick_turns += 1;
            self.fds.clear();
            self.fds.resize(self.conns.len(), Ready { readable: true });
            return false;
        }
        self.quick_turns = 0;
        let mut fds = Vec::with_capacity(self.conns.len() + 2);
        fds.push(PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN));
        if let Some(listener) = &self.listener {
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        }
        let first_conn = fds.len();
        let node = self.shared.node();
        let now = Instant::now();
        // Held answers are written when their hold ends, if nothing took them before.
        let timeout = node.hold_deadline().map_or(timeout, |until| {
            timeout.min(until.saturating_duration_since(now))
        });
        for conn in &self.conns {
            let pending = !conn.out.is_empty()
                || matches!(conn.state, State::Up { peer }
                    if node.has_output(peer) && !node.holds(peer, now));
            let backlogged = matches!(conn.state, State::Up { peer } if node.backlogged(peer));
            let mut flags = PollFlags::empty();
            if !backlogged {
                flags |= PollFlags::POLLIN;
            }
            if pending {
                flags |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(conn.stream.as_fd(), flags));
        }
        drop(node);
        // ppoll: the poller's pauses are µs, which poll's milliseconds would round up.
        let polled = ppoll(&mut fds, Some(TimeSpec::from_duration(timeout)), None);
        // A failed poll (EINTR) looks at everything, as a timeout did before.
        let ready = |fd: &PollFd<'_>| {
            polled.is_err()
                || fd.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP)
                })
        };
        if ready(&fds[0]) {
            let _ = self.shared.wake.read();
        }
        let listener_ready = self.listener.is_some() && ready(&fds[1]);
        let readable: Vec<Ready> = fds[first_conn..]
            .iter()
            .map(|fd| Ready {
                readable: ready(fd),
            })
            .collect();
        drop(fds);
        self.fds = readable;
        listener_ready
    }

    /// The directories in use (the configured one, or the one set at run time).
    fn directories(&self) -> Vec<Arc<dyn crate::directory::Directory>> {
        self.shared.directory().into_iter().collect()
    }

    fn dial(&mut self) {
        let now = Instant::now();
        // The directory's view changes rarely: read it once per redial period, not per turn.
        // A QP waiting for a server the directory named is dialed at once.
        let fresh_wants = self.shared.node().take_fresh_wants();
        if now.duration_since(self.targets_read) >= REDIAL || fresh_wants {
            self.targets_read = now;
            let mut targets = self.config.peers.clone();
            let directories = self.directories();
            let wanted = self.shared.node().wanted(now);
            let on_demand = wanted
                .iter()
                .filter_map(|&server| directories.iter().find_map(|d| d.address_of(server)));
            let listed = directories.iter().flat_map(|d| d.peers());
            let local = self.listener.as_ref().and_then(|l| l.local_addr().ok());
            for addr in listed.chain(on_demand) {
                if Some(addr) != local && !targets.contains(&addr) {
                    targets.push(addr);
                }
            }
            self.targets = targets;
        }
        for index in 0..self.targets.len() {
            let target = self.targets[index];
            let connected = self
                .conns
                .iter()
                .any(|c| c.target == Some(target) && !c.closed);
            let linked = self.known.get(&target).is_some_and(|&peer| {
                self.conns
                    .iter()
                    .any(|c| !c.closed && matches!(c.state, State::Up { peer: p } if p == peer))
            });
            if connected || linked || self.next_dial.get(&target).is_some_and(|&t| now < t) {
                continue;
            }
            self.next_dial.insert(target, now + REDIAL);
            match connect_nonblocking(target) {
                Ok(stream) => {
                    debug!("connecting to peer {target}");
                    self.open(stream, target, true, Some(target));
                }
                Err(e) => debug!("cannot reach peer {target}: {e}"),
            }
        }
    }

    /// Accepts every peer waiting; whether there was one.
    fn accept(&mut self) -> bool {
        let mut accepted_any = false;
        loop {
            let accepted = match &self.listener {
                Some(listener) => listener.accept(),
                None => return accepted_any,
            };
            match accepted {
                Ok((stream, addr)) => {
                    if self.config.cluster_key.is_none() && !addr.ip().is_loopback() {
                        warn!(
                            "refused peer {addr}: without --cluster-key only loopback peers are accepted"
                        );
                        continue;
                    }
                    accepted_any = true;
                    self.open(stream, addr, false, None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return accepted_any,
                Err(e) => {
                    warn!("accepting a peer failed: {e}");
                    return accepted_any;
                }
            }
        }
    }

    fn open(
        &mut self,
        stream: TcpStream,
        addr: SocketAddr,
        dialed: bool,
        target: Option<SocketAddr>,
    ) {
        if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
            return;
        }
        let Ok(nonce) = random_bytes::<16>() else {
            return;
        };
        let mut out = Vec::new();
        wire::encode(
            &Frame::Hello {
                version: wire::VERSION,
                node: self.id,
                nonce,
            },
            &mut out,
        );
        self.conns.push(Conn {
            stream,
            addr,
            dialed,
            target,
            decoder: Decoder::new(),
            out,
            nonce,
            state: State::Hello,
            opened: Instant::now(),
            closed: false,
        });
    }

    /// Reads what link `i` has and handles its frames; whether anything arrived.
    fn read(&mut self, i: usize, now: Instant) -> bool {
        if let State::Up { peer } = self.conns[i].state
            && self.shared.node().backlogged(peer)
        {
            // Answers to that peer are not being taken: its requests wait in the socket.
            return false;
        }
        let mut arrived = false;
        loop {
            let conn = &mut self.conns[i];
            if conn.closed {
                return arrived;
            }
            match conn.decoder.read_from(&mut conn.stream, READ_CHUNK) {
                Ok(0) => {
                    debug!("peer {} closed the link", conn.addr);
                    conn.closed = true;
                    return true;
                }
                Ok(n) => {
                    arrived = true;
                    // A short read emptied the socket: asking again would only hear EAGAIN.
                    if n < READ_CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("link to {} failed: {e}", conn.addr);
                    conn.closed = true;
                    return true;
                }
            }
            // Bound what one link may make this thread buffer before frames are taken.
            if conn.decoder.buffered() > wire::MAX_FRAME + wire::HEADER {
                break;
            }
        }
        loop {
            let next = self.conns[i].decoder.next_frame();
            match next {
                Ok(Some(frame)) => self.on_frame(i, frame, now),
                Ok(None) => return arrived,
                Err(e) => {
                    warn!(
                        "malformed frame from peer {}: {e}; closing the link",
                        self.conns[i].addr
                    );
                    self.conns[i].closed = true;
                    return true;
                }
            }
            if self.conns[i].closed {
                return true;
            }
        }
    }

    fn on_frame(&mut self, i: usize, frame: Frame, now: Instant) {
        let key = self.config.cluster_key.clone();
        let conn = &mut self.conns[i];
        match (&conn.state, frame) {
            (State::Up { peer }, frame) => {
                let peer = *peer;
                self.shared.node().receive(peer, frame, now);
            }
            (
                State::Hello,
                Frame::Hello {
                    version,
                    node,
                    nonce,
                },
            ) => {
                if version != wire::VERSION || node == self.id {
                    warn!(
                        "peer {} speaks version {version} (we speak {}) or is this server; closing",
                        conn.addr,
                        wire::VERSION
                    );
                    conn.closed = true;
                    return;
                }
                if let Some(target) = conn.target {
                    self.known.insert(target, node);
                }
                let mac = proof(key.as_deref(), &nonce, self.id, &conn.nonce);
                wire::encode(&Frame::Auth { mac }, &mut conn.out);
                conn.state = State::Auth { peer: node, nonce };
            }
            (State::Auth { peer, nonce }, Frame::Auth { mac }) => {
                let (peer, their_nonce) = (*peer, *nonce);
                // The peer proves it holds the key by binding our fresh nonce, its id and its
                // nonce under it: an answer recorded from another handshake does not fit.
                let expected = proof(key.as_deref(), &conn.nonce, peer, &their_nonce);
                if !constant_time_eq(&mac, &expected) {
                    warn!("peer {} failed the cluster-key check; closing", conn.addr);
                    conn.closed = true;
                    return;
                }
                self.established(i, peer, now);
            }
            (_, other) => {
                warn!(
                    "peer {} sent {:?} during the handshake; closing",
                    conn.addr,
                    std::mem::discriminant(&other)
                );
                conn.closed = true;
            }
        }
    }

    fn established(&mut self, i: usize, peer: PeerId, now: Instant) {
        // Two servers that dial each other end up with two links: both keep the one dialed
        // by the server with the lower id.
        let dialer_wins = |conn: &Conn| {
            let dialer = if conn.dialed { self.id } else { peer };
            dialer == self.id.min(peer)
        };
        // A connection to this peer that closed in this very pass is still marked Up until
        // it is reaped, and reaping an Up connection takes the peer's link down: the link
        // is this connection's now.
        for conn in &mut self.conns {
            if conn.closed && matches!(conn.state, State::Up { peer: p } if p == peer) {
                conn.state = State::Hello;
            }
        }
        if let Some(j) = self
            .conns
            .iter()
            .position(|c| matches!(c.state, State::Up { peer: p } if p == peer) && !c.closed)
        {
            if dialer_wins(&self.conns[i]) && !dialer_wins(&self.conns[j]) {
                // The node's link moves to the new connection: the old one closes without
                // taking the link down with it (reap only downs connections that are Up).
                self.conns[j].closed = true;
                self.conns[j].state = State::Hello;
                self.shared.link_down(peer, now);
            } else {
                self.conns[i].closed = true;
                return;
            }
        }
        let conn = &mut self.conns[i];
        conn.state = State::Up { peer };
        info!("link to peer {peer:016x} at {} is up", conn.addr);
        let handle = conn.stream.try_clone();
        self.shared.node().link_up(peer, now);
        if let Ok(handle) = handle {
            self.shared.streams().insert(peer, handle);
        }
    }

    /// Carries out what the node asked for, one event at a time, never holding the node's
    /// lock while the host works (the host takes the fabric's).
    fn run_events(&mut self) -> bool {
        let mut ran = false;
        loop {
            let event = self.shared.node().next_event();
            let Some(event) = event else { return ran };
            ran = true;
            match event {
                Event::Execute {
                    peer,
                    request,
                    replay,
                } => {
                    let host = &self.host;
                    let (result, reply) = self.staging.execute(&request, |r| host.respond(r));
                    self.shared.node().answer(
                        peer,
                        &request,
                        replay,
                        result,
                        reply,
                        Instant::now(),
                    );
                }
                Event::Complete {
                    gid,
                    qpn,
                    ticket,
                    result,
                    reply,
                    reply_offset,
                    last,
                } => {
                    self.host.complete(
                        &gid,
                        &Completion {
                            qpn,
                            ticket,
                            result,
                            reply: &reply,
                            reply_offset,
                            last,
                        },
                    );
                }
            }
        }
    }

    /// Writes what is queued for link `i`; whether any byte went out.
    fn write(&mut self, i: usize, now: Instant) -> bool {
        let conn = &mut self.conns[i];
        if conn.closed {
            return false;
        }
        let mut wrote = false;
        while !conn.out.is_empty() {
            match conn.stream.write(&conn.out) {
                Ok(n) => {
                    wrote = true;
                    conn.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return wrote,
                Err(_) => {
                    conn.closed = true;
                    return true;
                }
            }
        }
        let State::Up { peer } = conn.state else {
            return wrote;
        };
        let mut node = self.shared.node();
        if node.holds(peer, now) {
            return wrote;
        }
        loop {
            let out = node.outgoing(peer);
            if out.is_empty() {
                return wrote;
            }
            match conn.stream.write(out) {
                Ok(n) => {
                    wrote = true;
                    node.sent(peer, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return wrote,
                Err(_) => {
                    conn.closed = true;
                    return true;
                }
            }
        }
    }

    fn reap(&mut self, now: Instant) {
        for conn in &mut self.conns {
            if !matches!(conn.state, State::Up { .. })
                && now.duration_since(conn.opened) > HANDSHAKE_TIMEOUT
            {
                warn!("peer {} did not finish the handshake; closing", conn.addr);
                conn.closed = true;
            }
        }
        let shared = &self.shared;
        self.conns.retain(|conn| {
            if !conn.closed {
                return true;
            }
            if let State::Up { peer } = conn.state {
                info!("link to peer {peer:016x} at {} is down", conn.addr);
                shared.link_down(peer, now);
            }
            false
        });
    }
}

/// What a server answers a peer's HELLO with: HMAC-SHA256, under the cluster key, of the
/// peer's nonce, its own id and its own nonce (zeros without a key: loopback only).
fn proof(key: Option<&[u8]>, their_nonce: &[u8; 16], my_id: u64, my_nonce: &[u8; 16]) -> [u8; 32] {
    let Some(key) = key else {
        return [0; 32];
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"pvrdma-tcp-auth");
    mac.update(their_nonce);
    mac.update(&my_id.to_le_bytes());
    mac.update(my_nonce);
    mac.finalize().into_bytes().into()
}

/// Compares two MACs without an early exit, so timing tells an attacker nothing.
/// Starts a TCP connection without waiting for it: the thread that dials also serves every
/// link (and, exit-free, finds the doorbells), so a peer whose host is gone must not hold it
/// for a connect timeout. The HELLO waits in the connection's queue until the socket is
/// writable; a refused connection fails its first read or write, and one that never
/// completes is closed by the handshake timeout.
fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, connect, socket,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let connected = match addr {
        SocketAddr::V4(v4) => connect(raw, &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => connect(raw, &SockaddrIn6::from(v6)),
    };
    match connected {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}
