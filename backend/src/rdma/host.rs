//! The host's RDMA device as owned objects: an open context with its protection domain and
//! completion channel, and the MRs, CQs and QPs made on it. Every object destroys itself
//! when dropped and keeps what it was made from alive (`Arc`), so no object can outlive its
//! context and nothing is destroyed twice. The rdma path and `loopback.rs` use only these.

use std::ffi::{CStr, c_int, c_void};
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use super::abi::*;
use super::verbs::Verbs;
use super::view::ContiguousView;

/// What the library said when a call failed: the call and the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {reason}")]
pub struct HostError {
    pub call: &'static str,
    pub reason: String,
}

fn errno(call: &'static str) -> HostError {
    HostError {
        call,
        reason: std::io::Error::last_os_error().to_string(),
    }
}

/// `Ok` for a call that returned 0, else its error.
fn checked(call: &'static str, rc: c_int) -> Result<(), HostError> {
    if rc == 0 { Ok(()) } else { Err(code(call, rc)) }
}

fn code(call: &'static str, rc: c_int) -> HostError {
    HostError {
        call,
        reason: if rc > 0 {
            std::io::Error::from_raw_os_error(rc).to_string()
        } else {
            format!("returned {rc}")
        },
    }
}

/// An open device: its context, one protection domain and one completion channel.
pub struct HostDevice {
    verbs: Arc<Verbs>,
    context: NonNull<IbvContext>,
    pd: NonNull<IbvPd>,
    channel: NonNull<IbvCompChannel>,
    name: String,
}

