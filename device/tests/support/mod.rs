//! Helpers for tests that run the real `vfio-user-pvrdma` binary.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous: debug builds on a loaded CI machine.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "vfio-user-pvrdma-{tag}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("create a fresh temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server binary under test with its stderr (the log) collected.
pub struct ServerProcess {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
    /// Lines before this index were consumed by an earlier `wait_for_line`.
    cursor: usize,
}

impl ServerProcess {
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma")).args(args))
    }

    /// [`ServerProcess::start`] with the descriptor limit (soft and hard) at `fds`, through
    /// util-linux's `prlimit`.
    #[allow(dead_code)] // Not every suite that shares this module uses it.
    pub fn start_with_fd_limit<I, S>(fds: u32, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={fds}:{fds}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
            .args(args);
        Self::spawn(&mut command)
    }

    /// [`ServerProcess::start`] with `listener` as its descriptor 3, the way a service
    /// manager passes a socket: with `activated`, as systemd's socket activation does
    /// (`LISTEN_PID`, `LISTEN_FDS=1`), otherwise for the server to be told `--fd 3`.
    #[allow(dead_code)] // Not every suite that shares this module uses it.
    pub fn start_with_socket_fd<I, S>(listener: UnixListener, activated: bool, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        // The shell moves the socket from its stdin to descriptor 3 and execs the server,
        // which keeps the shell's process ID, the one LISTEN_PID must name.
        let script = if activated {
            "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" \"$@\" 3<&0 0</dev/null"
        } else {
            "exec \"$0\" \"$@\" 3<&0 0</dev/null"
        };
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
            .args(args);
        Self::spawn_with_stdin(
            &mut command,
            Stdio::from(std::os::fd::OwnedFd::from(listener)),
        )
    }

    fn spawn(command: &mut Command) -> Self {
        Self::spawn_with_stdin(command, Stdio::null())
    }

    fn spawn_with_stdin(command: &mut Command, stdin: Stdio) -> Self {
        let mut child = command
            .env("RUST_LOG", "vfio_user_pvrdma=debug,info")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vfio-user-pvrdma");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = channel();
        // Drain stderr continuously so the server never blocks on logging.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
            cursor: 0,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// Waits for a log line containing `needle` after the previous match; returns that line.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(pos) = self.log[self.cursor..]
                .iter()
                .position(|line| line.contains(needle))
            {
                self.cursor += pos + 1;
                return self.log[self.cursor - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no log line with {needle:?}; log:\n{}", self.log())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "server exited before logging {needle:?}; log:\n{}",
                        self.log()
                    )
                }
            }
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        kill(self.pid(), signal).expect("signal the server");
        self.wait_exit()
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far.
    pub fn log(&mut self) -> String {
        self.drain();
        self.log.join("\n")
    }

    fn drain(&mut self) {
        // After exit the reader thread finishes shortly; collect what it has.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.log.push(line);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}
