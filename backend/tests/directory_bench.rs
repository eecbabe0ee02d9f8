//! Smoke test of the etcd directory's scale benchmark (`benches/directory.rs`,
//! `scripts/bench-directory`): the benchmark's own code in its quick mode (10 servers × 100
//! GIDs) against a real etcd, checking that every view converges, that a change reaches
//! every view, and that the JSON and the table carry every figure. Nothing about timing is
//! asserted: a debug build on a shared CI machine says nothing about speed. Ignored by a
//! plain `cargo test` (it starts etcd, Debian's etcd-server); scripts/test runs it.

#[path = "../benches/directory/etcd_server.rs"]
mod etcd_server;
#[path = "../benches/directory/metrics.rs"]
mod metrics;
#[path = "../benches/directory/report.rs"]
mod report;
#[path = "../benches/directory/suite.rs"]
mod suite;
#[path = "../benches/directory/warnings.rs"]
mod warnings;

/// Figures every run has, each a finite number greater than zero.
const POSITIVE: &[&str] = &[
    "raw_put_s",
    "raw_puts_per_s",
    "registered_s_p50",
    "registered_s_max",
    "converged_s_p50",
    "converged_s_max",
    "ratio_registered_to_raw_put",
    "add_gid_ms_p50",
    "add_gid_ms_max",
    "leave_revoke_ms",
    "leave_gone_ms",
    "listing_bytes",
    "listing_ms",
    "client_cpu_s",
    "client_threads",
    "client_peak_rss_bytes",
    "etcd_peak_rss_bytes",
    "etcd_cpu_s",
    "etcd_requests",
    "etcd_requests_per_s",
    "etcd_txns",
    "etcd_proposals_committed",
    "etcd_watch_events",
    "etcd_grpc_received_bytes",
    "etcd_grpc_sent_bytes",
    "etcd_db_size_bytes_after",
    "etcd_rss_bytes_after",
    "etcd_raw_puts",
    "etcd_raw_cpu_s",
];

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn a_quick_directory_benchmark_converges_and_reports_every_figure() {
    let config = suite::Config::new(true);
    let (n, m) = (config.servers, config.gids);
    let results = suite::run(&config).unwrap_or_else(|e| panic!("the benchmark failed: {e}"));

    let line = results.json();
    assert!(!line.contains('\n'), "one JSON object on one line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("the JSON output parses");
    for key in POSITIVE {
        let value = &json[*key];
        assert!(
            value.as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
            "{key} is not a positive number: {value}"
        );
    }
    assert_eq!(json["servers"], n);
    assert_eq!(json["gids_per_server"], m);
    assert_eq!(
        json["converged"], true,
        "every view whole after convergence"
    );
    assert_eq!(json["directory_leases_lost"], 0);
    // What etcd holds when every view converged: each server's record and GIDs.
    assert_eq!(json["etcd_keys_after"], (n + n * m) as f64);
    // Claims go 64 GIDs to a transaction when none is held: at least one per 64 GIDs of
    // each server (more if a batch was refused or a claim made again).
    let batches = n * m.div_ceil(64);
    assert!(json["etcd_txns"].as_f64().unwrap() >= batches as f64);
    assert_eq!(json["listing_keys"], n + n * m);
    // The baseline's own keys were deleted before the directory started.
    assert_eq!(json["etcd_keys_before"], 0.0);

    let table = results.table();
    for row in [
        "Convergence, from the first server's start",
        "its view holds 1 000 GIDs and 9 other servers",
        "baseline: 1 000 plain puts from 10 threads",
        "one server adds one GID",
        "one server leaves",
        "a listing of the prefix (1 010 keys)",
        "etcd's load",
        "requests/s",
        "CPU, every thread (getrusage)",
        "threads at convergence",
    ] {
        assert!(
            table.contains(row),
            "the table has no {row:?} row:\n{table}"
        );
    }
}

#[test]
fn gids_are_ipv4_mapped_and_distinct() {
    assert_eq!(
        std::net::Ipv6Addr::from(suite::gid(0)).to_string(),
        "::ffff:10.0.0.1"
    );
    assert_eq!(
        std::net::Ipv6Addr::from(suite::gid(100 * 1000 - 1)).to_string(),
        "::ffff:10.1.134.160"
    );
    let all: std::collections::HashSet<_> = (0..100_000).map(suite::gid).collect();
    assert_eq!(all.len(), 100_000);
}
