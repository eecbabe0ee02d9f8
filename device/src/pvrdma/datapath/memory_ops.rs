//! The memory management extensions (device-abi §6.4, device-abi §9.4): FAST_REG_MR and LOCAL_INV work requests,
//! and the remote invalidation SEND_WITH_INV carries. Only kernel QPs post them; the driver
//! offers them to kernel ULPs because `bmme_flags` has all three bits.

use crate::abi::{FastReg, PAGE_SHIFT, PAGE_SIZE};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{FastRegMapping, MrKind, Objects};
use crate::pvrdma::pdir;

/// Largest page a fast-register page list may name (2 MiB): bounds the 4 KiB pages one
/// registration expands to (128 × 512).
const MAX_PAGE_SHIFT: u32 = 21;

/// Why a memory operation failed; the requester reports LOC_PROT_ERR (bad key or PD) or
/// LOC_LEN_ERR (a page list that does not fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemOpError {
    Protection,
    Length,
}

/// Registers the buffer a FAST_REG_MR work request describes into the fast-register MR its
/// new rkey names (the rkey keeps the MR's index and changes the low "key" byte).
pub fn fast_register(
    objects: &mut Objects,
    mem: &GuestRam,
    pd: u32,
    wr: &FastReg,
) -> Result<(), MemOpError> {
    let Some(handle) = objects.mr_of_key(wr.rkey) else {
        return Err(MemOpError::Protection);
    };
    let max_pages = match objects.mrs.get(handle) {
        Some(mr) if mr.pd == pd => match mr.kind {
            MrKind::FastReg {
                max_pages,
                mapping: None,
            } => max_pages,
            // IB: a fast-register MR must be invalid before it is registered again.
            _ => return Err(MemOpError::Protection),
        },
        _ => return Err(MemOpError::Protection),
    };
    if !(PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&wr.page_shift)
        || wr.page_list_len == 0
        || wr.page_list_len > max_pages
    {
        return Err(MemOpError::Length);
    }
    let page_size = 1u64 << wr.page_shift;
    let length = u64::from(wr.length);
    // The registered range must not wrap past 2^64, as for any MR.
    wr.iova_start
        .checked_add(length)
        .ok_or(MemOpError::Length)?;
    // The buffer must fit the pages, counting the offset of the iova in its first page.
    if (wr.iova_start % page_size) + length > u64::from(wr.page_list_len) * page_size {
        return Err(MemOpError::Length);
    }
    let per_entry = page_size / PAGE_SIZE;
    let entries = pdir::resolve(mem, wr.pl_pdir_dma, u64::from(wr.page_list_len))
        .map_err(|_| MemOpError::Protection)?;
    if entries.iter().any(|entry| entry % page_size != 0) {
        return Err(MemOpError::Protection);
    }
    let pages: Vec<u64> = entries
        .iter()
        .flat_map(|entry| (0..per_entry).map(move |i| entry + i * PAGE_SIZE))
        .collect();
    objects
        .check_page_budget(pages.len() as u64)
        .map_err(|_| MemOpError::Length)?;
    // The first page of the expanded list must hold the iova's 4 KiB page.
    let skip =
        usize::try_from((wr.iova_start % page_size) / PAGE_SIZE).map_err(|_| MemOpError::Length)?;
    let pages = pages
        .get(skip..)
        .map(<[u64]>::to_vec)
        .ok_or(MemOpError::Length)?;
    let Some(mr) = objects.mrs.get_mut(handle) else {
        return Err(MemOpError::Protection);
    };
    mr.pages_held = pages.len() as u64;
    mr.kind = MrKind::FastReg {
        max_pages,
        mapping: Some(FastRegMapping {
            start: wr.iova_start,
            length,
            pages,
        }),
    };
    mr.access = wr.access_flags;
    mr.lkey = wr.rkey;
    mr.rkey = wr.rkey;
    Ok(())
}

/// Invalidates the fast-register MR named by `key` in `pd` (LOCAL_INV, or the rkey of a
/// SEND_WITH_INV at the responder).
pub fn invalidate(objects: &mut Objects, pd: u32, key: u32) -> Result<(), MemOpError> {
    let handle = objects.mr_of_key(key).unwrap_or(0);
    match objects.mrs.get_mut(handle) {
        Some(mr) if mr.pd == pd && (mr.lkey == key || mr.rkey == key) => match &mut mr.kind {
            MrKind::FastReg { mapping, .. } => {
                *mapping = None;
                mr.pages_held = 0;
                Ok(())
            }
            _ => Err(MemOpError::Protection),
        },
        _ => Err(MemOpError::Protection),
    }
}
