//! Rings in guest memory (device-abi §6.1) with the driver's exact index arithmetic.
//!
//! An index runs through `[0, period)`; its slot is `idx & (max - 1)` and the next index is
//! `(idx + 1) & (2 * max - 1)`. For a power-of-two `max` this is a normal ring with a
//! generation bit. The driver's device rings have 1536 and 3072 elements, for which these
//! formulas repeat after 1024 and 2048 increments and use only half the slots (device-abi §6.1): the
//! device must walk the same slots, so it uses the same formulas and never lets more than
//! `period / 2` entries be outstanding.

use super::memory::{self, GuestFault, GuestRam};
use crate::abi::PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring index {0:#x} is invalid")]
    BadIndex(u32),
    #[error("ring is full")]
    Full,
    #[error(transparent)]
    Fault(#[from] GuestFault),
}

/// Index arithmetic of a ring of `max` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indices {
    max: u32,
    mask: u32,
    period: u32,
}

impl Indices {
    /// `max` must be at least 1 and small enough that `2 * max` fits.
    pub fn new(max: u32) -> Option<Indices> {
        let mask = max.checked_mul(2)?.checked_sub(1)?;
        let period = 1u32.checked_shl(mask.trailing_ones())?;
        Some(Indices { max, mask, period })
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Increments after which the index sequence repeats.
    pub fn period(&self) -> u32 {
        self.period
    }

    /// Whether the guest could have produced `idx` with the driver's formulas.
    pub fn valid(&self, idx: u32) -> bool {
        idx & !self.mask == 0 && idx < self.period
    }

    pub fn slot(&self, idx: u32) -> u32 {
        idx & (self.max - 1)
    }

    pub fn next(&self, idx: u32) -> u32 {
        (idx + 1) & self.mask
    }

    /// Entries between `cons` and `prod` (both valid).
    pub fn pending(&self, prod: u32, cons: u32) -> u32 {
        prod.wrapping_sub(cons) & (self.period - 1)
    }

    /// Most entries that may be outstanding without two sharing a slot.
    pub fn capacity(&self) -> u32 {
        self.period() / 2
    }
}

/// A ring whose elements live in guest pages and whose two indices live in a ring-state
/// page. The device keeps its own copy of the index it owns and never re-reads it.
#[derive(Debug, Clone)]
pub struct Ring {
    indices: Indices,
    /// Address of `prod_tail`; `cons_head` follows it.
    state: u64,
    pages: Vec<u64>,
    elem_size: u64,
    /// The index the device owns: `cons_head` of a ring it consumes, `prod_tail` of a ring
    /// it produces.
    own: u32,
}

impl Ring {
    /// `pages` hold the elements in order; they must cover `max * elem_size` bytes.
    pub fn new(indices: Indices, state: u64, pages: Vec<u64>, elem_size: u64) -> Option<Ring> {
        let bytes = u64::from(indices.max()).checked_mul(elem_size)?;
        (elem_size > 0 && bytes <= pages.len() as u64 * PAGE_SIZE).then_some(Ring {
            indices,
            state,
            pages,
            elem_size,
            own: 0,
        })
    }

    pub fn indices(&self) -> Indices {
        self.indices
    }

    fn prod_addr(&self) -> u64 {
        self.state
    }

    fn cons_addr(&self) -> u64 {
        self.state + 4
    }

    /// Adopts the current value of the device-owned index from guest memory (at creation;
    /// the guest zeroes it) after validating it.
    pub fn adopt_consumer(&mut self, mem: &GuestRam) -> Result<(), RingError> {
        self.own = self.checked(memory::load_u32(mem, self.cons_addr())?)?;
        Ok(())
    }

    pub fn adopt_producer(&mut self, mem: &GuestRam) -> Result<(), RingError> {
        self.own = self.checked(memory::load_u32(mem, self.prod_addr())?)?;
        Ok(())
    }

    /// Restarts both indices at 0 (a QP moving to RESET).
    pub fn restart(&mut self, mem: &GuestRam) -> Result<(), GuestFault> {
        self.own = 0;
        memory::store_u32(mem, self.cons_addr(), 0)
    }

    fn checked(&self, idx: u32) -> Result<u32, RingError> {
        if self.indices.valid(idx) {
            Ok(idx)
        } else {
            Err(RingError::BadIndex(idx))
        }
    }

