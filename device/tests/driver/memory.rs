//! Guest RAM as the test driver sees it: a memfd-backed `GuestMemoryMmap` (the same fd can
//! later be DMA_MAP'ed to a real server), the guest's page allocator, and typed accessors.
//!
//! Accessors panic on a fault: the driver only touches memory it allocated, so a fault is a
//! bug in the test, not in the device.

use std::fs::File;

use nix::sys::memfd::{MFdFlags, memfd_create};
use vfio_user_pvrdma::abi::PAGE_SIZE;
use vfio_user_pvrdma::pvrdma::GuestRam;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Default guest-physical base of the RAM: above 4 GiB, so DSRHIGH is non-zero and address 0
/// is not RAM (a zeroed page-directory entry then never names a valid page).
pub const DEFAULT_BASE: u64 = 0x1_0000_0000;
/// Default size: room for every test's rings with plenty to spare.
pub const DEFAULT_SIZE: u64 = 64 << 20;

/// Guest RAM backed by a memfd.
pub struct GuestMemory {
    ram: GuestRam,
    memfd: File,
    base: u64,
    size: u64,
}

impl GuestMemory {
    pub fn new(base: u64, size: u64) -> GuestMemory {
        assert!(base.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE));
        let memfd = File::from(
            memfd_create(c"pvrdma-test-guest-ram", MFdFlags::MFD_CLOEXEC).expect("memfd_create"),
        );
        memfd.set_len(size).expect("size the guest RAM memfd");
        let mapping = memfd.try_clone().expect("dup the guest RAM memfd");
        let ram = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            usize::try_from(size).expect("RAM size"),
            Some(FileOffset::new(mapping, 0)),
        )])
        .expect("map the guest RAM");
        GuestMemory {
            ram,
            memfd,
            base,
            size,
        }
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The backing file, for a transport that shares the RAM with a server process.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// First address past the RAM.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
}

/// The guest's page allocator: a bump allocator over the RAM's pages, zeroing what it hands
/// out (like `dma_alloc_coherent`). Pages are never given back: tests are short.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    next: u64,
    end: u64,
}

impl PageAllocator {
    pub fn new(base: u64, end: u64) -> PageAllocator {
        PageAllocator { next: base, end }
    }

    /// One zeroed page.
    pub fn page(&mut self, ram: &GuestRam) -> u64 {
        self.block(ram, 1)
    }

    /// `count` zeroed, physically contiguous pages; returns the first.
    pub fn block(&mut self, ram: &GuestRam, count: u64) -> u64 {
        let addr = self.next;
        let bytes = count * PAGE_SIZE;
        assert!(
            addr + bytes <= self.end,
            "guest RAM exhausted allocating {count} pages"
        );
        self.next += bytes;
        fill(ram, addr, 0, bytes);
        addr
    }

    /// `count` zeroed pages that are *not* contiguous in address order (the block is handed
    /// out back to front), as pinned user pages or driver allocations may well be.
    pub fn pages(&mut self, ram: &GuestRam, count: u64) -> Vec<u64> {
        let first = self.block(ram, count);
        (0..count).rev().map(|i| first + i * PAGE_SIZE).collect()
    }

    /// Pages not yet handed out.
    pub fn remaining(&self) -> u64 {
        (self.end - self.next) / PAGE_SIZE
    }
}

pub fn read<T: FromBytes + IntoBytes>(ram: &GuestRam, addr: u64) -> T {
    let mut value = T::new_zeroed();
    ram.read_slice(value.as_mut_bytes(), GuestAddress(addr))
        .unwrap_or_else(|e| panic!("driver read at {addr:#x}: {e}"));
    value
}

pub fn write<T: IntoBytes + Immutable + ?Sized>(ram: &GuestRam, addr: u64, value: &T) {
    write_bytes(ram, addr, value.as_bytes());
}

pub fn read_bytes(ram: &GuestRam, addr: u64, buf: &mut [u8]) {
    ram.read_slice(buf, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("driver read of {} bytes at {addr:#x}: {e}", buf.len()));
}

pub fn write_bytes(ram: &GuestRam, addr: u64, bytes: &[u8]) {
    ram.write_slice(bytes, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("driver write of {} bytes at {addr:#x}: {e}", bytes.len()));
}

pub fn read_u32(ram: &GuestRam, addr: u64) -> u32 {
    read(ram, addr)
}

pub fn write_u32(ram: &GuestRam, addr: u64, value: u32) {
    write(ram, addr, &value);
}

pub fn read_u64(ram: &GuestRam, addr: u64) -> u64 {
    read(ram, addr)
}

pub fn write_u64(ram: &GuestRam, addr: u64, value: u64) {
    write(ram, addr, &value);
}

/// Fills `len` bytes at `addr` with `byte`.
pub fn fill(ram: &GuestRam, addr: u64, byte: u8, len: u64) {
    let chunk = [byte; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(4096);
        write_bytes(ram, addr + done, &chunk[..n as usize]);
        done += n;
    }
}

/// A copy of `len` bytes at `addr`, for before/after comparisons.
pub fn snapshot(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    read_bytes(ram, addr, &mut buf);
    buf
}
