//! The memory management extensions (`bmme_flags` 7, device-abi §5.4 fast-register MRs, device-abi §6.4 fast_reg,
//! device-abi §9.4): FAST_REG_MR maps pages into a fast-register MR under a new key, LOCAL_INV and a
//! peer's SEND_WITH_INV take the mapping away again. Kernel QPs only: the scenarios run on RC
//! QPs of two kernel consumers (context 0), A the requester, B owning the fast-register MRs,
//! and check the registered pages byte for byte and, over every device's whole RAM, that
//! refused requests changed nothing.

use vfio_user_pvrdma::abi::{
    FastReg, MAX_FAST_REG_PAGES, PAGE_SIZE, access, qp_state, qp_type, wc_flags, wc_opcode,
    wc_status, wr_opcode,
};

use crate::driver::Mr;
use crate::driver::bus::Bus;
use crate::driver::layout::PageDir;
use crate::harness::{ALL_ACCESS, Buf, Net, Pair, QpOpts, Wr, pattern, sge};
use crate::operations::summary;

both_topologies!(
    fast_reg_maps_scattered_4k_pages_for_remote_write_and_read,
    fast_reg_maps_2m_pages,
    fast_reg_access_flags_are_the_work_requests,
    fast_registered_lkey_serves_local_sges,
    local_inv_revokes_remote_access,
    reregistering_a_valid_frmr_fails_until_invalidated,
    fast_reg_errors,
    local_inv_errors,
    send_with_inv_invalidates_the_receivers_frmr,
    send_with_inv_needs_a_registered_frmr_of_the_responders_pd,
    user_qps_cannot_post_memory_extensions,
    memory_op_completions_follow_signaling,
);

const OK: u32 = wc_status::SUCCESS;

/// What the FAST_REG_MRs of these tests grant unless told otherwise.
const REMOTE_RW: u32 = access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ;

/// `key` with its key byte (bits 7..0) moved on by `step`; the MR index stays.
fn rekey(key: u32, step: u8) -> u32 {
    key & !0xff | u32::from((key as u8).wrapping_add(step))
}

/// One FAST_REG_MR of a fast-register MR on B: the pages, their page list and what the
/// work request binds.
#[derive(Debug, Clone)]
struct Frmr {
    dev: usize,
    /// The MR as CREATE_MR returned it (its keys are the creation keys).
    mr: Mr,
    pdir: PageDir,
    page_shift: u32,
    iova: u64,
    length: u32,
    access: u32,
    key: u32,
}

impl Frmr {
    fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    fn fast_reg(&self) -> FastReg {
        FastReg {
            iova_start: self.iova,
            pl_pdir_dma: self.pdir.dir,
            page_shift: self.page_shift,
            page_list_len: self.pdir.count(),
            length: self.length,
            access_flags: self.access,
            rkey: self.key,
        }
    }

    /// The FAST_REG_MR work request (signaled).
    fn wr(&self, wr_id: u64) -> Wr {
        Wr::fast_reg(wr_id, &self.fast_reg())
    }

    /// The guest-physical address behind `iova` (inside the registered buffer).
    fn phys(&self, iova: u64) -> u64 {
        assert!(iova >= self.iova && iova < self.iova + u64::from(self.length));
        let offset = iova - (self.iova & !(self.page_size() - 1));
        self.pdir.pages[(offset / self.page_size()) as usize] + offset % self.page_size()
    }

    /// Every 4 KiB guest page the page list covers.
    fn pages_4k(&self) -> Vec<(usize, u64)> {
        let per = self.page_size() / PAGE_SIZE;
        self.pdir
            .pages
            .iter()
            .flat_map(|p| (0..per).map(move |i| p + i * PAGE_SIZE))
            .map(|p| (self.dev, p))
            .collect()
    }

    /// The same MR mapped again: `count` fresh pages of `1 << page_shift` bytes, `iova`,
    /// `length`, `access` and the key byte moved on by `step` from the creation key.
    #[allow(clippy::too_many_arguments)]
    fn map<B: Bus>(
        net: &mut Net<B>,
        dev: usize,
        mr: &Mr,
        count: u64,
        page_shift: u32,
        iova: u64,
        length: u32,
        access: u32,
        step: u8,
    ) -> Frmr {
        let pages = net.guest_pages(dev, count, page_shift);
        let pdir = net.page_list(dev, pages);
        Frmr {
            dev,
            mr: mr.clone(),
            pdir,
            page_shift,
            iova,
            length,
            access,
            key: rekey(mr.rkey, step),
        }
    }
}

/// A pair of kernel RC QPs.
fn kernel_pair<B: Bus>(net: Net<B>) -> Pair<B> {
    Pair::kernel_rc(net, QpOpts::default())
}

/// A new fast-register MR on B for `max_pages` pages and a mapping of `count` 4 KiB pages
/// at an iova 0x9a0 bytes into its first page, ending 0x64 bytes before the last page ends.
fn scattered_frmr<B: Bus>(p: &mut Pair<B>, max_pages: u32, count: u64, step: u8) -> Frmr {
    let mr = p.net.frmr(&p.b, max_pages);
    let length = (count * PAGE_SIZE - 0x9a0 - 0x64) as u32;
    Frmr::map(
        &mut p.net,
        p.b.dev(),
        &mr,
        count,
        12,
        0x7f00_0001_3000 + 0x9a0,
        length,
        REMOTE_RW,
        step,
    )
}

