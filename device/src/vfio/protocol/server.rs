//! The message loop: framing, payload consumption and replies.
//!
//! For each message: read the 16-byte header with any descriptors, check the
//! size, read the part of the payload the command needs and discard the
//! rest, run the handler, then reply (unless No_reply). Consuming the whole
//! payload before anything else is what keeps the stream in step whatever
//! the handler decides (the crate's bugs A and C).

use std::io::{self, Read};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use log::{debug, warn};
use thiserror::Error;

use super::handlers::{self, Reply, Request, Session};
use super::wire::{self, Header, flags};
use super::{DeviceBackend, Errno, MAX_MESSAGE_SIZE, MAX_MSG_FDS, socket};

/// Why serving a client stopped before it closed the connection cleanly.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// Reading or writing the socket failed.
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
    /// End of stream in the middle of a message.
    #[error("the client closed the connection in the middle of a message")]
    Truncated,
    /// The client stopped in the middle of a message for [`MESSAGE_TIMEOUT`]: it would
    /// hold the socket for ever, keeping the next client waiting in the backlog.
    #[error("the client stalled in the middle of a message for {MESSAGE_TIMEOUT:?}")]
    Stalled,
    /// A message size outside `16..=MAX_MESSAGE_SIZE`: where the next
    /// message starts is unknowable, so the connection cannot continue.
    #[error("message size {0} is outside 16..={MAX_MESSAGE_SIZE}")]
    BadMessageSize(u32),
    /// The device failed (for example its guest memory vanished): the client is dropped.
    #[error("the device failed: {0}")]
    DeviceFailed(String),
}

/// How long the rest of a message may take once its first byte arrived. A client sends a
/// message whole (QEMU does); one that stops halfway is dropped. Between messages a client
/// may be quiet for as long as it likes.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an I/O error is the socket's receive timeout expiring.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A header and the descriptors that came with it.
struct Incoming {
    header: Header,
    fds: Vec<OwnedFd>,
    /// More than [`MAX_MSG_FDS`] arrived; the extra ones are already closed.
    too_many_fds: bool,
}

/// Serves one client on `stream` until it disconnects.
///
/// Returns `Ok(())` when the client closes the connection between messages.
/// Nothing tied to the client is cleaned up here: the caller releases what
/// the backend holds for it (DMA windows, eventfds).
pub fn serve_client<B: DeviceBackend + ?Sized>(
    stream: &UnixStream,
    backend: &mut B,
) -> Result<(), ConnectionError> {
    serve_client_spinning(stream, backend, Duration::ZERO)
}

/// [`serve_client`], spinning for up to `spin` for the client's next message before
/// blocking after each reply the backend expects a quick follow-up to
/// ([`DeviceBackend::expects_follow_up`], see [`socket::spin_until_readable`]): the thread
/// burns at most `spin` of CPU per such message and none while the client is quiet.
pub fn serve_client_spinning<B: DeviceBackend + ?Sized>(
    stream: &UnixStream,
    backend: &mut B,
    spin: Duration,
) -> Result<(), ConnectionError> {
    let mut session = Session::default();
    // The timeout is set once, not per message: between messages an expiry just means the
    // client is quiet (read_header waits on), within one it means the client stalled.
    stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    while let Some(incoming) = read_header(stream)? {
        serve_message(stream, backend, &mut session, incoming)?;
        backend.after_reply();
        if let Some(reason) = backend.failure() {
            return Err(ConnectionError::DeviceFailed(reason));
        }
        if backend.expects_follow_up() {
            socket::spin_until_readable(stream, spin);
        }
    }
    Ok(())
}

/// Reads one header, collecting descriptors from every `recvmsg()` it
/// takes. `None` at a clean end of stream.
fn read_header(stream: &UnixStream) -> Result<Option<Incoming>, ConnectionError> {
    let mut raw = [0u8; wire::HEADER_SIZE];
    let mut filled = 0;
    let mut fds = Vec::new();
    let mut too_many_fds = false;
    while let Some(rest) = raw.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let (read, received) = match socket::recv_with_fds(stream, rest) {
            Ok(got) => got,
            Err(e) if timed_out(&e) && filled == 0 => continue,
            Err(e) if timed_out(&e) => return Err(ConnectionError::Stalled),
            Err(e) => return Err(e.into()),
        };
        for fd in received {
            if fds.len() < MAX_MSG_FDS {
                fds.push(fd);
            } else {
                // Dropping closes it: nothing we refuse stays open.
                too_many_fds = true;
            }
        }
        if read == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(ConnectionError::Truncated)
            };
        }
        filled = filled.saturating_add(read);
    }
    Ok(Some(Incoming {
        header: Header::parse(&raw),
        fds,
        too_many_fds,
    }))
}

fn serve_message<B: DeviceBackend + ?Sized>(
    stream: &UnixStream,
    backend: &mut B,
    session: &mut Session,
    incoming: Incoming,
) -> Result<(), ConnectionError> {
    let header = incoming.header;
    let payload_len = header
        .size
        .checked_sub(wire::HEADER_SIZE as u32)
        .filter(|_| header.size <= MAX_MESSAGE_SIZE)
        .and_then(|len| usize::try_from(len).ok());
    let Some(payload_len) = payload_len else {
        warn!(
            "message {} (command {}) has size {}; dropping the client",
            header.id, header.command, header.size
        );
        // Best effort: the connection is closed whatever happens.
        if header.message_type() == flags::TYPE_COMMAND {
            let _ = respond(stream, &header, Err(Errno::EINVAL));
        }
        return Err(ConnectionError::BadMessageSize(header.size));
    };

    match header.message_type() {
        flags::TYPE_COMMAND => {}
        flags::TYPE_REPLY => {
            // We never send commands, so no reply can be expected.
            discard(stream, payload_len)?;
            warn!(
                "ignoring an unsolicited reply (id {}, command {})",
                header.id, header.command
            );
            return Ok(());
        }
        other => {
            discard(stream, payload_len)?;
            warn!("message {} has unknown type {other}", header.id);
            return respond(stream, &header, Err(Errno::EINVAL));
        }
    }

    let command = wire::Command::from_wire(header.command);
    let kept = payload_len.min(handlers::payload_limit(command));
    // Bounded by payload_limit(), never by the client's size field alone.
    let mut payload = vec![0u8; kept];
    read_exact(stream, &mut payload)?;
    discard(stream, payload_len.saturating_sub(kept))?;

    let request = Request {
        header,
        command,
        payload: &payload,
        payload_len,
        fds: incoming.fds,
        too_many_fds: incoming.too_many_fds,
    };
    let result = handlers::handle(backend, session, request);
    respond(stream, &header, result)
}

