//! Exit-free doorbells: the UAR pages are plain memory the guest writes without a VM exit,
//! and the server polls them. A doorbell word only says "something happened" and the last
//! writer wins, so the rings stay the authority: every poll also drains each send queue that
//! has work, whatever its doorbell word says.

use pvrdma_backend::Network;

use super::objects::KERNEL_CONTEXT;
use super::{Interrupts, PvrdmaDevice, doorbell};
use crate::abi::{PAGE_SHIFT, qp_state, uar};

/// Polls between two scans of every send queue even when no send doorbell was seen: a
/// safety net, never needed by the reasoning below, that costs one ring read per QP.
const SCAN_EVERY: u32 = 256;

/// What the poller keeps between polls: its lists, reused so that a poll allocates nothing,
/// and the polls since the last full scan of the send queues.
#[derive(Debug, Default)]
pub(crate) struct PollState {
    pages: Vec<u32>,
    busy: Vec<u32>,
    /// QPs the host's RDMA device carries.
    carried: Vec<u32>,
    since_scan: u32,
}

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
        let mut state = std::mem::take(&mut self.poll_state);
        let mut activity = false;
        let mut qp_rung = false;
        state.pages.clear();
        state.pages.push(KERNEL_CONTEXT);
        state
            .pages
            .extend(self.objects.contexts.iter().map(|(_, ctx)| ctx.uar_index));
        for &page in &state.pages {
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
                    qp_rung |= word == uar::QP_OFFSET;
                    doorbell::ring(self, mem, irq, net, offset, value);
                }
            }
        }
        // A send doorbell overwritten before this poll saw it (the words are last-writer-
        // wins) was overwritten by another QP doorbell, which this poll or an earlier one
        // saw: the guest writes the SQ's producer index before its doorbell, so scanning
        // every send queue whenever a QP doorbell shows up finds the lost one's work.
        state.since_scan = state.since_scan.saturating_add(1);
        if qp_rung || state.since_scan >= SCAN_EVERY {
            state.since_scan = 0;
            state.busy.clear();
            state.busy.extend(
                self.objects
                    .qps
                    .iter()
                    .filter(|(_, qp)| qp.attr.qp_state == qp_state::RTS && !qp.stalled)
                    .filter(|(_, qp)| qp.sq.backlog(mem).is_ok_and(|pending| pending > 0))
                    .map(|(handle, _)| handle),
            );
            // Receives whose doorbell was overwritten, for QPs the host device carries.
            state.carried.clear();
            state.carried.extend(
                self.objects
                    .qps
                    .iter()
                    .filter(|(_, qp)| matches!(qp.host, super::objects::HostLink::Carrying { .. }))
                    .map(|(handle, _)| handle),
            );
            for &handle in &state.carried {
                super::datapath::post_host_receives(self, mem, net, handle);
            }
            for &handle in &state.busy {
                activity = true;
                // Work found without its doorbell: it counts as rung now.
                let started = self.profiler.sample();
                if let Some(qp) = self.objects.qps.get_mut(handle) {
                    qp.doorbell_ns = started;
                }
                super::datapath::process_send_queue(self, mem, irq, net, handle, started);
            }
        }
        self.poll_state = state;
        activity
    }
}
