//! Two guests on one real `vfio-user-pvrdma` process, played by the host-side test driver
//! over two of the server's sockets (`SocketBus`: the guest RAM's memfd DMA_MAP'ed, the MSI-X
//! eventfds assigned, every BAR access a vfio-user REGION_READ/REGION_WRITE message that
//! waits for its reply). The server joins both functions into its memcpy fabric, so what
//! guest A posts is copied straight into guest B's memory.
//!
//! Doorbells are *trapped* or *exit-free*, as the server runs ([`Mode`]). Trapped: a
//! REGION_WRITE to BAR2 sent over the socket, the client blocked until the server has
//! processed it and replied, as QEMU's vCPU is with posted writes off. Exit-free: a plain
//! store into BAR2 mapped from the memfd the server sent (as QEMU maps it into the guest),
//! which the server's poller finds. Commands stay trapped register accesses in both modes.

use std::hint::spin_loop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vfio_user_pvrdma::abi::{
    Command, Cqe, CreateMrRequest, GID_TYPE_ROCE_V1, PAGE_SIZE, QpAttr, SendWqeHeader, Sge, access,
    qp_type, send_flags, uar, wc_opcode, wc_status, wr_opcode,
};
use zerocopy::IntoBytes;

use crate::driver::bus::{BAR_UAR, Bus};
use crate::driver::commands::header;
use crate::driver::layout::{PageDir, QpOwner, QpSizes};
use crate::driver::memory::{self, GuestMemory, PageAllocator};
use crate::driver::socket_bus::{QUIET_LOG, SocketBus, SocketServer};
use crate::driver::verbs::{self, QpSpec, RC_INIT_MASK, RC_RTR_MASK, RC_RTS_MASK, ipv4_gid};
use crate::driver::{Cq, Driver, Mr, Qp, Uc};

pub type D = Driver<SocketBus>;

/// How the server takes doorbells (its `--doorbells`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Trapped,
    ExitFree,
}

impl Mode {
    /// The name `--doorbells` and the JSON use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Trapped => "trapped",
            Mode::ExitFree => "exit-free",
        }
    }
}

/// The benchmark QPs: room for a batch of 32 sends, and 512 pre-posted receives (the depth
/// `ibv_rc_pingpong` uses), one SGE each.
pub const SIZES: QpSizes = QpSizes {
    max_send_wr: 64,
    max_recv_wr: RX_DEPTH,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};
/// Receives posted up front.
pub const RX_DEPTH: u32 = 512;
/// Receives re-posted at once (one RQ doorbell) once this many were consumed.
pub const REPOST: u32 = 256;
/// Entries of each CQ.
const CQE: u32 = 1024;
/// Every 64th SEND is signaled (the SQ is 64 deep).
const SIGNAL_EVERY: u64 = 64;

/// The guests' registered buffer: user virtual address and length.
const BUF_VA: u64 = 0x7f3a_0000_0000;
/// The second, physically contiguous buffer (RDMA WRITE only): its address and length.
const CONTIG_VA: u64 = 0x7f3b_0000_0000;
const CONTIG_LEN: u64 = 1 << 20;

/// Which registered buffer an RDMA WRITE uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// 4 KiB pages scattered in guest-physical memory (in reverse order), as a malloc'ed
    /// buffer of a guest with 4 KiB pages is: one copy per page.
    Scattered,
    /// Pages contiguous and in order, as a buffer inside one huge page of a guest whose RAM
    /// and application use huge pages: the copy runs in one piece.
    Contiguous,
}
const BUF_LEN: u64 = 2 << 20;
/// Offsets in the buffer: RDMA WRITE source (A) and target (B), up to 1 MiB …
const RDMA_AT: u64 = 0;
/// … the one receive buffer every receive points at (as in `ibv_rc_pingpong`) …
const RECV_AT: u64 = 1 << 20;
/// … and the SEND payload.
const SEND_AT: u64 = (1 << 20) + PAGE_SIZE;

/// Guest RAM the driver allocates rings, tables and buffers from (per guest).
const WORK_RAM: u64 = 64 << 20;

