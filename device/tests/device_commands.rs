//! The device driven the way the Linux driver and rdma-core drive it (device-abi §2.2, device-abi §11): bring-up,
//! the kernel's registration, every command's success path, flushes, CQ notifications and
//! async events.

mod driver;

use driver::bringup::{self, DsrConfig, caps_supported};
use driver::bus::Bus;
use driver::commands::{CmdResult, RESPONSE_POISON};
use driver::layout::{QpOwner, QpSizes};
use driver::memory;
use driver::queues::KERNEL_UC;
use driver::verbs::{
    self, GSI_SIZES, MAD_CQE, PINGPONG_SIZES, QP1_QKEY, QpSpec, RC_INIT_MASK, RC_RTR_MASK,
    RC_RTS_MASK, ipv4_gid, link_local_gid,
};
use driver::{Cq, Driver, InProcessBus, Qp, Uc};
use vfio_user_pvrdma::abi::{
    self, Command, GID_TYPE_ROCE_V1, MAX_FAST_REG_PAGES, PAGE_SIZE, QpAttr, RESPONSE_ACK,
    RESPONSE_SLOT_BYTES, SRQ_ATTR_LIMIT, Sge, access, event, qp_attr_mask as mask, qp_state,
    qp_type, regs, send_flags, uar, vector, wc_opcode, wc_status, wr_opcode,
};

type D = Driver<InProcessBus>;

/// Unwraps a command result and checks that the command raised exactly vector 0.
fn ok<T: std::fmt::Debug>(result: CmdResult<T>, d: &D) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    let record = d.last.as_ref().unwrap();
    assert_eq!(record.err, 0);
    assert_eq!(
        record.vectors,
        [vector::COMMAND],
        "command {} must raise vector 0 once",
        record.cmd
    );
    value
}

/// A user context with a PD and one CQ of `cqe` entries.
fn user_setup(d: &mut D, cqe: u32) -> (Uc, u32, Cq) {
    let uc = ok(d.open_context(), d);
    let pd = ok(d.create_pd(uc.handle), d);
    let cq = ok(d.create_cq_on(uc, cqe), d);
    (uc, pd, cq)
}

fn user_qp(
    d: &mut D,
    qp_type: u8,
    uc: Uc,
    pd: u32,
    send_cq: u32,
    recv_cq: u32,
    sizes: QpSizes,
) -> Qp {
    let spec = QpSpec {
        send_cq,
        recv_cq,
        ..QpSpec::user(qp_type, uc, pd, send_cq, sizes)
    };
    ok(d.create_qp_with(spec), d)
}

fn sge(addr: u64, length: u32, lkey: u32) -> Sge {
    Sge { addr, length, lkey }
}

// ---------------------------------------------------------------------------------------
// Bring-up and registration
// ---------------------------------------------------------------------------------------

#[test]
fn bring_up_follows_the_driver_probe_order() {
    let mut d = Driver::in_process();
    assert_ne!(
        d.read_reg(regs::ERR),
        0,
        "nothing has succeeded before the DSR is loaded"
    );
    assert!(!d.device().is_active());

    // Step 3: VERSION.
    let version = d.read_version();
    assert_eq!(version, 20);

    // Steps 4-6: the DSR as the driver fills it.
    let image = d.build_dsr(DsrConfig::default(), version);
    let written = memory::snapshot(d.ram(), image.addr, abi::DSR_CAPS_OFFSET as usize);
    assert_eq!(memory::read_u32(d.ram(), image.addr), 20, "driver_version");
    assert_eq!(
        memory::read_u32(d.ram(), image.addr + 8),
        0x46,
        "gos_info of 64-bit Linux"
    );
    assert_eq!(
        memory::read_u64(d.ram(), image.addr + 64),
        bringup::DEFAULT_UAR_PFN,
        "uar_pfn64"
    );
    assert_eq!(d.read_dsr(&image).async_ring_pages.num_pages, 4);
    assert_eq!(d.read_dsr(&image).cq_ring_pages.num_pages, 4);

    // Step 7: DSRLOW alone does nothing; DSRHIGH is the trigger.
    assert_ne!(image.addr >> 32, 0, "the DSR lies above 4 GiB");
    d.write_reg(regs::DSR_LOW, image.addr as u32);
    assert_eq!(d.read_caps(&image).mode, 0);
    assert_eq!(
        d.read_caps(&image).gid_types,
        0,
        "caps written before DSRHIGH"
    );
    d.write_reg(regs::DSR_HIGH, (image.addr >> 32) as u32);
    assert_eq!(d.read_reg(regs::ERR), 0);
    assert!(d.take_irqs().is_empty(), "a DSR load raises nothing");

    // Step 8: PVRDMA_SUPPORTED and the other checks the driver makes on caps.
    let caps = d.read_caps(&image);
    assert!(caps_supported(&caps, version), "{caps:?}");
    assert_eq!(caps.mode, 0);
    assert!(caps.gid_types == 1 || caps.gid_types == 2);
    assert!(caps.max_uar.is_power_of_two(), "max_uar {}", caps.max_uar);
    assert!(
        caps.max_uar as u64 * PAGE_SIZE <= 2 << 20,
        "UAR pages fit BAR2"
    );
    assert_eq!(caps.phys_port_cnt, 1);
    assert!(caps.max_qp > 0 && caps.max_qp <= 65535);
    assert!(caps.max_cq > 0 && caps.max_pd > 0);
    assert!(caps.max_cqe >= 1024 && caps.max_qp_wr >= 512 && caps.max_sge >= 2);
    assert!(caps.gid_tbl_len > 0);
    assert_eq!(caps.max_pkeys, 1);
    // device-abi §12's recommendations.
    assert_eq!(caps.page_size_cap, PAGE_SIZE);
    assert_eq!(caps.vendor_id, 0x15ad);
    assert!(caps.max_mr_size >= PAGE_SIZE && caps.max_mr_size <= 1 << 30);
    // The device wrote caps and nothing else.
    assert_eq!(
        memory::snapshot(d.ram(), image.addr, abi::DSR_CAPS_OFFSET as usize),
        written
    );
    assert!(!d.device().is_active(), "not active before CTL=ACTIVATE");

    // Steps 13-14.
    d.write_reg(regs::IMR, 0);
    d.write_reg(regs::CTL, regs::CTL_ACTIVATE);
    assert_eq!(d.read_reg(regs::ERR), 0);
    assert!(d.device().is_active());
    assert!(d.take_irqs().is_empty());

    // Link up (device-abi §2.4).
    assert_eq!(d.unquiesce(), 0);
}

