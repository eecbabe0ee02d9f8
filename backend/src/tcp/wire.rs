//! The frames servers exchange over a TCP link (docs/tcp-transport.md).
//!
//! Every frame is an 8-byte header — type, flags, two reserved bytes, the length of what
//! follows (little endian) — then a fixed part per type and, for requests and responses,
//! payload bytes. Everything a peer sends is untrusted: [`Decoder`] checks the type, the
//! length against [`MAX_FRAME`] before it buffers anything, the fixed part's size, and every
//! count, so a malformed stream is an error (the link is closed) and never a panic or an
//! allocation the peer chose.

use crate::Gid;

pub const HEADER: usize = 8;
/// Largest payload of one frame: a SEND travels whole (up to this), WRITE and READ in
/// pieces of [`CHUNK`].
pub const MAX_PAYLOAD: usize = 16 << 20;
/// The largest frame: a request's fixed part and the largest payload.
pub const MAX_FRAME: usize = REQUEST_FIXED + MAX_PAYLOAD;
/// WRITE and READ travel in pieces of at most this, so small requests of other QPs are not
/// stuck behind a large transfer for long.
pub const CHUNK: u64 = 256 << 10;
/// Most GIDs one announcement carries: every device's whole table (64 entries) times a
/// generous number of devices.
pub const MAX_GIDS: usize = 16 * 1024;
/// 2: the RDMA_GIDS frame.
pub const VERSION: u16 = 2;

const T_HELLO: u8 = 1;
const T_AUTH: u8 = 2;
const T_GIDS: u8 = 3;
const T_REQUEST: u8 = 4;
const T_RESPONSE: u8 = 5;
const T_PING: u8 = 6;
const T_RDMA_GIDS: u8 = 7;

const HELLO_FIXED: usize = 2 + 8 + 16;
const AUTH_FIXED: usize = 32;
pub const REQUEST_FIXED: usize =
    16 + 4 + 4 + 16 + 4 + 4 + 8 + 4 + 4 + 4 + 4 + 4 + 8 + 4 + 8 + 8 + 8;
const RESPONSE_FIXED: usize = 16 + 4 + 4 + 4 + 8 + 4 + 8 + 8;

/// The operation a request frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Send,
    Write,
    Read,
    CompareSwap,
    FetchAdd,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Send => 0,
            Op::Write => 1,
            Op::Read => 2,
            Op::CompareSwap => 3,
            Op::FetchAdd => 4,
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            0 => Op::Send,
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::CompareSwap,
            4 => Op::FetchAdd,
            _ => return None,
        })
    }
}

pub mod flags {
    pub const SOLICITED: u8 = 1;
    pub const IMM: u8 = 2;
    pub const INVALIDATE: u8 = 4;
    /// The last piece of a work request.
    pub const LAST: u8 = 8;
    /// A datagram: no sequence number, no response.
    pub const DATAGRAM: u8 = 16;
}

/// A request for the responder's server, with its payload (SEND and WRITE data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    pub src_gid: Gid,
    pub src_qpn: u32,
    pub epoch: u32,
    pub dst_gid: Gid,
    pub dst_qpn: u32,
    /// Per requesting QP (RC); 0 for datagrams.
    pub seq: u32,
    pub ticket: u64,
    pub op: Op,
    pub flags: u8,
    pub qkey: u32,
    pub imm: u32,
    pub invalidate: u32,
    pub rkey: u32,
    pub remote_addr: u64,
    /// READ: bytes to read.
    pub read_len: u32,
    pub compare_add: u64,
    pub swap: u64,
    /// Where this piece's reply goes in the requester's buffer (READ pieces).
    pub reply_offset: u64,
    pub payload: Vec<u8>,
}

/// The responder's answer to one request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFrame {
    /// The requester: whom the answer completes.
    pub src_gid: Gid,
    pub src_qpn: u32,
    pub epoch: u32,
    pub seq: u32,
    pub ticket: u64,
    /// 0 success; otherwise a [`crate::RemoteError`] code (see [`status_code`]).
    pub status: u8,
    pub flags: u8,
    pub bytes: u64,
    pub reply_offset: u64,
    pub reply: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        node: u64,
        nonce: [u8; 16],
    },
    Auth {
        mac: [u8; 32],
    },
    Gids(Vec<Gid>),
    /// Which of the sender's GIDs its host RDMA device holds: the rdma path can reach
    /// them (docs/rdma-transport.md). Sent after every GIDS frame and when it changes.
    RdmaGids(Vec<Gid>),
    Request(RequestFrame),
    Response(ResponseFrame),
    Ping,
}

