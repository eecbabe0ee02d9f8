//! The responder: execute a request from a peer (or from this device) against this
//! device's QPs, receive queues and memory regions.

use pvrdma_backend::{AtomicKind, Operation, Outcome, RemoteError, Request, Service, Sgl, copy};

use super::memory_ops;
use super::translate;
use super::{RecvWqe, WqeError, peek_recv};
use crate::abi::{Cqe, access, qp_state, qp_type, wc_flags, wc_opcode, wc_status};
use crate::pvrdma::completion;
use crate::pvrdma::memory::{self, GuestRam};
use crate::pvrdma::objects::MrKind;
use crate::pvrdma::{Interrupts, PvrdmaDevice};

/// What a receive completion carries besides the data.
#[derive(Clone, Copy)]
enum Extra {
    None,
    Imm(u32),
    Invalidate(u32),
}

/// Bytes of the GRH area at the start of a UD receive buffer (device-abi §9.5).
const GRH_BYTES: u64 = 40;

pub fn respond(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    request: &Request<'_>,
) -> Result<Outcome, RemoteError> {
    let qpn = request.destination.qpn;
    let datagram = matches!(request.service, Service::Datagram { .. });
    // A datagram that cannot be delivered is dropped; a reliable request is refused.
    let refuse = if datagram {
        RemoteError::Dropped
    } else {
        RemoteError::InvalidRequest
    };
    let found = device
        .objects
        .qp_handle(qpn)
        .and_then(|handle| Some((handle, device.objects.qps.get(handle)?)));
    let Some((handle, qp)) = found else {
        if !datagram {
            log::warn!(
                "refused a request from QP {:#x} for QP {qpn:#x}, which does not exist",
                request.source.qpn
            );
        }
        return Err(refuse);
    };
    if !matches!(
        qp.attr.qp_state,
        qp_state::RTR | qp_state::RTS | qp_state::SQD | qp_state::SQE
    ) {
        if !datagram {
            log::warn!(
                "refused a request from QP {:#x} for QP {qpn:#x}, which is in state {}",
                request.source.qpn,
                qp.attr.qp_state
            );
        }
        return Err(refuse);
    }
    match request.service {
        // A connected QP answers only its peer: the QP number and the GID must both match,
        // or any QP with the same number elsewhere could inject into the connection.
        Service::Reliable
            if qp.qp_type == qp_type::RC
                && qp.attr.dest_qp_num == request.source.qpn
                && qp.attr.ah_attr.grh.dgid == request.source.gid => {}
        Service::Datagram { qkey }
            if matches!(qp.qp_type, qp_type::UD | qp_type::GSI) && qkey == qp.attr.qkey => {}
        Service::Reliable => {
            log::warn!(
                "refused a request from QP {:#x} for QP {qpn:#x}, which is connected to QP {:#x}",
                request.source.qpn,
                qp.attr.dest_qp_num
            );
            return Err(refuse);
        }
        _ => return Err(refuse),
    }
    let pd = qp.pd;
    // The responder QP's own access flags gate one-sided operations, before any key is
    // looked at (IB: "remote access violation" when the QP does not enable the access).
    let qp_access = qp.attr.qp_access_flags;
    let allowed = |needed: u32| {
        if qp_access & needed == needed {
            Ok(())
        } else {
            Err(RemoteError::AccessError)
        }
    };
    match &request.operation {
        Operation::Send { .. } => {}
        Operation::Write { .. } => allowed(access::REMOTE_WRITE)?,
        Operation::Read { .. } => allowed(access::REMOTE_READ)?,
        Operation::Atomic { .. } => allowed(access::REMOTE_ATOMIC)?,
    }
    match &request.operation {
        Operation::Send {
            payload,
            imm,
            invalidate,
            solicited,
        } => {
            let extra = match (imm, invalidate) {
                (_, Some(rkey)) => {
                    // The rkey must name a registered fast-register MR of this QP's PD.
                    let objects = &device.objects;
                    let mr = objects.mr_of_key(*rkey).and_then(|h| objects.mrs.get(h));
                    let registered = mr.is_some_and(|mr| {
                        mr.pd == pd
                            && mr.rkey == *rkey
                            && matches!(
                                mr.kind,
                                MrKind::FastReg {
                                    mapping: Some(_),
                                    ..
                                }
                            )
                    });
                    if !registered {
                        return Err(RemoteError::InvalidRequest);
                    }
                    Extra::Invalidate(*rkey)
                }
                (Some(imm), None) => Extra::Imm(*imm),
                (None, None) => Extra::None,
            };
            let outcome = receive(
                device,
                mem,
                irq,
                handle,
                request,
                payload,
                extra,
                *solicited,
                wc_opcode::RECV,
                payload.len(),
            )?;
            if let Some(rkey) = invalidate {
                let _ = memory_ops::invalidate(&mut device.objects, pd, *rkey);
            }
            Ok(outcome)
        }
        Operation::Write {
            payload,
            remote_addr,
            rkey,
            imm,
            solicited,
        } => {
            // With immediate data the write also consumes a receive: check one is there before
            // writing anything, so a retried write lands exactly once.
            if imm.is_some() && !has_receive(device, mem, handle) {
                return Err(RemoteError::ReceiverNotReady);
            }
            let target = translate::remote(
                &device.objects,
                pd,
                *rkey,
                *remote_addr,
                payload.len(),
                access::REMOTE_WRITE,
            )
            .map_err(|_| RemoteError::AccessError)?;
            copy(request.memory, payload, mem, &target).map_err(|_| RemoteError::AccessError)?;
            count_bytes(device, handle, 0, payload.len());
            if imm.is_some() {
                let empty = Sgl::new();
                receive(
                    device,
                    mem,
                    irq,
                    handle,
                    request,
                    &empty,
                    imm.map_or(Extra::None, Extra::Imm),
                    *solicited,
                    wc_opcode::RECV_RDMA_WITH_IMM,
                    // The completion reports the length written (IB), not the empty receive.
                    payload.len(),
                )?;
            }
            Ok(Outcome {
                bytes: payload.len(),
            })
        }
        Operation::Read {
            reply,
            remote_addr,
            rkey,
        } => {
            let source = translate::remote(
                &device.objects,
                pd,
                *rkey,
                *remote_addr,
                reply.len(),
                access::REMOTE_READ,
            )
            .map_err(|_| RemoteError::AccessError)?;
            let bytes =
                copy(mem, &source, request.memory, reply).map_err(|_| RemoteError::AccessError)?;
            count_bytes(device, handle, bytes, 0);
            Ok(Outcome { bytes })
        }
        Operation::Atomic {
            kind,
            reply,
            remote_addr,
            rkey,
        } => {
            if remote_addr % 8 != 0 || reply.len() < 8 {
                return Err(RemoteError::InvalidRequest);
            }
            let target = translate::remote(
                &device.objects,
                pd,
                *rkey,
                *remote_addr,
                8,
                access::REMOTE_ATOMIC,
            )
            .map_err(|_| RemoteError::AccessError)?;
            let addr = target
                .segments()
                .first()
                .map(|s| s.addr)
                .ok_or(RemoteError::AccessError)?;
            let original: u64 = memory::read(mem, addr).map_err(|_| RemoteError::AccessError)?;
            let new = match *kind {
                AtomicKind::CompareSwap { compare, swap } => {
                    if original == compare {
                        swap
                    } else {
                        original
                    }
                }
                AtomicKind::FetchAdd { add } => original.wrapping_add(add),
            };
            memory::write(mem, addr, &new).map_err(|_| RemoteError::AccessError)?;
            let mut original_sgl = Sgl::new();
            original_sgl
                .push(addr, 8)
                .ok_or(RemoteError::OperationError)?;
            // The original value goes back through the requester's reply buffer.
            let scratch = original.to_le_bytes();
            write_sgl(request.memory, &reply.prefix(8), &scratch)
                .map_err(|_| RemoteError::OperationError)?;
            count_bytes(device, handle, 8, 0);
            Ok(Outcome { bytes: 8 })
        }
    }
}

