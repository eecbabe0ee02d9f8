//! The PVRDMA device under the unmodified guest driver: probe, port state, GIDs, reload,
//! guest reboot, and a QEMU crash next to a working device on the same server.

mod support;

use std::time::Duration;

use guest_tests::lab::{Guest, Lab, LabConfig};
use support::{AGENT, Checks, expect_contains};

/// Loads the driver and waits until its IB device is registered.
fn load_driver(guest: &mut Guest) -> Result<String, String> {
    guest
        .check("modprobe vmw_pvrdma && for i in $(seq 100); do [ -e /sys/class/infiniband/vmw_pvrdma0 ] && break; sleep 0.1; done; ls /sys/class/infiniband")
        .map_err(|e| e.to_string())
}

/// The device's checks in one guest; returns nothing, records into `checks`.
fn check_device(checks: &mut Checks, guest: &mut Guest) {
    let name = guest.name().to_string();
    let ip = guest.ip().to_string();
    checks.check(
        &format!("{name}: modprobe vmw_pvrdma registers vmw_pvrdma0"),
        load_driver(guest).and_then(|ls| expect_contains(&ls, "vmw_pvrdma0")),
    );
    checks.check(
        &format!("{name}: vmw_pvrdma is bound to 00:10.1"),
        guest
            .check("basename $(readlink /sys/bus/pci/devices/0000:00:10.1/driver)")
            .map_err(|e| e.to_string())
            .and_then(|d| expect_contains(&d, "vmw_pvrdma")),
    );
    // ib_core adds the IPv4 GID a moment after the address is seen.
    let devinfo = guest
        .check("for i in $(seq 50); do grep -q ffff /sys/class/infiniband/vmw_pvrdma0/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done; ibv_devinfo -v -d vmw_pvrdma0")
        .map_err(|e| e.to_string());
    checks.check(
        &format!("{name}: ibv_devinfo shows PORT_ACTIVE"),
        devinfo
            .clone()
            .and_then(|d| expect_contains(&d, "PORT_ACTIVE")),
    );
    checks.check(
        &format!("{name}: ibv_devinfo shows link layer Ethernet"),
        devinfo
            .clone()
            .and_then(|d| expect_contains(&d, "Ethernet")),
    );
    checks.check(
        &format!("{name}: ibv_devinfo shows vendor part 2080 (0x0820)"),
        devinfo
            .clone()
            .and_then(|d| expect_contains(&d, "vendor_part_id:\t\t\t2080")),
    );
    let mac = guest
        .check("cat /sys/class/net/eth0/address")
        .map(|m| m.trim().to_string())
        .unwrap_or_default();
    let link_local = link_local_gid(&mac);
    checks.check(
        &format!("{name}: GID 0 is the link-local GID of the vmxnet3 MAC {mac}"),
        devinfo
            .clone()
            .and_then(|d| expect_contains(&d, &link_local)),
    );
    let ipv4_gid = ipv4_gid(&ip);
    checks.check(
        &format!("{name}: a GID holds the guest's IPv4 address {ip}"),
        devinfo.and_then(|d| expect_contains(&d, &ipv4_gid)),
    );
    checks.check(
        &format!("{name}: rdma link shows vmw_pvrdma0/1 ACTIVE on eth0"),
        guest
            .check("rdma link show")
            .map_err(|e| e.to_string())
            .and_then(|l| {
                expect_contains(&l, "link vmw_pvrdma0/1 state ACTIVE")
                    .and(expect_contains(&l, "netdev eth0"))
            }),
    );
}

