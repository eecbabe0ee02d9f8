//! One regression test per class of the CVEs found in QEMU's own PVRDMA device (removed from
//! QEMU after them): each drives this device the way a buggy or hostile guest would have
//! driven QEMU's, and checks the documented outcome (docs/device.md, device-abi §10.3): the exact ERR
//! of the command, the completion status, the QP state or async event, the device still
//! working afterwards, object counts back at their baseline. `device_failures.rs` and
//! `device_commands.rs` check the individual rules; these tests name the CVE each rule
//! answers.

mod driver;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use driver::bringup::{DsrConfig, caps_supported};
use driver::bus::{BAR_UAR, Bus};
use driver::commands::{CmdError, CmdResult, RESPONSE_POISON};
use driver::layout::{PageDir, QpOwner, QpSizes, RingBuffer, UserBuffer, send_stride};
use driver::memory;
use driver::queues::{recv_wqe, send_wqe};
use driver::verbs::{QpSpec, RC_INIT_MASK, RC_RTR_MASK, RC_RTS_MASK, ipv4_gid};
use driver::{Cq, Driver, InProcessBus, Mr, Qp, Uc};
use vfio_user_pvrdma::abi::{
    self, Cqe, CreateCqRequest, CreateMrRequest, CreateQpRequest, CreateSrqRequest,
    GID_TYPE_ROCE_V1, PAGE_SIZE, QpAttr, RingPages, SEND_WQE_HEADER_SIZE, SGE_SIZE, Sge, access,
    event, pdir, qp_state, qp_type, regs, send_flags, uar, vector, wc_opcode, wc_status, wr_opcode,
};
use vfio_user_pvrdma::pci::ids;
use vfio_user_pvrdma::pvrdma::DeviceConfig;
use vfio_user_pvrdma::pvrdma::errno::{EBUSY, EFAULT, EINVAL, ENOENT, ENOMEM, EPERM};

type D = Driver<InProcessBus>;

/// ERR before any DSR was loaded (QEMU's value, kept by this device).
const ERR_UNINITIALISED: u32 = 0xffff;

/// How long one doorbell or register write may take before it counts as an unbounded loop:
/// the work each does here takes milliseconds, even in a debug build.
const PROMPT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn objects(d: &D) -> usize {
    d.device().object_count()
}

/// Unwraps a success that raised exactly vector 0.
fn ok<T: std::fmt::Debug>(result: CmdResult<T>, d: &D) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    value
}

/// Checks a refused command: ERR is exactly `errno`, vector 0 was raised, the response slot
/// was not written, and the device holds `objects_before` objects.
fn refused<T: std::fmt::Debug>(
    result: CmdResult<T>,
    d: &D,
    objects_before: usize,
    errno: u32,
    what: &str,
) {
    match result {
        Err(CmdError::Device(err)) => assert_eq!(err, errno, "{what}: ERR"),
        other => panic!("{what}: expected ERR {errno}, got {other:?}"),
    }
    let record = d.last.as_ref().unwrap();
    assert_eq!(record.vectors, [vector::COMMAND], "{what}: vector 0");
    assert!(
        record.response.iter().all(|&b| b == RESPONSE_POISON),
        "{what}: a failed command wrote a response"
    );
    assert_eq!(objects(d), objects_before, "{what}: objects changed");
}

/// The device still executes commands: QUERY_PORT, and a PD created and destroyed.
fn healthy(d: &mut D) {
    let before = objects(d);
    assert!(d.device().is_active());
    assert_eq!(ok(d.query_port(1), d).state, 4);
    let pd = ok(d.create_pd(0), d);
    assert_eq!(objects(d), before + 1);
    ok(d.destroy_pd(pd), d);
    assert_eq!(objects(d), before);
}

/// Runs `work` (one doorbell or register write) on another thread and fails the test if it
/// has not returned after [`PROMPT`]: an unbounded loop fails instead of hanging the suite.
fn promptly(what: &str, d: D, work: impl FnOnce(&mut D) + Send + 'static) -> D {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut d = d;
        work(&mut d);
        let _ = tx.send(d);
    });
    match rx.recv_timeout(PROMPT) {
        Ok(d) => d,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {PROMPT:?} (an unbounded loop)")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: the device panicked"),
    }
}

fn sge(addr: u64, length: u32, lkey: u32) -> Sge {
    Sge { addr, length, lkey }
}

fn summary(cqes: &[Cqe]) -> Vec<(u64, u32)> {
    cqes.iter().map(|c| (c.wr_id, c.status)).collect()
}

/// A one-page user MR at the page-aligned virtual address `va`; returns it and its page.
fn mr(d: &mut D, pd: u32, va: u64, len: u64, access_flags: u32) -> (Mr, u64) {
    assert!(va.is_multiple_of(PAGE_SIZE) && len <= PAGE_SIZE);
    let mr = ok(d.reg_user_mr(pd, va, len, access_flags), d);
    let page = mr.buffer.as_ref().unwrap().pdir.pages[0];
    (mr, page)
}

fn page(d: &D, addr: u64) -> Vec<u8> {
    memory::snapshot(d.ram(), addr, PAGE_SIZE as usize)
}

/// Writes a receive WQE given as bytes into `qp`'s RQ and rings the RQ doorbell.
fn post_recv_bytes(d: &mut D, qp: &Qp, bytes: &[u8]) {
    let rq = qp.layout.rq.unwrap();
    let (prod, _) = d.rq_indices(qp);
    qp.layout
        .ring
        .buf
        .write(d.ram(), rq.elem_offset(prod), bytes);
    d.set_rq_prod(qp, rq.idx.next(prod));
    d.ring_qp(qp, uar::QP_RECV);
}

fn async_events(d: &mut D) -> Vec<(u32, u32)> {
    d.poll_async()
        .unwrap()
        .iter()
        .map(|e| (e.event_type, e.info))
        .collect()
}

fn qp_state_of(d: &mut D, qp: &Qp) -> u32 {
    ok(d.query_qp(qp.handle, 0), d).qp_state
}

// ---------------------------------------------------------------------------------------
// Two RC QPs of one device connected to each other (loopback: the device answers requests
// for its own GIDs)
// ---------------------------------------------------------------------------------------

const A_GID_INDEX: u8 = 0;
const B_GID_INDEX: u8 = 1;

fn gid_a() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 1])
}

fn gid_b() -> [u8; 16] {
    ipv4_gid([10, 0, 0, 2])
}