/// Why a peer's bytes are not a frame; the link is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("a frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("a frame of type {kind} is {len} bytes, which its fields do not fit")]
    BadLength { kind: u8, len: usize },
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("a GID announcement of {0} entries exceeds {MAX_GIDS}")]
    TooManyGids(usize),
}

/// Encodes `frame` onto the end of `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    let kind = match frame {
        Frame::Hello {
            version,
            node,
            nonce,
        } => {
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(nonce);
            T_HELLO
        }
        Frame::Auth { mac } => {
            out.extend_from_slice(mac);
            T_AUTH
        }
        Frame::Gids(gids) => {
            for gid in gids.iter().take(MAX_GIDS) {
                out.extend_from_slice(gid);
            }
            T_GIDS
        }
        Frame::RdmaGids(gids) => {
            for gid in gids.iter().take(MAX_GIDS) {
                out.extend_from_slice(gid);
            }
            T_RDMA_GIDS
        }
        Frame::Request(r) => {
            out.extend_from_slice(&r.src_gid);
            put32(out, r.src_qpn);
            put32(out, r.epoch);
            out.extend_from_slice(&r.dst_gid);
            put32(out, r.dst_qpn);
            put32(out, r.seq);
            put64(out, r.ticket);
            put32(out, u32::from(r.op.code()) | u32::from(r.flags) << 8);
            put32(out, r.qkey);
            put32(out, r.imm);
            put32(out, r.invalidate);
            put32(out, r.rkey);
            put64(out, r.remote_addr);
            put32(out, r.read_len);
            put64(out, r.compare_add);
            put64(out, r.swap);
            put64(out, r.reply_offset);
            out.extend_from_slice(&r.payload);
            T_REQUEST
        }
        Frame::Response(r) => {
            out.extend_from_slice(&r.src_gid);
            put32(out, r.src_qpn);
            put32(out, r.epoch);
            put32(out, r.seq);
            put64(out, r.ticket);
            put32(out, u32::from(r.status) | u32::from(r.flags) << 8);
            put64(out, r.bytes);
            put64(out, r.reply_offset);
            out.extend_from_slice(&r.reply);
            T_RESPONSE
        }
        Frame::Ping => T_PING,
    };
    let len = u32::try_from(out.len() - start - HEADER).unwrap_or(u32::MAX);
    out[start] = kind;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Reassembles frames from a byte stream that arrives in pieces of any size.
///
/// The stream is read straight into the decoder's buffer ([`Decoder::read_from`]) and
/// frames are taken from its front by moving a cursor, so bytes are moved only to bring an
/// unfinished frame to the front when the buffer's end is reached (the `drain` per frame
/// and the copy from a read buffer this replaced showed in profiles of 64 KiB WRITEs).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Initialised bytes; `start..end` is what was read and not yet taken.
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Bytes buffered toward the next frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buffer[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Reads up to `max` bytes from `reader` into the buffer; what `read` returned.
    pub fn read_from(
        &mut self,
        reader: &mut impl std::io::Read,
        max: usize,
    ) -> std::io::Result<usize> {
        self.make_room(max);
        let n = reader.read(&mut self.buffer[self.end..self.end + max])?;
        self.end += n.min(max);
        Ok(n)
    }

    /// Makes `len` bytes of room after `end`: moves the unread bytes to the front when
    /// that makes room, else grows the buffer (zeroing only what is new).
    fn make_room(&mut self, len: usize) {
        if self.buffer.len() - self.end >= len {
            return;
        }
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buffer.len() - self.end < len {
            self.buffer.resize(self.end + len, 0);
        }
    }

    /// The next whole frame, if the buffer holds one. The header is checked before the
    /// body is waited for, so a peer announcing a huge frame is refused at once.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let unread = &self.buffer[self.start..self.end];
        if unread.len() < HEADER {
            return Ok(None);
        }
        let kind = unread[0];
        if !(T_HELLO..=T_RDMA_GIDS).contains(&kind) {
            return Err(WireError::UnknownType(kind));
        }
        let len = u32::from_le_bytes([unread[4], unread[5], unread[6], unread[7]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLong(len));
        }
        if unread.len() < HEADER + len {
            return Ok(None);
        }
        let frame = parse(kind, &unread[HEADER..HEADER + len]);
        self.start += HEADER + len;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        frame.map(Some)
    }
}

