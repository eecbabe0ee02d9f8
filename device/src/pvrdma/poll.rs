//! Exit-free doorbells: the UAR pages are plain memory the guest writes without a VM exit,
//! and the server polls them. A doorbell word only says "something happened" and the last
//! writer wins, so the rings stay the authority: every poll also drains each send queue that
//! has work, whatever its doorbell word says.

use pvrdma_backend::Network;

use super::objects::KERNEL_CONTEXT;
use super::{Interrupts, PvrdmaDevice, doorbell};
use crate::abi::{PAGE_SHIFT, qp_state, uar};

impl PvrdmaDevice {
    /// One poll of the UAR pages in use. `take(offset)` returns the doorbell word at `offset`
    /// of BAR2 and clears it. Returns whether anything happened (the poller spins while busy).
    pub fn poll_uar(
        &mut self,
        mem: &super::GuestRam,
        irq: &mut dyn Interrupts,
        net: &mut dyn Network,
        take: &mut dyn FnMut(u64) -> u32,
    ) -> bool {
        if !self.active {
            return false;
        }
        let mut activity = false;
        let pages: Vec<u32> = std::iter::once(KERNEL_CONTEXT)
            .chain(self.objects.contexts.iter().map(|(_, ctx)| ctx.uar_index))
            .collect();
        for page in pages {
            for word in [uar::QP_OFFSET, uar::CQ_OFFSET, uar::SRQ_OFFSET] {
                let offset = (u64::from(page) << PAGE_SHIFT) + word;
                let mut value = take(offset);
                // Both guest pollers follow an arm with a poll of the CQ, whose "found it
                // empty" doorbell lands in the same word: a POLL may hide the ARM before it.
                // Read a POLL as an arm too: at worst one spurious notification.
                if word == uar::CQ_OFFSET && value & uar::CQ_POLL != 0 {
                    value |= uar::CQ_ARM;
                }
                if value != 0 {
                    activity = true;
                    doorbell::ring(self, mem, irq, net, offset, value);
                }
            }
        }
        // Send doorbells that were overwritten before this poll saw them: the SQ producer
        // index tells what is pending.
        let busy: Vec<u32> = self
            .objects
            .qps
            .iter()
            .filter(|(_, qp)| qp.attr.qp_state == qp_state::RTS && !qp.stalled)
            .filter(|(_, qp)| qp.sq.backlog(mem).is_ok_and(|pending| pending > 0))
            .map(|(handle, _)| handle)
            .collect();
        for handle in busy {
            activity = true;
            let started = self.profiler.now();
            super::datapath::process_send_queue(self, mem, irq, net, handle, started);
        }
        activity
    }
}
