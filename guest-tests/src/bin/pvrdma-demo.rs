//! The demo behind `scripts/demo`: two guests on one vfio-user-pvrdma server (memcpy
//! fabric) run `ibv_rc_pingpong` and `ib_send_lat` against each other; their output is
//! printed as the tools print it. With `--tcp`, each guest is on a server of its own, the
//! two servers in network namespaces joined by a veth pair and the TCP transport.

use std::time::Duration;

use guest_tests::lab::{Guest, Lab, LabConfig, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

/// The IPv4 GID index of the guest's vmw_pvrdma0, after loading the driver.
fn prepare(guest: &mut Guest) -> Result<String> {
    let gid = guest.check(
        "modprobe vmw_pvrdma && for i in $(seq 100); do for f in /sys/class/infiniband/vmw_pvrdma0/ports/1/gids/*; do \
         case \"$(cat $f 2>/dev/null)\" in *ffff:*) basename $f; exit 0;; esac; done; sleep 0.1; done; exit 1",
    )?;
    Ok(gid.trim().to_string())
}

fn show(title: &str, server: &str, client: &str) {
    println!(
        "\n=== {title}\n--- server (guest0) ---\n{}\n--- client (guest1) ---\n{}",
        server.trim_end(),
        client.trim_end()
    );
}

/// Runs `server` in the background in guest 0 and `client` in guest 1; prints both.
fn pair(lab: &mut Lab, title: &str, server: &str, client: &str) -> Result<()> {
    let ip = lab.guest(0).ip().to_string();
    lab.guest(0).check(&format!(
        "({server}) >/tmp/demo.out 2>&1 & echo $! >/tmp/demo.pid"
    ))?;
    // The tools try their TCP connect once: wait until the server listens on port 18515.
    lab.guest(0).check(
        "for i in $(seq 300); do ss -Hltn 'sport = :18515' | grep -q LISTEN && exit 0; sleep 0.1; done; exit 1",
    )?;
    let client_out = lab
        .guest(1)
        .run_with_timeout(&format!("{client} {ip}"), Duration::from_secs(180))?;
    let server_out = lab.guest(0).run_with_timeout(
        "while kill -0 $(cat /tmp/demo.pid) 2>/dev/null; do sleep 0.2; done; cat /tmp/demo.out",
        Duration::from_secs(60),
    )?;
    show(
        title,
        &server_out.stdout,
        &format!("{}{}", client_out.stdout, client_out.stderr),
    );
    Ok(())
}

fn run() -> Result<()> {
    let agent = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("pvrdma-guest-agent")))
        .unwrap_or_default();
    let tcp = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--tcp") => true,
        Some(other) => {
            eprintln!("usage: pvrdma-demo [--tcp]   (unknown argument {other:?})");
            std::process::exit(2);
        }
    };
    let mut config = LabConfig::new("demo", 2, agent);
    if tcp {
        config.servers = 2;
        println!(
            "booting two guests (TCG), each on its own vfio-user-pvrdma server; the servers \
             run in two network namespaces and talk over the TCP transport..."
        );
    } else {
        println!("booting two guests (TCG) on one vfio-user-pvrdma server...");
    }
    let mut lab = Lab::start(config)?;
    println!(
        "booted in {:.1} s; run folder {}",
        lab.boot_time().as_secs_f64(),
        lab.run_dir().display()
    );
    let g0 = prepare(lab.guest(0))?;
    let g1 = prepare(lab.guest(1))?;
    let devinfo = lab.guest(0).check("ibv_devinfo -d vmw_pvrdma0")?;
    println!("\n=== ibv_devinfo in guest0\n{}", devinfo.trim_end());
    pair(
        &mut lab,
        "ibv_rc_pingpong (RC SEND/RECV, 4 KiB x 1000)",
        &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g0}"),
        &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g1}"),
    )?;
    pair(
        &mut lab,
        "ib_send_lat (RC SEND latency; measured inside TCG guests, so it shows emulation speed)",
        &format!("ib_send_lat -d vmw_pvrdma0 -x {g0} -n 1000"),
        &format!("ib_send_lat -d vmw_pvrdma0 -x {g1} -n 1000"),
    )?;
    lab.shut_down()?;
    if tcp {
        println!("\ndemo finished: both tools ran between guests of two servers over TCP");
    } else {
        println!("\ndemo finished: both tools ran between two guests through the memcpy fabric");
    }
    Ok(())
}
