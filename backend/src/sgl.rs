//! Scatter-gather lists over guest memory and the copy between two of them.

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::GuestMemory;

/// `len` bytes of guest memory at guest-physical `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

const PAGE: u64 = 4096;
/// Largest merged segment (keeps lengths in a u32 with room to spare).
const MAX_SEGMENT: u32 = 1 << 30;

/// A scatter-gather list: segments in order. Physically contiguous pieces are merged into
/// one segment, so a buffer whose pages happen to be contiguous is copied in large runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sgl {
    segments: Vec<Segment>,
    len: u64,
}

impl Sgl {
    pub fn new() -> Sgl {
        Sgl::default()
    }

    /// Room for `segments` more segments without reallocating (a buffer of n pages needs
    /// at most n).
    pub fn reserve(&mut self, segments: usize) {
        self.segments.reserve(segments);
    }

    /// Appends `[addr, addr + len)`, merged with the last segment when it continues it.
    /// `None` if it wraps.
    pub fn push(&mut self, addr: u64, len: u64) -> Option<()> {
        addr.checked_add(len)?;
        let (mut addr, mut left) = (addr, len);
        while left > 0 {
            if let Some(last) = self.segments.last_mut()
                && last.addr + u64::from(last.len) == addr
                && last.len < MAX_SEGMENT
            {
                let grow = left.min(u64::from(MAX_SEGMENT - last.len));
                last.len += grow as u32;
                addr += grow;
                left -= grow;
                continue;
            }
            let chunk = left.min(u64::from(MAX_SEGMENT));
            self.segments.push(Segment {
                addr,
                len: chunk as u32,
            });
            addr += chunk;
            left -= chunk;
        }
        self.len = self.len.checked_add(len)?;
        Some(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The first `len` bytes as a new list.
    pub fn prefix(&self, len: u64) -> Sgl {
        self.slice(0, len)
    }

    /// Bytes `[offset, offset + len)` as a new list (clipped to the list's end).
    pub fn slice(&self, offset: u64, len: u64) -> Sgl {
        let mut out = Sgl::new();
        let (mut skip, mut left) = (offset, len);
        for seg in &self.segments {
            if left == 0 {
                break;
            }
            let seg_len = u64::from(seg.len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let take = (seg_len - skip).min(left);
            out.segments.push(Segment {
                addr: seg.addr + skip,
                len: take as u32,
            });
            out.len += take;
            left -= take;
            skip = 0;
        }
        out
    }
}

/// Appends `len` bytes of `sgl`, starting `offset` bytes in, read from `mem`, to `out`:
/// what a transport sends for a payload that leaves the host.
pub fn gather(
    mem: &GuestMemory,
    sgl: &Sgl,
    offset: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> Result<(), CopyError> {
    use vm_memory::Bytes;
    let (mut skip, mut left) = (offset, len);
    for seg in &sgl.segments {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(left);
        let start = out.len();
        out.resize(start + take as usize, 0);
        mem.read_slice(&mut out[start..], GuestAddress(seg.addr + skip))
            .map_err(|_| CopyError::Unmapped(seg.addr + skip))?;
        left -= take;
        skip = 0;
    }
    if left > 0 {
        return Err(CopyError::Unmapped(offset + len - left));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
}

/// Copies `src` (in `src_mem`) into `dst` (in `dst_mem`), as many bytes as the shorter list
/// holds, straight from one guest's memory into the other's: no intermediate buffer, no
/// system call. Returns the bytes copied. Both may be the same memory (loopback).
pub fn copy(
    src_mem: &GuestMemory,
    src: &Sgl,
    dst_mem: &GuestMemory,
    dst: &Sgl,
) -> Result<u64, CopyError> {
    let total = src.len().min(dst.len());
    let (mut si, mut so, mut di, mut doff) = (0usize, 0u64, 0usize, 0u64);
    let mut done = 0u64;
    while done < total {
        let (s, d) = (src.segments[si], dst.segments[di]);
        let mut chunk = (u64::from(s.len) - so)
            .min(u64::from(d.len) - doff)
            .min(total - done);
        let (from_addr, to_addr) = (s.addr + so, d.addr + doff);
        let whole = src_mem
            .get_slice(GuestAddress(from_addr), chunk as usize)
            .and_then(|from| {
                Ok((
                    from,
                    dst_mem.get_slice(GuestAddress(to_addr), chunk as usize)?,
                ))
            });
        let (from, to) = match whole {
            Ok(slices) => slices,
            // A merged segment may span two mapped regions (DMA windows that are adjacent
            // in guest-physical space); such a run is copied page by page.
            Err(_) => {
                chunk = chunk
                    .min(PAGE - from_addr % PAGE)
                    .min(PAGE - to_addr % PAGE);
                let from = src_mem
                    .get_slice(GuestAddress(from_addr), chunk as usize)
                    .map_err(|_| CopyError::Unmapped(from_addr))?;
                let to = dst_mem
                    .get_slice(GuestAddress(to_addr), chunk as usize)
                    .map_err(|_| CopyError::Unmapped(to_addr))?;
                (from, to)
            }
        };
        from.copy_to_volatile_slice(to);
        done += chunk;
        so += chunk;
        doff += chunk;
        if so == u64::from(s.len) {
            si += 1;
            so = 0;
        }
        if doff == u64::from(d.len) {
            di += 1;
            doff = 0;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn ram() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap()
    }

    #[test]
    fn push_merges_contiguous_pieces_and_rejects_wrapping() {
        let mut sgl = Sgl::new();
        sgl.push(4000, 96).unwrap();
        sgl.push(4096, 104).unwrap();
        sgl.push(9000, 10).unwrap();
        assert_eq!(
            sgl.segments(),
            [
                Segment {
                    addr: 4000,
                    len: 200
                },
                Segment {
                    addr: 9000,
                    len: 10
                }
            ]
        );
        assert_eq!(sgl.len(), 210);
        assert!(sgl.push(u64::MAX - 1, 4).is_none());
        assert_eq!(sgl.prefix(100).len(), 100);
        assert_eq!(sgl.prefix(205).segments().len(), 2);
    }

    #[test]
    fn a_slice_covers_exactly_its_bytes_across_segments() {
        let mut sgl = Sgl::new();
        sgl.push(1000, 100).unwrap();
        sgl.push(5000, 50).unwrap();
        let seg = |addr, len| Segment { addr, len };
        assert_eq!(sgl.slice(90, 20).segments(), [seg(1090, 10), seg(5000, 10)]);
        assert_eq!(sgl.slice(100, 50).segments(), [seg(5000, 50)]);
        assert_eq!(sgl.slice(140, 99).len(), 10, "clipped at the end");
        assert!(sgl.slice(150, 10).is_empty());
        assert!(sgl.slice(0, 0).is_empty());
    }

    #[test]
    fn copy_crosses_adjacent_regions_page_by_page() {
        // Two mappings adjacent in guest-physical space: one merged segment spans both.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8192), (GuestAddress(8192), 8192)])
            .unwrap();
        let data: Vec<u8> = (0..=255).cycle().take(6000).collect();
        mem.write_slice(&data, GuestAddress(5000)).unwrap();
        let mut src = Sgl::new();
        src.push(5000, 6000).unwrap();
        assert_eq!(src.segments().len(), 1);
        let mut dst = Sgl::new();
        dst.push(100, 6000).unwrap();
        assert_eq!(copy(&mem, &src, &mem, &dst), Ok(6000));
        let mut out = vec![0u8; 6000];
        mem.read_slice(&mut out, GuestAddress(100)).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn copy_moves_bytes_across_uneven_segments() {
        let mem = ram();
        let data: Vec<u8> = (0..=255).cycle().take(10_000).collect();
        mem.write_slice(&data, GuestAddress(100)).unwrap();
        let mut src = Sgl::new();
        src.push(100, 3000).unwrap();
        src.push(3100, 7000).unwrap();
        let mut dst = Sgl::new();
        dst.push(40_000, 5).unwrap();
        dst.push(20_000, 9995).unwrap();
        assert_eq!(copy(&mem, &src, &mem, &dst), Ok(10_000));
        let mut out = vec![0u8; 10_000];
        mem.read_slice(&mut out[..5], GuestAddress(40_000)).unwrap();
        mem.read_slice(&mut out[5..], GuestAddress(20_000)).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn gather_reads_a_window_of_a_list() {
        let mem = ram();
        let data: Vec<u8> = (0..=255).cycle().take(5000).collect();
        mem.write_slice(&data, GuestAddress(100)).unwrap();
        let mut sgl = Sgl::new();
        sgl.push(100, 1000).unwrap();
        sgl.push(9000, 10).unwrap();
        sgl.push(1100, 4000).unwrap();
        mem.write_slice(b"0123456789", GuestAddress(9000)).unwrap();
        let mut out = vec![0xaa];
        gather(&mem, &sgl, 995, 20, &mut out).unwrap();
        let mut expected = vec![0xaa];
        expected.extend_from_slice(&data[995..1000]);
        expected.extend_from_slice(b"0123456789");
        expected.extend_from_slice(&data[1000..1005]);
        assert_eq!(out, expected);
        // Past the list's end, or unmapped memory, is an error.
        assert!(gather(&mem, &sgl, 5000, 20, &mut Vec::new()).is_err());
        let mut far = Sgl::new();
        far.push(1 << 30, 10).unwrap();
        assert!(gather(&mem, &far, 0, 10, &mut Vec::new()).is_err());
    }

    #[test]
    fn copy_stops_at_the_shorter_list_and_faults_cleanly() {
        let mem = ram();
        let mut src = Sgl::new();
        src.push(0, 100).unwrap();
        let mut dst = Sgl::new();
        dst.push(1000, 10).unwrap();
        assert_eq!(copy(&mem, &src, &mem, &dst), Ok(10));
        let mut far = Sgl::new();
        far.push(1 << 30, 10).unwrap();
        assert_eq!(
            copy(&mem, &src, &mem, &far),
            Err(CopyError::Unmapped(1 << 30))
        );
    }
}
