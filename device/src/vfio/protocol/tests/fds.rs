//! Descriptors from the client: accepted where the protocol allows them,
//! and every refused one closed before the reply (no leak).

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_MSIX_IRQ_INDEX,
};

use super::*;
use crate::vfio::PciFunction;

const EVENTFD_TRIGGER: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

#[test]
fn set_irqs_with_more_fds_than_vectors() {
    let pipe = Pipe::new();
    let mut h = Harness::negotiated(PciFunction::new());
    let fd = pipe.fd();
    h.expect_errno_with_fds(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, EVENTFD_TRIGGER, 0, 1),
        &[fd, fd, fd],
        Errno::EINVAL,
    );
    pipe.assert_only_ours();
    // Fds with DATA_NONE, or with count 0, are refused the same way.
    let none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    h.expect_errno_with_fds(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, none, 0, 1),
        &[fd],
        Errno::EINVAL,
    );
    h.expect_errno_with_fds(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, EVENTFD_TRIGGER, 0, 0),
        &[fd],
        Errno::EINVAL,
    );
    pipe.assert_only_ours();
    let (backend, result) = h.finish();
    result.expect("clean");
    assert!(!backend.msix_assigned(0));
}

#[test]
fn more_than_max_msg_fds_are_all_closed() {
    let pipe = Pipe::new();
    let mut h = Harness::negotiated(FakeBackend::new());
    let fds = vec![pipe.fd(); 20];
    h.expect_errno_with_fds(
        cmd::SET_IRQS,
        &irq_set(1, EVENTFD_TRIGGER, 0, 20),
        &fds,
        Errno::EINVAL,
    );
    pipe.assert_only_ours();
    // Exactly MAX_MSG_FDS passes the loop; the server then refuses the
    // vector range (the fake IRQ has 4 vectors), closing them all as well.
    h.expect_errno_with_fds(
        cmd::SET_IRQS,
        &irq_set(1, EVENTFD_TRIGGER, 0, 16),
        &fds[..16],
        Errno::EINVAL,
    );
    pipe.assert_only_ours();
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn accepted_eventfds_are_kept_then_released() {
    let pipe = Pipe::new();
    let mut h = Harness::negotiated(FakeBackend::new());
    let reply = h.call_with_fds(
        cmd::SET_IRQS,
        &irq_set(1, EVENTFD_TRIGGER, 1, 2),
        &[pipe.fd(), pipe.fd()],
    );
    assert_eq!(reply.errno(), None);
    assert_eq!(pipe.open_copies(), 4, "the backend holds two copies");
    let (backend, result) = h.finish();
    result.expect("clean");
    assert_eq!(
        backend.calls,
        [Call::SetIrqs {
            index: 1,
            flags: EVENTFD_TRIGGER,
            start: 1,
            count: 2,
            fds: 2
        }]
    );
    drop(backend);
    pipe.assert_only_ours();
}

#[test]
fn dma_map_takes_at_most_one_fd() {
    let pipe = Pipe::new();
    let mut h = Harness::negotiated(FakeBackend::new());
    h.expect_errno_with_fds(
        cmd::DMA_MAP,
        &dma_map(3, 0, 0x1000, 0x1000),
        &[pipe.fd(), pipe.fd()],
        Errno::EINVAL,
    );
    pipe.assert_only_ours();
    // A refused map closes its fd too.
    let mut failing_map = dma_map(3, 0, 0x1000, 0x1000);
    failing_map[0..4].copy_from_slice(&0u32.to_ne_bytes());
    h.expect_errno_with_fds(cmd::DMA_MAP, &failing_map, &[pipe.fd()], Errno::EINVAL);
    pipe.assert_only_ours();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn fds_on_commands_without_fds_are_closed() {
    let pipe = Pipe::new();
    let mut h = Harness::start(FakeBackend::new());
    // Even on VERSION.
    h.expect_errno_with_fds(
        cmd::VERSION,
        &version_payload(0, QEMU_OFFER),
        &[pipe.fd()],
        Errno::EINVAL,
    );
    let reply = h.call(cmd::VERSION, &version_payload(0, QEMU_OFFER));
    assert_eq!(reply.errno(), None);
    for (command, payload) in [
        (cmd::GET_INFO, info_query()),
        (cmd::GET_REGION_INFO, region_query(1, 80)),
        (cmd::REGION_WRITE, access(0, 0, 1, &[7])),
        (cmd::DMA_UNMAP, dma_unmap(0, 0, 0x1000)),
        (cmd::RESET, Vec::new()),
    ] {
        h.expect_errno_with_fds(command, &payload, &[pipe.fd(), pipe.fd()], Errno::EINVAL);
        pipe.assert_only_ours();
    }
    // Unsupported and unknown commands: ENOTSUP, fds closed as well.
    h.expect_errno_with_fds(17, &[0; 8], &[pipe.fd()], Errno::ENOTSUP);
    h.expect_errno_with_fds(200, &[0; 8], &[pipe.fd()], Errno::ENOTSUP);
    pipe.assert_only_ours();
    // A client reply with an fd is ignored, fd closed.
    h.send(cmd::GET_INFO, flags::TYPE_REPLY, &[0; 16], &[pipe.fd()]);
    h.assert_in_sync();
    pipe.assert_only_ours();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn fds_of_a_dropped_connection_are_closed() {
    let pipe = Pipe::new();
    let h = Harness::negotiated(FakeBackend::new());
    let header = Header {
        id: 1,
        command: cmd::DMA_MAP,
        size: u32::MAX,
        flags: 0,
        error: 0,
    };
    h.send_raw(&header.encode(), &[pipe.fd()]);
    assert_eq!(h.recv().errno(), Some(libc::EINVAL));
    h.expect_eof();
    let _ = h.wait();
    pipe.assert_only_ours();

    // Disconnect in the middle of a payload whose header brought fds.
    let h = Harness::negotiated(FakeBackend::new());
    let header = Header {
        size: 16 + 32,
        ..header
    };
    h.send_raw(&header.encode(), &[pipe.fd()]);
    drop(h.client);
    let (backend, result) = h.done.recv_timeout(TIMEOUT).expect("server finished");
    assert!(matches!(result, Err(ConnectionError::Truncated)));
    assert!(backend.calls.is_empty());
    pipe.assert_only_ours();
}

#[test]
fn region_fds_we_send_are_ours_to_keep() {
    let mut h = Harness::negotiated(FakeBackend::new());
    let reply = h.call(cmd::GET_REGION_INFO, &region_query(1, 80));
    assert_eq!(reply.fds.len(), 1);
    let (backend, result) = h.finish();
    result.expect("clean");
    // The server sent a copy; the backend's own fd is still open.
    assert!(backend.regions[1].mmap_fd.is_some());
    let received = File::from(reply.fds.into_iter().next().expect("fd"));
    assert_eq!(received.metadata().expect("stat").len(), 0x4000);
}

#[test]
fn fds_attached_to_payload_bytes_are_never_installed() {
    let pipe = Pipe::new();
    let mut h = Harness::negotiated(FakeBackend::new());
    // Header alone, then the payload in a second sendmsg carrying the fd:
    // the server reads payloads without a control buffer, so the kernel
    // drops such fds before they reach our descriptor table.
    let payload = access(0, 0, 2, &[5, 6]);
    let header = Header {
        id: 0x77,
        command: cmd::REGION_WRITE,
        size: 16 + payload.len() as u32,
        flags: 0,
        error: 0,
    };
    h.send_raw(&header.encode(), &[]);
    h.send_raw(&payload, &[pipe.fd()]);
    let reply = h.recv();
    assert_eq!((reply.header.id, reply.errno()), (0x77, None));
    pipe.assert_only_ours();
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert_eq!(backend.calls, [Call::Write(0, 0, vec![5, 6])]);
}
