//! The device driven through the real `vfio-user-pvrdma` process over its UNIX socket, the
//! way QEMU's vfio-user-pci and the guest drivers on top of it drive it: probe, the kernel's
//! registration, a user context's objects, flushes and CQ notifications delivered through
//! the MSI-X eventfds, command failures, client disconnects and several functions in one
//! process. The guest is the host-side test driver on a [`SocketBus`]; everything is
//! observed through BAR accesses, guest memory and eventfds, never inside the device.

mod driver;

use std::time::Duration;

use driver::bringup::caps_supported;
use driver::bus::Bus;
use driver::commands::{CmdError, CmdResult, handle_request};
use driver::memory;
use driver::queues::{KERNEL_UC, send_wqe};
use driver::socket_bus::{COMMAND_ENABLE, Setup, SocketBus, SocketServer, default_memory};
use driver::verbs::{
    self, GSI_SIZES, PINGPONG_SIZES, QP1_QKEY, QpSpec, RC_INIT_MASK, RC_RTR_MASK, RC_RTS_MASK,
    ipv4_gid, link_local_gid,
};
use driver::{Cq, Driver, Qp, Uc};
use nix::errno::Errno;
use nix::sys::signal::kill;
use vfio_user_pvrdma::abi::{
    self, Command, GID_TYPE_ROCE_V1, PAGE_SIZE, access, qp_state, qp_type, regs, send_flags, uar,
    vector, wc_opcode, wc_status, wr_opcode,
};
use vfio_user_pvrdma::pci::{ids, regs as pci_regs};

type D = Driver<SocketBus>;

