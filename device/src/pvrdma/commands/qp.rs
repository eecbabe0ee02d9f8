//! Queue pairs: CREATE_QP, MODIFY_QP (the IB state machine), QUERY_QP, DESTROY_QP.

use super::{Reply, Request, header_only, pages_for, reply, valid_queue_size};
use crate::abi::{
    CreateQpRequest, CreateQpResponseV1, CreateQpResponseV2, HandleRequest, HandleResponse,
    ModifyQpRequest, PAGE_SIZE, QpAttr, QpCap, QueryQpResponse, RECV_WQE_HEADER_SIZE,
    RING_STATE_RX, RING_STATE_TX, SEND_WQE_HEADER_SIZE, SGE_SIZE, pdir as pdir_limits,
    qp_attr_mask as mask, qp_state, qp_type, version,
};
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::{GSI_QP_HANDLE, HostLink, KERNEL_CONTEXT, QPN_OFFSET, Qp};
use crate::pvrdma::pdir;
use crate::pvrdma::ring::{Indices, Ring};
use crate::pvrdma::{PvrdmaDevice, errno};
use log::{info, warn};
use pvrdma_backend::{Connect, HostQpCaps, Network, SendSide};

/// WQE stride for `sges` scatter-gather entries after a header of `header` bytes (device-abi §6.3).
fn stride(header: u64, sges: u32) -> u64 {
    (header + SGE_SIZE * u64::from(sges)).next_power_of_two()
}

