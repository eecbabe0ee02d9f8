//! The region and IRQ tables the server advertises (QEMU's vfio-user specification, VFIO_USER_DEVICE_GET_REGION_INFO, device-abi §1.6).
//!
//! Region indices follow the vfio PCI convention: BAR0-5 = 0-5, ROM = 6,
//! CONFIG = 7, VGA = 8. IRQ indices: INTX = 0, MSI = 1, MSIX = 2, ERR = 3,
//! REQ = 4. The server answers `GET_REGION_INFO`/`GET_IRQ_INFO` by position,
//! so entry `i` must describe index `i`.

use std::mem::size_of;
use std::os::fd::OwnedFd;

use log::warn;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::ftruncate;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_PCI_ROM_REGION_INDEX, VFIO_PCI_VGA_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    vfio_region_info, vfio_region_sparse_mmap_area,
};

use super::protocol::{IrqDescriptor, RegionDescriptor};
use crate::pci::ids;

/// A region index decoded into what it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// A base address register, 0..6.
    Bar(usize),
    /// The expansion ROM (absent).
    Rom,
    /// PCI configuration space.
    Config,
    /// Legacy VGA ranges (absent).
    Vga,
}

impl Region {
    /// Decodes a client-supplied region index; `None` if out of range.
    pub fn from_index(index: u32) -> Option<Self> {
        match index {
            VFIO_PCI_ROM_REGION_INDEX => Some(Self::Rom),
            VFIO_PCI_CONFIG_REGION_INDEX => Some(Self::Config),
            VFIO_PCI_VGA_REGION_INDEX => Some(Self::Vga),
            bar => usize::try_from(bar)
                .ok()
                .filter(|&bar| bar < ids::NUM_BARS)
                .map(Self::Bar),
        }
    }

    /// Size in bytes; 0 for regions the function does not implement.
    pub fn size(self) -> u64 {
        match self {
            Self::Bar(i) => ids::BAR_SIZES.get(i).copied().unwrap_or(0),
            Self::Config => ids::CONFIG_SPACE_SIZE as u64,
            Self::Rom | Self::Vga => 0,
        }
    }
}

// BAR indices must sit below the named regions for the decoding above.
const _: () = assert!(ids::NUM_BARS as u32 == VFIO_PCI_ROM_REGION_INDEX);

/// The file behind BAR1's mmap-able page: plain memory, sized to the whole BAR so the
/// page's file offset (its offset in the BAR) lies inside it.
fn reg_bar_page() -> Option<OwnedFd> {
    let fd = memfd_create(c"pvrdma-bar1", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| warn!("cannot create BAR1's mmap-able page: {e}"))
        .ok()?;
    let size = i64::try_from(ids::REG_BAR_SIZE).ok()?;
    ftruncate(&fd, size)
        .map_err(|e| warn!("cannot size BAR1's mmap-able page: {e}"))
        .ok()?;
    Some(fd)
}

/// The region table: one entry per vfio PCI region index. With `uar`, BAR2 is one mmap-able
/// area backed by that file (exit-free doorbells).
pub fn server_regions_with_uar(uar: Option<OwnedFd>) -> Vec<RegionDescriptor> {
    let mut regions = server_regions();
    if let Some(fd) = uar
        && let Some(region) = regions.get_mut(ids::UAR_BAR)
    {
        region.region_info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
        region.sparse_areas = vec![vfio_region_sparse_mmap_area {
            offset: 0,
            size: ids::UAR_BAR_SIZE,
        }];
        region.mmap_fd = Some(fd);
    }
    regions
}

/// The region table with every doorbell trapped.
pub fn server_regions() -> Vec<RegionDescriptor> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = Region::from_index(index).map_or(0, Region::size);
            let flags = if size == 0 {
                0
            } else {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            };
            RegionDescriptor {
                region_info: vfio_region_info {
                    argsz: size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .map(|mut region| {
            // One mmap-able page in BAR1 turns QEMU's posted writes off (see ids.rs); the
            // registers and every doorbell stay trapped. Without the page (memfd failed)
            // the device still works under x-no-posted-writes=on.
            if region.region_info.index as usize == ids::REG_BAR
                && let Some(fd) = reg_bar_page()
            {
                region.region_info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
                region.sparse_areas = vec![vfio_region_sparse_mmap_area {
                    offset: ids::REG_BAR_MMAP_OFFSET,
                    size: ids::REG_BAR_SIZE - ids::REG_BAR_MMAP_OFFSET,
                }];
                region.mmap_fd = Some(fd);
            }
            region
        })
        .collect()
}

/// The IRQ table: MSI-X with [`ids::MSIX_VECTORS`] vectors, nothing else.
///
/// MSI-X is advertised without `NORESIZE` so QEMU wires vectors one at a time
/// as the guest unmasks them. INTx has count 0 (the interrupt pin is 0 too),
/// and ERR/REQ have count 0, which QEMU accepts with a harmless warning.
pub fn server_irqs() -> Vec<IrqDescriptor> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            if index == VFIO_PCI_MSIX_IRQ_INDEX {
                IrqDescriptor {
                    index,
                    flags: VFIO_IRQ_INFO_EVENTFD,
                    count: u32::from(ids::MSIX_VECTORS),
                }
            } else {
                IrqDescriptor {
                    index,
                    flags: 0,
                    count: 0,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_table_layout() {
        let regions = server_regions();
        assert_eq!(regions.len(), 9);
        let expected_sizes = [16 * 1024, 8192, 2 * 1024 * 1024, 0, 0, 0, 0, 256, 0];
        for (i, (region, size)) in regions.iter().zip(expected_sizes).enumerate() {
            let info = region.region_info;
            assert_eq!(info.index as usize, i);
            assert_eq!(info.argsz, 32);
            assert_eq!(info.size, size, "region {i}");
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            if i == ids::REG_BAR {
                // BAR1's second page is mmap-able: that turns QEMU's posted writes off.
                assert_eq!(info.flags, rw | VFIO_REGION_INFO_FLAG_MMAP);
                assert_eq!(region.sparse_areas.len(), 1);
                assert_eq!(region.sparse_areas[0].offset, ids::REG_BAR_MMAP_OFFSET);
                assert_eq!(region.sparse_areas[0].size, 4096);
                assert!(region.mmap_fd.is_some());
                continue;
            }
            assert_eq!(info.flags, if size == 0 { 0 } else { rw }, "region {i}");
            assert!(region.sparse_areas.is_empty());
            assert!(region.mmap_fd.is_none());
        }
    }

    #[test]
    fn irq_table_layout() {
        let irqs = server_irqs();
        assert_eq!(irqs.len(), 5);
        for (i, irq) in irqs.iter().enumerate() {
            assert_eq!(irq.index as usize, i);
        }
        assert_eq!(irqs[2].count, 3);
        assert_eq!(irqs[2].flags, VFIO_IRQ_INFO_EVENTFD);
        for i in [0, 1, 3, 4] {
            assert_eq!(irqs[i].count, 0);
        }
    }

    #[test]
    fn region_decoding() {
        assert_eq!(Region::from_index(0), Some(Region::Bar(0)));
        assert_eq!(Region::from_index(5), Some(Region::Bar(5)));
        assert_eq!(Region::from_index(6), Some(Region::Rom));
        assert_eq!(Region::from_index(7), Some(Region::Config));
        assert_eq!(Region::from_index(8), Some(Region::Vga));
        assert_eq!(Region::from_index(9), None);
        assert_eq!(Region::from_index(u32::MAX), None);
    }
}
