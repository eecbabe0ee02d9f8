//! The PVRDMA device model: registers (BAR1), the Device Shared Region, the command channel,
//! the device rings and the UAR doorbells (BAR2).
//!
//! It is sans-IO: every call gets the guest memory it may touch and a sink for interrupts,
//! and runs to completion. No sockets, no threads, no file descriptors, so every path a guest
//! can reach is exercised by in-process tests and fuzzing.

pub mod caps;
mod commands;
mod completion;
mod datapath;
mod doorbell;
mod dsr;
pub mod memory;
mod objects;
mod pdir;
mod poll;
pub mod profile;
mod ring;
mod table;

use log::{debug, warn};
use pvrdma_backend::{Network, Outcome, RemoteError, Request};

pub use caps::Limits;
pub use memory::GuestRam;
pub use profile::{Clock, DEFAULT_SAMPLE_EVERY, Histogram, QpStats, Stage};

use crate::abi::{self, regs, uar};
use dsr::SharedRegion;
use objects::Objects;
use profile::Profiler;
use std::sync::Arc;

/// Releases what the host's RDMA device holds for the asking device's objects, which are
/// about to go all at once (a reset, a new DSR).
fn forget_host(net: &dyn Network) {
    if let Some(host) = net.host() {
        host.qps.forget_owner(host.owner);
    }
}

/// Where the device's interrupts go (MSI-X vectors, already filtered by IMR).
pub trait Interrupts {
    fn raise(&mut self, vector: u16);
}

/// Errors the device reports in the ERR register (positive errno values; the driver only
/// checks for non-zero).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const ENOENT: u32 = 2;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EFAULT: u32 = 14;
    pub const EBUSY: u32 = 16;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOPNOTSUPP: u32 = 95;
    pub const EADDRINUSE: u32 = 98;
}

/// `ERR` before any successful DSR load, as QEMU's device had it.
const ERR_UNINITIALISED: u32 = 0xffff;

/// Static configuration of one device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    pub limits: Limits,
    pub node_guid: [u8; 8],
    /// Seeds the memory keys the device hands out, so that they cannot be guessed from a
    /// handle (the server takes it from the kernel's random source; tests use a fixed one).
    pub key_seed: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            limits: Limits::default(),
            node_guid: caps::eui64([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]),
            key_seed: 0x243f_6a88_85a3_08d3,
        }
    }
}

#[derive(Debug)]
pub struct PvrdmaDevice {
    config: DeviceConfig,
    dsr_low: u32,
    dsr_high: u32,
    shared: Option<SharedRegion>,
    active: bool,
    err: u32,
    icr: u32,
    imr: u32,
    mac: [u32; 2],
    objects: Objects,
    /// Kept across resets, like the configuration.
    profiler: Profiler,
    /// The exit-free poller's reusable lists and counter (see `poll`).
    poll_state: poll::PollState,
    /// Where a datagram a host UD QP received is staged for the responder (made at first
    /// use: 4 KiB, the largest datagram).
    staging: Option<GuestRam>,
    /// Counts what may let a sender stalled on this device (receiver not ready) proceed or
    /// fail: receives posted, QPs, SRQs and GIDs changed or gone, resets. Kept across resets.
    /// The fabric retries stalled senders only when some device's count moved, so a
    /// parked queue costs nothing on unrelated register writes and doorbells.
    wake_events: u64,
}

impl PvrdmaDevice {
    pub fn new(config: DeviceConfig) -> PvrdmaDevice {
        PvrdmaDevice {
            objects: Objects::new(&config.limits, config.key_seed),
            config,
            dsr_low: 0,
            dsr_high: 0,
            shared: None,
            active: false,
            err: ERR_UNINITIALISED,
            icr: 0,
            imr: u32::MAX,
            mac: [0; 2],
            profiler: Profiler::default(),
            poll_state: poll::PollState::default(),
            staging: None,
            wake_events: 0,
        }
    }

    /// The staging buffer for host datagrams, taken out while a request uses it (`None` if
    /// it cannot be made).
    pub(crate) fn take_staging(&mut self) -> Option<GuestRam> {
        match self.staging.take() {
            Some(staging) => Some(staging),
            None => GuestRam::from_ranges(&[(vm_memory::GuestAddress(0), 4096)])
                .map_err(|e| warn!("rdma path: no staging buffer for datagrams: {e}"))
                .ok(),
        }
    }

    pub(crate) fn put_staging(&mut self, staging: GuestRam) {
        self.staging = Some(staging);
    }

