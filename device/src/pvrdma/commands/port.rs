//! QUERY_PORT, QUERY_PKEY and the GID table (CREATE_BIND, DESTROY_BIND).

use log::warn;
use pvrdma_backend::Network;

use super::{Reply, Request, header_only, reply};
use crate::abi::{
    CreateBindRequest, DestroyBindRequest, QueryPkeyRequest, QueryPkeyResponse, QueryPortRequest,
    QueryPortResponse,
};
use crate::pvrdma::caps::{self, port};
use crate::pvrdma::objects::Gid;
use crate::pvrdma::{PvrdmaDevice, errno};

/// The device's only port.
const PORT: u8 = 1;

pub(super) fn query_port(device: &PvrdmaDevice, request: &Request) -> Reply {
    let req: QueryPortRequest = request.parse();
    if req.port_num != PORT {
        return Err(errno::EINVAL);
    }
    reply(&QueryPortResponse {
        attrs: caps::port_attr(device.limits(), device.is_active()),
        ..Default::default()
    })
}

pub(super) fn query_pkey(request: &Request) -> Reply {
    let req: QueryPkeyRequest = request.parse();
    if req.port_num != PORT || req.index != 0 {
        return Err(errno::EINVAL);
    }
    reply(&QueryPkeyResponse {
        pkey: port::DEFAULT_PKEY,
        ..Default::default()
    })
}

/// Binds a GID at a table index. A GID another port of the fabric holds is refused with
/// EADDRINUSE: a GID names one port, and whoever binds it receives its traffic.
pub(super) fn create_bind(
    device: &mut PvrdmaDevice,
    net: &dyn Network,
    request: &Request,
) -> Reply {
    let req: CreateBindRequest = request.parse();
    if req.gid_type != crate::abi::GID_TYPE_ROCE_V1 {
        return Err(errno::EINVAL);
    }
    if net.gid_taken(&req.new_gid) {
        warn!(
            "CREATE_BIND of GID {} at index {} refused: another port holds it",
            std::net::Ipv6Addr::from(req.new_gid),
            req.index
        );
        return Err(errno::EADDRINUSE);
    }
    let entry = device
        .objects
        .gids
        .get_mut(req.index as usize)
        .ok_or(errno::EINVAL)?;
    *entry = Some(Gid {
        raw: req.new_gid,
        gid_type: req.gid_type,
    });
    header_only()
}

pub(super) fn destroy_bind(device: &mut PvrdmaDevice, request: &Request) -> Reply {
    let req: DestroyBindRequest = request.parse();
    let entry = device
        .objects
        .gids
        .get_mut(req.index as usize)
        .ok_or(errno::EINVAL)?;
    match entry {
        Some(gid) if gid.raw == req.dest_gid => {
            *entry = None;
            header_only()
        }
        _ => Err(errno::ENOENT),
    }
}
