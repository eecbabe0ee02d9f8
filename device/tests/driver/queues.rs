//! The guest side of the rings (device-abi §6) and doorbells (device-abi §7): posting send and receive WQEs,
//! ringing doorbells, polling CQs, draining the async event and CQ notification rings.

use vfio_user_pvrdma::abi::{Cqe, Cqne, Eqe, PAGE_SIZE, RecvWqeHeader, SendWqeHeader, Sge, uar};
use vfio_user_pvrdma::pvrdma::GuestRam;
use zerocopy::{FromBytes, IntoBytes};

use super::bus::{BAR_UAR, Bus};
use super::layout::{CqLayout, PagedBuffer, QpLayout, RingLayout, SrqLayout, UserBuffer};
use super::{DeviceRing, Driver};

/// A user context: its handle and UAR page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uc {
    pub handle: u32,
    pub uar: u32,
}

/// The kernel's "context": objects with ctx 0 ring doorbells on UAR page 0.
pub const KERNEL_UC: Uc = Uc { handle: 0, uar: 0 };

#[derive(Debug, Clone)]
pub struct Mr {
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
    pub buffer: Option<UserBuffer>,
}

#[derive(Debug, Clone)]
pub struct Cq {
    pub handle: u32,
    pub uc: Uc,
    pub layout: CqLayout,
}

#[derive(Debug, Clone)]
pub struct Srq {
    pub handle: u32,
    pub uc: Uc,
    pub pd: u32,
    pub layout: SrqLayout,
}

#[derive(Debug, Clone)]
pub struct Qp {
    pub handle: u32,
    pub qpn: u32,
    pub uc: Uc,
    pub qp_type: u8,
    pub pd: u32,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub layout: QpLayout,
}

/// A ring index the driver found invalid (`PVRDMA_INVALID_IDX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidIndex {
    pub prod: u32,
    pub cons: u32,
}

/// Why a post failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostError {
    Full,
    Invalid(InvalidIndex),
}

fn ring_indices(ram: &GuestRam, buf: &PagedBuffer, ring: &RingLayout) -> (u32, u32) {
    let mut state = [0u8; 8];
    buf.read(ram, ring.state, &mut state);
    (
        u32::from_le_bytes(state[..4].try_into().unwrap()),
        u32::from_le_bytes(state[4..].try_into().unwrap()),
    )
}

fn write_index(ram: &GuestRam, buf: &PagedBuffer, offset: u64, value: u32) {
    buf.write(ram, offset, &value.to_le_bytes());
}

/// Appends one element as the producer (guest) of `ring`.
fn produce(
    ram: &GuestRam,
    buf: &PagedBuffer,
    ring: &RingLayout,
    elem: &[u8],
) -> Result<(), PostError> {
    assert!(
        elem.len() as u64 <= ring.stride,
        "WQE larger than its stride"
    );
    let (prod, cons) = ring_indices(ram, buf, ring);
    match ring.idx.has_space(prod, cons) {
        None => return Err(PostError::Invalid(InvalidIndex { prod, cons })),
        Some(false) => return Err(PostError::Full),
        Some(true) => {}
    }
    buf.write(ram, ring.elem_offset(prod), elem);
    write_index(ram, buf, ring.prod_offset(), ring.idx.next(prod));
    Ok(())
}

/// Takes one element as the consumer (guest) of `ring`.
fn consume(
    ram: &GuestRam,
    buf: &PagedBuffer,
    ring: &RingLayout,
    elem: &mut [u8],
) -> Result<bool, InvalidIndex> {
    let (prod, cons) = ring_indices(ram, buf, ring);
    match ring.idx.has_data(prod, cons) {
        None => Err(InvalidIndex { prod, cons }),
        Some(false) => Ok(false),
        Some(true) => {
            buf.read(ram, ring.elem_offset(cons), elem);
            write_index(ram, buf, ring.cons_offset(), ring.idx.next(cons));
            Ok(true)
        }
    }
}

/// A send WQE: header fields plus SGEs.
pub fn send_wqe(wr_id: u64, opcode: u32, send_flags: u32, sges: &[Sge]) -> Vec<u8> {
    let hdr = SendWqeHeader {
        wr_id,
        num_sge: sges.len() as u32,
        total_len: 0,
        opcode,
        send_flags,
        ex: 0,
        reserved: 0,
        wr: [0; 48],
    };
    let mut bytes = hdr.as_bytes().to_vec();
    for sge in sges {
        bytes.extend_from_slice(sge.as_bytes());
    }
    bytes
}

