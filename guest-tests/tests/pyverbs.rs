//! rdma-core's own test suite (pyverbs) inside a guest, against the PVRDMA device: the
//! driver-level suite RDMA vendors run on their devices.

mod support;

use std::time::Duration;

use guest_tests::lab::{Lab, LabConfig};
use support::AGENT;

/// The generic modules; the vendor modules (mlx5, efa, ...) are for other devices.
const MODULES: &[&str] = &[
    "test_addr",
    "test_atomic",
    "test_cq",
    "test_cq_events",
    "test_cqex",
    "test_device",
    "test_flow",
    "test_fork",
    "test_mr",
    "test_odp",
    "test_parent_domain",
    "test_pd",
    "test_qp",
    "test_qpex",
    "test_rdmacm",
    "test_relaxed_ordering",
    "test_rss_traffic",
    "test_shared_pd",
    "test_srq",
    "test_tag_matching",
];

/// Failures no device can fix: the guest software answers these tests without asking the
/// device (docs/pyverbs.md has the evidence). The test fails if this set changes, in either
/// direction, so a new failure or a newly passing test is noticed.
const EXPLAINED_FAILURES: &[(&str, &str)] = &[
    (
        "test_create_raw_qp_ex_with_illegal_caps_max_recv_wr",
        "rdma-core's provider rounds max_recv_wr 0xffffffff up to a power of two in 32 bits, which wraps to 1: the device sees a legal 1-entry queue",
    ),
    (
        "test_create_raw_qp_ex_with_illegal_caps_max_send_wr",
        "same wrap for max_send_wr",
    ),
    (
        "test_query_rc_qp",
        "the vmw_pvrdma kernel driver answers QUERY_QP in RESET itself and leaves cap.max_recv_wr 0",
    ),
    ("test_query_ud_qp", "same kernel behaviour for a UD QP"),
];

/// A module that runs longer has hung; `timeout -s INT` makes unittest print what it has.
const MODULE_LIMIT: Duration = Duration::from_secs(240);

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ok: u32,
    skipped: u32,
    failed: u32,
    errors: u32,
}

/// Counts unittest's per-test verdict lines (`... ok`, `... skipped '...'`, `... FAIL`,
/// `... ERROR`).
fn count(output: &str) -> Counts {
    let mut counts = Counts::default();
    for line in output.lines() {
        let line = line.trim_end();
        if line.ends_with("... ok") {
            counts.ok += 1;
        } else if line.contains("... skipped") {
            counts.skipped += 1;
        } else if line.ends_with("... FAIL") {
            counts.failed += 1;
        } else if line.ends_with("... ERROR") {
            counts.errors += 1;
        }
    }
    counts
}

#[test]
#[ignore = "boots a QEMU guest and runs rdma-core's pyverbs suite; run by scripts/test"]
fn rdma_core_pyverbs_suite_against_the_device() {
    run_suite(LabConfig::new("pyverbs", 1, AGENT));
}

/// The same suite with exit-free doorbells (docs/doorbells.md).
#[test]
#[ignore = "boots a QEMU guest and runs rdma-core's pyverbs suite; run by scripts/test"]
fn rdma_core_pyverbs_suite_with_exit_free_doorbells() {
    let mut config = LabConfig::new("pyverbs-exit-free", 1, AGENT);
    config.server_args = vec!["--doorbells".into(), "exit-free".into()];
    run_suite(config);
}

fn run_suite(config: LabConfig) {
    let mut lab = Lab::start(config).unwrap_or_else(|e| panic!("{e}"));
    let guest = lab.guest(0);
    let gid = guest
        .check(
            "modprobe vmw_pvrdma && for i in $(seq 100); do for f in /sys/class/infiniband/vmw_pvrdma0/ports/1/gids/*; do \
             case \"$(cat $f 2>/dev/null)\" in *ffff:*) basename $f; exit 0;; esac; done; sleep 0.1; done; exit 1",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let gid = gid.trim();
    let mut total = Counts::default();
    let mut report = Vec::new();
    let mut failed_tests: Vec<String> = Vec::new();
    // PYVERBS_MODULES=test_qp,test_srq runs a subset (for developers).
    let only = std::env::var("PYVERBS_MODULES").ok();
    let selected: Vec<&str> = MODULES
        .iter()
        .copied()
        .filter(|m| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *m))
        })
        .collect();
    for module in selected {
        let command = format!(
            "cd /usr/share/doc/rdma-core/tests && timeout -s INT {limit} python3 run_tests.py --dev vmw_pvrdma0 --port 1 --gid {gid} -v tests.{module} 2>&1",
            limit = MODULE_LIMIT.as_secs()
        );
        let output = guest
            .run_with_timeout(&command, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{module}: {e}"));
        let counts = count(&output.stdout);
        let hung = output.status == 124 || output.stdout.contains("KeyboardInterrupt");
        let crashed = hung || (output.status != 0 && counts.failed + counts.errors == 0);
        eprintln!(
            "{module:24} ok {:3} skipped {:3} failed {:3} errors {:3}{}",
            counts.ok,
            counts.skipped,
            counts.failed,
            counts.errors,
            if crashed {
                format!("  CRASHED (exit {})", output.status)
            } else {
                String::new()
            }
        );
        for line in output.stdout.lines().filter(|l| {
            l.ends_with("... FAIL") || l.ends_with("... ERROR") || l.contains("... skipped")
        }) {
            eprintln!("    {line}");
        }
        for line in output.stdout.lines() {
            if let Some(name) = line
                .strip_prefix("FAIL: ")
                .or_else(|| line.strip_prefix("ERROR: "))
            {
                failed_tests.push(name.split_whitespace().next().unwrap_or(name).to_string());
            }
        }
        if crashed {
            report.push(format!("== {module} crashed or hung\n{}", output.stdout));
        }
        total.ok += counts.ok;
        total.skipped += counts.skipped;
        total.failed += counts.failed;
        total.errors += counts.errors;
    }
    eprintln!(
        "pyverbs: {} ok, {} skipped, {} failed, {} errors",
        total.ok, total.skipped, total.failed, total.errors
    );
    lab.shut_down().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.is_empty(),
        "pyverbs modules crashed or hung:\n{}",
        report.join("\n")
    );
    if only.is_none() {
        let mut expected: Vec<String> = EXPLAINED_FAILURES
            .iter()
            .map(|(name, _)| name.to_string())
            .collect();
        expected.sort();
        failed_tests.sort();
        assert_eq!(
            failed_tests, expected,
            "pyverbs failures differ from the explained ones (docs/pyverbs.md)"
        );
    }
}
