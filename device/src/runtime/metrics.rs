//! The `--metrics` endpoint: a minimal HTTP/1.1 server on one thread that answers
//! `GET /metrics` with the Prometheus exposition of the profiler's figures
//! (`profiler::prometheus`). One request per connection, read with a bounded size and
//! time, so a slow or hostile scraper holds the thread for at most [`IO_TIMEOUT`] and
//! never reaches a device's lock for longer than a snapshot takes.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, warn};

use super::devices::Devices;
use super::fabric::Fabric;
use crate::profiler::prometheus::{self, CONTENT_TYPE};

/// How long a scraper may take to send its request and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request head read; anything longer is answered 431.
const MAX_HEAD: usize = 8192;

/// Pause after a failed `accept()`, so a persistent failure does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// The exposition of the fabric's figures now.
pub fn render(fabric: &Fabric, devices: &Devices) -> String {
    // Labels first: a device added between the two is left out of this scrape; one
    // removed is left out because its slot is retired.
    let labels = devices.labels();
    prometheus::exposition(&fabric.profile(), &labels)
}

/// Serves the endpoint forever, one connection at a time.
pub fn serve(listener: &TcpListener, fabric: &Fabric, devices: &Arc<Devices>) -> ! {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, || render(fabric, devices)) {
                    debug!("metrics client {peer}: {e}");
                }
            }
            Err(e) => {
                warn!("metrics accept failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
            }
        }
    }
}

/// The status line, content type and body for a request head.
fn respond(head: &str, body: impl FnOnce() -> String) -> (&'static str, &'static str, String) {
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, body()),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "vfio-user-pvrdma: the metrics are at /metrics\n".into(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        ),
    }
}

/// Reads one request head from `stream` (bounded) and writes the answer.
fn answer(mut stream: TcpStream, body: impl FnOnce() -> String) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() >= MAX_HEAD {
            break false;
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
    };
    let (status, content_type, body) = if complete {
        respond(&String::from_utf8_lossy(&head), body)
    } else {
        (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request head too large\n".into(),
        )
    };
    let is_head = head.starts_with(b"HEAD ");
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        reply.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&reply)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_and_bounded() {
        let ok = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || {
            "m 1\n".into()
        });
        assert_eq!(ok, ("200 OK", CONTENT_TYPE, "m 1\n".to_string()));
        assert_eq!(
            respond("GET /metrics?x=1 HTTP/1.1\r\n\r\n", String::new).0,
            "200 OK"
        );
        assert_eq!(
            respond("GET /other HTTP/1.1\r\n\r\n", String::new).0,
            "404 Not Found"
        );
        assert_eq!(
            respond("POST /metrics HTTP/1.1\r\n\r\n", String::new).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", String::new).0, "405 Method Not Allowed");
    }

    #[test]
    fn a_slow_or_oversized_request_does_not_hold_the_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        // Too long a head: 431, not an endless read.
        let writer = thread::spawn(move || {
            let mut client = TcpStream::connect(address).expect("connect");
            let _ = client.write_all(&vec![b'a'; MAX_HEAD + 10]);
            let mut reply = String::new();
            let _ = client.read_to_string(&mut reply);
            reply
        });
        let (stream, _) = listener.accept().expect("accept");
        answer(stream, || unreachable!("no body for a bad request")).expect("answer");
        let reply = writer.join().expect("client");
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        // Silent: the read times out after IO_TIMEOUT.
        let _silent = TcpStream::connect(address).expect("connect");
        let (stream, _) = listener.accept().expect("accept");
        let started = std::time::Instant::now();
        assert!(answer(stream, String::new).is_err());
        assert!(started.elapsed() < IO_TIMEOUT + Duration::from_secs(2));
    }
}
