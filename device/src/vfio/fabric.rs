//! The devices of one server process, joined into one memcpy fabric.
//!
//! Each socket's thread owns its PCI function (config space, DMA windows); the parts a peer
//! must reach — the device model, the guest RAM mapped for it and its interrupt eventfds —
//! live in a slot of the shared fabric. One lock guards the fabric: a request from one
//! guest to another runs entirely under it, so the two devices, both memories and the
//! responder's interrupts are consistent for its whole duration, and a DMA_UNMAP (which
//! also takes the lock) can never pull memory out from under a copy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, error, warn};
use pvrdma_backend::memcpy::MemcpyFabric;
use pvrdma_backend::{Outcome, RemoteError, Request, Responder};

use super::irqs::MsixEventfds;
use super::memory_fault::{self, GuardedRam};
use super::uar::UarPages;
use crate::profiler::{DeviceSnapshot, PeerSnapshot, QpPath, Snapshot};
use crate::pvrdma::{Clock, DeviceConfig, GuestRam, Interrupts, PvrdmaDevice};

/// The server's clock for the profiler: monotonic nanoseconds since the clock was made.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One device's state that peers reach.
#[derive(Debug)]
pub struct Slot {
    pub device: PvrdmaDevice,
    /// The client's DMA windows, mapped.
    pub ram: GuestRam,
    /// What the device may touch while bus mastering is off: nothing.
    pub no_ram: GuestRam,
    pub msix: MsixEventfds,
    pub bus_master: bool,
    /// The UAR pages, when doorbells are exit-free.
    pub uar: Option<Arc<UarPages>>,
    /// `ram`'s registration with the SIGBUS guard; replaced with it by [`Slot::set_ram`].
    ram_guard: GuardedRam,
    /// Why the device was failed (its guest memory vanished); its client is disconnected.
    pub failed: Option<String>,
}

impl Slot {
    fn new(config: DeviceConfig) -> Slot {
        let mut device = PvrdmaDevice::new(config);
        device.set_clock(Arc::new(MonotonicClock::new()));
        Slot {
            device,
            ram: GuestRam::default(),
            no_ram: GuestRam::default(),
            msix: MsixEventfds::default(),
            bus_master: false,
            uar: None,
            ram_guard: GuardedRam::default(),
            failed: None,
        }
    }

    /// Replaces the device's mapped RAM, guarded against the client shrinking its files.
    pub fn set_ram(&mut self, ram: GuestRam) {
        // The old guard goes before the old mapping, so no stale range stays registered.
        self.ram_guard = GuardedRam::default();
        self.ram = ram;
        self.ram_guard = GuardedRam::new(&self.ram);
    }

    /// The device, the memory it may use now and its interrupt sink, borrowed apart.
    pub fn parts(&mut self) -> (&mut PvrdmaDevice, &GuestRam, MsixSink<'_>) {
        let mem = if self.bus_master {
            &self.ram
        } else {
            &self.no_ram
        };
        let irq = MsixSink {
            msix: &self.msix,
            bus_master: self.bus_master,
        };
        (&mut self.device, mem, irq)
    }

    /// The memory the device may use now: none until the driver enables bus mastering.
    pub fn memory(&self) -> &GuestRam {
        if self.bus_master {
            &self.ram
        } else {
            &self.no_ram
        }
    }
}

impl Responder for Slot {
    fn has_gid(&self, gid: &[u8; 16]) -> bool {
        self.device.has_gid(gid)
    }

    fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        let (device, mem, mut irq) = self.parts();
        device.respond(mem, &mut irq, request)
    }
}

/// The fabric shared by every socket thread of the process.
#[derive(Clone, Default)]
pub struct Fabric {
    shared: Arc<Mutex<MemcpyFabric<Slot>>>,
    /// How many devices were failed so far: a socket thread compares it with the count it
    /// saw last to learn, without the lock, whether to look at its slot's `failed`.
    failures: Arc<AtomicUsize>,
    /// The TCP transport's peers, for the profiler (set when a transport runs).
    peers: Arc<std::sync::OnceLock<pvrdma_backend::tcp::runtime::PeerView>>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fabric({} devices)", self.lock().len())
    }
}

impl Fabric {
    pub fn new() -> Fabric {
        Fabric::default()
    }

    /// Adds a device; returns its slot index.
    pub fn add_device(&self, config: DeviceConfig) -> usize {
        self.lock().add(Slot::new(config))
    }

    /// Makes slot `index`'s doorbells exit-free: the poller reads them from `uar`.
    pub fn set_uar(&self, index: usize, uar: Arc<UarPages>) {
        self.lock()
            .with_endpoint(index, |slot, _| slot.uar = Some(uar));
    }

