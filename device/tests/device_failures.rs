//! What a buggy or hostile guest can do to the device (device-abi §10.3): every command's failure
//! paths, malformed DSRs and page directories, corrupt ring indices, foreign doorbells,
//! resets, and a deterministic hostile sweep. Every failure must set ERR, change nothing,
//! and leave the device working.

mod driver;

use driver::bringup::{DsrConfig, ProbeError, caps_supported};
use driver::bus::Bus;
use driver::commands::{CmdResult, RESPONSE_POISON, handle_request, header};
use driver::layout::{CqLayout, PageDir, QpOwner, QpSizes, RingBuffer};
use driver::memory;
use driver::queues::{KERNEL_UC, send_wqe};
use driver::verbs::{self, GSI_SIZES, PINGPONG_SIZES, QpSpec, RC_INIT_MASK, RC_RTR_MASK, ipv4_gid};
use driver::{Cq, Driver, InProcessBus, Qp, Srq, Uc};
use vfio_user_pvrdma::abi::{
    self, Command, CreateCqRequest, CreateMrRequest, CreateQpRequest, CreateSrqRequest,
    GID_TYPE_ROCE_V1, GID_TYPE_ROCE_V2, PAGE_SIZE, QpAttr, SRQ_ATTR_LIMIT, SRQ_ATTR_MAX_WR, access,
    event, pdir, qp_attr_mask as mask, qp_state, qp_type, regs, uar, vector, wc_status, wr_opcode,
};

type D = Driver<InProcessBus>;

/// Unwraps a success and checks vector 0.
fn ok<T: std::fmt::Debug>(result: CmdResult<T>, d: &D) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    value
}

/// Checks a failure: ERR != 0, vector 0 raised anyway, no response claiming success, and
/// the object count unchanged. Returns ERR.
fn fails<T: std::fmt::Debug>(
    result: CmdResult<T>,
    d: &D,
    objects_before: usize,
    what: &str,
) -> u32 {
    let err = match result {
        Err(e) => e.err(),
        Ok(v) => panic!("{what}: expected a failure, got {v:?}"),
    };
    assert_ne!(err, 0, "{what}");
    let record = d.last.as_ref().unwrap();
    assert_eq!(
        record.vectors,
        [vector::COMMAND],
        "{what}: vector 0 after a failure"
    );
    // The driver does not read the response of a failed command; a device may still write
    // one (QEMU did, with hdr.err set), but never one that claims success.
    if !record.response[..16].iter().all(|&b| b == RESPONSE_POISON) {
        assert_ne!(
            record.header().err,
            0,
            "{what}: a failed command answered err = 0"
        );
    }
    assert_eq!(
        d.device().object_count(),
        objects_before,
        "{what}: objects changed"
    );
    err
}

/// The device still executes commands: QUERY_PORT, and a PD created and destroyed.
fn healthy(d: &mut D) {
    let before = d.device().object_count();
    assert!(d.device().is_active());
    assert_eq!(ok(d.query_port(1), d).state, 4);
    let pd = ok(d.create_pd(0), d);
    assert_eq!(d.device().object_count(), before + 1);
    ok(d.destroy_pd(pd), d);
    assert_eq!(d.device().object_count(), before);
}

fn user_setup(d: &mut D, cqe: u32) -> (Uc, u32, Cq) {
    let uc = ok(d.open_context(), d);
    let pd = ok(d.create_pd(uc.handle), d);
    let cq = ok(d.create_cq_on(uc, cqe), d);
    (uc, pd, cq)
}

fn rc_qp(d: &mut D, uc: Uc, pd: u32, cq: u32, sizes: QpSizes) -> Qp {
    ok(
        d.create_qp_with(QpSpec::user(qp_type::RC, uc, pd, cq, sizes)),
        d,
    )
}

fn objects(d: &D) -> usize {
    d.device().object_count()
}

// ---------------------------------------------------------------------------------------
// Register-level failures
// ---------------------------------------------------------------------------------------

#[test]
fn commands_before_the_dsr_and_before_activation_fail() {
    let mut d = Driver::in_process();
    // Slots exist in guest memory but the device has not been told about them.
    let version = d.read_version();
    let image = d.build_dsr(DsrConfig::default(), version);
    for _ in 0..2 {
        assert_ne!(d.create_pd(0).unwrap_err().err(), 0);
        assert_eq!(objects(&d), 0);
    }
    d.write_reg(regs::CTL, regs::CTL_ACTIVATE);
    assert_ne!(d.read_reg(regs::ERR), 0, "ACTIVATE without a DSR");
    assert!(!d.device().is_active());

    // DSR loaded but not activated.
    d.write_dsr_address(image.addr);
    assert_eq!(d.read_reg(regs::ERR), 0);
    d.write_reg(regs::IMR, 0);
    assert_ne!(d.create_pd(0).unwrap_err().err(), 0);
    assert_ne!(d.query_port(1).unwrap_err().err(), 0);
    assert_eq!(objects(&d), 0);
    assert!(
        memory::snapshot(d.ram(), image.resp_slot, 16)
            .iter()
            .all(|&b| b == RESPONSE_POISON),
        "no response before activation"
    );

    assert_eq!(d.activate(), 0);
    ok(d.create_pd(0), &d);
}

#[test]
fn unknown_command_numbers_fail() {
    let mut d = Driver::probed();
    let before = objects(&d);
    for cmd in [21u32, 22, 0x7fff_ffff, 0x8000_0000, 0x8000_0002, u32::MAX] {
        let mut bytes =
            zerocopy::IntoBytes::as_bytes(&handle_request(Command::CreatePd, 0, 0)).to_vec();
        bytes[8..12].copy_from_slice(&cmd.to_le_bytes());
        fails(
            d.execute_bytes(&bytes),
            &d,
            before,
            &format!("command {cmd:#x}"),
        );
    }
    healthy(&mut d);
}

#[test]
fn request_values_other_than_zero_execute_nothing() {
    let mut d = Driver::probed();
    let slot = d.session().dsr.cmd_slot;
    memory::write(d.ram(), slot, &handle_request(Command::CreatePd, 0, 0));
    d.take_irqs();
    for value in [1, 2, u32::MAX] {
        d.write_reg(regs::REQUEST, value);
    }
    assert_eq!(objects(&d), 0);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    healthy(&mut d);
}

#[test]
fn resize_cq_fails_for_any_handle() {
    let mut d = Driver::probed();
    let cq = ok(d.create_cq_on(KERNEL_UC, 64), &d);
    let before = objects(&d);
    for (handle, cqe) in [
        (cq.handle, 128),
        (cq.handle, 64),
        (cq.handle, 0),
        (999, 64),
        (0, 0),
    ] {
        fails(d.resize_cq(handle, cqe), &d, before, "RESIZE_CQ");
    }
    ok(d.destroy_cq(cq.handle), &d);
}

#[test]
fn unknown_registers_read_zero_and_ignore_writes() {
    let mut d = Driver::probed();
    for offset in [
        0x28,
        0x2c,
        0x30,
        0x3c,
        0x40,
        0xfc,
        0x100,
        0xffc,
        0x1000,
        0x2,
        0x13,
        u64::MAX,
    ] {
        assert_eq!(d.read_reg(offset), 0, "register {offset:#x}");
        d.write_reg(offset, 0xdead_beef);
        assert_eq!(d.read_reg(offset), 0, "register {offset:#x} after a write");
    }
    // Read-only registers keep their values.
    d.write_reg(regs::VERSION, 7);
    assert_eq!(d.read_version(), 20);
    d.write_reg(regs::ERR, 5);
    assert_eq!(d.read_reg(regs::ERR), 0);
    // MACL/MACH are plain storage (vmxnet3 packing: two bytes in MACH).
    d.write_reg(regs::MAC_LOW, 0x1234_5678);
    d.write_reg(regs::MAC_HIGH, 0xffff_abcd);
    assert_eq!(d.read_reg(regs::MAC_LOW), 0x1234_5678);
    assert_eq!(d.read_reg(regs::MAC_HIGH), 0xabcd);
    assert!(d.device().is_active());
    healthy(&mut d);
}

#[test]
fn unknown_ctl_values_set_err_and_change_nothing() {
    let mut d = Driver::probed();
    let mad = d.kernel_registration().unwrap();
    let before = objects(&d);
    for value in [3, 4, 0x100, u32::MAX] {
        d.write_reg(regs::CTL, value);
        assert_ne!(d.read_reg(regs::ERR), 0, "CTL {value:#x}");
        assert!(d.device().is_active());
        assert_eq!(objects(&d), before);
    }
    assert_eq!(ok(d.query_qp(mad.qp.handle, 0), &d).qp_state, qp_state::RTS);
    healthy(&mut d);
}

#[test]
fn ctl_reset_destroys_everything_until_a_new_dsr() {
    let mut d = Driver::probed();
    let mad = d.kernel_registration().unwrap();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, PINGPONG_SIZES);
    assert!(objects(&d) >= 8);
    let resp_slot = d.session().dsr.resp_slot;
    let cq_state = memory::snapshot(d.ram(), cq.layout.ring.buf.pages[0], 16);

    d.write_reg(regs::CTL, regs::CTL_RESET);
    assert_eq!(objects(&d), 0);
    assert!(!d.device().is_active());

    // Commands fail and the device writes no response into the old slot.
    for _ in 0..3 {
        assert_ne!(d.query_port(1).unwrap_err().err(), 0);
        assert_ne!(d.create_pd(0).unwrap_err().err(), 0);
        assert!(
            memory::snapshot(d.ram(), resp_slot, 16)
                .iter()
                .all(|&b| b == RESPONSE_POISON)
        );
    }
    // ACTIVATE alone does not bring it back: the DSR is forgotten.
    d.write_reg(regs::CTL, regs::CTL_ACTIVATE);
    assert_ne!(d.read_reg(regs::ERR), 0);
    assert_ne!(d.query_port(1).unwrap_err().err(), 0);
    // Old doorbells do nothing.
    d.set_rq_prod(&qp, 1);
    d.ring_cq(&cq, uar::CQ_ARM);
    d.ring_qp(&qp, uar::QP_RECV | uar::QP_SEND);
    d.ring_qp(&mad.qp, uar::QP_RECV);
    assert_eq!(
        memory::snapshot(d.ram(), cq.layout.ring.buf.pages[0], 16),
        cq_state
    );
    assert_eq!(objects(&d), 0);

    // A new DSR brings the device back, empty.
    d.probe();
    let mad = d.kernel_registration().unwrap();
    assert_eq!(mad.qp.handle, 1);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// Malformed DSRs
// ---------------------------------------------------------------------------------------

