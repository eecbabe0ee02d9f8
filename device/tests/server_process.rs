//! End-to-end tests: the real binary, driven by the `vfio_user` crate's client.
//!
//! The crate's `Client` ignores error replies and then desyncs (docs/vfio-user-server.md,
//! the crate's bugs), so these tests only send valid requests and observe the server's
//! side effects through replies and its debug log.

mod support;

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use support::{ServerProcess, TempDir, wait_for_path};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Client;

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

fn connect(path: &Path) -> Client {
    Client::new(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()))
}

fn config_u32(client: &mut Client, offset: u64) -> u32 {
    let mut raw = [0; 4];
    client
        .region_read(CONFIG, offset, &mut raw)
        .expect("config read");
    u32::from_le_bytes(raw)
}

fn check_regions(client: &Client) {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    for (index, size) in [
        (0, 16 * 1024),
        (1, 8 * 1024),
        (2, 2 * 1024 * 1024),
        (3, 0),
        (4, 0),
        (5, 0),
        (6, 0),
        (7, 256),
        (8, 0),
    ] {
        let region = client
            .region(index)
            .unwrap_or_else(|| panic!("region {index} advertised"));
        assert_eq!(region.size, size, "region {index} size");
        if index == 1 {
            // BAR1's second page is mmap-able, which turns QEMU's posted writes off.
            assert_eq!(region.flags & rw, rw, "region 1 flags");
            assert_eq!(
                region.flags & VFIO_REGION_INFO_FLAG_MMAP,
                VFIO_REGION_INFO_FLAG_MMAP
            );
            assert_eq!(region.sparse_areas.len(), 1);
            assert_eq!(
                (region.sparse_areas[0].offset, region.sparse_areas[0].size),
                (4096, 4096)
            );
            assert!(region.file_offset.is_some(), "region 1 comes with its file");
            continue;
        }
        assert_eq!(
            region.flags,
            if size == 0 { 0 } else { rw },
            "region {index} flags"
        );
        assert!(
            region.file_offset.is_none(),
            "region {index} is not mmappable"
        );
    }
    assert!(client.region(9).is_none());
}

fn check_identity(client: &mut Client) {
    let mut config = [0u8; 256];
    client
        .region_read(CONFIG, 0, &mut config)
        .expect("read the whole config space");
    assert_eq!(u16::from_le_bytes([config[0], config[1]]), 0x15AD, "vendor");
    assert_eq!(u16::from_le_bytes([config[2], config[3]]), 0x0820, "device");
    assert_eq!(&config[0x09..0x0C], &[0x00, 0x80, 0x02], "class 02/80/00");
    assert_eq!(config[0x34], 0x40, "capability pointer");
    assert_eq!(config[0x40], 0x11, "MSI-X capability");
}

fn check_irqs(client: &mut Client) {
    let msix = client
        .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
        .expect("MSI-X info");
    assert_eq!((msix.index, msix.count), (VFIO_PCI_MSIX_IRQ_INDEX, 3));
    assert_eq!(msix.flags, VFIO_IRQ_INFO_EVENTFD);
    for index in [VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_ERR_IRQ_INDEX] {
        assert_eq!(client.get_irq_info(index).expect("irq info").count, 0);
    }
}

/// Programs BAR0 through config writes, as firmware does.
fn check_bar_sizing(client: &mut Client) {
    client
        .region_write(CONFIG, 0x10, &u32::MAX.to_le_bytes())
        .expect("size BAR0");
    assert_eq!(config_u32(client, 0x10), 0xFFFF_C000);
    client
        .region_write(CONFIG, 0x10, &0xFEB0_0000u32.to_le_bytes())
        .expect("place BAR0");
    assert_eq!(config_u32(client, 0x10), 0xFEB0_0000);
    // The PBA answers (all clear).
    let mut pba = [0xAA; 8];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x2000, &mut pba)
        .expect("PBA read");
    assert_eq!(pba, [0; 8]);
}

fn check_dma(client: &mut Client, server: &mut ServerProcess, dir: &Path) {
    let backing = File::create_new(dir.join("guest-ram")).expect("create RAM file");
    backing.set_len(0x20_0000).expect("size RAM file");
    client
        .dma_map(0x1000, 0x10_0000, 0x10_0000, backing.as_raw_fd())
        .expect("DMA map");
    server.wait_for_line("DMA map 0x100000+0x100000 offset 0x1000 rw");
    client.dma_unmap(0x10_0000, 0x10_0000).expect("DMA unmap");
    server.wait_for_line("DMA unmap 0x100000+0x100000");
    // Left mapped on purpose: disconnect must release it.
    client
        .dma_map(0, 0x4000_0000, 0x1000, backing.as_raw_fd())
        .expect("DMA map");
    server.wait_for_line("DMA map 0x40000000+0x1000");
}

