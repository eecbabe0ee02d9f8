//! [`SocketBus`]: the real `vfio-user-pvrdma` process, driven over its UNIX socket the way
//! QEMU's vfio-user-pci drives it.
//!
//! * [`SocketServer`] runs the binary on one or more sockets in a fresh temp dir, collects
//!   its log (stderr) and kills it and removes the dir when the last user drops it.
//! * [`SocketBus`] is one client of one socket: a `vfio_user::Client`, the driver's guest RAM
//!   (its memfd DMA_MAP'ed at the RAM's guest-physical base, offset 0, read-write), memory
//!   decoding and bus mastering enabled in the command register, and one eventfd per MSI-X
//!   vector handed over with one SET_IRQS each (`DATA_EVENTFD | ACTION_TRIGGER`).
//!
//! The client waits for every reply, like QEMU with posted writes off (BAR1 has an mmap-able
//! page), so whatever a register or doorbell write triggers has finished when it returns and
//! the interrupts it raised are already in the eventfds.
//!
//! The crate's client ignores error bits in replies and desyncs (or blocks) after an error
//! reply (docs/vfio-user-server.md, the crate's bugs). So every setup step is confirmed from the server's
//! debug log, and every client call runs under a watchdog that kills the server when a call
//! takes longer than [`TIMEOUT`]: the blocked call then fails and the test panics with the
//! server's log instead of hanging.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vfio_user_pvrdma::pci::{ids, regs};

use super::Driver;
use super::bus::Bus;
use super::memory::{self, GuestMemory};

/// Longest any single step may take (start-up, one client call, one awaited log line):
/// generous, for debug builds on a loaded machine.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The PCI configuration space region.
pub const CONFIG_REGION: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

/// SET_IRQS flags QEMU uses to hand over an MSI-X vector's eventfd.
pub const MSIX_EVENTFD_FLAGS: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

/// The server's log filter by default: everything the device logs.
pub const DEBUG_LOG: &str = "vfio_user_pvrdma=debug,info";

/// A filter that keeps only what a [`SocketBus`] waits for (the vfio-user layer at debug),
/// not the device's per-command lines: for measurements, where logging would be part of
/// what is timed.
pub const QUIET_LOG: &str = "vfio_user_pvrdma::vfio=debug,info";

/// Command register bits QEMU's guest sets before using the device.
pub const COMMAND_ENABLE: u16 = regs::COMMAND_MEMORY | regs::COMMAND_BUS_MASTER;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------------------

/// A client call in flight.
#[derive(Debug, Clone, Copy)]
struct Call {
    what: &'static str,
    region: u32,
    offset: u64,
    deadline: Instant,
}

#[derive(Default)]
struct WatchState {
    /// Longest a call may take, in milliseconds; [`TIMEOUT`] unless changed.
    limit_ms: AtomicU64,
    armed: Mutex<BTreeMap<u64, Call>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    /// The call that overran, once the server was killed for it.
    fired: Mutex<Option<Call>>,
}

/// Kills the server when a client call overruns its deadline.
struct Watchdog {
    state: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: Pid) -> Watchdog {
        let state = Arc::new(WatchState::default());
        state
            .limit_ms
            .store(TIMEOUT.as_millis() as u64, Ordering::Relaxed);
        let shared = Arc::clone(&state);
        let thread = thread::Builder::new()
            .name("socket-bus-watchdog".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    let overdue = lock(&shared.armed)
                        .values()
                        .find(|call| now >= call.deadline)
                        .copied();
                    if let Some(call) = overdue {
                        *lock(&shared.fired) = Some(call);
                        // Our own child, not yet reaped (the server joins this thread first).
                        let _ = kill(pid, Signal::SIGKILL);
                        return;
                    }
                    thread::park_timeout(Duration::from_millis(50));
                }
            })
            .expect("spawn the watchdog thread");
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    fn arm(&self, what: &'static str, region: u32, offset: u64) -> Armed<'_> {
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let call = Call {
            what,
            region,
            offset,
            deadline: Instant::now() + self.limit(),
        };
        lock(&self.state.armed).insert(id, call);
        Armed {
            state: &self.state,
            id,
        }
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.state.limit_ms.load(Ordering::Relaxed))
    }

    fn fired(&self) -> Option<Call> {
        *lock(&self.state.fired)
    }

    fn stop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Disarms its call when dropped.
