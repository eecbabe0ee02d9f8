//! Completion queues (CREATE_CQ, DESTROY_CQ; RESIZE_CQ is refused: no driver sends it).

use super::{Reply, Request, header_only, pages_for, reply, valid_queue_size};
use crate::abi::{
    CQE_SIZE, CreateCqRequest, HandleRequest, HandleResponse, RING_STATE_RX, pdir as pdir_limits,
};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{Arm, Cq, KERNEL_CONTEXT};
use crate::pvrdma::pdir;
use crate::pvrdma::ring::{Indices, Ring};
use crate::pvrdma::{PvrdmaDevice, errno};

pub(super) fn create(device: &mut PvrdmaDevice, mem: &GuestRam, request: &Request) -> Reply {
    let req: CreateCqRequest = request.parse();
    if req.ctx_handle != KERNEL_CONTEXT && device.objects.contexts.get(req.ctx_handle).is_none() {
        return Err(errno::ENOENT);
    }
    if !valid_queue_size(req.cqe, device.limits().max_cqe) {
        return Err(errno::EINVAL);
    }
    let needed = 1 + pages_for(req.cqe, CQE_SIZE);
    let nchunks = u64::from(req.nchunks);
    if nchunks < needed || nchunks > pdir_limits::MAX_PAGES {
        return Err(errno::EINVAL);
    }
    device.objects.check_page_budget(nchunks)?;
    let pages = pdir::resolve(mem, req.pdir_dma, nchunks).map_err(|_| errno::EFAULT)?;
    let indices = Indices::new(req.cqe).ok_or(errno::EINVAL)?;
    let mut ring = Ring::new(
        indices,
        pages[0] + RING_STATE_RX,
        pages[1..].to_vec(),
        CQE_SIZE,
    )
    .ok_or(errno::EINVAL)?;
    ring.adopt_producer(mem).map_err(|_| errno::EINVAL)?;
    let cq = Cq {
        pages_held: nchunks,
        ctx: req.ctx_handle,
        ring,
        arm: Arm::Disarmed,
        broken: false,
    };
    let handle = device.objects.cqs.insert(cq).ok_or(errno::ENOMEM)?;
    // The driver adopts the returned size as its ring size: return exactly what it asked.
    reply(&HandleResponse {
        handle,
        extra: req.cqe,
        ..Default::default()
    })
}

pub(super) fn destroy(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    device.objects.cqs.get(req.handle).ok_or(errno::ENOENT)?;
    if device.objects.cq_in_use(req.handle) {
        return Err(errno::EBUSY);
    }
    device.objects.cqs.remove(req.handle);
    header_only()
}
