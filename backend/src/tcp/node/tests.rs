//! Two nodes joined by an in-memory pipe that can fragment, hold back and cut the stream:
//! every completion comes exactly once, in order, and nothing is executed twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::directory::Holder;
use crate::tcp::execute::Staging;
use crate::tcp::wire::Decoder;
use crate::{Destination, GuestMemory, Sgl, Source};

const GID_A: Gid = [0xa; 16];
const GID_B: Gid = [0xb; 16];
const PEER_A: PeerId = 0xaaaa;
const PEER_B: PeerId = 0xbbbb;
const QP_A: u32 = 7;
const QP_B: u32 = 9;
const REGION: u64 = 0x10_0000;

/// The responder's device, reduced to what the protocol needs: receives to take, one
/// memory region, and a record of what it executed.
struct FakeDevice {
    /// Requests dropped before any is executed (a QP not ready yet).
    not_ready: u32,
    receives: u32,
    region: Vec<u8>,
    sends: Vec<Vec<u8>>,
    executed: u32,
}

impl FakeDevice {
    fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        if self.not_ready > 0 {
            self.not_ready -= 1;
            return Err(RemoteError::Dropped);
        }
        self.executed += 1;
        let offset = |addr: u64, len: u64| -> Result<usize, RemoteError> {
            let start = addr.checked_sub(REGION).ok_or(RemoteError::AccessError)?;
            (start + len <= self.region.len() as u64)
                .then_some(start as usize)
                .ok_or(RemoteError::AccessError)
        };
        match &request.operation {
            Operation::Send { payload, .. } => {
                if self.receives == 0 {
                    return Err(RemoteError::ReceiverNotReady);
                }
                self.receives -= 1;
                let mut data = Vec::new();
                gather(request.memory, payload, 0, payload.len(), &mut data).unwrap();
                self.sends.push(data);
                Ok(Outcome {
                    bytes: payload.len(),
                })
            }
            Operation::Write {
                payload,
                remote_addr,
                ..
            } => {
                let at = offset(*remote_addr, payload.len())?;
                let mut data = Vec::new();
                gather(request.memory, payload, 0, payload.len(), &mut data).unwrap();
                self.region[at..at + data.len()].copy_from_slice(&data);
                Ok(Outcome {
                    bytes: payload.len(),
                })
            }
            Operation::Read {
                reply, remote_addr, ..
            } => {
                let at = offset(*remote_addr, reply.len())?;
                let data = &self.region[at..at + reply.len() as usize];
                request
                    .memory
                    .write_slice(data, GuestAddress(reply.segments()[0].addr))
                    .unwrap();
                Ok(Outcome { bytes: reply.len() })
            }
            Operation::Atomic {
                kind,
                reply,
                remote_addr,
                ..
            } => {
                let at = offset(*remote_addr, 8)?;
                let old = u64::from_le_bytes(self.region[at..at + 8].try_into().unwrap());
                let new = match kind {
                    AtomicKind::FetchAdd { add } => old.wrapping_add(*add),
                    AtomicKind::CompareSwap { compare, swap } => {
                        if old == *compare {
                            *swap
                        } else {
                            old
                        }
                    }
                };
                self.region[at..at + 8].copy_from_slice(&new.to_le_bytes());
                request
                    .memory
                    .write_slice(&old.to_le_bytes(), GuestAddress(reply.segments()[0].addr))
                    .unwrap();
                Ok(Outcome { bytes: 8 })
            }
        }
    }
}

struct Completed {
    ticket: u64,
    result: Result<Outcome, RemoteError>,
    reply: Vec<u8>,
    reply_offset: u64,
    last: bool,
}

/// A (requester) and B (responder), the pipe between them, and a clock.
struct Pair {
    a: Node,
    b: Node,
    to_b: Decoder,
    to_a: Decoder,
    device: FakeDevice,
    staging: Staging,
    memory: GuestMemory,
    completed: Vec<Completed>,
    now: Instant,
    next_ticket: u64,
    policy: RetryPolicy,
}

impl Pair {
    fn new() -> Pair {
        let mut pair = Pair::unlinked();
        pair.connect();
        pair.pump(usize::MAX);
        pair
    }

    /// The two nodes, not linked yet.
    fn unlinked() -> Pair {
        let now = Instant::now();
        let mut a = Node::new(PEER_A);
        let mut b = Node::new(PEER_B);
        a.set_local_gids(vec![GID_A], now);
        b.set_local_gids(vec![GID_B], now);
        Pair {
            a,
            b,
            to_b: Decoder::new(),
            to_a: Decoder::new(),
            device: FakeDevice {
                not_ready: 0,
                receives: 1000,
                region: vec![0; 16 << 20],
                sends: Vec::new(),
                executed: 0,
            },
            staging: Staging::new().unwrap(),
            memory: GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap(),
            completed: Vec::new(),
            now,
            next_ticket: 0,
            policy: RetryPolicy {
                timeout: 14,
                retry_cnt: 3,
                rnr_retry: 7,
                min_rnr_timer: 12,
            },
        }
    }