struct Armed<'a> {
    state: &'a WatchState,
    id: u64,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        lock(&self.state.armed).remove(&self.id);
    }
}

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

struct ServerLog {
    lines: Receiver<String>,
    log: Vec<String>,
    /// Per socket: lines before this index were consumed by an earlier wait.
    cursors: Vec<usize>,
    /// The same for lines of the whole server ([`SocketServer::wait_for_server_line`]).
    server_cursor: usize,
}

impl ServerLog {
    /// Collects what the reader thread has, waiting at most `wait` for the first line.
    fn drain(&mut self, wait: Duration) {
        let mut wait = wait;
        while let Ok(line) = self.lines.recv_timeout(wait) {
            self.log.push(line);
            wait = Duration::ZERO;
        }
    }
}

/// One `vfio-user-pvrdma` process serving one PVRDMA function per socket.
pub struct SocketServer {
    child: Mutex<Child>,
    pid: Pid,
    dir: PathBuf,
    sockets: Vec<PathBuf>,
    /// The profiler's control socket (`--control`).
    control: PathBuf,
    log: Mutex<ServerLog>,
    watchdog: Watchdog,
}

impl SocketServer {
    /// Starts the binary with `count` sockets (`fn0.sock`, `fn1.sock`, …) in a unique temp
    /// dir and waits until it listens on all of them.
    pub fn start(count: usize) -> Arc<SocketServer> {
        SocketServer::start_logging(count, DEBUG_LOG)
    }

    /// [`SocketServer::start`] with `rust_log` as the server's `RUST_LOG`. It must keep the
    /// lines the bus waits for: info everywhere and debug for `vfio_user_pvrdma::vfio` (DMA
    /// maps, SET_IRQS), as [`QUIET_LOG`] does.
    pub fn start_logging(count: usize, rust_log: &str) -> Arc<SocketServer> {
        SocketServer::start_with(count, rust_log, &[])
    }

    /// [`SocketServer::start_logging`] with more command-line arguments for the server
    /// (`--doorbells exit-free`, …).
    pub fn start_with(count: usize, rust_log: &str, args: &[&str]) -> Arc<SocketServer> {
        SocketServer::start_partly(count, count, rust_log, args)
    }

    /// [`SocketServer::start_with`] with `count` socket paths of which only the first
    /// `started` are given on the command line: the others are for `device add`.
    pub fn start_partly(
        count: usize,
        started: usize,
        rust_log: &str,
        args: &[&str],
    ) -> Arc<SocketServer> {
        SocketServer::start_in(None, count, started, rust_log, args)
    }