/// Eight WQEs of one SGE each way.
const SMALL: QpSizes = QpSizes {
    max_send_wr: 8,
    max_recv_wr: 8,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

/// The objects of a loopback pair; the driver is kept apart so it can move to a thread.
struct Pair {
    uc: Uc,
    pd: u32,
    a: Qp,
    b: Qp,
    scq_a: Cq,
    rcq_a: Cq,
    scq_b: Cq,
    rcq_b: Cq,
}

/// RESET → INIT (remote writes allowed) → RTR → RTS towards `peer`.
fn connect(d: &mut D, qp: &Qp, peer_gid: [u8; 16], peer_qpn: u32, sgid_index: u8) {
    let init = QpAttr {
        qp_access_flags: access::REMOTE_WRITE,
        ..driver::verbs::rc_init_attrs()
    };
    ok(d.modify_qp(qp.handle, RC_INIT_MASK, &init), d);
    let rtr = driver::verbs::rc_rtr_attrs(peer_qpn, 0x1234, peer_gid, sgid_index);
    ok(d.modify_qp(qp.handle, RC_RTR_MASK, &rtr), d);
    let rts = driver::verbs::rc_rts_attrs(0x5678);
    ok(d.modify_qp(qp.handle, RC_RTS_MASK, &rts), d);
}

fn pair(sizes: QpSizes, cqe: u32) -> (D, Pair) {
    let mut d = Driver::probed();
    let uc = ok(d.open_context(), &d);
    let pd = ok(d.create_pd(uc.handle), &d);
    let cq = |d: &mut D| ok(d.create_cq_on(uc, cqe), d);
    let (scq_a, rcq_a, scq_b, rcq_b) = (cq(&mut d), cq(&mut d), cq(&mut d), cq(&mut d));
    ok(
        d.create_bind(A_GID_INDEX.into(), gid_a(), GID_TYPE_ROCE_V1),
        &d,
    );
    ok(
        d.create_bind(B_GID_INDEX.into(), gid_b(), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = |d: &mut D, scq: &Cq, rcq: &Cq| {
        let spec = QpSpec {
            recv_cq: rcq.handle,
            ..QpSpec::user(qp_type::RC, uc, pd, scq.handle, sizes)
        };
        ok(d.create_qp_with(spec), d)
    };
    let a = qp(&mut d, &scq_a, &rcq_a);
    let b = qp(&mut d, &scq_b, &rcq_b);
    connect(&mut d, &a, gid_b(), b.qpn, A_GID_INDEX);
    connect(&mut d, &b, gid_a(), a.qpn, B_GID_INDEX);
    d.take_irqs();
    let p = Pair {
        uc,
        pd,
        a,
        b,
        scq_a,
        rcq_a,
        scq_b,
        rcq_b,
    };
    (d, p)
}

/// A QP in ERR back to RTS: RESET (the driver restarts its producers too), then connected
/// again to the same peer.
fn reconnect(d: &mut D, qp: &Qp, peer_gid: [u8; 16], peer_qpn: u32, sgid_index: u8) {
    ok(d.modify_qp_state(qp, qp_state::RESET), d);
    d.set_sq_prod(qp, 0);
    d.set_rq_prod(qp, 0);
    connect(d, qp, peer_gid, peer_qpn, sgid_index);
    d.take_irqs();
}

impl Pair {
    fn reconnect_a(&self, d: &mut D) {
        reconnect(d, &self.a, gid_b(), self.b.qpn, A_GID_INDEX);
    }
}

// ---------------------------------------------------------------------------------------
// Ring indices and ring sizes
// ---------------------------------------------------------------------------------------

/// CVE-2018-20216: QEMU's ring helper returned -1 for a corrupt index and its callers read
/// that as "has data", looping for ever; CVE-2023-1544: a ring's page count was not limited
/// to the one page table the device read, so it read past it. Here a corrupt index (-1) on
/// a send queue fails its QP (QP_FATAL), on a CQ breaks the CQ (CQ_ERR), and on the async
/// event and CQ notification rings drops the event without writing; a DSR ring of more
/// pages than one page table (513) is refused, and a CQ or QP whose page count runs past
/// the page tables its directory names is EFAULT.
#[test]
fn ring_index_cve_2018_20216_cve_2023_1544_corrupt_indices_and_oversized_rings_are_contained() {
    let (mut d, p) = pair(SMALL, 16);

    // The SQ producer of an RTS QP is -1: nothing is read, the QP fails with QP_FATAL.
    d.set_sq_prod(&p.a, u32::MAX);
    let a = p.a.clone();
    let mut d = promptly("SQ doorbell, prod_tail -1", d, move |d| {
        d.ring_qp(&a, uar::QP_SEND)
    });
    assert_eq!(d.take_irqs(), [vector::ASYNC_EVENT]);
    assert_eq!(async_events(&mut d), [(event::QP_FATAL, p.a.handle)]);
    assert_eq!(d.sq_indices(&p.a).1, 0, "the SQ was consumed");
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::ERR);
    assert_eq!(d.drain_cq(&p.scq_a), []);
    assert_eq!(d.drain_cq(&p.rcq_b), []);

    // The consumer of B's receive CQ is -1: the completion is not written, the CQ is broken
    // and the guest hears CQ_ERR; the SEND itself completed.
    p.reconnect_a(&mut d);
    d.set_cq_cons(&p.rcq_b, u32::MAX);
    d.post_recv(&p.b, 10, &[]).unwrap();
    d.post_send(&p.a, 11, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert_eq!(d.take_irqs(), [vector::ASYNC_EVENT]);
    assert_eq!(async_events(&mut d), [(event::CQ_ERR, p.rcq_b.handle)]);
    assert_eq!(d.cq_indices(&p.rcq_b).0, 0, "nothing written into the CQ");
    assert_eq!(summary(&d.drain_cq(&p.scq_a)), [(11, wc_status::SUCCESS)]);

    // The CQ notification ring's consumer is -1: an armed CQ's notification is dropped
    // without writing; repaired, the ring takes notifications again.
    let notify = d.session().cq_notify.clone();
    let (notify_prod, _) = d.device_ring_indices(&notify);
    let notify_pages = page(&d, notify.ring.buf.pages[1]);
    d.set_device_ring_cons(&notify, u32::MAX);
    d.ring_cq(&p.scq_a, uar::CQ_ARM);
    d.post_recv(&p.b, 12, &[]).unwrap();
    d.post_send(&p.a, 13, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert_eq!(d.take_irqs(), [] as [u16; 0], "no notification interrupt");
    assert_eq!(d.device_ring_indices(&notify).0, notify_prod);
    assert_eq!(page(&d, notify.ring.buf.pages[1]), notify_pages);
    assert_eq!(summary(&d.drain_cq(&p.scq_a)), [(13, wc_status::SUCCESS)]);
    d.set_device_ring_cons(&notify, notify_prod);
    d.ring_cq(&p.scq_a, uar::CQ_ARM);
    d.post_recv(&p.b, 14, &[]).unwrap();
    d.post_send(&p.a, 15, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert_eq!(d.take_irqs(), [vector::CQ_NOTIFY]);
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: p.scq_a.handle
        }]
    );
    assert_eq!(d.drain_cq(&p.scq_a).len(), 1);

    // The async event ring's consumer is -1: B's QP_FATAL is dropped without writing; B is
    // in ERR all the same. Repaired, the ring takes A's QP_FATAL.
    let events = d.session().async_ring.clone();
    let (events_prod, _) = d.device_ring_indices(&events);
    let events_page = page(&d, events.ring.buf.pages[1]);
    d.set_device_ring_cons(&events, u32::MAX);
    d.set_sq_prod(&p.b, u32::MAX);
    d.ring_qp(&p.b, uar::QP_SEND);
    assert_eq!(d.take_irqs(), [] as [u16; 0], "no event interrupt");
    assert_eq!(d.device_ring_indices(&events).0, events_prod);
    assert_eq!(page(&d, events.ring.buf.pages[1]), events_page);
    assert_eq!(qp_state_of(&mut d, &p.b), qp_state::ERR);
    d.take_irqs();
    d.set_device_ring_cons(&events, events_prod);
    d.set_sq_prod(&p.a, u32::MAX);
    d.ring_qp(&p.a, uar::QP_SEND);
    assert_eq!(d.take_irqs(), [vector::ASYNC_EVENT]);
    assert_eq!(async_events(&mut d), [(event::QP_FATAL, p.a.handle)]);
    healthy(&mut d);

    // CVE-2023-1544, device rings: a ring of 513 pages behind a well-formed two-table
    // directory is refused at DSRHIGH; 512 pages (one page table) are accepted.
    for notify_ring in [false, true] {
        let mut d = Driver::in_process();
        let version = d.read_version();
        let image = d.build_dsr(DsrConfig::default(), version);
        let big = RingBuffer::new(&mut d.alloc, d.bus.ram(), 513);
        assert_eq!(big.pdir.tables.len(), 2);
        for (pages, err) in [(513, EINVAL), (512, 0)] {
            d.edit_dsr(&image, |dsr| {
                let ring = RingPages {
                    num_pages: pages,
                    reserved: 0,
                    pdir_dma: big.pdir.dir,
                };
                if notify_ring {
                    dsr.cq_ring_pages = ring;
                } else {
                    dsr.async_ring_pages = ring;
                }
            });
            d.write_dsr_address(image.addr);
            let what = format!("notify ring {notify_ring}, {pages} pages");
            assert_eq!(d.read_reg(regs::ERR), err, "{what}");
            assert_eq!(
                caps_supported(&d.read_caps(&image), version),
                err == 0,
                "{what}"
            );
            if err != 0 {
                assert_eq!(d.activate(), EPERM, "{what}: ACTIVATE");
                assert!(!d.device().is_active());
            }
        }
        d.probe();
        healthy(&mut d);
    }

    // CVE-2023-1544, CQ and QP rings: page counts running past the one page table their
    // directory names are EFAULT (the second table pointer is 0, not RAM); past the
    // directory's own limit, EINVAL.
    let mut d = Driver::probed();
    let uc = ok(d.open_context(), &d);
    let pd = ok(d.create_pd(uc.handle), &d);
    let cq = ok(d.create_cq_on(uc, 16), &d);
    let n = objects(&d);
    let layout = d.cq_layout(64);
    assert_eq!(layout.ring.pdir.tables.len(), 1);
    for (nchunks, errno) in [
        (600, EFAULT),
        ((pdir::MAX_PAGES + 1) as u32, EINVAL),
        (u32::MAX, EINVAL),
    ] {
        let req = CreateCqRequest {
            nchunks,
            ..D::cq_request(&layout, uc.handle)
        };
        refused(
            d.create_cq(&req),
            &d,
            n,
            errno,
            &format!("CQ nchunks {nchunks}"),
        );
    }
    let layout = d.qp_layout(QpOwner::User, SMALL);
    assert_eq!(layout.ring.pdir.tables.len(), 1);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, SMALL);
    let req = CreateQpRequest {
        total_chunks: 600,
        ..D::qp_request(&layout, &spec)
    };
    refused(d.create_qp(&req), &d, n, EFAULT, "QP total_chunks 600");
    // The same requests with their real page counts work.
    ok(d.create_qp(&D::qp_request(&layout, &spec)), &d);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// Page directory sizes
// ---------------------------------------------------------------------------------------

/// CVE-2018-20125: QEMU mapped as many pages as the guest's nchunks said (a NULL page
/// directory or a huge count: NULL dereference or unbounded allocation); CVE-2021-3582:
/// CREATE_MR mapped `length` bytes from a page list of only `nchunks` pages; CVE-2021-3607:
/// a ring of 0 pages underflowed `num_pages - 1`. Here counts above the directory limit, a
/// length that needs more or fewer pages than nchunks, and 0 (or 1) ring pages are EINVAL,
/// a count above the device's page budget is ENOMEM before the directory is even read, and
/// a NULL directory is EFAULT.
#[test]
fn page_directory_size_cve_2018_20125_cve_2021_3582_cve_2021_3607_page_counts_are_checked() {
    let mut config = DeviceConfig::default();
    config.limits.max_mapped_pages = 64;
    let mut d = Driver::in_process_with(config);
    d.probe();
    let uc = ok(d.open_context(), &d);
    let pd = ok(d.create_pd(uc.handle), &d);
    let cq = ok(d.create_cq_on(uc, 16), &d);
    let n = objects(&d);
    let cq_layout = d.cq_layout(16);
    let good_cq = D::cq_request(&cq_layout, uc.handle);
    let qp_layout = d.qp_layout(QpOwner::User, SMALL);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, SMALL);
    let good_qp = D::qp_request(&qp_layout, &spec);
    let srq_layout = d.srq_layout(16, 1);
    let good_srq = D::srq_request(&srq_layout, pd, 0);
    let buffer = d.user_buffer(0x40_0000, 2 * PAGE_SIZE);
    let good_mr = D::user_mr_request(pd, &buffer, access::LOCAL_WRITE);
    assert_eq!(good_mr.nchunks, 2);

    // CVE-2018-20125: huge counts, a NULL directory, counts beyond the page budget.
    let cq_cases = [
        (
            "CQ nchunks u32::MAX",
            16,
            u32::MAX,
            good_cq.pdir_dma,
            EINVAL,
        ),
        ("CQ of 4096 CQEs over the budget", 4096, 65, 0, ENOMEM),
        ("CQ with a NULL directory", 16, 2, 0, EFAULT),
    ];
    for (what, cqe, nchunks, pdir_dma, errno) in cq_cases {
        let req = CreateCqRequest {
            cqe,
            nchunks,
            pdir_dma,
            ..good_cq
        };
        refused(d.create_cq(&req), &d, n, errno, what);
    }
    let qp_cases = [
        (
            "QP of u16::MAX pages",
            u16::MAX,
            u16::MAX,
            good_qp.pdir_dma,
            EINVAL,
        ),
        ("QP over the budget", 65, 1, good_qp.pdir_dma, ENOMEM),
        ("QP with a NULL directory", 3, 1, 0, EFAULT),
    ];
    for (what, total_chunks, send_chunks, pdir_dma, errno) in qp_cases {
        let req = CreateQpRequest {
            total_chunks,
            send_chunks,
            pdir_dma,
            ..good_qp
        };
        refused(d.create_qp(&req), &d, n, errno, what);
    }
    let req = CreateSrqRequest {
        nchunks: u32::MAX,
        ..good_srq
    };
    refused(d.create_srq(&req), &d, n, EINVAL, "SRQ nchunks u32::MAX");
    let req = CreateMrRequest {
        nchunks: u32::MAX,
        ..good_mr
    };
    refused(d.create_mr(&req), &d, n, EINVAL, "MR nchunks u32::MAX");
    let req = CreateMrRequest {
        length: 65 * PAGE_SIZE,
        nchunks: 65,
        ..good_mr
    };
    refused(d.create_mr(&req), &d, n, ENOMEM, "MR over the budget");

    // CVE-2021-3582: the length must need exactly nchunks pages (from `start`'s offset in
    // its page).
    let max = d.caps().max_mr_size;
    for (what, start, length, nchunks) in [
        ("1 GiB over one page", 0x40_0000, max, 1),
        (
            "one byte past nchunks pages",
            0x40_0000,
            2 * PAGE_SIZE + 1,
            2,
        ),
        (
            "mid-page start spilling into a third page",
            0x40_0800,
            2 * PAGE_SIZE,
            2,
        ),
        ("fewer bytes than nchunks pages", 0x40_0000, PAGE_SIZE, 2),
    ] {
        let req = CreateMrRequest {
            start,
            length,
            nchunks,
            ..good_mr
        };
        refused(d.create_mr(&req), &d, n, EINVAL, what);
    }

    // CVE-2021-3607: rings of 0 pages (and CQs/SRQs with no page past the ring state).
    for nchunks in [0, 1] {
        let req = CreateCqRequest { nchunks, ..good_cq };
        refused(
            d.create_cq(&req),
            &d,
            n,
            EINVAL,
            &format!("CQ of {nchunks} pages"),
        );
        let req = CreateSrqRequest {
            nchunks,
            ..good_srq
        };
        refused(
            d.create_srq(&req),
            &d,
            n,
            EINVAL,
            &format!("SRQ of {nchunks} pages"),
        );
    }
    for (what, total_chunks, send_chunks) in [
        ("QP of 0 pages", 0, 0),
        ("QP with 0 send pages", 2, 0),
        ("QP with 0 receive pages", 2, 1),
    ] {
        let req = CreateQpRequest {
            total_chunks,
            send_chunks,
            ..good_qp
        };
        refused(d.create_qp(&req), &d, n, EINVAL, what);
    }
    for pages in [0, 1] {
        for notify_ring in [false, true] {
            let mut fresh = Driver::in_process();
            let config = if notify_ring {
                DsrConfig {
                    cq_ring_pages: pages,
                    ..DsrConfig::default()
                }
            } else {
                DsrConfig {
                    async_ring_pages: pages,
                    ..DsrConfig::default()
                }
            };
            let version = fresh.read_version();
            let image = fresh.build_dsr(config, version);
            fresh.write_dsr_address(image.addr);
            let what = format!("DSR ring of {pages} pages (notify ring {notify_ring})");
            assert_eq!(fresh.read_reg(regs::ERR), EINVAL, "{what}");
            assert!(!caps_supported(&fresh.read_caps(&image), version), "{what}");
            assert_eq!(fresh.activate(), EPERM, "{what}");
        }
    }

    // The well-formed requests are accepted, within the budget.
    ok(d.create_cq(&good_cq), &d);
    ok(d.create_qp(&good_qp), &d);
    ok(d.create_srq(&good_srq), &d);
    ok(d.create_mr(&good_mr), &d);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// The command slot
// ---------------------------------------------------------------------------------------

/// CVE-2022-1050: QEMU executed a command the guest requested before the DSR, and with it
/// the command and response slots, was mapped (a NULL dereference). Here REQUEST before a
/// DSR, after a DSR but before ACTIVATE, and after a second DSR load that failed (the first
/// one's slots are forgotten) is EPERM: vector 0 is raised, nothing is read or written, no
/// object is created.
#[test]
fn command_slot_cve_2022_1050_commands_before_the_slots_are_mapped_fail() {
    let mut d = Driver::in_process();
    assert_eq!(d.read_reg(regs::ERR), ERR_UNINITIALISED);
    // Slots exist in guest memory, but the device was not told about them.
    let version = d.read_version();
    let first = d.build_dsr(DsrConfig::default(), version);
    d.write_reg(regs::IMR, 0);
    for _ in 0..3 {
        refused(d.create_pd(0), &d, 0, EPERM, "CREATE_PD before any DSR");
        refused(d.query_port(1), &d, 0, EPERM, "QUERY_PORT before any DSR");
    }
    // The DSR is loaded but the device not activated.
    d.write_dsr_address(first.addr);
    assert_eq!(d.read_reg(regs::ERR), 0);
    d.write_reg(regs::IMR, 0);
    refused(d.create_pd(0), &d, 0, EPERM, "CREATE_PD before ACTIVATE");
    assert_eq!(d.activate(), 0);
    let pd = ok(d.create_pd(0), &d);
    assert_eq!(pd, 1);

    // A second DSR that fails to load: the first one's slots are forgotten with its objects.
    let bad = d.build_dsr(
        DsrConfig {
            async_ring_pages: 0,
            ..DsrConfig::default()
        },
        version,
    );
    d.write_dsr_address(bad.addr);
    assert_eq!(d.read_reg(regs::ERR), EINVAL);
    assert_eq!(objects(&d), 0);
    d.write_reg(regs::IMR, 0);
    d.dsr = Some(first.clone());
    for _ in 0..3 {
        refused(d.create_pd(0), &d, 0, EPERM, "CREATE_PD into the old slots");
    }
    assert_eq!(d.activate(), EPERM, "ACTIVATE without a DSR");
    refused(
        d.query_port(1),
        &d,
        0,
        EPERM,
        "QUERY_PORT after ACTIVATE failed",
    );

    // A good DSR brings the device back, empty.
    d.probe();
    assert_eq!(ok(d.create_pd(0), &d), 1);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// SGE counts
// ---------------------------------------------------------------------------------------

/// CVE-2018-20124: QEMU trusted a send WQE's num_sge and walked that many SGEs past the
/// WQE. Here a send WQE with more SGEs than its QP was created for (even when they fit the
/// WQE's stride) completes with LOC_LEN_ERR and moves the QP to ERR, and a receive WQE whose
/// num_sge would reach into the next WQE's slot completes with LOC_LEN_ERR (the sender gets
/// REM_INV_REQ_ERR): no byte reaches the receiver's buffer.
#[test]
fn sge_count_cve_2018_20124_num_sge_beyond_the_queue_limit_is_loc_len_err() {
    let (mut d, p) = pair(SMALL, 16);
    let rw = access::LOCAL_WRITE;
    let (src, src_page) = mr(&mut d, p.pd, 0x10_0000, 256, rw);
    let (dst, dst_page) = mr(&mut d, p.pd, 0x20_0000, PAGE_SIZE, rw);
    let src_va = 0x10_0000;
    let dst_va = 0x20_0000;
    memory::fill(d.ram(), src_page, 0x5a, 256);
    memory::fill(d.ram(), dst_page, 0xee, PAGE_SIZE);
    let dst_before = page(&d, dst_page);

    // Receive side: num_sge 2 on an RQ of one SGE (stride 32): the second "SGE" is the next
    // WQE slot, which holds a stale SGE naming the rest of the buffer.
    let rq = p.b.layout.rq.unwrap();
    assert_eq!(rq.stride, 32);
    let stale = sge(dst_va + 2048, 64, dst.lkey);
    p.b.layout.ring.buf.write(
        d.ram(),
        rq.elem_offset(1),
        zerocopy::IntoBytes::as_bytes(&stale),
    );
    let mut bad_recv = recv_wqe(20, &[sge(dst_va, 64, dst.lkey)]);
    bad_recv[8..12].copy_from_slice(&2u32.to_le_bytes());
    post_recv_bytes(&mut d, &p.b, &bad_recv);
    d.post_send(
        &p.a,
        1,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(src_va, 32, src.lkey)],
    )
    .unwrap();
    let recvs = d.drain_cq(&p.rcq_b);
    assert_eq!(summary(&recvs), [(20, wc_status::LOC_LEN_ERR)]);
    assert_eq!(recvs[0].opcode, wc_opcode::RECV);
    assert_eq!(
        summary(&d.drain_cq(&p.scq_a)),
        [(1, wc_status::REM_INV_REQ_ERR)]
    );
    assert_eq!(d.rq_indices(&p.b), (1, 1), "the bad receive was consumed");
    assert_eq!(page(&d, dst_page), dst_before, "receive buffer written");

    // Send side: two SGEs on an SQ of one, both inside the 128-byte stride.
    p.reconnect_a(&mut d);
    d.post_recv(&p.b, 21, &[sge(dst_va, 64, dst.lkey)]).unwrap();
    d.post_recv(&p.b, 22, &[sge(dst_va + 64, 64, dst.lkey)])
        .unwrap();
    assert!(SEND_WQE_HEADER_SIZE + 2 * SGE_SIZE <= send_stride(1));
    let two = [sge(src_va, 16, src.lkey), sge(src_va + 16, 16, src.lkey)];
    d.post_send(&p.a, 2, wr_opcode::SEND, send_flags::SIGNALED, &two)
        .unwrap();
    let sends = d.drain_cq(&p.scq_a);
    assert_eq!(summary(&sends), [(2, wc_status::LOC_LEN_ERR)]);
    assert_eq!(sends[0].opcode, wc_opcode::SEND);
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::ERR);
    assert_eq!(d.sq_indices(&p.a), (1, 1));

    // num_sge = u32::MAX (the SGEs are not even there).
    p.reconnect_a(&mut d);
    let mut huge = send_wqe(3, wr_opcode::SEND, send_flags::SIGNALED, &[]);
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    d.post_send_raw(&p.a, &huge).unwrap();
    d.ring_qp(&p.a, uar::QP_SEND);
    assert_eq!(
        summary(&d.drain_cq(&p.scq_a)),
        [(3, wc_status::LOC_LEN_ERR)]
    );
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::ERR);
    // Neither reached the receiver.
    assert_eq!(d.drain_cq(&p.rcq_b), []);
    assert_eq!(d.rq_indices(&p.b), (3, 1));
    assert_eq!(page(&d, dst_page), dst_before);

    // One SGE, as the QP allows: delivered.
    p.reconnect_a(&mut d);
    d.post_send(
        &p.a,
        4,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(src_va, 32, src.lkey)],
    )
    .unwrap();
    assert_eq!(summary(&d.drain_cq(&p.scq_a)), [(4, wc_status::SUCCESS)]);
    let recvs = d.drain_cq(&p.rcq_b);
    assert_eq!(summary(&recvs), [(21, wc_status::SUCCESS)]);
    assert_eq!(recvs[0].byte_len, 32);
    assert_eq!(memory::snapshot(d.ram(), dst_page, 32), [0x5a; 32]);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// UAR reads
