//! What each command does, given its already-consumed payload.
//!
//! Handlers see the first [`payload_limit`] bytes of the payload and its
//! full length; the loop has consumed everything by the time they run, so
//! returning early (with an errno) can never desynchronise the stream.
//! Every client-supplied number is checked here before it reaches the
//! backend or sizes an allocation.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{debug, info, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::version::{self, Offer};
use super::wire::{self, Command, Header};
use super::{DeviceBackend, Errno, MAX_DATA_XFER_SIZE, MAX_VERSION_DATA, RegionDescriptor};

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub(super) struct Session {
    /// The client's VERSION was accepted. Until then only VERSION is served.
    negotiated: bool,
    /// Most descriptors the client said it can receive in one message.
    client_max_msg_fds: u64,
}

/// One command message, its payload consumed.
pub(super) struct Request<'p> {
    pub header: Header,
    /// `None` for numbers outside the specification.
    pub command: Option<Command>,
    /// The first `min(payload_len, payload_limit(command))` payload bytes.
    pub payload: &'p [u8],
    /// The payload length the header announced (all of it consumed).
    pub payload_len: usize,
    /// Descriptors that came with the header (at most `MAX_MSG_FDS`).
    pub fds: Vec<OwnedFd>,
    /// More descriptors than we accept came; the extra ones are closed.
    pub too_many_fds: bool,
}

/// A successful reply: its payload and at most one descriptor to attach.
pub(super) struct Reply<'a> {
    pub payload: Vec<u8>,
    pub fd: Option<BorrowedFd<'a>>,
}

impl Reply<'_> {
    fn empty() -> Self {
        Self::with(Vec::new())
    }

    fn with(payload: Vec<u8>) -> Self {
        Self { payload, fd: None }
    }
}

/// How many payload bytes a command's handler reads; the rest is discarded
/// unread. This, not the client's size field, bounds every allocation.
/// Trailing bytes after a fixed-size request are ignored, as the kernel's
/// `argsz`-based ioctls do.
pub(super) fn payload_limit(command: Option<Command>) -> usize {
    match command {
        Some(Command::Version) => wire::VERSION_SIZE + MAX_VERSION_DATA,
        Some(Command::DmaMap) => wire::DMA_MAP_SIZE,
        Some(Command::DmaUnmap) => wire::DMA_UNMAP_SIZE,
        Some(Command::DeviceGetInfo) => wire::DEVICE_INFO_SIZE,
        Some(Command::DeviceGetRegionInfo) => wire::REGION_INFO_SIZE,
        Some(Command::DeviceGetIrqInfo) => wire::IRQ_INFO_SIZE,
        Some(Command::DeviceSetIrqs) => wire::IRQ_SET_SIZE,
        Some(Command::RegionRead) => wire::REGION_ACCESS_SIZE,
        Some(Command::RegionWrite) => wire::REGION_ACCESS_SIZE + MAX_DATA_XFER_SIZE as usize,
        _ => 0,
    }
}

/// Runs one command and returns its reply or errno.
pub(super) fn handle<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    session: &mut Session,
    request: Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let id = request.header.id;
    let number = request.header.command;
    if request.too_many_fds {
        warn!(
            "command {number} id {id}: more than {} fds",
            super::MAX_MSG_FDS
        );
        return Err(Errno::EINVAL);
    }
    let Some(command) = request.command else {
        return unknown(session, &request);
    };
    if !session.negotiated && command != Command::Version {
        warn!("command {number} (id {id}) before VERSION refused");
        return Err(Errno::EINVAL);
    }
    // Only DMA_MAP and SET_IRQS carry descriptors; any others are closed
    // (dropped with the request) and the message refused.
    let takes_fds = matches!(command, Command::DmaMap | Command::DeviceSetIrqs);
    if !request.fds.is_empty() && !takes_fds && !is_unsupported(command) {
        warn!(
            "command {number} id {id} carries {} unexpected fds",
            request.fds.len()
        );
        return Err(Errno::EINVAL);
    }
    match command {
        Command::Version if session.negotiated => {
            // Renegotiation is not defined by the specification.
            warn!("second VERSION (id {id}) refused");
            Err(Errno::EINVAL)
        }
        Command::Version => version(session, &request),
        Command::DmaMap => dma_map(backend, request),
        Command::DmaUnmap => dma_unmap(backend, &request),
        Command::DeviceGetInfo => device_info(backend, &request),
        Command::DeviceGetRegionInfo => region_info(backend, session, &request),
        Command::DeviceGetIrqInfo => irq_info(backend, &request),
        Command::DeviceSetIrqs => set_irqs(backend, request),
        Command::RegionRead => region_read(backend, &request),
        Command::RegionWrite => region_write(backend, &request),
        Command::DeviceReset => reset(backend),
        Command::DeviceGetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::DirtyPages
        | Command::RegionWriteMulti
        | Command::DeviceFeature
        | Command::MigDataRead
        | Command::MigDataWrite => unsupported(command, id),
    }
}

