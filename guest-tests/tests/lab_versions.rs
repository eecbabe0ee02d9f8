//! The lab's version resolver (`scripts/lib/versions.sh`) decides, from what the Debian archive
//! offers, which QEMU and which guest kernel the lab builds. These tests replay recorded
//! `apt-cache` answers (`tests/apt-answers/`), so they need no network: the pin present, the
//! pin superseded, a kernel whose image, headers and source sit at different versions, and
//! nothing acceptable.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Resolution {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn answers(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/apt-answers")
        .join(case)
}

/// Runs `script` in bash with the lab's shell library loaded and apt-cache replaced by the
/// recorded answers of `case`. `forced` sets environment variables (LAB_QEMU_VERSION, ...).
fn resolve(case: &str, script: &str, forced: &[(&str, &str)]) -> Resolution {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = std::env::temp_dir().join(format!("lab-versions-{}-{case}", std::process::id()));
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!("source scripts/lib/common.sh\n{script}"))
        .current_dir(&repo)
        .env("LAB_APT_CACHE_COMMAND", answers("").join("fake-apt-cache"))
        .env("FAKE_APT_ANSWERS", answers(case))
        .env("VFIO_USER_PVRDMA_CACHE", &cache)
        .env_remove("LAB_QEMU_VERSION")
        .env_remove("LAB_KERNEL_VERSION")
        .env_remove("LAB_VERSIONS_RESOLVED");
    for (key, value) in forced {
        command.env(key, value);
    }
    let output = command.output().expect("bash runs");
    let _ = std::fs::remove_dir_all(&cache);
    Resolution {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn resolved(case: &str, script: &str, forced: &[(&str, &str)]) -> String {
    let result = resolve(case, script, forced);
    assert!(result.ok, "{script} failed on {case}: {}", result.stderr);
    result.stdout
}

fn refused(case: &str, script: &str, forced: &[(&str, &str)]) -> String {
    let result = resolve(case, script, forced);
    assert!(
        !result.ok,
        "{script} should fail on {case}, printed {}",
        result.stdout
    );
    result.stderr
}

#[test]
fn the_archive_of_2026_12_03_resolves_to_its_newest_versions() {
    assert_eq!(
        resolved("2026-12-03", "resolve_qemu_version", &[]),
        "1:11.1.3+ds-2~bpo13+1 trixie-backports"
    );
    // 6.12.107 and 6.12.117 both have image, headers and source: the newer wins.
    assert_eq!(
        resolved("2026-12-03", "resolve_kernel_version", &[]),
        "6.12.117-1 6.12.117+deb13-amd64"
    );
}

#[test]
fn resolved_versions_name_the_cache_folders_and_are_printed() {
    let result = resolve(
        "2026-12-03",
        "lab_resolve_versions; echo \"$LAB_QEMU_DIR\"; echo \"$LAB_GUEST_DIR\"",
        &[],
    );
    assert!(result.ok, "{}", result.stderr);
    let dirs: Vec<&str> = result.stdout.lines().collect();
    assert!(
        dirs[0].contains("/qemu-1_11.1.3_ds-2_bpo13_1-r"),
        "{}",
        dirs[0]
    );
    assert!(dirs[1].contains("/guest-6.12.117-1-r"), "{}", dirs[1]);
    assert!(
        result.stderr.contains(
            "resolved: qemu-system-x86 1:11.1.3+ds-2~bpo13+1 (trixie-backports); kernel 6.12.117+deb13-amd64 6.12.117-1"
        ),
        "{}",
        result.stderr
    );
}

#[test]
fn a_forced_version_the_archive_still_has_is_used() {
    let forced = [("LAB_KERNEL_VERSION", "6.12.107-1")];
    assert_eq!(
        resolved("2026-12-03", "resolve_kernel_version", &forced),
        "6.12.107-1 6.12.107+deb13-amd64"
    );
    let forced = [("LAB_QEMU_VERSION", "1:11.1.3+ds-2~bpo13+1")];
    assert_eq!(
        resolved("2026-12-03", "resolve_qemu_version", &forced),
        "1:11.1.3+ds-2~bpo13+1 trixie-backports"
    );
}

#[test]
fn a_superseded_forced_version_is_named_with_what_the_archive_offers() {
    // The exact pin that broke CI: the archive moved to -2.
    let forced = [("LAB_QEMU_VERSION", "1:11.1.3+ds-1~bpo13+1")];
    let error = refused("2026-12-03", "resolve_qemu_version", &forced);
    assert!(
        error.contains("qemu-system-x86 1:11.1.3+ds-1~bpo13+1 is not in the archive"),
        "{error}"
    );
    assert!(
        error.contains("1:11.1.3+ds-2~bpo13+1 (trixie-backports), 1:10.0.13+ds-0+deb13u1 (trixie)"),
        "{error}"
    );
    let forced = [("LAB_KERNEL_VERSION", "6.12.117-2")];
    let error = refused("2026-12-03", "resolve_kernel_version", &forced);
    assert!(error.contains("LAB_KERNEL_VERSION=6.12.117-2"), "{error}");
    assert!(
        error.contains("linux-image-6.12.117+deb13-amd64: 6.12.117-1"),
        "{error}"
    );
    assert!(
        error.contains("linux-source-6.12: 6.12.107-1 6.12.117-1"),
        "{error}"
    );
}

#[test]
fn a_qemu_older_than_vfio_user_pci_is_refused_even_when_forced() {
    let forced = [("LAB_QEMU_VERSION", "1:10.0.13+ds-0+deb13u1")];
    let error = refused("2026-12-03", "resolve_qemu_version", &forced);
    assert!(error.contains("QEMU 10.0.13 is older than 10.1"), "{error}");
}

#[test]
fn a_kernel_whose_source_lags_its_image_resolves_to_the_newest_complete_set() {
    // 6.12.119's image and headers arrived before its source: 6.12.117 is the newest that
    // can get vmw_pvrdma.ko built. Flavours other than amd64 (rt, cloud, dbg) are ignored.
    assert_eq!(
        resolved("kernel-source-behind", "resolve_kernel_version", &[]),
        "6.12.117-1 6.12.117+deb13-amd64"
    );
}

#[test]
fn nothing_acceptable_fails_with_what_the_archive_offers() {
    // 11.2 and 11.10 are not the 11.1 series; 10.0 is too old.
    let error = refused("nothing-acceptable", "resolve_qemu_version", &[]);
    assert!(
        error.contains("no qemu-system-x86 of the 11.1 series (at least 10.1)"),
        "{error}"
    );
    assert!(
        error.contains("1:11.10.0+ds-1~bpo13+1 (trixie-backports)"),
        "{error}"
    );
    assert!(error.contains("LAB_QEMU_SERIES"), "{error}");
    // The image is at -2 and -1, headers only at -1, the source only at -2: no version has all.
    let error = refused("nothing-acceptable", "resolve_kernel_version", &[]);
    assert!(error.contains("share a version"), "{error}");
    assert!(
        error.contains("linux-image-6.12.117+deb13-amd64: 6.12.117-1 6.12.117-2; linux-headers-6.12.117+deb13-amd64: 6.12.117-1"),
        "{error}"
    );
    assert!(error.contains("linux-source-6.12: 6.12.117-2"), "{error}");
    let error = refused("empty", "resolve_qemu_version", &[]);
    assert!(error.contains("the archive offers: nothing"), "{error}");
    let error = refused("empty", "resolve_kernel_version", &[]);
    assert!(error.contains("linux-source-6.12: none"), "{error}");
}

#[test]
fn an_unreachable_index_reuses_a_complete_lab_and_nothing_else() {
    let script = r#"
        mkdir -p "$LAB_CACHE"
        cat >"$LAB_ENV_FILE" <<'ENV'
LAB_QEMU_VERSION='1:11.1.3+ds-2~bpo13+1'
LAB_QEMU_SUITE='trixie-backports'
LAB_KERNEL_VERSION='6.12.117-1'
LAB_KERNEL_ABI='6.12.117+deb13-amd64'
ENV
        if lab_reuse_previous_versions; then echo "reused while incomplete"; exit 1; fi
        mkdir -p "$LAB_QEMU_DIR" "$LAB_GUEST_DIR"
        touch "$LAB_QEMU_DIR/complete" "$LAB_GUEST_DIR/complete"
        lab_reuse_previous_versions
        echo "$LAB_QEMU_VERSION $LAB_KERNEL_ABI"
        LAB_KERNEL_VERSION=6.12.107-1
        if lab_reuse_previous_versions; then echo "reused against a forced version"; exit 1; fi
    "#;
    let result = resolve("empty", script, &[]);
    assert!(result.ok, "{}\n{}", result.stdout, result.stderr);
    assert_eq!(result.stdout, "1:11.1.3+ds-2~bpo13+1 6.12.117+deb13-amd64");
    assert!(
        result.stderr.contains("reusing the lab resolved before"),
        "{}",
        result.stderr
    );
}
