//! UAR doorbells (device-abi §7): decode the page and word, check that the object belongs to the
//! context that owns the page, and act.

use log::debug;
use pvrdma_backend::Network;

use super::memory::GuestRam;
use super::objects::{Arm, KERNEL_CONTEXT};
use super::{Interrupts, PvrdmaDevice};
use crate::abi::{PAGE_SHIFT, qp_state, uar};

pub(super) fn ring(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    offset: u64,
    value: u32,
) {
    let page = u32::try_from(offset >> PAGE_SHIFT).unwrap_or(u32::MAX);
    let Some(page_ctx) = page_context(device, page) else {
        debug!("doorbell on unowned UAR page {page}");
        return;
    };
    let handle = value & uar::HANDLE_MASK;
    match offset & 0xfff {
        uar::QP_OFFSET => {
            let objects = &device.objects;
            let Some(qp) = objects
                .qps
                .get(handle)
                .filter(|qp| objects.pd_context(qp.pd) == Some(page_ctx))
            else {
                debug!("QP doorbell {value:#x} for a QP not owned by UAR page {page}");
                return;
            };
            // Work posted to a QP in the error state completes at once, flushed (device-abi §9.1).
            let in_error = qp.attr.qp_state == qp_state::ERR;
            let send = value & uar::QP_SEND != 0;
            let rang = if send { device.profiler.sample() } else { None };
            if let Some(qp) = device.objects.qps.get_mut(handle) {
                qp.stats.doorbells += 1;
                if send {
                    qp.doorbell_ns = rang;
                }
            }
            if value & uar::QP_RECV != 0 {
                device.note_wake_event();
            }
            if in_error {
                super::completion::flush_qp(device, mem, irq, handle);
                return;
            }
            // Exit-free doorbell words may hide a receive doorbell under a send: any QP
            // doorbell hands new receives to a host QP that carries the QP.
            super::datapath::post_host_receives(device, mem, net, handle);
            if send {
                super::datapath::process_send_queue(device, mem, irq, net, handle, rang);
            }
            // New receives may be what a stalled sender (maybe this device's own, in
            // loopback) waits for; other devices' senders are resumed by the fabric.
            if value & uar::QP_RECV != 0 && device.has_stalled_work() {
                device.resume_stalled(mem, irq, net);
            }
        }
        uar::CQ_OFFSET => {
            let Some(cq) = device
                .objects
                .cqs
                .get_mut(handle)
                .filter(|cq| cq.ctx == page_ctx)
            else {
                debug!("CQ doorbell {value:#x} for a CQ not owned by UAR page {page}");
                return;
            };
            let armed = if value & uar::CQ_ARM != 0 {
                cq.arm = Arm::NextCompletion;
                true
            } else if value & uar::CQ_ARM_SOL != 0 && cq.arm != Arm::NextCompletion {
                cq.arm = Arm::Solicited;
                true
            } else {
                false
            };
            // An arm that finds completions the guest has not consumed yet notifies at once:
            // they may have arrived after the guest last polled but before the device saw the
            // arm (always possible with exit-free doorbells, which are seen late). A spurious
            // notification is harmless; a missed one hangs a guest waiting for its event.
            if armed && !cq.broken && cq.ring.unconsumed(mem).is_ok_and(|n| n > 0) {
                cq.arm = Arm::Disarmed;
                device.notify_cq(mem, irq, handle);
            }
            // POLL asks for completions the device still holds; this device writes every
            // CQE synchronously, so there is never anything to flush.
        }
        uar::SRQ_OFFSET => {
            let objects = &device.objects;
            let owned = objects
                .srqs
                .get(handle)
                .is_some_and(|srq| objects.pd_context(srq.pd) == Some(page_ctx));
            if !owned {
                debug!("SRQ doorbell {value:#x} for an SRQ not owned by UAR page {page}");
                return;
            }
            device.note_wake_event();
            if device.has_stalled_work() {
                device.resume_stalled(mem, irq, net);
            }
        }
        word => debug!("write {value:#x} to unused UAR word {word:#x} ignored"),
    }
}

/// The context that owns UAR `page`: page 0 is the kernel's, the others belong to the user
/// context created with that page.
fn page_context(device: &PvrdmaDevice, page: u32) -> Option<u32> {
    if page == 0 {
        return Some(KERNEL_CONTEXT);
    }
    device
        .objects
        .contexts
        .iter()
        .find(|(_, ctx)| ctx.uar_index == page)
        .map(|(handle, _)| handle)
}
