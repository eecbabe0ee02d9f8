//! The [`DeviceBackend`] of the PVRDMA function.
//!
//! Runs on the server thread, one client at a time. The protocol loop
//! already checks requests against the region table; every access is checked
//! again here against the function's own layout, so the device model never
//! depends on the table being right.

use std::fs::File;

use log::{debug, info, warn};
use vfio_user::DmaMapFlags;

use super::dma::{self, DmaWindows, Unmapped};
use super::guest_ram;
use super::protocol::{self, DeviceBackend, Errno, IrqDescriptor, RegionDescriptor};
use super::regions::{Region, server_irqs, server_regions_with_uar};
use super::uar::{DoorbellMode, UarPages};
use crate::pci::{ConfigSpace, ids};
use crate::pvrdma::{DeviceConfig, GuestRam};
use crate::runtime::fabric::{Fabric, Slot};
use pvrdma_backend::Network;
use std::sync::Arc;

// We advertise the DMA table's capacity as `max_dma_maps`.
const _: () = assert!(dma::MAX_WINDOWS == protocol::MAX_DMA_MAPS as usize);

/// State of one PVRDMA PCI function as seen through vfio-user.
#[derive(Debug)]
pub struct PciFunction {
    config: ConfigSpace,
    dma: DmaWindows,
    /// The device model, its mapped RAM and its eventfds, in the process's fabric.
    fabric: Fabric,
    slot: usize,
    regions: Vec<RegionDescriptor>,
    irqs: Vec<IrqDescriptor>,
    /// The last access was to configuration space or the registers: the driver does those
    /// in bursts (a command is a REQUEST write and an ERR read; probing reads many
    /// registers), unlike doorbells, whose next one waits on the guest's work.
    register_burst: bool,
    /// A send doorbell with a batch behind it, rung once the client has its reply (see
    /// `PciFunction::doorbell`).
    deferred_doorbell: Option<(u64, u32)>,
    /// The fabric's failure count when this function last looked (see `failure`).
    failures_seen: usize,
}

impl Default for PciFunction {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction {
    /// A function in its power-on state with no client attached, alone in its own fabric.
    pub fn new() -> Self {
        Self::in_fabric(&Fabric::new(), DeviceConfig::default())
    }

    /// A function whose device joins `fabric`: its guests reach the other devices there.
    pub fn in_fabric(fabric: &Fabric, config: DeviceConfig) -> Self {
        Self::with_doorbells(fabric, config, DoorbellMode::Trapped)
    }

    /// As [`PciFunction::in_fabric`], with doorbells trapped or exit-free. If the UAR
    /// memfd cannot be made, the function falls back to trapped doorbells (with a warning).
    pub fn with_doorbells(fabric: &Fabric, config: DeviceConfig, mode: DoorbellMode) -> Self {
        let slot = fabric.add_device(config);
        let uar = match mode {
            DoorbellMode::Trapped => None,
            DoorbellMode::ExitFree => match UarPages::new() {
                Ok(uar) => Some(Arc::new(uar)),
                Err(e) => {
                    warn!("exit-free doorbells unavailable ({e}); doorbells stay trapped");
                    None
                }
            },
        };
        let uar_fd = uar.as_ref().and_then(|uar| uar.fd().ok());
        if let Some(uar) = uar {
            fabric.set_uar(slot, uar);
        }
        Self {
            config: ConfigSpace::default(),
            dma: DmaWindows::default(),
            slot,
            fabric: fabric.clone(),
            regions: server_regions_with_uar(uar_fd),
            irqs: server_irqs(),
            register_burst: false,
            deferred_doorbell: None,
            failures_seen: fabric.failure_count(),
        }
    }

    /// The fabric slot of this function's device.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The configuration space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// The client's DMA windows.
    pub fn dma_windows(&self) -> &DmaWindows {
        &self.dma
    }

    /// Whether MSI-X `vector` has an eventfd.
    pub fn msix_assigned(&self, vector: u16) -> bool {
        self.read_slot(|slot| slot.msix.is_assigned(vector))
            .unwrap_or(false)
    }

    /// Runs `work`, which changes this function's slot (and may send to other devices).
    fn with_slot<R>(&self, work: impl FnOnce(&mut Slot, &mut dyn Network) -> R) -> Option<R> {
        self.fabric.with_slot(self.slot, work)
    }

    /// Runs `work`, which only reads this function's slot.
    fn read_slot<R>(&self, work: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        self.fabric.with_slot(self.slot, |slot, _| work(slot))
    }

    /// Forgets everything tied to the client that just disconnected: its DMA
    /// windows (closing their files) and its interrupt eventfds. Device state
    /// is kept; a new client resets the device through `DEVICE_RESET`.
    pub fn client_gone(&mut self) {
        // A doorbell deferred past a reply the client never read dies with the client.
        self.deferred_doorbell = None;
        let windows = self.dma.clear();
        let (objects, eventfds) = self
            .with_slot(|slot, net| {
                let objects = slot.device.object_count();
                slot.device.reset_on(net);
                if let Some(uar) = &slot.uar {
                    uar.clear();
                }
                slot.set_ram(GuestRam::default());
                slot.failed = None;
                (objects, slot.msix.clear())
            })
            .unwrap_or_default();
        info!(
            "released {windows} DMA windows and {eventfds} MSI-X eventfds of the old client, \
             and its {objects} device objects"
        );
    }

