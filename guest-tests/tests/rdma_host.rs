//! A guest as a *host* of the rdma path (docs/rdma-transport.md): this machine has no RDMA
//! device and cannot load kernel modules, but the pinned guest kernel has Soft-RoCE. The
//! server binary is put into the guest and run there against the guest's own rxe device,
//! through the same libibverbs the rdma path loads at run time; and the project's
//! host-side test driver runs there too, as the rdma path's conformance runs will.

mod support;

use std::path::PathBuf;

use guest_tests::lab::{Lab, LabConfig, server_binary};
use support::{AGENT, Checks, LOOP_DEVICE_SETUP, cargo_artifact, expect_contains};

/// Where the server binary lands in the guest.
const SERVER_IN_GUEST: &str = "/usr/local/bin/vfio-user-pvrdma";
/// Where the host-side driver's TCP suite lands in the guest.
const DRIVER_IN_GUEST: &str = "/usr/local/bin/pvrdma-driver-tcp-transport";
/// Where the host-side driver's rdma path suite lands in the guest.
const RDMA_SUITE_IN_GUEST: &str = "/usr/local/bin/pvrdma-driver-rdma-path";

/// The executable of the device crate's integration test `test` (the host-side test driver
/// with one suite), built if it is not.
fn driver_suite(test: &str) -> Result<PathBuf, String> {
    cargo_artifact(&["test", "-p", "vfio-user-pvrdma", "--test", test], test)
}

