//! One SEND between two RC QPs of one port of a host device: proof that the device works
//! and that every call and structure of the data path (`abi.rs`, `verbs.rs`) is right,
//! before any guest depends on them (`vfio-user-pvrdma rdma-devices --loopback`).
//!
//! The receive side is registered the way guest memory will be: a shared memory file plays
//! the guest's RAM, two of its pages out of order are made one range (`view.rs`), and that
//! range is registered at a made-up I/O virtual address (`ibv_reg_mr_iova`), which the
//! receive's scatter entry names. The bytes must land in those two pages, in list order.

use std::ffi::{CStr, c_int, c_void};
use std::net::Ipv6Addr;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress};

use super::abi::*;
use super::devices::{self, GidKind, HostDevice};
use super::verbs::Verbs;
use super::view::ContiguousView;
use crate::GuestMemory;

/// What one loopback run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopbackReport {
    pub device: String,
    pub port: u8,
    pub gid_index: u32,
    pub gid: [u8; 16],
    pub bytes: usize,
    /// From the post of the SEND to both completions.
    pub elapsed: Duration,
}

impl std::fmt::Display for LoopbackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port {}: a {}-byte SEND between two RC QPs, into two scattered pages of shared \
             memory registered at an I/O virtual address, completed in {} µs (GID {} {}), \
             its completions found through a completion channel",
            self.device,
            self.port,
            self.bytes,
            self.elapsed.as_micros(),
            self.gid_index,
            Ipv6Addr::from(self.gid)
        )
    }
}

/// Why a loopback run failed: the step, and what the library said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {step} failed: {reason}")]
pub struct LoopbackError {
    pub device: String,
    pub step: &'static str,
    pub reason: String,
}

/// How long the completions may take: Soft-RoCE in a TCG guest is slow, hardware fast.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
/// A page of the stand-in guest RAM.
const PAGE: usize = 4096;
/// The message: two pages.
const MESSAGE: usize = 2 * PAGE;
/// The stand-in guest RAM: pages of a shared memory file, at this guest physical address.
const RAM_PAGES: u64 = 8;
const RAM_AT: u64 = 0x10_0000;
/// The guest pages the receive lands in, in list order: scattered and out of order.
const RECEIVE_PAGES: [u64; 2] = [6, 1];
/// The address the receive MR is registered at, as a guest's user-space buffer would be.
const IOVA: u64 = 0x7f12_3400_0000;