    /// Maps the current DMA windows for the device; on failure the device keeps the RAM it
    /// had.
    fn remap(&self) -> Result<(), String> {
        let ram = guest_ram::build(&self.dma)?;
        self.with_slot(|slot, _| slot.set_ram(ram));
        Ok(())
    }

    /// Objects the guest has created on this function's device.
    pub fn device_objects(&self) -> usize {
        self.read_slot(|slot| slot.device.object_count())
            .unwrap_or(0)
    }

    /// A register or doorbell write, with the memory the device may use: none until the
    /// driver enables bus mastering (a device must not DMA before that).
    fn device_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "ignored {}-byte write to BAR{bar} at {offset:#x}",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        if bar == ids::UAR_BAR {
            self.doorbell(offset, value, true);
            return;
        }
        let bus_master = self.config.bus_master_enabled();
        self.with_slot(|slot, net| {
            slot.bus_master = bus_master;
            let (device, mem, mut irq) = slot.parts();
            device.write_register(mem, &mut irq, net, offset, value);
        });
    }

    /// Rings the doorbell `value` at BAR2 `offset`.
    ///
    /// With `may_defer`, a send doorbell with a batch of work requests behind it is kept
    /// instead, and rung after the reply (`after_reply`): the client, QEMU's vCPU waiting
    /// with posted writes off, goes back to the guest while the server copies, and can post
    /// the next batch meanwhile, so a bandwidth-bound queue keeps the server busy instead
    /// of paying a round trip per batch. On real PCIe a doorbell write is posted anyway: the
    /// guest cannot tell, and its next message (a poll, another doorbell, a command) is
    /// handled after the work. A lone work request is latency-bound and rings at once,
    /// before the reply, so the peer sees it without waiting for the reply to be sent.
    fn doorbell(&mut self, offset: u64, value: u32, may_defer: bool) {
        /// Work requests from which a send doorbell is a batch.
        const BATCH: u32 = 2;
        // A doorbell kept from an earlier message rings first: doorbells keep their order.
        self.after_reply();
        let bus_master = self.config.bus_master_enabled();
        let deferred = self
            .with_slot(|slot, net| {
                slot.bus_master = bus_master;
                let (device, mem, mut irq) = slot.parts();
                if may_defer && device.send_doorbell_backlog(mem, offset, value) >= BATCH {
                    return true;
                }
                device.write_doorbell(mem, &mut irq, net, offset, value);
                false
            })
            .unwrap_or(false);
        if deferred {
            self.deferred_doorbell = Some((offset, value));
        }
    }

    /// Config space and the registers are accessed in bursts; see `register_burst`.
    fn starts_burst(access: Region) -> bool {
        matches!(access, Region::Config | Region::Bar(ids::REG_BAR))
    }

    /// Decodes the region and checks `[offset, offset + len)` lies inside it.
    fn check_access(region: u32, offset: u64, len: usize) -> Result<Region, Errno> {
        let decoded = Region::from_index(region).ok_or_else(|| {
            warn!("access to nonexistent region {region}");
            Errno::EINVAL
        })?;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if end <= decoded.size() => Ok(decoded),
            _ => {
                warn!(
                    "{len}-byte access at {offset:#x} is outside region {region} ({:#x} bytes)",
                    decoded.size()
                );
                Err(Errno::EINVAL)
            }
        }
    }
}

impl DeviceBackend for PciFunction {
    fn regions(&self) -> &[RegionDescriptor] {
        &self.regions
    }

    fn irqs(&self) -> &[IrqDescriptor] {
        &self.irqs
    }

    fn resettable(&self) -> bool {
        // QEMU then sends DEVICE_RESET at machine reset.
        true
    }

    fn expects_follow_up(&self) -> bool {
        self.register_burst
    }

    fn after_reply(&mut self) {
        if let Some((offset, value)) = self.deferred_doorbell.take() {
            self.doorbell(offset, value, false);
        }
    }

