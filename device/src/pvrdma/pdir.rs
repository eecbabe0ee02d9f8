//! Page directories (device-abi §4): the two-level tables through which the guest describes every
//! multi-page buffer. Resolving one validates every entry the count says is meaningful.

use super::memory::{self, GuestRam};
use crate::abi::{PAGE_SIZE, pdir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PdirError {
    #[error("page count {0} is zero or above the directory's limit")]
    BadCount(u64),
    #[error("page directory address {0:#x} is not page-aligned")]
    Misaligned(u64),
    #[error("page {index} of the directory points at {addr:#x}, which is not a page of guest RAM")]
    BadPage { index: u64, addr: u64 },
    #[error(transparent)]
    Fault(#[from] memory::GuestFault),
}

/// Resolves the first `count` data pages named by the directory at `pdir_dma`.
pub fn resolve(mem: &GuestRam, pdir_dma: u64, count: u64) -> Result<Vec<u64>, PdirError> {
    if count == 0 || count > pdir::MAX_PAGES {
        return Err(PdirError::BadCount(count));
    }
    check_page(mem, pdir_dma).map_err(|_| PdirError::Misaligned(pdir_dma))?;
    let tables = count.div_ceil(pdir::ENTRIES_PER_PAGE);
    let mut pages = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for table in 0..tables {
        let table_addr: u64 = memory::read(mem, pdir_dma + table * 8)?;
        check_page(mem, table_addr).map_err(|_| PdirError::BadPage {
            index: table,
            addr: table_addr,
        })?;
        let in_table = (count - table * pdir::ENTRIES_PER_PAGE).min(pdir::ENTRIES_PER_PAGE);
        let mut entries = vec![0u8; usize::try_from(in_table * 8).unwrap_or(0)];
        memory::read_bytes(mem, table_addr, &mut entries)?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let addr = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            let index = table * pdir::ENTRIES_PER_PAGE + i as u64;
            check_page(mem, addr).map_err(|_| PdirError::BadPage { index, addr })?;
            pages.push(addr);
        }
    }
    Ok(pages)
}

/// A page-aligned address whose whole page is guest RAM. A range check against the mapped
/// regions, touching no guest memory: a 1 GiB registration checks 262 144 pages.
fn check_page(mem: &GuestRam, addr: u64) -> Result<(), ()> {
    if !addr.is_multiple_of(PAGE_SIZE) || !memory::is_ram(mem, addr, PAGE_SIZE) {
        return Err(());
    }
    Ok(())
}

/// Test helper: lays out a directory for `pages` at `dir`, with table pages from `tables`.
#[cfg(test)]
pub fn build(mem: &GuestRam, dir: u64, tables: &[u64], pages: &[u64]) {
    for (t, chunk) in pages.chunks(512).enumerate() {
        memory::write(mem, dir + t as u64 * 8, &tables[t]).unwrap();
        for (i, page) in chunk.iter().enumerate() {
            memory::write(mem, tables[t] + i as u64 * 8, page).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvrdma::memory::test_ram;

    #[test]
    fn resolves_pages_across_tables() {
        let mem = test_ram(2 << 20);
        let pages: Vec<u64> = (0..600)
            .map(|i| 0x10_0000 + (i % 200) * PAGE_SIZE)
            .collect();
        build(&mem, 0x1000, &[0x2000, 0x3000], &pages);
        assert_eq!(resolve(&mem, 0x1000, 600).unwrap(), pages);
        assert_eq!(resolve(&mem, 0x1000, 3).unwrap(), pages[..3]);
    }

    #[test]
    fn rejects_bad_counts_and_entries() {
        let mem = test_ram(1 << 20);
        build(&mem, 0x1000, &[0x2000], &[0x4000, 0x5001, 1 << 40]);
        assert_eq!(resolve(&mem, 0x1000, 0), Err(PdirError::BadCount(0)));
        assert!(matches!(
            resolve(&mem, 0x1000, pdir::MAX_PAGES + 1),
            Err(PdirError::BadCount(_))
        ));
        assert_eq!(resolve(&mem, 0x1008, 1), Err(PdirError::Misaligned(0x1008)));
        assert_eq!(
            resolve(&mem, 0x1000, 2),
            Err(PdirError::BadPage {
                index: 1,
                addr: 0x5001
            })
        );
        memory::write(&mem, 0x2008, &(1u64 << 40)).unwrap();
        assert_eq!(
            resolve(&mem, 0x1000, 2),
            Err(PdirError::BadPage {
                index: 1,
                addr: 1 << 40
            })
        );
        // The directory's own table pointer may be garbage too.
        memory::write(&mem, 0x1000, &0xdead_0000u64).unwrap();
        assert!(matches!(
            resolve(&mem, 0x1000, 1),
            Err(PdirError::BadPage { index: 0, .. })
        ));
    }
}
