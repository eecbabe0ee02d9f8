//! The queue-pair profiler's reporting half: a copy of every device's per-QP figures
//! ([`Snapshot`], taken under the fabric lock by `Fabric::profile`), printed as a text table,
//! as JSON, or as an SVG histogram of one QP ([`svg`]), and the control socket that serves
//! them from a running server ([`control`]). docs/profiler.md.

pub mod control;
pub mod prometheus;
pub mod svg;

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use crate::pvrdma::profile::{Histogram, QpStats, Stage};

/// Every device's QPs and their figures, copied out of the fabric.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Whether stage timing is on (counters are always kept).
    pub profiling: bool,
    pub devices: Vec<DeviceSnapshot>,
    /// The peer servers of the TCP transport (none without one).
    pub peers: Vec<PeerSnapshot>,
    /// The cluster directory, when the servers find each other in etcd.
    pub directory: Option<DirectorySnapshot>,
}

/// What this server's view of the etcd directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorySnapshot {
    /// The etcd endpoints and key prefix.
    pub source: String,
    /// The store revision the view is at (0 before the first listing).
    pub revision: i64,
    /// The other servers registered there.
    pub servers: Vec<String>,
    /// GIDs registered there, this server's included.
    pub gids: usize,
    /// This server's GIDs registered under its lease.
    pub registered: usize,
    /// This server's GIDs another server registered first (IPv6 text): refused here.
    pub refused: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct DeviceSnapshot {
    /// The device's index: the order of its `--socket` on the command line, from 0.
    pub index: usize,
    /// Each QP's number (the `qp_num` the guest's tools print) and figures, in handle order.
    pub qps: Vec<(u32, QpStats)>,
    /// The path each QP's traffic takes, in the order of `qps` (see [`QpPath`]).
    pub paths: Vec<QpPath>,
}

/// Where a QP's work requests go, as the device chooses per destination GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpPath {
    /// UD and GSI: chosen per work request.
    PerDatagram,
    /// An RC QP not yet connected (before RTR).
    NotConnected,
    /// Its peer is on the same device.
    Loopback,
    /// Another device of this process: the memcpy fabric.
    Memcpy,
    /// A GID a peer server announced: the TCP transport.
    Tcp,
    /// The host's RDMA device carries it (the rdma path).
    Rdma,
    /// Nobody holds its peer's GID now.
    Unreachable,
}

impl QpPath {
    pub fn name(self) -> &'static str {
        match self {
            QpPath::PerDatagram => "per-datagram",
            QpPath::NotConnected => "not-connected",
            QpPath::Loopback => "loopback",
            QpPath::Memcpy => "memcpy",
            QpPath::Tcp => "tcp",
            QpPath::Rdma => "rdma",
            QpPath::Unreachable => "unreachable",
        }
    }
}

/// One peer server, as the TCP transport sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The id it announced.
    pub id: u64,
    pub link_up: bool,
    /// GIDs it holds.
    pub gids: usize,
    /// How many of them its host RDMA device holds, as it said (the rdma path).
    pub rdma_gids: usize,
}

impl Snapshot {
    /// The figures of QP `qp` of device `device`.
    pub fn qp(&self, device: usize, qp: u32) -> Option<&QpStats> {
        self.devices
            .iter()
            .find(|d| d.index == device)?
            .qps
            .iter()
            .find(|(qpn, _)| *qpn == qp)
            .map(|(_, stats)| stats)
    }

