//! The control socket: a tiny line protocol on a UNIX socket of its own, served by one
//! thread. A client sends one request line and reads the answer until the server closes:
//!
//! * `stats` — the text table; `stats json` — the same as JSON
//! * `svg <device> <qp>` — the SVG histogram of one QP
//! * `profile` — whether stage timing is on; `profile on` / `profile off` — switch it
//! * `help` — this list
//!
//! Anything else is answered with one line starting `error: `. A client that sends nothing
//! is dropped after [`IO_TIMEOUT`], so it cannot hold the thread. The fabric lock is taken
//! only to copy the figures out (`Fabric::profile`) or flip the switch.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use log::{debug, warn};

use super::Snapshot;
use crate::vfio::fabric::Fabric;
use crate::vfio::listener::Listener;

/// How long the server waits for a request line, and for the client to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request accepted (bytes, newline included).
pub const MAX_REQUEST: usize = 256;

/// Most bytes of an overlong request read (and dropped) before answering it.
const MAX_DRAIN: u64 = 64 << 10;

/// Pause after a failed `accept()`, so a persistent failure does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// What the control socket reads and switches.
pub trait Target {
    fn snapshot(&self) -> Snapshot;
    fn set_profiling(&self, on: bool);
}

impl Target for Fabric {
    fn snapshot(&self) -> Snapshot {
        self.profile()
    }

    fn set_profiling(&self, on: bool) {
        Fabric::set_profiling(self, on);
    }
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

/// Serves the control socket forever, one client at a time.
pub fn serve(listener: &Listener, target: &dyn Target) -> ! {
    loop {
        match listener.accept() {
            Ok(stream) => {
                if let Err(e) = handle(stream, target) {
                    debug!("control client: {e}");
                }
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::pvrdma::DeviceConfig;
    use crate::vfio::listener;

    fn fabric() -> Fabric {
        let fabric = Fabric::new();
        fabric.add_device(DeviceConfig::default());
        fabric.add_device(DeviceConfig::default());
        fabric
    }

    #[test]
    fn requests_and_malformed_requests() {
        let f = fabric();
        assert!(answer(&f, "stats").starts_with("profiling: off"));
        assert!(answer(&f, "stats json").contains("\"devices\""));
        assert_eq!(answer(&f, "profile on"), "ok: profiling on\n");
        assert_eq!(answer(&f, "profile"), "profiling on\n");
        assert!(f.profile().profiling);
        assert_eq!(answer(&f, "profile off"), "ok: profiling off\n");
        assert!(!f.profile().profiling);
        assert!(answer(&f, "help").starts_with("requests:"));
        for bad in [
            "",
            "   ",
            "stat",
            "stats xml",
            "svg",
            "svg 0",
            "svg x 2",
            "svg 0 -1",
            "svg 0 99999999999",
            "svg 0 2 3",
            "profile maybe",
            "\u{0}\u{7f}é",
        ] {
            let reply = answer(&f, bad);
            assert!(reply.starts_with("error: "), "{bad:?} → {reply:?}");
            assert_eq!(reply.lines().count(), 1, "{bad:?} → {reply:?}");
        }
        // No QPs yet: the SVG of any QP is an error, not a picture.
        assert_eq!(answer(&f, "svg 0 2"), "error: device 0 has no QP 2\n");
        assert_eq!(answer(&f, "svg 9 2"), "error: device 9 has no QP 2\n");
    }

    #[test]
    fn over_the_socket_a_silent_client_does_not_block_the_next_one() {
        let dir = std::env::temp_dir().join(format!(
            "pvrdma-control-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("control.sock");
        let server = listener::listen(&path, false).expect("listen");
        let target = Arc::new(fabric());
        let t = Arc::clone(&target);
        thread::spawn(move || serve(&server, &*t));

        // Connects and says nothing.
        let silent = UnixStream::connect(&path).expect("connect");
        let started = Instant::now();
        let table = request(&path, "stats", Duration::from_secs(10)).expect("stats");
        assert!(table.starts_with("profiling: off"), "{table}");
        assert!(started.elapsed() < IO_TIMEOUT + Duration::from_secs(5));
        // The silent client was told why it was dropped.
        let mut reply = String::new();
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (&silent).read_to_string(&mut reply).expect("read");
        assert!(reply.starts_with("error: no request"), "{reply:?}");

        // Garbage and an overlong line get an error line, and the server carries on.
        let reply = request(&path, "\u{fffd}garbage", Duration::from_secs(10)).expect("reply");
        assert!(reply.starts_with("error: unknown request"), "{reply:?}");
        let long = "x".repeat(MAX_REQUEST * 4);
        let reply = request(&path, &long, Duration::from_secs(10)).expect("reply");
        assert!(reply.starts_with("error: request longer"), "{reply:?}");
        let mut raw = UnixStream::connect(&path).expect("connect");
        raw.write_all(&[0xff, 0xfe, b'\n']).expect("write");
        let mut reply = String::new();
        raw.read_to_string(&mut reply).expect("read");
        assert_eq!(reply, "error: the request is not UTF-8\n");
        assert_eq!(
            request(&path, "profile on", Duration::from_secs(10)).expect("reply"),
            "ok: profiling on\n"
        );
        assert!(target.profile().profiling);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
