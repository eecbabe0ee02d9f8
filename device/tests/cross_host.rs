//! One side of a guest pair on two real hosts: this process starts the server of its own
//! host (with the host's RDMA device and the TCP link to the other host's server), plays
//! one guest on it, and meets the other side's process over a TCP control connection to
//! trade QP numbers and keys and to take turns. `guest-tests/tests/rdma_hosts.rs` runs it
//! in two lab VMs joined by the lab's Ethernet, Soft-RoCE on each: RC SEND with immediate,
//! WRITE, READ and fetch-and-add cross between the hosts through their devices, and a UD
//! datagram.
//!
//! Configured by the environment; without it the test says NOT RUN and passes:
//! `PVRDMA_CROSS_ROLE` (`a`: the requester, listens for the control connection; `b`: the
//! responder, dials it), `PVRDMA_CROSS_CONTROL` (A's control address), `PVRDMA_CROSS_GUEST`
//! (this guest's IPv4 address, held by the host's device), `PVRDMA_CROSS_DEVICE`, and
//! `PVRDMA_CROSS_SERVER_ARGS` (the server's TCP transport arguments).

mod driver;
#[allow(dead_code)] // The suites share the module; this one uses a side and its helpers.
mod two_servers;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use driver::memory;
use driver::socket_bus::SocketServer;
use driver::verbs::PINGPONG_SIZES;
use two_servers::{BUF_VA, Side, buffer, sge, wait_cqes};
use vfio_user_pvrdma::abi::{self, PAGE_SIZE, send_flags, wc_status, wr_opcode};

