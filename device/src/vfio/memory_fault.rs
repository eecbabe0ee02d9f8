//! Guest memory that disappears under the server fails its device, not the process.
//!
//! A DMA window is checked against its file's size when it is mapped (`dma.rs`), but the
//! client keeps the file: it may truncate it afterwards (a memfd without `F_SEAL_SHRINK`, a
//! file on tmpfs or hugetlbfs). The kernel then answers any access to the lost pages with
//! SIGBUS, which would kill every device of the process. So guest RAM is registered here
//! while it is mapped, and a SIGBUS handler that finds the faulting address in a registered
//! range puts an anonymous page over it and returns: the access completes (reading zeros,
//! or writing into the private page), the range is marked, and the fabric, which checks the
//! marks after every piece of device work, takes that device's RAM away and fails it. A
//! SIGBUS anywhere else is a real bug: the default action is restored and the access
//! repeated, so the process dies as it would have.
//!
//! The handler only reads atomics and calls `mmap`, which is a plain system call; it takes
//! no lock and allocates nothing.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use log::warn;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::pvrdma::GuestRam;

/// Ranges that can be guarded at once: every window of every device. Ranges beyond this are
/// mapped unguarded (and logged); the per-client window cap keeps real use far below it.
const MAX_RANGES: usize = 4096;

/// One registered range of mapped guest RAM. `end == 0` means the entry is free.
struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // Only used to initialise the table.
const FREE: Range = Range {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static RANGES: [Range; MAX_RANGES] = [FREE; MAX_RANGES];
/// Faults taken since the fabric last looked: lets it skip the scan on the fast path.
static PENDING: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Installs the SIGBUS handler (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        // SAFETY: the handler is async-signal-safe (atomics and mmap only), and nothing else
        // in the process installs a SIGBUS handler that this would displace.
        if let Err(e) = unsafe { sigaction(Signal::SIGBUS, &action) } {
            warn!("cannot install the SIGBUS handler; a truncated DMA window will kill the server: {e}");
        }
    });
}

/// The registration of one device's mapped RAM; dropping it ends the guard. Keep it next to
/// the `GuestRam` it was made from and drop both together.
#[derive(Debug, Default)]
pub struct GuardedRam {
    entries: Vec<usize>,
}

impl GuardedRam {
    /// Registers every region of `ram`.
    pub fn new(ram: &GuestRam) -> GuardedRam {
        install();
        let mut entries = Vec::new();
        for region in ram.iter() {
            let start = region.as_ptr() as usize;
            let Some(end) = usize::try_from(region.len())
                .ok()
                .and_then(|len| start.checked_add(len))
            else {
                continue;
            };
            match claim(start, end) {
                Some(entry) => entries.push(entry),
                None => warn!(
                    "{MAX_RANGES} guest RAM ranges are already guarded; a range of {:#x} bytes is not",
                    region.len()
                ),
            }
        }
        GuardedRam { entries }
    }

    /// Whether any of these ranges took a fault since the last call (clears the marks).
    pub fn take_fault(&self) -> bool {
        let mut faulted = false;
        for &entry in &self.entries {
            faulted |= RANGES[entry].faulted.swap(false, Ordering::AcqRel);
        }
        faulted
    }
}

impl Drop for GuardedRam {
    fn drop(&mut self) {
        for &entry in &self.entries {
            let range = &RANGES[entry];
            range.faulted.store(false, Ordering::Release);
            range.start.store(0, Ordering::Release);
            range.end.store(0, Ordering::Release);
        }
    }
}

/// Whether any fault was taken since the last call: one atomic swap on the fast path.
pub fn take_pending() -> bool {
    PENDING.swap(0, Ordering::AcqRel) != 0
}

fn claim(start: usize, end: usize) -> Option<usize> {
    RANGES.iter().position(|range| {
        // `end` claims the entry; `start` is published after it, and the handler ignores an
        // entry whose start is not yet set (start 0 matches no mapped address).
        range
            .end
            .compare_exchange(0, end, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && {
                range.faulted.store(false, Ordering::Release);
                range.start.store(start, Ordering::Release);
                true
            }
    })
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for a handler installed with SA_SIGINFO,
    // and SIGBUS fills in si_addr.
    let address = unsafe { (*info).si_addr() } as usize;
    for range in &RANGES {
        let start = range.start.load(Ordering::Acquire);
        let end = range.end.load(Ordering::Acquire);
        if start == 0 || address < start || address >= end {
            continue;
        }
        if replace_page(address) {
            range.faulted.store(true, Ordering::Release);
            PENDING.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not guest RAM, or the page could not be replaced: die of SIGBUS as without us.
    // SAFETY: restoring the default disposition of SIGBUS is async-signal-safe; returning
    // repeats the access, which then terminates the process.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Puts private anonymous memory over the page holding `address`: a 4 KiB page, or the
/// 2 MiB page when the mapping is made of huge pages (a 4 KiB mmap cannot split those).
fn replace_page(address: usize) -> bool {
    for page in [0x1000usize, 0x20_0000] {
        let base = address & !(page - 1);
        // SAFETY: `base..base + page` lies in guest RAM this process mapped (the caller
        // found it in a registered range) and is lost already; MAP_FIXED replaces exactly
        // that part of the mapping, which is unmapped as a whole later.
        let mapped = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use nix::sys::memfd::{MFdFlags, memfd_create};
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;

    fn ram_over(file: &File, size: usize) -> GuestRam {
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0x10_0000),
            size,
            Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
        )])
        .expect("maps")
    }

    #[test]
    fn a_truncated_window_faults_into_a_mark_not_a_crash() {
        let file = File::from(memfd_create("guarded", MFdFlags::MFD_CLOEXEC).expect("memfd"));
        file.set_len(0x4000).expect("size");
        let ram = ram_over(&file, 0x4000);
        let guard = GuardedRam::new(&ram);
        ram.write_obj(0xabu8, GuestAddress(0x10_3000))
            .expect("write");
        assert!(!guard.take_fault());

        // The client shrinks its file under the mapping.
        file.set_len(0x1000).expect("truncate");
        ram.write_obj(0xcdu8, GuestAddress(0x10_2000))
            .expect("write into a lost page");
        let lost: u8 = ram
            .read_obj(GuestAddress(0x10_3000))
            .expect("read a lost page");
        assert_eq!(lost, 0, "a lost page reads as a fresh anonymous page");
        assert!(take_pending());
        assert!(guard.take_fault(), "the range is marked");
        assert!(!guard.take_fault(), "the mark is taken once");

        // Pages still inside the file are the guest's own.
        ram.write_obj(0x5au8, GuestAddress(0x10_0000))
            .expect("write");
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_at(&file, &mut byte, 0).expect("read file");
        assert_eq!(byte, [0x5a]);
    }

    #[test]
    fn dropping_the_guard_frees_its_entries() {
        let file = File::from(memfd_create("guarded", MFdFlags::MFD_CLOEXEC).expect("memfd"));
        file.set_len(0x1000).expect("size");
        let ram = ram_over(&file, 0x1000);
        let start = ram.iter().next().expect("a region").as_ptr() as usize;
        let guard = GuardedRam::new(&ram);
        assert!(
            RANGES
                .iter()
                .any(|r| r.start.load(Ordering::Acquire) == start)
        );
        drop(guard);
        assert!(
            !RANGES
                .iter()
                .any(|r| r.start.load(Ordering::Acquire) == start)
        );
    }
}
