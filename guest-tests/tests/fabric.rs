//! Two guests exchange RDMA traffic through one server on the memcpy fabric, using the real
//! tools: ibv_*_pingpong, perftest, rping; and the same between guests of two servers joined
//! by the TCP transport, the servers finding each other in etcd (`--directory`) or, in one
//! test, through the static `--peer` list.

mod support;

use std::time::{Duration, Instant};

use guest_tests::lab::{Discovery, Lab, LabConfig};
use support::{AGENT, Checks, expect_contains, pair, prepare};

#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_guests_talk_rdma_through_the_memcpy_fabric() {
    talk_rdma(LabConfig::new("fabric", 2, AGENT));
}

/// The same tools with exit-free doorbells: the UAR pages are mapped into the guests and the
/// server polls them (docs/doorbells.md).
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_guests_talk_rdma_with_exit_free_doorbells() {
    let mut config = LabConfig::new("fabric-exit-free", 2, AGENT);
    config.server_args = vec!["--doorbells".into(), "exit-free".into()];
    talk_rdma(config);
}

/// The same tools between guests of two servers, each server in a network namespace of
/// its own ("hosts" joined by a veth pair): the TCP transport carries every verb, and the
/// path is chosen per GID with nothing configured in the guests. The servers are given no
/// `--peer`: they find each other in an etcd the lab runs on host 0 (`--directory`), as
/// a site with many hosts would run them.
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_guests_on_two_servers_talk_rdma_over_tcp() {
    let mut config = LabConfig::new("fabric-tcp", 2, AGENT);
    config.servers = 2;
    config.discovery = Discovery::Etcd;
    talk_rdma(config);
}

/// The same across two servers with exit-free doorbells, where each server's poller also
/// serves its TCP links (docs/tcp-transport.md, "Threads").
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn two_guests_on_two_exit_free_servers_talk_rdma_over_tcp() {
    let mut config = LabConfig::new("fabric-tcp-exit-free", 2, AGENT);
    config.servers = 2;
    // The static `--peer` list, on purpose: the other two-server tests find each other in
    // etcd, and this keeps the list that needs no etcd covered by real guests as well.
    config.discovery = Discovery::PeerList;
    config.server_args = vec!["--doorbells".into(), "exit-free".into()];
    talk_rdma(config);
}

