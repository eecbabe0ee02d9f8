//! Backends of the PVRDMA server, and the interface every backend shares.
//!
//! A backend never sees a PVRDMA structure. The device model resolves a work request into
//! backend-neutral terms — scatter-gather lists over guest memory ([`Sgl`]), an operation
//! ([`Operation`]) with its remote address, rkey and immediate data, and the destination
//! ([`Destination`]: a GID and a QPN) — and hands it to the [`Network`]. The network finds the
//! peer: for a device of the same process, the memcpy fabric ([`memcpy`]) lets the peer
//! device's model execute the operation directly against both guests' memories; the
//! TCP backend does the same for peers on other hosts. A QP the host's RDMA device carries
//! is driven through [`HostQps`] instead, its work posted to a host QP. The answer
//! ([`Outcome`] or [`RemoteError`]) is what the requester turns into its completion.
//!
//! See docs/backends.md for the whole design.

pub mod directory;
mod host_qps;
pub mod memcpy;
mod owned;
pub mod rdma;
mod sgl;
pub mod tcp;

pub use host_qps::{
    Connect, HostCompletion, HostDatagram, HostEvent, HostOp, HostPathError, HostPort, HostQpCaps,
    HostQps, HostReceipt, HostRegion, HostSend, KeyedSge, ReceiveError, SendSide,
    access as host_access,
};
pub use owned::OwnedRequest;
pub use sgl::{CopyError, Segment, Sgl, copy, gather};

/// Guest memory as the device maps it from the vfio-user client.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// A raw 128-bit GID (network order).
pub type Gid = [u8; 16];

/// Where a request goes: the peer port's GID and the destination QP number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub gid: Gid,
    pub qpn: u32,
}

/// Who sent a request, as the responder reports it in completions and GRHs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub gid: Gid,
    pub qpn: u32,
}

/// How hard a transport that can lose a request tries before it gives up (RC only), in the
/// QP's own IB terms: `timeout` (4.096 µs × 2^timeout, 0 = wait for ever), `retry_cnt`
/// retransmissions, `rnr_retry` receiver-not-ready retries (7 = for ever) spaced by
/// `min_rnr_timer` (the IB table code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
}

impl RetryPolicy {
    /// `rnr_retry` 7: receiver-not-ready is retried for ever.
    pub const RNR_FOR_EVER: u8 = 7;

    /// The pause before a request refused for receiver-not-ready is tried again: IB's
    /// `min_rnr_timer` table (code 0 is the longest, 655.36 ms).
    pub fn rnr_delay(&self) -> std::time::Duration {
        const MICROS: [u64; 32] = [
            655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560,
            3840, 5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
            163_840, 245_760, 327_680, 491_520,
        ];
        std::time::Duration::from_micros(MICROS[usize::from(self.min_rnr_timer & 31)])
    }
}

/// The transport service of the requesting QP: the responder only accepts requests from a
/// QP of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Reliable connected: the responder QP must be connected to the requester.
    Reliable,
    /// Datagram (UD and the GSI QP): `qkey` must match the responder's.
    Datagram { qkey: u32 },
}

/// An operation executed at the responder.
#[derive(Debug)]
pub enum Operation<'a> {
    /// SEND: the payload lands in the responder's next receive buffer.
    Send {
        payload: &'a Sgl,
        imm: Option<u32>,
        invalidate: Option<u32>,
        solicited: bool,
    },
    /// RDMA WRITE into `[remote_addr, +len)` of the region named by `rkey`; with immediate
    /// data it also consumes a receive buffer.
    Write {
        payload: &'a Sgl,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
        solicited: bool,
    },
    /// RDMA READ of `reply.len()` bytes at `remote_addr` into the requester's `reply`.
    Read {
        reply: &'a Sgl,
        remote_addr: u64,
        rkey: u32,
    },
    /// 64-bit atomic at `remote_addr`; the original value goes to the requester's `reply`.
    Atomic {
        kind: AtomicKind,
        reply: &'a Sgl,
        remote_addr: u64,
        rkey: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicKind {
    CompareSwap { compare: u64, swap: u64 },
    FetchAdd { add: u64 },
}

/// A request as the responder sees it.
#[derive(Debug)]
pub struct Request<'a> {
    pub source: Source,
    pub destination: Destination,
    pub service: Service,
    /// The requester's guest memory (payload of SEND/WRITE, reply buffer of READ/atomics).
    /// A transport that carries the request elsewhere hands the responder a staging buffer
    /// holding the payload instead, and carries the reply back.
    pub memory: &'a GuestMemory,
    pub operation: Operation<'a>,
    /// The requester's number for this work request: a [`Completion`] names it.
    pub ticket: u64,
    /// Changes whenever the requesting QP is created anew, so a transport never takes a new
    /// QP's requests for an old one's (its sequence numbers start again).
    pub epoch: u32,
    pub retry: RetryPolicy,
}

