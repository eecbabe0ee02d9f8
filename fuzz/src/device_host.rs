//! The device model as `device_model` drives it, with a host RDMA device behind it (the
//! rdma path): a hostile guest's QPs and MRs take host numbers and keys, connect, post to
//! the host and receive from it, while the host's completions, datagrams and failures
//! arrive whenever the fuzzer says, naming any QP and ticket, and its calls fail when it
//! says. The host is the server's own kernel, not an adversary; but nothing it reports may
//! make the device panic, hang or write outside the guest's rings.
//!
//! Steps are `device_model`'s, except that a first byte of 0xf0 or more is a host step.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use pvrdma_backend::{
    Connect, Delivery, Gid, GuestMemory, HostDatagram, HostEvent, HostPathError, HostPort,
    HostQpCaps, HostQps, HostReceipt, HostRegion, HostSend, KeyedSge, Network, ReceiveError,
    RemoteError, Request, SendSide,
};

use crate::device_model::{self, Raised};
use crate::input::Input;
use vfio_user_pvrdma::pvrdma::{GuestRam, PvrdmaDevice};

/// Work the host took, for completions that name it (tickets are the device's to choose).
const REMEMBERED: usize = 64;

/// A host device that takes everything unless told to refuse.
#[derive(Default)]
struct FuzzHost {
    /// The host holds no GID: nothing is made on it.
    closed: AtomicBool,
    /// Its calls fail.
    refusing: AtomicBool,
    qpns: AtomicU32,
    keys: AtomicU32,
    /// `(qpn, ticket)` of recent sends and receives.
    taken: Mutex<Vec<(u32, u64)>>,
}

impl FuzzHost {
    fn answer(&self) -> Result<(), HostPathError> {
        if self.refusing.load(Ordering::Relaxed) {
            Err(HostPathError("refused".into()))
        } else {
            Ok(())
        }
    }

    fn remember(&self, qpn: u32, ticket: u64) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if taken.len() >= REMEMBERED {
            taken.remove(0);
        }
        taken.push((qpn, ticket));
    }
}

impl HostQps for FuzzHost {
    fn offers(&self, _gid: &Gid) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    fn create_qp(&self, _owner: usize, _pd: u32, _caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.answer()?;
        Ok(0x4000 + self.qpns.fetch_add(1, Ordering::Relaxed) % 0x1000)
    }

    fn create_ud_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.create_qp(owner, pd, caps)
    }

    fn ready_ud_qp(&self, _qpn: u32, _qkey: u32, _sq_psn: u32) -> Result<(), HostPathError> {
        self.answer()
    }

    fn carries_to(&self, _sgid: &Gid, dgid: &Gid) -> bool {
        !self.closed.load(Ordering::Relaxed) && dgid[15] & 1 == 1
    }

    fn destroy_qp(&self, _qpn: u32) {}

    fn init_qp(&self, _qpn: u32, _access: u32) -> Result<(), HostPathError> {
        self.answer()
    }

    fn connect_qp(&self, _qpn: u32, _connect: &Connect) -> Result<(), HostPathError> {
        self.answer()
    }

    fn ready_qp(&self, _qpn: u32, _send: &SendSide) -> Result<(), HostPathError> {
        self.answer()
    }

    fn stop_qp(&self, _qpn: u32, _error: bool) {}

    fn post_send(&self, qpn: u32, send: &HostSend<'_>) -> Result<(), HostPathError> {
        self.answer()?;
        self.remember(qpn, send.ticket);
        Ok(())
    }

    fn post_recv(&self, qpn: u32, ticket: u64, _sges: &[KeyedSge]) -> Result<(), HostPathError> {
        self.answer()?;
        self.remember(qpn, ticket);
        Ok(())
    }

    fn register(
        &self,
        _owner: usize,
        _pd: u32,
        _memory: &GuestMemory,
        _pages: &[u64],
        _page_size: usize,
        _offset: u64,
        _length: u64,
        _iova: u64,
        _access: u32,
    ) -> Result<HostRegion, HostPathError> {
        self.answer()?;
        // Few distinct keys, so collisions with the device's own happen too.
        let key = (self.keys.fetch_add(1, Ordering::Relaxed) % 64 + 1) << 8 | 0x42;
        Ok(HostRegion { key })
    }

    fn deregister(&self, _owner: usize, _key: u32) {}

    fn forget_owner(&self, _owner: usize) {
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// An isolated network with the host device behind it.
struct HostNet {
    host: Arc<FuzzHost>,
}

impl Network for HostNet {
    fn deliver(&mut self, _request: &Request<'_>) -> Delivery {
        Delivery::Done(Err(RemoteError::Unreachable))
    }

    fn gid_taken(&self, _gid: &Gid) -> bool {
        false
    }

    fn host(&self) -> Option<HostPort<'_>> {
        Some(HostPort {
            qps: self.host.as_ref(),
            owner: 0,
        })
    }
}

