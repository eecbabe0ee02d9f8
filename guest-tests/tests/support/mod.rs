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
