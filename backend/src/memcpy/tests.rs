use std::time::{Duration, Instant};

use super::*;
use crate::{Destination, GuestMemory, Operation, RetryPolicy, Service, Sgl, Source};

/// A port that records what reaches it and can refuse for receiver-not-ready.
#[derive(Default)]
struct Port {
    gid: Option<[u8; 16]>,
    /// Requests executed (ticket, operation bytes), in order.
    executed: Vec<(u64, u64)>,
    /// Answers to its own requests (ticket, result), in order.
    answers: Vec<(u64, Result<Outcome, RemoteError>)>,
    /// Receives it can take; `None`: any number.
    receives: Option<u32>,
    wake: u64,
}

impl Port {
    fn with_gid(gid: u8) -> Port {
        Port {
            gid: Some([gid; 16]),
            ..Port::default()
        }
    }
}

impl Responder for Port {
    fn has_gid(&self, gid: &[u8; 16]) -> bool {
        self.gid.as_ref() == Some(gid)
    }

    fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        let bytes = match request.operation {
            Operation::Send { payload, .. } => {
                match self.receives.as_mut() {
                    Some(0) => return Err(RemoteError::ReceiverNotReady),
                    Some(left) => *left -= 1,
                    None => {}
                }
                payload.len()
            }
            Operation::Write { payload, .. } => payload.len(),
            Operation::Read { reply, .. } | Operation::Atomic { reply, .. } => reply.len(),
        };
        self.executed.push((request.ticket, bytes));
        Ok(Outcome { bytes })
    }
}

impl Endpoint for Port {
    fn complete(&mut self, completion: &Completion<'_>, _net: &mut dyn Network) {
        self.answers.push((completion.ticket, completion.result));
    }

    fn wake_events(&self) -> u64 {
        self.wake
    }

    fn resume_stalled(&mut self, _net: &mut dyn Network) {}

    fn gids(&self) -> Vec<Gid> {
        self.gid.into_iter().collect()
    }

    fn same_gids(&self, gids: &[Gid]) -> bool {
        self.gid.as_slice() == gids
    }
}

fn request<'a>(
    to: u8,
    ticket: u64,
    service: Service,
    retry: RetryPolicy,
    mem: &'a GuestMemory,
    operation: Operation<'a>,
) -> Request<'a> {
    Request {
        source: Source {
            gid: [1; 16],
            qpn: 2,
        },
        destination: Destination {
            gid: [to; 16],
            qpn: 7,
        },
        service,
        memory: mem,
        operation,
        ticket,
        epoch: 0,
        retry,
    }
}

fn send(payload: &Sgl) -> Operation<'_> {
    Operation::Send {
        payload,
        imm: None,
        invalidate: None,
        solicited: false,
    }
}

fn sgl(len: u64) -> Sgl {
    let mut sgl = Sgl::new();
    sgl.push(0x10_0000, len).unwrap();
    sgl
}

fn rnr(retries: u8) -> RetryPolicy {
    RetryPolicy {
        rnr_retry: retries,
        // 0.01 ms.
        min_rnr_timer: 1,
        ..RetryPolicy::default()
    }
}

/// Posts `tickets` reliable SENDs from port `from` to GID `to` in one turn.
fn post_sends(
    fabric: &MemcpyFabric<Port>,
    from: usize,
    to: u8,
    tickets: std::ops::Range<u64>,
    retry: RetryPolicy,
) -> Vec<Delivery> {
    let mem = GuestMemory::default();
    let payload = sgl(16);
    fabric
        .with_endpoint(from, |_, net| {
            tickets
                .map(|ticket| {
                    net.deliver(&request(
                        to,
                        ticket,
                        Service::Reliable,
                        retry,
                        &mem,
                        send(&payload),
                    ))
                })
                .collect()
        })
        .unwrap()
}

fn answers(fabric: &MemcpyFabric<Port>, index: usize) -> Vec<(u64, Result<Outcome, RemoteError>)> {
    fabric
        .with_endpoint(index, |port, _| port.answers.clone())
        .unwrap()
}

#[test]
fn a_free_responder_answers_at_once_and_unknown_gids_are_unreachable() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port::with_gid(2));
    let sent = post_sends(&fabric, a, 2, 0..3, RetryPolicy::default());
    assert_eq!(sent, vec![Delivery::Done(Ok(Outcome { bytes: 16 })); 3]);
    let executed = fabric.with_endpoint(b, |port, _| port.executed.clone());
    assert_eq!(executed, Some(vec![(0, 16), (1, 16), (2, 16)]));
    assert!(
        answers(&fabric, a).is_empty(),
        "answered at once, not later"
    );
    // Unknown GIDs are unreachable.
    assert_eq!(
        post_sends(&fabric, a, 9, 5..6, RetryPolicy::default()),
        vec![Delivery::Done(Err(RemoteError::Unreachable))]
    );
    assert!(fabric.with_endpoint(9, |_, _| ()).is_none());
}

