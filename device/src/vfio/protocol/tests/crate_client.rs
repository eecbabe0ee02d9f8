//! The normal flow driven by the `vfio_user` crate's own `Client`, which
//! connects by path, negotiates and fetches every region (with the sparse
//! mmap capability and fd) in `Client::new`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

use nix::sys::eventfd::{EfdFlags, EventFd};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_user::Client;

use super::*;
use crate::vfio::PciFunction;

/// Serves one client on a socket under `dir`; returns the socket path.
fn serve_one<B: DeviceBackend + Send + 'static>(
    dir: &TempDir,
    backend: B,
) -> (PathBuf, Receiver<Outcome<B>>) {
    let path = dir.0.join("sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut backend = backend;
        let result = serve_client(&stream, &mut backend);
        drop(stream);
        let _ = tx.send((backend, result));
    });
    (path, rx)
}

#[test]
fn crate_client_sees_sparse_regions() {
    let dir = TempDir::new("sparse");
    let (path, done) = serve_one(&dir, FakeBackend::new());
    let mut client = Client::new(&path).expect("connect and negotiate");

    let sparse = client.region(1).expect("region 1");
    assert_eq!(sparse.size, 0x4000);
    assert_ne!(sparse.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(sparse.sparse_areas, SPARSE_AREAS);
    let file = sparse.file_offset.as_ref().expect("region fd").file();
    assert_eq!(file.metadata().expect("stat").len(), 0x4000);
    let whole = client.region(3).expect("region 3");
    assert!(whole.file_offset.is_some() && whole.sparse_areas.is_empty());
    assert!(client.region(0).expect("region 0").file_offset.is_none());

    let mut data = [0u8; 4];
    client.region_read(0, 4, &mut data).expect("read");
    assert_eq!(data, [4, 5, 6, 7]);
    client.region_write(0, 4, &[9, 9]).expect("write");
    client.region_read(0, 4, &mut data).expect("read");
    assert_eq!(data, [9, 9, 6, 7]);
    let irq = client.get_irq_info(1).expect("irq info");
    assert_eq!(
        (irq.index, irq.flags, irq.count),
        (1, VFIO_IRQ_INFO_EVENTFD, 4)
    );
    drop(client);

    let (backend, result) = done.recv_timeout(TIMEOUT).expect("server finished");
    result.expect("clean disconnect");
    assert_eq!(backend.calls.len(), 3);
}

#[test]
fn crate_client_drives_the_pci_function() {
    let dir = TempDir::new("pci");
    let (path, done) = serve_one(&dir, PciFunction::new());
    let mut client = Client::new(&path).expect("connect and negotiate");
    assert_eq!(client.region(7).expect("config").size, 256);

    let config = VFIO_PCI_CONFIG_REGION_INDEX;
    let mut id = [0u8; 4];
    client.region_read(config, 0, &mut id).expect("read ids");
    assert_eq!(u32::from_le_bytes(id), 0x0820_15AD);
    client
        .region_write(config, 0x10, &u32::MAX.to_le_bytes())
        .expect("size BAR0");
    client
        .region_read(config, 0x10, &mut id)
        .expect("read BAR0");
    assert_eq!(u32::from_le_bytes(id), 0xFFFF_C000);

    let ram = memfd("guest-ram");
    client
        .dma_map(0, 0x10_0000, 0x4000, ram.as_raw_fd())
        .expect("DMA map");
    client.dma_unmap(0x10_0000, 0x4000).expect("DMA unmap");
    client
        .dma_map(0, 0x20_0000, 0x1000, ram.as_raw_fd())
        .expect("DMA map");

    let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            2,
            1,
            &[efd.as_raw_fd()],
        )
        .expect("assign vector 2");
    client.reset().expect("reset");
    client
        .region_read(config, 0x10, &mut id)
        .expect("read BAR0");
    assert_eq!(u32::from_le_bytes(id), 0, "reset restores power-on");
    client.shutdown().expect("shutdown");
    drop(client);

    let (mut backend, result) = done.recv_timeout(TIMEOUT).expect("server finished");
    result.expect("clean disconnect");
    assert_eq!(backend.dma_windows().len(), 1, "a reset keeps DMA windows");
    assert!(!backend.msix_assigned(2), "a reset drops eventfds");
    backend.client_gone();
    assert!(backend.dma_windows().is_empty());
}
