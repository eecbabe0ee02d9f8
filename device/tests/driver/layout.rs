//! Building what the guest hands the device: page directories (device-abi §4), multi-page buffers, and
//! the page layouts of CQ, QP and SRQ rings (device-abi §6.3), with the driver's index arithmetic (device-abi §6.1).

use vfio_user_pvrdma::abi::{
    CQE_SIZE, PAGE_SIZE, RECV_WQE_HEADER_SIZE, RING_STATE_RX, RING_STATE_TX, SEND_WQE_HEADER_SIZE,
    SGE_SIZE, pdir,
};
use vfio_user_pvrdma::pvrdma::GuestRam;

use super::memory::{self, PageAllocator};

/// A two-level page directory naming `pages` (device-abi §4).
#[derive(Debug, Clone)]
pub struct PageDir {
    pub dir: u64,
    pub tables: Vec<u64>,
    pub pages: Vec<u64>,
}

impl PageDir {
    /// Allocates the directory and `ceil(n / 512)` table pages and fills them.
    pub fn build(alloc: &mut PageAllocator, ram: &GuestRam, pages: Vec<u64>) -> PageDir {
        let dir = alloc.page(ram);
        let count = pages.len() as u64;
        let tables: Vec<u64> = (0..count.div_ceil(pdir::ENTRIES_PER_PAGE))
            .map(|_| alloc.page(ram))
            .collect();
        for (t, table) in tables.iter().enumerate() {
            memory::write_u64(ram, dir + t as u64 * 8, *table);
        }
        for (i, page) in pages.iter().enumerate() {
            let i = i as u64;
            let table = tables[(i / pdir::ENTRIES_PER_PAGE) as usize];
            memory::write_u64(ram, table + (i % pdir::ENTRIES_PER_PAGE) * 8, *page);
        }
        PageDir { dir, tables, pages }
    }

    /// Overwrites entry `index` (a data page address) in its table.
    pub fn set_entry(&self, ram: &GuestRam, index: u64, value: u64) {
        let table = self.tables[(index / pdir::ENTRIES_PER_PAGE) as usize];
        memory::write_u64(ram, table + (index % pdir::ENTRIES_PER_PAGE) * 8, value);
    }

    /// Overwrites directory entry `table` (a table page address).
    pub fn set_table(&self, ram: &GuestRam, table: u64, value: u64) {
        memory::write_u64(ram, self.dir + table * 8, value);
    }

    pub fn count(&self) -> u32 {
        self.pages.len() as u32
    }
}

/// A buffer made of non-contiguous pages, addressed by byte offset.
#[derive(Debug, Clone)]
pub struct PagedBuffer {
    pub pages: Vec<u64>,
}

impl PagedBuffer {
    pub fn len(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Guest address of byte `offset`.
    pub fn addr(&self, offset: u64) -> u64 {
        self.pages[(offset / PAGE_SIZE) as usize] + offset % PAGE_SIZE
    }

    pub fn write(&self, ram: &GuestRam, offset: u64, bytes: &[u8]) {
        self.split(offset, bytes.len(), |addr, range| {
            memory::write_bytes(ram, addr, &bytes[range]);
        });
    }

    pub fn read(&self, ram: &GuestRam, offset: u64, buf: &mut [u8]) {
        let len = buf.len();
        self.split(offset, len, |addr, range| {
            memory::read_bytes(ram, addr, &mut buf[range]);
        });
    }

    /// Calls `f` for every page-bounded piece of `[offset, offset + len)`.
    fn split(&self, offset: u64, len: usize, mut f: impl FnMut(u64, std::ops::Range<usize>)) {
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let in_page = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            f(self.addr(at), done..done + in_page);
            done += in_page;
        }
    }
}

/// The driver's ring index arithmetic, transcribed from `pvrdma_ring.h` (device-abi §6.1). `max` need
/// not be a power of two (the device rings are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIdx {
    pub max: u32,
}

impl RingIdx {
    pub fn valid(&self, idx: u32) -> bool {
        idx & !((self.max << 1) - 1) == 0
    }

    pub fn slot(&self, idx: u32) -> u32 {
        idx & (self.max - 1)
    }

    pub fn next(&self, idx: u32) -> u32 {
        (idx + 1) & ((self.max << 1) - 1)
    }

    /// `pvrdma_idx_ring_has_space`: `None` for an invalid index.
    pub fn has_space(&self, prod: u32, cons: u32) -> Option<bool> {
        (self.valid(prod) && self.valid(cons)).then_some(prod != (cons ^ self.max))
    }

    /// `pvrdma_idx_ring_has_data`.
    pub fn has_data(&self, prod: u32, cons: u32) -> Option<bool> {
        (self.valid(prod) && self.valid(cons)).then_some(prod != cons)
    }
}