#[test]
fn requests_for_a_busy_responder_wait_in_its_inbox_and_are_answered_in_order() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port::with_gid(2));
    let port_b = fabric.port(b).unwrap();
    let held = std::sync::Barrier::new(2);
    let sent = std::thread::scope(|scope| {
        // Another thread is at work on B: its lock is taken.
        scope.spawn(|| {
            let _busy = port_b.endpoint.lock().unwrap();
            held.wait();
            std::thread::sleep(Duration::from_millis(50));
        });
        held.wait();
        post_sends(&fabric, a, 2, 0..3, RetryPolicy::default())
    });
    // Taken without waiting for B; carried once B was free.
    assert_eq!(sent, vec![Delivery::Pending; 3]);
    let executed = fabric.with_endpoint(b, |port, _| port.executed.clone());
    assert_eq!(executed, Some(vec![(0, 16), (1, 16), (2, 16)]));
    let ok = Ok(Outcome { bytes: 16 });
    assert_eq!(answers(&fabric, a), vec![(0, ok), (1, ok), (2, ok)]);
}

#[test]
fn a_datagram_is_sent_at_once_and_gets_no_answer() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(2)
    });
    let mem = GuestMemory::default();
    let payload = sgl(100);
    let sent = fabric.with_endpoint(a, |_, net| {
        net.deliver(&request(
            2,
            0,
            Service::Datagram { qkey: 1 },
            RetryPolicy::default(),
            &mem,
            send(&payload),
        ))
    });
    // Dropped for want of a receive: the sender learns it at once (a datagram completes
    // whatever happened to it), and it is neither parked nor answered later.
    assert_eq!(
        sent,
        Some(Delivery::Done(Err(RemoteError::ReceiverNotReady)))
    );
    assert_eq!(fabric.parked(), 0);
    assert!(answers(&fabric, a).is_empty());
    assert_eq!(fabric.with_endpoint(b, |p, _| p.executed.len()), Some(0));
}

#[test]
fn a_gid_held_twice_reaches_neither_holder_and_a_claimed_gid_is_taken() {
    let fabric = MemcpyFabric::new();
    let sender = fabric.add(Port::with_gid(1));
    let holders = [2, 2].map(|gid| fabric.add(Port::with_gid(gid)));
    let sent = post_sends(&fabric, sender, 2, 0..1, RetryPolicy::default());
    assert_eq!(sent, vec![Delivery::Done(Err(RemoteError::Unreachable))]);
    for holder in holders {
        assert_eq!(
            fabric.with_endpoint(holder, |p, _| p.executed.len()),
            Some(0)
        );
    }
    // The sender's own GID is not "taken" from its point of view: it holds it itself.
    let taken = fabric.with_endpoint(sender, |_, net| {
        (net.gid_taken(&[2; 16]), net.gid_taken(&[1; 16]))
    });
    assert_eq!(taken, Some((true, false)));
    // A GID one port claims (it is binding it) is taken for the others until that turn
    // ends; then the directory shows what the port really holds.
    let free = fabric.add(Port::default());
    let claim = fabric.with_endpoint(free, |_, net| {
        let first = net.gid_taken(&[5; 16]);
        (first, net.gid_taken(&[5; 16]))
    });
    assert_eq!(claim, Some((false, false)));
    assert_eq!(
        fabric.find(&[5; 16]),
        None,
        "the claim was not bound, so it lapsed"
    );
}

#[test]
fn a_send_refused_for_receiver_not_ready_waits_with_its_followers_and_goes_when_a_receive_is_posted()
 {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(2)
    });
    post_sends(&fabric, a, 2, 0..3, rnr(RetryPolicy::RNR_FOR_EVER));
    assert_eq!(
        fabric.parked(),
        3,
        "the refused SEND and the two behind it wait"
    );
    assert!(answers(&fabric, a).is_empty());
    // Timers end: still no receive, still waiting (7 retries for ever).
    fabric.tick(Instant::now() + Duration::from_secs(1));
    assert_eq!(fabric.parked(), 3);
    // B posts two receives: two SENDs land, in order; the third waits again.
    fabric.with_endpoint(b, |port, _| {
        port.receives = Some(2);
        port.wake += 1;
    });
    assert_eq!(
        fabric.with_endpoint(b, |p, _| p.executed.clone()),
        Some(vec![(0, 16), (1, 16)])
    );
    let ok = Ok(Outcome { bytes: 16 });
    assert_eq!(answers(&fabric, a), vec![(0, ok), (1, ok)]);
    assert_eq!(fabric.parked(), 1);
}

