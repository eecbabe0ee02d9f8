//! The objects a guest creates through commands, and the tables that hold them.

use super::caps::Limits;
use super::profile::QpStats;
use super::ring::Ring;
use super::table::HandleTable;
use crate::abi::{QpAttr, SrqAttr};

/// A user context (CREATE_UC): owns one UAR page.
#[derive(Debug)]
pub struct Context {
    pub uar_index: u32,
}

/// Context handle of kernel objects.
pub const KERNEL_CONTEXT: u32 = 0;

#[derive(Debug)]
pub struct Pd {
    pub ctx: u32,
}

#[derive(Debug)]
pub enum MrKind {
    /// SGE addresses are guest DMA addresses (the kernel's DMA MR).
    Dma,
    /// A user buffer: `start` is the user virtual address the SGEs use.
    User {
        start: u64,
        length: u64,
        pages: Vec<u64>,
    },
    /// A fast-register MR: pages and access arrive in a FAST_REG_MR work request, which
    /// may map at most `max_pages` entries; `mapping` is what the last one registered, and
    /// is cleared by an invalidation.
    FastReg {
        max_pages: u32,
        mapping: Option<FastRegMapping>,
    },
}

/// The buffer a FAST_REG_MR work request registered.
#[derive(Debug)]
pub struct FastRegMapping {
    pub start: u64,
    pub length: u64,
    /// 4 KiB pages, in order.
    pub pages: Vec<u64>,
}

#[derive(Debug)]
pub struct Mr {
    /// Guest pages this object holds, returned to the page budget when it goes.
    pub pages_held: u64,
    pub pd: u32,
    pub access: u32,
    pub lkey: u32,
    pub rkey: u32,
    pub kind: MrKind,
    /// Its key is the host device's registration of it (the rdma path).
    pub on_host: bool,
}

/// Notification requested by the last arm doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Disarmed,
    NextCompletion,
    Solicited,
}

#[derive(Debug)]
pub struct Cq {
    /// Guest pages this object holds, returned to the page budget when it goes.
    pub pages_held: u64,
    pub ctx: u32,
    pub ring: Ring,
    pub arm: Arm,
    /// The ring overflowed or its indices were corrupt: no more CQEs until destroyed.
    pub broken: bool,
}

#[derive(Debug)]
pub struct Srq {
    /// Guest pages this object holds, returned to the page budget when it goes.
    pub pages_held: u64,
    pub pd: u32,
    pub ring: Ring,
    pub attrs: SrqAttr,
    pub stride: u64,
}

#[derive(Debug)]
pub struct Qp {
    /// The QP's number on the wire: what the guest sees as `qp_num`, what peers name as a
    /// destination and what this QP's requests carry as their source. The handle (the
    /// table's index) is what doorbells, CQEs, commands and async events name.
    pub qpn: u32,
    /// Guest pages this object holds, returned to the page budget when it goes.
    pub pages_held: u64,
    pub pd: u32,
    pub qp_type: u8,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub sq: Ring,
    pub rq: Option<Ring>,
    pub sq_stride: u64,
    pub rq_stride: u64,
    pub sq_sig_all: bool,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    /// Current attributes as QUERY_QP reports them.
    pub attr: QpAttr,
    /// The send queue's head waits for the peer to post a receive (RNR): retried when any
    /// device of the fabric gets a receive doorbell.
    pub stalled: bool,
    /// The profiler's counters and histograms.
    pub stats: QpStats,
    /// The WQE at the send queue's head was already counted as an RNR stall.
    pub rnr_counted: bool,
    /// When the last send doorbell rang, if that doorbell's pass is timed (profiling on,
    /// sampled).
    pub doorbell_ns: Option<u64>,
    /// Work requests handed to a transport that answers later, oldest first. They stay in
    /// the send queue (not consumed) until they complete, so the guest cannot post more
    /// than the queue holds, and a flush finds them there.
    pub in_flight: std::collections::VecDeque<InFlight>,
    /// The profiler's clock of the sampled pass whose work is still in flight.
    pub timing: Option<crate::pvrdma::datapath::Timing>,
    /// The ticket of the next work request this QP issues.
    pub next_ticket: u64,
    /// Tells this QP apart from earlier QPs with the same number (transports key their
    /// sequence numbers by it).
    pub epoch: u32,
    /// The transport refused the next request (flow control): issue again after a
    /// completion.
    pub waiting_transport: bool,
    /// Whether the host's RDMA device backs the QP (docs/rdma-transport.md).
    pub host: HostLink,
}