/// A small RC QP.
const FLUSH_SIZES: driver::QpSizes = driver::QpSizes {
    max_send_wr: 8,
    max_recv_wr: 8,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

/// How long a test waits for an interrupt that should already be there.
const IRQ_WAIT: Duration = Duration::from_secs(5);

/// Unwraps a command result and checks that the command raised exactly vector 0 (read
/// back from the vector-0 eventfd).
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

/// Unwraps a command result and checks the vectors it raised.
fn ok_with_vectors<T: std::fmt::Debug>(result: CmdResult<T>, d: &D, vectors: &[u16]) -> T {
    let value = result.unwrap_or_else(|e| panic!("command failed: {e:?}"));
    assert_eq!(d.last.as_ref().unwrap().vectors, vectors);
    value
}

/// A failure reported through ERR (non-zero), with vector 0 raised anyway. Returns ERR.
fn fails<T: std::fmt::Debug>(result: CmdResult<T>, d: &D, what: &str) -> u32 {
    let err = match result {
        Err(CmdError::Device(err)) => err,
        other => panic!("{what}: expected an ERR failure, got {other:?}"),
    };
    assert_ne!(err, 0, "{what}");
    assert_eq!(
        d.last.as_ref().unwrap().vectors,
        [vector::COMMAND],
        "{what}: vector 0 after a failure"
    );
    err
}

/// The device still executes commands, and the socket is still in step.
fn healthy(d: &mut D) {
    assert_eq!(ok(d.query_port(1), d).state, 4, "port ACTIVE");
    let pd = ok(d.create_pd(0), d);
    ok(d.destroy_pd(pd), d);
    fails(d.destroy_pd(pd), d, "DESTROY_PD of the PD just destroyed");
    assert_eq!(d.bus.config_read16(0), ids::VENDOR_ID);
}

fn sge(addr: u64, length: u32, lkey: u32) -> abi::Sge {
    abi::Sge { addr, length, lkey }
}

/// A user context with a PD and one CQ of `cqe` entries.
fn user_setup(d: &mut D, cqe: u32) -> (Uc, u32, Cq) {
    let uc = ok(d.open_context(), d);
    let pd = ok(d.create_pd(uc.handle), d);
    let cq = ok(d.create_cq_on(uc, cqe), d);
    (uc, pd, cq)
}

fn rc_qp(d: &mut D, uc: Uc, pd: u32, send_cq: u32, recv_cq: u32, sizes: driver::QpSizes) -> Qp {
    let spec = QpSpec {
        send_cq,
        recv_cq,
        ..QpSpec::user(qp_type::RC, uc, pd, send_cq, sizes)
    };
    ok(d.create_qp_with(spec), d)
}

// ---------------------------------------------------------------------------------------
// (1) Probe
// ---------------------------------------------------------------------------------------

#[test]
fn probe_sequence_and_caps_over_the_socket() {
    let mut d = Driver::over_socket();

    // What the bus set up, as QEMU and the guest's PCI core do.
    assert_eq!(d.bus.config_read16(0), ids::VENDOR_ID);
    assert_eq!(d.bus.config_read16(2), ids::DEVICE_ID);
    let command = d.bus.config_read16(pci_regs::COMMAND as u64);
    assert_eq!(command & COMMAND_ENABLE, COMMAND_ENABLE, "{command:#06x}");
    let msix = d
        .bus
        .client()
        .get_irq_info(vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX)
        .expect("MSI-X info");
    assert_eq!(msix.count, u32::from(ids::MSIX_VECTORS));

    assert_ne!(d.read_reg(regs::ERR), 0, "nothing succeeded before the DSR");
    let version = d.read_version();
    assert_eq!(version, 20);

    let image = d.build_dsr(driver::DsrConfig::default(), version);
    let written = memory::snapshot(d.ram(), image.addr, abi::DSR_CAPS_OFFSET as usize);
    assert_ne!(image.addr >> 32, 0, "the DSR lies above 4 GiB");
    // DSRLOW alone does nothing; DSRHIGH is the trigger.
    d.write_reg(regs::DSR_LOW, image.addr as u32);
    assert_eq!(d.read_caps(&image).gid_types, 0, "caps before DSRHIGH");
    d.write_reg(regs::DSR_HIGH, (image.addr >> 32) as u32);
    assert_eq!(d.read_reg(regs::ERR), 0);
    assert_eq!(d.take_irqs(), [] as [u16; 0], "a DSR load raises nothing");

    // The caps the server process wrote into our memfd.
    let caps = d.read_caps(&image);
    assert!(caps_supported(&caps, version), "{caps:?}");
    assert_eq!(caps.mode, abi::MODE_ROCE);
    assert!(caps.max_uar.is_power_of_two(), "max_uar {}", caps.max_uar);
    assert!(u64::from(caps.max_uar) * PAGE_SIZE <= ids::UAR_BAR_SIZE);
    assert_eq!(caps.phys_port_cnt, 1);
    assert!(caps.max_qp > 0 && caps.max_qp <= 65535);
    assert!(caps.max_cq > 0 && caps.max_pd > 0);
    assert!(caps.max_cqe >= 1024 && caps.max_qp_wr >= 512 && caps.max_sge >= 2);
    assert!(caps.gid_tbl_len > 0);
    assert_eq!(caps.max_pkeys, 1);
    assert_eq!(caps.page_size_cap, PAGE_SIZE);
    assert_eq!(caps.vendor_id, u32::from(ids::VENDOR_ID));
    assert_eq!(
        memory::snapshot(d.ram(), image.addr, abi::DSR_CAPS_OFFSET as usize),
        written,
        "the device wrote caps and nothing else"
    );

    assert_eq!(d.activate(), 0);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    assert_eq!(d.unquiesce(), 0);

    // The same through the driver's own probe, on a fresh server: a usable session.
    let mut d = Driver::over_socket();
    let session = d.probe().clone();
    assert_eq!(session.version, 20);
    assert_eq!(session.caps.max_uar, caps.max_uar);
    assert_eq!(d.poll_async().unwrap(), []);
    assert_eq!(d.poll_cq_notifications().unwrap(), []);
    healthy(&mut d);
}

#[test]
fn no_dma_before_bus_mastering_is_enabled() {
    let server = SocketServer::start(1);
    let setup = Setup {
        bus_master: false,
        ..Setup::default()
    };
    let bus = SocketBus::connect_with(&server, 0, default_memory(), setup);
    let mut d = Driver::new(bus);
    let command = d.bus.config_read16(pci_regs::COMMAND as u64);
    assert_eq!(command & pci_regs::COMMAND_BUS_MASTER, 0);

    let version = d.read_version();
    let image = d.build_dsr(driver::DsrConfig::default(), version);
    let before = memory::snapshot(d.ram(), image.addr, PAGE_SIZE as usize);
    d.write_dsr_address(image.addr);
    assert_ne!(d.read_reg(regs::ERR), 0, "the DSR cannot be read yet");
    assert_eq!(
        memory::snapshot(d.ram(), image.addr, PAGE_SIZE as usize),
        before,
        "the device wrote guest memory with bus mastering off"
    );
    assert!(!caps_supported(&d.read_caps(&image), version));

    // pci_set_master, then the same probe succeeds.
    d.bus.enable_bus_master();
    d.probe();
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// (2) The kernel's registration
// ---------------------------------------------------------------------------------------

#[test]
fn kernel_registration_over_the_socket() {
    let mut d = Driver::probed_over_socket();
    let mad = d.kernel_registration().unwrap();
    assert_eq!(d.last.as_ref().unwrap().vectors, [vector::COMMAND]);
    assert_eq!((mad.qp.qpn, mad.qp.handle), (1, 1), "the GSI QP is QP1");
    assert_eq!(mad.dma_mr.lkey, mad.dma_mr.rkey);
    let attrs = ok(d.query_qp(mad.qp.handle, 0), &d);
    assert_eq!(attrs.qp_state, qp_state::RTS);
    assert_eq!(attrs.qkey, QP1_QKEY);
    assert_eq!(attrs.cap.max_send_wr, GSI_SIZES.max_send_wr);
    assert_eq!(attrs.cap.max_recv_wr, 512);
    assert_eq!(mad.recv_bufs.len(), 512);
    assert_eq!(d.rq_indices(&mad.qp), (512, 0), "512 receives posted");
    // Nothing arrived.
    assert_eq!(d.drain_cq(&mad.cq), []);
    assert!(d.take_irqs().iter().all(|&v| v == vector::COMMAND));
    assert_eq!(d.poll_cq_notifications().unwrap(), []);
    assert_eq!(d.poll_async().unwrap(), []);

    // The arm is real: flushing QP1 completes the 512 receives and notifies the MAD CQ
    // once, on the vector-2 eventfd.
    d.take_irqs();
    ok_with_vectors(
        d.modify_qp_state(&mad.qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::CQ_NOTIFY],
    );
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: mad.cq.handle
        }]
    );
    let cqes = d.drain_cq(&mad.cq);
    assert_eq!(cqes.len(), 512);
    for (i, cqe) in cqes.iter().enumerate() {
        assert_eq!(cqe.wr_id, i as u64);
        assert_eq!(cqe.status, wc_status::WR_FLUSH_ERR);
        assert_eq!(cqe.opcode, wc_opcode::RECV);
        assert_eq!(cqe.qp, u64::from(mad.qp.handle));
    }
    assert_eq!(d.rq_indices(&mad.qp), (512, 512));
}

// ---------------------------------------------------------------------------------------
// (3) A user context's objects
// ---------------------------------------------------------------------------------------