/// Adds to the profiler's byte counters of QP `handle`.
fn count_bytes(device: &mut PvrdmaDevice, handle: u32, sent: u64, received: u64) {
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.stats.bytes_sent += sent;
        qp.stats.bytes_received += received;
    }
}

/// Writes `bytes` through `sgl` (at most its length).
fn write_sgl(mem: &GuestRam, sgl: &Sgl, bytes: &[u8]) -> Result<(), memory::GuestFault> {
    let mut done = 0usize;
    for seg in sgl.segments() {
        let take = (seg.len as usize).min(bytes.len() - done);
        memory::write_bytes(mem, seg.addr, &bytes[done..done + take])?;
        done += take;
        if done == bytes.len() {
            break;
        }
    }
    Ok(())
}

/// Where a QP's receives come from.
#[derive(Clone, Copy)]
enum RecvQueue {
    Own,
    Shared(u32),
}

fn recv_queue(device: &PvrdmaDevice, handle: u32) -> Option<RecvQueue> {
    let qp = device.objects.qps.get(handle)?;
    Some(match qp.srq {
        Some(srq) => RecvQueue::Shared(srq),
        None => RecvQueue::Own,
    })
}

fn peek_receive(
    device: &PvrdmaDevice,
    mem: &GuestRam,
    handle: u32,
) -> Result<Option<RecvWqe>, WqeError> {
    let qp = device
        .objects
        .qps
        .get(handle)
        .ok_or(WqeError::BrokenQueue)?;
    match recv_queue(device, handle) {
        Some(RecvQueue::Own) => {
            let rq = qp.rq.as_ref().ok_or(WqeError::BrokenQueue)?;
            peek_recv(rq, mem, qp.rq_stride, qp.max_recv_sge)
        }
        Some(RecvQueue::Shared(handle)) => {
            let srq = device
                .objects
                .srqs
                .get(handle)
                .ok_or(WqeError::BrokenQueue)?;
            peek_recv(&srq.ring, mem, srq.stride, srq.attrs.max_sge)
        }
        None => Err(WqeError::BrokenQueue),
    }
}