/// The control connection: one line per message.
struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Control {
    fn open(role: &str, address: &str) -> Control {
        let stream = if role == "a" {
            let listener = TcpListener::bind(address).expect("listen for the other side");
            listener.accept().expect("the other side").0
        } else {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match TcpStream::connect(address) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("control: {e}; again");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("control connection to {address}: {e}"),
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        Control {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.writer, "{line}").expect("control write");
    }

    fn hear(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("control read");
        assert!(!line.is_empty(), "the other side hung up");
        line.trim().to_string()
    }

    fn expect(&mut self, word: &str) -> Vec<String> {
        let line = self.hear();
        let mut parts = line.split_whitespace().map(str::to_string);
        assert_eq!(parts.next().as_deref(), Some(word), "heard {line:?}");
        parts.collect()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The bytes A writes into B's buffer.
fn pattern() -> Vec<u8> {
    (0..10_240u32).map(|i| (i * 13 % 251) as u8).collect()
}

#[test]
fn one_side_of_a_guest_pair_on_two_hosts() {
    let Some(role) = env("PVRDMA_CROSS_ROLE") else {
        eprintln!(
            "NOT RUN: one_side_of_a_guest_pair_on_two_hosts needs two hosts with RDMA devices \
             (PVRDMA_CROSS_*); guest-tests/tests/rdma_hosts.rs runs it in two lab VMs"
        );
        return;
    };
    let control_at = env("PVRDMA_CROSS_CONTROL").expect("PVRDMA_CROSS_CONTROL");
    let ip: Ipv4Addr = env("PVRDMA_CROSS_GUEST")
        .expect("PVRDMA_CROSS_GUEST")
        .parse()
        .expect("an IPv4 address");
    let device = env("PVRDMA_CROSS_DEVICE").expect("PVRDMA_CROSS_DEVICE");
    let transport = env("PVRDMA_CROSS_SERVER_ARGS").unwrap_or_default();
    let mut args: Vec<&str> = transport.split_whitespace().collect();
    args.extend(["--rdma-device", &device]);
    let server = SocketServer::start_with(1, two_servers::LOG, &args);
    server.wait_for_server_line("is up");
    let mut me = two_servers::side_with(&server, ip.octets(), PINGPONG_SIZES);
    server.wait_for_server_line(": 1 of its GIDs are on its RDMA device");
    let ud = ud_qp(&mut me);
    server.wait_for_server_line(&format!(
        "rdma path: UD QP {:#x} sends through the host's RDMA device",
        ud.qpn
    ));

    let mut control = Control::open(&role, &control_at);
    control.say(&format!(
        "hello {} {} {} {}",
        me.qp.qpn,
        hex(&me.gid),
        me.mr.rkey,
        ud.qpn
    ));
    let peer = control.expect("hello");
    let peer_qpn: u32 = peer[0].parse().expect("QPN");
    let peer_gid = unhex(&peer[1]);
    let peer_rkey: u32 = peer[2].parse().expect("rkey");
    let peer_ud: u32 = peer[3].parse().expect("UD QPN");
    two_servers::connect(&mut me, peer_qpn, peer_gid);
    server.wait_for_server_line(&format!(
        "rdma path: QP {:#x} is carried by the host's RDMA device",
        me.qp.qpn
    ));
    let sent_before = port_counter(&device, "sent_pkts");
    if role == "a" {
        requester(&mut me, &mut control, peer_rkey);
        control.expect("listening");
        send_datagram(&mut me, &ud, peer_ud, peer_gid);
        control.say("datagram");
        control.expect("done");
    } else {
        responder(&mut me, &mut control);
        receive_datagram(&mut me, &ud, peer_gid, &mut control);
        control.say("done");
    }
    let stats = vfio_user_pvrdma::profiler::control::request(
        server.control(),
        "stats",
        Duration::from_secs(10),
    )
    .expect("stats");
    let row = format!("  0 {:>5} rdma", me.qp.qpn);
    assert!(
        stats.contains(&row),
        "the QP takes the rdma path ({row:?}):\n{stats}"
    );
    let sent = port_counter(&device, "sent_pkts") - sent_before;
    assert!(sent > 0, "{device} sent nothing");
    println!("CROSS-HOST OK role {role}: {device} sent {sent} packets");
}

/// A: SEND with immediate, a 10 KiB WRITE, a READ and a fetch-and-add, each checked by B.
fn requester(a: &mut Side, control: &mut Control, rkey: u32) {
    control.expect("ready");
    let message = b"across two hosts through their RDMA devices";
    memory::write_bytes(a.d.ram(), buffer(a, BUF_VA), message);
    let mut wqe = driver::queues::send_wqe(
        11,
        wr_opcode::SEND_WITH_IMM,
        send_flags::SIGNALED,
        &[sge(BUF_VA, message.len() as u32, a.mr.lkey)],
    );
    let ex = std::mem::offset_of!(abi::SendWqeHeader, ex);
    wqe[ex..ex + 4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    a.d.post_send_raw(&a.qp, &wqe).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (11, wc_status::SUCCESS));
    control.say(&format!("sent {}", message.len()));
    control.expect("received");

    let data = pattern();
    for (i, chunk) in data.chunks(PAGE_SIZE as usize).enumerate() {
        memory::write_bytes(a.d.ram(), buffer(a, BUF_VA + i as u64 * PAGE_SIZE), chunk);
    }
    let write = driver::queues::rdma_wqe(
        21,
        wr_opcode::RDMA_WRITE,
        send_flags::SIGNALED,
        &[sge(BUF_VA, data.len() as u32, a.mr.lkey)],
        BUF_VA,
        rkey,
    );
    a.d.post_send_raw(&a.qp, &write).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (21, wc_status::SUCCESS));
    control.say("written");
    control.expect("checked");

    let read = driver::queues::rdma_wqe(
        22,
        wr_opcode::RDMA_READ,
        send_flags::SIGNALED,
        &[sge(BUF_VA + 3 * PAGE_SIZE, 100, a.mr.lkey)],
        BUF_VA + 50,
        rkey,
    );
    a.d.post_send_raw(&a.qp, &read).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status, cqes[0].byte_len),
        (22, wc_status::SUCCESS, 100)
    );
    assert_eq!(
        memory::snapshot(a.d.ram(), buffer(a, BUF_VA + 3 * PAGE_SIZE), 100),
        &data[50..150]
    );

    let faa = driver::queues::atomic_wqe(
        23,
        wr_opcode::ATOMIC_FETCH_AND_ADD,
        send_flags::SIGNALED,
        &[sge(BUF_VA + 3 * PAGE_SIZE, 8, a.mr.lkey)],
        BUF_VA,
        rkey,
        2,
        0,
    );
    a.d.post_send_raw(&a.qp, &faa).unwrap();
    a.d.ring_qp(&a.qp, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (23, wc_status::SUCCESS));
    let old = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        memory::snapshot(a.d.ram(), buffer(a, BUF_VA + 3 * PAGE_SIZE), 8),
        old.to_le_bytes(),
        "the atomic's original value"
    );
    control.say("added");
    control.expect("checked");
}