#[test]
fn rnr_retry_is_spent_by_timer_retries_and_then_the_request_fails() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(2)
    });
    post_sends(&fabric, a, 2, 0..2, rnr(2));
    let later = Instant::now() + Duration::from_secs(1);
    assert!(fabric.tick(later).is_some(), "one retry spent, one left");
    assert!(answers(&fabric, a).is_empty());
    // Early retries (a receive posted elsewhere on B) spend nothing.
    for _ in 0..5 {
        fabric.with_endpoint(b, |port, _| port.wake += 1);
    }
    assert!(answers(&fabric, a).is_empty());
    assert_eq!(fabric.parked(), 2);
    // The second timer retry is refused too, with none left: the head fails, and the one
    // behind it never executes.
    assert_eq!(fabric.tick(later + Duration::from_secs(1)), None);
    assert_eq!(
        answers(&fabric, a),
        vec![(0, Err(RemoteError::ReceiverNotReady))]
    );
    assert_eq!(fabric.parked(), 0);
    assert_eq!(fabric.with_endpoint(b, |p, _| p.executed.len()), Some(0));
}

#[test]
fn rnr_retry_zero_fails_the_first_refusal() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(2)
    });
    assert_eq!(
        post_sends(&fabric, a, 2, 0..1, rnr(0)),
        vec![Delivery::Done(Err(RemoteError::ReceiverNotReady))]
    );
    assert!(answers(&fabric, a).is_empty());
    assert_eq!(fabric.parked(), 0);
}

#[test]
fn a_forgotten_qp_leaves_nothing_parked() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(2)
    });
    post_sends(&fabric, a, 2, 0..4, rnr(RetryPolicy::RNR_FOR_EVER));
    assert_eq!(fabric.parked(), 4);
    fabric.with_endpoint(a, |_, net| net.forget_qp(&[1; 16], 2));
    assert_eq!(fabric.parked(), 0);
}

#[test]
fn a_large_write_goes_in_pieces_that_add_up_to_it() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port::with_gid(1));
    let b = fabric.add(Port::with_gid(2));
    let mem = GuestMemory::default();
    let total = 3 * BYTES_PER_VISIT + 12345;
    let payload = sgl(total);
    let sent = fabric.with_endpoint(a, |_, net| {
        net.deliver(&request(
            2,
            9,
            Service::Reliable,
            RetryPolicy::default(),
            &mem,
            Operation::Write {
                payload: &payload,
                remote_addr: 0x1000,
                rkey: 1,
                imm: None,
                solicited: false,
            },
        ))
    });
    assert_eq!(sent, Some(Delivery::Pending));
    let pieces = fabric.with_endpoint(b, |p, _| p.executed.clone()).unwrap();
    assert!(pieces.iter().all(|&(_, bytes)| bytes <= PIECE));
    assert_eq!(pieces.iter().map(|&(_, bytes)| bytes).sum::<u64>(), total);
    assert_eq!(answers(&fabric, a), vec![(9, Ok(Outcome { bytes: total }))]);
}

#[test]
fn loopback_goes_through_the_own_inbox_with_the_same_rnr_timers() {
    let fabric = MemcpyFabric::new();
    let a = fabric.add(Port {
        receives: Some(0),
        ..Port::with_gid(1)
    });
    // To itself: taken now, executed after the turn, refused, parked.
    assert_eq!(
        post_sends(&fabric, a, 1, 0..2, rnr(1)),
        vec![Delivery::Pending; 2]
    );
    assert_eq!(fabric.parked(), 2);
    // Its one timer retry is refused too: the head fails, the follower never executes.
    assert_eq!(fabric.tick(Instant::now() + Duration::from_secs(1)), None);
    assert_eq!(
        answers(&fabric, a),
        vec![(0, Err(RemoteError::ReceiverNotReady))]
    );
    assert_eq!(fabric.with_endpoint(a, |p, _| p.executed.len()), Some(0));
    // On a port with a receive it lands, answered through the same inbox.
    let fabric = MemcpyFabric::new();
    let b = fabric.add(Port::with_gid(2));
    assert_eq!(
        post_sends(&fabric, b, 2, 7..8, rnr(1)),
        vec![Delivery::Pending]
    );
    assert_eq!(answers(&fabric, b), vec![(7, Ok(Outcome { bytes: 16 }))]);
    assert_eq!(
        fabric.with_endpoint(b, |p, _| p.executed.clone()),
        Some(vec![(7, 16)])
    );
}