#[test]
fn the_probe_helper_yields_a_usable_session() {
    let mut d = Driver::in_process();
    let session = d.probe().clone();
    assert_eq!(session.version, 20);
    assert_eq!(
        session.async_ring.layout.idx.max, 1536,
        "(4 - 1) * 4096 / 8"
    );
    assert_eq!(session.cq_notify.layout.idx.max, 3072, "(4 - 1) * 4096 / 4");
    assert_eq!(d.poll_async().unwrap(), []);
    assert_eq!(d.poll_cq_notifications().unwrap(), []);
}

#[test]
fn kernel_registration_sequence() {
    let mut d = Driver::probed();
    let caps = d.caps();

    // Port queries (several, as ib_core's caches do).
    for _ in 0..3 {
        let port = ok(d.query_port(1), &d);
        assert_eq!(port.state, 4, "ACTIVE");
        assert_eq!(port.phys_state, 5, "LinkUp");
        assert!(port.gid_tbl_len >= 1 && port.gid_tbl_len <= caps.gid_tbl_len);
        assert!(port.pkey_tbl_len >= 1);
        assert!((1..=5).contains(&port.active_mtu) && port.active_mtu <= port.max_mtu);
    }
    assert_eq!(ok(d.query_pkey(1, 0), &d), 0xffff);

    ok(
        d.create_bind(0, link_local_gid(verbs::MAC), GID_TYPE_ROCE_V1),
        &d,
    );
    let pd = ok(d.create_pd(0), &d);
    let dma_mr = ok(d.get_dma_mr(pd), &d);
    assert_eq!(dma_mr.lkey, dma_mr.rkey);
    assert_ne!(
        dma_mr.lkey >> 8,
        dma_mr.handle,
        "the key does not give the handle away"
    );

    let cq = ok(d.create_cq_on(KERNEL_UC, MAD_CQE), &d);
    assert_eq!(
        cq.layout.nchunks,
        1 + 16,
        "ring-state page + 1024 * 64 bytes"
    );
    d.ring_cq(&cq, uar::CQ_ARM);

    let spec = QpSpec {
        owner: QpOwner::Kernel,
        qp_type: qp_type::GSI,
        uc: KERNEL_UC,
        pd,
        send_cq: cq.handle,
        recv_cq: cq.handle,
        srq: None,
        sizes: GSI_SIZES,
        sq_sig_all: true,
    };
    let layout = d.qp_layout(QpOwner::Kernel, GSI_SIZES);
    assert_eq!(layout.sq.stride, 128);
    assert_eq!(layout.rq.unwrap().stride, 32);
    assert_eq!((layout.send_chunks, layout.total_chunks), (4, 9));
    let qp = ok(d.create_qp_on_layout(spec, layout), &d);
    assert_eq!(qp.qpn, 1, "QP1");
    assert_eq!(qp.handle, 1);
    let created = d.last.as_ref().unwrap().response;
    let v2: abi::CreateQpResponseV2 = zerocopy::FromBytes::read_from_prefix(&created).unwrap().0;
    assert_eq!(
        (
            v2.max_send_wr,
            v2.max_recv_wr,
            v2.max_send_sge,
            v2.max_recv_sge
        ),
        (128, 512, 2, 1)
    );

    for (state, mask) in [
        (qp_state::INIT, verbs::GSI_INIT_MASK),
        (qp_state::RTR, verbs::GSI_RTR_MASK),
        (qp_state::RTS, verbs::GSI_RTS_MASK),
    ] {
        let attrs = QpAttr {
            qp_state: state,
            qkey: QP1_QKEY,
            ..QpAttr::default()
        };
        ok(d.modify_qp(qp.handle, mask, &attrs), &d);
        assert_eq!(d.last.as_ref().unwrap().header().err, 0);
    }
    let attrs = ok(d.query_qp(qp.handle, 0), &d);
    assert_eq!(attrs.qp_state, qp_state::RTS);
    assert_eq!(attrs.qkey, QP1_QKEY);
    assert_eq!(attrs.cap.max_send_wr, 128);
    assert_eq!(attrs.cap.max_recv_wr, 512);

    let bufs = d.alloc.block(d.bus.ram(), 38);
    for i in 0..512u64 {
        let s = sge(bufs + i * 296, 296, dma_mr.lkey);
        d.post_recv(&qp, i, &[s]).unwrap();
    }
    assert_eq!(d.rq_indices(&qp).0, 512, "prod_tail after 512 posts");
    d.ring_cq(&cq, uar::CQ_ARM);

    // Nothing arrived: no completions, no notifications, no events.
    assert_eq!(d.drain_cq(&cq), []);
    assert!(d.take_irqs().iter().all(|&v| v == vector::COMMAND));
    assert_eq!(d.poll_cq_notifications().unwrap(), []);
    assert_eq!(d.poll_async().unwrap(), []);
    // Kernel objects: PD, MR, CQ, QP.
    assert_eq!(d.device().object_count(), 4);
}

#[test]
fn kernel_registration_helper_matches_the_sequence() {
    let mut d = Driver::probed();
    let mad = d.kernel_registration().unwrap();
    assert_eq!((mad.qp.qpn, mad.qp.handle), (1, 1));
    assert_eq!(d.query_qp(1, 0).unwrap().qp_state, qp_state::RTS);
    assert_eq!(mad.recv_bufs.len(), 512);
}

// ---------------------------------------------------------------------------------------
// Contexts, PDs, MRs, CQs
// ---------------------------------------------------------------------------------------

#[test]
fn user_contexts_own_uar_pages_from_one() {
    let mut d = Driver::probed();
    let pfn = d.session().dsr.config.uar_pfn;
    let a = ok(d.open_context(), &d);
    let b = ok(d.open_context(), &d);
    assert_eq!((a.uar, b.uar), (1, 2));
    assert_ne!(a.handle, b.handle);
    assert!(a.handle >= 1 && b.handle >= 1, "ctx 0 is the kernel's");
    // The highest page of BAR2.
    let top = ok(d.create_uc(pfn + 511), &d);
    assert_eq!(d.device().object_count(), 3);

    ok(d.close_context(a), &d);
    ok(d.destroy_uc(top), &d);
    assert_eq!(d.device().object_count(), 1);
    // Index 1 is free again and can be handed out again.
    let c = ok(d.open_context(), &d);
    assert_eq!(c.uar, 1);
    ok(d.close_context(c), &d);
    ok(d.close_context(b), &d);
    assert_eq!(d.device().object_count(), 0);
}

