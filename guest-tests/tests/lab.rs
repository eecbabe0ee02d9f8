//! The guest lab itself: boot real guests with the PVRDMA slot, check what the guest sees, and
//! check that the fixture cleans up after itself. These boot QEMU, so they are ignored by a
//! plain `cargo test`; `scripts/test` builds the lab and runs them with `--ignored`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use guest_tests::lab::{Lab, LabConfig, LabError};

mod support;

use support::{AGENT, Checks, expect_contains};

#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_guests_see_the_pvrdma_slot_and_talk_over_the_segment() {
    let mut lab =
        Lab::start(LabConfig::new("two-guests", 2, AGENT)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "two guests booted in {:.1} s",
        lab.boot_time().as_secs_f64()
    );
    let mut checks = Checks::default();

    for index in 0..2 {
        let guest = lab.guest(index);
        let name = guest.name().to_string();
        let slot = guest.run("lspci -n -s 00:10").map_err(|e| e.to_string());
        checks.check(
            &format!("{name}: vmxnet3 15ad:07b0 at 00:10.0"),
            slot.as_ref()
                .map_err(Clone::clone)
                .and_then(|out| expect_contains(&out.stdout, "00:10.0 0200: 15ad:07b0")),
        );
        checks.check(
            &format!("{name}: PVRDMA 15ad:0820 at 00:10.1"),
            slot.as_ref()
                .map_err(Clone::clone)
                .and_then(|out| expect_contains(&out.stdout, "00:10.1 0280: 15ad:0820")),
        );
        checks.check(
            &format!("{name}: vmxnet3 bound to function 0"),
            guest
                .check("basename $(readlink /sys/bus/pci/devices/0000:00:10.0/driver)")
                .map_err(|e| e.to_string())
                .and_then(|driver| expect_contains(&driver, "vmxnet3")),
        );
        checks.check(
            &format!("{name}: modprobe vmw_pvrdma"),
            guest
                .check("modprobe vmw_pvrdma && lsmod")
                .map_err(|e| e.to_string())
                .and_then(|lsmod| {
                    expect_contains(&lsmod, "vmw_pvrdma")
                        .and(expect_contains(&lsmod, "vmxnet3"))
                        .and(expect_contains(&lsmod, "ib_core"))
                }),
        );
    }

    let server_running = lab.server().is_running();
    let sockets_exist = lab.server().sockets().iter().all(|s| s.exists());
    checks.check(
        "the vfio-user server listens on each guest's socket",
        if server_running && sockets_exist {
            Ok(())
        } else {
            Err(format!(
                "running={server_running} sockets={sockets_exist}\n{}",
                lab.server().log_text()
            ))
        },
    );
    let server_log = lab.server().log_text();
    checks.check(
        "QEMU connected to the server for each guest",
        expect_contains(&server_log, "guest0.pvrdma.sock")
            .and(expect_contains(&server_log, "guest1.pvrdma.sock")),
    );

    let peer = lab.guest(1).ip().to_string();
    checks.check(
        "guest0 pings guest1 over the lab segment",
        lab.guest(0)
            .check(&format!("ping -c 3 -W 5 {peer}"))
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    let peer = lab.guest(0).ip().to_string();
    checks.check(
        "guest1 pings guest0 over the lab segment",
        lab.guest(1)
            .check(&format!("ping -c 3 -W 5 {peer}"))
            .map(drop)
            .map_err(|e| e.to_string()),
    );

    // The fixture's own promises, checked on the same boot.
    let guest = lab.guest(0);
    checks.check(
        "a command reports stdout, stderr and its exit code",
        guest
            .run("echo out; echo err >&2; exit 7")
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.stdout == "out\n" && o.stderr == "err\n" && o.status == 7 {
                    Ok(())
                } else {
                    Err(format!("{o:?}"))
                }
            }),
    );
    let started = Instant::now();
    checks.check(
        "a command past its timeout is an error carrying the console tail",
        match guest.run_with_timeout("sleep 30", Duration::from_secs(2)) {
            Err(LabError::Timeout { console, .. })
                if started.elapsed() < Duration::from_secs(20) =>
            {
                expect_contains(&console, "pvrdma-lab: userspace ready")
            }
            other => Err(format!("{other:?} after {:?}", started.elapsed())),
        },
    );
    checks.check(
        "the guest is still usable after a timeout",
        guest.check("true").map(drop).map_err(|e| e.to_string()),
    );
    let copy = lab.run_dir().join("copied-cmdline");
    checks.check(
        "a file copied out of the guest arrives intact",
        lab.guest(0)
            .check("cat /proc/cmdline")
            .and_then(|cmdline| {
                lab.guest(0)
                    .copy_out("/proc/cmdline", &copy)
                    .map(|()| cmdline)
            })
            .map_err(|e| e.to_string())
            .and_then(|cmdline| {
                let copied = std::fs::read_to_string(&copy).map_err(|e| e.to_string())?;
                if copied == cmdline && copied.contains("lab.hostname=guest0") {
                    Ok(())
                } else {
                    Err(format!("{copied:?} != {cmdline:?}"))
                }
            }),
    );

    let run_dir = lab.run_dir().to_path_buf();
    checks.check(
        "the lab shuts down cleanly (guests power off, server exits 0)",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    let keep = std::env::var_os("PVRDMA_KEEP_RUN").is_some();
    checks.check(
        "no run folder (or, with PVRDMA_KEEP_RUN, no socket) is left behind",
        match std::fs::read_dir(&run_dir) {
            Err(_) => Ok(()),
            Ok(entries) => {
                let left: Vec<_> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| !keep || p.extension().is_some_and(|x| x == "sock"))
                    .collect();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("left behind: {left:?}"))
                }
            }
        },
    );
    checks.finish();
}

