//! The rdma path's work on the host device: a host QP for each guest RC QP that may take
//! the path, a host registration for each guest MR, and the completions of both, routed
//! back to the device that owns them (docs/rdma-transport.md).
//!
//! Every guest QP gets its own host CQ (send and receive completions together) on the
//! device's one completion channel, sized for both of its queues, so a CQ can never
//! overflow whatever the guest posts. One thread waits on the channel ([`Carrier::wait`])
//! and hands the completions to the runtime, which writes them into the guests' CQs.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, warn};

use super::abi::*;
use super::datagrams::{self, Datagrams};
use super::devices::GidKind;
use super::host::{HostCq, HostDevice, HostMr, HostPd, HostQp, RcPath, RcSend};
use super::view::ContiguousView;
use crate::{
    Connect, Gid, GuestMemory, HostCompletion, HostEvent, HostOp, HostPathError, HostQpCaps,
    HostQps, HostReceipt, HostRegion, HostSend, KeyedSge, ReceiveError, RemoteError, SendSide,
};

/// Marks a receive's `wr_id` (a send's is the requester's ticket, which never gets there).
const RECEIVE: u64 = datagrams::RECEIVE;
/// Completions taken from a CQ at once.
const POLL_BATCH: usize = 32;
/// Mappings the views of one device's registrations may take (each run of pages adjacent
/// in guest memory is one `mmap`). The kernel allows a process about 65 000 mappings in
/// all (`vm.max_map_count`): without a cap, one guest registering scattered pages could
/// use them up and leave the server unable to map anything for anyone.
pub const MAX_RUNS_PER_OWNER: usize = 8192;
/// Mappings every registration together may take.
pub const MAX_RUNS: usize = 32_768;
/// Host QPs one device may have: each costs the host device queues as deep as the guest
/// asked (rxe allocates them in the kernel), so a guest's 1024 QPs of 4096 WRs must not
/// all become host QPs. Past the cap, new QPs take the other paths.
pub const MAX_QPS_PER_OWNER: usize = 256;
/// Host UD QPs one device may have: each pins its receive buffers (about 130 KiB).
pub const MAX_UD_QPS_PER_OWNER: usize = 32;

/// Decides whether the host device reaches a destination GID: `Err` says why not.
pub type Route = Box<dyn Fn(&Gid) -> Result<(), String> + Send + Sync>;

/// One guest QP's host QP (dropped first), its CQ, a UD QP's buffers and address handles,
/// and its PD (dropped last).
struct Entry {
    owner: usize,
    qp: HostQp,
    cq: Arc<HostCq>,
    datagrams: Option<Datagrams>,
    pd: Arc<HostPd>,
}

/// The host device as the devices of one process use it.
pub struct Carrier {
    device: Arc<HostDevice>,
    port: u8,
    route: Route,
    qps: Mutex<HashMap<u32, Entry>>,
    /// By owner and key, with the mappings each view takes.
    mrs: Mutex<HashMap<(usize, u32), (HostMr, usize)>>,
    /// The host PD of each guest PD, by owner and the guest's PD handle.
    pds: Mutex<HashMap<(usize, u32), Arc<HostPd>>>,
    /// The device said it is gone (DEVICE_FATAL): its fds are no longer waited on.
    gone: AtomicBool,
}

impl std::fmt::Debug for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Carrier({} port {})", self.device.name(), self.port)
    }
}

