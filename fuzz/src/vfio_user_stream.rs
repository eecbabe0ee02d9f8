//! The vfio-user message stream as a hostile client sends it, into the real protocol loop and
//! the real PCI function (DMA windows, IRQs, region routing, the device behind BAR1/BAR2):
//! messages with any command, flags, size and payload, descriptors attached to them (memfds
//! of any size, eventfds, pipes), and raw bytes that break the framing. The harness builds
//! headers so that inputs get past framing often; the sizes and payloads are the fuzzer's.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vfio_user_pvrdma::vfio::PciFunction;
use vfio_user_pvrdma::vfio::protocol::serve_client;

use crate::input::Input;

/// Messages per input.
const MAX_MESSAGES: usize = 64;
/// The largest memfd an input may hand over (its windows are mapped for real).
const MAX_MEMFD: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    let Ok((client, server)) = UnixStream::pair() else {
        return;
    };
    let Ok(replies) = client.try_clone() else {
        return;
    };
    let serving = std::thread::spawn(move || {
        let mut function = PciFunction::new();
        // Every outcome is acceptable here, an error included; a panic or hang is not.
        let _ = serve_client(&server, &mut function);
    });
    // Replies are read and dropped, so the server never blocks writing them.
    let draining = std::thread::spawn(move || {
        let mut replies = replies;
        let mut sink = [0u8; 64 * 1024];
        while matches!(replies.read(&mut sink), Ok(n) if n > 0) {}
    });
    let mut input = Input::new(data);
    let mut client = client;
    for id in 0..MAX_MESSAGES {
        if input.is_empty() {
            break;
        }
        if send_one(&mut client, &mut input, id as u16).is_err() {
            break; // The server closed the connection: the rest would go nowhere.
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    serving.join().expect("the protocol loop panicked");
    draining.join().expect("the reply reader panicked");
}

fn send_one(client: &mut UnixStream, input: &mut Input<'_>, id: u16) -> std::io::Result<()> {
    let kind = input.u8();
    if kind & 0x0f == 0x0f {
        // Raw bytes, framing be damned.
        let len = usize::from(input.u8());
        return client.write_all(input.bytes(len));
    }
    // Mostly the commands a client may send (1..=15), sometimes anything.
    let command = if kind & 0x10 == 0 {
        u16::from(kind & 0x0f) + 1
    } else {
        input.u16()
    };
    let flags = if kind & 0x20 == 0 { 0 } else { input.u32() };
    let payload_len = usize::from(input.u16() % 1024);
    let payload = input.bytes(payload_len);
    let size = if kind & 0x40 == 0 {
        16 + payload.len() as u32
    } else {
        input.u32()
    };
    let fds = if kind & 0x80 == 0 {
        Vec::new()
    } else {
        descriptors(input)
    };
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&id.to_le_bytes());
    header.extend_from_slice(&command.to_le_bytes());
    header.extend_from_slice(&size.to_le_bytes());
    header.extend_from_slice(&flags.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [std::io::IoSlice::new(&header)];
    sendmsg::<()>(
        client.as_raw_fd(),
        &iov,
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    client.write_all(payload)
}

/// One to three descriptors of the kinds a client might pass: a memfd (guest RAM) of the
/// fuzzer's size and contents, an eventfd (an interrupt), or a pipe (neither).
fn descriptors(input: &mut Input<'_>) -> Vec<OwnedFd> {
    let count = input.u8() % 3 + 1;
    let mut fds = Vec::new();
    for _ in 0..count {
        let fd = match input.u8() % 3 {
            0 => memfd(input),
            1 => EventFd::from_flags(EfdFlags::EFD_CLOEXEC)
                .ok()
                .map(OwnedFd::from),
            _ => nix::unistd::pipe().ok().map(|(read, _write)| read),
        };
        fds.extend(fd);
    }
    fds
}

fn memfd(input: &mut Input<'_>) -> Option<OwnedFd> {
    let fd = memfd_create("fuzz-ram", MFdFlags::MFD_CLOEXEC).ok()?;
    let size = u64::from(input.u32()) % (MAX_MEMFD + 1);
    let mut file = std::fs::File::from(fd);
    file.set_len(size).ok()?;
    let len = usize::from(input.u8()) * 16;
    let contents = input.bytes(len);
    let _ = file.write_all(contents);
    Some(OwnedFd::from(file))
}
