//! Identity and resource layout of the PVRDMA function (device-abi §1).
//!
//! Every device-specific number lives here so that the configuration space,
//! the vfio-user region table and the (future) register and UAR models agree
//! by construction.

/// VMware, Inc. The guest driver matches on vendor + device only.
pub const VENDOR_ID: u16 = 0x15AD;
/// PVRDMA. The Linux driver reports it as `vendor_part_id`.
pub const DEVICE_ID: u16 = 0x0820;
/// QEMU left these at its generic defaults; we use VMware's IDs so `lspci`
/// names the card. No driver checks them.
pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
/// See [`SUBSYSTEM_VENDOR_ID`].
pub const SUBSYSTEM_ID: u16 = DEVICE_ID;
/// QEMU used 0; the driver never reads it.
pub const REVISION_ID: u8 = 0x00;

/// Base class: network controller.
pub const CLASS_CODE: u8 = 0x02;
/// Subclass: "other network controller", as QEMU's PVRDMA used.
pub const SUBCLASS: u8 = 0x80;
/// Programming interface: none defined for this class.
pub const PROG_IF: u8 = 0x00;

/// Number of standard BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// BAR holding only the MSI-X table and PBA (the client emulates the table).
pub const MSIX_BAR: usize = 0;
/// BAR holding the 32-bit device registers (device-abi §2).
pub const REG_BAR: usize = 1;
/// BAR holding the UAR (doorbell) pages, one per user context (device-abi §7).
pub const UAR_BAR: usize = 2;

/// Size of the MSI-X BAR, as QEMU's PVRDMA had it.
pub const MSIX_BAR_SIZE: u64 = 16 * 1024;
/// Size of the register BAR: page 0 holds the registers (0x28 bytes used), page 1 is a
/// page of plain memory the client may mmap (see [`REG_BAR_MMAP_OFFSET`]).
pub const REG_BAR_SIZE: u64 = 8 * 1024;
/// Offset of BAR1's mmap-able page. Its only job: QEMU turns posted writes off for a
/// device with any mmap-able region, and the driver needs its DSRHIGH write to complete
/// before it reads the capabilities the write produced (docs/vfio-user-server.md, posted writes). The driver
/// never touches this page.
pub const REG_BAR_MMAP_OFFSET: u64 = 4 * 1024;
/// Size of one UAR page.
pub const UAR_PAGE_SIZE: u64 = 4 * 1024;
/// Number of UAR pages: page 0 belongs to the kernel driver, the rest to user
/// contexts, so this bounds `caps.max_uar`.
pub const UAR_PAGES: u64 = 512;
/// Size of the UAR BAR.
pub const UAR_BAR_SIZE: u64 = UAR_PAGES * UAR_PAGE_SIZE;

/// Size of each BAR, indexed by BAR number; 0 means the BAR is not implemented.
pub const BAR_SIZES: [u64; NUM_BARS] = [MSIX_BAR_SIZE, REG_BAR_SIZE, UAR_BAR_SIZE, 0, 0, 0];

/// MSI-X vectors exposed. The driver wires exactly three handlers (device-abi §1.3);
/// with fewer it silently loses async events or CQ notifications.
pub const MSIX_VECTORS: u16 = 3;
/// Vector raised when a command response is ready.
pub const VECTOR_COMMAND_RESPONSE: u16 = 0;
/// Vector raised when an entry was added to the async event ring.
pub const VECTOR_ASYNC_EVENT: u16 = 1;
/// Vector raised when an entry was added to the CQ notification ring.
pub const VECTOR_CQ_NOTIFICATION: u16 = 2;

/// Offset of the MSI-X table within [`MSIX_BAR`].
pub const MSIX_TABLE_OFFSET: u32 = 0x0000;
/// Offset of the pending-bit array within [`MSIX_BAR`].
pub const MSIX_PBA_OFFSET: u32 = 0x2000;
/// Bytes per MSI-X table entry (PCI 3.0 §6.8.2.6).
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;

/// Size of the conventional configuration space (no PCIe extended space).
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Offset of the MSI-X capability, the only one in the list.
pub const MSIX_CAP_OFFSET: u8 = 0x40;

// Layout invariants, checked at compile time so a later edit cannot produce
// an inconsistent device.
const _: () = {
    let mut i = 0;
    while i < NUM_BARS {
        let size = BAR_SIZES[i];
        // A memory BAR is a power of two of at least 16 bytes; 0 = absent.
        assert!(size == 0 || (size.is_power_of_two() && size >= 16));
        // All BARs are 32-bit.
        assert!(size <= 1 << 31);
        i += 1;
    }
    assert!(MSIX_VECTORS >= 1 && MSIX_VECTORS <= 2048);
    assert!(VECTOR_CQ_NOTIFICATION < MSIX_VECTORS);
    // The table must end before the PBA, and the PBA (one bit per vector,
    // in 64-bit words) must fit in the BAR.
    assert!(
        MSIX_TABLE_OFFSET as u64 + MSIX_VECTORS as u64 * MSIX_TABLE_ENTRY_SIZE
            <= MSIX_PBA_OFFSET as u64
    );
    assert!(MSIX_PBA_OFFSET as u64 + (MSIX_VECTORS as u64).div_ceil(64) * 8 <= MSIX_BAR_SIZE);
    // Table and PBA offsets are 8-byte aligned: the low 3 bits hold the BIR.
    assert!(MSIX_TABLE_OFFSET.is_multiple_of(8) && MSIX_PBA_OFFSET.is_multiple_of(8));
    assert!(MSIX_CAP_OFFSET >= 0x40 && MSIX_CAP_OFFSET.is_multiple_of(4));
    assert!(MSIX_BAR < NUM_BARS && REG_BAR < NUM_BARS && UAR_BAR < NUM_BARS);
};