#[test]
fn user_context_objects_over_the_socket() {
    let mut d = Driver::probed_over_socket();
    ok(
        d.create_bind(0, link_local_gid(verbs::MAC), GID_TYPE_ROCE_V1),
        &d,
    );
    let gid = ipv4_gid([10, 0, 0, 1]);
    ok(d.create_bind(1, gid, GID_TYPE_ROCE_V1), &d);

    let uc = ok(d.open_context(), &d);
    assert_eq!(uc.uar, 1, "the first user context gets UAR page 1");
    assert_ne!(uc.handle, 0);
    let pd = ok(d.create_pd(uc.handle), &d);
    let mr = ok(
        d.reg_user_mr(
            pd,
            0x7f00_1234_5678,
            3 * PAGE_SIZE + 100,
            access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
        ),
        &d,
    );
    assert_eq!(mr.buffer.as_ref().unwrap().nchunks(), 4);
    assert_eq!(mr.lkey, mr.rkey);
    assert_eq!(mr.lkey, mr.rkey);
    let cq = ok(d.create_cq_on(uc, 512), &d);
    assert_eq!(d.cq_indices(&cq), (0, 0));
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, PINGPONG_SIZES);
    assert!(qp.qpn > 1, "QP0 and QP1 are reserved");

    ok(
        d.modify_qp(qp.handle, RC_INIT_MASK, &verbs::rc_init_attrs()),
        &d,
    );
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::INIT);
    let peer = ipv4_gid([10, 0, 0, 2]);
    let rtr = verbs::rc_rtr_attrs(0x42, 0x1234, peer, 1);
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
    assert_eq!(
        (attrs.timeout, attrs.retry_cnt, attrs.rnr_retry),
        (14, 7, 7)
    );
    assert_eq!(attrs.ah_attr, rtr.ah_attr);
    assert_eq!(attrs.ah_attr.grh.dgid, peer);
    assert_eq!(attrs.cap.max_recv_wr, 512);

    // Destroy everything, children first, as ibv_rc_pingpong's teardown does.
    ok(d.destroy_qp(qp.handle), &d);
    ok(d.destroy_mr(mr.handle), &d);
    ok(d.destroy_cq(cq.handle), &d);
    ok(d.destroy_pd(pd), &d);
    ok(d.close_context(uc), &d);
    ok(d.destroy_bind(1, gid), &d);
    ok(d.destroy_bind(0, link_local_gid(verbs::MAC)), &d);
    // All gone.
    fails(d.query_qp(qp.handle, 0), &d, "QUERY_QP after destroy");
    fails(d.destroy_qp(qp.handle), &d, "DESTROY_QP twice");
    fails(d.destroy_mr(mr.handle), &d, "DESTROY_MR twice");
    fails(d.destroy_cq(cq.handle), &d, "DESTROY_CQ twice");
    fails(d.destroy_pd(pd), &d, "DESTROY_PD twice");
    fails(d.destroy_uc(uc.handle), &d, "DESTROY_UC twice");
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// (4) Flushes and CQ notifications through the eventfds
// ---------------------------------------------------------------------------------------

#[test]
fn modify_to_error_flushes_and_notifies_on_the_vector_2_eventfd() {
    let mut d = Driver::probed_over_socket();
    let (uc, pd, send_cq) = user_setup(&mut d, 16);
    let recv_cq = ok(d.create_cq_on(uc, 16), &d);
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = rc_qp(&mut d, uc, pd, send_cq.handle, recv_cq.handle, FLUSH_SIZES);
    ok(d.rc_connect(&qp, 3, ipv4_gid([10, 0, 0, 2]), 0), &d);
    // The commands' vector-0 interrupts so far.
    assert!(d.take_irqs().iter().all(|&v| v == vector::COMMAND));

    d.ring_cq(&recv_cq, uar::CQ_ARM);
    for i in 0..3u64 {
        let wqe = send_wqe(100 + i, wr_opcode::SEND, send_flags::SIGNALED, &[]);
        d.post_send_raw(&qp, &wqe).unwrap();
    }
    for i in 0..4u64 {
        d.post_recv_raw(&qp, 200 + i, &[sge(0x1000, 8, 0)]).unwrap();
    }
    assert_eq!(
        d.take_irqs(),
        [] as [u16; 0],
        "posting alone raises nothing"
    );

    ok_with_vectors(
        d.modify_qp_state(&qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::CQ_NOTIFY],
    );
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: recv_cq.handle
        }],
        "one CQNE for the armed CQ, none for the unarmed send CQ"
    );
    let sends = d.drain_cq(&send_cq);
    let recvs = d.drain_cq(&recv_cq);
    assert_eq!(
        sends.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [100, 101, 102]
    );
    assert_eq!(
        recvs.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [200, 201, 202, 203]
    );
    for cqe in &sends {
        assert_eq!(cqe.status, wc_status::WR_FLUSH_ERR);
        assert_eq!(cqe.opcode, wc_opcode::SEND);
        assert_eq!(cqe.qp, u64::from(qp.handle));
    }
    for cqe in &recvs {
        assert_eq!(cqe.status, wc_status::WR_FLUSH_ERR);
        assert_eq!(cqe.opcode, wc_opcode::RECV);
        assert_eq!(cqe.qp, u64::from(qp.handle));
    }
    assert_eq!(d.sq_indices(&qp), (3, 3));
    assert_eq!(d.rq_indices(&qp), (4, 4));
    assert_eq!(ok(d.query_qp(qp.handle, 0), &d).qp_state, qp_state::ERR);

    // Disarmed by the notification: a doorbell-driven flush completes silently.
    assert_eq!(
        d.take_irqs(),
        [vector::COMMAND, vector::CQ_NOTIFY, vector::COMMAND],
        "MODIFY_QP, QUERY_QP"
    );
    d.post_recv(&qp, 7, &[]).unwrap();
    assert_eq!(d.bus.wait_for_vector(vector::CQ_NOTIFY, Duration::ZERO), 0);
    assert_eq!(d.drain_cq(&recv_cq).len(), 1);

    // Re-armed: a doorbell (no command, no vector 0) fires the vector-2 eventfd.
    d.ring_cq(&recv_cq, uar::CQ_ARM);
    d.post_recv(&qp, 8, &[]).unwrap();
    assert_eq!(
        d.bus.wait_for_vector(vector::CQ_NOTIFY, IRQ_WAIT),
        1,
        "CQ notification on the vector-2 eventfd"
    );
    assert_eq!(
        d.take_irqs(),
        [] as [u16; 0],
        "a doorbell raises nothing else"
    );
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: recv_cq.handle
        }]
    );
    let cqes = d.drain_cq(&recv_cq);
    assert_eq!(cqes.len(), 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (8, wc_status::WR_FLUSH_ERR)
    );
}

