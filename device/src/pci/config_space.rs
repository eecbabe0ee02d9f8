//! The 256-byte conventional PCI configuration space of the PVRDMA function.
//!
//! Sans-IO: the vfio-user backend feeds it client reads and writes, the device
//! model queries decoded bits (bus master, MSI-X enable). The space is a byte
//! array plus two constant per-byte masks computed at compile time:
//!
//! * `WRITABLE` — bits software may change; everything else is read-only.
//! * `RW1C` — bits software clears by writing 1 (status error bits).
//!
//! Conventional PCI has a byte enable per lane, so treating every access as a
//! sequence of independent byte writes is exact for 1-, 2- and 4-byte accesses
//! and gives well-defined results for any other length or alignment a client
//! may send. Bytes outside the space read as 0 and ignore writes.

use std::ops::Range;

use super::ids;
use super::regs;

const SIZE: usize = ids::CONFIG_SPACE_SIZE;

/// Power-on contents of the configuration space.
const POWER_ON: [u8; SIZE] = power_on_image();
/// Per-byte mask of software-writable bits.
const WRITABLE: [u8; SIZE] = writable_mask();
/// Per-byte mask of write-1-to-clear bits.
const RW1C: [u8; SIZE] = rw1c_mask();

/// Configuration space of one PVRDMA function.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
}

impl ConfigSpace {
    /// A configuration space in its power-on state.
    pub const fn new() -> Self {
        Self { bytes: POWER_ON }
    }

    /// Restores the power-on state (function-level or device reset).
    pub fn reset(&mut self) {
        self.bytes = POWER_ON;
    }

    /// Reads `data.len()` bytes starting at `offset`. Bytes past the end of
    /// the space read as 0. Reads have no side effects.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((space, buf)) = overlap(offset, data.len()) else {
            return;
        };
        if let (Some(dst), Some(src)) = (data.get_mut(buf), self.bytes.get(space)) {
            dst.copy_from_slice(src);
        }
    }

    /// Writes `data` starting at `offset`, honouring the read-only, writable
    /// and write-1-to-clear bits of each byte. Bytes past the end of the space
    /// are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((space, buf)) = overlap(offset, data.len()) else {
            return;
        };
        let (Some(bytes), Some(writable), Some(rw1c), Some(data)) = (
            self.bytes.get_mut(space.clone()),
            WRITABLE.get(space.clone()),
            RW1C.get(space),
            data.get(buf),
        ) else {
            return;
        };
        for (((byte, &w), &c), &value) in bytes.iter_mut().zip(writable).zip(rw1c).zip(data) {
            let merged = (*byte & !w) | (value & w);
            *byte = merged & !(value & c);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(regs::COMMAND)
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        self.u16_at(regs::STATUS)
    }

    /// Whether the function may decode its memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & regs::COMMAND_MEMORY != 0
    }

    /// Whether the function may master the bus, i.e. DMA into guest memory.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & regs::COMMAND_BUS_MASTER != 0
    }

    /// Whether software enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.msix_control() & regs::MSIX_CONTROL_ENABLE != 0
    }

    /// Whether software masked all MSI-X vectors at once.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & regs::MSIX_CONTROL_FUNCTION_MASK != 0
    }

    /// The address programmed into BAR `index`, or `None` for an absent BAR.
    pub fn bar_address(&self, index: usize) -> Option<u32> {
        match ids::BAR_SIZES.get(index) {
            Some(&size) if size != 0 => {
                Some(self.u32_at(regs::bar(index)) & !regs::BAR_MEMORY_TYPE_MASK)
            }
            _ => None,
        }
    }

    /// Latches error bits into the status register, as hardware does when it
    /// e.g. receives a master abort on DMA. Only the RW1C bits can be set.
    pub fn set_status_error(&mut self, bits: u16) {
        let status = (self.status() | (bits & regs::STATUS_RW1C)).to_le_bytes();
        if let Some(dst) = self.bytes.get_mut(regs::STATUS..regs::STATUS + 2) {
            dst.copy_from_slice(&status);
        }
    }

    fn msix_control(&self) -> u16 {
        self.u16_at(usize::from(ids::MSIX_CAP_OFFSET) + regs::MSIX_MESSAGE_CONTROL)
    }

    // Internal accessors take constant, in-range offsets.
    fn u16_at(&self, offset: usize) -> u16 {
        let mut raw = [0; 2];
        self.read(offset as u64, &mut raw);
        u16::from_le_bytes(raw)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut raw = [0; 4];
        self.read(offset as u64, &mut raw);
        u32::from_le_bytes(raw)
    }
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("status", &format_args!("{:#06x}", self.status()))
            .field("msix_enabled", &self.msix_enabled())
            .finish_non_exhaustive()
    }
}

/// The part of an access `[offset, offset + len)` that falls inside the space:
/// the byte range in the space and the matching range in the caller's buffer.
/// `None` when nothing overlaps (including offsets beyond `usize`).
fn overlap(offset: u64, len: usize) -> Option<(Range<usize>, Range<usize>)> {
    let start = usize::try_from(offset).ok().filter(|&s| s < SIZE)?;
    let end = start.saturating_add(len).min(SIZE);
    let count = end.checked_sub(start)?;
    (count > 0).then_some((start..end, 0..count))
}

