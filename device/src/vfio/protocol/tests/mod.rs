//! Tests of the protocol loop over in-process socket pairs.
//!
//! The server runs `serve_client` on its own thread; the test drives the
//! other end with a raw client that can send arbitrary bytes and fds
//! ([`Harness`]), or with the `vfio_user` crate's `Client`
//! (`crate_client`). Every socket read has a timeout and every wait for the
//! server thread is bounded, so a broken server fails a test, never hangs it.

mod crate_client;
mod fds;
mod happy;
mod negative;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info, vfio_region_sparse_mmap_area,
};

use super::wire::{self, Header, flags};
use super::{
    ConnectionError, DeviceBackend, Errno, IrqDescriptor, RegionDescriptor, serve_client, socket,
};

/// Bound on every read from the server and every wait for its thread.
const TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU 11.1.3's VERSION offer (QEMU's vfio-user specification, VFIO_USER_VERSION).
const QEMU_OFFER: &str = r#"{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}"#;

/// Command numbers used by the tests.
mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const GET_INFO: u16 = 4;
    pub const GET_REGION_INFO: u16 = 5;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const RESET: u16 = 13;
}

/// Host-endian payload builder.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// VERSION payload: major, minor, NUL-terminated JSON.
fn version_payload(major: u16, json: &str) -> Vec<u8> {
    Bytes::default()
        .u16(major)
        .u16(0)
        .raw(json.as_bytes())
        .raw(&[0])
        .0
}

/// REGION_READ/REGION_WRITE payload.
fn access(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    Bytes::default()
        .u64(offset)
        .u32(region)
        .u32(count)
        .raw(data)
        .0
}

/// `DEVICE_GET_INFO` payload.
fn info_query() -> Vec<u8> {
    Bytes::default().u32(16).u32(0).u32(0).u32(0).0
}

/// `DEVICE_GET_REGION_INFO` payload (a zeroed `vfio_region_info`).
fn region_query(index: u32, argsz: u32) -> Vec<u8> {
    Bytes::default()
        .u32(argsz)
        .u32(0)
        .u32(index)
        .u32(0)
        .u64(0)
        .u64(0)
        .0
}

/// `DEVICE_SET_IRQS` payload.
fn irq_set(index: u32, flags: u32, start: u32, count: u32) -> Vec<u8> {
    Bytes::default()
        .u32(20)
        .u32(flags)
        .u32(index)
        .u32(start)
        .u32(count)
        .0
}

/// `DMA_MAP` payload.
fn dma_map(flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
    Bytes::default()
        .u32(32)
        .u32(flags)
        .u64(offset)
        .u64(address)
        .u64(size)
        .0
}

/// `DMA_UNMAP` payload.
fn dma_unmap(flags: u32, address: u64, size: u64) -> Vec<u8> {
    Bytes::default().u32(24).u32(flags).u64(address).u64(size).0
}

/// A message received from the server.
#[derive(Debug)]
struct Message {
    header: Header,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn errno(&self) -> Option<i32> {
        (self.header.flags & flags::ERROR != 0).then_some(self.header.error as i32)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let bytes = self
            .payload
            .get(offset..offset + 4)
            .expect("field in payload");
        u32::from_ne_bytes(bytes.try_into().expect("4 bytes"))
    }

    fn u64_at(&self, offset: usize) -> u64 {
        let bytes = self
            .payload
            .get(offset..offset + 8)
            .expect("field in payload");
        u64::from_ne_bytes(bytes.try_into().expect("8 bytes"))
    }
}

/// What the server thread hands back when `serve_client` returns.
type Outcome<B> = (B, Result<(), ConnectionError>);

/// A server thread and the raw client end of its socket.
struct Harness<B> {
    client: UnixStream,
    done: Receiver<Outcome<B>>,
    next_id: u16,
}