/// How a request left the requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Answered at once (the memcpy fabric, loopback, or a datagram a transport sent).
    Done(Result<Outcome, RemoteError>),
    /// Taken by a transport that answers later with a [`Completion`] for the ticket.
    Pending,
    /// The transport has no room now (flow control): the request was not taken; offer it
    /// again after the next completion of this device.
    Busy,
}

/// The answer to a [`Delivery::Pending`] request, for the requesting device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion<'a> {
    /// The requesting QP.
    pub qpn: u32,
    pub ticket: u64,
    pub result: Result<Outcome, RemoteError>,
    /// READ data or an atomic's original value, for the requester's reply buffer at
    /// `reply_offset`.
    pub reply: &'a [u8],
    pub reply_offset: u64,
    /// The last piece of the request (a large READ or WRITE travels in pieces): only then
    /// does the work request complete.
    pub last: bool,
}

/// What the responder did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes moved.
    pub bytes: u64,
}

/// Why the responder refused a request; the requester turns it into a completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("no port with that GID is reachable")]
    Unreachable,
    #[error("the destination QP does not exist or cannot receive this request")]
    InvalidRequest,
    #[error("no receive buffer is posted (receiver not ready)")]
    ReceiverNotReady,
    #[error("the rkey, range or access rights do not allow the access")]
    AccessError,
    #[error("the responder failed to execute the operation")]
    OperationError,
    #[error("datagram dropped (Q_Key mismatch, receive too small, or queue not ready)")]
    Dropped,
}

/// Carries requests to peers. The device calls it once per work request that leaves it.
pub trait Network {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery;

    /// Whether a port other than the asking device holds `gid`. A GID names exactly one
    /// port of the whole fabric: a device may not bind one that another holds, or it would
    /// receive (and could send as) that tenant's traffic.
    fn gid_taken(&self, gid: &Gid) -> bool;

    /// The requesting QP `qpn` of the port holding `gid` went to the error state, to reset,
    /// or away: a transport drops what it still holds of it (resends, retries), so nothing
    /// of the old QP reaches a peer later. Default: nothing to drop.
    fn forget_qp(&self, _gid: &Gid, _qpn: u32) {}

    /// Whether this network also carries the asking device's requests to itself
    /// (loopback), with the same receiver-not-ready timers as to any peer. Otherwise the
    /// device answers those itself. Default: it does not.
    fn carries_loopback(&self) -> bool {
        false
    }

    /// The host RDMA device's QPs, when this process has the rdma path, as the asking
    /// device sees them. Default: none.
    fn host(&self) -> Option<HostPort<'_>> {
        None
    }
}

/// The responder side, implemented by the device model: executes a request against its
/// own QPs, memory regions and guest memory.
pub trait Responder {
    /// Whether this device's port has `gid` in its GID table.
    fn has_gid(&self, gid: &Gid) -> bool;

    fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError>;
}

/// A network with no peers: every request is unreachable. For a device alone (and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Isolated;

impl Network for Isolated {
    fn deliver(&mut self, _request: &Request<'_>) -> Delivery {
        Delivery::Done(Err(RemoteError::Unreachable))
    }

    fn gid_taken(&self, _gid: &Gid) -> bool {
        false
    }
}
