//! The data path of QPs the host's RDMA device carries (docs/rdma-transport.md): their
//! send WQEs and receive buffers go to the host QP as the guest wrote them (addresses and
//! keys are the host registration's), and the host's completions come back here to be
//! written as the guest's CQEs.

use log::{debug, warn};
use pvrdma_backend::{
    Completion, Destination, HostDatagram, HostEvent, HostOp, HostReceipt, HostSend, KeyedSge,
    Network, Operation, Outcome, ReceiveError, Request, RetryPolicy, Service, Sgl, Source,
};
use vm_memory::Bytes;

use super::requester::{Plan, fail, issue};
use super::{RecvWqe, WqeError, peek_recv_ahead};
use crate::abi::{Cqe, Sge, qp_state, wc_flags, wc_opcode, wc_status, wr_opcode};
use crate::pvrdma::completion;
use crate::pvrdma::memory::GuestRam;
use crate::pvrdma::objects::HostLink;
use crate::pvrdma::{Interrupts, PvrdmaDevice};

/// The keyed form of the guest's SGEs.
fn keyed(sges: &[Sge]) -> Vec<KeyedSge> {
    sges.iter()
        .map(|sge| KeyedSge {
            addr: sge.addr,
            length: sge.length,
            lkey: sge.lkey,
        })
        .collect()
}

/// Whether every non-empty SGE names an MR the host device registered (its key is the
/// host's): any other key means nothing to the host QP.
fn keys_on_host(device: &PvrdmaDevice, sges: &[Sge]) -> bool {
    sges.iter().filter(|sge| sge.length > 0).all(|sge| {
        device
            .objects
            .mr_of_key(sge.lkey)
            .and_then(|handle| device.objects.mrs.get(handle))
            .is_some_and(|mr| mr.on_host)
    })
}

/// Whether the planned WQE of QP `qp_handle` goes to its host QP: always for an RC QP the
/// host carries; for a UD QP's datagram when the host device reaches its destination and
/// every buffer is registered on the host (otherwise the datagram takes the other paths).
pub(super) fn takes(device: &PvrdmaDevice, net: &dyn Network, qp_handle: u32, plan: &Plan) -> bool {
    match device.objects.qps.get(qp_handle).map(|qp| qp.host) {
        Some(HostLink::Carrying { .. }) => true,
        Some(HostLink::Datagrams) => {
            net.host()
                .is_some_and(|host| host.qps.carries_to(&plan.source.gid, &plan.destination.gid))
                && keys_on_host(device, &plan.wqe.sges)
        }
        _ => false,
    }
}

/// Hands the planned WQE at the head of QP `qp_handle`'s send queue (`ahead` WQEs in
/// flight before it) to the host QP. Returns whether to go on with the next WQE.
#[expect(
    clippy::too_many_arguments,
    reason = "the requester's step, handed over whole"
)]
pub(super) fn send(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    qp_handle: u32,
    plan: &Plan,
    ahead: u32,
    timed: bool,
) -> bool {
    let header = plan.wqe.header;
    let imm = matches!(
        header.opcode,
        wr_opcode::SEND_WITH_IMM | wr_opcode::RDMA_WRITE_WITH_IMM
    )
    .then_some(header.ex);
    let op = match (header.opcode, plan.service) {
        (wr_opcode::SEND | wr_opcode::SEND_WITH_IMM, Service::Datagram { qkey }) => {
            HostOp::Datagram {
                sgid: plan.source.gid,
                dgid: plan.destination.gid,
                remote_qpn: plan.destination.qpn,
                qkey,
                imm,
            }
        }
        (wr_opcode::SEND | wr_opcode::SEND_WITH_IMM, _) => HostOp::Send { imm },
        (wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM, _) => HostOp::Write {
            remote_addr: header.remote_addr(),
            rkey: header.rdma_rkey(),
            imm,
        },
        (wr_opcode::RDMA_READ, _) => HostOp::Read {
            remote_addr: header.remote_addr(),
            rkey: header.rdma_rkey(),
        },
        (wr_opcode::ATOMIC_CMP_AND_SWP, _) => HostOp::CompareSwap {
            remote_addr: header.remote_addr(),
            rkey: header.atomic_rkey(),
            compare: header.atomic_compare_add(),
            swap: header.atomic_swap(),
        },
        (wr_opcode::ATOMIC_FETCH_AND_ADD, _) => HostOp::FetchAdd {
            remote_addr: header.remote_addr(),
            rkey: header.atomic_rkey(),
            add: header.atomic_compare_add(),
        },
        _ if ahead > 0 => return false,
        _ => {
            fail_head(device, mem, irq, qp_handle, plan, wc_status::LOC_QP_OP_ERR);
            return false;
        }
    };
    if !keys_on_host(device, &plan.wqe.sges) {
        if ahead > 0 {
            return false;
        }
        warn!(
            "rdma path: QP {:#x}: a work request names an MR the host device does not hold",
            plan.source.qpn
        );
        fail_head(device, mem, irq, qp_handle, plan, wc_status::LOC_PROT_ERR);
        return false;
    }
    let Some(host) = net.host() else {
        return false;
    };
    let Some(qp) = device.objects.qps.get(qp_handle) else {
        return false;
    };
    let sges = keyed(&plan.wqe.sges);
    let send = HostSend {
        ticket: qp.next_ticket,
        op,
        sges: &sges,
        solicited: header.send_flags & crate::abi::send_flags::SOLICITED != 0,
    };
    match host.qps.post_send(qp.qpn, &send) {
        Ok(()) => {
            issue(device, qp_handle, plan, None, timed);
            true
        }
        // The host queue is as deep as the guest's, so this is the host refusing the
        // request itself: it fails as a local error.
        Err(e) if ahead == 0 => {
            warn!("rdma path: QP {:#x}: {e}", plan.source.qpn);
            fail_head(device, mem, irq, qp_handle, plan, wc_status::LOC_QP_OP_ERR);
            false
        }
        Err(_) => false,
    }
}