    fn failure(&mut self) -> Option<String> {
        // One atomic load while nothing failed anywhere; the lock only after a failure.
        let failures = self.fabric.failure_count();
        if failures == self.failures_seen {
            return None;
        }
        self.failures_seen = failures;
        self.read_slot(|slot| slot.failed.clone()).flatten()
    }

    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let access = Self::check_access(region, offset, data.len())?;
        self.register_burst = Self::starts_burst(access);
        match access {
            Region::Config => self.config.read(offset, data),
            // The client emulates the MSI-X table; the PBA reads all-clear
            // because no vector is ever held pending here.
            Region::Bar(ids::MSIX_BAR) => data.fill(0),
            // Registers are 32 bits; other widths read as 0.
            Region::Bar(ids::REG_BAR) if data.len() == 4 => {
                let value = self
                    .read_slot(|slot| slot.device.read_register(offset))
                    .unwrap_or(0);
                data.copy_from_slice(&value.to_le_bytes());
            }
            Region::Bar(ids::REG_BAR) => data.fill(0),
            // UAR doorbells are write-only for the driver; they read as 0.
            Region::Bar(ids::UAR_BAR) => data.fill(0),
            // Only zero-length accesses reach absent regions (size 0).
            Region::Bar(_) | Region::Rom | Region::Vga => data.fill(0),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let access = Self::check_access(region, offset, data.len())?;
        self.register_burst = Self::starts_burst(access);
        match access {
            Region::Config => {
                debug!("config write {offset:#04x} <- {data:02x?}");
                self.config.write(offset, data);
            }
            Region::Bar(ids::MSIX_BAR) => {
                debug!("ignored MSI-X BAR write {offset:#x} <- {data:02x?}");
            }
            Region::Bar(bar @ (ids::REG_BAR | ids::UAR_BAR)) => {
                self.device_write(bar, offset, data)
            }
            Region::Bar(_) | Region::Rom | Region::Vga => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Errno> {
        // Unknown bits are kept so the table can refuse them.
        let flags = DmaMapFlags::from_bits_retain(flags);
        match self.dma.map(flags, offset, address, size, fd) {
            // Guest RAM QEMU did not share: the device can never reach it, and the driver's
            // first DMA there fails. Say why, with the fix, where an operator reads first.
            Ok(window) if window.readable && window.writable && window.file.is_none() => {
                warn!(
                    "DMA window {address:#x}+{size:#x} is guest memory QEMU did not share \
                     (no file descriptor): the device cannot reach it. Give the guest its RAM \
                     in a shared memory backend: -object memory-backend-memfd,id=ram,\
                     size=...,share=on -machine memory-backend=ram"
                );
                Ok(())
            }
            Ok(window) => {
                debug!(
                    "DMA map {address:#x}+{size:#x} offset {offset:#x} {}{}{}",
                    if window.readable { "r" } else { "-" },
                    if window.writable { "w" } else { "-" },
                    // Without an fd the device cannot reach the window: the
                    // server does not send DMA_READ/WRITE (QEMU's vfio-user specification, VFIO_USER_DMA_READ).
                    if window.file.is_some() {
                        ""
                    } else {
                        " (no fd)"
                    },
                );
                if let Err(e) = self.remap() {
                    // Never a silent success: the window goes again, the device keeps the
                    // RAM it had, and the client learns the map failed.
                    warn!("DMA map {address:#x}+{size:#x} refused: {e}");
                    let _ = self.dma.unmap(0, address, size);
                    return Err(Errno::ENOMEM);
                }
                Ok(())
            }
            Err(e) => {
                warn!("rejected DMA map: {e}");
                Err(Errno::from_raw(e.errno()))
            }
        }
    }

    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Result<(), Errno> {
        // Raw wire bits: 2 is VFIO_DMA_UNMAP_FLAG_ALL (the crate's names
        // for these bits are wrong, docs/vfio-user-server.md, bug D).
        match self.dma.unmap(flags, address, size) {
            Ok(unmapped) => {
                match unmapped {
                    Unmapped::One => debug!("DMA unmap {address:#x}+{size:#x}"),
                    Unmapped::All(count) => debug!("DMA unmap all ({count} windows)"),
                }
                // The old mappings go with the old GuestRam, replaced under the fabric
                // lock: no copy of any device can be using them once this returns.
                if let Err(e) = self.remap() {
                    // Fewer windows need fewer descriptors, so this is rare; the device
                    // must not keep a mapping of a window the client withdrew.
                    warn!("remapping after DMA unmap failed ({e}); the device has no RAM");
                    self.with_slot(|slot, _| slot.set_ram(GuestRam::default()));
                }
                Ok(())
            }
            Err(e) => {
                warn!("rejected DMA unmap: {e}");
                Err(Errno::from_raw(e.errno()))
            }
        }
    }

    fn reset(&mut self) -> Result<(), Errno> {
        // A device reset does not unmap DMA: the windows belong to the client.
        info!("device reset");
        self.config.reset();
        self.with_slot(|slot, net| {
            slot.msix.clear();
            slot.device.reset_on(net);
            if let Some(uar) = &slot.uar {
                uar.clear();
            }
            slot.bus_master = false;
        });
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), Errno> {
        let fd_count = fds.len();
        let result = self
            .with_slot(|slot, _| slot.msix.set_irqs(index, flags, start, count, fds))
            .ok_or(Errno::ENODEV)?;
        match result {
            Ok(update) => {
                debug!("SET_IRQS index {index} flags {flags:#x} {start}+{count}: {update:?}");
                Ok(())
            }
            Err(e) => {
                warn!(
                    "rejected SET_IRQS index {index} flags {flags:#x} {start}+{count} \
                     with {fd_count} fds: {e}"
                );
                Err(Errno::from_raw(e.errno()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