    fn connect(&mut self) {
        self.to_a = Decoder::new();
        self.to_b = Decoder::new();
        self.a.link_up(PEER_B, self.now);
        self.b.link_up(PEER_A, self.now);
    }

    fn cut(&mut self) {
        self.a.link_down(PEER_B, self.now);
        self.b.link_down(PEER_A, self.now);
    }

    /// Moves bytes both ways in pieces of `piece` until nothing moves; runs B's executions
    /// and collects A's completions.
    fn pump(&mut self, piece: usize) {
        loop {
            let moved = self.move_bytes(true, piece) | self.move_bytes(false, piece);
            self.run_events();
            if !moved {
                break;
            }
        }
    }

    /// Moves at most `budget` bytes from A to B (nothing back), then stops.
    fn move_some_to_b(&mut self, budget: usize) {
        let out = self.a.outgoing(PEER_B);
        let n = out.len().min(budget);
        self.to_b.push(&out[..n]);
        self.a.sent(PEER_B, n);
        while let Some(frame) = self.to_b.next_frame().unwrap() {
            self.b.receive(PEER_A, frame, self.now);
        }
        self.run_events();
    }

    fn move_bytes(&mut self, a_to_b: bool, piece: usize) -> bool {
        let (from, to, decoder, peer_of_to, peer_of_from) = if a_to_b {
            (&mut self.a, &mut self.b, &mut self.to_b, PEER_B, PEER_A)
        } else {
            (&mut self.b, &mut self.a, &mut self.to_a, PEER_A, PEER_B)
        };
        let out = from.outgoing(peer_of_to).to_vec();
        if out.is_empty() {
            return false;
        }
        from.sent(peer_of_to, out.len());
        for chunk in out.chunks(piece.max(1)) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                to.receive(peer_of_from, frame, self.now);
            }
        }
        true
    }

    fn run_events(&mut self) {
        while let Some(event) = self.b.next_event() {
            if let Event::Execute {
                peer,
                request,
                replay,
            } = event
            {
                let device = &mut self.device;
                let (result, reply) = self.staging.execute(&request, |r| device.respond(r));
                self.b
                    .answer(peer, &request, replay, result, reply, self.now);
            }
        }
        while let Some(event) = self.a.next_event() {
            if let Event::Complete {
                ticket,
                result,
                reply,
                reply_offset,
                last,
                ..
            } = event
            {
                self.completed.push(Completed {
                    ticket,
                    result,
                    reply,
                    reply_offset,
                    last,
                });
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.a.tick(self.now);
        self.b.tick(self.now);
        self.run_events();
    }

    fn post(&mut self, operation: Operation<'_>) -> (u64, Delivery) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let request = Request {
            source: Source {
                gid: GID_A,
                qpn: QP_A,
            },
            destination: Destination {
                gid: GID_B,
                qpn: QP_B,
            },
            service: Service::Reliable,
            memory: &self.memory,
            operation,
            ticket,
            epoch: 1,
            retry: self.policy,
        };
        (ticket, self.a.deliver(&request, self.now))
    }

    fn send(&mut self, bytes: &[u8]) -> u64 {
        let at = 0x1000 * (self.next_ticket + 1);
        self.memory.write_slice(bytes, GuestAddress(at)).unwrap();
        let payload = sgl(at, bytes.len() as u64);
        let (ticket, delivery) = self.post(Operation::Send {
            payload: &payload,
            imm: None,
            invalidate: None,
            solicited: false,
        });
        assert_eq!(delivery, Delivery::Pending);
        ticket
    }

    fn completions(&self) -> Vec<(u64, Result<Outcome, RemoteError>)> {
        self.completed
            .iter()
            .filter(|c| c.last || c.result.is_err())
            .map(|c| (c.ticket, c.result))
            .collect()
    }
}

fn sgl(addr: u64, len: u64) -> Sgl {
    let mut sgl = Sgl::new();
    sgl.push(addr, len).unwrap();
    sgl
}

fn ok(bytes: u64) -> Result<Outcome, RemoteError> {
    Ok(Outcome { bytes })
}

/// `len` bytes of a pattern (`step` apart) written at 0x10_0000 of A's memory, and a list
/// naming them.
fn staged(p: &mut Pair, len: u64, step: u64) -> (Vec<u8>, Sgl) {
    let data: Vec<u8> = (0..len).map(|i| (i * step % 251) as u8).collect();
    p.memory
        .write_slice(&data, GuestAddress(0x10_0000))
        .unwrap();
    (data, sgl(0x10_0000, len))
}

