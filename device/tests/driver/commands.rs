//! The command channel (device-abi §5): one method per command. Each writes its request into the
//! command slot (stale bytes after it, like the kernel's stack union), writes REQUEST = 0,
//! reads ERR and, on success, reads the response slot and checks `ack` and the echoed
//! `response` cookie the way the driver checks `ack`.

use vfio_user_pvrdma::abi::{
    self, AhAttr, Command, CreateBindRequest, CreateCqRequest, CreateMrRequest, CreateMrResponse,
    CreateQpRequest, CreateQpResponseV1, CreateQpResponseV2, CreateSrqRequest, CreateUcRequest,
    DestroyBindRequest, HandleRequest, HandleResponse, ModifyQpRequest, ModifySrqRequest, PortAttr,
    QpAttr, QueryPkeyRequest, QueryPkeyResponse, QueryPortRequest, QueryPortResponse,
    QueryQpResponse, QuerySrqResponse, REQUEST_SLOT_BYTES, RESPONSE_ACK, RESPONSE_SLOT_BYTES,
    RequestHeader, ResponseHeader, SrqAttr, regs,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::Driver;
use super::bus::Bus;
use super::memory;

/// Byte the driver fills the response slot with before each command, to see what the
/// device wrote.
pub const RESPONSE_POISON: u8 = 0xee;

/// Why a command failed, from the driver's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdError {
    /// ERR was non-zero after REQUEST.
    Device(u32),
    /// "unknown response": `ack` is not `cmd | 0x80000000`.
    BadAck { expected: u32, got: u32 },
    /// The `response` cookie was not echoed.
    BadCookie { expected: u64, got: u64 },
    /// MODIFY_QP's `resp.hdr.err` was non-zero.
    HeaderErr(u8),
}

impl CmdError {
    /// The ERR value; panics for failures the device did not report through ERR.
    pub fn err(self) -> u32 {
        match self {
            CmdError::Device(err) => err,
            other => panic!("expected an ERR failure, got {other:?}"),
        }
    }
}

pub type CmdResult<T> = Result<T, CmdError>;

/// What happened to the last command.
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub cmd: u32,
    pub cookie: u64,
    /// ERR after the REQUEST write.
    pub err: u32,
    /// Vectors raised during the REQUEST write.
    pub vectors: Vec<u16>,
    /// The 176-byte response slot after the command.
    pub response: [u8; RESPONSE_SLOT_BYTES],
}

impl CommandRecord {
    pub fn header(&self) -> ResponseHeader {
        ResponseHeader::read_from_prefix(&self.response).unwrap().0
    }
}

/// A CREATE_QP response in either layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCreated {
    pub qpn: u32,
    pub handle: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

pub fn header(cmd: Command) -> RequestHeader {
    RequestHeader {
        response: 0,
        cmd: cmd as u32,
        reserved: 0,
    }
}

/// A request naming one object.
pub fn handle_request(cmd: Command, handle: u32, extra: u32) -> HandleRequest {
    HandleRequest {
        hdr: header(cmd),
        handle,
        extra,
    }
}

impl<B: Bus> Driver<B> {
    fn slots(&self) -> (u64, u64) {
        let dsr = self
            .dsr
            .as_ref()
            .expect("a DSR was built (commands need its slots)");
        (dsr.cmd_slot, dsr.resp_slot)
    }

    /// Executes the request in `bytes` (its header's `cmd` as given; the cookie is set
    /// here) and returns the whole response slot.
    pub fn execute_bytes(&mut self, bytes: &[u8]) -> CmdResult<[u8; RESPONSE_SLOT_BYTES]> {
        assert!(bytes.len() >= size_of::<RequestHeader>() && bytes.len() <= REQUEST_SLOT_BYTES);
        let (cmd_slot, resp_slot) = self.slots();
        let cookie = self.cookie();
        let mut slot = [self.stale_fill; REQUEST_SLOT_BYTES];
        slot[..bytes.len()].copy_from_slice(bytes);
        slot[..8].copy_from_slice(&cookie.to_le_bytes());
        let cmd = u32::from_le_bytes(slot[8..12].try_into().unwrap());
        let ram = self.bus.ram();
        memory::write_bytes(ram, cmd_slot, &slot);
        memory::fill(ram, resp_slot, RESPONSE_POISON, RESPONSE_SLOT_BYTES as u64);
        self.log_irqs();
        self.write_reg(regs::REQUEST, 0);
        let err = self.read_reg(regs::ERR);
        let vectors = self.log_irqs();
        let mut response = [0u8; RESPONSE_SLOT_BYTES];
        memory::read_bytes(self.bus.ram(), resp_slot, &mut response);
        let record = CommandRecord {
            cmd,
            cookie,
            err,
            vectors,
            response,
        };
        let hdr = record.header();
        self.last = Some(record);
        if err != 0 {
            return Err(CmdError::Device(err));
        }
        let expected = cmd | RESPONSE_ACK;
        if hdr.ack != expected {
            return Err(CmdError::BadAck {
                expected,
                got: hdr.ack,
            });
        }
        if hdr.response != cookie {
            return Err(CmdError::BadCookie {
                expected: cookie,
                got: hdr.response,
            });
        }
        Ok(response)
    }

