//! A guest as a *host* of the rdma path (docs/rdma-transport.md): this machine has no RDMA
//! device and cannot load kernel modules, but the pinned guest kernel has Soft-RoCE. The
//! server binary is put into the guest and run there against the guest's own rxe device,
//! through the same libibverbs the rdma path loads at run time.

mod support;

use guest_tests::lab::{Lab, LabConfig, server_binary};
use support::{AGENT, Checks, expect_contains};

/// Where the server binary lands in the guest.
const SERVER_IN_GUEST: &str = "/usr/local/bin/vfio-user-pvrdma";

/// Soft-RoCE on the guest's Ethernet; `vfio-user-pvrdma rdma-devices` lists it with its port
/// up and the RoCE v2 GID of the guest's address, as `ibv_devinfo` does, and `--loopback`
/// carries a SEND between two of its RC QPs through the server's own calls.
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn the_server_finds_soft_roce_in_a_host_vm() {
    let mut config = LabConfig::new("rdma-host", 1, AGENT);
    let server = server_binary().expect("the server binary (cargo build -p vfio-user-pvrdma)");
    config.extra_files = vec![(server, SERVER_IN_GUEST.into())];
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

    checks.check(
        "the lab shuts down cleanly",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    checks.finish();
}