fn failed(error: impl std::fmt::Display) -> HostPathError {
    HostPathError(error.to_string())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Carrier {
    pub fn new(device: Arc<HostDevice>, port: u8, route: Route) -> Carrier {
        Carrier {
            device,
            port,
            route,
            qps: Mutex::new(HashMap::new()),
            mrs: Mutex::new(HashMap::new()),
            pds: Mutex::new(HashMap::new()),
            gone: AtomicBool::new(false),
        }
    }

    /// The host PD of `owner`'s guest PD `pd`, made at first use.
    fn pd(&self, owner: usize, pd: u32) -> Result<Arc<HostPd>, HostPathError> {
        let mut pds = lock(&self.pds);
        if let Some(found) = pds.get(&(owner, pd)) {
            return Ok(Arc::clone(found));
        }
        let made = self.device.alloc_pd().map_err(failed)?;
        pds.insert((owner, pd), Arc::clone(&made));
        Ok(made)
    }

    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// Runs `work` on QP `qpn`'s host QP.
    fn with_qp<R>(
        &self,
        qpn: u32,
        work: impl FnOnce(&mut HostQp) -> Result<R, HostPathError>,
    ) -> Result<R, HostPathError> {
        let mut qps = lock(&self.qps);
        let entry = qps
            .get_mut(&qpn)
            .ok_or_else(|| failed(format!("no host QP {qpn:#x}")))?;
        work(&mut entry.qp)
    }

    /// Whether `owner` may have one more host QP (a UD one if `ud`).
    fn check_room(&self, owner: usize, ud: bool) -> Result<(), HostPathError> {
        let qps = lock(&self.qps);
        let own = || qps.values().filter(|e| e.owner == owner);
        if own().count() >= MAX_QPS_PER_OWNER {
            return Err(failed(format!(
                "the device has {MAX_QPS_PER_OWNER} host QPs already"
            )));
        }
        if ud && own().filter(|e| e.datagrams.is_some()).count() >= MAX_UD_QPS_PER_OWNER {
            return Err(failed(format!(
                "the device has {MAX_UD_QPS_PER_OWNER} host UD QPs already"
            )));
        }
        Ok(())
    }

    /// Where `sgid` is in the port's GID table (a RoCE v2 entry if there are both).
    fn gid_index(&self, sgid: &Gid) -> Result<u8, HostPathError> {
        let table = self.device.gids(self.port).map_err(failed)?;
        let mut found: Vec<_> = table.iter().filter(|e| e.gid == *sgid).collect();
        found.sort_by_key(|e| e.kind != Some(GidKind::RoceV2));
        let entry = found.first().ok_or_else(|| {
            failed(format!(
                "the guest's GID {} is not in {}'s GID table (no host interface carries it)",
                Ipv6Addr::from(*sgid),
                self.device.name()
            ))
        })?;
        u8::try_from(entry.index).map_err(|_| failed("GID index above 255"))
    }

    /// Waits up to `timeout` for the channel or the device's own events, then takes every
    /// completion of the CQ that raised the event, or the QPs a device event fails.
    pub fn wait(&self, timeout: Duration, out: &mut Vec<HostCompletion>) {
        if self.gone.load(Ordering::Acquire) {
            // A device that went away may leave its fds readable for ever: no busy loop.
            std::thread::sleep(timeout);
            return;
        }
        let mut fds = [self.device.channel_fd(), self.device.async_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } <= 0 {
            return;
        }
        if fds[1].revents != 0 {
            self.device_event(out);
        }
        if fds[0].revents != 0 {
            self.completions(out);
        }
    }

    /// The device's own event: the QPs it fails, for their owners.
    fn device_event(&self, out: &mut Vec<HostCompletion>) {
        let event = match self.device.take_async_event() {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                warn!(
                    "rdma path: {}: {e}; the device is taken as gone",
                    self.device.name()
                );
                self.gone.store(true, Ordering::Release);
                return;
            }
        };
        let qps = lock(&self.qps);
        let failed: Vec<(u32, usize)> = match event.kind {
            EVENT_QP_FATAL | EVENT_QP_REQ_ERR | EVENT_QP_ACCESS_ERR => qps
                .iter()
                .filter(|(_, e)| e.qp.is_at(event.element))
                .map(|(qpn, e)| (*qpn, e.owner))
                .collect(),
            EVENT_DEVICE_FATAL => {
                self.gone.store(true, Ordering::Release);
                qps.iter().map(|(qpn, e)| (*qpn, e.owner)).collect()
            }
            EVENT_PORT_ERR if event.element as u64 & 0xff == u64::from(self.port) => {
                qps.iter().map(|(qpn, e)| (*qpn, e.owner)).collect()
            }
            other => {
                debug!("rdma path: {}: event {other}", self.device.name());
                return;
            }
        };
        let what = match event.kind {
            EVENT_DEVICE_FATAL => "the device is gone".to_string(),
            EVENT_PORT_ERR => format!("port {} is down", self.port),
            _ => "a QP failed".to_string(),
        };
        warn!(
            "rdma path: {}: {what}; {} QPs it carries go to the error state",
            self.device.name(),
            failed.len()
        );
        out.extend(failed.into_iter().map(|(qpn, owner)| HostCompletion {
            owner,
            qpn,
            event: HostEvent::Failed,
        }));
    }

    /// Every completion of the CQ whose event the channel holds.
    fn completions(&self, out: &mut Vec<HostCompletion>) {
        let cqs: Vec<Arc<HostCq>> = lock(&self.qps)
            .values()
            .map(|e| Arc::clone(&e.cq))
            .collect();
        let cq = match self.device.take_event(&cqs) {
            Ok(Some(cq)) => cq,
            Ok(None) => return,
            Err(e) => {
                debug!("rdma path: {e}");
                return;
            }
        };
        cq.ack_events();
        let mut qps = lock(&self.qps);
        let Some((&qpn, entry)) = qps.iter_mut().find(|(_, e)| Arc::ptr_eq(&e.cq, &cq)) else {
            return;
        };
        // Armed again before polling, so a completion that lands in between raises an event.
        if let Err(e) = entry.cq.arm() {
            debug!("rdma path: {e}");
        }
        let mut wcs = [IbvWc::default(); POLL_BATCH];
        loop {
            let n = match entry.cq.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    debug!("rdma path: {e}");
                    return;
                }
            };
            let Entry {
                owner,
                qp,
                datagrams,
                ..
            } = &mut *entry;
            out.extend(wcs[..n].iter().filter_map(|wc| {
                let event = match datagrams {
                    // A UD QP's receives are the server's buffers.
                    Some(datagrams) if wc.wr_id & RECEIVE != 0 => {
                        HostEvent::Datagram(datagrams.take(qp, wc)?)
                    }
                    _ => event_of(wc),
                };
                Some(HostCompletion {
                    owner: *owner,
                    qpn,
                    event,
                })
            }));
            if n < POLL_BATCH {
                return;
            }
        }
    }
}

