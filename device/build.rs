//! Names the git revision the binary is built from, for `--version`: users report it with
//! a bug, and a package built from a tarball says "unknown revision".

use std::process::Command;

fn main() {
    let revision = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown revision".into());
    println!("cargo:rustc-env=PVRDMA_GIT_REVISION={revision}");
    // A new commit or checkout changes the revision; so do changes to the tree (dirty).
    for path in ["../.git/HEAD", "../.git/index", "../.git/refs"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