/// An RDMA WRITE or READ WQE: `remote_addr` and `rkey` in the header's union.
pub fn rdma_wqe(
    wr_id: u64,
    opcode: u32,
    send_flags: u32,
    sges: &[Sge],
    remote_addr: u64,
    rkey: u32,
) -> Vec<u8> {
    let mut bytes = send_wqe(wr_id, opcode, send_flags, sges);
    // The union starts 32 bytes into the WQE.
    bytes[32..40].copy_from_slice(&remote_addr.to_le_bytes());
    bytes[40..44].copy_from_slice(&rkey.to_le_bytes());
    bytes
}

/// An atomic WQE: `remote_addr`, `compare_add`, `swap` and `rkey` in the union.
#[allow(clippy::too_many_arguments)] // The WQE's own fields, in its order.
pub fn atomic_wqe(
    wr_id: u64,
    opcode: u32,
    send_flags: u32,
    sges: &[Sge],
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
) -> Vec<u8> {
    let mut bytes = send_wqe(wr_id, opcode, send_flags, sges);
    bytes[32..40].copy_from_slice(&remote_addr.to_le_bytes());
    bytes[40..48].copy_from_slice(&compare_add.to_le_bytes());
    bytes[48..56].copy_from_slice(&swap.to_le_bytes());
    bytes[56..60].copy_from_slice(&rkey.to_le_bytes());
    bytes
}

/// A receive WQE.
pub fn recv_wqe(wr_id: u64, sges: &[Sge]) -> Vec<u8> {
    let mut bytes = RecvWqeHeader {
        wr_id,
        num_sge: sges.len() as u32,
        total_len: 0,
    }
    .as_bytes()
    .to_vec();
    for sge in sges {
        bytes.extend_from_slice(sge.as_bytes());
    }
    bytes
}

impl<B: Bus> Driver<B> {
    // ---- doorbells ----

    /// A raw BAR2 write: `page` * 4096 + `word`.
    pub fn doorbell(&mut self, page: u32, word: u64, value: u32) {
        self.bus
            .write32(BAR_UAR, u64::from(page) * PAGE_SIZE + word, value);
    }

    pub fn ring_qp(&mut self, qp: &Qp, bits: u32) {
        self.doorbell(qp.uc.uar, uar::QP_OFFSET, qp.handle | bits);
    }

    pub fn ring_cq(&mut self, cq: &Cq, bits: u32) {
        self.doorbell(cq.uc.uar, uar::CQ_OFFSET, cq.handle | bits);
    }

    pub fn ring_srq(&mut self, srq: &Srq) {
        self.doorbell(srq.uc.uar, uar::SRQ_OFFSET, srq.handle | uar::SRQ_RECV);
    }

    // ---- posting ----

    /// Writes a send WQE into the SQ and advances `prod_tail` (no doorbell).
    pub fn post_send_raw(&mut self, qp: &Qp, wqe: &[u8]) -> Result<(), PostError> {
        let layout = &qp.layout;
        produce(self.bus.ram(), &layout.ring.buf, &layout.sq, wqe)
    }

    /// `post_send`: one WQE, then the SQ doorbell.
    pub fn post_send(
        &mut self,
        qp: &Qp,
        wr_id: u64,
        opcode: u32,
        send_flags: u32,
        sges: &[Sge],
    ) -> Result<(), PostError> {
        self.post_send_raw(qp, &send_wqe(wr_id, opcode, send_flags, sges))?;
        self.ring_qp(qp, uar::QP_SEND);
        Ok(())
    }

    /// Writes a receive WQE into the RQ and advances `prod_tail` (no doorbell).
    pub fn post_recv_raw(&mut self, qp: &Qp, wr_id: u64, sges: &[Sge]) -> Result<(), PostError> {
        let layout = &qp.layout;
        let rq = layout
            .rq
            .as_ref()
            .expect("the QP has its own receive queue");
        produce(self.bus.ram(), &layout.ring.buf, rq, &recv_wqe(wr_id, sges))
    }

    /// `post_recv`: one WQE, then the RQ doorbell (as the kernel and rdma-core do).
    pub fn post_recv(&mut self, qp: &Qp, wr_id: u64, sges: &[Sge]) -> Result<(), PostError> {
        self.post_recv_raw(qp, wr_id, sges)?;
        self.ring_qp(qp, uar::QP_RECV);
        Ok(())
    }

    pub fn post_srq_recv(&mut self, srq: &Srq, wr_id: u64, sges: &[Sge]) -> Result<(), PostError> {
        let layout = &srq.layout;
        produce(
            self.bus.ram(),
            &layout.ring.buf,
            &layout.rq,
            &recv_wqe(wr_id, sges),
        )?;
        self.ring_srq(srq);
        Ok(())
    }