impl<B: DeviceBackend + Send + 'static> Harness<B> {
    /// Starts `serve_client` on a fresh socket pair.
    fn start(backend: B) -> Self {
        let (client, server) = UnixStream::pair().expect("socketpair");
        client.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        client.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let mut backend = backend;
            let result = serve_client(&server, &mut backend);
            // Close our end first so the client sees EOF, like the listener.
            drop(server);
            let _ = tx.send((backend, result));
        });
        Self {
            client,
            done,
            next_id: 0x100,
        }
    }

    /// Starts the server and negotiates like QEMU.
    fn negotiated(backend: B) -> Self {
        let mut h = Self::start(backend);
        let reply = h.call(cmd::VERSION, &version_payload(0, QEMU_OFFER));
        assert_eq!(reply.errno(), None, "VERSION accepted");
        h
    }

    /// Sends a command with a fresh id; returns the id.
    fn send(&mut self, command: u16, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = u32::try_from(wire::HEADER_SIZE + payload.len()).expect("size");
        let header = Header {
            id,
            command,
            size,
            flags,
            error: 0,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes, fds);
        id
    }

    /// Sends arbitrary bytes, fds attached to the first one.
    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        if fds.is_empty() {
            (&self.client).write_all(bytes).expect("send");
            return;
        }
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = sendmsg::<()>(
            self.client.as_raw_fd(),
            &[std::io::IoSlice::new(bytes)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .expect("sendmsg");
        (&self.client)
            .write_all(bytes.get(sent..).expect("sent part"))
            .expect("send rest");
    }

    /// Receives one whole message.
    fn recv(&self) -> Message {
        let mut raw = [0u8; wire::HEADER_SIZE];
        let mut filled = 0;
        let mut fds = Vec::new();
        while filled < raw.len() {
            let (n, got) = socket::recv_with_fds(&self.client, &mut raw[filled..])
                .expect("reply header (timed out?)");
            assert_ne!(n, 0, "server closed the connection instead of replying");
            fds.extend(got);
            filled += n;
        }
        let header = Header::parse(&raw);
        assert_eq!(
            header.flags & flags::TYPE_MASK,
            flags::TYPE_REPLY,
            "{header:?}"
        );
        let mut payload = vec![0u8; header.size as usize - wire::HEADER_SIZE];
        (&self.client)
            .read_exact(&mut payload)
            .expect("reply payload");
        Message {
            header,
            payload,
            fds,
        }
    }

    /// Sends a command and returns its reply, checking id and command echo.
    fn call(&mut self, command: u16, payload: &[u8]) -> Message {
        self.call_with_fds(command, payload, &[])
    }

    fn call_with_fds(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
        let id = self.send(command, 0, payload, fds);
        let reply = self.recv();
        assert_eq!(reply.header.id, id, "reply id");
        assert_eq!(reply.header.command, command, "reply command");
        reply
    }

    /// Sends a command that must fail with `errno` (header-only reply).
    fn expect_errno(&mut self, command: u16, payload: &[u8], errno: Errno) {
        self.expect_errno_with_fds(command, payload, &[], errno);
    }

    fn expect_errno_with_fds(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        errno: Errno,
    ) {
        let reply = self.call_with_fds(command, payload, fds);
        assert_eq!(
            reply.errno(),
            Some(errno as i32),
            "command {command}: expected {errno}, got {reply:?}"
        );
        assert_eq!(reply.header.size, 16, "error replies are header-only");
        assert!(reply.fds.is_empty());
    }

    /// Checks the stream is in sync: GET_INFO gets its exact reply.
    fn assert_in_sync(&mut self) {
        let reply = self.call(cmd::GET_INFO, &info_query());
        assert_eq!(reply.errno(), None, "{reply:?}");
        assert_eq!(reply.payload.len(), 16);
    }

    /// Asserts the server closed the connection (EOF, no more bytes).
    fn expect_eof(&self) {
        let mut byte = [0u8; 1];
        let n = (&self.client).read(&mut byte).expect("read (timed out?)");
        assert_eq!(n, 0, "expected EOF, got a byte {byte:?}");
    }

    /// Closes the client end and returns what the server thread returned.
    fn finish(self) -> Outcome<B> {
        drop(self.client);
        self.done
            .recv_timeout(TIMEOUT)
            .expect("server thread did not finish")
    }

    /// Waits for the server to end by itself, keeping the client open.
    fn wait(&self) -> Outcome<B> {
        self.done
            .recv_timeout(TIMEOUT)
            .expect("server thread did not finish")
    }
}

/// A backend call, as [`FakeBackend`] records it.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    Read(u32, u64, usize),
    Write(u32, u64, Vec<u8>),
    Map {
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: bool,
    },
    Unmap(u32, u64, u64),
    Reset,
    SetIrqs {
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: usize,
    },
}

/// Fake region 1 (mmap-able pages 1 and 3 of four).
const SPARSE_AREAS: [vfio_region_sparse_mmap_area; 2] = [
    vfio_region_sparse_mmap_area {
        offset: 0x1000,
        size: 0x1000,
    },
    vfio_region_sparse_mmap_area {
        offset: 0x3000,
        size: 0x1000,
    },
];