    /// The human-readable form: one row of counters per QP, then one row per QP and stage
    /// that has samples.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "profiling: {} (stage timing; counters are always kept)",
            if self.profiling { "on" } else { "off" }
        );
        let _ = writeln!(
            out,
            "{:>3} {:>5} {:>10} {:>10} {:>10} {:>7} {:>14} {:>14} {:>8}",
            "dev",
            "qp",
            "doorbells",
            "posted",
            "completed",
            "errors",
            "bytes sent",
            "bytes recv",
            "rnr"
        );
        let mut any = false;
        for d in &self.devices {
            for (qp, s) in &d.qps {
                any = true;
                let _ = writeln!(
                    out,
                    "{:>3} {:>5} {:>10} {:>10} {:>10} {:>7} {:>14} {:>14} {:>8}",
                    d.index,
                    qp,
                    s.doorbells,
                    s.wqes_posted,
                    s.wqes_completed,
                    s.completion_errors,
                    s.bytes_sent,
                    s.bytes_received,
                    s.rnr_stalls
                );
            }
        }
        if !self.peers.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:<16} {:<5} {:>5} {:>10}",
                "peer", "link", "gids", "rdma gids"
            );
            for p in &self.peers {
                let link = if p.link_up { "up" } else { "down" };
                let _ = writeln!(
                    out,
                    "{:016x} {:<5} {:>5} {:>10}",
                    p.id, link, p.gids, p.rdma_gids
                );
            }
        }
        if let Some(d) = &self.directory {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "directory {} at revision {}: {} other servers{}{}",
                d.source,
                d.revision,
                d.servers.len(),
                if d.servers.is_empty() { "" } else { ": " },
                d.servers.join(", ")
            );
            let _ = writeln!(
                out,
                "directory GIDs: {} in all, {} registered by this server{}{}",
                d.gids,
                d.registered,
                if d.refused.is_empty() {
                    String::new()
                } else {
                    format!(", {} refused (held by another server): ", d.refused.len())
                },
                d.refused.join(", ")
            );
        }
        if !any {
            let _ = writeln!(out, "(no QPs)");
            return out;
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{:>3} {:>5} path", "dev", "qp");
        for d in &self.devices {
            for (i, (qp, _)) in d.qps.iter().enumerate() {
                let path = d.paths.get(i).map_or("?", |p| p.name());
                let _ = writeln!(out, "{:>3} {:>5} {path}", d.index, qp);
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>3} {:>5} {:<8} {:<32} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "dev", "qp", "stage", "span", "samples", "mean µs", "p50 µs", "p99 µs", "max µs"
        );
        let mut timed = false;
        for d in &self.devices {
            for (qp, s) in &d.qps {
                for stage in Stage::ALL {
                    let h = s.stage(stage);
                    if h.count == 0 {
                        continue;
                    }
                    timed = true;
                    let _ = writeln!(
                        out,
                        "{:>3} {:>5} {:<8} {:<32} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                        d.index,
                        qp,
                        stage.name(),
                        stage.span(),
                        h.count,
                        h.mean_ns() / 1e3,
                        h.quantile_ns(0.5) as f64 / 1e3,
                        h.quantile_ns(0.99) as f64 / 1e3,
                        h.max_ns as f64 / 1e3
                    );
                }
            }
        }
        if !timed {
            let _ = writeln!(out, "(no stage samples yet)");
        }
        out
    }

    /// The machine-readable form: one JSON object.
    pub fn json(&self) -> String {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let qps: Vec<Value> = d
                    .qps
                    .iter()
                    .enumerate()
                    .map(|(i, (qp, s))| {
                        let mut value = qp_json(*qp, s);
                        if let (Some(path), Value::Object(map)) = (d.paths.get(i), &mut value) {
                            map.insert("path".into(), path.name().into());
                        }
                        value
                    })
                    .collect();
                json!({ "device": d.index, "qps": qps })
            })
            .collect();
        let value = json!({
            "profiling": self.profiling,
            "bucket_unit": "ns",
            "bucket_rule": "bucket i holds [2^i, 2^(i+1)) ns; bucket 0 also holds 0; the last holds everything above",
            "devices": devices,
            "peers": self
                .peers
                .iter()
                .map(|p| json!({
                    "peer": format!("{:016x}", p.id),
                    "link_up": p.link_up,
                    "gids": p.gids,
                    "rdma_gids": p.rdma_gids,
                }))
                .collect::<Vec<_>>(),
            "directory": self.directory.as_ref().map(|d| json!({
                "source": d.source,
                "revision": d.revision,
                "servers": d.servers,
                "gids": d.gids,
                "registered_gids": d.registered,
                "refused_gids": d.refused,
            })),
        });
        serde_json::to_string_pretty(&value).expect("JSON of plain numbers")
    }
}

fn qp_json(qp: u32, s: &QpStats) -> Value {
    let mut stages = Map::new();
    for stage in Stage::ALL {
        stages.insert(
            stage.name().to_string(),
            histogram_json(stage, s.stage(stage)),
        );
    }
    json!({
        "qp": qp,
        "doorbells": s.doorbells,
        "wqes_posted": s.wqes_posted,
        "wqes_completed": s.wqes_completed,
        "completion_errors": s.completion_errors,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "rnr_stalls": s.rnr_stalls,
        "stages": stages,
    })
}