    /// [`SocketServer::start_partly`] inside network namespace `netns` (a test's "host"):
    /// `ip netns exec` execs the server there, so the child is the server. Its sockets are
    /// files, reached from any namespace.
    pub fn start_in(
        netns: Option<&str>,
        count: usize,
        started: usize,
        rust_log: &str,
        args: &[&str],
    ) -> Arc<SocketServer> {
        assert!(count >= started && started >= 1);
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "pvrdma-sockbus-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("create the server's temp dir");
        let sockets: Vec<PathBuf> = (0..count)
            .map(|i| dir.join(format!("fn{i}.sock")))
            .collect();
        let control = dir.join("control.sock");
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(server_binary());
                command
            }
            None => Command::new(server_binary()),
        };
        for socket in &sockets[..started] {
            command.arg("--socket").arg(socket);
        }
        command.arg("--control").arg(&control).args(args);
        let spawned = command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("spawn vfio-user-pvrdma: {e}");
            }
        };
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = channel();
        // Drains stderr continuously so the server never blocks on logging.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let server = Arc::new(SocketServer {
            child: Mutex::new(child),
            pid,
            dir,
            log: Mutex::new(ServerLog {
                lines,
                log: Vec::new(),
                cursors: vec![0; count],
                server_cursor: 0,
            }),
            sockets,
            control,
            watchdog: Watchdog::start(pid),
        });
        for (i, socket) in server.sockets[..started].iter().enumerate() {
            server.wait_for_line(i, &format!("listening on {}", socket.display()));
            assert!(socket.exists(), "{} was not created", socket.display());
        }
        server
    }

    /// The path of the profiler's control socket (bound before any `--socket` listens).
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The path of socket `index`.
    pub fn socket(&self, index: usize) -> &Path {
        &self.sockets[index]
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The exit status, if the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .try_wait()
            .expect("try_wait on the server")
    }

    /// Waits (bounded) for a log line of socket `index` (one that names its path: the
    /// thread serving it is named after it) containing `needle`, after the line the
    /// previous wait for this socket matched. Returns the line.
    pub fn wait_for_line(&self, index: usize, needle: &str) -> String {
        let path = self.sockets[index].display().to_string();
        self.wait_matching(
            |log| &mut log.cursors[index],
            |line| line.contains(&path) && line.contains(needle),
            &format!("{needle:?} for {path}"),
        )
    }

    /// Waits for a log line containing `needle` that is not about one socket (the TCP
    /// transport's, say), after the previous one this found; returns it.
    pub fn wait_for_server_line(&self, needle: &str) -> String {
        self.wait_matching(
            |log| &mut log.server_cursor,
            |line| line.contains(needle),
            &format!("{needle:?}"),
        )
    }

    /// Waits (up to [`TIMEOUT`]) for a line that `matches`, after the position `cursor`
    /// selects, moves that position past it and returns the line; panics with the log.
    fn wait_matching(
        &self,
        cursor: impl Fn(&mut ServerLog) -> &mut usize,
        matches: impl Fn(&str) -> bool,
        what: &str,
    ) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut log = lock(&self.log);
        loop {
            let at = *cursor(&mut log);
            if let Some(pos) = log.log[at..].iter().position(|line| matches(line)) {
                *cursor(&mut log) = at + pos + 1;
                return log.log[at + pos].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match log.lines.recv_timeout(left) {
                Ok(line) => log.log.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    let text = log.log.join("\n");
                    drop(log);
                    panic!("no log line with {what} within {TIMEOUT:?}; log:\n{text}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let text = log.log.join("\n");
                    drop(log);
                    panic!("the server exited before logging {what}; log:\n{text}")
                }
            }
        }
    }

    /// Sends `signal` and waits (bounded) for the process to exit.
    pub fn stop_with(&self, signal: Signal) -> ExitStatus {
        kill(self.pid, signal).expect("signal the server");
        self.wait_exit()
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Changes how long one client call may take before the watchdog kills the server
    /// ([`TIMEOUT`] by default).
    pub fn set_call_timeout(&self, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.watchdog.state.limit_ms.store(ms, Ordering::Relaxed);
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        let mut log = lock(&self.log);
        log.drain(Duration::from_millis(100));
        log.log.join("\n")
    }

    /// Panics for a failed client call, with the watchdog's verdict and the server's log.
    fn fail(&self, what: &str, error: impl Display) -> ! {
        let why = match self.watchdog.fired() {
            Some(call) => format!(
                "; the watchdog killed the server because {} (region {} offset {:#x}) took \
                 longer than {:?}",
                call.what,
                call.region,
                call.offset,
                self.watchdog.limit()
            ),
            None => match self.exited() {
                Some(status) => format!("; the server exited: {status}"),
                None => String::new(),
            },
        };
        panic!("{what}: {error}{why}; server log:\n{}", self.log())
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        // The watchdog goes first, so it can never signal a reaped (reusable) pid.
        self.watchdog.stop();
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// The bus
// ---------------------------------------------------------------------------------------

/// How a [`SocketBus`] client sets the function up before the guest driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// The RAM is DMA_MAP'ed as this many equal windows of the one memfd, each at its own
    /// file offset, last window first (QEMU maps guest RAM in several pieces like this).
    pub windows: u64,
    /// Whether memory decoding and bus mastering get enabled.
    pub bus_master: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            windows: 1,
            bus_master: true,
        }
    }
}

