//! Every supported command, as QEMU sends it, gets its exact reply.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
};

use super::*;
use crate::vfio::PciFunction;

#[test]
fn version_reply_suits_qemu() {
    let mut h = Harness::start(FakeBackend::new());
    let request = version_payload(0, QEMU_OFFER);
    let reply = h.call(cmd::VERSION, &request);
    assert_eq!(reply.errno(), None);
    // QEMU reads the reply into a buffer the size of its request.
    assert!(reply.payload.len() <= request.len(), "{reply:?}");
    assert_eq!(&reply.payload[..4], &[0, 0, 0, 0], "version 0.0");
    let (nul, json) = reply.payload[4..].split_last().expect("JSON");
    assert_eq!(*nul, 0, "NUL-terminated");
    let json: serde_json::Value = serde_json::from_slice(json).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!({"capabilities": {
            "max_msg_fds": 16, "max_data_xfer_size": 1048576,
            "pgsizes": 4096, "max_dma_maps": 256}})
    );
    h.assert_in_sync();
    let (_, result) = h.finish();
    result.expect("clean disconnect");
}

#[test]
fn device_info_is_16_bytes() {
    let mut h = Harness::negotiated(PciFunction::new());
    let reply = h.call(cmd::GET_INFO, &info_query());
    assert_eq!(reply.payload.len(), 16, "QEMU reads exactly 16 bytes");
    assert_eq!(reply.u32_at(0), 16, "argsz");
    assert_eq!(
        reply.u32_at(4),
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    );
    assert_eq!(reply.u32_at(8), 9, "regions");
    assert_eq!(reply.u32_at(12), 5, "irqs");
    // A longer (future) request still gets the 16-byte reply.
    let mut longer = info_query();
    longer[0..4].copy_from_slice(&24u32.to_ne_bytes());
    longer.extend_from_slice(&[0; 8]);
    let reply = h.call(cmd::GET_INFO, &longer);
    assert_eq!((reply.payload.len(), reply.u32_at(0)), (16, 16));
    h.finish().1.expect("clean");
}

#[test]
fn trapped_region_info() {
    let mut h = Harness::negotiated(PciFunction::new());
    for (index, size) in [(0, 0x4000), (2, 0x20_0000), (3, 0), (7, 256)] {
        let reply = h.call(cmd::GET_REGION_INFO, &region_query(index, 32));
        assert_eq!(reply.payload.len(), 32, "region {index}");
        assert_eq!(reply.u32_at(0), 32, "argsz");
        assert_eq!(reply.u32_at(8), index, "index");
        assert_eq!(reply.u32_at(12), 0, "no cap_offset");
        assert_eq!(reply.u64_at(16), size, "size");
        assert!(reply.fds.is_empty());
    }
    h.finish().1.expect("clean");
}

