//! The Device Shared Region (device-abi §3) and the capabilities the device writes into it.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A ring's pages as the DSR names them: a page directory of `num_pages` pages, page 0 being
/// the ring state.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RingPages {
    pub num_pages: u32,
    pub reserved: u32,
    pub pdir_dma: u64,
}

/// `struct pvrdma_device_shared_region` (280 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Dsr {
    pub driver_version: u32,
    pub pad: u32,
    pub gos_info: u32,
    pub gos_pad: u32,
    pub cmd_slot_dma: u64,
    pub resp_slot_dma: u64,
    pub async_ring_pages: RingPages,
    pub cq_ring_pages: RingPages,
    /// `uar_pfn` (u32) before version 19, `uar_pfn64` from 19 on; the upper half is zero for
    /// older drivers because the DSR is zeroed.
    pub uar_pfn64: u64,
    pub caps: DeviceCaps,
}

/// Offset of `caps` inside the DSR: the only part the device writes.
pub const DSR_CAPS_OFFSET: u64 = 72;

/// `struct pvrdma_device_caps` (208 bytes, device-abi §3.2).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DeviceCaps {
    pub fw_ver: u64,
    /// Big-endian bytes in a u64 (the driver copies it as is).
    pub node_guid: u64,
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub atomic_arg_sizes: u64,
    pub ex_comp_mask: u32,
    pub device_cap_flags2: u32,
    pub max_fa_bit_boundary: u32,
    pub log_max_atomic_inline_arg: u32,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: u32,
    pub max_qp_wr: u32,
    pub device_cap_flags: u32,
    pub max_sge: u32,
    pub max_sge_rd: u32,
    pub max_cq: u32,
    pub max_cqe: u32,
    pub max_mr: u32,
    pub max_pd: u32,
    pub max_qp_rd_atom: u32,
    pub max_ee_rd_atom: u32,
    pub max_res_rd_atom: u32,
    pub max_qp_init_rd_atom: u32,
    pub max_ee_init_rd_atom: u32,
    pub max_ee: u32,
    pub max_rdd: u32,
    pub max_mw: u32,
    pub max_raw_ipv6_qp: u32,
    pub max_raw_ethy_qp: u32,
    pub max_mcast_grp: u32,
    pub max_mcast_qp_attach: u32,
    pub max_total_mcast_qp_attach: u32,
    pub max_ah: u32,
    pub max_fmr: u32,
    pub max_map_per_fmr: u32,
    pub max_srq: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_uar: u32,
    pub gid_tbl_len: u32,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
    pub mode: u8,
    pub atomic_ops: u8,
    pub bmme_flags: u8,
    pub gid_types: u8,
    pub max_fast_reg_page_list_len: u32,
}

const _: () = assert!(size_of::<RingPages>() == 16);
const _: () = assert!(size_of::<DeviceCaps>() == 208);
const _: () = assert!(size_of::<Dsr>() == 280);
const _: () = assert!(std::mem::offset_of!(Dsr, caps) as u64 == DSR_CAPS_OFFSET);
const _: () = assert!(std::mem::offset_of!(DeviceCaps, max_qp) == 76);
const _: () = assert!(std::mem::offset_of!(DeviceCaps, max_srq) == 176);
const _: () = assert!(std::mem::offset_of!(DeviceCaps, max_pkeys) == 196);
const _: () = assert!(std::mem::offset_of!(DeviceCaps, gid_types) == 203);

/// `caps.mode`: RoCE is the only mode the driver accepts.
pub const MODE_ROCE: u8 = 0;
/// `caps.gid_types` / CREATE_BIND `gid_type`.
pub const GID_TYPE_ROCE_V1: u8 = 1;
pub const GID_TYPE_ROCE_V2: u8 = 2;
