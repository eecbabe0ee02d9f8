//! The requester: drain a QP's send queue, turning each WQE into a backend request.

use log::{debug, warn};
use pvrdma_backend::{
    AtomicKind, Completion, Delivery, Destination, Network, Operation, Outcome, RemoteError,
    Request, RetryPolicy, Service, Sgl, Source,
};

use super::memory_ops::{self, MemOpError};
use super::responder::respond;
use super::translate::{self, KeyError};
use super::{SendWqe, WqeError, peek_send};
use crate::abi::{self, Cqe, qp_state, qp_type, send_flags, wc_status, wr_opcode};
use crate::pvrdma::completion::{self, send_completion_opcode};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{InFlight, KERNEL_CONTEXT};
use crate::pvrdma::profile::Stage;
use crate::pvrdma::{Interrupts, PvrdmaDevice};

/// The profiler's view of one pass over a send queue: when its doorbell rang, and when the
/// device last finished something (the next WQE is picked up then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub doorbell_ns: u64,
    pub last_ns: u64,
}

/// Processes the send queue of `qp_handle` until it is empty, stalls on a receiver that is
/// not ready, or fails. Bounded by the queue size, so a guest cannot keep the device busy.
/// `started` is when the pass began (profiling on only): the doorbell, or the resumption of
/// a stalled queue.
pub fn process_send_queue(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    qp_handle: u32,
    started: Option<u64>,
) {
    let Some((bound, doorbell_ns)) = device
        .objects
        .qps
        .get(qp_handle)
        .map(|qp| (qp.sq.indices().max(), qp.doorbell_ns))
    else {
        return;
    };
    // Timed only if the doorbell that queued this work was sampled.
    let mut timing = started
        .zip(doorbell_ns)
        .map(|(last_ns, doorbell_ns)| Timing {
            doorbell_ns,
            last_ns,
        });
    for _ in 0..bound {
        if !step(device, mem, irq, net, qp_handle, &mut timing) {
            break;
        }
    }
    // Work issued by this pass and still in flight is timed when its answers come.
    if timing.is_some()
        && let Some(qp) = device.objects.qps.get_mut(qp_handle)
        && qp.in_flight.iter().any(|entry| entry.timed)
    {
        qp.timing = timing;
    }
}

/// A responder refused a request of `qpn` for receiver-not-ready and keeps it to retry:
/// counted once per work request, as the requester does for a refusal it sees itself.
pub fn note_receiver_not_ready(device: &mut PvrdmaDevice, qpn: u32) {
    let handle = device.objects.qp_handle(qpn);
    if let Some(qp) = handle.and_then(|handle| device.objects.qps.get_mut(handle)) {
        qp.stats.rnr_stalls += 1;
    }
}

/// Retries every QP whose send queue waits for a receiver.
pub fn resume_stalled(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
) {
    let stalled: Vec<u32> = device
        .objects
        .qps
        .iter()
        .filter(|(_, qp)| qp.stalled)
        .map(|(handle, _)| handle)
        .collect();
    for handle in stalled {
        if let Some(qp) = device.objects.qps.get_mut(handle) {
            qp.stalled = false;
        }
        let started = device.profiler.now();
        process_send_queue(device, mem, irq, net, handle, started);
    }
}

/// Everything a WQE needs once it has been read and checked: owned, so the device is free
/// to answer the request itself (loopback).
pub(super) struct Plan {
    pub(super) wqe: SendWqe,
    pub(super) destination: Destination,
    pub(super) source: Source,
    pub(super) service: Service,
    local: Sgl,
    signaled: bool,
}

