//! Two TCP transports on loopback, each with a stand-in host: the handshake proves the
//! cluster key (a wrong key never brings a link up), GIDs are announced, and a request and
//! its answer cross the real sockets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pvrdma_backend::tcp::runtime::{Config, Host, Transport};
use pvrdma_backend::{
    Completion, Delivery, Destination, GuestMemory, Network, Operation, Outcome, RemoteError,
    Request, RetryPolicy, Service, Sgl, Source,
};

struct FakeHost {
    gid: [u8; 16],
    /// What the host says its RDMA device holds.
    rdma_gids: Mutex<Vec<[u8; 16]>>,
    received: Mutex<Vec<u64>>,
    completed: Mutex<Vec<(u64, Result<Outcome, RemoteError>)>>,
}

impl FakeHost {
    fn new(gid: u8) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            gid: [gid; 16],
            rdma_gids: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            completed: Mutex::new(Vec::new()),
        })
    }
}

impl Host for FakeHost {
    fn local_gids(&self) -> Vec<[u8; 16]> {
        vec![self.gid]
    }

    fn local_rdma_gids(&self) -> Vec<[u8; 16]> {
        self.rdma_gids.lock().unwrap().clone()
    }

    fn respond(&self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        self.received.lock().unwrap().push(request.ticket);
        Ok(Outcome { bytes: 5 })
    }

    fn complete(&self, _gid: &[u8; 16], completion: &Completion<'_>) {
        self.completed
            .lock()
            .unwrap()
            .push((completion.ticket, completion.result));
    }
}

fn start(host: &Arc<FakeHost>, key: Option<&[u8]>, peers: Vec<SocketAddr>) -> Transport {
    let config = Config {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers,
        cluster_key: key.map(<[u8]>::to_vec),
        ..Config::default()
    };
    Transport::start(config, host.clone()).expect("start the transport")
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("{what}: not within {timeout:?}");
    false
}

/// An RC SEND of `payload` from QP 3 at `from` to QP 4 at `to`, as a device issues it.
fn rc_send<'a>(
    memory: &'a GuestMemory,
    payload: &'a Sgl,
    from: [u8; 16],
    to: [u8; 16],
    ticket: u64,
) -> Request<'a> {
    Request {
        source: Source { gid: from, qpn: 3 },
        destination: Destination { gid: to, qpn: 4 },
        service: Service::Reliable,
        memory,
        operation: Operation::Send {
            payload,
            imm: None,
            invalidate: None,
            solicited: false,
        },
        ticket,
        epoch: 1,
        retry: RetryPolicy {
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
        },
    }
}

fn linked(transport: &Transport) -> bool {
    transport
        .peers()
        .iter()
        .any(|&(_, up, gids)| up && gids == 1)
}

#[test]
fn peers_with_the_same_key_link_and_carry_a_request_and_its_answer() {
    let (host_a, host_b) = (FakeHost::new(0xa), FakeHost::new(0xb));
    let a = start(&host_a, Some(b"the cluster's secret"), Vec::new());
    let b = start(
        &host_b,
        Some(b"the cluster's secret"),
        vec![a.local_addr().unwrap()],
    );
    assert!(wait_until(
        "link up with GIDs",
        Duration::from_secs(5),
        || linked(&a) && linked(&b)
    ));

    let memory = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap();
    let mut payload = Sgl::new();
    payload.push(0, 5).unwrap();
    let request = rc_send(&memory, &payload, [0xb; 16], [0xa; 16], 42);
    assert_eq!(b.network().deliver(&request), Delivery::Pending);
    assert!(wait_until("the answer", Duration::from_secs(5), || {
        !host_b.completed.lock().unwrap().is_empty()
    }));
    assert_eq!(*host_a.received.lock().unwrap(), [42]);
    assert_eq!(
        *host_b.completed.lock().unwrap(),
        [(42, Ok(Outcome { bytes: 5 }))]
    );
    assert!(b.network().gid_taken(&[0xa; 16]));
}

/// A server tells its peers which of its GIDs its host RDMA device holds, and every change:
/// the peer's rdma path may take them only then. A GID it does not hold cannot be claimed.
#[test]
fn the_gids_a_peers_rdma_device_holds_are_announced_and_follow_changes() {
    let (host_a, host_b) = (FakeHost::new(0xa), FakeHost::new(0xb));
    let a = start(&host_a, None, Vec::new());
    let b = start(&host_b, None, vec![a.local_addr().unwrap()]);
    assert!(wait_until(
        "link up with GIDs",
        Duration::from_secs(5),
        || linked(&a) && linked(&b)
    ));
    assert!(!b.rdma_reachable(&[0xa; 16]), "nothing said yet");

    *host_a.rdma_gids.lock().unwrap() = vec![[0xa; 16], [0xc; 16]];
    assert!(wait_until(
        "A's RDMA GID reaches B",
        Duration::from_secs(5),
        || b.rdma_reachable(&[0xa; 16])
    ));
    assert!(
        !b.rdma_reachable(&[0xc; 16]),
        "a GID A does not hold is not taken from it"
    );
    assert!(!a.rdma_reachable(&[0xb; 16]), "B said nothing of its own");

    host_a.rdma_gids.lock().unwrap().clear();
    assert!(wait_until(
        "the withdrawal reaches B",
        Duration::from_secs(5),
        || !b.rdma_reachable(&[0xa; 16])
    ));
}