/// Soft-RoCE on the guest's Ethernet; `vfio-user-pvrdma rdma-devices` lists it with its port
/// up and the RoCE v2 GID of the guest's address, as `ibv_devinfo` does, and `--loopback`
/// carries a SEND between two of its RC QPs through the server's own calls.
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn a_guest_hosts_soft_roce_the_server_and_the_test_driver() {
    let mut config = LabConfig::new("rdma-host", 1, AGENT);
    let server = server_binary().expect("the server binary (cargo build -p vfio-user-pvrdma)");
    let driver = driver_suite("tcp_transport").expect("the host-side driver's TCP suite");
    let rdma_suite = driver_suite("rdma_path").expect("the host-side driver's rdma path suite");
    // The debug binaries ride in the initramfs (about 200 MiB with TLS in the etcd client),
    // which the kernel holds while it unpacks them into RAM: 1 GiB left the last file out.
    config.memory_mib = 2048;
    config.extra_files = vec![
        (server, SERVER_IN_GUEST.into()),
        (driver, DRIVER_IN_GUEST.into()),
        (rdma_suite, RDMA_SUITE_IN_GUEST.into()),
    ];
    let mut lab = Lab::start(config).expect("lab");
    let mut checks = Checks::default();
    let guest = lab.guest(0);
    let ip = guest.ip().to_string();

    checks.check(
        "without an RDMA device the server says how to get one",
        guest
            .run(&format!("{SERVER_IN_GUEST} rdma-devices 2>&1"))
            .map_err(|e| e.to_string())
            .and_then(|out| {
                if out.status == 0 {
                    return Err(format!(
                        "listed devices before any was made:\n{}",
                        out.stdout
                    ));
                }
                expect_contains(&out.stdout, "rdma link add rxe0")
            }),
    );

    let added = guest
        .check(
            "modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0 && \
             for i in $(seq 100); do grep -q ffff /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done; \
             rdma link show",
        )
        .map_err(|e| e.to_string());
    checks.check(
        "rdma link add rxe0 on eth0",
        added.and_then(|out| expect_contains(&out, "rxe0/1")),
    );

    let listed = guest
        .check(&format!("{SERVER_IN_GUEST} rdma-devices"))
        .map_err(|e| e.to_string());
    let devinfo = guest
        .check("ibv_devinfo -d rxe0")
        .map_err(|e| e.to_string());
    checks.check(
        "rdma-devices lists rxe0 with its port active on Ethernet",
        listed
            .clone()
            .and_then(|out| expect_contains(&out, "rxe0: node GUID"))
            .and(
                listed
                    .clone()
                    .and_then(|out| expect_contains(&out, "port 1: active, Ethernet")),
            ),
    );
    checks.check(
        "rdma-devices shows the guest's address as a RoCE v2 GID",
        listed.clone().and_then(|out| {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("::ffff:{ip}")) && l.contains("RoCE v2"))
                .map(str::to_string);
            line.map(drop)
                .ok_or_else(|| format!("no RoCE v2 GID ::ffff:{ip} in:\n{out}"))
        }),
    );
    checks.check(
        "rdma-devices and ibv_devinfo agree on rxe0's node GUID",
        listed.and_then(|out| {
            let ours = out
                .lines()
                .find_map(|l| l.strip_prefix("rxe0: node GUID "))
                .map(str::trim)
                .ok_or_else(|| format!("no rxe0 line in:\n{out}"))?
                .to_string();
            let theirs = devinfo?;
            expect_contains(&theirs, &format!("node_guid:\t\t\t{ours}"))
                .or_else(|_| expect_contains(&theirs, &ours))
        }),
    );

    // The data path's calls and structures (post, poll, QP attributes) against the real
    // library and provider: one SEND between two RC QPs of rxe0, received into guest-like
    // memory (scattered pages of a memfd, one view, registered at an I/O virtual address).
    checks.check(
        "rdma-devices --loopback sends a message between two RC QPs of rxe0 into scattered shared pages",
        guest
            .check(&format!("{SERVER_IN_GUEST} rdma-devices --loopback"))
            .map_err(|e| e.to_string())
            .and_then(|out| {
                eprintln!("{out}");
                expect_contains(
                    &out,
                    "loopback: rxe0 port 1: a 8192-byte SEND between two RC QPs, into two \
                     scattered pages of shared memory registered at an I/O virtual address, \
                     completed",
                )
                .and(expect_contains(
                    &out,
                    "its completions found through a completion channel",
                ))
            }),
    );

    // Two servers in one VM reach each other's guests only through the loopback interface
    // (their addresses are both local), so Soft-RoCE goes there too, with an address for
    // each server's guest: the rdma path's data tests run through it.
    let looped = guest.check(LOOP_DEVICE_SETUP).map_err(|e| e.to_string());
    checks.check(
        "Soft-RoCE on the loopback interface holds both guests' addresses",
        looped.and_then(|out| expect_contains(&out, "/gids/")),
    );

    // The server with the host RDMA device, sandboxed, driven by the host-side driver
    // inside the host VM: it opens the device before the sandbox and says which guest GIDs
    // the device holds; and two servers carry every RC verb through it.
    let suite = |filter: &str| {
        format!(
            "PVRDMA_RDMA_DEVICE=rxe0 PVRDMA_RDMA_LOOP_DEVICE=rxelo PVRDMA_SERVER_BIN={SERVER_IN_GUEST} \
             {RDMA_SUITE_IN_GUEST} --test-threads=1 {filter} 2>&1 | grep -v DEBUG | tail -n 60"
        )
    };
    let passed = |expected: &'static str| {
        move |out: guest_tests::lab::Output| {
            eprintln!("{}", out.stdout);
            expect_contains(&out.stdout, expected).and(if out.stdout.contains("NOT RUN") {
                Err(format!("a test did not run:\n{}", out.stdout))
            } else {
                Ok(())
            })
        }
    };
    checks.check(
        "the host-side driver's rdma path suite passes against rxe0 and rxelo",
        guest
            .run_with_timeout(
                &suite("--skip a_port_that_goes_down"),
                std::time::Duration::from_secs(300),
            )
            .map_err(|e| e.to_string())
            .and_then(passed("test result: ok. 13 passed")),
    );
    // Alone: it takes the loopback interface down for a moment.
    checks.check(
        "a port that goes down fails the QPs it carries, and the servers go on",
        guest
            .run_with_timeout(
                &suite("--exact a_port_that_goes_down_fails_the_qps_it_carries"),
                std::time::Duration::from_secs(120),
            )
            .map_err(|e| e.to_string())
            .and_then(passed("test result: ok. 1 passed")),
    );

    // The project's host-side test driver inside the host VM: its TCP suite starts two
    // servers there (loopback) and runs every verb across them, as the rdma path's
    // conformance runs will against rxe. Slow under TCG, hence one thread and a long wait.
    checks.check(
        "the host-side driver's TCP suite passes inside the host VM",
        guest
            .run_with_timeout(
                &format!(
                    "PVRDMA_SERVER_BIN={SERVER_IN_GUEST} {DRIVER_IN_GUEST} --test-threads=1 2>&1 | tail -n 30"
                ),
                std::time::Duration::from_secs(600),
            )
            .map_err(|e| e.to_string())
            .and_then(|out| {
                eprintln!("{}", out.stdout);
                expect_contains(&out.stdout, "test result: ok. 8 passed")
            }),
    );

    checks.check(
        "the lab shuts down cleanly",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    checks.finish();
}
