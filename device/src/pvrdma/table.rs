//! Handle tables: every object the guest creates lives in one, under a handle the device
//! chose. Handles are bounded by the table size (the driver indexes arrays with them) and
//! never 0 unless the table allows it (rdma-core reads QP handle 0 as "none").

/// A fixed-capacity table of objects addressed by handles in `[first, capacity)`.
#[derive(Debug)]
pub struct HandleTable<T> {
    slots: Vec<Option<T>>,
    first: u32,
    len: usize,
    /// One past the highest occupied slot: iteration stops there, so visiting every object
    /// (the exit-free poller does, on every poll) costs what is in use, not the capacity.
    high: usize,
}

impl<T> HandleTable<T> {
    /// A table whose handles run from `first` up to `capacity - 1`.
    pub fn new(first: u32, capacity: u32) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(capacity as usize, || None);
        HandleTable {
            slots,
            first,
            len: 0,
            high: 0,
        }
    }

    /// Stores `value` under the lowest free handle; `None` when the table is full.
    pub fn insert(&mut self, value: T) -> Option<u32> {
        let start = self.first as usize;
        let index = start + self.slots.get(start..)?.iter().position(Option::is_none)?;
        self.slots[index] = Some(value);
        self.len += 1;
        self.high = self.high.max(index + 1);
        u32::try_from(index).ok()
    }

    /// Stores `value` under exactly `handle` if it is free and in range.
    pub fn insert_at(&mut self, handle: u32, value: T) -> bool {
        match self.slots.get_mut(handle as usize) {
            Some(slot @ None) => {
                *slot = Some(value);
                self.len += 1;
                self.high = self.high.max(handle as usize + 1);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, handle: u32) -> Option<&T> {
        self.slots.get(handle as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, handle: u32) -> Option<&mut T> {
        self.slots.get_mut(handle as usize)?.as_mut()
    }

    pub fn remove(&mut self, handle: u32) -> Option<T> {
        let value = self.slots.get_mut(handle as usize)?.take();
        if value.is_some() {
            self.len -= 1;
            while self.high > 0 && self.slots[self.high - 1].is_none() {
                self.high -= 1;
            }
        }
        value
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots[..self.high]
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| Some((u32::try_from(i).ok()?, slot.as_ref()?)))
    }

    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|slot| *slot = None);
        self.len = 0;
        self.high = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_stay_in_range_reuse_freed_slots_and_fill_up() {
        let mut table = HandleTable::new(1, 4);
        assert_eq!(table.insert('a'), Some(1));
        assert_eq!(table.insert('b'), Some(2));
        assert_eq!(table.insert('c'), Some(3));
        assert_eq!(table.insert('d'), None, "handle 4 would be out of range");
        assert_eq!(table.remove(2), Some('b'));
        assert_eq!(table.remove(2), None, "double remove");
        assert_eq!(table.insert('e'), Some(2));
        assert_eq!(table.get(0), None);
        assert_eq!(table.get(u32::MAX), None);
        assert!(!table.insert_at(0, 'z') || table.get(0) == Some(&'z'));
        assert!(!table.insert_at(1, 'y'), "occupied");
        assert!(!table.insert_at(9, 'y'), "out of range");
        assert_eq!(table.len(), 4);
        table.clear();
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn iteration_sees_exactly_the_objects_in_use_whatever_the_order_of_removal() {
        let mut table = HandleTable::new(1, 64);
        let keys = |t: &HandleTable<u32>| t.iter().map(|(h, v)| (h, *v)).collect::<Vec<_>>();
        for v in 0..5 {
            table.insert(v * 10);
        }
        assert!(table.insert_at(40, 400));
        assert_eq!(
            keys(&table),
            [(1, 0), (2, 10), (3, 20), (4, 30), (5, 40), (40, 400)]
        );
        table.remove(40);
        table.remove(3);
        assert_eq!(keys(&table), [(1, 0), (2, 10), (4, 30), (5, 40)]);
        table.remove(5);
        table.remove(4);
        assert_eq!(keys(&table), [(1, 0), (2, 10)]);
        assert_eq!(table.insert(7), Some(3), "the lowest free handle");
        assert!(table.insert_at(63, 630), "the last handle");
        assert_eq!(keys(&table), [(1, 0), (2, 10), (3, 7), (63, 630)]);
        table.clear();
        assert_eq!(keys(&table), []);
        assert_eq!(table.insert(1), Some(1));
        assert_eq!(keys(&table), [(1, 1)]);
    }
}