    /// Power-on state: every object destroyed, every guest address forgotten. The profiler's
    /// switch and clock stay.
    pub fn reset(&mut self) {
        let profiler = std::mem::take(&mut self.profiler);
        let wake_events = self.wake_events;
        *self = PvrdmaDevice::new(self.config);
        self.profiler = profiler;
        // Senders stalled on this device's QPs now find them gone.
        self.wake_events = wake_events.wrapping_add(1);
    }

    /// [`PvrdmaDevice::reset`], with what the host's RDMA device holds for this device's
    /// objects (host QPs and registrations) released too.
    pub fn reset_on(&mut self, net: &dyn Network) {
        forget_host(net);
        self.reset();
    }

    /// See the `wake_events` field: compare before and after work to learn whether stalled
    /// senders anywhere should be retried.
    pub fn wake_events(&self) -> u64 {
        self.wake_events
    }

    /// Records something a stalled sender may be waiting for.
    pub(crate) fn note_wake_event(&mut self) {
        self.wake_events = self.wake_events.wrapping_add(1);
    }

    /// The clock stage latencies are measured with (none until one is given: all 0).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.profiler.clock = clock;
    }

    /// Turns the stage timing on or off (counters are always kept).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler.enabled = on;
    }

    pub fn profiling(&self) -> bool {
        self.profiler.enabled
    }

    /// Times one pass over a send queue in `every` (1: every pass; 0 counts as 1).
    pub fn set_profile_sampling(&mut self, every: u32) {
        self.profiler.set_sampling(every);
    }

    /// The profiler's figures for every QP, by QP number (the `qp_num` tools print).
    pub fn qp_stats(&self) -> Vec<(u32, QpStats)> {
        self.objects
            .qps
            .iter()
            .map(|(_, qp)| (qp.qpn, qp.stats))
            .collect()
    }

    /// Each QP's destination for the profiler's path column: `None` for datagram QPs (the
    /// destination is per work request), `Some(None)` for an RC QP not connected yet,
    /// `Some(Some(gid))` for a connected one.
    pub fn qp_destinations(&self) -> Vec<(u32, Option<Option<[u8; 16]>>)> {
        self.objects
            .qps
            .iter()
            .map(|(_, qp)| {
                let destination = if qp.qp_type == abi::qp_type::RC {
                    let connected =
                        !matches!(qp.attr.qp_state, abi::qp_state::RESET | abi::qp_state::INIT);
                    Some(connected.then_some(qp.attr.ah_attr.grh.dgid))
                } else {
                    None
                };
                (qp.qpn, destination)
            })
            .collect()
    }

    /// The numbers of the QPs the host's RDMA device carries (the rdma path).
    pub fn qps_on_host(&self) -> Vec<u32> {
        self.objects
            .qps
            .iter()
            .filter(|(_, qp)| matches!(qp.host, objects::HostLink::Carrying { .. }))
            .map(|(_, qp)| qp.qpn)
            .collect()
    }

    /// The profiler's figures for QP `handle`.
    pub fn qp_stats_of(&self, handle: u32) -> Option<QpStats> {
        self.objects.qps.get(handle).map(|qp| qp.stats)
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Objects the guest has created and not destroyed (contexts, PDs, MRs, CQs, QPs, SRQs).
    pub fn object_count(&self) -> usize {
        let o = &self.objects;
        o.contexts.len() + o.pds.len() + o.mrs.len() + o.cqs.len() + o.qps.len() + o.srqs.len()
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// A 32-bit read of BAR1 at `offset`. Unknown offsets read 0.
    pub fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            regs::VERSION => caps::DEVICE_VERSION,
            regs::ERR => self.err,
            // Read-to-clear, so the single-vector fallback sees each cause once.
            regs::ICR => std::mem::take(&mut self.icr),
            regs::IMR => self.imr,
            regs::MAC_LOW => self.mac[0],
            regs::MAC_HIGH => self.mac[1],
            regs::DSR_LOW => self.dsr_low,
            regs::DSR_HIGH => self.dsr_high,
            _ => 0,
        }
    }

    /// A 32-bit write of BAR1. Everything the write triggers is finished when it returns:
    /// the driver reads the result (caps, ERR) right after, with only a barrier between.
    pub fn write_register(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        net: &dyn Network,
        offset: u64,
        value: u32,
    ) {
        match offset {
            regs::DSR_LOW => self.dsr_low = value,
            regs::DSR_HIGH => {
                self.dsr_high = value;
                forget_host(net);
                self.load_dsr(mem);
            }
            regs::CTL => {
                if value == regs::CTL_RESET {
                    forget_host(net);
                }
                self.control(value);
            }
            regs::REQUEST => self.request(mem, irq, net, value),
            regs::IMR => self.imr = value,
            regs::MAC_LOW => self.mac[0] = value,
            regs::MAC_HIGH => self.mac[1] = value & 0xffff,
            _ => debug!("ignored register write {value:#x} at {offset:#x}"),
        }
    }

    /// A 32-bit write of BAR2 (a UAR doorbell). Work that leaves the device goes to `net`.
    pub fn write_doorbell(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        net: &mut dyn Network,
        offset: u64,
        value: u32,
    ) {
        if !self.active {
            debug!("doorbell {value:#x} at {offset:#x} before activation ignored");
            return;
        }
        doorbell::ring(self, mem, irq, net, offset, value);
    }

    /// The work requests a send doorbell (`value` at BAR2 `offset`) would find waiting in its
    /// QP's send queue; 0 for any other doorbell, or one that names no QP. A hint for how
    /// to schedule the doorbell (see `vfio::function`), never a check: ringing it validates.
    pub fn send_doorbell_backlog(&self, mem: &GuestRam, offset: u64, value: u32) -> u32 {
        if !self.active || offset & 0xfff != uar::QP_OFFSET || value & uar::QP_SEND == 0 {
            return 0;
        }
        self.objects
            .qps
            .get(value & uar::HANDLE_MASK)
            .and_then(|qp| qp.sq.backlog(mem).ok())
            .unwrap_or(0)
    }

    /// The GIDs this device's port holds (none while inactive).
    pub fn gids(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.objects
            .gids
            .iter()
            .flatten()
            .filter(|_| self.active)
            .map(|bound| bound.raw)
    }

    /// Whether this device's port has `gid` (a GID the driver bound with CREATE_BIND).
    pub fn has_gid(&self, gid: &[u8; 16]) -> bool {
        self.active
            && self
                .objects
                .gids
                .iter()
                .flatten()
                .any(|bound| bound.raw == *gid)
    }

    /// Executes a request from a peer (the responder side of the data path).
    pub fn respond(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        request: &Request<'_>,
    ) -> Result<Outcome, RemoteError> {
        if !self.active {
            return Err(RemoteError::Unreachable);
        }
        datapath::respond(self, mem, irq, request)
    }

    /// Executes a request a transport brought from another host. A reliable one for a QP
    /// not ready yet (RESET or INIT) is dropped ([`RemoteError::Dropped`]), as a fabric drops
    /// such a packet: the requester's transport sends it again after its timeout, by when a
    /// QP caught between its peer's RTS and its own RTR is ready.
    pub fn respond_to_remote_host(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        request: &Request<'_>,
    ) -> Result<Outcome, RemoteError> {
        if request.service == pvrdma_backend::Service::Reliable && !self.rc_qp_takes(request) {
            return Err(RemoteError::Dropped);
        }
        self.respond(mem, irq, request)
    }

    /// A completion of a host QP that carries one of this device's QPs (the rdma path).
    pub fn complete_host(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        net: &mut dyn Network,
        qpn: u32,
        event: &pvrdma_backend::HostEvent,
    ) {
        if self.active {
            datapath::complete_host(self, mem, irq, net, qpn, event);
        }
    }

    /// A transport's answer to a request this device issued (see `Delivery::Pending`).
    pub fn complete_remote(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        net: &mut dyn Network,
        completion: &pvrdma_backend::Completion<'_>,
    ) {
        if self.active {
            datapath::complete_remote(self, mem, irq, net, completion);
        }
    }

    /// A responder keeps a request of QP `qpn` to retry for receiver-not-ready (counted).
    pub fn note_receiver_not_ready(&mut self, qpn: u32) {
        datapath::note_receiver_not_ready(self, qpn);
    }

    /// Whether a reliable request from another host reaches a QP that takes requests from
    /// its sender: an RC QP that exists, is past INIT and not in error, and is connected to
    /// the requesting QP. On a real fabric a packet that does not is dropped without an
    /// answer and the requester's transport retries until its budget is spent
    /// (RETRY_EXC_ERR). That covers the moment between a peer's RTS and this QP's RTR, and
    /// work still in flight when this QP is destroyed: a tool that tears its QPs down while
    /// the other side still sends (ibv_srq_pingpong posts up to a send per QP beyond its
    /// count) must not get an immediate error where the hardware would say nothing.
    fn rc_qp_takes(&self, request: &Request<'_>) -> bool {
        self.objects
            .qp_handle(request.destination.qpn)
            .and_then(|handle| self.objects.qps.get(handle))
            .is_some_and(|qp| {
                qp.qp_type == abi::qp_type::RC
                    // A QP the host's RDMA device carries takes its requests there only.
                    && !matches!(qp.host, objects::HostLink::Carrying { .. })
                    && !matches!(
                        qp.attr.qp_state,
                        abi::qp_state::RESET | abi::qp_state::INIT | abi::qp_state::ERR
                    )
                    && qp.attr.dest_qp_num == request.source.qpn
                    && qp.attr.ah_attr.grh.dgid == request.source.gid
            })
    }

    /// Whether a transport still carries work requests of this device (answers pending).
    pub fn has_remote_work(&self) -> bool {
        self.objects
            .qps
            .iter()
            .any(|(_, qp)| !qp.in_flight.is_empty())
    }

    /// Whether a send queue waits for a peer to post a receive.
    pub fn has_stalled_work(&self) -> bool {
        self.objects.qps.iter().any(|(_, qp)| qp.stalled)
    }

    /// Retries the send queues that wait for a receiver (after receives were posted).
    pub fn resume_stalled(
        &mut self,
        mem: &GuestRam,
        irq: &mut dyn Interrupts,
        net: &mut dyn Network,
    ) {
        datapath::resume_stalled(self, mem, irq, net);
    }

    fn load_dsr(&mut self, mem: &GuestRam) {
        // A new DSR replaces the old one and whatever the device knew about the guest.
        self.objects.clear();
        self.note_wake_event();
        self.active = false;
        let addr = u64::from(self.dsr_high) << 32 | u64::from(self.dsr_low);
        match SharedRegion::load(mem, addr, &self.config) {
            Ok(shared) => {
                self.shared = Some(shared);
                self.err = 0;
            }
            Err(e) => {
                warn!("rejected the device shared region at {addr:#x}: {e}");
                self.shared = None;
                self.err = errno::EINVAL;
            }
        }
    }

    fn control(&mut self, value: u32) {
        self.err = match value {
            regs::CTL_ACTIVATE if self.shared.is_some() => {
                self.active = true;
                0
            }
            regs::CTL_ACTIVATE => errno::EPERM,
            regs::CTL_UNQUIESCE if self.active => 0,
            regs::CTL_UNQUIESCE => errno::EPERM,
            regs::CTL_RESET => {
                self.reset();
                0
            }
            other => {
                warn!("unknown CTL value {other:#x}");
                errno::EINVAL
            }
        };
    }

    fn request(&mut self, mem: &GuestRam, irq: &mut dyn Interrupts, net: &dyn Network, value: u32) {
        if value != 0 {
            debug!("REQUEST write of {value:#x} ignored (only 0 executes)");
            return;
        }
        let mut flush = Vec::new();
        self.err = match commands::execute(self, mem, net, &mut flush) {
            Ok(()) => 0,
            Err(errno) => errno,
        };
        // Every command completes with vector 0, failed or not, as QEMU's device did.
        self.raise(irq, abi::vector::COMMAND);
        for qp in flush {
            completion::flush_qp(self, mem, irq, qp);
        }
    }

    /// Raises `vector` unless IMR masks it; the cause is latched in ICR either way. Returns
    /// whether the interrupt went out.
    fn raise(&mut self, irq: &mut dyn Interrupts, vector: u16) -> bool {
        let bit = 1u32 << vector;
        self.icr |= bit;
        if self.imr & bit == 0 {
            irq.raise(vector);
            true
        } else {
            false
        }
    }

    /// Appends an async event and raises vector 1. Dropped (with a warning) when the ring
    /// is full or broken: the driver then misses one event, but never a corrupt ring.
    fn post_event(&mut self, mem: &GuestRam, irq: &mut dyn Interrupts, event_type: u32, info: u32) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        let eqe = abi::Eqe { event_type, info };
        match shared
            .async_ring
            .push(mem, zerocopy::IntoBytes::as_bytes(&eqe))
        {
            Ok(()) => {
                self.raise(irq, abi::vector::ASYNC_EVENT);
            }
            Err(e) => warn!("async event {event_type} for {info} dropped: {e}"),
        }
    }

    /// Tells the driver that `cq` has a new completion: one CQ notification per arm.
    /// Returns whether an interrupt went out.
    fn notify_cq(&mut self, mem: &GuestRam, irq: &mut dyn Interrupts, cq: u32) -> bool {
        let Some(shared) = self.shared.as_mut() else {
            return false;
        };
        let cqne = abi::Cqne { info: cq };
        match shared
            .cq_notify_ring
            .push(mem, zerocopy::IntoBytes::as_bytes(&cqne))
        {
            Ok(()) => self.raise(irq, abi::vector::CQ_NOTIFY),
            Err(e) => {
                warn!("CQ notification for CQ {cq} dropped: {e}");
                false
            }
        }
    }
}