// ---------------------------------------------------------------------------------------
// (5) Failures come back as ERR, and the device keeps working
// ---------------------------------------------------------------------------------------

#[test]
fn failures_come_back_as_err_over_the_socket() {
    let mut d = Driver::probed_over_socket();
    let (uc, pd, cq) = user_setup(&mut d, 64);

    // Unknown command numbers.
    for cmd in [21u32, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
        let mut bytes =
            zerocopy::IntoBytes::as_bytes(&handle_request(Command::CreatePd, 0, 0)).to_vec();
        bytes[8..12].copy_from_slice(&cmd.to_le_bytes());
        fails(d.execute_bytes(&bytes), &d, &format!("command {cmd:#x}"));
    }

    // Stale and never-issued handles.
    let gone = ok(d.create_pd(uc.handle), &d);
    ok(d.destroy_pd(gone), &d);
    fails(d.destroy_pd(gone), &d, "DESTROY_PD of a stale handle");
    fails(
        d.create_cq_on(
            Uc {
                handle: 0xdead,
                uar: 1,
            },
            16,
        ),
        &d,
        "CQ of a missing context",
    );
    fails(
        d.destroy_qp(0xdead),
        &d,
        "DESTROY_QP of a handle never issued",
    );
    fails(
        d.query_qp(0xdead, 0),
        &d,
        "QUERY_QP of a handle never issued",
    );

    // Malformed page directories.
    let end = d.bus.memory().end();
    let layout = d.cq_layout(64);
    let mut req = Driver::<SocketBus>::cq_request(&layout, uc.handle);
    req.pdir_dma = layout.ring.pdir.dir + 8;
    fails(d.create_cq(&req), &d, "CQ with a misaligned directory");
    req.pdir_dma = end + 0x10_0000;
    fails(d.create_cq(&req), &d, "CQ with a directory outside RAM");

    let buffer = d.user_buffer(0x10_0000, 3 * PAGE_SIZE);
    buffer.pdir.set_entry(d.ram(), 1, end + 0x2000);
    let mr = Driver::<SocketBus>::user_mr_request(pd, &buffer, access::LOCAL_WRITE);
    fails(d.create_mr(&mr), &d, "MR with a page outside RAM");

    let qp_layout = d.qp_layout(driver::QpOwner::User, PINGPONG_SIZES);
    qp_layout.ring.pdir.set_table(d.ram(), 0, end);
    let spec = QpSpec::user(qp_type::RC, uc, pd, cq.handle, PINGPONG_SIZES);
    fails(
        d.create_qp(&Driver::<SocketBus>::qp_request(&qp_layout, &spec)),
        &d,
        "QP with a page table outside RAM",
    );

    // Still working: the intact requests succeed.
    let fixed = ok(
        d.create_cq(&Driver::<SocketBus>::cq_request(&layout, uc.handle)),
        &d,
    );
    ok(d.destroy_cq(fixed.0), &d);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, PINGPONG_SIZES);
    ok(d.destroy_qp(qp.handle), &d);
    healthy(&mut d);
}

// ---------------------------------------------------------------------------------------
// (6) A client disconnect frees the device
// ---------------------------------------------------------------------------------------

