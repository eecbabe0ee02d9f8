//! `scripts/bench --transport rdma`: guests A and B on two server processes whose QPs the
//! host's RDMA device carries, once per doorbell mode, judged against perftest's own
//! `ib_send_lat` and `ib_write_bw` run directly on the same device in the same run.
//!
//! Both servers and both perftest ends run on one host, so the device must carry traffic
//! between two of the host's own addresses: Soft-RoCE bound to `lo` with 127.0.0.11 and
//! 127.0.0.12 (what `guest-tests/tests/rdma_bench.rs` sets up in the lab's host VM).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::baseline;
use crate::guests::{Buffer, Fabric, Mode};
use crate::report::Dist;
use crate::suite::Config;

/// The guests' addresses: their GIDs must be in the device's table.
pub const GUEST_A: [u8; 4] = [127, 0, 0, 11];
pub const GUEST_B: [u8; 4] = [127, 0, 0, 12];

/// The targets of the rdma-core issue.
const RTT_RATIO_TARGET: f64 = 1.5;
const WRITE_RATIO_TARGET: f64 = 0.8;

/// What one run measured.
pub struct RdmaResults {
    pub device: String,
    pub mode: Mode,
    pub quick: bool,
    pub rc_send: Dist,
    /// perftest `ib_send_lat`'s typical one-way latency, doubled: a round trip (µs).
    pub raw_rtt_us: f64,
    pub write_64k: f64,
    /// perftest `ib_write_bw`'s average bandwidth, 64 KiB messages (GB/s).
    pub raw_bw: f64,
    pub seconds: f64,
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl RdmaResults {
    pub fn json(&self) -> String {
        let mut m = Map::new();
        let num = |x: f64| Value::from(round(x));
        m.insert("transport".into(), "rdma".into());
        m.insert("rdma_device".into(), self.device.clone().into());
        m.insert("doorbell_mode".into(), self.mode.name().into());
        m.insert("quick".into(), self.quick.into());
        m.insert("run_seconds".into(), num(self.seconds));
        m.insert("rdma_rc_send_64_rtt_us_p50".into(), num(self.rc_send.p50));
        m.insert("rdma_rc_send_64_rtt_us_p99".into(), num(self.rc_send.p99));
        m.insert("raw_ib_send_lat_rtt_us".into(), num(self.raw_rtt_us));
        m.insert(
            "ratio_rdma_rc_send_to_raw".into(),
            num(self.rc_send.p50 / self.raw_rtt_us),
        );
        m.insert("rdma_write_64k_gbytes_per_s".into(), num(self.write_64k));
        m.insert("raw_ib_write_bw_gbytes_per_s".into(), num(self.raw_bw));
        m.insert(
            "ratio_rdma_write_64k_to_raw".into(),
            num(self.write_64k / self.raw_bw),
        );
        Value::Object(m).to_string()
    }

    pub fn table(&self) -> String {
        let rtt_ratio = self.rc_send.p50 / self.raw_rtt_us;
        let write_ratio = self.write_64k / self.raw_bw;
        let verdict = |met: bool| if met { "PASS" } else { "MISS" };
        format!(
            "vfio-user-pvrdma rdma path benchmark: two host-side guests on two server processes, device {}\n\
             doorbell mode: {}; {} CPUs; {} run, {:.1} s\n\n\
             {:<32} {:>13}  {:<34} {:>7}  {:<9} {}\n\
             {:<32} {:>10.2} µs  {:<34} {:>6.2}×  {:<9} {}\n\
             {:<32} {:>8.3} GB/s  {:<34} {:>6.2}×  {:<9} {}\n",
            self.device,
            self.mode.name(),
            baseline::cpus(),
            if self.quick { "quick" } else { "full" },
            self.seconds,
            "Figure",
            "Measured",
            "Baseline (perftest, same device)",
            "Ratio",
            "Target",
            "Result",
            "RC SEND 64 B round trip p50",
            self.rc_send.p50,
            format!("ib_send_lat 2 × {:.2} µs", self.raw_rtt_us / 2.0),
            rtt_ratio,
            format!("≤ {RTT_RATIO_TARGET}×"),
            verdict(rtt_ratio <= RTT_RATIO_TARGET),
            "RDMA WRITE 64 KiB (16/doorbell)",
            self.write_64k,
            format!("ib_write_bw {:.3} GB/s", self.raw_bw),
            write_ratio,
            format!("≥ {WRITE_RATIO_TARGET}×"),
            verdict(write_ratio >= WRITE_RATIO_TARGET),
        )
    }
}

/// The index of the IPv4 GID of `ip` in `device`'s port 1 table (sysfs), for perftest's `-x`.
pub fn gid_index(device: &str, ip: [u8; 4]) -> Result<u32, String> {
    let dir = format!("/sys/class/infiniband/{device}/ports/1/gids");
    let wanted = format!(
        "0000:0000:0000:0000:0000:ffff:{:02x}{:02x}:{:02x}{:02x}",
        ip[0], ip[1], ip[2], ip[3]
    );
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut found: Vec<u32> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let gid = std::fs::read_to_string(entry.path()).ok()?;
            (gid.trim() == wanted)
                .then(|| entry.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect();
    found.sort_unstable();
    found
        .first()
        .copied()
        .ok_or_else(|| format!("{device} has no GID for {ip:?} ({wanted})"))
}

/// The first row of numbers under perftest's header line (the one starting `#bytes`).
fn perftest_row(output: &str) -> Result<(String, Vec<f64>), String> {
    let mut lines = output.lines();
    let header = lines
        .find(|l| l.trim_start().starts_with("#bytes"))
        .ok_or_else(|| format!("no result table in perftest's output:\n{output}"))?;
    let row = lines
        .find(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u64>().is_ok())
        })
        .ok_or_else(|| format!("no result row in perftest's output:\n{output}"))?;
    let values = row
        .split_whitespace()
        .map(|w| {
            w.parse::<f64>()
                .map_err(|e| format!("{w:?} in {row:?}: {e}"))
        })
        .collect::<Result<Vec<f64>, String>>()?;
    Ok((header.to_string(), values))
}