/// A cursor over a frame's body; the caller checked the fixed part fits.
struct Fields<'a> {
    body: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.body[self.at..self.at + N]);
        self.at += N;
        out
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn rest(&self) -> Vec<u8> {
        self.body[self.at..].to_vec()
    }
}

fn parse(kind: u8, body: &[u8]) -> Result<Frame, WireError> {
    let fixed = match kind {
        T_HELLO => HELLO_FIXED,
        T_AUTH => AUTH_FIXED,
        T_REQUEST => REQUEST_FIXED,
        T_RESPONSE => RESPONSE_FIXED,
        _ => 0,
    };
    let exact = matches!(kind, T_HELLO | T_AUTH | T_PING);
    if body.len() < fixed || (exact && body.len() != fixed) {
        return Err(WireError::BadLength {
            kind,
            len: body.len(),
        });
    }
    let mut f = Fields { body, at: 0 };
    Ok(match kind {
        T_HELLO => Frame::Hello {
            version: u16::from_le_bytes(f.bytes()),
            node: f.u64(),
            nonce: f.bytes(),
        },
        T_AUTH => Frame::Auth { mac: f.bytes() },
        T_GIDS | T_RDMA_GIDS => {
            if !body.len().is_multiple_of(16) {
                return Err(WireError::BadLength {
                    kind,
                    len: body.len(),
                });
            }
            let count = body.len() / 16;
            if count > MAX_GIDS {
                return Err(WireError::TooManyGids(count));
            }
            let gids = (0..count).map(|_| f.bytes()).collect();
            if kind == T_GIDS {
                Frame::Gids(gids)
            } else {
                Frame::RdmaGids(gids)
            }
        }
        T_REQUEST => {
            let src_gid = f.bytes();
            let src_qpn = f.u32();
            let epoch = f.u32();
            let dst_gid = f.bytes();
            let dst_qpn = f.u32();
            let seq = f.u32();
            let ticket = f.u64();
            let op_flags = f.u32();
            let op = Op::from_code(op_flags as u8).ok_or(WireError::UnknownOp(op_flags as u8))?;
            Frame::Request(RequestFrame {
                src_gid,
                src_qpn,
                epoch,
                dst_gid,
                dst_qpn,
                seq,
                ticket,
                op,
                flags: (op_flags >> 8) as u8,
                qkey: f.u32(),
                imm: f.u32(),
                invalidate: f.u32(),
                rkey: f.u32(),
                remote_addr: f.u64(),
                read_len: f.u32(),
                compare_add: f.u64(),
                swap: f.u64(),
                reply_offset: f.u64(),
                payload: f.rest(),
            })
        }
        T_RESPONSE => {
            let src_gid = f.bytes();
            let src_qpn = f.u32();
            let epoch = f.u32();
            let seq = f.u32();
            let ticket = f.u64();
            let status_flags = f.u32();
            Frame::Response(ResponseFrame {
                src_gid,
                src_qpn,
                epoch,
                seq,
                ticket,
                status: status_flags as u8,
                flags: (status_flags >> 8) as u8,
                bytes: f.u64(),
                reply_offset: f.u64(),
                reply: f.rest(),
            })
        }
        _ => Frame::Ping,
    })
}

/// The wire code of a responder's answer.
pub fn status_code(result: &Result<crate::Outcome, crate::RemoteError>) -> u8 {
    use crate::RemoteError as E;
    match result {
        Ok(_) => 0,
        Err(E::Unreachable) => 1,
        Err(E::InvalidRequest) => 2,
        Err(E::ReceiverNotReady) => 3,
        Err(E::AccessError) => 4,
        Err(E::OperationError) => 5,
        Err(E::Dropped) => 6,
    }
}

