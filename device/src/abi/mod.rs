//! The PVRDMA device ABI as the Linux `vmw_pvrdma` driver and rdma-core's provider use it:
//! register offsets, the Device Shared Region, command and response slots, ring elements.
//! Layouts and values follow the Linux driver's ABI headers; docs/device-abi.md writes them
//! down, and the "device-abi §N" citations in the code are its sections.
//!
//! Every struct is `repr(C)` with explicit padding and derives zerocopy's traits, so a struct
//! is read from a copy of guest bytes (`read_from_bytes`) and written back as bytes
//! (`as_bytes`) without any hand-written unsafe code. Sizes are checked at compile time.
//! Integers are little-endian: the driver exists for x86 only, and so does this device.

#[cfg(target_endian = "big")]
compile_error!("the PVRDMA ABI is little-endian; this device builds for little-endian hosts only");

pub mod commands;
pub mod dsr;
pub mod queues;

pub use commands::*;
pub use dsr::*;
pub use queues::*;

/// Guest page size assumed by the driver, the provider and this device (device-abi §0).
pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Register offsets in BAR1 (device-abi §2.1). All registers are 32 bits.
pub mod regs {
    pub const VERSION: u64 = 0x00;
    pub const DSR_LOW: u64 = 0x04;
    pub const DSR_HIGH: u64 = 0x08;
    pub const CTL: u64 = 0x0c;
    pub const REQUEST: u64 = 0x10;
    pub const ERR: u64 = 0x14;
    pub const ICR: u64 = 0x18;
    pub const IMR: u64 = 0x1c;
    pub const MAC_LOW: u64 = 0x20;
    pub const MAC_HIGH: u64 = 0x24;

    /// `CTL` values.
    pub const CTL_ACTIVATE: u32 = 0;
    pub const CTL_UNQUIESCE: u32 = 1;
    pub const CTL_RESET: u32 = 2;
}

/// Device API versions (device-abi §2.3).
pub mod version {
    /// 64-bit UAR page numbers (`uar_pfn64`, `pfn64`).
    pub const PPN64: u32 = 19;
    /// QP handles separate from QPNs (`create_qp_resp_v2`).
    pub const QP_HANDLE: u32 = 20;
}

/// UAR doorbell words and bits (device-abi §7.1).
pub mod uar {
    pub const QP_OFFSET: u64 = 0x0;
    pub const CQ_OFFSET: u64 = 0x4;
    pub const SRQ_OFFSET: u64 = 0x8;
    pub const HANDLE_MASK: u32 = 0x00ff_ffff;
    pub const QP_SEND: u32 = 1 << 30;
    pub const QP_RECV: u32 = 1 << 31;
    pub const CQ_ARM_SOL: u32 = 1 << 29;
    pub const CQ_ARM: u32 = 1 << 30;
    pub const CQ_POLL: u32 = 1 << 31;
    pub const SRQ_RECV: u32 = 1 << 30;
}

/// MSI-X vectors the driver handles (device-abi §1.3).
pub mod vector {
    pub const COMMAND: u16 = 0;
    pub const ASYNC_EVENT: u16 = 1;
    pub const CQ_NOTIFY: u16 = 2;
}

/// Page directory geometry (device-abi §4): one directory page of 512 table pages of 512 entries.
pub mod pdir {
    pub const ENTRIES_PER_PAGE: u64 = 512;
    pub const MAX_PAGES: u64 = ENTRIES_PER_PAGE * ENTRIES_PER_PAGE;
}
