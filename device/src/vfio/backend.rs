//! The `vfio_user::ServerBackend` of the PVRDMA function.
//!
//! Runs on the server thread, one client at a time. Every request is checked
//! against the region table before it reaches the function, because the crate
//! only checks the region index: offsets and lengths come straight from the
//! client.

use std::fs::File;
use std::io;

use log::{debug, info, warn};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

use super::dma::{DmaWindows, Unmapped};
use super::irqs::MsixEventfds;
use super::regions::Region;
use crate::pci::{ConfigSpace, ids};

/// State of one PVRDMA PCI function as seen through vfio-user.
#[derive(Debug, Default)]
pub struct PciFunctionBackend {
    config: ConfigSpace,
    dma: DmaWindows,
    msix: MsixEventfds,
}

impl PciFunctionBackend {
    /// A function in its power-on state with no client attached.
    pub fn new() -> Self {
        Self::default()
    }

    /// The configuration space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// The client's DMA windows.
    pub fn dma_windows(&self) -> &DmaWindows {
        &self.dma
    }

    /// The MSI-X eventfds.
    pub fn msix(&self) -> &MsixEventfds {
        &self.msix
    }

    /// Forgets everything tied to the client that just disconnected: its DMA
    /// windows (closing their files) and its interrupt eventfds. Device state
    /// is kept; a new client resets the device through `DEVICE_RESET`.
    pub fn client_gone(&mut self) {
        let windows = self.dma.clear();
        let eventfds = self.msix.clear();
        info!("released {windows} DMA windows and {eventfds} MSI-X eventfds of the old client");
    }

    /// Decodes the region and checks `[offset, offset + len)` lies inside it.
    fn check_access(region: u32, offset: u64, len: usize) -> io::Result<Region> {
        let decoded = Region::from_index(region).ok_or_else(|| {
            warn!("access to nonexistent region {region}");
            einval()
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
                Err(einval())
            }
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl ServerBackend for PciFunctionBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match Self::check_access(region, offset, data.len())? {
            Region::Config => self.config.read(offset, data),
            // The client emulates the MSI-X table; the PBA reads all-clear
            // because no vector is ever held pending here.
            Region::Bar(ids::MSIX_BAR) => data.fill(0),
            // Device registers arrive with the PVRDMA device model.
            Region::Bar(ids::REG_BAR) => data.fill(0),
            // UAR doorbells are write-only for the driver; they read as 0.
            Region::Bar(ids::UAR_BAR) => data.fill(0),
            // Only zero-length accesses reach absent regions (size 0).
            Region::Bar(_) | Region::Rom | Region::Vga => data.fill(0),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match Self::check_access(region, offset, data.len())? {
            Region::Config => {
                debug!("config write {offset:#04x} <- {data:02x?}");
                self.config.write(offset, data);
            }
            Region::Bar(ids::MSIX_BAR) => {
                debug!("ignored MSI-X BAR write {offset:#x} <- {data:02x?}");
            }
            Region::Bar(ids::REG_BAR) => {
                // Device registers arrive with the PVRDMA device model.
                debug!("ignored register write {offset:#x} <- {data:02x?}");
            }
            Region::Bar(ids::UAR_BAR) => {
                // Doorbells arrive with the PVRDMA device model.
                debug!("ignored UAR write {offset:#x} <- {data:02x?}");
            }
            Region::Bar(_) | Region::Rom | Region::Vga => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        match self.dma.map(flags, offset, address, size, fd) {
            Ok(window) => {
                debug!(
                    "DMA map {address:#x}+{size:#x} offset {offset:#x} {}{}{}",
                    if window.readable { "r" } else { "-" },
                    if window.writable { "w" } else { "-" },
                    // Without an fd the device cannot reach the window: the
                    // crate cannot send DMA_READ/WRITE (vfio-user.md §1.8).
                    if window.file.is_some() {
                        ""
                    } else {
                        " (no fd)"
                    },
                );
                Ok(())
            }
            Err(e) => {
                warn!("rejected DMA map: {e}");
                Err(io::Error::from_raw_os_error(e.errno()))
            }
        }
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        // Raw bits on purpose: the crate's flag names are wrong (bug D).
        match self.dma.unmap(flags.bits(), address, size) {
            Ok(Unmapped::One) => {
                debug!("DMA unmap {address:#x}+{size:#x}");
                Ok(())
            }
            Ok(Unmapped::All(count)) => {
                debug!("DMA unmap all ({count} windows)");
                Ok(())
            }
            Err(e) => {
                warn!("rejected DMA unmap: {e}");
                Err(io::Error::from_raw_os_error(e.errno()))
            }
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        // A device reset does not unmap DMA: the windows belong to the client.
        info!("device reset");
        self.config.reset();
        self.msix.clear();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let fd_count = fds.len();
        match self.msix.set_irqs(index, flags, start, count, fds) {
            Ok(update) => {
                debug!("SET_IRQS index {index} flags {flags:#x} {start}+{count}: {update:?}");
                Ok(())
            }
            Err(e) => {
                warn!(
                    "rejected SET_IRQS index {index} flags {flags:#x} {start}+{count} \
                     with {fd_count} fds: {e}"
                );
                Err(io::Error::from_raw_os_error(e.errno()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