/// The READ `ticket`'s answered pieces put together at their offsets.
fn read_back(p: &Pair, ticket: u64, len: u64) -> Vec<u8> {
    let mut assembled = vec![0u8; len as usize];
    for piece in p.completed.iter().filter(|c| c.ticket == ticket) {
        let at = piece.reply_offset as usize;
        assembled[at..at + piece.reply.len()].copy_from_slice(&piece.reply);
    }
    assembled
}

#[test]
fn every_operation_completes_once_in_order() {
    let mut p = Pair::new();
    let first = p.send(b"hello over tcp");
    let data: Vec<u8> = (0..=255).cycle().take(3000).collect();
    p.memory
        .write_slice(&data, GuestAddress(0x40_0000))
        .unwrap();
    let payload = sgl(0x40_0000, 3000);
    let (write, _) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: REGION + 100,
        rkey: 1,
        imm: Some(5),
        solicited: false,
    });
    let reply = sgl(0x50_0000, 3000);
    let (read, _) = p.post(Operation::Read {
        reply: &reply,
        remote_addr: REGION + 100,
        rkey: 1,
    });
    let atomic_reply = sgl(0x60_0000, 8);
    let (add, _) = p.post(Operation::Atomic {
        kind: AtomicKind::FetchAdd { add: 3 },
        reply: &atomic_reply,
        remote_addr: REGION,
        rkey: 1,
    });
    p.pump(usize::MAX);
    assert_eq!(
        p.completions(),
        [
            (first, ok(14)),
            (write, ok(3000)),
            (read, ok(3000)),
            (add, ok(8))
        ]
    );
    assert_eq!(p.device.sends, [b"hello over tcp".to_vec()]);
    assert_eq!(&p.device.region[100..3100], &data[..]);
    let read_reply = &p.completed[2];
    assert_eq!(
        (read_reply.reply.as_slice(), read_reply.reply_offset),
        (&data[..], 0)
    );
    assert_eq!(p.completed[3].reply, 0u64.to_le_bytes());
    assert_eq!(
        u64::from_le_bytes(p.device.region[..8].try_into().unwrap()),
        3
    );
}

#[test]
fn large_writes_and_reads_travel_in_chunks_and_complete_once() {
    let mut p = Pair::new();
    let len = 3 * wire::CHUNK + 5;
    let (data, payload) = staged(&mut p, len, 7);
    let (write, _) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: REGION,
        rkey: 1,
        imm: None,
        solicited: false,
    });
    let reply = sgl(0x40_0000, len);
    let (read, _) = p.post(Operation::Read {
        reply: &reply,
        remote_addr: REGION,
        rkey: 1,
    });
    // Fragmented delivery changes nothing.
    p.pump(1000);
    assert_eq!(p.device.executed, 8, "four pieces each way");
    assert_eq!(&p.device.region[..len as usize], &data[..]);
    assert_eq!(p.completions(), [(write, ok(5)), (read, ok(5))]);
    // The read's pieces carry their offsets; put together they are the data.
    assert_eq!(read_back(&p, read, len), data);
    let pieces = p.completed.iter().filter(|c| c.ticket == write).count();
    assert_eq!(pieces, 4, "one answer per piece, the last one marked");
}

#[test]
fn a_cut_link_loses_nothing_and_executes_nothing_twice() {
    let mut p = Pair::new();
    let tickets: Vec<u64> = (0..10u8).map(|i| p.send(&[i; 100])).collect();
    let atomic_reply = sgl(0x60_0000, 8);
    let (add, _) = p.post(Operation::Atomic {
        kind: AtomicKind::FetchAdd { add: 1 },
        reply: &atomic_reply,
        remote_addr: REGION,
        rkey: 1,
    });
    // B gets (and executes) part of the stream; its answers are lost with the link.
    let first_frames = 4 * (wire::HEADER + wire::REQUEST_FIXED + 100) + 17;
    p.move_some_to_b(first_frames);
    assert_eq!(p.device.sends.len(), 4);
    p.cut();
    p.advance(Duration::from_millis(10));
    p.connect();
    p.pump(usize::MAX);
    let mut expected: Vec<_> = tickets.iter().map(|&t| (t, ok(100))).collect();
    expected.push((add, ok(8)));
    assert_eq!(p.completions(), expected);
    assert_eq!(
        p.device.sends,
        (0..10u8).map(|i| vec![i; 100]).collect::<Vec<_>>()
    );
    assert_eq!(
        u64::from_le_bytes(p.device.region[..8].try_into().unwrap()),
        1
    );

    // Now the atomic's answer is lost after B executed it: the resend is answered from
    // B's cache, not executed again.
    let (add2, _) = p.post(Operation::Atomic {
        kind: AtomicKind::FetchAdd { add: 1 },
        reply: &atomic_reply,
        remote_addr: REGION,
        rkey: 1,
    });
    p.move_some_to_b(usize::MAX);
    let executed = p.device.executed;
    p.cut();
    p.connect();
    p.pump(usize::MAX);
    assert_eq!(
        p.device.executed, executed,
        "the resent atomic was not executed again"
    );
    assert_eq!(p.completions().last(), Some(&(add2, ok(8))));
    assert_eq!(p.completed.last().unwrap().reply, 1u64.to_le_bytes());
    assert_eq!(
        u64::from_le_bytes(p.device.region[..8].try_into().unwrap()),
        2
    );
}

