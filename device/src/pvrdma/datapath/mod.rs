//! The data path: the requester side turns send WQEs into backend requests, the responder
//! side executes requests from peers (or from this device, in loopback) against receive
//! queues and memory regions. Completions go through `completion`.

mod host;
mod memory_ops;
mod requester;
mod responder;
mod translate;

pub(super) use host::complete as complete_host;
pub(crate) use host::post_host_receives;
pub use requester::Timing;
pub(super) use requester::{
    complete_remote, note_receiver_not_ready, process_send_queue, resume_stalled,
};
pub(super) use responder::respond;

use zerocopy::FromBytes;

use super::memory::GuestRam;
use super::ring::Ring;
use crate::abi::{RecvWqeHeader, SGE_SIZE, SendWqeHeader, Sge};

/// A send WQE copied out of the ring (header and its SGEs): parsed once, never re-read.
pub(super) struct SendWqe {
    pub header: SendWqeHeader,
    pub sges: Vec<Sge>,
}

/// A receive WQE copied out of the ring.
pub(super) struct RecvWqe {
    pub header: RecvWqeHeader,
    pub sges: Vec<Sge>,
}

/// Why the head of a queue could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WqeError {
    /// The producer index is corrupt or the WQE is not in guest RAM.
    BrokenQueue,
    /// `num_sge` exceeds what the queue was created for (rule 17); the header is still
    /// readable, so the WQE can be completed with an error.
    TooManySges { wr_id: u64, opcode: u32 },
}

fn parse_sges(bytes: &[u8], offset: usize, count: u32, max: u32) -> Option<Vec<Sge>> {
    if count > max {
        return None;
    }
    (0..count as usize)
        .map(|i| {
            let start = offset + i * SGE_SIZE as usize;
            bytes
                .get(start..start + SGE_SIZE as usize)
                .and_then(|b| Sge::read_from_bytes(b).ok())
        })
        .collect()
}

/// The send WQE at the head of `ring`, if any.
pub(super) fn peek_send(
    ring: &Ring,
    mem: &GuestRam,
    ahead: u32,
    stride: u64,
    max_sge: u32,
) -> Result<Option<SendWqe>, WqeError> {
    let mut bytes = vec![0u8; usize::try_from(stride).unwrap_or(0)];
    match ring.peek_ahead(mem, ahead, &mut bytes) {
        Ok(Some(())) => {}
        Ok(None) => return Ok(None),
        Err(_) => return Err(WqeError::BrokenQueue),
    }
    let header = SendWqeHeader::read_from_prefix(&bytes)
        .map_err(|_| WqeError::BrokenQueue)?
        .0;
    let sges = parse_sges(&bytes, size_of::<SendWqeHeader>(), header.num_sge, max_sge).ok_or(
        WqeError::TooManySges {
            wr_id: header.wr_id,
            opcode: header.opcode,
        },
    )?;
    Ok(Some(SendWqe { header, sges }))
}

/// The receive WQE at the head of `ring`, if any.
pub(super) fn peek_recv(
    ring: &Ring,
    mem: &GuestRam,
    stride: u64,
    max_sge: u32,
) -> Result<Option<RecvWqe>, WqeError> {
    peek_recv_ahead(ring, mem, 0, stride, max_sge)
}

/// The receive WQE `ahead` places after the head of `ring`, if any.
pub(super) fn peek_recv_ahead(
    ring: &Ring,
    mem: &GuestRam,
    ahead: u32,
    stride: u64,
    max_sge: u32,
) -> Result<Option<RecvWqe>, WqeError> {
    let mut bytes = vec![0u8; usize::try_from(stride).unwrap_or(0)];
    match ring.peek_ahead(mem, ahead, &mut bytes) {
        Ok(Some(())) => {}
        Ok(None) => return Ok(None),
        Err(_) => return Err(WqeError::BrokenQueue),
    }
    let header = RecvWqeHeader::read_from_prefix(&bytes)
        .map_err(|_| WqeError::BrokenQueue)?
        .0;
    let sges = parse_sges(&bytes, size_of::<RecvWqeHeader>(), header.num_sge, max_sge).ok_or(
        WqeError::TooManySges {
            wr_id: header.wr_id,
            opcode: 0,
        },
    )?;
    Ok(Some(RecvWqe { header, sges }))
}

/// Writes `bytes` into `sgl` starting `offset` bytes in (the caller checked it fits).
pub(super) fn write_at(
    mem: &GuestRam,
    sgl: &pvrdma_backend::Sgl,
    offset: u64,
    bytes: &[u8],
) -> Result<(), crate::pvrdma::memory::GuestFault> {
    let mut skip = offset;
    let mut done = 0usize;
    for seg in sgl.segments() {
        if done == bytes.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = usize::try_from(len - skip)
            .unwrap_or(usize::MAX)
            .min(bytes.len() - done);
        crate::pvrdma::memory::write_bytes(mem, seg.addr + skip, &bytes[done..done + take])?;
        done += take;
        skip = 0;
    }
    Ok(())
}
