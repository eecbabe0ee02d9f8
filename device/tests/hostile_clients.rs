//! Hostile vfio-user clients against the real server process: each attack gets an error or
//! its own connection closed, the server lives, every other device keeps answering, and
//! the server's descriptors return to their baseline.

mod hostile;
#[allow(dead_code)] // Shared with other suites; not every helper is used here.
mod support;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use hostile::{CONFIG_REGION, REG_BAR, RawClient};
use nix::sys::memfd::{MFdFlags, memfd_create};
use support::{ServerProcess, TempDir, wait_for_path};

const EINVAL: u32 = libc::EINVAL as u32;
const RAM_BASE: u64 = 0x1000_0000;
const MIB: u64 = 1 << 20;

struct TwoDevices {
    _dir: TempDir,
    server: ServerProcess,
    sockets: [std::path::PathBuf; 2],
}

fn two_devices(tag: &str) -> TwoDevices {
    two_devices_limited(tag, None)
}

/// Two devices on one server, its descriptor limit at `fds` if given.
fn two_devices_limited(tag: &str, fds: Option<u32>) -> TwoDevices {
    let dir = TempDir::new(tag);
    let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
    let args = [
        "--socket".as_ref(),
        sockets[0].as_os_str(),
        "--socket".as_ref(),
        sockets[1].as_os_str(),
    ];
    let server = match fds {
        Some(fds) => ServerProcess::start_with_fd_limit(fds, args),
        None => ServerProcess::start(args),
    };
    sockets.iter().for_each(|s| wait_for_path(s));
    TwoDevices {
        _dir: dir,
        server,
        sockets,
    }
}

fn memfd(length: u64) -> File {
    let file = File::from(memfd_create("hostile-ram", MFdFlags::MFD_CLOEXEC).expect("memfd"));
    file.set_len(length).expect("size the memfd");
    file
}

fn open_fds(server: &ServerProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .expect("the server's fd table")
        .count()
}

/// The other device answers config reads promptly: the median of 20 under 10 ms.
fn answers_promptly(client: &mut RawClient) {
    let mut times: Vec<Duration> = (0..20).map(|_| client.timed_config_read()).collect();
    times.sort();
    assert!(
        times[10] < Duration::from_millis(10),
        "the other device answered in {:?} (median)",
        times[10]
    );
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not happen within 5 s");
}