    fn elem_addr(&self, slot: u32) -> Result<u64, RingError> {
        let offset = u64::from(slot) * self.elem_size;
        let page = self
            .pages
            .get(usize::try_from(offset / PAGE_SIZE).unwrap_or(usize::MAX))
            .ok_or(RingError::BadIndex(slot))?;
        Ok(page + offset % PAGE_SIZE)
    }

    /// Reads element `slot` into `buf` (up to `elem_size` bytes), splitting at page ends.
    fn read_elem(&self, mem: &GuestRam, slot: u32, buf: &mut [u8]) -> Result<(), RingError> {
        let mut done = 0usize;
        while done < buf.len() {
            let offset = u64::from(slot) * self.elem_size + done as u64;
            let page = self
                .pages
                .get(usize::try_from(offset / PAGE_SIZE).unwrap_or(usize::MAX))
                .ok_or(RingError::BadIndex(slot))?;
            let in_page = ((PAGE_SIZE - offset % PAGE_SIZE) as usize).min(buf.len() - done);
            memory::read_bytes(
                mem,
                page + offset % PAGE_SIZE,
                &mut buf[done..done + in_page],
            )?;
            done += in_page;
        }
        Ok(())
    }

    // ---- device as consumer (SQ, RQ, SRQ) ----

    /// The next element the guest produced, copied into `buf`, or `None` when the ring is
    /// empty. The element is not consumed until [`Ring::consume`].
    pub fn peek(&self, mem: &GuestRam, buf: &mut [u8]) -> Result<Option<()>, RingError> {
        let prod = self.checked(memory::load_u32(mem, self.prod_addr())?)?;
        if prod == self.own {
            return Ok(None);
        }
        if self.indices.pending(prod, self.own) > self.indices.capacity() {
            return Err(RingError::BadIndex(prod));
        }
        let len = buf
            .len()
            .min(usize::try_from(self.elem_size).unwrap_or(usize::MAX));
        self.read_elem(mem, self.indices.slot(self.own), &mut buf[..len])?;
        Ok(Some(()))
    }

    /// As [`Ring::peek`], for the element `ahead` places after the next one (work already
    /// issued but not yet consumed sits in between).
    pub fn peek_ahead(
        &self,
        mem: &GuestRam,
        ahead: u32,
        buf: &mut [u8],
    ) -> Result<Option<()>, RingError> {
        let prod = self.checked(memory::load_u32(mem, self.prod_addr())?)?;
        let pending = self.indices.pending(prod, self.own);
        if pending > self.indices.capacity() {
            return Err(RingError::BadIndex(prod));
        }
        if pending <= ahead {
            return Ok(None);
        }
        let mut idx = self.own;
        for _ in 0..ahead {
            idx = self.indices.next(idx);
        }
        let len = buf
            .len()
            .min(usize::try_from(self.elem_size).unwrap_or(usize::MAX));
        self.read_elem(mem, self.indices.slot(idx), &mut buf[..len])?;
        Ok(Some(()))
    }

    /// Frees the element returned by the last `peek` for the guest.
    pub fn consume(&mut self, mem: &GuestRam) -> Result<(), GuestFault> {
        self.own = self.indices.next(self.own);
        memory::store_u32(mem, self.cons_addr(), self.own)
    }

    /// Entries the guest has produced and the device not yet consumed.
    pub fn backlog(&self, mem: &GuestRam) -> Result<u32, RingError> {
        let prod = self.checked(memory::load_u32(mem, self.prod_addr())?)?;
        Ok(self.indices.pending(prod, self.own))
    }

    // ---- device as producer (CQ, async events, CQ notifications) ----

    /// Elements the device produced that the guest has not consumed yet.
    pub fn unconsumed(&self, mem: &GuestRam) -> Result<u32, RingError> {
        let cons = self.checked(memory::load_u32(mem, self.cons_addr())?)?;
        Ok(self.indices.pending(self.own, cons))
    }