fn check_msix_eventfd(client: &mut Client) {
    let efd = File::from(OwnedFd::from(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"),
    ));
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            1,
            1,
            &[efd.as_raw_fd()],
        )
        .expect("assign vector 1");
    // Software trigger: the server writes the eventfd before replying.
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            1,
            1,
            &[],
        )
        .expect("trigger vector 1");
    let mut raw = [0u8; 8];
    let mut reader = &efd;
    match reader.read(&mut raw) {
        Ok(8) => assert_eq!(u64::from_ne_bytes(raw), 1),
        Ok(n) => panic!("short eventfd read: {n}"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => panic!("vector 1 was not signalled"),
        Err(e) => panic!("eventfd read: {e}"),
    }
}

#[test]
fn serves_successive_clients_and_exits_cleanly_on_sigterm() {
    let dir = TempDir::new("serve");
    let socket = dir.path().join("pvrdma.sock");
    let mut server = ServerProcess::start([Path::new("--socket"), &socket]);
    server.wait_for_line(&format!("listening on {}", socket.display()));
    wait_for_path(&socket);

    let mut client = connect(&socket);
    check_regions(&client);
    check_identity(&mut client);
    check_irqs(&mut client);
    check_bar_sizing(&mut client);
    check_dma(&mut client, &mut server, dir.path());
    check_msix_eventfd(&mut client);
    client.shutdown().expect("disconnect");
    drop(client);
    server.wait_for_line("client disconnected");
    server.wait_for_line("released 1 DMA windows and 1 MSI-X eventfds");

    // The next QEMU can attach to the same socket.
    let mut client = connect(&socket);
    check_regions(&client);
    check_identity(&mut client);
    // Device state survives a disconnect; DEVICE_RESET restores power-on.
    assert_eq!(config_u32(&mut client, 0x10), 0xFEB0_0000);
    client.reset().expect("device reset");
    server.wait_for_line("device reset");
    assert_eq!(config_u32(&mut client, 0x10), 0);
    drop(client);
    server.wait_for_line("client disconnected");

    let status = server.stop_with(Signal::SIGTERM);
    let log = server.log();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(!socket.exists(), "socket file removed on SIGTERM");
    // Shown with --nocapture; handy when the protocol flow changes.
    eprintln!("server log:\n{log}");
}

#[test]
fn several_sockets_force_and_sigint() {
    let dir = TempDir::new("multi");
    let stale = dir.path().join("stale.sock");
    let fresh = dir.path().join("fresh.sock");
    // A socket file nobody listens on, as a crashed run leaves behind.
    drop(UnixListener::bind(&stale).expect("bind"));

    let mut server = ServerProcess::start([
        Path::new("--force"),
        Path::new("--socket"),
        &stale,
        Path::new("--socket"),
        &fresh,
    ]);
    server.wait_for_line(&format!("listening on {}", stale.display()));
    server.wait_for_line(&format!("listening on {}", fresh.display()));

    // Independent functions: both answer at the same time.
    let mut a = connect(&stale);
    let mut b = connect(&fresh);
    assert_eq!(config_u32(&mut a, 0), 0x0820_15AD);
    assert_eq!(config_u32(&mut b, 0), 0x0820_15AD);
    a.region_write(CONFIG, 0x3C, &[0x0B])
        .expect("interrupt line");
    assert_eq!(config_u32(&mut a, 0x3C) & 0xFF, 0x0B);
    assert_eq!(config_u32(&mut b, 0x3C) & 0xFF, 0x00);
    drop((a, b));

    let status = server.stop_with(Signal::SIGINT);
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    assert!(!stale.exists() && !fresh.exists(), "both sockets removed");
}

#[test]
fn existing_socket_path_fails_startup() {
    let dir = TempDir::new("exists");
    let socket = dir.path().join("taken.sock");
    std::fs::write(&socket, b"not a socket").expect("create file");

    let mut server = ServerProcess::start([Path::new("--socket"), &socket]);
    let status = server.wait_exit();
    let log = server.log();
    assert!(!status.success(), "must fail; log:\n{log}");
    assert!(
        log.contains(&socket.display().to_string()),
        "error names the path:\n{log}"
    );
    assert!(socket.exists(), "the existing file is left alone");

    // Even with --force, a regular file is not removed.
    let mut server = ServerProcess::start([Path::new("--force"), Path::new("--socket"), &socket]);
    assert!(!server.wait_exit().success());
    assert!(socket.exists());
}

#[test]
fn a_failing_socket_aborts_the_whole_start() {
    let dir = TempDir::new("partial");
    let good = dir.path().join("good.sock");
    let bad = dir.path().join("no-such-dir").join("bad.sock");
    let mut server =
        ServerProcess::start([Path::new("--socket"), &good, Path::new("--socket"), &bad]);
    let status = server.wait_exit();
    let log = server.log();
    assert!(!status.success(), "must fail; log:\n{log}");
    assert!(
        log.contains(&bad.display().to_string()),
        "names the bad path:\n{log}"
    );
    assert!(!good.exists(), "the socket already bound is cleaned up");
}