/// What a work completion means for the guest.
fn event_of(wc: &IbvWc) -> HostEvent {
    if wc.wr_id & RECEIVE == 0 {
        let result = match wc.status {
            WC_SUCCESS => Ok(()),
            WC_REM_ACCESS_ERR => Err(RemoteError::AccessError),
            WC_REM_INV_REQ_ERR => Err(RemoteError::InvalidRequest),
            WC_RETRY_EXC_ERR => Err(RemoteError::Dropped),
            WC_RNR_RETRY_EXC_ERR => Err(RemoteError::ReceiverNotReady),
            _ => Err(RemoteError::OperationError),
        };
        return HostEvent::Sent {
            ticket: wc.wr_id,
            result,
        };
    }
    let result = match wc.status {
        WC_SUCCESS => Ok(()),
        WC_LOC_LEN_ERR => Err(ReceiveError::Length),
        WC_LOC_PROT_ERR => Err(ReceiveError::Protection),
        WC_WR_FLUSH_ERR => Err(ReceiveError::Flushed),
        _ => Err(ReceiveError::Other),
    };
    HostEvent::Received(HostReceipt {
        ticket: wc.wr_id & !RECEIVE,
        result,
        byte_len: wc.byte_len,
        imm: (wc.wc_flags & WC_WITH_IMM != 0).then_some(wc.imm_data),
        by_write: wc.opcode == WC_RECV_RDMA_WITH_IMM,
        src_qp: wc.src_qp,
    })
}

fn scatter(sges: &[KeyedSge]) -> Vec<IbvSge> {
    sges.iter()
        .map(|s| IbvSge {
            addr: s.addr,
            length: s.length,
            lkey: s.lkey,
        })
        .collect()
}

