//! The scaffolding of the data-path tests: a network of one device (loopback) or two devices
//! (the memcpy fabric), contexts with their PD and CQs, QPs, user MRs addressed by virtual
//! address, send WQE building, and a whole-RAM watch that finds every byte the devices
//! changed.

use std::collections::BTreeSet;

use vfio_user_pvrdma::abi::{
    AddressVector, Cqe, GID_TYPE_ROCE_V1, PAGE_SIZE, QpAttr, SendWqeHeader, Sge, access, qp_state,
    qp_type, send_flags, uar,
};
use vfio_user_pvrdma::abi::{FastReg, wr_opcode};
use zerocopy::IntoBytes;

use crate::driver::bus::Bus;
use crate::driver::fabric_bus::{self, FabricBus};
use crate::driver::layout::{PageDir, QpOwner, QpSizes};
use crate::driver::memory;
use crate::driver::queues::KERNEL_UC;
use crate::driver::verbs::{self, QpSpec, RC_INIT_MASK, RC_RTR_MASK, RC_RTS_MASK, ipv4_gid};
use crate::driver::{Cq, Driver, InProcessBus, Mr, Qp, Srq, Uc};

/// RAM of each device of a two-device fabric.
const FABRIC_RAM: u64 = 16 << 20;

/// The GIDs of the two sides, and one nobody has.
pub fn gid_a() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 1])
}

pub fn gid_b() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 2])
}

pub fn gid_nowhere() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 99])
}

/// A deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// `len` bytes of a pattern no two tests share by accident.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

pub fn sge(addr: u64, length: u32, lkey: u32) -> Sge {
    Sge { addr, length, lkey }
}

/// One port: the device it is on and the GID (and its index) it uses.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub dev: usize,
    pub gid: [u8; 16],
    pub gid_index: u8,
}

/// A process (or the kernel): a context, a PD, a send CQ and a receive CQ.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub host: Host,
    pub uc: Uc,
    pub pd: u32,
    pub scq: Cq,
    pub rcq: Cq,
    pub kernel: bool,
}

impl Ctx {
    pub fn dev(&self) -> usize {
        self.host.dev
    }
}

/// A user buffer registered as an MR, addressed by the virtual addresses its SGEs use.
#[derive(Debug, Clone)]
pub struct Buf {
    pub dev: usize,
    pub mr: Mr,
    pub va: u64,
    pub len: u64,
}

impl Buf {
    /// Virtual address of byte `offset`.
    pub fn at(&self, offset: u64) -> u64 {
        self.va + offset
    }

    pub fn end(&self) -> u64 {
        self.va + self.len
    }

    pub fn sge(&self, offset: u64, len: u32) -> Sge {
        sge(self.at(offset), len, self.mr.lkey)
    }

    pub fn rkey(&self) -> u32 {
        self.mr.rkey
    }

    pub fn lkey(&self) -> u32 {
        self.mr.lkey
    }

    /// Guest pages behind the buffer.
    pub fn pages(&self) -> Vec<u64> {
        self.mr
            .buffer
            .as_ref()
            .expect("a user MR")
            .pdir
            .pages
            .clone()
    }
}

/// Sizes of the test QPs: room for several WQEs of up to four SGEs each way.
pub const SIZES: QpSizes = QpSizes {
    max_send_wr: 16,
    max_recv_wr: 16,
    max_send_sge: 4,
    max_recv_sge: 4,
    srq: false,
};

/// How to create a QP.
#[derive(Debug, Clone, Copy)]
pub struct QpOpts {
    pub sizes: QpSizes,
    pub sq_sig_all: bool,
    pub srq: Option<u32>,
}

impl Default for QpOpts {
    fn default() -> Self {
        QpOpts {
            sizes: SIZES,
            sq_sig_all: false,
            srq: None,
        }
    }
}

/// Every remote right (and LOCAL_WRITE, which IB requires with REMOTE_WRITE/ATOMIC).
pub const ALL_ACCESS: u32 =
    access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC;