/// Posts `f`'s FAST_REG_MR on B (signaled) and expects it to succeed.
fn register<B: Bus>(p: &mut Pair<B>, f: &Frmr) {
    p.post_b(&[f.wr(50)]);
    assert_eq!(
        summary(&p.sends_b()),
        [(50, wc_opcode::FAST_REG_MR, OK)],
        "FAST_REG_MR of key {:#x}",
        f.key
    );
}

/// Posts LOCAL_INV of `key` on B (signaled) and expects it to succeed.
fn local_inv<B: Bus>(p: &mut Pair<B>, key: u32) {
    p.post_b(&[Wr::local_inv(60, key)]);
    assert_eq!(
        summary(&p.sends_b()),
        [(60, wc_opcode::LOCAL_INV, OK)],
        "LOCAL_INV of key {key:#x}"
    );
}

/// Posts `wr` on A and expects exactly its completion with `status` (unsignaled when a
/// failure is expected: failures complete anyway). A's QP is brought back to RTS after a
/// failure.
fn on_a<B: Bus>(p: &mut Pair<B>, what: &str, wr: Wr, status: u32) {
    let wr_id = wr.hdr.wr_id;
    let wr = if status == OK { wr } else { wr.flags(0) };
    p.post_a(&[wr]);
    let sends = p.sends_a();
    assert_eq!(
        sends
            .iter()
            .map(|c| (c.wr_id, c.status))
            .collect::<Vec<_>>(),
        [(wr_id, status)],
        "{what}"
    );
    if status != OK {
        assert_eq!(p.state_a(), qp_state::ERR, "{what}: A's QP fails");
        p.recover_a();
    }
}

/// Posts `wr` (unsignaled) on B and expects it to fail with `status` and completion opcode
/// `opcode`, B's QP to go to ERR; brings the QP back to RTS.
fn fails_on_b<B: Bus>(p: &mut Pair<B>, what: &str, wr: Wr, opcode: u32, status: u32) {
    let wr_id = wr.hdr.wr_id;
    p.post_b(&[wr.flags(0)]);
    assert_eq!(summary(&p.sends_b()), [(wr_id, opcode, status)], "{what}");
    assert_eq!(p.state_b(), qp_state::ERR, "{what}: B's QP fails");
    p.recover_b();
}

fn write(src: &Buf, offset: u64, len: u32, addr: u64, rkey: u32) -> Wr {
    Wr::new(1, wr_opcode::RDMA_WRITE, &[src.sge(offset, len)]).rdma(addr, rkey)
}

fn read(dst: &Buf, offset: u64, len: u32, addr: u64, rkey: u32) -> Wr {
    Wr::new(2, wr_opcode::RDMA_READ, &[dst.sge(offset, len)]).rdma(addr, rkey)
}

/// Bytes `[iova, iova + len)` of a registered buffer, read from its pages.
fn read_iova<B: Bus>(net: &Net<B>, f: &Frmr, iova: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let at = iova + out.len() as u64;
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - out.len());
        out.extend(net.read_phys(f.dev, f.phys(at), n));
    }
    out
}

fn write_iova<B: Bus>(net: &Net<B>, f: &Frmr, iova: u64, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        let at = iova + done as u64;
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(bytes.len() - done);
        net.write_phys(f.dev, f.phys(at), &bytes[done..done + n]);
        done += n;
    }
}

/// Each page of `f`'s page list, in list order, as a whole.
fn page_contents<B: Bus>(net: &Net<B>, f: &Frmr) -> Vec<u8> {
    f.pdir
        .pages
        .iter()
        .flat_map(|&p| net.read_phys(f.dev, p, f.page_size() as usize))
        .collect()
}

