//! Loading the Device Shared Region on the DSRHIGH write (device-abi §3, device-abi §10.3 rules 2–5).

use super::memory::{self, GuestFault, GuestRam};
use super::pdir::{self, PdirError};
use super::ring::{Indices, Ring};
use super::{DeviceConfig, caps};
use crate::abi::{self, Dsr, PAGE_SIZE};

/// What the device keeps from a DSR: it never reads the DSR again (rule 5).
#[derive(Debug)]
pub struct SharedRegion {
    pub driver_version: u32,
    pub cmd_slot: u64,
    pub resp_slot: u64,
    pub async_ring: Ring,
    pub cq_notify_ring: Ring,
    /// Page frame number of UAR page 0 (BAR2 in guest physical space).
    pub uar_pfn: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DsrError {
    #[error("the DSR address is not page-aligned")]
    Misaligned,
    #[error("the {0} slot at {1:#x} is not a page of guest RAM")]
    BadSlot(&'static str, u64),
    #[error("the {0} ring has {1} pages; 2 to 512 are allowed")]
    BadRingPages(&'static str, u32),
    #[error("the {0} ring's page directory: {1}")]
    BadRing(&'static str, PdirError),
    #[error("the {0} ring's state is invalid")]
    BadRingState(&'static str),
    #[error(transparent)]
    Fault(#[from] GuestFault),
}

impl SharedRegion {
    /// Reads and validates the DSR at `addr`, maps its slots and rings, then writes the
    /// capabilities into it.
    pub fn load(
        mem: &GuestRam,
        addr: u64,
        config: &DeviceConfig,
    ) -> Result<SharedRegion, DsrError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(DsrError::Misaligned);
        }
        let dsr: Dsr = memory::read(mem, addr)?;
        let slot = |name, slot: u64| -> Result<u64, DsrError> {
            let mut page = [0u8; PAGE_SIZE as usize];
            if !slot.is_multiple_of(PAGE_SIZE) || memory::read_bytes(mem, slot, &mut page).is_err()
            {
                return Err(DsrError::BadSlot(name, slot));
            }
            Ok(slot)
        };
        let cmd_slot = slot("command", dsr.cmd_slot_dma)?;
        let resp_slot = slot("response", dsr.resp_slot_dma)?;
        let async_ring = device_ring(mem, "async event", &dsr.async_ring_pages, abi::EQE_SIZE)?;
        let cq_notify_ring =
            device_ring(mem, "CQ notification", &dsr.cq_ring_pages, abi::CQNE_SIZE)?;
        let uar_pfn = if dsr.driver_version >= abi::version::PPN64 {
            dsr.uar_pfn64
        } else {
            dsr.uar_pfn64 & u64::from(u32::MAX)
        };
        let caps = caps::device_caps(&config.limits, config.node_guid);
        memory::write(mem, addr + abi::DSR_CAPS_OFFSET, &caps)?;
        Ok(SharedRegion {
            driver_version: dsr.driver_version,
            cmd_slot,
            resp_slot,
            async_ring,
            cq_notify_ring,
            uar_pfn,
        })
    }
}

/// One of the two device-produced rings: page 0 of its directory is the ring state (the
/// device produces at offset 8), the rest hold elements of `elem_size` bytes.
fn device_ring(
    mem: &GuestRam,
    name: &'static str,
    pages: &abi::RingPages,
    elem_size: u64,
) -> Result<Ring, DsrError> {
    if !(2..=512).contains(&pages.num_pages) {
        return Err(DsrError::BadRingPages(name, pages.num_pages));
    }
    let resolved = pdir::resolve(mem, pages.pdir_dma, u64::from(pages.num_pages))
        .map_err(|e| DsrError::BadRing(name, e))?;
    let data_pages = u64::from(pages.num_pages - 1);
    // The driver's own formula: (num_pages - 1) * PAGE_SIZE / element size.
    let max = u32::try_from(data_pages * PAGE_SIZE / elem_size)
        .map_err(|_| DsrError::BadRingPages(name, pages.num_pages))?;
    let indices = Indices::new(max).ok_or(DsrError::BadRingPages(name, pages.num_pages))?;
    let state = resolved[0] + abi::RING_STATE_RX;
    let mut ring = Ring::new(indices, state, resolved[1..].to_vec(), elem_size)
        .ok_or(DsrError::BadRingPages(name, pages.num_pages))?;
    ring.adopt_producer(mem)
        .map_err(|_| DsrError::BadRingState(name))?;
    Ok(ring)
}
