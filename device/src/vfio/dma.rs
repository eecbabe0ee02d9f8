//! The table of DMA windows the client has mapped (QEMU's vfio-user specification, VFIO_USER_DMA_MAP).
//!
//! Each window is a guest-physical range `[address, address + size)` backed,
//! when the client sent one, by a file descriptor at `offset`. This layer only
//! keeps the windows and their files; `guest_ram` maps them into our address space.

use std::collections::BTreeMap;
use std::fs::File;

use thiserror::Error;
use vfio_bindings::bindings::vfio::VFIO_DMA_UNMAP_FLAG_ALL;
use vfio_user::DmaMapFlags;

/// Most windows a client may keep mapped, advertised as `max_dma_maps`. QEMU maps a
/// guest's RAM and ROMs in a handful of windows; each read-write window holds two file
/// descriptors (the table's and the mapping's), so the cap bounds what one client can
/// take of the process's descriptors, leaving room for every other device (the server
/// raises its descriptor limit to match at start-up).
pub const MAX_WINDOWS: usize = 256;

/// Errors from DMA map and unmap requests.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DmaError {
    /// The window has no bytes.
    #[error("DMA window at {address:#x} has size 0")]
    Empty {
        /// Start of the rejected window.
        address: u64,
    },
    /// `address + size` or `offset + size` does not fit in 64 bits.
    #[error("DMA window {address:#x}+{size:#x} (file offset {offset:#x}) wraps around")]
    Wraps {
        /// Start of the rejected window.
        address: u64,
        /// Size of the rejected window.
        size: u64,
        /// File offset of the rejected window.
        offset: u64,
    },
    /// Flags other than READ and WRITE.
    #[error("unsupported DMA map flags {0:#x}")]
    MapFlags(u32),
    /// The window intersects one that is already mapped.
    #[error(
        "DMA window {address:#x}+{size:#x} overlaps mapped window {existing:#x}+{existing_size:#x}"
    )]
    Overlap {
        /// Start of the rejected window.
        address: u64,
        /// Size of the rejected window.
        size: u64,
        /// Start of the window it overlaps.
        existing: u64,
        /// Size of the window it overlaps.
        existing_size: u64,
    },
    /// The table is full.
    #[error("too many DMA windows (at most {MAX_WINDOWS})")]
    TooMany,
    /// An unmap that does not name a mapped window exactly.
    #[error("no DMA window is mapped at exactly {address:#x}+{size:#x}")]
    NotMapped {
        /// Start of the requested range.
        address: u64,
        /// Size of the requested range.
        size: u64,
    },
    /// Dirty-page bitmaps, vaddr updates or unknown unmap flags.
    #[error("unsupported DMA unmap flags {0:#x}")]
    UnmapFlags(u32),
    /// The window's fd is not a regular file (a pipe, a socket, a device such as
    /// `/dev/null`): it cannot back guest RAM, and mapping it would fail or fault later.
    #[error("DMA window {address:#x}+{size:#x}: its fd is {kind}, not a regular file or memfd")]
    NotAFile {
        /// Start of the rejected window.
        address: u64,
        /// Size of the rejected window.
        size: u64,
        /// What the fd is.
        kind: &'static str,
    },
    /// The window reaches past the end of its file: touching that part would kill the
    /// process with SIGBUS.
    #[error(
        "DMA window {address:#x}+{size:#x} at file offset {offset:#x} needs {needed} bytes of \
         its file, which has {length}"
    )]
    FileTooShort {
        /// Start of the rejected window.
        address: u64,
        /// Size of the rejected window.
        size: u64,
        /// File offset of the rejected window.
        offset: u64,
        /// Bytes the window needs the file to have.
        needed: u64,
        /// Bytes the file has.
        length: u64,
    },
}

impl DmaError {
    /// The errno the vfio-user specification associates with the failure.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Overlap { .. } => libc::EEXIST,
            Self::NotMapped { .. } => libc::ENOENT,
            Self::TooMany => libc::ENOSPC,
            Self::UnmapFlags(_) => libc::ENOTSUP,
            Self::Empty { .. }
            | Self::Wraps { .. }
            | Self::MapFlags(_)
            | Self::NotAFile { .. }
            | Self::FileTooShort { .. } => libc::EINVAL,
        }
    }
}

/// Refuses a backing fd that cannot hold the window: anything but a regular file (memfds
/// are regular files), or a file shorter than the window's last byte. A window that shrinks
/// after this check is caught by `memory_fault` instead.
fn check_backing(
    file: &File,
    address: u64,
    size: u64,
    offset: u64,
    last_file_byte: u64,
) -> Result<(), DmaError> {
    let not_a_file = |kind| DmaError::NotAFile {
        address,
        size,
        kind,
    };
    let metadata = file.metadata().map_err(|_| not_a_file("unreadable"))?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        return Err(not_a_file(if kind.is_fifo() {
            "a pipe"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        }));
    }
    // last_file_byte + 1 cannot wrap: `map` checked offset + size - 1 and size >= 1, but a
    // window ending at u64::MAX is no file's anyway.
    let needed = last_file_byte.saturating_add(1);
    if metadata.len() < needed {
        return Err(DmaError::FileTooShort {
            address,
            size,
            offset,
            needed,
            length: metadata.len(),
        });
    }
    Ok(())
}