/// One WQE; returns whether to go on with the next.
fn step(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    qp_handle: u32,
    timing: &mut Option<Timing>,
) -> bool {
    let Some(qp) = device.objects.qps.get(qp_handle) else {
        return false;
    };
    match qp.attr.qp_state {
        qp_state::RTS => {}
        qp_state::ERR => {
            completion::flush_qp(device, mem, irq, qp_handle);
            return false;
        }
        // Work posted below RTS, or in SQD/SQE, waits.
        _ => return false,
    }
    // Work a transport carries stays at the head of the queue until it completes; the next
    // WQE to issue sits behind it. A WQE that would fail here waits until everything ahead
    // of it completed, so completions keep the queue's order.
    let Ok(ahead) = u32::try_from(qp.in_flight.len()) else {
        return false;
    };
    let wqe = match peek_send(&qp.sq, mem, ahead, qp.sq_stride, qp.max_send_sge) {
        Ok(Some(wqe)) => wqe,
        Ok(None) => return false,
        Err(WqeError::BrokenQueue) => {
            warn!("QP {qp_handle}: send queue is corrupt");
            to_error(device, qp_handle);
            device.post_event(mem, irq, abi::event::QP_FATAL, qp_handle);
            return false;
        }
        Err(WqeError::TooManySges { .. }) if ahead > 0 => return false,
        Err(WqeError::TooManySges { wr_id, opcode }) => {
            fail(
                device,
                mem,
                irq,
                qp_handle,
                wr_id,
                opcode,
                wc_status::LOC_LEN_ERR,
            );
            return false;
        }
    };
    // FAST_REG_MR and LOCAL_INV act on this device's own memory regions and go nowhere.
    let kernel_qp = device
        .objects
        .pd_context(device.objects.qps.get(qp_handle).map_or(0, |qp| qp.pd))
        == Some(KERNEL_CONTEXT);
    if kernel_qp
        && matches!(
            wqe.header.opcode,
            wr_opcode::FAST_REG_MR | wr_opcode::LOCAL_INV
        )
    {
        if ahead > 0 {
            return false;
        }
        return local_memory_op(device, mem, irq, qp_handle, &wqe);
    }
    let plan = match plan(device, qp_handle, wqe) {
        Ok(plan) => plan,
        Err(_) if ahead > 0 => return false,
        Err((wqe, status)) => {
            fail(
                device,
                mem,
                irq,
                qp_handle,
                wqe.header.wr_id,
                wqe.header.opcode,
                status,
            );
            return false;
        }
    };
    // A QP the host's RDMA device carries posts the WQE to its host QP as it is; so does a
    // UD QP's datagram to a destination the host device reaches.
    if super::host::takes(device, net, qp_handle, &plan) {
        return super::host::send(
            device,
            mem,
            irq,
            net,
            qp_handle,
            &plan,
            ahead,
            timing.is_some(),
        );
    }
    let header = plan.wqe.header;
    let solicited = header.send_flags & send_flags::SOLICITED != 0;
    let imm = matches!(
        header.opcode,
        wr_opcode::SEND_WITH_IMM | wr_opcode::RDMA_WRITE_WITH_IMM
    )
    .then_some(header.ex);
    let operation = match header.opcode {
        // From user QPs only opcodes 0..=6 mean what they say; anything else fails with
        // LOC_QP_OP_ERR below (device-abi §9.4).
        wr_opcode::SEND | wr_opcode::SEND_WITH_IMM => Operation::Send {
            payload: &plan.local,
            imm,
            invalidate: None,
            solicited,
        },
        // Remote invalidation, a memory management extension: kernel QPs only (opcode 8
        // from user space means something else, device-abi §9.4).
        wr_opcode::SEND_WITH_INV if kernel_qp => Operation::Send {
            payload: &plan.local,
            imm: None,
            invalidate: Some(header.ex),
            solicited,
        },
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => Operation::Write {
            payload: &plan.local,
            remote_addr: header.remote_addr(),
            rkey: header.rdma_rkey(),
            imm,
            solicited,
        },
        wr_opcode::RDMA_READ => Operation::Read {
            reply: &plan.local,
            remote_addr: header.remote_addr(),
            rkey: header.rdma_rkey(),
        },
        wr_opcode::ATOMIC_CMP_AND_SWP => Operation::Atomic {
            kind: AtomicKind::CompareSwap {
                compare: header.atomic_compare_add(),
                swap: header.atomic_swap(),
            },
            reply: &plan.local,
            remote_addr: header.remote_addr(),
            rkey: header.atomic_rkey(),
        },
        wr_opcode::ATOMIC_FETCH_AND_ADD => Operation::Atomic {
            kind: AtomicKind::FetchAdd {
                add: header.atomic_compare_add(),
            },
            reply: &plan.local,
            remote_addr: header.remote_addr(),
            rkey: header.atomic_rkey(),
        },
        _ if ahead > 0 => return false,
        other => {
            debug!("QP {qp_handle}: unsupported opcode {other}");
            fail(
                device,
                mem,
                irq,
                qp_handle,
                header.wr_id,
                header.opcode,
                wc_status::LOC_QP_OP_ERR,
            );
            return false;
        }
    };
    let Some(qp) = device.objects.qps.get(qp_handle) else {
        return false;
    };
    let ticket = qp.next_ticket;
    let request = Request {
        source: plan.source,
        destination: plan.destination,
        service: plan.service,
        memory: mem,
        operation,
        ticket,
        epoch: qp.epoch,
        retry: RetryPolicy {
            timeout: qp.attr.timeout,
            retry_cnt: qp.attr.retry_cnt,
            rnr_retry: qp.attr.rnr_retry,
            min_rnr_timer: qp.attr.min_rnr_timer,
        },
    };
    let delivery = if device.has_gid(&request.destination.gid) && !net.carries_loopback() {
        Delivery::Done(respond(device, mem, irq, &request))
    } else {
        net.deliver(&request)
    };
    let result = match delivery {
        Delivery::Done(result) if ahead == 0 => result,
        Delivery::Done(Err(RemoteError::ReceiverNotReady)) => {
            // Behind work in flight: not issued, retried like any stalled queue.
            if let Some(qp) = device.objects.qps.get_mut(qp_handle) {
                qp.stalled = true;
            }
            return false;
        }
        Delivery::Done(result) => {
            issue(device, qp_handle, &plan, Some(result), timing.is_some());
            return true;
        }
        Delivery::Pending => {
            issue(device, qp_handle, &plan, None, timing.is_some());
            return true;
        }
        Delivery::Busy => {
            if let Some(qp) = device.objects.qps.get_mut(qp_handle) {
                qp.waiting_transport = true;
            }
            return false;
        }
    };
    let placed_ns = if timing.is_some() {
        device.profiler.now()
    } else {
        None
    };
    let datagram = matches!(plan.service, Service::Datagram { .. });
    let rnr_retry = device
        .objects
        .qps
        .get(qp_handle)
        .map_or(0, |qp| qp.attr.rnr_retry);
    let status = match result {
        Ok(_) => wc_status::SUCCESS,
        // Datagrams are unreliable: a drop is a successful send.
        Err(_) if datagram => wc_status::SUCCESS,
        // RNR with rnr_retry 0: the first RNR NAK fails the request (IB).
        Err(RemoteError::ReceiverNotReady) if rnr_retry == 0 => {
            if let Some(qp) = device.objects.qps.get_mut(qp_handle) {
                qp.stats.rnr_stalls += 1;
            }
            wc_status::RNR_RETRY_EXC_ERR
        }
        Err(RemoteError::ReceiverNotReady) => {
            // RNR from this device itself on a network that does not carry loopback (the
            // memcpy fabric does, and parks refusals at the responder with their timers):
            // keep the WQE at the head and retry when this device posts a receive. No timer
            // counts these retries, so any non-zero rnr_retry waits like 7 here.
            // docs/backends.md.
            if let Some(qp) = device.objects.qps.get_mut(qp_handle) {
                qp.stalled = true;
                // Once per WQE, however often the fabric retries it.
                if !qp.rnr_counted {
                    qp.stats.rnr_stalls += 1;
                    qp.rnr_counted = true;
                }
            }
            return false;
        }
        Err(RemoteError::AccessError) => wc_status::REM_ACCESS_ERR,
        Err(RemoteError::InvalidRequest) => wc_status::REM_INV_REQ_ERR,
        Err(RemoteError::OperationError) => wc_status::REM_OP_ERR,
        Err(RemoteError::Unreachable | RemoteError::Dropped) => wc_status::RETRY_EXC_ERR,
    };
    if status != wc_status::SUCCESS {
        fail(
            device,
            mem,
            irq,
            qp_handle,
            header.wr_id,
            header.opcode,
            status,
        );
        return false;
    }
    let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
        return false;
    };
    if qp.sq.consume(mem).is_err() {
        return false;
    }
    qp.rnr_counted = false;
    let moved = result.map_or(0, |outcome| outcome.bytes);
    let stats = &mut qp.stats;
    stats.wqes_posted += 1;
    stats.wqes_completed += 1;
    match header.opcode {
        wr_opcode::RDMA_READ | wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD => {
            stats.bytes_received += moved;
        }
        _ => stats.bytes_sent += moved,
    }
    if let (Some(t), Some(placed)) = (timing.as_mut(), placed_ns) {
        stats.record(Stage::Pickup, t.last_ns.saturating_sub(t.doorbell_ns));
        stats.record(Stage::Place, placed.saturating_sub(t.last_ns));
        t.last_ns = placed;
    }
    let cq = qp.send_cq;
    if plan.signaled {
        let byte_len = u32::try_from(plan.local.len()).unwrap_or(u32::MAX);
        let cqe = Cqe {
            wr_id: header.wr_id,
            qp: u64::from(qp_handle),
            opcode: send_completion_opcode(header.opcode),
            byte_len,
            ..Cqe::default()
        };
        let written = completion::complete(device, mem, irq, cq, &cqe, false, timing.is_some());
        if let (Some(t), Some(w)) = (timing.as_mut(), written) {
            record_completion(device, qp_handle, t, w);
        }
    }
    true
}

