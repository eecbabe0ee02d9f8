//! `SET_IRQS` handling and the MSI-X eventfd table (QEMU's vfio-user specification, VFIO_USER_DEVICE_SET_IRQS).
//!
//! QEMU emulates the MSI-X table itself and hands us one eventfd per vector;
//! writing 1 to it raises the guest interrupt (under KVM, as an irqfd). The
//! function has no INTx, MSI, ERR or REQ vectors.

use std::fs::File;
use std::io::{self, Write};

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
};

use crate::pci::ids;

const VECTORS: usize = ids::MSIX_VECTORS as usize;

/// Errors from `SET_IRQS` requests.
#[derive(Debug, Error)]
pub enum IrqError {
    /// No such IRQ index.
    #[error("IRQ index {0} does not exist")]
    UnknownIndex(u32),
    /// Not exactly one data type and one action, or unknown bits.
    #[error("SET_IRQS flags {0:#x} do not name exactly one data type and one action")]
    Flags(u32),
    /// The vector range is outside the index.
    #[error("IRQ index {index} has no vectors {start}..{start}+{count}")]
    OutOfRange {
        /// IRQ index.
        index: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
    },
    /// Eventfds were sent, but not one per vector.
    #[error("SET_IRQS carries {fds} eventfds for {count} vectors")]
    FdCount {
        /// Number of fds received.
        fds: usize,
        /// Number of vectors named.
        count: u32,
    },
    /// A valid combination the function does not implement.
    #[error("IRQ index {index} does not support SET_IRQS flags {flags:#x}")]
    Unsupported {
        /// IRQ index.
        index: u32,
        /// The request flags.
        flags: u32,
    },
    /// An fd sent for a vector is not an eventfd (a pipe could block the writer, a file
    /// would grow): refused, so signalling never blocks and never writes anything else.
    #[error("the fd for MSI-X vector {vector} is {what}, not an eventfd")]
    NotAnEventfd {
        /// The vector.
        vector: u32,
        /// What the fd is instead.
        what: String,
    },
    /// Writing an eventfd failed (EAGAIN: its counter is full, the client never reads it).
    #[error("cannot signal MSI-X vector {vector}")]
    Signal {
        /// The vector.
        vector: u16,
        /// The write error.
        #[source]
        source: io::Error,
    },
}

impl IrqError {
    /// The errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Signal { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::Unsupported { .. } => libc::ENOTSUP,
            Self::UnknownIndex(_)
            | Self::Flags(_)
            | Self::OutOfRange { .. }
            | Self::FdCount { .. }
            | Self::NotAnEventfd { .. } => libc::EINVAL,
        }
    }
}

/// The data part of `SET_IRQS` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Data {
    None,
    Bool,
    Eventfd,
}

/// The action part of `SET_IRQS` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Mask,
    Unmask,
    Trigger,
}

fn decode_flags(flags: u32) -> Result<(Data, Action), IrqError> {
    if flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 {
        return Err(IrqError::Flags(flags));
    }
    let data = match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
        VFIO_IRQ_SET_DATA_NONE => Data::None,
        VFIO_IRQ_SET_DATA_BOOL => Data::Bool,
        VFIO_IRQ_SET_DATA_EVENTFD => Data::Eventfd,
        _ => return Err(IrqError::Flags(flags)),
    };
    let action = match flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
        VFIO_IRQ_SET_ACTION_MASK => Action::Mask,
        VFIO_IRQ_SET_ACTION_UNMASK => Action::Unmask,
        VFIO_IRQ_SET_ACTION_TRIGGER => Action::Trigger,
        _ => return Err(IrqError::Flags(flags)),
    };
    Ok((data, action))
}

/// What a successful `SET_IRQS` changed, for logging.
#[derive(Debug, PartialEq, Eq)]
pub enum IrqUpdate {
    /// Nothing to do (e.g. disabling an index without vectors).
    Unchanged,
    /// MSI-X disabled; this many eventfds were released.
    Disabled(usize),
    /// Eventfds installed for vectors `start..start + count`.
    Assigned {
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
    },
    /// Eventfds released for vectors `start..start + count`.
    Deassigned {
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
    },
    /// Vectors `start..start + count` fired by software; `signalled` of them
    /// had an eventfd.
    Triggered {
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// Vectors that had an eventfd.
        signalled: usize,
    },
}

/// The MSI-X eventfds, one optional slot per vector.
#[derive(Debug)]
pub struct MsixEventfds {
    vectors: [Option<File>; VECTORS],
}

impl Default for MsixEventfds {
    fn default() -> Self {
        Self::new()
    }
}

impl MsixEventfds {
    /// A table with no eventfds.
    pub fn new() -> Self {
        Self {
            vectors: std::array::from_fn(|_| None),
        }
    }

