//! Exit-free doorbells: BAR2 (the UAR pages) as a memfd that QEMU maps into the guest, so a
//! doorbell is a plain store with no VM exit and no vfio-user message; the server polls the
//! words (see `pvrdma::poll`).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::ftruncate;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::pci::ids;

/// How guests ring doorbells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellMode {
    /// Every doorbell is a trapped MMIO write: a vfio-user REGION_WRITE message.
    Trapped,
    /// BAR2 is mapped into the guest; the server polls it.
    ExitFree,
}

/// The UAR pages as the server sees them.
#[derive(Debug)]
pub struct UarPages {
    /// The memfd behind BAR2, shared with the client for its sparse mmap.
    fd: OwnedFd,
    /// The server's own mapping of it, addressed from 0 like BAR2 offsets.
    map: GuestMemoryMmap,
}

impl UarPages {
    pub fn new() -> std::io::Result<UarPages> {
        let fd = memfd_create(c"pvrdma-uar", MFdFlags::MFD_CLOEXEC)?;
        ftruncate(&fd, i64::try_from(ids::UAR_BAR_SIZE).unwrap_or(i64::MAX))?;
        let file = File::from(fd.try_clone()?);
        let size =
            usize::try_from(ids::UAR_BAR_SIZE).map_err(|_| std::io::Error::other("BAR2 size"))?;
        let map = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(UarPages { fd, map })
    }

    /// A descriptor of the memfd for the region table.
    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// The doorbell word at `offset` of BAR2, cleared so the next write is seen as new. A
    /// guest store between the load and the clear is lost; the device's ring scan covers
    /// lost send doorbells (see `pvrdma::poll`).
    pub fn take(&self, offset: u64) -> u32 {
        let addr = GuestAddress(offset);
        match self.map.load::<u32>(addr, Ordering::Acquire) {
            Ok(0) | Err(_) => 0,
            Ok(value) => {
                let _ = self.map.store(0u32, addr, Ordering::Release);
                value
            }
        }
    }

    /// Forgets every doorbell word (a reset: stale words must not reach new objects).
    pub fn clear(&self) {
        let zeroes = vec![0u8; usize::try_from(ids::UAR_PAGE_SIZE).unwrap_or(4096)];
        for page in 0..ids::UAR_PAGES {
            let _ = self
                .map
                .write_slice(&zeroes, GuestAddress(page * ids::UAR_PAGE_SIZE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_each_word_once_and_clear_forgets_them() {
        let uar = UarPages::new().unwrap();
        // Write through a second mapping of the same memfd, as the guest does.
        let file = File::from(uar.fd().unwrap());
        let guest: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            ids::UAR_BAR_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        guest
            .store(0x4000_0007u32, GuestAddress(0x1000), Ordering::Release)
            .unwrap();
        assert_eq!(uar.take(0x1000), 0x4000_0007);
        assert_eq!(uar.take(0x1000), 0);
        guest
            .store(5u32, GuestAddress(0x2004), Ordering::Release)
            .unwrap();
        uar.clear();
        assert_eq!(uar.take(0x2004), 0);
        assert_eq!(uar.take(ids::UAR_BAR_SIZE), 0, "past the BAR");
    }
}
