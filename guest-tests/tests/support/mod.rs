//! Helpers shared by the guest test files.
#![allow(
    dead_code,
    reason = "each test file uses its own part of these helpers"
)]

/// Runs every check even when one fails, then reports all failures at once: a boot is too
/// expensive to learn about one failure per run.
#[derive(Default)]
pub struct Checks(Vec<String>);

impl Checks {
    pub fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => eprintln!("  ok   {name}"),
            Err(e) => {
                eprintln!("  FAIL {name}: {e}");
                self.0.push(format!("{name}: {e}"));
            }
        }
    }

    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

pub fn expect_contains(text: &str, needle: &str) -> Result<(), String> {
    if text.contains(needle) {
        Ok(())
    } else {
        Err(format!("expected `{needle}` in:\n{text}"))
    }
}

/// The agent binary this build made; the lab puts it into every guest.
pub const AGENT: &str = env!("CARGO_BIN_EXE_pvrdma-guest-agent");

/// Soft-RoCE on the guest's loopback interface (`rxelo`) with an address for each of two
/// servers' guests (127.0.0.11 and 127.0.0.12): two servers in one VM reach each other's
/// guests only through `lo`, and rxe takes only the packets of the interface it is bound
/// to. Prints the sysfs file of the second address's GID once it is there.
pub const LOOP_DEVICE_SETUP: &str = "modprobe rdma_rxe && \
     ip addr add 127.0.0.11/8 dev lo && ip addr add 127.0.0.12/8 dev lo && \
     rdma link add rxelo type rxe netdev lo && \
     for i in $(seq 100); do grep -q 7f00:000c /sys/class/infiniband/rxelo/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done; \
     grep -l 7f00:000c /sys/class/infiniband/rxelo/ports/1/gids/*";

/// The executable cargo builds for `args` (`test -p … --test NAME`, `bench -p … --bench
/// NAME`) and names `name`, built if it is not: cargo names it with a hash, so ask cargo.
pub fn cargo_artifact(args: &[&str], name: &str) -> Result<std::path::PathBuf, String> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace above guest-tests")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(args)
        .args(["--no-run", "--message-format=json"])
        .current_dir(workspace)
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cargo could not build {name}:\n{}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    let wanted = format!("\"name\":\"{name}\"");
    String::from_utf8_lossy(&built.stdout)
        .lines()
        .filter(|line| line.contains("\"reason\":\"compiler-artifact\"") && line.contains(&wanted))
        .find_map(|line| {
            let at = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = line[at..].find('"')?;
            Some(std::path::PathBuf::from(&line[at..at + end]))
        })
        .ok_or_else(|| format!("cargo named no executable for {name}"))
}