fn fast_reg_maps_scattered_4k_pages_for_remote_write_and_read<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    // Four 4 KiB pages, neither adjacent nor in address order; the iova is not page aligned.
    let f = scattered_frmr(&mut p, 8, 4, 0x41);
    assert_ne!(f.key, f.mr.rkey);
    let src = p.net.mr(&p.a, 4 * PAGE_SIZE, 0);
    let data = p.net.fill(&src, 0x31);
    let dst = p.net.mr(&p.a, 4 * PAGE_SIZE, access::LOCAL_WRITE);
    p.net.fill(&dst, 0x32);
    register(&mut p, &f);

    // A WRITE of the whole buffer lands in the four pages, in list order, and nowhere else.
    let watch = p.net.watch();
    on_a(
        &mut p,
        "WRITE of the whole buffer through the new rkey",
        write(&src, 0, f.length, f.iova, f.key),
        OK,
    );
    let mut model = vec![0u8; 4 * PAGE_SIZE as usize];
    model[0x9a0..0x9a0 + f.length as usize].copy_from_slice(&data[..f.length as usize]);
    assert_eq!(page_contents(&p.net, &f), model);
    p.net
        .assert_unchanged_except_pages(&watch, &[], &f.pages_4k());

    // A short WRITE across the boundary of list entries 1 and 2.
    let boundary = (f.iova & !(PAGE_SIZE - 1)) + 2 * PAGE_SIZE;
    on_a(
        &mut p,
        "WRITE across two pages",
        write(&src, 7, 100, boundary - 40, f.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &f, boundary - 40, 100), data[7..107]);

    // A READ of 5000 bytes from the middle of the second page on.
    let fresh = pattern(0x33, f.length as usize);
    write_iova(&p.net, &f, f.iova, &fresh);
    let from = f.iova + 3000;
    on_a(
        &mut p,
        "READ through the new rkey",
        read(&dst, 8, 5000, from, f.key),
        OK,
    );
    assert_eq!(p.net.read(&dst, 8, 5000), fresh[3000..8000]);
    // And of the whole buffer.
    on_a(
        &mut p,
        "READ of the whole buffer",
        read(&dst, 0, f.length, f.iova, f.key),
        OK,
    );
    assert_eq!(p.net.read(&dst, 0, f.length as usize), fresh);

    // The creation key, and ranges outside [iova, iova + length), are refused.
    let end = f.iova + u64::from(f.length);
    let watch = p.net.watch();
    for (what, wr) in [
        (
            "WRITE with the old key",
            write(&src, 0, 8, f.iova, f.mr.rkey),
        ),
        ("READ with the old key", read(&dst, 0, 8, f.iova, f.mr.rkey)),
        (
            "WRITE from a byte before the iova",
            write(&src, 0, 8, f.iova - 1, f.key),
        ),
        ("WRITE past the end", write(&src, 0, 8, end - 4, f.key)),
        ("READ past the end", read(&dst, 0, 8, end - 7, f.key)),
    ] {
        on_a(&mut p, what, wr, wc_status::REM_ACCESS_ERR);
    }
    p.net.assert_unchanged_except(&watch, &[]);
}

fn fast_reg_maps_2m_pages<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    const HUGE: u64 = 2 << 20;
    let mr = p.net.frmr(&p.b, 4);
    // Two 2 MiB pages (the first at the higher address); the iova starts 0x1fe123 bytes
    // into the first.
    let into = 0x1f_e123;
    let f = Frmr::map(
        &mut p.net,
        p.b.dev(),
        &mr,
        2,
        21,
        0x5555_0000_0000 + into,
        (2 * HUGE - into - 0x40) as u32,
        REMOTE_RW,
        0x17,
    );
    assert!(f.pdir.pages.iter().all(|p| p % HUGE == 0));
    assert!(f.pdir.pages[0] > f.pdir.pages[1]);
    let src = p.net.mr(&p.a, 0x3000, 0);
    let data = p.net.fill(&src, 0x34);
    let dst = p.net.mr(&p.a, 0x3000, access::LOCAL_WRITE);
    p.net.fill(&dst, 0x35);
    register(&mut p, &f);

    // A WRITE across the boundary of the two 2 MiB pages.
    let boundary = (f.iova & !(HUGE - 1)) + HUGE;
    let watch = p.net.watch();
    on_a(
        &mut p,
        "WRITE across two 2 MiB pages",
        write(&src, 0, 0x3000, boundary - 0x1400, f.key),
        OK,
    );
    let ram = |p: &Pair<B>, addr: u64, len: usize| p.net.read_phys(f.dev, addr, len);
    assert_eq!(
        ram(&p, f.pdir.pages[0] + HUGE - 0x1400, 0x1400),
        data[..0x1400]
    );
    assert_eq!(ram(&p, f.pdir.pages[1], 0x1c00), data[0x1400..]);
    assert_eq!(ram(&p, f.pdir.pages[0] + HUGE - 0x1410, 0x10), [0; 16]);
    assert_eq!(ram(&p, f.pdir.pages[1] + 0x1c00, 0x10), [0; 16]);
    p.net
        .assert_unchanged_except_pages(&watch, &[], &f.pages_4k());

    // A READ from the first bytes of the buffer and from deep inside the second page.
    let fresh = pattern(0x36, 0x3000);
    for (what, at) in [
        ("READ at the iova", f.iova),
        (
            "READ 1 MiB into the second page",
            boundary + (1 << 20) + 0x321,
        ),
    ] {
        write_iova(&p.net, &f, at, &fresh);
        on_a(&mut p, what, read(&dst, 0, 0x3000, at, f.key), OK);
        assert_eq!(p.net.contents(&dst), fresh, "{what}");
        p.net.fill(&dst, 0x35);
    }

    let end = f.iova + u64::from(f.length);
    let watch = p.net.watch();
    for (what, wr) in [
        ("WRITE with the old key", write(&src, 0, 8, f.iova, mr.rkey)),
        (
            "WRITE past the end",
            write(&src, 0, 0x41, end - 0x40, f.key),
        ),
        ("READ before the iova", read(&dst, 0, 8, f.iova - 8, f.key)),
    ] {
        on_a(&mut p, what, wr, wc_status::REM_ACCESS_ERR);
    }
    p.net.assert_unchanged_except(&watch, &[]);
}