pub fn run(data: &[u8]) {
    let host = Arc::new(FuzzHost::default());
    let mut net = HostNet {
        host: Arc::clone(&host),
    };
    device_model::run_with(data, &mut net, &mut |op, device, mem, irq, net, input| {
        if op >= 0xf0 {
            host_step(op, &host, device, mem, irq, net, input);
        } else {
            device_model::step(op % 8, device, mem, irq, net, input);
        }
    });
}

/// A GID the fuzzer picks: IPv4-mapped, one byte chosen.
fn gid(input: &mut Input<'_>) -> Gid {
    let mut gid = [0u8; 16];
    gid[10] = 0xff;
    gid[11] = 0xff;
    gid[12] = 10;
    gid[15] = input.u8();
    gid
}

/// A host step: a completion, a receipt, a datagram or a failure for the QP and ticket of
/// work the host took, or for any at all; or the host's calls start or stop failing, or it
/// stops or starts holding GIDs.
fn host_step(
    op: u8,
    host: &FuzzHost,
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut Raised,
    net: &mut dyn Network,
    input: &mut Input<'_>,
) {
    let pick = input.u8();
    let recent = host
        .taken
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(usize::from(pick >> 1))
        .copied();
    let (qpn, ticket) = match recent {
        Some(taken) if pick & 1 == 0 => taken,
        _ => (0x4000 + u32::from(input.u16()) % 0x40, input.u64()),
    };
    let event = match op {
        0xf0 => HostEvent::Sent {
            ticket,
            result: match input.u8() % 7 {
                0 => Err(RemoteError::AccessError),
                1 => Err(RemoteError::InvalidRequest),
                2 => Err(RemoteError::OperationError),
                3 => Err(RemoteError::Dropped),
                4 => Err(RemoteError::ReceiverNotReady),
                _ => Ok(()),
            },
        },
        0xf1 => HostEvent::Received(HostReceipt {
            ticket,
            result: match input.u8() % 6 {
                0 => Err(ReceiveError::Length),
                1 => Err(ReceiveError::Protection),
                2 => Err(ReceiveError::Flushed),
                3 => Err(ReceiveError::Other),
                _ => Ok(()),
            },
            byte_len: input.u32(),
            imm: (input.u8() & 1 == 1).then(|| input.u32()),
            by_write: input.u8() & 1 == 1,
            src_qp: input.u32(),
        }),
        0xf2 => {
            let len = usize::from(input.u16()) % 4200;
            HostEvent::Datagram(HostDatagram {
                sgid: gid(input),
                dgid: gid(input),
                src_qp: input.u32(),
                imm: (input.u8() & 1 == 1).then(|| input.u32()),
                payload: input.bytes(len).into(),
            })
        }
        0xf3 => HostEvent::Failed,
        0xf4 => {
            host.refusing.fetch_xor(true, Ordering::Relaxed);
            return;
        }
        0xf5 => {
            host.closed.fetch_xor(true, Ordering::Relaxed);
            return;
        }
        _ => return,
    };
    device.complete_host(mem, irq, net, qpn, &event);
}
