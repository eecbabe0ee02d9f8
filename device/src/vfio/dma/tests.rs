use super::*;

fn rw() -> DmaMapFlags {
    DmaMapFlags::READ_WRITE
}

fn table(windows: &[(u64, u64)]) -> DmaWindows {
    let mut t = DmaWindows::new();
    for &(address, size) in windows {
        t.map(rw(), 0, address, size, None)
            .expect("setup window maps");
    }
    t
}

#[test]
fn map_records_window() {
    let mut t = DmaWindows::new();
    let w = t
        .map(DmaMapFlags::READ, 0x1000, 0x10_0000, 0x2000, None)
        .expect("maps");
    assert_eq!((w.address, w.size, w.offset), (0x10_0000, 0x2000, 0x1000));
    assert!(w.readable && !w.writable);
    assert_eq!(t.len(), 1);
    assert_eq!(t.find(0x10_1FFF).map(|w| w.address), Some(0x10_0000));
    assert!(t.find(0x10_2000).is_none());
    assert!(t.find(0x0F_FFFF).is_none());
}

#[test]
fn map_keeps_the_file() {
    let file = File::open("/dev/null").expect("/dev/null opens");
    let mut t = DmaWindows::new();
    t.map(rw(), 0, 0, 0x1000, Some(file)).expect("maps");
    assert!(t.iter().all(|w| w.file.is_some()));
}

#[test]
fn overlapping_windows_are_rejected() {
    let mut t = table(&[(0x1000, 0x1000), (0x4000, 0x2000)]);
    for (address, size) in [
        (0x1000, 0x1000), // identical
        (0x0000, 0x1001), // tail overlaps the first
        (0x1FFF, 0x1),    // last byte of the first
        (0x5FFF, 0x10),   // last byte of the second
        (0x3000, 0x1001), // head overlaps the second
        (0x0, 0x10000),   // covers both
        (0x4800, 0x100),  // inside the second
    ] {
        let err = t.map(rw(), 0, address, size, None).expect_err("overlap");
        assert!(
            matches!(err, DmaError::Overlap { .. }),
            "{address:#x}+{size:#x}"
        );
        assert_eq!(err.errno(), libc::EEXIST);
    }
    assert_eq!(t.len(), 2);
    // Adjacent windows are fine.
    t.map(rw(), 0, 0x2000, 0x2000, None).expect("fills the gap");
    t.map(rw(), 0, 0x0, 0x1000, None).expect("below");
    t.map(rw(), 0, 0x6000, 0x1000, None).expect("above");
    assert_eq!(t.len(), 5);
}

#[test]
fn degenerate_windows_are_rejected() {
    let mut t = DmaWindows::new();
    assert_eq!(
        t.map(rw(), 0, 0x1000, 0, None).map(|_| ()),
        Err(DmaError::Empty { address: 0x1000 })
    );
    let wraps = t.map(rw(), 0, u64::MAX, 2, None).expect_err("wraps");
    assert_eq!(wraps.errno(), libc::EINVAL);
    assert!(
        t.map(rw(), u64::MAX, 0, 2, None).is_err(),
        "file offset wraps"
    );
    assert_eq!(
        t.map(DmaMapFlags::from_bits_retain(0x8 | 1), 0, 0, 1, None)
            .map(|_| ()),
        Err(DmaError::MapFlags(9))
    );
    assert!(t.is_empty());
    // A window may end exactly at the top of the address space.
    t.map(rw(), 0, u64::MAX - 0xFFF, 0x1000, None)
        .expect("top window");
    assert_eq!(t.find(u64::MAX).map(|w| w.size), Some(0x1000));
}

#[test]
fn unmap_requires_exact_match() {
    let mut t = table(&[(0x1000, 0x1000)]);
    for (address, size) in [(0x1000, 0x800), (0x1000, 0x2000), (0x1800, 0x800), (0, 0)] {
        let err = t.unmap(0, address, size).expect_err("inexact");
        assert_eq!(err, DmaError::NotMapped { address, size });
        assert_eq!(err.errno(), libc::ENOENT);
    }
    assert_eq!(t.unmap(0, 0x1000, 0x1000), Ok(Unmapped::One));
    assert!(t.is_empty());
    assert!(t.unmap(0, 0x1000, 0x1000).is_err(), "already gone");
}

#[test]
fn unmap_all_uses_the_kernel_bit() {
    let mut t = table(&[(0x1000, 0x1000), (0x8000, 0x1000)]);
    // Bit 1 (value 2) is VFIO_DMA_UNMAP_FLAG_ALL, whatever the crate names it.
    assert_eq!(t.unmap(2, 0, u64::MAX), Ok(Unmapped::All(2)));
    assert!(t.is_empty());
    assert_eq!(t.unmap(2, 0, 0), Ok(Unmapped::All(0)));
}

#[test]
fn unsupported_unmap_flags() {
    let mut t = table(&[(0x1000, 0x1000)]);
    for flags in [1, 4, 8, 3, 0x8000_0000] {
        let err = t.unmap(flags, 0x1000, 0x1000).expect_err("unsupported");
        assert_eq!(err, DmaError::UnmapFlags(flags));
    }
    assert_eq!(t.len(), 1);
}

#[test]
fn window_count_is_capped() {
    let mut t = DmaWindows::new();
    for i in 0..MAX_WINDOWS as u64 {
        t.map(rw(), 0, i * 0x1000, 0x1000, None)
            .expect("under the cap");
    }
    let err = t
        .map(rw(), 0, MAX_WINDOWS as u64 * 0x1000, 0x1000, None)
        .expect_err("over the cap");
    assert_eq!(err, DmaError::TooMany);
    assert_eq!(t.clear(), MAX_WINDOWS);
    assert!(t.is_empty());
}