#[test]
fn a_new_client_finds_the_device_reset() {
    let mut d = Driver::probed_over_socket();
    let server = d.bus.server().clone();
    let mad = d.kernel_registration().unwrap();
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, PINGPONG_SIZES);

    // The next QEMU on the same socket, with the same RAM.
    let released = d.reconnect();
    assert!(
        released.contains("released 1 DMA windows and 3 MSI-X eventfds"),
        "{released}"
    );
    assert_ne!(d.read_reg(regs::ERR), 0, "the device is back to power-on");
    d.probe();
    // The old objects are gone.
    fails(
        d.destroy_qp(qp.handle),
        &d,
        "DESTROY_QP of the old client's QP",
    );
    fails(d.destroy_qp(mad.qp.handle), &d, "DESTROY_QP of the old QP1");
    fails(
        d.destroy_cq(cq.handle),
        &d,
        "DESTROY_CQ of the old client's CQ",
    );
    fails(
        d.destroy_cq(mad.cq.handle),
        &d,
        "DESTROY_CQ of the old MAD CQ",
    );
    fails(
        d.destroy_mr(mad.dma_mr.handle),
        &d,
        "DESTROY_MR of the old DMA MR",
    );
    fails(d.destroy_pd(pd), &d, "DESTROY_PD of the old client's PD");
    fails(d.destroy_pd(mad.pd), &d, "DESTROY_PD of the old kernel PD");
    fails(d.destroy_uc(uc.handle), &d, "DESTROY_UC of the old context");
    // And everything can be created again, QP1 included.
    let mad = d.kernel_registration().unwrap();
    assert_eq!((mad.qp.qpn, mad.qp.handle), (1, 1));
    let (uc, pd, cq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, PINGPONG_SIZES);
    ok(d.rc_connect(&qp, 3, ipv4_gid([10, 0, 0, 2]), 0), &d);

    // Dropping the whole driver closes the client; a brand-new one (new RAM memfd, new
    // eventfds) attaches to the same socket.
    drop(d);
    server.wait_for_line(0, "client disconnected");
    let line = server.wait_for_line(0, "released ");
    assert!(line.contains("3 MSI-X eventfds"), "{line}");
    let mut d = Driver::on_socket(&server, 0);
    d.probe();
    fails(
        d.query_qp(qp.handle, 0),
        &d,
        "QUERY_QP of the previous client's QP",
    );
    let mad = d.kernel_registration().unwrap();
    assert_eq!(mad.qp.qpn, 1);
    healthy(&mut d);
    assert!(
        server.exited().is_none(),
        "one process served all three clients"
    );
}

// ---------------------------------------------------------------------------------------
// (7) Two functions in one process
// ---------------------------------------------------------------------------------------

#[test]
fn two_functions_in_one_process_are_independent() {
    let server = SocketServer::start(2);
    let mut a = Driver::on_socket(&server, 0);
    let mut b = Driver::on_socket(&server, 1);
    a.probe();
    b.probe();
    let mad_a = a.kernel_registration().unwrap();
    // B's vmxnet3 has its own MAC, so its link-local GID differs from A's.
    let mad_b = b
        .kernel_registration_with_mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x57])
        .unwrap();
    assert_eq!(mad_a.qp.qpn, 1, "each function has its own QP1");
    assert_eq!(mad_b.qp.qpn, 1, "each function has its own QP1");
    let (uc_b, pd_b, cq_b) = user_setup(&mut b, 64);
    let qp_b = rc_qp(&mut b, uc_b, pd_b, cq_b.handle, cq_b.handle, PINGPONG_SIZES);
    ok(b.rc_connect(&qp_b, 3, ipv4_gid([10, 0, 0, 2]), 0), &b);

    // A's client goes away; B's function and client are untouched.
    drop(a);
    server.wait_for_line(0, "client disconnected");
    server.wait_for_line(0, "released ");
    assert!(server.exited().is_none());
    assert_eq!(
        ok(b.query_qp(mad_b.qp.handle, 0), &b).qp_state,
        qp_state::RTS
    );
    assert_eq!(ok(b.query_qp(qp_b.handle, 0), &b).qp_state, qp_state::RTS);
    b.ring_cq(&cq_b, uar::CQ_ARM);
    b.post_recv_raw(&qp_b, 1, &[]).unwrap();
    ok_with_vectors(
        b.modify_qp_state(&qp_b, qp_state::ERR),
        &b,
        &[vector::COMMAND, vector::CQ_NOTIFY],
    );
    assert_eq!(b.drain_cq(&cq_b).len(), 1);
    healthy(&mut b);

    // A new client on A finds a reset function, while B keeps its objects.
    let mut a = Driver::on_socket(&server, 0);
    a.probe();
    fails(a.query_qp(mad_a.qp.handle, 0), &a, "QP1 of A's old client");
    let mad_a = a.kernel_registration().unwrap();
    assert_eq!(mad_a.qp.qpn, 1);
    assert_eq!(
        ok(b.query_qp(mad_b.qp.handle, 0), &b).qp_state,
        qp_state::RTS
    );
    fails(b.query_qp(0xdead, 0), &b, "B's failure");
    healthy(&mut a);
    healthy(&mut b);
}

// ---------------------------------------------------------------------------------------
// (7, continued) Traffic between the functions of one process
// ---------------------------------------------------------------------------------------

/// One side of a connection between two functions: a context with a PD, a CQ, a 4 KiB MR
/// at user address [`BUF_VA`] and an RC QP.
struct Side {
    cq: Cq,
    mr: driver::Mr,
    qp: Qp,
    gid: [u8; 16],
}

const BUF_VA: u64 = 0x20_0000;

fn side(d: &mut D, ip: [u8; 4]) -> Side {
    let gid = ipv4_gid(ip);
    ok(d.create_bind(0, gid, GID_TYPE_ROCE_V1), d);
    let (uc, pd, cq) = user_setup(d, 64);
    let mr = ok(
        d.reg_user_mr(
            pd,
            BUF_VA,
            PAGE_SIZE,
            access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
        ),
        d,
    );
    let qp = rc_qp(d, uc, pd, cq.handle, cq.handle, FLUSH_SIZES);
    Side { cq, mr, qp, gid }
}

/// Hardening: GID interception between tenants. A guest that binds its neighbour's GID
/// would receive the neighbour's datagrams; the server refuses the bind.
#[test]
fn a_guest_cannot_bind_the_gid_of_another_function() {
    let server = SocketServer::start(2);
    let mut victim = Driver::on_socket(&server, 0);
    let mut attacker = Driver::on_socket(&server, 1);
    victim.probe();
    attacker.probe();
    let gid = ipv4_gid([10, 0, 0, 1]);
    ok(victim.create_bind(0, gid, GID_TYPE_ROCE_V1), &victim);
    let errno = fails(
        attacker.create_bind(3, gid, GID_TYPE_ROCE_V1),
        &attacker,
        "binding the victim's GID",
    );
    assert_eq!(errno, libc::EADDRINUSE as u32);
    server.wait_for_line(1, "another port holds it");
    // When the victim's client goes, its GIDs go with it, and the GID is free again.
    drop(victim);
    server.wait_for_line(0, "released ");
    ok(attacker.create_bind(3, gid, GID_TYPE_ROCE_V1), &attacker);
    healthy(&mut attacker);
}