fn fail_head(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qp_handle: u32,
    plan: &Plan,
    status: u32,
) {
    let header = plan.wqe.header;
    fail(
        device,
        mem,
        irq,
        qp_handle,
        header.wr_id,
        header.opcode,
        status,
    );
}

/// The epoch half of a receive's ticket: receives posted before the QP was reset are not
/// taken for the new ones.
fn receive_ticket(epoch: u32, position: u32) -> u64 {
    u64::from(epoch) << 32 | u64::from(position)
}

/// Hands the receives the guest posted since the last call to QP `handle`'s host QP, if it
/// carries the QP. They stay in the receive queue until the host completes them.
pub(crate) fn post_host_receives(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    handle: u32,
) {
    let Some(host) = net.host() else {
        return;
    };
    let Some(qp) = device.objects.qps.get(handle) else {
        return;
    };
    let HostLink::Carrying { mut recv_posted } = qp.host else {
        return;
    };
    if qp.attr.qp_state == qp_state::ERR {
        return;
    }
    let Some(rq) = qp.rq.as_ref() else {
        return;
    };
    let bound = rq.indices().max();
    while recv_posted < bound {
        let wqe: RecvWqe =
            match peek_recv_ahead(rq, mem, recv_posted, qp.rq_stride, qp.max_recv_sge) {
                Ok(Some(wqe)) => wqe,
                Ok(None) => break,
                Err(WqeError::TooManySges { .. } | WqeError::BrokenQueue) => {
                    debug!(
                        "QP {:#x}: a receive the host cannot take; posting stops",
                        qp.qpn
                    );
                    break;
                }
            };
        let ticket = receive_ticket(qp.epoch, recv_posted);
        if let Err(e) = host.qps.post_recv(qp.qpn, ticket, &keyed(&wqe.sges)) {
            warn!("rdma path: QP {:#x}: {e}", qp.qpn);
            break;
        }
        recv_posted += 1;
    }
    if let Some(qp) = device.objects.qps.get_mut(handle) {
        qp.host = HostLink::Carrying { recv_posted };
    }
}

/// A host QP's completion for this device.
pub(crate) fn complete(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    net: &mut dyn Network,
    qpn: u32,
    event: &HostEvent,
) {
    match *event {
        HostEvent::Sent { ticket, result } => {
            let Some(length) = device
                .objects
                .qp_handle(qpn)
                .and_then(|handle| device.objects.qps.get(handle))
                .and_then(|qp| qp.in_flight.iter().find(|e| e.ticket == ticket))
                .map(|entry| entry.length)
            else {
                debug!("QP {qpn:#x}: stale host completion for ticket {ticket}");
                return;
            };
            let completion = Completion {
                qpn,
                ticket,
                result: result.map(|()| Outcome { bytes: length }),
                reply: &[],
                reply_offset: 0,
                last: true,
            };
            super::complete_remote(device, mem, irq, net, &completion);
        }
        HostEvent::Received(receipt) => received(device, mem, irq, qpn, &receipt),
        HostEvent::Datagram(ref datagram) => {
            delivered(device, mem, irq, qpn, datagram);
        }
        HostEvent::Failed => failed(device, mem, irq, qpn),
    }
}