#[test]
fn receiver_not_ready_waits_for_the_rnr_timer_then_resends_in_order() {
    let mut p = Pair::new();
    p.device.receives = 0;
    let first = p.send(b"one");
    let second = p.send(b"two");
    p.pump(usize::MAX);
    assert!(
        p.completions().is_empty(),
        "nothing completes while B has no receive"
    );
    p.device.receives = 2;
    // min_rnr_timer 12 is 0.64 ms: nothing is resent before it.
    p.advance(Duration::from_micros(300));
    p.pump(usize::MAX);
    assert!(p.completions().is_empty());
    p.advance(Duration::from_millis(1));
    p.pump(usize::MAX);
    assert_eq!(p.completions(), [(first, ok(3)), (second, ok(3))]);
    assert_eq!(p.device.sends, [b"one".to_vec(), b"two".to_vec()]);
}

#[test]
fn rnr_retry_budget_is_spent_then_the_head_fails() {
    let mut p = Pair::new();
    p.policy.rnr_retry = 2;
    p.device.receives = 0;
    let ticket = p.send(b"never received");
    p.pump(usize::MAX);
    for _ in 0..3 {
        p.advance(Duration::from_millis(1));
        p.pump(usize::MAX);
    }
    assert_eq!(
        p.completions(),
        [(ticket, Err(RemoteError::ReceiverNotReady))]
    );
    assert_eq!(p.device.executed, 3, "the first try and two retries");
}

#[test]
fn a_silent_peer_spends_the_retry_budget_and_the_head_completes_once() {
    let mut p = Pair::new();
    p.cut();
    let ticket = p.send(b"into the void");
    let _second = p.send(b"flushed by the device");
    // timeout 14 is 67 ms (at least 100 ms here); retry_cnt 3: the fourth expiry fails.
    for _ in 0..3 {
        p.advance(Duration::from_millis(101));
        assert!(p.completions().is_empty());
    }
    p.advance(Duration::from_millis(101));
    assert_eq!(p.completions(), [(ticket, Err(RemoteError::Unreachable))]);
    p.advance(Duration::from_secs(1));
    assert_eq!(p.completions().len(), 1, "nothing completes twice");
}

#[test]
fn responder_errors_complete_the_head_and_stop_the_qp() {
    let mut p = Pair::new();
    let payload = sgl(0x1000, 8);
    let (bad, _) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: 0x10,
        rkey: 1,
        imm: None,
        solicited: false,
    });
    let _after = p.send(b"after the error");
    p.pump(usize::MAX);
    assert_eq!(p.completions(), [(bad, Err(RemoteError::AccessError))]);
}

#[test]
fn a_full_window_is_busy_until_answers_come() {
    let mut p = Pair::new();
    let big = vec![1u8; wire::CHUNK as usize];
    p.memory.write_slice(&big, GuestAddress(0x10_0000)).unwrap();
    let payload = sgl(0x10_0000, big.len() as u64);
    let mut posted = 0;
    loop {
        let (_, delivery) = p.post(Operation::Write {
            payload: &payload,
            remote_addr: REGION,
            rkey: 1,
            imm: None,
            solicited: false,
        });
        if delivery == Delivery::Busy {
            break;
        }
        posted += 1;
        assert!(posted < 100, "the window never filled");
    }
    assert_eq!(posted, (QP_WINDOW / wire::CHUNK) as usize - 1);
    p.pump(usize::MAX);
    let (_, delivery) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: REGION,
        rkey: 1,
        imm: None,
        solicited: false,
    });
    assert_eq!(delivery, Delivery::Pending);
}

/// Moves everything both ways until nothing moves, like [`Pair::pump`], and returns the
/// most bytes A had queued for its link at any point.
fn pump_watching_a(p: &mut Pair) -> usize {
    let mut most = p.a.outgoing(PEER_B).len();
    loop {
        let moved = p.move_bytes(true, usize::MAX) | p.move_bytes(false, usize::MAX);
        p.run_events();
        most = most.max(p.a.outgoing(PEER_B).len());
        if !moved {
            return most;
        }
    }
}