/// The devices of a test and what the tests built on them.
pub struct Net<B: Bus> {
    pub d: Vec<Driver<B>>,
    /// Per device: pages the device or the driver legitimately writes while traffic flows
    /// (rings, CQs, command slots); a [`Watch`] ignores them.
    busy: Vec<BTreeSet<u64>>,
    next_va: u64,
}

impl Net<InProcessBus> {
    /// One device; both sides are on it, each with its own GID (loopback).
    pub fn loopback() -> Net<InProcessBus> {
        Net::new(vec![Driver::in_process()])
    }
}

impl Net<FabricBus> {
    /// Two devices with their own guest RAM, joined by the memcpy fabric.
    pub fn two_devices() -> Net<FabricBus> {
        Net::new(fabric_bus::fabric(2, FABRIC_RAM))
    }
}

impl Net<crate::driver::tcp_bus::TcpBus> {
    /// Two devices on two hosts, joined by the TCP transport's protocol.
    pub fn over_tcp() -> Net<crate::driver::tcp_bus::TcpBus> {
        Net::new(crate::driver::tcp_bus::pair(FABRIC_RAM))
    }
}

impl<B: Bus> Net<B> {
    /// Probes `d`'s devices and binds each side's GID.
    pub fn new(mut d: Vec<Driver<B>>) -> Net<B> {
        let mut busy = Vec::new();
        for driver in &mut d {
            driver.probe();
            let session = driver.session().clone();
            let mut pages: BTreeSet<u64> = session
                .async_ring
                .ring
                .buf
                .pages
                .iter()
                .chain(&session.cq_notify.ring.buf.pages)
                .copied()
                .collect();
            pages.insert(session.dsr.cmd_slot);
            pages.insert(session.dsr.resp_slot);
            busy.push(pages);
        }
        let mut net = Net {
            d,
            busy,
            next_va: 0x7f3a_1200_0a40,
        };
        let (a, b) = (net.host_a(), net.host_b());
        for host in [a, b] {
            net.d[host.dev]
                .create_bind(u32::from(host.gid_index), host.gid, GID_TYPE_ROCE_V1)
                .expect("CREATE_BIND");
        }
        net.take_irqs();
        net
    }

    pub fn is_loopback(&self) -> bool {
        self.d.len() == 1
    }

    /// Whether the devices are on two hosts joined by a transport between servers.
    pub fn crosses_hosts(&self) -> bool {
        self.d.iter().any(|d| d.bus.crosses_hosts())
    }

    pub fn host_a(&self) -> Host {
        Host {
            dev: 0,
            gid: gid_a(),
            gid_index: 0,
        }
    }

    pub fn host_b(&self) -> Host {
        if self.is_loopback() {
            Host {
                dev: 0,
                gid: gid_b(),
                gid_index: 1,
            }
        } else {
            Host {
                dev: 1,
                gid: gid_b(),
                gid_index: 0,
            }
        }
    }

    pub fn dev(&mut self, dev: usize) -> &mut Driver<B> {
        &mut self.d[dev]
    }

    /// Forgets the interrupts raised so far on every device.
    pub fn take_irqs(&mut self) {
        for d in &mut self.d {
            d.take_irqs();
        }
    }

    fn busy(&mut self, dev: usize, pages: &[u64]) {
        self.busy[dev].extend(pages);
    }

    fn cq(&mut self, dev: usize, uc: Uc) -> Cq {
        let cq = self.d[dev].create_cq_on(uc, 64).expect("CREATE_CQ");
        self.busy(dev, &cq.layout.ring.buf.pages.clone());
        cq
    }

    /// A user context on `host` with a PD and two CQs.
    pub fn ctx(&mut self, host: Host) -> Ctx {
        let d = &mut self.d[host.dev];
        let uc = d.open_context().expect("CREATE_UC");
        let pd = d.create_pd(uc.handle).expect("CREATE_PD");
        let scq = self.cq(host.dev, uc);
        let rcq = self.cq(host.dev, uc);
        Ctx {
            host,
            uc,
            pd,
            scq,
            rcq,
            kernel: false,
        }
    }

