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

fn memfd(length: u64) -> File {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let file = File::from(memfd_create("dma-test", MFdFlags::MFD_CLOEXEC).expect("memfd"));
    file.set_len(length).expect("size memfd");
    file
}

#[test]
fn map_keeps_the_file_of_a_read_write_window() {
    let mut t = DmaWindows::new();
    t.map(rw(), 0, 0, 0x1000, Some(memfd(0x1000)))
        .expect("maps");
    assert!(t.iter().all(|w| w.file.is_some()));
}

#[test]
fn windows_the_device_never_maps_hold_no_descriptor() {
    let mut t = DmaWindows::new();
    let w = t
        .map(DmaMapFlags::READ, 0, 0, 0x1000, Some(memfd(0x1000)))
        .expect("maps");
    assert!(w.file.is_none(), "a read-only window keeps no fd");
}

#[test]
fn fds_that_cannot_back_ram_are_refused() {
    let (pipe, _writer) = nix::unistd::pipe().expect("pipe");
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let cases = [
        (
            File::open("/dev/null").expect("/dev/null"),
            "a character device",
        ),
        (File::from(pipe), "a pipe"),
        (File::from(std::os::fd::OwnedFd::from(socket)), "a socket"),
        (File::open("/").expect("/ opens"), "a directory"),
    ];
    let mut t = DmaWindows::new();
    for (file, kind) in cases {
        let err = t.map(rw(), 0, 0, 0x1000, Some(file)).expect_err(kind);
        assert!(
            matches!(err, DmaError::NotAFile { kind: k, .. } if k == kind),
            "{kind}: {err}"
        );
        assert_eq!(err.errno(), libc::EINVAL);
    }
    assert!(t.is_empty());
}

#[test]
fn a_window_past_the_end_of_its_file_is_refused() {
    let mut t = DmaWindows::new();
    // A 4 KiB memfd offered as 1 MiB of RAM: the rest would be SIGBUS.
    let err = t
        .map(rw(), 0, 0, 0x10_0000, Some(memfd(0x1000)))
        .expect_err("short");
    assert_eq!(
        err,
        DmaError::FileTooShort {
            address: 0,
            size: 0x10_0000,
            offset: 0,
            needed: 0x10_0000,
            length: 0x1000
        }
    );
    assert_eq!(err.errno(), libc::EINVAL);
    // The offset counts: 8 KiB at offset 4 KiB needs 12 KiB.
    assert!(t.map(rw(), 0x1000, 0, 0x2000, Some(memfd(0x2fff))).is_err());
    t.map(rw(), 0x1000, 0, 0x2000, Some(memfd(0x3000)))
        .expect("exactly long enough");
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