/// Polls of an empty CQ after which a poller yields its CPU between polls, so that a
/// spinning guest cannot starve a server thread when there are fewer CPUs than runnable
/// threads (p99.9 would otherwise be scheduler time slices).
const YIELD_AFTER: u32 = 2048;

/// How long a spinning poller waits for a completion before giving up.
const STALL: Duration = Duration::from_secs(10);

/// Every remote right (and LOCAL_WRITE, which IB requires with REMOTE_WRITE).
const ALL_ACCESS: u32 =
    access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC;

/// One guest: a probed function with a user context, a PD, a send and a receive CQ, an RC QP
/// and a registered buffer.
pub struct Guest {
    pub d: D,
    pub gid: [u8; 16],
    pub uc: Uc,
    pub pd: u32,
    pub scq: Cq,
    pub rcq: Cq,
    pub qp: Qp,
    pub mr: Mr,
    /// A second MR over physically contiguous pages ([`Buffer::Contiguous`]).
    pub contiguous: Mr,
    /// BAR2 offset and value of this QP's SQ and RQ doorbells.
    sq_bell: (u64, u32),
    rq_bell: (u64, u32),
    /// BAR2 mapped from the server's memfd (exit-free doorbells), or `None` (trapped).
    uar: Option<GuestMemoryMmap>,
    /// Receives posted and not yet consumed.
    rx_posted: u32,
}

impl Guest {
    fn new(mut d: D, ip: [u8; 4], mode: Mode) -> Guest {
        let gid = ipv4_gid(ip);
        let uar = match mode {
            Mode::Trapped => None,
            Mode::ExitFree => Some(
                d.bus
                    .map_region(BAR_UAR)
                    .expect("an exit-free server sends BAR2's memfd with its REGION_INFO"),
            ),
        };
        d.probe();
        d.create_bind(0, gid, GID_TYPE_ROCE_V1)
            .expect("CREATE_BIND");
        let uc = d.open_context().expect("CREATE_UC");
        let pd = d.create_pd(uc.handle).expect("CREATE_PD");
        let scq = d.create_cq_on(uc, CQE).expect("CREATE_CQ");
        let rcq = d.create_cq_on(uc, CQE).expect("CREATE_CQ");
        let qp = d
            .create_qp_with(spec(uc, pd, &scq, &rcq))
            .expect("CREATE_QP");
        let mr = d
            .reg_user_mr(pd, BUF_VA, BUF_LEN, ALL_ACCESS)
            .expect("CREATE_MR");
        let contiguous = d
            .reg_contiguous_user_mr(pd, CONTIG_VA, CONTIG_LEN, ALL_ACCESS)
            .expect("CREATE_MR (contiguous)");
        let page = u64::from(uc.uar) * PAGE_SIZE;
        Guest {
            sq_bell: (page + uar::QP_OFFSET, qp.handle | uar::QP_SEND),
            rq_bell: (page + uar::QP_OFFSET, qp.handle | uar::QP_RECV),
            uar,
            d,
            gid,
            uc,
            pd,
            scq,
            rcq,
            qp,
            mr,
            contiguous,
            rx_posted: 0,
        }
    }

    /// A doorbell. Trapped: one REGION_WRITE of BAR2 and its reply, straight on the client
    /// (as QEMU forwards a vCPU's MMIO write). Exit-free: one store into the mapped BAR2,
    /// ordered after the WQE and index writes before it (release), as the guest's MMIO
    /// write is.
    fn doorbell(&mut self, (offset, value): (u64, u32)) {
        if let Some(uar) = &self.uar {
            uar.store(value, GuestAddress(offset), Ordering::Release)
                .expect("the doorbell lies in BAR2");
            return;
        }
        self.d
            .bus
            .client()
            .region_write(BAR_UAR, offset, &value.to_le_bytes())
            .unwrap_or_else(|e| panic!("doorbell REGION_WRITE: {e}"));
    }

    pub fn ring_sq(&mut self) {
        self.doorbell(self.sq_bell);
    }

    /// A registered buffer: its MR and user virtual address.
    fn buffer(&self, which: Buffer) -> (&Mr, u64) {
        match which {
            Buffer::Scattered => (&self.mr, BUF_VA),
            Buffer::Contiguous => (&self.contiguous, CONTIG_VA),
        }
    }