#[test]
fn pds_for_the_kernel_and_user_contexts() {
    let mut d = Driver::probed();
    let uc = ok(d.open_context(), &d);
    let kernel_pd = ok(d.create_pd(0), &d);
    let user_pd = ok(d.create_pd(uc.handle), &d);
    assert_ne!(kernel_pd, user_pd);
    for pd in [kernel_pd, user_pd] {
        assert!(
            pd < 1 << 24,
            "PD handles go into address vectors' low 24 bits"
        );
    }
    ok(d.destroy_pd(user_pd), &d);
    ok(d.destroy_pd(kernel_pd), &d);
    ok(d.close_context(uc), &d);
    assert_eq!(d.device().object_count(), 0);
}

#[test]
fn user_mr_over_a_page_directory() {
    let mut d = Driver::probed();
    let (_uc, pd, _cq) = user_setup(&mut d, 64);
    let before = d.device().object_count();

    // An unaligned buffer of 3 pages + 100 bytes starting 0x678 into its first page.
    let start = 0x7f00_1234_5678;
    let length = 3 * PAGE_SIZE + 100;
    let buffer = d.user_buffer(start, length);
    assert_eq!(buffer.nchunks(), 4);
    let request = Driver::<InProcessBus>::user_mr_request(
        pd,
        &buffer,
        access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
    );
    let mr = ok(d.create_mr(&request), &d);
    assert_eq!(mr.lkey, mr.rkey);
    assert_ne!(
        mr.lkey >> 8,
        mr.mr_handle,
        "the key does not give the handle away"
    );
    assert_eq!(d.device().object_count(), before + 1);

    // A recreated MR under the same handle answers to a different key.
    ok(d.destroy_mr(mr.mr_handle), &d);
    let again = ok(d.create_mr(&request), &d);
    assert_eq!(again.mr_handle, mr.mr_handle);
    assert_ne!(again.lkey, mr.lkey, "stale keys must not name the new MR");
    ok(d.destroy_mr(again.mr_handle), &d);

    // More than one page table (600 pages), an exact page, and one byte.
    for (start, length, pages) in [
        (0x10_0000_0000, 600 * PAGE_SIZE, 600),
        (0x4000, PAGE_SIZE, 1),
        (0x4fff, 1, 1),
        (0x4fff, 2, 2),
    ] {
        let mr = ok(d.reg_user_mr(pd, start, length, access::LOCAL_WRITE), &d);
        assert_eq!(mr.buffer.as_ref().unwrap().nchunks(), pages);
        ok(d.destroy_mr(mr.handle), &d);
    }
    // Optional IB access bits above the known ones are tolerated.
    let mr = ok(
        d.reg_user_mr(pd, 0x1000, 64, access::LOCAL_WRITE | 1 << 20),
        &d,
    );
    ok(d.destroy_mr(mr.handle), &d);
    assert_eq!(d.device().object_count(), before);
}

#[test]
fn dma_and_fast_register_mrs() {
    let mut d = Driver::probed();
    let pd = ok(d.create_pd(0), &d);
    let dma = ok(d.get_dma_mr(pd), &d);
    assert_ne!(dma.lkey >> 8, dma.handle);
    for max in [1, 32, MAX_FAST_REG_PAGES] {
        let frmr = ok(d.alloc_frmr(pd, max), &d);
        assert_eq!(frmr.lkey, frmr.rkey);
        assert_ne!(frmr.lkey >> 8, frmr.handle);
        assert_ne!(frmr.handle, dma.handle);
        ok(d.destroy_mr(frmr.handle), &d);
    }
    // A user PD may have fast-register MRs too (rdma-core never asks, ULPs do on kernel PDs).
    let uc = ok(d.open_context(), &d);
    let upd = ok(d.create_pd(uc.handle), &d);
    let frmr = ok(d.alloc_frmr(upd, 8), &d);
    ok(d.destroy_mr(frmr.handle), &d);
    ok(d.destroy_mr(dma.handle), &d);
    ok(d.destroy_pd(pd), &d);
    assert_eq!(d.device().object_count(), 2);
}

#[test]
fn kernel_and_user_cqs() {
    let mut d = Driver::probed();
    let uc = ok(d.open_context(), &d);
    let kernel = ok(d.create_cq_on(KERNEL_UC, 1024), &d);
    // ibv_create_cq(501) in ibv_rc_pingpong: 512 entries, 4 KiB + 512 * 64 bytes = 9 pages.
    let user = ok(d.create_cq_on(uc, 512), &d);
    assert_eq!(user.layout.nchunks, 9);
    let tiny = ok(d.create_cq_on(uc, 1), &d);
    let big = ok(d.create_cq_on(uc, d.caps().max_cqe), &d);
    let handles = [kernel.handle, user.handle, tiny.handle, big.handle];
    for h in handles {
        assert!(h < d.caps().max_cq, "cq_handle < max_cq");
    }
    for i in 0..handles.len() {
        assert!(!handles[i + 1..].contains(&handles[i]));
    }
    for cq in [&kernel, &user, &tiny, &big] {
        assert_eq!(d.cq_indices(cq), (0, 0), "the device leaves a new CQ empty");
        ok(d.destroy_cq(cq.handle), &d);
    }
    assert_eq!(d.device().object_count(), 1);
}

#[test]
fn resize_cq_is_refused_but_the_cq_survives() {
    let mut d = Driver::probed();
    let cq = ok(d.create_cq_on(KERNEL_UC, 64), &d);
    let err = d.resize_cq(cq.handle, 128).unwrap_err().err();
    assert_ne!(err, 0);
    assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    ok(d.destroy_cq(cq.handle), &d);
}

// ---------------------------------------------------------------------------------------
// QPs
// ---------------------------------------------------------------------------------------