#[test]
#[ignore = "boots a QEMU guest; run by scripts/test after scripts/lab"]
fn a_failing_test_still_leaves_no_process_or_socket_behind() {
    let mut lab =
        Lab::start(LabConfig::new("panic-cleanup", 1, AGENT)).unwrap_or_else(|e| panic!("{e}"));
    let run_dir = lab.run_dir().to_path_buf();
    let sockets: Vec<_> = lab.server().sockets().to_vec();
    let pids = child_pids();
    assert!(
        pids.len() >= 2,
        "expected QEMU and the server as children, found {pids:?}"
    );

    let outcome = catch_unwind(AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("a test failing while its guests run");
    }));
    assert!(outcome.is_err());
    for pid in &pids {
        // The lab reaps what it kills, so a child that is gone has no /proc entry at all.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the lab"
        );
    }
    for socket in &sockets {
        assert!(!socket.exists(), "{} survived the lab", socket.display());
    }
    // A failing test keeps its logs for the developer, but never a socket.
    let leftovers: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".sock")),
        "{leftovers:?}"
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// PIDs of this process's direct children (QEMU and the server while a lab runs).
fn child_pids() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after.split_whitespace().nth(1) == Some(me.as_str()) {
            pids.push(pid);
        }
    }
    pids
}

/// QEMU, not a test client, on a socket another QEMU holds: the second QEMU exits at once
/// naming the reason ("version reply: Device or resource busy") instead of waiting in the
/// backlog, the server's log says what it did, and the first QEMU keeps its device.
#[test]
#[ignore = "starts QEMU; run by scripts/test after scripts/lab"]
fn a_second_qemu_on_a_busy_socket_is_told_why_and_the_first_keeps_its_device() {
    use guest_tests::lab::{LabEnv, ServerProcess, server_binary};
    use std::process::{Command, Stdio};

    let env = LabEnv::load().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("pvrdma-busy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("busy.sock");
    let binary = server_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut server =
        ServerProcess::start(&binary, vec![socket.clone()], &[], dir.join("server.log"))
            .unwrap_or_else(|e| panic!("{e}"));
    // Paused QEMUs: the device is realized (connected, negotiated) before any guest runs.
    let qemu = |name: &str| {
        let mut command = Command::new(&env.qemu);
        command
            .args([
                "-name",
                name,
                "-M",
                "pc",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-m",
                "64",
            ])
            .args(["-object", "memory-backend-memfd,id=ram,size=64M,share=on"])
            .args(["-machine", "memory-backend=ram", "-device"])
            .arg(format!(
                r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}}}}"#,
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let mut first = qemu("first").spawn().expect("start the first QEMU");
    let attached = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        server.log_text().contains("client connected")
    });
    assert!(
        attached,
        "the first QEMU never connected:\n{}",
        server.log_text()
    );
    let started = Instant::now();
    let second = qemu("second").output().expect("run the second QEMU");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second QEMU started: {stderr}"
    );
    assert!(
        stderr.contains("version reply: Device or resource busy"),
        "QEMU's message: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the second QEMU took {:?}",
        started.elapsed()
    );
    let log = server.log_text();
    assert!(log.contains("answered EBUSY"), "the server's log:\n{log}");
    assert!(
        first.try_wait().expect("the first QEMU").is_none(),
        "the first QEMU lost its device"
    );
    let _ = first.kill();
    let _ = first.wait();
    server.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