    /// The kernel's objects on `host`: a kernel PD and CQs (doorbells on UAR page 0).
    pub fn kernel_ctx(&mut self, host: Host) -> Ctx {
        let pd = self.d[host.dev].create_pd(0).expect("CREATE_PD");
        let scq = self.cq(host.dev, KERNEL_UC);
        let rcq = self.cq(host.dev, KERNEL_UC);
        Ctx {
            host,
            uc: KERNEL_UC,
            pd,
            scq,
            rcq,
            kernel: true,
        }
    }

    /// Another PD in `ctx`'s context.
    pub fn another_pd(&mut self, ctx: &Ctx) -> u32 {
        self.d[ctx.dev()]
            .create_pd(ctx.uc.handle)
            .expect("CREATE_PD")
    }

    pub fn qp(&mut self, ctx: &Ctx, qp_type: u8, opts: QpOpts) -> Qp {
        let spec = QpSpec {
            owner: if ctx.kernel {
                QpOwner::Kernel
            } else {
                QpOwner::User
            },
            qp_type,
            uc: ctx.uc,
            pd: ctx.pd,
            send_cq: ctx.scq.handle,
            recv_cq: ctx.rcq.handle,
            srq: opts.srq,
            sizes: opts.sizes,
            sq_sig_all: opts.sq_sig_all,
        };
        let qp = self.d[ctx.dev()].create_qp_with(spec).expect("CREATE_QP");
        self.busy(ctx.dev(), &qp.layout.ring.buf.pages.clone());
        qp
    }

    pub fn srq(&mut self, ctx: &Ctx, max_wr: u32, max_sge: u32) -> Srq {
        let srq = self.d[ctx.dev()]
            .create_srq_on(ctx.uc, ctx.pd, max_wr, max_sge)
            .expect("CREATE_SRQ");
        self.busy(ctx.dev(), &srq.layout.ring.buf.pages.clone());
        srq
    }

    /// RESET → INIT (every remote access allowed) → RTR (AV to `peer`, `dest_qpn`) → RTS.
    pub fn connect(&mut self, ctx: &Ctx, qp: &Qp, peer_gid: [u8; 16], dest_qpn: u32) {
        self.bring_to_rtr(ctx, qp, peer_gid, dest_qpn);
        self.d[ctx.dev()]
            .modify_qp(qp.handle, RC_RTS_MASK, &verbs::rc_rts_attrs(0x5678))
            .expect("MODIFY_QP to RTS");
    }

    /// RESET → INIT → RTR only.
    pub fn bring_to_rtr(&mut self, ctx: &Ctx, qp: &Qp, peer_gid: [u8; 16], dest_qpn: u32) {
        self.bring_to_init(ctx, qp);
        let rtr = verbs::rc_rtr_attrs(dest_qpn, 0x1234, peer_gid, ctx.host.gid_index);
        self.d[ctx.dev()]
            .modify_qp(qp.handle, RC_RTR_MASK, &rtr)
            .expect("MODIFY_QP to RTR");
    }

    pub fn bring_to_init(&mut self, ctx: &Ctx, qp: &Qp) {
        let init = QpAttr {
            qp_access_flags: access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC,
            ..verbs::rc_init_attrs()
        };
        self.d[ctx.dev()]
            .modify_qp(qp.handle, RC_INIT_MASK, &init)
            .expect("MODIFY_QP to INIT");
    }

    /// A UD (or GSI) QP to RTS with `qkey`.
    pub fn activate_ud(&mut self, ctx: &Ctx, qp: &Qp, qkey: u32) {
        self.d[ctx.dev()]
            .ud_activate(qp, qkey)
            .expect("UD QP to RTS");
    }