#[test]
fn rc_and_ud_user_qps_on_a_context() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 512);
    let caps = d.caps();

    // ibv_rc_pingpong's QP: sbuf = 1 state page + 1 SQ page, rbuf = 4 pages.
    let layout = d.qp_layout(QpOwner::User, PINGPONG_SIZES);
    assert_eq!((layout.send_chunks, layout.total_chunks), (1, 6));
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES);
    let rc = ok(d.create_qp_on_layout(spec, layout), &d);
    assert!(
        rc.handle >= 2 && rc.handle < caps.max_qp,
        "handle {}",
        rc.handle
    );
    assert_ne!(rc.qpn, 0);
    assert_ne!(rc.qpn, 1, "QPN 1 is the GSI QP's");
    let v2: abi::CreateQpResponseV2 =
        zerocopy::FromBytes::read_from_prefix(&d.last.as_ref().unwrap().response)
            .unwrap()
            .0;
    assert_eq!(
        (
            v2.max_send_wr,
            v2.max_recv_wr,
            v2.max_send_sge,
            v2.max_recv_sge,
            v2.max_inline_data
        ),
        (1, 512, 1, 1, 0)
    );

    let ud_sizes = QpSizes {
        max_send_wr: 64,
        max_recv_wr: 128,
        max_send_sge: 4,
        max_recv_sge: 2,
        srq: false,
    };
    let cq2 = ok(d.create_cq_on(uc, 256), &d);
    let ud = user_qp(&mut d, qp_type::UD, uc, pd, cq.handle, cq2.handle, ud_sizes);
    assert_ne!(ud.handle, rc.handle);
    assert_ne!(ud.qpn, rc.qpn);
    assert!(ud.handle >= 2 && ud.handle < caps.max_qp);
    let attrs = ok(d.query_qp(ud.handle, 0), &d);
    assert_eq!(attrs.qp_state, qp_state::RESET);
    assert_eq!(
        (
            attrs.cap.max_send_wr,
            attrs.cap.max_recv_wr,
            attrs.cap.max_send_sge,
            attrs.cap.max_recv_sge
        ),
        (64, 128, 4, 2)
    );

    // A kernel RC QP and a kernel UD QP on a kernel PD too.
    let kpd = ok(d.create_pd(0), &d);
    let kcq = ok(d.create_cq_on(KERNEL_UC, 256), &d);
    for t in [qp_type::RC, qp_type::UD] {
        let spec = QpSpec {
            owner: QpOwner::Kernel,
            ..QpSpec::user(t, KERNEL_UC, kpd, kcq.handle, ud_sizes)
        };
        let qp = ok(d.create_qp_with(spec), &d);
        ok(d.destroy_qp(qp.handle), &d);
    }

    let count = d.device().object_count();
    ok(d.destroy_qp(rc.handle), &d);
    ok(d.destroy_qp(ud.handle), &d);
    assert_eq!(d.device().object_count(), count - 2);
    assert!(d.query_qp(rc.handle, 0).is_err(), "destroyed");
}

#[test]
fn qp_with_an_srq() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let srq = ok(d.create_srq_on(uc, pd, 64, 2), &d);
    let spec = QpSpec {
        srq: Some(srq.handle),
        ..QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES)
    };
    let qp = ok(d.create_qp_with(spec), &d);
    assert!(qp.layout.rq.is_none());
    assert_eq!(
        u32::from(qp.layout.total_chunks),
        1 + u32::from(qp.layout.send_chunks),
        "no RQ pages"
    );
    let attrs = ok(d.query_qp(qp.handle, 0), &d);
    assert_eq!((attrs.cap.max_recv_wr, attrs.cap.max_recv_sge), (0, 0));
    // A second QP shares the SRQ.
    let qp2 = ok(d.create_qp_with(spec), &d);
    ok(d.destroy_qp(qp.handle), &d);
    ok(d.destroy_qp(qp2.handle), &d);
    ok(d.destroy_srq(srq.handle), &d);
}

#[test]
fn rc_qp_goes_init_rtr_rts_with_pingpong_masks() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 512);
    let gid = ipv4_gid([10, 0, 0, 1]);
    ok(
        d.create_bind(0, link_local_gid(verbs::MAC), GID_TYPE_ROCE_V1),
        &d,
    );
    ok(d.create_bind(1, gid, GID_TYPE_ROCE_V1), &d);
    let qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );

    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::INIT);

    let peer_gid = ipv4_gid([10, 0, 0, 2]);
    let rtr = verbs::rc_rtr_attrs(0x42, 0x1234, peer_gid, 1);
    ok(d.modify_qp(qp.handle, RC_RTR_MASK, &rtr), &d);
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::RTR);

    ok(
        d.modify_qp(qp.handle, RC_RTS_MASK, &verbs::rc_rts_attrs(0x5678)),
        &d,
    );
    let attrs = ok(d.query_qp(qp.handle, u32::MAX), &d);
    assert_eq!(attrs.qp_state, qp_state::RTS);
    assert_eq!(attrs.path_mtu, 3);
    assert_eq!(attrs.dest_qp_num, 0x42);
    assert_eq!(attrs.rq_psn, 0x1234);
    assert_eq!(attrs.sq_psn, 0x5678);
    assert_eq!(attrs.max_dest_rd_atomic, 1);
    assert_eq!(attrs.min_rnr_timer, 12);
    assert_eq!(attrs.timeout, 14);
    assert_eq!(attrs.retry_cnt, 7);
    assert_eq!(attrs.rnr_retry, 7);
    assert_eq!(attrs.max_rd_atomic, 1);
    assert_eq!(attrs.port_num, 1);
    assert_eq!(attrs.pkey_index, 0);
    assert_eq!(attrs.ah_attr, rtr.ah_attr);
    assert_eq!(attrs.ah_attr.grh.sgid_index, 1);
    assert_eq!(attrs.ah_attr.grh.dgid, peer_gid);
    assert_eq!(attrs.cap.max_recv_wr, 512);

    // RTS -> RTS (e.g. changing the retry count) and RTS -> SQD -> RTS are legal.
    let rts = QpAttr {
        retry_cnt: 3,
        ..verbs::state_attrs(qp_state::RTS)
    };
    ok(
        d.modify_qp(qp.handle, mask::STATE | mask::RETRY_CNT, &rts),
        &d,
    );
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).retry_cnt, 3);
    ok(d.modify_qp_state(&qp, qp_state::SQD), &d);
    ok(d.modify_qp_state(&qp, qp_state::RTS), &d);
    ok(d.destroy_qp(qp.handle), &d);
}

#[test]
fn modify_qp_applies_only_masked_attributes() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );
    // The driver copies every field; only the masked ones count.
    let attrs = QpAttr {
        qkey: 0xdead,
        dest_qp_num: 77,
        sq_psn: 99,
        timeout: 5,
        qp_access_flags: access::REMOTE_WRITE,
        ..verbs::rc_init_attrs()
    };
    ok(d.modify_qp(qp.handle, RC_INIT_MASK, &attrs), &d);
    let got = ok(d.query_qp(qp.handle, 0), &d);
    assert_eq!(got.qp_state, qp_state::INIT);
    assert_eq!(
        got.qp_access_flags,
        access::REMOTE_WRITE,
        "ACCESS_FLAGS is in 0x39"
    );
    assert_eq!(
        (got.qkey, got.dest_qp_num, got.sq_psn, got.timeout),
        (0, 0, 0, 0),
        "unmasked attributes must not be applied"
    );
    // Without the STATE bit the state stays.
    let no_state = QpAttr {
        qkey: 5,
        ..verbs::state_attrs(qp_state::RTS)
    };
    ok(d.modify_qp(qp.handle, mask::QKEY, &no_state), &d);
    let got = ok(d.query_qp(qp.handle, 0), &d);
    assert_eq!((got.qp_state, got.qkey), (qp_state::INIT, 5));
}