    /// Appends `bytes` as the next element and publishes it; `Full` leaves the ring untouched.
    pub fn push(&mut self, mem: &GuestRam, bytes: &[u8]) -> Result<(), RingError> {
        let cons = self.checked(memory::load_u32(mem, self.cons_addr())?)?;
        if self.indices.pending(self.own, cons) >= self.indices.capacity() {
            return Err(RingError::Full);
        }
        let addr = self.elem_addr(self.indices.slot(self.own))?;
        memory::write_bytes(
            mem,
            addr,
            &bytes[..bytes.len().min(self.elem_size as usize)],
        )?;
        self.own = self.indices.next(self.own);
        memory::store_u32(mem, self.prod_addr(), self.own)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvrdma::memory::test_ram;

    /// The driver's own formulas, transcribed, to check ours against.
    fn driver_next(idx: u32, max: u32) -> u32 {
        (idx + 1) & ((max << 1) - 1)
    }

    #[test]
    fn index_arithmetic_matches_the_driver_for_device_ring_sizes() {
        for max in [1536u32, 3072, 512, 1, 4096] {
            let indices = Indices::new(max).unwrap();
            let mut idx = 0;
            let mut seen = std::collections::HashSet::new();
            for _ in 0..3 * indices.period() {
                assert!(indices.valid(idx));
                assert!(indices.slot(idx) < max);
                seen.insert(indices.slot(idx));
                assert_eq!(indices.next(idx), driver_next(idx, max));
                idx = indices.next(idx);
            }
            assert_eq!(seen.len() as u32, indices.capacity(), "max {max}");
        }
        assert_eq!(Indices::new(1536).unwrap().period(), 1024);
        assert_eq!(Indices::new(3072).unwrap().period(), 2048);
        assert!(Indices::new(0).is_none());
        assert!(Indices::new(u32::MAX).is_none());
        assert!(!Indices::new(1536).unwrap().valid(2048));
    }

    fn ring(mem: &GuestRam, max: u32, elem: u64) -> Ring {
        let pages = (1..=4).map(|p| p * PAGE_SIZE).collect();
        let mut ring = Ring::new(Indices::new(max).unwrap(), 8, pages, elem).unwrap();
        ring.adopt_producer(mem).unwrap();
        ring
    }

    #[test]
    fn producer_stops_at_capacity_and_resumes_when_consumed() {
        let mem = test_ram(64 << 10);
        let mut ring = ring(&mem, 4, 64);
        for i in 0..4u8 {
            ring.push(&mem, &[i; 64]).unwrap();
        }
        assert_eq!(ring.push(&mem, &[9; 64]), Err(RingError::Full));
        assert_eq!(memory::load_u32(&mem, 8).unwrap(), 4);
        memory::store_u32(&mem, 12, 1).unwrap();
        ring.push(&mem, &[4; 64]).unwrap();
        // Slot 0 was reused by element 4.
        assert_eq!(memory::read::<[u8; 64]>(&mem, PAGE_SIZE).unwrap(), [4; 64]);
        memory::store_u32(&mem, 12, 0x1000).unwrap();
        assert_eq!(ring.push(&mem, &[5; 64]), Err(RingError::BadIndex(0x1000)));
    }

    #[test]
    fn consumer_sees_elements_in_order_and_rejects_corrupt_producers() {
        let mem = test_ram(64 << 10);
        let pages = vec![PAGE_SIZE];
        let mut ring = Ring::new(Indices::new(8).unwrap(), 0, pages, 128).unwrap();
        ring.adopt_consumer(&mem).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(ring.peek(&mem, &mut buf), Ok(None));
        memory::write(&mem, PAGE_SIZE + 128, &[7u8; 16]).unwrap();
        memory::store_u32(&mem, 0, 2).unwrap();
        ring.peek(&mem, &mut buf).unwrap().unwrap();
        ring.consume(&mem).unwrap();
        ring.peek(&mem, &mut buf).unwrap().unwrap();
        assert_eq!(buf, [7; 16]);
        ring.consume(&mem).unwrap();
        assert_eq!(memory::load_u32(&mem, 4).unwrap(), 2);
        assert_eq!(ring.peek(&mem, &mut buf), Ok(None));
        memory::store_u32(&mem, 0, 0xffff).unwrap();
        assert_eq!(ring.peek(&mem, &mut buf), Err(RingError::BadIndex(0xffff)));
    }

    #[test]
    fn rings_must_fit_their_pages() {
        assert!(Ring::new(Indices::new(64).unwrap(), 0, vec![0], 128).is_none());
        assert!(Ring::new(Indices::new(32).unwrap(), 0, vec![0], 128).is_some());
        assert!(Ring::new(Indices::new(32).unwrap(), 0, vec![0], 0).is_none());
    }
}
