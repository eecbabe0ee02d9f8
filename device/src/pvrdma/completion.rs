//! Writing completions: CQEs into a CQ ring, the CQ notification an armed CQ asks for, the
//! CQ_ERR event when a CQ overflows, and the flush of a QP's outstanding work (§6.6, §9.2).

use log::warn;
use zerocopy::{FromBytes, IntoBytes};

use super::memory::GuestRam;
use super::objects::Arm;
use super::ring::RingError;
use super::{Interrupts, PvrdmaDevice};
use crate::abi::{self, Cqe, RecvWqeHeader, SendWqeHeader, wc_opcode, wc_status, wr_opcode};

/// Appends `cqe` to `cq` and notifies the guest if the CQ is armed for it. A full or corrupt
/// CQ is never overwritten: it is marked broken and the guest gets CQ_ERR (§6.6).
pub(super) fn complete(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    cq_handle: u32,
    cqe: &Cqe,
    solicited: bool,
) {
    let Some(cq) = device.objects.cqs.get_mut(cq_handle) else {
        return;
    };
    if cq.broken {
        return;
    }
    match cq.ring.push(mem, cqe.as_bytes()) {
        Ok(()) => {}
        Err(e @ (RingError::Full | RingError::BadIndex(_) | RingError::Fault(_))) => {
            warn!("CQ {cq_handle} cannot take a completion ({e}); reporting CQ_ERR");
            cq.broken = true;
            device.post_event(mem, irq, abi::event::CQ_ERR, cq_handle);
            return;
        }
    }
    let notify = match cq.arm {
        Arm::NextCompletion => true,
        Arm::Solicited => solicited || cqe.status != wc_status::SUCCESS,
        Arm::Disarmed => false,
    };
    if notify {
        cq.arm = Arm::Disarmed;
        device.notify_cq(mem, irq, cq_handle);
    }
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
/// error state must (§9.2). Bounded by the queue sizes.
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
    for (cq, cqe) in flushed {
        complete(device, mem, irq, cq, &cqe, false);
    }
    // A queue whose producer index is corrupt cannot be drained: tell the guest (rule 16).
    if corrupt {
        device.post_event(mem, irq, abi::event::QP_FATAL, qp_handle);
    }
}