#[test]
fn ud_qp_activation_and_reset() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = user_qp(
        &mut d,
        qp_type::UD,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );
    ok(d.ud_activate(&qp, 0x1111_1111), &d);
    let attrs = ok(d.query_qp(qp.handle, 0), &d);
    assert_eq!((attrs.qp_state, attrs.qkey), (qp_state::RTS, 0x1111_1111));
    ok(d.modify_qp_state(&qp, qp_state::RESET), &d);
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::RESET);
    // And up again from RESET.
    ok(d.ud_activate(&qp, 7), &d);
}

#[test]
fn gid_binds_and_unbinds() {
    let mut d = Driver::probed();
    let len = d.caps().gid_tbl_len;
    let gid = |i: u32| ipv4_gid([192, 168, (i >> 8) as u8, i as u8]);
    for i in 0..len {
        ok(d.create_bind(i, gid(i), GID_TYPE_ROCE_V1), &d);
    }
    for i in 0..len {
        ok(d.destroy_bind(i, gid(i)), &d);
    }
    // An index can be bound again, and a bound index can be rebound to a new GID.
    ok(d.create_bind(3, gid(3), GID_TYPE_ROCE_V1), &d);
    ok(d.create_bind(3, gid(300), GID_TYPE_ROCE_V1), &d);
    ok(d.destroy_bind(3, gid(300)), &d);
    // GIDs are no objects.
    assert_eq!(d.device().object_count(), 0);
}

#[test]
fn an_unbound_gid_no_longer_serves_as_source() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let gid = ipv4_gid([10, 1, 1, 1]);
    ok(d.create_bind(2, gid, GID_TYPE_ROCE_V1), &d);
    ok(d.destroy_bind(2, gid), &d);
    let qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );
    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    let rtr = verbs::rc_rtr_attrs(9, 0, ipv4_gid([10, 1, 1, 2]), 2);
    assert!(d.modify_qp(qp.handle, RC_RTR_MASK, &rtr).is_err());
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::INIT);
}

#[test]
fn srq_create_modify_query_destroy() {
    let mut d = Driver::probed();
    let (uc, pd, _cq) = user_setup(&mut d, 64);
    let srq = ok(d.create_srq_on(uc, pd, 256, 3), &d);
    assert!(srq.handle >= 1 && srq.handle < d.caps().max_srq);
    let attrs = ok(d.query_srq(srq.handle), &d);
    assert_eq!((attrs.max_wr, attrs.max_sge, attrs.srq_limit), (256, 3, 0));
    ok(d.modify_srq(srq.handle, SRQ_ATTR_LIMIT, 10), &d);
    assert_eq!(ok(d.query_srq(srq.handle), &d).srq_limit, 10);
    ok(d.modify_srq(srq.handle, SRQ_ATTR_LIMIT, 1), &d);
    assert_eq!(ok(d.query_srq(srq.handle), &d).srq_limit, 1);
    // Posting to the SRQ and ringing its doorbell is accepted.
    d.post_srq_recv(&srq, 1, &[sge(0x1000, 64, 0)]).unwrap();
    ok(d.destroy_srq(srq.handle), &d);
    assert!(d.query_srq(srq.handle).is_err());
}

// ---------------------------------------------------------------------------------------
// The command channel itself
// ---------------------------------------------------------------------------------------

#[test]
fn responses_ack_the_command_and_echo_the_cookie() {
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let resp_slot = d.session().dsr.resp_slot;
    // Poison the whole response page: the device writes at most 176 bytes.
    memory::fill(d.ram(), resp_slot, 0x77, PAGE_SIZE);
    let qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );
    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    ok(d.query_qp(qp.handle, 0), &d);
    let tail = memory::snapshot(
        d.ram(),
        resp_slot + RESPONSE_SLOT_BYTES as u64,
        (PAGE_SIZE as usize) - RESPONSE_SLOT_BYTES,
    );
    assert!(
        tail.iter().all(|&b| b == 0x77),
        "the device wrote past 176 bytes"
    );

    // Every command with a response: ack = cmd | 0x80000000, the cookie echoed.
    let srq = ok(d.create_srq_on(uc, pd, 16, 1), &d);
    let mr = ok(d.reg_user_mr(pd, 0x2000, 100, access::LOCAL_WRITE), &d);
    type Check = Box<dyn Fn(&mut D) -> CmdResult<()>>;
    let checks: Vec<(Command, Check)> = vec![
        (Command::QueryPort, Box::new(|d| d.query_port(1).map(drop))),
        (
            Command::QueryPkey,
            Box::new(|d| d.query_pkey(1, 0).map(drop)),
        ),
        (
            Command::CreatePd,
            Box::new(move |d| d.create_pd(uc.handle).map(drop)),
        ),
        (
            Command::QueryQp,
            Box::new(move |d| d.query_qp(qp.handle, 0).map(drop)),
        ),
        (
            Command::QuerySrq,
            Box::new(move |d| d.query_srq(srq.handle).map(drop)),
        ),
        (
            Command::DestroyMr,
            Box::new(move |d| d.destroy_mr(mr.handle)),
        ),
        (
            Command::ModifySrq,
            Box::new(move |d| d.modify_srq(srq.handle, SRQ_ATTR_LIMIT, 2)),
        ),
        (
            Command::CreateBind,
            Box::new(|d| d.create_bind(5, ipv4_gid([1, 2, 3, 4]), GID_TYPE_ROCE_V1)),
        ),
        (
            Command::DestroyBind,
            Box::new(|d| d.destroy_bind(5, ipv4_gid([1, 2, 3, 4]))),
        ),
    ];
    for (cmd, run) in checks {
        run(&mut d).unwrap_or_else(|e| panic!("{cmd:?}: {e:?}"));
        let record = d.last.as_ref().unwrap();
        let hdr = record.header();
        assert_eq!(hdr.ack, cmd as u32 | RESPONSE_ACK, "{cmd:?}");
        assert_eq!(hdr.response, record.cookie, "{cmd:?}");
        assert_ne!(record.cookie, 0);
        assert_eq!(hdr.err, 0, "{cmd:?}");
        assert_eq!(record.vectors, [vector::COMMAND], "{cmd:?}");
    }
}