/// Records the Complete and Interrupt stages of a timed work request's completion.
fn record_completion(
    device: &mut PvrdmaDevice,
    qp_handle: u32,
    t: &mut Timing,
    written: completion::Written,
) {
    let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
        return;
    };
    qp.stats
        .record(Stage::Complete, written.cqe_ns.saturating_sub(t.last_ns));
    t.last_ns = written.cqe_ns;
    if let Some(irq_ns) = written.irq_ns {
        qp.stats
            .record(Stage::Interrupt, irq_ns.saturating_sub(written.cqe_ns));
        t.last_ns = irq_ns;
    }
}

/// Records a work request a transport took (or answered behind older ones in flight).
pub(super) fn issue(
    device: &mut PvrdmaDevice,
    qp_handle: u32,
    plan: &Plan,
    result: Option<Result<Outcome, RemoteError>>,
    timed: bool,
) {
    let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
        return;
    };
    let header = plan.wqe.header;
    let replies = matches!(
        header.opcode,
        wr_opcode::RDMA_READ | wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD
    );
    qp.in_flight.push_back(InFlight {
        ticket: qp.next_ticket,
        wr_id: header.wr_id,
        opcode: header.opcode,
        signaled: plan.signaled,
        reply: if replies {
            plan.local.clone()
        } else {
            Sgl::new()
        },
        length: plan.local.len(),
        result,
        timed,
    });
    qp.next_ticket = qp.next_ticket.wrapping_add(1);
    qp.stats.wqes_posted += 1;
}