fn fast_reg_access_flags_are_the_work_requests<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let src = p.net.mr(&p.a, 64, 0);
    let data = p.net.fill(&src, 0x37);
    let dst = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    let mr = p.net.frmr(&p.b, 2);
    let dev = p.b.dev();
    // REMOTE_READ only: WRITE refused, READ allowed.
    let f = Frmr::map(
        &mut p.net,
        dev,
        &mr,
        2,
        12,
        0x1000_0040,
        0x1000,
        access::REMOTE_READ,
        1,
    );
    register(&mut p, &f);
    let watch = p.net.watch();
    on_a(
        &mut p,
        "WRITE without REMOTE_WRITE",
        write(&src, 0, 64, f.iova, f.key),
        wc_status::REM_ACCESS_ERR,
    );
    p.net.assert_unchanged_except(&watch, &[]);
    write_iova(&p.net, &f, f.iova, &data);
    on_a(&mut p, "READ", read(&dst, 0, 64, f.iova, f.key), OK);
    assert_eq!(p.net.contents(&dst), data);

    // Then LOCAL_WRITE | REMOTE_WRITE only: READ refused, WRITE allowed.
    local_inv(&mut p, f.key);
    let g = Frmr {
        access: access::LOCAL_WRITE | access::REMOTE_WRITE,
        key: rekey(f.key, 1),
        ..f.clone()
    };
    register(&mut p, &g);
    let watch = p.net.watch();
    on_a(
        &mut p,
        "READ without REMOTE_READ",
        read(&dst, 0, 64, g.iova + 64, g.key),
        wc_status::REM_ACCESS_ERR,
    );
    let faa = |key: u32| {
        Wr::new(3, wr_opcode::ATOMIC_FETCH_AND_ADD, &[dst.sge(0, 8)]).atomic(
            g.iova + 0xfc0,
            5,
            0,
            key,
        )
    };
    on_a(
        &mut p,
        "FETCH_AND_ADD without REMOTE_ATOMIC",
        faa(g.key),
        wc_status::REM_ACCESS_ERR,
    );
    p.net.assert_unchanged_except(&watch, &[]);
    on_a(&mut p, "WRITE", write(&src, 0, 64, g.iova + 64, g.key), OK);
    assert_eq!(read_iova(&p.net, &g, g.iova + 64, 64), data);

    // And LOCAL_WRITE | REMOTE_ATOMIC: atomics on the second page.
    local_inv(&mut p, g.key);
    let h = Frmr {
        access: access::LOCAL_WRITE | access::REMOTE_ATOMIC,
        key: rekey(g.key, 1),
        ..f.clone()
    };
    register(&mut p, &h);
    write_iova(&p.net, &h, h.iova + 0xfc0, &40u64.to_le_bytes());
    on_a(&mut p, "FETCH_AND_ADD", faa(h.key), OK);
    assert_eq!(p.net.read_u64(&dst, 0), 40);
    assert_eq!(
        read_iova(&p.net, &h, h.iova + 0xfc0, 8),
        45u64.to_le_bytes()
    );
}

fn fast_registered_lkey_serves_local_sges<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let f = scattered_frmr(&mut p, 4, 3, 0x22);
    let src = p.net.mr(&p.a, 6000, 0);
    let data = p.net.fill(&src, 0x38);
    let dst = p.net.mr(&p.a, 6000, access::LOCAL_WRITE);
    p.net.fill(&dst, 0x39);
    register(&mut p, &f);

    // A receive of B scattered over the registered pages, through the new lkey.
    let (b, qb) = (p.b.clone(), p.qb.clone());
    p.net.recv(&b, &qb, 7, &[sge(f.iova + 100, 6000, f.key)]);
    on_a(
        &mut p,
        "SEND into the fast-registered buffer",
        Wr::new(1, wr_opcode::SEND, &[src.sge(0, 6000)]),
        OK,
    );
    assert_eq!(
        summary(&p.recvs_b()),
        [(7, wc_opcode::RECV, OK)],
        "B's receive"
    );
    assert_eq!(read_iova(&p.net, &f, f.iova + 100, 6000), data);

    // B sends from it.
    let (a, qa) = (p.a.clone(), p.qa.clone());
    p.net.recv(&a, &qa, 8, &[dst.sge(0, 6000)]);
    p.post_b(&[Wr::new(
        2,
        wr_opcode::SEND,
        &[sge(f.iova + 100, 6000, f.key)],
    )]);
    assert_eq!(summary(&p.sends_b()), [(2, wc_opcode::SEND, OK)]);
    assert_eq!(summary(&p.net.recvs(&a)), [(8, wc_opcode::RECV, OK)]);
    assert_eq!(p.net.contents(&dst), data);

    // The creation lkey is no key of the MR any more.
    fails_on_b(
        &mut p,
        "SEND from the old lkey",
        Wr::new(3, wr_opcode::SEND, &[sge(f.iova, 8, f.mr.lkey)]),
        wc_opcode::SEND,
        wc_status::LOC_PROT_ERR,
    );
}