/// One vfio-user client of one socket of a [`SocketServer`], set up as QEMU sets it up.
///
/// Dropping it disconnects; the server is killed and its temp dir removed when the last bus
/// (or other holder of the [`SocketServer`]) goes away.
pub struct SocketBus {
    // Field order is drop order: disconnect before the server can be killed.
    client: Option<Client>,
    /// One per MSI-X vector, non-blocking.
    eventfds: Vec<EventFd>,
    memory: GuestMemory,
    server: Arc<SocketServer>,
    socket: usize,
    setup: Setup,
}

impl SocketBus {
    /// A fresh server with one socket and a client of it with the default guest RAM.
    pub fn start() -> SocketBus {
        let server = SocketServer::start(1);
        SocketBus::connect(&server, 0, default_memory())
    }

    /// A client of `server`'s socket `socket` as QEMU sets one up: VERSION and region
    /// infos, the RAM DMA_MAP'ed in one window, the MSI-X eventfds assigned, memory
    /// decoding and bus mastering on.
    pub fn connect(server: &Arc<SocketServer>, socket: usize, memory: GuestMemory) -> SocketBus {
        SocketBus::connect_with(server, socket, memory, Setup::default())
    }

    /// [`SocketBus::connect`] with a different [`Setup`].
    pub fn connect_with(
        server: &Arc<SocketServer>,
        socket: usize,
        memory: GuestMemory,
        setup: Setup,
    ) -> SocketBus {
        assert!(
            setup.windows >= 1
                && memory
                    .size()
                    .is_multiple_of(setup.windows * vfio_user_pvrdma::abi::PAGE_SIZE),
            "{} windows cannot split {:#x} bytes into pages",
            setup.windows,
            memory.size()
        );
        let mut bus = SocketBus {
            client: None,
            eventfds: Vec::new(),
            memory,
            server: Arc::clone(server),
            socket,
            setup,
        };
        bus.attach();
        bus
    }

    /// Connects a new client, DMA_MAPs the RAM, assigns fresh eventfds and (per the setup)
    /// enables bus mastering.
    fn attach(&mut self) {
        assert!(self.client.is_none(), "a client is already connected");
        let path = self.server.socket(self.socket).to_path_buf();
        let client = {
            let _armed = self.server.watchdog.arm("VERSION and region infos", 0, 0);
            Client::new(&path).unwrap_or_else(|e| {
                self.server
                    .fail(&format!("connect to {}", path.display()), e)
            })
        };
        self.client = Some(client);

        let base = self.memory.base();
        let piece = self.memory.size() / self.setup.windows;
        let fd = self.memory.memfd().as_raw_fd();
        for i in (0..self.setup.windows).rev() {
            let (address, offset) = (base + i * piece, i * piece);
            self.call("DMA_MAP", 0, address, |c| {
                c.dma_map(offset, address, piece, fd)
            });
            // The client does not look at the reply's error bit: the server's log does.
            self.server.wait_for_line(
                self.socket,
                &format!("DMA map {address:#x}+{piece:#x} offset {offset:#x} rw"),
            );
        }

        self.assign_eventfds();
        if self.setup.bus_master {
            self.enable_bus_master();
        }
    }