/// Loads a DSR edited by `edit` (and at `addr_offset` from its page) and checks that the
/// device refuses it: ERR set, caps not claiming support, ACTIVATE and REQUEST failing. Then
/// a good DSR must still work.
fn refused_dsr(
    what: &str,
    config: DsrConfig,
    addr: impl FnOnce(u64, &D) -> u64,
    edit: impl FnOnce(&mut abi::Dsr, &D),
) {
    let mut d = Driver::in_process();
    let version = d.read_version();
    let image = d.build_dsr(config, version);
    let mut dsr = d.read_dsr(&image);
    edit(&mut dsr, &d);
    d.edit_dsr(&image, |x| *x = dsr);
    let target = addr(image.addr, &d);
    d.write_dsr_address(target);
    assert_ne!(d.read_reg(regs::ERR), 0, "{what}: DSR load must fail");
    let caps = d.read_caps(&image);
    assert!(
        !caps_supported(&caps, version),
        "{what}: caps claim support: {caps:?}"
    );
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    // The driver would stop here; a hostile one carries on.
    assert_ne!(d.activate(), 0, "{what}: ACTIVATE after a refused DSR");
    assert!(!d.device().is_active());
    // Restore sane slots so a REQUEST can be attempted at all.
    d.dsr = Some(image);
    assert_ne!(d.query_port(1).unwrap_err().err(), 0, "{what}: REQUEST");
    assert_eq!(objects(&d), 0);
    // A good DSR works afterwards.
    d.probe();
    healthy(&mut d);
}

fn keep(addr: u64, _: &D) -> u64 {
    addr
}

#[test]
fn dsr_rings_with_bad_page_counts_are_refused() {
    for pages in [0u32, 1, 513, 1024, u32::MAX] {
        refused_dsr(
            &format!("async ring of {pages} pages"),
            DsrConfig {
                async_ring_pages: pages,
                ..DsrConfig::default()
            },
            keep,
            |_, _| {},
        );
        refused_dsr(
            &format!("CQ ring of {pages} pages"),
            DsrConfig {
                cq_ring_pages: pages,
                ..DsrConfig::default()
            },
            keep,
            |_, _| {},
        );
    }
    // The driver's helper sees the same: caps do not claim support.
    let mut d = Driver::in_process();
    let err = d
        .try_probe(DsrConfig {
            async_ring_pages: 1,
            ..DsrConfig::default()
        })
        .unwrap_err();
    assert!(matches!(err, ProbeError::Unsupported { .. }), "{err:?}");
    // The limits themselves are fine: 2 and 512 pages.
    for pages in [2, 512] {
        let mut d = Driver::in_process();
        d.probe_with(DsrConfig {
            async_ring_pages: pages,
            cq_ring_pages: pages,
            ..DsrConfig::default()
        });
        healthy(&mut d);
    }
}

#[test]
fn misplaced_dsrs_and_slots_are_refused() {
    let c = DsrConfig::default();
    refused_dsr("misaligned DSR", c, |a, _| a + 8, |_, _| {});
    refused_dsr("DSR at 0", c, |_, _| 0, |_, _| {});
    refused_dsr("DSR past RAM", c, |_, d| d.bus.memory().end(), |_, _| {});
    refused_dsr(
        "DSR at the top of the address space",
        c,
        |_, _| !0xfff,
        |_, _| {},
    );
    let end = |d: &D| d.bus.memory().end();
    refused_dsr("command slot outside RAM", c, keep, |x, d| {
        x.cmd_slot_dma = end(d)
    });
    refused_dsr("response slot outside RAM", c, keep, |x, d| {
        x.resp_slot_dma = end(d) + 0x10_0000
    });
    refused_dsr("misaligned command slot", c, keep, |x, _| {
        x.cmd_slot_dma += 0x10
    });
    refused_dsr("misaligned response slot", c, keep, |x, _| {
        x.resp_slot_dma += 4
    });
    refused_dsr("response slot at 0", c, keep, |x, _| x.resp_slot_dma = 0);
    refused_dsr("command slot wrapping", c, keep, |x, _| {
        x.cmd_slot_dma = !0xfff
    });
    refused_dsr("async pdir outside RAM", c, keep, |x, d| {
        x.async_ring_pages.pdir_dma = end(d)
    });
    refused_dsr("async pdir misaligned", c, keep, |x, _| {
        x.async_ring_pages.pdir_dma += 8
    });
    refused_dsr("CQ ring pdir at 0", c, keep, |x, _| {
        x.cq_ring_pages.pdir_dma = 0
    });
}

#[test]
fn dsr_ring_directories_with_bad_entries_are_refused() {
    for (name, async_ring) in [("async", true), ("CQ notify", false)] {
        for (what, value) in [
            ("table outside RAM", 0u64),
            ("table misaligned", 1),
            ("data page outside RAM", 2),
            ("data page misaligned", 3),
        ] {
            let mut d = Driver::in_process();
            let version = d.read_version();
            let image = d.build_dsr(DsrConfig::default(), version);
            let ring = if async_ring {
                &image.async_ring
            } else {
                &image.cq_ring
            };
            let ram = d.ram();
            let end = d.bus.memory().end();
            match value {
                0 => ring.pdir.set_table(ram, 0, end),
                1 => ring.pdir.set_table(ram, 0, ring.pdir.tables[0] + 8),
                2 => ring.pdir.set_entry(ram, 3, end + 0x4000),
                _ => ring.pdir.set_entry(ram, 2, ring.pdir.pages[2] + 0x800),
            }
            d.write_dsr_address(image.addr);
            assert_ne!(d.read_reg(regs::ERR), 0, "{name} ring: {what}");
            assert!(
                !caps_supported(&d.read_caps(&image), version),
                "{name}: {what}"
            );
            assert_ne!(d.activate(), 0);
            d.probe();
            healthy(&mut d);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------

#[test]
fn out_of_range_and_stale_handles_fail() {
    let mut d = Driver::probed();
    let caps = d.caps();
    // Objects that existed once.
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let srq = ok(d.create_srq_on(uc, pd, 16, 1), &d);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, PINGPONG_SIZES);
    let mr = ok(d.reg_user_mr(pd, 0x1000, 64, access::LOCAL_WRITE), &d);
    let uc2 = ok(d.open_context(), &d);
    ok(d.destroy_qp(qp.handle), &d);
    ok(d.destroy_mr(mr.handle), &d);
    ok(d.destroy_srq(srq.handle), &d);
    ok(d.close_context(uc2), &d);
    // Still alive: uc, pd, cq.
    let before = objects(&d);
    assert_eq!(before, 3);

    let bad = |stale: u32, max: u32| vec![stale, max, max + 1, 1 << 24, u32::MAX, 0xdead];
    for h in bad(qp.handle, caps.max_qp).into_iter().chain([0, 1]) {
        fails(d.destroy_qp(h), &d, before, "DESTROY_QP");
        fails(d.query_qp(h, 0), &d, before, "QUERY_QP");
        fails(
            d.modify_qp(h, mask::STATE, &verbs::state_attrs(qp_state::INIT)),
            &d,
            before,
            "MODIFY_QP",
        );
    }
    for h in bad(mr.handle, caps.max_mr).into_iter().chain([0]) {
        fails(d.destroy_mr(h), &d, before, "DESTROY_MR");
    }
    for h in bad(srq.handle, caps.max_srq).into_iter().chain([0]) {
        fails(d.destroy_srq(h), &d, before, "DESTROY_SRQ");
        fails(d.query_srq(h), &d, before, "QUERY_SRQ");
        fails(d.modify_srq(h, SRQ_ATTR_LIMIT, 1), &d, before, "MODIFY_SRQ");
    }
    fails(
        d.destroy_uc(0),
        &d,
        before,
        "DESTROY_UC of the kernel's context",
    );
    for h in bad(uc2.handle, 512) {
        fails(d.destroy_uc(h), &d, before, "DESTROY_UC");
        fails(d.create_pd(h), &d, before, "CREATE_PD of a missing context");
        let layout = d.cq_layout(16);
        fails(
            d.create_cq(&Driver::<InProcessBus>::cq_request(&layout, h)),
            &d,
            before,
            "CREATE_CQ of a missing context",
        );
    }
    for h in bad(pd + 1, caps.max_pd).into_iter().chain([0]) {
        fails(d.destroy_pd(h), &d, before, "DESTROY_PD");
        fails(d.get_dma_mr(h), &d, before, "CREATE_MR on a missing PD");
        fails(
            d.create_srq_on(uc, h, 16, 1),
            &d,
            before,
            "CREATE_SRQ on a missing PD",
        );
        fails(
            d.create_qp_with(QpSpec::user(qp_type::RC, uc, h, cq.handle, PINGPONG_SIZES)),
            &d,
            before,
            "CREATE_QP on a missing PD",
        );
    }
    for h in bad(cq.handle + 1, caps.max_cq).into_iter().chain([0]) {
        fails(d.destroy_cq(h), &d, before, "DESTROY_CQ");
        let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES);
        fails(
            d.create_qp_with(QpSpec { send_cq: h, ..spec }),
            &d,
            before,
            "missing send CQ",
        );
        fails(
            d.create_qp_with(QpSpec { recv_cq: h, ..spec }),
            &d,
            before,
            "missing recv CQ",
        );
    }
    for h in bad(srq.handle, caps.max_srq).into_iter().chain([0]) {
        let spec = QpSpec {
            srq: Some(h),
            ..QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES)
        };
        fails(d.create_qp_with(spec), &d, before, "missing SRQ");
    }
    // Destroyed twice.
    ok(d.destroy_cq(cq.handle), &d);
    fails(
        d.destroy_cq(cq.handle),
        &d,
        before - 1,
        "CQ destroyed twice",
    );
    ok(d.destroy_pd(pd), &d);
    fails(d.destroy_pd(pd), &d, before - 2, "PD destroyed twice");
    ok(d.close_context(uc), &d);
    fails(d.destroy_uc(uc.handle), &d, 0, "UC destroyed twice");
    healthy(&mut d);
}

#[test]
fn objects_of_another_context_cannot_be_combined() {
    let mut d = Driver::probed();
    let (uc_a, pd_a, cq_a) = user_setup(&mut d, 64);
    let (uc_b, pd_b, cq_b) = user_setup(&mut d, 64);
    let srq_a = ok(d.create_srq_on(uc_a, pd_a, 16, 1), &d);
    let kpd = ok(d.create_pd(0), &d);
    let kcq = ok(d.create_cq_on(KERNEL_UC, 64), &d);
    let before = objects(&d);
    let b = QpSpec::user(qp_type::RC, uc_b, pd_b, cq_b.handle, PINGPONG_SIZES);
    let cases = [
        (
            "CQ of A for both queues of B",
            QpSpec {
                send_cq: cq_a.handle,
                recv_cq: cq_a.handle,
                ..b
            },
        ),
        (
            "send CQ of A",
            QpSpec {
                send_cq: cq_a.handle,
                ..b
            },
        ),
        (
            "recv CQ of A",
            QpSpec {
                recv_cq: cq_a.handle,
                ..b
            },
        ),
        (
            "SRQ of A",
            QpSpec {
                srq: Some(srq_a.handle),
                ..b
            },
        ),
        (
            "kernel CQ on a user PD",
            QpSpec {
                send_cq: kcq.handle,
                ..b
            },
        ),
        (
            "user CQ on a kernel PD",
            QpSpec {
                owner: QpOwner::Kernel,
                uc: KERNEL_UC,
                pd: kpd,
                send_cq: kcq.handle,
                recv_cq: cq_b.handle,
                ..b
            },
        ),
    ];
    for (what, spec) in cases {
        fails(d.create_qp_with(spec), &d, before, what);
    }
    // Each context's own combination works.
    let qp_b = ok(d.create_qp_with(b), &d);
    let qp_a = ok(
        d.create_qp_with(QpSpec {
            srq: Some(srq_a.handle),
            ..QpSpec::user(qp_type::RC, uc_a, pd_a, cq_a.handle, PINGPONG_SIZES)
        }),
        &d,
    );
    ok(d.destroy_qp(qp_a.handle), &d);
    ok(d.destroy_qp(qp_b.handle), &d);
}