fn local_inv_revokes_remote_access<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let f = scattered_frmr(&mut p, 4, 4, 0x42);
    let src = p.net.mr(&p.a, 256, 0);
    let data = p.net.fill(&src, 0x3a);
    let dst = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    p.net.fill(&dst, 0x3b);
    register(&mut p, &f);
    on_a(
        &mut p,
        "WRITE while valid",
        write(&src, 0, 256, f.iova, f.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &f, f.iova, 256), data);

    local_inv(&mut p, f.key);
    let before = page_contents(&p.net, &f);
    let watch = p.net.watch();
    for (what, wr) in [
        ("WRITE after LOCAL_INV", write(&src, 0, 256, f.iova, f.key)),
        ("READ after LOCAL_INV", read(&dst, 0, 256, f.iova, f.key)),
        (
            "WRITE with the creation key",
            write(&src, 0, 8, f.iova, f.mr.rkey),
        ),
    ] {
        on_a(&mut p, what, wr, wc_status::REM_ACCESS_ERR);
    }
    // The lkey is gone too.
    fails_on_b(
        &mut p,
        "SEND from the invalidated lkey",
        Wr::new(3, wr_opcode::SEND, &[sge(f.iova, 8, f.key)]),
        wc_opcode::SEND,
        wc_status::LOC_PROT_ERR,
    );
    assert_eq!(page_contents(&p.net, &f), before);
    p.net.assert_unchanged_except(&watch, &[]);
}

fn reregistering_a_valid_frmr_fails_until_invalidated<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let first = scattered_frmr(&mut p, 4, 4, 0x10);
    let dev = p.b.dev();
    let second = Frmr::map(
        &mut p.net,
        dev,
        &first.mr,
        2,
        12,
        0x2000_0000,
        0x2000,
        REMOTE_RW,
        0x20,
    );
    let src = p.net.mr(&p.a, 256, 0);
    let data = p.net.fill(&src, 0x3c);
    register(&mut p, &first);

    // Registering it again while valid: LOC_PROT_ERR; the first mapping stays as it was.
    let watch = p.net.watch();
    fails_on_b(
        &mut p,
        "FAST_REG_MR of a valid MR",
        second.wr(2),
        wc_opcode::FAST_REG_MR,
        wc_status::LOC_PROT_ERR,
    );
    on_a(
        &mut p,
        "WRITE with the refused key",
        write(&src, 0, 8, second.iova, second.key),
        wc_status::REM_ACCESS_ERR,
    );
    p.net.assert_unchanged_except(&watch, &[]);
    on_a(
        &mut p,
        "the first key still works",
        write(&src, 0, 256, first.iova, first.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &first, first.iova, 256), data);

    // After LOCAL_INV a new key byte, new pages: the new key works, the old one does not.
    local_inv(&mut p, first.key);
    register(&mut p, &second);
    on_a(
        &mut p,
        "WRITE with the new key",
        write(&src, 0, 256, second.iova + 0xf80, second.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &second, second.iova + 0xf80, 256), data);
    let before = page_contents(&p.net, &first);
    on_a(
        &mut p,
        "WRITE with the invalidated key",
        write(&src, 0, 8, first.iova, first.key),
        wc_status::REM_ACCESS_ERR,
    );
    assert_eq!(page_contents(&p.net, &first), before);
}