/// A datagram a host UD QP received: delivered to the guest's receive queue as a datagram
/// from any other path is (its payload staged in the device's own buffer). The host
/// checked the Q_Key against the one the QP had at RTS.
fn delivered(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qpn: u32,
    datagram: &HostDatagram,
) {
    let Some(qp) = device
        .objects
        .qp_handle(qpn)
        .and_then(|handle| device.objects.qps.get(handle))
    else {
        return;
    };
    let qkey = qp.attr.qkey;
    let Some(staging) = device.take_staging() else {
        return;
    };
    let len = datagram.payload.len() as u64;
    let mut payload = Sgl::new();
    if len > 0 {
        let written = staging
            .write_slice(&datagram.payload, vm_memory::GuestAddress(0))
            .is_ok();
        if !written || payload.push(0, len).is_none() {
            device.put_staging(staging);
            return;
        }
    }
    let request = Request {
        source: Source {
            gid: datagram.sgid,
            qpn: datagram.src_qp,
        },
        destination: Destination {
            gid: datagram.dgid,
            qpn,
        },
        service: Service::Datagram { qkey },
        memory: &staging,
        operation: Operation::Send {
            payload: &payload,
            imm: datagram.imm,
            invalidate: None,
            solicited: false,
        },
        ticket: 0,
        epoch: 0,
        retry: RetryPolicy::default(),
    };
    // A datagram the guest cannot take (no receive posted, too small) is dropped, as UD is.
    let _ = super::respond(device, mem, irq, &request);
    device.put_staging(staging);
}

/// The host QP failed on its own (a fatal error, its port down, the device gone): an RC
/// guest QP goes to the error state with a QP_FATAL event, and what it holds flushes; a UD
/// QP sends by the other paths from then on.
fn failed(device: &mut PvrdmaDevice, mem: &GuestRam, irq: &mut dyn Interrupts, qpn: u32) {
    let Some(handle) = device.objects.qp_handle(qpn) else {
        return;
    };
    let Some(qp) = device.objects.qps.get_mut(handle) else {
        return;
    };
    // A UD QP loses only the host's way out: its datagrams take the other paths.
    if qp.host == HostLink::Datagrams {
        qp.host = HostLink::Standby;
        return;
    }
    if !matches!(qp.host, HostLink::Carrying { .. })
        || matches!(qp.attr.qp_state, qp_state::RESET | qp_state::ERR)
    {
        return;
    }
    qp.host = HostLink::Standby;
    super::requester::to_error(device, handle);
    device.post_event(mem, irq, crate::abi::event::QP_FATAL, handle);
    completion::flush_qp(device, mem, irq, handle);
}

/// A receive the host QP filled (or failed): the head of the guest's receive queue
/// completes with it.
fn received(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut dyn Interrupts,
    qpn: u32,
    receipt: &HostReceipt,
) {
    let Some(handle) = device.objects.qp_handle(qpn) else {
        return;
    };
    let Some(qp) = device.objects.qps.get_mut(handle) else {
        return;
    };
    let HostLink::Carrying { recv_posted } = qp.host else {
        return;
    };
    if recv_posted == 0 || receipt.ticket >> 32 != u64::from(qp.epoch) {
        debug!("QP {qpn:#x}: stale host receive completion");
        return;
    }
    let Some(rq) = qp.rq.as_ref() else {
        return;
    };
    let Ok(Some(wqe)) = peek_recv_ahead(rq, mem, 0, qp.rq_stride, qp.max_recv_sge) else {
        return;
    };
    let Some(rq) = qp.rq.as_mut() else {
        return;
    };
    if rq.consume(mem).is_err() {
        return;
    }
    qp.host = HostLink::Carrying {
        recv_posted: recv_posted - 1,
    };
    qp.stats.wqes_posted += 1;
    let status = match receipt.result {
        Ok(()) => wc_status::SUCCESS,
        Err(ReceiveError::Length) => wc_status::LOC_LEN_ERR,
        Err(ReceiveError::Protection) => wc_status::LOC_PROT_ERR,
        Err(ReceiveError::Flushed) => wc_status::WR_FLUSH_ERR,
        Err(ReceiveError::Other) => wc_status::GENERAL_ERR,
    };
    if status == wc_status::SUCCESS {
        qp.stats.wqes_completed += 1;
        qp.stats.bytes_received += u64::from(receipt.byte_len);
    }
    let cq = qp.recv_cq;
    let cqe = Cqe {
        wr_id: wqe.header.wr_id,
        qp: u64::from(handle),
        opcode: if receipt.by_write {
            wc_opcode::RECV_RDMA_WITH_IMM
        } else {
            wc_opcode::RECV
        },
        status,
        byte_len: receipt.byte_len,
        imm_data: receipt.imm.unwrap_or(0),
        wc_flags: if receipt.imm.is_some() {
            wc_flags::WITH_IMM
        } else {
            0
        },
        src_qp: receipt.src_qp,
        port_num: 1,
        ..Cqe::default()
    };
    // The host does not say whether the message was solicited: notify an armed CQ either
    // way (a spurious notification is harmless, a missed one hangs the guest).
    completion::complete(device, mem, irq, cq, &cqe, true, false);
    if status != wc_status::SUCCESS && status != wc_status::WR_FLUSH_ERR {
        // The host QP is in the error state now: so is the guest's, and the rest flushes.
        super::requester::to_error(device, handle);
        completion::flush_qp(device, mem, irq, handle);
    }
}
