//! The guest side of the lab: serves requests from the host fixture on a virtio-serial port.
//!
//! It runs commands with `/bin/sh -c` in their own process group, so a timeout kills the whole
//! pipeline, and it never waits for pipe EOF longer than a short grace period after the shell
//! exits: a test may leave a server running in the background that still holds the pipes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::protocol::{self, ExecResult, Frame};

/// virtio-serial port name the launcher gives the agent channel (`virtserialport,name=`).
pub const PORT_NAME: &str = "pvrdma.agent";

/// How long to keep collecting output after the shell itself has exited.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);

/// Output kept per stream; the rest is dropped and a marker says so.
const MAX_OUTPUT: usize = (protocol::MAX_PAYLOAD as usize / 2) - 64;

/// Finds the character device of the named virtio-serial port through sysfs (there is no udev
/// in the guest to make the `/dev/virtio-ports/NAME` link).
pub fn find_port(sysfs: &Path, name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir(sysfs.join("class/virtio-ports"))? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name}"),
    ))
}

/// Serves requests until the host closes the channel or asks for power-off.
pub fn serve(port: &Path) -> io::Result<()> {
    let mut input = OpenOptions::new().read(true).write(true).open(port)?;
    let mut output = input.try_clone()?;
    Frame::new(protocol::HELLO, 0, protocol::HELLO_TEXT.into()).write_to(&mut output)?;
    while let Some(request) = Frame::read_from(&mut input)? {
        let (kind, payload) = handle(&request);
        Frame::new(kind, request.id, payload).write_to(&mut output)?;
        if kind == protocol::OK {
            match request.kind {
                protocol::POWER_OFF => restart(nix::sys::reboot::RebootMode::RB_POWER_OFF),
                protocol::REBOOT => restart(nix::sys::reboot::RebootMode::RB_AUTOBOOT),
                _ => {}
            }
        }
    }
    Ok(())
}

fn handle(request: &Frame) -> (u8, Vec<u8>) {
    let result = match request.kind {
        protocol::EXEC => match protocol::decode_exec(&request.payload) {
            Some((timeout_ms, command)) => run(command, Duration::from_millis(timeout_ms.into()))
                .map(|result| (protocol::EXEC_DONE, result.encode())),
            None => Err(invalid("malformed EXEC request")),
        },
        protocol::READ_FILE => std::str::from_utf8(&request.payload)
            .map_err(|_| invalid("path is not UTF-8"))
            .and_then(read_file)
            .map(|data| (protocol::FILE_DATA, data)),
        protocol::WRITE_FILE => match protocol::decode_write_file(&request.payload) {
            Some((path, contents)) => {
                std::fs::write(path, contents).map(|()| (protocol::OK, vec![]))
            }
            None => Err(invalid("malformed WRITE_FILE request")),
        },
        protocol::POWER_OFF | protocol::REBOOT => Ok((protocol::OK, vec![])),
        other => Err(invalid(&format!("unknown request kind {other:#04x}"))),
    };
    result.unwrap_or_else(|e| (protocol::FAILED, e.to_string().into_bytes()))
}

fn read_file(path: &str) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    File::open(path)?
        .take(u64::from(protocol::MAX_PAYLOAD))
        .read_to_end(&mut data)?;
    Ok(data)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// Runs `command` with `/bin/sh -c`, killing its process group after `timeout`.
pub fn run(command: &str, timeout: Duration) -> io::Result<ExecResult> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());

    let (done_tx, done_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = done_tx.send(());
        status
    });
    let timed_out = done_rx.recv_timeout(timeout).is_err();
    if timed_out {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let status = waiter
        .join()
        .map_err(|_| io::Error::other("waiter thread panicked"))??;
    thread::sleep(OUTPUT_GRACE.min(timeout));
    Ok(ExecResult {
        status: shell_status(status),
        timed_out,
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

fn shell_status(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1)
}

type Collected = Arc<Mutex<Vec<u8>>>;

/// Reads a pipe on its own thread into a shared buffer, capped at MAX_OUTPUT.
fn collect(pipe: Option<impl Read + Send + 'static>) -> Collected {
    let buffer = Collected::default();
    if let Some(mut pipe) = pipe {
        let buffer = Arc::clone(&buffer);
        thread::spawn(move || {
            let mut chunk = [0u8; 16 << 10];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let Ok(mut kept) = buffer.lock() else { break };
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        });
    }
    buffer
}

fn take(buffer: &Collected) -> Vec<u8> {
    buffer
        .lock()
        .map(|mut kept| std::mem::take(&mut *kept))
        .unwrap_or_default()
}

/// Powers off or reboots the guest (the agent runs as root under tini).
fn restart(mode: nix::sys::reboot::RebootMode) -> ! {
    nix::unistd::sync();
    let error = nix::sys::reboot::reboot(mode);
    eprintln!("pvrdma-guest-agent: {mode:?} failed: {error:?}");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_output_and_status() {
        let result = run("echo out; echo err >&2; exit 3", Duration::from_secs(10)).unwrap();
        assert_eq!(result.stdout, b"out\n");
        assert_eq!(result.stderr, b"err\n");
        assert_eq!(result.status, 3);
        assert!(!result.timed_out);
    }

    #[test]
    fn run_kills_the_process_group_on_timeout() {
        let result = run("sleep 30 | cat", Duration::from_millis(200)).unwrap();
        assert!(result.timed_out);
        assert_eq!(result.status, 128 + 9);
    }

    #[test]
    fn run_does_not_wait_for_background_children_holding_the_pipes() {
        let started = std::time::Instant::now();
        let result = run("(sleep 5; echo late) & echo now", Duration::from_secs(10)).unwrap();
        assert_eq!(result.stdout, b"now\n");
        assert_eq!(result.status, 0);
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn handle_answers_unknown_and_malformed_requests_with_failures() {
        let (kind, message) = handle(&Frame::new(b'?', 1, vec![]));
        assert_eq!(kind, protocol::FAILED);
        assert!(String::from_utf8_lossy(&message).contains("unknown request"));
        let (kind, _) = handle(&Frame::new(protocol::EXEC, 2, vec![1]));
        assert_eq!(kind, protocol::FAILED);
        let (kind, _) = handle(&Frame::new(
            protocol::READ_FILE,
            3,
            b"/nonexistent/x".to_vec(),
        ));
        assert_eq!(kind, protocol::FAILED);
    }

    #[test]
    fn find_port_matches_by_name() {
        let root = std::env::temp_dir().join(format!("agent-sysfs-{}", std::process::id()));
        let port = root.join("class/virtio-ports/vport2p1");
        std::fs::create_dir_all(&port).unwrap();
        std::fs::write(port.join("name"), "pvrdma.agent\n").unwrap();
        assert_eq!(
            find_port(&root, PORT_NAME).unwrap(),
            Path::new("/dev/vport2p1")
        );
        assert!(find_port(&root, "other").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