    /// Executes `request` and parses the response as `Resp`.
    pub fn command<Req, Resp>(&mut self, request: &Req) -> CmdResult<Resp>
    where
        Req: IntoBytes + Immutable,
        Resp: FromBytes,
    {
        let response = self.execute_bytes(request.as_bytes())?;
        Ok(Resp::read_from_prefix(&response).unwrap().0)
    }

    /// A command whose response (if any) the driver does not read.
    pub fn command_no_response<Req: IntoBytes + Immutable>(
        &mut self,
        request: &Req,
    ) -> CmdResult<()> {
        self.execute_bytes(request.as_bytes()).map(|_| ())
    }

    // ---- port ----

    pub fn query_port(&mut self, port_num: u8) -> CmdResult<PortAttr> {
        let resp: QueryPortResponse = self.command(&QueryPortRequest {
            hdr: header(Command::QueryPort),
            port_num,
            reserved: [0; 7],
        })?;
        Ok(resp.attrs)
    }

    pub fn query_pkey(&mut self, port_num: u8, index: u8) -> CmdResult<u16> {
        let resp: QueryPkeyResponse = self.command(&QueryPkeyRequest {
            hdr: header(Command::QueryPkey),
            port_num,
            index,
            reserved: [0; 6],
        })?;
        Ok(resp.pkey)
    }

    pub fn create_bind(&mut self, index: u32, gid: [u8; 16], gid_type: u8) -> CmdResult<()> {
        self.command_no_response(&CreateBindRequest {
            hdr: header(Command::CreateBind),
            mtu: 1024,
            vlan: 0xfff,
            index,
            new_gid: gid,
            gid_type,
            reserved: [0; 3],
        })
    }

    pub fn destroy_bind(&mut self, index: u32, gid: [u8; 16]) -> CmdResult<()> {
        self.command_no_response(&DestroyBindRequest {
            hdr: header(Command::DestroyBind),
            index,
            dest_gid: gid,
            reserved: [0; 4],
        })
    }

    // ---- contexts and PDs ----

    /// CREATE_UC with a page frame number: `pfn64`, or a 32-bit `pfn` for devices older
    /// than version 19 (the struct is zeroed first, so the upper half is 0).
    pub fn create_uc(&mut self, pfn: u64) -> CmdResult<u32> {
        let version = self
            .session
            .as_ref()
            .map_or(abi::version::PPN64, |s| s.version);
        let pfn64 = if version < abi::version::PPN64 {
            pfn & u64::from(u32::MAX)
        } else {
            pfn
        };
        let resp: HandleResponse = self.command(&CreateUcRequest {
            hdr: header(Command::CreateUc),
            pfn64,
        })?;
        Ok(resp.handle)
    }