#[test]
fn destroying_referenced_objects_fails() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let cq2 = ok(d.create_cq_on(uc, 64), &d);

    // PD with an MR.
    let mr = ok(d.reg_user_mr(pd, 0x1000, 64, access::LOCAL_WRITE), &d);
    let n = objects(&d);
    fails(d.destroy_pd(pd), &d, n, "PD with an MR");
    ok(d.destroy_mr(mr.handle), &d);

    // PD with an SRQ, SRQ with a QP, PD with a QP, CQs with a QP (send and receive role).
    let srq = ok(d.create_srq_on(uc, pd, 16, 1), &d);
    let n = objects(&d);
    fails(d.destroy_pd(pd), &d, n, "PD with an SRQ");
    let spec = QpSpec {
        send_cq: cq.handle,
        recv_cq: cq2.handle,
        srq: Some(srq.handle),
        ..QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES)
    };
    let qp = ok(d.create_qp_with(spec), &d);
    let n = objects(&d);
    fails(d.destroy_srq(srq.handle), &d, n, "SRQ with a QP");
    fails(d.destroy_pd(pd), &d, n, "PD with a QP");
    fails(d.destroy_cq(cq.handle), &d, n, "send CQ of a QP");
    fails(d.destroy_cq(cq2.handle), &d, n, "recv CQ of a QP");
    // UC with a PD and CQs.
    fails(d.destroy_uc(uc.handle), &d, n, "UC with a PD");

    // Everything still works after the refusals.
    assert_eq!(ok(d.query_srq(srq.handle), &d).max_wr, 16);
    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::INIT);

    // And in the right order everything goes.
    ok(d.destroy_qp(qp.handle), &d);
    ok(d.destroy_srq(srq.handle), &d);
    ok(d.destroy_cq(cq2.handle), &d);
    ok(d.destroy_pd(pd), &d);
    let n = objects(&d);
    fails(d.destroy_uc(uc.handle), &d, n, "UC with a CQ");
    ok(d.destroy_cq(cq.handle), &d);
    ok(d.close_context(uc), &d);
    assert_eq!(objects(&d), 0);
}

#[test]
fn handle_tables_fill_up_within_the_advertised_limits() {
    let mut d = Driver::probed();
    let caps = d.caps();
    // PDs.
    let mut pds = Vec::new();
    while let Ok(pd) = d.create_pd(0) {
        assert!(pd >= 1 && pd < caps.max_pd, "PD handle {pd}");
        pds.push(pd);
        assert!(pds.len() <= caps.max_pd as usize);
    }
    assert!(pds.len() >= caps.max_pd as usize - 1, "{} PDs", pds.len());
    let n = objects(&d);
    fails(d.create_pd(0), &d, n, "PD table full");
    ok(d.destroy_pd(pds.pop().unwrap()), &d);
    pds.push(ok(d.create_pd(0), &d));
    let pd = pds[0];

    // CQs, all on one shared ring (the device does not care).
    let layout = d.cq_layout(1);
    let mut cqs = Vec::new();
    while let Ok((cq, _)) = d.create_cq(&Driver::<InProcessBus>::cq_request(&layout, 0)) {
        assert!(cq >= 1 && cq < caps.max_cq, "CQ handle {cq}");
        cqs.push(cq);
        assert!(cqs.len() <= caps.max_cq as usize);
    }
    assert!(cqs.len() >= caps.max_cq as usize - 1, "{} CQs", cqs.len());

    // QPs: handles 2.. (1 is the GSI QP's, 0 is never used).
    let sizes = QpSizes {
        max_send_wr: 1,
        max_recv_wr: 1,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let qp_layout = d.qp_layout(QpOwner::Kernel, sizes);
    let spec = QpSpec {
        owner: QpOwner::Kernel,
        ..QpSpec::user(qp_type::RC, KERNEL_UC, pd, cqs[0], sizes)
    };
    let request = Driver::<InProcessBus>::qp_request(&qp_layout, &spec);
    let mut qps = Vec::new();
    while let Ok(qp) = d.create_qp(&request) {
        assert!(
            qp.handle >= 2 && qp.handle < caps.max_qp,
            "QP handle {}",
            qp.handle
        );
        qps.push(qp.handle);
        assert!(qps.len() <= caps.max_qp as usize);
    }
    assert!(qps.len() >= caps.max_qp as usize - 2, "{} QPs", qps.len());
    // GSI still gets handle 1 when the table is otherwise full.
    let gsi = QpSpec {
        qp_type: qp_type::GSI,
        ..spec
    };
    let created = ok(
        d.create_qp(&Driver::<InProcessBus>::qp_request(&qp_layout, &gsi)),
        &d,
    );
    assert_eq!((created.qpn, created.handle), (1, 1));

    // SRQs.
    let srq_layout = d.srq_layout(1, 1);
    let mut srqs = 0;
    while let Ok(srq) = d.create_srq(&Driver::<InProcessBus>::srq_request(&srq_layout, pd, 0)) {
        assert!(srq >= 1 && srq < caps.max_srq, "SRQ handle {srq}");
        srqs += 1;
        assert!(srqs <= caps.max_srq);
    }
    assert!(srqs >= caps.max_srq - 1);

    // MRs (DMA MRs cost nothing).
    let mut mrs = 0;
    let mut uppers = std::collections::HashSet::new();
    while let Ok(mr) = d.get_dma_mr(pd) {
        assert!(
            mr.handle >= 1 && mr.handle < caps.max_mr,
            "MR handle {}",
            mr.handle
        );
        assert!(
            uppers.insert(mr.lkey >> 8),
            "every live MR has key bits of its own"
        );
        mrs += 1;
        assert!(mrs <= caps.max_mr);
    }
    assert!(mrs >= caps.max_mr - 1);

    // Contexts: one per UAR page 1..max_uar-1.
    let mut ucs = 0;
    while let Ok(uc) = d.open_context() {
        assert!(uc.handle >= 1);
        ucs += 1;
        if uc.uar as usize + 1 == caps.max_uar as usize {
            break;
        }
    }
    assert_eq!(ucs, caps.max_uar - 1);
    assert!(d.device().is_active());
    assert_eq!(ok(d.query_port(1), &d).state, 4);
}

// ---------------------------------------------------------------------------------------
// Page directories
// ---------------------------------------------------------------------------------------

/// Ways to break a page directory that names at least 3 pages.
#[derive(Debug, Clone, Copy)]
enum BadDir {
    Misaligned,
    DirOutsideRam,
    DirAtZero,
    TableOutsideRam,
    TableMisaligned,
    EntryOutsideRam,
    EntryMisaligned,
    EntryAtTopOfAddressSpace,
    LastEntryPastRam,
}

const BAD_DIRS: [BadDir; 9] = [
    BadDir::Misaligned,
    BadDir::DirOutsideRam,
    BadDir::DirAtZero,
    BadDir::TableOutsideRam,
    BadDir::TableMisaligned,
    BadDir::EntryOutsideRam,
    BadDir::EntryMisaligned,
    BadDir::EntryAtTopOfAddressSpace,
    BadDir::LastEntryPastRam,
];

/// Breaks `dir` (in guest memory) and returns the pdir_dma to send.
fn break_dir(d: &D, dir: &PageDir, how: BadDir) -> u64 {
    let ram = d.ram();
    let end = d.bus.memory().end();
    let last = dir.pages.len() as u64 - 1;
    match how {
        BadDir::Misaligned => return dir.dir + 8,
        BadDir::DirOutsideRam => return end + 0x10_0000,
        BadDir::DirAtZero => return 0,
        BadDir::TableOutsideRam => dir.set_table(ram, 0, end),
        BadDir::TableMisaligned => dir.set_table(ram, 0, dir.tables[0] + 0x10),
        BadDir::EntryOutsideRam => dir.set_entry(ram, 1, end + 0x2000),
        BadDir::EntryMisaligned => dir.set_entry(ram, 1, dir.pages[1] + 0x100),
        BadDir::EntryAtTopOfAddressSpace => dir.set_entry(ram, 1, !0xfff),
        BadDir::LastEntryPastRam => dir.set_entry(ram, last, end),
    }
    dir.dir
}

#[test]
fn malformed_page_directories_are_refused_everywhere() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let before = objects(&d);
    for how in BAD_DIRS {
        // User MR (3 pages).
        let buffer = d.user_buffer(0x10_0000, 3 * PAGE_SIZE);
        let mut mr = Driver::<InProcessBus>::user_mr_request(pd, &buffer, access::LOCAL_WRITE);
        mr.pdir_dma = break_dir(&d, &buffer.pdir, how);
        fails(d.create_mr(&mr), &d, before, &format!("MR: {how:?}"));

        // CQ (64 entries = 2 pages).
        let layout = d.cq_layout(64);
        let mut req = Driver::<InProcessBus>::cq_request(&layout, uc.handle);
        req.pdir_dma = break_dir(&d, &layout.ring.pdir, how);
        fails(d.create_cq(&req), &d, before, &format!("CQ: {how:?}"));

        // QP (1 + 1 + 4 pages).
        let layout = d.qp_layout(QpOwner::User, PINGPONG_SIZES);
        let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES);
        let mut req = Driver::<InProcessBus>::qp_request(&layout, &spec);
        req.pdir_dma = break_dir(&d, &layout.ring.pdir, how);
        fails(d.create_qp(&req), &d, before, &format!("QP: {how:?}"));

        // SRQ (64 entries of 32 bytes + state = 2 pages; use 128 for 3).
        let layout = d.srq_layout(256, 1);
        let mut req = Driver::<InProcessBus>::srq_request(&layout, pd, 0);
        req.pdir_dma = break_dir(&d, &layout.ring.pdir, how);
        fails(d.create_srq(&req), &d, before, &format!("SRQ: {how:?}"));
    }
    // The same requests with intact directories work.
    let layout = d.cq_layout(64);
    ok(
        d.create_cq(&Driver::<InProcessBus>::cq_request(&layout, uc.handle)),
        &d,
    );
    healthy(&mut d);
}

