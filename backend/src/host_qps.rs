//! The seam through which the device model drives queue pairs that the host's RDMA device
//! carries (the rdma path, docs/rdma-transport.md), in terms that name no PVRDMA
//! structure: the device decides *what* (create, connect, post, complete), the
//! implementation behind [`HostQps`] decides whether the host device can, and does it.
//!
//! A guest QP backed by a host QP takes the host QP's number, and a guest MR registered
//! with the host device takes the host MR's key, so the guest's numbers, keys and addresses
//! go on the wire unchanged: nothing is translated per work request, and nothing needs to
//! be exchanged between servers beyond which GIDs their devices reach.

use crate::{GuestMemory, RemoteError};

/// What a host QP is created with: the guest QP's queue sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostQpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
    pub send_sge: u32,
    pub recv_sge: u32,
}

/// The IB access bits (`IB_ACCESS_*`), which the guest's and the host's verbs share.
pub mod access {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 2;
    pub const REMOTE_READ: u32 = 4;
    pub const REMOTE_ATOMIC: u32 = 8;
}

/// Where an RC QP connects, as the guest's MODIFY_QP to RTR says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    /// The guest's own GID the QP sends from.
    pub sgid: [u8; 16],
    pub dgid: [u8; 16],
    pub dest_qpn: u32,
    pub rq_psn: u32,
    /// IB's `enum ib_mtu` (1 = 256 … 5 = 4096).
    pub path_mtu: u32,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    /// What peers may do to the QP's memory ([`access`] bits).
    pub access: u32,
}

/// How an RC QP sends, as the guest's MODIFY_QP to RTS says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendSide {
    pub sq_psn: u32,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub max_rd_atomic: u8,
}

/// One scatter-gather entry as the guest wrote it: its own address and key, which the host
/// registration of the guest's MR understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostOp {
    Send {
        imm: Option<u32>,
    },
    Write {
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    },
    Read {
        remote_addr: u64,
        rkey: u32,
    },
    CompareSwap {
        remote_addr: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    },
    FetchAdd {
        remote_addr: u64,
        rkey: u32,
        add: u64,
    },
    /// A UD send from the guest's `sgid` to QP `remote_qpn` at `dgid`.
    Datagram {
        sgid: [u8; 16],
        dgid: [u8; 16],
        remote_qpn: u32,
        qkey: u32,
        imm: Option<u32>,
    },
}

/// A send work request for a host QP.
#[derive(Debug, Clone, Copy)]
pub struct HostSend<'a> {
    /// The requester's number for it: the completion names it.
    pub ticket: u64,
    pub op: HostOp,
    pub sges: &'a [KeyedSge],
    pub solicited: bool,
}

/// Why the host path cannot do something; the log says which call and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostPathError(pub String);

/// A guest MR registered with the host device: the key the guest adopts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRegion {
    pub key: u32,
}

/// What a host QP's receive completion says (the data is already in guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostReceipt {
    /// The receive's number as it was posted.
    pub ticket: u64,
    pub result: Result<(), ReceiveError>,
    pub byte_len: u32,
    pub imm: Option<u32>,
    /// The receive was consumed by an RDMA WRITE with immediate, not a SEND.
    pub by_write: bool,
    pub src_qp: u32,
}

/// How a receive failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    /// The buffer is too small for the message.
    Length,
    /// The buffer's key or range is not the guest's.
    Protection,
    /// The QP went to the error state before a message came.
    Flushed,
    /// Anything else the host device reported.
    Other,
}

/// A datagram a host UD QP received: the server took it into a buffer of its own, and the
/// device delivers it to the guest's receive queue as it delivers any datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDatagram {
    pub sgid: [u8; 16],
    pub dgid: [u8; 16],
    pub src_qp: u32,
    pub imm: Option<u32>,
    pub payload: Box<[u8]>,
}

/// What a host QP completed, for the device that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A send work request is done: the same answer a transport gives
    /// ([`crate::Completion`]), READ data and atomics already in guest memory.
    Sent {
        ticket: u64,
        result: Result<(), RemoteError>,
    },
    Received(HostReceipt),
    /// A host UD QP received a datagram.
    Datagram(HostDatagram),
    /// The host QP is in the error state on its own (a fatal QP error, its port down, the
    /// device gone): the guest QP follows, with the guest's async event.
    Failed,
}