/// How a QP stands with the host's RDMA device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostLink {
    /// No host QP: the QP's number is the device's own.
    #[default]
    None,
    /// A host QP exists and gave the QP its number, but does not carry it (not connected
    /// yet, or connected over another path).
    Standby,
    /// The host QP carries the QP's work: `recv_posted` receives past the receive queue's
    /// head were handed to it and not completed yet.
    Carrying { recv_posted: u32 },
    /// A UD QP whose host QP is ready: datagrams to destinations the host device reaches go
    /// through it; every datagram, whichever path brought it, is received by the device.
    Datagrams,
}

/// A work request a transport carries, waiting for its completion.
#[derive(Debug)]
pub struct InFlight {
    pub ticket: u64,
    pub wr_id: u64,
    pub opcode: u32,
    pub signaled: bool,
    /// Where READ data and an atomic's original value go; empty for other operations.
    pub reply: pvrdma_backend::Sgl,
    /// The work request's length, for the completion's byte count.
    pub length: u64,
    /// The answer, once it came (completions are written in order, so an answer may wait
    /// for an older request's).
    pub result: Option<Result<pvrdma_backend::Outcome, pvrdma_backend::RemoteError>>,
    /// Issued by a sampled pass: its stages are timed when its answer comes.
    pub timed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gid {
    pub raw: [u8; 16],
    pub gid_type: u8,
}

/// Every object of one device.
#[derive(Debug)]
pub struct Objects {
    pub contexts: HandleTable<Context>,
    pub pds: HandleTable<Pd>,
    pub mrs: HandleTable<Mr>,
    pub cqs: HandleTable<Cq>,
    pub qps: HandleTable<Qp>,
    pub srqs: HandleTable<Srq>,
    pub gids: Vec<Option<Gid>>,
    /// The MR each key names, by the key's upper 24 bits (the low byte is the consumer's:
    /// fast-register users change it).
    mr_keys: std::collections::HashMap<u32, u32>,
    /// The QP each QP number names.
    qp_numbers: std::collections::HashMap<u32, u32>,
    /// The generator of MR keys (xorshift; seeded per device).
    key_state: u64,
    /// The epoch of the next QP created (see `Qp::epoch`).
    pub next_qp_epoch: u32,
    /// See `Limits::max_mapped_pages`.
    page_limit: u64,
}

/// The QP handle and QPN of the GSI QP (QP1): the kernel MAD layer expects QPN 1.
pub const GSI_QP_HANDLE: u32 = 1;
/// How far other QPs' numbers lie from their handles, where the driver takes the two
/// apart (version 20): far enough that no code can use one for the other unnoticed, as
/// the host device's numbers will be when the rdma path adopts them.
pub const QPN_OFFSET: u32 = 0x100;
/// First handle for other QPs.
pub const FIRST_QP_HANDLE: u32 = 2;

impl Objects {
    pub fn new(limits: &Limits, key_seed: u64) -> Objects {
        Objects {
            contexts: HandleTable::new(1, limits.max_contexts),
            pds: HandleTable::new(1, limits.max_pd),
            mrs: HandleTable::new(1, limits.max_mr),
            cqs: HandleTable::new(1, limits.max_cq),
            qps: HandleTable::new(FIRST_QP_HANDLE, limits.max_qp),
            srqs: HandleTable::new(1, limits.max_srq),
            gids: vec![None; limits.gid_tbl_len as usize],
            mr_keys: std::collections::HashMap::new(),
            qp_numbers: std::collections::HashMap::new(),
            key_state: key_seed | 1,
            next_qp_epoch: 0,
            page_limit: limits.max_mapped_pages,
        }
    }

    /// A fresh key for MR `handle`: 24 unpredictable bits no other MR's key has, and an
    /// unpredictable low byte, so a key cannot be guessed from the MR's handle or from the
    /// keys seen before.
    pub fn new_mr_key(&mut self, handle: u32) -> u32 {
        loop {
            let mut x = self.key_state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.key_state = x;
            let key = (x >> 16) as u32;
            let upper = key >> 8;
            if upper != 0 && !self.mr_keys.contains_key(&upper) {
                self.mr_keys.insert(upper, handle);
                return key;
            }
        }
    }