#[test]
fn functions_of_one_process_exchange_traffic_and_survive_a_peer_leaving() {
    let server = SocketServer::start(2);
    let mut a = Driver::on_socket(&server, 0);
    let mut b = Driver::on_socket(&server, 1);
    a.probe();
    b.probe();
    let sa = side(&mut a, [10, 0, 0, 1]);
    let sb = side(&mut b, [10, 0, 0, 2]);
    ok(a.rc_connect(&sa.qp, sb.qp.qpn, sb.gid, 0), &a);
    ok(b.rc_connect(&sb.qp, sa.qp.qpn, sa.gid, 0), &b);
    a.take_irqs();
    b.take_irqs();

    // A SEND from A lands in B's receive buffer, B's CQ notification reaching B's eventfd
    // from the thread that serves A.
    let message = b"over two vfio-user sockets";
    let len = message.len() as u32;
    b.ring_cq(&sb.cq, uar::CQ_ARM);
    b.post_recv(&sb.qp, 77, &[sge(BUF_VA, 64, sb.mr.lkey)])
        .unwrap();
    let src = sa.mr.buffer.as_ref().unwrap().translate(BUF_VA);
    memory::write_bytes(a.ram(), src, message);
    a.post_send(
        &sa.qp,
        11,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, len, sa.mr.lkey)],
    )
    .unwrap();
    let sent = a.drain_cq(&sa.cq);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].wr_id, sent[0].status), (11, wc_status::SUCCESS));
    assert_eq!(b.bus.wait_for_vector(vector::CQ_NOTIFY, IRQ_WAIT), 1);
    let received = b.drain_cq(&sb.cq);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(
        (received[0].wr_id, received[0].status, received[0].byte_len),
        (77, wc_status::SUCCESS, len)
    );
    let dst = sb.mr.buffer.as_ref().unwrap().translate(BUF_VA);
    assert_eq!(
        memory::snapshot(b.ram(), dst, message.len()),
        message.to_vec()
    );

    // A sends again with no receive posted at B: the send waits (RNR, retried forever).
    a.post_send(
        &sa.qp,
        12,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, len, sa.mr.lkey)],
    )
    .unwrap();
    assert_eq!(a.drain_cq(&sa.cq), []);
    a.take_irqs();
    a.ring_cq(&sa.cq, uar::CQ_ARM);

    // B's client goes away: B is reset, and A's waiting send must not wait forever.
    drop(b);
    server.wait_for_line(1, "client disconnected");
    server.wait_for_line(1, "released ");
    let cqes = a.drain_cq(&sa.cq);
    assert_eq!(
        cqes.len(),
        1,
        "A's send to the vanished peer completes: {cqes:?}"
    );
    assert_eq!(cqes[0].wr_id, 12);
    assert_eq!(
        cqes[0].status,
        wc_status::RETRY_EXC_ERR,
        "the peer is unreachable"
    );
    assert_eq!(a.bus.wait_for_vector(vector::CQ_NOTIFY, IRQ_WAIT), 1);
    assert_eq!(ok(a.query_qp(sa.qp.handle, 0), &a).qp_state, qp_state::ERR);
    healthy(&mut a);
}

/// A batch of SENDs behind one trapped doorbell is rung after the doorbell's reply (the
/// client goes back to the guest while the server copies), but before the client's next
/// message is handled; a lone SEND is rung before the reply.
#[test]
fn a_batch_doorbell_rings_after_its_reply_and_before_the_next_message() {
    let server = SocketServer::start(2);
    let mut a = Driver::on_socket(&server, 0);
    let mut b = Driver::on_socket(&server, 1);
    a.probe();
    b.probe();
    let sa = side(&mut a, [10, 0, 0, 1]);
    let sb = side(&mut b, [10, 0, 0, 2]);
    ok(a.rc_connect(&sa.qp, sb.qp.qpn, sb.gid, 0), &a);
    ok(b.rc_connect(&sb.qp, sa.qp.qpn, sa.gid, 0), &b);
    let src = sa.mr.buffer.as_ref().unwrap().translate(BUF_VA);
    let dst = sb.mr.buffer.as_ref().unwrap().translate(BUF_VA);
    let payload: Vec<u8> = (0..48u8).map(|i| i.wrapping_mul(7)).collect();
    memory::write_bytes(a.ram(), src, &payload);

    for round in 0..3u64 {
        // Three SENDs of 16 bytes, one doorbell: a batch.
        for i in 0..3u64 {
            let at = BUF_VA + 16 * i;
            b.post_recv(&sb.qp, 100 * round + i, &[sge(at, 16, sb.mr.lkey)])
                .unwrap();
            let wqe = send_wqe(
                10 * round + i,
                wr_opcode::SEND,
                send_flags::SIGNALED,
                &[sge(at, 16, sa.mr.lkey)],
            );
            a.post_send_raw(&sa.qp, &wqe).unwrap();
        }
        a.ring_qp(&sa.qp, uar::QP_SEND);
        // Any message after the doorbell is handled after the batch: once its reply is
        // back, every completion is in the rings.
        assert_eq!(a.read_reg(regs::ERR), 0);
        let sent = a.drain_cq(&sa.cq);
        assert_eq!(
            sent.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
            (0..3)
                .map(|i| (10 * round + i, wc_status::SUCCESS))
                .collect::<Vec<_>>(),
            "round {round}"
        );
        let received = b.drain_cq(&sb.cq);
        assert_eq!(received.len(), 3, "round {round}: {received:?}");
        assert!(received.iter().all(|c| c.status == wc_status::SUCCESS));
        assert_eq!(memory::snapshot(b.ram(), dst, 48), payload);
        memory::write_bytes(b.ram(), dst, &[0; 48]);
    }

    // A lone SEND is rung before the reply: its completion is there when the doorbell
    // write returns.
    b.post_recv(&sb.qp, 999, &[sge(BUF_VA, 16, sb.mr.lkey)])
        .unwrap();
    a.post_send(
        &sa.qp,
        99,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 16, sa.mr.lkey)],
    )
    .unwrap();
    let sent = a.drain_cq(&sa.cq);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].wr_id, sent[0].status), (99, wc_status::SUCCESS));
    healthy(&mut a);
    healthy(&mut b);
}

