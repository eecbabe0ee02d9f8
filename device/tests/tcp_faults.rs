//! A fault proxy between two server processes: it forwards the TCP transport's stream in
//! pieces of random size, with random pauses, and cuts the connection again and again.
//! Through all of it, RC work from B to A completes exactly once and in order, and nothing
//! is executed twice (fetch-and-add counts every operation once).

mod driver;
#[allow(dead_code)] // Shared with the other TCP suite.
mod two_servers;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use driver::QpSizes;
use driver::memory;
use two_servers::{BUF_VA, buffer, connect_sides, sge, two_servers_via, wait_cqes};
use vfio_user_pvrdma::abi::{send_flags, wc_status, wr_opcode};

/// A tiny deterministic generator (xorshift), so a failure can be reproduced.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Forwards every connection accepted on `listener` to `target`, fragmenting and pausing
/// at random, and cuts each connection after a random number of bytes from B. Counts cuts.
fn proxy(listener: TcpListener, target: String, cuts: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Acquire) {
        let Ok((from_b, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let Ok(to_a) = TcpStream::connect(&target) else {
            continue;
        };
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let budget = 3_000 + Rng(seed).below(6_000);
        let pair = [from_b, to_a];
        let forward = |mut from: TcpStream, mut to: TcpStream, seed: u64, limit: Option<u64>| {
            let mut rng = Rng(seed | 1);
            let mut moved = 0u64;
            let mut buf = [0u8; 4096];
            loop {
                let want = 1 + rng.below(buf.len() as u64) as usize;
                let n = match from.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Pieces of any size, now and then a pause.
                let mut at = 0;
                while at < n {
                    let piece = (1 + rng.below(64) as usize).min(n - at);
                    if to.write_all(&buf[at..at + piece]).is_err() {
                        break;
                    }
                    at += piece;
                }
                if rng.below(50) == 0 {
                    thread::sleep(Duration::from_millis(rng.below(20)));
                }
                moved += n as u64;
                if limit.is_some_and(|limit| moved > limit) {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        };
        let (b1, a1) = (pair[0].try_clone().unwrap(), pair[1].try_clone().unwrap());
        let [b2, a2] = pair;
        let cuts = Arc::clone(&cuts);
        thread::spawn(move || {
            // Answers are cut too, so some requests A executed never get their answer to B
            // and come again: A must answer those from its cache, not execute them twice.
            let back_budget = 1_000 + Rng(seed ^ 0x5555).below(4_000);
            let back = thread::spawn(move || forward(a2, b2, seed ^ 0xabc, Some(back_budget)));
            forward(b1, a1, seed, Some(budget));
            cuts.fetch_add(1, Ordering::AcqRel);
            let _ = back.join();
        });
    }
}

const OPS: u64 = 300;
const DEPTH: u32 = 8;

#[test]
fn rc_work_through_a_cutting_fragmenting_proxy_completes_once_in_order() {
    let proxy_listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let proxy_addr = proxy_listener.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (server_a, server_b) = two_servers_via(|a_addr| {
        let (target, cuts, stop) = (a_addr.to_string(), Arc::clone(&cuts), Arc::clone(&stop));
        thread::spawn(move || proxy(proxy_listener, target, cuts, stop));
        proxy_addr.clone()
    });
    let sizes = QpSizes {
        max_send_wr: DEPTH,
        max_recv_wr: DEPTH,
        max_send_sge: 1,
        max_recv_sge: 1,
        srq: false,
    };
    let (a, mut b) = connect_sides(&server_a, &server_b, sizes);
    memory::write_bytes(a.d.ram(), buffer(&a, BUF_VA), &0u64.to_le_bytes());

    // B adds 1 to A's counter OPS times, DEPTH at a time; each old value lands in its own
    // slot of B's buffer, and each 64-byte WRITE of a pattern in its own slot of A's.
    let mut completed = Vec::new();
    let mut posted = 0u64;
    while posted < OPS {
        let batch = (OPS - posted).min(u64::from(DEPTH / 2));
        for k in 0..batch {
            let i = posted + k;
            let slot = BUF_VA + 8 * (i % u64::from(DEPTH));
            let faa = driver::queues::atomic_wqe(
                2 * i,
                wr_opcode::ATOMIC_FETCH_AND_ADD,
                send_flags::SIGNALED,
                &[sge(slot, 8, b.mr.lkey)],
                BUF_VA,
                a.mr.rkey,
                1,
                0,
            );
            b.d.post_send_raw(&b.qp, &faa).unwrap();
        }
        b.d.ring_qp(&b.qp, vfio_user_pvrdma::abi::uar::QP_SEND);
        let cqes = wait_cqes(&mut b.d, &b.cq, batch as usize);
        for (k, cqe) in cqes.iter().enumerate() {
            let i = posted + k as u64;
            assert_eq!(
                (cqe.wr_id, cqe.status),
                (2 * i, wc_status::SUCCESS),
                "completion {i}: in order, once, successful ({} cuts so far)",
                cuts.load(Ordering::Acquire)
            );
            let slot = BUF_VA + 8 * (i % u64::from(DEPTH));
            let old = memory::snapshot(b.d.ram(), buffer(&b, slot), 8);
            completed.push(u64::from_le_bytes(old.try_into().unwrap()));
        }
        posted += batch;
    }
    stop.store(true, Ordering::Release);
    eprintln!(
        "{OPS} operations through {} cuts",
        cuts.load(Ordering::Acquire)
    );
    let counter = memory::snapshot(a.d.ram(), buffer(&a, BUF_VA), 8);
    assert_eq!(
        u64::from_le_bytes(counter.try_into().unwrap()),
        OPS,
        "every fetch-and-add executed exactly once"
    );
    assert_eq!(
        completed,
        (0..OPS).collect::<Vec<_>>(),
        "each operation saw the counter its predecessors left"
    );
    assert!(
        cuts.load(Ordering::Acquire) >= 2,
        "the proxy cut the link {} times; the test needs at least 2",
        cuts.load(Ordering::Acquire)
    );
    assert_eq!(b.d.drain_cq(&b.cq), []);
}