#[test]
fn stale_bytes_after_a_request_are_ignored() {
    for fill in [0x00, 0xff, 0x5a] {
        let mut d = Driver::probed();
        d.stale_fill = fill;
        let (uc, pd, cq) = user_setup(&mut d, 64);
        let qp = user_qp(
            &mut d,
            qp_type::RC,
            uc,
            pd,
            cq.handle,
            cq.handle,
            PINGPONG_SIZES,
        );
        ok(
            d.create_bind(0, ipv4_gid([1, 1, 1, 1]), GID_TYPE_ROCE_V1),
            &d,
        );
        ok(d.rc_connect(&qp, 5, ipv4_gid([1, 1, 1, 2]), 0), &d);
        assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::RTS);
        assert_eq!(ok(d.query_port(1), &d).state, 4);
        ok(d.destroy_qp(qp.handle), &d);
    }
}

#[test]
fn failed_and_response_less_commands_raise_vector_zero_too() {
    let mut d = Driver::probed();
    // Failed: a PD of a context that does not exist.
    let err = d.create_pd(77).unwrap_err().err();
    assert_ne!(err, 0);
    let record = d.last.as_ref().unwrap();
    assert_eq!(record.vectors, [vector::COMMAND]);
    // The driver does not read it; if the device writes one, it must not claim success.
    if !record.response[..16].iter().all(|&b| b == RESPONSE_POISON) {
        assert_ne!(record.header().err, 0);
    }
    // Unknown command.
    let unknown = driver::commands::handle_request(Command::QueryPort, 0, 0);
    let mut bytes = zerocopy::IntoBytes::as_bytes(&unknown).to_vec();
    bytes[8..12].copy_from_slice(&21u32.to_le_bytes());
    assert!(d.execute_bytes(&bytes).is_err());
    assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    // No response read by the driver.
    let pd = ok(d.create_pd(0), &d);
    ok(d.destroy_pd(pd), &d);
}

#[test]
fn v1_create_qp_response_for_drivers_before_version_20() {
    let mut d = Driver::in_process();
    d.probe_with(DsrConfig {
        driver_version: 19,
        ..DsrConfig::default()
    });
    assert!(!d.qp_resp_v2());
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let sizes = QpSizes {
        max_send_wr: 32,
        max_recv_wr: 64,
        max_send_sge: 2,
        max_recv_sge: 1,
        srq: false,
    };
    let qp = user_qp(&mut d, qp_type::RC, uc, pd, cq.handle, cq.handle, sizes);
    let raw = d.last.as_ref().unwrap().response;
    let v1: abi::CreateQpResponseV1 = zerocopy::FromBytes::read_from_prefix(&raw).unwrap().0;
    assert_eq!(v1.qpn, qp.qpn);
    assert_eq!(
        (
            v1.max_send_wr,
            v1.max_recv_wr,
            v1.max_send_sge,
            v1.max_recv_sge,
            v1.max_inline_data
        ),
        (32, 64, 2, 1, 0),
        "v1 layout: max_send_wr at offset 20"
    );
    // With v1 the QPN is the handle: it must work as one.
    assert!(qp.qpn >= 2 && qp.qpn < d.caps().max_qp);
    assert_eq!(ok(d.query_qp(qp.qpn, 0), &d).qp_state, qp_state::RESET);
    ok(d.destroy_qp(qp.qpn), &d);

    // A v20 driver gets v2: the handle at offset 20.
    let mut d = Driver::probed();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = user_qp(&mut d, qp_type::RC, uc, pd, cq.handle, cq.handle, sizes);
    let raw = d.last.as_ref().unwrap().response;
    assert_eq!(
        u32::from_le_bytes(raw[20..24].try_into().unwrap()),
        qp.handle
    );
    assert_eq!(u32::from_le_bytes(raw[24..28].try_into().unwrap()), 32);
}

#[test]
fn drivers_before_version_19_use_32_bit_page_numbers() {
    let mut d = Driver::in_process();
    let config = DsrConfig {
        driver_version: 18,
        ..DsrConfig::default()
    };
    let version = d.read_version();
    let image = d.build_dsr(config, version);
    // An old header has `uar_pfn` (u32) + `pad2`; garbage in pad2 must not matter.
    d.edit_dsr(&image, |dsr| dsr.uar_pfn64 |= 0xdead << 32);
    d.write_dsr_address(image.addr);
    assert_eq!(d.read_reg(regs::ERR), 0);
    assert_eq!(d.activate(), 0);
    let mut create_uc = abi::CreateUcRequest {
        hdr: driver::commands::header(Command::CreateUc),
        pfn64: (0xbeef << 32) | (config.uar_pfn + 1),
    };
    d.command::<_, abi::HandleResponse>(&create_uc)
        .expect("the upper half of pfn64 is not part of an old driver's pfn");

    // A version-20 driver's upper halves count.
    let mut d = Driver::probed();
    create_uc.pfn64 = (0xbeef << 32) | (bringup::DEFAULT_UAR_PFN + 1);
    assert!(d.command::<_, abi::HandleResponse>(&create_uc).is_err());
}

// ---------------------------------------------------------------------------------------
// Flushes, CQ notifications, async events
// ---------------------------------------------------------------------------------------

/// A connected RC QP with separate send and receive CQs of `cqe` entries.
struct FlushRig {
    d: D,
    send_cq: Cq,
    recv_cq: Cq,
    qp: Qp,
}

fn flush_rig(cqe: u32, sizes: QpSizes) -> FlushRig {
    let mut d = Driver::probed();
    let (uc, pd, send_cq) = user_setup(&mut d, cqe);
    let recv_cq = ok(d.create_cq_on(uc, cqe), &d);
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        send_cq.handle,
        recv_cq.handle,
        sizes,
    );
    ok(d.rc_connect(&qp, 3, ipv4_gid([10, 0, 0, 2]), 0), &d);
    d.take_irqs();
    FlushRig {
        d,
        send_cq,
        recv_cq,
        qp,
    }
}

