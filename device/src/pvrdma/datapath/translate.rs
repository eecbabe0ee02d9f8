//! Turning keys and addresses into scatter-gather lists over guest memory (device-abi §5.4 CREATE_MR
//! address translation, device-abi §10.3 rules 19–20). Every check a memory key implies is here.

use pvrdma_backend::Sgl;

use crate::abi::{PAGE_SIZE, Sge, access};
use crate::pvrdma::objects::{Mr, MrKind, Objects};

/// Why a key or range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// No MR with that key, or it belongs to another PD.
    BadKey,
    /// The MR lacks the access the operation needs.
    NoAccess,
    /// The range is not inside the MR.
    OutOfBounds,
}

/// The MR named by `key` (an lkey or rkey) in protection domain `pd`.
fn lookup(objects: &Objects, pd: u32, key: u32, remote: bool) -> Result<&Mr, KeyError> {
    let mr = objects
        .mr_of_key(key)
        .and_then(|handle| objects.mrs.get(handle))
        .ok_or(KeyError::BadKey)?;
    let matches = if remote {
        mr.rkey == key
    } else {
        mr.lkey == key
    };
    if !matches || mr.pd != pd {
        return Err(KeyError::BadKey);
    }
    Ok(mr)
}

/// Appends `[addr, addr + len)` of `mr` to `sgl`.
fn append(mr: &Mr, addr: u64, len: u64, sgl: &mut Sgl) -> Result<(), KeyError> {
    match &mr.kind {
        // The kernel's DMA MR: addresses are guest-physical; the copy checks they are RAM.
        MrKind::Dma => sgl.push(addr, len).ok_or(KeyError::OutOfBounds),
        MrKind::User {
            start,
            length,
            pages,
        } => append_pages(*start, *length, pages, addr, len, sgl),
        MrKind::FastReg {
            mapping: Some(m), ..
        } => append_pages(m.start, m.length, &m.pages, addr, len, sgl),
        // Not registered, or invalidated: no access at all.
        MrKind::FastReg { mapping: None, .. } => Err(KeyError::BadKey),
    }
}

/// `[addr, addr + len)` of a buffer that starts at `start` (a virtual address or iova) and
/// whose 4 KiB pages are `pages`, the first holding `start` (device-abi §5.4 address translation).
fn append_pages(
    start: u64,
    length: u64,
    pages: &[u64],
    addr: u64,
    len: u64,
    sgl: &mut Sgl,
) -> Result<(), KeyError> {
    let end = addr.checked_add(len).ok_or(KeyError::OutOfBounds)?;
    if addr < start || end > start.saturating_add(length) {
        return Err(KeyError::OutOfBounds);
    }
    let mut offset = addr - start + start % PAGE_SIZE;
    let mut left = len;
    // One segment per page at most; reserving up front saves the growth reallocations
    // (capped: a hostile length must not make us reserve much).
    sgl.reserve(usize::try_from((len / PAGE_SIZE).saturating_add(2).min(1024)).unwrap_or(1024));
    while left > 0 {
        let index = usize::try_from(offset / PAGE_SIZE).map_err(|_| KeyError::OutOfBounds)?;
        let page = pages.get(index).ok_or(KeyError::OutOfBounds)?;
        let in_page = (PAGE_SIZE - offset % PAGE_SIZE).min(left);
        sgl.push(page + offset % PAGE_SIZE, in_page)
            .ok_or(KeyError::OutOfBounds)?;
        offset += in_page;
        left -= in_page;
    }
    Ok(())
}

/// The local scatter-gather list of a work request. `write` says whether the device will
/// write through it (receives, RDMA READ and atomic replies), which needs LOCAL_WRITE.
pub fn local(objects: &Objects, pd: u32, sges: &[Sge], write: bool) -> Result<Sgl, KeyError> {
    let mut sgl = Sgl::new();
    for sge in sges {
        if sge.length == 0 {
            continue;
        }
        let mr = lookup(objects, pd, sge.lkey, false)?;
        if write && mr.access & access::LOCAL_WRITE == 0 {
            return Err(KeyError::NoAccess);
        }
        append(mr, sge.addr, u64::from(sge.length), &mut sgl)?;
    }
    Ok(sgl)
}

/// The range a remote request names through `rkey`, which must grant `needed` access.
pub fn remote(
    objects: &Objects,
    pd: u32,
    rkey: u32,
    addr: u64,
    len: u64,
    needed: u32,
) -> Result<Sgl, KeyError> {
    let mr = lookup(objects, pd, rkey, true)?;
    if mr.access & needed != needed {
        return Err(KeyError::NoAccess);
    }
    let mut sgl = Sgl::new();
    if len > 0 {
        append(mr, addr, len, &mut sgl)?;
    }
    Ok(sgl)
}
