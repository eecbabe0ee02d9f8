//! A request a transport keeps after the requester's turn: the requester's scatter-gather
//! lists and a handle on its guest memory, not a copy of the payload. The memcpy fabric
//! keeps it in the responder's inbox; the TCP transport keeps a large one until the QP's
//! window has room for its next piece.

use crate::{
    AtomicKind, Destination, GuestMemory, Operation, Request, RetryPolicy, Service, Sgl, Source,
};

#[derive(Debug, Clone)]
enum OwnedOperation {
    Send {
        payload: Sgl,
        imm: Option<u32>,
        invalidate: Option<u32>,
        solicited: bool,
    },
    Write {
        payload: Sgl,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
        solicited: bool,
    },
    Read {
        reply: Sgl,
        remote_addr: u64,
        rkey: u32,
    },
    Atomic {
        kind: AtomicKind,
        reply: Sgl,
        remote_addr: u64,
        rkey: u32,
    },
}

/// A [`Request`] with everything it borrows owned. The guest memory is the requester's
/// mapping, shared (its regions are reference-counted): the responder still copies guest
/// to guest, and an unmap by the requester's client cannot pull the pages from under it.
#[derive(Debug, Clone)]
pub struct OwnedRequest {
    pub source: Source,
    pub destination: Destination,
    pub service: Service,
    memory: GuestMemory,
    operation: OwnedOperation,
    pub ticket: u64,
    pub epoch: u32,
    pub retry: RetryPolicy,
}

impl OwnedRequest {
    pub fn new(request: &Request<'_>) -> OwnedRequest {
        let operation = match request.operation {
            Operation::Send {
                payload,
                imm,
                invalidate,
                solicited,
            } => OwnedOperation::Send {
                payload: payload.clone(),
                imm,
                invalidate,
                solicited,
            },
            Operation::Write {
                payload,
                remote_addr,
                rkey,
                imm,
                solicited,
            } => OwnedOperation::Write {
                payload: payload.clone(),
                remote_addr,
                rkey,
                imm,
                solicited,
            },
            Operation::Read {
                reply,
                remote_addr,
                rkey,
            } => OwnedOperation::Read {
                reply: reply.clone(),
                remote_addr,
                rkey,
            },
            Operation::Atomic {
                kind,
                reply,
                remote_addr,
                rkey,
            } => OwnedOperation::Atomic {
                kind,
                reply: reply.clone(),
                remote_addr,
                rkey,
            },
        };
        OwnedRequest {
            source: request.source,
            destination: request.destination,
            service: request.service,
            memory: request.memory.clone(),
            operation,
            ticket: request.ticket,
            epoch: request.epoch,
            retry: request.retry,
        }
    }

    pub fn is_reliable(&self) -> bool {
        self.service == Service::Reliable
    }

    /// Bytes the request moves (payload or reply).
    pub fn bytes(&self) -> u64 {
        match &self.operation {
            OwnedOperation::Send { payload, .. } | OwnedOperation::Write { payload, .. } => {
                payload.len()
            }
            OwnedOperation::Read { reply, .. } | OwnedOperation::Atomic { reply, .. } => {
                reply.len()
            }
        }
    }

    /// Whether the request may be executed in pieces: WRITE and READ touch one range of
    /// one region, so `[offset, offset + len)` of it is a request of its own. A SEND
    /// consumes one receive, an atomic is 8 bytes: both go whole.
    pub fn divisible(&self) -> bool {
        matches!(
            self.operation,
            OwnedOperation::Write { .. } | OwnedOperation::Read { .. }
        )
    }

    /// The whole request, as the responder takes it.
    pub fn view(&self) -> Request<'_> {
        self.with_operation(match &self.operation {
            OwnedOperation::Send {
                payload,
                imm,
                invalidate,
                solicited,
            } => Operation::Send {
                payload,
                imm: *imm,
                invalidate: *invalidate,
                solicited: *solicited,
            },
            OwnedOperation::Write {
                payload,
                remote_addr,
                rkey,
                imm,
                solicited,
            } => Operation::Write {
                payload,
                remote_addr: *remote_addr,
                rkey: *rkey,
                imm: *imm,
                solicited: *solicited,
            },
            OwnedOperation::Read {
                reply,
                remote_addr,
                rkey,
            } => Operation::Read {
                reply,
                remote_addr: *remote_addr,
                rkey: *rkey,
            },
            OwnedOperation::Atomic {
                kind,
                reply,
                remote_addr,
                rkey,
            } => Operation::Atomic {
                kind: *kind,
                reply,
                remote_addr: *remote_addr,
                rkey: *rkey,
            },
        })
    }

    /// Bytes `[offset, offset + len)` of a [`divisible`](Self::divisible) request, with
    /// its own local list in `local`. Only the last piece of a WRITE carries the immediate
    /// data (which consumes a receive): the responder completes the message once.
    pub fn piece<'a>(&'a self, offset: u64, len: u64, local: &'a mut Sgl) -> Request<'a> {
        let last = offset.saturating_add(len) >= self.bytes();
        let operation = match &self.operation {
            OwnedOperation::Write {
                payload,
                remote_addr,
                rkey,
                imm,
                solicited,
            } => {
                *local = payload.slice(offset, len);
                Operation::Write {
                    payload: local,
                    remote_addr: remote_addr.wrapping_add(offset),
                    rkey: *rkey,
                    imm: if last { *imm } else { None },
                    solicited: *solicited && last,
                }
            }
            OwnedOperation::Read {
                reply,
                remote_addr,
                rkey,
            } => {
                *local = reply.slice(offset, len);
                Operation::Read {
                    reply: local,
                    remote_addr: remote_addr.wrapping_add(offset),
                    rkey: *rkey,
                }
            }
            // Indivisible: always whole.
            _ => return self.view(),
        };
        self.with_operation(operation)
    }

    fn with_operation<'a>(&'a self, operation: Operation<'a>) -> Request<'a> {
        Request {
            source: self.source,
            destination: self.destination,
            service: self.service,
            memory: &self.memory,
            operation,
            ticket: self.ticket,
            epoch: self.epoch,
            retry: self.retry,
        }
    }
}