#[test]
fn sparse_mmap_region_info_takes_two_queries() {
    let backend = FakeBackend::new();
    let ino = |fd: &OwnedFd| {
        File::from(fd.try_clone().expect("dup"))
            .metadata()
            .expect("stat")
            .ino()
    };
    let memfd_ino = ino(backend.regions[1].mmap_fd.as_ref().expect("fd"));
    let mut h = Harness::negotiated(backend);
    let needed = 32 + 16 + 2 * 16;

    // First query, as QEMU makes it: only the fixed part fits.
    let first = h.call(cmd::GET_REGION_INFO, &region_query(1, 32));
    assert_eq!(first.payload.len(), 32, "no capabilities yet");
    assert_eq!(first.u32_at(0), needed, "argsz = size needed");
    let flags = first.u32_at(4);
    assert_ne!(flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_ne!(flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(
        first.u32_at(12),
        32,
        "cap_offset, inside argsz for QEMU's check"
    );
    assert!(first.fds.is_empty(), "no fd before the caps fit");

    // Second query with the size we asked for: caps and the fd.
    let second = h.call(cmd::GET_REGION_INFO, &region_query(1, needed));
    assert_eq!(second.payload.len() as u32, needed);
    assert_eq!(second.u32_at(0), needed);
    assert_eq!(second.u32_at(12), 32);
    assert_eq!(second.u64_at(16), 0x4000, "size");
    assert_eq!(second.u32_at(32) & 0xFFFF, 1, "SPARSE_MMAP id");
    assert_eq!(second.u32_at(32) >> 16, 1, "version 1");
    assert_eq!(second.u32_at(36), 0, "last capability");
    assert_eq!(second.u32_at(40), 2, "nr_areas");
    assert_eq!((second.u64_at(48), second.u64_at(56)), (0x1000, 0x1000));
    assert_eq!((second.u64_at(64), second.u64_at(72)), (0x3000, 0x1000));
    assert_eq!(second.fds.len(), 1, "one fd per region");
    assert_eq!(ino(&second.fds[0]), memfd_ino, "the region's own file");

    // A bigger buffer than needed changes nothing.
    let third = h.call(cmd::GET_REGION_INFO, &region_query(1, 4096));
    assert_eq!(
        (third.payload.len() as u32, third.u32_at(0)),
        (needed, needed)
    );
    assert_eq!(third.fds.len(), 1);

    // A wholly mmap-able region has no caps: its fd comes at once.
    let whole = h.call(cmd::GET_REGION_INFO, &region_query(3, 32));
    assert_eq!((whole.payload.len(), whole.u32_at(0)), (32, 32));
    assert_eq!(whole.u32_at(4) & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(whole.fds.len(), 1);
    h.finish().1.expect("clean");
}

#[test]
fn irq_info() {
    let mut h = Harness::negotiated(PciFunction::new());
    let query = Bytes::default()
        .u32(16)
        .u32(0)
        .u32(VFIO_PCI_MSIX_IRQ_INDEX)
        .u32(0)
        .0;
    let reply = h.call(cmd::GET_IRQ_INFO, &query);
    assert_eq!(reply.payload.len(), 16);
    assert_eq!(reply.u32_at(0), 16);
    assert_eq!(reply.u32_at(4), VFIO_IRQ_INFO_EVENTFD);
    assert_eq!(reply.u32_at(8), VFIO_PCI_MSIX_IRQ_INDEX);
    assert_eq!(reply.u32_at(12), 3, "vectors");
    h.finish().1.expect("clean");
}

#[test]
fn set_irqs_assigns_and_triggers_msix() {
    let mut h = Harness::negotiated(PciFunction::new());
    let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK)
        .expect("eventfd");
    let assign = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let reply = h.call_with_fds(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, assign, 1, 1),
        &[efd.as_fd()],
    );
    assert_eq!((reply.errno(), reply.payload.len()), (None, 0));
    // QEMU's "MSI-X on, no vectors": count 1 without fds de-assigns.
    let reply = h.call(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, assign, 0, 1),
    );
    assert_eq!(reply.errno(), None);
    let trigger = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    let reply = h.call(
        cmd::SET_IRQS,
        &irq_set(VFIO_PCI_MSIX_IRQ_INDEX, trigger, 1, 1),
    );
    assert_eq!(reply.errno(), None);
    assert_eq!(efd.read().expect("vector 1 fired"), 1);
    let (backend, result) = h.finish();
    result.expect("clean");
    assert!(backend.msix_assigned(1));
    assert!(!backend.msix_assigned(0));
}

#[test]
fn region_read_and_write() {
    let mut h = Harness::negotiated(PciFunction::new());
    let config = VFIO_PCI_CONFIG_REGION_INDEX;
    let reply = h.call(cmd::REGION_READ, &access(config, 0, 4, &[]));
    assert_eq!(reply.payload.len(), 16 + 4);
    assert_eq!(
        (reply.u64_at(0), reply.u32_at(8), reply.u32_at(12)),
        (0, config, 4)
    );
    assert_eq!(reply.u32_at(16), 0x0820_15AD, "vendor/device");
    // Whole config space in one read, as QEMU does at realize.
    let reply = h.call(cmd::REGION_READ, &access(config, 0, 256, &[]));
    assert_eq!(reply.payload.len(), 16 + 256);

    let reply = h.call(cmd::REGION_WRITE, &access(config, 0x3C, 1, &[0x0B]));
    assert_eq!(reply.errno(), None);
    assert_eq!(reply.payload.len(), 16, "write reply echoes the access");
    assert_eq!(
        (reply.u64_at(0), reply.u32_at(8), reply.u32_at(12)),
        (0x3C, config, 1)
    );
    let reply = h.call(cmd::REGION_READ, &access(config, 0x3C, 1, &[]));
    assert_eq!(reply.payload[16], 0x0B);
    h.finish().1.expect("clean");
}

#[test]
fn largest_write_is_accepted() {
    let mut h = Harness::negotiated(PciFunction::new());
    let data = vec![0x5A; super::super::MAX_DATA_XFER_SIZE as usize];
    // BAR2 (UAR) is 2 MiB.
    let reply = h.call(cmd::REGION_WRITE, &access(2, 0, data.len() as u32, &data));
    assert_eq!(reply.errno(), None);
    let reply = h.call(
        cmd::REGION_READ,
        &access(2, 0x10_0000, data.len() as u32, &[]),
    );
    assert_eq!(reply.payload.len(), 16 + data.len());
    h.finish().1.expect("clean");
}