#[test]
fn a_peer_with_another_key_never_links() {
    let (host_a, host_b) = (FakeHost::new(0xa), FakeHost::new(0xb));
    let a = start(&host_a, Some(b"one secret"), Vec::new());
    let b = start(
        &host_b,
        Some(b"another secret"),
        vec![a.local_addr().unwrap()],
    );
    assert!(!wait_until(
        "a link",
        Duration::from_millis(1500),
        || linked(&a) || linked(&b)
    ));
    assert!(!b.network().gid_taken(&[0xa; 16]));
    // Nor does a peer without any key.
    let c = start(&FakeHost::new(0xc), None, vec![a.local_addr().unwrap()]);
    assert!(!wait_until(
        "a link",
        Duration::from_millis(1000),
        || linked(&a) || linked(&c)
    ));
}

#[test]
fn two_servers_that_dial_each_other_settle_on_one_working_link() {
    // Two free ports, each server listening on one and dialing the other.
    let ports: Vec<SocketAddr> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let (host_a, host_b) = (FakeHost::new(0xa), FakeHost::new(0xb));
    let config = |listen: SocketAddr, peer: SocketAddr| Config {
        listen: Some(listen),
        peers: vec![peer],
        cluster_key: Some(b"k".to_vec()),
        ..Config::default()
    };
    let a = Transport::start(config(ports[0], ports[1]), host_a.clone()).unwrap();
    let b = Transport::start(config(ports[1], ports[0]), host_b.clone()).unwrap();
    assert!(
        wait_until("link up with GIDs", Duration::from_secs(5), || linked(&a)
            && linked(&b)),
        "{:?} {:?}",
        a.peers(),
        b.peers()
    );
    // It stays up (no flapping between the two connections), and it carries traffic.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(linked(&a) && linked(&b), "{:?} {:?}", a.peers(), b.peers());
    let memory = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap();
    let payload = Sgl::new();
    let request = rc_send(&memory, &payload, [0xa; 16], [0xb; 16], 7);
    assert_eq!(a.network().deliver(&request), Delivery::Pending);
    assert!(wait_until("the answer", Duration::from_secs(5), || {
        !host_a.completed.lock().unwrap().is_empty()
    }));
    assert_eq!(*host_b.received.lock().unwrap(), [7]);
}

/// Reads from `stream` until the other side closes it; how long that took.
fn time_until_closed(mut stream: std::net::TcpStream) -> Duration {
    use std::io::Read;
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("the server neither closed nor spoke: {e}"),
        }
    }
}

#[test]
fn a_handshake_that_does_not_finish_is_closed_and_holds_up_no_real_peer() {
    use std::io::Write;
    let (host_a, host_b) = (FakeHost::new(0xa), FakeHost::new(0xb));
    let key: &[u8] = b"the cluster key";
    let a = start(&host_a, Some(key), Vec::new());
    let addr = a.local_addr().unwrap();
    // One connects and says nothing; another sends the start of something and stops.
    let silent = std::net::TcpStream::connect(addr).unwrap();
    let mut partial = std::net::TcpStream::connect(addr).unwrap();
    partial.write_all(&[0x01, 0x00, 0x00]).unwrap();
    // Meanwhile a real peer links and is served.
    let b = start(&host_b, Some(key), vec![addr]);
    assert!(wait_until(
        "the real link",
        Duration::from_secs(4),
        || linked(&a) && linked(&b)
    ));
    let waiters =
        [silent, partial].map(|stream| std::thread::spawn(move || time_until_closed(stream)));
    for waiter in waiters {
        let took = waiter.join().unwrap();
        // The server's limit is 5 s from the connection; its check runs on its next wake-up.
        assert!(took < Duration::from_secs(10), "closed after {took:?}");
    }
    assert!(
        linked(&a) && linked(&b),
        "the real link outlived the stalled ones"
    );
}