// SAFETY: libibverbs objects may be used from any thread; calls on one object are
// serialised by `&mut` where the library requires it (posting, polling), and the others
// (creating, destroying, registering) are thread-safe in libibverbs.
unsafe impl Send for HostDevice {}
// SAFETY: as above.
unsafe impl Sync for HostDevice {}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl HostDevice {
    /// Opens the device called `name`, with a protection domain and a completion channel.
    pub fn open(verbs: Arc<Verbs>, name: &str) -> Result<Arc<HostDevice>, HostError> {
        let context = open_context(&verbs, name)?;
        // SAFETY: an open context.
        let pd = NonNull::new(unsafe { (verbs.alloc_pd)(context.as_ptr()) });
        let Some(pd) = pd else {
            let error = errno("ibv_alloc_pd");
            // SAFETY: nothing was made from the context.
            unsafe { (verbs.close_device)(context.as_ptr()) };
            return Err(error);
        };
        // SAFETY: an open context.
        let channel = NonNull::new(unsafe { (verbs.create_comp_channel)(context.as_ptr()) });
        let Some(channel) = channel else {
            let error = errno("ibv_create_comp_channel");
            // SAFETY: the PD is the only object made from the context.
            unsafe {
                (verbs.dealloc_pd)(pd.as_ptr());
                (verbs.close_device)(context.as_ptr());
            }
            return Err(error);
        };
        Ok(Arc::new(HostDevice {
            verbs,
            context,
            pd,
            channel,
            name: name.to_string(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verb `pick` takes from the provider's operation table (which the header's inline
    /// `ibv_post_send`, `ibv_poll_cq` and the like call through).
    fn op<T>(
        &self,
        call: &'static str,
        pick: impl FnOnce(&IbvContextOps) -> Option<T>,
    ) -> Result<T, HostError> {
        // SAFETY: the context lives as long as this device; its table was filled by the
        // provider at open and is not changed after.
        pick(unsafe { &(*self.context.as_ptr()).ops }).ok_or(HostError {
            call,
            reason: "the provider has none".into(),
        })
    }

    /// The completion channel's fd: readable when an armed CQ of this device completed.
    pub fn channel_fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as this device.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// The context's async fd: readable when the device has an event of its own (a QP's
    /// fatal error, a port down, the device gone).
    pub fn async_fd(&self) -> RawFd {
        // SAFETY: the context lives as long as this device.
        unsafe { (*self.context.as_ptr()).async_fd }
    }

    /// The device's next event, if its async fd is readable: the event's type and what it
    /// names (a QP's address for QP events, the port number for port events), already
    /// acknowledged.
    pub fn take_async_event(&self) -> Result<Option<DeviceEvent>, HostError> {
        let mut pollfd = libc::pollfd {
            fd: self.async_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        if unsafe { libc::poll(&mut pollfd, 1, 0) } <= 0 {
            return Ok(None);
        }
        let mut event = IbvAsyncEvent::default();
        // SAFETY: an open context with an event waiting; a valid out-structure.
        let rc = unsafe { (self.verbs.get_async_event)(self.context.as_ptr(), &mut event) };
        if rc != 0 {
            return Err(errno("ibv_get_async_event"));
        }
        let taken = DeviceEvent {
            kind: event.event_type,
            element: event.element as usize,
        };
        // SAFETY: the event just read, acknowledged once.
        unsafe { (self.verbs.ack_async_event)(&mut event) };
        Ok(Some(taken))
    }

    /// The port's attributes (the compat prefix the exported call fills).
    pub fn port(&self, port: u8) -> Result<IbvPortAttr, HostError> {
        let mut attr = IbvPortAttr::default();
        // SAFETY: an open context and a zeroed attribute prefix.
        let rc = unsafe { (self.verbs.query_port)(self.context.as_ptr(), port, &mut attr) };
        checked("ibv_query_port", rc).map(|()| attr)
    }

    /// The populated entries of `port`'s GID table, as the device has them now (the host's
    /// interfaces add and remove addresses, and with them RoCE GIDs).
    pub fn gids(&self, port: u8) -> Result<Vec<super::devices::GidEntry>, HostError> {
        let attr = self.port(port)?;
        Ok(super::devices::gid_table(
            &self.verbs,
            self.context.as_ptr(),
            port,
            attr.gid_tbl_len,
        ))
    }

    /// Registers `view` at the I/O virtual address `iova` (the guest's address of its first
    /// byte) with `access` (`ACCESS_*`); the MR owns the view.
    pub fn register(
        self: &Arc<Self>,
        view: ContiguousView,
        iova: u64,
        access: c_int,
    ) -> Result<HostMr, HostError> {
        let len = view.len() as u64;
        self.register_part(view, 0, len, iova, access)
    }

    /// Registers `len` bytes of `view` from `offset` at the I/O virtual address `iova` (a
    /// guest MR need not start or end on a page boundary), in the device's own PD; the MR
    /// owns the view.
    pub fn register_part(
        self: &Arc<Self>,
        view: ContiguousView,
        offset: u64,
        len: u64,
        iova: u64,
        access: c_int,
    ) -> Result<HostMr, HostError> {
        let mr = register_view(self, self.pd, &view, offset, len, iova, access)?;
        Ok(HostMr {
            device: Arc::clone(self),
            mr,
            view: Some(view),
            _pd: None,
        })
    }

    /// A protection domain of its own: QPs and MRs of one PD cannot reach another's, so
    /// each guest PD gets one (one tenant's keys mean nothing on another's QPs).
    pub fn alloc_pd(self: &Arc<Self>) -> Result<Arc<HostPd>, HostError> {
        // SAFETY: an open context.
        let pd = NonNull::new(unsafe { (self.verbs.alloc_pd)(self.context.as_ptr()) })
            .ok_or_else(|| errno("ibv_alloc_pd"))?;
        Ok(Arc::new(HostPd {
            device: Arc::clone(self),
            pd,
        }))
    }

    /// Registers `len` bytes at `addr` of the server's own memory (its address used on the
    /// wire).
    ///
    /// # Safety
    /// `addr..addr + len` must stay mapped until the MR is dropped.
    pub unsafe fn register_own(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        access: c_int,
    ) -> Result<HostMr, HostError> {
        // SAFETY: a live PD; the caller keeps the memory mapped.
        let mr = unsafe { (self.verbs.reg_mr)(self.pd.as_ptr(), addr.cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| errno("ibv_reg_mr"))?;
        Ok(HostMr {
            device: Arc::clone(self),
            mr,
            view: None,
            _pd: None,
        })
    }

    /// A CQ of `depth` entries on this device's completion channel.
    pub fn create_cq(self: &Arc<Self>, depth: u32) -> Result<Arc<HostCq>, HostError> {
        let depth = c_int::try_from(depth).unwrap_or(c_int::MAX);
        // SAFETY: an open context and its live channel.
        let cq = unsafe {
            (self.verbs.create_cq)(
                self.context.as_ptr(),
                depth,
                ptr::null_mut(),
                self.channel.as_ptr(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| errno("ibv_create_cq"))?;
        Ok(Arc::new(HostCq {
            device: Arc::clone(self),
            cq,
            unacked: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    /// An RC QP of the device's own PD whose send and receive queues complete on `cq`.
    pub fn create_rc_qp(
        self: &Arc<Self>,
        cq: &Arc<HostCq>,
        cap: IbvQpCap,
    ) -> Result<HostQp, HostError> {
        create_qp(self.pd, None, cq, cap, QPT_RC)
    }

    /// Waits for nothing: the CQ whose event the channel holds, if its fd is readable,
    /// with the event counted for acknowledgement (see [`HostCq::ack_events`]).
    pub fn take_event(&self, cqs: &[Arc<HostCq>]) -> Result<Option<Arc<HostCq>>, HostError> {
        let mut pollfd = libc::pollfd {
            fd: self.channel_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        if unsafe { libc::poll(&mut pollfd, 1, 0) } <= 0 {
            return Ok(None);
        }
        let (mut cq, mut context) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: the channel has an event; out-pointers are valid.
        let rc = unsafe { (self.verbs.get_cq_event)(self.channel.as_ptr(), &mut cq, &mut context) };
        if rc != 0 {
            return Err(errno("ibv_get_cq_event"));
        }
        let found = cqs.iter().find(|c| c.cq.as_ptr() == cq).cloned();
        match &found {
            Some(cq) => {
                cq.unacked.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            None => {
                // A CQ the caller did not name: acknowledge its event here, so its
                // destruction never waits for it.
                // SAFETY: the library returned a CQ of this channel that is still alive.
                unsafe { (self.verbs.ack_cq_events)(cq, 1) };
            }
        }
        Ok(found)
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        // SAFETY: every MR, CQ and QP holds an `Arc` of this device, so none is left.
        unsafe {
            (self.verbs.destroy_comp_channel)(self.channel.as_ptr());
            (self.verbs.dealloc_pd)(self.pd.as_ptr());
            (self.verbs.close_device)(self.context.as_ptr());
        }
    }
}

/// An event of the device itself (`EVENT_*`), with what it names: for a QP event the QP's
/// address (compare with [`HostQp::is_at`]), for a port event the port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEvent {
    pub kind: u32,
    pub element: usize,
}

/// A registered memory region; deregistered (and its view unmapped) when dropped.
pub struct HostMr {
    device: Arc<HostDevice>,
    mr: NonNull<IbvMr>,
    /// The guest pages it covers, mapped for it (none for the server's own memory).
    view: Option<ContiguousView>,
    /// Its PD, if not the device's own (dropped after the MR).
    _pd: Option<Arc<HostPd>>,
}

// SAFETY: see `HostDevice`.
unsafe impl Send for HostMr {}
// SAFETY: see `HostDevice`.
unsafe impl Sync for HostMr {}

impl HostMr {
    pub fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.mr.as_ptr()).rkey }
    }
}

impl Drop for HostMr {
    fn drop(&mut self) {
        // SAFETY: a live MR, deregistered once; its view is unmapped after (field order).
        unsafe { (self.device.verbs.dereg_mr)(self.mr.as_ptr()) };
        drop(self.view.take());
    }
}

/// A completion queue on its device's channel.
pub struct HostCq {
    device: Arc<HostDevice>,
    cq: NonNull<IbvCq>,
    /// Events taken from the channel for this CQ and not yet acknowledged.
    unacked: std::sync::atomic::AtomicU32,
}

// SAFETY: see `HostDevice`; polling and arming go through `&self` but libibverbs
// serialises them per CQ with its own lock.
unsafe impl Send for HostCq {}
// SAFETY: as above.
unsafe impl Sync for HostCq {}

impl HostCq {
    /// Asks for an event on the channel at the next completion.
    pub fn arm(&self) -> Result<(), HostError> {
        let arm = self
            .device
            .op("ibv_req_notify_cq", |ops| ops.req_notify_cq)?;
        // SAFETY: a live CQ with a channel.
        checked("ibv_req_notify_cq", unsafe { arm(self.cq.as_ptr(), 0) })
    }

    /// Completions into `out`; how many.
    pub fn poll(&self, out: &mut [IbvWc]) -> Result<usize, HostError> {
        let poll = self.device.op("ibv_poll_cq", |ops| ops.poll_cq)?;
        let room = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
        // SAFETY: a live CQ and room for `room` completions.
        let n = unsafe { poll(self.cq.as_ptr(), room, out.as_mut_ptr()) };
        usize::try_from(n).map_err(|_| code("ibv_poll_cq", n))
    }

    /// Acknowledges the events taken for this CQ (the library's destroy waits for it).
    pub fn ack_events(&self) {
        let n = self.unacked.swap(0, std::sync::atomic::Ordering::AcqRel);
        if n > 0 {
            // SAFETY: a live CQ and `n` events read for it.
            unsafe { (self.device.verbs.ack_cq_events)(self.cq.as_ptr(), n) };
        }
    }
}

impl Drop for HostCq {
    fn drop(&mut self) {
        self.ack_events();
        // SAFETY: a live CQ; every QP on it holds an `Arc` of it, so none is left.
        unsafe { (self.device.verbs.destroy_cq)(self.cq.as_ptr()) };
    }
}

/// A queue pair; destroyed when dropped.
pub struct HostQp {
    cq: Arc<HostCq>,
    qp: NonNull<IbvQp>,
    /// Its PD, if not the device's own (dropped after the QP).
    _pd: Option<Arc<HostPd>>,
}

// SAFETY: see `HostDevice`; posting needs `&mut`.
unsafe impl Send for HostQp {}

/// Where an RC QP connects (RTR).
#[derive(Debug, Clone, Copy)]
pub struct RcPath {
    pub port: u8,
    /// `enum ibv_mtu`.
    pub mtu: u32,
    pub sgid_index: u8,
    pub dgid: [u8; 16],
    pub dest_qpn: u32,
    pub rq_psn: u32,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
}

/// How an RC QP sends (RTS).
#[derive(Debug, Clone, Copy)]
pub struct RcSend {
    pub sq_psn: u32,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub max_rd_atomic: u8,
}

impl HostQp {
    /// Whether this QP is the one at `address` (a [`DeviceEvent`]'s element).
    pub fn is_at(&self, address: usize) -> bool {
        self.qp.as_ptr() as usize == address
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(
        &mut self,
        attr: &mut IbvQpAttr,
        mask: c_int,
        call: &'static str,
    ) -> Result<(), HostError> {
        // SAFETY: a live QP and a filled attribute structure.
        let rc = unsafe { (self.cq.device.verbs.modify_qp)(self.qp.as_ptr(), attr, mask) };
        checked(call, rc)
    }

    /// To RESET or to the error state (`QPS_RESET`, `QPS_ERR`), from any state.
    pub fn set_state(&mut self, state: u32) -> Result<(), HostError> {
        let mut attr = IbvQpAttr {
            qp_state: state,
            ..IbvQpAttr::default()
        };
        self.modify(&mut attr, QP_STATE, "ibv_modify_qp")
    }

    /// RESET → INIT on `port`, with the remote `access` (`ACCESS_*`) it grants.
    pub fn to_init(&mut self, port: u8, access: c_int) -> Result<(), HostError> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_INIT,
            port_num: port,
            qp_access_flags: access as u32,
            ..IbvQpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_ACCESS_FLAGS,
            "ibv_modify_qp to INIT",
        )
    }

    /// RESET → INIT → RTR → RTS of a UD QP: datagrams with `qkey` are taken, and its sends
    /// start at `sq_psn`.
    pub fn to_rts_ud(&mut self, port: u8, qkey: u32, sq_psn: u32) -> Result<(), HostError> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_INIT,
            port_num: port,
            qkey,
            ..IbvQpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_QKEY,
            "ibv_modify_qp to INIT",
        )?;
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTR,
            ..IbvQpAttr::default()
        };
        self.modify(&mut attr, QP_STATE, "ibv_modify_qp to RTR")?;
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTS,
            sq_psn,
            ..IbvQpAttr::default()
        };
        self.modify(&mut attr, QP_STATE | QP_SQ_PSN, "ibv_modify_qp to RTS")
    }

    /// INIT → RTR towards `path`.
    pub fn to_rtr(&mut self, path: &RcPath) -> Result<(), HostError> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTR,
            path_mtu: path.mtu,
            dest_qp_num: path.dest_qpn,
            rq_psn: path.rq_psn,
            max_dest_rd_atomic: path.max_dest_rd_atomic,
            min_rnr_timer: path.min_rnr_timer,
            ah_attr: IbvAhAttr {
                grh: IbvGlobalRoute {
                    dgid: IbvGid { raw: path.dgid },
                    flow_label: 0,
                    sgid_index: path.sgid_index,
                    hop_limit: 64,
                    traffic_class: 0,
                },
                is_global: 1,
                port_num: path.port,
                ..IbvAhAttr::default()
            },
            ..IbvQpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE
                | QP_AV
                | QP_PATH_MTU
                | QP_DEST_QPN
                | QP_RQ_PSN
                | QP_MAX_DEST_RD_ATOMIC
                | QP_MIN_RNR_TIMER,
            "ibv_modify_qp to RTR",
        )
    }

    /// RTR → RTS.
    pub fn to_rts(&mut self, send: &RcSend) -> Result<(), HostError> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTS,
            sq_psn: send.sq_psn,
            timeout: send.timeout,
            retry_cnt: send.retry_cnt,
            rnr_retry: send.rnr_retry,
            max_rd_atomic: send.max_rd_atomic,
            ..IbvQpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE | QP_TIMEOUT | QP_RETRY_CNT | QP_RNR_RETRY | QP_SQ_PSN | QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp to RTS",
        )
    }

    /// Posts one send work request (its `next` is ignored and cleared).
    pub fn post_send(&mut self, wr: &mut IbvSendWr) -> Result<(), HostError> {
        let post = self.cq.device.op("ibv_post_send", |ops| ops.post_send)?;
        wr.next = ptr::null_mut();
        let mut bad = ptr::null_mut();
        // SAFETY: a live QP; the request and its scatter list are read during the call.
        checked("ibv_post_send", unsafe {
            post(self.qp.as_ptr(), wr, &mut bad)
        })
    }

    /// Posts one receive work request (its `next` is ignored and cleared).
    pub fn post_recv(&mut self, wr: &mut IbvRecvWr) -> Result<(), HostError> {
        let post = self.cq.device.op("ibv_post_recv", |ops| ops.post_recv)?;
        wr.next = ptr::null_mut();
        let mut bad = ptr::null_mut();
        // SAFETY: as for `post_send`.
        checked("ibv_post_recv", unsafe {
            post(self.qp.as_ptr(), wr, &mut bad)
        })
    }
}

impl Drop for HostQp {
    fn drop(&mut self) {
        // SAFETY: a live QP, destroyed once, before its CQ (which it holds).
        unsafe { (self.cq.device.verbs.destroy_qp)(self.qp.as_ptr()) };
    }
}

/// Registers part of `view` in `pd` of `device`.
fn register_view(
    device: &HostDevice,
    pd: NonNull<IbvPd>,
    view: &ContiguousView,
    offset: u64,
    len: u64,
    iova: u64,
    access: c_int,
) -> Result<NonNull<IbvMr>, HostError> {
    let reg = device.verbs.reg_mr_iova.ok_or(HostError {
        call: "ibv_reg_mr_iova",
        reason: "libibverbs is older than rdma-core 20".into(),
    })?;
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= view.len() as u64 && len > 0);
    let (Ok(start), Ok(len), true) = (usize::try_from(offset), usize::try_from(len), inside) else {
        return Err(HostError {
            call: "ibv_reg_mr_iova",
            reason: format!(
                "{len} bytes at {offset} do not fit a {}-byte view",
                view.len()
            ),
        });
    };
    // SAFETY: a live PD of the device and a range inside `view`, which the caller's MR owns
    // from here on, so it outlives the registration.
    let mr = unsafe {
        reg(
            pd.as_ptr(),
            view.as_ptr().add(start).cast::<c_void>(),
            len,
            iova,
            access,
        )
    };
    NonNull::new(mr).ok_or_else(|| errno("ibv_reg_mr_iova"))
}

/// A QP of `qp_type` in `pd` (kept alive by `keep`, if it is not the device's own) on `cq`.
fn create_qp(
    pd: NonNull<IbvPd>,
    keep: Option<Arc<HostPd>>,
    cq: &Arc<HostCq>,
    cap: IbvQpCap,
    qp_type: u32,
) -> Result<HostQp, HostError> {
    let mut init = IbvQpInitAttr {
        qp_context: ptr::null_mut(),
        send_cq: cq.cq.as_ptr(),
        recv_cq: cq.cq.as_ptr(),
        srq: ptr::null_mut(),
        cap,
        qp_type,
        sq_sig_all: 0,
    };
    // SAFETY: a live PD and CQ of one device, and a filled attribute structure.
    let qp = unsafe { (cq.device.verbs.create_qp)(pd.as_ptr(), &mut init) };
    let qp = NonNull::new(qp).ok_or_else(|| errno("ibv_create_qp"))?;
    Ok(HostQp {
        cq: Arc::clone(cq),
        qp,
        _pd: keep,
    })
}

/// A protection domain; deallocated when dropped, after every MR and QP made in it (they
/// hold it).
pub struct HostPd {
    device: Arc<HostDevice>,
    pd: NonNull<IbvPd>,
}

// SAFETY: see `HostDevice`.
unsafe impl Send for HostPd {}
// SAFETY: see `HostDevice`.
unsafe impl Sync for HostPd {}

impl HostPd {
    /// As [`HostDevice::register_part`], in this PD.
    pub fn register_part(
        self: &Arc<Self>,
        view: ContiguousView,
        offset: u64,
        len: u64,
        iova: u64,
        access: c_int,
    ) -> Result<HostMr, HostError> {
        let mr = register_view(&self.device, self.pd, &view, offset, len, iova, access)?;
        Ok(HostMr {
            device: Arc::clone(&self.device),
            mr,
            view: Some(view),
            _pd: Some(Arc::clone(self)),
        })
    }

