//! The memcpy-fabric benchmark (issue 5): two host-side vfio-user clients play two guests
//! on one real `vfio-user-pvrdma` process, going through its sockets exactly as QEMU does,
//! and the same run measures the raw baselines the figures are judged against.
//!
//! Run it with `scripts/bench` (or `cargo bench -p vfio-user-pvrdma --bench fabric`).
//! Options: `--json` prints one JSON object instead of the table; `--quick` makes a short,
//! rougher run. Progress goes to stderr. docs/benchmark.md explains every figure.

#[path = "../tests/driver/mod.rs"]
mod driver;

#[path = "fabric/baseline.rs"]
mod baseline;
#[path = "fabric/guests.rs"]
mod guests;
#[path = "fabric/rdma.rs"]
mod rdma;
#[path = "fabric/report.rs"]
mod report;
#[path = "fabric/suite.rs"]
mod suite;
#[path = "fabric/tcp.rs"]
mod tcp;

use std::process::ExitCode;

const USAGE: &str = "usage: scripts/bench [--json] [--quick] [--doorbells trapped|exit-free|both] [--transport memcpy|tcp|rdma] [--rdma-device NAME]
  --json       print one JSON object per doorbell mode, one per line (JSON Lines),
               instead of the tables
  --quick      a short run (a few seconds; rougher figures), for smoke tests
  --doorbells  run the server with trapped or exit-free doorbells, or both one after
               the other (the default)
  --transport  memcpy (the default): both guests on one server; tcp: each guest on its
               own server, the two joined by the TCP transport on loopback (exit-free
               doorbells), judged against raw loopback TCP; rdma: each guest on its own
               server, their QPs carried by the host RDMA device, judged against
               perftest on the same device
  --rdma-device  the device of --transport rdma (default rxelo): it must hold the GIDs
               of 127.0.0.11 and 127.0.0.12 (Soft-RoCE on lo)";

fn main() -> ExitCode {
    let mut json = false;
    let mut quick = false;
    let mut modes = suite::BOTH_MODES;
    let mut over_tcp = false;
    let mut over_rdma = false;
    let mut rdma_device = "rxelo".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--transport" => {
                (over_tcp, over_rdma) = match args.next().as_deref() {
                    Some("memcpy") => (false, false),
                    Some("tcp") => (true, false),
                    Some("rdma") => (false, true),
                    other => {
                        eprintln!(
                            "error: --transport takes memcpy, tcp or rdma, not {other:?}\n{USAGE}"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            "--rdma-device" => match args.next() {
                Some(name) => rdma_device = name,
                None => {
                    eprintln!("error: --rdma-device takes a device name\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--quick" => quick = true,
            "--doorbells" => {
                modes = match args.next().as_deref() {
                    Some("trapped") => &[guests::Mode::Trapped],
                    Some("exit-free") => &[guests::Mode::ExitFree],
                    Some("both") => suite::BOTH_MODES,
                    other => {
                        eprintln!(
                            "error: --doorbells takes trapped, exit-free or both, not {other:?}\n{USAGE}"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("error: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let config = suite::Config {
        modes,
        ..suite::Config::new(quick)
    };
    if over_rdma {
        let runs = match rdma::run(&config, &rdma_device) {
            Ok(runs) => runs,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (i, results) in runs.iter().enumerate() {
            if json {
                println!("{}", results.json());
            } else {
                if i > 0 {
                    println!();
                }
                print!("{}", results.table());
            }
        }
        return ExitCode::SUCCESS;
    }
    if over_tcp {
        for (i, results) in tcp::run(&config).iter().enumerate() {
            if json {
                println!("{}", results.json());
            } else {
                if i > 0 {
                    println!();
                }
                print!("{}", results.table());
            }
        }
        return ExitCode::SUCCESS;
    }
    for (i, results) in suite::run(&config).iter().enumerate() {
        if json {
            println!("{}", results.json());
        } else {
            if i > 0 {
                println!();
            }
            print!("{}", results.table());
        }
    }
    ExitCode::SUCCESS
}