#[test]
fn page_counts_zero_or_past_the_directory_limit_are_refused() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let before = objects(&d);
    let too_many = (pdir::MAX_PAGES + 1) as u32;

    // CQ: nchunks 0, 1 (no CQE page), and past the limit with the largest CQ.
    let layout = d.cq_layout(64);
    for nchunks in [0, 1, too_many, u32::MAX] {
        let req = CreateCqRequest {
            nchunks,
            ..Driver::<InProcessBus>::cq_request(&layout, uc.handle)
        };
        fails(
            d.create_cq(&req),
            &d,
            before,
            &format!("CQ nchunks {nchunks}"),
        );
    }
    let req = CreateCqRequest {
        cqe: d.caps().max_cqe,
        nchunks: too_many,
        ..Driver::<InProcessBus>::cq_request(&layout, uc.handle)
    };
    fails(d.create_cq(&req), &d, before, "CQ past the directory limit");

    // SRQ.
    let layout = d.srq_layout(16, 1);
    for nchunks in [0, 1, too_many, u32::MAX] {
        let req = CreateSrqRequest {
            nchunks,
            ..Driver::<InProcessBus>::srq_request(&layout, pd, 0)
        };
        fails(
            d.create_srq(&req),
            &d,
            before,
            &format!("SRQ nchunks {nchunks}"),
        );
    }

    // MR: a 1 GiB MR starting mid-page needs 262145 pages.
    let max = d.caps().max_mr_size;
    let req = CreateMrRequest {
        hdr: header(Command::CreateMr),
        start: 0x800,
        length: max,
        pdir_dma: layout.ring.pdir.dir,
        pd_handle: pd,
        access_flags: access::LOCAL_WRITE,
        flags: 0,
        nchunks: too_many,
    };
    fails(d.create_mr(&req), &d, before, "MR of 262145 pages");

    // QP: total 0.
    let layout = d.qp_layout(QpOwner::User, PINGPONG_SIZES);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES);
    let req = CreateQpRequest {
        total_chunks: 0,
        send_chunks: 0,
        ..Driver::<InProcessBus>::qp_request(&layout, &spec)
    };
    fails(d.create_qp(&req), &d, before, "QP of 0 pages");
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// Request validation per command
// ---------------------------------------------------------------------------------------

#[test]
fn mr_requests_are_validated() {
    let mut d = Driver::probed();
    let (_uc, pd, _cq) = user_setup(&mut d, 64);
    let kpd = ok(d.create_pd(0), &d);
    let before = objects(&d);
    let buffer = d.user_buffer(0x7000_0100, 2 * PAGE_SIZE);
    let good = Driver::<InProcessBus>::user_mr_request(pd, &buffer, access::LOCAL_WRITE);
    assert_eq!(good.nchunks, 3);
    let max = d.caps().max_mr_size;
    let cases: Vec<(&str, CreateMrRequest)> = vec![
        ("nchunks too small", CreateMrRequest { nchunks: 2, ..good }),
        ("nchunks too large", CreateMrRequest { nchunks: 4, ..good }),
        ("nchunks 0", CreateMrRequest { nchunks: 0, ..good }),
        (
            "length 0",
            CreateMrRequest {
                length: 0,
                nchunks: 1,
                ..good
            },
        ),
        (
            "length > max_mr_size",
            CreateMrRequest {
                length: max + 1,
                ..good
            },
        ),
        (
            "length u64::MAX",
            CreateMrRequest {
                length: u64::MAX,
                ..good
            },
        ),
        (
            "start + length wraps",
            CreateMrRequest {
                start: u64::MAX - 0xff,
                length: 0x200,
                nchunks: 2,
                ..good
            },
        ),
        ("flags 3", CreateMrRequest { flags: 3, ..good }),
        ("flags 4", CreateMrRequest { flags: 4, ..good }),
        (
            "flags u32::MAX",
            CreateMrRequest {
                flags: u32::MAX,
                ..good
            },
        ),
        (
            "DMA MR on a user PD",
            Driver::<InProcessBus>::dma_mr_request(pd),
        ),
        (
            "DMA MR with remote access",
            CreateMrRequest {
                access_flags: access::LOCAL_WRITE | access::REMOTE_WRITE,
                ..Driver::<InProcessBus>::dma_mr_request(kpd)
            },
        ),
        (
            "FRMR of 0 pages",
            Driver::<InProcessBus>::frmr_request(kpd, 0),
        ),
        (
            "FRMR of 129 pages",
            Driver::<InProcessBus>::frmr_request(kpd, 129),
        ),
        (
            "FRMR of u32::MAX pages",
            Driver::<InProcessBus>::frmr_request(kpd, u32::MAX),
        ),
    ];
    for (what, req) in cases {
        fails(d.create_mr(&req), &d, before, what);
    }
    // The good request is good.
    let mr = ok(d.create_mr(&good), &d);
    ok(d.destroy_mr(mr.mr_handle), &d);
    healthy(&mut d);
}

#[test]
fn cq_requests_are_validated() {
    let mut d = Driver::probed();
    let uc = ok(d.open_context(), &d);
    let before = objects(&d);
    let max = d.caps().max_cqe;
    for cqe in [0, 3, 100, 1000, max + 1, max * 2, 0x8000_0000, u32::MAX] {
        let layout = CqLayout::with_pages(&mut d.alloc.clone(), d.bus.ram(), cqe, 2);
        let req = Driver::<InProcessBus>::cq_request(&layout, uc.handle);
        fails(d.create_cq(&req), &d, before, &format!("cqe {cqe}"));
    }
    // Too few pages for the entries: 1024 CQEs need 1 + 16.
    let layout = d.cq_layout(1024);
    for nchunks in [16, 2, 1] {
        let req = CreateCqRequest {
            nchunks,
            ..Driver::<InProcessBus>::cq_request(&layout, uc.handle)
        };
        fails(d.create_cq(&req), &d, before, &format!("nchunks {nchunks}"));
    }
    let layout = d.cq_layout(1024);
    ok(
        d.create_cq(&Driver::<InProcessBus>::cq_request(&layout, uc.handle)),
        &d,
    );
    healthy(&mut d);
}

#[test]
fn qp_requests_are_validated() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 512);
    let kpd = ok(d.create_pd(0), &d);
    let kcq = ok(d.create_cq_on(KERNEL_UC, 256), &d);
    let caps = d.caps();
    let sizes = QpSizes {
        max_send_wr: 16,
        max_recv_wr: 32,
        max_send_sge: 2,
        max_recv_sge: 2,
        srq: false,
    };
    // A buffer big enough for every variant below.
    let big = d.qp_layout(
        QpOwner::User,
        QpSizes {
            max_send_wr: 64,
            max_recv_wr: 64,
            max_send_sge: 4,
            max_recv_sge: 4,
            srq: false,
        },
    );
    let layout = d.qp_layout(QpOwner::User, sizes);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, sizes);
    let good = Driver::<InProcessBus>::qp_request(&layout, &spec);
    assert_eq!((good.send_chunks, good.total_chunks), (1, 3));
    let on_big = CreateQpRequest {
        pdir_dma: big.ring.pdir.dir,
        ..good
    };
    let before = objects(&d);
    let mut cases: Vec<(String, CreateQpRequest)> = Vec::new();
    for wr in [0, 3, 24, caps.max_qp_wr * 2, u32::MAX] {
        cases.push((
            format!("max_send_wr {wr}"),
            CreateQpRequest {
                max_send_wr: wr,
                ..on_big
            },
        ));
        cases.push((
            format!("max_recv_wr {wr}"),
            CreateQpRequest {
                max_recv_wr: wr,
                ..on_big
            },
        ));
    }
    for sge in [caps.max_sge + 1, 252, u32::MAX] {
        cases.push((
            format!("max_send_sge {sge}"),
            CreateQpRequest {
                max_send_sge: sge,
                ..on_big
            },
        ));
        cases.push((
            format!("max_recv_sge {sge}"),
            CreateQpRequest {
                max_recv_sge: sge,
                ..on_big
            },
        ));
    }
    // 16 sends of 128 bytes fit one page; 64 do not.
    cases.push((
        "send_chunks too small".into(),
        CreateQpRequest {
            max_send_wr: 64,
            ..on_big
        },
    ));
    cases.push((
        "send_chunks 0".into(),
        CreateQpRequest {
            send_chunks: 0,
            total_chunks: 2,
            ..good
        },
    ));
    cases.push((
        "total_chunks < 1 + send_chunks".into(),
        CreateQpRequest {
            total_chunks: 1,
            ..good
        },
    ));
    cases.push((
        "total_chunks leaves no RQ pages".into(),
        CreateQpRequest {
            total_chunks: 2,
            ..good
        },
    ));
    cases.push((
        "RQ pages too few".into(),
        CreateQpRequest {
            max_recv_wr: 256,
            ..on_big
        },
    ));
    for t in [qp_type::SMI, qp_type::UC, 5, 6, 7, 8, 9, 10, 255] {
        cases.push((
            format!("qp_type {t}"),
            CreateQpRequest { qp_type: t, ..good },
        ));
    }
    cases.push((
        "GSI on a user PD".into(),
        CreateQpRequest {
            qp_type: qp_type::GSI,
            ..good
        },
    ));
    cases.push((
        "is_srq with SRQ 0".into(),
        CreateQpRequest {
            is_srq: 1,
            srq_handle: 0,
            ..good
        },
    ));
    for (what, req) in cases {
        fails(d.create_qp(&req), &d, before, &what);
    }

    // A second GSI QP.
    let gsi_spec = QpSpec {
        owner: QpOwner::Kernel,
        qp_type: qp_type::GSI,
        ..QpSpec::user(qp_type::GSI, KERNEL_UC, kpd, kcq.handle, GSI_SIZES)
    };
    let gsi = ok(d.create_qp_with(gsi_spec), &d);
    assert_eq!(gsi.handle, 1);
    let n = objects(&d);
    fails(d.create_qp_with(gsi_spec), &d, n, "second GSI QP");
    ok(d.destroy_qp(gsi.handle), &d);
    // Destroyed, GSI can be created again.
    let gsi = ok(d.create_qp_with(gsi_spec), &d);
    assert_eq!(gsi.handle, 1);

    // The base requests were valid all along.
    ok(d.create_qp(&good), &d);
    ok(d.create_qp(&on_big), &d);
    healthy(&mut d);
}