    /// As [`HostDevice::register_own`], in this PD.
    ///
    /// # Safety
    /// `addr..addr + len` must stay mapped until the MR is dropped.
    pub unsafe fn register_own(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        access: c_int,
    ) -> Result<HostMr, HostError> {
        // SAFETY: a live PD; the caller keeps the memory mapped.
        let mr = unsafe { (self.device.verbs.reg_mr)(self.pd.as_ptr(), addr.cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| errno("ibv_reg_mr"))?;
        Ok(HostMr {
            device: Arc::clone(&self.device),
            mr,
            view: None,
            _pd: Some(Arc::clone(self)),
        })
    }

    /// As [`HostDevice::create_rc_qp`], in this PD; `cq` must be of the same device.
    pub fn create_rc_qp(
        self: &Arc<Self>,
        cq: &Arc<HostCq>,
        cap: IbvQpCap,
    ) -> Result<HostQp, HostError> {
        create_qp(self.pd, Some(Arc::clone(self)), cq, cap, QPT_RC)
    }

    /// A UD QP in this PD on `cq`.
    pub fn create_ud_qp(
        self: &Arc<Self>,
        cq: &Arc<HostCq>,
        cap: IbvQpCap,
    ) -> Result<HostQp, HostError> {
        create_qp(self.pd, Some(Arc::clone(self)), cq, cap, QPT_UD)
    }

    /// An address handle in this PD: `dgid` on `port`, from the GID at `sgid_index`.
    pub fn create_ah(
        self: &Arc<Self>,
        port: u8,
        sgid_index: u8,
        dgid: [u8; 16],
    ) -> Result<HostAh, HostError> {
        let mut attr = IbvAhAttr {
            grh: IbvGlobalRoute {
                dgid: IbvGid { raw: dgid },
                flow_label: 0,
                sgid_index,
                hop_limit: 64,
                traffic_class: 0,
            },
            is_global: 1,
            port_num: port,
            ..IbvAhAttr::default()
        };
        // SAFETY: a live PD and a filled attribute structure.
        let ah = unsafe { (self.device.verbs.create_ah)(self.pd.as_ptr(), &mut attr) };
        let ah = NonNull::new(ah).ok_or_else(|| errno("ibv_create_ah"))?;
        Ok(HostAh {
            pd: Arc::clone(self),
            ah,
        })
    }
}

/// An address handle; destroyed when dropped, before its PD (which it holds).
pub struct HostAh {
    pd: Arc<HostPd>,
    ah: NonNull<c_void>,
}

// SAFETY: see `HostDevice`.
unsafe impl Send for HostAh {}

impl HostAh {
    /// Its address, for a UD send's `wr.ud.ah`.
    pub fn address(&self) -> u64 {
        self.ah.as_ptr() as u64
    }
}

impl Drop for HostAh {
    fn drop(&mut self) {
        // SAFETY: a live AH, destroyed once.
        unsafe { (self.pd.device.verbs.destroy_ah)(self.ah.as_ptr()) };
    }
}

impl Drop for HostPd {
    fn drop(&mut self) {
        // SAFETY: a live PD; every MR and QP in it holds an `Arc` of it, so none is left.
        unsafe { (self.device.verbs.dealloc_pd)(self.pd.as_ptr()) };
    }
}

/// Opens the device called `name`.
fn open_context(verbs: &Verbs, name: &str) -> Result<NonNull<IbvContext>, HostError> {
    let mut count: c_int = 0;
    // SAFETY: a valid out-pointer; the list is freed before returning.
    let list = unsafe { (verbs.get_device_list)(&mut count) };
    if list.is_null() {
        return Err(errno("ibv_get_device_list"));
    }
    let mut opened = Err(HostError {
        call: "ibv_open_device",
        reason: format!("no RDMA device is called {name}"),
    });
    for i in 0..usize::try_from(count).unwrap_or(0) {
        // SAFETY: `count` entries, each a device of the live list.
        let device = unsafe { *list.add(i) };
        // SAFETY: as above; compared before the list is freed.
        let this = unsafe { CStr::from_ptr((verbs.get_device_name)(device)) };
        if this.to_bytes() == name.as_bytes() {
            // SAFETY: as above.
            let context = unsafe { (verbs.open_device)(device) };
            opened = NonNull::new(context).ok_or_else(|| errno("ibv_open_device"));
            break;
        }
    }
    // SAFETY: the list came from get_device_list; an open context holds its own reference
    // to its device.
    unsafe { (verbs.free_device_list)(list) };
    opened
}
