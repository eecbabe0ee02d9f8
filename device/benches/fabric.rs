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

use std::process::ExitCode;

const USAGE: &str = "usage: scripts/bench [--json] [--quick]
  --json   print one JSON object (machine-readable) instead of the table
  --quick  a short run (a few seconds; rougher figures), for smoke tests";

fn main() -> ExitCode {
    let mut json = false;
    let mut quick = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            "--quick" => quick = true,
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
    let results = suite::run(&suite::Config::new(quick));
    if json {
        println!("{}", results.json());
    } else {
        print!("{}", results.table());
    }
    ExitCode::SUCCESS
}
