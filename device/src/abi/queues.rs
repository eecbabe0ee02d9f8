//! Ring elements (device-abi §6): ring state, work queue entries, scatter-gather entries, completions,
//! address vectors, async events and CQ notifications, with their enumerations (device-abi §9).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Producer/consumer indices of one ring (device-abi §6.1).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RingState {
    pub prod_tail: u32,
    pub cons_head: u32,
}

/// Offsets of the two ring states in a ring-state page.
pub const RING_STATE_TX: u64 = 0;
pub const RING_STATE_RX: u64 = 8;

/// `struct pvrdma_sq_wqe_hdr` (80 bytes); the `wr` union is read through accessors.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SendWqeHeader {
    pub wr_id: u64,
    pub num_sge: u32,
    pub total_len: u32,
    pub opcode: u32,
    pub send_flags: u32,
    /// `imm_data` (big-endian on the wire) or `invalidate_rkey`.
    pub ex: u32,
    pub reserved: u32,
    pub wr: [u8; 48],
}

impl SendWqeHeader {
    fn wr_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(
            self.wr[offset - 32..offset - 28]
                .try_into()
                .unwrap_or_default(),
        )
    }

    fn wr_u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(
            self.wr[offset - 32..offset - 24]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// RDMA and atomic WRs: `remote_addr` at WQE offset 32.
    pub fn remote_addr(&self) -> u64 {
        self.wr_u64(32)
    }

    /// RDMA WRs: `rkey` at 40.
    pub fn rdma_rkey(&self) -> u32 {
        self.wr_u32(40)
    }

    /// Atomic WRs: `compare_add` at 40, `swap` at 48, `rkey` at 56.
    pub fn atomic_compare_add(&self) -> u64 {
        self.wr_u64(40)
    }

    pub fn atomic_swap(&self) -> u64 {
        self.wr_u64(48)
    }

    pub fn atomic_rkey(&self) -> u32 {
        self.wr_u32(56)
    }

    /// UD and GSI WRs: `remote_qpn` at 32, `remote_qkey` at 36, the address vector at 40.
    pub fn ud_remote_qpn(&self) -> u32 {
        self.wr_u32(32)
    }

    pub fn ud_remote_qkey(&self) -> u32 {
        self.wr_u32(36)
    }

    pub fn ud_av(&self) -> AddressVector {
        AddressVector::read_from_bytes(&self.wr[8..48]).unwrap_or_default()
    }

    /// FAST_REG_MR: `iova_start` 32, `pl_pdir_dma` 40, `page_shift` 48, `page_list_len` 52,
    /// `length` 56, `access_flags` 60, `rkey` 64.
    pub fn fast_reg(&self) -> FastReg {
        FastReg {
            iova_start: self.wr_u64(32),
            pl_pdir_dma: self.wr_u64(40),
            page_shift: self.wr_u32(48),
            page_list_len: self.wr_u32(52),
            length: self.wr_u32(56),
            access_flags: self.wr_u32(60),
            rkey: self.wr_u32(64),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastReg {
    pub iova_start: u64,
    pub pl_pdir_dma: u64,
    pub page_shift: u32,
    pub page_list_len: u32,
    pub length: u32,
    pub access_flags: u32,
    pub rkey: u32,
}

/// `struct pvrdma_rq_wqe_hdr` (16 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RecvWqeHeader {
    pub wr_id: u64,
    pub num_sge: u32,
    pub total_len: u32,
}

/// `struct pvrdma_sge` (16 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `struct pvrdma_cqe` (64 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Cqe {
    pub wr_id: u64,
    /// The QP *handle*; guests look the QP up by `qp & 0xffff`.
    pub qp: u64,
    pub opcode: u32,
    pub status: u32,
    pub byte_len: u32,
    pub imm_data: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub vendor_err: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
    pub port_num: u8,
    pub smac: [u8; 6],
    pub network_hdr_type: u8,
    pub reserved2: [u8; 6],
}

/// `struct pvrdma_av` (40 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct AddressVector {
    pub port_pd: u32,
    pub sl_tclass_flowlabel: u32,
    pub dgid: [u8; 16],
    pub src_path_bits: u8,
    pub gid_index: u8,
    pub stat_rate: u8,
    pub hop_limit: u8,
    pub dmac: [u8; 6],
    pub reserved: [u8; 6],
}

/// `struct pvrdma_eqe` (8 bytes): an async event.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Eqe {
    pub event_type: u32,
    pub info: u32,
}

/// `struct pvrdma_cqne` (4 bytes): a CQ notification.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Cqne {
    pub info: u32,
}

/// Element sizes of the two device rings (device-abi §6.7, device-abi §6.8).
pub const EQE_SIZE: u64 = 8;
pub const CQNE_SIZE: u64 = 4;
/// Header sizes that set the WQE strides (device-abi §6.3).
pub const SEND_WQE_HEADER_SIZE: u64 = 80;
pub const RECV_WQE_HEADER_SIZE: u64 = 16;
pub const SGE_SIZE: u64 = 16;
pub const CQE_SIZE: u64 = 64;

const _: () = {
    assert!(size_of::<RingState>() == 8);
    assert!(size_of::<SendWqeHeader>() == SEND_WQE_HEADER_SIZE as usize);
    assert!(size_of::<RecvWqeHeader>() == RECV_WQE_HEADER_SIZE as usize);
    assert!(size_of::<Sge>() == SGE_SIZE as usize);
    assert!(size_of::<Cqe>() == CQE_SIZE as usize);
    assert!(size_of::<AddressVector>() == 40);
    assert!(size_of::<Eqe>() == EQE_SIZE as usize);
    assert!(size_of::<Cqne>() == CQNE_SIZE as usize);
    assert!(std::mem::offset_of!(Cqe, network_hdr_type) == 57);
    assert!(std::mem::offset_of!(AddressVector, dmac) == 28);
};