    /// Guest address behind byte `offset` of a registered buffer.
    fn phys(&self, which: Buffer, offset: u64) -> u64 {
        let (mr, va) = self.buffer(which);
        mr.buffer
            .as_ref()
            .expect("a user MR")
            .translate(va + offset)
    }

    fn sge(&self, offset: u64, len: u32) -> Sge {
        self.sge_in(Buffer::Scattered, offset, len)
    }

    fn sge_in(&self, which: Buffer, offset: u64, len: u32) -> Sge {
        let (mr, va) = self.buffer(which);
        Sge {
            addr: va + offset,
            length: len,
            lkey: mr.lkey,
        }
    }

    /// Writes a send WQE into the SQ (no doorbell).
    fn push_send(&mut self, wqe: &[u8]) {
        self.d
            .post_send_raw(&self.qp, wqe)
            .unwrap_or_else(|e| panic!("SQ post: {e:?}"));
    }

    /// Posts `count` receives of 64 bytes and rings the RQ doorbell once.
    fn post_receives(&mut self, count: u32) {
        let sge = self.sge(RECV_AT, 64);
        for i in 0..count {
            self.d
                .post_recv_raw(&self.qp, u64::from(i), &[sge])
                .unwrap_or_else(|e| panic!("RQ post: {e:?}"));
        }
        self.rx_posted += count;
        self.doorbell(self.rq_bell);
    }

    /// After a receive was consumed: re-posts a batch once [`REPOST`] are used up.
    fn consumed_receive(&mut self) {
        self.rx_posted -= 1;
        if self.rx_posted <= RX_DEPTH - REPOST {
            self.post_receives(RX_DEPTH - self.rx_posted);
        }
    }

    /// The pinging side of the ping-pong: `total` round trips of a 64-byte SEND and the
    /// answer's receive CQE, calling `between(i)` after each post (the answering guest,
    /// when one thread plays both). Returns the round trips (ns) after `warmup`.
    fn ping(
        &mut self,
        warmup: usize,
        total: u64,
        abort: &AtomicBool,
        mut between: impl FnMut(u64),
    ) -> Vec<u64> {
        let (plain, signaled) = pingpong_wqes(self);
        let mut samples = Vec::with_capacity((total as usize).saturating_sub(warmup));
        for i in 0..total {
            let signal = (i + 1).is_multiple_of(SIGNAL_EVERY);
            let start = Instant::now();
            self.push_send(if signal { &signaled } else { &plain });
            self.ring_sq();
            between(i);
            let cqe = self.wait(Which::Recv, abort);
            let rtt = start.elapsed();
            assert_eq!((cqe.opcode, cqe.byte_len), (wc_opcode::RECV, 64));
            if i >= warmup as u64 {
                samples.push(rtt.as_nanos() as u64);
            }
            if signal {
                self.wait(Which::Send, abort);
            }
            self.consumed_receive();
        }
        samples
    }

    /// The answering side of the ping-pong's round trip `i`: waits for the SEND, answers
    /// with one (every [`SIGNAL_EVERY`]th signaled, and its completion reaped), re-posts
    /// receives when due.
    fn answer(&mut self, i: u64, plain: &[u8], signaled: &[u8], abort: &AtomicBool) {
        let cqe = self.wait(Which::Recv, abort);
        assert_eq!((cqe.opcode, cqe.byte_len), (wc_opcode::RECV, 64));
        let signal = (i + 1).is_multiple_of(SIGNAL_EVERY);
        self.push_send(if signal { signaled } else { plain });
        self.ring_sq();
        if signal {
            self.wait(Which::Send, abort);
        }
        self.consumed_receive();
    }

