//! The devices of one server process, joined into one memcpy fabric.
//!
//! Each socket's thread owns its PCI function (config space, DMA windows); the parts a peer
//! must reach — the device model, the guest RAM mapped for it and its interrupt eventfds —
//! live in a slot of the fabric, each slot behind its own lock. A thread holds one slot's
//! lock at a time: a request from one guest to another waits in the responder's inbox and
//! is executed under the responder's lock alone, in bounded pieces, so no guest's work ever
//! holds a lock another guest's register access needs (docs/backends.md). A DMA_UNMAP takes
//! the slot's lock too; a copy already under way keeps the unmapped pages alive, since every
//! request holds a reference to its requester's mapping.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use log::{debug, error, warn};
use pvrdma_backend::directory::membership::EtcdMembership;
use pvrdma_backend::memcpy::{Endpoint, MemcpyFabric};
use pvrdma_backend::{Completion, Gid, Network, Outcome, RemoteError, Request, Responder};

use crate::profiler::{DeviceSnapshot, DirectorySnapshot, PeerSnapshot, QpPath, Snapshot};
use crate::pvrdma::{Clock, DeviceConfig, GuestRam, Interrupts, PvrdmaDevice};
use crate::vfio::irqs::MsixEventfds;
use crate::vfio::memory_fault::{self, GuardedRam};
use crate::vfio::uar::UarPages;

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

impl Endpoint for Slot {
    fn complete(&mut self, completion: &Completion<'_>, net: &mut dyn Network) {
        let (device, mem, mut irq) = self.parts();
        device.complete_remote(mem, &mut irq, net, completion);
    }

    fn receiver_not_ready(&mut self, qpn: u32) {
        self.device.note_receiver_not_ready(qpn);
    }

    fn wake_events(&self) -> u64 {
        self.device.wake_events()
    }

    fn resume_stalled(&mut self, net: &mut dyn Network) {
        if self.device.has_stalled_work() {
            let (device, mem, mut irq) = self.parts();
            device.resume_stalled(mem, &mut irq, net);
        }
    }

    fn gids(&self) -> Vec<Gid> {
        self.device.gids().collect()
    }

    fn same_gids(&self, gids: &[Gid]) -> bool {
        self.device.gids().eq(gids.iter().copied())
    }
}

/// The fabric shared by every socket thread of the process.
#[derive(Clone, Default)]
pub struct Fabric {
    shared: Arc<MemcpyFabric<Slot>>,
    /// How many devices were failed so far: a socket thread compares it with the count it
    /// saw last to learn, without the lock, whether to look at its slot's `failed`.
    failures: Arc<AtomicUsize>,
    /// The TCP transport's peers, for the profiler (set when a transport runs).
    peers: Arc<std::sync::OnceLock<pvrdma_backend::tcp::runtime::PeerView>>,
    /// The etcd directory this server found its peers in, and where it is (for the
    /// profiler).
    directory: Arc<std::sync::OnceLock<(String, Arc<EtcdMembership>)>>,
    /// The guests' GIDs the host RDMA device holds (`runtime::rdma` watches them); the TCP
    /// transport tells peers.
    rdma_gids: Arc<std::sync::Mutex<Vec<[u8; 16]>>>,
    /// Slots of removed devices, free for the next device added.
    retired: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fabric({} devices)", self.shared.len())
    }
}

impl Fabric {
    pub fn new() -> Fabric {
        Fabric::default()
    }

    /// Adds a device; returns its slot index. A slot a removed device left is used again.
    pub fn add_device(&self, config: DeviceConfig) -> usize {
        let reused = self.retired.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(index) = reused {
            self.shared
                .with_endpoint(index, |slot, _| *slot = Slot::new(config));
            return index;
        }
        self.shared.add(Slot::new(config))
    }

    /// Gives up slot `index`, whose device was removed (its client already cleaned up):
    /// the slot is blanked, left out of the profiler's figures, and reused by the next
    /// [`Fabric::add_device`]. Slots keep their indices, which the fabric's queues use.
    pub fn retire(&self, index: usize) {
        self.shared.with_endpoint(index, |slot, net| {
            slot.device.reset_on(net);
            *slot = Slot::new(DeviceConfig::default());
        });
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if !retired.contains(&index) {
            retired.push(index);
        }
    }

