//! Generic layout of a type-0 (endpoint) PCI configuration header and of the
//! MSI-X capability, from the PCI Local Bus Specification 3.0. Nothing here is
//! PVRDMA-specific; see [`super::ids`] for that.

/// Vendor ID, 16 bits.
pub const VENDOR_ID: usize = 0x00;
/// Device ID, 16 bits.
pub const DEVICE_ID: usize = 0x02;
/// Command register, 16 bits.
pub const COMMAND: usize = 0x04;
/// Status register, 16 bits.
pub const STATUS: usize = 0x06;
/// Revision ID, 8 bits.
pub const REVISION_ID: usize = 0x08;
/// Programming interface, 8 bits.
pub const PROG_IF: usize = 0x09;
/// Subclass, 8 bits.
pub const SUBCLASS: usize = 0x0A;
/// Base class code, 8 bits.
pub const CLASS_CODE: usize = 0x0B;
/// Cache line size, 8 bits (hardwired 0 here: no memory-write-invalidate).
pub const CACHE_LINE_SIZE: usize = 0x0C;
/// Latency timer, 8 bits (hardwired 0: not a bus master on a real bus).
pub const LATENCY_TIMER: usize = 0x0D;
/// Header type, 8 bits; bit 7 = multi-function.
pub const HEADER_TYPE: usize = 0x0E;
/// Built-in self test, 8 bits.
pub const BIST: usize = 0x0F;
/// First of the six 32-bit BAR registers.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID, 16 bits.
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
/// Subsystem ID, 16 bits.
pub const SUBSYSTEM_ID: usize = 0x2E;
/// Expansion ROM base address, 32 bits.
pub const ROM_BAR: usize = 0x30;
/// Capabilities pointer, 8 bits.
pub const CAPABILITY_POINTER: usize = 0x34;
/// Interrupt line, 8 bits: scratch for the OS.
pub const INTERRUPT_LINE: usize = 0x3C;
/// Interrupt pin, 8 bits: 0 = no INTx.
pub const INTERRUPT_PIN: usize = 0x3D;
/// Min_Gnt, 8 bits.
pub const MIN_GNT: usize = 0x3E;
/// Max_Lat, 8 bits.
pub const MAX_LAT: usize = 0x3F;

/// Offset of BAR register `index` (0..6).
pub const fn bar(index: usize) -> usize {
    BAR0 + 4 * index
}

/// Command: respond to memory-space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: may act as bus master (DMA). The device must not DMA without it.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disable. Writable even though the function has no
/// INTx pin, because Linux's `pci_intx()` writes it and expects it to stick.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Status: a capability list is present at [`CAPABILITY_POINTER`].
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Status: master data parity error (RW1C).
pub const STATUS_MASTER_PARITY_ERROR: u16 = 1 << 8;
/// Status: signaled target abort (RW1C).
pub const STATUS_SIGNALED_TARGET_ABORT: u16 = 1 << 11;
/// Status: received target abort (RW1C).
pub const STATUS_RECEIVED_TARGET_ABORT: u16 = 1 << 12;
/// Status: received master abort (RW1C).
pub const STATUS_RECEIVED_MASTER_ABORT: u16 = 1 << 13;
/// Status: signaled system error (RW1C).
pub const STATUS_SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
/// Status: detected parity error (RW1C).
pub const STATUS_DETECTED_PARITY_ERROR: u16 = 1 << 15;
/// All error bits of the status register, which software clears by writing 1.
pub const STATUS_RW1C: u16 = STATUS_MASTER_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR;

/// Header type 0: a normal endpoint function.
pub const HEADER_TYPE_NORMAL: u8 = 0x00;

/// BAR type bits for a 32-bit, non-prefetchable memory BAR: all zero.
pub const BAR_MEMORY_32: u32 = 0b0000;
/// Low BAR bits that encode the type and are never part of the address.
pub const BAR_MEMORY_TYPE_MASK: u32 = 0xF;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// MSI-X capability: ID byte (relative to the capability start).
pub const MSIX_CAP_ID: usize = 0x00;
/// MSI-X capability: next-capability pointer.
pub const MSIX_CAP_NEXT: usize = 0x01;
/// MSI-X capability: Message Control, 16 bits.
pub const MSIX_MESSAGE_CONTROL: usize = 0x02;
/// MSI-X capability: Table Offset / Table BIR, 32 bits.
pub const MSIX_TABLE: usize = 0x04;
/// MSI-X capability: PBA Offset / PBA BIR, 32 bits.
pub const MSIX_PBA: usize = 0x08;
/// Length of the MSI-X capability structure.
pub const MSIX_CAP_LEN: usize = 0x0C;

/// Message Control: table size minus one, read-only.
pub const MSIX_CONTROL_TABLE_SIZE_MASK: u16 = 0x07FF;
/// Message Control: all vectors masked.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: MSI-X enabled.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Table / PBA register: BAR indicator in the low 3 bits.
pub const MSIX_BIR_MASK: u32 = 0x7;