#[test]
fn dma_map_unmap_and_reset() {
    let mut h = Harness::negotiated(FakeBackend::new());
    let ram = memfd("ram");
    let reply = h.call_with_fds(
        cmd::DMA_MAP,
        &dma_map(3, 0x1000, 0x10_0000, 0x2000),
        &[ram.as_fd()],
    );
    assert_eq!((reply.errno(), reply.payload.len()), (None, 0));
    // Without an fd (QEMU's BIOS ROM window).
    let reply = h.call(cmd::DMA_MAP, &dma_map(1, 0, 0xFFFC_0000, 0x4_0000));
    assert_eq!(reply.errno(), None);
    let request = dma_unmap(0, 0x10_0000, 0x2000);
    let reply = h.call(cmd::DMA_UNMAP, &request);
    assert_eq!(reply.payload, request, "the reply echoes the 24-byte entry");
    let reply = h.call(cmd::RESET, &[]);
    assert_eq!((reply.errno(), reply.payload.len()), (None, 0));
    let (backend, result) = h.finish();
    result.expect("clean");
    assert_eq!(
        backend.calls,
        [
            Call::Map {
                flags: 3,
                offset: 0x1000,
                address: 0x10_0000,
                size: 0x2000,
                fd: true
            },
            Call::Map {
                flags: 1,
                offset: 0,
                address: 0xFFFC_0000,
                size: 0x4_0000,
                fd: false
            },
            Call::Unmap(0, 0x10_0000, 0x2000),
            Call::Reset,
        ]
    );
}

#[test]
fn backend_errnos_reach_the_wire() {
    let mut h = Harness::negotiated(PciFunction::new());
    let ram = memfd("ram");
    File::from(ram.try_clone().expect("dup"))
        .set_len(0x1_0000)
        .expect("size memfd");
    let map = dma_map(3, 0, 0x1_0000, 0x1_0000);
    let reply = h.call_with_fds(cmd::DMA_MAP, &map, &[ram.as_fd()]);
    assert_eq!(reply.errno(), None);
    h.expect_errno_with_fds(cmd::DMA_MAP, &map, &[ram.as_fd()], Errno::EEXIST);
    h.expect_errno(
        cmd::DMA_UNMAP,
        &dma_unmap(0, 0x1_0000, 0x1000),
        Errno::ENOENT,
    );
    h.expect_errno(
        cmd::DMA_UNMAP,
        &dma_unmap(1, 0x1_0000, 0x1_0000),
        Errno::ENOTSUP,
    );
    h.expect_errno(
        cmd::DMA_MAP,
        &dma_map(7, 0, 0x8_0000, 0x1000),
        Errno::EINVAL,
    );
    // Unmap-all (flag 2, as QEMU sends it) empties the table.
    let request = dma_unmap(2, 0, u64::MAX);
    assert_eq!(h.call(cmd::DMA_UNMAP, &request).payload, request);
    let (backend, result) = h.finish();
    result.expect("clean");
    assert!(backend.dma_windows().is_empty());
}

#[test]
fn errno_zero_from_a_backend_becomes_eio() {
    let mut backend = FakeBackend::new();
    backend.fail_next = Some(Errno::UnknownErrno);
    let mut h = Harness::negotiated(backend);
    h.expect_errno(cmd::RESET, &[], Errno::EIO);
    h.finish().1.expect("clean");
}

#[test]
fn no_reply_write_is_applied_in_order() {
    let mut h = Harness::negotiated(FakeBackend::new());
    // A posted write: no reply, but a later read sees it.
    h.send(
        cmd::REGION_WRITE,
        flags::NO_REPLY,
        &access(0, 8, 4, &[1, 2, 3, 4]),
        &[],
    );
    let reply = h.call(cmd::REGION_READ, &access(0, 8, 4, &[]));
    assert_eq!(&reply.payload[16..], &[1, 2, 3, 4]);
    h.finish().1.expect("clean");
}

#[test]
fn region_fd_is_withheld_from_a_client_without_fd_room() {
    let mut h = Harness::start(FakeBackend::new());
    let reply = h.call(
        cmd::VERSION,
        &version_payload(0, r#"{"capabilities":{"max_msg_fds":0}}"#),
    );
    assert_eq!(reply.errno(), None);
    let reply = h.call(cmd::GET_REGION_INFO, &region_query(3, 32));
    assert!(reply.fds.is_empty());
    assert!(reply.fds.iter().all(|fd| fd.as_raw_fd() >= 0));
    h.finish().1.expect("clean");
}
