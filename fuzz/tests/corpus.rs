//! Every checked-in input of every target, replayed without libFuzzer: the seeds, the corpus
//! the fuzzer grew, and each input that once crashed (`regressions/`). A crash found once
//! stays a test here.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("device_model", vfio_user_pvrdma_fuzz::device_model::run),
    ("device_host", vfio_user_pvrdma_fuzz::device_host::run),
    (
        "vfio_user_stream",
        vfio_user_pvrdma_fuzz::vfio_user_stream::run,
    ),
    ("tcp_frames", vfio_user_pvrdma_fuzz::tcp_frames::run),
];

/// Replays every file under `dir/<target>/`; returns how many there were.
fn replay(dir: &str, target: &str, run: Target) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let input = std::fs::read(&path).expect("a corpus file");
        eprintln!("{}", path.display());
        run(&input);
        count += 1;
    }
    count
}

#[test]
fn the_seeds_run_and_are_in_the_corpus() {
    for (target, name, input) in vfio_user_pvrdma_fuzz::seeds::all() {
        let run = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .expect("a target")
            .1;
        run(&input);
        let saved = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target)
            .join(format!("seed-{name}"));
        assert_eq!(
            std::fs::read(&saved).ok(),
            Some(input),
            "{} is stale: cargo run --manifest-path fuzz/Cargo.toml --example write_seeds",
            saved.display()
        );
    }
}

#[test]
fn every_corpus_input_runs() {
    for (target, run) in TARGETS {
        let count = replay("corpus", target, run);
        assert!(count > 0, "no corpus for {target}");
    }
}

#[test]
fn every_input_that_once_crashed_runs() {
    for (target, run) in TARGETS {
        replay("regressions", target, run);
    }
}