    /// An error QP back to RTS: RESET (the driver restarts its producers too), then the
    /// connection again.
    pub fn reconnect(&mut self, ctx: &Ctx, qp: &Qp, peer_gid: [u8; 16], dest_qpn: u32) {
        let d = &mut self.d[ctx.dev()];
        d.modify_qp_state(qp, qp_state::RESET)
            .expect("MODIFY_QP to RESET");
        d.set_sq_prod(qp, 0);
        if qp.layout.rq.is_some() {
            d.set_rq_prod(qp, 0);
        }
        self.connect(ctx, qp, peer_gid, dest_qpn);
    }

    pub fn qp_state(&mut self, ctx: &Ctx, qp: &Qp) -> u32 {
        self.d[ctx.dev()]
            .query_qp(qp.handle, 0)
            .expect("QUERY_QP")
            .qp_state
    }

    /// A user buffer of `len` bytes registered in `pd` of `ctx` with `access`. Buffers start
    /// in the middle of a page (so they straddle page ends) and their pages are not
    /// contiguous in guest-physical order.
    pub fn mr_in(&mut self, ctx: &Ctx, pd: u32, len: u64, access_flags: u32) -> Buf {
        let va = self.next_va;
        self.next_va = ((va + len + 3 * PAGE_SIZE) & !(PAGE_SIZE - 1)) | (va % PAGE_SIZE);
        let mr = self.d[ctx.dev()]
            .reg_user_mr(pd, va, len, access_flags)
            .expect("CREATE_MR");
        Buf {
            dev: ctx.dev(),
            mr,
            va,
            len,
        }
    }

    pub fn mr(&mut self, ctx: &Ctx, len: u64, access_flags: u32) -> Buf {
        self.mr_in(ctx, ctx.pd, len, access_flags)
    }

    /// Writes `bytes` at byte `offset` of `buf`, through the MR's translation.
    pub fn write(&self, buf: &Buf, offset: u64, bytes: &[u8]) {
        let user = buf.mr.buffer.as_ref().expect("a user MR");
        let ram = self.d[buf.dev].ram();
        let mut done = 0usize;
        while done < bytes.len() {
            let va = buf.at(offset) + done as u64;
            let n = ((PAGE_SIZE - va % PAGE_SIZE) as usize).min(bytes.len() - done);
            memory::write_bytes(ram, user.translate(va), &bytes[done..done + n]);
            done += n;
        }
    }