#[test]
fn transfers_larger_than_the_window_are_gathered_as_it_opens() {
    let mut p = Pair::new();
    // Bound: the window and one piece with its frame.
    let bound = (QP_WINDOW + wire::CHUNK) as usize + 2 * wire::HEADER + wire::REQUEST_FIXED;
    let len = 3 * QP_WINDOW + 5;
    let (data, payload) = staged(&mut p, len, 13);
    let (write, delivery) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: REGION,
        rkey: 1,
        imm: Some(3),
        solicited: false,
    });
    assert_eq!(delivery, Delivery::Pending);
    // Only what fits the window was gathered; the QP's next request waits behind the rest.
    assert!(p.a.outgoing(PEER_B).len() <= bound);
    let small = sgl(0x1000, 4);
    let (_, behind) = p.post(Operation::Send {
        payload: &small,
        imm: None,
        invalidate: None,
        solicited: false,
    });
    assert_eq!(behind, Delivery::Busy);
    let most = pump_watching_a(&mut p);
    assert!(most <= bound, "{most} bytes queued at once");
    assert_eq!(p.completions(), [(write, ok(5))]);
    assert_eq!(&p.device.region[..len as usize], &data[..]);
    let pieces = len.div_ceil(wire::CHUNK);
    assert_eq!(p.device.executed as u64, pieces);

    // A READ's replies count against the window too: the peer never has more than the
    // window of answers to queue.
    let reply = sgl(0x100_0000, len);
    let (read, delivery) = p.post(Operation::Read {
        reply: &reply,
        remote_addr: REGION,
        rkey: 1,
    });
    assert_eq!(delivery, Delivery::Pending);
    let mut most_answers = 0;
    loop {
        let moved = p.move_bytes(true, usize::MAX);
        p.run_events();
        most_answers = most_answers.max(p.b.outgoing(PEER_A).len());
        let back = p.move_bytes(false, usize::MAX);
        p.run_events();
        if !moved && !back {
            break;
        }
    }
    assert!(
        most_answers <= bound,
        "{most_answers} reply bytes queued at once"
    );
    assert_eq!(p.completions(), [(write, ok(5)), (read, ok(5))]);
    assert_eq!(read_back(&p, read, len), data);
}

#[test]
fn a_piece_that_cannot_be_gathered_fails_its_request_once() {
    let mut p = Pair::new();
    // The list runs past the end of the requester's memory: the first pieces go, the
    // one that cannot be read fails the request, and nothing more of the QP is sent.
    let len = 2 * QP_WINDOW;
    let payload = sgl((32 << 20) - QP_WINDOW - 10, len);
    let (write, delivery) = p.post(Operation::Write {
        payload: &payload,
        remote_addr: REGION,
        rkey: 1,
        imm: None,
        solicited: false,
    });
    assert_eq!(delivery, Delivery::Pending);
    p.pump(usize::MAX);
    assert_eq!(p.completions(), [(write, Err(RemoteError::OperationError))]);
    // Nothing is left to resend.
    p.advance(Duration::from_secs(10));
    assert_eq!(p.completions().len(), 1);
    // (Ten silent seconds closed the link; it comes back.)
    p.connect();
    p.pump(usize::MAX);
    // A request of a list that cannot be read at all fails when its frame is made.
    let unreadable = sgl(64 << 20, 8);
    let (unread, delivery) = p.post(Operation::Write {
        payload: &unreadable,
        remote_addr: REGION,
        rkey: 1,
        imm: None,
        solicited: false,
    });
    assert_eq!(delivery, Delivery::Pending);
    p.pump(usize::MAX);
    assert_eq!(
        p.completions(),
        [
            (write, Err(RemoteError::OperationError)),
            (unread, Err(RemoteError::OperationError))
        ]
    );
}

#[test]
fn a_link_holds_no_more_than_it_can_write_whatever_its_qps_have_in_flight() {
    let mut p = Pair::new();
    let len = QP_WINDOW;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
    p.memory
        .write_slice(&data, GuestAddress(0x10_0000))
        .unwrap();
    let payload = sgl(0x10_0000, len);
    // 16 QPs, each with a whole window of WRITE in flight: 64 MiB.
    const QPS: u32 = 16;
    for qpn in 0..QPS {
        let request = Request {
            source: Source { gid: GID_A, qpn },
            destination: Destination {
                gid: GID_B,
                qpn: QP_B,
            },
            service: Service::Reliable,
            memory: &p.memory,
            operation: Operation::Write {
                payload: &payload,
                remote_addr: REGION,
                rkey: 1,
                imm: None,
                solicited: false,
            },
            ticket: u64::from(qpn),
            epoch: 1,
            retry: p.policy,
        };
        assert_eq!(p.a.deliver(&request, p.now), Delivery::Pending);
    }
    // Frames are made as the link drains: never more than PRODUCE_AHEAD and one frame.
    let bound = PRODUCE_AHEAD + wire::CHUNK as usize + wire::HEADER + wire::REQUEST_FIXED;
    let most = pump_watching_a(&mut p);
    assert!(most <= bound, "{most} bytes queued at once");
    let done = p.completions();
    assert_eq!(done.len(), QPS as usize, "every WRITE completes once");
    // A WRITE's last piece answers for it.
    assert!(done.iter().all(|(_, result)| *result == ok(wire::CHUNK)));
    assert_eq!(&p.device.region[..len as usize], &data[..]);
    // After a cut, what was unanswered is gathered again: still within the bound.
    let _ = p.send(b"after");
    p.cut();
    p.connect();
    assert!(pump_watching_a(&mut p) <= bound);
}

