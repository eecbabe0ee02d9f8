//! `scripts/bench --transport rdma` on a machine without an RDMA device: the benchmark runs
//! in the lab's host VM, against Soft-RoCE on the VM's loopback interface, with the release
//! builds of the server and the benchmark (docs/rdma-transport.md). A measurement, not a
//! test: `scripts/test` skips it, and `scripts/bench` passes its arguments in
//! `PVRDMA_BENCH_ARGS`.

mod support;

use std::process::Command;
use std::time::Duration;

use guest_tests::lab::{Lab, LabConfig};
use support::{AGENT, LOOP_DEVICE_SETUP, cargo_artifact};

const SERVER_IN_GUEST: &str = "/usr/local/bin/vfio-user-pvrdma";
const BENCH_IN_GUEST: &str = "/usr/local/bin/pvrdma-bench";

#[test]
#[ignore = "a benchmark in a QEMU guest; run by scripts/bench --transport rdma"]
fn the_rdma_bench_in_a_host_vm() {
    let args = std::env::var("PVRDMA_BENCH_ARGS").unwrap_or_default();
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "--profile",
            "bench",
            "-p",
            "vfio-user-pvrdma",
        ])
        .current_dir(workspace)
        .status()
        .expect("cargo build");
    assert!(built.success(), "the server (bench profile) did not build");
    let bench = cargo_artifact(
        &["bench", "-p", "vfio-user-pvrdma", "--bench", "fabric"],
        "fabric",
    )
    .expect("the benchmark");
    let server = bench
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("vfio-user-pvrdma"))
        .expect("the server beside the benchmark");
    let mut config = LabConfig::new("rdma-bench", 1, AGENT);
    config.extra_files = vec![
        (server, SERVER_IN_GUEST.into()),
        (bench, BENCH_IN_GUEST.into()),
    ];
    let mut lab = Lab::start(config).expect("lab");
    let guest = lab.guest(0);
    guest
        .check(LOOP_DEVICE_SETUP)
        .expect("Soft-RoCE on the host VM's loopback interface");
    let versions = guest
        .check("dpkg-query -W -f '${Package} ${Version}\\n' perftest rdma-core; uname -r; nproc")
        .unwrap_or_default();
    eprintln!("host VM: {}", versions.replace('\n', "; "));
    let out = guest
        .run_with_timeout(
            &format!(
                "PVRDMA_SERVER_BIN={SERVER_IN_GUEST} {BENCH_IN_GUEST} --transport rdma --rdma-device rxelo {args}"
            ),
            Duration::from_secs(900),
        )
        .expect("the benchmark ran");
    eprint!("{}", out.stderr);
    print!("{}", out.stdout);
    lab.shut_down().expect("the lab shuts down");
    assert_eq!(out.status, 0, "the benchmark failed");
}