pub(super) fn create(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    request: &Request,
) -> Reply {
    let req: CreateQpRequest = request.parse();
    let limits = *device.limits();
    let objects = &device.objects;
    let pd_ctx = objects.pd_context(req.pd_handle).ok_or(errno::ENOENT)?;
    // Every object a QP names must belong to the PD's context.
    for cq in [req.send_cq_handle, req.recv_cq_handle] {
        if objects.cqs.get(cq).ok_or(errno::ENOENT)?.ctx != pd_ctx {
            return Err(errno::EINVAL);
        }
    }
    let srq = if req.is_srq != 0 {
        let srq = objects.srqs.get(req.srq_handle).ok_or(errno::ENOENT)?;
        if objects.pd_context(srq.pd) != Some(pd_ctx) {
            return Err(errno::EINVAL);
        }
        Some(req.srq_handle)
    } else {
        None
    };
    match req.qp_type {
        qp_type::RC | qp_type::UD => {}
        qp_type::GSI if pd_ctx == KERNEL_CONTEXT => {}
        _ => return Err(errno::EOPNOTSUPP),
    }
    if !valid_queue_size(req.max_send_wr, limits.max_qp_wr) || req.max_send_sge > limits.max_sge {
        return Err(errno::EINVAL);
    }
    let sq_stride = stride(SEND_WQE_HEADER_SIZE, req.max_send_sge);
    let rq_stride = stride(RECV_WQE_HEADER_SIZE, req.max_recv_sge);
    let (total, send_chunks) = (u64::from(req.total_chunks), u64::from(req.send_chunks));
    if sq_stride > PAGE_SIZE
        || send_chunks < pages_for(req.max_send_wr, sq_stride)
        || total > pdir_limits::MAX_PAGES
    {
        return Err(errno::EINVAL);
    }
    let rq_pages = total.checked_sub(1 + send_chunks).ok_or(errno::EINVAL)?;
    if srq.is_none()
        && (!valid_queue_size(req.max_recv_wr, limits.max_qp_wr)
            || req.max_recv_sge > limits.max_sge
            || rq_stride > PAGE_SIZE
            || rq_pages < pages_for(req.max_recv_wr, rq_stride))
    {
        return Err(errno::EINVAL);
    }
    device.objects.check_page_budget(total)?;
    let pages = pdir::resolve(mem, req.pdir_dma, total).map_err(|_| errno::EFAULT)?;
    let state_page = pages[0];
    let send_end = 1 + send_chunks as usize;
    let sq_indices = Indices::new(req.max_send_wr).ok_or(errno::EINVAL)?;
    let mut sq = Ring::new(
        sq_indices,
        state_page + RING_STATE_TX,
        pages[1..send_end].to_vec(),
        sq_stride,
    )
    .ok_or(errno::EINVAL)?;
    sq.adopt_consumer(mem).map_err(|_| errno::EINVAL)?;
    let rq = match srq {
        Some(_) => None,
        None => {
            let indices = Indices::new(req.max_recv_wr).ok_or(errno::EINVAL)?;
            let mut rq = Ring::new(
                indices,
                state_page + RING_STATE_RX,
                pages[send_end..].to_vec(),
                rq_stride,
            )
            .ok_or(errno::EINVAL)?;
            rq.adopt_consumer(mem).map_err(|_| errno::EINVAL)?;
            Some(rq)
        }
    };
    let cap = QpCap {
        max_send_wr: req.max_send_wr,
        max_recv_wr: if srq.is_some() { 0 } else { req.max_recv_wr },
        max_send_sge: req.max_send_sge,
        max_recv_sge: if srq.is_some() { 0 } else { req.max_recv_sge },
        ..QpCap::default()
    };
    let qp = Qp {
        qpn: 0,
        pages_held: total,
        pd: req.pd_handle,
        qp_type: req.qp_type,
        send_cq: req.send_cq_handle,
        recv_cq: req.recv_cq_handle,
        srq,
        sq,
        rq,
        sq_stride,
        rq_stride,
        sq_sig_all: req.sq_sig_all != 0,
        max_send_sge: req.max_send_sge,
        max_recv_sge: req.max_recv_sge,
        stalled: false,
        stats: Default::default(),
        doorbell_ns: None,
        rnr_counted: false,
        in_flight: Default::default(),
        timing: None,
        next_ticket: 0,
        epoch: device.objects.next_qp_epoch,
        waiting_transport: false,
        host: HostLink::None,
        attr: QpAttr {
            qp_state: qp_state::RESET,
            cap,
            ..QpAttr::default()
        },
    };
    device.objects.next_qp_epoch = device.objects.next_qp_epoch.wrapping_add(1);
    let qps = &mut device.objects.qps;
    let handle = if req.qp_type == qp_type::GSI {
        if !qps.insert_at(GSI_QP_HANDLE, qp) {
            return Err(errno::EBUSY);
        }
        GSI_QP_HANDLE
    } else {
        qps.insert(qp).ok_or(errno::ENOMEM)?
    };
    // Drivers older than version 20 use the QPN as the handle: there the two are equal.
    let driver_version = device.shared.as_ref().map_or(0, |s| s.driver_version);
    // An RC QP of a user context may take the rdma path: it adopts its host QP's number,
    // which its peers then address on the wire (docs/rdma-transport.md).
    let host_qpn = if matches!(req.qp_type, qp_type::RC | qp_type::UD)
        && pd_ctx != KERNEL_CONTEXT
        && srq.is_none()
        && driver_version >= version::QP_HANDLE
    {
        create_on_host(device, net, req.pd_handle, req.qp_type, &cap)
    } else {
        None
    };
    let qpn = match host_qpn {
        Some(qpn) => qpn,
        None if handle == GSI_QP_HANDLE || driver_version < version::QP_HANDLE => handle,
        None => handle + QPN_OFFSET,
    };
    if !device.objects.number_qp(handle, qpn) {
        device.objects.remove_qp(handle);
        if let (Some(qpn), Some(host)) = (host_qpn, net.host()) {
            host.qps.destroy_qp(qpn);
        }
        return Err(errno::EBUSY);
    }
    if host_qpn.is_some()
        && let Some(qp) = device.objects.qps.get_mut(handle)
    {
        qp.host = HostLink::Standby;
    }
    if driver_version >= version::QP_HANDLE {
        reply(&CreateQpResponseV2 {
            qpn,
            qp_handle: handle,
            max_send_wr: cap.max_send_wr,
            max_recv_wr: cap.max_recv_wr,
            max_send_sge: cap.max_send_sge,
            max_recv_sge: cap.max_recv_sge,
            ..Default::default()
        })
    } else {
        reply(&CreateQpResponseV1 {
            qpn,
            max_send_wr: cap.max_send_wr,
            max_recv_wr: cap.max_recv_wr,
            max_send_sge: cap.max_send_sge,
            max_recv_sge: cap.max_recv_sge,
            ..Default::default()
        })
    }
}

