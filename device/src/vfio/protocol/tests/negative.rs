//! Hostile input: every message gets a correct reply or a real errno, the
//! stream stays in step, and framing errors end the connection cleanly.

use std::net::Shutdown;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_BOOL, VFIO_PCI_CONFIG_REGION_INDEX,
};

use super::*;
use crate::vfio::PciFunction;
use crate::vfio::protocol::{MAX_DATA_XFER_SIZE, MAX_MESSAGE_SIZE};

fn header_bytes(id: u16, command: u16, size: u32, flags: u32) -> Vec<u8> {
    Header {
        id,
        command,
        size,
        flags,
        error: 0,
    }
    .encode()
    .to_vec()
}

#[test]
fn short_header_then_eof() {
    let h = Harness::start(FakeBackend::new());
    h.send_raw(&header_bytes(1, cmd::VERSION, 40, 0)[..7], &[]);
    h.client.shutdown(Shutdown::Write).expect("shutdown");
    let (_, result) = h.wait();
    assert!(
        matches!(result, Err(ConnectionError::Truncated)),
        "{result:?}"
    );
    h.expect_eof();
}

#[test]
fn eof_between_messages_is_clean() {
    let h = Harness::start(FakeBackend::new());
    let (backend, result) = h.finish();
    result.expect("clean");
    assert!(backend.calls.is_empty());
}

#[test]
fn disconnect_mid_payload() {
    let h = Harness::negotiated(FakeBackend::new());
    let mut bytes = header_bytes(7, cmd::REGION_WRITE, 16 + 100, 0);
    bytes.extend_from_slice(&[0; 10]);
    h.send_raw(&bytes, &[]);
    h.client.shutdown(Shutdown::Write).expect("shutdown");
    let (backend, result) = h.wait();
    assert!(
        matches!(result, Err(ConnectionError::Truncated)),
        "{result:?}"
    );
    assert!(
        backend.calls.is_empty(),
        "nothing half-read reached the backend"
    );
    h.expect_eof();
}

#[test]
fn message_size_below_header_drops_the_client() {
    for size in [0, 8, 15] {
        let h = Harness::start(FakeBackend::new());
        h.send_raw(&header_bytes(0x42, cmd::GET_INFO, size, 0), &[]);
        let reply = h.recv();
        assert_eq!(reply.header.id, 0x42);
        assert_eq!(reply.errno(), Some(libc::EINVAL));
        h.expect_eof();
        let (_, result) = h.wait();
        assert!(
            matches!(result, Err(ConnectionError::BadMessageSize(s)) if s == size),
            "{result:?}"
        );
    }
}

#[test]
fn huge_message_size_drops_the_client_without_allocating() {
    for size in [MAX_MESSAGE_SIZE + 1, u32::MAX] {
        let mut h = Harness::negotiated(FakeBackend::new());
        h.assert_in_sync();
        h.send_raw(&header_bytes(0x43, cmd::REGION_WRITE, size, 0), &[]);
        let reply = h.recv();
        assert_eq!((reply.header.id, reply.errno()), (0x43, Some(libc::EINVAL)));
        h.expect_eof();
        let (_, result) = h.wait();
        assert!(matches!(result, Err(ConnectionError::BadMessageSize(s)) if s == size));
    }
}

#[test]
fn unknown_and_unsupported_commands_keep_the_stream_in_step() {
    let mut h = Harness::negotiated(FakeBackend::new());
    // Payloads that look like headers would desync a server that skips them.
    let fake_header = header_bytes(9, cmd::RESET, 16, 0);
    let cases: [(u16, usize, Errno); 13] = [
        (0, 0, Errno::ENOTSUP),
        (6, 16, Errno::ENOTSUP),
        (11, 16, Errno::ENOTSUP),
        (12, 40, Errno::ENOTSUP),
        (14, 3, Errno::ENOTSUP),
        (15, 8 + 24 * 3, Errno::ENOTSUP),
        (16, 8, Errno::EINVAL),
        (16, 4096, Errno::EINVAL),
        (17, 8, Errno::ENOTSUP),
        (18, 100_000, Errno::ENOTSUP),
        (19, 1, Errno::ENOTSUP),
        (99, 64, Errno::ENOTSUP),
        (0xFFFF, MAX_DATA_XFER_SIZE as usize, Errno::ENOTSUP),
    ];
    for (command, len, errno) in cases {
        let payload: Vec<u8> = fake_header.iter().copied().cycle().take(len).collect();
        h.expect_errno(command, &payload, errno);
        h.assert_in_sync();
    }
    let (backend, result) = h.finish();
    result.expect("clean");
    assert!(
        backend.calls.is_empty(),
        "no refused command reached the backend"
    );
}