#[test]
fn gids_route_requests_and_conflicts_and_spoofs_are_refused() {
    let mut p = Pair::new();
    assert!(p.a.gid_taken(&GID_B));
    assert!(!p.a.gid_taken(&GID_A), "a node's own GIDs are not a peer's");
    // Unknown destination: unreachable at once.
    let request = Request {
        source: Source {
            gid: GID_A,
            qpn: QP_A,
        },
        destination: Destination {
            gid: [0xee; 16],
            qpn: 1,
        },
        service: Service::Reliable,
        memory: &p.memory,
        operation: Operation::Send {
            payload: &Sgl::new(),
            imm: None,
            invalidate: None,
            solicited: false,
        },
        ticket: 0,
        epoch: 0,
        retry: p.policy,
    };
    assert_eq!(
        p.a.deliver(&request, p.now),
        Delivery::Done(Err(RemoteError::Unreachable))
    );
    // B announces A's GID as well: refused, A's own GID stays A's.
    p.b.set_local_gids(vec![GID_B, GID_A], p.now);
    p.pump(usize::MAX);
    assert_eq!(p.a.peer_of(&GID_A), None);
    assert_eq!(p.a.peer_of(&GID_B), Some(PEER_B));
    // A request claiming a source GID its peer does not hold is dropped.
    let spoofed = RequestFrame {
        src_gid: [0x77; 16],
        src_qpn: 1,
        epoch: 0,
        dst_gid: GID_B,
        dst_qpn: QP_B,
        seq: 0,
        ticket: 0,
        op: Op::Send,
        flags: flags::LAST,
        qkey: 0,
        imm: 0,
        invalidate: 0,
        rkey: 0,
        remote_addr: 0,
        read_len: 0,
        compare_add: 0,
        swap: 0,
        reply_offset: 0,
        payload: b"spoof".to_vec(),
    };
    p.b.receive(PEER_A, Frame::Request(spoofed), p.now);
    assert_eq!(p.b.next_event(), None);
}

#[test]
fn datagrams_complete_at_once_and_are_executed_once() {
    let mut p = Pair::new();
    p.memory
        .write_slice(b"datagram", GuestAddress(0x1000))
        .unwrap();
    let payload = sgl(0x1000, 8);
    let request = Request {
        source: Source {
            gid: GID_A,
            qpn: QP_A,
        },
        destination: Destination {
            gid: GID_B,
            qpn: QP_B,
        },
        service: Service::Datagram { qkey: 0x1111 },
        memory: &p.memory,
        operation: Operation::Send {
            payload: &payload,
            imm: None,
            invalidate: None,
            solicited: false,
        },
        ticket: 0,
        epoch: 0,
        retry: RetryPolicy::default(),
    };
    assert_eq!(p.a.deliver(&request, p.now), Delivery::Done(ok(8)));
    p.pump(usize::MAX);
    assert_eq!(p.device.sends, [b"datagram".to_vec()]);
    assert!(p.completions().is_empty(), "no answer travels back");
}

#[test]
fn a_silent_peer_is_closed_and_later_forgotten() {
    let mut p = Pair::new();
    p.advance(PING_EVERY);
    assert!(!p.a.outgoing(PEER_B).is_empty(), "an idle link pings");
    p.pump(usize::MAX);
    // B stops talking: A closes the link after PEER_TIMEOUT and forgets B's GIDs later.
    p.now += PEER_TIMEOUT + Duration::from_millis(1);
    assert_eq!(p.a.tick(p.now), vec![PEER_B]);
    assert!(!p.a.is_up(PEER_B));
    assert!(p.a.gid_taken(&GID_B), "kept while it may come back");
    p.now += PEER_TIMEOUT + Duration::from_millis(1);
    p.a.tick(p.now);
    assert!(!p.a.gid_taken(&GID_B));
}

#[test]
fn a_request_for_a_qp_not_ready_is_dropped_and_resent_after_the_timeout() {
    let mut p = Pair::new();
    p.device.not_ready = 1;
    let first = p.send(b"early");
    let second = p.send(b"behind it");
    p.pump(usize::MAX);
    // The second is not executed either: it came behind the dropped one.
    assert!(
        p.completions().is_empty(),
        "no answer for a dropped request"
    );
    assert_eq!(p.device.executed, 0);
    // timeout 14: at least 100 ms; then both are resent, in order, and now executed.
    p.advance(Duration::from_millis(101));
    p.pump(usize::MAX);
    assert_eq!(p.completions(), [(first, ok(5)), (second, ok(9))]);
    assert_eq!(p.device.sends, [b"early".to_vec(), b"behind it".to_vec()]);
}

