//! The wire format between the lab fixture (host) and `pvrdma-guest-agent` (guest).
//!
//! Both directions carry frames `[kind: u8][id: u32 LE][len: u32 LE][payload: len bytes]` over
//! a virtio-serial port. The host picks the id of each request and the agent echoes it, so a
//! reply that arrives after its request timed out on the host side is recognised and dropped.
//! The format is deliberately tiny: the agent runs inside a slow TCG guest and must not need
//! anything beyond the standard library.

use std::io::{self, Read, Write};

/// Largest payload either side accepts. Command output beyond this is truncated by the agent.
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Sent once by the agent when it is ready; its id is 0 and its payload names the agent.
pub const HELLO: u8 = b'H';
/// Host → agent: run a shell command. Payload: timeout in ms (u32 LE), then the command.
pub const EXEC: u8 = b'X';
/// Host → agent: send back the contents of a file. Payload: the path.
pub const READ_FILE: u8 = b'R';
/// Host → agent: write a file. Payload: path length (u32 LE), path, contents.
pub const WRITE_FILE: u8 = b'W';
/// Host → agent: flush file systems and power the guest off.
pub const POWER_OFF: u8 = b'P';
/// Host → agent: flush file systems and reboot; the agent of the next boot says HELLO again.
pub const REBOOT: u8 = b'B';

/// Agent → host: an EXEC finished. Payload: see [`ExecResult::encode`].
pub const EXEC_DONE: u8 = b'D';
/// Agent → host: the file contents requested by READ_FILE.
pub const FILE_DATA: u8 = b'F';
/// Agent → host: the request succeeded and has no data (WRITE_FILE, POWER_OFF).
pub const OK: u8 = b'K';
/// Agent → host: the request failed. Payload: a UTF-8 message.
pub const FAILED: u8 = b'E';

/// Text the agent puts in its HELLO payload; the host checks the prefix.
pub const HELLO_TEXT: &str = "pvrdma-guest-agent 1";

/// One frame on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub id: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: u8, id: u32, payload: Vec<u8>) -> Self {
        Frame { kind, id, payload }
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|len| *len <= MAX_PAYLOAD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut header = [0u8; 9];
        header[0] = self.kind;
        header[1..5].copy_from_slice(&self.id.to_le_bytes());
        header[5..9].copy_from_slice(&len.to_le_bytes());
        out.write_all(&header)?;
        out.write_all(&self.payload)?;
        out.flush()
    }

    /// Reads one frame; `Ok(None)` on a clean end of stream before the first byte.
    pub fn read_from(input: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 9];
        let mut filled = 0;
        while filled < header.len() {
            match input.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let id = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame payload of {len} bytes exceeds the limit"),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        input.read_exact(&mut payload)?;
        Ok(Some(Frame {
            kind: header[0],
            id,
            payload,
        }))
    }
}

/// What a command run in the guest produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code, or `128 + signal` when a signal ended the command (as a shell reports it).
    pub status: i32,
    /// The agent killed the command because it outlived its timeout.
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecResult {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.stdout.len() + self.stderr.len());
        out.extend_from_slice(&self.status.to_le_bytes());
        out.push(u8::from(self.timed_out));
        put_bytes(&mut out, &self.stdout);
        put_bytes(&mut out, &self.stderr);
        out
    }

    pub fn decode(payload: &[u8]) -> Option<ExecResult> {
        let mut cursor = Cursor(payload);
        let status = i32::from_le_bytes(cursor.take(4)?.try_into().ok()?);
        let timed_out = cursor.take(1)?[0] != 0;
        let stdout = cursor.take_bytes()?.to_vec();
        let stderr = cursor.take_bytes()?.to_vec();
        cursor.0.is_empty().then_some(ExecResult {
            status,
            timed_out,
            stdout,
            stderr,
        })
    }
}

/// Payload of an EXEC request.
pub fn encode_exec(timeout_ms: u32, command: &str) -> Vec<u8> {
    let mut out = timeout_ms.to_le_bytes().to_vec();
    out.extend_from_slice(command.as_bytes());
    out
}

pub fn decode_exec(payload: &[u8]) -> Option<(u32, &str)> {
    let (timeout, command) = payload.split_first_chunk::<4>()?;
    Some((
        u32::from_le_bytes(*timeout),
        std::str::from_utf8(command).ok()?,
    ))
}

/// Payload of a WRITE_FILE request.
pub fn encode_write_file(path: &str, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + path.len() + contents.len());
    put_bytes(&mut out, path.as_bytes());
    out.extend_from_slice(contents);
    out
}

pub fn decode_write_file(payload: &[u8]) -> Option<(&str, &[u8])> {
    let mut cursor = Cursor(payload);
    let path = std::str::from_utf8(cursor.take_bytes()?).ok()?;
    Some((path, cursor.0))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Payloads are capped at MAX_PAYLOAD, far below u32::MAX, before they are encoded.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn take_bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        self.take(usize::try_from(len).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let frame = Frame::new(EXEC, 7, encode_exec(1500, "echo hi"));
        let mut wire = Vec::new();
        frame.write_to(&mut wire).unwrap();
        let mut input = wire.as_slice();
        assert_eq!(Frame::read_from(&mut input).unwrap(), Some(frame));
        assert_eq!(Frame::read_from(&mut input).unwrap(), None);
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_clean_end() {
        let mut wire = Vec::new();
        Frame::new(OK, 1, vec![1, 2, 3])
            .write_to(&mut wire)
            .unwrap();
        wire.truncate(wire.len() - 1);
        assert!(Frame::read_from(&mut wire.as_slice()).is_err());
        assert!(Frame::read_from(&mut &wire[..4]).is_err());
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut wire = vec![FILE_DATA, 0, 0, 0, 0];
        wire.extend_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let err = Frame::read_from(&mut wire.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn exec_result_round_trips_and_rejects_garbage() {
        let result = ExecResult {
            status: 137,
            timed_out: true,
            stdout: b"out".to_vec(),
            stderr: b"err\n".to_vec(),
        };
        assert_eq!(ExecResult::decode(&result.encode()), Some(result.clone()));
        let mut long = result.encode();
        long.push(0);
        assert_eq!(ExecResult::decode(&long), None);
        assert_eq!(ExecResult::decode(&result.encode()[..8]), None);
    }

    #[test]
    fn exec_and_write_payloads_round_trip() {
        assert_eq!(decode_exec(&encode_exec(9, "ls /")), Some((9, "ls /")));
        assert_eq!(decode_exec(&[1, 2]), None);
        let payload = encode_write_file("/tmp/x", b"data");
        assert_eq!(decode_write_file(&payload), Some(("/tmp/x", &b"data"[..])));
        assert_eq!(decode_write_file(&payload[..5]), None);
    }
}