/// `fe80:0000:0000:0000:xxxx:xxff:fexx:xxxx` as ibv_devinfo prints it.
fn link_local_gid(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    if b.len() != 6 {
        return format!("(bad MAC {mac})");
    }
    format!(
        "fe80:0000:0000:0000:{:02x}{:02x}:{:02x}ff:fe{:02x}:{:02x}{:02x}",
        b[0] ^ 2,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

/// `0000:0000:0000:0000:0000:ffff:aabb:ccdd` for an IPv4 address.
fn ipv4_gid(ip: &str) -> String {
    let b: Vec<u8> = ip.split('.').filter_map(|x| x.parse().ok()).collect();
    if b.len() != 4 {
        return format!("(bad IP {ip})");
    }
    format!(
        "0000:0000:0000:0000:0000:ffff:{:02x}{:02x}:{:02x}{:02x}",
        b[0], b[1], b[2], b[3]
    )
}

#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn unmodified_driver_probes_the_device_and_reports_an_active_port() {
    probe_and_survive(LabConfig::new("device", 2, AGENT));
}

/// The same with exit-free doorbells (docs/doorbells.md): the kernel's own CQ arming and
/// receive doorbells (the MAD layer) go through the polled UAR page.
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn unmodified_driver_works_with_exit_free_doorbells() {
    let mut config = LabConfig::new("device-exit-free", 2, AGENT);
    config.server_args = vec!["--doorbells".into(), "exit-free".into()];
    probe_and_survive(config);
}

fn probe_and_survive(mut config: LabConfig) {
    config.allow_reboot = true;
    let mut lab = Lab::start(config).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "two guests booted in {:.1} s",
        lab.boot_time().as_secs_f64()
    );
    let mut checks = Checks::default();
    for index in 0..2 {
        check_device(&mut checks, lab.guest(index));
    }

    let guest = lab.guest(0);
    checks.check(
        "rmmod and modprobe vmw_pvrdma three times",
        (0..3).try_for_each(|_| {
            guest.check("rmmod vmw_pvrdma").map_err(|e| e.to_string())?;
            load_driver(guest).and_then(|ls| expect_contains(&ls, "vmw_pvrdma0"))
        }),
    );
    checks.check(
        "no pvrdma error in dmesg after the reloads",
        guest
            // The out-of-tree module's signature notice is expected; anything else is not.
            .check("dmesg | grep -i pvrdma | grep -v -e 'module verification failed' -e 'taints kernel' | grep -i -E 'fail|error|timeout|unknown' || true")
            .map_err(|e| e.to_string())
            .and_then(|errors| {
                if errors.trim().is_empty() {
                    Ok(())
                } else {
                    Err(errors)
                }
            }),
    );
    checks.check(
        "ibv_devinfo still shows PORT_ACTIVE after the reloads",
        guest
            .check("ibv_devinfo -d vmw_pvrdma0")
            .map_err(|e| e.to_string())
            .and_then(|d| expect_contains(&d, "PORT_ACTIVE")),
    );

    checks.check(
        "guest0 reboots",
        lab.guest(0)
            .reboot(Duration::from_secs(120))
            .map_err(|e| e.to_string()),
    );
    check_device(&mut checks, lab.guest(0));

    // A QEMU that dies frees its device; the other device on the same server keeps working,
    // and the socket serves the next QEMU.
    lab.guest(1).kill();
    std::thread::sleep(Duration::from_millis(500));
    let server_alive = lab.server().is_running();
    checks.check(
        "the server survives a QEMU being killed",
        if server_alive {
            Ok(())
        } else {
            Err(lab.server().log_text())
        },
    );
    checks.check(
        "guest0's device still works after guest1's QEMU died",
        lab.guest(0)
            .check("ibv_devinfo -d vmw_pvrdma0 && rmmod vmw_pvrdma")
            .map_err(|e| e.to_string())
            .and_then(|d| expect_contains(&d, "PORT_ACTIVE"))
            .and_then(|()| {
                load_driver(lab.guest(0)).and_then(|ls| expect_contains(&ls, "vmw_pvrdma0"))
            }),
    );
    checks.check(
        "a new QEMU attaches to the dead QEMU's socket",
        lab.relaunch(1).map_err(|e| e.to_string()),
    );
    check_device(&mut checks, lab.guest(1));

    checks.check(
        "the lab shuts down cleanly",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    checks.finish();
}