/// Runs the loopback on the first active port of `device` (which [`devices::list`] gave).
pub fn run(verbs: &Verbs, device: &HostDevice) -> Result<LoopbackReport, LoopbackError> {
    let fail = |step: &'static str, reason: String| LoopbackError {
        device: device.name.clone(),
        step,
        reason,
    };
    let errno = || std::io::Error::last_os_error().to_string();
    let (port, gid) = device
        .ports
        .iter()
        .filter(|p| p.active)
        .find_map(|p| pick_gid(p).map(|g| (p, g)))
        .ok_or_else(|| fail("finding an active port with a GID", "none".into()))?;

    let context = Handle::open(verbs, &device.name).map_err(|reason| fail("opening", reason))?;
    let ctx = context.0.as_ptr();
    let mut attr = IbvPortAttr::default();
    // SAFETY: an open context and a zeroed attribute prefix (see `IbvPortAttr`).
    if unsafe { (verbs.query_port)(ctx, port.number, &mut attr) } != 0 {
        return Err(fail("ibv_query_port", errno()));
    }

    // Each object below is made from the context or objects made from it, passed to the
    // library as the pointer it returned, and destroyed by its guard; guards drop in the
    // reverse order of their declaration, so objects go before what they were made from.
    // SAFETY: an open context.
    let pd = unsafe { (verbs.alloc_pd)(ctx) };
    // SAFETY: the guard hands back the PD the library made, once.
    let pd = Guard::new(pd, |p| unsafe { (verbs.dealloc_pd)(p) })
        .ok_or_else(|| fail("ibv_alloc_pd", errno()))?;
    let mut buffer: Vec<u8> = (0..MESSAGE).map(|i| (i % 251) as u8).collect();
    // SAFETY: a live PD and a buffer that outlives the MR (declared before its guard).
    let mr = unsafe {
        (verbs.reg_mr)(
            pd.ptr(),
            buffer.as_mut_ptr().cast::<c_void>(),
            buffer.len(),
            ACCESS_LOCAL_WRITE,
        )
    };
    // SAFETY: as for the PD.
    let mr = Guard::new(mr, |m| unsafe { (verbs.dereg_mr)(m) })
        .ok_or_else(|| fail("ibv_reg_mr", errno()))?;
    let ram = stand_in_ram().map_err(|reason| fail("making the stand-in guest RAM", reason))?;
    let pages = RECEIVE_PAGES.map(|i| RAM_AT + i * PAGE as u64);
    let view = ContiguousView::map(&ram, &pages, PAGE)
        .map_err(|e| fail("mapping the guest pages as one range", e.to_string()))?;
    let reg_mr_iova = verbs.reg_mr_iova.ok_or_else(|| {
        fail(
            "looking up ibv_reg_mr_iova",
            "libibverbs is older than rdma-core 20".into(),
        )
    })?;
    // SAFETY: a live PD and a view that outlives the MR (declared before its guard).
    let guest_mr = unsafe {
        reg_mr_iova(
            pd.ptr(),
            view.as_ptr().cast::<c_void>(),
            view.len(),
            IOVA,
            ACCESS_LOCAL_WRITE,
        )
    };
    // SAFETY: as for the PD.
    let guest_mr = Guard::new(guest_mr, |m| unsafe { (verbs.dereg_mr)(m) })
        .ok_or_else(|| fail("ibv_reg_mr_iova", errno()))?;
    // SAFETY: an open context.
    let channel = unsafe { (verbs.create_comp_channel)(ctx) };
    // SAFETY: as for the PD.
    let channel = Guard::new(channel, |c| unsafe { (verbs.destroy_comp_channel)(c) })
        .ok_or_else(|| fail("ibv_create_comp_channel", errno()))?;
    // SAFETY: an open context and its live channel; no user context.
    let cq = unsafe { (verbs.create_cq)(ctx, 16, ptr::null_mut(), channel.ptr(), 0) };
    // SAFETY: as for the PD.
    let cq = Guard::new(cq, |c| unsafe { (verbs.destroy_cq)(c) })
        .ok_or_else(|| fail("ibv_create_cq", errno()))?;
    let make_qp = || {
        let mut init = IbvQpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: cq.ptr(),
            recv_cq: cq.ptr(),
            srq: ptr::null_mut(),
            cap: IbvQpCap {
                max_send_wr: 4,
                max_recv_wr: 4,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a live PD and CQ, and a filled attribute structure.
        let qp = unsafe { (verbs.create_qp)(pd.ptr(), &mut init) };
        // SAFETY: as for the PD.
        Guard::new(qp, |q| unsafe { (verbs.destroy_qp)(q) })
    };
    let a = make_qp().ok_or_else(|| fail("ibv_create_qp", errno()))?;
    let b = make_qp().ok_or_else(|| fail("ibv_create_qp", errno()))?;
    // SAFETY: live QPs the library made.
    let (qpn_a, qpn_b) = unsafe { ((*a.ptr()).qp_num, (*b.ptr()).qp_num) };
    for (qp, remote) in [(&a, qpn_b), (&b, qpn_a)] {
        connect(verbs, qp.ptr(), port.number, attr.active_mtu, gid, remote)
            .map_err(|(step, rc)| fail(step, std::io::Error::from_raw_os_error(rc).to_string()))?;
    }

    // SAFETY: the context's operation table, filled by the provider at open.
    let ops = unsafe { &(*ctx).ops };
    let (Some(post_recv), Some(post_send), Some(poll_cq), Some(req_notify_cq)) =
        (ops.post_recv, ops.post_send, ops.poll_cq, ops.req_notify_cq)
    else {
        return Err(fail(
            "reading the provider's operation table",
            "empty".into(),
        ));
    };
    // SAFETY: the MRs are live, so their keys are readable.
    let (lkey, guest_lkey) = unsafe { ((*mr.ptr()).lkey, (*guest_mr.ptr()).lkey) };
    let mut recv_sge = IbvSge {
        addr: IOVA,
        length: MESSAGE as u32,
        lkey: guest_lkey,
    };
    let mut recv = IbvRecvWr {
        wr_id: 2,
        next: ptr::null_mut(),
        sg_list: &mut recv_sge,
        num_sge: 1,
    };
    let mut bad_recv = ptr::null_mut();
    // SAFETY: a QP in RTS, a work request whose list lives until the completion is polled.
    let rc = unsafe { post_recv(b.ptr(), &mut recv, &mut bad_recv) };
    if rc != 0 {
        return Err(fail(
            "ibv_post_recv",
            std::io::Error::from_raw_os_error(rc).to_string(),
        ));
    }
    let mut send_sge = IbvSge {
        addr: buffer.as_ptr() as u64,
        length: MESSAGE as u32,
        lkey,
    };
    let mut send = IbvSendWr {
        wr_id: 1,
        sg_list: &mut send_sge,
        num_sge: 1,
        opcode: WR_SEND,
        send_flags: SEND_SIGNALED,
        ..IbvSendWr::default()
    };
    let mut bad_send = ptr::null_mut();
    // Completions are waited for as the server's event loop will: the CQ armed, the
    // channel's fd polled, the event read and acknowledged, then the CQ polled.
    // SAFETY: a live CQ with a channel.
    if unsafe { req_notify_cq(cq.ptr(), 0) } != 0 {
        return Err(fail("ibv_req_notify_cq", errno()));
    }
    // SAFETY: the channel is live; its fd is the kernel's, owned by the channel.
    let channel_fd = unsafe { (*channel.ptr()).fd };
    // Every event read is acknowledged before the CQ is destroyed, on every way out
    // (ibv_destroy_cq waits for that): this drops before the CQ's guard.
    let mut events = Acks {
        verbs,
        cq: cq.ptr(),
        count: 0,
    };
    let started = Instant::now();
    // SAFETY: as for the receive.
    let rc = unsafe { post_send(a.ptr(), &mut send, &mut bad_send) };
    if rc != 0 {
        return Err(fail(
            "ibv_post_send",
            std::io::Error::from_raw_os_error(rc).to_string(),
        ));
    }
    let mut completions = Vec::new();
    while completions.len() < 2 {
        let left = COMPLETION_TIMEOUT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(fail(
                "waiting for the completions",
                format!(
                    "{} of 2 within {COMPLETION_TIMEOUT:?} ({} channel events)",
                    completions.len(),
                    events.count
                ),
            ));
        }
        let mut pollfd = libc::pollfd {
            fd: channel_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().min(1000) as c_int) };
        if ready <= 0 {
            continue;
        }
        let (mut event_cq, mut event_context) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: the channel has an event (its fd is readable); out-pointers are valid.
        if unsafe { (verbs.get_cq_event)(channel.ptr(), &mut event_cq, &mut event_context) } != 0 {
            return Err(fail("ibv_get_cq_event", errno()));
        }
        if event_cq != cq.ptr() {
            return Err(fail("ibv_get_cq_event", "an event for another CQ".into()));
        }
        events.count += 1;
        // Re-armed before polling, so a completion that lands between the poll and the
        // next wait still raises an event.
        // SAFETY: a live CQ with a channel.
        if unsafe { req_notify_cq(cq.ptr(), 0) } != 0 {
            return Err(fail("ibv_req_notify_cq", errno()));
        }
        loop {
            let mut wc = [IbvWc::default(); 2];
            // SAFETY: room for two completions.
            let n = unsafe { poll_cq(cq.ptr(), 2, wc.as_mut_ptr()) };
            if n < 0 {
                return Err(fail("ibv_poll_cq", format!("returned {n}")));
            }
            if n == 0 {
                break;
            }
            completions.extend_from_slice(&wc[..n as usize]);
        }
    }
    let elapsed = started.elapsed();
    for wc in &completions {
        if wc.status != WC_SUCCESS {
            return Err(fail(
                "the SEND",
                format!(
                    "work request {} completed with status {} (vendor error {:#x})",
                    wc.wr_id, wc.status, wc.vendor_err
                ),
            ));
        }
    }
    let received = completions.iter().find(|wc| wc.opcode == WC_RECV);
    if received.map(|wc| wc.byte_len as usize) != Some(MESSAGE) {
        return Err(fail("the SEND", format!("completions {completions:?}")));
    }
    for (n, &page) in pages.iter().enumerate() {
        let mut landed = vec![0u8; PAGE];
        ram.read_slice(&mut landed, GuestAddress(page))
            .map_err(|e| fail("reading the guest pages back", e.to_string()))?;
        if landed[..] != buffer[n * PAGE..(n + 1) * PAGE] {
            return Err(fail(
                "the SEND",
                format!("guest page {page:#x} does not hold part {n} of the message"),
            ));
        }
    }
    Ok(LoopbackReport {
        device: device.name.clone(),
        port: port.number,
        gid_index: gid.index,
        gid: gid.gid,
        bytes: MESSAGE,
        elapsed,
    })
}

