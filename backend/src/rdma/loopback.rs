//! One SEND between two RC QPs of one port of a host device: proof that the device works
//! and that every call and structure of the data path (`abi.rs`, `verbs.rs`) is right,
//! before any guest depends on them (`vfio-user-pvrdma rdma-devices --loopback`).
//!
//! The receive side is registered the way guest memory will be: a shared memory file plays
//! the guest's RAM, two of its pages out of order are made one range (`view.rs`), and that
//! range is registered at a made-up I/O virtual address (`ibv_reg_mr_iova`), which the
//! receive's scatter entry names. The bytes must land in those two pages, in list order.

use std::ffi::c_int;
use std::net::Ipv6Addr;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress};

use super::abi::*;
use super::devices::{self, GidKind, HostDevice};
use super::host::{HostDevice as Device, HostError, RcPath, RcSend};
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
pub fn run(verbs: &Arc<Verbs>, device: &HostDevice) -> Result<LoopbackReport, LoopbackError> {
    let fail = |step: &'static str, reason: String| LoopbackError {
        device: device.name.clone(),
        step,
        reason,
    };
    let host = |e: HostError| LoopbackError {
        device: device.name.clone(),
        step: e.call,
        reason: e.reason,
    };
    let (port, gid) = device
        .ports
        .iter()
        .filter(|p| p.active)
        .find_map(|p| pick_gid(p).map(|g| (p, g)))
        .ok_or_else(|| fail("finding an active port with a GID", "none".into()))?;
    let opened = Device::open(Arc::clone(verbs), &device.name).map_err(host)?;
    let mtu = opened.port(port.number).map_err(host)?.active_mtu;

    // The sender's buffer is the server's own memory; the receiver's is the stand-in guest
    // RAM, two of its pages made one range and registered at the guest's address.
    let mut buffer: Vec<u8> = (0..MESSAGE).map(|i| (i % 251) as u8).collect();
    // SAFETY: `buffer` is neither moved nor freed before `own` (declared after it) drops.
    let own = unsafe { opened.register_own(buffer.as_mut_ptr(), buffer.len(), ACCESS_LOCAL_WRITE) }
        .map_err(host)?;
    let ram = stand_in_ram().map_err(|reason| fail("making the stand-in guest RAM", reason))?;
    let pages = RECEIVE_PAGES.map(|i| RAM_AT + i * PAGE as u64);
    let view = ContiguousView::map(&ram, &pages, PAGE)
        .map_err(|e| fail("mapping the guest pages as one range", e.to_string()))?;
    let guest = opened
        .register(view, IOVA, ACCESS_LOCAL_WRITE)
        .map_err(host)?;

    let cq = opened.create_cq(16).map_err(host)?;
    let cap = IbvQpCap {
        max_send_wr: 4,
        max_recv_wr: 4,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let mut a = opened.create_rc_qp(&cq, cap).map_err(host)?;
    let mut b = opened.create_rc_qp(&cq, cap).map_err(host)?;
    let (qpn_a, qpn_b) = (a.qpn(), b.qpn());
    for (qp, remote) in [(&mut a, qpn_b), (&mut b, qpn_a)] {
        qp.to_init(port.number, ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE)
            .map_err(host)?;
        qp.to_rtr(&RcPath {
            port: port.number,
            mtu,
            sgid_index: u8::try_from(gid.index).unwrap_or(0),
            dgid: gid.gid,
            dest_qpn: remote,
            rq_psn: 0,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
        })
        .map_err(host)?;
        qp.to_rts(&RcSend {
            sq_psn: 0,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
        })
        .map_err(host)?;
    }

    let mut recv_sge = IbvSge {
        addr: IOVA,
        length: MESSAGE as u32,
        lkey: guest.lkey(),
    };
    b.post_recv(&mut IbvRecvWr {
        wr_id: 2,
        next: ptr::null_mut(),
        sg_list: &mut recv_sge,
        num_sge: 1,
    })
    .map_err(host)?;
    let mut send_sge = IbvSge {
        addr: buffer.as_ptr() as u64,
        length: MESSAGE as u32,
        lkey: own.lkey(),
    };
    // Completions are waited for as the server's event loop will: the CQ armed, the
    // channel's fd polled, the event taken and acknowledged, then the CQ polled.
    cq.arm().map_err(host)?;
    let started = Instant::now();
    a.post_send(&mut IbvSendWr {
        wr_id: 1,
        sg_list: &mut send_sge,
        num_sge: 1,
        opcode: WR_SEND,
        send_flags: SEND_SIGNALED,
        ..IbvSendWr::default()
    })
    .map_err(host)?;
    let mut completions = Vec::new();
    let mut events = 0;
    let cqs = [Arc::clone(&cq)];
    while completions.len() < 2 {
        let left = COMPLETION_TIMEOUT.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(fail(
                "waiting for the completions",
                format!(
                    "{} of 2 within {COMPLETION_TIMEOUT:?} ({events} channel events)",
                    completions.len()
                ),
            ));
        }
        let mut pollfd = libc::pollfd {
            fd: opened.channel_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().min(1000) as c_int) };
        if ready <= 0 {
            continue;
        }
        if opened.take_event(&cqs).map_err(host)?.is_none() {
            continue;
        }
        events += 1;
        // Re-armed before polling, so a completion that lands between the poll and the
        // next wait still raises an event.
        cq.arm().map_err(host)?;
        loop {
            let mut wc = [IbvWc::default(); 2];
            let n = cq.poll(&mut wc).map_err(host)?;
            if n == 0 {
                break;
            }
            completions.extend_from_slice(&wc[..n]);
        }
    }
    cq.ack_events();
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
    drop((a, b, own, guest));
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
