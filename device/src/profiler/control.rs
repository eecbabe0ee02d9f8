//! The control socket: a tiny line protocol on a UNIX socket of its own, served by one
//! thread. A client sends one request line and reads the answer until the server closes:
//!
//! * `stats` — the text table; `stats json` — the same as JSON
//! * `svg <device> <qp>` — the SVG histogram of one QP
//! * `profile` — whether stage timing is on; `profile on` / `profile off` — switch it
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
}

const HELP: &str = "requests: stats | stats json | svg <device> <qp> | profile [on|off] | help\n";

/// The answer to one request line (without its newline).
pub fn answer(target: &dyn Target, request: &str) -> String {
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
