//! `scripts/bench --transport tcp`: guests A and B on two server processes joined by the
//! TCP transport on loopback, once per doorbell mode, judged against a raw loopback TCP
//! round trip and one raw TCP stream measured in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::baseline;
use crate::guests::{Buffer, Fabric, Mode};
use crate::report::Dist;
use crate::suite::Config;

/// What one TCP run measured.
pub struct TcpResults {
    pub mode: Mode,
    pub quick: bool,
    pub rc_send: Dist,
    pub raw_tcp: Dist,
    pub write_64k: f64,
    pub raw_stream: f64,
    pub seconds: f64,
}

/// The targets of the TCP issue.
const RTT_RATIO_TARGET: f64 = 1.5;
const WRITE_RATIO_TARGET: f64 = 0.8;

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl TcpResults {
    pub fn json(&self) -> String {
        let mut m = Map::new();
        let num = |x: f64| Value::from(round(x));
        m.insert("transport".into(), "tcp".into());
        m.insert("doorbell_mode".into(), self.mode.name().into());
        m.insert("quick".into(), self.quick.into());
        m.insert("run_seconds".into(), num(self.seconds));
        m.insert("tcp_rc_send_64_rtt_us_p50".into(), num(self.rc_send.p50));
        m.insert("tcp_rc_send_64_rtt_us_p99".into(), num(self.rc_send.p99));
        m.insert("raw_tcp_rtt_us_p50".into(), num(self.raw_tcp.p50));
        m.insert(
            "ratio_tcp_rc_send_to_raw_tcp".into(),
            num(self.rc_send.p50 / self.raw_tcp.p50),
        );
        m.insert("tcp_write_64k_gbytes_per_s".into(), num(self.write_64k));
        m.insert("raw_tcp_stream_gbytes_per_s".into(), num(self.raw_stream));
        m.insert(
            "ratio_tcp_write_64k_to_raw_stream".into(),
            num(self.write_64k / self.raw_stream),
        );
        Value::Object(m).to_string()
    }

    pub fn table(&self) -> String {
        let rtt_ratio = self.rc_send.p50 / self.raw_tcp.p50;
        let write_ratio = self.write_64k / self.raw_stream;
        let verdict = |met: bool| if met { "PASS" } else { "MISS" };
        format!(
            "vfio-user-pvrdma TCP transport benchmark: two host-side guests on two server processes, loopback\n\
             doorbell mode: {}; {} CPUs; {} run, {:.1} s\n\n\
             {:<32} {:>13}  {:<30} {:>7}  {:<9} {}\n\
             {:<32} {:>10.2} µs  {:<30} {:>6.2}×  {:<9} {}\n\
             {:<32} {:>8.3} GB/s  {:<30} {:>6.2}×  {:<9} {}\n",
            self.mode.name(),
            baseline::cpus(),
            if self.quick { "quick" } else { "full" },
            self.seconds,
            "Figure",
            "Measured",
            "Baseline",
            "Ratio",
            "Target",
            "Result",
            "RC SEND 64 B round trip p50",
            self.rc_send.p50,
            format!("raw TCP round trip {:.2} µs", self.raw_tcp.p50),
            rtt_ratio,
            format!("≤ {RTT_RATIO_TARGET}×"),
            verdict(rtt_ratio <= RTT_RATIO_TARGET),
            "RDMA WRITE 64 KiB (16/doorbell)",
            self.write_64k,
            format!("one TCP stream {:.3} GB/s", self.raw_stream),
            write_ratio,
            format!("≥ {WRITE_RATIO_TARGET}×"),
            verdict(write_ratio >= WRITE_RATIO_TARGET),
        )
    }
}

/// Round trips (ns) of 64-byte messages over a loopback TCP connection with TCP_NODELAY:
/// what one request and its answer cost on the wire the transport uses.
pub fn tcp_rtt(warmup: usize, iterations: usize) -> Vec<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let total = warmup + iterations;
    thread::scope(|s| {
        s.spawn(move || {
            let (mut echo, _) = listener.accept().expect("accept");
            echo.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 64];
            for _ in 0..total {
                echo.read_exact(&mut buf).expect("echo read");
                echo.write_all(&buf).expect("echo write");
            }
        });
        let mut client = TcpStream::connect(addr).expect("connect");
        client.set_nodelay(true).expect("nodelay");
        let (out, mut back) = ([0x5au8; 64], [0u8; 64]);
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..total {
            let start = Instant::now();
            client.write_all(&out).expect("ping");
            client.read_exact(&mut back).expect("pong");
            if i >= warmup {
                samples.push(start.elapsed().as_nanos() as u64);
            }
        }
        samples
    })
}

/// One loopback TCP stream's throughput in GB/s: 64 KiB writes for `duration`, read on
/// another thread.
pub fn tcp_stream_gbytes_per_s(duration: Duration) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    thread::scope(|s| {
        let reader = s.spawn(move || {
            let (mut sink, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match sink.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n as u64,
                }
            }
        });
        let mut writer = TcpStream::connect(addr).expect("connect");
        let chunk = vec![0xa5u8; 64 << 10];
        let start = Instant::now();
        while start.elapsed() < duration {
            writer.write_all(&chunk).expect("stream write");
        }
        drop(writer);
        let bytes = reader.join().expect("the reader");
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    })
}

/// The baselines once, then A and B on two servers in each doorbell mode of `c`.
pub fn run(c: &Config) -> Vec<TcpResults> {
    let started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "[bench +{:.1}s] tcp: {what}",
            started.elapsed().as_secs_f64()
        )
    };
    step("baseline: loopback TCP 64 B ping-pong");
    let raw_tcp = Dist::of(tcp_rtt(c.warmup, c.round_trips));
    step("baseline: one loopback TCP stream");
    let raw_stream = tcp_stream_gbytes_per_s(c.write_time);
    c.modes
        .iter()
        .map(|&mode| run_mode(c, mode, raw_tcp, raw_stream, started))
        .collect()
}

fn run_mode(
    c: &Config,
    mode: Mode,
    raw_tcp: Dist,
    raw_stream: f64,
    started: Instant,
) -> TcpResults {
    let mode_started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "[bench +{:.1}s] tcp, {}: {what}",
            started.elapsed().as_secs_f64(),
            mode.name()
        )
    };
    step("starting two servers joined by TCP, one guest on each");
    let mut fabric = Fabric::start_tcp(c.big_mr, mode, &[]);
    // Two servers bring four threads of their own (two socket threads or pollers, two
    // transport threads): on a small machine one thread plays both guests, so the figure
    // measures the transport rather than the scheduler.
    let threads = if baseline::cpus() >= 4 { 2 } else { 1 };
    step("RC SEND 64 B ping-pong across the servers");
    let rc_send = Dist::of(fabric.rc_send_pingpong(c.warmup, c.round_trips, threads));
    step("RDMA WRITE 64 KiB across the servers");
    fabric.write_bandwidth(64 << 10, 16, c.write_time / 10, Buffer::Scattered);
    let write_64k = fabric.write_bandwidth(64 << 10, 16, c.write_time, Buffer::Scattered) / 1e9;
    drop(fabric);
    step("done");
    TcpResults {
        mode,
        quick: c.quick,
        rc_send,
        raw_tcp,
        write_64k,
        raw_stream,
        seconds: mode_started.elapsed().as_secs_f64(),
    }
}
