use std::fs::File;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::OwnedFd;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR1_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_BAR3_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_ROM_REGION_INDEX, VFIO_PCI_VGA_REGION_INDEX,
};

use super::*;
use crate::pci::regs;

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

fn errno(result: Result<(), Errno>) -> Option<i32> {
    result.err().map(|e| e as i32)
}

fn eventfd_file() -> File {
    File::from(OwnedFd::from(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"),
    ))
}

fn read_config_u32(b: &mut PciFunction, offset: u64) -> u32 {
    let mut raw = [0; 4];
    b.region_read(CONFIG, offset, &mut raw)
        .expect("config read");
    u32::from_le_bytes(raw)
}

#[test]
fn config_region_serves_the_config_space() {
    let mut b = PciFunction::new();
    assert_eq!(read_config_u32(&mut b, 0), 0x0820_15AD);
    let mut whole = [0; 256];
    b.region_read(CONFIG, 0, &mut whole).expect("whole space");
    assert_eq!(whole[regs::CLASS_CODE], 0x02);
    b.region_write(CONFIG, regs::bar(1) as u64, &[0xFF; 4])
        .expect("BAR sizing write");
    assert_eq!(read_config_u32(&mut b, regs::bar(1) as u64), 0xFFFF_E000);
}

#[test]
fn non_register_accesses_read_zero_and_ignore_writes() {
    let mut b = PciFunction::new();
    for (region, offset, len) in [
        (VFIO_PCI_BAR0_REGION_INDEX, 0x2000, 8), // PBA
        (VFIO_PCI_BAR0_REGION_INDEX, 0x0, 16),   // table (normally emulated by QEMU)
        (VFIO_PCI_BAR1_REGION_INDEX, 0xFFC, 4),  // past the registers
        (VFIO_PCI_BAR1_REGION_INDEX, 0x0, 2),    // not a 32-bit access
        (VFIO_PCI_BAR2_REGION_INDEX, 0x1F_FFF8, 8),
    ] {
        b.region_write(region, offset, &vec![0x5A; len])
            .expect("write accepted");
        let mut data = vec![0xAA; len];
        b.region_read(region, offset, &mut data).expect("read");
        assert!(data.iter().all(|&x| x == 0), "region {region} {offset:#x}");
    }
}

#[test]
fn registers_reach_the_device_model() {
    let mut b = PciFunction::new();
    let mut data = [0u8; 4];
    b.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0, &mut data)
        .expect("VERSION");
    assert_eq!(u32::from_le_bytes(data), 20);
    b.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0x14, &mut data)
        .expect("ERR");
    assert_eq!(
        u32::from_le_bytes(data),
        0xffff,
        "ERR before a DSR is loaded"
    );
    // REQUEST before any DSR fails cleanly.
    b.region_write(VFIO_PCI_BAR1_REGION_INDEX, 0x10, &0u32.to_le_bytes())
        .expect("REQUEST");
    b.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0x14, &mut data)
        .expect("ERR");
    assert_ne!(u32::from_le_bytes(data), 0);
    // DSRHIGH without bus mastering: no guest memory, so the load fails.
    b.region_write(VFIO_PCI_BAR1_REGION_INDEX, 0x08, &0u32.to_le_bytes())
        .expect("DSRHIGH");
    b.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0x14, &mut data)
        .expect("ERR");
    assert_ne!(u32::from_le_bytes(data), 0);
}

#[test]
fn bad_regions_and_ranges_are_einval() {
    let mut b = PciFunction::new();
    let cases: [(u32, u64, usize); 11] = [
        (9, 0, 4),
        (u32::MAX, 0, 4),
        (VFIO_PCI_BAR0_REGION_INDEX, 0x4000, 1),
        (VFIO_PCI_BAR1_REGION_INDEX, 0x2000, 4),
        (VFIO_PCI_BAR1_REGION_INDEX, 0x1FFE, 4),
        (VFIO_PCI_BAR2_REGION_INDEX, 0x20_0000, 4),
        (VFIO_PCI_BAR3_REGION_INDEX, 0, 4),
        (VFIO_PCI_ROM_REGION_INDEX, 0, 4),
        (VFIO_PCI_VGA_REGION_INDEX, 0, 1),
        (CONFIG, 256, 4),
        (CONFIG, u64::MAX - 1, 4),
    ];
    for (region, offset, len) in cases {
        let mut data = vec![0; len];
        assert_eq!(
            errno(b.region_read(region, offset, &mut data)),
            Some(libc::EINVAL),
            "read {region} {offset:#x}+{len}"
        );
        assert_eq!(
            errno(b.region_write(region, offset, &data)),
            Some(libc::EINVAL),
            "write {region} {offset:#x}+{len}"
        );
    }
    // Failed writes changed nothing.
    assert_eq!(*b.config(), ConfigSpace::new());
    // The last valid byte is fine.
    let mut last = [0; 4];
    b.region_read(CONFIG, 252, &mut last).expect("in range");
}

