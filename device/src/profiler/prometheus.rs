//! The profiler's figures in Prometheus' text exposition format (version 0.0.4), for
//! `--metrics`: per device, whether a client is attached and how many QPs it has; per QP,
//! the counters and, while stage timing is on, each stage's latency histogram; per peer
//! server of the TCP transport, its link. Devices are labelled by socket path.
//!
//! The profiler's buckets are powers of two of nanoseconds, bucket i holding
//! [2^i, 2^(i+1)) ns; Prometheus buckets are cumulative with an upper bound `le` in
//! seconds, so bucket i is counted under `le` = 2^(i+1) ns (a sample of exactly 2^(i+1) ns
//! lands one bucket higher than Prometheus' `≤` would put it: an error under one bucket).

use std::fmt::Write as _;

use super::Snapshot;
use crate::pvrdma::profile::{BUCKETS, Histogram, QpStats, Stage};

/// The HTTP `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the exposition says of one device besides its profiler figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLabel {
    /// The device's index in the profiler's figures.
    pub index: usize,
    /// Its socket's path.
    pub socket: String,
    /// Its node GUID as `ibv_devinfo` prints it.
    pub guid: String,
    pub attached: bool,
}

/// One counter of every QP: its name, help and how to read it.
struct QpCounter {
    name: &'static str,
    help: &'static str,
    read: fn(&QpStats) -> u64,
}

const QP_COUNTERS: [QpCounter; 7] = [
    QpCounter {
        name: "pvrdma_qp_doorbells_total",
        help: "Doorbells rung for the QP (send and receive).",
        read: |s| s.doorbells,
    },
    QpCounter {
        name: "pvrdma_qp_wqes_posted_total",
        help: "Work requests the device took off the QP's queues.",
        read: |s| s.wqes_posted,
    },
    QpCounter {
        name: "pvrdma_qp_wqes_completed_total",
        help: "Work requests that finished successfully.",
        read: |s| s.wqes_completed,
    },
    QpCounter {
        name: "pvrdma_qp_completion_errors_total",
        help: "Completions written with an error status, flushes included.",
        read: |s| s.completion_errors,
    },
    QpCounter {
        name: "pvrdma_qp_sent_bytes_total",
        help: "Payload bytes that left through the QP.",
        read: |s| s.bytes_sent,
    },
    QpCounter {
        name: "pvrdma_qp_received_bytes_total",
        help: "Payload bytes that arrived through the QP.",
        read: |s| s.bytes_received,
    },
    QpCounter {
        name: "pvrdma_qp_rnr_stalls_total",
        help: "Sends that found the receiver not ready.",
        read: |s| s.rnr_stalls,
    },
];

/// A label value with `\`, `"` and line feeds escaped, as the format requires.
fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition of `snapshot`, its devices labelled by `devices` (a device without a
/// label, one removed since the snapshot, say, is left out).
pub fn exposition(snapshot: &Snapshot, devices: &[DeviceLabel]) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "pvrdma_profiling",
        "gauge",
        "Whether stage timing is on (1) or off (0); counters are always kept.",
    );
    let _ = writeln!(out, "pvrdma_profiling {}", u8::from(snapshot.profiling));

    header(
        &mut out,
        "pvrdma_device_info",
        "gauge",
        "One per device served: its socket, index and node GUID.",
    );
    for d in devices {
        let _ = writeln!(
            out,
            "pvrdma_device_info{{socket=\"{}\",device=\"{}\",guid=\"{}\"}} 1",
            escape(&d.socket),
            d.index,
            d.guid
        );
    }
    header(
        &mut out,
        "pvrdma_device_client_attached",
        "gauge",
        "Whether a vfio-user client (QEMU) is attached to the device.",
    );
    for d in devices {
        let _ = writeln!(
            out,
            "pvrdma_device_client_attached{{socket=\"{}\"}} {}",
            escape(&d.socket),
            u8::from(d.attached)
        );
    }

    // Each QP with its labels, for the per-QP families below.
    let qps: Vec<(String, &str, &QpStats)> = snapshot
        .devices
        .iter()
        .filter_map(|d| Some((d, devices.iter().find(|l| l.index == d.index)?)))
        .flat_map(|(d, label)| {
            let socket = escape(&label.socket);
            d.qps.iter().enumerate().map(move |(i, (qpn, stats))| {
                let path = d.paths.get(i).map_or("unknown", |p| p.name());
                (format!("socket=\"{socket}\",qp=\"{qpn}\""), path, stats)
            })
        })
        .collect();
    header(
        &mut out,
        "pvrdma_device_qps",
        "gauge",
        "Queue pairs the guest has on the device.",
    );
    for d in devices {
        let count = snapshot
            .devices
            .iter()
            .find(|s| s.index == d.index)
            .map_or(0, |s| s.qps.len());
        let _ = writeln!(
            out,
            "pvrdma_device_qps{{socket=\"{}\"}} {count}",
            escape(&d.socket)
        );
    }
    header(
        &mut out,
        "pvrdma_qp_info",
        "gauge",
        "One per QP: the path its traffic takes (memcpy, tcp, rdma, loopback, ...).",
    );
    for (labels, path, _) in &qps {
        let _ = writeln!(out, "pvrdma_qp_info{{{labels},path=\"{path}\"}} 1");
    }
    for counter in &QP_COUNTERS {
        header(&mut out, counter.name, "counter", counter.help);
        for (labels, _, stats) in &qps {
            let _ = writeln!(
                out,
                "{}{{{labels}}} {}",
                counter.name,
                (counter.read)(stats)
            );
        }
    }
    header(
        &mut out,
        "pvrdma_qp_stage_seconds",
        "histogram",
        "Latency of each stage of a send work request (pickup: doorbell to WQE picked up; \
         place: to data placed; cqe: to CQE written; irq: to interrupt raised), sampled \
         while stage timing is on.",
    );
    for (labels, _, stats) in &qps {
        for stage in Stage::ALL {
            let h = stats.stage(stage);
            if h.count > 0 {
                histogram(&mut out, labels, stage, h);
            }
        }
    }

    header(
        &mut out,
        "pvrdma_peer_link_up",
        "gauge",
        "Whether the TCP link to a peer server is up.",
    );
    for p in &snapshot.peers {
        let _ = writeln!(
            out,
            "pvrdma_peer_link_up{{peer=\"{:016x}\"}} {}",
            p.id,
            u8::from(p.link_up)
        );
    }
    header(
        &mut out,
        "pvrdma_peer_gids",
        "gauge",
        "GIDs a peer server announced.",
    );
    for p in &snapshot.peers {
        let _ = writeln!(out, "pvrdma_peer_gids{{peer=\"{:016x}\"}} {}", p.id, p.gids);
    }
    out
}

