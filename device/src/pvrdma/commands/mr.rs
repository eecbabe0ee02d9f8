//! Memory regions (CREATE_MR, DESTROY_MR): user MRs over a page directory, the kernel's DMA
//! MR, and fast-register MRs (§5.4, §10.3 rule 12).

use super::{Reply, Request, header_only, reply};
use crate::abi::{
    CreateMrRequest, CreateMrResponse, HandleRequest, MAX_FAST_REG_PAGES, MR_FLAG_DMA,
    MR_FLAG_FRMR, PAGE_SIZE, access,
};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{KERNEL_CONTEXT, Mr, MrKind};
use crate::pvrdma::pdir;
use crate::pvrdma::{PvrdmaDevice, errno};

/// Access bits the device understands; higher "optional" IB bits are dropped.
const KNOWN_ACCESS: u32 = access::LOCAL_WRITE
    | access::REMOTE_WRITE
    | access::REMOTE_READ
    | access::REMOTE_ATOMIC
    | access::MW_BIND
    | access::ZERO_BASED
    | access::ON_DEMAND;

pub(super) fn create(device: &mut PvrdmaDevice, mem: &GuestRam, request: &Request) -> Reply {
    let req: CreateMrRequest = request.parse();
    let pd_ctx = device
        .objects
        .pd_context(req.pd_handle)
        .ok_or(errno::ENOENT)?;
    let access = req.access_flags & KNOWN_ACCESS;
    let kind = match req.flags {
        0 => user_mr(device, mem, &req)?,
        // A DMA MR reaches all of guest RAM: only the kernel gets one, as the driver does.
        MR_FLAG_DMA if pd_ctx == KERNEL_CONTEXT && access == access::LOCAL_WRITE => MrKind::Dma,
        MR_FLAG_FRMR if (1..=MAX_FAST_REG_PAGES).contains(&req.nchunks) => MrKind::FastReg {
            max_pages: req.nchunks,
            mapping: None,
        },
        _ => return Err(errno::EINVAL),
    };
    let objects = &mut device.objects;
    let handle = objects
        .mrs
        .insert(Mr {
            pages_held: match &kind {
                MrKind::User { pages, .. } => pages.len() as u64,
                MrKind::Dma | MrKind::FastReg { .. } => 0,
            },
            pd: req.pd_handle,
            access,
            lkey: 0,
            rkey: 0,
            kind,
        })
        .ok_or(errno::ENOMEM)?;
    // An unpredictable key (consumers of fast-register MRs change its low byte): a peer
    // that may use one MR of a PD cannot guess the others' keys, and a recreated MR never
    // answers to a stale key.
    let key = objects.new_mr_key(handle);
    if let Some(mr) = objects.mrs.get_mut(handle) {
        mr.lkey = key;
        mr.rkey = key;
    }
    reply(&CreateMrResponse {
        mr_handle: handle,
        lkey: key,
        rkey: key,
        ..Default::default()
    })
}

fn user_mr(device: &PvrdmaDevice, mem: &GuestRam, req: &CreateMrRequest) -> Result<MrKind, u32> {
    if req.length == 0 || req.length > device.limits().max_mr_size {
        return Err(errno::EINVAL);
    }
    let span = (req.start % PAGE_SIZE)
        .checked_add(req.length)
        .ok_or(errno::EINVAL)?;
    if u64::from(req.nchunks) != span.div_ceil(PAGE_SIZE) {
        return Err(errno::EINVAL);
    }
    req.start.checked_add(req.length).ok_or(errno::EINVAL)?;
    device.objects.check_page_budget(u64::from(req.nchunks))?;
    let pages =
        pdir::resolve(mem, req.pdir_dma, u64::from(req.nchunks)).map_err(|_| errno::EFAULT)?;
    Ok(MrKind::User {
        start: req.start,
        length: req.length,
        pages,
    })
}

pub(super) fn destroy(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    device.objects.remove_mr(req.handle).ok_or(errno::ENOENT)?;
    header_only()
}