/// A shared memory file of [`RAM_PAGES`] pages at [`RAM_AT`], as QEMU's `share=on` RAM.
fn stand_in_ram() -> Result<GuestMemory, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid NUL-terminated name; the fd is owned by the `File` below.
    let fd = unsafe { libc::memfd_create(c"pvrdma-loopback".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a fresh fd nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(RAM_PAGES * PAGE as u64)
        .map_err(|e| e.to_string())?;
    GuestMemory::from_ranges_with_files([(
        GuestAddress(RAM_AT),
        RAM_PAGES as usize * PAGE,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| e.to_string())
}

/// The GID a loopback addresses: on Ethernet a RoCE v2 IPv4 one (else any RoCE), on
/// InfiniBand entry 0.
fn pick_gid(port: &devices::Port) -> Option<devices::GidEntry> {
    let ipv4 = |g: &&devices::GidEntry| g.gid[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    match port.link_layer {
        devices::LinkLayer::Ethernet => port
            .gids
            .iter()
            .filter(ipv4)
            .find(|g| g.kind == Some(GidKind::RoceV2))
            .or_else(|| port.gids.iter().find(ipv4))
            .or_else(|| port.gids.first())
            .copied(),
        _ => port.gids.iter().find(|g| g.index == 0).copied(),
    }
}

/// RESET → INIT → RTR → RTS towards `remote` on the same port and GID; the failing step and
/// its return code on error.
fn connect(
    verbs: &Verbs,
    qp: *mut IbvQp,
    port: u8,
    mtu: u32,
    gid: devices::GidEntry,
    remote: u32,
) -> Result<(), (&'static str, c_int)> {
    let modify = |attr: &mut IbvQpAttr, mask: c_int, step: &'static str| {
        // SAFETY: a live QP and a filled attribute structure.
        let rc = unsafe { (verbs.modify_qp)(qp, attr, mask) };
        if rc == 0 { Ok(()) } else { Err((step, rc)) }
    };
    let mut init = IbvQpAttr {
        qp_state: QPS_INIT,
        pkey_index: 0,
        port_num: port,
        qp_access_flags: (ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE) as u32,
        ..IbvQpAttr::default()
    };
    modify(
        &mut init,
        QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_ACCESS_FLAGS,
        "ibv_modify_qp to INIT",
    )?;
    let mut rtr = IbvQpAttr {
        qp_state: QPS_RTR,
        path_mtu: mtu,
        dest_qp_num: remote,
        rq_psn: 0,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 12,
        ah_attr: IbvAhAttr {
            grh: IbvGlobalRoute {
                dgid: IbvGid { raw: gid.gid },
                flow_label: 0,
                sgid_index: u8::try_from(gid.index).unwrap_or(0),
                hop_limit: 1,
                traffic_class: 0,
            },
            is_global: 1,
            port_num: port,
            ..IbvAhAttr::default()
        },
        ..IbvQpAttr::default()
    };
    modify(
        &mut rtr,
        QP_STATE
            | QP_AV
            | QP_PATH_MTU
            | QP_DEST_QPN
            | QP_RQ_PSN
            | QP_MAX_DEST_RD_ATOMIC
            | QP_MIN_RNR_TIMER,
        "ibv_modify_qp to RTR",
    )?;
    let mut rts = IbvQpAttr {
        qp_state: QPS_RTS,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        sq_psn: 0,
        max_rd_atomic: 1,
        ..IbvQpAttr::default()
    };
    modify(
        &mut rts,
        QP_STATE | QP_TIMEOUT | QP_RETRY_CNT | QP_RNR_RETRY | QP_SQ_PSN | QP_MAX_QP_RD_ATOMIC,
        "ibv_modify_qp to RTS",
    )
}

/// A library object, destroyed by `destroy` when dropped.
struct Guard<T, F: Fn(*mut T) -> c_int> {
    object: NonNull<T>,
    destroy: F,
}

impl<T, F: Fn(*mut T) -> c_int> Guard<T, F> {
    /// `None` for the null a failed creation returns.
    fn new(object: *mut T, destroy: F) -> Option<Self> {
        NonNull::new(object).map(|object| Guard { object, destroy })
    }

    fn ptr(&self) -> *mut T {
        self.object.as_ptr()
    }
}

impl<T, F: Fn(*mut T) -> c_int> Drop for Guard<T, F> {
    fn drop(&mut self) {
        (self.destroy)(self.object.as_ptr());
    }
}

/// Completion events read from a CQ's channel, acknowledged when dropped.
struct Acks<'a> {
    verbs: &'a Verbs,
    cq: *mut IbvCq,
    count: u32,
}

impl Drop for Acks<'_> {
    fn drop(&mut self) {
        // SAFETY: the CQ outlives this (declared after its guard) and `count` events were
        // read for it.
        unsafe { (self.verbs.ack_cq_events)(self.cq, self.count) };
    }
}

/// An open device context, closed when dropped.
struct Handle<'a>(NonNull<IbvContext>, &'a Verbs);