fn fast_reg_errors<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let dev = p.b.dev();
    let mr = p.net.frmr(&p.b, 4);
    // A valid registration to derive the bad ones from: 4 pages, iova 0x10 into the first.
    let good = Frmr::map(
        &mut p.net,
        dev,
        &mr,
        4,
        12,
        0x3000_0010,
        (4 * PAGE_SIZE - 0x10) as u32,
        REMOTE_RW,
        1,
    );
    let five = p.net.guest_pages(dev, 5, 12);
    let five = p.net.page_list(dev, five);
    let eight_k = p.net.guest_pages(dev, 2, 13);
    let mut odd = eight_k.clone();
    odd[1] += PAGE_SIZE;
    let odd = p.net.page_list(dev, odd);
    let mut half = good.pdir.pages.clone();
    half[2] += 0x800;
    let half = p.net.page_list(dev, half);
    let other_pd = p.net.another_pd(&p.b);
    let foreign = p.net.frmr_in(&p.b.clone(), other_pd, 4);
    let plain = p.net.mr(&p.b, 64, ALL_ACCESS);
    let dma = p.net.dma_mr(&p.b);
    let src = p.net.mr(&p.a, 64, 0);
    p.net.fill(&src, 0x42);
    // The largest fast-register MR and a page list one entry longer than it may take.
    let big = p.net.frmr(&p.b, MAX_FAST_REG_PAGES);
    let pages = p
        .net
        .guest_pages(dev, u64::from(MAX_FAST_REG_PAGES) + 1, 12);
    let long = p.net.page_list(dev, pages);

    let base = good.fast_reg();
    let len_err = [
        (
            "129 pages into an MR of 128",
            FastReg {
                pl_pdir_dma: long.dir,
                page_list_len: MAX_FAST_REG_PAGES + 1,
                iova_start: 0x3100_0000,
                length: 0x1000,
                rkey: rekey(big.rkey, 1),
                ..base
            },
        ),
        (
            "page_list_len above the MR's max pages",
            FastReg {
                pl_pdir_dma: five.dir,
                page_list_len: 5,
                ..base
            },
        ),
        (
            "page_list_len 0",
            FastReg {
                page_list_len: 0,
                ..base
            },
        ),
        (
            "a length one byte beyond the pages",
            FastReg {
                length: base.length + 1,
                ..base
            },
        ),
        (
            "an aligned iova with a length beyond the pages",
            FastReg {
                iova_start: 0x3000_0000,
                length: 4 * PAGE_SIZE as u32 + 1,
                ..base
            },
        ),
        (
            "page_shift 11",
            FastReg {
                page_shift: 11,
                ..base
            },
        ),
        (
            "page_shift 22",
            FastReg {
                page_shift: 22,
                ..base
            },
        ),
    ];
    let prot_err = [
        (
            "the rkey of a user MR",
            FastReg {
                rkey: rekey(plain.rkey(), 1),
                ..base
            },
        ),
        (
            "the rkey of a user MR, its own key byte",
            FastReg {
                rkey: plain.rkey(),
                ..base
            },
        ),
        (
            "the DMA MR's key",
            FastReg {
                rkey: rekey(dma.rkey, 1),
                ..base
            },
        ),
        (
            "an FRMR of another PD",
            FastReg {
                rkey: rekey(foreign.rkey, 1),
                ..base
            },
        ),
        (
            "an rkey naming no MR",
            FastReg {
                rkey: 0x00ff_ff01,
                ..base
            },
        ),
        (
            "a page entry aligned to 4 KiB but not to the 8 KiB page_shift",
            FastReg {
                pl_pdir_dma: odd.dir,
                page_shift: 13,
                page_list_len: 2,
                length: 0x3000,
                ..base
            },
        ),
        (
            "a page entry in the middle of a page",
            FastReg {
                pl_pdir_dma: half.dir,
                ..base
            },
        ),
    ];
    let watch = p.net.watch();
    let cases = len_err
        .iter()
        .map(|(what, fr)| (what, fr, wc_status::LOC_LEN_ERR))
        .chain(
            prot_err
                .iter()
                .map(|(what, fr)| (what, fr, wc_status::LOC_PROT_ERR)),
        );
    for (what, fr, status) in cases {
        fails_on_b(
            &mut p,
            what,
            Wr::fast_reg(9, fr),
            wc_opcode::FAST_REG_MR,
            status,
        );
        // Nothing answers the key it tried to bind.
        on_a(
            &mut p,
            &format!("{what}: WRITE with its key"),
            write(&src, 0, 8, fr.iova_start, fr.rkey),
            wc_status::REM_ACCESS_ERR,
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);

    // None of them registered anything: the MR is still free to register, and the user MR
    // still answers its own key.
    register(&mut p, &good);
    on_a(
        &mut p,
        "the user MR's key",
        write(&src, 0, 8, plain.at(0), plain.rkey()),
        OK,
    );
    on_a(
        &mut p,
        "the good key",
        write(&src, 0, 8, good.iova, good.key),
        OK,
    );
    // 128 pages is not too many, and the 128th page is reached.
    let full = FastReg {
        pl_pdir_dma: long.dir,
        page_list_len: MAX_FAST_REG_PAGES,
        iova_start: 0x3100_0000,
        length: MAX_FAST_REG_PAGES * PAGE_SIZE as u32,
        rkey: rekey(big.rkey, 2),
        ..base
    };
    p.post_b(&[Wr::fast_reg(10, &full)]);
    assert_eq!(summary(&p.sends_b()), [(10, wc_opcode::FAST_REG_MR, OK)]);
    let last = full.iova_start + u64::from(full.length) - 8;
    on_a(
        &mut p,
        "the 128th page",
        write(&src, 0, 8, last, full.rkey),
        OK,
    );
    let page = long.pages[usize::try_from(MAX_FAST_REG_PAGES).unwrap() - 1];
    assert_eq!(
        p.net.read_phys(dev, page + PAGE_SIZE - 8, 8),
        p.net.read(&src, 0, 8)
    );
}

fn local_inv_errors<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let f = scattered_frmr(&mut p, 4, 2, 0x30);
    let other_pd = p.net.another_pd(&p.b);
    let foreign = p.net.frmr_in(&p.b.clone(), other_pd, 4);
    let plain = p.net.mr(&p.b, 64, ALL_ACCESS);
    let src = p.net.mr(&p.a, 64, 0);
    register(&mut p, &f);
    for (what, key) in [
        ("the key of a user MR", plain.rkey()),
        ("an FRMR of another PD", foreign.rkey),
        ("the FRMR with another key byte", rekey(f.key, 1)),
    ] {
        fails_on_b(
            &mut p,
            &format!("LOCAL_INV of {what}"),
            Wr::local_inv(4, key),
            wc_opcode::LOCAL_INV,
            wc_status::LOC_PROT_ERR,
        );
    }
    // None of them invalidated anything.
    on_a(&mut p, "the FRMR", write(&src, 0, 8, f.iova, f.key), OK);
    on_a(
        &mut p,
        "the user MR",
        write(&src, 0, 8, plain.at(0), plain.rkey()),
        OK,
    );
}

