//! A guest memory region made contiguous in the server's address space, for registering
//! with the host's RDMA device.
//!
//! A guest MR is a list of guest pages, scattered through guest RAM. The host device wants
//! one virtual range. The guest's RAM is a shared file (QEMU's memfd, `share=on`), so each
//! page can be mapped a second time, in list order, into one reserved range: the device
//! then reads and writes the very pages the guest uses, with no copy. Runs of pages that
//! follow each other in the file are mapped with one `mmap`.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::GuestMemory;

/// Pages one view may hold (a 16 GiB MR of 4 KiB pages): the guest chooses the list, and the
/// server's address space and its map count are finite.
pub const MAX_VIEW_PAGES: usize = 4 << 20;

/// Why a view could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("the MR has no pages")]
    Empty,
    #[error("the MR has {0} pages, more than the {MAX_VIEW_PAGES} a view may hold")]
    TooManyPages(usize),
    #[error("page {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("page {0:#x} is not in the guest's RAM")]
    NotInRam(u64),
    #[error(
        "page {0:#x} is in guest RAM that is not a shared file; the rdma path needs the \
         guest's memory backend with share=on"
    )]
    NotShared(u64),
    #[error("mapping the view failed: {0}")]
    Map(std::io::ErrorKind),
}

/// The pages of one MR, in order, at consecutive addresses of the server; unmapped when
/// dropped.
#[derive(Debug)]
pub struct ContiguousView {
    base: NonNull<u8>,
    len: usize,
    /// How many `mmap` calls the runs of pages took (one per run of pages adjacent in the
    /// file).
    runs: usize,
}

// SAFETY: the view is a plain shared mapping owned by this value; what aliases it (the
// guest's own pages) is shared memory the server already reads and writes from any thread.
unsafe impl Send for ContiguousView {}
// SAFETY: as above; the view hands out only its address, never references into it.
unsafe impl Sync for ContiguousView {}

impl ContiguousView {
    /// Maps `pages` (guest physical addresses of `page_size`-byte pages) of `memory` one
    /// after the other.
    pub fn map(
        memory: &GuestMemory,
        pages: &[u64],
        page_size: usize,
    ) -> Result<ContiguousView, ViewError> {
        if pages.is_empty() {
            return Err(ViewError::Empty);
        }
        if pages.len() > MAX_VIEW_PAGES {
            return Err(ViewError::TooManyPages(pages.len()));
        }
        let size = page_size as u64;
        // Where each page lies: (fd, file offset).
        let mut placed = Vec::with_capacity(pages.len());
        for &page in pages {
            if page % size != 0 {
                return Err(ViewError::Unaligned(page));
            }
            let region = memory
                .find_region(GuestAddress(page))
                .ok_or(ViewError::NotInRam(page))?;
            let within = page - region.start_addr().0;
            if within + size > region.len() {
                return Err(ViewError::NotInRam(page));
            }
            let file = region.file_offset().ok_or(ViewError::NotShared(page))?;
            placed.push((file.file().as_raw_fd(), file.start() + within));
        }
        let len = pages.len() * page_size;
        // SAFETY: a fresh anonymous reservation the kernel places; nothing else uses it.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(ViewError::Map(std::io::Error::last_os_error().kind()));
        }
        let base = NonNull::new(reserved.cast::<u8>())
            .ok_or(ViewError::Map(std::io::ErrorKind::OutOfMemory))?;
        let mut view = ContiguousView { base, len, runs: 0 };
        let mut i = 0;
        while i < placed.len() {
            let (fd, offset) = placed[i];
            let mut run = 1;
            while i + run < placed.len() && placed[i + run] == (fd, offset + (run as u64) * size) {
                run += 1;
            }
            // SAFETY: the target lies inside the reservation made above (i + run pages of
            // `len`), MAP_FIXED replaces only that part of it, and `fd` is a file of guest
            // RAM that `memory` keeps open for the duration of this call.
            let mapped = unsafe {
                libc::mmap(
                    view.base.as_ptr().add(i * page_size).cast(),
                    run * page_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if mapped == libc::MAP_FAILED {
                // `view` unmaps the whole range when dropped.
                return Err(ViewError::Map(std::io::Error::last_os_error().kind()));
            }
            view.runs += 1;
            i += run;
        }
        Ok(view)
    }

    /// The first byte of the view, for `ibv_reg_mr`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many `mmap` calls the view took.
    pub fn runs(&self) -> usize {
        self.runs
    }
}

impl Drop for ContiguousView {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `map` and is owned by this view alone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::{Bytes, FileOffset, GuestAddress};

