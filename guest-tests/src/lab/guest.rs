//! One lab guest: its QEMU process, its console log and the channel to its agent.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::child;
use super::error::{LabError, Result};
use crate::protocol::{self, ExecResult, Frame};

/// Default limit for one command; long suites pass their own.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the host waits beyond the agent's own timeout before declaring the guest hung.
const AGENT_SLACK: Duration = Duration::from_secs(15);

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// How to start one guest (see `qemu/launch-guest`).
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub ip: String,
    pub mac: String,
    pub pvrdma_socket: PathBuf,
    pub segment: PathBuf,
    pub port: PathBuf,
    pub memory_mib: u32,
    pub allow_reboot: bool,
}

pub struct Guest {
    name: String,
    ip: String,
    qemu: Child,
    console: PathBuf,
    qemu_log: PathBuf,
    agent: Option<UnixStream>,
    replies: Option<Receiver<Frame>>,
    next_id: u32,
}

impl Guest {
    /// Starts QEMU through the launcher. The agent connects later: see [`Guest::wait_ready`].
    pub fn launch(
        launcher: &Path,
        run_dir: &Path,
        initrd: &Path,
        spec: &GuestSpec,
    ) -> Result<(Guest, UnixListener)> {
        let console = run_dir.join(format!("{}.console.log", spec.name));
        let qemu_log = run_dir.join(format!("{}.qemu.log", spec.name));
        let agent_path = run_dir.join(format!("{}.agent.sock", spec.name));
        let listener = UnixListener::bind(&agent_path).map_err(LabError::io(format!(
            "listening at {}",
            agent_path.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(LabError::io("configuring the agent listener"))?;
        let log = File::create(&qemu_log)
            .map_err(LabError::io(format!("creating {}", qemu_log.display())))?;
        let mut command = Command::new(launcher);
        command
            .arg("--name")
            .arg(&spec.name)
            .arg("--ip")
            .arg(&spec.ip)
            .arg("--mac")
            .arg(&spec.mac)
            .arg("--pvrdma-socket")
            .arg(&spec.pvrdma_socket)
            .arg("--segment")
            .arg(&spec.segment)
            .arg("--port")
            .arg(&spec.port)
            .arg("--agent")
            .arg(&agent_path)
            .arg("--console")
            .arg(&console)
            .arg("--memory")
            .arg(spec.memory_mib.to_string())
            .arg("--initrd")
            .arg(initrd)
            .args(spec.allow_reboot.then_some("--allow-reboot"))
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(LabError::io("duplicating the QEMU log"))?,
            )
            .stderr(log);
        let qemu = child::spawn_tied(&mut command)
            .map_err(LabError::io(format!("starting {}", launcher.display())))?;
        let guest = Guest {
            name: spec.name.clone(),
            ip: spec.ip.split('/').next().unwrap_or_default().to_string(),
            qemu,
            console,
            qemu_log,
            agent: None,
            replies: None,
            next_id: 1,
        };
        Ok((guest, listener))
    }

    /// Waits until QEMU has connected the agent channel and the agent has said hello.
    pub fn wait_ready(&mut self, listener: &UnixListener, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.boot_error(format!("accepting the agent channel: {e}"))),
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(self.boot_error(format!(
                    "QEMU did not connect the agent channel within {timeout:?}"
                )));
            }
            thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_nonblocking(false)
            .map_err(LabError::io("configuring the agent channel"))?;
        let reader = stream
            .try_clone()
            .map_err(LabError::io("duplicating the agent channel"))?;
        let (sender, replies) = mpsc::channel();
        thread::Builder::new()
            .name(format!("{}-agent", self.name))
            .spawn(move || read_frames(reader, &sender))
            .map_err(LabError::io("starting the agent reader"))?;
        self.agent = Some(stream);
        self.replies = Some(replies);
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.recv_frame(0, remaining) {
            Ok(hello)
                if hello.kind == protocol::HELLO
                    && hello.payload.starts_with(protocol::HELLO_TEXT.as_bytes()) =>
            {
                Ok(())
            }
            Ok(other) => {
                Err(self.boot_error(format!("unexpected first frame from the agent: {other:?}")))
            }
            Err(RecvError::Timeout) => {
                Err(self.boot_error(format!("the agent did not start within {timeout:?}")))
            }
            Err(RecvError::Closed) => {
                Err(self.boot_error("the agent channel closed during boot".into()))
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's IPv4 address on the lab segment.
    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// Runs `command` with `/bin/sh -c` in the guest, with the default timeout.
    pub fn run(&mut self, command: &str) -> Result<Output> {
        self.run_with_timeout(command, DEFAULT_COMMAND_TIMEOUT)
    }

    /// Runs `command`; an exit status other than 0 is an error carrying the output.
    pub fn check(&mut self, command: &str) -> Result<String> {
        let output = self.run(command)?;
        if output.status == 0 {
            Ok(output.stdout)
        } else {
            Err(LabError::CommandFailed {
                guest: self.name.clone(),
                command: command.into(),
                status: output.status,
                stdout: output.stdout,
                stderr: output.stderr,
            })
        }
    }

    /// Runs `command`; the agent kills it after `timeout` and that is reported as an error.
    pub fn run_with_timeout(&mut self, command: &str, timeout: Duration) -> Result<Output> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let reply = self.request(
            protocol::EXEC,
            protocol::encode_exec(timeout_ms, command),
            timeout + AGENT_SLACK,
            command,
        )?;
        let result = match reply.kind {
            protocol::EXEC_DONE => ExecResult::decode(&reply.payload)
                .ok_or_else(|| self.agent_error(format!("malformed reply to `{command}`")))?,
            _ => {
                return Err(self.agent_error(format!(
                    "`{command}` failed: {}",
                    String::from_utf8_lossy(&reply.payload)
                )));
            }
        };
        if result.timed_out {
            return Err(LabError::Timeout {
                guest: self.name.clone(),
                command: command.into(),
                timeout,
                console: self.console_tail(40),
            });
        }
        Ok(Output {
            status: result.status,
            stdout: String::from_utf8_lossy(&result.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        })
    }

    /// Copies a file out of the guest.
    pub fn copy_out(&mut self, guest_path: &str, host_path: &Path) -> Result<()> {
        let reply = self.request(
            protocol::READ_FILE,
            guest_path.into(),
            DEFAULT_COMMAND_TIMEOUT,
            guest_path,
        )?;
        if reply.kind != protocol::FILE_DATA {
            return Err(self.agent_error(format!(
                "reading {guest_path}: {}",
                String::from_utf8_lossy(&reply.payload)
            )));
        }
        std::fs::write(host_path, reply.payload)
            .map_err(LabError::io(format!("writing {}", host_path.display())))
    }

    /// Writes a file into the guest.
    pub fn write_file(&mut self, guest_path: &str, contents: &[u8]) -> Result<()> {
        let payload = protocol::encode_write_file(guest_path, contents);
        let reply = self.request(
            protocol::WRITE_FILE,
            payload,
            DEFAULT_COMMAND_TIMEOUT,
            guest_path,
        )?;
        if reply.kind == protocol::OK {
            Ok(())
        } else {
            Err(self.agent_error(format!(
                "writing {guest_path}: {}",
                String::from_utf8_lossy(&reply.payload)
            )))
        }
    }

    /// Powers the guest off through its agent and waits for QEMU to exit.
    pub fn power_off(&mut self, timeout: Duration) -> Result<()> {
        if self.agent.is_some() {
            self.request(protocol::POWER_OFF, Vec::new(), timeout, "power off")?;
        }
        match child::wait_for_exit(&mut self.qemu, timeout) {
            Some(_) => Ok(()),
            None => {
                Err(self.agent_error(format!("QEMU still running {timeout:?} after power-off")))
            }
        }
    }

    /// Reboots the guest (its QEMU must allow reboots, see `LabConfig::allow_reboot`) and
    /// waits until the agent of the new boot is ready.
    pub fn reboot(&mut self, timeout: Duration) -> Result<()> {
        self.request(
            protocol::REBOOT,
            Vec::new(),
            DEFAULT_COMMAND_TIMEOUT,
            "reboot",
        )?;
        match self.recv_frame(0, timeout) {
            Ok(hello) if hello.kind == protocol::HELLO => Ok(()),
            Ok(other) => Err(self.boot_error(format!("unexpected frame after reboot: {other:?}"))),
            Err(RecvError::Timeout) => Err(self.boot_error(format!(
                "the agent did not come back within {timeout:?} of the reboot"
            ))),
            Err(RecvError::Closed) => {
                Err(self.boot_error("QEMU exited instead of rebooting".into()))
            }
        }
    }

    /// Whether the guest's QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// The last `lines` lines of the guest's serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }

    /// The guest's whole serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn request(
        &mut self,
        kind: u8,
        payload: Vec<u8>,
        timeout: Duration,
        what: &str,
    ) -> Result<Frame> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let Some(agent) = self.agent.as_mut() else {
            return Err(self.agent_error("the guest has no agent channel".into()));
        };
        if let Err(e) = Frame::new(kind, id, payload).write_to(agent) {
            return Err(self.agent_error(format!("sending `{what}`: {e}")));
        }
        match self.recv_frame(id, timeout) {
            Ok(frame) => Ok(frame),
            Err(RecvError::Timeout) => Err(LabError::Timeout {
                guest: self.name.clone(),
                command: what.into(),
                timeout,
                console: self.console_tail(40),
            }),
            Err(RecvError::Closed) => {
                Err(self.agent_error(format!("the agent channel closed during `{what}`")))
            }
        }
    }

    /// The next frame with `id`; frames of earlier, abandoned requests are dropped.
    fn recv_frame(&self, id: u32, timeout: Duration) -> std::result::Result<Frame, RecvError> {
        let replies = self.replies.as_ref().ok_or(RecvError::Closed)?;
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(remaining) {
                Ok(frame) if frame.id == id => return Ok(frame),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(RecvError::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(RecvError::Closed),
            }
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.qemu.try_wait() {
            Ok(Some(status)) => Err(self.boot_error(format!(
                "QEMU exited with {status}: {}",
                std::fs::read_to_string(&self.qemu_log)
                    .unwrap_or_default()
                    .trim()
            ))),
            _ => Ok(()),
        }
    }

    fn boot_error(&self, reason: String) -> LabError {
        LabError::Boot {
            guest: self.name.clone(),
            reason,
            console: self.console_tail(40),
        }
    }

    fn agent_error(&self, message: String) -> LabError {
        let qemu = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        let message = if qemu.trim().is_empty() {
            message
        } else {
            format!("{message}\n--- QEMU ---\n{}", qemu.trim())
        };
        LabError::Agent {
            guest: self.name.clone(),
            message,
            console: self.console_tail(40),
        }
    }

    /// Kills QEMU at once (as a crash would); also used on every exit path of the lab.
    pub fn kill(&mut self) {
        self.agent = None;
        child::stop(&mut self.qemu, Signal::SIGKILL, Duration::from_secs(5));
    }
}

enum RecvError {
    Timeout,
    Closed,
}

fn read_frames(mut stream: UnixStream, sender: &mpsc::Sender<Frame>) {
    while let Ok(Some(frame)) = Frame::read_from(&mut stream) {
        if sender.send(frame).is_err() {
            break;
        }
    }
}

/// The last `lines` lines of a text file, reading at most its last 64 KiB.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