// ---------------------------------------------------------------------------------------
// What only the socket shows: DMA windows, vector 1, resets, unmaps, signals
// ---------------------------------------------------------------------------------------

#[test]
fn kernel_uc_doorbells_work_over_the_socket() {
    // The kernel's CQ on UAR page 0 and a user CQ on its own page: both doorbells reach
    // the device through BAR2 (region 2) writes.
    let mut d = Driver::probed_over_socket();
    let kcq = ok(d.create_cq_on(KERNEL_UC, 64), &d);
    let (uc, pd, ucq) = user_setup(&mut d, 64);
    let qp = rc_qp(&mut d, uc, pd, ucq.handle, ucq.handle, PINGPONG_SIZES);
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    d.ring_cq(&kcq, uar::CQ_ARM);
    d.ring_cq(&ucq, uar::CQ_ARM);
    d.post_recv(&qp, 5, &[]).unwrap();
    assert_eq!(d.bus.wait_for_vector(vector::CQ_NOTIFY, IRQ_WAIT), 1);
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne { info: ucq.handle }],
        "only the CQ that completed is notified"
    );
    // A doorbell on another context's page is ignored.
    d.doorbell(0, uar::QP_OFFSET, qp.handle | uar::QP_RECV);
    d.post_recv_raw(&qp, 6, &[]).unwrap();
    d.doorbell(0, uar::QP_OFFSET, qp.handle | uar::QP_RECV);
    assert_eq!(
        d.drain_cq(&ucq).iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [5]
    );
    d.ring_qp(&qp, uar::QP_RECV);
    assert_eq!(
        d.drain_cq(&ucq).iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [6]
    );
}

#[test]
fn ram_in_several_dma_windows_at_their_file_offsets() {
    // QEMU maps guest RAM as several windows of one memfd. Map it as 4 (last first) and put
    // every driver structure in the third window, at file offset 32 MiB + 8 KiB on.
    let server = SocketServer::start(1);
    let setup = Setup {
        windows: 4,
        ..Setup::default()
    };
    let mut d = Driver::new(SocketBus::connect_with(&server, 0, default_memory(), setup));
    let third = d.bus.memory().base() + 2 * (d.bus.memory().size() / 4);
    d.alloc = memory::PageAllocator::new(third + 2 * PAGE_SIZE, d.bus.memory().end());
    d.probe();
    assert!(d.session().dsr.addr >= third);
    let mad = d.kernel_registration().unwrap();
    assert_eq!(mad.qp.qpn, 1);
    ok_with_vectors(
        d.modify_qp_state(&mad.qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::CQ_NOTIFY],
    );
    assert_eq!(d.drain_cq(&mad.cq).len(), 512);
    // The device wrote the notification ring where our file offsets say: read the page
    // through the memfd itself.
    let ring = d.session().cq_notify.clone();
    assert_eq!(d.device_ring_indices(&ring), (1, 0), "one CQNE produced");
    let state_page = ring.ring.buf.pages[0];
    let mut file = vec![0u8; PAGE_SIZE as usize];
    std::os::unix::fs::FileExt::read_exact_at(
        d.bus.memory().memfd(),
        &mut file,
        state_page - d.bus.memory().base(),
    )
    .unwrap();
    assert_eq!(
        file,
        memory::snapshot(d.ram(), state_page, PAGE_SIZE as usize)
    );
    assert_eq!(
        d.poll_cq_notifications().unwrap(),
        [abi::Cqne {
            info: mad.cq.handle
        }]
    );
    healthy(&mut d);
}

#[test]
fn cq_overflow_raises_the_async_event_on_the_vector_1_eventfd() {
    let mut d = Driver::probed_over_socket();
    let (uc, pd, cq) = user_setup(&mut d, 4);
    ok(
        d.create_bind(0, ipv4_gid([10, 0, 0, 1]), GID_TYPE_ROCE_V1),
        &d,
    );
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, FLUSH_SIZES);
    ok(d.rc_connect(&qp, 3, ipv4_gid([10, 0, 0, 2]), 0), &d);
    d.take_irqs();
    for i in 0..8 {
        d.post_recv_raw(&qp, i, &[]).unwrap();
    }
    // Through the doorbell this time, so the eventfd is read by nobody else.
    d.ring_qp(&qp, uar::QP_RECV);
    assert_eq!(
        d.bus.wait_for_vector(vector::ASYNC_EVENT, Duration::ZERO),
        0,
        "QP still RTS"
    );
    ok_with_vectors(
        d.modify_qp_state(&qp, qp_state::ERR),
        &d,
        &[vector::COMMAND, vector::ASYNC_EVENT],
    );
    assert_eq!(
        d.poll_async().unwrap(),
        [abi::Eqe {
            event_type: abi::event::CQ_ERR,
            info: cq.handle
        }]
    );
    assert_eq!(
        d.drain_cq(&cq).iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
}