// ---------------------------------------------------------------------------------------

/// CVE-2018-20191: QEMU's UAR BAR had no read handler, so a guest read of a doorbell page
/// jumped to NULL. Here every read of BAR2 (any page, any word, widths 1 to 4096 bytes)
/// answers zeros and rings nothing. The in-process bus answers BAR2 reads itself, so this
/// test drives the real server process over its socket: QEMU's read reaches the server's
/// REGION_READ handler.
#[test]
fn uar_read_cve_2018_20191_bar2_reads_return_zero_and_ring_nothing() {
    let mut d = Driver::probed_over_socket();
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    let cq = d.create_cq_on(uc, 16).expect("CREATE_CQ");
    let qp = d
        .create_qp_with(QpSpec::user(qp_type::RC, uc, pd, cq.handle, SMALL))
        .expect("CREATE_QP");
    d.modify_qp_state(&qp, qp_state::ERR).expect("to ERR");
    // A receive whose doorbell would flush it at once.
    d.post_recv_raw(&qp, 7, &[]).unwrap();
    d.take_irqs();

    let last = (ids::UAR_PAGES - 1) as u32;
    for page in [0, uc.uar, uc.uar + 5, last] {
        for word in [uar::QP_OFFSET, uar::CQ_OFFSET, uar::SRQ_OFFSET, 0xffc] {
            let offset = u64::from(page) * PAGE_SIZE + word;
            assert_eq!(d.bus.read32(BAR_UAR, offset), 0, "BAR2 {offset:#x}");
        }
    }
    let own = u64::from(uc.uar) * PAGE_SIZE;
    for (offset, len) in [
        (own, 1),
        (own + 2, 2),
        (own, 8),
        (own, PAGE_SIZE as usize),
        (ids::UAR_BAR_SIZE - 8, 8),
    ] {
        let mut buf = vec![0xa5u8; len];
        d.bus.call("UAR read", BAR_UAR, offset, |c| {
            c.region_read(BAR_UAR, offset, &mut buf)
        });
        assert!(
            buf.iter().all(|&b| b == 0),
            "{len}-byte read at {offset:#x}"
        );
    }
    // The reads rang nothing: the receive is still posted, no completion, no interrupt.
    assert_eq!(d.drain_cq(&cq), []);
    assert_eq!(d.rq_indices(&qp), (1, 0));
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    // The server lives and the device works: the doorbell write flushes the receive.
    assert!(d.bus.server().exited().is_none());
    d.ring_qp(&qp, uar::QP_RECV);
    let cqes = d.drain_cq(&cq);
    assert_eq!(summary(&cqes), [(7, wc_status::WR_FLUSH_ERR)]);
    assert_eq!(d.query_port(1).expect("QUERY_PORT").state, 4);
    assert!(!d.bus.server().log().contains("panicked"));
}

