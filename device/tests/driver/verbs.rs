//! Composite operations as ib_core, the kernel driver and rdma-core perform them (device-abi §11):
//! allocate the guest memory, build the layouts, issue the command, keep the result.

use vfio_user_pvrdma::abi::{
    Command, CreateCqRequest, CreateMrRequest, CreateQpRequest, CreateSrqRequest, GID_TYPE_ROCE_V1,
    MR_FLAG_DMA, MR_FLAG_FRMR, PAGE_SIZE, QpAttr, Sge, SrqAttr, access, qp_attr_mask as mask,
    qp_state, qp_type, uar,
};

use super::Driver;
use super::bus::Bus;
use super::commands::{CmdResult, header, roce_ah};
use super::layout::{CqLayout, QpLayout, QpOwner, QpSizes, SrqLayout, UserBuffer};
use super::queues::{Cq, KERNEL_UC, Mr, Qp, Srq, Uc};

/// `ibv_rc_pingpong`'s masks (device-abi §9.3).
pub const RC_INIT_MASK: u32 = 0x39;
pub const RC_RTR_MASK: u32 = 0x12_9181;
pub const RC_RTS_MASK: u32 = 0x1_2e01;
/// ib_mad's masks for QP1: INIT = STATE | PKEY_INDEX | QKEY, RTR = STATE,
/// RTS = STATE | SQ_PSN.
pub const GSI_INIT_MASK: u32 = mask::STATE | mask::PKEY_INDEX | mask::QKEY;
pub const GSI_RTR_MASK: u32 = mask::STATE;
pub const GSI_RTS_MASK: u32 = mask::STATE | mask::SQ_PSN;
/// `IB_QP1_QKEY`.
pub const QP1_QKEY: u32 = 0x8001_0000;
/// ib_mad's GSI QP: 128 sends of 2 SGEs, 512 receives of 1 SGE (device-abi §9.6).
pub const GSI_SIZES: QpSizes = QpSizes {
    max_send_wr: 128,
    max_recv_wr: 512,
    max_send_sge: 2,
    max_recv_sge: 1,
    srq: false,
};
/// The MAD layer's CQ: 640 entries rounded up (device-abi §9.6).
pub const MAD_CQE: u32 = 1024;
/// A MAD receive buffer: 40-byte GRH + 256-byte MAD.
pub const MAD_RECV_BYTES: u32 = 296;

/// The MAC of the paired vmxnet3 and the default link-local GID derived from it.
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