/// A host QP for a new RC or UD QP, when the host's RDMA device holds one of this port's
/// GIDs; its number, if made.
fn create_on_host(
    device: &PvrdmaDevice,
    net: &dyn Network,
    pd: u32,
    kind: u8,
    cap: &QpCap,
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
    let caps = HostQpCaps {
        send_wr: cap.max_send_wr,
        recv_wr: cap.max_recv_wr,
        send_sge: cap.max_send_sge,
        recv_sge: cap.max_recv_sge,
    };
    let made = if kind == qp_type::UD {
        host.qps.create_ud_qp(host.owner, pd, caps)
    } else {
        host.qps.create_qp(host.owner, pd, caps)
    };
    match made {
        Ok(qpn) => Some(qpn),
        Err(e) => {
            warn!("rdma path: no host QP for a new QP ({e}); it takes the other paths");
            None
        }
    }
}

/// Moves QP `handle`'s host QP along with the guest's transition `current` → `target`. At
/// RTR the host QP connects if the host device is the way to the destination, and from
/// then on carries the QP; otherwise the QP takes the memcpy or TCP path as any QP does.
fn follow_on_host(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    handle: u32,
    current: u32,
) -> Result<(), u32> {
    let Some(host) = net.host() else {
        return Ok(());
    };
    let Some(qp) = device.objects.qps.get(handle) else {
        return Ok(());
    };
    if qp.host == HostLink::None {
        return Ok(());
    }
    let (qpn, attr) = (qp.qpn, qp.attr);
    let target = attr.qp_state;
    if qp.qp_type == qp_type::UD {
        let link = match (current, target) {
            (_, qp_state::RESET | qp_state::ERR) => {
                host.qps.stop_qp(qpn, target == qp_state::ERR);
                HostLink::Standby
            }
            (qp_state::RTR, qp_state::RTS) => {
                match host.qps.ready_ud_qp(qpn, attr.qkey, attr.sq_psn) {
                    Ok(()) => {
                        info!("rdma path: UD QP {qpn:#x} sends through the host's RDMA device");
                        HostLink::Datagrams
                    }
                    Err(e) => {
                        warn!("rdma path: UD QP {qpn:#x} to RTS on the host: {e}");
                        HostLink::Standby
                    }
                }
            }
            _ => return Ok(()),
        };
        if let Some(qp) = device.objects.qps.get_mut(handle) {
            qp.host = link;
        }
        return Ok(());
    }
    let link = match (current, target) {
        (_, qp_state::RESET) if current != qp_state::RESET => {
            host.qps.stop_qp(qpn, false);
            HostLink::Standby
        }
        (_, qp_state::ERR) => {
            host.qps.stop_qp(qpn, true);
            HostLink::Standby
        }
        (qp_state::RESET, qp_state::INIT) => {
            if let Err(e) = host.qps.init_qp(qpn, attr.qp_access_flags) {
                warn!("rdma path: QP {qpn:#x} to INIT on the host: {e}");
            }
            HostLink::Standby
        }
        (qp_state::INIT, qp_state::RTR) => {
            let sgid = device
                .objects
                .gids
                .get(usize::from(attr.ah_attr.grh.sgid_index))
                .copied()
                .flatten()
                .map(|gid| gid.raw)
                .unwrap_or_default();
            let connect = Connect {
                sgid,
                dgid: attr.ah_attr.grh.dgid,
                dest_qpn: attr.dest_qp_num,
                rq_psn: attr.rq_psn,
                path_mtu: attr.path_mtu,
                max_dest_rd_atomic: attr.max_dest_rd_atomic,
                min_rnr_timer: attr.min_rnr_timer,
                access: attr.qp_access_flags,
            };
            match host.qps.connect_qp(qpn, &connect) {
                Ok(()) => {
                    info!("rdma path: QP {qpn:#x} is carried by the host's RDMA device");
                    HostLink::Carrying { recv_posted: 0 }
                }
                Err(e) => {
                    info!("rdma path: QP {qpn:#x} takes another path: {e}");
                    HostLink::Standby
                }
            }
        }
        (qp_state::RTR, qp_state::RTS) if matches!(qp.host, HostLink::Carrying { .. }) => {
            let send = SendSide {
                sq_psn: attr.sq_psn,
                timeout: attr.timeout,
                retry_cnt: attr.retry_cnt,
                rnr_retry: attr.rnr_retry,
                max_rd_atomic: attr.max_rd_atomic,
            };
            if let Err(e) = host.qps.ready_qp(qpn, &send) {
                warn!("rdma path: QP {qpn:#x} to RTS on the host: {e}");
                return Err(errno::EIO);
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.host = link;
    }
    if matches!(link, HostLink::Carrying { .. }) {
        // Receives the guest posted before RTR go to the host QP now.
        crate::pvrdma::datapath::post_host_receives(device, mem, net, handle);
    }
    Ok(())
}

/// Whether the IB state machine allows `from` → `to` (the driver checks the same with
/// ib_modify_qp_is_ok; a hostile guest does not).
fn transition_allowed(from: u32, to: u32) -> bool {
    use qp_state::*;
    matches!(
        (from, to),
        (_, RESET)
            | (_, ERR)
            | (RESET, INIT)
            | (INIT, INIT)
            | (INIT, RTR)
            | (RTR, RTS)
            | (RTS, RTS)
            | (RTS, SQD)
            | (SQD, SQD)
            | (SQD, RTS)
            | (SQE, RTS)
    ) && from <= ERR
        && to <= ERR
}

pub(super) fn modify(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    request: &Request,
    flush: &mut Vec<u32>,
) -> Reply {
    let req: ModifyQpRequest = request.parse();
    let attr_mask = req.attr_mask & mask::ALL;
    let new = req.attrs;
    let gids_ok = |index: u8| {
        device
            .objects
            .gids
            .get(usize::from(index))
            .is_some_and(Option::is_some)
    };
    // Rules 13 and 14: an AV names a bound source GID on port 1.
    if attr_mask & mask::AV != 0
        && (new.ah_attr.port_num != 1 || !gids_ok(new.ah_attr.grh.sgid_index))
    {
        return Err(errno::EINVAL);
    }
    let qp = device
        .objects
        .qps
        .get_mut(req.qp_handle)
        .ok_or(errno::ENOENT)?;
    let current = qp.attr.qp_state;
    let target = if attr_mask & mask::STATE != 0 {
        new.qp_state
    } else {
        current
    };
    if !transition_allowed(current, target) {
        return Err(errno::EINVAL);
    }
    if (attr_mask & mask::PORT != 0 && new.port_num != 1)
        || (attr_mask & mask::PKEY_INDEX != 0 && new.pkey_index != 0)
        || (attr_mask & mask::MIN_RNR_TIMER != 0 && new.min_rnr_timer > 31)
        || (attr_mask & mask::PATH_MTU != 0 && !(1..=5).contains(&new.path_mtu))
    {
        return Err(errno::EINVAL);
    }
    let attr = &mut qp.attr;
    let set = |bit: u32| attr_mask & bit != 0;
    if set(mask::ACCESS_FLAGS) {
        attr.qp_access_flags = new.qp_access_flags;
    }
    if set(mask::PKEY_INDEX) {
        attr.pkey_index = new.pkey_index;
    }
    if set(mask::PORT) {
        attr.port_num = new.port_num;
    }
    if set(mask::QKEY) {
        attr.qkey = new.qkey;
    }
    if set(mask::AV) {
        attr.ah_attr = new.ah_attr;
    }
    if set(mask::PATH_MTU) {
        attr.path_mtu = new.path_mtu;
    }
    if set(mask::TIMEOUT) {
        attr.timeout = new.timeout;
    }
    if set(mask::RETRY_CNT) {
        attr.retry_cnt = new.retry_cnt;
    }
    if set(mask::RNR_RETRY) {
        attr.rnr_retry = new.rnr_retry;
    }
    if set(mask::RQ_PSN) {
        attr.rq_psn = new.rq_psn;
    }
    if set(mask::MAX_QP_RD_ATOMIC) {
        attr.max_rd_atomic = new.max_rd_atomic;
    }
    if set(mask::MIN_RNR_TIMER) {
        attr.min_rnr_timer = new.min_rnr_timer;
    }
    if set(mask::SQ_PSN) {
        attr.sq_psn = new.sq_psn;
    }
    if set(mask::MAX_DEST_RD_ATOMIC) {
        attr.max_dest_rd_atomic = new.max_dest_rd_atomic;
    }
    if set(mask::PATH_MIG_STATE) {
        attr.path_mig_state = new.path_mig_state;
    }
    if set(mask::DEST_QPN) {
        attr.dest_qp_num = new.dest_qp_num;
    }
    if set(mask::EN_SQD_ASYNC_NOTIFY) {
        attr.en_sqd_async_notify = new.en_sqd_async_notify;
    }
    attr.qp_state = target;
    attr.cur_qp_state = target;
    if target == qp_state::RESET && current != qp_state::RESET {
        // The guest restarts both rings at index 0; so does the device (device-abi §5.4 MODIFY_QP).
        qp.sq.restart(mem).map_err(|_| errno::EFAULT)?;
        qp.in_flight.clear();
        qp.waiting_transport = false;
        // A QP brought back from RESET starts a new connection: transports must not take
        // its requests (numbered from 0 again) for the old connection's.
        qp.epoch = device.objects.next_qp_epoch;
        device.objects.next_qp_epoch = device.objects.next_qp_epoch.wrapping_add(1);
        if let Some(rq) = qp.rq.as_mut() {
            rq.restart(mem).map_err(|_| errno::EFAULT)?;
        }
    }
    if target == qp_state::ERR {
        flush.push(req.qp_handle);
    }
    if target != current {
        follow_on_host(device, mem, net, req.qp_handle, current)?;
    }
    header_only()
}

pub(super) fn query(device: &PvrdmaDevice, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    let qp = device.objects.qps.get(req.handle).ok_or(errno::ENOENT)?;
    reply(&QueryQpResponse {
        attrs: qp.attr,
        ..Default::default()
    })
}

pub(super) fn destroy(device: &mut PvrdmaDevice, net: &dyn Network, request: &Request) -> Reply {
    let req: HandleRequest = request.parse();
    let qp = device.objects.remove_qp(req.handle).ok_or(errno::ENOENT)?;
    if qp.host != HostLink::None
        && let Some(host) = net.host()
    {
        host.qps.destroy_qp(qp.qpn);
    }
    reply(&HandleResponse::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_follows_ib() {
        use qp_state::*;
        assert!(transition_allowed(RESET, INIT));
        assert!(transition_allowed(INIT, RTR));
        assert!(transition_allowed(RTR, RTS));
        assert!(transition_allowed(RTS, ERR));
        assert!(transition_allowed(ERR, RESET));
        assert!(!transition_allowed(RESET, RTS));
        assert!(!transition_allowed(INIT, RTS));
        assert!(!transition_allowed(ERR, RTS));
        assert!(!transition_allowed(RESET, 7));
        assert!(!transition_allowed(9, RESET));
    }

    #[test]
    fn strides_match_the_driver() {
        assert_eq!(stride(SEND_WQE_HEADER_SIZE, 1), 128);
        assert_eq!(stride(SEND_WQE_HEADER_SIZE, 2), 128);
        assert_eq!(stride(SEND_WQE_HEADER_SIZE, 4), 256);
        assert_eq!(stride(RECV_WQE_HEADER_SIZE, 1), 32);
        assert_eq!(stride(RECV_WQE_HEADER_SIZE, 0), 16);
    }
}