#[test]
fn device_reset_keeps_the_dma_windows_and_forgets_the_objects() {
    let mut d = Driver::probed_over_socket();
    let mad = d.kernel_registration().unwrap();
    let (uc, _pd, _cq) = user_setup(&mut d, 64);
    // Machine reset: QEMU sends DEVICE_RESET, the guest boots and probes again.
    d.reset_device();
    assert_eq!(
        d.bus.config_read16(pci_regs::COMMAND as u64) & COMMAND_ENABLE,
        COMMAND_ENABLE
    );
    assert_ne!(d.read_reg(regs::ERR), 0, "back to power-on");
    d.probe();
    fails(
        d.query_qp(mad.qp.handle, 0),
        &d,
        "QP1 from before the reset",
    );
    fails(
        d.destroy_uc(uc.handle),
        &d,
        "a context from before the reset",
    );
    let mad = d.kernel_registration().unwrap();
    assert_eq!(mad.qp.qpn, 1);
    healthy(&mut d);
}

#[test]
fn dma_unmap_under_live_objects_is_survived() {
    let mut d = Driver::probed_over_socket();
    let (uc, pd, cq) = user_setup(&mut d, 16);
    let qp = rc_qp(&mut d, uc, pd, cq.handle, cq.handle, FLUSH_SIZES);
    ok(d.modify_qp_state(&qp, qp_state::ERR), &d);
    d.ring_cq(&cq, uar::CQ_ARM);
    d.post_recv_raw(&qp, 1, &[]).unwrap();
    d.take_irqs();

    let (base, size) = (d.bus.memory().base(), d.bus.memory().size());
    d.bus
        .call("DMA_UNMAP", 0, base, |c| c.dma_unmap(base, size));
    d.bus
        .server()
        .wait_for_line(0, &format!("DMA unmap {base:#x}+{size:#x}"));
    // The rings are out of reach: the doorbell does nothing, commands fail with ERR.
    d.ring_qp(&qp, uar::QP_RECV);
    assert_eq!(d.take_irqs(), [] as [u16; 0]);
    assert_eq!(d.cq_indices(&cq), (0, 0), "nothing was written");
    assert_ne!(d.create_pd(0).unwrap_err().err(), 0);
    assert_eq!(
        d.take_irqs(),
        [vector::COMMAND],
        "the failure is still signalled"
    );

    // Mapped again, the same objects work.
    let fd = std::os::fd::AsRawFd::as_raw_fd(d.bus.memory().memfd());
    d.bus
        .call("DMA_MAP", 0, base, |c| c.dma_map(0, base, size, fd));
    d.ring_qp(&qp, uar::QP_RECV);
    assert_eq!(d.take_irqs(), [vector::CQ_NOTIFY]);
    assert_eq!(d.drain_cq(&cq).len(), 1);
    ok(d.destroy_qp(qp.handle), &d);
    healthy(&mut d);
}

#[test]
fn sigterm_with_a_client_attached_exits_cleanly() {
    let mut d = Driver::probed_over_socket();
    d.kernel_registration().unwrap();
    let server = d.bus.server().clone();
    let socket = server.socket(0).to_path_buf();
    let status = server.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}; log:\n{}", server.log());
    assert!(!socket.exists(), "the socket file is removed");
}

#[test]
fn no_interrupts_while_bus_mastering_is_off() {
    let mut d = Driver::probed_over_socket();
    let command = d.bus.config_read16(pci_regs::COMMAND as u64);
    let off = command & !pci_regs::COMMAND_BUS_MASTER;
    d.bus
        .config_write(pci_regs::COMMAND as u64, &off.to_le_bytes());
    // The command cannot be fetched (no DMA), and must not be signalled either.
    let err = d.create_pd(0).unwrap_err();
    assert_eq!(err, CmdError::Device(14), "EFAULT: the slot is unreachable");
    assert_eq!(d.last.as_ref().unwrap().vectors, [] as [u16; 0]);
}

// ---------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------

#[test]
fn dropping_the_bus_kills_the_server_and_removes_its_dir() {
    let bus = SocketBus::start();
    let server = bus.server().clone();
    let socket = server.socket(0).to_path_buf();
    let dir = socket.parent().unwrap().to_path_buf();
    let pid = server.pid();
    assert!(socket.exists() && dir.is_dir());
    drop(server);
    drop(bus);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert_eq!(
        kill(pid, None),
        Err(Errno::ESRCH),
        "the server was killed and reaped"
    );
}

#[test]
fn a_hung_call_is_cut_short_by_the_watchdog() {
    let mut bus = SocketBus::start();
    bus.server().set_call_timeout(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A read of a region that does not exist gets a header-only error reply, and the
        // crate's client then waits forever for the rest of a read reply (docs/vfio-user-server.md,
        // the crate's bugs).
        bus.call("read of region 9", 9, 0, |c| {
            c.region_read(9, 0, &mut [0; 4])
        })
    }));
    let payload = outcome.expect_err("the call must fail, not hang or succeed");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("the watchdog killed the server because read of region 9"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&bus.server().wait_exit()),
        Some(nix::sys::signal::Signal::SIGKILL as i32)
    );
}
