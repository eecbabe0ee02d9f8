//! A "service host" for the package's tests: the project's Debian package installed into a
//! copy of the lab's service root (guest-tests/image/service-root), whose systemd boots as
//! PID 1 of a container (guest-tests/image/boot-systemd).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above guest-tests")
        .to_path_buf()
}

/// Runs one of the project's scripts; its last line of output (the path it prints).
pub fn script(path: &str) -> PathBuf {
    let out = Command::new(workspace().join(path))
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {path}: {e}"));
    assert!(out.status.success(), "{path} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap_or_default().trim())
}

/// Runs `command` in the root with chroot; its stdout, or why it failed.
pub fn in_root(root: &Path, command: &str) -> Result<String, String> {
    let out = Command::new("chroot")
        .arg(root)
        .args(["sh", "-c", command])
        .env("MANWIDTH", "100")
        .output()
        .map_err(|e| format!("chroot: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{command:?} exited {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// systemd as PID 1 of a container over a root; killed (with everything it started) on drop.
pub struct Container {
    script: Child,
    console: PathBuf,
}

impl Container {
    pub fn boot(root: &Path, run: &Path, console: &Path) -> Container {
        // `script` gives systemd a terminal for its console; its stdin stays open until drop.
        let command = format!(
            "{} {} {}",
            workspace().join("guest-tests/image/boot-systemd").display(),
            root.display(),
            run.display()
        );
        let script = Command::new("script")
            .args(["-q", "-f", "-c", &command])
            .arg(console)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start script(1) for the container's console");
        Container {
            script,
            console: console.to_path_buf(),
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The terminal's hang-up ends unshare, whose --kill-child ends the container.
        let _ = self.script.stdin.take().map(|mut stdin| stdin.flush());
        let _ = self.script.kill();
        let _ = self.script.wait();
    }
}

pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{what}: not within {timeout:?}"))
}

/// The server process systemd started, by its command line.
pub fn server_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .starts_with(b"/usr/bin/vfio-user-pvrdma\0--control")
                .then_some(pid)
        })
}

/// `vfio-user-pvrdma device ...` of this build, against the container's control socket.
pub fn device(control: &Path, args: &[&str]) -> Result<String, String> {
    let binary = guest_tests::lab::server_binary().map_err(|e| e.to_string())?;
    let out = Command::new(binary)
        .arg("device")
        .arg(args[0])
        .arg("--control")
        .arg(control)
        .args(&args[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Container {
    /// The PID (in the host's namespace) of the container's systemd.
    pub fn systemd_pid(&self, root: &Path) -> Option<u32> {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let ours = std::fs::read_link(entry.path().join("root")).ok()? == root;
                (ours && cmdline.starts_with(b"/usr/lib/systemd/systemd\0--system")).then_some(pid)
            })
    }

    /// Runs `command` inside the container (its namespaces and root), as its root user.
    pub fn run(&self, root: &Path, command: &str) -> Result<String, String> {
        let pid = self
            .systemd_pid(root)
            .ok_or("the container's systemd is not running")?;
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-p", "-u", "-i", "-r", "-w"])
            .args(["sh", "-c", command])
            .output()
            .map_err(|e| format!("nsenter: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{command:?} exited {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// A fresh copy of the service root in `work` with this build's package installed and its
/// socket unit enabled; returns the root.
pub fn root_with_package(work: &Path) -> PathBuf {
    // scripts/test builds the package once and names it; by hand, the test builds it.
    let deb = std::env::var_os("PVRDMA_DEB")
        .map(PathBuf::from)
        .filter(|deb| deb.is_file())
        .unwrap_or_else(|| script("scripts/package"));
    let cached_root = script("guest-tests/image/service-root");
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work.join("run")).expect("the run folder");
    let root = work.join("root");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&cached_root)
        .arg(&root)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the service root");
    std::fs::copy(&deb, root.join("tmp/package.deb")).expect("the package into the root");
    let installed = in_root(
        &root,
        "dpkg -i /tmp/package.deb && systemctl enable vfio-user-pvrdma.socket",
    );
    assert!(installed.is_ok(), "installing the package: {installed:?}");
    root
}