/// A host QP's completion, routed to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCompletion {
    /// The fabric endpoint that created the QP.
    pub owner: usize,
    pub qpn: u32,
    pub event: HostEvent,
}

/// The host device's QPs and registrations, shared by the devices of one process. Every
/// call is made under the calling device's lock; an implementation never calls back into a
/// device.
pub trait HostQps: Send + Sync {
    /// Whether the host device holds `gid` (a host interface carries the guest's address):
    /// only then can the host carry that guest's traffic, and its MRs are worth registering
    /// (registering pins their pages).
    fn offers(&self, gid: &[u8; 16]) -> bool;

    /// A host QP for a new RC QP of endpoint `owner` in the guest's PD `pd`: its number,
    /// which the guest adopts. Each guest PD has a host PD of its own, so no guest's keys
    /// reach another's memory through the host device.
    fn create_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError>;

    /// A host QP for a new UD QP of endpoint `owner` in the guest's PD `pd`: its number.
    /// Its datagrams are received into buffers of the server's, and handed to the device
    /// ([`HostEvent::Datagram`]), which delivers them as it delivers any datagram: a UD QP
    /// receives from every path at once, so its receive queue stays the device's.
    fn create_ud_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError>;

    /// A host UD QP to RTS, taking datagrams with `qkey`, sending from `sq_psn`.
    fn ready_ud_qp(&self, qpn: u32, qkey: u32, sq_psn: u32) -> Result<(), HostPathError>;

    /// Whether a datagram from the guest's `sgid` to `dgid` goes through the host device.
    fn carries_to(&self, sgid: &[u8; 16], dgid: &[u8; 16]) -> bool;

    /// The guest destroyed the QP (or its device was reset).
    fn destroy_qp(&self, qpn: u32);

    /// RESET → INIT.
    fn init_qp(&self, qpn: u32, access: u32) -> Result<(), HostPathError>;

    /// INIT → RTR, if the host device is the path to `connect.dgid`: `Ok(())` means the host
    /// QP carries the guest QP from now on; an error says why not (the guest QP then takes
    /// another path).
    fn connect_qp(&self, qpn: u32, connect: &Connect) -> Result<(), HostPathError>;

    /// RTR → RTS.
    fn ready_qp(&self, qpn: u32, send: &SendSide) -> Result<(), HostPathError>;

    /// To RESET (`error` false) or to the error state, which flushes what it holds.
    fn stop_qp(&self, qpn: u32, error: bool);

    /// Posts one send work request; its answer comes as a [`HostEvent::Sent`].
    fn post_send(&self, qpn: u32, send: &HostSend<'_>) -> Result<(), HostPathError>;

    /// Posts one receive buffer; filled, it comes back as a [`HostEvent::Received`].
    fn post_recv(&self, qpn: u32, ticket: u64, sges: &[KeyedSge]) -> Result<(), HostPathError>;

    /// Registers a guest MR of endpoint `owner` in the guest's PD `pd`: `pages` (guest
    /// physical addresses of
    /// `page_size`-byte pages) of `memory`, of which `length` bytes from `offset` into the
    /// first page are the region, at the guest's address `iova`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the MR as the guest describes it"
    )]
    fn register(
        &self,
        owner: usize,
        pd: u32,
        memory: &GuestMemory,
        pages: &[u64],
        page_size: usize,
        offset: u64,
        length: u64,
        iova: u64,
        access: u32,
    ) -> Result<HostRegion, HostPathError>;

    /// The guest destroyed the MR with key `key`.
    fn deregister(&self, owner: usize, key: u32);

    /// Everything endpoint `owner` made goes (its device was reset or its client left).
    fn forget_owner(&self, owner: usize);
}

/// The host QPs as one endpoint sees them.
#[derive(Clone, Copy)]
pub struct HostPort<'a> {
    pub qps: &'a dyn HostQps,
    pub owner: usize,
}

impl std::fmt::Debug for HostPort<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostPort(owner {})", self.owner)
    }
}