/// Where one ring lives: its state words and its elements inside a [`PagedBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Byte offset of `prod_tail` in the buffer (`cons_head` follows).
    pub state: u64,
    /// Byte offset of element 0.
    pub first: u64,
    pub idx: RingIdx,
    pub stride: u64,
}

impl RingLayout {
    pub fn prod_offset(&self) -> u64 {
        self.state
    }

    pub fn cons_offset(&self) -> u64 {
        self.state + 4
    }

    /// Byte offset of the element for index `idx`.
    pub fn elem_offset(&self, idx: u32) -> u64 {
        self.first + u64::from(self.idx.slot(idx)) * self.stride
    }
}

/// `roundup_pow_of_two`.
pub fn pow2(x: u64) -> u64 {
    x.max(1).next_power_of_two()
}

/// Send WQE stride for `sges` SGEs (device-abi §6.3).
pub fn send_stride(sges: u32) -> u64 {
    pow2(SEND_WQE_HEADER_SIZE + SGE_SIZE * u64::from(sges))
}

/// Receive WQE stride for `sges` SGEs (device-abi §6.3).
pub fn recv_stride(sges: u32) -> u64 {
    pow2(RECV_WQE_HEADER_SIZE + SGE_SIZE * u64::from(sges))
}

fn pages_for(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE)
}

/// A ring buffer of `pages` pages (page 0 = ring state) and its directory.
#[derive(Debug, Clone)]
pub struct RingBuffer {
    pub pdir: PageDir,
    pub buf: PagedBuffer,
}

impl RingBuffer {
    pub fn new(alloc: &mut PageAllocator, ram: &GuestRam, pages: u64) -> RingBuffer {
        let pages = alloc.pages(ram, pages);
        RingBuffer {
            pdir: PageDir::build(alloc, ram, pages.clone()),
            buf: PagedBuffer { pages },
        }
    }
}

/// A CQ's pages: state page then `cqe` CQEs. Kernel (`1 + ceil(cqe * 64 / 4096)`) and
/// rdma-core (`4096 + cqe * 64` rounded up) come to the same count.
#[derive(Debug, Clone)]
pub struct CqLayout {
    pub ring: RingBuffer,
    pub cqe: u32,
    pub nchunks: u32,
    pub cq: RingLayout,
}

impl CqLayout {
    pub fn new(alloc: &mut PageAllocator, ram: &GuestRam, cqe: u32) -> CqLayout {
        let nchunks = 1 + pages_for(u64::from(cqe) * CQE_SIZE);
        CqLayout::with_pages(alloc, ram, cqe, nchunks)
    }

    /// A CQ with an explicit page count (for malformed requests).
    pub fn with_pages(
        alloc: &mut PageAllocator,
        ram: &GuestRam,
        cqe: u32,
        nchunks: u64,
    ) -> CqLayout {
        CqLayout {
            ring: RingBuffer::new(alloc, ram, nchunks.max(1)),
            cqe,
            nchunks: nchunks as u32,
            cq: RingLayout {
                state: RING_STATE_RX,
                first: PAGE_SIZE,
                idx: RingIdx { max: cqe.max(1) },
                stride: CQE_SIZE,
            },
        }
    }
}

/// How the guest sizes a QP's buffer (device-abi §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpOwner {
    /// The kernel: SGE counts rounded up to powers of two, rings sized exactly.
    Kernel,
    /// rdma-core: sbuf = ring-state page + SQ, rbuf = RQ, each rounded to whole pages.
    User,
}

/// Sizes of a QP as the guest asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpSizes {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    /// Receives come from an SRQ: no RQ pages.
    pub srq: bool,
}

/// A QP's pages: ring state, SQ, RQ.
#[derive(Debug, Clone)]
pub struct QpLayout {
    pub ring: RingBuffer,
    pub sizes: QpSizes,
    pub send_chunks: u16,
    pub total_chunks: u16,
    pub sq: RingLayout,
    pub rq: Option<RingLayout>,
}