/// The answer a wire code stands for (an unknown code is an operation error).
pub fn status_result(code: u8, bytes: u64) -> Result<crate::Outcome, crate::RemoteError> {
    use crate::RemoteError as E;
    match code {
        0 => Ok(crate::Outcome { bytes }),
        1 => Err(E::Unreachable),
        2 => Err(E::InvalidRequest),
        3 => Err(E::ReceiverNotReady),
        4 => Err(E::AccessError),
        6 => Err(E::Dropped),
        _ => Err(E::OperationError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestFrame {
        RequestFrame {
            src_gid: [1; 16],
            src_qpn: 7,
            epoch: 3,
            dst_gid: [2; 16],
            dst_qpn: 9,
            seq: 41,
            ticket: 1234,
            op: Op::Write,
            flags: flags::IMM | flags::LAST,
            qkey: 0x1111,
            imm: 0xabcd,
            invalidate: 0,
            rkey: 0x500,
            remote_addr: 0x7f00_0000_1000,
            read_len: 0,
            compare_add: 5,
            swap: 6,
            reply_offset: 0,
            payload: b"payload bytes".to_vec(),
        }
    }

    #[test]
    fn every_frame_survives_encoding_in_pieces_of_any_size() {
        let frames = vec![
            Frame::Hello {
                version: VERSION,
                node: 0x1122_3344,
                nonce: [9; 16],
            },
            Frame::Auth { mac: [7; 32] },
            Frame::Gids(vec![[3; 16], [4; 16]]),
            Frame::RdmaGids(vec![[4; 16]]),
            Frame::Request(request()),
            Frame::Response(ResponseFrame {
                src_gid: [1; 16],
                src_qpn: 7,
                epoch: 3,
                seq: 41,
                ticket: 1234,
                status: 0,
                flags: flags::LAST,
                bytes: 13,
                reply_offset: 4096,
                reply: vec![0xee; 8],
            }),
            Frame::Ping,
        ];
        let mut stream = Vec::new();
        for frame in &frames {
            encode(frame, &mut stream);
        }
        for piece in [1, 3, 7, 64, stream.len()] {
            let mut decoder = Decoder::new();
            let mut decoded = Vec::new();
            for bytes in stream.chunks(piece) {
                decoder.push(bytes);
                while let Some(frame) = decoder.next_frame().expect("valid stream") {
                    decoded.push(frame);
                }
            }
            assert_eq!(decoded, frames, "pieces of {piece}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn malformed_frames_are_errors_before_anything_is_buffered() {
        let header = |kind: u8, len: u32| {
            let mut h = vec![kind, 0, 0, 0];
            h.extend_from_slice(&len.to_le_bytes());
            h
        };
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (header(0, 0), WireError::UnknownType(0)),
            (header(99, 0), WireError::UnknownType(99)),
            (
                header(T_REQUEST, u32::MAX),
                WireError::TooLong(u32::MAX as usize),
            ),
            (
                [header(T_HELLO, 3), vec![0; 3]].concat(),
                WireError::BadLength {
                    kind: T_HELLO,
                    len: 3,
                },
            ),
            (
                [header(T_PING, 1), vec![0]].concat(),
                WireError::BadLength {
                    kind: T_PING,
                    len: 1,
                },
            ),
            (
                [header(T_REQUEST, 10), vec![0; 10]].concat(),
                WireError::BadLength {
                    kind: T_REQUEST,
                    len: 10,
                },
            ),
            (
                [header(T_GIDS, 17), vec![0; 17]].concat(),
                WireError::BadLength {
                    kind: T_GIDS,
                    len: 17,
                },
            ),
        ];
        for (bytes, expected) in cases {
            let mut decoder = Decoder::new();
            decoder.push(&bytes);
            assert_eq!(decoder.next_frame(), Err(expected));
        }
        // An unknown operation code.
        let mut stream = Vec::new();
        encode(&Frame::Request(request()), &mut stream);
        stream[HEADER + 16 + 4 + 4 + 16 + 4 + 4 + 8] = 77;
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert_eq!(decoder.next_frame(), Err(WireError::UnknownOp(77)));
    }

    #[test]
    fn statuses_round_trip() {
        use crate::{Outcome, RemoteError as E};
        for result in [
            Ok(Outcome { bytes: 99 }),
            Err(E::Unreachable),
            Err(E::InvalidRequest),
            Err(E::ReceiverNotReady),
            Err(E::AccessError),
            Err(E::OperationError),
            Err(E::Dropped),
        ] {
            assert_eq!(status_result(status_code(&result), 99), result);
        }
        assert_eq!(status_result(200, 0), Err(E::OperationError));
    }
}