// ---------------------------------------------------------------------------------------
// Destroying objects in use
// ---------------------------------------------------------------------------------------

/// No CVE, but the use-after-free class QEMU's device kept meeting: objects destroyed while
/// others still used them. Here destroying a CQ, PD or context a QP still names is EBUSY and
/// the objects keep working; an MR deregistered under posted work makes that work fail with
/// LOC_PROT_ERR without touching its old pages; a QP destroyed while its send is parked on
/// receiver-not-ready leaves nothing behind (a later receive stays posted, the handle's next
/// QP inherits nothing), and a parked sender whose responder QP was destroyed fails with
/// REM_INV_REQ_ERR. Everything destroyed in order, the device is back to 0 objects.
#[test]
fn destroy_while_in_use_objects_in_use_stay_and_destroyed_ones_leave_nothing_behind() {
    let (mut d, p) = pair(SMALL, 16);
    let rw = access::LOCAL_WRITE;
    let (src, _) = mr(&mut d, p.pd, 0x10_0000, 256, rw);
    let (dst, dst_page) = mr(&mut d, p.pd, 0x20_0000, 256, rw);
    let (src_va, dst_va) = (0x10_0000, 0x20_0000);

    // Objects a QP names cannot go, and still work.
    let n = objects(&d);
    refused(d.destroy_cq(p.scq_a.handle), &d, n, EBUSY, "send CQ of A");
    refused(
        d.destroy_cq(p.rcq_b.handle),
        &d,
        n,
        EBUSY,
        "receive CQ of B",
    );
    refused(d.destroy_pd(p.pd), &d, n, EBUSY, "PD of the QPs and MRs");
    refused(d.destroy_uc(p.uc.handle), &d, n, EBUSY, "context of the PD");
    d.post_recv(&p.b, 1, &[sge(dst_va, 64, dst.lkey)]).unwrap();
    d.post_send(
        &p.a,
        2,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(src_va, 32, src.lkey)],
    )
    .unwrap();
    assert_eq!(summary(&d.drain_cq(&p.scq_a)), [(2, wc_status::SUCCESS)]);
    assert_eq!(summary(&d.drain_cq(&p.rcq_b)), [(1, wc_status::SUCCESS)]);

    // An MR deregistered under a posted send: the send fails, nothing reaches B.
    d.post_recv(&p.b, 4, &[sge(dst_va, 64, dst.lkey)]).unwrap();
    d.post_send_raw(
        &p.a,
        &send_wqe(
            3,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(src_va, 32, src.lkey)],
        ),
    )
    .unwrap();
    ok(d.destroy_mr(src.handle), &d);
    d.ring_qp(&p.a, uar::QP_SEND);
    assert_eq!(
        summary(&d.drain_cq(&p.scq_a)),
        [(3, wc_status::LOC_PROT_ERR)]
    );
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::ERR);
    assert_eq!(d.rq_indices(&p.b), (2, 1), "B's receive is still posted");

    // An MR deregistered under a posted receive: the receive fails, its pages stay as they
    // were, the sender hears REM_INV_REQ_ERR.
    p.reconnect_a(&mut d);
    let (src2, _) = mr(&mut d, p.pd, 0x30_0000, 256, rw);
    let dst_before = page(&d, dst_page);
    ok(d.destroy_mr(dst.handle), &d);
    d.post_send(
        &p.a,
        5,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(0x30_0000, 32, src2.lkey)],
    )
    .unwrap();
    assert_eq!(
        summary(&d.drain_cq(&p.rcq_b)),
        [(4, wc_status::LOC_PROT_ERR)]
    );
    assert_eq!(
        summary(&d.drain_cq(&p.scq_a)),
        [(5, wc_status::REM_INV_REQ_ERR)]
    );
    assert_eq!(page(&d, dst_page), dst_before);

    // A QP destroyed while its send waits for B to post a receive (RNR, retried for ever).
    p.reconnect_a(&mut d);
    d.post_send(&p.a, 6, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert!(d.device().has_stalled_work(), "A's send is parked");
    assert_eq!(d.sq_indices(&p.a), (1, 0));
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::RTS);
    let n = objects(&d);
    ok(d.destroy_qp(p.a.handle), &d);
    assert_eq!(objects(&d), n - 1);
    assert!(!d.device().has_stalled_work());
    d.post_recv(&p.b, 7, &[]).unwrap();
    d.ring_qp(&p.a, uar::QP_SEND);
    assert_eq!(d.drain_cq(&p.rcq_b), [], "the destroyed QP's send arrived");
    assert_eq!(d.rq_indices(&p.b).1, 2, "B's receive was consumed");
    assert_eq!(d.drain_cq(&p.scq_a), []);
    // A's CQs are free now; a new QP takes A's handle and inherits nothing.
    ok(d.destroy_cq(p.scq_a.handle), &d);
    ok(d.destroy_cq(p.rcq_a.handle), &d);
    let spec = QpSpec {
        recv_cq: p.rcq_b.handle,
        ..QpSpec::user(qp_type::RC, p.uc, p.pd, p.scq_b.handle, SMALL)
    };
    let a2 = ok(d.create_qp_with(spec), &d);
    assert_eq!(a2.handle, p.a.handle);
    connect(&mut d, &a2, gid_b(), p.b.qpn, A_GID_INDEX);
    d.ring_qp(&p.b, uar::QP_RECV);
    assert_eq!(
        d.rq_indices(&p.b).1,
        2,
        "the new QP sent the old one's work"
    );
    d.post_send(&a2, 8, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert_eq!(summary(&d.drain_cq(&p.scq_b)), [(8, wc_status::SUCCESS)]);
    assert_eq!(summary(&d.drain_cq(&p.rcq_b)), [(7, wc_status::SUCCESS)]);

    // The responder destroyed under a parked sender: the retry finds it gone.
    d.post_send(&a2, 9, wr_opcode::SEND, send_flags::SIGNALED, &[])
        .unwrap();
    assert!(d.device().has_stalled_work());
    ok(d.destroy_qp(p.b.handle), &d);
    d.post_recv(&a2, 10, &[]).unwrap();
    assert_eq!(
        summary(&d.drain_cq(&p.scq_b)),
        [(9, wc_status::REM_INV_REQ_ERR)]
    );
    assert_eq!(
        summary(&d.drain_cq(&p.rcq_b)),
        [(10, wc_status::WR_FLUSH_ERR)]
    );
    assert_eq!(qp_state_of(&mut d, &a2), qp_state::ERR);
    assert!(!d.device().has_stalled_work());

    // In the right order everything goes.
    ok(d.destroy_qp(a2.handle), &d);
    ok(d.destroy_mr(src2.handle), &d);
    ok(d.destroy_cq(p.scq_b.handle), &d);
    ok(d.destroy_cq(p.rcq_b.handle), &d);
    ok(d.destroy_pd(p.pd), &d);
    ok(d.close_context(p.uc), &d);
    assert_eq!(objects(&d), 0);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// Leaks on error paths
// ---------------------------------------------------------------------------------------

/// CVE-2018-20123 (memory leaked when QEMU's device failed to initialise), CVE-2018-20126
/// (rings leaked when CREATE_CQ/CREATE_QP failed) and CVE-2021-3608 (a ring whose set-up
/// failed freed uninitialised page pointers). Here a failing DSR load, and CREATE_CQ,
/// CREATE_QP and CREATE_MR failing early, half-way (directory resolved, one ring built) or
/// on the page budget, repeated 1000 times on tables of one or two free handles, leave the
/// object count, the handle tables and the page budget at their baseline: the next valid
/// creates get the lowest handles and exactly fill the budget.
#[test]
fn leaks_on_error_paths_cve_2018_20123_cve_2018_20126_cve_2021_3608_failed_creates_leave_nothing() {
    // Budget: the base CQ (2 pages), then one CQ (2), one QP (3) and one MR (1).
    const BUDGET: u64 = 2 + 2 + 3 + 1;
    let mut config = DeviceConfig::default();
    config.limits.max_cq = 3; // CQ handles 1 and 2
    config.limits.max_qp = 3; // QP handle 2 (1 is the GSI QP's)
    config.limits.max_mr = 3; // MR handles 1 and 2
    config.limits.max_mapped_pages = BUDGET;
    let mut d = Driver::in_process_with(config);

    // A device initialisation that fails, again and again.
    let version = d.read_version();
    let bad = d.build_dsr(
        DsrConfig {
            cq_ring_pages: 0,
            ..DsrConfig::default()
        },
        version,
    );
    for _ in 0..100 {
        d.write_dsr_address(bad.addr);
        assert_eq!(d.read_reg(regs::ERR), EINVAL);
        assert_eq!(d.activate(), EPERM);
        assert_eq!(objects(&d), 0);
    }
    d.probe();

    let uc = ok(d.open_context(), &d);
    let pd = ok(d.create_pd(uc.handle), &d);
    let base = ok(d.create_cq_on(uc, 16), &d);
    assert_eq!(base.handle, 1);
    let baseline = objects(&d);
    let end = d.bus.memory().end();

    // CREATE_CQ: a ring-state producer index that is not an index (after the directory is
    // resolved and the ring built); the last directory entry past RAM; over the budget.
    let bad_state = d.cq_layout(16);
    memory::write_u32(d.ram(), bad_state.ring.buf.pages[0] + 8, 0xdead);
    let bad_entry = d.cq_layout(16);
    bad_entry.ring.pdir.set_entry(d.ram(), 1, end);
    let cq_cases = [
        (
            "CQ producer 0xdead",
            D::cq_request(&bad_state, uc.handle),
            EINVAL,
        ),
        (
            "CQ page past RAM",
            D::cq_request(&bad_entry, uc.handle),
            EFAULT,
        ),
        (
            "CQ over the budget",
            CreateCqRequest {
                nchunks: 7,
                ..D::cq_request(&bad_state, uc.handle)
            },
            ENOMEM,
        ),
        (
            "CQ of a missing context",
            D::cq_request(&bad_state, uc.handle + 1),
            ENOENT,
        ),
    ];

    // CREATE_QP: the RQ consumer invalid (after the SQ ring was built), the SQ consumer
    // invalid, the last page past RAM, over the budget, a missing CQ.
    let spec = QpSpec::user(qp_type::RC, uc, pd, base.handle, SMALL);
    let qp_request = |d: &mut D, edit: &dyn Fn(&D, &driver::layout::QpLayout)| {
        let layout = d.qp_layout(QpOwner::User, SMALL);
        edit(d, &layout);
        D::qp_request(&layout, &spec)
    };
    let rq_cons = qp_request(&mut d, &|d, l| {
        memory::write_u32(d.ram(), l.ring.buf.pages[0] + 12, 0xdead)
    });
    let sq_cons = qp_request(&mut d, &|d, l| {
        memory::write_u32(d.ram(), l.ring.buf.pages[0] + 4, 0xdead)
    });
    let last_page = qp_request(&mut d, &|d, l| {
        l.ring.pdir.set_entry(d.ram(), 2, d.bus.memory().end())
    });
    let qp_cases = [
        ("QP RQ consumer 0xdead", rq_cons, EINVAL),
        ("QP SQ consumer 0xdead", sq_cons, EINVAL),
        ("QP page past RAM", last_page, EFAULT),
        (
            "QP over the budget",
            CreateQpRequest {
                total_chunks: 7,
                ..rq_cons
            },
            ENOMEM,
        ),
        (
            "QP with a missing CQ",
            CreateQpRequest {
                recv_cq_handle: 2,
                ..sq_cons
            },
            ENOENT,
        ),
    ];

    // CREATE_MR: the last page past RAM, a length nchunks cannot hold, over the budget.
    let buffer = d.user_buffer(0x50_0000, 2 * PAGE_SIZE);
    buffer.pdir.set_entry(d.ram(), 1, end);
    let mr_bad_page = D::user_mr_request(pd, &buffer, access::LOCAL_WRITE);
    let mr_cases = [
        ("MR page past RAM", mr_bad_page, EFAULT),
        (
            "MR length past nchunks",
            CreateMrRequest {
                length: 3 * PAGE_SIZE,
                ..mr_bad_page
            },
            EINVAL,
        ),
        (
            "MR over the budget",
            CreateMrRequest {
                length: 7 * PAGE_SIZE,
                nchunks: 7,
                ..mr_bad_page
            },
            ENOMEM,
        ),
    ];

    for _ in 0..1000 {
        for (what, req, errno) in &cq_cases {
            refused(d.create_cq(req), &d, baseline, *errno, what);
        }
        for (what, req, errno) in &qp_cases {
            refused(d.create_qp(req), &d, baseline, *errno, what);
        }
        for (what, req, errno) in &mr_cases {
            refused(d.create_mr(req), &d, baseline, *errno, what);
        }
    }

    // Valid creates get the lowest handles and exactly fill the page budget.
    let cq = ok(d.create_cq_on(uc, 16), &d);
    assert_eq!(cq.handle, 2, "a failed CREATE_CQ kept a handle");
    let qp = ok(
        d.create_qp_with(QpSpec {
            recv_cq: cq.handle,
            ..spec
        }),
        &d,
    );
    assert_eq!(qp.handle, 2, "a failed CREATE_QP kept a handle");
    let (mr1, _) = mr(&mut d, pd, 0x60_0000, 64, access::LOCAL_WRITE);
    assert_eq!(mr1.handle, 1, "a failed CREATE_MR kept a handle");
    assert_eq!(objects(&d), baseline + 3);
    // The budget is spent (a page more is ENOMEM) though the MR table has room (a
    // fast-register MR, which holds no pages, takes handle 2).
    let n = objects(&d);
    let buffer = d.user_buffer(0x70_0000, 64);
    refused(
        d.create_mr(&D::user_mr_request(pd, &buffer, access::LOCAL_WRITE)),
        &d,
        n,
        ENOMEM,
        "one page past the budget",
    );
    let frmr = ok(d.alloc_frmr(pd, 16), &d);
    assert_eq!(frmr.handle, 2);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// Unbounded loops
// ---------------------------------------------------------------------------------------

/// A full-size send/receive queue: 4096 WQEs of one SGE.
const BIG: QpSizes = QpSizes {
    max_send_wr: 4096,
    max_recv_wr: 4096,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

/// QEMU's rings were processed "while there is data", so a guest controlled how long one
/// doorbell ran. Here one doorbell or register write does bounded work whatever the rings
/// say: a send queue that refills itself as the device drains it (its one WQE copies the
/// consumer index into the producer index) executes exactly one WQE per doorbell; producer
/// indices claiming more entries than the ring holds read nothing (QP_FATAL); full queues
/// flushed into full CQs complete once per CQ and report CQ_ERR once; a page directory that
/// names itself as every table and page is resolved once, bounded by its count.
#[test]
fn unbounded_loops_one_doorbell_or_register_write_does_bounded_work() {
    // A self-refilling send queue of one entry: an RDMA WRITE of A's cons_head onto A's
    // prod_tail. After each execution the ring again looks one entry full.
    let one = QpSizes {
        max_send_wr: 1,
        max_recv_wr: 1,
        ..SMALL
    };
    let (mut d, p) = pair(one, 16);
    let state = p.a.layout.ring.buf.pages[0];
    let va = 0x7000_0000;
    let rings = UserBuffer {
        start: va,
        length: 16,
        pdir: PageDir::build(&mut d.alloc, d.bus.ram(), vec![state]),
    };
    let rings_mr = ok(
        d.create_mr(&D::user_mr_request(
            p.pd,
            &rings,
            access::LOCAL_WRITE | access::REMOTE_WRITE,
        )),
        &d,
    );
    let wqe = driver::queues::rdma_wqe(
        1,
        wr_opcode::RDMA_WRITE,
        0,
        &[sge(va + 4, 4, rings_mr.lkey)],
        va,
        rings_mr.rkey,
    );
    d.post_send_raw(&p.a, &wqe).unwrap();
    assert_eq!(d.sq_indices(&p.a), (1, 0));
    d.take_irqs();
    let a = p.a.clone();
    let d = promptly("a self-refilling send queue", d, move |d| {
        d.ring_qp(&a, uar::QP_SEND)
    });
    assert_eq!(d.sq_indices(&p.a), (0, 1), "exactly one WQE per doorbell");
    let a = p.a.clone();
    let mut d = promptly("a self-refilling send queue, again", d, move |d| {
        d.ring_qp(&a, uar::QP_SEND)
    });
    assert_eq!(d.sq_indices(&p.a), (1, 0), "exactly one WQE per doorbell");
    assert_eq!(d.take_irqs(), [] as [u16; 0], "no completion, no event");
    assert_eq!(qp_state_of(&mut d, &p.a), qp_state::RTS);
    d.set_sq_prod(&p.a, 0);
    healthy(&mut d);

    // Producer indices claiming more entries than a ring of 4096 holds: nothing is read.
    let (mut d, p) = pair(BIG, 1);
    for prod in [4097, 8191] {
        p.reconnect_a(&mut d);
        d.set_sq_prod(&p.a, prod);
        let a = p.a.clone();
        d = promptly("an SQ claiming more than it holds", d, move |d| {
            d.ring_qp(&a, uar::QP_SEND)
        });
        assert_eq!(d.take_irqs(), [vector::ASYNC_EVENT], "prod {prod}");
        assert_eq!(async_events(&mut d), [(event::QP_FATAL, p.a.handle)]);
        assert_eq!(d.sq_indices(&p.a).1, 0, "prod {prod}: the SQ was consumed");
        assert_eq!(d.drain_cq(&p.scq_a), []);
        assert_eq!(qp_state_of(&mut d, &p.a), qp_state::ERR);
    }

    // 4096 signaled SENDs to 4096 receives, both sides' CQs of one entry, in one doorbell:
    // every WQE executes once, each CQ takes one completion and reports CQ_ERR once.
    p.reconnect_a(&mut d);
    for i in 0..4096 {
        d.post_recv_raw(&p.b, 10_000 + i, &[]).unwrap();
        d.post_send_raw(
            &p.a,
            &send_wqe(i, wr_opcode::SEND, send_flags::SIGNALED, &[]),
        )
        .unwrap();
    }
    d.ring_qp(&p.b, uar::QP_RECV);
    let a = p.a.clone();
    let mut d = promptly("4096 SENDs into full CQs", d, move |d| {
        d.ring_qp(&a, uar::QP_SEND)
    });
    assert_eq!(d.sq_indices(&p.a), (4096, 4096));
    assert_eq!(d.rq_indices(&p.b), (4096, 4096));
    assert_eq!(
        async_events(&mut d),
        [
            (event::CQ_ERR, p.rcq_b.handle),
            (event::CQ_ERR, p.scq_a.handle)
        ]
    );
    assert_eq!(summary(&d.drain_cq(&p.scq_a)), [(0, wc_status::SUCCESS)]);
    assert_eq!(
        summary(&d.drain_cq(&p.rcq_b)),
        [(10_000, wc_status::SUCCESS)]
    );
    d.take_irqs();
    d.ring_qp(&p.a, uar::QP_SEND);
    assert_eq!(
        d.take_irqs(),
        [] as [u16; 0],
        "a second doorbell found work"
    );

    // Both of B's queues full, flushed by one MODIFY_QP into full CQs.
    for i in 0..4096 {
        d.post_recv_raw(&p.b, i, &[]).unwrap();
        d.post_send_raw(&p.b, &send_wqe(i, wr_opcode::SEND, 0, &[]))
            .unwrap();
    }
    let b = p.b.clone();
    let mut d = promptly("flushing 8192 WQEs into full CQs", d, move |d| {
        d.modify_qp_state(&b, qp_state::ERR).expect("to ERR");
    });
    assert_eq!(
        d.last.as_ref().unwrap().vectors,
        [vector::COMMAND, vector::ASYNC_EVENT]
    );
    assert_eq!(async_events(&mut d), [(event::CQ_ERR, p.scq_b.handle)]);
    assert_eq!(d.sq_indices(&p.b), (4096, 4096));
    // 8192 receives posted in all: the indices wrapped to 0.
    assert_eq!(d.rq_indices(&p.b), (0, 0));
    assert_eq!(
        summary(&d.drain_cq(&p.scq_b)),
        [(0, wc_status::WR_FLUSH_ERR)]
    );
    assert_eq!(d.drain_cq(&p.rcq_b), [], "the broken CQ took more");

    // A page directory whose every table and page is the directory itself, for the largest
    // MR: resolved in one pass of 262144 entries.
    let dir = d.alloc.page(d.bus.ram());
    for i in 0..pdir::ENTRIES_PER_PAGE {
        memory::write_u64(d.ram(), dir + i * 8, dir);
    }
    let n = objects(&d);
    let request = CreateMrRequest {
        hdr: driver::commands::header(abi::Command::CreateMr),
        start: 0,
        length: d.caps().max_mr_size,
        pdir_dma: dir,
        pd_handle: p.pd,
        access_flags: access::LOCAL_WRITE,
        flags: 0,
        nchunks: pdir::MAX_PAGES as u32,
    };
    let (tx, rx) = mpsc::channel();
    let mut d = promptly("a self-referencing page directory", d, move |d| {
        let _ = tx.send(d.create_mr(&request));
    });
    let created = rx.recv().unwrap().expect("an MR over aliased pages");
    assert_eq!(objects(&d), n + 1);
    ok(d.destroy_mr(created.mr_handle), &d);
    healthy(&mut d);
}