/// Commands the specification defines that this server does not implement.
fn is_unsupported(command: Command) -> bool {
    matches!(
        command,
        Command::DeviceGetRegionIoFds
            | Command::DmaRead
            | Command::DmaWrite
            | Command::DirtyPages
            | Command::RegionWriteMulti
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite
    )
}

/// A command number outside the specification: ENOTSUP, or EINVAL before
/// VERSION like everything else.
fn unknown<'b>(session: &Session, request: &Request<'_>) -> Result<Reply<'b>, Errno> {
    let number = request.header.command;
    warn!(
        "unknown command {number} (id {}, {} payload bytes) refused",
        request.header.id, request.payload_len
    );
    if session.negotiated {
        Err(Errno::ENOTSUP)
    } else {
        Err(Errno::EINVAL)
    }
}

fn unsupported<'b>(command: Command, id: u16) -> Result<Reply<'b>, Errno> {
    warn!("unsupported command {command:?} (id {id}) refused");
    match command {
        // QEMU treats EINVAL from DEVICE_FEATURE as "feature not supported"
        // (QEMU's client, hw/vfio-user/), the answer we want for migration probes.
        Command::DeviceFeature => Err(Errno::EINVAL),
        _ => Err(Errno::ENOTSUP),
    }
}

fn version<'b>(session: &mut Session, request: &Request<'_>) -> Result<Reply<'b>, Errno> {
    let head = wire::Version::parse(request.payload).ok_or(Errno::EINVAL)?;
    if request.payload_len > request.payload.len() {
        warn!(
            "VERSION data of {} bytes refused",
            request.payload_len.saturating_sub(wire::VERSION_SIZE)
        );
        return Err(Errno::EINVAL);
    }
    if head.major != 0 {
        warn!("client protocol {}.{} refused", head.major, head.minor);
        return Err(Errno::ENOTSUP);
    }
    let data = request
        .payload
        .get(wire::VERSION_SIZE..)
        .unwrap_or_default();
    let offer: Offer = version::parse_offer(data).map_err(|e| {
        warn!("VERSION refused: {e}");
        Errno::EINVAL
    })?;
    let reply = version::reply_data(&offer);
    info!(
        "client protocol {}.{}, {} fds per message; answering 0.0 {}",
        head.major,
        head.minor,
        offer.max_msg_fds,
        String::from_utf8_lossy(reply.split_last().map_or(&[][..], |(_, json)| json))
    );
    session.negotiated = true;
    session.client_max_msg_fds = offer.max_msg_fds;
    // Major 0, minor 0: the only version there is (QEMU's vfio-user specification).
    let payload = wire::Encoder::with_capacity(wire::VERSION_SIZE.saturating_add(reply.len()))
        .u16(0)
        .u16(0)
        .bytes(&reply)
        .0;
    Ok(Reply::with(payload))
}

fn dma_map<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let map = wire::DmaMap::parse(request.payload).ok_or(Errno::EINVAL)?;
    if map.argsz < wire::DMA_MAP_SIZE as u32 {
        return Err(Errno::EINVAL);
    }
    let mut fds = request.fds;
    // The specification allows zero or one descriptor.
    if fds.len() > 1 {
        warn!("DMA_MAP with {} fds refused", fds.len());
        return Err(Errno::EINVAL);
    }
    let file = fds.pop().map(File::from);
    backend.dma_map(map.flags, map.offset, map.address, map.size, file)?;
    Ok(Reply::empty())
}