fn send_with_inv_invalidates_the_receivers_frmr<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let f = scattered_frmr(&mut p, 4, 4, 0x50);
    let src = p.net.mr(&p.a, 300, 0);
    let data = p.net.fill(&src, 0x3d);
    // B receives into a page it addresses through its DMA MR, as kernel ULPs do.
    let dma = p.net.dma_mr(&p.b);
    let d = p.net.dev(p.b.dev());
    let page = d.alloc.page(d.bus.ram());
    register(&mut p, &f);
    p.recv_b(21, &[sge(page + 8, 512, dma.lkey)]);
    on_a(
        &mut p,
        "SEND_WITH_INV",
        Wr::send_inv(1, &[src.sge(0, 300)], f.key),
        OK,
    );
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(21, wc_opcode::RECV, OK)]);
    let r = recvs[0];
    assert_eq!(r.byte_len, 300);
    assert_eq!(r.wc_flags, wc_flags::WITH_INVALIDATE);
    assert_eq!(r.imm_data, f.key, "imm_data carries the invalidated rkey");
    assert_eq!(r.qp, u64::from(p.qb.handle));
    assert_eq!(p.net.read_phys(p.b.dev(), page + 8, 300), data);

    // The FRMR is invalid now.
    let before = page_contents(&p.net, &f);
    let watch = p.net.watch();
    on_a(
        &mut p,
        "WRITE with the invalidated rkey",
        write(&src, 0, 64, f.iova, f.key),
        wc_status::REM_ACCESS_ERR,
    );
    p.net.assert_unchanged_except(&watch, &[]);
    assert_eq!(page_contents(&p.net, &f), before);
    // ... and free to register again, under a new key.
    let g = Frmr {
        key: rekey(f.key, 1),
        ..f.clone()
    };
    register(&mut p, &g);
    on_a(
        &mut p,
        "WRITE with the new key",
        write(&src, 0, 64, g.iova, g.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &g, g.iova, 64), data[..64]);
}

fn send_with_inv_needs_a_registered_frmr_of_the_responders_pd<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let dev = p.b.dev();
    let f = scattered_frmr(&mut p, 4, 2, 0x60);
    let unregistered = p.net.frmr(&p.b, 4);
    let plain = p.net.mr(&p.b, 64, ALL_ACCESS);
    let dma = p.net.dma_mr(&p.b);
    // A registered FRMR of another kernel PD on B's device, registered by a QP of that PD.
    let (hb, qa_qpn, ha_gid) = (p.b.host, p.qa.qpn, p.a.host.gid);
    let other = p.net.kernel_ctx(hb);
    let other_qp = p.net.qp(&other, qp_type::RC, QpOpts::default());
    p.net.connect(&other, &other_qp, ha_gid, qa_qpn);
    let foreign_mr = p.net.frmr(&other, 4);
    let foreign = Frmr::map(
        &mut p.net,
        dev,
        &foreign_mr,
        1,
        12,
        0x4000_0000,
        64,
        REMOTE_RW,
        1,
    );
    p.net.post(&other, &other_qp, &[foreign.wr(5)]);
    assert_eq!(
        summary(&p.net.sends(&other)),
        [(5, wc_opcode::FAST_REG_MR, OK)]
    );
    let dst = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    let before = p.net.fill(&dst, 0x3e);
    let src = p.net.mr(&p.a, 64, 0);
    p.net.fill(&src, 0x3f);
    register(&mut p, &f);
    p.recv_b(31, &[dst.sge(0, 64)]);

    let watch = p.net.watch();
    for (what, rkey) in [
        ("an FRMR never registered", unregistered.rkey),
        ("a user MR", plain.rkey()),
        ("the DMA MR", dma.rkey),
        ("a registered FRMR of another PD", foreign.key),
        ("the registered FRMR with a stale key byte", f.mr.rkey),
        ("no MR at all", 0x00ff_ff01),
    ] {
        on_a(
            &mut p,
            &format!("SEND_WITH_INV of {what}"),
            Wr::send_inv(1, &[src.sge(0, 64)], rkey),
            wc_status::REM_INV_REQ_ERR,
        );
        assert_eq!(p.recvs_b(), [], "{what}: B completes nothing");
        let (prod, cons) = p.net.rq(&p.b, &p.qb);
        assert_eq!(
            prod.wrapping_sub(cons) & 0x1f,
            1,
            "{what}: receive consumed"
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);
    assert_eq!(p.net.contents(&dst), before);

    // Nothing was invalidated: B's FRMR and the user MR still answer.
    on_a(&mut p, "the FRMR", write(&src, 0, 8, f.iova, f.key), OK);
    on_a(
        &mut p,
        "the user MR",
        write(&src, 0, 8, plain.at(0), plain.rkey()),
        OK,
    );
    // The receive is still there for a good SEND_WITH_INV.
    on_a(
        &mut p,
        "SEND_WITH_INV of the FRMR",
        Wr::send_inv(2, &[src.sge(0, 64)], f.key),
        OK,
    );
    let recvs = p.recvs_b();
    assert_eq!(summary(&recvs), [(31, wc_opcode::RECV, OK)]);
    assert_eq!(recvs[0].wc_flags, wc_flags::WITH_INVALIDATE);
}