const fn put_u8(image: &mut [u8; SIZE], offset: usize, value: u8) {
    image[offset] = value;
}

const fn put_u16(image: &mut [u8; SIZE], offset: usize, value: u16) {
    let bytes = value.to_le_bytes();
    image[offset] = bytes[0];
    image[offset + 1] = bytes[1];
}

const fn put_u32(image: &mut [u8; SIZE], offset: usize, value: u32) {
    let bytes = value.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        image[offset + i] = bytes[i];
        i += 1;
    }
}

/// Type bits of a present BAR; all BARs are 32-bit non-prefetchable memory
/// because the driver addresses resources by BAR index (device-abi §1.2).
const fn bar_type_bits(size: u64) -> u32 {
    if size == 0 { 0 } else { regs::BAR_MEMORY_32 }
}

/// Address bits a BAR of `size` bytes implements. Hardwiring the bits below
/// the size to 0 is what makes the all-ones sizing probe read back `!(size-1)`.
const fn bar_address_mask(size: u64) -> u32 {
    if size == 0 {
        0
    } else {
        // `size` is a power of two <= 2 GiB (checked in `ids`), so this fits.
        !((size - 1) as u32) & !regs::BAR_MEMORY_TYPE_MASK
    }
}

const fn power_on_image() -> [u8; SIZE] {
    let mut image = [0u8; SIZE];
    put_u16(&mut image, regs::VENDOR_ID, ids::VENDOR_ID);
    put_u16(&mut image, regs::DEVICE_ID, ids::DEVICE_ID);
    put_u16(&mut image, regs::STATUS, regs::STATUS_CAPABILITIES);
    put_u8(&mut image, regs::REVISION_ID, ids::REVISION_ID);
    put_u8(&mut image, regs::PROG_IF, ids::PROG_IF);
    put_u8(&mut image, regs::SUBCLASS, ids::SUBCLASS);
    put_u8(&mut image, regs::CLASS_CODE, ids::CLASS_CODE);
    put_u8(&mut image, regs::HEADER_TYPE, regs::HEADER_TYPE_NORMAL);
    let mut bar = 0;
    while bar < ids::NUM_BARS {
        put_u32(
            &mut image,
            regs::bar(bar),
            bar_type_bits(ids::BAR_SIZES[bar]),
        );
        bar += 1;
    }
    put_u16(
        &mut image,
        regs::SUBSYSTEM_VENDOR_ID,
        ids::SUBSYSTEM_VENDOR_ID,
    );
    put_u16(&mut image, regs::SUBSYSTEM_ID, ids::SUBSYSTEM_ID);
    put_u8(&mut image, regs::CAPABILITY_POINTER, ids::MSIX_CAP_OFFSET);
    // MSI-X only: no INTx pin, so QEMU never sets up INTx for us.
    put_u8(&mut image, regs::INTERRUPT_PIN, 0);

    let cap = ids::MSIX_CAP_OFFSET as usize;
    put_u8(&mut image, cap + regs::MSIX_CAP_ID, regs::CAP_ID_MSIX);
    put_u8(&mut image, cap + regs::MSIX_CAP_NEXT, 0);
    put_u16(
        &mut image,
        cap + regs::MSIX_MESSAGE_CONTROL,
        (ids::MSIX_VECTORS - 1) & regs::MSIX_CONTROL_TABLE_SIZE_MASK,
    );
    put_u32(
        &mut image,
        cap + regs::MSIX_TABLE,
        ids::MSIX_TABLE_OFFSET | ids::MSIX_BAR as u32,
    );
    put_u32(
        &mut image,
        cap + regs::MSIX_PBA,
        ids::MSIX_PBA_OFFSET | ids::MSIX_BAR as u32,
    );
    image
}

const fn writable_mask() -> [u8; SIZE] {
    let mut mask = [0u8; SIZE];
    // No I/O BARs, so the I/O-space enable bit stays hardwired to 0.
    put_u16(
        &mut mask,
        regs::COMMAND,
        regs::COMMAND_MEMORY
            | regs::COMMAND_BUS_MASTER
            | regs::COMMAND_PARITY
            | regs::COMMAND_SERR
            | regs::COMMAND_INTX_DISABLE,
    );
    let mut bar = 0;
    while bar < ids::NUM_BARS {
        put_u32(
            &mut mask,
            regs::bar(bar),
            bar_address_mask(ids::BAR_SIZES[bar]),
        );
        bar += 1;
    }
    // The ROM BAR stays all read-only zeros: no expansion ROM.
    put_u8(&mut mask, regs::INTERRUPT_LINE, 0xFF);
    put_u16(
        &mut mask,
        ids::MSIX_CAP_OFFSET as usize + regs::MSIX_MESSAGE_CONTROL,
        regs::MSIX_CONTROL_ENABLE | regs::MSIX_CONTROL_FUNCTION_MASK,
    );
    mask
}

const fn rw1c_mask() -> [u8; SIZE] {
    let mut mask = [0u8; SIZE];
    put_u16(&mut mask, regs::STATUS, regs::STATUS_RW1C);
    mask
}

#[cfg(test)]
mod tests;