const FLUSH_SIZES: QpSizes = QpSizes {
    max_send_wr: 8,
    max_recv_wr: 8,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

#[test]
fn modify_to_error_flushes_every_posted_wqe() {
    let FlushRig {
        mut d,
        send_cq,
        recv_cq,
        qp,
    } = flush_rig(16, FLUSH_SIZES);
    for i in 0..3u64 {
        d.post_send_raw(
            &qp,
            &driver::queues::send_wqe(100 + i, wr_opcode::SEND, send_flags::SIGNALED, &[]),
        )
        .unwrap();
    }
    for i in 0..4u64 {
        d.post_recv_raw(&qp, 200 + i, &[sge(0x1000, 8, 0)]).unwrap();
    }
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);

    let sends = d.drain_cq(&send_cq);
    let recvs = d.drain_cq(&recv_cq);
    assert_eq!(sends.len(), 3, "{sends:?}");
    assert_eq!(recvs.len(), 4, "{recvs:?}");
    for (i, cqe) in sends.iter().enumerate() {
        assert_eq!(cqe.wr_id, 100 + i as u64);
        assert_eq!(cqe.status, wc_status::WR_FLUSH_ERR);
        assert_eq!(cqe.qp, u64::from(qp.handle));
        assert_eq!(cqe.opcode, wc_opcode::SEND);
    }
    for (i, cqe) in recvs.iter().enumerate() {
        assert_eq!(cqe.wr_id, 200 + i as u64);
        assert_eq!(cqe.status, wc_status::WR_FLUSH_ERR);
        assert_eq!(cqe.qp, u64::from(qp.handle));
        assert_eq!(cqe.opcode, wc_opcode::RECV);
    }
    // Both queues were consumed.
    assert_eq!(d.sq_indices(&qp), (3, 3));
    assert_eq!(d.rq_indices(&qp), (4, 4));
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::ERR);
    // Nothing was armed: no notification.
    assert!(d.take_irqs().iter().all(|&v| v == vector::COMMAND));
    assert_eq!(d.poll_cq_notifications().unwrap(), []);
    assert_eq!(d.poll_async().unwrap(), []);
}

#[test]
fn flush_also_completes_unsignaled_sends_and_wraps_the_rings() {
    let FlushRig {
        mut d,
        send_cq,
        recv_cq,
        qp,
    } = flush_rig(16, FLUSH_SIZES);
    // Fill and flush several times so the indices run past their wrap bit.
    let mut next = 0u64;
    for round in 0..5 {
        for _ in 0..8 {
            d.post_send_raw(
                &qp,
                &driver::queues::send_wqe(next, wr_opcode::SEND, 0, &[]),
            )
            .unwrap();
            d.post_recv_raw(&qp, next, &[]).unwrap();
            next += 1;
        }
        assert_eq!(
            d.post_recv_raw(&qp, 999, &[]),
            Err(driver::queues::PostError::Full)
        );
        if round == 0 {
            ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
        } else {
            d.ring_qp(&qp, uar::QP_SEND | uar::QP_RECV);
        }
        let sends = d.drain_cq(&send_cq);
        let recvs = d.drain_cq(&recv_cq);
        let expect: Vec<u64> = (next - 8..next).collect();
        assert_eq!(sends.iter().map(|c| c.wr_id).collect::<Vec<_>>(), expect);
        assert_eq!(recvs.iter().map(|c| c.wr_id).collect::<Vec<_>>(), expect);
    }
}

#[test]
fn doorbell_on_a_qp_in_error_flushes_new_work() {
    let FlushRig {
        mut d, recv_cq, qp, ..
    } = flush_rig(16, FLUSH_SIZES);
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    assert_eq!(d.drain_cq(&recv_cq), []);
    d.post_recv(&qp, 7, &[sge(0x1000, 8, 0)]).unwrap();
    let cqes = d.drain_cq(&recv_cq);
    assert_eq!(cqes.len(), 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status, cqes[0].opcode),
        (7, wc_status::WR_FLUSH_ERR, wc_opcode::RECV)
    );
}

#[test]
fn armed_cq_gets_one_notification_per_arm() {
    let FlushRig {
        mut d,
        send_cq,
        recv_cq,
        qp,
    } = flush_rig(16, FLUSH_SIZES);
    d.ring_cq(&recv_cq, uar::CQ_ARM);
    for i in 0..4 {
        d.post_recv_raw(&qp, i, &[]).unwrap();
    }
    d.post_send_raw(&qp, &driver::queues::send_wqe(50, wr_opcode::SEND, 0, &[]))
        .unwrap();
    ok_with_vectors(d.modify_qp_state(&qp, qp_state::ERR), &d, &[0, 2]);
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: recv_cq.handle
        }],
        "one CQNE for the armed CQ, none for the unarmed send CQ"
    );
    assert_eq!(d.drain_cq(&recv_cq).len(), 4);
    assert_eq!(d.drain_cq(&send_cq).len(), 1);

    // Disarmed now: more completions, no notification.
    d.take_irqs();
    d.post_recv(&qp, 10, &[]).unwrap();
    assert_eq!(d.drain_cq(&recv_cq).len(), 1);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    assert_eq!(d.poll_cq_notifications().unwrap(), []);

    // Re-armed (as the driver does after every poll pass): one more.
    d.ring_cq(&recv_cq, uar::CQ_ARM);
    d.ring_cq(&send_cq, uar::CQ_ARM);
    d.post_recv(&qp, 11, &[]).unwrap();
    d.post_recv(&qp, 12, &[]).unwrap();
    assert_eq!(d.take_irqs(), [vector::CQ_NOTIFY]);
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: recv_cq.handle
        }]
    );
    assert_eq!(d.drain_cq(&recv_cq).len(), 2);
    // POLL is accepted and changes nothing.
    d.ring_cq(&recv_cq, uar::CQ_POLL);
    assert_eq!(d.drain_cq(&recv_cq), []);
}

fn ok_with_vectors<T: std::fmt::Debug>(result: CmdResult<T>, d: &D, vectors: &[u16]) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    assert_eq!(d.last.as_ref().unwrap().vectors, vectors);
    value
}

#[test]
fn arm_sol_notifies_for_error_completions() {
    let FlushRig {
        mut d, recv_cq, qp, ..
    } = flush_rig(16, FLUSH_SIZES);
    d.ring_cq(&recv_cq, uar::CQ_ARM_SOL);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    d.post_recv_raw(&qp, 2, &[]).unwrap();
    ok_with_vectors(d.modify_qp_state(&qp, qp_state::ERR), &d, &[0, 2]);
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: recv_cq.handle
        }]
    );
    assert_eq!(d.drain_cq(&recv_cq).len(), 2);
}

