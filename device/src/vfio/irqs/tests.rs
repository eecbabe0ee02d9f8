use std::io::Read;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::OwnedFd;

use super::*;

const MSIX: u32 = VFIO_PCI_MSIX_IRQ_INDEX;
const EVENTFD_TRIGGER: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
const NONE_TRIGGER: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;

/// A non-blocking eventfd as the `File` the crate hands us, plus a reader.
fn eventfd_pair() -> (File, File) {
    let fd = OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"));
    let file = File::from(fd);
    let reader = file.try_clone().expect("dup eventfd");
    (file, reader)
}

fn pending(reader: &mut File) -> u64 {
    let mut raw = [0u8; 8];
    match reader.read(&mut raw) {
        Ok(8) => u64::from_ne_bytes(raw),
        Ok(n) => panic!("short eventfd read of {n} bytes"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

#[test]
fn assign_one_vector_at_a_time_like_qemu() {
    let mut t = MsixEventfds::new();
    let (fd, mut reader) = eventfd_pair();
    // "MSI-X on, no vectors": eventfd data but no fds.
    assert_eq!(
        t.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1, vec![]).expect("ok"),
        IrqUpdate::Deassigned { start: 0, count: 1 }
    );
    assert_eq!(
        t.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, vec![fd])
            .expect("ok"),
        IrqUpdate::Assigned { start: 2, count: 1 }
    );
    assert!(t.is_assigned(2));
    assert!(!t.is_assigned(0));
    assert!(t.signal(2).expect("signal"));
    assert!(!t.signal(ids::VECTOR_COMMAND_RESPONSE).expect("no fd"));
    assert_eq!(pending(&mut reader), 1);
    // De-assign vector 2 only.
    t.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, vec![]).expect("ok");
    assert!(!t.is_assigned(2));
    assert!(!t.signal(2).expect("no fd"));
    assert_eq!(pending(&mut reader), 0);
}

#[test]
fn assign_all_vectors_at_once() {
    let mut t = MsixEventfds::new();
    let pairs: Vec<_> = (0..3).map(|_| eventfd_pair()).collect();
    let (fds, mut readers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    t.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 3, fds).expect("ok");
    // Software trigger of vectors 1 and 2.
    assert_eq!(
        t.set_irqs(MSIX, NONE_TRIGGER, 1, 2, vec![]).expect("ok"),
        IrqUpdate::Triggered {
            start: 1,
            count: 2,
            signalled: 2
        }
    );
    let counts: Vec<u64> = readers.iter_mut().map(pending).collect();
    assert_eq!(counts, vec![0, 1, 1]);
}

#[test]
fn count_zero_data_none_disables() {
    let mut t = MsixEventfds::new();
    let (fd, _reader) = eventfd_pair();
    t.set_irqs(MSIX, EVENTFD_TRIGGER, 1, 1, vec![fd])
        .expect("ok");
    assert_eq!(
        t.set_irqs(MSIX, NONE_TRIGGER, 0, 0, vec![]).expect("ok"),
        IrqUpdate::Disabled(1)
    );
    assert!(!t.is_assigned(1));
    assert_eq!(t.clear(), 0);
}

#[test]
fn out_of_range_vectors_are_rejected() {
    let mut t = MsixEventfds::new();
    for (start, count) in [(3, 1), (0, 4), (2, 2), (u32::MAX, 1), (1, u32::MAX)] {
        let err = t
            .set_irqs(MSIX, EVENTFD_TRIGGER, start, count, vec![])
            .expect_err("out of range");
        assert!(
            matches!(err, IrqError::OutOfRange { .. }),
            "{start}+{count}"
        );
        assert_eq!(err.errno(), libc::EINVAL);
    }
}

#[test]
fn fd_count_must_match() {
    let mut t = MsixEventfds::new();
    let (a, _ra) = eventfd_pair();
    let (b, _rb) = eventfd_pair();
    let err = t
        .set_irqs(MSIX, EVENTFD_TRIGGER, 0, 3, vec![a])
        .expect_err("too few");
    assert!(matches!(err, IrqError::FdCount { fds: 1, count: 3 }));
    let err = t
        .set_irqs(MSIX, EVENTFD_TRIGGER, 0, 0, vec![b])
        .expect_err("fds without vectors");
    assert!(matches!(err, IrqError::FdCount { fds: 1, count: 0 }));
    assert!((0..3).all(|v| !t.is_assigned(v)));
}