fn dma_unmap<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let unmap = wire::DmaUnmap::parse(request.payload).ok_or(Errno::EINVAL)?;
    if unmap.argsz < wire::DMA_UNMAP_SIZE as u32 {
        return Err(Errno::EINVAL);
    }
    backend.dma_unmap(unmap.flags, unmap.address, unmap.size)?;
    // The reply is the original entry; QEMU reads at most these 24 bytes.
    let echo = wire::DmaUnmap {
        argsz: wire::DMA_UNMAP_SIZE as u32,
        ..unmap
    };
    Ok(Reply::with(echo.encode()))
}

fn device_info<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let query = wire::DeviceInfo::parse(request.payload).ok_or(Errno::EINVAL)?;
    if query.argsz < wire::DEVICE_INFO_SIZE as u32 {
        return Err(Errno::EINVAL);
    }
    let reset = if backend.resettable() {
        VFIO_DEVICE_FLAGS_RESET
    } else {
        0
    };
    let info = wire::DeviceInfo {
        argsz: wire::DEVICE_INFO_SIZE as u32,
        flags: VFIO_DEVICE_FLAGS_PCI | reset,
        num_regions: u32::try_from(backend.regions().len()).map_err(|_| Errno::EOVERFLOW)?,
        num_irqs: u32::try_from(backend.irqs().len()).map_err(|_| Errno::EOVERFLOW)?,
    };
    Ok(Reply::with(info.encode()))
}

/// `DEVICE_GET_REGION_INFO`, with the `argsz` protocol QEMU relies on: a
/// region with capabilities always reports the full size it needs in
/// `argsz` (with `CAPS` and `cap_offset` = 32 already set, which QEMU's
/// bounds check accepts); the capabilities and the fd follow only once the
/// client's `argsz` can hold them.
fn region_info<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    session: &Session,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let query = wire::RegionInfoRequest::parse(request.payload).ok_or(Errno::EINVAL)?;
    if query.argsz < wire::REGION_INFO_SIZE as u32 {
        // Too small for even the fixed part, as for the kernel's ioctl.
        return Err(Errno::EINVAL);
    }
    let region = region_entry(backend.regions(), query.index)?;
    let mut info = region.region_info;
    let caps = if region.sparse_areas.is_empty() {
        Vec::new()
    } else {
        wire::sparse_mmap_capability(&region.sparse_areas).ok_or(Errno::EOVERFLOW)?
    };
    let needed = u32::try_from(wire::REGION_INFO_SIZE.saturating_add(caps.len()))
        .map_err(|_| Errno::EOVERFLOW)?;
    info.index = query.index;
    info.argsz = needed;
    info.cap_offset = 0;
    if !caps.is_empty() {
        info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        info.cap_offset = wire::REGION_INFO_SIZE as u32;
    }
    let complete = query.argsz >= needed;
    let mut payload = wire::encode_region_info(&info);
    if complete {
        payload = payload.bytes(&caps);
    }
    // The fd is useless without the areas it backs, and a client that
    // cannot receive fds must not get one.
    let fd = region
        .mmap_fd
        .as_ref()
        .filter(|_| complete && session.client_max_msg_fds >= 1)
        .map(AsFd::as_fd);
    debug!(
        "region {} info: argsz {} of {needed}, {} cap bytes, fd {}",
        query.index,
        query.argsz,
        if complete { caps.len() } else { 0 },
        fd.is_some()
    );
    Ok(Reply {
        payload: payload.0,
        fd,
    })
}

fn irq_info<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let query = wire::IrqInfo::parse(request.payload).ok_or(Errno::EINVAL)?;
    if query.argsz < wire::IRQ_INFO_SIZE as u32 {
        return Err(Errno::EINVAL);
    }
    let irq = usize::try_from(query.index)
        .ok()
        .and_then(|i| backend.irqs().get(i))
        .ok_or(Errno::EINVAL)?;
    let info = wire::IrqInfo {
        argsz: wire::IRQ_INFO_SIZE as u32,
        flags: irq.flags,
        index: query.index,
        count: irq.count,
    };
    Ok(Reply::with(info.encode()))
}