    /// Whether slot `index` belongs to a removed device.
    fn is_retired(&self, index: usize) -> bool {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&index)
    }

    /// Makes slot `index`'s doorbells exit-free: the poller reads them from `uar`.
    pub fn set_uar(&self, index: usize, uar: Arc<UarPages>) {
        self.shared
            .with_endpoint(index, |slot, _| slot.uar = Some(uar));
    }

    /// One poll of every exit-free device's doorbells; whether anything happened.
    pub fn poll_doorbells(&self) -> bool {
        let mut activity = false;
        for index in self.shared.indices() {
            let polled = self.shared.with_endpoint_waking(index, |slot, net| {
                let Some(uar) = slot.uar.clone() else {
                    return (false, false);
                };
                if !slot.bus_master {
                    return (false, false);
                }
                let (device, mem, mut irq) = slot.parts();
                let active = device.poll_uar(mem, &mut irq, net, &mut |offset| uar.take(offset));
                // Exit-free doorbell words are last-writer-wins: a receive doorbell may be
                // lost under a later send word of the same page, so any activity may have
                // posted a receive.
                (active, active)
            });
            activity |= polled == Some(true);
        }
        self.contain_faults();
        activity
    }

    /// Retries the requests waiting for a receiver whose RNR timer ended; returns when the
    /// next timer ends, if any request waits.
    pub fn tick(&self) -> Option<Instant> {
        let next = self.shared.tick(Instant::now());
        self.contain_faults();
        next
    }

    /// Sends requests for GIDs outside this process to `remote` (the TCP transport).
    pub fn set_remote(&self, remote: pvrdma_backend::memcpy::Remote) {
        self.shared.set_remote(remote);
    }

    /// Every GID the devices of this process hold.
    pub fn local_gids(&self) -> Vec<[u8; 16]> {
        self.shared.gids()
    }

    /// A peer server's request for the device that holds its destination GID.
    pub fn respond_remote(&self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        let Some(index) = self.shared.find(&request.destination.gid) else {
            return Err(match request.service {
                pvrdma_backend::Service::Datagram { .. } => RemoteError::Dropped,
                pvrdma_backend::Service::Reliable => RemoteError::Unreachable,
            });
        };
        let result = self
            .shared
            .with_endpoint(index, |slot, _| {
                if !slot.has_gid(&request.destination.gid) {
                    return Err(RemoteError::Unreachable);
                }
                let (device, mem, mut irq) = slot.parts();
                device.respond_to_remote_host(mem, &mut irq, request)
            })
            .unwrap_or(Err(RemoteError::Unreachable));
        self.contain_faults();
        result
    }

    /// A transport's answer for the device that holds `gid`, which issued the request.
    pub fn complete_remote(&self, gid: &[u8; 16], completion: &Completion<'_>) {
        let Some(index) = self.shared.find(gid) else {
            debug!("an answer for GID {gid:02x?}, which no device holds, dropped");
            return;
        };
        self.shared
            .with_endpoint(index, |slot, net| slot.complete(completion, net));
        self.contain_faults();
    }

    /// Devices failed so far (see [`Fabric::failures`] field docs).
    pub fn failure_count(&self) -> usize {
        self.failures.load(Ordering::Acquire)
    }

    /// Fails every device whose guest memory faulted during the work just done: its RAM is
    /// taken away (so nothing touches the lost pages again) and its client is to be dropped.
    fn contain_faults(&self) {
        if !memory_fault::take_pending() {
            return;
        }
        for index in self.shared.indices() {
            self.shared.with_endpoint(index, |slot, _| {
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

    /// Times one pass over a send queue in `every` on every device (1: all).
    pub fn set_profile_sampling(&self, every: u32) {
        for index in self.shared.indices() {
            self.shared
                .with_endpoint(index, |slot, _| slot.device.set_profile_sampling(every));
        }
    }

    /// Turns the profiler's stage timing on or off on every device.
    pub fn set_profiling(&self, on: bool) {
        for index in self.shared.indices() {
            self.shared
                .with_endpoint(index, |slot, _| slot.device.set_profiling(on));
        }
    }

    /// A copy of every device's profiler figures, taken under the lock and nothing else.
    pub fn profile(&self) -> Snapshot {
        type Destinations = Vec<(u32, Option<Option<[u8; 16]>>)>;
        type Taken = (DeviceSnapshot, Destinations, Vec<[u8; 16]>, Vec<u32>);
        let fabric = &self.shared;
        let mut profiling = false;
        let taken: Vec<Taken> = fabric
            .indices()
            .filter(|&index| !self.is_retired(index))
            .filter_map(|index| {
                fabric.with_endpoint(index, |slot, _| {
                    profiling |= slot.device.profiling();
                    let snapshot = DeviceSnapshot {
                        index,
                        qps: slot.device.qp_stats(),
                        paths: Vec::new(),
                    };
                    let own = slot.device.gids().collect();
                    let carried = slot.device.qps_on_host();
                    (snapshot, slot.device.qp_destinations(), own, carried)
                })
            })
            .collect();
        // The path each QP takes, decided as the device decides it (docs/backends.md).
        let devices = taken
            .into_iter()
            .map(|(mut snapshot, destinations, own, carried)| {
                snapshot.paths = destinations
                    .iter()
                    .map(|(qpn, destination)| match destination {
                        _ if carried.contains(qpn) => QpPath::Rdma,
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
        let peers = self
            .peers
            .get()
            .map(|view| {
                view.peers()
                    .into_iter()
                    .map(|(id, link_up, gids)| PeerSnapshot {
                        id,
                        link_up,
                        gids,
                        rdma_gids: view.rdma_gids(id),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let directory = self
            .directory
            .get()
            .map(|(source, membership)| DirectorySnapshot {
                source: source.clone(),
                revision: membership.revision(),
                servers: membership.servers().iter().map(|a| a.to_string()).collect(),
                gids: membership.gid_count(),
                registered: membership.registered_gids(),
                refused: membership
                    .refused_gids()
                    .into_iter()
                    .map(|gid| std::net::Ipv6Addr::from(gid).to_string())
                    .collect(),
            });
        Snapshot {
            profiling,
            devices,
            peers,
            directory,
        }
    }

    /// Shows the etcd directory (`source`: its endpoints and prefix) in [`Fabric::profile`].
    pub fn set_directory(&self, source: String, membership: Arc<EtcdMembership>) {
        let _ = self.directory.set((source, membership));
    }

    /// Shows the TCP transport's peers in [`Fabric::profile`].
    pub fn set_peer_view(&self, view: pvrdma_backend::tcp::runtime::PeerView) {
        let _ = self.peers.set(view);
    }

    /// Lets the devices drive the host RDMA device's QPs (the rdma path).
    pub fn set_host(&self, host: Arc<dyn pvrdma_backend::HostQps>) {
        self.shared.set_host(host);
    }

    /// Whether a device of this process holds `gid`.
    pub fn holds(&self, gid: &[u8; 16]) -> bool {
        self.shared.find(gid).is_some()
    }

    /// Whether a peer server announced `gid` as held by its host RDMA device.
    pub fn peer_rdma_reachable(&self, gid: &[u8; 16]) -> bool {
        self.peers
            .get()
            .is_some_and(|view| view.rdma_reachable(gid))
    }

    /// A host QP's completion for the device in slot `owner`.
    pub fn complete_host(&self, completion: &pvrdma_backend::HostCompletion) {
        self.shared.with_endpoint(completion.owner, |slot, net| {
            let (device, mem, mut irq) = slot.parts();
            device.complete_host(mem, &mut irq, net, completion.qpn, &completion.event);
        });
        self.contain_faults();
    }

    /// Which of the guests' GIDs the host RDMA device holds now.
    pub fn set_rdma_gids(&self, gids: Vec<[u8; 16]>) {
        *self.rdma_gids.lock().unwrap_or_else(|p| p.into_inner()) = gids;
    }

    /// The guests' GIDs the host RDMA device holds, as last set.
    pub fn rdma_gids(&self) -> Vec<[u8; 16]> {
        self.rdma_gids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `work` on slot `index` with the rest of the fabric as its network; what it
    /// sends to other devices is carried before this returns. If the work did something a
    /// stalled sender may wait for ([`PvrdmaDevice::wake_events`] moved: a receive posted,
    /// a QP changed), the requests waiting for this device's receivers go again.
    pub fn with_slot<R>(
        &self,
        index: usize,
        work: impl FnOnce(&mut Slot, &mut dyn Network) -> R,
    ) -> Option<R> {
        let result = self.shared.with_endpoint(index, work);
        self.contain_faults();
        result
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