/// One stage's histogram: cumulative buckets, sum (seconds) and count.
fn histogram(out: &mut String, labels: &str, stage: Stage, h: &Histogram) {
    let stage = stage.name();
    let mut cumulative = 0u64;
    for (i, &count) in h.buckets.iter().enumerate().take(BUCKETS - 1) {
        cumulative = cumulative.saturating_add(count);
        let le = (1u64 << (i + 1)) as f64 * 1e-9;
        let _ = writeln!(
            out,
            "pvrdma_qp_stage_seconds_bucket{{{labels},stage=\"{stage}\",le=\"{le:e}\"}} \
             {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "pvrdma_qp_stage_seconds_bucket{{{labels},stage=\"{stage}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(
        out,
        "pvrdma_qp_stage_seconds_sum{{{labels},stage=\"{stage}\"}} {:e}",
        h.sum_ns as f64 * 1e-9
    );
    let _ = writeln!(
        out,
        "pvrdma_qp_stage_seconds_count{{{labels},stage=\"{stage}\"}} {}",
        h.count
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiler::{DeviceSnapshot, PeerSnapshot, QpPath};

    fn snapshot() -> Snapshot {
        let mut stats = QpStats {
            doorbells: 3,
            wqes_posted: 5,
            wqes_completed: 4,
            completion_errors: 1,
            bytes_sent: 640,
            bytes_received: 64,
            rnr_stalls: 2,
            ..QpStats::default()
        };
        for ns in [1, 3, 900, 1_000, 5_000_000_000] {
            stats.record(Stage::Pickup, ns);
        }
        Snapshot {
            profiling: true,
            devices: vec![DeviceSnapshot {
                index: 1,
                qps: vec![(17, stats)],
                paths: vec![QpPath::Memcpy],
            }],
            peers: vec![PeerSnapshot {
                id: 0xab,
                link_up: true,
                gids: 2,
                rdma_gids: 0,
            }],
            directory: None,
        }
    }

    fn label(socket: &str) -> DeviceLabel {
        DeviceLabel {
            index: 1,
            socket: socket.into(),
            guid: "5254:00ff:fe5e:0101".into(),
            attached: true,
        }
    }

    #[test]
    fn counters_histograms_and_labels_are_written_as_the_format_says() {
        let text = exposition(&snapshot(), &[label("/run/a \"b\"\\c\n.sock")]);
        let socket = r#"socket="/run/a \"b\"\\c\n.sock""#;
        for line in [
            "pvrdma_profiling 1".to_string(),
            format!("pvrdma_device_client_attached{{{socket}}} 1"),
            format!("pvrdma_device_qps{{{socket}}} 1"),
            format!("pvrdma_qp_info{{{socket},qp=\"17\",path=\"memcpy\"}} 1"),
            format!("pvrdma_qp_doorbells_total{{{socket},qp=\"17\"}} 3"),
            format!("pvrdma_qp_sent_bytes_total{{{socket},qp=\"17\"}} 640"),
            format!("pvrdma_qp_rnr_stalls_total{{{socket},qp=\"17\"}} 2"),
            // 1 and 3 ns: buckets 0 and 1, so two samples at or under 4 ns.
            format!(
                "pvrdma_qp_stage_seconds_bucket{{{socket},qp=\"17\",stage=\"pickup\",le=\"4e-9\"}} 2"
            ),
            // 900 and 1000 ns: bucket 9 ([512, 1024) ns), under 1.024 µs.
            format!(
                "pvrdma_qp_stage_seconds_bucket{{{socket},qp=\"17\",stage=\"pickup\",le=\"1.024e-6\"}} 4"
            ),
            format!(
                "pvrdma_qp_stage_seconds_bucket{{{socket},qp=\"17\",stage=\"pickup\",le=\"+Inf\"}} 5"
            ),
            format!("pvrdma_qp_stage_seconds_count{{{socket},qp=\"17\",stage=\"pickup\"}} 5"),
            "pvrdma_peer_link_up{peer=\"00000000000000ab\"} 1".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Stages without samples have no histogram; every family has HELP and TYPE.
        assert!(!text.contains("stage=\"place\""));
        assert_eq!(
            text.matches("# HELP ").count(),
            text.matches("# TYPE ").count()
        );
        // The sum is in seconds.
        let sum = text
            .lines()
            .find(|l| l.starts_with("pvrdma_qp_stage_seconds_sum"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .expect("a sum");
        assert!((sum - 5.000_001_904).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn a_device_without_a_label_is_left_out() {
        let text = exposition(&snapshot(), &[]);
        assert!(!text.contains("qp=\"17\""), "{text}");
        assert!(text.contains("pvrdma_profiling 1"));
    }
}