/// Whether the next request needing a receive finds something at the head of the queue
/// (a bad WQE counts: it is consumed with an error completion).
fn has_receive(device: &PvrdmaDevice, mem: &GuestRam, handle: u32) -> bool {
    matches!(
        peek_receive(device, mem, handle),
        Ok(Some(_)) | Err(WqeError::TooManySges { .. })
    )
}

fn consume_receive(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    handle: u32,
) {
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.stats.wqes_posted += 1;
    }
    match recv_queue(device, handle) {
        Some(RecvQueue::Own) => {
            if let Some(rq) = device
                .objects
                .qps
                .get_mut(handle)
                .and_then(|qp| qp.rq.as_mut())
            {
                let _ = rq.consume(mem);
            }
        }
        Some(RecvQueue::Shared(handle)) => {
            let Some(srq) = device.objects.srqs.get_mut(handle) else {
                return;
            };
            let _ = srq.ring.consume(mem);
            // An armed limit fires once when the SRQ drops below it, then disarms (IB).
            let limit = srq.attrs.srq_limit;
            if limit > 0 && srq.ring.backlog(mem).is_ok_and(|left| left < limit) {
                srq.attrs.srq_limit = 0;
                device.post_event(mem, irq, crate::abi::event::SRQ_LIMIT_REACHED, handle);
            }
        }
        None => {}
    }
}

