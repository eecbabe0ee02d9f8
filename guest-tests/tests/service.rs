//! The Debian package run as a host runs it. The package (scripts/package) is installed into
//! a Debian root whose systemd boots as PID 1 of a container (guest-tests/image/boot-systemd);
//! the package's files are checked there (manual page, completions, descriptor, units that
//! systemd-analyze accepts). A guest's QEMU connecting to the socket unit's socket starts
//! the server (socket activation), as a dynamic user without capabilities, and the
//! unmodified driver probes it; `device add` through the control socket brings a second
//! guest into the running fabric, and the two guests pingpong while the first notices
//! nothing.

mod support;

use std::time::Duration;

use guest_tests::lab::{Lab, LabConfig};
use support::host::{Container, device, in_root, root_with_package, server_pid, wait_for};
use support::{AGENT, Checks, expect_contains, pair, prepare};

#[test]
#[ignore = "builds the Debian package and boots systemd and QEMU guests; run by scripts/test"]
fn the_package_runs_under_systemd_and_a_device_added_at_run_time_joins_the_fabric() {
    // Installed as a host installs it.
    let work = std::env::temp_dir().join(format!("pvrdma-service-{}", std::process::id()));
    let root = root_with_package(&work);
    let mut checks = Checks::default();
    checks.check(
        "the manual page renders",
        in_root(&root, "man -P cat vfio-user-pvrdma").and_then(|page| {
            expect_contains(&page, "--socket-path")
                .and(expect_contains(&page, "device add"))
                .and(expect_contains(&page, "vfio-user-pvrdma.socket"))
        }),
    );
    checks.check(
        "bash completion loads",
        in_root(
            &root,
            "bash -c '. /usr/share/bash-completion/completions/vfio-user-pvrdma && complete -p vfio-user-pvrdma'",
        )
        .and_then(|out| expect_contains(&out, "vfio-user-pvrdma")),
    );
    checks.check(
        "the backend descriptor names the installed binary",
        std::fs::read_to_string(root.join("usr/share/vfio-user/50-vfio-user-pvrdma.json"))
            .map_err(|e| e.to_string())
            .and_then(|json| {
                expect_contains(&json, "\"binary\": \"/usr/bin/vfio-user-pvrdma\"")
                    .and(expect_contains(&json, "\"type\": \"pvrdma\""))
            })
            .and_then(|()| in_root(&root, "test -x /usr/bin/vfio-user-pvrdma").map(drop)),
    );
    checks.check(
        "systemd-analyze accepts the units",
        in_root(
            &root,
            "systemd-analyze verify /usr/lib/systemd/system/vfio-user-pvrdma.socket /usr/lib/systemd/system/vfio-user-pvrdma.service 2>&1",
        )
        .and_then(|out| {
            if out.trim().is_empty() {
                Ok(())
            } else {
                Err(format!("warnings: {out}"))
            }
        }),
    );
    let security = in_root(
        &root,
        "systemd-analyze security --offline=yes vfio-user-pvrdma.service 2>&1 | tail -1",
    );
    eprintln!("systemd-analyze security: {security:?}");
    checks.check(
        "the service's exposure is at most 2.0 (systemd-analyze security)",
        security.and_then(|line| {
            let level: f64 = line
                .split("level for vfio-user-pvrdma.service: ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or(format!("no exposure level in {line:?}"))?;
            if level <= 2.0 {
                Ok(())
            } else {
                Err(format!("exposure {level}"))
            }
        }),
    );

    // systemd boots; its socket unit listens, and no server runs before a client comes.
    let run = work.join("run");
    let container = Container::boot(&root, &run, &work.join("console.log"));
    let socket0 = run.join("vfio-user-pvrdma/pvrdma0.sock");
    let listening = wait_for("the socket unit's socket", Duration::from_secs(60), || {
        socket0.exists()
    });
    assert!(
        listening.is_ok(),
        "{listening:?}; the container's console:\n{}",
        container.console()
    );
    checks.check(
        "no server before the first client (socket activation)",
        match server_pid() {
            None => Ok(()),
            Some(pid) => Err(format!("pid {pid} already runs")),
        },
    );

    // The first guest's QEMU connects: systemd starts the server with the socket.
    let socket1 = run.join("vfio-user-pvrdma/dynamic/guest1.sock");
    let mut config = LabConfig::new("service", 2, AGENT);
    config.external_sockets = vec![socket0.clone(), socket1.clone()];
    config.launched = Some(1);
    let mut lab = Lab::start(config)
        .unwrap_or_else(|e| panic!("{e}\nthe container's console:\n{}", container.console()));
    let pid = server_pid().unwrap_or_else(|| {
        panic!(
            "no server process after QEMU connected; console:\n{}",
            container.console()
        )
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    checks.check(
        "the server was socket-activated (LISTEN_FDS=1)",
        expect_contains(&String::from_utf8_lossy(&environ), "LISTEN_FDS=1"),
    );
    checks.check(
        "the server runs as a dynamic user, without capabilities, filtered",
        (|| {
            let uid = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .ok_or("no Uid")?;
            if uid == "0" {
                return Err("runs as root".to_string());
            }
            expect_contains(&status, "CapEff:\t0000000000000000")?;
            expect_contains(&status, "NoNewPrivs:\t1")?;
            expect_contains(&status, "Seccomp:\t2")
        })(),
    );
    let gid0 = prepare(lab.guest(0));
    checks.check("guest0: the driver probes", gid0.clone().map(drop));
    let dmesg_before = lab
        .guest(0)
        .check("dmesg | grep -ci pvrdma")
        .unwrap_or_default();

    // A second guest's device, added to the running server.
    let control = run.join("vfio-user-pvrdma/dynamic/control.sock");
    let added = device(
        &control,
        &[
            "add",
            "--socket",
            "/run/vfio-user-pvrdma/dynamic/guest1.sock",
            "--guid",
            "5254:00ff:fe5e:0b0b",
        ],
    );
    checks.check(
        "device add through the control socket",
        added.and_then(|said| expect_contains(&said, "device 1 serves")),
    );
    let launched = lab.launch_next();
    assert!(launched.is_ok(), "guest1 on the added device: {launched:?}");
    let gid1 = prepare(lab.guest(1));
    checks.check("guest1: the driver probes", gid1.clone().map(drop));
    checks.check(
        "guest1's device has the GUID it was added with",
        lab.guest(1)
            .check("cat /sys/class/infiniband/vmw_pvrdma0/node_guid")
            .map_err(|e| e.to_string())
            .and_then(|guid| expect_contains(&guid, "5254:00ff:fe5e:0b0b")),
    );
    if let (Ok(g0), Ok(g1)) = (&gid0, &gid1) {
        let pingpong = pair(
            &mut lab,
            &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g0} -n 50"),
            &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g1} -n 50 SERVER"),
            Duration::from_secs(120),
        );
        checks.check(
            "guest0 and guest1 pingpong across the added device",
            pingpong.and_then(|(server, client)| {
                expect_contains(&server, "50 iters").and(expect_contains(&client, "50 iters"))
            }),
        );
    }
    checks.check(
        "guest0 noticed nothing (no new pvrdma kernel lines, port active)",
        lab.guest(0)
            .check("dmesg | grep -ci pvrdma; cat /sys/class/infiniband/vmw_pvrdma0/ports/1/state")
            .map_err(|e| e.to_string())
            .and_then(|out| {
                let mut lines = out.lines();
                let count = lines.next().unwrap_or_default();
                if count != dmesg_before.trim() {
                    return Err(format!("pvrdma lines {dmesg_before:?} → {count:?}"));
                }
                expect_contains(lines.next().unwrap_or_default(), "ACTIVE")
            }),
    );
    checks.check(
        "device list shows both guests attached",
        device(&control, &["list"]).and_then(|list| {
            expect_contains(&list, "attached\t/run/vfio-user-pvrdma/pvrdma0.sock").and(
                expect_contains(
                    &list,
                    "5254:00ff:fe5e:0b0b\tattached\t/run/vfio-user-pvrdma/dynamic/guest1.sock",
                ),
            )
        }),
    );
    drop(lab);
    drop(container);
    if !std::thread::panicking() {
        let _ = std::fs::remove_dir_all(&work);
    }
    checks.finish();
}