    pub fn read(&self, buf: &Buf, offset: u64, len: usize) -> Vec<u8> {
        let user = buf.mr.buffer.as_ref().expect("a user MR");
        let ram = self.d[buf.dev].ram();
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let va = buf.at(offset) + done as u64;
            let n = ((PAGE_SIZE - va % PAGE_SIZE) as usize).min(len - done);
            memory::read_bytes(ram, user.translate(va), &mut out[done..done + n]);
            done += n;
        }
        out
    }

    /// The whole buffer.
    pub fn contents(&self, buf: &Buf) -> Vec<u8> {
        self.read(buf, 0, buf.len as usize)
    }

    /// Fills the whole buffer with a pattern; returns it.
    pub fn fill(&self, buf: &Buf, seed: u8) -> Vec<u8> {
        let bytes = pattern(seed, buf.len as usize);
        self.write(buf, 0, &bytes);
        bytes
    }

    pub fn read_u64(&self, buf: &Buf, offset: u64) -> u64 {
        u64::from_le_bytes(self.read(buf, offset, 8).try_into().unwrap())
    }

    pub fn write_u64(&self, buf: &Buf, offset: u64, value: u64) {
        self.write(buf, offset, &value.to_le_bytes());
    }

    /// Posts `wrs` to the send queue, then rings the SQ doorbell once (as `post_send`).
    pub fn post(&mut self, ctx: &Ctx, qp: &Qp, wrs: &[Wr]) {
        let d = &mut self.d[ctx.dev()];
        for wr in wrs {
            d.post_send_raw(qp, &wr.bytes()).expect("SQ has room");
        }
        d.ring_qp(qp, uar::QP_SEND);
    }

    /// Posts one receive and rings the RQ doorbell.
    pub fn recv(&mut self, ctx: &Ctx, qp: &Qp, wr_id: u64, sges: &[Sge]) {
        self.d[ctx.dev()]
            .post_recv(qp, wr_id, sges)
            .expect("RQ has room");
    }

    pub fn srq_recv(&mut self, ctx: &Ctx, srq: &Srq, wr_id: u64, sges: &[Sge]) {
        self.d[ctx.dev()]
            .post_srq_recv(srq, wr_id, sges)
            .expect("SRQ has room");
    }

    /// Every completion of `ctx`'s send CQ.
    pub fn sends(&mut self, ctx: &Ctx) -> Vec<Cqe> {
        self.d[ctx.dev()].drain_cq(&ctx.scq)
    }

    /// Every completion of `ctx`'s receive CQ.
    pub fn recvs(&mut self, ctx: &Ctx) -> Vec<Cqe> {
        self.d[ctx.dev()].drain_cq(&ctx.rcq)
    }

    /// `(prod_tail, cons_head)` of a QP's queues.
    pub fn sq(&self, ctx: &Ctx, qp: &Qp) -> (u32, u32) {
        self.d[ctx.dev()].sq_indices(qp)
    }

    pub fn rq(&self, ctx: &Ctx, qp: &Qp) -> (u32, u32) {
        self.d[ctx.dev()].rq_indices(qp)
    }

    /// A snapshot of every device's whole RAM. Pages nobody allocated yet are first filled
    /// with a guard pattern, so that a stray write of zeros shows too.
    pub fn watch(&self) -> Watch {
        let snaps = self
            .d
            .iter()
            .map(|d| {
                let mem = d.bus.memory();
                let free = d.alloc.remaining() * PAGE_SIZE;
                memory::fill(d.ram(), mem.end() - free, 0xa5, free);
                memory::snapshot(d.ram(), mem.base(), mem.size() as usize)
            })
            .collect();
        Watch { snaps }
    }

    /// Asserts that, since `watch`, nothing changed on any device outside the rings and
    /// CQs and the buffers in `allowed`.
    pub fn assert_unchanged_except(&self, watch: &Watch, allowed: &[&Buf]) {
        for (dev, d) in self.d.iter().enumerate() {
            let mut skip = self.busy[dev].clone();
            for buf in allowed.iter().filter(|b| b.dev == dev) {
                skip.extend(buf.pages());
            }
            let mem = d.bus.memory();
            let now = memory::snapshot(d.ram(), mem.base(), mem.size() as usize);
            let before = &watch.snaps[dev];
            let mut changed = Vec::new();
            for (page, (old, new)) in before
                .chunks(PAGE_SIZE as usize)
                .zip(now.chunks(PAGE_SIZE as usize))
                .enumerate()
            {
                let addr = mem.base() + page as u64 * PAGE_SIZE;
                if old != new && !skip.contains(&addr) {
                    let at = old.iter().zip(new).position(|(o, n)| o != n).unwrap();
                    changed.push(format!(
                        "{addr:#x}+{at:#x}: {:#04x} -> {:#04x}",
                        old[at], new[at]
                    ));
                }
            }
            assert!(
                changed.is_empty(),
                "device {dev} changed guest memory it had no right to: {changed:?}"
            );
        }
    }
}

/// Snapshots of every device's RAM.
pub struct Watch {
    snaps: Vec<Vec<u8>>,
}

/// A connected pair of QPs: `qa` in context `a` on host A, `qb` in `b` on host B.
pub struct Pair<B: Bus> {
    pub net: Net<B>,
    pub a: Ctx,
    pub b: Ctx,
    pub qa: Qp,
    pub qb: Qp,
}

impl<B: Bus> Pair<B> {
    /// Two RC QPs connected to each other.
    pub fn rc(mut net: Net<B>, opts: QpOpts) -> Pair<B> {
        let (ha, hb) = (net.host_a(), net.host_b());
        let a = net.ctx(ha);
        let b = net.ctx(hb);
        let qa = net.qp(&a, qp_type::RC, opts);
        let qb = net.qp(&b, qp_type::RC, opts);
        net.connect(&a, &qa, hb.gid, qb.qpn);
        net.connect(&b, &qb, ha.gid, qa.qpn);
        net.take_irqs();
        Pair { net, a, b, qa, qb }
    }