impl<'a> Handle<'a> {
    fn open(verbs: &'a Verbs, name: &str) -> Result<Handle<'a>, String> {
        let mut count: c_int = 0;
        // SAFETY: a valid out-pointer; the list is freed before returning.
        let list = unsafe { (verbs.get_device_list)(&mut count) };
        if list.is_null() {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut opened = Err(format!("no device named {name}"));
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: `count` entries, each a device of the live list.
            let device = unsafe { *list.add(i) };
            // SAFETY: as above; the name is copied before the list is freed.
            let this = unsafe { CStr::from_ptr((verbs.get_device_name)(device)) };
            if this.to_bytes() == name.as_bytes() {
                // SAFETY: as above.
                let context = unsafe { (verbs.open_device)(device) };
                opened = NonNull::new(context)
                    .map(|c| Handle(c, verbs))
                    .ok_or_else(|| std::io::Error::last_os_error().to_string());
                break;
            }
        }
        // SAFETY: the list came from get_device_list; an open context holds its own
        // reference to its device.
        unsafe { (verbs.free_device_list)(list) };
        opened
    }
}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by `Handle::open`, every object made from it is dropped before
        // (guards are declared after the handle in `run`).
        unsafe { (self.1.close_device)(self.0.as_ptr()) };
    }
}
