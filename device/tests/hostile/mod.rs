//! A vfio-user client that says exactly what a test tells it to, fds included, and reads
//! the server's error replies (the `vfio_user` crate's client ignores them and desyncs).

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const REGION_READ: u16 = 9;
pub const SET_IRQS: u16 = 8;
pub const REGION_WRITE: u16 = 10;

pub const CONFIG_REGION: u32 = 7;
pub const REG_BAR: u32 = 1;

const TYPE_REPLY: u32 = 1;
const ERROR: u32 = 1 << 5;

/// A reply: the errno when the server answered with an error, and the payload.
#[derive(Debug)]
pub struct Reply {
    pub errno: Option<u32>,
    pub payload: Vec<u8>,
}

pub struct RawClient {
    stream: UnixStream,
    next_id: u16,
}

impl RawClient {
    /// Connects and negotiates VERSION 0.1 with no capabilities beyond the defaults.
    pub fn connect(path: &Path) -> RawClient {
        let (client, reply) = RawClient::knock(path);
        assert_eq!(reply.errno, None, "VERSION refused");
        client
    }

    /// Connects and sends VERSION as [`RawClient::connect`] does; returns the reply
    /// whatever it says.
    pub fn knock(path: &Path) -> (RawClient, Reply) {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut client = RawClient { stream, next_id: 0 };
        let mut version = vec![0, 0, 1, 0];
        version.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":1}}\0");
        let reply = client.call(VERSION, &version, &[]).expect("VERSION reply");
        (client, reply)
    }

    /// Writes raw bytes (a piece of a message, say) without waiting for anything.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        self.stream.write_all(bytes).expect("write to the server");
    }

    /// Sends one command with `fds` and waits for its reply; `Err` when the server closed
    /// the connection instead.
    pub fn call(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<Reply> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = u32::try_from(16 + payload.len()).expect("message fits");
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&id.to_le_bytes());
        header.extend_from_slice(&command.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(&header), IoSlice::new(payload)];
        sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;

        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let reply_id = u16::from_le_bytes([reply[0], reply[1]]);
        let reply_size = u32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
        let error = u32::from_le_bytes(reply[12..16].try_into().expect("4 bytes"));
        assert_eq!(reply_id, id, "reply to another message");
        assert_eq!(flags & 0xf, TYPE_REPLY, "not a reply");
        let mut payload = vec![0u8; usize::try_from(reply_size).expect("size") - 16];
        self.stream.read_exact(&mut payload)?;
        Ok(Reply {
            errno: (flags & ERROR != 0).then_some(error),
            payload,
        })
    }

    pub fn dma_map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<Reply> {
        let mut payload = Vec::with_capacity(32);
        payload.extend_from_slice(&32u32.to_le_bytes());
        payload.extend_from_slice(&3u32.to_le_bytes()); // READ | WRITE
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&address.to_le_bytes());
        payload.extend_from_slice(&size.to_le_bytes());
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.call(DMA_MAP, &payload, &fds)
    }

    /// SET_IRQS of MSI-X vectors `start..start + count` with `flags`, carrying `fds`.
    pub fn set_msix(
        &mut self,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<Reply> {
        let mut payload = Vec::with_capacity(20);
        payload.extend_from_slice(&20u32.to_le_bytes());
        payload.extend_from_slice(&flags.to_le_bytes());
        payload.extend_from_slice(&2u32.to_le_bytes()); // VFIO_PCI_MSIX_IRQ_INDEX
        payload.extend_from_slice(&start.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        self.call(SET_IRQS, &payload, fds)
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<Reply> {
        let mut payload = access(region, offset, data.len());
        payload.extend_from_slice(data);
        self.call(REGION_WRITE, &payload, &[])
    }

    pub fn region_read(&mut self, region: u32, offset: u64, count: usize) -> io::Result<Reply> {
        self.call(REGION_READ, &access(region, offset, count), &[])
    }

    /// A config-space read, timed: what "the device still answers" means.
    pub fn timed_config_read(&mut self) -> Duration {
        let started = Instant::now();
        let reply = self.region_read(CONFIG_REGION, 0, 4).expect("config read");
        assert_eq!(reply.errno, None);
        // Vendor 15ad, device 0820: the answer is the device's, not just any reply.
        assert_eq!(&reply.payload[16..20], &[0xad, 0x15, 0x20, 0x08]);
        started.elapsed()
    }

    /// Whether the server closed this connection (a read sees end of stream).
    pub fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
    }
}

fn access(region: u32, offset: u64, count: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(16);
    payload.extend_from_slice(&offset.to_le_bytes());
    payload.extend_from_slice(&region.to_le_bytes());
    payload.extend_from_slice(&u32::try_from(count).expect("count").to_le_bytes());
    payload
}
