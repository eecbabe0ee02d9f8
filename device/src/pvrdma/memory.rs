//! Typed, bounds-checked access to guest memory. Every guest address the device uses goes
//! through here: a fault is an error the caller turns into a status for the guest, never a
//! panic and never an access outside what the client mapped.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest RAM as the vfio-user client shared it (DMA_MAP windows).
pub type GuestRam = GuestMemoryMmap;

/// A guest address the device could not access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest memory fault: {len} bytes at {addr:#x}")]
pub struct GuestFault {
    pub addr: u64,
    pub len: usize,
}

fn fault(addr: u64, len: usize) -> GuestFault {
    GuestFault { addr, len }
}

/// Copies a `T` out of guest memory (one fetch; the caller parses its private copy).
pub fn read<T: FromBytes + IntoBytes>(mem: &GuestRam, addr: u64) -> Result<T, GuestFault> {
    let len = size_of::<T>();
    let mut value = T::new_zeroed();
    addr.checked_add(len as u64).ok_or(fault(addr, len))?;
    mem.read_slice(value.as_mut_bytes(), GuestAddress(addr))
        .map_err(|_| fault(addr, len))?;
    Ok(value)
}

/// Writes a `T` into guest memory.
pub fn write<T: IntoBytes + Immutable>(
    mem: &GuestRam,
    addr: u64,
    value: &T,
) -> Result<(), GuestFault> {
    write_bytes(mem, addr, value.as_bytes())
}

pub fn read_bytes(mem: &GuestRam, addr: u64, buf: &mut [u8]) -> Result<(), GuestFault> {
    addr.checked_add(buf.len() as u64)
        .ok_or(fault(addr, buf.len()))?;
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|_| fault(addr, buf.len()))
}

pub fn write_bytes(mem: &GuestRam, addr: u64, bytes: &[u8]) -> Result<(), GuestFault> {
    addr.checked_add(bytes.len() as u64)
        .ok_or(fault(addr, bytes.len()))?;
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| fault(addr, bytes.len()))
}

/// Whether `[addr, addr + len)` is all guest RAM (no access is made).
pub fn is_ram(mem: &GuestRam, addr: u64, len: u64) -> bool {
    let (Some(_), Ok(len)) = (addr.checked_add(len), usize::try_from(len)) else {
        return false;
    };
    mem.check_range(GuestAddress(addr), len)
}

/// Reads a ring index the guest updates concurrently.
pub fn load_u32(mem: &GuestRam, addr: u64) -> Result<u32, GuestFault> {
    mem.load::<u32>(GuestAddress(addr), Ordering::Acquire)
        .map_err(|_| fault(addr, 4))
}

/// Publishes a ring index after the elements it covers were written.
pub fn store_u32(mem: &GuestRam, addr: u64, value: u32) -> Result<(), GuestFault> {
    mem.store(value, GuestAddress(addr), Ordering::Release)
        .map_err(|_| fault(addr, 4))
}

/// Guest RAM backed by anonymous memory, for tests: `size` bytes at guest address 0.
#[cfg(test)]
pub fn test_ram(size: usize) -> GuestRam {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous test memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_outside_ram_fault_instead_of_panicking() {
        let mem = test_ram(8192);
        assert!(read::<u64>(&mem, 8188).is_err());
        assert!(read::<u64>(&mem, u64::MAX - 3).is_err());
        assert!(write(&mem, 8192, &1u32).is_err());
        assert!(load_u32(&mem, 1 << 40).is_err());
        write(&mem, 8184, &0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(read::<u64>(&mem, 8184).unwrap(), 0x1122_3344_5566_7788);
    }
}
