//! The byte stream a TCP peer sends after the handshake, into the real decoder, the node's
//! reliable protocol (sequence numbers, answers, GID announcements, resends and timers) and
//! the staging of a peer's request for a local responder. The node has work of its own in
//! flight toward the peer (a SEND, a WRITE larger than its window, a READ, an atomic), so
//! the fuzzer's answers have requests to match.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pvrdma_backend::tcp::execute::Staging;
use pvrdma_backend::tcp::node::Event;
use pvrdma_backend::tcp::wire::{Decoder, Frame};
use pvrdma_backend::tcp::{Node, PeerId};
use pvrdma_backend::{
    AtomicKind, Destination, Gid, GuestMemory, Operation, Outcome, RemoteError, Request,
    RetryPolicy, Service, Sgl, Source, gather,
};
use vm_memory::GuestAddress;

const PEER: PeerId = 0x7e57;
const LOCAL: Gid = [0x10; 16];
const REMOTE: Gid = [0x20; 16];
/// Frames per input.
const MAX_FRAMES: usize = 256;

/// The staging buffer is 16 MiB: one for every input.
fn staging() -> &'static Staging {
    static STAGING: OnceLock<Staging> = OnceLock::new();
    STAGING.get_or_init(|| Staging::new().expect("the staging buffer"))
}

pub fn run(data: &[u8]) {
    let Ok(memory) = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let mut now = Instant::now();
    let mut node = Node::new(1);
    node.set_local_gids(vec![LOCAL], now);
    node.link_up(PEER, now);
    node.receive(PEER, Frame::Gids(vec![REMOTE]), now);
    issue_own_work(&mut node, &memory, now);

    let mut decoder = Decoder::new();
    // The stream arrives in pieces whose sizes the first bytes choose.
    let (sizes, stream) = data.split_at(data.len().min(4));
    let mut pieces = sizes.iter().cycle().map(|&s| usize::from(s) * 16 + 1);
    let mut rest = stream;
    let mut frames = 0;
    while !rest.is_empty() && frames < MAX_FRAMES {
        let (piece, after) = rest.split_at(rest.len().min(pieces.next().unwrap_or(1)));
        rest = after;
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    frames += 1;
                    node.receive(PEER, frame, now);
                    run_events(&mut node, now);
                }
                Ok(None) => break,
                // A malformed frame closes the link, as the runtime does.
                Err(_) => {
                    node.link_down(PEER, now);
                    return;
                }
            }
        }
        // Time passes between pieces: resends, RNR timers, retry budgets.
        now += Duration::from_millis(40);
        node.tick(now);
        run_events(&mut node, now);
        let queued = node.outgoing(PEER).len();
        node.sent(PEER, queued);
    }
}

/// Work of this node's QP 3 toward the peer's QP 4, so responses have requests to match.
fn issue_own_work(node: &mut Node, memory: &GuestMemory, now: Instant) {
    let list = |at: u64, len: u64| {
        let mut sgl = Sgl::new();
        let _ = sgl.push(at, len);
        sgl
    };
    let small = list(0, 64);
    let large = list(0, 1 << 20);
    let atomic = list(0x100, 8);
    let operations = [
        Operation::Send {
            payload: &small,
            imm: Some(1),
            invalidate: None,
            solicited: false,
        },
        Operation::Write {
            payload: &large,
            remote_addr: 0x1000,
            rkey: 7,
            imm: None,
            solicited: false,
        },
        Operation::Read {
            reply: &large,
            remote_addr: 0x1000,
            rkey: 7,
        },
        Operation::Atomic {
            kind: AtomicKind::FetchAdd { add: 1 },
            reply: &atomic,
            remote_addr: 0x2000,
            rkey: 7,
        },
    ];
    for (ticket, operation) in operations.into_iter().enumerate() {
        let request = Request {
            source: Source { gid: LOCAL, qpn: 3 },
            destination: Destination {
                gid: REMOTE,
                qpn: 4,
            },
            service: Service::Reliable,
            memory,
            operation,
            ticket: ticket as u64,
            epoch: 1,
            retry: RetryPolicy {
                timeout: 14,
                retry_cnt: 2,
                rnr_retry: 3,
                min_rnr_timer: 1,
            },
        };
        let _ = node.deliver(&request, now);
    }
}

fn run_events(node: &mut Node, now: Instant) {
    while let Some(event) = node.next_event() {
        match event {
            Event::Execute {
                peer,
                request,
                replay,
            } => {
                let (result, reply) = staging().execute(&request, respond);
                node.answer(peer, &request, replay, result, reply, now);
            }
            Event::Complete { .. } => {}
        }
    }
}

/// A responder that reads what it was sent, as a device's would.
fn respond(request: &Request<'_>) -> Result<Outcome, RemoteError> {
    let bytes = match &request.operation {
        Operation::Send { payload, .. } | Operation::Write { payload, .. } => {
            let mut data = Vec::new();
            gather(request.memory, payload, 0, payload.len(), &mut data)
                .map_err(|_| RemoteError::OperationError)?;
            data.len() as u64
        }
        Operation::Read { reply, .. } | Operation::Atomic { reply, .. } => reply.len(),
    };
    Ok(Outcome { bytes })
}
