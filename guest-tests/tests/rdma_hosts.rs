//! Two lab VMs as two hosts of the rdma path, joined by the lab's Ethernet segment, each
//! with Soft-RoCE on its Ethernet and a server of its own; the servers meet over their TCP
//! transport (with a cluster key: they are not on loopback). In each VM the project's
//! host-side test driver plays one guest (`device/tests/cross_host.rs`, one process per
//! host, meeting over a control connection): RC SEND with immediate, WRITE, READ and
//! fetch-and-add and a UD datagram cross between the hosts through their RDMA devices, and
//! `stats` on each server shows the rdma path (docs/rdma-transport.md).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use guest_tests::lab::{Lab, LabConfig, server_binary};
use support::{AGENT, Checks, cargo_artifact, expect_contains};

const SERVER_IN_GUEST: &str = "/usr/local/bin/vfio-user-pvrdma";
const SIDE_IN_GUEST: &str = "/usr/local/bin/pvrdma-cross-host";
/// The servers' TCP transport port and the sides' control port, on the lab segment.
const TRANSPORT_PORT: u16 = 7471;
const CONTROL_PORT: u16 = 7472;

#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_host_vms_carry_rc_verbs_between_their_rdma_devices() {
    let mut config = LabConfig::new("rdma-hosts", 2, AGENT);
    let server = server_binary().expect("the server binary (cargo build -p vfio-user-pvrdma)");
    let side: PathBuf = cargo_artifact(
        &["test", "-p", "vfio-user-pvrdma", "--test", "cross_host"],
        "cross_host",
    )
    .expect("the host-side driver's cross-host side");
    // The debug binaries ride in the initramfs (about 200 MiB with TLS in the etcd client),
    // which the kernel holds while it unpacks them into RAM: 1 GiB left the last file out.
    config.memory_mib = 2048;
    config.extra_files = vec![
        (server, SERVER_IN_GUEST.into()),
        (side, SIDE_IN_GUEST.into()),
    ];
    let mut lab = Lab::start(config).expect("lab");
    let mut checks = Checks::default();
    let ips: Vec<String> = lab.guests().iter().map(|g| g.ip().to_string()).collect();

    // Soft-RoCE on each VM's Ethernet, with a second address for the guest it serves, and
    // the cluster key both servers share.
    for (i, guest) in lab.guests().iter_mut().enumerate() {
        let guest_ip = format!("10.99.0.{}", 11 + i);
        let ready = guest
            .check(&format!(
                "modprobe rdma_rxe && ip addr add {guest_ip}/24 dev eth0 && \
                 rdma link add rxe0 type rxe netdev eth0 && \
                 printf 'lab cluster key for rdma hosts!!' > /tmp/cluster.key && \
                 for i in $(seq 100); do grep -q {hex} /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done; \
                 grep -l {hex} /sys/class/infiniband/rxe0/ports/1/gids/*",
                hex = gid_hex_tail(11 + i as u8),
            ))
            .map_err(|e| e.to_string());
        checks.check(
            &format!("host VM {i}: rxe0 on eth0 holds its guest's address {guest_ip}"),
            ready.and_then(|out| expect_contains(&out, "/gids/")),
        );
    }

    let command = |role: &str, i: usize| {
        let transport = if role == "a" {
            format!("--listen {}:{TRANSPORT_PORT}", ips[0])
        } else {
            format!("--peer {}:{TRANSPORT_PORT}", ips[0])
        };
        format!(
            "PVRDMA_SERVER_BIN={SERVER_IN_GUEST} PVRDMA_CROSS_ROLE={role} \
             PVRDMA_CROSS_CONTROL={}:{CONTROL_PORT} PVRDMA_CROSS_GUEST=10.99.0.{} \
             PVRDMA_CROSS_DEVICE=rxe0 \
             PVRDMA_CROSS_SERVER_ARGS='{transport} --cluster-key /tmp/cluster.key' \
             {SIDE_IN_GUEST} --exact one_side_of_a_guest_pair_on_two_hosts --nocapture 2>&1 \
             | grep -v DEBUG | tail -n 40",
            ips[0],
            11 + i
        )
    };
    let (cmd_a, cmd_b) = (command("a", 0), command("b", 1));
    let [guest_a, guest_b] = lab.guests() else {
        panic!("two guests");
    };
    // Both sides at once: each waits for the other.
    let (out_a, out_b) = std::thread::scope(|s| {
        let b = s.spawn(|| guest_b.run_with_timeout(&cmd_b, Duration::from_secs(600)));
        let a = guest_a.run_with_timeout(&cmd_a, Duration::from_secs(600));
        (a, b.join().expect("side B's thread"))
    });
    for (role, out) in [("A", out_a), ("B", out_b)] {
        checks.check(
            &format!("side {role}: every RC verb and a datagram crossed the hosts through rxe0"),
            out.map_err(|e| e.to_string()).and_then(|out| {
                eprintln!("side {role}:\n{}", out.stdout);
                expect_contains(&out.stdout, "CROSS-HOST OK role")
                    .and(expect_contains(&out.stdout, "test result: ok. 1 passed"))
            }),
        );
    }

    checks.check(
        "the lab shuts down cleanly",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    checks.finish();
}

/// The end of the sysfs form of the IPv4 GID 10.99.0.`last` (`…:0a63:00xx`).
fn gid_hex_tail(last: u8) -> String {
    format!("0a63:00{last:02x}")
}