    /// Applies a `SET_IRQS` request. `fds` may hold fewer fds than `count`:
    /// QEMU sends an all-invalid chunk as "no fds", which means de-assign.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<IrqUpdate, IrqError> {
        if index >= VFIO_PCI_NUM_IRQS {
            return Err(IrqError::UnknownIndex(index));
        }
        let (data, action) = decode_flags(flags)?;
        if data == Data::Bool {
            // Unused by QEMU; the crate already refuses it.
            return Err(IrqError::Unsupported { index, flags });
        }
        if count == 0 && !fds.is_empty() {
            return Err(IrqError::FdCount {
                fds: fds.len(),
                count,
            });
        }
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // Indices without vectors: only "disable" (count 0) is meaningful.
            return if count == 0 {
                Ok(IrqUpdate::Unchanged)
            } else {
                Err(IrqError::OutOfRange {
                    index,
                    start,
                    count,
                })
            };
        }
        if action != Action::Trigger {
            // QEMU masks vectors in its emulated MSI-X table; like the
            // kernel's vfio-pci, the server has no per-vector mask.
            return Err(IrqError::Unsupported { index, flags });
        }
        if count == 0 {
            return Ok(if data == Data::None {
                IrqUpdate::Disabled(self.clear())
            } else {
                IrqUpdate::Unchanged
            });
        }
        let out_of_range = || IrqError::OutOfRange {
            index,
            start,
            count,
        };
        let range = vector_range(start, count)
            .filter(|range| range.end <= VECTORS)
            .ok_or_else(out_of_range)?;

        match data {
            Data::None => {
                // DATA_NONE + TRIGGER fires the vectors, as vfio-pci does.
                let mut signalled = 0;
                for slot in range {
                    if self.signal_slot(slot)? {
                        signalled += 1;
                    }
                }
                Ok(IrqUpdate::Triggered {
                    start,
                    count,
                    signalled,
                })
            }
            Data::Eventfd => {
                let slots = self.vectors.get_mut(range).ok_or_else(out_of_range)?;
                if fds.is_empty() {
                    slots.iter_mut().for_each(|slot| *slot = None);
                    Ok(IrqUpdate::Deassigned { start, count })
                } else if fds.len() == slots.len() {
                    for (vector, fd) in (start..).zip(&fds) {
                        make_signallable(vector, fd)?;
                    }
                    for (slot, fd) in slots.iter_mut().zip(fds) {
                        *slot = Some(fd);
                    }
                    Ok(IrqUpdate::Assigned { start, count })
                } else {
                    // A partial set has no defined meaning on the wire (an
                    // invalid fd cannot be sent), so refuse rather than guess.
                    Err(IrqError::FdCount {
                        fds: fds.len(),
                        count,
                    })
                }
            }
            Data::Bool => Err(IrqError::Unsupported { index, flags }),
        }
    }

    /// Raises MSI-X `vector` if it has an eventfd; returns whether it had one.
    /// The device model calls this from whatever thread completes the work.
    pub fn signal(&self, vector: u16) -> Result<bool, IrqError> {
        self.signal_slot(usize::from(vector))
    }

    fn signal_slot(&self, slot: usize) -> Result<bool, IrqError> {
        let Some(Some(file)) = self.vectors.get(slot) else {
            return Ok(false);
        };
        // eventfd counters are native-endian u64s.
        let mut writer: &File = file;
        writer
            .write_all(&1u64.to_ne_bytes())
            .map_err(|source| IrqError::Signal {
                vector: u16::try_from(slot).unwrap_or(u16::MAX),
                source,
            })?;
        Ok(true)
    }

    /// Whether `vector` has an eventfd.
    pub fn is_assigned(&self, vector: u16) -> bool {
        matches!(self.vectors.get(usize::from(vector)), Some(Some(_)))
    }

    /// Releases every eventfd; returns how many there were.
    pub fn clear(&mut self) -> usize {
        self.vectors.iter_mut().filter_map(Option::take).count()
    }
}

/// Checks that `fd` is an eventfd and makes writes to it non-blocking, so that signalling
/// a vector can never stall the thread that completes work (an eventfd whose counter is
/// full answers EAGAIN instead of blocking until the client reads it).
fn make_signallable(vector: u32, fd: &File) -> Result<(), IrqError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::fd::AsRawFd;
    let not_eventfd = |what: String| IrqError::NotAnEventfd { vector, what };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| not_eventfd(format!("unknown ({e})")))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(not_eventfd(target.display().to_string()));
    }
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| not_eventfd(format!("unusable ({e})")))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| not_eventfd(format!("unusable ({e})")))?;
    Ok(())
}

/// `start..start + count` as slot indices, if it does not overflow.
fn vector_range(start: u32, count: u32) -> Option<std::ops::Range<usize>> {
    let end = start.checked_add(count)?;
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

#[cfg(test)]
mod tests;