#[test]
fn srq_requests_are_validated() {
    let mut d = Driver::probed();
    let (_uc, pd, _cq) = user_setup(&mut d, 64);
    let caps = d.caps();
    let layout = d.srq_layout(64, 2);
    let good = Driver::<InProcessBus>::srq_request(&layout, pd, 0);
    let before = objects(&d);
    let mut cases: Vec<(String, CreateSrqRequest)> = Vec::new();
    for wr in [0, 3, 100, caps.max_srq_wr * 2] {
        let mut req = good;
        req.attrs.max_wr = wr;
        cases.push((format!("max_wr {wr}"), req));
    }
    for sge in [caps.max_srq_sge + 1, u32::MAX] {
        let mut req = good;
        req.attrs.max_sge = sge;
        cases.push((format!("max_sge {sge}"), req));
    }
    cases.push((
        "srq_type 1 (XRC)".into(),
        CreateSrqRequest {
            srq_type: 1,
            ..good
        },
    ));
    let mut req = good;
    req.attrs.max_wr = 256;
    cases.push(("nchunks too small".into(), req));
    for (what, req) in cases {
        fails(d.create_srq(&req), &d, before, &what);
    }
    let srq = ok(d.create_srq(&good), &d);
    // MODIFY_SRQ: resizing, no LIMIT bit, a limit above max_wr.
    for (attr_mask, limit) in [
        (SRQ_ATTR_MAX_WR | SRQ_ATTR_LIMIT, 1),
        (SRQ_ATTR_MAX_WR, 1),
        (0, 1),
        (SRQ_ATTR_LIMIT, 65),
        (SRQ_ATTR_LIMIT, u32::MAX),
    ] {
        let n = objects(&d);
        fails(d.modify_srq(srq, attr_mask, limit), &d, n, "MODIFY_SRQ");
        assert_eq!(ok(d.query_srq(srq), &d).srq_limit, 0, "limit unchanged");
    }
    healthy(&mut d);
}

#[test]
fn illegal_qp_transitions_and_attributes_change_nothing() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 512);
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = rc_qp(&mut d, uc, pd, cq.handle, PINGPONG_SIZES);
    let before = objects(&d);
    let check = |d: &mut D, attr_mask: u32, attrs: QpAttr, what: &str| {
        let prior = ok(d.query_qp(qp.handle, 0), d);
        let r = d.modify_qp(qp.handle, attr_mask, &attrs);
        fails(r, d, before, what);
        assert_eq!(
            ok(d.query_qp(qp.handle, 0), d),
            prior,
            "{what}: attributes changed"
        );
    };
    // From RESET.
    for state in [
        qp_state::RTR,
        qp_state::RTS,
        qp_state::SQD,
        qp_state::SQE,
        7,
        u32::MAX,
    ] {
        check(
            &mut d,
            mask::STATE,
            verbs::state_attrs(state),
            &format!("RESET -> {state}"),
        );
    }
    // INIT with bad attributes.
    let init = verbs::rc_init_attrs();
    check(
        &mut d,
        RC_INIT_MASK,
        QpAttr {
            port_num: 2,
            ..init
        },
        "port 2",
    );
    check(
        &mut d,
        RC_INIT_MASK,
        QpAttr {
            port_num: 0,
            ..init
        },
        "port 0",
    );
    check(
        &mut d,
        RC_INIT_MASK,
        QpAttr {
            pkey_index: 1,
            ..init
        },
        "pkey_index 1",
    );
    check(
        &mut d,
        RC_INIT_MASK,
        QpAttr {
            pkey_index: 0xffff,
            ..init
        },
        "pkey_index 0xffff",
    );
    ok(d.modify_qp(qp.handle, RC_INIT_MASK, &init), &d);
    // From INIT.
    check(
        &mut d,
        mask::STATE,
        verbs::state_attrs(qp_state::RTS),
        "INIT -> RTS",
    );
    check(
        &mut d,
        mask::STATE,
        verbs::state_attrs(qp_state::SQD),
        "INIT -> SQD",
    );
    let peer = ipv4_gid([10, 0, 0, 2]);
    let rtr = verbs::rc_rtr_attrs(5, 0, peer, 0);
    check(
        &mut d,
        RC_RTR_MASK,
        verbs::rc_rtr_attrs(5, 0, peer, 1),
        "AV with unbound sgid_index 1",
    );
    check(
        &mut d,
        RC_RTR_MASK,
        verbs::rc_rtr_attrs(5, 0, peer, 200),
        "AV with sgid_index 200",
    );
    check(
        &mut d,
        RC_RTR_MASK,
        QpAttr {
            min_rnr_timer: 32,
            ..rtr
        },
        "min_rnr_timer 32",
    );
    check(
        &mut d,
        RC_RTR_MASK,
        QpAttr { path_mtu: 0, ..rtr },
        "path_mtu 0",
    );
    check(
        &mut d,
        RC_RTR_MASK,
        QpAttr { path_mtu: 6, ..rtr },
        "path_mtu 6",
    );
    ok(d.modify_qp(qp.handle, RC_RTR_MASK, &rtr), &d);
    // From RTR.
    check(
        &mut d,
        mask::STATE,
        verbs::state_attrs(qp_state::INIT),
        "RTR -> INIT",
    );
    ok(
        d.modify_qp(qp.handle, verbs::RC_RTS_MASK, &verbs::rc_rts_attrs(1)),
        &d,
    );
    // From RTS.
    check(
        &mut d,
        mask::STATE,
        verbs::state_attrs(qp_state::RTR),
        "RTS -> RTR",
    );
    check(
        &mut d,
        mask::STATE,
        verbs::state_attrs(qp_state::INIT),
        "RTS -> INIT",
    );
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    // From ERR only RESET (or ERR).
    for state in [qp_state::INIT, qp_state::RTR, qp_state::RTS, qp_state::SQD] {
        check(
            &mut d,
            mask::STATE,
            verbs::state_attrs(state),
            &format!("ERR -> {state}"),
        );
    }
    ok(d.modify_qp_state(&qp, qp_state::RESET), &d);
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::RESET);
}

#[test]
fn port_and_pkey_queries_are_validated() {
    let mut d = Driver::probed();
    let before = objects(&d);
    for port in [0u8, 2, 255] {
        fails(d.query_port(port), &d, before, "QUERY_PORT");
        fails(d.query_pkey(port, 0), &d, before, "QUERY_PKEY port");
    }
    for index in [1u8, 2, 255] {
        fails(d.query_pkey(1, index), &d, before, "QUERY_PKEY index");
    }
}

#[test]
fn create_uc_is_validated() {
    let mut d = Driver::probed();
    let pfn = d.session().dsr.config.uar_pfn;
    let in_use = ok(d.open_context(), &d);
    let before = objects(&d);
    for (what, bad) in [
        ("pfn below uar_pfn", pfn - 1),
        ("pfn 0", 0),
        ("index 0 (the kernel's page)", pfn),
        ("index 512", pfn + 512),
        ("index 513", pfn + 513),
        ("index 2^32 + 1", pfn + (1 << 32) + 1),
        ("pfn u64::MAX", u64::MAX),
        ("page already in use", pfn + u64::from(in_use.uar)),
    ] {
        fails(d.create_uc(bad), &d, before, what);
    }
    // The page in use still belongs to its context: doorbells on it reach its objects.
    let cq = ok(d.create_cq_on(in_use, 16), &d);
    d.ring_cq(&cq, uar::CQ_ARM);
    healthy(&mut d);
}

#[test]
fn gid_binds_are_validated() {
    let mut d = Driver::probed();
    let len = d.caps().gid_tbl_len;
    // The device is RoCE v1 or v2, never both: the other type is refused.
    let own = d.caps().gid_types;
    let other = if own == GID_TYPE_ROCE_V1 {
        GID_TYPE_ROCE_V2
    } else {
        GID_TYPE_ROCE_V1
    };
    let gid = ipv4_gid([10, 9, 8, 7]);
    let before = objects(&d);
    for (what, index, gid_type) in [
        ("index = gid_tbl_len", len, own),
        ("index 255", 255, own),
        ("index u32::MAX", u32::MAX, own),
        ("the GID type the device does not advertise", 1, other),
        ("gid_type 0", 1, 0),
        ("gid_type 3", 1, 3),
    ] {
        fails(d.create_bind(index, gid, gid_type), &d, before, what);
    }
    // None of those bound index 1: an AV naming it is refused.
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, PINGPONG_SIZES);
    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    let before = objects(&d);
    fails(
        d.modify_qp(qp.handle, RC_RTR_MASK, &verbs::rc_rtr_attrs(3, 0, gid, 1)),
        &d,
        before,
        "AV naming a refused bind",
    );

    ok(d.create_bind(1, gid, own), &d);
    for (what, index, g) in [
        ("wrong GID", 1, ipv4_gid([10, 9, 8, 6])),
        ("unbound index", 2, gid),
        ("index out of range", len, gid),
        ("index u32::MAX", u32::MAX, gid),
    ] {
        fails(d.destroy_bind(index, g), &d, before, what);
    }
    // Index 1 is still bound.
    ok(
        d.modify_qp(qp.handle, RC_RTR_MASK, &verbs::rc_rtr_attrs(3, 0, gid, 1)),
        &d,
    );
    ok(d.destroy_bind(1, gid), &d);
    fails(d.destroy_bind(1, gid), &d, before, "unbound twice");
}

// ---------------------------------------------------------------------------------------
// Rings and doorbells
// ---------------------------------------------------------------------------------------

struct Rig {
    d: D,
    uc: Uc,
    send_cq: Cq,
    recv_cq: Cq,
    qp: Qp,
}