impl QpLayout {
    pub fn new(
        alloc: &mut PageAllocator,
        ram: &GuestRam,
        owner: QpOwner,
        sizes: QpSizes,
    ) -> QpLayout {
        let mut sizes = sizes;
        if owner == QpOwner::Kernel {
            sizes.max_send_sge = pow2(u64::from(sizes.max_send_sge)) as u32;
            if !sizes.srq {
                sizes.max_recv_sge = pow2(u64::from(sizes.max_recv_sge)) as u32;
            }
        }
        let s = send_stride(sizes.max_send_sge);
        let r = recv_stride(sizes.max_recv_sge);
        let sq_pages = pages_for(u64::from(sizes.max_send_wr) * s);
        let rq_pages = if sizes.srq {
            0
        } else {
            pages_for(u64::from(sizes.max_recv_wr) * r)
        };
        // Kernel: send_chunks = SQ pages, total = 1 + SQ + RQ. rdma-core: sbuf = 4 KiB + SQ
        // rounded up, send_chunks = sbuf pages - 1, total = sbuf + rbuf pages: the same.
        let send_chunks = match owner {
            QpOwner::Kernel => sq_pages,
            QpOwner::User => pages_for(PAGE_SIZE + u64::from(sizes.max_send_wr) * s) - 1,
        };
        let total = 1 + send_chunks + rq_pages;
        QpLayout::with_chunks(alloc, ram, sizes, send_chunks, total)
    }

    /// A QP buffer with explicit page counts (for malformed requests). The buffer holds
    /// `max(total, 1 + send_chunks)` pages so that it can be filled whatever the counts say.
    pub fn with_chunks(
        alloc: &mut PageAllocator,
        ram: &GuestRam,
        sizes: QpSizes,
        send_chunks: u64,
        total_chunks: u64,
    ) -> QpLayout {
        let s = send_stride(sizes.max_send_sge);
        let r = recv_stride(sizes.max_recv_sge);
        let pages = total_chunks.max(1 + send_chunks);
        QpLayout {
            ring: RingBuffer::new(alloc, ram, pages),
            sizes,
            send_chunks: send_chunks as u16,
            total_chunks: total_chunks as u16,
            sq: RingLayout {
                state: RING_STATE_TX,
                first: PAGE_SIZE,
                idx: RingIdx {
                    max: sizes.max_send_wr.max(1),
                },
                stride: s,
            },
            rq: (!sizes.srq).then_some(RingLayout {
                state: RING_STATE_RX,
                first: (1 + send_chunks) * PAGE_SIZE,
                idx: RingIdx {
                    max: sizes.max_recv_wr.max(1),
                },
                stride: r,
            }),
        }
    }
}

/// An SRQ's pages: state page (producer at +8) then `max_wr` receive WQEs.
#[derive(Debug, Clone)]
pub struct SrqLayout {
    pub ring: RingBuffer,
    pub max_wr: u32,
    pub max_sge: u32,
    pub nchunks: u32,
    pub rq: RingLayout,
}

impl SrqLayout {
    pub fn new(alloc: &mut PageAllocator, ram: &GuestRam, max_wr: u32, max_sge: u32) -> SrqLayout {
        let stride = recv_stride(max_sge.max(1));
        let nchunks = 1 + pages_for(u64::from(max_wr) * stride);
        SrqLayout {
            ring: RingBuffer::new(alloc, ram, nchunks),
            max_wr,
            max_sge,
            nchunks: nchunks as u32,
            rq: RingLayout {
                state: RING_STATE_RX,
                first: PAGE_SIZE,
                idx: RingIdx { max: max_wr.max(1) },
                stride,
            },
        }
    }
}

/// A user buffer: a virtual address range backed by pinned pages, as `ibv_reg_mr` hands it
/// to the kernel (first page = the page containing `start`).
#[derive(Debug, Clone)]
pub struct UserBuffer {
    pub start: u64,
    pub length: u64,
    pub pdir: PageDir,
}

impl UserBuffer {
    pub fn new(alloc: &mut PageAllocator, ram: &GuestRam, start: u64, length: u64) -> UserBuffer {
        let npages = pages_for((start % PAGE_SIZE) + length);
        let pages = alloc.pages(ram, npages);
        UserBuffer {
            start,
            length,
            pdir: PageDir::build(alloc, ram, pages),
        }
    }

    /// A buffer whose pages are contiguous and in order in guest-physical memory, as a
    /// buffer inside one huge page of a huge-page-backed guest is.
    pub fn contiguous(
        alloc: &mut PageAllocator,
        ram: &GuestRam,
        start: u64,
        length: u64,
    ) -> UserBuffer {
        let npages = pages_for((start % PAGE_SIZE) + length);
        let first = alloc.block(ram, npages);
        let pages = (0..npages).map(|i| first + i * PAGE_SIZE).collect();
        UserBuffer {
            start,
            length,
            pdir: PageDir::build(alloc, ram, pages),
        }
    }

    pub fn nchunks(&self) -> u32 {
        self.pdir.count()
    }

    /// Guest address behind user virtual address `va` (the MR translation of device-abi §5.4).
    pub fn translate(&self, va: u64) -> u64 {
        assert!(va >= self.start && va < self.start + self.length);
        let index = ((va - self.start) + (self.start % PAGE_SIZE)) / PAGE_SIZE;
        self.pdir.pages[index as usize] + va % PAGE_SIZE
    }
}
