//! The vfio-user-pvrdma server process of a lab: one process serving one socket per guest, as
//! the devices of one process form one fabric.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::child;
use super::error::{LabError, Result};

pub struct ServerProcess {
    child: Child,
    sockets: Vec<PathBuf>,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `binary` with one `--socket` per path and waits until every socket exists.
    pub fn start(
        binary: &Path,
        sockets: Vec<PathBuf>,
        args: &[String],
        log: PathBuf,
    ) -> Result<ServerProcess> {
        ServerProcess::start_in(None, binary, sockets, args, log)
    }

    /// [`ServerProcess::start`] inside network namespace `netns` (a lab "host").
    pub fn start_in(
        netns: Option<&str>,
        binary: &Path,
        sockets: Vec<PathBuf>,
        args: &[String],
        log: PathBuf,
    ) -> Result<ServerProcess> {
        let log_file =
            File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let mut command = match netns {
            // `ip netns exec` execs the server in the namespace: the child is the server.
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        for socket in &sockets {
            command.arg("--socket").arg(socket);
        }
        command.args(args);
        command
            .env(
                "RUST_LOG",
                std::env::var("PVRDMA_SERVER_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(LabError::io("duplicating the server log"))?,
            )
            .stderr(log_file);
        let child = child::spawn_tied(&mut command)
            .map_err(LabError::io(format!("starting {}", binary.display())))?;
        let mut server = ServerProcess {
            child,
            sockets,
            log,
        };
        server.wait_listening(Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.sockets.iter().all(|socket| socket.exists()) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LabError::Setup(format!(
                    "the PVRDMA server exited with {status} before listening:\n{}",
                    self.log_text()
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::Setup(format!(
                    "the PVRDMA server did not create its sockets within {timeout:?}:\n{}",
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server outright (SIGKILL), as a crash would: nothing is cleaned up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then checks the clean shutdown the server promises: exit status 0 and no
    /// socket file left behind.
    pub fn shut_down(mut self) -> Result<()> {
        let status = child::stop(&mut self.child, Signal::SIGTERM, Duration::from_secs(5));
        let left: Vec<_> = self
            .sockets
            .iter()
            .filter(|socket| socket.exists())
            .collect();
        match status {
            Some(status) if status.success() && left.is_empty() => Ok(()),
            Some(status) => Err(LabError::Setup(format!(
                "the PVRDMA server exited with {status} on SIGTERM, leaving {left:?}:\n{}",
                self.log_text()
            ))),
            None => Err(LabError::Setup(format!(
                "the PVRDMA server ignored SIGTERM for 5 s and was killed:\n{}",
                self.log_text()
            ))),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        child::stop(&mut self.child, Signal::SIGTERM, Duration::from_secs(5));
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}