    /// The next CQE of the send or receive CQ (`which`), polling guest memory (spinning,
    /// then yielding after [`YIELD_AFTER`] empty polls); panics if none comes within
    /// [`STALL`] or `abort` is set, and on any status but SUCCESS.
    fn wait(&mut self, which: Which, abort: &AtomicBool) -> Cqe {
        let cq = match which {
            Which::Send => &self.scq,
            Which::Recv => &self.rcq,
        };
        let mut spins = 0u32;
        let mut since: Option<Instant> = None;
        loop {
            let polled = self
                .d
                .poll_cq(cq)
                .unwrap_or_else(|e| panic!("CQ ring is corrupt: {e:?}"));
            if let Some(cqe) = polled {
                assert_eq!(
                    cqe.status,
                    wc_status::SUCCESS,
                    "{which:?} completion failed: {cqe:?}"
                );
                return cqe;
            }
            spins = spins.wrapping_add(1);
            if spins < YIELD_AFTER {
                spin_loop();
            } else {
                thread::yield_now();
            }
            if spins.is_multiple_of(1024) {
                assert!(!abort.load(Ordering::Relaxed), "the other guest gave up");
                let started = *since.get_or_insert_with(Instant::now);
                if started.elapsed() > STALL {
                    abort.store(true, Ordering::Relaxed);
                    panic!("no {which:?} completion within {STALL:?}");
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Send,
    Recv,
}

fn spec(uc: Uc, pd: u32, scq: &Cq, rcq: &Cq) -> QpSpec {
    QpSpec {
        send_cq: scq.handle,
        recv_cq: rcq.handle,
        ..QpSpec::user(qp_type::RC, uc, pd, scq.handle, SIZES)
    }
}

/// The ping-pong's SENDs of 64 bytes from `g`'s buffer: unsignaled and signaled.
fn pingpong_wqes(g: &Guest) -> (Vec<u8>, Vec<u8>) {
    let sge = g.sge(SEND_AT, 64);
    (
        wqe(0, wr_opcode::SEND, 0, sge, None),
        wqe(1, wr_opcode::SEND, send_flags::SIGNALED, sge, None),
    )
}

/// A send WQE of one SGE; `remote` is `(remote_addr, rkey)` for RDMA opcodes.
fn wqe(wr_id: u64, opcode: u32, flags: u32, sge: Sge, remote: Option<(u64, u32)>) -> Vec<u8> {
    let mut hdr = SendWqeHeader {
        wr_id,
        num_sge: 1,
        total_len: 0,
        opcode,
        send_flags: flags,
        ex: 0,
        reserved: 0,
        wr: [0; 48],
    };
    if let Some((addr, rkey)) = remote {
        hdr.wr[0..8].copy_from_slice(&addr.to_le_bytes());
        hdr.wr[8..12].copy_from_slice(&rkey.to_le_bytes());
    }
    let mut bytes = hdr.as_bytes().to_vec();
    bytes.extend_from_slice(sge.as_bytes());
    bytes
}

/// RESET → INIT (remote access allowed) → RTR → RTS, with `ibv_rc_pingpong`'s masks.
fn connect(d: &mut D, qp: &Qp, peer_gid: [u8; 16], peer_qpn: u32) {
    let init = QpAttr {
        qp_access_flags: access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC,
        ..verbs::rc_init_attrs()
    };
    d.modify_qp(qp.handle, RC_INIT_MASK, &init)
        .expect("MODIFY_QP to INIT");
    let rtr = verbs::rc_rtr_attrs(peer_qpn, 0x1234, peer_gid, 0);
    d.modify_qp(qp.handle, RC_RTR_MASK, &rtr)
        .expect("MODIFY_QP to RTR");
    // The peer's receive PSN: a real fabric (the rdma path) drops packets numbered
    // otherwise.
    d.modify_qp(qp.handle, RC_RTS_MASK, &verbs::rc_rts_attrs(0x1234))
        .expect("MODIFY_QP to RTS");
}

/// How A's and B's servers reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peering {
    /// One server (memcpy).
    Same,
    /// Two servers joined by TCP.
    Tcp,
    /// Two servers whose QPs the host RDMA device carries.
    Rdma,
}

/// The server and its two guests, A and B, with connected RC QPs and receives posted.
pub struct Fabric {
    pub server: Arc<SocketServer>,
    /// B's server, when A and B are on two servers joined by TCP ([`Fabric::start_tcp`]).
    _peer_server: Option<Arc<SocketServer>>,
    pub a: Guest,
    pub b: Guest,
    /// Guest-physical start of A's RAM reserved for the big MR (never touched by the
    /// driver's allocator), and its size.
    big_at: u64,
    big_len: u64,
}

impl Fabric {
    /// Starts the server (doorbells in `mode`, and `args` more arguments) with two sockets
    /// and sets both guests up. Guest A's RAM has `big_mr` bytes more than the driver's
    /// working RAM, kept for [`Fabric::register_big_mr`].
    pub fn start_with(big_mr: u64, mode: Mode, args: &[&str]) -> Fabric {
        let mut all_args = vec!["--doorbells", mode.name()];
        all_args.extend_from_slice(args);
        let server = SocketServer::start_with(2, QUIET_LOG, &all_args);
        Fabric::attach(big_mr, mode, server, None, Peering::Same)
    }

    /// A on one server, B on another, the two servers joined by the TCP transport on
    /// loopback (A listens, B dials); `args` go to both servers.
    pub fn start_tcp(big_mr: u64, mode: Mode, args: &[&str]) -> Fabric {
        const TCP_LOG: &str = "vfio_user_pvrdma::vfio=debug,pvrdma_backend=info,info";
        let mut a_args = vec!["--doorbells", mode.name(), "--listen", "127.0.0.1:0"];
        a_args.extend_from_slice(args);
        let server_a = SocketServer::start_with(1, TCP_LOG, &a_args);
        let line = server_a.wait_for_server_line("listening on 127.0.0.1:");
        let addr = line
            .rsplit("listening on ")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut b_args = vec!["--doorbells", mode.name(), "--peer", addr.as_str()];
        b_args.extend_from_slice(args);
        let server_b = SocketServer::start_with(1, TCP_LOG, &b_args);
        server_a.wait_for_server_line("is up");
        server_b.wait_for_server_line("is up");
        Fabric::attach(big_mr, mode, server_a, Some(server_b), Peering::Tcp)
    }

    /// As [`Fabric::start_tcp`], both servers with the host RDMA device `device` and the
    /// guests at GIDs it holds, so the device carries their QPs (the rdma path).
    pub fn start_rdma(big_mr: u64, mode: Mode, device: &str) -> Fabric {
        const RDMA_LOG: &str = "vfio_user_pvrdma::vfio=debug,pvrdma_backend=info,info";
        let a_args = [
            "--doorbells",
            mode.name(),
            "--listen",
            "127.0.0.1:0",
            "--rdma-device",
            device,
        ];
        let server_a = SocketServer::start_with(1, RDMA_LOG, &a_args);
        let line = server_a.wait_for_server_line("listening on 127.0.0.1:");
        let addr = line
            .rsplit("listening on ")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let b_args = [
            "--doorbells",
            mode.name(),
            "--peer",
            addr.as_str(),
            "--rdma-device",
            device,
        ];
        let server_b = SocketServer::start_with(1, RDMA_LOG, &b_args);
        server_a.wait_for_server_line("is up");
        server_b.wait_for_server_line("is up");
        Fabric::attach(big_mr, mode, server_a, Some(server_b), Peering::Rdma)
    }

    /// Sets both guests up: A on `server`'s socket 0, B on socket 1 of the same server or
    /// on socket 0 of `peer`.
    fn attach(
        big_mr: u64,
        mode: Mode,
        server: Arc<SocketServer>,
        peer: Option<Arc<SocketServer>>,
        peering: Peering,
    ) -> Fabric {
        assert!(big_mr.is_multiple_of(PAGE_SIZE) && big_mr > 0);
        let base = memory::DEFAULT_BASE;
        let ram_a = GuestMemory::new(base, WORK_RAM + big_mr);
        let mut da = Driver::new(SocketBus::connect(&server, 0, ram_a));
        // The allocator only hands out the working RAM; the rest stays untouched.
        da.alloc = PageAllocator::new(base, base + WORK_RAM);
        let (b_server, b_socket) = match &peer {
            Some(peer) => (peer, 0),
            None => (&server, 1),
        };
        let db = Driver::new(SocketBus::connect(
            b_server,
            b_socket,
            GuestMemory::new(base, WORK_RAM),
        ));
        let (ip_a, ip_b) = match peering {
            Peering::Rdma => ([127, 0, 0, 11], [127, 0, 0, 12]),
            Peering::Same | Peering::Tcp => ([10, 0, 0, 1], [10, 0, 0, 2]),
        };
        let mut a = Guest::new(da, ip_a, mode);
        let mut b = Guest::new(db, ip_b, mode);
        if let Some(peer) = &peer {
            // Each server must have heard of the other's GID before traffic flows, and
            // for the rdma path that the GID is on the other's device.
            let heard = match peering {
                Peering::Rdma => ": 1 of its GIDs are on its RDMA device",
                Peering::Same | Peering::Tcp => "holds 1 GIDs",
            };
            server.wait_for_server_line(heard);
            peer.wait_for_server_line(heard);
        }
        connect(&mut a.d, &a.qp, b.gid, b.qp.qpn);
        connect(&mut b.d, &b.qp, a.gid, a.qp.qpn);
        if peering == Peering::Rdma {
            for (server, qpn) in [
                (&server, a.qp.qpn),
                peer.as_ref().map(|p| (p, b.qp.qpn)).expect("two servers"),
            ] {
                server.wait_for_server_line(&format!(
                    "rdma path: QP {qpn:#x} is carried by the host's RDMA device"
                ));
            }
        }
        a.post_receives(RX_DEPTH);
        b.post_receives(RX_DEPTH);
        a.d.take_irqs();
        b.d.take_irqs();
        Fabric {
            server,
            _peer_server: peer,
            a,
            b,
            big_at: base + WORK_RAM,
            big_len: big_mr,
        }
    }

    /// Round trips (ns) of a doorbell that finds nothing to do: A's SQ doorbell with its SQ
    /// empty. The bare cost of trapping one doorbell.
    pub fn empty_doorbell(&mut self, warmup: usize, iterations: usize) -> Vec<u64> {
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..warmup + iterations {
            let start = Instant::now();
            self.a.ring_sq();
            let rtt = start.elapsed();
            if i >= warmup {
                samples.push(rtt.as_nanos() as u64);
            }
        }
        samples
    }

    /// `ibv_rc_pingpong` with 64-byte messages: A posts a SEND and rings its SQ doorbell,
    /// B spins on its receive CQ (guest memory), answers with a SEND, A spins on its receive
    /// CQ; receives are re-posted in batches after answering, off the critical path.
    /// Returns the round trips (ns) A saw, after `warmup` unrecorded ones.
    ///
    /// With `threads` 2 each guest runs on its own thread, as each guest's vCPU would. With
    /// 1, one thread plays both: when the server's exit-free poller is a busy thread too,
    /// two cores cannot run three spinning threads, and the figure would measure the
    /// scheduler's time slices instead of the device.
    pub fn rc_send_pingpong(
        &mut self,
        warmup: usize,
        iterations: usize,
        threads: usize,
    ) -> Vec<u64> {
        let total = (warmup + iterations) as u64;
        let abort = AtomicBool::new(false);
        let Fabric { a, b, .. } = self;
        if threads < 2 {
            let (plain, signaled) = pingpong_wqes(b);
            return a.ping(warmup, total, &abort, |i| {
                b.answer(i, &plain, &signaled, &abort)
            });
        }
        thread::scope(|s| {
            let abort = &abort;
            s.spawn(move || {
                let (plain, signaled) = pingpong_wqes(b);
                for i in 0..total {
                    b.answer(i, &plain, &signaled, abort);
                }
            });
            a.ping(warmup, total, abort, |_| {})
        })
    }

    /// 64-byte SENDs from A to B, `batch` per SQ doorbell (the last one signaled), for at
    /// least `duration`; B's receives stay pre-posted (B drains its receive CQ after each
    /// batch and re-posts in batches of [`REPOST`]). One thread plays both guests, so B's
    /// work is serialised with A's. Returns messages per second.
    pub fn send_rate(&mut self, batch: u32, duration: Duration) -> f64 {
        assert!(batch <= SIZES.max_send_wr, "the SQ holds the whole batch");
        let abort = AtomicBool::new(false);
        let (a, b) = (&mut self.a, &mut self.b);
        let plain = wqe(0, wr_opcode::SEND, 0, a.sge(SEND_AT, 64), None);
        let last = wqe(
            1,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            a.sge(SEND_AT, 64),
            None,
        );
        let mut messages = 0u64;
        let start = Instant::now();
        loop {
            for i in 0..batch {
                a.push_send(if i + 1 == batch { &last } else { &plain });
            }
            a.ring_sq();
            for _ in 0..batch {
                b.wait(Which::Recv, &abort);
                b.consumed_receive();
            }
            a.wait(Which::Send, &abort);
            messages += u64::from(batch);
            let elapsed = start.elapsed();
            if elapsed >= duration {
                return messages as f64 / elapsed.as_secs_f64();
            }
        }
    }

    /// RDMA WRITEs of `size` bytes from A's buffer into B's, `batch` per SQ doorbell (the
    /// last one signaled), for at least `duration`. Like `ib_write_bw`, A keeps the send
    /// queue full: it posts the next batches while earlier ones are being copied, up to
    /// the SQ's depth, and reaps one completion per batch. Every WRITE copies the same
    /// source to the same target, like the memcpy baseline and `ib_write_bw`. Returns bytes
    /// per second.
    pub fn write_bandwidth(
        &mut self,
        size: u32,
        batch: u32,
        duration: Duration,
        buffer: Buffer,
    ) -> f64 {
        assert!(u64::from(size) <= RECV_AT - RDMA_AT && batch <= SIZES.max_send_wr);
        assert!(u64::from(size) <= CONTIG_LEN);
        // Whole batches that fit in the SQ with one slot to spare (a full ring is refused).
        let in_flight_max = ((SIZES.max_send_wr - 1) / batch).max(1);
        let abort = AtomicBool::new(false);
        let (a, b) = (&mut self.a, &mut self.b);
        // A pattern in the source; the target checked after the first batch.
        let pattern: Vec<u8> = (0..size)
            .map(|i| (i % 251) as u8 ^ (size >> 10) as u8)
            .collect();
        write_virtual(a, buffer, RDMA_AT, &pattern);
        let (b_mr, b_va) = b.buffer(buffer);
        let remote = Some((b_va + RDMA_AT, b_mr.rkey));
        let source = a.sge_in(buffer, RDMA_AT, size);
        let plain = wqe(0, wr_opcode::RDMA_WRITE, 0, source, remote);
        let last = wqe(
            1,
            wr_opcode::RDMA_WRITE,
            send_flags::SIGNALED,
            source,
            remote,
        );
        let post_batch = |a: &mut Guest| {
            for i in 0..batch {
                a.push_send(if i + 1 == batch { &last } else { &plain });
            }
            a.ring_sq();
        };
        let reap = |a: &mut Guest| {
            let cqe = a.wait(Which::Send, &abort);
            assert_eq!(cqe.opcode, wc_opcode::RDMA_WRITE);
        };
        post_batch(a);
        reap(a);
        assert!(
            read_virtual(b, buffer, RDMA_AT, size as usize) == pattern,
            "the RDMA WRITE of {size} bytes did not land in B's buffer"
        );
        let mut bytes = 0u64;
        let mut in_flight = 0u32;
        let start = Instant::now();
        loop {
            while in_flight < in_flight_max {
                post_batch(a);
                in_flight += 1;
            }
            reap(a);
            in_flight -= 1;
            bytes += u64::from(size) * u64::from(batch);
            let elapsed = start.elapsed();
            if elapsed >= duration {
                // Drain, so the next measurement starts from an empty queue.
                for _ in 0..in_flight {
                    reap(a);
                }
                return bytes as f64 / elapsed.as_secs_f64();
            }
        }
    }

    /// Times (ns) of `count` QUERY_PORT commands on A, one after the other (after `warmup`):
    /// the bare cost of a command, whose REQUEST write and ERR read are two round trips.
    pub fn query_port_commands(&mut self, warmup: usize, count: usize) -> Vec<u64> {
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let start = Instant::now();
            self.a.d.query_port(1).expect("QUERY_PORT");
            let elapsed = start.elapsed();
            if i >= warmup {
                samples.push(elapsed.as_nanos() as u64);
            }
        }
        samples
    }

    /// Times (ns) from CREATE_QP to the QP in RTS, for `count` RC QPs of A: CREATE_QP and
    /// three MODIFY_QP commands, each command a REQUEST write and an ERR read (two
    /// round trips). The guest builds the QP's rings and page directory before the clock
    /// starts; each QP is destroyed after it was timed.
    pub fn qp_create_to_rts(&mut self, count: usize) -> Vec<u64> {
        let a = &mut self.a;
        let (peer_gid, peer_qpn) = (self.b.gid, self.b.qp.qpn);
        let sizes = QpSizes {
            max_send_wr: 16,
            max_recv_wr: 16,
            ..SIZES
        };
        let spec = QpSpec {
            sizes,
            ..spec(a.uc, a.pd, &a.scq, &a.rcq)
        };
        (0..count)
            .map(|_| {
                let layout = a.d.qp_layout(QpOwner::User, sizes);
                let start = Instant::now();
                let qp = a.d.create_qp_on_layout(spec, layout).expect("CREATE_QP");
                connect(&mut a.d, &qp, peer_gid, peer_qpn);
                let elapsed = start.elapsed();
                a.d.destroy_qp(qp.handle).expect("DESTROY_QP");
                elapsed.as_nanos() as u64
            })
            .collect()
    }

    /// Registers the reserved part of A's RAM as one MR and times the CREATE_MR command
    /// (ns), then destroys it and times a second registration of the same pages. The guest
    /// writes every page first, as it has written a buffer it registers, so the pages are
    /// resident in the RAM's memfd; the server has never touched them. The page directory is built before the clock starts.
    /// Returns `(first, again)`.
    pub fn register_big_mr(&mut self) -> (u64, u64) {
        let a = &mut self.a;
        let (at, len) = (self.big_at, self.big_len);
        let ram = a.d.bus.ram();
        // The guest has written its buffer: every page is resident and holds data. (Pages
        // only fallocate'd would still be zeroed on the server's first touch.)
        let pages: Vec<u64> = (0..len / PAGE_SIZE).map(|i| at + i * PAGE_SIZE).collect();
        for &page in &pages {
            memory::write_u64(ram, page, page);
        }
        let pdir = PageDir::build(&mut a.d.alloc, ram, pages);
        let request = CreateMrRequest {
            hdr: header(Command::CreateMr),
            start: 0x7f00_0000_0000,
            length: len,
            pdir_dma: pdir.dir,
            pd_handle: a.pd,
            access_flags: ALL_ACCESS,
            flags: 0,
            nchunks: pdir.count(),
        };
        let mut register = || {
            let start = Instant::now();
            let mr = a.d.create_mr(&request).expect("CREATE_MR of the big MR");
            let elapsed = start.elapsed();
            a.d.destroy_mr(mr.mr_handle).expect("DESTROY_MR");
            elapsed.as_nanos() as u64
        };
        let first = register();
        let again = register();
        (first, again)
    }
}

/// Writes `bytes` at byte `offset` of one of `g`'s registered buffers (page by page).
fn write_virtual(g: &Guest, which: Buffer, offset: u64, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
        let at = offset + i as u64 * PAGE_SIZE;
        assert!(at.is_multiple_of(PAGE_SIZE), "page-aligned offsets only");
        memory::write_bytes(g.d.ram(), g.phys(which, at), chunk);
    }
}

/// Reads `len` bytes at byte `offset` of one of `g`'s registered buffers.
fn read_virtual(g: &Guest, which: Buffer, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(PAGE_SIZE as usize).enumerate() {
        let at = offset + i as u64 * PAGE_SIZE;
        assert!(at.is_multiple_of(PAGE_SIZE), "page-aligned offsets only");
        memory::read_bytes(g.d.ram(), g.phys(which, at), chunk);
    }
    out
}

/// CPU time the server process used (ns), summed over its threads
/// (`/proc/<pid>/task/*/schedstat`), and its utime + stime in clock ticks
/// (`/proc/<pid>/stat`).
pub fn server_cpu(server: &SocketServer) -> (u64, u64) {
    let pid = server.pid();
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read the server's stat");
    // Fields after the command name, which may contain spaces: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| -> u64 { fields[n - 3].parse().expect("a numeric stat field") };
    (ns, ticks(14) + ticks(15))
}