pub fn link_local_gid(mac: [u8; 6]) -> [u8; 16] {
    let mut gid = [0u8; 16];
    gid[0] = 0xfe;
    gid[1] = 0x80;
    gid[8..16].copy_from_slice(&[
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    gid
}

/// An IPv4-mapped GID (`::ffff:a.b.c.d`), as ib_core adds one per address.
pub fn ipv4_gid(ip: [u8; 4]) -> [u8; 16] {
    let mut gid = [0u8; 16];
    gid[10] = 0xff;
    gid[11] = 0xff;
    gid[12..].copy_from_slice(&ip);
    gid
}

/// Everything needed to create a QP.
#[derive(Debug, Clone, Copy)]
pub struct QpSpec {
    pub owner: QpOwner,
    pub qp_type: u8,
    pub uc: Uc,
    pub pd: u32,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub sizes: QpSizes,
    pub sq_sig_all: bool,
}

impl QpSpec {
    /// An rdma-core QP of `qp_type` on `uc`'s `pd` with one CQ for both queues.
    pub fn user(qp_type: u8, uc: Uc, pd: u32, cq: u32, sizes: QpSizes) -> QpSpec {
        QpSpec {
            owner: QpOwner::User,
            qp_type,
            uc,
            pd,
            send_cq: cq,
            recv_cq: cq,
            srq: None,
            sizes,
            sq_sig_all: false,
        }
    }
}

/// `ibv_rc_pingpong`'s QP: 1 send, 512 receives (500 rounded up), one SGE each.
pub const PINGPONG_SIZES: QpSizes = QpSizes {
    max_send_wr: 1,
    max_recv_wr: 512,
    max_send_sge: 1,
    max_recv_sge: 1,
    srq: false,
};

/// The kernel MAD layer's objects after registration (device-abi §11.1).
#[derive(Debug, Clone)]
pub struct KernelMad {
    pub pd: u32,
    pub dma_mr: Mr,
    pub cq: Cq,
    pub qp: Qp,
    /// Guest addresses of the posted receive buffers, by wr_id.
    pub recv_bufs: Vec<u64>,
}

/// RC attributes for INIT with `ibv_rc_pingpong`'s mask.
pub fn rc_init_attrs() -> QpAttr {
    QpAttr {
        qp_state: qp_state::INIT,
        pkey_index: 0,
        port_num: 1,
        qp_access_flags: 0,
        ..QpAttr::default()
    }
}

/// RC attributes for RTR with `ibv_rc_pingpong`'s mask.
pub fn rc_rtr_attrs(dest_qpn: u32, rq_psn: u32, dgid: [u8; 16], sgid_index: u8) -> QpAttr {
    QpAttr {
        qp_state: qp_state::RTR,
        path_mtu: 3,
        dest_qp_num: dest_qpn,
        rq_psn,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 12,
        ah_attr: roce_ah(dgid, sgid_index, [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]),
        ..QpAttr::default()
    }
}

/// RC attributes for RTS with `ibv_rc_pingpong`'s mask.
pub fn rc_rts_attrs(sq_psn: u32) -> QpAttr {
    QpAttr {
        qp_state: qp_state::RTS,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        sq_psn,
        max_rd_atomic: 1,
        ..QpAttr::default()
    }
}

/// Attributes that only change the state.
pub fn state_attrs(state: u32) -> QpAttr {
    QpAttr {
        qp_state: state,
        ..QpAttr::default()
    }
}

impl<B: Bus> Driver<B> {
    // ---- contexts ----

    /// `ibv_open_device`: the lowest free UAR index ≥ 1, CREATE_UC with its pfn.
    pub fn open_context(&mut self) -> CmdResult<Uc> {
        let session = self.session.as_mut().expect("probed");
        let index = session
            .uar_in_use
            .iter()
            .position(|used| !used)
            .expect("a free UAR index");
        session.uar_in_use[index] = true;
        let pfn = session.dsr.config.uar_pfn + index as u64;
        match self.create_uc(pfn) {
            Ok(handle) => Ok(Uc {
                handle,
                uar: index as u32,
            }),
            Err(e) => {
                self.session.as_mut().unwrap().uar_in_use[index] = false;
                Err(e)
            }
        }
    }

    /// Context destruction: DESTROY_UC; the UAR index is freed whatever the result.
    pub fn close_context(&mut self, uc: Uc) -> CmdResult<()> {
        let result = self.destroy_uc(uc.handle);
        if let Some(session) = self.session.as_mut() {
            session.uar_in_use[uc.uar as usize] = false;
        }
        result
    }

    // ---- MRs ----

    pub fn user_mr_request(pd: u32, buffer: &UserBuffer, access_flags: u32) -> CreateMrRequest {
        CreateMrRequest {
            hdr: header(Command::CreateMr),
            start: buffer.start,
            length: buffer.length,
            pdir_dma: buffer.pdir.dir,
            pd_handle: pd,
            access_flags,
            flags: 0,
            nchunks: buffer.nchunks(),
        }
    }

    pub fn dma_mr_request(pd: u32) -> CreateMrRequest {
        CreateMrRequest {
            hdr: header(Command::CreateMr),
            pd_handle: pd,
            access_flags: access::LOCAL_WRITE,
            flags: MR_FLAG_DMA,
            ..CreateMrRequest::default()
        }
    }

    pub fn frmr_request(pd: u32, max_num_sg: u32) -> CreateMrRequest {
        CreateMrRequest {
            hdr: header(Command::CreateMr),
            pd_handle: pd,
            flags: MR_FLAG_FRMR,
            nchunks: max_num_sg,
            ..CreateMrRequest::default()
        }
    }

    /// A user buffer at virtual address `start` (its pages allocated and pinned).
    pub fn user_buffer(&mut self, start: u64, length: u64) -> UserBuffer {
        let ram = self.bus.ram();
        UserBuffer::new(&mut self.alloc, ram, start, length)
    }

    /// `ibv_reg_mr`.
    pub fn reg_user_mr(
        &mut self,
        pd: u32,
        start: u64,
        length: u64,
        access_flags: u32,
    ) -> CmdResult<Mr> {
        let buffer = self.user_buffer(start, length);
        let resp = self.create_mr(&Self::user_mr_request(pd, &buffer, access_flags))?;
        Ok(Mr {
            handle: resp.mr_handle,
            lkey: resp.lkey,
            rkey: resp.rkey,
            buffer: Some(buffer),
        })
    }

    /// `ibv_reg_mr` of a buffer whose pages are contiguous in guest-physical memory (one
    /// huge page's worth, in a huge-page-backed guest).
    pub fn reg_contiguous_user_mr(
        &mut self,
        pd: u32,
        start: u64,
        length: u64,
        access_flags: u32,
    ) -> CmdResult<Mr> {
        let ram = self.bus.ram();
        let buffer = UserBuffer::contiguous(&mut self.alloc, ram, start, length);
        let resp = self.create_mr(&Self::user_mr_request(pd, &buffer, access_flags))?;
        Ok(Mr {
            handle: resp.mr_handle,
            lkey: resp.lkey,
            rkey: resp.rkey,
            buffer: Some(buffer),
        })
    }

    /// `get_dma_mr` (every kernel PD gets one).
    pub fn get_dma_mr(&mut self, pd: u32) -> CmdResult<Mr> {
        let resp = self.create_mr(&Self::dma_mr_request(pd))?;
        Ok(Mr {
            handle: resp.mr_handle,
            lkey: resp.lkey,
            rkey: resp.rkey,
            buffer: None,
        })
    }

    /// `alloc_mr(IB_MR_TYPE_MEM_REG)`.
    pub fn alloc_frmr(&mut self, pd: u32, max_num_sg: u32) -> CmdResult<Mr> {
        let resp = self.create_mr(&Self::frmr_request(pd, max_num_sg))?;
        Ok(Mr {
            handle: resp.mr_handle,
            lkey: resp.lkey,
            rkey: resp.rkey,
            buffer: None,
        })
    }

    // ---- CQs ----

    pub fn cq_layout(&mut self, cqe: u32) -> CqLayout {
        let ram = self.bus.ram();
        CqLayout::new(&mut self.alloc, ram, cqe)
    }

    pub fn cq_request(layout: &CqLayout, ctx: u32) -> CreateCqRequest {
        CreateCqRequest {
            hdr: header(Command::CreateCq),
            pdir_dma: layout.ring.pdir.dir,
            ctx_handle: ctx,
            cqe: layout.cqe,
            nchunks: layout.nchunks,
            reserved: 0,
        }
    }

    /// A CQ of `cqe` entries for `uc` (use [`KERNEL_UC`] for a kernel CQ).
    pub fn create_cq_on(&mut self, uc: Uc, cqe: u32) -> CmdResult<Cq> {
        let layout = self.cq_layout(cqe);
        let (handle, returned) = self.create_cq(&Self::cq_request(&layout, uc.handle))?;
        assert_eq!(
            returned, cqe,
            "the driver adopts the returned cqe as its ring size"
        );
        Ok(Cq { handle, uc, layout })
    }

    // ---- SRQs ----

    pub fn srq_layout(&mut self, max_wr: u32, max_sge: u32) -> SrqLayout {
        let ram = self.bus.ram();
        SrqLayout::new(&mut self.alloc, ram, max_wr, max_sge)
    }

    pub fn srq_request(layout: &SrqLayout, pd: u32, srq_limit: u32) -> CreateSrqRequest {
        CreateSrqRequest {
            hdr: header(Command::CreateSrq),
            pdir_dma: layout.ring.pdir.dir,
            pd_handle: pd,
            nchunks: layout.nchunks,
            attrs: SrqAttr {
                max_wr: layout.max_wr,
                max_sge: layout.max_sge,
                srq_limit,
                reserved: 0,
            },
            srq_type: 0,
            reserved: [0; 7],
        }
    }

    pub fn create_srq_on(&mut self, uc: Uc, pd: u32, max_wr: u32, max_sge: u32) -> CmdResult<Srq> {
        let layout = self.srq_layout(max_wr, max_sge);
        let handle = self.create_srq(&Self::srq_request(&layout, pd, 0))?;
        Ok(Srq {
            handle,
            uc,
            pd,
            layout,
        })
    }

    // ---- QPs ----

    pub fn qp_layout(&mut self, owner: QpOwner, sizes: QpSizes) -> QpLayout {
        let ram = self.bus.ram();
        QpLayout::new(&mut self.alloc, ram, owner, sizes)
    }

    pub fn qp_request(layout: &QpLayout, spec: &QpSpec) -> CreateQpRequest {
        let sizes = layout.sizes;
        CreateQpRequest {
            hdr: header(Command::CreateQp),
            pdir_dma: layout.ring.pdir.dir,
            pd_handle: spec.pd,
            send_cq_handle: spec.send_cq,
            recv_cq_handle: spec.recv_cq,
            srq_handle: spec.srq.unwrap_or(0),
            max_send_wr: sizes.max_send_wr,
            max_recv_wr: if sizes.srq { 0 } else { sizes.max_recv_wr },
            max_send_sge: sizes.max_send_sge,
            max_recv_sge: if sizes.srq { 0 } else { sizes.max_recv_sge },
            max_inline_data: 0,
            lkey: 0,
            access_flags: access::LOCAL_WRITE,
            total_chunks: layout.total_chunks,
            send_chunks: layout.send_chunks,
            max_atomic_arg: 0,
            sq_sig_all: u8::from(spec.sq_sig_all),
            qp_type: spec.qp_type,
            is_srq: u8::from(spec.srq.is_some()),
            reserved: [0; 3],
        }
    }

    /// Builds the QP's buffer and issues CREATE_QP.
    pub fn create_qp_with(&mut self, spec: QpSpec) -> CmdResult<Qp> {
        let mut sizes = spec.sizes;
        sizes.srq = spec.srq.is_some();
        let layout = self.qp_layout(spec.owner, sizes);
        self.create_qp_on_layout(spec, layout)
    }

    pub fn create_qp_on_layout(&mut self, spec: QpSpec, layout: QpLayout) -> CmdResult<Qp> {
        let created = self.create_qp(&Self::qp_request(&layout, &spec))?;
        Ok(Qp {
            handle: created.handle,
            qpn: created.qpn,
            uc: spec.uc,
            qp_type: spec.qp_type,
            pd: spec.pd,
            send_cq: spec.send_cq,
            recv_cq: spec.recv_cq,
            srq: spec.srq,
            layout,
        })
    }

    /// RESET → INIT → RTR → RTS with `ibv_rc_pingpong`'s masks.
    pub fn rc_connect(
        &mut self,
        qp: &Qp,
        dest_qpn: u32,
        dgid: [u8; 16],
        sgid_index: u8,
    ) -> CmdResult<()> {
        self.modify_qp(qp.handle, RC_INIT_MASK, &rc_init_attrs())?;
        self.modify_qp(
            qp.handle,
            RC_RTR_MASK,
            &rc_rtr_attrs(dest_qpn, 0x1234, dgid, sgid_index),
        )?;
        self.modify_qp(qp.handle, RC_RTS_MASK, &rc_rts_attrs(0x5678))
    }

    /// RESET → INIT (qkey) → RTR → RTS, for UD and GSI QPs.
    pub fn ud_activate(&mut self, qp: &Qp, qkey: u32) -> CmdResult<()> {
        let init = QpAttr {
            qp_state: qp_state::INIT,
            qkey,
            ..QpAttr::default()
        };
        self.modify_qp(qp.handle, GSI_INIT_MASK, &init)?;
        self.modify_qp(qp.handle, GSI_RTR_MASK, &state_attrs(qp_state::RTR))?;
        self.modify_qp(qp.handle, GSI_RTS_MASK, &state_attrs(qp_state::RTS))
    }

    /// Moves `qp` to `state` with a STATE-only mask.
    pub fn modify_qp_state(&mut self, qp: &Qp, state: u32) -> CmdResult<()> {
        self.modify_qp(qp.handle, mask::STATE, &state_attrs(state))
    }

    // ---- the kernel's registration (device-abi §11.1) ----

    /// What `ib_register_device` and the MAD layer do after a successful probe, with the
    /// link-local GID of [`MAC`].
    pub fn kernel_registration(&mut self) -> CmdResult<KernelMad> {
        self.kernel_registration_with_mac(MAC)
    }

    /// [`Driver::kernel_registration`] for a vmxnet3 with `mac`: devices of one fabric need
    /// distinct MACs, as their GIDs must differ.
    pub fn kernel_registration_with_mac(&mut self, mac: [u8; 6]) -> CmdResult<KernelMad> {
        for _ in 0..3 {
            self.query_port(1)?;
        }
        let pkeys = self.query_port(1)?.pkey_tbl_len;
        for index in 0..pkeys {
            self.query_pkey(1, index as u8)?;
        }
        self.create_bind(0, link_local_gid(mac), GID_TYPE_ROCE_V1)?;
        let pd = self.create_pd(0)?;
        let dma_mr = self.get_dma_mr(pd)?;
        let cq = self.create_cq_on(KERNEL_UC, MAD_CQE)?;
        self.ring_cq(&cq, uar::CQ_ARM);
        let qp = self.create_qp_with(QpSpec {
            owner: QpOwner::Kernel,
            qp_type: qp_type::GSI,
            uc: KERNEL_UC,
            pd,
            send_cq: cq.handle,
            recv_cq: cq.handle,
            srq: None,
            sizes: GSI_SIZES,
            sq_sig_all: true,
        })?;
        self.ud_activate(&qp, QP1_QKEY)?;
        let ram = self.bus.ram();
        let pages =
            (u64::from(GSI_SIZES.max_recv_wr) * u64::from(MAD_RECV_BYTES)).div_ceil(PAGE_SIZE);
        let base = self.alloc.block(ram, pages);
        let mut recv_bufs = Vec::new();
        for i in 0..GSI_SIZES.max_recv_wr {
            let addr = base + u64::from(i) * u64::from(MAD_RECV_BYTES);
            let sge = Sge {
                addr,
                length: MAD_RECV_BYTES,
                lkey: dma_mr.lkey,
            };
            self.post_recv(&qp, u64::from(i), &[sge])
                .unwrap_or_else(|e| panic!("posting MAD receive {i}: {e:?}"));
            recv_bufs.push(addr);
        }
        self.ring_cq(&cq, uar::CQ_ARM);
        Ok(KernelMad {
            pd,
            dma_mr,
            cq,
            qp,
            recv_bufs,
        })
    }
}