    /// One poll of every exit-free device's doorbells; whether anything happened.
    pub fn poll_doorbells(&self) -> bool {
        let mut fabric = self.lock();
        let mut activity = false;
        let mut woke = false;
        for index in fabric.indices() {
            fabric.with_endpoint(index, |slot, net| {
                let Some(uar) = slot.uar.clone() else { return };
                if !slot.bus_master {
                    return;
                }
                let (device, mem, mut irq) = slot.parts();
                let before = device.wake_events();
                activity |= device.poll_uar(mem, &mut irq, net, &mut |offset| uar.take(offset));
                woke |= device.wake_events() != before;
            });
        }
        // Exit-free doorbell words are last-writer-wins: a receive doorbell may be lost under
        // a later send word of the same page, so any activity may have posted a receive.
        if woke || activity {
            resume_stalled(&mut fabric);
        }
        self.contain_faults(&mut fabric);
        activity
    }

    /// Sends requests for GIDs outside this process to `remote` (the TCP transport).
    pub fn set_remote(&self, remote: pvrdma_backend::memcpy::Remote) {
        self.lock().set_remote(remote);
    }

    /// Every GID the devices of this process hold.
    pub fn local_gids(&self) -> Vec<[u8; 16]> {
        let mut fabric = self.lock();
        let mut gids = Vec::new();
        for index in fabric.indices() {
            fabric.with_endpoint(index, |slot, _| gids.extend(slot.device.gids()));
        }
        gids
    }

    /// A peer server's request for the device that holds its destination GID.
    pub fn respond_remote(&self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        let mut fabric = self.lock();
        let Some(index) = fabric.find(&request.destination.gid) else {
            return Err(match request.service {
                pvrdma_backend::Service::Datagram { .. } => RemoteError::Dropped,
                pvrdma_backend::Service::Reliable => RemoteError::Unreachable,
            });
        };
        let reliable = matches!(request.service, pvrdma_backend::Service::Reliable);
        let qpn = request.destination.qpn;
        let result = fabric
            .with_endpoint(index, |slot, _| {
                // Dropped, not refused: the transport resends after the QP's timeout, by
                // when a QP caught between its peer's RTS and its own RTR is ready.
                if reliable && slot.device.rc_qp_not_ready(qpn) {
                    return Err(RemoteError::Dropped);
                }
                slot.respond(request)
            })
            .unwrap_or(Err(RemoteError::Unreachable));
        self.contain_faults(&mut fabric);
        result
    }

    /// A transport's answer for the device that holds `gid`, which issued the request.
    pub fn complete_remote(&self, gid: &[u8; 16], completion: &pvrdma_backend::Completion<'_>) {
        let mut fabric = self.lock();
        let Some(index) = fabric.find(gid) else {
            debug!("an answer for GID {gid:02x?}, which no device holds, dropped");
            return;
        };
        fabric.with_endpoint(index, |slot, net| {
            let (device, mem, mut irq) = slot.parts();
            device.complete_remote(mem, &mut irq, net, completion);
        });
        self.contain_faults(&mut fabric);
    }

    /// Devices failed so far (see [`Fabric::failures`] field docs).
    pub fn failure_count(&self) -> usize {
        self.failures.load(Ordering::Acquire)
    }

    /// Fails every device whose guest memory faulted during the work just done: its RAM is
    /// taken away (so nothing touches the lost pages again) and its client is to be dropped.
    fn contain_faults(&self, fabric: &mut MemcpyFabric<Slot>) {
        if !memory_fault::take_pending() {
            return;
        }
        for index in fabric.indices() {
            fabric.with_endpoint(index, |slot, _| {
                if !slot.ram_guard.take_fault() {
                    return;
                }
                let reason = "its guest memory shrank under the server (the client truncated \
                              a DMA window's file)"
                    .to_string();
                error!("device {index} failed: {reason}; disconnecting its client");
                slot.set_ram(GuestRam::default());
                slot.failed = Some(reason);
                self.failures.fetch_add(1, Ordering::AcqRel);
            });
        }
    }

    /// The fabric, locked. A thread that panicked while holding the lock leaves the fabric
    /// usable: every operation on it is self-contained.
    pub fn lock(&self) -> MutexGuard<'_, MemcpyFabric<Slot>> {
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Times one pass over a send queue in `every` on every device (1: all).
    pub fn set_profile_sampling(&self, every: u32) {
        let mut fabric = self.lock();
        for index in fabric.indices() {
            fabric.with_endpoint(index, |slot, _| slot.device.set_profile_sampling(every));
        }
    }

    /// Turns the profiler's stage timing on or off on every device.
    pub fn set_profiling(&self, on: bool) {
        let mut fabric = self.lock();
        for index in fabric.indices() {
            fabric.with_endpoint(index, |slot, _| slot.device.set_profiling(on));
        }
    }