    /// `(prod_tail, cons_head)` of a QP's send queue.
    pub fn sq_indices(&self, qp: &Qp) -> (u32, u32) {
        ring_indices(self.bus.ram(), &qp.layout.ring.buf, &qp.layout.sq)
    }

    /// `(prod_tail, cons_head)` of a QP's receive queue.
    pub fn rq_indices(&self, qp: &Qp) -> (u32, u32) {
        let rq = qp
            .layout
            .rq
            .as_ref()
            .expect("the QP has its own receive queue");
        ring_indices(self.bus.ram(), &qp.layout.ring.buf, rq)
    }

    /// `(prod_tail, cons_head)` of a CQ.
    pub fn cq_indices(&self, cq: &Cq) -> (u32, u32) {
        ring_indices(self.bus.ram(), &cq.layout.ring.buf, &cq.layout.cq)
    }

    /// Overwrites a QP's SQ `prod_tail` (a buggy or hostile guest).
    pub fn set_sq_prod(&mut self, qp: &Qp, value: u32) {
        let buf = &qp.layout.ring.buf;
        write_index(self.bus.ram(), buf, qp.layout.sq.prod_offset(), value);
    }

    /// Overwrites a QP's RQ `prod_tail`.
    pub fn set_rq_prod(&mut self, qp: &Qp, value: u32) {
        let rq = qp.layout.rq.expect("the QP has its own receive queue");
        write_index(self.bus.ram(), &qp.layout.ring.buf, rq.prod_offset(), value);
    }

    /// Overwrites a CQ's `cons_head`.
    pub fn set_cq_cons(&mut self, cq: &Cq, value: u32) {
        let buf = &cq.layout.ring.buf;
        write_index(self.bus.ram(), buf, cq.layout.cq.cons_offset(), value);
    }

    // ---- completions ----

    /// One CQE, consumed; `Ok(None)` when the CQ is empty.
    pub fn poll_cq(&mut self, cq: &Cq) -> Result<Option<Cqe>, InvalidIndex> {
        let mut bytes = [0u8; size_of::<Cqe>()];
        let layout = &cq.layout;
        Ok(
            consume(self.bus.ram(), &layout.ring.buf, &layout.cq, &mut bytes)?
                .then(|| Cqe::read_from_bytes(&bytes).unwrap()),
        )
    }

    /// Every CQE in the CQ; panics on a corrupt ring.
    pub fn drain_cq(&mut self, cq: &Cq) -> Vec<Cqe> {
        let mut cqes = Vec::new();
        while let Some(cqe) = self
            .poll_cq(cq)
            .unwrap_or_else(|e| panic!("CQ {} ring is corrupt: {e:?}", cq.handle))
        {
            cqes.push(cqe);
            assert!(cqes.len() <= cq.layout.cqe as usize * 2, "CQ never empties");
        }
        cqes
    }

    fn drain_device_ring(ring: &DeviceRing, ram: &GuestRam) -> Result<Vec<Vec<u8>>, InvalidIndex> {
        let mut out = Vec::new();
        loop {
            let mut elem = vec![0u8; ring.layout.stride as usize];
            if !consume(ram, &ring.ring.buf, &ring.layout, &mut elem)? {
                return Ok(out);
            }
            out.push(elem);
            assert!(
                out.len() <= 2 * ring.layout.idx.max as usize,
                "device ring never empties"
            );
        }
    }

    /// Drains the async event ring (the vector-1 handler).
    pub fn poll_async(&mut self) -> Result<Vec<Eqe>, InvalidIndex> {
        let ring = self.session().async_ring.clone();
        Ok(Self::drain_device_ring(&ring, self.bus.ram())?
            .iter()
            .map(|e| Eqe::read_from_bytes(e).unwrap())
            .collect())
    }

    /// Drains the CQ notification ring (the vector-2 handler).
    pub fn poll_cq_notifications(&mut self) -> Result<Vec<Cqne>, InvalidIndex> {
        let ring = self.session().cq_notify.clone();
        Ok(Self::drain_device_ring(&ring, self.bus.ram())?
            .iter()
            .map(|e| Cqne::read_from_bytes(e).unwrap())
            .collect())
    }

    /// `(prod_tail, cons_head)` of a device ring.
    pub fn device_ring_indices(&self, ring: &DeviceRing) -> (u32, u32) {
        ring_indices(self.bus.ram(), &ring.ring.buf, &ring.layout)
    }

    /// Overwrites a device ring's `cons_head` (a buggy or hostile guest).
    pub fn set_device_ring_cons(&mut self, ring: &DeviceRing, value: u32) {
        write_index(
            self.bus.ram(),
            &ring.ring.buf,
            ring.layout.cons_offset(),
            value,
        );
    }
}
