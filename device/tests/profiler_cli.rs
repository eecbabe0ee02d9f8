//! The queue-pair profiler end to end: two host-side guests on the real server exchange
//! SENDs, then the `stats` and `profile` subcommands of the real binary read and switch the
//! profiler through the server's control socket (docs/profiler.md).

mod driver;

#[allow(
    dead_code,
    reason = "the benchmark's guests; this test uses a few of their steps"
)]
#[path = "../benches/fabric/guests.rs"]
mod guests;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

fn cli(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .expect("run vfio-user-pvrdma")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

fn qp_json(json: &Value, device: usize, qp: u32) -> &Value {
    json["devices"][device]["qps"]
        .as_array()
        .expect("a QP list")
        .iter()
        .find(|q| q["qp"] == qp)
        .unwrap_or_else(|| panic!("no QP {qp} on device {device}: {json}"))
}

#[test]
fn stats_subcommand_reads_a_running_server() {
    // Every pass timed, so the stage counts can be checked against the counters exactly.
    let mut fabric =
        guests::Fabric::start_with(1 << 20, guests::Mode::Trapped, &["--profile-every", "1"]);
    let control = fabric.server.control().to_path_buf();
    // The profiler names QPs by the numbers the guests' tools print.
    let (qa, qb) = (fabric.a.qp.qpn, fabric.b.qp.qpn);
    assert_eq!(
        stdout(&cli(&control, &["profile"])),
        "profiling off\n",
        "off by default"
    );
    assert_eq!(
        stdout(&cli(&control, &["profile", "on"])),
        "ok: profiling on\n"
    );
    fabric.send_rate(32, Duration::from_millis(30));

    let table = stdout(&cli(&control, &["stats"]));
    assert!(table.starts_with("profiling: on"), "{table}");
    assert!(table.contains("pickup") && table.contains("place") && table.contains("cqe"));

    let json: Value =
        serde_json::from_str(&stdout(&cli(&control, &["stats", "--json"]))).expect("JSON");
    assert_eq!(json["profiling"], true);
    let a = qp_json(&json, 0, qa);
    let sent = a["wqes_completed"].as_u64().expect("a count");
    assert!(sent >= 32 && sent.is_multiple_of(32), "{a}");
    assert_eq!(a["bytes_sent"].as_u64(), Some(64 * sent));
    assert!(a["doorbells"].as_u64().is_some_and(|n| n >= sent / 32));
    assert_eq!(a["completion_errors"], 0);
    assert_eq!(a["stages"]["place"]["count"].as_u64(), Some(sent));
    assert_eq!(a["stages"]["pickup"]["count"].as_u64(), Some(sent));
    assert_eq!(a["stages"]["cqe"]["count"].as_u64(), Some(sent / 32));
    let b = qp_json(&json, 1, qb);
    assert_eq!(b["bytes_received"].as_u64(), Some(64 * sent));

    // The SVG of A's QP: one bar per non-empty bucket of its stages.
    let dir = std::env::temp_dir().join(format!("pvrdma-profiler-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("qp.svg");
    let qa_text = qa.to_string();
    let args = [
        "stats", "--svg", "--device", "0", "--qp", &qa_text, "--output",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .args(args)
        .arg(&file)
        .arg("--control")
        .arg(&control)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&file).expect("the SVG file");
    let non_empty: usize = a["stages"]
        .as_object()
        .expect("stages")
        .values()
        .map(|h| {
            h["buckets"]
                .as_array()
                .expect("buckets")
                .iter()
                .filter(|n| n.as_u64() != Some(0))
                .count()
        })
        .sum();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(non_empty > 0);
    assert_eq!(svg.matches("<rect").count(), non_empty, "{svg}");
    // The QP number as the guest's tools print it, in hex: the same picture.
    let hex = cli(
        &control,
        &[
            "stats",
            "--svg",
            "--device",
            "0",
            "--qp",
            &format!("{qa:#x}"),
        ],
    );
    assert!(
        hex.status.success(),
        "{}",
        String::from_utf8_lossy(&hex.stderr)
    );
    assert_eq!(
        stdout(&hex),
        svg,
        "--qp {qa:#x} names the same QP as --qp {qa}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A QP that does not exist: an error, and a failing exit status.
    let out = cli(
        &control,
        &["stats", "--svg", "--device", "0", "--qp", "4000"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no QP 4000"));

    // Switching the stage timing off: counters go on, histograms stay.
    assert_eq!(
        stdout(&cli(&control, &["profile", "off"])),
        "ok: profiling off\n"
    );
    assert_eq!(stdout(&cli(&control, &["profile"])), "profiling off\n");
    fabric.send_rate(32, Duration::from_millis(10));
    let json: Value =
        serde_json::from_str(&stdout(&cli(&control, &["stats", "--json"]))).expect("JSON");
    assert_eq!(json["profiling"], false);
    let a2 = qp_json(&json, 0, qa);
    assert!(a2["wqes_completed"].as_u64() > Some(sent));
    assert_eq!(a2["stages"], a["stages"]);

    // SIGTERM removes the control socket with the others.
    let status = fabric.server.stop_with(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(!control.exists(), "the control socket was removed");
}