/// A backend with a small region table of every kind and a call log.
///
/// Regions: 0 trapped RW 0x100 bytes of memory; 1 RW 0x4000 with sparse
/// mmap areas and a memfd; 2 read-only 0x10; 3 RW 0x1000, mmap-able as a
/// whole (fd, no areas). IRQs: 0 none, 1 four eventfd vectors.
#[derive(Debug)]
struct FakeBackend {
    regions: Vec<RegionDescriptor>,
    irqs: Vec<IrqDescriptor>,
    memory: Vec<u8>,
    calls: Vec<Call>,
    /// The next backend call fails with this.
    fail_next: Option<Errno>,
    resettable: bool,
    /// Eventfds kept from successful SET_IRQS calls.
    kept: Vec<File>,
}

fn memfd(name: &str) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).expect("memfd");
    File::from(fd.try_clone().expect("dup"))
        .set_len(0x4000)
        .expect("size memfd");
    fd
}

fn region(index: u32, flags: u32, size: u64) -> vfio_region_info {
    vfio_region_info {
        argsz: 32,
        flags,
        index,
        cap_offset: 0,
        size,
        offset: 0,
    }
}

impl FakeBackend {
    fn new() -> Self {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        Self {
            regions: vec![
                RegionDescriptor {
                    region_info: region(0, rw, 0x100),
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                },
                RegionDescriptor {
                    region_info: region(1, rw | VFIO_REGION_INFO_FLAG_MMAP, 0x4000),
                    sparse_areas: SPARSE_AREAS.to_vec(),
                    mmap_fd: Some(memfd("fake-bar1")),
                },
                RegionDescriptor {
                    region_info: region(2, VFIO_REGION_INFO_FLAG_READ, 0x10),
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                },
                RegionDescriptor {
                    region_info: region(3, rw | VFIO_REGION_INFO_FLAG_MMAP, 0x1000),
                    sparse_areas: Vec::new(),
                    mmap_fd: Some(memfd("fake-bar3")),
                },
            ],
            irqs: vec![
                IrqDescriptor {
                    index: 0,
                    flags: 0,
                    count: 0,
                },
                IrqDescriptor {
                    index: 1,
                    flags: VFIO_IRQ_INFO_EVENTFD,
                    count: 4,
                },
            ],
            memory: (0..=255).collect(),
            calls: Vec::new(),
            fail_next: None,
            resettable: true,
            kept: Vec::new(),
        }
    }

    fn outcome(&mut self, call: Call) -> Result<(), Errno> {
        self.calls.push(call);
        self.fail_next.take().map_or(Ok(()), Err)
    }
}

impl DeviceBackend for FakeBackend {
    fn regions(&self) -> &[RegionDescriptor] {
        &self.regions
    }

    fn irqs(&self) -> &[IrqDescriptor] {
        &self.irqs
    }

    fn resettable(&self) -> bool {
        self.resettable
    }

    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.outcome(Call::Read(region, offset, data.len()))?;
        if region == 0 {
            let start = offset as usize;
            data.copy_from_slice(&self.memory[start..start + data.len()]);
        } else {
            data.fill(0xAB);
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.outcome(Call::Write(region, offset, data.to_vec()))?;
        if region == 0 {
            let start = offset as usize;
            self.memory[start..start + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Errno> {
        self.outcome(Call::Map {
            flags,
            offset,
            address,
            size,
            fd: fd.is_some(),
        })
    }

    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Result<(), Errno> {
        self.outcome(Call::Unmap(flags, address, size))
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.outcome(Call::Reset)
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), Errno> {
        self.outcome(Call::SetIrqs {
            index,
            flags,
            start,
            count,
            fds: fds.len(),
        })?;
        self.kept.extend(fds);
        Ok(())
    }
}

/// A pipe whose descriptors we can count in `/proc/self/fd`, by inode, to
/// prove the server closed every copy it received (other tests run in
/// parallel, so a plain fd count would be meaningless).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    target: PathBuf,
}

impl Pipe {
    fn new() -> Self {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let target =
            std::fs::read_link(format!("/proc/self/fd/{}", read.as_raw_fd())).expect("readlink");
        Self {
            read,
            write,
            target,
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Descriptors open in this process on the pipe, ours included (2).
    fn open_copies(&self) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .flatten()
            .filter(|entry| std::fs::read_link(entry.path()).is_ok_and(|t| t == self.target))
            .count()
    }

    fn assert_only_ours(&self) {
        let _ = &self.read;
        assert_eq!(
            self.open_copies(),
            2,
            "server kept copies of {:?}",
            self.target
        );
    }
}

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vfio-user-pvrdma-protocol-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
