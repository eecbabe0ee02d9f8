//! Exit-free doorbells: BAR2 (the UAR pages) as a memfd that QEMU maps into the guest, so a
//! doorbell is a plain store with no VM exit and no vfio-user message; the server polls the
//! words (see `pvrdma::poll`).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::ftruncate;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

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
    /// The server's own mapping of it, addressed from 0 like BAR2 offsets. A bare region, not
    /// guest memory: a doorbell word is one atomic, found without an address lookup.
    map: MmapRegion,
}

impl UarPages {
    pub fn new() -> std::io::Result<UarPages> {
        let fd = memfd_create(c"pvrdma-uar", MFdFlags::MFD_CLOEXEC)?;
        ftruncate(&fd, i64::try_from(ids::UAR_BAR_SIZE).unwrap_or(i64::MAX))?;
        let file = File::from(fd.try_clone()?);
        let size =
            usize::try_from(ids::UAR_BAR_SIZE).map_err(|_| std::io::Error::other("BAR2 size"))?;
        let map = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(UarPages { fd, map })
    }

    /// A descriptor of the memfd for the region table.
    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// The doorbell word at `offset` of BAR2, cleared so the next write is seen as new.
    /// A plain load first, which leaves the cache line shared with the guest while the word
    /// is 0 (the common case); a non-zero word is taken with an atomic swap, so a guest store
    /// racing with the clear is never lost. 0 outside the BAR or unaligned.
    pub fn take(&self, offset: u64) -> u32 {
        let Some(word) = usize::try_from(offset)
            .ok()
            .and_then(|at| self.map.get_atomic_ref::<AtomicU32>(at).ok())
        else {
            return 0;
        };
        if word.load(Ordering::Acquire) == 0 {
            return 0;
        }
        word.swap(0, Ordering::AcqRel)
    }

    /// Forgets every doorbell word (a reset: stale words must not reach new objects).
    pub fn clear(&self) {
        const ZEROES: [u8; ids::UAR_PAGE_SIZE as usize] = [0; ids::UAR_PAGE_SIZE as usize];
        for page in 0..ids::UAR_PAGES {
            let at = usize::try_from(page * ids::UAR_PAGE_SIZE).unwrap_or(usize::MAX);
            if let Ok(slice) = self.map.get_slice(at, ZEROES.len()) {
                slice.copy_from(&ZEROES);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
        assert_eq!(uar.take(u64::MAX), 0, "far past the BAR");
        guest
            .store(9u32, GuestAddress(0x3000), Ordering::Release)
            .unwrap();
        assert_eq!(uar.take(0x3001), 0, "unaligned");
        assert_eq!(uar.take(0x3000), 9);
    }
}