/// Runs a perftest tool as server (GID of `GUEST_A`) and client (GID of `GUEST_B`) on
/// `device`, exchanging its setup over loopback TCP on `port`; the client's output.
fn perftest(tool: &str, device: &str, port: u16, args: &[&str]) -> Result<String, String> {
    let (a, b) = (gid_index(device, GUEST_A)?, gid_index(device, GUEST_B)?);
    let port = port.to_string();
    let common = ["-d", device, "-i", "1", "-p", &port];
    let server = Command::new(tool)
        .args(common)
        .args(["-x", &a.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{tool}: {e} (perftest installed?)"))?;
    let mut server = Guard(server);
    // The client gives up at once if the server does not listen yet: try again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(tool)
            .args(common)
            .args(["-x", &b.to_string()])
            .args(args)
            .arg("127.0.0.1")
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            let _ = server.0.wait();
            return Ok(text);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{tool} client failed: {}\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
}

/// Kills the child when dropped (a client that failed leaves its server waiting).
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// perftest's `ib_send_lat` of 64-byte SENDs: its typical one-way latency doubled (µs).
pub fn raw_send_rtt_us(device: &str, iterations: usize) -> Result<f64, String> {
    let n = iterations.to_string();
    let out = perftest("ib_send_lat", device, 18515, &["-s", "64", "-n", &n])?;
    let (_, row) = perftest_row(&out)?;
    // #bytes #iterations t_min t_max t_typical ...
    row.get(4)
        .map(|typical| 2.0 * typical)
        .ok_or_else(|| format!("no t_typical in ib_send_lat's row {row:?}"))
}

/// perftest's `ib_write_bw` of 64 KiB WRITEs for `duration`: its average (GB/s).
pub fn raw_write_gbytes_per_s(device: &str, duration: Duration) -> Result<f64, String> {
    let seconds = duration.as_secs().max(1).to_string();
    let out = perftest(
        "ib_write_bw",
        device,
        18516,
        &["-s", "65536", "-D", &seconds],
    )?;
    let (header, row) = perftest_row(&out)?;
    // #bytes #iterations BW-peak BW-average MsgRate; MiB/s or MB/s as the header says.
    let average = row
        .get(3)
        .ok_or_else(|| format!("no BW average in ib_write_bw's row {row:?}"))?;
    let unit = if header.contains("MiB") {
        1_048_576.0
    } else {
        1e6
    };
    Ok(average * unit / 1e9)
}

/// The perftest baselines once, then A and B on two servers carried by `device`, in each
/// doorbell mode of `c`.
pub fn run(c: &Config, device: &str) -> Result<Vec<RdmaResults>, String> {
    let started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "[bench +{:.1}s] rdma: {what}",
            started.elapsed().as_secs_f64()
        )
    };
    step(&format!("baseline: ib_send_lat 64 B on {device}"));
    let raw_rtt_us = raw_send_rtt_us(device, c.round_trips)?;
    step(&format!("baseline: ib_write_bw 64 KiB on {device}"));
    let raw_bw = raw_write_gbytes_per_s(device, c.write_time)?;
    Ok(c.modes
        .iter()
        .map(|&mode| {
            let mode_started = Instant::now();
            step(&format!(
                "{}: two servers with --rdma-device {device}, one guest on each",
                mode.name()
            ));
            // The big MR is not measured here: a small one keeps the host VM's RAM free.
            let mut fabric = Fabric::start_rdma(16 << 20, mode, device);
            let threads = if baseline::cpus() >= 4 { 2 } else { 1 };
            step(&format!("{}: RC SEND 64 B ping-pong", mode.name()));
            let rc_send = Dist::of(fabric.rc_send_pingpong(c.warmup, c.round_trips, threads));
            step(&format!("{}: RDMA WRITE 64 KiB", mode.name()));
            fabric.write_bandwidth(64 << 10, 16, c.write_time / 10, Buffer::Scattered);
            let write_64k =
                fabric.write_bandwidth(64 << 10, 16, c.write_time, Buffer::Scattered) / 1e9;
            drop(fabric);
            RdmaResults {
                device: device.to_string(),
                mode,
                quick: c.quick,
                rc_send,
                raw_rtt_us,
                write_64k,
                raw_bw,
                seconds: mode_started.elapsed().as_secs_f64(),
            }
        })
        .collect())
}