#[test]
fn bad_flags_are_rejected() {
    let mut t = MsixEventfds::new();
    for flags in [
        0,
        VFIO_IRQ_SET_DATA_NONE,      // no action
        VFIO_IRQ_SET_ACTION_TRIGGER, // no data type
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        NONE_TRIGGER | VFIO_IRQ_SET_ACTION_MASK, // two actions
        NONE_TRIGGER | 0x100,                    // unknown bit
    ] {
        let err = t
            .set_irqs(MSIX, flags, 0, 1, vec![])
            .expect_err("bad flags");
        assert!(matches!(err, IrqError::Flags(_)), "{flags:#x}");
    }
    // Well-formed but unsupported: BOOL data, MSI-X mask/unmask.
    for flags in [
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
    ] {
        let err = t
            .set_irqs(MSIX, flags, 0, 1, vec![])
            .expect_err("unsupported");
        assert!(matches!(err, IrqError::Unsupported { .. }), "{flags:#x}");
    }
}

#[test]
fn indices_without_vectors() {
    let mut t = MsixEventfds::new();
    // QEMU turns INTx off before enabling MSI-X: count 0 is accepted.
    for index in [0, 1, 3, 4] {
        assert_eq!(
            t.set_irqs(index, NONE_TRIGGER, 0, 0, vec![]).expect("ok"),
            IrqUpdate::Unchanged
        );
        let err = t
            .set_irqs(index, EVENTFD_TRIGGER, 0, 1, vec![])
            .expect_err("no vectors");
        assert!(matches!(err, IrqError::OutOfRange { .. }));
    }
    let err = t
        .set_irqs(5, NONE_TRIGGER, 0, 0, vec![])
        .expect_err("no index 5");
    assert!(matches!(err, IrqError::UnknownIndex(5)));
}

#[test]
fn triggering_unassigned_vectors_is_harmless() {
    let mut t = MsixEventfds::new();
    assert_eq!(
        t.set_irqs(MSIX, NONE_TRIGGER, 0, 3, vec![]).expect("ok"),
        IrqUpdate::Triggered {
            start: 0,
            count: 3,
            signalled: 0
        }
    );
    assert!(!t.signal(u16::MAX).expect("no such vector"));
}

#[test]
fn only_eventfds_are_accepted_as_vectors() {
    let mut t = MsixEventfds::new();
    let (pipe, _writer) = nix::unistd::pipe().expect("pipe");
    let err = t
        .set_irqs(MSIX, EVENTFD_TRIGGER, 1, 1, vec![File::from(pipe)])
        .expect_err("a pipe");
    assert!(
        matches!(err, IrqError::NotAnEventfd { vector: 1, .. }),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EINVAL);
    let memfd = nix::sys::memfd::memfd_create("not-an-eventfd", nix::sys::memfd::MFdFlags::empty())
        .expect("memfd");
    assert!(
        t.set_irqs(MSIX, EVENTFD_TRIGGER, 1, 1, vec![File::from(memfd)])
            .is_err()
    );
    assert!(!t.is_assigned(1), "nothing was assigned");
}

#[test]
fn a_full_eventfd_is_an_error_not_a_blocked_thread() {
    // A blocking eventfd, as a hostile client may send, with its counter one below the
    // maximum: a blocking write would wait until someone reads it.
    let fd = File::from(OwnedFd::from(
        EventFd::from_flags(EfdFlags::empty()).expect("eventfd"),
    ));
    let mut filler: &File = &fd;
    std::io::Write::write_all(&mut filler, &(u64::MAX - 1).to_ne_bytes()).expect("fill");
    let mut t = MsixEventfds::new();
    t.set_irqs(
        MSIX,
        EVENTFD_TRIGGER,
        0,
        1,
        vec![fd.try_clone().expect("dup")],
    )
    .expect("an eventfd is accepted");
    let err = t.signal(0).expect_err("the counter is full");
    assert!(matches!(err, IrqError::Signal { vector: 0, .. }), "{err}");
    assert_eq!(err.errno(), libc::EAGAIN);
}