/// B: posts the receive, then checks each of A's operations in its own memory.
fn responder(b: &mut Side, control: &mut Control) {
    b.d.post_recv(&b.qp, 77, &[sge(BUF_VA, 256, b.mr.lkey)])
        .unwrap();
    control.say("ready");
    let len: u32 = control.expect("sent")[0].parse().unwrap();
    let cqes = wait_cqes(&mut b.d, &b.cq, 1);
    assert_eq!(
        (
            cqes[0].wr_id,
            cqes[0].status,
            cqes[0].byte_len,
            cqes[0].imm_data
        ),
        (77, wc_status::SUCCESS, len, 0x1234_5678)
    );
    assert_eq!(
        memory::snapshot(b.d.ram(), buffer(b, BUF_VA), len as usize),
        b"across two hosts through their RDMA devices"
    );
    control.say("received");

    control.expect("written");
    let data = pattern();
    let mut landed = Vec::new();
    for i in 0..3u64 {
        let take = (data.len() as u64 - i * PAGE_SIZE).min(PAGE_SIZE) as usize;
        landed.extend(memory::snapshot(
            b.d.ram(),
            buffer(b, BUF_VA + i * PAGE_SIZE),
            take,
        ));
    }
    assert_eq!(landed, data, "the WRITE's bytes");
    assert_eq!(b.d.drain_cq(&b.cq), [], "a WRITE consumes no receive");
    control.say("checked");

    control.expect("added");
    let old = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        memory::snapshot(b.d.ram(), buffer(b, BUF_VA), 8),
        old.wrapping_add(2).to_le_bytes(),
        "the fetch-and-add's sum"
    );
    control.say("checked");
}

/// The Q_Key both sides' UD QPs use.
const QKEY: u32 = 0x2222;

fn ud_qp(side: &mut Side) -> driver::Qp {
    let spec = driver::verbs::QpSpec::user(
        abi::qp_type::UD,
        side.qp.uc,
        side.qp.pd,
        side.cq.handle,
        PINGPONG_SIZES,
    );
    let qp = side.d.create_qp_with(spec).expect("CREATE_QP UD");
    side.d.ud_activate(&qp, QKEY).expect("UD to RTS");
    qp
}

/// A: one datagram to B's UD QP.
fn send_datagram(a: &mut Side, ud: &driver::Qp, peer_qpn: u32, peer_gid: [u8; 16]) {
    memory::write_bytes(a.d.ram(), buffer(a, BUF_VA), b"a datagram between hosts");
    let mut wqe = driver::queues::send_wqe(
        31,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 24, a.mr.lkey)],
    );
    let av = abi::AddressVector {
        port_pd: a.qp.pd | 1 << 24,
        dgid: peer_gid,
        hop_limit: 64,
        ..abi::AddressVector::default()
    };
    // The UD union: remote QPN, remote Q_Key, then the address vector.
    wqe[32..36].copy_from_slice(&peer_qpn.to_le_bytes());
    wqe[36..40].copy_from_slice(&QKEY.to_le_bytes());
    wqe[40..80].copy_from_slice(zerocopy::IntoBytes::as_bytes(&av));
    a.d.post_send_raw(ud, &wqe).unwrap();
    a.d.ring_qp(ud, abi::uar::QP_SEND);
    let cqes = wait_cqes(&mut a.d, &a.cq, 1);
    assert_eq!((cqes[0].wr_id, cqes[0].status), (31, wc_status::SUCCESS));
}

/// B: the datagram lands in its UD QP's receive with the GRH naming A.
fn receive_datagram(b: &mut Side, ud: &driver::Qp, peer_gid: [u8; 16], control: &mut Control) {
    let at = BUF_VA + 2 * PAGE_SIZE;
    b.d.post_recv(ud, 32, &[sge(at, 256, b.mr.lkey)]).unwrap();
    control.say("listening");
    control.expect("datagram");
    let cqes = wait_cqes(&mut b.d, &b.cq, 1);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status, cqes[0].byte_len),
        (32, wc_status::SUCCESS, 40 + 24)
    );
    let landed = memory::snapshot(b.d.ram(), buffer(b, at), 64);
    assert_eq!(&landed[8..24], &peer_gid, "the GRH names the sender");
    assert_eq!(&landed[40..64], b"a datagram between hosts");
}

fn hex(gid: &[u8; 16]) -> String {
    gid.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> [u8; 16] {
    let mut gid = [0u8; 16];
    for (i, byte) in gid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("a hex GID");
    }
    gid
}

/// A counter of the host device's port.
fn port_counter(device: &str, counter: &str) -> u64 {
    let path = format!("/sys/class/infiniband/{device}/ports/1/hw_counters/{counter}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}
