//! Guest RAM for the device model, built from the client's DMA windows.
//!
//! Each window with a file is mapped shared, so the device reads and writes the very pages
//! the guest uses. Windows without a file (ROMs QEMU cannot share) and read-only windows are
//! left out: the device never needs them, and leaving them out makes any guest address that
//! points there a clean fault instead of a write into a ROM.

use log::warn;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::dma::DmaWindows;
use crate::pvrdma::GuestRam;

/// Maps every writable window that has a file.
pub fn build(windows: &DmaWindows) -> GuestRam {
    let mut ranges = Vec::new();
    for window in windows.iter().filter(|w| w.readable && w.writable) {
        let Some(file) = window.file.as_ref() else {
            continue;
        };
        let (Ok(size), Ok(file)) = (usize::try_from(window.size), file.try_clone()) else {
            warn!(
                "DMA window {:#x}+{:#x} cannot be mapped",
                window.address, window.size
            );
            continue;
        };
        ranges.push((
            GuestAddress(window.address),
            size,
            Some(FileOffset::new(file, window.offset)),
        ));
    }
    if ranges.is_empty() {
        return GuestRam::default();
    }
    match GuestMemoryMmap::from_ranges_with_files(ranges) {
        Ok(ram) => ram,
        Err(e) => {
            // Only a failed mmap gets here; the device then sees no RAM and every access it
            // attempts fails cleanly.
            warn!("cannot map the client's DMA windows: {e}");
            GuestRam::default()
        }
    }
}