fn histogram_json(stage: Stage, h: &Histogram) -> Value {
    json!({
        "span": stage.span(),
        "count": h.count,
        "sum_ns": h.sum_ns,
        "min_ns": h.min_ns(),
        "max_ns": h.max_ns,
        "mean_ns": (h.mean_ns() * 10.0).round() / 10.0,
        "p50_ns": h.quantile_ns(0.5),
        "p99_ns": h.quantile_ns(0.99),
        "buckets": h.buckets.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = QpStats {
            doorbells: 3,
            wqes_posted: 10,
            wqes_completed: 9,
            completion_errors: 1,
            bytes_sent: 640,
            bytes_received: 64,
            rnr_stalls: 2,
            ..QpStats::default()
        };
        s.stages[Stage::Place as usize].record(1500);
        s.stages[Stage::Place as usize].record(3000);
        Snapshot {
            profiling: true,
            devices: vec![
                DeviceSnapshot {
                    index: 0,
                    qps: vec![(2, s)],
                    paths: vec![QpPath::Tcp],
                },
                DeviceSnapshot {
                    index: 1,
                    qps: vec![],
                    paths: vec![],
                },
            ],
            peers: vec![PeerSnapshot {
                id: 0xabcd,
                link_up: true,
                gids: 2,
                rdma_gids: 1,
            }],
            directory: Some(DirectorySnapshot {
                source: "etcd://10.0.0.9:2379/lab/".into(),
                revision: 42,
                servers: vec!["10.0.0.2:4791".into()],
                gids: 3,
                registered: 1,
                refused: vec!["fe80::9".into()],
            }),
        }
    }

    #[test]
    fn the_table_has_counters_and_stage_rows() {
        let table = sample().table();
        assert!(table.starts_with("profiling: on"), "{table}");
        assert!(table.contains("  0     2          3         10          9       1            640             64        2"), "{table}");
        assert!(table.contains("place"), "{table}");
        assert!(
            !table.contains("pickup"),
            "empty stages are left out:\n{table}"
        );
        assert!(Snapshot::default().table().contains("(no QPs)"));
    }

    #[test]
    fn peers_and_paths_are_shown() {
        let table = sample().table();
        assert!(table.contains("000000000000abcd up        2"), "{table}");
        assert!(table.contains("  0     2 tcp"), "{table}");
        let v: Value = serde_json::from_str(&sample().json()).expect("valid JSON");
        assert_eq!(v["devices"][0]["qps"][0]["path"], "tcp");
        assert_eq!(v["peers"][0]["peer"], "000000000000abcd");
        assert_eq!(v["peers"][0]["link_up"], true);
        assert_eq!(v["peers"][0]["gids"], 2);
        assert_eq!(v["peers"][0]["rdma_gids"], 1);
    }

    #[test]
    fn the_directory_is_shown() {
        let table = sample().table();
        assert!(
            table.contains(
                "directory etcd://10.0.0.9:2379/lab/ at revision 42: 1 other servers: 10.0.0.2:4791"
            ),
            "{table}"
        );
        let v: Value = serde_json::from_str(&sample().json()).expect("valid JSON");
        assert_eq!(v["directory"]["revision"], 42);
        assert_eq!(v["directory"]["servers"][0], "10.0.0.2:4791");
        assert!(
            table.contains(
                "directory GIDs: 3 in all, 1 registered by this server, 1 refused (held by \
                 another server): fe80::9"
            ),
            "{table}"
        );
        assert_eq!(v["directory"]["gids"], 3);
        assert_eq!(v["directory"]["registered_gids"], 1);
        assert_eq!(v["directory"]["refused_gids"][0], "fe80::9");
        let none: Value = serde_json::from_str(&Snapshot::default().json()).expect("JSON");
        assert!(none["directory"].is_null());
    }

    #[test]
    fn the_json_carries_every_counter_and_bucket() {
        let v: Value = serde_json::from_str(&sample().json()).expect("valid JSON");
        assert_eq!(v["profiling"], true);
        let qp = &v["devices"][0]["qps"][0];
        assert_eq!(qp["qp"], 2);
        assert_eq!(qp["rnr_stalls"], 2);
        assert_eq!(qp["completion_errors"], 1);
        let place = &qp["stages"]["place"];
        assert_eq!(place["count"], 2);
        assert_eq!(place["min_ns"], 1500);
        assert_eq!(place["buckets"].as_array().map(Vec::len), Some(32));
        assert_eq!(place["buckets"][10], 1);
        assert_eq!(place["buckets"][11], 1);
        assert_eq!(v["devices"][1]["qps"].as_array().map(Vec::len), Some(0));
    }
}