/// The resident memory of this process, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn a_peer_that_never_reads_its_answers_is_held_back_not_buffered() {
    use hmac::{Hmac, Mac};
    use pvrdma_backend::tcp::wire::{self, Decoder, Frame, Op, RequestFrame, flags};
    use sha2::Sha256;
    use std::io::{Read, Write};

    let host_a = FakeHost::new(0xa);
    let key: &[u8] = b"the cluster key";
    let a = start(&host_a, Some(key), Vec::new());
    // A peer that knows the key: the handshake as a server does it.
    let mut peer = std::net::TcpStream::connect(a.local_addr().unwrap()).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (my_id, my_nonce) = (0x0bad_f00d_u64, [7u8; 16]);
    let mut out = Vec::new();
    wire::encode(
        &Frame::Hello {
            version: wire::VERSION,
            node: my_id,
            nonce: my_nonce,
        },
        &mut out,
    );
    peer.write_all(&out).unwrap();
    let mut decoder = Decoder::new();
    let their_nonce = loop {
        let mut buf = [0u8; 4096];
        let n = peer.read(&mut buf).unwrap();
        decoder.push(&buf[..n]);
        if let Some(Frame::Hello { nonce, .. }) = decoder.next_frame().unwrap() {
            break nonce;
        }
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(b"pvrdma-tcp-auth");
    mac.update(&their_nonce);
    mac.update(&my_id.to_le_bytes());
    mac.update(&my_nonce);
    let mut out = Vec::new();
    wire::encode(
        &Frame::Auth {
            mac: mac.finalize().into_bytes().into(),
        },
        &mut out,
    );
    const MY_GID: [u8; 16] = [0xc; 16];
    wire::encode(&Frame::Gids(vec![MY_GID]), &mut out);
    peer.write_all(&out).unwrap();
    assert!(wait_until("the link", Duration::from_secs(4), || linked(
        &a
    )));

    // Thousands of 256 KiB READs, and never a byte of the answers read: 1 GiB of answers
    // if the server queued them all.
    let before = resident();
    let mut flood = Vec::new();
    for seq in 0..4000u32 {
        let read = RequestFrame {
            src_gid: MY_GID,
            src_qpn: 1,
            epoch: 1,
            dst_gid: [0xa; 16],
            dst_qpn: 4,
            seq,
            ticket: u64::from(seq),
            op: Op::Read,
            flags: flags::LAST,
            qkey: 0,
            imm: 0,
            invalidate: 0,
            rkey: 1,
            remote_addr: 0,
            read_len: wire::CHUNK as u32,
            compare_add: 0,
            swap: 0,
            reply_offset: 0,
            payload: Vec::new(),
        };
        wire::encode(&Frame::Request(read), &mut flood);
    }
    // The server stops taking them once its queue to this peer is full: the rest wait in
    // the socket, and this writer waits on them (TCP's back-pressure).
    let mut writer = peer.try_clone().unwrap();
    writer.set_write_timeout(None).unwrap();
    let writing = std::thread::spawn(move || writer.write_all(&flood));
    // Wait until execution stops (or everything ran, which it must not).
    let executed = || host_a.received.lock().unwrap().len();
    let started = Instant::now();
    let mut seen = (executed(), Instant::now());
    while executed() < 4000 && seen.1.elapsed() < Duration::from_secs(1) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still executing"
        );
        std::thread::sleep(Duration::from_millis(50));
        if executed() != seen.0 {
            seen = (executed(), Instant::now());
        }
    }
    let held_back = executed();
    let grown = resident().saturating_sub(before);
    assert!(
        held_back < 4000,
        "all {held_back} READs were executed with nobody reading the answers"
    );
    assert!(
        grown < 256 << 20,
        "{} MiB more resident after {held_back} READs",
        grown >> 20
    );
    // Once the peer reads its answers, the rest of its requests are executed.
    let reader = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 20];
        while matches!(peer.read(&mut sink), Ok(n) if n > 0) {}
    });
    assert!(wait_until(
        "the rest of the READs",
        Duration::from_secs(60),
        || executed() == 4000
    ));
    writing
        .join()
        .unwrap()
        .expect("every request was written in the end");
    drop(a);
    let _ = reader.join();
}

/// A loopback address whose SYNs go unanswered: a listener whose accept queue is full (one
/// connection waits in it and is never accepted), so the kernel drops further SYNs, as a
/// host that is gone does. Returns the address and what keeps it full.
fn black_hole() -> (SocketAddr, (std::os::fd::OwnedFd, std::net::TcpStream)) {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, getsockname, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
    listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
    let bound: SockaddrIn = getsockname(fd.as_raw_fd()).expect("getsockname");
    let addr = SocketAddr::from((bound.ip(), bound.port()));
    let filler = std::net::TcpStream::connect(addr).expect("the connection filling the queue");
    (addr, (fd, filler))
}

/// Dialing a peer that does not answer must not hold the thread that serves every link
/// (exit-free, the doorbell poller itself): the connection is started and left to finish
/// or time out while the pump goes on turning.
#[test]
fn dialing_a_peer_that_never_answers_does_not_hold_the_pump() {
    let (hole, _keep) = black_hole();
    let host = FakeHost::new(0x31);
    let config = Config {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers: vec![hole],
        ..Config::default()
    };
    let (_transport, mut pump) =
        Transport::start_driven(config, host).expect("start the transport");
    // Two seconds of turns: four redials of the silent peer.
    let started = Instant::now();
    let (mut turns, mut slow) = (0u32, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(2) {
        let turn = Instant::now();
        pump.turn(Duration::from_millis(1));
        let took = turn.elapsed();
        if took > Duration::from_millis(150) {
            slow += took;
        }
        turns += 1;
    }
    eprintln!("{turns} turns in 2 s; {slow:?} in turns of over 150 ms");
    // A blocking dial spends 200 ms of every 500 ms redial period in one turn (40%); an
    // occasional stall of a loaded machine is far below half of that.
    assert!(
        slow < Duration::from_millis(400),
        "{slow:?} of 2 s went to turns over 150 ms: the dial blocks"
    );
}