fn read_exact(stream: &UnixStream, buf: &mut [u8]) -> Result<(), ConnectionError> {
    let mut reader = stream;
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ConnectionError::Truncated,
        _ if timed_out(&e) => ConnectionError::Stalled,
        _ => ConnectionError::Io(e),
    })
}

/// Reads and drops `len` payload bytes without buffering them.
fn discard(stream: &UnixStream, len: usize) -> Result<(), ConnectionError> {
    let len = u64::try_from(len).map_err(|_| ConnectionError::Truncated)?;
    let copied = io::copy(&mut stream.take(len), &mut io::sink()).map_err(|e| {
        if timed_out(&e) {
            ConnectionError::Stalled
        } else {
            ConnectionError::Io(e)
        }
    })?;
    if copied == len {
        Ok(())
    } else {
        Err(ConnectionError::Truncated)
    }
}

/// Sends the reply to `header`, or nothing if the client set No_reply.
///
/// With No_reply, QEMU has already forgotten the message (posted writes are
/// freed once sent), so even an error reply would only make it log
/// "unexpected reply"; failures are logged here instead.
fn respond(
    stream: &UnixStream,
    header: &Header,
    result: Result<Reply<'_>, Errno>,
) -> Result<(), ConnectionError> {
    if header.no_reply() {
        match &result {
            Ok(_) => debug!(
                "command {} id {} done (no reply)",
                header.command, header.id
            ),
            Err(errno) => warn!(
                "command {} id {} failed with {errno}; not reported (No_reply)",
                header.command, header.id
            ),
        }
        return Ok(());
    }
    match result {
        Ok(reply) => {
            let size = u32::try_from(reply.payload.len())
                .ok()
                .and_then(|len| len.checked_add(wire::HEADER_SIZE as u32));
            let Some(size) = size else {
                // Impossible within our limits; refuse rather than lie.
                return send(
                    stream,
                    &error_header(header, Errno::EOVERFLOW).encode(),
                    None,
                );
            };
            let reply_header = Header {
                id: header.id,
                command: header.command,
                size,
                flags: flags::TYPE_REPLY,
                error: 0,
            };
            let mut bytes =
                Vec::with_capacity(wire::HEADER_SIZE.saturating_add(reply.payload.len()));
            bytes.extend_from_slice(&reply_header.encode());
            bytes.extend_from_slice(&reply.payload);
            send(stream, &bytes, reply.fd)
        }
        Err(errno) => {
            debug!(
                "command {} id {} failed with {errno}",
                header.command, header.id
            );
            send(stream, &error_header(header, errno).encode(), None)
        }
    }
}

/// A header-only error reply. errno 0 means "no information" on the wire,
/// which QEMU reads as success for several commands (bug B), so it is
/// replaced by EIO.
fn error_header(header: &Header, errno: Errno) -> Header {
    let error = u32::try_from(errno as i32)
        .ok()
        .filter(|&e| e != 0)
        .unwrap_or(libc::EIO as u32);
    Header {
        id: header.id,
        command: header.command,
        size: wire::HEADER_SIZE as u32,
        flags: flags::TYPE_REPLY | flags::ERROR,
        error,
    }
}

fn send(
    stream: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ConnectionError> {
    socket::send_all(stream, bytes, fd).map_err(ConnectionError::Io)
}

/// How long a turned-away client may take to send its first message.
const TURN_AWAY_WAIT: Duration = Duration::from_millis(500);

/// Tells a client that arrived while another one is attached that the device is busy:
/// its first message (QEMU's VERSION) is answered with `errno` and the connection closed,
/// so QEMU fails with "version reply: Device or resource busy" instead of waiting in the
/// backlog. Bounded: a client that says nothing within [`TURN_AWAY_WAIT`], or more than a
/// VERSION's worth, is simply closed.
pub fn turn_away(stream: &UnixStream, errno: Errno) -> Result<(), ConnectionError> {
    stream.set_read_timeout(Some(TURN_AWAY_WAIT))?;
    stream.set_write_timeout(Some(TURN_AWAY_WAIT))?;
    let mut raw = [0u8; wire::HEADER_SIZE];
    read_exact(stream, &mut raw)?;
    let header = Header::parse(&raw);
    let payload = header
        .size
        .checked_sub(wire::HEADER_SIZE as u32)
        .and_then(|len| usize::try_from(len).ok())
        .filter(|&len| len <= super::MAX_VERSION_DATA + wire::VERSION_SIZE)
        .ok_or(ConnectionError::BadMessageSize(header.size))?;
    // Read the whole message first: closing with unread input resets the connection, and
    // the client could lose the answer.
    discard(stream, payload)?;
    if header.message_type() != flags::TYPE_COMMAND || header.no_reply() {
        return Ok(());
    }
    send(stream, &error_header(&header, errno).encode(), None)
}