/// Three guests, two servers found through etcd: guests 0 and 2 on server 0, guest 1 on
/// server 1. Server 1 dies (SIGKILL) while guest 0 streams RDMA WRITEs to guest 1: guest
/// 0's `ib_write_bw` ends with an error instead of hanging, guest 0 and guest 2 still talk
/// through server 0, and server 0 sees server 1 leave the directory when its lease ends.
#[test]
#[ignore = "boots QEMU guests; run by scripts/test after scripts/lab"]
fn a_dead_server_fails_its_peers_traffic_and_spares_the_other_guests() {
    let mut config = LabConfig::new("fabric-tcp-death", 3, AGENT);
    config.servers = 2;
    config.discovery = Discovery::Etcd;
    let mut lab = Lab::start(config).unwrap_or_else(|e| panic!("{e}"));
    let mut checks = Checks::default();
    let gids: Vec<String> = (0..3)
        .map(|i| prepare(lab.guest(i)).unwrap_or_else(|e| panic!("guest{i}: {e}")))
        .collect();
    let peer_ip = lab.guest(1).ip().to_string();
    let started = lab.guest(1).check(&format!(
        "(ib_write_bw -d vmw_pvrdma0 -x {} -D 120) >/tmp/bw.out 2>&1 & echo started",
        gids[1]
    ));
    checks.check(
        "ib_write_bw listens in guest1",
        started.map(drop).map_err(|e| e.to_string()),
    );
    let listening = lab.guest(1).check(
        "for i in $(seq 300); do ss -Hltn 'sport = :18515' | grep -q LISTEN && exit 0; sleep 0.1; done; exit 1",
    );
    checks.check(
        "guest1 listens",
        listening.map(drop).map_err(|e| e.to_string()),
    );
    let client = lab.guest(0).check(&format!(
        "(stdbuf -oL ib_write_bw -d vmw_pvrdma0 -x {} -D 120 {peer_ip}; echo \"exit $?\" >>/tmp/bw.out) >/tmp/bw.out 2>&1 & \
         for i in $(seq 600); do grep -q 'remote address' /tmp/bw.out && exit 0; sleep 0.1; done; cat /tmp/bw.out; exit 1",
        gids[0]
    ));
    checks.check(
        "guest0's ib_write_bw connected to guest1 across the servers",
        client.map(drop).map_err(|e| e.to_string()),
    );
    // Let the WRITEs flow for a while, then kill guest1's server.
    std::thread::sleep(Duration::from_secs(5));
    lab.servers()[1].kill();
    let killed = Instant::now();
    let ended = lab.guest(0).run_with_timeout(
        "for i in $(seq 900); do grep -q '^exit ' /tmp/bw.out && break; sleep 0.1; done; cat /tmp/bw.out",
        Duration::from_secs(120),
    );
    checks.check(
        "guest0's ib_write_bw ends with an error, not a hang",
        ended.map_err(|e| e.to_string()).and_then(|out| {
            let text = out.stdout;
            match text.lines().rev().find_map(|l| l.strip_prefix("exit ")) {
                Some(code) if code.trim() != "0" => Ok(()),
                Some(_) => Err(format!("it exited 0:\n{text}")),
                None => Err(format!("it never ended:\n{text}")),
            }
        }),
    );
    checks.check(
        "server 0 is still running",
        if lab.servers()[0].is_running() {
            Ok(())
        } else {
            Err(lab.servers()[0].log_text())
        },
    );
    // Guests 0 and 2 share server 0: the memcpy fabric there is untouched.
    let server_ip = lab.guest(0).ip().to_string();
    let result = lab
        .guest(0)
        .check(&format!(
            "(ibv_rc_pingpong -d vmw_pvrdma0 -g {} -n 20) >/tmp/pp.out 2>&1 & echo $! >/tmp/pp.pid; \
             for i in $(seq 300); do ss -Hltn 'sport = :18515' | grep -q LISTEN && exit 0; sleep 0.1; done; exit 1",
            gids[0]
        ))
        .map_err(|e| e.to_string())
        .and_then(|_| {
            lab.guest(2)
                .run_with_timeout(
                    &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {} -n 20 {server_ip}", gids[2]),
                    Duration::from_secs(120),
                )
                .map_err(|e| e.to_string())
        })
        .and_then(|out| {
            let text = format!("{}{}", out.stdout, out.stderr);
            expect_contains(&text, "20 iters")
        });
    checks.check("guest0 and guest2 still talk through server 0", result);
    // A killed server revokes nothing: its key goes when its lease (10 s) ends, which the
    // checks above mostly outlast, so waiting for the line costs the test little.
    let dead = lab.transport_addr(1).expect("a two-server lab");
    let left = format!("directory: server {dead} left");
    let deadline = killed + Duration::from_secs(30);
    let seen = loop {
        if lab.servers()[0].log_text().contains(&left) {
            break Some(killed.elapsed());
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    checks.check(
        "server 0 sees the dead server leave the directory (an info line)",
        seen.map(|after| eprintln!("server 0 logged `{left}` {after:?} after the kill"))
            .ok_or_else(|| {
                format!(
                    "no `{left}` within 30 s of the kill:\n{}",
                    lab.servers()[0].log_text()
                )
            }),
    );
    // Guest 1 lost its device with its server; its QEMU is not expected to shut down
    // cleanly, so the lab is dropped (which kills everything) rather than shut down.
    drop(lab);
    checks.finish();
}

fn talk_rdma(config: LabConfig) {
    let mut lab = Lab::start(config).unwrap_or_else(|e| panic!("{e}"));
    let mut checks = Checks::default();
    let gid0 = prepare(lab.guest(0));
    let gid1 = prepare(lab.guest(1));
    checks.check(
        "both guests have an IPv4 GID",
        gid0.as_ref()
            .and(gid1.as_ref())
            .map(drop)
            .map_err(Clone::clone),
    );
    let (g0, g1) = (gid0.unwrap_or_default(), gid1.unwrap_or_default());
    let timeout = Duration::from_secs(120);

    for size in [64, 4096, 65536] {
        let result = pair(
            &mut lab,
            &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g0} -s {size} -n 50"),
            &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g1} -s {size} -n 50 SERVER"),
            timeout,
        );
        checks.check(
            &format!("ibv_rc_pingpong {size} B x 50"),
            result.and_then(|(server, client)| {
                expect_contains(&server, "50 iters").and(expect_contains(&client, "50 iters"))
            }),
        );
    }
    let result = pair(
        &mut lab,
        &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g0} -s 4096 -n 50 -e"),
        &format!("ibv_rc_pingpong -d vmw_pvrdma0 -g {g1} -s 4096 -n 50 -e SERVER"),
        timeout,
    );
    checks.check(
        "ibv_rc_pingpong with completion events (-e)",
        result.and_then(|(server, client)| {
            expect_contains(&server, "50 iters").and(expect_contains(&client, "50 iters"))
        }),
    );

    let both = |result: Result<(String, String), String>, needle: &str| {
        result.and_then(|(server, client)| {
            expect_contains(&server, needle).and(expect_contains(&client, needle))
        })
    };
    // Several sizes and iteration counts each; a UD message must fit the 1024-byte MTU.
    for (tool, extra, iters) in [
        ("ibv_ud_pingpong", "-s 64", 200),
        ("ibv_ud_pingpong", "-s 1024", 50),
        ("ibv_srq_pingpong", "-s 64 -q 2", 100),
        ("ibv_srq_pingpong", "-s 4096 -q 4", 50),
        ("ibv_srq_pingpong", "-s 65536 -q 8", 20),
    ] {
        let result = pair(
            &mut lab,
            &format!("{tool} -d vmw_pvrdma0 -g {g0} -n {iters} {extra}"),
            &format!("{tool} -d vmw_pvrdma0 -g {g1} -n {iters} {extra} SERVER"),
            timeout,
        );
        checks.check(
            &format!("{tool} {extra} x {iters}"),
            both(result, &format!("{iters} iters in")),
        );
    }
    // For one-sided operations only the requester (the client) measures and prints.
    let client = |result: Result<(String, String), String>, needle: &str| {
        result.and_then(|(_, client)| expect_contains(&client, needle))
    };
    for (tool, extra, needle, one_sided) in [
        ("ib_send_lat", "-n 500", "t_typical", false),
        ("ib_write_bw", "-n 500 -s 65536", "BW average", false),
        ("ib_read_lat", "-n 500", "t_typical", true),
        ("ib_atomic_lat", "-n 500", "t_typical", true),
    ] {
        let result = pair(
            &mut lab,
            &format!("{tool} -d vmw_pvrdma0 -x {g0} {extra}"),
            &format!("{tool} -d vmw_pvrdma0 -x {g1} {extra} SERVER"),
            timeout,
        );
        let verdict = if one_sided {
            client(result, needle)
        } else {
            both(result, needle)
        };
        checks.check(&format!("{tool} {extra}"), verdict);
    }
    // The vmw_pvrdma kernel driver creates RC, UD and GSI QPs only: a UC QP is refused in the
    // guest before the device hears of it, on any PVRDMA device (docs/backends.md).
    checks.check(
        "ibv_uc_pingpong: the driver refuses UC QPs, as on any PVRDMA device",
        lab.guest(1)
            .run(&format!(
                "ibv_uc_pingpong -d vmw_pvrdma0 -g {g1} -n 1 127.0.0.1"
            ))
            .map_err(|e| e.to_string())
            .and_then(|out| {
                let text = format!("{}{}", out.stdout, out.stderr);
                if out.status != 0 {
                    expect_contains(&text, "Couldn't create QP")
                } else {
                    Err(format!("UC unexpectedly worked:\n{text}"))
                }
            }),
    );
    let result = pair(
        &mut lab,
        "rping -s -C 10 -v",
        "rping -c -C 10 -v -a SERVER",
        timeout,
    );
    checks.check(
        "rping -C 10 (rdma_cm over the GSI QP)",
        result.and_then(|(_, client)| expect_contains(&client, "ping data")),
    );

    checks.check(
        "the lab shuts down cleanly",
        lab.shut_down().map_err(|e| e.to_string()),
    );
    checks.finish();
}
