//! The command channel (device-abi §5): request and response layouts, command numbers.
//!
//! The driver copies a request of up to [`REQUEST_SLOT_BYTES`] into the command slot; the bytes
//! past the command's own struct may be stale, so each command reads only its own struct.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of `union pvrdma_cmd_req` (MODIFY_QP, the largest request).
pub const REQUEST_SLOT_BYTES: usize = 184;
/// Size of `union pvrdma_cmd_resp`; the device never writes past it.
pub const RESPONSE_SLOT_BYTES: usize = 176;
/// `resp.hdr.ack = request.cmd | RESPONSE_ACK`.
pub const RESPONSE_ACK: u32 = 0x8000_0000;

/// Command numbers (device-abi §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Command {
    QueryPort = 0,
    QueryPkey = 1,
    CreatePd = 2,
    DestroyPd = 3,
    CreateMr = 4,
    DestroyMr = 5,
    CreateCq = 6,
    ResizeCq = 7,
    DestroyCq = 8,
    CreateQp = 9,
    ModifyQp = 10,
    QueryQp = 11,
    DestroyQp = 12,
    CreateUc = 13,
    DestroyUc = 14,
    CreateBind = 15,
    DestroyBind = 16,
    CreateSrq = 17,
    ModifySrq = 18,
    QuerySrq = 19,
    DestroySrq = 20,
}

