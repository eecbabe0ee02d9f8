//! A scale benchmark of the etcd cluster directory, without guests: one process plays N
//! servers (an `EtcdMembership` each, with its own id and address) registering M GIDs
//! each in an etcd the benchmark starts, and measures how long every server takes to
//! register its GIDs and every view to converge, what one change costs afterwards, and
//! etcd's load, beside a baseline of N*M plain puts through the same client.
//!
//! Run it with `scripts/bench-directory` (or `cargo bench -p pvrdma-backend --bench
//! directory -- [OPTIONS]`). Progress goes to stderr, the report to stdout.
//! docs/directory-benchmark.md explains every figure.

#[path = "directory/etcd_server.rs"]
mod etcd_server;
#[path = "directory/metrics.rs"]
mod metrics;
#[path = "directory/report.rs"]
mod report;
#[path = "directory/suite.rs"]
mod suite;
#[path = "directory/warnings.rs"]
mod warnings;

use std::process::ExitCode;

const USAGE: &str = "usage: scripts/bench-directory [--servers N] [--gids M] [--json] [--quick]
  --servers N  simulated servers (default 100; --quick: 10)
  --gids M     GIDs each server registers (default 1000; --quick: 100)
  --json       print one JSON object instead of the table
  --quick      10 servers × 100 GIDs (seconds), for smoke tests
Needs etcd on PATH (Debian's etcd-server); the benchmark starts its own on loopback.";

fn number(value: Option<String>, option: &str) -> Result<usize, String> {
    value
        .as_deref()
        .and_then(|v| v.replace('_', "").parse().ok())
        .ok_or_else(|| format!("{option} takes a number, not {value:?}"))
}

fn parse() -> Result<(suite::Config, bool), String> {
    let mut json = false;
    let mut servers = None;
    let mut gids = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--quick" => quick = true,
            "--servers" => servers = Some(number(args.next(), "--servers")?),
            "--gids" => gids = Some(number(args.next(), "--gids")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // cargo bench passes --bench to every benchmark target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mut config = suite::Config::new(quick);
    config.servers = servers.unwrap_or(config.servers);
    config.gids = gids.unwrap_or(config.gids);
    Ok((config, json))
}

fn main() -> ExitCode {
    let (config, json) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match suite::run(&config) {
        Ok(results) => {
            if json {
                println!("{}", results.json());
            } else {
                print!("{}", results.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