    /// Two UD QPs with Q_Keys `qkey_a` and `qkey_b`.
    pub fn ud(mut net: Net<B>, qkey_a: u32, qkey_b: u32) -> Pair<B> {
        let (ha, hb) = (net.host_a(), net.host_b());
        let a = net.ctx(ha);
        let b = net.ctx(hb);
        let qa = net.qp(&a, qp_type::UD, QpOpts::default());
        let qb = net.qp(&b, qp_type::UD, QpOpts::default());
        net.activate_ud(&a, &qa, qkey_a);
        net.activate_ud(&b, &qb, qkey_b);
        net.take_irqs();
        Pair { net, a, b, qa, qb }
    }

    /// Posts `wrs` on A's QP.
    pub fn post_a(&mut self, wrs: &[Wr]) {
        self.net.post(&self.a, &self.qa, wrs);
    }

    /// Posts a receive on B's QP.
    pub fn recv_b(&mut self, wr_id: u64, sges: &[Sge]) {
        self.net.recv(&self.b, &self.qb, wr_id, sges);
    }

    pub fn sends_a(&mut self) -> Vec<Cqe> {
        self.net.sends(&self.a)
    }

    pub fn recvs_b(&mut self) -> Vec<Cqe> {
        self.net.recvs(&self.b)
    }

    pub fn state_a(&mut self) -> u32 {
        self.net.qp_state(&self.a, &self.qa)
    }

    /// A's QP, in the error state, back to RTS and connected to B's QP again.
    pub fn recover_a(&mut self) {
        let (gid, qpn) = (self.b.host.gid, self.qb.qpn);
        self.retarget_a(gid, qpn);
    }

    /// A's QP reset and connected to `dest_qpn` at `gid` instead.
    pub fn retarget_a(&mut self, gid: [u8; 16], dest_qpn: u32) {
        self.net.reconnect(&self.a, &self.qa, gid, dest_qpn);
    }

    /// An address vector from A to B's GID.
    pub fn av_to_b(&self) -> AddressVector {
        av(self.a.pd, self.a.host.gid_index, self.b.host.gid)
    }
}

/// A UD address vector as the driver copies it into a WQE (device-abi §9.5).
pub fn av(pd: u32, gid_index: u8, dgid: [u8; 16]) -> AddressVector {
    AddressVector {
        port_pd: pd | 1 << 24,
        sl_tclass_flowlabel: 0,
        dgid,
        src_path_bits: 0x80,
        gid_index,
        stat_rate: 0,
        hop_limit: 64,
        dmac: [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc],
        reserved: [0; 6],
    }
}

/// A send work request as the guest writes it (device-abi §6.4). Signaled unless told otherwise.
#[derive(Debug, Clone)]
pub struct Wr {
    pub hdr: SendWqeHeader,
    pub sges: Vec<Sge>,
}

impl Wr {
    pub fn new(wr_id: u64, opcode: u32, sges: &[Sge]) -> Wr {
        Wr {
            hdr: SendWqeHeader {
                wr_id,
                num_sge: sges.len() as u32,
                total_len: 0,
                opcode,
                send_flags: send_flags::SIGNALED,
                ex: 0,
                reserved: 0,
                wr: [0; 48],
            },
            sges: sges.to_vec(),
        }
    }

    pub fn flags(mut self, flags: u32) -> Wr {
        self.hdr.send_flags = flags;
        self
    }

    pub fn imm(mut self, imm: u32) -> Wr {
        self.hdr.ex = imm;
        self
    }

    /// RDMA WRITE/READ: `remote_addr` at 32, `rkey` at 40.
    pub fn rdma(mut self, remote_addr: u64, rkey: u32) -> Wr {
        self.hdr.wr[0..8].copy_from_slice(&remote_addr.to_le_bytes());
        self.hdr.wr[8..12].copy_from_slice(&rkey.to_le_bytes());
        self
    }