    use super::*;

    const PAGE: usize = 4096;

    /// 16 pages of shared RAM at 0x10_0000 (a memfd, as QEMU's share=on gives), page `i`
    /// filled with `i + 1`.
    fn shared_ram() -> GuestMemory {
        let fd = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = File::from(fd);
        file.set_len(16 * PAGE as u64).unwrap();
        let memory = GuestMemory::from_ranges_with_files([(
            GuestAddress(0x10_0000),
            16 * PAGE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        for i in 0..16u64 {
            memory
                .write_slice(
                    &[i as u8 + 1; PAGE],
                    GuestAddress(0x10_0000 + i * PAGE as u64),
                )
                .unwrap();
        }
        memory
    }

    fn page(i: u64) -> u64 {
        0x10_0000 + i * PAGE as u64
    }

    #[test]
    fn scattered_pages_read_and_write_through_one_contiguous_range() {
        let memory = shared_ram();
        let order = [5, 2, 3, 4, 9, 0];
        let pages: Vec<u64> = order.iter().map(|&i| page(i)).collect();
        let view = ContiguousView::map(&memory, &pages, PAGE).unwrap();
        assert_eq!(view.len(), order.len() * PAGE);
        assert_eq!(
            view.runs(),
            4,
            "2, 3, 4 follow each other in the file: one mmap"
        );
        // SAFETY: the view is mapped and `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts_mut(view.as_ptr(), view.len()) };
        for (n, &i) in order.iter().enumerate() {
            assert!(
                bytes[n * PAGE..(n + 1) * PAGE]
                    .iter()
                    .all(|&b| b == i as u8 + 1)
            );
        }
        // A write through the view lands in the guest's own page.
        bytes[PAGE + 7] = 0xee;
        let mut back = [0u8; 1];
        memory
            .read_slice(&mut back, GuestAddress(page(2) + 7))
            .unwrap();
        assert_eq!(back, [0xee]);
    }

    #[test]
    fn pages_outside_shared_ram_are_refused_by_name() {
        let memory = shared_ram();
        assert_eq!(
            ContiguousView::map(&memory, &[page(1), 0x9000_0000], PAGE).unwrap_err(),
            ViewError::NotInRam(0x9000_0000)
        );
        assert_eq!(
            ContiguousView::map(&memory, &[page(1) + 8], PAGE).unwrap_err(),
            ViewError::Unaligned(page(1) + 8)
        );
        assert_eq!(
            ContiguousView::map(&memory, &[], PAGE).unwrap_err(),
            ViewError::Empty
        );
        let anonymous = GuestMemory::from_ranges(&[(GuestAddress(0x10_0000), 4 * PAGE)]).unwrap();
        let error = ContiguousView::map(&anonymous, &[page(0)], PAGE).unwrap_err();
        assert_eq!(error, ViewError::NotShared(page(0)));
        assert!(error.to_string().contains("share=on"), "{error}");
        let too_many = vec![page(0); MAX_VIEW_PAGES + 1];
        assert_eq!(
            ContiguousView::map(&memory, &too_many, PAGE).unwrap_err(),
            ViewError::TooManyPages(MAX_VIEW_PAGES + 1)
        );
    }

    #[test]
    fn one_page_may_appear_twice_as_a_guest_may_list_it() {
        let memory = shared_ram();
        let view = ContiguousView::map(&memory, &[page(7), page(7)], PAGE).unwrap();
        // SAFETY: mapped, two pages long.
        let bytes = unsafe { std::slice::from_raw_parts_mut(view.as_ptr(), view.len()) };
        bytes[0] = 0x42;
        assert_eq!(bytes[PAGE], 0x42, "both halves are the same guest page");
    }
}