#[test]
fn fds_that_cannot_back_guest_ram_are_refused_and_the_client_stays() {
    let mut lab = two_devices("unmappable-fds");
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    let mut attacker = RawClient::connect(&lab.sockets[0]);

    // A 4 KiB memfd offered as 1 MiB of RAM: touching the rest would be SIGBUS.
    let short = memfd(4096);
    let reply = attacker
        .dma_map(0, RAM_BASE, MIB, Some(short.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, Some(EINVAL), "short memfd");
    // The offset counts: 1 MiB at offset 1 MiB of a 1.5 MiB file.
    let offset_short = memfd(MIB + MIB / 2);
    let reply = attacker
        .dma_map(MIB, RAM_BASE, MIB, Some(offset_short.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, Some(EINVAL), "window past the file's end");

    let (pipe, _writer) = nix::unistd::pipe().expect("pipe");
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let null = File::open("/dev/null").expect("/dev/null");
    let unmappable: [(&str, OwnedFd); 3] = [
        ("a pipe", pipe),
        ("a socket", OwnedFd::from(socket)),
        ("/dev/null", OwnedFd::from(null)),
    ];
    for (what, fd) in &unmappable {
        let reply = attacker
            .dma_map(0, RAM_BASE, MIB, Some(fd.as_fd()))
            .expect("a reply");
        assert_eq!(reply.errno, Some(EINVAL), "{what}");
    }
    lab.server.wait_for_line("not a regular file or memfd");

    // Read-write memory without a descriptor (QEMU's RAM without share=on) maps, as the
    // protocol allows, but the log says the device cannot reach it and how to fix that.
    let reply = attacker
        .dma_map(0, RAM_BASE + 16 * MIB, MIB, None)
        .expect("a reply");
    assert_eq!(reply.errno, None, "a window without a descriptor");
    let warning = lab
        .server
        .wait_for_line("is guest memory QEMU did not share (no file descriptor)");
    assert!(
        warning.contains("share=on -machine memory-backend=ram"),
        "the warning names the fix: {warning}"
    );

    // The attacker's own connection still works, and so does a proper window.
    attacker.timed_config_read();
    let ram = memfd(MIB);
    let reply = attacker
        .dma_map(0, RAM_BASE, MIB, Some(ram.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, None, "a memfd as long as its window maps");
    answers_promptly(&mut bystander);
}

#[test]
fn a_window_truncated_after_its_map_fails_its_device_not_the_server() {
    let mut lab = two_devices("truncated-window");
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    let baseline = open_fds(&lab.server);

    let mut attacker = RawClient::connect(&lab.sockets[0]);
    let ram = memfd(MIB);
    let reply = attacker
        .dma_map(0, RAM_BASE, MIB, Some(ram.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, None);
    // Memory decoding and bus mastering on, as the guest driver does.
    let reply = attacker
        .region_write(CONFIG_REGION, 4, &[0x06, 0x00])
        .expect("a reply");
    assert_eq!(reply.errno, None);

    // The client shrinks the file under the mapping, then points the DSR into the lost part:
    // the device reads it on the DSRHIGH write.
    ram.set_len(4096).expect("truncate");
    let dsr = RAM_BASE + MIB / 2;
    let low = u32::try_from(dsr & 0xffff_ffff).expect("low half");
    attacker
        .region_write(REG_BAR, 0x04, &low.to_le_bytes())
        .expect("DSRLOW reply");
    let reply = attacker.region_write(REG_BAR, 0x08, &0u32.to_le_bytes());
    // The write itself is answered (the fault is contained inside it); then the server
    // drops the client whose memory vanished.
    assert!(reply.is_ok(), "DSRHIGH write: {reply:?}");
    assert!(
        attacker.closed_by_server(),
        "the attacker's connection is closed"
    );
    lab.server
        .wait_for_line("device 0 failed: its guest memory shrank");

    // The server lives, the bystander answers, and the socket takes the next client.
    answers_promptly(&mut bystander);
    drop(attacker);
    lab.server.wait_for_line("released");
    wait_until("the server's fds returning to baseline", || {
        open_fds(&lab.server) == baseline
    });
    let mut next = RawClient::connect(&lab.sockets[0]);
    next.timed_config_read();
    let fresh = memfd(MIB);
    let reply = next
        .dma_map(0, RAM_BASE, MIB, Some(fresh.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, None, "the next client maps RAM again");
}

#[test]
fn msix_fds_that_could_block_the_server_are_refused_or_fail_alone() {
    const EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);
    const NONE_TRIGGER: u32 = 1 | (1 << 5);
    let mut lab = two_devices("blocking-msix");
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    let mut attacker = RawClient::connect(&lab.sockets[0]);

    // A pipe nobody reads would block the writer once full: refused.
    let (pipe_reader, pipe) = nix::unistd::pipe().expect("pipe");
    let reply = attacker
        .set_msix(EVENTFD_TRIGGER, 0, 1, &[pipe.as_fd()])
        .expect("a reply");
    assert_eq!(reply.errno, Some(EINVAL), "a pipe as an MSI-X eventfd");
    drop(pipe_reader);
    lab.server.wait_for_line("not an eventfd");

    // A blocking eventfd filled to its maximum: signalling it fails (EAGAIN), at once, and
    // for this device alone; the server thread does not wait for a reader that never comes.
    let full = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::empty())
        .expect("eventfd");
    full.write(u64::MAX - 1).expect("fill the counter");
    let reply = attacker
        .set_msix(EVENTFD_TRIGGER, 0, 1, &[full.as_fd()])
        .expect("a reply");
    assert_eq!(reply.errno, None, "an eventfd is accepted");
    let reply = attacker.set_msix(NONE_TRIGGER, 0, 1, &[]).expect("a reply");
    assert_eq!(
        reply.errno,
        Some(libc::EAGAIN as u32),
        "firing a full eventfd"
    );
    answers_promptly(&mut bystander);
    attacker.timed_config_read();
}

#[test]
fn a_client_that_stalls_mid_message_is_dropped_and_the_next_one_served() {
    let mut lab = two_devices("stalled-client");
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    let mut staller = RawClient::connect(&lab.sockets[0]);
    // Half a header, then nothing: the socket would be held for ever.
    staller.send_raw(&[0x01, 0x00, 0x09, 0x00, 0x20, 0x00, 0x00, 0x00]);
    let started = std::time::Instant::now();
    // Meanwhile the other device answers, and the next client of the stalled socket (the
    // next QEMU) is served once the staller is dropped, within the message timeout.
    answers_promptly(&mut bystander);
    lab.server
        .wait_for_line("stalled in the middle of a message");
    let mut next = RawClient::connect(&lab.sockets[0]);
    next.timed_config_read();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the next client waited {waited:?}"
    );
    assert!(
        staller.closed_by_server(),
        "the staller's connection is closed"
    );
}

#[test]
fn a_second_client_on_a_busy_socket_is_told_and_closed_and_the_first_goes_on() {
    let mut lab = two_devices("busy-socket");
    let mut first = RawClient::connect(&lab.sockets[0]);
    // A second QEMU on the same socket: its VERSION is answered EBUSY and its connection
    // closed, at once, instead of leaving it in the backlog with no word.
    let started = std::time::Instant::now();
    let (mut second, reply) = RawClient::knock(&lab.sockets[0]);
    assert_eq!(
        reply.errno,
        Some(libc::EBUSY as u32),
        "the second client's VERSION"
    );
    assert!(second.closed_by_server(), "the second client is closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "turned away after {:?}",
        started.elapsed()
    );
    lab.server
        .wait_for_line("another client connected while one is attached: answered EBUSY");
    // The first client was not disturbed, and once it leaves the socket takes a new one.
    answers_promptly(&mut first);
    drop(first);
    lab.server.wait_for_line("client disconnected");
    let mut next = RawClient::connect(&lab.sockets[0]);
    answers_promptly(&mut next);
    // Many knocks at once are each answered, and the attached client still answers.
    let knocks: Vec<_> = (0..20)
        .map(|_| {
            let path = lab.sockets[0].clone();
            std::thread::spawn(move || RawClient::knock(&path).1.errno)
        })
        .collect();
    for knock in knocks {
        assert_eq!(knock.join().expect("knock"), Some(libc::EBUSY as u32));
    }
    answers_promptly(&mut next);
}

#[test]
fn dma_windows_are_capped_per_client_and_a_map_that_cannot_be_done_is_an_error() {
    let mut lab = two_devices("window-cap");
    let mut attacker = RawClient::connect(&lab.sockets[0]);
    let ram = memfd(4096);
    for i in 0..256u64 {
        let reply = attacker
            .dma_map(0, RAM_BASE + i * 0x10_0000, 4096, Some(ram.as_fd()))
            .expect("a reply");
        assert_eq!(reply.errno, None, "window {i} of 256");
    }
    let reply = attacker
        .dma_map(0, RAM_BASE + 256 * 0x10_0000, 4096, Some(ram.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, Some(libc::ENOSPC as u32), "the 257th window");
    lab.server.wait_for_line("too many DMA windows");

    // With a descriptor limit too low for 256 windows, the attacker's maps fail with an
    // error once descriptors run out, never with a success that drops the window.
    let mut lab = two_devices_limited("window-fds", Some(160));
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    let mut attacker = RawClient::connect(&lab.sockets[0]);
    let mut refused = None;
    for i in 0..256u64 {
        let reply = attacker
            .dma_map(0, RAM_BASE + i * 0x10_0000, 4096, Some(ram.as_fd()))
            .expect("a reply");
        if let Some(errno) = reply.errno {
            refused = Some((i, errno));
            break;
        }
    }
    let (at, errno) = refused.expect("a limit of 160 descriptors cannot hold 256 windows");
    assert!(
        errno == libc::ENOMEM as u32 || errno == libc::EMFILE as u32,
        "window {at}: errno {errno}"
    );
    lab.server.wait_for_line("refused");
    answers_promptly(&mut bystander);
    // Once the attacker is gone, the other device maps its RAM.
    drop(attacker);
    lab.server.wait_for_line("released");
    let own = memfd(MIB);
    let reply = bystander
        .dma_map(0, RAM_BASE, MIB, Some(own.as_fd()))
        .expect("a reply");
    assert_eq!(reply.errno, None, "the bystander maps its RAM");
}

#[test]
fn a_client_cannot_flood_the_servers_log() {
    let mut lab = two_devices("log-flood");
    let mut attacker = RawClient::connect(&lab.sockets[0]);
    let mut bystander = RawClient::connect(&lab.sockets[1]);
    // Every one of these is refused with a warning naming it.
    const UNKNOWN_COMMAND: u16 = 999;
    const FLOOD: usize = 5_000;
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let reply = attacker.call(UNKNOWN_COMMAND, &[], &[]).expect("a reply");
        assert_eq!(reply.errno, Some(libc::ENOTSUP as u32));
    }
    // After the window, the site's next line says how many were left out.
    std::thread::sleep(Duration::from_millis(1100));
    attacker.call(UNKNOWN_COMMAND, &[], &[]).expect("a reply");
    lab.server.wait_for_line("more like it left out");
    answers_promptly(&mut bystander);
    let seconds = started.elapsed().as_secs() + 1;
    let written = lab
        .server
        .log()
        .lines()
        .filter(|line| line.contains("unknown command 999"))
        .count() as u64;
    // At most 20 lines per second of flooding (see log_limit.rs), not one per message.
    assert!(
        written <= 20 * (seconds + 1),
        "{written} lines for {FLOOD} refusals in {seconds} s"
    );
    assert!(
        written >= 20,
        "the first lines are still written ({written})"
    );
}
