//! Our own vfio-user server: message loop, wire formats, backend trait.
//!
//! It replaces `vfio_user::Server::run`, whose loop desynchronises on
//! unsupported commands, sends errno 0, panics on a bad VERSION string and
//! trusts client sizes (docs/vfio-user-server.md, the crate's bugs bugs A, B, C, E, F; see
//! `docs/vfio-user-server.md`). The rule here: every byte from the client is
//! hostile. Each message is consumed whole and answered with a correct reply
//! or a real errno; the server never panics, hangs on a bad length, allocates
//! more than [`MAX_MESSAGE_SIZE`] or leaks a received descriptor.
//!
//! * [`wire`] — header, flags, command numbers and payload layouts.
//! * `server` — framing: header + fds in, payload consumed, reply out.
//! * `handlers` — what each command does, given its payload.
//! * `version` — the VERSION JSON negotiation.
//! * `socket` — `SCM_RIGHTS` passing (the crate's only `unsafe`).

use std::fs::File;
use std::os::fd::OwnedFd;

pub use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{vfio_region_info, vfio_region_sparse_mmap_area};

mod handlers;
mod server;
#[allow(unsafe_code)] // Owning received descriptors; see the module docs.
mod socket;
pub use socket::adopt_inherited;
mod version;
pub mod wire;

pub use server::{ConnectionError, serve_client, serve_client_spinning, turn_away};

/// Most descriptors we accept with one message (our `max_msg_fds`), the
/// most QEMU will use (QEMU's vfio-user specification, VFIO_USER_VERSION). Extra ones are closed and the
/// message is refused with EINVAL.
pub const MAX_MSG_FDS: usize = 16;

/// Largest `count` of a REGION_READ/REGION_WRITE (our `max_data_xfer_size`,
/// the protocol default).
pub const MAX_DATA_XFER_SIZE: u32 = 1 << 20;

/// Largest message we accept: a REGION_WRITE of [`MAX_DATA_XFER_SIZE`] bytes,
/// the biggest request we support. A bigger size cannot be consumed safely,
/// so the client is told EINVAL and dropped.
pub const MAX_MESSAGE_SIZE: u32 =
    (wire::HEADER_SIZE + wire::REGION_ACCESS_SIZE) as u32 + MAX_DATA_XFER_SIZE;

/// Largest VERSION JSON (NUL included) we parse. QEMU's is about 200 bytes.
pub const MAX_VERSION_DATA: usize = 4096;

/// DMA page sizes we accept (our `pgsizes`): 4 KiB, as QEMU requires.
pub const DMA_PGSIZES: u64 = 4096;

/// Most DMA windows at once (our `max_dma_maps`, the protocol default).
pub const MAX_DMA_MAPS: u32 = 256;

/// One region of the device, as `DEVICE_GET_REGION_INFO` describes it.
///
/// To expose part of a region for direct mapping, set
/// `VFIO_REGION_INFO_FLAG_MMAP` in `region_info.flags`, list the mappable
/// parts in `sparse_areas` (offsets relative to `region_info.offset` in the
/// file) and give the backing file in `mmap_fd`. The server then adds the
/// sparse mmap capability and sends the fd once the client's buffer can hold
/// the capability (QEMU's second query). Any mappable region also makes QEMU
/// turn posted writes off for the whole device (QEMU's vfio-user specification, VFIO_USER_DEVICE_GET_REGION_INFO).
#[derive(Debug)]
pub struct RegionDescriptor {
    /// Index, flags, size and file offset. `argsz` and `cap_offset` are
    /// computed by the server.
    pub region_info: vfio_region_info,
    /// The parts of the region the client may mmap.
    pub sparse_areas: Vec<vfio_region_sparse_mmap_area>,
    /// The file behind the mappable parts. Without sparse areas it is sent
    /// with every reply, meaning the whole region.
    pub mmap_fd: Option<OwnedFd>,
}

/// One IRQ index of the device, as `DEVICE_GET_IRQ_INFO` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqDescriptor {
    /// IRQ index (INTX 0, MSI 1, MSIX 2, ERR 3, REQ 4).
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// Number of vectors.
    pub count: u32,
}

/// The device behind the server. Runs on the server thread, one request at
/// a time, in the order the client sent them.
///
/// The server validates framing, sizes, region/IRQ indices, region bounds and
/// descriptor counts before calling in, so the backend sees only
/// well-formed requests. An `Err` becomes an error reply carrying that errno
/// (never 0: a 0 is sent as EIO).
pub trait DeviceBackend {
    /// The region table; entry `i` describes region index `i`.
    fn regions(&self) -> &[RegionDescriptor];

    /// The IRQ table; entry `i` describes IRQ index `i`.
    fn irqs(&self) -> &[IrqDescriptor];

    /// Whether `DEVICE_RESET` is supported (advertised in `DEVICE_GET_INFO`).
    fn resettable(&self) -> bool;

    /// Reads `data.len()` bytes at `offset`; the range lies in the region.
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;

    /// Writes `data` at `offset`; the range lies in the region.
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// The client shares guest-physical `[address, address + size)`, backed
    /// by `fd` at `offset` when it sent one. `flags` are the raw wire bits.
    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Errno>;

    /// The client withdraws a window. `flags` are the raw wire bits
    /// (2 = `VFIO_DMA_UNMAP_FLAG_ALL`).
    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Result<(), Errno>;

    /// Resets the device.
    fn reset(&mut self) -> Result<(), Errno>;

    /// Applies `SET_IRQS` to an existing index. `fds` is empty or holds at
    /// most `count` eventfds (QEMU sends none to de-assign; QEMU's vfio-user
    /// specification, VFIO_USER_DEVICE_SET_IRQS); only `DATA_EVENTFD` requests carry any. `DATA_BOOL` is refused
    /// before this is called.
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), Errno>;

    /// Whether the client will likely send its next message within microseconds of the
    /// reply to the last one (a register write that starts a command, read back at once),
    /// so the server should spin for it rather than sleep. Default: never.
    fn expects_follow_up(&self) -> bool {
        false
    }

    /// Runs after the reply to the last message has been sent (or, for a No_reply message,
    /// after it was handled), before the next message is read: work the backend chose to
    /// do once the client is no longer waiting. Its effects are in place before the next
    /// message is handled, so the client's own requests still see them in order.
    fn after_reply(&mut self) {}

    /// Why the device can no longer serve this client (checked after every message), if it
    /// cannot: the loop then ends with [`ConnectionError::DeviceFailed`] and the
    /// client's connection is closed. Default: never.
    fn failure(&mut self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests;