/// A transport's answer to a request this device issued: the reply data goes into the
/// requester's buffer, and work requests complete, in order, as their answers are in. Then
/// the queue goes on (the transport may have refused work for lack of room).
pub fn complete_remote(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    completion: &Completion<'_>,
) {
    // Transports name the QP by the number its requests carried.
    let Some(handle) = device.objects.qp_handle(completion.qpn) else {
        return;
    };
    let Some(qp) = device.objects.qps.get_mut(handle) else {
        return;
    };
    // A completion for a request the QP no longer waits for (flushed, or the QP is new)
    // is stale: dropped.
    let Some(entry) = qp
        .in_flight
        .iter_mut()
        .find(|entry| entry.ticket == completion.ticket && entry.result.is_none())
    else {
        debug!(
            "QP {}: stale completion for ticket {}",
            completion.qpn, completion.ticket
        );
        return;
    };
    let mut result = completion.result;
    if result.is_ok() && !completion.reply.is_empty() {
        let fits = completion
            .reply_offset
            .checked_add(completion.reply.len() as u64)
            .is_some_and(|end| end <= entry.reply.len());
        let written = fits
            && super::write_at(mem, &entry.reply, completion.reply_offset, completion.reply)
                .is_ok();
        if !written {
            result = Err(RemoteError::OperationError);
        }
    }
    if result.is_ok() && !completion.last {
        return;
    }
    entry.result = Some(result);
    finish_answered(device, mem, irq, handle);
    // Go on with the queue: work the transport refused for lack of room, and a WQE that
    // waited for everything ahead of it to complete (one that fails locally) go now. The
    // pass is not timed: no doorbell started it.
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.waiting_transport = false;
        process_send_queue(device, mem, irq, net, handle, None);
    }
}