fn set_irqs<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let set = wire::IrqSet::parse(request.payload).ok_or(Errno::EINVAL)?;
    if set.argsz < wire::IRQ_SET_SIZE as u32 {
        return Err(Errno::EINVAL);
    }
    let irq = usize::try_from(set.index)
        .ok()
        .and_then(|i| backend.irqs().get(i))
        .ok_or(Errno::EINVAL)?;
    // Count 0 (disable the index) is always in range.
    let in_range = set
        .start
        .checked_add(set.count)
        .is_some_and(|end| end <= irq.count);
    if !in_range {
        warn!(
            "SET_IRQS index {} vectors {}+{} out of range",
            set.index, set.start, set.count
        );
        return Err(Errno::EINVAL);
    }
    let data = set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
    if data == VFIO_IRQ_SET_DATA_BOOL {
        // QEMU never sends BOOL data; its bytes were discarded unread.
        warn!("SET_IRQS with DATA_BOOL refused");
        return Err(Errno::EINVAL);
    }
    let fds = request.fds;
    let fd_count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    if fd_count > set.count || (fd_count > 0 && data != VFIO_IRQ_SET_DATA_EVENTFD) {
        warn!(
            "SET_IRQS index {} flags {:#x} count {} with {fd_count} fds refused",
            set.index, set.flags, set.count
        );
        return Err(Errno::EINVAL);
    }
    let files = fds.into_iter().map(File::from).collect();
    backend.set_irqs(set.index, set.flags, set.start, set.count, files)?;
    Ok(Reply::empty())
}

fn region_read<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let access = wire::RegionAccess::parse(request.payload).ok_or(Errno::EINVAL)?;
    check_access(backend.regions(), &access, VFIO_REGION_INFO_FLAG_READ)?;
    // Allocated only now: count is at most MAX_DATA_XFER_SIZE and in range.
    let len = usize::try_from(access.count).map_err(|_| Errno::EINVAL)?;
    let mut data = vec![0u8; len];
    backend.region_read(access.region, access.offset, &mut data)?;
    Ok(Reply::with(access.encode(len).bytes(&data).0))
}

fn region_write<'b, B: DeviceBackend + ?Sized>(
    backend: &'b mut B,
    request: &Request<'_>,
) -> Result<Reply<'b>, Errno> {
    let access = wire::RegionAccess::parse(request.payload).ok_or(Errno::EINVAL)?;
    let data = request
        .payload
        .get(wire::REGION_ACCESS_SIZE..)
        .unwrap_or_default();
    // The data must be exactly `count` bytes, all of them read (the limit
    // keeps a full MAX_DATA_XFER_SIZE write).
    let count = usize::try_from(access.count).map_err(|_| Errno::EINVAL)?;
    if request.payload_len != request.payload.len() || data.len() != count {
        warn!(
            "REGION_WRITE count {} with {} payload bytes refused",
            access.count, request.payload_len
        );
        return Err(Errno::EINVAL);
    }
    check_access(backend.regions(), &access, VFIO_REGION_INFO_FLAG_WRITE)?;
    backend.region_write(access.region, access.offset, data)?;
    Ok(Reply::with(access.encode(0).0))
}

fn reset<'b, B: DeviceBackend + ?Sized>(backend: &'b mut B) -> Result<Reply<'b>, Errno> {
    if !backend.resettable() {
        return Err(Errno::ENOTSUP);
    }
    backend.reset()?;
    Ok(Reply::empty())
}

fn region_entry(regions: &[RegionDescriptor], index: u32) -> Result<&RegionDescriptor, Errno> {
    usize::try_from(index)
        .ok()
        .and_then(|i| regions.get(i))
        .ok_or_else(|| {
            warn!("nonexistent region {index}");
            Errno::EINVAL
        })
}

/// The region exists, allows the access, and `[offset, offset + count)` lies
/// inside it; `count` is at most [`MAX_DATA_XFER_SIZE`].
fn check_access(
    regions: &[RegionDescriptor],
    access: &wire::RegionAccess,
    permission: u32,
) -> Result<(), Errno> {
    if access.count > MAX_DATA_XFER_SIZE {
        warn!(
            "access of {} bytes exceeds max_data_xfer_size",
            access.count
        );
        return Err(Errno::EINVAL);
    }
    let info = region_entry(regions, access.region)?.region_info;
    let in_range = access
        .offset
        .checked_add(u64::from(access.count))
        .is_some_and(|end| end <= info.size);
    if !in_range || info.flags & permission == 0 {
        warn!(
            "{}-byte access at {:#x} refused by region {} (size {:#x}, flags {:#x})",
            access.count, access.offset, access.region, info.size, info.flags
        );
        return Err(Errno::EINVAL);
    }
    Ok(())
}