/// The send work request for `send` over `list`.
fn send_wr(send: &HostSend<'_>, list: &mut [IbvSge]) -> IbvSendWr {
    let mut wr = IbvSendWr {
        wr_id: send.ticket,
        sg_list: list.as_mut_ptr(),
        num_sge: libc::c_int::try_from(list.len()).unwrap_or(0),
        // Every request completes on the host: the device keeps its slot until then and
        // decides itself whether the guest sees a completion.
        send_flags: SEND_SIGNALED | if send.solicited { SEND_SOLICITED } else { 0 },
        ..IbvSendWr::default()
    };
    let rdma = |remote_addr: u64, rkey: u32| IbvSendWrRemote {
        remote_addr,
        // `rdma.rkey` overlays the low half of `atomic.compare_add`.
        compare_add: u64::from(rkey),
        ..IbvSendWrRemote::default()
    };
    // Immediate data travels as the guest wrote it: both sides keep the bytes as they are.
    match send.op {
        HostOp::Datagram { imm, .. } => {
            // The address handle and the destination are the caller's (`ud_destination`).
            wr.opcode = if imm.is_some() {
                WR_SEND_WITH_IMM
            } else {
                WR_SEND
            };
            wr.imm_data = imm.unwrap_or(0);
        }
        HostOp::Send { imm: None } => wr.opcode = WR_SEND,
        HostOp::Send { imm: Some(imm) } => {
            wr.opcode = WR_SEND_WITH_IMM;
            wr.imm_data = imm;
        }
        HostOp::Write {
            remote_addr,
            rkey,
            imm,
        } => {
            wr.opcode = if imm.is_some() {
                WR_RDMA_WRITE_WITH_IMM
            } else {
                WR_RDMA_WRITE
            };
            wr.imm_data = imm.unwrap_or(0);
            wr.wr = rdma(remote_addr, rkey);
        }
        HostOp::Read { remote_addr, rkey } => {
            wr.opcode = WR_RDMA_READ;
            wr.wr = rdma(remote_addr, rkey);
        }
        HostOp::CompareSwap {
            remote_addr,
            rkey,
            compare,
            swap,
        } => {
            wr.opcode = WR_ATOMIC_CMP_AND_SWP;
            wr.wr = IbvSendWrRemote {
                remote_addr,
                compare_add: compare,
                swap,
                rkey,
            };
        }
        HostOp::FetchAdd {
            remote_addr,
            rkey,
            add,
        } => {
            wr.opcode = WR_ATOMIC_FETCH_AND_ADD;
            wr.wr = IbvSendWrRemote {
                remote_addr,
                compare_add: add,
                swap: 0,
                rkey,
            };
        }
    }
    wr
}

impl HostQps for Carrier {
    fn offers(&self, gid: &Gid) -> bool {
        self.gid_index(gid).is_ok()
    }