/// Completes the answered work requests at the head of the queue, oldest first.
fn finish_answered(device: &mut PvrdmaDevice, mem: &GuestRam, irq: &mut dyn Interrupts, qpn: u32) {
    loop {
        let Some(qp) = device.objects.qps.get_mut(qpn) else {
            return;
        };
        if qp
            .in_flight
            .front()
            .is_none_or(|entry| entry.result.is_none())
        {
            return;
        }
        let Some(entry) = qp.in_flight.pop_front() else {
            return;
        };
        let Some(result) = entry.result else {
            return;
        };
        let status = match result {
            Ok(_) => wc_status::SUCCESS,
            // The transport spent the QP's rnr_retry budget.
            Err(RemoteError::ReceiverNotReady) => wc_status::RNR_RETRY_EXC_ERR,
            Err(RemoteError::AccessError) => wc_status::REM_ACCESS_ERR,
            Err(RemoteError::InvalidRequest) => wc_status::REM_INV_REQ_ERR,
            Err(RemoteError::OperationError) => wc_status::REM_OP_ERR,
            Err(RemoteError::Unreachable | RemoteError::Dropped) => wc_status::RETRY_EXC_ERR,
        };
        if status != wc_status::SUCCESS {
            // The head of the ring is this request: fail() consumes it (counting it as
            // posted, which issue() did already), moves the QP to the error state and
            // flushes the rest, in flight or not (counting those again too).
            let counted = 1 + qp.in_flight.len() as u64;
            qp.stats.wqes_posted = qp.stats.wqes_posted.saturating_sub(counted);
            fail(device, mem, irq, qpn, entry.wr_id, entry.opcode, status);
            return;
        }
        if qp.sq.consume(mem).is_err() {
            return;
        }
        let moved = result.map_or(0, |outcome| outcome.bytes);
        qp.stats.wqes_completed += 1;
        match entry.opcode {
            wr_opcode::RDMA_READ
            | wr_opcode::ATOMIC_CMP_AND_SWP
            | wr_opcode::ATOMIC_FETCH_AND_ADD => qp.stats.bytes_received += moved,
            _ => qp.stats.bytes_sent += moved,
        }
        let cq = qp.send_cq;
        // Timed as the same pass would have been had the answer come at once: picked up
        // when the one before it was answered, placed when its own answer came.
        let mut timing = if entry.timed { qp.timing } else { None };
        if let Some(t) = timing.as_mut()
            && let Some(placed) = device.profiler.now()
        {
            qp.stats
                .record(Stage::Pickup, t.last_ns.saturating_sub(t.doorbell_ns));
            qp.stats
                .record(Stage::Place, placed.saturating_sub(t.last_ns));
            t.last_ns = placed;
        }
        if entry.signaled {
            let cqe = Cqe {
                wr_id: entry.wr_id,
                qp: u64::from(qpn),
                opcode: send_completion_opcode(entry.opcode),
                byte_len: u32::try_from(entry.length).unwrap_or(u32::MAX),
                ..Cqe::default()
            };
            let written = completion::complete(device, mem, irq, cq, &cqe, false, timing.is_some());
            if let (Some(t), Some(w)) = (timing.as_mut(), written) {
                record_completion(device, qpn, t, w);
            }
        }
        if let Some(qp) = device.objects.qps.get_mut(qpn)
            && timing.is_some()
        {
            qp.timing = timing;
        }
    }
}

/// Executes FAST_REG_MR or LOCAL_INV on this device's memory regions and completes it.
fn local_memory_op(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qp_handle: u32,
    wqe: &SendWqe,
) -> bool {
    let Some(qp) = device.objects.qps.get(qp_handle) else {
        return false;
    };
    let (pd, signaled) = (
        qp.pd,
        qp.sq_sig_all || wqe.header.send_flags & send_flags::SIGNALED != 0,
    );
    let header = wqe.header;
    let result = if header.opcode == wr_opcode::FAST_REG_MR {
        memory_ops::fast_register(&mut device.objects, mem, pd, &header.fast_reg())
    } else {
        memory_ops::invalidate(&mut device.objects, pd, header.ex)
    };
    match result {
        Ok(()) => {
            let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
                return false;
            };
            if qp.sq.consume(mem).is_err() {
                return false;
            }
            qp.stats.wqes_posted += 1;
            qp.stats.wqes_completed += 1;
            let cq = qp.send_cq;
            if signaled {
                let cqe = Cqe {
                    wr_id: header.wr_id,
                    qp: u64::from(qp_handle),
                    opcode: send_completion_opcode(header.opcode),
                    ..Cqe::default()
                };
                completion::complete(device, mem, irq, cq, &cqe, false, false);
            }
            true
        }
        Err(MemOpError::Protection) => {
            fail(
                device,
                mem,
                irq,
                qp_handle,
                header.wr_id,
                header.opcode,
                wc_status::LOC_PROT_ERR,
            );
            false
        }
        Err(MemOpError::Length) => {
            fail(
                device,
                mem,
                irq,
                qp_handle,
                header.wr_id,
                header.opcode,
                wc_status::LOC_LEN_ERR,
            );
            false
        }
    }
}

