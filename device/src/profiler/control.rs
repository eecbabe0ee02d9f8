//! The control socket: a tiny line protocol on a UNIX socket of its own, served by one
//! thread. A client sends one request line and reads the answer until the server closes:
//!
//! * `stats` — the text table; `stats json` — the same as JSON
//! * `svg <device> <qp>` — the SVG histogram of one QP
//! * `profile` — whether stage timing is on; `profile on` / `profile off` — switch it
//! * `device list` — the devices served, a line each: slot, node GUID, attached or idle,
//!   socket
//! * `device add [guid=G] PATH` — serve a new device on a new socket at PATH
//! * `device remove [force] PATH` — stop the device on PATH (refused while a client is
//!   attached, unless forced)
//! * `help` — this list
//!
//! Anything else is answered with one line starting `error: `. A client that sends nothing
//! is dropped after [`IO_TIMEOUT`], so it cannot hold the thread. The server loop and what it
//! reads (the fabric) are the runtime's (`runtime::control`); this module only speaks the
//! protocol, against any [`Target`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::Snapshot;

/// How long the server waits for a request line, and for the client to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request accepted (bytes, newline included).
pub const MAX_REQUEST: usize = 256;

/// Most bytes of an overlong request read (and dropped) before answering it.
const MAX_DRAIN: u64 = 64 << 10;

/// What the control socket reads and switches.
pub trait Target {
    fn snapshot(&self) -> Snapshot;
    fn set_profiling(&self, on: bool);
    /// Runs a `device` request; the answer's text, or why it failed.
    fn device(&self, _request: DeviceRequest<'_>) -> Result<String, String> {
        Err("this server does not add or remove devices".into())
    }
}

/// A `device` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest<'a> {
    List,
    Add {
        path: &'a str,
        guid: Option<&'a str>,
    },
    Remove {
        path: &'a str,
        force: bool,
    },
}

const HELP: &str = "requests: stats | stats json | svg <device> <qp> | profile [on|off] | \
                    device list | device add [guid=G] PATH | device remove [force] PATH | help\n";

/// The `device` request in `request`, if it is one (paths may hold spaces: they run to
/// the end of the line).
fn device_request(request: &str) -> Option<Result<DeviceRequest<'_>, String>> {
    let rest = request.strip_prefix("device")?;
    let rest = rest.trim_start();
    let usage = || {
        Err(format!(
            "usage: {}",
            HELP.trim_start_matches("requests: ").trim()
        ))
    };
    Some(if rest == "list" {
        Ok(DeviceRequest::List)
    } else if let Some(args) = rest.strip_prefix("add ") {
        let args = args.trim_start();
        match args.strip_prefix("guid=").and_then(|a| a.split_once(' ')) {
            Some((guid, path)) if !path.trim().is_empty() => Ok(DeviceRequest::Add {
                path: path.trim(),
                guid: Some(guid),
            }),
            Some(_) => usage(),
            None if args.starts_with("guid=") || args.is_empty() => usage(),
            None => Ok(DeviceRequest::Add {
                path: args,
                guid: None,
            }),
        }
    } else if let Some(args) = rest.strip_prefix("remove ") {
        let args = args.trim_start();
        let (force, path) = match args.strip_prefix("force ") {
            Some(path) => (true, path.trim_start()),
            None => (false, args),
        };
        if path.is_empty() {
            usage()
        } else {
            Ok(DeviceRequest::Remove { path, force })
        }
    } else {
        usage()
    })
}

/// The answer to one request line (without its newline).
pub fn answer(target: &dyn Target, request: &str) -> String {
    if let Some(parsed) = device_request(request) {
        return match parsed.and_then(|request| target.device(request)) {
            Ok(mut text) => {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text
            }
            Err(e) => format!("error: {}\n", e.replace('\n', " ")),
        };
    }
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => target.snapshot().table(),
        ["stats", "json"] => {
            let mut json = target.snapshot().json();
            json.push('\n');
            json
        }
        ["svg", device, qp] => {
            let (Ok(device), Ok(qp)) = (device.parse::<usize>(), qp.parse::<u32>()) else {
                return "error: usage: svg <device> <qp> (two non-negative integers)\n".into();
            };
            let snapshot = target.snapshot();
            match snapshot.qp(device, qp) {
                Some(stats) => super::svg::render(device, qp, stats),
                None => format!("error: device {device} has no QP {qp}\n"),
            }
        }
        ["profile"] => format!(
            "profiling {}\n",
            if target.snapshot().profiling {
                "on"
            } else {
                "off"
            }
        ),
        ["profile", state @ ("on" | "off")] => {
            target.set_profiling(*state == "on");
            format!("ok: profiling {state}\n")
        }
        ["help"] => HELP.into(),
        [] => format!("error: empty request; {HELP}"),
        _ => format!(
            "error: unknown request {:?}; {HELP}",
            request.chars().take(64).collect::<String>()
        ),
    }
}

/// Reads one request from `stream` (bounded in size and time) and writes its answer.
pub fn handle(stream: UnixStream, target: &dyn Target) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = Vec::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST as u64)).read_until(b'\n', &mut line);
    let response = match read {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            format!("error: no request within {} s\n", IO_TIMEOUT.as_secs())
        }
        Err(e) => return Err(e),
        Ok(_) if line.len() >= MAX_REQUEST && !line.ends_with(b"\n") => {
            // Read the rest of the line (bounded): closing with unread input would reset
            // the connection and lose the answer.
            let mut rest = Vec::new();
            let _ = BufReader::new((&stream).take(MAX_DRAIN)).read_until(b'\n', &mut rest);
            format!("error: request longer than {MAX_REQUEST} bytes\n")
        }
        Ok(_) => match std::str::from_utf8(&line) {
            Ok(text) => answer(target, text.trim()),
            Err(_) => "error: the request is not UTF-8\n".into(),
        },
    };
    (&stream).write_all(response.as_bytes())?;
    Ok(())
}

/// The client side: sends `request` to the control socket at `path` and returns the answer.
pub fn request(path: &Path, request: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