impl Command {
    pub fn from_u32(value: u32) -> Option<Command> {
        use Command::*;
        const ALL: [Command; 21] = [
            QueryPort,
            QueryPkey,
            CreatePd,
            DestroyPd,
            CreateMr,
            DestroyMr,
            CreateCq,
            ResizeCq,
            DestroyCq,
            CreateQp,
            ModifyQp,
            QueryQp,
            DestroyQp,
            CreateUc,
            DestroyUc,
            CreateBind,
            DestroyBind,
            CreateSrq,
            ModifySrq,
            QuerySrq,
            DestroySrq,
        ];
        ALL.get(usize::try_from(value).ok()?).copied()
    }
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RequestHeader {
    pub response: u64,
    pub cmd: u32,
    pub reserved: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ResponseHeader {
    pub response: u64,
    pub ack: u32,
    pub err: u8,
    pub reserved: [u8; 3],
}

/// The 24-byte shape shared by every request that names one object (DESTROY_*, CREATE_PD's
/// context, QUERY_SRQ, ...): header, a u32, and a second u32 some commands use.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HandleRequest {
    pub hdr: RequestHeader,
    pub handle: u32,
    pub extra: u32,
}

/// The 24-byte shape of responses that return one or two u32s.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HandleResponse {
    pub hdr: ResponseHeader,
    pub handle: u32,
    pub extra: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QueryPortRequest {
    pub hdr: RequestHeader,
    pub port_num: u8,
    pub reserved: [u8; 7],
}

/// `struct pvrdma_port_attr` (48 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PortAttr {
    pub state: u32,
    pub max_mtu: u32,
    pub active_mtu: u32,
    pub gid_tbl_len: u32,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub reserved: [u8; 2],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QueryPortResponse {
    pub hdr: ResponseHeader,
    pub attrs: PortAttr,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QueryPkeyRequest {
    pub hdr: RequestHeader,
    pub port_num: u8,
    pub index: u8,
    pub reserved: [u8; 6],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QueryPkeyResponse {
    pub hdr: ResponseHeader,
    pub pkey: u16,
    pub reserved: [u8; 6],
}

/// CREATE_UC: `pfn` (u32) before version 19, `pfn64` from 19 on, at the same offset.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateUcRequest {
    pub hdr: RequestHeader,
    pub pfn64: u64,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateMrRequest {
    pub hdr: RequestHeader,
    pub start: u64,
    pub length: u64,
    pub pdir_dma: u64,
    pub pd_handle: u32,
    pub access_flags: u32,
    pub flags: u32,
    pub nchunks: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateMrResponse {
    pub hdr: ResponseHeader,
    pub mr_handle: u32,
    pub lkey: u32,
    pub rkey: u32,
    pub reserved: u32,
}

/// CREATE_MR `flags`.
pub const MR_FLAG_DMA: u32 = 1;
pub const MR_FLAG_FRMR: u32 = 2;
/// Most pages a fast-register MR may hold (`PVRDMA_MAX_FAST_REG_PAGES`).
pub const MAX_FAST_REG_PAGES: u32 = 128;

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateCqRequest {
    pub hdr: RequestHeader,
    pub pdir_dma: u64,
    pub ctx_handle: u32,
    pub cqe: u32,
    pub nchunks: u32,
    pub reserved: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateQpRequest {
    pub hdr: RequestHeader,
    pub pdir_dma: u64,
    pub pd_handle: u32,
    pub send_cq_handle: u32,
    pub recv_cq_handle: u32,
    pub srq_handle: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
    pub lkey: u32,
    pub access_flags: u32,
    pub total_chunks: u16,
    pub send_chunks: u16,
    pub max_atomic_arg: u16,
    pub sq_sig_all: u8,
    pub qp_type: u8,
    pub is_srq: u8,
    pub reserved: [u8; 3],
}

/// CREATE_QP response for device versions before 20: the QPN is the handle.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateQpResponseV1 {
    pub hdr: ResponseHeader,
    pub qpn: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateQpResponseV2 {
    pub hdr: ResponseHeader,
    pub qpn: u32,
    pub qp_handle: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
    pub reserved: u32,
}

/// `struct pvrdma_global_route` (24 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GlobalRoute {
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub reserved: u8,
}

/// `struct pvrdma_ah_attr` (40 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct AhAttr {
    pub grh: GlobalRoute,
    pub dlid: u16,
    pub vlan_id: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub ah_flags: u8,
    pub port_num: u8,
    pub dmac: [u8; 6],
    pub reserved: u8,
}

/// `struct pvrdma_qp_cap` (24 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct QpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
    pub reserved: u32,
}

/// `struct pvrdma_qp_attr` (160 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct QpAttr {
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub reserved: [u8; 5],
    pub cap: QpCap,
    pub ah_attr: AhAttr,
    pub alt_ah_attr: AhAttr,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ModifyQpRequest {
    pub hdr: RequestHeader,
    pub qp_handle: u32,
    pub attr_mask: u32,
    pub attrs: QpAttr,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QueryQpResponse {
    pub hdr: ResponseHeader,
    pub attrs: QpAttr,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateBindRequest {
    pub hdr: RequestHeader,
    pub mtu: u32,
    pub vlan: u32,
    pub index: u32,
    pub new_gid: [u8; 16],
    pub gid_type: u8,
    pub reserved: [u8; 3],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DestroyBindRequest {
    pub hdr: RequestHeader,
    pub index: u32,
    pub dest_gid: [u8; 16],
    pub reserved: [u8; 4],
}

/// `struct pvrdma_srq_attr` (16 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SrqAttr {
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
    pub reserved: u32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateSrqRequest {
    pub hdr: RequestHeader,
    pub pdir_dma: u64,
    pub pd_handle: u32,
    pub nchunks: u32,
    pub attrs: SrqAttr,
    pub srq_type: u8,
    pub reserved: [u8; 7],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ModifySrqRequest {
    pub hdr: RequestHeader,
    pub srq_handle: u32,
    pub attr_mask: u32,
    pub attrs: SrqAttr,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QuerySrqResponse {
    pub hdr: ResponseHeader,
    pub attrs: SrqAttr,
}

/// MODIFY_SRQ attribute mask bits (IB values).
pub const SRQ_ATTR_MAX_WR: u32 = 1;
pub const SRQ_ATTR_LIMIT: u32 = 2;

const _: () = {
    assert!(size_of::<RequestHeader>() == 16);
    assert!(size_of::<ResponseHeader>() == 16);
    assert!(size_of::<HandleRequest>() == 24);
    assert!(size_of::<HandleResponse>() == 24);
    assert!(size_of::<QueryPortRequest>() == 24);
    assert!(size_of::<QueryPortResponse>() == 64);
    assert!(size_of::<QueryPkeyRequest>() == 24);
    assert!(size_of::<QueryPkeyResponse>() == 24);
    assert!(size_of::<CreateUcRequest>() == 24);
    assert!(size_of::<CreateMrRequest>() == 56);
    assert!(size_of::<CreateMrResponse>() == 32);
    assert!(size_of::<CreateCqRequest>() == 40);
    assert!(size_of::<CreateQpRequest>() == 80);
    assert!(size_of::<CreateQpResponseV1>() == 40);
    assert!(size_of::<CreateQpResponseV2>() == 48);
    assert!(size_of::<GlobalRoute>() == 24);
    assert!(size_of::<AhAttr>() == 40);
    assert!(size_of::<QpAttr>() == 160);
    assert!(size_of::<ModifyQpRequest>() == REQUEST_SLOT_BYTES);
    assert!(size_of::<QueryQpResponse>() == RESPONSE_SLOT_BYTES);
    assert!(size_of::<CreateBindRequest>() == 48);
    assert!(size_of::<DestroyBindRequest>() == 40);
    assert!(size_of::<CreateSrqRequest>() == 56);
    assert!(size_of::<ModifySrqRequest>() == 40);
    assert!(size_of::<QuerySrqResponse>() == 32);
    assert!(std::mem::offset_of!(CreateQpRequest, total_chunks) == 68);
    assert!(std::mem::offset_of!(CreateQpRequest, qp_type) == 75);
    assert!(std::mem::offset_of!(QpAttr, cap) == 56);
    assert!(std::mem::offset_of!(QpAttr, ah_attr) == 80);
    assert!(std::mem::offset_of!(AhAttr, dmac) == 33);
    assert!(std::mem::offset_of!(CreateBindRequest, gid_type) == 44);
};
