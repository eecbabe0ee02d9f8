//! Smoke test of the memcpy-fabric benchmark (`benches/fabric.rs`, `scripts/bench`): one
//! very short run of the benchmark's own code against the real server process, checking
//! that it completes and that the JSON and the table carry every figure. Nothing about
//! timing is asserted: the figures of a debug build on a shared CI machine mean nothing.

mod driver;

#[path = "../benches/fabric/baseline.rs"]
mod baseline;
#[path = "../benches/fabric/guests.rs"]
mod guests;
#[path = "../benches/fabric/rdma.rs"]
#[allow(dead_code)] // Only its refusal runs here; rdma_path.rs runs the rest.
mod rdma;
#[path = "../benches/fabric/report.rs"]
mod report;
#[path = "../benches/fabric/suite.rs"]
mod suite;
#[path = "../benches/fabric/tcp.rs"]
mod tcp;

use std::time::Duration;

/// The keys issue 5 requires (numbers), and the extra figures the benchmark adds.
const NUMBERS: &[&str] = &[
    "rc_send_64_rtt_us_p50",
    "rc_send_64_rtt_us_p99",
    "raw_cacheline_rtt_us_p50",
    "raw_unix_rtt_us_p50",
    "write_64k_gbytes_per_s",
    "raw_memcpy_64k_gbytes_per_s",
    "qp_create_to_rts_us",
    "mr_register_1gib_ms",
    "idle_cpu_percent",
    "rc_send_64_rtt_us_p999",
    "write_4k_gbytes_per_s",
    "write_1m_gbytes_per_s",
    "write_64k_contiguous_gbytes_per_s",
    "ratio_write_64k_contiguous_to_memcpy",
    "raw_memcpy_4k_gbytes_per_s",
    "raw_memcpy_1m_gbytes_per_s",
    "msg_rate_64_mpps",
    "msg_rate_64_profiler_on_mpps",
    "msg_rate_64_profiler_off_mpps",
    "profiler_cost_percent",
    "command_us_p50",
    "mr_reregister_1gib_ms",
    "ratio_rc_send_64_rtt_to_raw_unix",
    "ratio_write_64k_to_memcpy",
    "targets_met_count",
];

const TARGETS: &[&str] = &[
    "rc_send_64_rtt",
    "write_64k",
    "qp_create_to_rts",
    "mr_register_1gib",
    "idle_cpu",
];

#[test]
fn a_short_benchmark_run_reports_every_figure() {
    // Far shorter than --quick, and a 16 MiB MR instead of 1 GiB (the JSON says so in
    // mr_register_bytes): only the code paths matter here.
    let config = suite::Config {
        warmup: 20,
        round_trips: 300,
        cacheline_round_trips: 2_000,
        memcpy_runs: 1,
        memcpy_run: Duration::from_millis(5),
        write_time: Duration::from_millis(25),
        rate_time: Duration::from_millis(25),
        qps: 10,
        big_mr: 16 << 20,
        idle_time: Duration::from_millis(100),
        ..suite::Config::new(true)
    };
    let runs = suite::run(&config);
    let modes: Vec<&str> = runs.iter().map(|r| r.mode.name()).collect();
    assert_eq!(
        modes,
        ["trapped", "exit-free"],
        "both doorbell modes, trapped first"
    );

    for results in &runs {
        let mode = results.mode.name();
        let line = results.json();
        assert!(!line.contains('\n'), "{mode}: one JSON object per line");
        let json: serde_json::Value = serde_json::from_str(&line).expect("the JSON output parses");
        let mut numbers = NUMBERS.to_vec();
        if mode == "trapped" {
            numbers.push("trapped_doorbell_rtt_us_p50");
        } else {
            assert!(
                json.get("trapped_doorbell_rtt_us_p50").is_none(),
                "exit-free has no trapped doorbell figure"
            );
        }
        for key in numbers {
            let value = &json[key];
            assert!(
                value.as_f64().is_some_and(f64::is_finite),
                "{mode}: {key} is not a finite number: {value}"
            );
        }
        assert_eq!(json["doorbell_mode"], mode);
        assert_eq!(json["mr_register_bytes"], 16 << 20);
        assert_eq!(json["rc_send_64_rtt_samples"], 300);
        for key in TARGETS {
            assert!(
                json["targets_met"][*key].is_boolean(),
                "{mode}: targets_met.{key}"
            );
        }
        let bound = if mode == "trapped" {
            "ratio_rc_send_64_rtt_to_raw_unix_max"
        } else {
            "ratio_rc_send_64_rtt_to_raw_cacheline_max"
        };
        assert_eq!(
            json["targets"][bound], 2.0,
            "{mode}: the RC target's baseline"
        );

        let table = results.table();
        assert!(
            table.contains(&format!("doorbell mode: {mode}")),
            "the table names its mode:\n{table}"
        );
        for row in [
            "RC SEND 64 B round trip p50",
            "RDMA WRITE 64 KiB",
            "64 B SEND rate",
            "64 B SEND rate profiler on / off",
            "RC QP create → RTS",
            "16 MiB MR registration",
            "Server CPU while idle",
            "cache-line ping-pong",
            "Targets met:",
        ] {
            assert!(
                table.contains(row),
                "the {mode} table has no {row:?} row:\n{table}"
            );
        }
    }
}

#[test]
fn a_short_tcp_benchmark_run_reports_every_figure() {
    let config = suite::Config {
        warmup: 20,
        round_trips: 200,
        write_time: Duration::from_millis(25),
        big_mr: 16 << 20,
        ..suite::Config::new(true)
    };
    let runs = tcp::run(&config);
    assert_eq!(
        runs.iter().map(|r| r.mode.name()).collect::<Vec<_>>(),
        ["trapped", "exit-free"]
    );
    for results in &runs {
        let json: serde_json::Value =
            serde_json::from_str(&results.json()).expect("the JSON output parses");
        for key in [
            "tcp_rc_send_64_rtt_us_p50",
            "raw_tcp_rtt_us_p50",
            "tcp_write_64k_gbytes_per_s",
            "raw_tcp_stream_gbytes_per_s",
            "ratio_tcp_rc_send_to_raw_tcp",
            "ratio_tcp_write_64k_to_raw_stream",
        ] {
            let value = &json[key];
            assert!(
                value.as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
                "{key} is not a positive number: {value}"
            );
        }
        assert_eq!(json["transport"], "tcp");
        let table = results.table();
        assert!(table.contains("RC SEND 64 B round trip p50"), "{table}");
        assert!(table.contains("one TCP stream"), "{table}");
    }
}

/// `--transport rdma` on a host without the device it names says what is missing instead
/// of measuring anything (the figures come from `guest-tests/tests/rdma_bench.rs`, which
/// runs it in the lab's host VM, and `rdma_path.rs` smoke-tests it there).
#[test]
fn the_rdma_bench_names_the_missing_device() {
    let config = suite::Config {
        round_trips: 10,
        ..suite::Config::new(true)
    };
    let error = match rdma::run(&config, "no-such-rdma-device") {
        Ok(_) => panic!("measured without a device"),
        Err(e) => e,
    };
    assert!(
        error.contains("/sys/class/infiniband/no-such-rdma-device/ports/1/gids"),
        "{error}"
    );
}
