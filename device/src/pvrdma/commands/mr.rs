//! Memory regions (CREATE_MR, DESTROY_MR): user MRs over a page directory, the kernel's DMA
//! MR, and fast-register MRs (device-abi §5.4, device-abi §10.3 rule 12).

use super::{Reply, Request, header_only, reply};
use crate::abi::{
    CreateMrRequest, CreateMrResponse, HandleRequest, MAX_FAST_REG_PAGES, MR_FLAG_DMA,
    MR_FLAG_FRMR, PAGE_SIZE, access,
};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{KERNEL_CONTEXT, Mr, MrKind};
use crate::pvrdma::pdir;
use crate::pvrdma::{PvrdmaDevice, errno};
use log::warn;
use pvrdma_backend::Network;

/// Access bits the device understands; higher "optional" IB bits are dropped.
const KNOWN_ACCESS: u32 = access::LOCAL_WRITE
    | access::REMOTE_WRITE
    | access::REMOTE_READ
    | access::REMOTE_ATOMIC
    | access::MW_BIND
    | access::ZERO_BASED
    | access::ON_DEMAND;

pub(super) fn create(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    request: &Request,
) -> Reply {
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
            on_host: false,
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
    let key = register_on_host(device, mem, net, handle).unwrap_or(key);
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

/// Registers user MR `handle` with the host's RDMA device when this guest's traffic can
/// take the rdma path (a GID of its port is on the host device), and gives it the host's
/// key: the guest then hands its peers a key their host devices understand, and posts its
/// own keys unchanged (docs/rdma-transport.md). `None`: the MR keeps the device's key.
fn register_on_host(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    handle: u32,
) -> Option<u32> {
    let host = net.host()?;
    let offered = device
        .objects
        .gids
        .iter()
        .flatten()
        .any(|gid| host.qps.offers(&gid.raw));
    if !offered {
        return None;
    }
    let mr = device.objects.mrs.get(handle)?;
    let MrKind::User {
        start,
        length,
        pages,
    } = &mr.kind
    else {
        return None;
    };
    let registered = host.qps.register(
        host.owner,
        mr.pd,
        mem,
        pages,
        PAGE_SIZE as usize,
        start % PAGE_SIZE,
        *length,
        *start,
        mr.access,
    );
    let key = match registered {
        Ok(region) => region.key,
        Err(e) => {
            warn!("rdma path: MR {handle} stays off the host device: {e}");
            return None;
        }
    };
    if device.objects.adopt_mr_key(handle, key) {
        Some(key)
    } else {
        warn!("rdma path: MR {handle}: the host key {key:#x} names another MR; not adopted");
        host.qps.deregister(host.owner, key);
        None
    }
}

pub(super) fn destroy(device: &mut PvrdmaDevice, net: &dyn Network, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    let mr = device.objects.remove_mr(req.handle).ok_or(errno::ENOENT)?;
    if mr.on_host
        && let Some(host) = net.host()
    {
        host.qps.deregister(host.owner, mr.rkey);
    }
    header_only()
}
