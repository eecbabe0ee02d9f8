//! What the device advertises: its capabilities (written into the DSR) and its port.
//! Each value satisfies a driver check; the reasons are in docs/device.md.

use crate::abi::{self, DeviceCaps, PortAttr};

/// The device API version in the VERSION register: 20 gives QP handles separate from QPNs
/// and 64-bit page numbers, the layout of every current driver.
pub const DEVICE_VERSION: u32 = abi::version::QP_HANDLE;

/// Pages of BAR2, one UAR page per user context (page 0 is the kernel's).
const UAR_PAGES: u32 = crate::pci::ids::UAR_PAGES as u32;

/// Limits of one device. Every handle table and every size check uses these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_qp: u32,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cq: u32,
    pub max_cqe: u32,
    pub max_mr: u32,
    pub max_pd: u32,
    pub max_ah: u32,
    pub max_srq: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_uar: u32,
    pub gid_tbl_len: u32,
    pub max_mr_size: u64,
    pub max_contexts: u32,
    /// Guest page addresses the device may hold for all objects together (MR page lists and
    /// ring pages): bounds the host memory a guest can make the device allocate (rule 23).
    pub max_mapped_pages: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_qp: 1024,
            max_qp_wr: 4096,
            max_sge: 16,
            max_cq: 2048,
            max_cqe: 65536,
            max_mr: 4096,
            max_pd: 1024,
            max_ah: 1024,
            max_srq: 1024,
            max_srq_wr: 4096,
            max_srq_sge: 16,
            max_uar: UAR_PAGES,
            gid_tbl_len: 64,
            max_mr_size: 1 << 30,
            max_contexts: UAR_PAGES,
            // 32 MiB of page lists, describing 16 GiB of guest buffers.
            max_mapped_pages: 1 << 22,
        }
    }
}

const ATOMIC_CMP_SWAP: u8 = 1 << 0;
const ATOMIC_FETCH_ADD: u8 = 1 << 1;
/// Outstanding RDMA READs and atomics per QP; the fabric executes them synchronously, so
/// the number only matters to applications that size their queues by it.
const MAX_RD_ATOMIC: u32 = 16;

/// The capabilities block for `limits`, with `node_guid` as the node and system GUID.
pub fn device_caps(limits: &Limits, node_guid: [u8; 8]) -> DeviceCaps {
    DeviceCaps {
        // Shown by ibv_devinfo as 1.0.000.
        fw_ver: 1 << 32,
        node_guid: u64::from_ne_bytes(node_guid),
        sys_image_guid: u64::from_ne_bytes(node_guid),
        max_mr_size: limits.max_mr_size,
        page_size_cap: abi::PAGE_SIZE,
        vendor_id: u32::from(crate::pci::ids::VENDOR_ID),
        vendor_part_id: u32::from(crate::pci::ids::DEVICE_ID),
        hw_ver: 1,
        max_qp: limits.max_qp,
        max_qp_wr: limits.max_qp_wr,
        max_sge: limits.max_sge,
        max_sge_rd: limits.max_sge,
        max_cq: limits.max_cq,
        max_cqe: limits.max_cqe,
        max_mr: limits.max_mr,
        max_pd: limits.max_pd,
        max_ah: limits.max_ah,
        max_srq: limits.max_srq,
        max_srq_wr: limits.max_srq_wr,
        max_srq_sge: limits.max_srq_sge,
        max_uar: limits.max_uar,
        gid_tbl_len: limits.gid_tbl_len,
        max_pkeys: 1,
        phys_port_cnt: 1,
        mode: abi::MODE_ROCE,
        gid_types: abi::GID_TYPE_ROCE_V1,
        max_fast_reg_page_list_len: abi::MAX_FAST_REG_PAGES,
        // Local invalidate, remote invalidate and fast-register work requests: all three,
        // which is what makes the driver offer memory management extensions to ULPs.
        bmme_flags: 0b111,
        // 64-bit compare-and-swap and fetch-and-add, executed by the responder.
        atomic_ops: ATOMIC_CMP_SWAP | ATOMIC_FETCH_ADD,
        max_qp_rd_atom: MAX_RD_ATOMIC,
        max_qp_init_rd_atom: MAX_RD_ATOMIC,
        max_res_rd_atom: MAX_RD_ATOMIC * limits.max_qp,
        ..DeviceCaps::default()
    }
}

/// IB port states and the values QUERY_PORT reports.
pub mod port {
    pub const STATE_DOWN: u32 = 1;
    pub const STATE_ACTIVE: u32 = 4;
    pub const PHYS_STATE_LINK_UP: u8 = 5;
    pub const PHYS_STATE_DISABLED: u8 = 3;
    pub const MTU_1024: u32 = 3;
    pub const MTU_4096: u32 = 5;
    /// 4X at EDR: ibv_devinfo shows a 100 Gb/s link.
    pub const WIDTH_4X: u8 = 2;
    pub const SPEED_EDR: u8 = 32;
    pub const DEFAULT_PKEY: u16 = 0xffff;
}

/// The port's attributes; `active` follows the device's state.
pub fn port_attr(limits: &Limits, active: bool) -> PortAttr {
    PortAttr {
        state: if active {
            port::STATE_ACTIVE
        } else {
            port::STATE_DOWN
        },
        max_mtu: port::MTU_4096,
        active_mtu: port::MTU_1024,
        gid_tbl_len: limits.gid_tbl_len,
        max_msg_sz: 0x8000_0000,
        pkey_tbl_len: 1,
        active_width: port::WIDTH_4X,
        active_speed: port::SPEED_EDR,
        phys_state: if active {
            port::PHYS_STATE_LINK_UP
        } else {
            port::PHYS_STATE_DISABLED
        },
        ..PortAttr::default()
    }
}

/// The EUI-64 of a MAC address, the conventional node GUID of a RoCE device.
pub fn eui64(mac: [u8; 6]) -> [u8; 8] {
    [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_pass_every_driver_probe_check() {
        let limits = Limits::default();
        let caps = device_caps(&limits, eui64([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(caps.mode, 0);
        assert!(caps.gid_types == 1 || caps.gid_types == 2);
        assert!(caps.max_uar.is_power_of_two());
        assert!(caps.max_qp <= 65535 && caps.max_qp > 0 && caps.max_cq > 0);
        assert!(caps.max_qp_wr >= 512 && caps.max_cqe >= 1024 && caps.max_sge >= 2);
        // The largest send WQE stride must fit in a page.
        assert!(80 + 16 * caps.max_sge <= 4096);
        assert_eq!(caps.phys_port_cnt, 1);
        assert!(port_attr(&limits, true).gid_tbl_len <= caps.gid_tbl_len);
        assert_eq!(
            caps.node_guid.to_ne_bytes(),
            [0x50, 0x54, 0, 0xff, 0xfe, 1, 2, 3]
        );
    }
}