fn user_qps_cannot_post_memory_extensions<B: Bus>(net: Net<B>) {
    // User RC QPs; A's PD even has a fast-register MR (a user PD may, device-abi §5.4).
    let mut p = Pair::rc(net, QpOpts::default());
    let dev = p.a.dev();
    let mr = p.net.frmr(&p.a, 4);
    let f = Frmr::map(
        &mut p.net,
        dev,
        &mr,
        2,
        12,
        0x6000_0000,
        0x2000,
        REMOTE_RW,
        3,
    );
    let local = p.net.mr(&p.a, 64, access::LOCAL_WRITE);
    let dst = p.net.mr(&p.b, 64, access::LOCAL_WRITE);
    let before = p.net.fill(&dst, 0x40);
    p.recv_b(41, &[dst.sge(0, 64)]);
    let watch = p.net.watch();
    for (what, wr) in [
        ("FAST_REG_MR", f.wr(1)),
        ("LOCAL_INV", Wr::local_inv(2, mr.rkey)),
        (
            "SEND_WITH_INV",
            Wr::send_inv(3, &[local.sge(0, 8)], mr.rkey),
        ),
    ] {
        on_a(
            &mut p,
            &format!("{what} from a user QP"),
            wr,
            wc_status::LOC_QP_OP_ERR,
        );
        assert_eq!(p.recvs_b(), [], "{what}: B completes nothing");
    }
    p.net.assert_unchanged_except(&watch, &[]);
    assert_eq!(p.net.contents(&dst), before);
    // The user FRMR was not registered: B cannot write through the key A tried to bind.
    let src = p.net.mr(&p.b, 64, 0);
    let (b, qb) = (p.b.clone(), p.qb.clone());
    p.net
        .post(&b, &qb, &[write(&src, 0, 8, f.iova, f.key).flags(0)]);
    assert_eq!(
        summary(&p.net.sends(&b)),
        [(1, wc_opcode::RDMA_WRITE, wc_status::REM_ACCESS_ERR)]
    );
}

fn memory_op_completions_follow_signaling<B: Bus>(net: Net<B>) {
    let mut p = kernel_pair(net);
    let f1 = scattered_frmr(&mut p, 4, 2, 1);
    let f2 = Frmr {
        key: rekey(f1.key, 1),
        ..f1.clone()
    };
    let f3 = Frmr {
        key: rekey(f1.key, 2),
        ..f1.clone()
    };
    let src = p.net.mr(&p.a, 64, 0);
    let data = p.net.fill(&src, 0x41);
    // Unsignaled FAST_REG_MR and LOCAL_INV complete nothing; signaled ones complete with
    // their own opcodes; all of them run (each registration needs the invalidation before).
    p.post_b(&[
        f1.wr(1).flags(0),
        Wr::local_inv(2, f1.key).flags(0),
        f2.wr(3),
        Wr::local_inv(4, f2.key),
        f3.wr(5).flags(0),
    ]);
    let sends = p.sends_b();
    assert_eq!(
        summary(&sends),
        [
            (3, wc_opcode::FAST_REG_MR, OK),
            (4, wc_opcode::LOCAL_INV, OK)
        ]
    );
    for c in &sends {
        assert_eq!(c.qp, u64::from(p.qb.handle));
        assert_eq!((c.byte_len, c.wc_flags), (0, 0));
    }
    let (prod, cons) = p.net.sq(&p.b, &p.qb);
    assert_eq!(prod, cons, "the send queue was consumed");
    on_a(
        &mut p,
        "the last key",
        write(&src, 0, 64, f3.iova, f3.key),
        OK,
    );
    assert_eq!(read_iova(&p.net, &f3, f3.iova, 64), data);

    // On a QP with sq_sig_all every one completes.
    let all = QpOpts {
        sq_sig_all: true,
        ..QpOpts::default()
    };
    let (b, qa_qpn, ha_gid) = (p.b.clone(), p.qa.qpn, p.a.host.gid);
    let qp = p.net.qp(&b, qp_type::RC, all);
    p.net.connect(&b, &qp, ha_gid, qa_qpn);
    let f4 = Frmr {
        key: rekey(f1.key, 3),
        ..f1.clone()
    };
    p.net.post(
        &b,
        &qp,
        &[Wr::local_inv(6, f3.key).flags(0), f4.wr(7).flags(0)],
    );
    assert_eq!(
        summary(&p.net.sends(&b)),
        [
            (6, wc_opcode::LOCAL_INV, OK),
            (7, wc_opcode::FAST_REG_MR, OK)
        ]
    );
}