/// The largest datagram: the port's `max_mtu` (4096, caps.rs).
const UD_MAX_MESSAGE: u64 = 4096;

/// Resolves where the WQE goes and its local buffers. On failure gives the WQE back with
/// the completion status to report.
fn plan(device: &PvrdmaDevice, qp_handle: u32, wqe: SendWqe) -> Result<Plan, (SendWqe, u32)> {
    let Some(qp) = device.objects.qps.get(qp_handle) else {
        return Err((wqe, wc_status::LOC_QP_OP_ERR));
    };
    let opcode = wqe.header.opcode;
    let datagram = matches!(qp.qp_type, qp_type::UD | qp_type::GSI);
    if datagram && !matches!(opcode, wr_opcode::SEND | wr_opcode::SEND_WITH_IMM) {
        return Err((wqe, wc_status::LOC_QP_OP_ERR));
    }
    // A datagram is one packet: never more than the port's largest MTU. Without this a
    // single UD WQE could name a gigabyte (16 SGEs of a large DMA MR) and copy it whole.
    let length: u64 = wqe.sges.iter().map(|sge| u64::from(sge.length)).sum();
    if datagram && length > UD_MAX_MESSAGE {
        return Err((wqe, wc_status::LOC_LEN_ERR));
    }
    // READ and atomics write their reply into the local buffers.
    let write = matches!(
        opcode,
        wr_opcode::RDMA_READ | wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD
    );
    let local = match translate::local(&device.objects, qp.pd, &wqe.sges, write) {
        Ok(sgl) => sgl,
        Err(KeyError::BadKey | KeyError::NoAccess | KeyError::OutOfBounds) => {
            return Err((wqe, wc_status::LOC_PROT_ERR));
        }
    };
    let (gid_index, destination, service) = if datagram {
        let av = wqe.header.ud_av();
        let qkey = wqe.header.ud_remote_qkey();
        (
            av.gid_index,
            Destination {
                gid: av.dgid,
                qpn: wqe.header.ud_remote_qpn(),
            },
            Service::Datagram { qkey },
        )
    } else {
        let ah = &qp.attr.ah_attr;
        (
            ah.grh.sgid_index,
            Destination {
                gid: ah.grh.dgid,
                qpn: qp.attr.dest_qp_num,
            },
            Service::Reliable,
        )
    };
    // Rule 13: the source GID index must name a bound GID (it may have been unbound since
    // the QP's AV was set).
    let Some(gid) = device
        .objects
        .gids
        .get(usize::from(gid_index))
        .copied()
        .flatten()
        .map(|g| g.raw)
    else {
        return Err((wqe, wc_status::LOC_QP_OP_ERR));
    };
    let signaled = qp.sq_sig_all || wqe.header.send_flags & send_flags::SIGNALED != 0;
    Ok(Plan {
        wqe,
        destination,
        source: Source { gid, qpn: qp.qpn },
        service,
        local,
        signaled,
    })
}

/// Completes the WQE at the head with an error status and moves the QP to the error state,
/// which flushes the rest of its work (device-abi §9.2).
pub(super) fn fail(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qp_handle: u32,
    wr_id: u64,
    opcode: u32,
    status: u32,
) {
    let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
        return;
    };
    if qp.sq.consume(mem).is_ok() {
        qp.stats.wqes_posted += 1;
    }
    qp.rnr_counted = false;
    let cq = qp.send_cq;
    let cqe = Cqe {
        wr_id,
        qp: u64::from(qp_handle),
        opcode: send_completion_opcode(opcode),
        status,
        ..Cqe::default()
    };
    completion::complete(device, mem, irq, cq, &cqe, false, false);
    to_error(device, qp_handle);
    completion::flush_qp(device, mem, irq, qp_handle);
}

pub(super) fn to_error(device: &mut PvrdmaDevice, qp_handle: u32) {
    if let Some(qp) = device.objects.qps.get_mut(qp_handle) {
        qp.attr.qp_state = qp_state::ERR;
        qp.attr.cur_qp_state = qp_state::ERR;
        qp.stalled = false;
        // What was in flight is still in the ring: the flush completes it. Late answers
        // find no entry and are dropped.
        qp.in_flight.clear();
        qp.waiting_transport = false;
    }
}
