//! A peer's request, made into the [`Request`] a local device's responder takes.
//!
//! The payload of a SEND or WRITE is placed in a staging buffer that stands in for the
//! requester's guest memory, and READ data and atomic results are written there by the
//! responder and read back for the answer. The responder thus runs unchanged, with the same
//! checks, whether the requester is a guest of this process or of another host.

use vm_memory::{Bytes, GuestAddress};

use super::wire::{Op, RequestFrame, flags};
use crate::{
    AtomicKind, Destination, GuestMemory, Operation, Outcome, RemoteError, Request, RetryPolicy,
    Service, Sgl, Source,
};

/// The staging buffer: one, reused for every request the runtime executes.
pub struct Staging {
    memory: GuestMemory,
    size: u64,
}

impl Staging {
    /// Room for the largest payload a frame may carry.
    pub fn new() -> std::io::Result<Staging> {
        let size = super::wire::MAX_PAYLOAD as u64;
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Staging { memory, size })
    }

    /// Runs `frame` through `respond` (the responder of the device that holds
    /// `frame.dst_gid`); returns the result and the reply bytes (READ data, an atomic's
    /// original value).
    pub fn execute(
        &self,
        frame: &RequestFrame,
        respond: impl FnOnce(&Request<'_>) -> Result<Outcome, RemoteError>,
    ) -> (Result<Outcome, RemoteError>, Vec<u8>) {
        let whole = |len: u64| {
            let mut sgl = Sgl::new();
            if len > 0 {
                sgl.push(0, len);
            }
            sgl
        };
        let payload_len = frame.payload.len() as u64;
        let reply_len = match frame.op {
            Op::Read => u64::from(frame.read_len),
            Op::CompareSwap | Op::FetchAdd => 8,
            Op::Send | Op::Write => 0,
        };
        if payload_len > self.size || reply_len > self.size {
            return (Err(RemoteError::OperationError), Vec::new());
        }
        if self
            .memory
            .write_slice(&frame.payload, GuestAddress(0))
            .is_err()
        {
            return (Err(RemoteError::OperationError), Vec::new());
        }
        let payload = whole(payload_len);
        let reply = whole(reply_len);
        let solicited = frame.flags & flags::SOLICITED != 0;
        let imm = (frame.flags & flags::IMM != 0).then_some(frame.imm);
        let operation = match frame.op {
            Op::Send => Operation::Send {
                payload: &payload,
                imm,
                invalidate: (frame.flags & flags::INVALIDATE != 0).then_some(frame.invalidate),
                solicited,
            },
            Op::Write => Operation::Write {
                payload: &payload,
                remote_addr: frame.remote_addr,
                rkey: frame.rkey,
                imm,
                solicited,
            },
            Op::Read => Operation::Read {
                reply: &reply,
                remote_addr: frame.remote_addr,
                rkey: frame.rkey,
            },
            Op::CompareSwap => Operation::Atomic {
                kind: AtomicKind::CompareSwap {
                    compare: frame.compare_add,
                    swap: frame.swap,
                },
                reply: &reply,
                remote_addr: frame.remote_addr,
                rkey: frame.rkey,
            },
            Op::FetchAdd => Operation::Atomic {
                kind: AtomicKind::FetchAdd {
                    add: frame.compare_add,
                },
                reply: &reply,
                remote_addr: frame.remote_addr,
                rkey: frame.rkey,
            },
        };
        let request = Request {
            source: Source {
                gid: frame.src_gid,
                qpn: frame.src_qpn,
            },
            destination: Destination {
                gid: frame.dst_gid,
                qpn: frame.dst_qpn,
            },
            service: if frame.flags & flags::DATAGRAM != 0 {
                Service::Datagram { qkey: frame.qkey }
            } else {
                Service::Reliable
            },
            memory: &self.memory,
            operation,
            ticket: frame.ticket,
            epoch: frame.epoch,
            retry: RetryPolicy::default(),
        };
        let result = respond(&request);
        let mut out = vec![
            0u8;
            if result.is_ok() {
                reply_len as usize
            } else {
                0
            }
        ];
        if !out.is_empty() && self.memory.read_slice(&mut out, GuestAddress(0)).is_err() {
            return (Err(RemoteError::OperationError), Vec::new());
        }
        (result, out)
    }
}