    /// Atomics: `remote_addr` at 32, `compare_add` at 40, `swap` at 48, `rkey` at 56.
    pub fn atomic(mut self, remote_addr: u64, compare_add: u64, swap: u64, rkey: u32) -> Wr {
        self.hdr.wr[0..8].copy_from_slice(&remote_addr.to_le_bytes());
        self.hdr.wr[8..16].copy_from_slice(&compare_add.to_le_bytes());
        self.hdr.wr[16..24].copy_from_slice(&swap.to_le_bytes());
        self.hdr.wr[24..28].copy_from_slice(&rkey.to_le_bytes());
        self
    }

    /// UD: `remote_qpn` at 32, `remote_qkey` at 36, the address vector at 40.
    pub fn ud(mut self, remote_qpn: u32, remote_qkey: u32, av: AddressVector) -> Wr {
        self.hdr.wr[0..4].copy_from_slice(&remote_qpn.to_le_bytes());
        self.hdr.wr[4..8].copy_from_slice(&remote_qkey.to_le_bytes());
        self.hdr.wr[8..48].copy_from_slice(av.as_bytes());
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = self.hdr.as_bytes().to_vec();
        for sge in &self.sges {
            bytes.extend_from_slice(sge.as_bytes());
        }
        bytes
    }
}

// ---- The memory management extensions (device-abi §6.4 fast_reg, LOCAL_INV, SEND_WITH_INV) ----

impl Wr {
    /// FAST_REG_MR (kernel QPs only): the fast_reg union, `iova_start` at 32, `pl_pdir_dma`
    /// at 40, `page_shift` at 48, `page_list_len` at 52, `length` at 56, `access_flags` at
    /// 60, `rkey` at 64. No SGEs.
    pub fn fast_reg(wr_id: u64, fr: &FastReg) -> Wr {
        let mut wr = Wr::new(wr_id, wr_opcode::FAST_REG_MR, &[]);
        wr.hdr.wr[0..8].copy_from_slice(&fr.iova_start.to_le_bytes());
        wr.hdr.wr[8..16].copy_from_slice(&fr.pl_pdir_dma.to_le_bytes());
        wr.hdr.wr[16..20].copy_from_slice(&fr.page_shift.to_le_bytes());
        wr.hdr.wr[20..24].copy_from_slice(&fr.page_list_len.to_le_bytes());
        wr.hdr.wr[24..28].copy_from_slice(&fr.length.to_le_bytes());
        wr.hdr.wr[28..32].copy_from_slice(&fr.access_flags.to_le_bytes());
        wr.hdr.wr[32..36].copy_from_slice(&fr.rkey.to_le_bytes());
        wr
    }

    /// LOCAL_INV of `key` (`invalidate_rkey`, in `ex`). No SGEs.
    pub fn local_inv(wr_id: u64, key: u32) -> Wr {
        Wr::new(wr_id, wr_opcode::LOCAL_INV, &[]).imm(key)
    }

    /// SEND_WITH_INV of `sges`, invalidating `rkey` at the responder (`ex`).
    pub fn send_inv(wr_id: u64, sges: &[Sge], rkey: u32) -> Wr {
        Wr::new(wr_id, wr_opcode::SEND_WITH_INV, sges).imm(rkey)
    }
}

impl<B: Bus> Net<B> {
    /// A fast-register MR for at most `max_pages` pages in `pd` of `ctx` (CREATE_MR flags 2,
    /// no page directory): its keys name it, but it maps nothing until a FAST_REG_MR.
    pub fn frmr_in(&mut self, ctx: &Ctx, pd: u32, max_pages: u32) -> Mr {
        self.d[ctx.dev()]
            .alloc_frmr(pd, max_pages)
            .expect("CREATE_MR (FRMR)")
    }

    pub fn frmr(&mut self, ctx: &Ctx, max_pages: u32) -> Mr {
        self.frmr_in(ctx, ctx.pd, max_pages)
    }

