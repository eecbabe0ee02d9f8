//! File-descriptor passing on the client socket (`SCM_RIGHTS`).
//!
//! This is one of the two modules of the crate allowed to use `unsafe`: a
//! received descriptor arrives as a bare integer, and turning it into an
//! `OwnedFd` is an ownership claim the compiler cannot check. The same holds
//! for a listening socket the server inherits at start ([`adopt_inherited`]).
//! Everything else here, and every other socket access, goes through safe
//! `nix`/`std` calls.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recv, recvmsg, send, sendmsg,
};

/// Most descriptors Linux delivers with one message (`SCM_MAX_FD`). Room for
/// all of them means the control data is never truncated, so the kernel never
/// installs descriptors we cannot see and close.
const SCM_MAX_FD: usize = 253;

/// One `recvmsg()` into `buf`: the byte count (0 at end of stream) and every
/// descriptor that came with those bytes, owned (closed when dropped).
pub(super) fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    loop {
        // CLOEXEC: descriptors of the client never leak into child processes.
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        // Fails only on MSG_CTRUNC, which the buffer size above rules out
        // for SCM_RIGHTS (we enable no other control messages).
        for message in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw_fds) = message {
                for raw in raw_fds {
                    // SAFETY: the kernel installed `raw` in our descriptor
                    // table for this very recvmsg() call and nothing else in
                    // the process knows its number yet, so this `OwnedFd`
                    // is its only owner and closes it exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        return Ok((msg.bytes, fds));
    }
}

/// Spins for at most `window` until `stream` has something to read (bytes or the end of
/// the stream), without blocking: true if it has. A client in a burst of messages (a
/// command's REQUEST write then its ERR read, a doorbell per post) sends the next one within
/// microseconds, and finding it by spinning saves the wake-up of a sleeping thread on
/// another core, which costs 10–40 µs on a virtual machine (docs/vfio-user-server.md).
pub(super) fn spin_until_readable(stream: &UnixStream, window: Duration) -> bool {
    if window.is_zero() {
        return false;
    }
    let started = Instant::now();
    let mut byte = [0u8; 1];
    loop {
        match recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            // Data, or 0 at the end of the stream: either way the next read will not block.
            Ok(_) => return true,
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            // The blocking read reports the error.
            Err(_) => return true,
        }
        if started.elapsed() >= window {
            return false;
        }
        // Give the CPU to any other runnable thread (the client's vCPU may be waiting for
        // this very core when there are fewer cores than busy threads); with none, this
        // returns at once and the spin goes on.
        std::thread::yield_now();
    }
}

/// Sends all of `bytes`, attaching `fd` (if any) to the first byte.
///
/// `MSG_NOSIGNAL`: a client that went away yields `EPIPE`, never a SIGPIPE.
pub(super) fn send_all(
    stream: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let fd_array;
    let control: &[ControlMessage<'_>] = match fd {
        Some(fd) => {
            fd_array = [fd.as_raw_fd()];
            &[ControlMessage::ScmRights(&fd_array)]
        }
        None => &[],
    };
    let mut sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // A stream socket may take part of a large reply; the rest carries no fd.
    while let Some(rest) = bytes.get(sent..).filter(|rest| !rest.is_empty()) {
        match send(stream.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent = sent.saturating_add(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Takes ownership of descriptor `fd`, which the server was started with to serve on
/// (`--fd N`, systemd socket activation), after checking that it is open.
///
/// Call it once per descriptor, at start, before anything else in the process could
/// have claimed or closed it.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    nix::fcntl::fcntl(
        // SAFETY: only borrowed for the one call; an invalid number gets EBADF.
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(io::Error::from)?;
    // SAFETY: the descriptor is open (checked above) and was handed to this process at
    // exec for it to serve on; the caller claims it once, before anything else could.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn spin_until_readable_sees_data_and_the_end_and_gives_up_on_silence() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let window = Duration::from_millis(20);
        let started = Instant::now();
        assert!(!spin_until_readable(&server, window), "nothing sent");
        assert!(started.elapsed() >= window, "it spun the whole window");
        assert!(!spin_until_readable(&server, Duration::ZERO));
        client.write_all(&[7]).unwrap();
        assert!(spin_until_readable(&server, window), "a byte is waiting");
        let mut byte = [0u8; 1];
        let (read, fds) = recv_with_fds(&server, &mut byte).unwrap();
        assert_eq!(
            (read, byte, fds.len()),
            (1, [7], 0),
            "the peek left the byte"
        );
        drop(client);
        assert!(
            spin_until_readable(&server, window),
            "the end of the stream"
        );
    }
}