const SMALL: QpSizes = QpSizes {
    max_send_wr: 8,
    max_recv_wr: 8,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

/// A user RC QP in ERR with separate send and receive CQs of `cqe` entries.
fn rig_in_error(cqe: u32) -> Rig {
    let mut d = Driver::probed();
    let (uc, pd, send_cq) = user_setup(&mut d, cqe);
    let recv_cq = ok(d.create_cq_on(uc, cqe), &d);
    let qp = ok(
        d.create_qp_with(QpSpec {
            recv_cq: recv_cq.handle,
            ..QpSpec::user(qp_type::RC, uc, pd, send_cq.handle, SMALL)
        }),
        &d,
    );
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    d.take_irqs();
    Rig {
        d,
        uc,
        send_cq,
        recv_cq,
        qp,
    }
}

#[test]
fn corrupt_sq_producer_on_a_qp_in_error_neither_loops_nor_panics() {
    for prod in [u32::MAX, 16, 17, 0x8000_0000, 12, 9] {
        let Rig {
            mut d,
            send_cq,
            recv_cq,
            qp,
            ..
        } = rig_in_error(64);
        d.set_sq_prod(&qp, prod);
        d.ring_qp(&qp, uar::QP_SEND);
        d.ring_qp(&qp, uar::QP_SEND | uar::QP_RECV);
        let flushed = d.drain_cq(&send_cq);
        if prod >= 16 {
            // Not an index of a ring of 8 at all: nothing may be read from the SQ.
            assert_eq!(flushed, [], "prod_tail {prod:#x}");
            assert_eq!(d.sq_indices(&qp).1, 0, "cons_head must not move");
        } else {
            // A valid index claiming more than 8 outstanding WQEs: never more than a ring.
            assert!(
                flushed.len() <= 8,
                "prod_tail {prod:#x}: {} CQEs",
                flushed.len()
            );
            assert!(d.sq_indices(&qp).1 < 16);
        }
        // The RQ of the same QP still flushes.
        d.post_recv(&qp, 77, &[]).unwrap();
        let recvs = d.drain_cq(&recv_cq);
        assert_eq!(recvs.len(), 1, "prod_tail {prod:#x}");
        assert_eq!(
            (recvs[0].wr_id, recvs[0].status),
            (77, wc_status::WR_FLUSH_ERR)
        );
        healthy(&mut d);
    }
}

#[test]
fn a_full_but_valid_sq_flushes_exactly_its_entries() {
    let Rig {
        mut d, send_cq, qp, ..
    } = rig_in_error(64);
    // All 8 slots outstanding (prod = cons ^ max): valid, flushed exactly once.
    for i in 0..8 {
        d.post_send_raw(&qp, &send_wqe(i, wr_opcode::SEND, 0, &[]))
            .unwrap();
    }
    assert_eq!(d.sq_indices(&qp), (8, 0));
    d.ring_qp(&qp, uar::QP_SEND);
    let ids: Vec<u64> = d.drain_cq(&send_cq).iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    d.ring_qp(&qp, uar::QP_SEND);
    assert_eq!(d.drain_cq(&send_cq), []);
}

#[test]
fn corrupt_rq_producer_on_modify_to_error_is_contained() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, SMALL);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    d.set_rq_prod(&qp, 0xffff_fff0);
    d.modify_qp_state(&qp, qp_state::ERR)
        .expect("modify to ERR");
    // The corrupt queue cannot be flushed: the guest hears QP_FATAL instead (rule 16).
    assert_eq!(
        d.last.as_ref().unwrap().vectors,
        [vector::COMMAND, vector::ASYNC_EVENT]
    );
    assert_eq!(
        d.poll_async().unwrap(),
        [abi::Eqe {
            event_type: event::QP_FATAL,
            info: qp.handle
        }]
    );
    assert_eq!(d.drain_cq(&cq), []);
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::ERR);
    healthy(&mut d);
}

#[test]
fn corrupt_cq_consumer_marks_the_cq_broken() {
    for cons in [u32::MAX, 0x80, 0xdead_beef] {
        let Rig {
            mut d, recv_cq, qp, ..
        } = rig_in_error(16);
        let prod_before = d.cq_indices(&recv_cq).0;
        d.set_cq_cons(&recv_cq, cons);
        d.post_recv(&qp, 5, &[]).unwrap();
        assert_eq!(d.take_irqs(), [vector::ASYNC_EVENT], "cons_head {cons:#x}");
        assert_eq!(
            d.poll_async().unwrap(),
            [abi::Eqe {
                event_type: event::CQ_ERR,
                info: recv_cq.handle
            }]
        );
        assert_eq!(d.cq_indices(&recv_cq).0, prod_before, "nothing written");
        // Repaired by the guest, the CQ stays broken (no CQE, no second event), and the
        // device keeps working.
        d.set_cq_cons(&recv_cq, 0);
        d.post_recv(&qp, 6, &[]).unwrap();
        assert_eq!(d.drain_cq(&recv_cq), []);
        assert_eq!(d.poll_async().unwrap(), []);
        healthy(&mut d);
    }
}

#[test]
fn corrupt_device_ring_consumers_drop_events_without_writing() {
    // Async ring.
    let Rig {
        mut d, recv_cq, qp, ..
    } = rig_in_error(1);
    let ring = d.session().async_ring.clone();
    d.set_device_ring_cons(&ring, u32::MAX);
    let page = memory::snapshot(d.ram(), ring.ring.buf.pages[1], PAGE_SIZE as usize);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    d.post_recv(&qp, 2, &[]).unwrap();
    assert_eq!(
        d.drain_cq(&recv_cq).len(),
        1,
        "the first CQE fits, the second overflows"
    );
    assert_eq!(
        d.take_irqs(),
        [] as [u16; 0],
        "an undeliverable event raises nothing"
    );
    assert_eq!(d.device_ring_indices(&ring).0, 0);
    assert_eq!(
        memory::snapshot(d.ram(), ring.ring.buf.pages[1], PAGE_SIZE as usize),
        page
    );
    healthy(&mut d);

    // CQ notification ring.
    let Rig {
        mut d, recv_cq, qp, ..
    } = rig_in_error(16);
    let ring = d.session().cq_notify.clone();
    d.set_device_ring_cons(&ring, 0x10_0000);
    d.ring_cq(&recv_cq, uar::CQ_ARM);
    d.post_recv(&qp, 1, &[]).unwrap();
    assert_eq!(d.drain_cq(&recv_cq).len(), 1);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    assert_eq!(d.device_ring_indices(&ring).0, 0);
    healthy(&mut d);
}

/// Many QPs and CQs sharing one ring buffer each (the device does not mind), so that hundreds
/// of events can be provoked cheaply.
struct Crowd {
    qps: Vec<u32>,
    cqs: Vec<u32>,
}

/// `pairs` kernel QPs in RESET on `pd`, each with a send and a receive CQ of one entry (or
/// one CQ for both with `one_cq`); every QP's rings hold one posted send and one posted
/// receive.
fn crowd(d: &mut D, pd: u32, pairs: usize, one_cq: bool) -> Crowd {
    let cq_layout = d.cq_layout(1);
    let sizes = QpSizes {
        max_send_wr: 1,
        max_recv_wr: 1,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let qp_layout = d.qp_layout(QpOwner::Kernel, sizes);
    let mut qps = Vec::new();
    let mut cqs = Vec::new();
    let cq_request = Driver::<InProcessBus>::cq_request(&cq_layout, 0);
    for _ in 0..pairs {
        let send = ok(d.create_cq(&cq_request), d).0;
        cqs.push(send);
        let recv = if one_cq {
            send
        } else {
            let recv = ok(d.create_cq(&cq_request), d).0;
            cqs.push(recv);
            recv
        };
        let spec = QpSpec {
            owner: QpOwner::Kernel,
            recv_cq: recv,
            ..QpSpec::user(qp_type::RC, KERNEL_UC, pd, send, sizes)
        };
        let request = Driver::<InProcessBus>::qp_request(&qp_layout, &spec);
        qps.push(ok(d.create_qp(&request), d).handle);
    }
    // One send and one receive outstanding, as every QP sees it.
    let ram = d.ram();
    let state = qp_layout.ring.buf.pages[0];
    memory::write_u32(ram, state, 1);
    memory::write_u32(ram, state + 8, 1);
    d.take_irqs();
    Crowd { qps, cqs }
}

fn disband(d: &mut D, crowd: Crowd) {
    for qp in crowd.qps {
        ok(d.destroy_qp(qp), d);
    }
    let mut cqs = crowd.cqs;
    cqs.dedup();
    for cq in cqs {
        ok(d.destroy_cq(cq), d);
    }
}

#[test]
fn cq_notifications_never_overrun_the_notification_ring() {
    let mut d = Driver::probed();
    let pd = ok(d.create_pd(0), &d);
    let ring = d.session().cq_notify.clone();
    // Three rounds of 1200 notifications: the driver's indices for 3072 elements repeat
    // every 2048 and use 1024 slots (device-abi §6.1), so the rounds cross the wrap.
    for round in 0..3 {
        let crowd = crowd(&mut d, pd, 600, false);
        for &cq in &crowd.cqs {
            d.doorbell(0, uar::CQ_OFFSET, cq | uar::CQ_ARM);
        }
        for &qp in &crowd.qps {
            d.modify_qp(qp, mask::STATE, &verbs::state_attrs(qp_state::ERR))
                .unwrap();
        }
        let (prod, cons) = d.device_ring_indices(&ring);
        assert!(
            ring.layout.idx.valid(prod),
            "round {round}: prod_tail {prod:#x}"
        );
        let pending = prod.wrapping_sub(cons) % 2048;
        assert!(
            pending <= 1024,
            "round {round}: {pending} unconsumed CQNEs would share slots"
        );
        let cqnes = d.poll_cq_notifications().unwrap();
        assert_eq!(cqnes.len(), pending as usize, "round {round}");
        assert!(
            cqnes.len() >= 1000,
            "round {round}: only {} notifications",
            cqnes.len()
        );
        // Every notification names a distinct CQ, in completion order: nothing overwritten.
        let infos: Vec<u32> = cqnes.iter().map(|c| c.info).collect();
        assert_eq!(infos, crowd.cqs[..infos.len()], "round {round}");
        disband(&mut d, crowd);
    }
    healthy(&mut d);
}

#[test]
fn async_events_never_overrun_the_event_ring() {
    let mut d = Driver::probed();
    let pd = ok(d.create_pd(0), &d);
    let ring = d.session().async_ring.clone();
    // Each QP flushes a send and a receive into its one-entry CQ: 600 CQ overflows a round.
    // 1536 elements: indices repeat every 1024 and use 512 slots (device-abi §6.1).
    for round in 0..3 {
        let crowd = crowd(&mut d, pd, 600, true);
        for &qp in &crowd.qps {
            d.modify_qp(qp, mask::STATE, &verbs::state_attrs(qp_state::ERR))
                .unwrap();
        }
        let (prod, cons) = d.device_ring_indices(&ring);
        assert!(
            ring.layout.idx.valid(prod),
            "round {round}: prod_tail {prod:#x}"
        );
        let pending = prod.wrapping_sub(cons) % 1024;
        assert!(
            pending <= 512,
            "round {round}: {pending} unconsumed events would share slots"
        );
        let events = d.poll_async().unwrap();
        assert_eq!(events.len(), pending as usize, "round {round}");
        assert!(
            events.len() >= 500,
            "round {round}: only {} events",
            events.len()
        );
        assert!(events.iter().all(|e| e.event_type == event::CQ_ERR));
        let infos: Vec<u32> = events.iter().map(|e| e.info).collect();
        assert_eq!(
            infos,
            crowd.cqs[..infos.len()],
            "round {round}: events lost or overwritten"
        );
        disband(&mut d, crowd);
    }
    // Drained, the ring takes single events as before.
    let layout = d.cq_layout(1);
    let cq = ok(
        d.create_cq(&Driver::<InProcessBus>::cq_request(&layout, 0)),
        &d,
    )
    .0;
    let sizes = QpSizes {
        max_send_wr: 1,
        max_recv_wr: 1,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let qp = ok(
        d.create_qp_with(QpSpec {
            owner: QpOwner::Kernel,
            ..QpSpec::user(qp_type::RC, KERNEL_UC, pd, cq, sizes)
        }),
        &d,
    );
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    d.post_send_raw(&qp, &send_wqe(2, wr_opcode::SEND, 0, &[]))
        .unwrap();
    ok_vectors(
        d.modify_qp_state(&qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::ASYNC_EVENT],
    );
    assert_eq!(
        d.poll_async().unwrap(),
        [abi::Eqe {
            event_type: event::CQ_ERR,
            info: cq
        }]
    );
    healthy(&mut d);
}

fn ok_vectors<T: std::fmt::Debug>(result: CmdResult<T>, d: &D, vectors: &[u16]) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    assert_eq!(d.last.as_ref().unwrap().vectors, vectors);
    value
}

#[test]
fn doorbells_on_pages_not_owned_by_the_object_are_ignored() {
    let Rig {
        mut d,
        uc,
        recv_cq,
        qp,
        ..
    } = rig_in_error(16);
    let other = ok(d.open_context(), &d);
    d.post_recv_raw(&qp, 9, &[]).unwrap();
    let word = uar::QP_OFFSET;
    let value = qp.handle | uar::QP_RECV;
    for (what, page, w) in [
        ("kernel page", 0, word),
        ("another context's page", other.uar, word),
        ("an unallocated page", 77, word),
        ("past BAR2", 512, word),
        ("far past BAR2", 1 << 20, word),
        ("unused word", uc.uar, 0xc),
        ("unaligned word", uc.uar, 0x2),
        ("CQ word", uc.uar, uar::CQ_OFFSET),
        ("SRQ word", uc.uar, uar::SRQ_OFFSET),
    ] {
        d.doorbell(page, w, value);
        assert_eq!(d.drain_cq(&recv_cq), [], "{what}");
        assert_eq!(d.rq_indices(&qp).1, 0, "{what}: the RQ was consumed");
    }
    // An arm from a foreign page does not arm.
    d.doorbell(other.uar, uar::CQ_OFFSET, recv_cq.handle | uar::CQ_ARM);
    d.doorbell(0, uar::CQ_OFFSET, recv_cq.handle | uar::CQ_ARM);
    d.ring_qp(&qp, uar::QP_RECV);
    assert_eq!(d.drain_cq(&recv_cq).len(), 1, "the owner's page works");
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [],
        "foreign arms must not arm"
    );
    // A kernel QP is not reachable from a user page either.
    let mad = d.kernel_registration().unwrap();
    d.take_irqs();
    d.ring_cq(&mad.cq, uar::CQ_ARM); // armed from page 0: fine
    ok_vectors(
        d.modify_qp_state(&mad.qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::CQ_NOTIFY],
    );
    let flushed = d.drain_cq(&mad.cq).len();
    assert_eq!(flushed, 512);
    d.post_recv_raw(&mad.qp, 1000, &[]).unwrap();
    d.doorbell(uc.uar, uar::QP_OFFSET, mad.qp.handle | uar::QP_RECV);
    assert_eq!(d.drain_cq(&mad.cq), [], "kernel QP rung from a user page");
    d.doorbell(0, uar::QP_OFFSET, mad.qp.handle | uar::QP_RECV);
    assert_eq!(d.drain_cq(&mad.cq).len(), 1);
}