/// The frames B has queued for A, decoded (nothing is taken off B's queue).
fn queued_by_b(p: &mut Pair) -> Vec<Frame> {
    let mut decoder = Decoder::new();
    decoder.push(p.b.outgoing(PEER_A));
    std::iter::from_fn(|| decoder.next_frame().unwrap()).collect()
}

#[test]
fn answers_without_data_wait_briefly_for_a_request_to_share_their_write() {
    let mut p = Pair::new();
    p.send(b"ping");
    p.move_bytes(true, usize::MAX);
    p.run_events();
    assert_eq!(p.device.sends, [b"ping".to_vec()]);
    // B's acknowledgement is queued and held, with a deadline for the runtime's wait.
    assert!(matches!(queued_by_b(&mut p)[..], [Frame::Response(_)]));
    assert!(p.b.holds(PEER_A, p.now));
    assert_eq!(p.b.hold_deadline(), Some(p.now + ANSWER_HOLD));
    // A second acknowledgement joins the hold without extending it.
    p.now += ANSWER_HOLD / 2;
    p.send(b"ping 2");
    p.move_bytes(true, usize::MAX);
    p.run_events();
    assert!(p.b.holds(PEER_A, p.now));
    assert_eq!(p.b.hold_deadline(), Some(p.now + ANSWER_HOLD / 2));
    assert!(!p.b.holds(PEER_A, p.now + ANSWER_HOLD / 2), "the hold ends");

    // A request from B to A takes the answers with it in the same write.
    let payload = sgl(0x8000, 16);
    let back = Request {
        source: Source {
            gid: GID_B,
            qpn: QP_B,
        },
        destination: Destination {
            gid: GID_A,
            qpn: QP_A,
        },
        service: Service::Reliable,
        memory: &p.memory,
        operation: Operation::Send {
            payload: &payload,
            imm: None,
            invalidate: None,
            solicited: false,
        },
        ticket: 1,
        epoch: 1,
        retry: p.policy,
    };
    assert_eq!(p.b.deliver(&back, p.now), Delivery::Pending);
    assert!(!p.b.holds(PEER_A, p.now));
    assert!(matches!(
        queued_by_b(&mut p)[..],
        [Frame::Response(_), Frame::Response(_), Frame::Request(_)]
    ));
    let all = p.b.outgoing(PEER_A).len();
    p.b.sent(PEER_A, all);
    assert_eq!(p.b.hold_deadline(), None);
}

#[test]
fn read_replies_and_answers_behind_other_frames_are_never_held() {
    let mut p = Pair::new();
    let reply = sgl(0x50_0000, 64);
    p.post(Operation::Read {
        reply: &reply,
        remote_addr: REGION,
        rkey: 1,
    });
    p.move_bytes(true, usize::MAX);
    p.run_events();
    assert!(matches!(queued_by_b(&mut p)[..], [Frame::Response(_)]));
    assert!(!p.b.holds(PEER_A, p.now), "a READ's data goes at once");
    assert_eq!(p.b.hold_deadline(), None);

    // An acknowledgement queued behind the READ reply goes with it.
    p.send(b"after the read");
    p.move_bytes(true, usize::MAX);
    p.run_events();
    assert_eq!(queued_by_b(&mut p).len(), 2);
    assert!(!p.b.holds(PEER_A, p.now));

    // A held acknowledgement is released by anything queued after it (here a GID change).
    let all = p.b.outgoing(PEER_A).len();
    p.b.sent(PEER_A, all);
    p.send(b"held");
    p.move_bytes(true, usize::MAX);
    p.run_events();
    assert!(p.b.holds(PEER_A, p.now));
    p.b.set_local_gids(vec![GID_B, [0xc; 16]], p.now);
    assert!(!p.b.holds(PEER_A, p.now));
    assert_eq!(p.b.hold_deadline(), None);
}

#[test]
fn a_peers_rdma_gids_are_a_subset_of_its_gids_and_follow_them_across_links() {
    let mut p = Pair::new();
    assert!(!p.a.rdma_reachable(&GID_B));
    // B's device holds GID_B; a GID B does not hold is dropped before it is said.
    p.b.set_local_rdma_gids(vec![GID_B, [0xd; 16]], p.now);
    p.pump(usize::MAX);
    assert!(p.a.rdma_reachable(&GID_B));
    assert!(!p.a.rdma_reachable(&[0xd; 16]));
    // A new link hears it again with the GIDs.
    p.cut();
    p.connect();
    p.pump(usize::MAX);
    assert!(
        p.a.rdma_reachable(&GID_B),
        "re-announced when the link came back"
    );
    // B's GIDs change: its rdma subset follows, and a GID gone is no longer reachable.
    p.b.set_local_gids(vec![[0xe; 16]], p.now);
    p.pump(usize::MAX);
    assert!(!p.a.rdma_reachable(&GID_B));
    p.b.set_local_rdma_gids(vec![[0xe; 16]], p.now);
    p.pump(usize::MAX);
    assert!(p.a.rdma_reachable(&[0xe; 16]));
}