#[test]
fn commands_before_version_are_einval() {
    let mut h = Harness::start(FakeBackend::new());
    h.expect_errno(cmd::GET_INFO, &info_query(), Errno::EINVAL);
    h.expect_errno(cmd::REGION_READ, &access(0, 0, 4, &[]), Errno::EINVAL);
    h.expect_errno(cmd::RESET, &[], Errno::EINVAL);
    h.expect_errno(99, &[1, 2, 3], Errno::EINVAL);
    let reply = h.call(cmd::VERSION, &version_payload(0, QEMU_OFFER));
    assert_eq!(reply.errno(), None);
    h.assert_in_sync();
    // Renegotiation is refused; the session stays usable.
    h.expect_errno(cmd::VERSION, &version_payload(0, QEMU_OFFER), Errno::EINVAL);
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn bad_version_data_is_einval() {
    let mut h = Harness::start(FakeBackend::new());
    let with_nul = |text: &[u8]| {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(text);
        p
    };
    let huge = with_nul(&[b' '; 5000]);
    let cases: [Vec<u8>; 9] = [
        vec![],                              // no major/minor
        vec![0, 0, 0],                       // short major/minor
        with_nul(b"{\"capabilities\":{}}"),  // no NUL
        with_nul(b"{\"a\":\"\xff\xfe\"}\0"), // invalid UTF-8
        with_nul(b"not json at all\0"),      // not JSON
        with_nul(b"[1]\0"),                  // not an object
        with_nul(b"{}\0{}\0"),               // embedded NUL
        with_nul(b"{\"capabilities\":{\"max_msg_fds\":true}}\0"),
        huge, // over MAX_VERSION_DATA
    ];
    for payload in &cases {
        h.expect_errno(cmd::VERSION, payload, Errno::EINVAL);
    }
    h.expect_errno(cmd::VERSION, &version_payload(1, "{}"), Errno::ENOTSUP);
    // Nothing was negotiated by the failures.
    h.expect_errno(cmd::GET_INFO, &info_query(), Errno::EINVAL);
    let reply = h.call(cmd::VERSION, &version_payload(0, QEMU_OFFER));
    assert_eq!(reply.errno(), None);
    h.assert_in_sync();
    h.finish().1.expect("clean");
}

#[test]
fn version_without_data_is_accepted() {
    let mut h = Harness::start(FakeBackend::new());
    let reply = h.call(cmd::VERSION, &[0, 0, 0, 0]);
    assert_eq!(reply.errno(), None);
    assert_eq!(&reply.payload[4..], b"{\"capabilities\":{}}\0");
    h.assert_in_sync();
    h.finish().1.expect("clean");
}

#[test]
fn region_read_limits() {
    let mut h = Harness::negotiated(FakeBackend::new());
    let reply = h.call(cmd::REGION_READ, &access(0, 0x10, 0, &[]));
    assert_eq!(reply.errno(), None, "a zero-length read is a no-op");
    assert_eq!((reply.payload.len(), reply.u32_at(12)), (16, 0));
    for (region, offset, count) in [
        (0, 0, MAX_DATA_XFER_SIZE + 1),
        (0, 0, u32::MAX),
        (0, 0xFD, 4),
        (0, u64::MAX, 2),
        (4, 0, 4),
        (u32::MAX, 0, 4),
    ] {
        h.expect_errno(
            cmd::REGION_READ,
            &access(region, offset, count, &[]),
            Errno::EINVAL,
        );
    }
    // Truncated request.
    h.expect_errno(cmd::REGION_READ, &access(0, 0, 4, &[])[..12], Errno::EINVAL);
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert_eq!(backend.calls, [Call::Read(0, 0x10, 0)]);
}

#[test]
fn bad_region_writes_keep_the_stream_in_step() {
    let mut h = Harness::negotiated(PciFunction::new());
    // The crate returned before reading this data (bug C).
    h.expect_errno(
        cmd::REGION_WRITE,
        &access(9, 0, 4, &[1, 2, 3, 4]),
        Errno::EINVAL,
    );
    h.assert_in_sync();
    h.expect_errno(
        cmd::REGION_WRITE,
        &access(u32::MAX, 0, 8, &[0; 8]),
        Errno::EINVAL,
    );
    h.assert_in_sync();
    // count disagrees with the data that follows.
    h.expect_errno(cmd::REGION_WRITE, &access(7, 0, 8, &[0; 4]), Errno::EINVAL);
    h.expect_errno(cmd::REGION_WRITE, &access(7, 0, 2, &[0; 4]), Errno::EINVAL);
    h.expect_errno(
        cmd::REGION_WRITE,
        &access(7, 0, u32::MAX, &[0; 4]),
        Errno::EINVAL,
    );
    // Out of range in an existing region.
    h.expect_errno(
        cmd::REGION_WRITE,
        &access(7, 254, 4, &[0; 4]),
        Errno::EINVAL,
    );
    h.assert_in_sync();
    let config = VFIO_PCI_CONFIG_REGION_INDEX;
    let reply = h.call(cmd::REGION_READ, &access(config, 0, 4, &[]));
    assert_eq!(reply.u32_at(16), 0x0820_15AD, "config untouched");
    h.finish().1.expect("clean");
}

#[test]
fn permissions_are_enforced() {
    let mut h = Harness::negotiated(FakeBackend::new());
    // Region 2 is read-only.
    h.expect_errno(cmd::REGION_WRITE, &access(2, 0, 1, &[1]), Errno::EINVAL);
    let reply = h.call(cmd::REGION_READ, &access(2, 0, 1, &[]));
    assert_eq!(reply.errno(), None);
    let (backend, _) = h.finish();
    assert_eq!(backend.calls, [Call::Read(2, 0, 1)]);
}

#[test]
fn failed_no_reply_write_sends_nothing() {
    let mut backend = FakeBackend::new();
    backend.fail_next = Some(Errno::EIO);
    let mut h = Harness::negotiated(backend);
    h.send(
        cmd::REGION_WRITE,
        flags::NO_REPLY,
        &access(9, 0, 1, &[1]),
        &[],
    );
    // A backend failure is not reported either.
    h.send(
        cmd::REGION_WRITE,
        flags::NO_REPLY,
        &access(0, 0, 1, &[1]),
        &[],
    );
    // The next reply on the wire belongs to the next command.
    h.assert_in_sync();
    let (backend, result) = h.finish();
    result.expect("clean");
    assert_eq!(backend.calls, [Call::Write(0, 0, vec![1])]);
}

#[test]
fn replies_and_bad_types_from_the_client() {
    let mut h = Harness::negotiated(FakeBackend::new());
    // An unsolicited reply (with a payload) is consumed and ignored.
    h.send(cmd::REGION_READ, flags::TYPE_REPLY, &[0xEE; 40], &[]);
    h.assert_in_sync();
    // Type 2..15 does not exist: refused, payload consumed.
    h.expect_errno_type(5, &[0xEE; 24]);
    h.assert_in_sync();
    h.finish().1.expect("clean");
}

impl<B: DeviceBackend + Send + 'static> Harness<B> {
    fn expect_errno_type(&mut self, message_type: u32, payload: &[u8]) {
        let id = self.send(cmd::GET_INFO, message_type, payload, &[]);
        let reply = self.recv();
        assert_eq!((reply.header.id, reply.errno()), (id, Some(libc::EINVAL)));
    }
}