// ---------------------------------------------------------------------------------------
// The hostile sweep
// ---------------------------------------------------------------------------------------

/// xorshift64*: deterministic, no crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn pick_vec(&mut self, items: &[Vec<u8>]) -> Vec<u8> {
        items[self.below(items.len() as u64) as usize].clone()
    }
}

/// Valid guest structures the sweep's random requests may point at, and valid requests
/// to mutate.
struct Pool {
    pdirs: Vec<u64>,
    state_pages: Vec<u64>,
    templates: Vec<Vec<u8>>,
}

fn bytes_of<T: zerocopy::IntoBytes + zerocopy::Immutable>(value: &T) -> Vec<u8> {
    zerocopy::IntoBytes::as_bytes(value).to_vec()
}

/// One valid request per command (as far as the objects allow), on fresh buffers.
fn valid_requests(d: &mut D, uc: Uc, pd: u32, cq: &Cq, qp: &Qp, srq: &Srq) -> Vec<Vec<u8>> {
    type Dr = Driver<InProcessBus>;
    let buffer = d.user_buffer(0x5000_0000, 5 * PAGE_SIZE);
    let cq_layout = d.cq_layout(16);
    let qp_layout = d.qp_layout(QpOwner::User, SMALL);
    let srq_layout = d.srq_layout(16, 1);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, SMALL);
    let pfn = d.session().dsr.config.uar_pfn;
    let gid = ipv4_gid([10, 0, 0, 1]);
    let mut modify = abi::ModifyQpRequest {
        hdr: header(Command::ModifyQp),
        qp_handle: qp.handle,
        attr_mask: RC_INIT_MASK,
        attrs: verbs::rc_init_attrs(),
    };
    let mut out = vec![
        bytes_of(&abi::QueryPortRequest {
            hdr: header(Command::QueryPort),
            port_num: 1,
            reserved: [0; 7],
        }),
        bytes_of(&abi::QueryPkeyRequest {
            hdr: header(Command::QueryPkey),
            port_num: 1,
            index: 0,
            reserved: [0; 6],
        }),
        bytes_of(&handle_request(Command::CreatePd, uc.handle, 0)),
        bytes_of(&handle_request(Command::DestroyPd, pd, 0)),
        bytes_of(&Dr::user_mr_request(pd, &buffer, access::LOCAL_WRITE)),
        bytes_of(&Dr::dma_mr_request(1)),
        bytes_of(&Dr::frmr_request(pd, 16)),
        bytes_of(&handle_request(Command::DestroyMr, 1, 0)),
        bytes_of(&Dr::cq_request(&cq_layout, uc.handle)),
        bytes_of(&handle_request(Command::ResizeCq, cq.handle, 32)),
        bytes_of(&handle_request(Command::DestroyCq, cq.handle, 0)),
        bytes_of(&Dr::qp_request(&qp_layout, &spec)),
        bytes_of(&modify),
        bytes_of(&handle_request(Command::QueryQp, qp.handle, 0)),
        bytes_of(&handle_request(Command::DestroyQp, qp.handle, 0)),
        bytes_of(&abi::CreateUcRequest {
            hdr: header(Command::CreateUc),
            pfn64: pfn + 7,
        }),
        bytes_of(&handle_request(Command::DestroyUc, uc.handle, 0)),
        bytes_of(&abi::CreateBindRequest {
            hdr: header(Command::CreateBind),
            mtu: 1024,
            vlan: 0xfff,
            index: 0,
            new_gid: gid,
            gid_type: GID_TYPE_ROCE_V1,
            reserved: [0; 3],
        }),
        bytes_of(&abi::DestroyBindRequest {
            hdr: header(Command::DestroyBind),
            index: 0,
            dest_gid: gid,
            reserved: [0; 4],
        }),
        bytes_of(&Dr::srq_request(&srq_layout, pd, 0)),
        bytes_of(&abi::ModifySrqRequest {
            hdr: header(Command::ModifySrq),
            srq_handle: srq.handle,
            attr_mask: SRQ_ATTR_LIMIT,
            attrs: abi::SrqAttr {
                srq_limit: 4,
                ..Default::default()
            },
        }),
        bytes_of(&handle_request(Command::QuerySrq, srq.handle, 0)),
        bytes_of(&handle_request(Command::DestroySrq, srq.handle, 0)),
    ];
    for (state, attr_mask, attrs) in [
        (
            qp_state::RTR,
            RC_RTR_MASK,
            verbs::rc_rtr_attrs(3, 0, gid, 0),
        ),
        (qp_state::RTS, verbs::RC_RTS_MASK, verbs::rc_rts_attrs(0)),
        (
            qp_state::ERR,
            mask::STATE,
            verbs::state_attrs(qp_state::ERR),
        ),
        (
            qp_state::RESET,
            mask::STATE,
            verbs::state_attrs(qp_state::RESET),
        ),
    ] {
        modify.attr_mask = attr_mask;
        modify.attrs = attrs;
        assert_eq!(modify.attrs.qp_state, state);
        out.push(bytes_of(&modify));
    }
    out
}

/// A valid request with a few fields changed.
fn mutated_request(rng: &mut Rng, pool: &Pool) -> Vec<u8> {
    let mut bytes = rng.pick_vec(&pool.templates);
    let mutations = rng.below(4);
    for _ in 0..mutations {
        if bytes.len() <= 16 {
            break;
        }
        let words = (bytes.len() - 16) / 4;
        let offset = 16 + 4 * rng.below(words as u64) as usize;
        match rng.below(3) {
            0 => {
                let v = interesting_u32(rng, pool);
                bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
            }
            1 => {
                let bit = rng.below(32);
                let v =
                    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) ^ (1 << bit);
                bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let at = offset + rng.below(4) as usize;
                bytes[at] = rng.next() as u8;
            }
        }
    }
    bytes
}

fn interesting_u32(rng: &mut Rng, pool: &Pool) -> u32 {
    match rng.below(14) {
        0..=2 => 0,
        3..=5 => 1 + rng.below(4) as u32,
        6 => rng.below(64) as u32,
        7 => 1 << rng.below(32),
        8 => u32::MAX,
        9 => rng.pick(&pool.pdirs) as u32,
        10 => 0x8000_0000 | rng.below(4) as u32,
        _ => rng.next() as u32,
    }
}