#[test]
fn dma_map_and_unmap() {
    let mut b = PciFunction::new();
    let rw = DmaMapFlags::READ_WRITE.bits();
    let file = File::from(
        nix::sys::memfd::memfd_create("ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd"),
    );
    file.set_len(0x1_0000).expect("size memfd");
    b.dma_map(rw, 0, 0x1_0000, 0x1_0000, Some(file))
        .expect("map");
    let null = File::open("/dev/null").expect("/dev/null");
    assert_eq!(
        errno(b.dma_map(rw, 0, 0x2_0000, 0x1_0000, Some(null))),
        Some(libc::EINVAL),
        "a character device cannot back RAM"
    );
    b.dma_map(DmaMapFlags::READ.bits(), 0, 0xF_0000, 0x1_0000, None)
        .expect("fd-less map is accepted");
    assert_eq!(
        errno(b.dma_map(rw, 0, 0x1_8000, 0x1000, None)),
        Some(libc::EEXIST)
    );
    assert_eq!(errno(b.dma_unmap(0, 0x1_0000, 0x1000)), Some(libc::ENOENT));
    b.dma_unmap(0, 0x1_0000, 0x1_0000).expect("exact unmap");
    assert_eq!(b.dma_windows().len(), 1);
    // Bit 1 (VFIO_DMA_UNMAP_FLAG_ALL) is "unmap all" on the wire.
    b.dma_unmap(2, 0, u64::MAX).expect("unmap all");
    assert!(b.dma_windows().is_empty());
}

#[test]
fn set_irqs_records_eventfds() {
    let mut b = PciFunction::new();
    let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, flags, 1, 1, vec![eventfd_file()])
        .expect("assign");
    assert!(b.msix_assigned(1));
    assert_eq!(
        errno(b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, flags, 3, 1, vec![eventfd_file()])),
        Some(libc::EINVAL)
    );
    b.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        vec![],
    )
    .expect("disable");
    assert!(!b.msix_assigned(1));
}

#[test]
fn reset_and_client_gone() {
    let mut b = PciFunction::new();
    let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let populate = |b: &mut PciFunction, address: u64| {
        b.region_write(CONFIG, regs::COMMAND as u64, &[0x06, 0])
            .expect("command");
        b.dma_map(DmaMapFlags::READ_WRITE.bits(), 0, address, 0x1000, None)
            .expect("map");
        b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, flags, 0, 1, vec![eventfd_file()])
            .expect("irq");
    };

    populate(&mut b, 0x1000);
    b.reset().expect("reset");
    assert_eq!(*b.config(), ConfigSpace::new(), "config back to power-on");
    assert!(!b.msix_assigned(0), "eventfds forgotten");
    assert_eq!(b.dma_windows().len(), 1, "DMA windows survive a reset");

    populate(&mut b, 0x2000);
    b.client_gone();
    assert!(b.dma_windows().is_empty());
    assert!(!b.msix_assigned(0));
    assert!(b.config().bus_master_enabled(), "device state is kept");
}

#[test]
fn tables_and_raw_flags() {
    let mut b = PciFunction::new();
    assert_eq!(b.regions().len(), 9);
    assert_eq!(b.irqs().len(), 5);
    assert!(b.resettable());
    // Unknown DMA_MAP bits reach the table unchanged and are refused.
    assert_eq!(
        errno(b.dma_map(DmaMapFlags::READ_WRITE.bits() | 4, 0, 0x1000, 0x1000, None)),
        Some(libc::EINVAL)
    );
    assert!(b.dma_windows().is_empty());
}

#[test]
fn only_register_and_config_accesses_ask_the_loop_to_spin() {
    let mut b = PciFunction::new();
    assert!(!b.expects_follow_up(), "nothing happened yet");
    let mut word = [0u8; 4];
    b.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0, &mut word)
        .expect("register read");
    assert!(b.expects_follow_up(), "a register read");
    b.region_write(VFIO_PCI_BAR2_REGION_INDEX, 0, &[0; 4])
        .expect("doorbell write");
    assert!(!b.expects_follow_up(), "a doorbell");
    read_config_u32(&mut b, 0);
    assert!(b.expects_follow_up(), "a config read");
    b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x2000, &mut word)
        .expect("PBA read");
    assert!(!b.expects_follow_up(), "the MSI-X BAR");
}