/// QP types (device-abi §9.1).
pub mod qp_type {
    pub const SMI: u8 = 0;
    pub const GSI: u8 = 1;
    pub const RC: u8 = 2;
    pub const UC: u8 = 3;
    pub const UD: u8 = 4;
}

/// QP states (device-abi §9.1).
pub mod qp_state {
    pub const RESET: u32 = 0;
    pub const INIT: u32 = 1;
    pub const RTR: u32 = 2;
    pub const RTS: u32 = 3;
    pub const SQD: u32 = 4;
    pub const SQE: u32 = 5;
    pub const ERR: u32 = 6;
}

/// Modify-QP attribute mask bits (device-abi §9.3).
pub mod qp_attr_mask {
    pub const STATE: u32 = 1 << 0;
    pub const CUR_STATE: u32 = 1 << 1;
    pub const EN_SQD_ASYNC_NOTIFY: u32 = 1 << 2;
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    pub const PKEY_INDEX: u32 = 1 << 4;
    pub const PORT: u32 = 1 << 5;
    pub const QKEY: u32 = 1 << 6;
    pub const AV: u32 = 1 << 7;
    pub const PATH_MTU: u32 = 1 << 8;
    pub const TIMEOUT: u32 = 1 << 9;
    pub const RETRY_CNT: u32 = 1 << 10;
    pub const RNR_RETRY: u32 = 1 << 11;
    pub const RQ_PSN: u32 = 1 << 12;
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    pub const ALT_PATH: u32 = 1 << 14;
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    pub const SQ_PSN: u32 = 1 << 16;
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    pub const PATH_MIG_STATE: u32 = 1 << 18;
    pub const CAP: u32 = 1 << 19;
    pub const DEST_QPN: u32 = 1 << 20;
    /// The bits the driver keeps.
    pub const ALL: u32 = (1 << 21) - 1;
}

/// Work request opcodes in send WQEs (device-abi §9.4).
pub mod wr_opcode {
    pub const RDMA_WRITE: u32 = 0;
    pub const RDMA_WRITE_WITH_IMM: u32 = 1;
    pub const SEND: u32 = 2;
    pub const SEND_WITH_IMM: u32 = 3;
    pub const RDMA_READ: u32 = 4;
    pub const ATOMIC_CMP_AND_SWP: u32 = 5;
    pub const ATOMIC_FETCH_AND_ADD: u32 = 6;
    pub const SEND_WITH_INV: u32 = 8;
    pub const LOCAL_INV: u32 = 10;
    pub const FAST_REG_MR: u32 = 11;
}

/// Completion opcodes (device-abi §9.4).
pub mod wc_opcode {
    pub const SEND: u32 = 0;
    pub const RDMA_WRITE: u32 = 1;
    pub const RDMA_READ: u32 = 2;
    pub const COMP_SWAP: u32 = 3;
    pub const FETCH_ADD: u32 = 4;
    pub const LOCAL_INV: u32 = 7;
    pub const FAST_REG_MR: u32 = 8;
    pub const RECV: u32 = 128;
    pub const RECV_RDMA_WITH_IMM: u32 = 129;
}

/// Completion statuses (device-abi §9.4, the IB numbering).
pub mod wc_status {
    pub const SUCCESS: u32 = 0;
    pub const LOC_LEN_ERR: u32 = 1;
    pub const LOC_QP_OP_ERR: u32 = 2;
    pub const LOC_PROT_ERR: u32 = 4;
    pub const WR_FLUSH_ERR: u32 = 5;
    pub const BAD_RESP_ERR: u32 = 7;
    pub const LOC_ACCESS_ERR: u32 = 8;
    pub const REM_INV_REQ_ERR: u32 = 9;
    pub const REM_ACCESS_ERR: u32 = 10;
    pub const REM_OP_ERR: u32 = 11;
    pub const RETRY_EXC_ERR: u32 = 12;
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
    pub const GENERAL_ERR: u32 = 21;
}

/// CQE `wc_flags` bits (device-abi §6.6); only GRH and WITH_IMM mean the same to user space.
pub mod wc_flags {
    pub const GRH: u32 = 1 << 0;
    pub const WITH_IMM: u32 = 1 << 1;
    pub const WITH_INVALIDATE: u32 = 1 << 2;
}

/// `send_flags` bits (device-abi §9.4).
pub mod send_flags {
    pub const FENCE: u32 = 1 << 0;
    pub const SIGNALED: u32 = 1 << 1;
    pub const SOLICITED: u32 = 1 << 2;
    pub const INLINE: u32 = 1 << 3;
}

/// IB access flags (device-abi §5.4 CREATE_MR).
pub mod access {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 2;
    pub const REMOTE_READ: u32 = 4;
    pub const REMOTE_ATOMIC: u32 = 8;
    pub const MW_BIND: u32 = 16;
    pub const ZERO_BASED: u32 = 32;
    pub const ON_DEMAND: u32 = 64;
}

/// Async event types (device-abi §6.7).
pub mod event {
    pub const CQ_ERR: u32 = 0;
    pub const QP_FATAL: u32 = 1;
    pub const QP_REQ_ERR: u32 = 2;
    pub const QP_ACCESS_ERR: u32 = 3;
    pub const COMM_EST: u32 = 4;
    pub const SQ_DRAINED: u32 = 5;
    pub const DEVICE_FATAL: u32 = 8;
    pub const PORT_ACTIVE: u32 = 9;
    pub const PORT_ERR: u32 = 10;
    pub const SRQ_ERR: u32 = 14;
    pub const SRQ_LIMIT_REACHED: u32 = 15;
    pub const QP_LAST_WQE_REACHED: u32 = 16;
}