    /// Makes `key` (the host device's key for MR `handle`) name it instead of the key it
    /// was given; false (nothing changed) if `key` names another MR already.
    pub fn adopt_mr_key(&mut self, handle: u32, key: u32) -> bool {
        if key >> 8 == 0 || self.mr_keys.contains_key(&(key >> 8)) {
            return false;
        }
        let Some(mr) = self.mrs.get_mut(handle) else {
            return false;
        };
        self.mr_keys.remove(&(mr.rkey >> 8));
        mr.lkey = key;
        mr.rkey = key;
        mr.on_host = true;
        self.mr_keys.insert(key >> 8, handle);
        true
    }

    /// The handle of the MR that `key` (an lkey or rkey, any low byte) names.
    pub fn mr_of_key(&self, key: u32) -> Option<u32> {
        self.mr_keys.get(&(key >> 8)).copied()
    }

    /// Gives QP `handle` its number `qpn`; false (nothing changed) if another QP has it.
    pub fn number_qp(&mut self, handle: u32, qpn: u32) -> bool {
        if self.qp_numbers.contains_key(&qpn) {
            return false;
        }
        let Some(qp) = self.qps.get_mut(handle) else {
            return false;
        };
        qp.qpn = qpn;
        self.qp_numbers.insert(qpn, handle);
        true
    }

    /// The handle of the QP numbered `qpn`.
    pub fn qp_handle(&self, qpn: u32) -> Option<u32> {
        self.qp_numbers.get(&qpn).copied()
    }

    /// Removes QP `handle` and its number.
    pub fn remove_qp(&mut self, handle: u32) -> Option<Qp> {
        let qp = self.qps.remove(handle)?;
        self.qp_numbers.remove(&qp.qpn);
        Some(qp)
    }

    /// Removes MR `handle` and its key.
    pub fn remove_mr(&mut self, handle: u32) -> Option<Mr> {
        let mr = self.mrs.remove(handle)?;
        self.mr_keys.remove(&(mr.rkey >> 8));
        Some(mr)
    }

    pub fn clear(&mut self) {
        self.contexts.clear();
        self.pds.clear();
        self.mrs.clear();
        self.mr_keys.clear();
        self.cqs.clear();
        self.qps.clear();
        self.qp_numbers.clear();
        self.srqs.clear();
        self.gids.iter_mut().for_each(|gid| *gid = None);
    }

    /// Fails with ENOMEM when holding `more` guest page addresses would exceed the limit.
    /// Computed from the objects themselves, so no error path can leak budget.
    pub fn check_page_budget(&self, more: u64) -> Result<(), u32> {
        let held: u64 = self.mrs.iter().map(|(_, o)| o.pages_held).sum::<u64>()
            + self.cqs.iter().map(|(_, o)| o.pages_held).sum::<u64>()
            + self.qps.iter().map(|(_, o)| o.pages_held).sum::<u64>()
            + self.srqs.iter().map(|(_, o)| o.pages_held).sum::<u64>();
        if held.saturating_add(more) <= self.page_limit {
            Ok(())
        } else {
            Err(super::errno::ENOMEM)
        }
    }

    /// The context that owns `pd` (kernel PDs belong to context 0).
    pub fn pd_context(&self, pd: u32) -> Option<u32> {
        self.pds.get(pd).map(|pd| pd.ctx)
    }

    /// Whether anything still refers to the given object: destroying it must wait.
    pub fn context_in_use(&self, ctx: u32) -> bool {
        self.pds.iter().any(|(_, pd)| pd.ctx == ctx) || self.cqs.iter().any(|(_, cq)| cq.ctx == ctx)
    }

    pub fn pd_in_use(&self, pd: u32) -> bool {
        self.mrs.iter().any(|(_, mr)| mr.pd == pd)
            || self.qps.iter().any(|(_, qp)| qp.pd == pd)
            || self.srqs.iter().any(|(_, srq)| srq.pd == pd)
    }

    pub fn cq_in_use(&self, cq: u32) -> bool {
        self.qps
            .iter()
            .any(|(_, qp)| qp.send_cq == cq || qp.recv_cq == cq)
    }

    pub fn srq_in_use(&self, srq: u32) -> bool {
        self.qps.iter().any(|(_, qp)| qp.srq == Some(srq))
    }
}
