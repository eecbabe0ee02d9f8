//! The bytes queued for one link: frames appended at the back, written from the front.

/// A byte queue that hands out its unwritten bytes as one slice. Written bytes are dropped
/// by moving a cursor; the rest moves to the front only once more than half the buffer is
/// written, so a socket taking a few KiB of a 1 MiB queue at a time costs no copy of the
/// remainder per write (`Vec::drain` did, and showed in profiles of 64 KiB WRITEs).
#[derive(Debug, Default)]
pub struct OutQueue {
    bytes: Vec<u8>,
    start: usize,
}

impl OutQueue {
    /// Bytes not written yet.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.start = 0;
    }

    /// What is still to be written, in order.
    pub fn unwritten(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// `n` bytes from the front were written.
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.bytes.len() {
            self.clear();
        }
    }

    /// Where to append frames.
    pub fn tail(&mut self) -> &mut Vec<u8> {
        if self.start > 0 && self.start >= self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        &mut self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_the_order_they_went_in_across_partial_writes() {
        let mut q = OutQueue::default();
        let mut written = Vec::new();
        let mut next = 0u8;
        for round in 0..200usize {
            for _ in 0..(round % 7) * 3 {
                q.tail().push(next);
                next = next.wrapping_add(1);
            }
            let n = (round % 5) * 2;
            let take = n.min(q.len());
            written.extend_from_slice(&q.unwritten()[..take]);
            q.consume(n);
        }
        written.extend_from_slice(q.unwritten());
        let all: Vec<u8> = (0..written.len()).map(|i| i as u8).collect();
        assert_eq!(written, all);
    }

    #[test]
    fn the_written_front_is_reclaimed_once_it_is_half_the_buffer() {
        let mut q = OutQueue::default();
        q.tail().extend_from_slice(&[1; 100]);
        q.consume(40);
        q.tail().push(2);
        assert_eq!(q.bytes.len(), 101, "less than half written: nothing moved");
        q.consume(20);
        q.tail().push(3);
        assert_eq!((q.start, q.len()), (0, 42));
        assert_eq!(q.unwritten()[40..], [2, 3]);
        q.consume(1000);
        assert!(q.is_empty() && q.bytes.is_empty());
    }
}