/// One DMA window.
#[derive(Debug)]
pub struct DmaWindow {
    /// Guest-physical start.
    pub address: u64,
    /// Length in bytes, never 0.
    pub size: u64,
    /// Offset of `address` within `file`.
    pub offset: u64,
    /// Whether the device may read guest memory through the window.
    pub readable: bool,
    /// Whether the device may write guest memory through the window.
    pub writable: bool,
    /// Backing file. `None` for ROM-like ranges QEMU cannot share; the device
    /// cannot reach those (the crate has no DMA_READ/WRITE messages).
    pub file: Option<File>,
}

impl DmaWindow {
    /// Last guest-physical byte of the window (inclusive, so a window ending
    /// at the top of the address space is representable).
    pub fn last(&self) -> u64 {
        self.address.saturating_add(self.size.saturating_sub(1))
    }
}

/// What an unmap request removed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmapped {
    /// One exactly matching window.
    One,
    /// Every window, via `VFIO_DMA_UNMAP_FLAG_ALL`; the count removed.
    All(usize),
}

/// Non-overlapping DMA windows keyed by start address.
#[derive(Debug, Default)]
pub struct DmaWindows {
    windows: BTreeMap<u64, DmaWindow>,
}

impl DmaWindows {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and records a window from a `DMA_MAP` request.
    pub fn map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> Result<&DmaWindow, DmaError> {
        let extra = flags.bits() & !DmaMapFlags::READ_WRITE.bits();
        if extra != 0 {
            return Err(DmaError::MapFlags(flags.bits()));
        }
        let last_offset = size.checked_sub(1).ok_or(DmaError::Empty { address })?;
        let wraps = || DmaError::Wraps {
            address,
            size,
            offset,
        };
        let last = address.checked_add(last_offset).ok_or_else(wraps)?;
        let last_file_byte = offset.checked_add(last_offset).ok_or_else(wraps)?;
        let readable = flags.contains(DmaMapFlags::READ);
        let writable = flags.contains(DmaMapFlags::WRITE);
        // Only read-write windows become guest RAM (guest_ram.rs); the fd of any other is
        // closed at once, so windows the device never maps hold no descriptor.
        let file = file.filter(|_| readable && writable);
        if let Some(file) = &file {
            check_backing(file, address, size, offset, last_file_byte)?;
        }

        // Windows are disjoint and sorted, so the only candidate overlap is
        // the one with the greatest start not after our last byte.
        if let Some(existing) = self.windows.range(..=last).next_back().map(|(_, w)| w)
            && existing.last() >= address
        {
            return Err(DmaError::Overlap {
                address,
                size,
                existing: existing.address,
                existing_size: existing.size,
            });
        }
        if self.windows.len() >= MAX_WINDOWS {
            return Err(DmaError::TooMany);
        }

        let window = DmaWindow {
            address,
            size,
            offset,
            readable,
            writable,
            file,
        };
        Ok(self.windows.entry(address).or_insert(window))
    }

    /// Handles a `DMA_UNMAP` request.
    ///
    /// `raw_flags` are the wire bits: the crate's `DmaUnmapFlags` names are
    /// wrong (docs/vfio-user-server.md, the crate's bugs bug D), so bit 1 (value 2) is "unmap all",
    /// as in `<linux/vfio.h>` and QEMU.
    pub fn unmap(&mut self, raw_flags: u32, address: u64, size: u64) -> Result<Unmapped, DmaError> {
        // Dirty bitmaps (migration) and vaddr updates are not supported; QEMU
        // 11.1.3 sends neither.
        if raw_flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(DmaError::UnmapFlags(raw_flags));
        }
        if raw_flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Ok(Unmapped::All(self.clear()));
        }
        match self.windows.get(&address) {
            Some(window) if window.size == size => {
                self.windows.remove(&address);
                Ok(Unmapped::One)
            }
            _ => Err(DmaError::NotMapped { address, size }),
        }
    }

    /// Drops every window (and closes its file); returns how many there were.
    pub fn clear(&mut self) -> usize {
        let count = self.windows.len();
        self.windows.clear();
        count
    }

    /// The window containing guest-physical `address`, if any.
    pub fn find(&self, address: u64) -> Option<&DmaWindow> {
        self.windows
            .range(..=address)
            .next_back()
            .map(|(_, w)| w)
            .filter(|w| w.last() >= address)
    }

    /// Number of mapped windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no window is mapped.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The windows in address order.
    pub fn iter(&self) -> impl Iterator<Item = &DmaWindow> {
        self.windows.values()
    }
}

#[cfg(test)]
mod tests;