    pub fn destroy_uc(&mut self, ctx: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroyUc, ctx, 0))
    }

    pub fn create_pd(&mut self, ctx: u32) -> CmdResult<u32> {
        let resp: HandleResponse = self.command(&handle_request(Command::CreatePd, ctx, 0))?;
        Ok(resp.handle)
    }

    pub fn destroy_pd(&mut self, pd: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroyPd, pd, 0))
    }

    // ---- MRs ----

    pub fn create_mr(&mut self, request: &CreateMrRequest) -> CmdResult<CreateMrResponse> {
        self.command(request)
    }

    pub fn destroy_mr(&mut self, mr: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroyMr, mr, 0))
    }

    // ---- CQs ----

    /// Returns `(cq_handle, cqe)`.
    pub fn create_cq(&mut self, request: &CreateCqRequest) -> CmdResult<(u32, u32)> {
        let resp: HandleResponse = self.command(request)?;
        Ok((resp.handle, resp.extra))
    }

    pub fn resize_cq(&mut self, cq: u32, cqe: u32) -> CmdResult<u32> {
        let resp: HandleResponse = self.command(&handle_request(Command::ResizeCq, cq, cqe))?;
        Ok(resp.handle)
    }

    pub fn destroy_cq(&mut self, cq: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroyCq, cq, 0))
    }

    // ---- QPs ----

    /// Whether the device answers CREATE_QP with the v2 layout: the driver's own version
    /// (as written into the DSR) and the device's must both be at least 20.
    pub fn qp_resp_v2(&self) -> bool {
        let dsr_driver_version = self.dsr.as_ref().map_or(0, |d| d.config.driver_version);
        let device_version = self.session.as_ref().map_or(0, |s| s.version);
        dsr_driver_version >= abi::version::QP_HANDLE && device_version >= abi::version::QP_HANDLE
    }

    pub fn create_qp(&mut self, request: &CreateQpRequest) -> CmdResult<QpCreated> {
        if self.qp_resp_v2() {
            let r: CreateQpResponseV2 = self.command(request)?;
            Ok(QpCreated {
                qpn: r.qpn,
                handle: r.qp_handle,
                max_send_wr: r.max_send_wr,
                max_recv_wr: r.max_recv_wr,
                max_send_sge: r.max_send_sge,
                max_recv_sge: r.max_recv_sge,
                max_inline_data: r.max_inline_data,
            })
        } else {
            let r: CreateQpResponseV1 = self.command(request)?;
            Ok(QpCreated {
                qpn: r.qpn,
                handle: r.qpn,
                max_send_wr: r.max_send_wr,
                max_recv_wr: r.max_recv_wr,
                max_send_sge: r.max_send_sge,
                max_recv_sge: r.max_recv_sge,
                max_inline_data: r.max_inline_data,
            })
        }
    }

    /// MODIFY_QP; like the driver, a non-zero `resp.hdr.err` is a failure too.
    pub fn modify_qp(&mut self, qp: u32, attr_mask: u32, attrs: &QpAttr) -> CmdResult<()> {
        let resp: ResponseHeader = self.command(&ModifyQpRequest {
            hdr: header(Command::ModifyQp),
            qp_handle: qp,
            attr_mask,
            attrs: *attrs,
        })?;
        match resp.err {
            0 => Ok(()),
            err => Err(CmdError::HeaderErr(err)),
        }
    }

    pub fn query_qp(&mut self, qp: u32, attr_mask: u32) -> CmdResult<QpAttr> {
        let resp: QueryQpResponse =
            self.command(&handle_request(Command::QueryQp, qp, attr_mask))?;
        Ok(resp.attrs)
    }

    pub fn destroy_qp(&mut self, qp: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroyQp, qp, 0))
    }

    // ---- SRQs ----

    pub fn create_srq(&mut self, request: &CreateSrqRequest) -> CmdResult<u32> {
        let resp: HandleResponse = self.command(request)?;
        Ok(resp.handle)
    }

    pub fn modify_srq(&mut self, srq: u32, attr_mask: u32, srq_limit: u32) -> CmdResult<()> {
        self.command_no_response(&ModifySrqRequest {
            hdr: header(Command::ModifySrq),
            srq_handle: srq,
            attr_mask,
            attrs: SrqAttr {
                srq_limit,
                ..SrqAttr::default()
            },
        })
    }

    pub fn query_srq(&mut self, srq: u32) -> CmdResult<SrqAttr> {
        let resp: QuerySrqResponse = self.command(&handle_request(Command::QuerySrq, srq, 0))?;
        Ok(resp.attrs)
    }

    pub fn destroy_srq(&mut self, srq: u32) -> CmdResult<()> {
        self.command_no_response(&handle_request(Command::DestroySrq, srq, 0))
    }
}

/// An address vector with a GRH, as ib_core builds it for RoCE (device-abi §5.4 MODIFY_QP).
pub fn roce_ah(dgid: [u8; 16], sgid_index: u8, dmac: [u8; 6]) -> AhAttr {
    AhAttr {
        grh: abi::GlobalRoute {
            dgid,
            flow_label: 0,
            sgid_index,
            hop_limit: 1,
            traffic_class: 0,
            reserved: 0,
        },
        ah_flags: 1,
        port_num: 1,
        dmac,
        ..AhAttr::default()
    }
}