    /// A copy of every device's profiler figures, taken under the lock and nothing else.
    pub fn profile(&self) -> Snapshot {
        type Destinations = Vec<(u32, Option<Option<[u8; 16]>>)>;
        let mut fabric = self.lock();
        let mut profiling = false;
        let taken: Vec<(DeviceSnapshot, Destinations, Vec<[u8; 16]>)> = fabric
            .indices()
            .filter_map(|index| {
                fabric.with_endpoint(index, |slot, _| {
                    profiling |= slot.device.profiling();
                    let snapshot = DeviceSnapshot {
                        index,
                        qps: slot.device.qp_stats(),
                        paths: Vec::new(),
                    };
                    let own = slot.device.gids().collect();
                    (snapshot, slot.device.qp_destinations(), own)
                })
            })
            .collect();
        // The path each QP takes, decided as the device decides it (docs/backends.md).
        let devices = taken
            .into_iter()
            .map(|(mut snapshot, destinations, own)| {
                snapshot.paths = destinations
                    .iter()
                    .map(|(_, destination)| match destination {
                        None => QpPath::PerDatagram,
                        Some(None) => QpPath::NotConnected,
                        Some(Some(gid)) if own.contains(gid) => QpPath::Loopback,
                        Some(Some(gid)) if fabric.find(gid).is_some() => QpPath::Memcpy,
                        Some(Some(gid)) if fabric.remote_holds(gid) => QpPath::Tcp,
                        Some(Some(_)) => QpPath::Unreachable,
                    })
                    .collect();
                snapshot
            })
            .collect();
        drop(fabric);
        let peers = self
            .peers
            .get()
            .map(|view| {
                view.peers()
                    .into_iter()
                    .map(|(id, link_up, gids)| PeerSnapshot { id, link_up, gids })
                    .collect()
            })
            .unwrap_or_default();
        Snapshot {
            profiling,
            devices,
            peers,
        }
    }

    /// Shows the TCP transport's peers in [`Fabric::profile`].
    pub fn set_peer_view(&self, view: pvrdma_backend::tcp::runtime::PeerView) {
        let _ = self.peers.set(view);
    }

    /// Runs `work` on slot `index` with the rest of the fabric as its network.
    pub fn with_slot<R>(
        &self,
        index: usize,
        work: impl FnOnce(&mut Slot, &mut dyn pvrdma_backend::Network) -> R,
    ) -> Option<R> {
        let mut fabric = self.lock();
        let result = fabric.with_endpoint(index, work);
        self.contain_faults(&mut fabric);
        result
    }

    /// As [`Fabric::with_slot`], then, if the work did something a stalled sender may wait
    /// for ([`PvrdmaDevice::wake_events`] moved: a receive posted, a QP changed), lets every
    /// device whose senders wait for a receiver retry.
    pub fn with_slot_resuming<R>(
        &self,
        index: usize,
        work: impl FnOnce(&mut Slot, &mut dyn pvrdma_backend::Network) -> R,
    ) -> Option<R> {
        let mut fabric = self.lock();
        let result = fabric.with_endpoint(index, |slot, net| {
            let before = slot.device.wake_events();
            let result = work(slot, net);
            (result, slot.device.wake_events() != before)
        });
        let result = result.map(|(result, woke)| {
            // Only something a stalled sender waits for (a receive posted, a QP changed or
            // gone) is worth a retry: retrying on every access made each parked queue cost
            // every other guest's register writes a page-list rebuild.
            if woke {
                resume_stalled(&mut fabric);
            }
            result
        });
        self.contain_faults(&mut fabric);
        result
    }
}

/// Retries, on every device, the send queues that wait for a receiver.
fn resume_stalled(fabric: &mut MemcpyFabric<Slot>) {
    for index in fabric.indices() {
        fabric.with_endpoint(index, |slot, net| {
            if slot.device.has_stalled_work() {
                let (device, mem, mut irq) = slot.parts();
                device.resume_stalled(mem, &mut irq, net);
            }
        });
    }
}

/// Delivers a device's interrupts to its client's MSI-X eventfds.
pub struct MsixSink<'a> {
    pub msix: &'a MsixEventfds,
    /// An MSI-X message is a memory write: without bus mastering the function sends none.
    pub bus_master: bool,
}

impl Interrupts for MsixSink<'_> {
    fn raise(&mut self, vector: u16) {
        if !self.bus_master {
            debug!("MSI-X vector {vector} suppressed: bus mastering is off");
            return;
        }
        match self.msix.signal(vector) {
            Ok(true) => {}
            // The guest has not unmasked the vector: the interrupt is lost, as on hardware
            // with the vector masked and no pending-bit emulation.
            Ok(false) => debug!("MSI-X vector {vector} has no eventfd"),
            Err(e) => warn!("cannot signal MSI-X vector {vector}: {e}"),
        }
    }
}
