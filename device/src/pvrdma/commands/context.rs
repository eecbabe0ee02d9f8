//! User contexts (CREATE_UC, DESTROY_UC) and protection domains (CREATE_PD, DESTROY_PD).

use super::{Reply, Request, header_only, reply};
use crate::abi::{CreateUcRequest, HandleRequest, HandleResponse, version};
use crate::pvrdma::objects::{Context, KERNEL_CONTEXT, Pd};
use crate::pvrdma::{PvrdmaDevice, errno};

pub(super) fn create_uc(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: CreateUcRequest = request.parse();
    let shared = device.shared.as_ref().ok_or(errno::EPERM)?;
    let pfn = if shared.driver_version >= version::PPN64 {
        req.pfn64
    } else {
        req.pfn64 & u64::from(u32::MAX)
    };
    // The page must be one of BAR2's user pages (page 0 is the kernel's).
    let index = pfn.checked_sub(shared.uar_pfn).ok_or(errno::EINVAL)?;
    let index = u32::try_from(index)
        .ok()
        .filter(|i| (1..device.limits().max_uar).contains(i))
        .ok_or(errno::EINVAL)?;
    if device
        .objects
        .contexts
        .iter()
        .any(|(_, ctx)| ctx.uar_index == index)
    {
        return Err(errno::EBUSY);
    }
    let handle = device
        .objects
        .contexts
        .insert(Context { uar_index: index })
        .ok_or(errno::ENOMEM)?;
    reply(&HandleResponse {
        handle,
        ..Default::default()
    })
}

pub(super) fn destroy_uc(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    device
        .objects
        .contexts
        .get(req.handle)
        .ok_or(errno::ENOENT)?;
    if device.objects.context_in_use(req.handle) {
        return Err(errno::EBUSY);
    }
    device.objects.contexts.remove(req.handle);
    header_only()
}

pub(super) fn create_pd(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    let ctx = req.handle;
    if ctx != KERNEL_CONTEXT && device.objects.contexts.get(ctx).is_none() {
        return Err(errno::ENOENT);
    }
    let handle = device.objects.pds.insert(Pd { ctx }).ok_or(errno::ENOMEM)?;
    reply(&HandleResponse {
        handle,
        ..Default::default()
    })
}

pub(super) fn destroy_pd(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    device.objects.pds.get(req.handle).ok_or(errno::ENOENT)?;
    if device.objects.pd_in_use(req.handle) {
        return Err(errno::EBUSY);
    }
    device.objects.pds.remove(req.handle);
    header_only()
}
