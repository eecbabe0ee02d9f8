//! Shared receive queues (CREATE/MODIFY/QUERY/DESTROY_SRQ).

use super::{Reply, Request, header_only, pages_for, reply, valid_queue_size};
use crate::abi::{
    CreateSrqRequest, HandleRequest, HandleResponse, ModifySrqRequest, QuerySrqResponse,
    RECV_WQE_HEADER_SIZE, RING_STATE_RX, SGE_SIZE, SRQ_ATTR_LIMIT, SRQ_ATTR_MAX_WR,
    pdir as pdir_limits,
};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::Srq;
use crate::pvrdma::pdir;
use crate::pvrdma::ring::{Indices, Ring};
use crate::pvrdma::{PvrdmaDevice, errno};

pub(super) fn create(device: &mut PvrdmaDevice, mem: &GuestRam, request: &Request) -> Reply {
    let req: CreateSrqRequest = request.parse();
    device.objects.pds.get(req.pd_handle).ok_or(errno::ENOENT)?;
    let limits = device.limits();
    let attrs = req.attrs;
    if req.srq_type != 0
        || !valid_queue_size(attrs.max_wr, limits.max_srq_wr)
        || attrs.max_sge > limits.max_srq_sge
    {
        return Err(errno::EINVAL);
    }
    let stride =
        (RECV_WQE_HEADER_SIZE + SGE_SIZE * u64::from(attrs.max_sge.max(1))).next_power_of_two();
    let nchunks = u64::from(req.nchunks);
    if nchunks < 1 + pages_for(attrs.max_wr, stride) || nchunks > pdir_limits::MAX_PAGES {
        return Err(errno::EINVAL);
    }
    device.objects.check_page_budget(nchunks)?;
    let pages = pdir::resolve(mem, req.pdir_dma, nchunks).map_err(|_| errno::EFAULT)?;
    let indices = Indices::new(attrs.max_wr).ok_or(errno::EINVAL)?;
    let mut ring = Ring::new(
        indices,
        pages[0] + RING_STATE_RX,
        pages[1..].to_vec(),
        stride,
    )
    .ok_or(errno::EINVAL)?;
    ring.adopt_consumer(mem).map_err(|_| errno::EINVAL)?;
    let srq = Srq {
        pages_held: nchunks,
        pd: req.pd_handle,
        ring,
        attrs,
        stride,
    };
    let handle = device.objects.srqs.insert(srq).ok_or(errno::ENOMEM)?;
    reply(&HandleResponse {
        handle,
        ..Default::default()
    })
}

pub(super) fn modify(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: ModifySrqRequest = request.parse();
    let srq = device
        .objects
        .srqs
        .get_mut(req.srq_handle)
        .ok_or(errno::ENOENT)?;
    // Only the limit can change; resizing is not supported (the driver never asks).
    if req.attr_mask & SRQ_ATTR_MAX_WR != 0
        || req.attr_mask & SRQ_ATTR_LIMIT == 0
        || req.attrs.srq_limit > srq.attrs.max_wr
    {
        return Err(errno::EINVAL);
    }
    srq.attrs.srq_limit = req.attrs.srq_limit;
    header_only()
}

pub(super) fn query(device: &PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    let srq = device.objects.srqs.get(req.handle).ok_or(errno::ENOENT)?;
    reply(&QuerySrqResponse {
        attrs: srq.attrs,
        ..Default::default()
    })
}

pub(super) fn destroy(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    device.objects.srqs.get(req.handle).ok_or(errno::ENOENT)?;
    if device.objects.srq_in_use(req.handle) {
        return Err(errno::EBUSY);
    }
    device.objects.srqs.remove(req.handle);
    header_only()
}