/// Places `payload` in the next receive buffer of `handle` and completes it.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the message"
)]
fn receive(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    handle: u32,
    request: &Request<'_>,
    payload: &Sgl,
    extra: Extra,
    solicited: bool,
    opcode: u32,
    reported_len: u64,
) -> Result<Outcome, RemoteError> {
    let datagram = matches!(request.service, Service::Datagram { .. });
    let refused = if datagram {
        RemoteError::Dropped
    } else {
        RemoteError::InvalidRequest
    };
    let wqe = match peek_receive(device, mem, handle) {
        Ok(Some(wqe)) => wqe,
        Ok(None) => {
            return Err(if datagram {
                RemoteError::Dropped
            } else {
                RemoteError::ReceiverNotReady
            });
        }
        // A receive the guest wrote badly is still consumed and completed with an error
        // (rules 17 and 18), so it cannot block the queue.
        Err(WqeError::TooManySges { wr_id, .. }) => {
            let Some(cq) = device.objects.qps.get(handle).map(|qp| qp.recv_cq) else {
                return Err(refused);
            };
            let cqe = Cqe {
                wr_id,
                qp: u64::from(handle),
                opcode,
                status: wc_status::LOC_LEN_ERR,
                ..Cqe::default()
            };
            return Err(fail_receive(device, mem, irq, handle, cq, &cqe, refused));
        }
        // A corrupt receive queue breaks the QP (rule 16).
        Err(WqeError::BrokenQueue) => {
            if let Some(qp) = device.objects.qps.get_mut(handle) {
                qp.attr.qp_state = qp_state::ERR;
                qp.attr.cur_qp_state = qp_state::ERR;
            }
            device.post_event(mem, irq, crate::abi::event::QP_FATAL, handle);
            return Err(RemoteError::OperationError);
        }
    };
    let qp = device
        .objects
        .qps
        .get(handle)
        .ok_or(RemoteError::InvalidRequest)?;
    let (pd, cq) = (qp.pd, qp.recv_cq);
    let base = Cqe {
        wr_id: wqe.header.wr_id,
        qp: u64::from(handle),
        opcode,
        src_qp: request.source.qpn,
        port_num: 1,
        ..Cqe::default()
    };
    let buffer = match translate::local(&device.objects, pd, &wqe.sges, true) {
        Ok(buffer) => buffer,
        // The receiver's own buffer is bad: its receive fails, and so does the request.
        Err(_) => {
            return Err(fail_receive(
                device,
                mem,
                irq,
                handle,
                cq,
                &Cqe {
                    status: wc_status::LOC_PROT_ERR,
                    ..base
                },
                refused,
            ));
        }
    };
    let header_len = if datagram { GRH_BYTES } else { 0 };
    if buffer.len() < header_len + payload.len() {
        return Err(fail_receive(
            device,
            mem,
            irq,
            handle,
            cq,
            &Cqe {
                status: wc_status::LOC_LEN_ERR,
                ..base
            },
            refused,
        ));
    }
    let mut flags = 0;
    if datagram {
        write_sgl(mem, &buffer.prefix(GRH_BYTES), &grh(request, payload.len()))
            .map_err(|_| RemoteError::OperationError)?;
        flags |= wc_flags::GRH;
    }
    let body = skip(&buffer, header_len);
    copy(request.memory, payload, mem, &body).map_err(|_| RemoteError::OperationError)?;
    consume_receive(device, mem, irq, handle);
    // The CQE's imm_data field carries the immediate data or the invalidated rkey (the
    // kernel reads both through one union).
    let ex = match extra {
        Extra::Imm(imm) => {
            flags |= wc_flags::WITH_IMM;
            imm
        }
        Extra::Invalidate(rkey) => {
            flags |= wc_flags::WITH_INVALIDATE;
            rkey
        }
        Extra::None => 0,
    };
    let byte_len = u32::try_from(header_len + reported_len).unwrap_or(u32::MAX);
    let cqe = Cqe {
        byte_len,
        imm_data: ex,
        wc_flags: flags,
        ..base
    };
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.stats.wqes_completed += 1;
        qp.stats.bytes_received += payload.len();
    }
    completion::complete(device, mem, irq, cq, &cqe, solicited, false);
    Ok(Outcome {
        bytes: payload.len(),
    })
}

/// Consumes the receive at the head of `handle`'s queue with the error completion `cqe` and
/// returns what the requester is told.
fn fail_receive(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    handle: u32,
    cq: u32,
    cqe: &Cqe,
    refused: RemoteError,
) -> RemoteError {
    consume_receive(device, mem, irq, handle);
    completion::complete(device, mem, irq, cq, cqe, true, false);
    refused
}

/// `sgl` without its first `bytes` bytes.
fn skip(sgl: &Sgl, bytes: u64) -> Sgl {
    let mut out = Sgl::new();
    let mut left = bytes;
    for seg in sgl.segments() {
        let len = u64::from(seg.len);
        if left >= len {
            left -= len;
            continue;
        }
        let _ = out.push(seg.addr + left, len - left);
        left = 0;
    }
    out
}

/// The RoCE v1 GRH a UD receive starts with: an IPv6-like header carrying both GIDs.
fn grh(request: &Request<'_>, payload: u64) -> [u8; 40] {
    let mut grh = [0u8; 40];
    grh[0] = 0x60; // IP version 6, traffic class and flow label 0
    grh[4..6].copy_from_slice(&u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes());
    grh[6] = 0x1b; // next header: IBA transport
    grh[7] = 64; // hop limit
    grh[8..24].copy_from_slice(&request.source.gid);
    grh[24..40].copy_from_slice(&request.destination.gid);
    grh
}