    fn create_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.check_room(owner, false)?;
        let pd = self.pd(owner, pd)?;
        let depth = caps.send_wr.saturating_add(caps.recv_wr).saturating_add(1);
        let cq = self.device.create_cq(depth).map_err(failed)?;
        cq.arm().map_err(failed)?;
        let qp = pd
            .create_rc_qp(
                &cq,
                IbvQpCap {
                    max_send_wr: caps.send_wr.max(1),
                    max_recv_wr: caps.recv_wr.max(1),
                    max_send_sge: caps.send_sge.max(1),
                    max_recv_sge: caps.recv_sge.max(1),
                    max_inline_data: 0,
                },
            )
            .map_err(failed)?;
        let qpn = qp.qpn();
        lock(&self.qps).insert(
            qpn,
            Entry {
                owner,
                qp,
                cq,
                datagrams: None,
                pd,
            },
        );
        Ok(qpn)
    }

    fn create_ud_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.check_room(owner, true)?;
        let pd = self.pd(owner, pd)?;
        let buffers = datagrams::BUFFERS as u32;
        let depth = caps.send_wr.saturating_add(buffers).saturating_add(1);
        let cq = self.device.create_cq(depth).map_err(failed)?;
        cq.arm().map_err(failed)?;
        let qp = pd
            .create_ud_qp(
                &cq,
                IbvQpCap {
                    max_send_wr: caps.send_wr.max(1),
                    max_recv_wr: buffers,
                    max_send_sge: caps.send_sge.max(1),
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
            )
            .map_err(failed)?;
        let datagrams = Datagrams::new(&pd).map_err(failed)?;
        let qpn = qp.qpn();
        lock(&self.qps).insert(
            qpn,
            Entry {
                owner,
                qp,
                cq,
                datagrams: Some(datagrams),
                pd,
            },
        );
        Ok(qpn)
    }

    fn ready_ud_qp(&self, qpn: u32, qkey: u32, sq_psn: u32) -> Result<(), HostPathError> {
        let mut qps = lock(&self.qps);
        let entry = qps
            .get_mut(&qpn)
            .ok_or_else(|| failed(format!("no host QP {qpn:#x}")))?;
        entry
            .qp
            .to_rts_ud(self.port, qkey, sq_psn)
            .map_err(failed)?;
        match &entry.datagrams {
            Some(datagrams) => datagrams.post_all(&mut entry.qp).map_err(failed),
            None => Err(failed(format!("host QP {qpn:#x} is not a UD QP"))),
        }
    }

    fn carries_to(&self, sgid: &Gid, dgid: &Gid) -> bool {
        self.gid_index(sgid).is_ok() && (self.route)(dgid).is_ok()
    }

    fn destroy_qp(&self, qpn: u32) {
        let gone = lock(&self.qps).remove(&qpn);
        drop(gone);
    }

    fn init_qp(&self, qpn: u32, access: u32) -> Result<(), HostPathError> {
        let access = libc::c_int::try_from(access & 0xf).unwrap_or(0);
        let port = self.port;
        self.with_qp(qpn, |qp| qp.to_init(port, access).map_err(failed))
    }

    fn connect_qp(&self, qpn: u32, connect: &Connect) -> Result<(), HostPathError> {
        (self.route)(&connect.dgid).map_err(HostPathError)?;
        let sgid_index = self.gid_index(&connect.sgid)?;
        let active = self.device.port(self.port).map_err(failed)?.active_mtu;
        let path = RcPath {
            port: self.port,
            mtu: connect.path_mtu.clamp(1, active.max(1)),
            sgid_index,
            dgid: connect.dgid,
            dest_qpn: connect.dest_qpn,
            rq_psn: connect.rq_psn,
            max_dest_rd_atomic: connect.max_dest_rd_atomic,
            min_rnr_timer: connect.min_rnr_timer,
        };
        self.with_qp(qpn, |qp| qp.to_rtr(&path).map_err(failed))
    }

    fn ready_qp(&self, qpn: u32, send: &SendSide) -> Result<(), HostPathError> {
        let send = RcSend {
            sq_psn: send.sq_psn,
            timeout: send.timeout,
            retry_cnt: send.retry_cnt,
            rnr_retry: send.rnr_retry,
            max_rd_atomic: send.max_rd_atomic,
        };
        self.with_qp(qpn, |qp| qp.to_rts(&send).map_err(failed))
    }

    fn stop_qp(&self, qpn: u32, error: bool) {
        let state = if error { QPS_ERR } else { QPS_RESET };
        if let Err(e) = self.with_qp(qpn, |qp| qp.set_state(state).map_err(failed)) {
            debug!("rdma path: QP {qpn:#x}: {e}");
        }
    }

    fn post_send(&self, qpn: u32, send: &HostSend<'_>) -> Result<(), HostPathError> {
        let mut list = scatter(send.sges);
        let mut wr = send_wr(send, &mut list);
        let HostOp::Datagram {
            sgid,
            dgid,
            remote_qpn,
            qkey,
            ..
        } = send.op
        else {
            return self.with_qp(qpn, |qp| qp.post_send(&mut wr).map_err(failed));
        };
        let sgid_index = self.gid_index(&sgid)?;
        let mut qps = lock(&self.qps);
        let entry = qps
            .get_mut(&qpn)
            .ok_or_else(|| failed(format!("no host QP {qpn:#x}")))?;
        let Entry {
            qp, datagrams, pd, ..
        } = entry;
        let datagrams = datagrams
            .as_mut()
            .ok_or_else(|| failed(format!("host QP {qpn:#x} is not a UD QP")))?;
        let ah = datagrams
            .ah(pd, self.port, sgid_index, dgid)
            .map_err(failed)?;
        // `wr.ud`: the AH, then the remote QPN and Q_Key in the next eight bytes.
        wr.wr = IbvSendWrRemote {
            remote_addr: ah,
            compare_add: u64::from(remote_qpn) | u64::from(qkey) << 32,
            ..IbvSendWrRemote::default()
        };
        qp.post_send(&mut wr).map_err(failed)
    }

    fn post_recv(&self, qpn: u32, ticket: u64, sges: &[KeyedSge]) -> Result<(), HostPathError> {
        let mut list = scatter(sges);
        let mut wr = IbvRecvWr {
            wr_id: ticket | RECEIVE,
            next: std::ptr::null_mut(),
            sg_list: list.as_mut_ptr(),
            num_sge: libc::c_int::try_from(list.len()).unwrap_or(0),
        };
        self.with_qp(qpn, |qp| qp.post_recv(&mut wr).map_err(failed))
    }

    fn register(
        &self,
        owner: usize,
        pd: u32,
        memory: &GuestMemory,
        pages: &[u64],
        page_size: usize,
        offset: u64,
        length: u64,
        iova: u64,
        access: u32,
    ) -> Result<HostRegion, HostPathError> {
        let view = ContiguousView::map(memory, pages, page_size).map_err(failed)?;
        {
            let mrs = lock(&self.mrs);
            let total: usize = mrs.values().map(|(_, runs)| runs).sum();
            let own: usize = mrs
                .iter()
                .filter(|((o, _), _)| *o == owner)
                .map(|(_, (_, runs))| runs)
                .sum();
            if own + view.runs() > MAX_RUNS_PER_OWNER || total + view.runs() > MAX_RUNS {
                return Err(failed(format!(
                    "its {} runs of pages would pass the mappings registrations may take \
                     ({own} of {MAX_RUNS_PER_OWNER} for this device, {total} of {MAX_RUNS} in all)",
                    view.runs()
                )));
            }
        }
        let runs = view.runs();
        let access = libc::c_int::try_from(access & 0xf).unwrap_or(0);
        let mr = self
            .pd(owner, pd)?
            .register_part(view, offset, length, iova, access)
            .map_err(failed)?;
        let key = mr.lkey();
        // The guest's one key serves as both: the host's rkey must be the same (or none,
        // for an MR peers may not touch, whose key a peer then fails with).
        if mr.rkey() != key && mr.rkey() != 0 {
            return Err(failed(format!(
                "the host gave the MR lkey {key:#x} and rkey {:#x}; the guest has one key",
                mr.rkey()
            )));
        }
        lock(&self.mrs).insert((owner, key), (mr, runs));
        Ok(HostRegion { key })
    }

    fn deregister(&self, owner: usize, key: u32) {
        let gone = lock(&self.mrs).remove(&(owner, key));
        drop(gone);
    }

    fn forget_owner(&self, owner: usize) {
        // QPs first: they may still use the MRs.
        let qps: Vec<Entry> = {
            let mut all = lock(&self.qps);
            let numbers: Vec<u32> = all
                .iter()
                .filter(|(_, e)| e.owner == owner)
                .map(|(qpn, _)| *qpn)
                .collect();
            numbers.iter().filter_map(|n| all.remove(n)).collect()
        };
        drop(qps);
        lock(&self.mrs).retain(|(o, _), _| *o != owner);
        lock(&self.pds).retain(|(o, _), _| *o != owner);
    }
}