    /// The kernel PD's DMA MR of `ctx` (SGE addresses are guest-physical).
    pub fn dma_mr(&mut self, ctx: &Ctx) -> Mr {
        self.d[ctx.dev()].get_dma_mr(ctx.pd).expect("DMA MR")
    }

    /// `count` zeroed guest pages of `1 << page_shift` bytes on `dev`, each aligned to its
    /// size, in descending address order with a free page of the same size between any two
    /// (so neither the list order nor adjacency makes them contiguous).
    pub fn guest_pages(&mut self, dev: usize, count: u64, page_shift: u32) -> Vec<u64> {
        let size = 1u64 << page_shift;
        let d = &mut self.d[dev];
        let ram = d.bus.ram();
        let next = d.bus.memory().end() - d.alloc.remaining() * PAGE_SIZE;
        let pad = (size - next % size) % size;
        if pad > 0 {
            d.alloc.block(ram, pad / PAGE_SIZE);
        }
        let first = d.alloc.block(ram, (2 * count - 1) * size / PAGE_SIZE);
        (0..count).rev().map(|i| first + 2 * i * size).collect()
    }

    /// A page directory on `dev` listing `pages` (a FAST_REG_MR page list, device-abi §4): entries are
    /// written as given, aligned or not.
    pub fn page_list(&mut self, dev: usize, pages: Vec<u64>) -> PageDir {
        let d = &mut self.d[dev];
        let ram = d.bus.ram();
        PageDir::build(&mut d.alloc, ram, pages)
    }

    /// Guest-physical bytes of device `dev`.
    pub fn read_phys(&self, dev: usize, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        memory::read_bytes(self.d[dev].ram(), addr, &mut out);
        out
    }

    pub fn write_phys(&self, dev: usize, addr: u64, bytes: &[u8]) {
        memory::write_bytes(self.d[dev].ram(), addr, bytes);
    }

    /// [`Net::assert_unchanged_except`], also allowing the 4 KiB guest pages `pages` (device,
    /// address) to change.
    pub fn assert_unchanged_except_pages(
        &mut self,
        watch: &Watch,
        allowed: &[&Buf],
        pages: &[(usize, u64)],
    ) {
        let added: Vec<(usize, u64)> = pages
            .iter()
            .copied()
            .filter(|&(dev, page)| self.busy[dev].insert(page))
            .collect();
        self.assert_unchanged_except(watch, allowed);
        for (dev, page) in added {
            self.busy[dev].remove(&page);
        }
    }
}

impl<B: Bus> Pair<B> {
    /// Two RC QPs of kernel consumers (context 0, each with its own kernel PD and CQs)
    /// connected to each other: the only QPs that may post the memory management extensions.
    pub fn kernel_rc(mut net: Net<B>, opts: QpOpts) -> Pair<B> {
        let (ha, hb) = (net.host_a(), net.host_b());
        let a = net.kernel_ctx(ha);
        let b = net.kernel_ctx(hb);
        let qa = net.qp(&a, qp_type::RC, opts);
        let qb = net.qp(&b, qp_type::RC, opts);
        net.connect(&a, &qa, hb.gid, qb.qpn);
        net.connect(&b, &qb, ha.gid, qa.qpn);
        net.take_irqs();
        Pair { net, a, b, qa, qb }
    }

    /// Posts `wrs` on B's QP.
    pub fn post_b(&mut self, wrs: &[Wr]) {
        self.net.post(&self.b, &self.qb, wrs);
    }

    pub fn sends_b(&mut self) -> Vec<Cqe> {
        self.net.sends(&self.b)
    }

    pub fn state_b(&mut self) -> u32 {
        self.net.qp_state(&self.b, &self.qb)
    }

    /// B's QP, in the error state, back to RTS and connected to A's QP again.
    pub fn recover_b(&mut self) {
        let (gid, qpn) = (self.a.host.gid, self.qa.qpn);
        self.net.reconnect(&self.b, &self.qb, gid, qpn);
    }
}
