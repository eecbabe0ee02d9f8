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
#[path = "fabric/report.rs"]
mod report;
#[path = "fabric/suite.rs"]
mod suite;
#[path = "fabric/tcp.rs"]
mod tcp;

use std::process::ExitCode;

const USAGE: &str = "usage: scripts/bench [--json] [--quick] [--doorbells trapped|exit-free|both] [--transport memcpy|tcp]
  --json       print one JSON object per doorbell mode, one per line (JSON Lines),
               instead of the tables
  --quick      a short run (a few seconds; rougher figures), for smoke tests
  --doorbells  run the server with trapped or exit-free doorbells, or both one after
               the other (the default)
  --transport  memcpy (the default): both guests on one server; tcp: each guest on its
               own server, the two joined by the TCP transport on loopback (exit-free
               doorbells), judged against raw loopback TCP";

fn main() -> ExitCode {
    let mut json = false;
    let mut quick = false;
    let mut modes = suite::BOTH_MODES;
    let mut over_tcp = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--transport" => {
                over_tcp = match args.next().as_deref() {
                    Some("memcpy") => false,
                    Some("tcp") => true,
                    other => {
                        eprintln!("error: --transport takes memcpy or tcp, not {other:?}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
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