    /// Fresh eventfds for every MSI-X vector, one SET_IRQS each.
    fn assign_eventfds(&mut self) {
        self.eventfds = (0..ids::MSIX_VECTORS)
            .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC))
            .collect::<Result<_, _>>()
            .expect("create the MSI-X eventfds");
        for vector in 0..ids::MSIX_VECTORS {
            let fd = self.eventfds[usize::from(vector)].as_raw_fd();
            let start = u32::from(vector);
            // One vector per message, as QEMU does (the server advertises max_msg_fds 1).
            self.call("SET_IRQS", VFIO_PCI_MSIX_IRQ_INDEX, start.into(), |c| {
                c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, MSIX_EVENTFD_FLAGS, start, 1, &[fd])
            });
            self.server.wait_for_line(
                self.socket,
                &format!(
                    "SET_IRQS index {VFIO_PCI_MSIX_IRQ_INDEX} flags {MSIX_EVENTFD_FLAGS:#x} \
                     {start}+1: Assigned"
                ),
            );
        }
    }

    /// Sets memory decoding and bus mastering in the command register (read-modify-write,
    /// as the guest's `pci_enable_device` and `pci_set_master` do) and checks they stuck.
    pub fn enable_bus_master(&mut self) {
        let command = self.config_read16(regs::COMMAND as u64);
        self.config_write(
            regs::COMMAND as u64,
            &(command | COMMAND_ENABLE).to_le_bytes(),
        );
        let now = self.config_read16(regs::COMMAND as u64);
        assert_eq!(
            now & COMMAND_ENABLE,
            COMMAND_ENABLE,
            "command register {now:#06x} after enabling memory and bus mastering"
        );
    }

    pub fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.call("config read", CONFIG_REGION, offset, |c| {
            c.region_read(CONFIG_REGION, offset, data)
        });
    }

    pub fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.call("config write", CONFIG_REGION, offset, |c| {
            c.region_write(CONFIG_REGION, offset, data)
        });
    }

    pub fn config_read16(&mut self, offset: u64) -> u16 {
        let mut raw = [0; 2];
        self.config_read(offset, &mut raw);
        u16::from_le_bytes(raw)
    }

    /// The client, for requests the bus does not wrap. Only send valid requests: an error
    /// reply desyncs it.
    pub fn client(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("no client is connected (after disconnect())")
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// Maps region `index` from the file the server sent with its REGION_INFO, as QEMU maps
    /// a sparse-mmap BAR into the guest (offsets from 0 are region offsets); `None` if the
    /// region came without one (trapped).
    pub fn map_region(&mut self, index: u32) -> Option<vm_memory::GuestMemoryMmap> {
        use vm_memory::{FileOffset, GuestAddress};
        let region = self.client().region(index)?;
        let file_offset = region.file_offset.as_ref()?;
        let size = usize::try_from(region.size).expect("region size fits usize");
        let file = file_offset.file().try_clone().expect("dup the region's fd");
        let mapped = vm_memory::GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, file_offset.start())),
        )])
        .unwrap_or_else(|e| panic!("mmap region {index}: {e}"));
        Some(mapped)
    }

    pub fn server(&self) -> &Arc<SocketServer> {
        &self.server
    }

    /// Which of the server's sockets this bus uses.
    pub fn socket_index(&self) -> usize {
        self.socket
    }

    /// Disconnects the client (as when QEMU exits) and waits until the server has cleaned
    /// up after it. Returns the server's cleanup log line.
    pub fn disconnect(&mut self) -> String {
        let client = self.client.take().expect("a client is connected");
        let _ = client.shutdown();
        drop(client);
        self.server
            .wait_for_line(self.socket, "client disconnected");
        self.server.wait_for_line(self.socket, "released ")
    }

    /// A new client on the same socket (the next QEMU): disconnects the current one if any,
    /// then sets the new one up with the same [`Setup`], the same RAM and fresh eventfds.
    pub fn reconnect(&mut self) {
        if self.client.is_some() {
            self.disconnect();
        }
        self.attach();
    }

    /// DEVICE_RESET, as QEMU sends at machine reset, followed by what the rebooted guest
    /// and QEMU redo: the MSI-X eventfds assigned again (fresh ones) and, per the setup,
    /// memory decoding and bus mastering. The DMA windows stay (they are QEMU's).
    pub fn reset_device(&mut self) {
        self.call("DEVICE_RESET", 0, 0, |c| c.reset());
        self.server.wait_for_line(self.socket, "device reset");
        self.assign_eventfds();
        if self.setup.bus_master {
            self.enable_bus_master();
        }
    }

    /// Waits up to `timeout` for `vector`'s eventfd to fire and consumes it; returns its
    /// counter (0 if it never fired).
    pub fn wait_for_vector(&mut self, vector: u16, timeout: Duration) -> u64 {
        let efd = &self.eventfds[usize::from(vector)];
        let mut fds = [PollFd::new(efd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(timeout).expect("poll timeout");
        match poll(&mut fds, timeout) {
            Ok(0) => 0,
            Ok(_) => read_eventfd(efd),
            Err(e) => panic!("poll on the vector {vector} eventfd: {e}"),
        }
    }

    /// Runs one client call under the watchdog (`what`, `region` and `offset` name it in
    /// the panic); panics with the server's log on failure.
    pub fn call<T>(
        &mut self,
        what: &'static str,
        region: u32,
        offset: u64,
        f: impl FnOnce(&mut Client) -> Result<T, vfio_user::Error>,
    ) -> T {
        let client = self
            .client
            .as_mut()
            .expect("no client is connected (after disconnect())");
        let result = {
            let _armed = self.server.watchdog.arm(what, region, offset);
            f(client)
        };
        result.unwrap_or_else(|e| {
            self.server
                .fail(&format!("{what} of region {region} at {offset:#x}"), e)
        })
    }
}

/// The counter of a non-blocking eventfd, 0 if it has not fired.
fn read_eventfd(efd: &EventFd) -> u64 {
    match efd.read() {
        Ok(count) => count,
        Err(Errno::EAGAIN) => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// The driver's default RAM: 64 MiB above 4 GiB.
pub fn default_memory() -> GuestMemory {
    GuestMemory::new(memory::DEFAULT_BASE, memory::DEFAULT_SIZE)
}

impl Bus for SocketBus {
    fn read32(&mut self, bar: u32, offset: u64) -> u32 {
        let mut raw = [0; 4];
        self.call("BAR read", bar, offset, |c| {
            c.region_read(bar, offset, &mut raw)
        });
        u32::from_le_bytes(raw)
    }

    fn write32(&mut self, bar: u32, offset: u64, value: u32) {
        self.call("BAR write", bar, offset, |c| {
            c.region_write(bar, offset, &value.to_le_bytes())
        });
    }

    /// Each vector as often as its eventfd's counter says, in vector order.
    fn interrupts(&mut self) -> Vec<u16> {
        let mut raised = Vec::new();
        for (vector, efd) in (0u16..).zip(&self.eventfds) {
            let count = read_eventfd(efd);
            raised.extend(std::iter::repeat_n(vector, count as usize));
        }
        raised
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

impl Driver<SocketBus> {
    /// A driver on a fresh server (one socket, default RAM).
    pub fn over_socket() -> Driver<SocketBus> {
        Driver::new(SocketBus::start())
    }

    /// A probed device on a fresh server.
    pub fn probed_over_socket() -> Driver<SocketBus> {
        let mut driver = Driver::over_socket();
        driver.probe();
        driver
    }

    /// A driver on `server`'s socket `socket`, with its own default RAM.
    pub fn on_socket(server: &Arc<SocketServer>, socket: usize) -> Driver<SocketBus> {
        Driver::new(SocketBus::connect(server, socket, default_memory()))
    }

    /// A machine reset: DEVICE_RESET and what the rebooted guest redoes before probing
    /// ([`SocketBus::reset_device`]); nothing is probed afterwards.
    pub fn reset_device(&mut self) {
        self.bus.reset_device();
        self.forget_session();
    }

    fn forget_session(&mut self) {
        self.session = None;
        self.dsr = None;
        self.last = None;
        self.irq_log.clear();
    }

    /// The next QEMU on the same socket: a new client, the same RAM, nothing probed (the
    /// server reset the device when the old client left). Returns the server's cleanup
    /// log line for the old client.
    pub fn reconnect(&mut self) -> String {
        let released = self.bus.disconnect();
        self.bus.reconnect();
        self.forget_session();
        released
    }
}

/// The server binary the tests start: the one cargo built with them, or
/// `PVRDMA_SERVER_BIN` where the test binary runs somewhere else (inside a lab guest that
/// plays a host, guest-tests/tests/rdma_host.rs).
pub fn server_binary() -> std::ffi::OsString {
    std::env::var_os("PVRDMA_SERVER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vfio-user-pvrdma").into())
}