fn random_request(rng: &mut Rng, pool: &Pool) -> [u8; abi::REQUEST_SLOT_BYTES] {
    let mut bytes = [0u8; abi::REQUEST_SLOT_BYTES];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let cmd = rng.below(22) as u32;
    bytes[8..12].copy_from_slice(&cmd.to_le_bytes());
    for offset in (16..84).step_by(4) {
        if rng.chance(70) {
            let v = interesting_u32(rng, pool);
            bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    // A valid page directory where CQ/QP/SRQ (16) and MR (32) requests take one.
    let pdir_at = match Command::from_u32(cmd) {
        Some(Command::CreateCq | Command::CreateQp | Command::CreateSrq) => Some(16),
        Some(Command::CreateMr) => Some(32),
        _ => None,
    };
    if let Some(offset) = pdir_at.filter(|_| rng.chance(70)) {
        let dir = rng.pick(&pool.pdirs);
        bytes[offset..offset + 8].copy_from_slice(&dir.to_le_bytes());
    }
    // Small chunk counts and a plausible QP type / SRQ flag.
    if rng.chance(50) {
        bytes[68..70].copy_from_slice(&(rng.below(8) as u16).to_le_bytes());
        bytes[70..72].copy_from_slice(&(rng.below(4) as u16).to_le_bytes());
        bytes[75] = rng.pick(&[1, 2, 4, 3, 0]);
        bytes[76] = rng.below(2) as u8;
    }
    bytes
}

/// What a reloaded driver does: fresh (zeroed) device rings, the DSR loaded again, IMR 0,
/// ACTIVATE.
fn reload(d: &mut D, session: &driver::Session) {
    for ring in [&session.async_ring, &session.cq_notify] {
        memory::fill(d.ram(), ring.ring.buf.pages[0], 0, 16);
    }
    d.write_reg(regs::IMR, 0);
    d.write_dsr_address(session.dsr.addr);
    d.write_reg(regs::CTL, regs::CTL_ACTIVATE);
    d.dsr = Some(session.dsr.clone());
}

fn sweep(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let mut d = Driver::probed();
    let mad = d.kernel_registration().unwrap();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, SMALL);
    let srq: Srq = ok(d.create_srq_on(uc, pd, 16, 1), &d);
    let _mr = ok(
        d.reg_user_mr(pd, 0x1000, 3 * PAGE_SIZE, access::LOCAL_WRITE),
        &d,
    );

    // Valid page directories of various sizes for random requests to use.
    let mut pdirs = Vec::new();
    let mut state_pages = vec![
        cq.layout.ring.buf.pages[0],
        mad.cq.layout.ring.buf.pages[0],
        qp.layout.ring.buf.pages[0],
        mad.qp.layout.ring.buf.pages[0],
        srq.layout.ring.buf.pages[0],
        d.session().async_ring.ring.buf.pages[0],
        d.session().cq_notify.ring.buf.pages[0],
    ];
    for pages in [1u64, 2, 3, 6, 17, 40] {
        let ring = RingBuffer::new(&mut d.alloc, d.bus.ram(), pages);
        pdirs.push(ring.pdir.dir);
        state_pages.push(ring.buf.pages[0]);
    }
    let templates = valid_requests(&mut d, uc, pd, &cq, &qp, &srq);
    let pool = Pool {
        pdirs,
        state_pages,
        templates,
    };
    let limits = *d.device().limits();
    let bound = (limits.max_contexts
        + limits.max_pd
        + limits.max_mr
        + limits.max_cq
        + limits.max_qp
        + limits.max_srq) as usize;
    let session = d.session().clone();
    let mut executed = 0;
    let mut created = 0;

    for _ in 0..steps {
        match rng.below(100) {
            // A command slot full of random bytes.
            0..=49 => {
                if d.dsr.is_none() {
                    continue;
                }
                let bytes = if rng.chance(50) {
                    mutated_request(&mut rng, &pool)
                } else {
                    random_request(&mut rng, &pool).to_vec()
                };
                let cmd = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
                let before = d.device().object_count();
                let result = d.execute_bytes(&bytes);
                executed += 1;
                if let Ok(resp) = result {
                    let word = |o: usize| u32::from_le_bytes(resp[o..o + 4].try_into().unwrap());
                    let check = |h: u32, max: u32, what: &str| {
                        assert!(
                            h >= 1 && h < max,
                            "seed {seed}: {what} handle {h} (max {max})"
                        );
                    };
                    match Command::from_u32(cmd) {
                        Some(Command::CreatePd) => check(word(16), limits.max_pd, "PD"),
                        Some(Command::CreateMr) => {
                            check(word(16), limits.max_mr, "MR");
                            assert_eq!(word(20), word(24), "seed {seed}: lkey = rkey");
                            assert_ne!(word(20) >> 8, 0, "seed {seed}: a key has key bits");
                        }
                        Some(Command::CreateCq) => check(word(16), limits.max_cq, "CQ"),
                        Some(Command::CreateUc) => check(word(16), limits.max_contexts, "UC"),
                        Some(Command::CreateSrq) => check(word(16), limits.max_srq, "SRQ"),
                        Some(Command::CreateQp) => {
                            check(word(20), limits.max_qp, "QP");
                            // The QPN (word 16) is the GSI QP's 1, or lies apart from the
                            // handle (word 20): a driver of version 20 takes them apart.
                            let (qpn, handle) = (word(16), word(20));
                            assert!(
                                (qpn, handle) == (1, 1) || qpn == handle + 0x100,
                                "seed {seed}: QPN {qpn:#x} for handle {handle:#x}"
                            );
                        }
                        Some(_) => {}
                        None => panic!("seed {seed}: unknown command {cmd} succeeded"),
                    }
                    if d.device().object_count() > before {
                        created += 1;
                    }
                }
            }
            // A doorbell.
            50..=69 => {
                let page = match rng.below(4) {
                    0 => 0,
                    1 => uc.uar,
                    2 => rng.below(8) as u32,
                    _ => rng.below(1024) as u32,
                };
                let word = match rng.below(5) {
                    0 => uar::QP_OFFSET,
                    1 => uar::CQ_OFFSET,
                    2 => uar::SRQ_OFFSET,
                    _ => rng.below(4096),
                };
                let handle = if rng.chance(70) {
                    rng.below(8) as u32
                } else {
                    rng.next() as u32 & uar::HANDLE_MASK
                };
                let bits = (rng.below(8) as u32) << 29;
                d.doorbell(page, word, handle | bits);
            }
            // A register write, mostly harmless ones, sometimes a reset or a new DSR.
            70..=79 => {
                let offset = match rng.below(20) {
                    0 => regs::CTL,
                    1 => regs::DSR_LOW,
                    2 => regs::DSR_HIGH,
                    3 | 4 => regs::IMR,
                    5 | 6 => regs::REQUEST,
                    7 => regs::MAC_LOW,
                    _ => rng.below(0x40) & !3,
                };
                let value = match offset {
                    regs::CTL => rng.pick(&[0, 1, 2, 3, u32::MAX]),
                    regs::IMR => rng.pick(&[0, 0, 0, 1, 2, 4, u32::MAX]),
                    _ => interesting_u32(&mut rng, &pool),
                };
                d.write_reg(offset, value);
                for offset in [regs::ERR, regs::ICR, regs::VERSION, rng.below(0x100)] {
                    d.read_reg(offset);
                }
            }
            // The guest scribbles over a ring-state page.
            80..=89 => {
                let page = rng.pick(&pool.state_pages);
                let offset = rng.below(4) * 4;
                let value = match rng.below(3) {
                    0 => rng.below(16) as u32,
                    1 => rng.below(2048) as u32,
                    _ => rng.next() as u32,
                };
                memory::write_u32(d.ram(), page + offset, value);
            }
            // Plausible work: posts, flushes, arms, polls.
            _ => {
                let _ = d.post_recv_raw(&qp, rng.next(), &[]);
                let _ = d.post_send_raw(&qp, &send_wqe(rng.next(), wr_opcode::SEND, 0, &[]));
                if rng.chance(30) {
                    let _ = d.modify_qp(qp.handle, mask::STATE, &verbs::state_attrs(qp_state::ERR));
                }
                d.ring_qp(&qp, uar::QP_SEND | uar::QP_RECV);
                d.ring_cq(&cq, rng.pick(&[uar::CQ_ARM, uar::CQ_ARM_SOL, uar::CQ_POLL]));
                let _ = d.poll_cq(&cq);
                if d.session.is_some() {
                    let _ = d.poll_async();
                    let _ = d.poll_cq_notifications();
                }
            }
        }
        assert!(
            d.device().object_count() <= bound,
            "seed {seed}: {} objects",
            d.device().object_count()
        );
        // Come back now and then after a random reset or DSR, as a driver reload would.
        if !d.device().is_active() && rng.chance(20) {
            reload(&mut d, &session);
        }
        d.take_irqs();
    }
    assert!(
        executed > steps / 3,
        "seed {seed}: only {executed} commands"
    );
    assert!(
        created > 0,
        "seed {seed}: the random commands never created anything"
    );

    // The device still works: without a reset if it is active...
    if !d.device().is_active() {
        reload(&mut d, &session);
        assert_eq!(d.read_reg(regs::ERR), 0, "seed {seed}: reload");
        assert!(d.device().is_active(), "seed {seed}: reload");
    }
    d.write_reg(regs::IMR, 0);
    d.take_irqs();
    healthy(&mut d);
    let kpd = ok(d.create_pd(0), &d);
    let kcq = ok(d.create_cq_on(KERNEL_UC, 64), &d);
    let kqp = ok(
        d.create_qp_with(QpSpec {
            owner: QpOwner::Kernel,
            ..QpSpec::user(qp_type::RC, KERNEL_UC, kpd, kcq.handle, SMALL)
        }),
        &d,
    );
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    ok(d.rc_connect(&kqp, 9, ipv4_gid([10, 0, 0, 2]), 0), &d);
    d.post_recv_raw(&kqp, 42, &[]).unwrap();
    ok(d.modify_qp_state(&kqp, qp_state::ERR), &d);
    let cqes = d.drain_cq(&kcq);
    assert_eq!(cqes.len(), 1, "seed {seed}");
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (42, wc_status::WR_FLUSH_ERR)
    );

    // ...and after a full remove and probe.
    d.remove();
    assert_eq!(d.device().object_count(), 0);
    d.probe();
    d.kernel_registration().unwrap();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, SMALL);
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    healthy(&mut d);
}

#[test]
fn hostile_sweep() {
    for seed in [0x9e37_79b9_7f4a_7c15, 0xdead_beef_cafe_f00d, 42, 7] {
        sweep(seed, 8000);
    }
}

#[test]
fn hostile_sweep_with_masked_bytes_only() {
    // A second flavour: random bytes without any help from the pool.
    let mut rng = Rng(7);
    let mut d = Driver::probed();
    d.kernel_registration().unwrap();
    for _ in 0..3000 {
        let mut bytes = [0u8; abi::REQUEST_SLOT_BYTES];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        bytes[8..12].copy_from_slice(&(rng.below(22) as u32).to_le_bytes());
        let _ = d.execute_bytes(&bytes);
        assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    }
    healthy(&mut d);
}

#[test]
fn av_port_other_than_one_is_refused() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = rc_qp(&mut d, uc, pd, cq.handle, PINGPONG_SIZES);
    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    let before = objects(&d);
    for port in [0u8, 2, 255] {
        let mut rtr = verbs::rc_rtr_attrs(3, 0, ipv4_gid([10, 0, 0, 2]), 0);
        rtr.ah_attr.port_num = port;
        fails(
            d.modify_qp(qp.handle, RC_RTR_MASK, &rtr),
            &d,
            before,
            &format!("AV port {port}"),
        );
        assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::INIT);
    }
}

#[test]
fn page_directories_are_bounded_by_the_page_budget() {
    // Rule 23: a guest cannot make the device hold more page addresses than its budget,
    // however it spreads them over objects; destroying an object gives its pages back.
    let mut config = vfio_user_pvrdma::pvrdma::DeviceConfig::default();
    config.limits.max_mapped_pages = 20;
    let mut d = Driver::in_process_with(config);
    d.probe();
    // A 1-CQE kernel CQ holds 2 pages (ring state + one page of CQEs).
    let layout = d.cq_layout(1);
    let request = Driver::<InProcessBus>::cq_request(&layout, 0);
    let mut cqs = Vec::new();
    while let Ok((cq, _)) = d.create_cq(&request) {
        cqs.push(cq);
        assert!(cqs.len() <= 10, "more CQs than the budget allows");
    }
    assert_eq!(cqs.len(), 10);
    ok(d.destroy_cq(cqs.pop().unwrap()), &d);
    ok(d.create_cq(&request), &d);
    assert!(d.create_cq(&request).is_err());
}
