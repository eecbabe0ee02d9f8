//! Child processes (QEMU, the PVRDMA server) that can never outlive the test that started them.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Spawns `command` so that the kernel kills it when the spawning thread dies, even if the
/// test process is killed outright and no destructor runs. The lab spawns every child from
/// the test's own thread, which outlives them all.
pub fn spawn_tied(command: &mut Command) -> std::io::Result<Child> {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Sends `signal`, waits up to `grace` for the child to exit, then kills it. Returns the exit
/// status when the child exited on its own within the grace period.
pub fn stop(
    child: &mut Child,
    signal: Signal,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = kill(pid, signal);
    if let Some(status) = wait_for_exit(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Polls the child until it exits or `timeout` passes.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}