#[test]
fn short_and_bad_fixed_requests() {
    let mut h = Harness::negotiated(FakeBackend::new());
    h.expect_errno(
        cmd::DMA_MAP,
        &dma_map(3, 0, 0x1000, 0x1000)[..16],
        Errno::EINVAL,
    );
    h.expect_errno(
        cmd::DMA_UNMAP,
        &dma_unmap(0, 0x1000, 0x1000)[..20],
        Errno::EINVAL,
    );
    let mut small_argsz = dma_map(3, 0, 0x1000, 0x1000);
    small_argsz[0..4].copy_from_slice(&8u32.to_ne_bytes());
    h.expect_errno(cmd::DMA_MAP, &small_argsz, Errno::EINVAL);
    h.expect_errno(cmd::GET_INFO, &[0; 8], Errno::EINVAL);
    let mut info = info_query();
    info[0..4].copy_from_slice(&8u32.to_ne_bytes());
    h.expect_errno(cmd::GET_INFO, &info, Errno::EINVAL);
    h.expect_errno(cmd::GET_REGION_INFO, &region_query(0, 16), Errno::EINVAL);
    h.expect_errno(cmd::GET_REGION_INFO, &region_query(4, 32), Errno::EINVAL);
    h.expect_errno(
        cmd::GET_REGION_INFO,
        &region_query(u32::MAX, 32),
        Errno::EINVAL,
    );
    let irq_query = |index: u32| Bytes::default().u32(16).u32(0).u32(index).u32(0).0;
    h.expect_errno(cmd::GET_IRQ_INFO, &irq_query(2), Errno::EINVAL);
    h.expect_errno(cmd::GET_IRQ_INFO, &irq_query(2)[..12], Errno::EINVAL);
    h.expect_errno(cmd::SET_IRQS, &irq_set(2, 0x21, 0, 0), Errno::EINVAL);
    h.expect_errno(cmd::SET_IRQS, &irq_set(1, 0x21, 0, 0)[..16], Errno::EINVAL);
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn set_irqs_data_bool_is_refused_after_its_payload() {
    let mut h = Harness::negotiated(FakeBackend::new());
    let flags = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
    let mut payload = irq_set(1, flags, 0, 4);
    payload[0..4].copy_from_slice(&24u32.to_ne_bytes());
    // Four bools that look like the start of a header.
    payload.extend_from_slice(&[1, 0, 13, 0]);
    h.expect_errno(cmd::SET_IRQS, &payload, Errno::EINVAL);
    h.assert_in_sync();
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn reset_of_a_non_resettable_device() {
    let mut backend = FakeBackend::new();
    backend.resettable = false;
    let mut h = Harness::negotiated(backend);
    let reply = h.call(cmd::GET_INFO, &info_query());
    assert_eq!(
        reply.u32_at(4),
        vfio_bindings::bindings::vfio::VFIO_DEVICE_FLAGS_PCI
    );
    h.expect_errno(cmd::RESET, &[], Errno::ENOTSUP);
    let (backend, _) = h.finish();
    assert!(backend.calls.is_empty());
}

#[test]
fn client_vanishing_mid_reply_ends_the_session() {
    // The client vanishes while the server is replying: the server ends
    // with an I/O error, never a SIGPIPE.
    let mut h = Harness::negotiated(FakeBackend::new());
    h.send(cmd::REGION_READ, 0, &access(0, 0, 0x100, &[]), &[]);
    drop(h.client);
    let (_, result) = h
        .done
        .recv_timeout(TIMEOUT)
        .expect("server thread finished");
    // Either the reply fit in the socket buffer before the close was seen
    // (then EOF follows) or sending it failed.
    assert!(
        matches!(result, Ok(()) | Err(ConnectionError::Io(_))),
        "{result:?}"
    );
}
