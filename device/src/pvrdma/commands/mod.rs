//! The command channel (device-abi §5): copy the request out of the command slot once, validate it,
//! act, and write the response slot. Any failure is an errno for the ERR register; the
//! guest's verb then fails cleanly.

mod context;
mod cq;
mod mr;
mod port;
mod qp;
mod srq;

use log::debug;
use pvrdma_backend::Network;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::memory::{self, GuestRam};
use super::{PvrdmaDevice, errno};
use crate::abi::{
    Command, REQUEST_SLOT_BYTES, RESPONSE_ACK, RESPONSE_SLOT_BYTES, RequestHeader, ResponseHeader,
};

/// A command's outcome: the response bytes (header included, header fields filled in by
/// the dispatcher) or an errno.
type Reply = Result<Vec<u8>, u32>;

/// The request as copied out of guest memory: every handler parses this private copy.
struct Request {
    bytes: [u8; REQUEST_SLOT_BYTES],
}

impl Request {
    /// The command's own struct; bytes past it may be stale and are never looked at.
    fn parse<T: FromBytes>(&self) -> T {
        T::read_from_prefix(&self.bytes)
            .map(|(value, _)| value)
            .unwrap_or_else(|_| T::new_zeroed())
    }
}

/// Response bytes for `value`; its header is overwritten by the dispatcher.
fn reply<T: IntoBytes + Immutable>(value: &T) -> Reply {
    Ok(value.as_bytes().to_vec())
}

/// A response that is only a header.
fn header_only() -> Reply {
    Ok(vec![0; size_of::<ResponseHeader>()])
}

/// Executes the command in the command slot. QPs that entered the error state are added to
/// `flush`: their outstanding work is flushed after the response is written.
pub(super) fn execute(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    flush: &mut Vec<u32>,
) -> Result<(), u32> {
    let (cmd_slot, resp_slot) = match (&device.shared, device.active) {
        (Some(shared), true) => (shared.cmd_slot, shared.resp_slot),
        _ => {
            debug!("command before the device was activated");
            return Err(errno::EPERM);
        }
    };
    let mut request = Request {
        bytes: [0; REQUEST_SLOT_BYTES],
    };
    memory::read_bytes(mem, cmd_slot, &mut request.bytes).map_err(|_| errno::EFAULT)?;
    let header: RequestHeader = request.parse();
    let command = Command::from_u32(header.cmd).ok_or_else(|| {
        debug!("unknown command {:#x}", header.cmd);
        errno::EINVAL
    })?;
    // Commands that change or remove a QP, an SRQ or a GID may end a peer's wait for a
    // receive (its retry then fails instead of waiting for ever).
    if matches!(
        command,
        Command::ModifyQp
            | Command::DestroyQp
            | Command::ModifySrq
            | Command::DestroySrq
            | Command::DestroyBind
    ) {
        device.note_wake_event();
    }
    // The QP's number, read before DESTROY_QP takes it away.
    let qpn = matches!(command, Command::ModifyQp | Command::DestroyQp)
        .then(|| qpn_named(device, &request))
        .flatten();
    let result = dispatch(device, mem, net, command, &request, flush);
    if let Some(qpn) = qpn {
        forget_stopped_qp(device, net, &request, qpn);
    }
    debug!(
        "command {command:?}: {}",
        match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("errno {e}"),
        }
    );
    let mut bytes = result?;
    // The whole slot is rewritten: zeroes past the response, never anything past 176 bytes.
    bytes.resize(RESPONSE_SLOT_BYTES, 0);
    let hdr = ResponseHeader {
        response: header.response,
        ack: header.cmd | RESPONSE_ACK,
        err: 0,
        reserved: [0; 3],
    };
    bytes[..size_of::<ResponseHeader>()].copy_from_slice(hdr.as_bytes());
    memory::write_bytes(mem, resp_slot, &bytes).map_err(|_| errno::EFAULT)
}

/// After MODIFY_QP or DESTROY_QP: a QP now in the error state, in reset, or gone has its
/// transport state dropped, so no resend of its old work reaches a peer (see
/// `Network::forget_qp`).
fn forget_stopped_qp(device: &PvrdmaDevice, net: &dyn Network, request: &Request, qpn: u32) {
    // Both requests start with the header and the QP handle.
    let handle: crate::abi::HandleRequest = request.parse();
    let stopped = device.objects.qps.get(handle.handle).is_none_or(|qp| {
        matches!(
            qp.attr.qp_state,
            crate::abi::qp_state::ERR | crate::abi::qp_state::RESET
        )
    });
    if stopped {
        for gid in device.objects.gids.iter().flatten() {
            net.forget_qp(&gid.raw, qpn);
        }
    }
}

/// The number of the QP a MODIFY_QP or DESTROY_QP names, if it exists.
fn qpn_named(device: &PvrdmaDevice, request: &Request) -> Option<u32> {
    // Both requests start with the header and the QP handle.
    let handle: crate::abi::HandleRequest = request.parse();
    device.objects.qps.get(handle.handle).map(|qp| qp.qpn)
}

fn dispatch(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    net: &dyn Network,
    command: Command,
    request: &Request,
    flush: &mut Vec<u32>,
) -> Reply {
    match command {
        Command::QueryPort => port::query_port(device, request),
        Command::QueryPkey => port::query_pkey(request),
        Command::CreateBind => port::create_bind(device, net, request),
        Command::DestroyBind => port::destroy_bind(device, request),
        Command::CreateUc => context::create_uc(device, request),
        Command::DestroyUc => context::destroy_uc(device, request),
        Command::CreatePd => context::create_pd(device, request),
        Command::DestroyPd => context::destroy_pd(device, request),
        Command::CreateMr => mr::create(device, mem, net, request),
        Command::DestroyMr => mr::destroy(device, net, request),
        Command::CreateCq => cq::create(device, mem, request),
        Command::ResizeCq => Err(errno::EOPNOTSUPP),
        Command::DestroyCq => cq::destroy(device, request),
        Command::CreateQp => qp::create(device, mem, net, request),
        Command::ModifyQp => qp::modify(device, mem, net, request, flush),
        Command::QueryQp => qp::query(device, request),
        Command::DestroyQp => qp::destroy(device, net, request),
        Command::CreateSrq => srq::create(device, mem, request),
        Command::ModifySrq => srq::modify(device, request),
        Command::QuerySrq => srq::query(device, request),
        Command::DestroySrq => srq::destroy(device, request),
    }
}

/// Pages a ring of `entries` elements of `stride` bytes needs.
fn pages_for(entries: u32, stride: u64) -> u64 {
    (u64::from(entries) * stride).div_ceil(crate::abi::PAGE_SIZE)
}

/// A work-queue size the guest may ask for: a power of two from 1 to `max`.
fn valid_queue_size(entries: u32, max: u32) -> bool {
    entries.is_power_of_two() && entries <= max
}