#[test]
fn cli_requires_a_socket_and_documents_it() {
    let mut server = ServerProcess::start::<[&str; 0], &str>([]);
    assert_eq!(server.wait_exit().code(), Some(2), "usage error");

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .arg("--version")
        .output()
        .expect("run --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with(&format!("vfio-user-pvrdma {} (", env!("CARGO_PKG_VERSION")))
            && version.trim_end().ends_with(')')
            && !version.contains("()"),
        "--version names the version and the git revision: {version}"
    );
    for needle in [
        "--socket-path <PATH[,guid=G]>",
        "must not exist",
        "--force",
        "stale",
        "--fd <N>",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    // -h is the summary: one line per option, without the paragraphs --help adds, and
    // neither points to files an installed binary cannot reach.
    let short = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .arg("-h")
        .output()
        .expect("run -h");
    let short = String::from_utf8_lossy(&short.stdout);
    assert!(short.contains("--socket-path <PATH[,guid=G]>"), "{short}");
    assert!(
        !short.contains("derived from the path"),
        "-h is short:\n{short}"
    );
    assert!(
        text.contains("derived from the path"),
        "--help is long:\n{text}"
    );
    assert!(short.lines().count() * 2 < text.lines().count());
    for help in [&*short, &*text] {
        assert!(!help.contains("docs/"), "help cites a docs/ file:\n{help}");
    }
}

/// `NAME:\tVALUE` of the server's /proc status.
fn proc_status(server: &ServerProcess, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|value| value.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn the_server_serves_from_inside_its_sandbox_unless_told_not_to() {
    let dir = TempDir::new("sandbox");
    let socket = dir.path().join("pvrdma.sock");
    let mut server = ServerProcess::start([Path::new("--socket"), &socket]);
    server.wait_for_line("sandbox: no new privileges");
    wait_for_path(&socket);
    // Every thread, the serving ones included, runs under the filter.
    assert_eq!(proc_status(&server, "NoNewPrivs"), "1");
    assert_eq!(proc_status(&server, "Seccomp"), "2", "seccomp filter mode");
    let mut client = connect(&socket);
    check_dma(&mut client, &mut server, dir.path());
    check_msix_eventfd(&mut client);
    drop(client);
    server.wait_for_line("client disconnected");
    // The socket file is still removed at exit, from inside the sandbox.
    assert!(server.stop_with(Signal::SIGTERM).success());
    assert!(!socket.exists(), "socket file removed on SIGTERM");

    let socket = dir.path().join("debug.sock");
    let mut server = ServerProcess::start([
        Path::new("--socket"),
        &socket,
        Path::new("--sandbox"),
        Path::new("off"),
    ]);
    server.wait_for_line("--sandbox off");
    wait_for_path(&socket);
    assert_eq!(proc_status(&server, "Seccomp"), "0");
}

/// QEMU's vfio-user backend conventions: the server serves on a listening socket it was
/// started with, as `--fd N` or through systemd's socket activation; it does not unlink
/// the socket's file at exit (whoever made the socket owns it), and a client connects.
#[test]
fn the_server_serves_on_sockets_it_was_started_with_and_leaves_their_files() {
    for activated in [false, true] {
        let dir = TempDir::new("inherited");
        let path = dir.path().join("passed.sock");
        let listener = UnixListener::bind(&path).expect("bind the socket to pass");
        let args: &[&str] = if activated { &[] } else { &["--fd", "3"] };
        let mut server = ServerProcess::start_with_socket_fd(listener, activated, args);
        // Named by the path it is bound to, so its GUID is the same whoever passes it.
        server.wait_for_line(&format!(
            "serving on {} (a socket the server was started with)",
            path.display()
        ));
        let client = connect(&path);
        server.wait_for_line("client connected");
        drop(client);
        assert_eq!(server.stop_with(Signal::SIGTERM).code(), Some(0));
        assert!(
            path.exists(),
            "an inherited socket's file is left to its owner (activated: {activated})"
        );
    }
}

/// The common mistakes at start are named: a socket in a missing directory, a descriptor
/// that is not a listening socket, nothing to serve at all.
#[test]
fn start_up_mistakes_are_named() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the server");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["--socket-path", "/no-such-pvrdma-dir/fn0.sock"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot listen on /no-such-pvrdma-dir/fn0.sock: the directory /no-such-pvrdma-dir does not exist"),
        "{err}"
    );
    let (code, err) = run(&["--fd", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("file descriptor 0 is not a listening UNIX stream socket (not a socket"),
        "{err}"
    );
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no socket to serve: pass --socket-path PATH or --fd N"),
        "{err}"
    );
}