#[test]
fn cq_overflow_reports_cq_err_once() {
    let FlushRig {
        mut d, recv_cq, qp, ..
    } = flush_rig(4, FLUSH_SIZES);
    for i in 0..8 {
        d.post_recv_raw(&qp, i, &[]).unwrap();
    }
    ok_with_vectors(d.modify_qp_state(&qp, qp_state::ERR), &d, &[0, 1]);
    let events = d.poll_async().unwrap();
    assert_eq!(
        events,
        [abi::Eqe {
            event_type: event::CQ_ERR,
            info: recv_cq.handle
        }]
    );
    // The CQ holds the first four, not overwritten by the rest.
    let cqes = d.drain_cq(&recv_cq);
    assert_eq!(
        cqes.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    // The receive queue was consumed in full (its WQEs were flushed, if lost).
    assert_eq!(d.rq_indices(&qp), (8, 8));
    // A broken CQ reports once.
    d.take_irqs();
    d.post_recv(&qp, 20, &[]).unwrap();
    assert_eq!(d.poll_async().unwrap(), []);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
}

#[test]
fn reset_restarts_both_rings_and_forgets_posted_work() {
    let FlushRig {
        mut d,
        send_cq,
        recv_cq,
        qp,
    } = flush_rig(16, FLUSH_SIZES);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    assert_eq!(d.drain_cq(&recv_cq).len(), 1);
    d.post_recv_raw(&qp, 2, &[]).unwrap();
    d.post_send_raw(&qp, &driver::queues::send_wqe(3, wr_opcode::SEND, 0, &[]))
        .unwrap();
    ok(d.modify_qp_state(&qp, qp_state::RESET), &d);
    // The device restarted its consumer indices at 0; the driver clears the producers.
    assert_eq!(d.rq_indices(&qp).1, 0);
    assert_eq!(d.sq_indices(&qp).1, 0);
    d.set_rq_prod(&qp, 0);
    d.set_sq_prod(&qp, 0);
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::RESET);
    // The work posted before the reset is gone: a new error flushes only new work.
    d.post_recv_raw(&qp, 4, &[]).unwrap();
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    let recvs = d.drain_cq(&recv_cq);
    assert_eq!(recvs.iter().map(|c| c.wr_id).collect::<Vec<_>>(), [4]);
    assert_eq!(d.drain_cq(&send_cq), []);
}

// ---------------------------------------------------------------------------------------
// Interrupt mask, reset, re-probe
// ---------------------------------------------------------------------------------------

#[test]
fn imr_masks_vectors_and_icr_latches_causes() {
    let FlushRig {
        mut d, recv_cq, qp, ..
    } = flush_rig(16, FLUSH_SIZES);
    d.read_reg(regs::ICR);
    d.write_reg(regs::IMR, u32::MAX);
    ok_with_vectors(d.query_port(1), &d, &[]);
    assert_eq!(d.read_reg(regs::ICR) & 1, 1, "response cause latched");
    assert_eq!(d.read_reg(regs::ICR), 0, "read-to-clear");

    // Mask only vector 0: CQ notifications still arrive.
    d.write_reg(regs::IMR, 1);
    assert_eq!(d.read_reg(regs::IMR), 1);
    d.ring_cq(&recv_cq, uar::CQ_ARM);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    ok_with_vectors(
        d.modify_qp_state(&qp, qp_state::ERR),
        &d,
        &[vector::CQ_NOTIFY],
    );
    assert_eq!(d.read_reg(regs::ICR), 0b101);

    d.write_reg(regs::IMR, 0);
    ok_with_vectors(d.query_port(1), &d, &[vector::COMMAND]);
}

#[test]
fn remove_and_probe_again() {
    let mut d = Driver::probed();
    let mad = d.kernel_registration().unwrap();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let _qp = user_qp(
        &mut d,
        qp_type::RC,
        uc,
        pd,
        cq.handle,
        cq.handle,
        PINGPONG_SIZES,
    );
    assert!(d.device().object_count() >= 8);
    let cq_state = memory::snapshot(d.ram(), mad.cq.layout.ring.buf.pages[0], 16);
    d.take_irqs();
    d.remove();
    assert_eq!(d.device().object_count(), 0);
    assert!(!d.device().is_active());
    // Old doorbells touch nothing.
    d.ring_cq(&mad.cq, uar::CQ_ARM);
    d.ring_qp(&mad.qp, uar::QP_RECV | uar::QP_SEND);
    assert_eq!(
        memory::snapshot(d.ram(), mad.cq.layout.ring.buf.pages[0], 16),
        cq_state
    );
    assert_eq!(d.take_irqs(), [] as [u16; 0]);

    d.probe();
    let mad = d.kernel_registration().unwrap();
    assert_eq!(mad.qp.handle, 1, "GSI is QP1 again after a reset");
}

#[test]
fn a_second_dsr_load_replaces_the_first() {
    let mut d = Driver::probed();
    d.kernel_registration().unwrap();
    assert!(d.device().object_count() > 0);
    d.probe();
    assert_eq!(
        d.device().object_count(),
        0,
        "a new DSR starts from scratch"
    );
    d.kernel_registration().unwrap();
}

#[test]
fn responses_fill_the_whole_176_byte_slot() {
    let mut d = Driver::probed();
    // QUERY_PORT answers 64 bytes; the driver copies all 176 of the union.
    ok(d.query_port(1), &d);
    let record = d.last.as_ref().unwrap();
    let tail = &record.response[size_of::<abi::QueryPortResponse>()..];
    assert!(
        tail.iter().all(|&b| b == 0),
        "bytes 64..176 of the response slot hold {:#04x} (stale), not 0",
        tail[0]
    );
}

/// Hardening: memory keys are unpredictable. They do not encode the MR's handle, every live
/// MR has its own upper 24 bits, and a device with another seed hands out other keys.
#[test]
fn memory_keys_are_neither_handles_nor_repeated() {
    use std::collections::HashSet;
    let mut d = Driver::probed();
    let pd = ok(d.create_pd(0), &d);
    let mut uppers = HashSet::new();
    let mut keys = Vec::new();
    for max in 1..=64 {
        let frmr = ok(d.alloc_frmr(pd, max), &d);
        assert_ne!(frmr.rkey >> 8, frmr.handle, "MR {}", frmr.handle);
        assert!(
            uppers.insert(frmr.rkey >> 8),
            "two MRs share key bits {:#x}",
            frmr.rkey
        );
        keys.push(frmr.rkey);
    }
    // Consecutive keys are not a sequence either.
    let steps: HashSet<u32> = keys.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert!(
        steps.len() > 32,
        "keys step by a few fixed amounts: {steps:?}"
    );
}
