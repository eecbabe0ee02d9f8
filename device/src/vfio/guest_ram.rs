//! Guest RAM for the device model, built from the client's DMA windows.
//!
//! Each window with a file is mapped shared, so the device reads and writes the very pages
//! the guest uses. Windows without a file (ROMs QEMU cannot share) and read-only windows are
//! left out: the device never needs them, and leaving them out makes any guest address that
//! points there a clean fault instead of a write into a ROM.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::dma::DmaWindows;
use crate::pvrdma::GuestRam;

/// Maps every writable window that has a file. An error (out of descriptors or address
/// space) maps nothing: the caller keeps the RAM it had and tells the client.
pub fn build(windows: &DmaWindows) -> Result<GuestRam, String> {
    let mut ranges = Vec::new();
    for window in windows.iter().filter(|w| w.readable && w.writable) {
        let Some(file) = window.file.as_ref() else {
            continue;
        };
        let size = usize::try_from(window.size).map_err(|_| {
            format!(
                "DMA window {:#x}+{:#x} is larger than the address space",
                window.address, window.size
            )
        })?;
        let file = file.try_clone().map_err(|e| {
            format!(
                "cannot duplicate the fd of DMA window {:#x}+{:#x}: {e}",
                window.address, window.size
            )
        })?;
        ranges.push((
            GuestAddress(window.address),
            size,
            Some(FileOffset::new(file, window.offset)),
        ));
    }
    if ranges.is_empty() {
        return Ok(GuestRam::default());
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| format!("cannot map the client's DMA windows: {e}"))
}
