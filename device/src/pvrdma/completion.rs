//! Writing completions: CQEs into a CQ ring, the CQ notification an armed CQ asks for, the
//! CQ_ERR event when a CQ overflows, and the flush of a QP's outstanding work (device-abi §6.6, device-abi §9.2).

use log::warn;
use zerocopy::{FromBytes, IntoBytes};

use super::memory::GuestRam;
use super::objects::Arm;
use super::ring::RingError;
use super::{Interrupts, PvrdmaDevice};
use crate::abi::{self, Cqe, RecvWqeHeader, SendWqeHeader, wc_opcode, wc_status, wr_opcode};

/// When a timed completion was written and its interrupt raised (profiler clock, ns).
#[derive(Debug, Clone, Copy)]
pub(super) struct Written {
    pub cqe_ns: u64,
    pub irq_ns: Option<u64>,
}

/// Appends `cqe` to `cq` and notifies the guest if the CQ is armed for it. A full or corrupt
/// CQ is never overwritten: it is marked broken and the guest gets CQ_ERR (device-abi §6.6). With
/// `timed` and profiling on, returns when the CQE was written and the interrupt raised.
pub(super) fn complete(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    cq_handle: u32,
    cqe: &Cqe,
    solicited: bool,
    timed: bool,
) -> Option<Written> {
    if cqe.status != wc_status::SUCCESS
        && let Some(qp) = u32::try_from(cqe.qp)
            .ok()
            .and_then(|handle| device.objects.qps.get_mut(handle))
    {
        qp.stats.completion_errors += 1;
    }
    let cq = device.objects.cqs.get_mut(cq_handle)?;
    if cq.broken {
        return None;
    }
    match cq.ring.push(mem, cqe.as_bytes()) {
        Ok(()) => {}
        Err(e @ (RingError::Full | RingError::BadIndex(_) | RingError::Fault(_))) => {
            warn!("CQ {cq_handle} cannot take a completion ({e}); reporting CQ_ERR");
            cq.broken = true;
            device.post_event(mem, irq, abi::event::CQ_ERR, cq_handle);
            return None;
        }
    }
    let notify = match cq.arm {
        Arm::NextCompletion => true,
        Arm::Solicited => solicited || cqe.status != wc_status::SUCCESS,
        Arm::Disarmed => false,
    };
    let cqe_ns = if timed { device.profiler.now() } else { None };
    let mut irq_ns = None;
    if notify {
        cq.arm = Arm::Disarmed;
        if device.notify_cq(mem, irq, cq_handle) && cqe_ns.is_some() {
            irq_ns = device.profiler.now();
        }
    }
    cqe_ns.map(|cqe_ns| Written { cqe_ns, irq_ns })
}

/// The completion opcode for a send work request's opcode.
pub(super) fn send_completion_opcode(opcode: u32) -> u32 {
    match opcode {
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => wc_opcode::RDMA_WRITE,
        wr_opcode::RDMA_READ => wc_opcode::RDMA_READ,
        wr_opcode::ATOMIC_CMP_AND_SWP => wc_opcode::COMP_SWAP,
        wr_opcode::ATOMIC_FETCH_AND_ADD => wc_opcode::FETCH_ADD,
        wr_opcode::LOCAL_INV => wc_opcode::LOCAL_INV,
        wr_opcode::FAST_REG_MR => wc_opcode::FAST_REG_MR,
        _ => wc_opcode::SEND,
    }
}

/// Completes every WQE outstanding on `qp_handle`'s queues with WR_FLUSH_ERR, as a QP in the
/// error state must (device-abi §9.2). Bounded by the queue sizes.
pub(super) fn flush_qp(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qp_handle: u32,
) {
    let mut flushed = Vec::new();
    let mut corrupt = false;
    let Some(qp) = device.objects.qps.get_mut(qp_handle) else {
        return;
    };
    // Work in flight is still in the ring and is flushed with the rest.
    qp.in_flight.clear();
    qp.waiting_transport = false;
    let base = Cqe {
        qp: u64::from(qp_handle),
        status: wc_status::WR_FLUSH_ERR,
        ..Cqe::default()
    };
    let mut header = [0u8; size_of::<SendWqeHeader>()];
    for _ in 0..qp.sq.indices().max() {
        match qp.sq.peek(mem, &mut header) {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(_) => {
                corrupt = true;
                break;
            }
        }
        let Ok(wqe) = SendWqeHeader::read_from_bytes(&header) else {
            break;
        };
        flushed.push((
            qp.send_cq,
            Cqe {
                wr_id: wqe.wr_id,
                opcode: send_completion_opcode(wqe.opcode),
                ..base
            },
        ));
        if qp.sq.consume(mem).is_err() {
            break;
        }
    }
    if let Some(rq) = qp.rq.as_mut() {
        let mut header = [0u8; size_of::<RecvWqeHeader>()];
        for _ in 0..rq.indices().max() {
            match rq.peek(mem, &mut header) {
                Ok(Some(())) => {}
                Ok(None) => break,
                Err(_) => {
                    corrupt = true;
                    break;
                }
            }
            let Ok(wqe) = RecvWqeHeader::read_from_bytes(&header) else {
                break;
            };
            flushed.push((
                qp.recv_cq,
                Cqe {
                    wr_id: wqe.wr_id,
                    opcode: wc_opcode::RECV,
                    ..base
                },
            ));
            if rq.consume(mem).is_err() {
                break;
            }
        }
    }
    qp.stats.wqes_posted += flushed.len() as u64;
    for (cq, cqe) in flushed {
        complete(device, mem, irq, cq, &cqe, false, false);
    }
    // A queue whose producer index is corrupt cannot be drained: tell the guest (rule 16).
    if corrupt {
        device.post_event(mem, irq, abi::event::QP_FATAL, qp_handle);
    }
}