/// What an etcd directory says: A holds GID_A, B holds GID_B, and B's RDMA device holds it.
fn directory_holders() -> GidHolders {
    let at = |server, port| Holder {
        server,
        addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
    };
    GidHolders {
        version: 1,
        holders: Arc::new(HashMap::from([
            (GID_A, at(PEER_A, 1)),
            (GID_B, at(PEER_B, 2)),
        ])),
        rdma: Arc::new(std::collections::HashSet::from([GID_B])),
    }
}

#[test]
fn a_server_the_directory_names_is_wanted_until_linked_and_its_work_waits_for_the_link() {
    let mut p = Pair::unlinked();
    p.a.set_gid_holders(Some(directory_holders()));
    p.b.set_gid_holders(Some(directory_holders()));
    assert!(
        p.a.gid_taken(&GID_B),
        "the directory names B's GID: not A's to bind"
    );
    assert!(!p.a.gid_taken(&GID_A), "A's own GID");
    assert!(
        p.a.rdma_reachable(&GID_B),
        "the directory says so, before any link"
    );
    assert!(!p.b.rdma_reachable(&GID_B), "B's own GID is not a peer's");
    assert!(p.a.wanted(p.now).is_empty());
    // No link yet: a datagram is kept and an RC send waits; B is wanted, once.
    p.memory.write_slice(b"mad", GuestAddress(0x100)).unwrap();
    let payload = sgl(0x100, 3);
    let datagram = Request {
        source: Source { gid: GID_A, qpn: 1 },
        destination: Destination { gid: GID_B, qpn: 1 },
        service: Service::Datagram { qkey: 0x8001_0000 },
        memory: &p.memory,
        operation: Operation::Send {
            payload: &payload,
            imm: None,
            invalidate: None,
            solicited: false,
        },
        ticket: 0,
        epoch: 0,
        retry: RetryPolicy::default(),
    };
    assert_eq!(p.a.deliver(&datagram, p.now), Delivery::Done(ok(3)));
    let ticket = p.send(b"after the dial");
    assert_eq!(p.a.wanted(p.now), [PEER_B]);
    assert!(p.a.take_fresh_wants());
    assert!(!p.a.take_fresh_wants(), "told once");
    assert!(
        p.a.outgoing(PEER_B).is_empty(),
        "nothing is written without a link"
    );
    // The link comes up: the datagram, then the send, arrive; B is no longer wanted.
    p.connect();
    p.pump(usize::MAX);
    assert_eq!(
        p.device.sends,
        [b"mad".to_vec(), b"after the dial".to_vec()]
    );
    assert_eq!(p.completions(), [(ticket, ok(14))]);
    assert!(p.a.wanted(p.now).is_empty());
}

#[test]
fn a_directory_overrides_announcements_for_the_gids_it_names() {
    let mut p = Pair::new();
    p.a.set_gid_holders(Some(directory_holders()));
    // C links to A and announces B's GID (and one the directory does not name).
    const PEER_C: PeerId = 0xcccc;
    const GID_C: Gid = [0xc; 16];
    p.a.link_up(PEER_C, p.now);
    p.a.receive(PEER_C, Frame::Gids(vec![GID_B, GID_C]), p.now);
    assert_eq!(p.a.peer_of(&GID_B), Some(PEER_B), "etcd says B");
    assert_eq!(p.a.peer_of(&GID_C), Some(PEER_C), "announced, not in etcd");
    // A request from C claiming B's GID is dropped; one from its own GID is executed.
    let from = |src_gid| RequestFrame {
        src_gid,
        src_qpn: 1,
        epoch: 0,
        dst_gid: GID_A,
        dst_qpn: QP_A,
        seq: 0,
        ticket: 0,
        op: Op::Send,
        flags: flags::LAST | flags::DATAGRAM,
        qkey: 0,
        imm: 0,
        invalidate: 0,
        rkey: 0,
        remote_addr: 0,
        read_len: 0,
        compare_add: 0,
        swap: 0,
        reply_offset: 0,
        payload: b"hello".to_vec(),
    };
    p.a.receive(PEER_C, Frame::Request(from(GID_B)), p.now);
    assert_eq!(p.a.next_event(), None, "C does not hold B's GID");
    p.a.receive(PEER_C, Frame::Request(from(GID_C)), p.now);
    assert!(matches!(
        p.a.next_event(),
        Some(Event::Execute { peer: PEER_C, .. })
    ));
    // A GID the directory gives this server is its own, whoever announces it.
    p.b.set_local_gids(vec![GID_B, GID_A], p.now);
    p.pump(usize::MAX);
    assert_eq!(p.a.peer_of(&GID_A), None);
    assert!(!p.a.gid_taken(&GID_A));
}
