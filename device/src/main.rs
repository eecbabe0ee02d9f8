//! `vfio-user-pvrdma`: serves one emulated PVRDMA function per socket.
//!
//! Threads: two per socket (`vfio::serving`: one accepts, one runs the vfio-user loop for
//! its function), one per optional service (control socket, metrics, TCP transport or
//! doorbell poller, rdma completions); the main thread only waits for SIGINT/SIGTERM, which
//! every other thread has blocked, so the signal is always taken here and shutdown never
//! races a handler.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use log::{info, warn};
use nix::sys::signal::{SigSet, Signal};
use pvrdma_backend::directory::Holder;
use pvrdma_backend::directory::etcd::{Etcd, EtcdConfig, EtcdTls, EtcdUser, TlsError};
use pvrdma_backend::directory::membership::EtcdMembership;
use pvrdma_backend::tcp::runtime::{Config as TransportConfig, Pump, Transport};
use thiserror::Error;
use vfio_user_pvrdma::log_limit::RateLimited;
use vfio_user_pvrdma::profiler::control;
use vfio_user_pvrdma::runtime::devices::{
    DeviceError, DeviceSpec, Devices, ServeSettings, SocketPolicy, apply_policy, format_guid,
    parse_guid,
};
use vfio_user_pvrdma::runtime::fabric::Fabric;
use vfio_user_pvrdma::runtime::rdma::{
    RdmaPath, serve_completions as rdma_completions, watch as rdma_watch,
};
use vfio_user_pvrdma::runtime::remote::FabricHost;
use vfio_user_pvrdma::runtime::{control as control_server, metrics, poller, rnr_timer};
use vfio_user_pvrdma::sandbox;
use vfio_user_pvrdma::vfio::listener::{self, ListenError, Listener};
use vfio_user_pvrdma::vfio::uar::DoorbellMode;

/// vfio-user server emulating a VMware paravirtual RDMA NIC (PVRDMA, PCI 15ad:0820).
///
/// Each socket is one PVRDMA function; QEMU attaches it with
/// -device '{"driver":"vfio-user-pci","socket":{"path":"PATH","type":"unix"}}' at function 1
/// of a slot whose function 0 is a vmxnet3 (the guest driver insists), and the guest's RAM
/// must be shared: -object memory-backend-memfd,id=ram,size=...,share=on -machine
/// memory-backend=ram. The functions of one process reach each other by memcpy; other
/// servers' over TCP (--listen, --peer) or the host's RDMA device (--rdma-device).
///
/// Logging goes to stderr, filtered by RUST_LOG (default: info). SIGINT or SIGTERM
/// disconnects the clients, removes the socket files the server made and exits with
/// status 0. `vfio-user-pvrdma stats --control PATH` prints a running server's per-QP
/// figures; `vfio-user-pvrdma device add|remove|list` changes its devices.
#[derive(Debug, Parser)]
#[command(
    name = "vfio-user-pvrdma",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PVRDMA_GIT_REVISION"), ")"),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// A UNIX socket to serve a PVRDMA function on (QEMU's vfio-user-pci connects to it);
    /// repeat for several.
    ///
    /// Each socket is an independent PVRDMA function; all of them form one fabric. The
    /// path must not exist yet (see --force); the file is made at start and removed at
    /// exit. `,guid=G` sets the device's node GUID (16 hex digits, as ibv_devinfo prints
    /// it: 5254:00ff:fe5e:0101); without it the GUID is derived from the path, so it does
    /// not depend on the order of the options. `--socket` is an alias.
    #[arg(
        long = "socket-path",
        visible_alias = "socket",
        value_name = "PATH[,guid=G]"
    )]
    sockets: Vec<DeviceSpec>,

    /// Permission bits of the socket files the server makes, in octal (default: as the
    /// umask leaves them).
    ///
    /// Connecting needs write permission: 0660 with --socket-group lets a group (QEMU's,
    /// libvirt's) connect. The control socket is always 0600.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,

    /// The group of the socket files the server makes (a name or a number).
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,

    /// Serve on file descriptor N, a listening UNIX socket it was started with; repeat.
    ///
    /// Whoever made the socket owns its file: the server never unlinks it. Started from a
    /// systemd socket unit, the server takes the sockets systemd passes (LISTEN_FDS)
    /// without this option. A device's GUID is derived from the path the socket is bound
    /// to.
    #[arg(long = "fd", value_name = "N")]
    fds: Vec<i32>,

    /// Remove a stale socket file an earlier run left at a socket path.
    ///
    /// Regular files, and sockets a live server still accepts on, are never removed.
    #[arg(long)]
    force: bool,

    /// A control socket for the `stats`, `profile` and `device` subcommands.
    ///
    /// Same rules as --socket-path: it must not exist (see --force) and is removed at exit.
    /// It is made 0600: whoever reaches it can add and remove devices.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Serve the profiler's counters and histograms for Prometheus at
    /// http://ADDR:PORT/metrics (off by default).
    ///
    /// Per device (labelled by socket path) and per QP: doorbells, work requests,
    /// completions and errors, bytes, RNR stalls, the path each QP takes and, while stage
    /// timing is on, each stage's latency histogram. Anyone who reaches the port can read
    /// them: keep it on loopback or a management network. Port 0 picks a free port (the
    /// log says which).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,

    /// Time work requests' stages from the start (`--profile` is `--profile on`).
    ///
    /// The stages: doorbell → WQE picked up → data placed → CQE written → interrupt
    /// raised. Off by default, so an unprofiled server reads no clock; on, it times one
    /// doorbell's work in --profile-every and costs under 1 % of the 64 B message rate.
    /// Per-QP counters are always kept; `vfio-user-pvrdma profile on|off` switches timing
    /// at run time.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "off",
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    profile: Switch,

    /// With stage timing on, time one doorbell's work in N (1: every work request).
    ///
    /// Sampling keeps the cost under 1 % of the message rate; counters always count
    /// everything.
    #[arg(long, value_name = "N", default_value_t = vfio_user_pvrdma::pvrdma::DEFAULT_SAMPLE_EVERY, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    profile_every: u32,

    /// How guests ring doorbells: trapped (QEMU forwards each) or exit-free (polled).
    ///
    /// `trapped`: every doorbell is an MMIO write QEMU forwards as a vfio-user message (the
    /// default: exact and simple). `exit-free`: the UAR pages are mapped into the guest and
    /// a poller thread watches them and the rings, so a doorbell costs the guest no VM
    /// exit, and the poller a core while traffic flows.
    #[arg(long, value_enum, value_name = "MODE", default_value = "trapped")]
    doorbells: Doorbells,

    /// Spin up to US microseconds for a client's next register access (0: never).
    ///
    /// The driver accesses registers in bursts (a command is a REQUEST write read back at
    /// once through ERR), and a sleeping thread woken from another core costs 10-40 µs on
    /// a virtual machine. Doorbells never spin; a quiet client costs nothing.
    #[arg(long, value_name = "US", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin_us: u64,

    /// With --doorbells exit-free: pin the poller thread to this CPU.
    ///
    /// A busy poller and a guest's vCPU sharing a core take turns in scheduler time
    /// slices; give the poller a core of its own when you have one (as SPDK pins its
    /// reactors).
    #[arg(long, value_name = "CPU")]
    poller_cpu: Option<usize>,

    /// Listen for peer servers on ADDR:PORT, to carry traffic to their guests over TCP.
    ///
    /// The path is chosen per destination GID: a device of this process (memcpy), a GID
    /// the host RDMA device and the peer's both hold (rdma), a GID a peer server announced
    /// (TCP), or unreachable.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,

    /// A peer server's --listen address; repeat for each.
    ///
    /// One TCP link per pair of servers carries every QP between them, and the GIDs each
    /// side's guests hold.
    #[arg(long = "peer", value_name = "ADDR:PORT")]
    peers: Vec<std::net::SocketAddr>,

    /// Find the other servers in etcd instead of (or besides) a --peer list.
    ///
    /// etcd://HOST:PORT[,HOST:PORT...]: the server registers its --listen address and
    /// every GID its guests add under --directory-prefix, on a lease it keeps alive, and
    /// dials another server when a QP sends to one of its GIDs. A GID another server
    /// registered first cannot be bound here. A server that stops or dies leaves the
    /// others' view, GIDs and all, when its lease ends. Without etcd at start the server
    /// says so, serves its own guests and keeps trying. Needs --listen with a specific address; under the sandbox the server dials
    /// peers only on its own --listen port, so the servers of a cluster share one port.
    /// etcds:// (or https://) reaches etcd over TLS (see --directory-cacert); etcd:// (or
    /// http://) over plain HTTP.
    #[arg(long, value_name = "etcd[s]://HOST:PORT[,...]", requires = "listen", value_parser = parse_directory)]
    directory: Option<EtcdEndpoints>,

    /// With --directory etcds://: the CA certificates (PEM) that signed etcd's certificate.
    ///
    /// Without it the system's root certificates are trusted. Like the other files of the
    /// directory's options, it is read at start.
    #[arg(long, value_name = "FILE", requires = "directory")]
    directory_cacert: Option<PathBuf>,

    /// With --directory etcds://: the certificate (PEM) shown to an etcd that asks clients
    /// for one (its --client-cert-auth).
    #[arg(long, value_name = "FILE", requires_all = ["directory", "directory_key"])]
    directory_cert: Option<PathBuf>,

    /// The private key (PEM) of --directory-cert.
    #[arg(long, value_name = "FILE", requires_all = ["directory", "directory_cert"])]
    directory_key: Option<PathBuf>,

    /// The etcd user the server authenticates as, for an etcd with authentication enabled.
    #[arg(long, value_name = "NAME", requires_all = ["directory", "directory_password_file"], value_parser = clap::builder::NonEmptyStringValueParser::new())]
    directory_user: Option<String>,

    /// A file holding --directory-user's password (a trailing newline is not part of it).
    ///
    /// The password is never given on the command line, where other users of the host
    /// could read it.
    #[arg(long, value_name = "FILE", requires_all = ["directory", "directory_user"])]
    directory_password_file: Option<PathBuf>,

    /// The etcd key prefix of this cluster's directory.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/vfio-user-pvrdma/",
        requires = "directory"
    )]
    directory_prefix: String,

    /// A file with the secret the servers of a cluster share.
    ///
    /// A peer must prove it holds the secret before any of its frames is accepted. Without
    /// one, only peers on loopback are accepted.
    #[arg(long, value_name = "FILE")]
    cluster_key: Option<PathBuf>,

    /// The host RDMA device that carries guest QPs between hosts: NAME, auto or off.
    ///
    /// libibverbs is loaded at run time. `auto` takes the first device with an active port;
    /// without libibverbs or a device the path is simply off, said once at start. A guest
    /// RC or UD QP whose GID the device holds, and whose peer server announced its
    /// destination on its own device, is carried by the device; others take memcpy or TCP.
    /// `vfio-user-pvrdma rdma-devices` shows what the server sees.
    #[arg(long, value_name = "NAME|auto|off", default_value = "auto")]
    rdma_device: vfio_user_pvrdma::runtime::rdma::Choice,

    /// Give up, once the sockets are bound, what serving does not need (on|off).
    ///
    /// No new privileges, a seccomp allowlist of system calls (others fail with EPERM),
    /// and, where the kernel has Landlock, no file access but the socket directories (and
    /// what the rdma path reads) and no TCP ports but its own. `off` is for debugging
    /// (strace, gdb).
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    sandbox: Switch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Doorbells {
    Trapped,
    ExitFree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a running server's per-QP figures (a table, JSON, or an SVG histogram).
    Stats(StatsArgs),
    /// Switch a running server's stage timing on or off (or show it).
    Profile {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// on or off; without it, prints the current state.
        state: Option<Switch>,
    },
    /// Add, remove or list the devices of a running server (through its --control socket).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell).
    ///
    /// For bash: `vfio-user-pvrdma completions bash > /etc/bash_completion.d/vfio-user-pvrdma`,
    /// or `source <(vfio-user-pvrdma completions bash)`. The Debian package installs them.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `vfio-user-pvrdma man | man -l -`.
    Man,
    /// List the host's RDMA devices as the rdma path sees them.
    ///
    /// libibverbs is loaded at run time; each device's ports, link layers and GID tables
    /// are printed. Exits non-zero when libibverbs cannot be loaded or lists nothing.
    RdmaDevices {
        /// Also send one message between two RC queue pairs on the first active port of
        /// each device, to prove the device and the server's calls work.
        #[arg(long)]
        loopback: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Serve a new device on a new socket, in the same fabric as the others: its guest
    /// reaches theirs by memcpy.
    Add {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// The new socket (it must not exist; with the sandbox on, it must be in a
        /// directory of the sockets the server was started with).
        #[arg(long = "socket", visible_alias = "socket-path", value_name = "PATH")]
        socket: PathBuf,
        /// The device's node GUID (16 hex digits, e.g. 5254:00ff:fe5e:0101); derived
        /// from the socket path without it.
        #[arg(long, value_name = "G", value_parser = parse_guid)]
        guid: Option<u64>,
    },
    /// Stop a device and remove its socket. Refused while a client (QEMU) is attached,
    /// unless --force, which takes the device from the running guest.
    Remove {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// The device's socket.
        #[arg(long = "socket", visible_alias = "socket-path", value_name = "PATH")]
        socket: PathBuf,
        /// Remove it even with a client attached.
        #[arg(long)]
        force: bool,
    },
    /// List the devices: slot, node GUID, attached or idle, socket.
    List {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// The server's --control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long, conflicts_with = "svg")]
    json: bool,
    /// Print (or write to --output) an SVG histogram per stage of one QP.
    #[arg(long, requires_all = ["device", "qp"])]
    svg: bool,
    /// With --svg: the device, by its slot (the first column of `device list` and `stats`).
    #[arg(long, value_name = "N", requires = "svg")]
    device: Option<usize>,
    /// With --svg: the QP number (the `qp_num` the guest's tools print), in decimal or
    /// in hex with 0x (as `ibv_rc_pingpong` and perftest print it).
    #[arg(long, value_name = "N", requires = "svg", value_parser = parse_qpn)]
    qp: Option<u32>,
    /// With --svg: write the picture to FILE instead of stdout.
    #[arg(long, value_name = "FILE", requires = "svg")]
    output: Option<PathBuf>,
}

/// How long the client waits for the server's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Fatal startup errors, printed on stderr before exiting non-zero.
#[derive(Debug, Error)]
enum StartupError {
    #[error("--socket-path {path} is given more than once", path = .0.display())]
    DuplicateSocket(PathBuf),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(
        "no socket to serve: pass --socket-path PATH or --fd N, or start the server from a \
         systemd socket unit"
    )]
    NoSocket,
    #[error("cannot block SIGINT/SIGTERM")]
    Signals(#[source] nix::Error),
    #[error("cannot start the thread for {path}", path = .path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for SIGINT/SIGTERM failed")]
    SignalWait(#[source] nix::Error),
    #[error("--control {path} is also a --socket-path", path = .0.display())]
    ControlIsSocket(PathBuf),
    #[error("cannot read the cluster key {path}", path = .path.display())]
    ClusterKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the cluster key {path} is empty", path = .0.display())]
    EmptyClusterKey(PathBuf),
    #[error("cannot read {option} {path}", path = .path.display())]
    DirectoryFile {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot use {what} for the etcd directory")]
    DirectoryTls {
        what: String,
        #[source]
        source: TlsError,
    },
    #[error(
        "--directory etcds:// without --directory-cacert trusts the system's root \
         certificates, and none can be used"
    )]
    NoSystemRoots(#[source] TlsError),
    #[error("the password file {path} is {problem}", path = .path.display())]
    DirectoryPassword {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("{0} is for TLS, and --directory names etcd:// (plain HTTP): write etcds://HOST:PORT")]
    DirectoryNotTls(&'static str),
    #[error("cannot listen for metrics on {address}")]
    Metrics {
        address: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "--directory registers the --listen address for peers to dial, and {0} names no \
         host: give the address peers reach this server at"
    )]
    DirectoryAddress(std::net::SocketAddr),
    #[error("cannot start the TCP transport")]
    Transport(#[source] io::Error),
    #[error("{0}")]
    Rdma(String),
    #[error("cannot enter the sandbox (--sandbox off runs without it)")]
    Sandbox(#[from] vfio_user_pvrdma::sandbox::SandboxError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = &cli.command {
        return client(command);
    }
    init_logging();
    match run(&cli) {
        Ok(signal) => {
            info!("received {signal}, exiting");
            remove_sockets(cli.control.as_slice());
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Printed directly so the reason is visible whatever RUST_LOG says.
            eprintln!("vfio-user-pvrdma: error: {}", error_chain(&e));
            // Nothing to serve is a usage error, as clap reports its own.
            if matches!(e, StartupError::NoSocket) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Raises the soft descriptor limit to the hard one: each client may hold up to
/// `MAX_WINDOWS` DMA windows of two descriptors each, and one client's windows must not
/// use up what the other devices need. Warns when even the hard limit is short of that.
fn raise_fd_limit(devices: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use vfio_user_pvrdma::vfio::dma::MAX_WINDOWS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        warn!("cannot raise the descriptor limit from {soft} to {hard}");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
    // Per device: its windows, MSI-X eventfds, the socket and the UAR memfd; plus the
    // process's own (control socket, TCP links, logs).
    let needed = (devices * (2 * MAX_WINDOWS + 16) + 256) as u64;
    if limit < needed {
        warn!(
            "the descriptor limit is {limit}, below the {needed} that {devices} devices may \
             hold at most ({MAX_WINDOWS} DMA windows each): a client that maps that many can \
             make another device's DMA_MAP fail (with an error, never silently)"
        );
    } else {
        info!("descriptor limit {limit} ({needed} at most in use)");
    }
}

/// The --cluster-key file's secret (read before the sandbox shuts file access).
fn read_cluster_key(cli: &Cli) -> Result<Option<Vec<u8>>, StartupError> {
    let Some(path) = &cli.cluster_key else {
        return Ok(None);
    };
    let key = std::fs::read(path).map_err(|source| StartupError::ClusterKey {
        path: path.clone(),
        source,
    })?;
    let key = key.trim_ascii().to_vec();
    if key.is_empty() {
        return Err(StartupError::EmptyClusterKey(path.clone()));
    }
    Ok(Some(key))
}

/// What the etcd directory's client needs from files: its TLS settings and its user.
#[derive(Debug, Default)]
struct DirectoryAccess {
    tls: Option<EtcdTls>,
    user: Option<EtcdUser>,
}

/// Longest file of the directory's options read: a CA bundle (a distribution's whole
/// bundle is some 200 KiB), a certificate, a key or a password.
const MAX_DIRECTORY_FILE: u64 = 4 << 20;

/// The file of `option`, at most [`MAX_DIRECTORY_FILE`] bytes.
fn read_directory_file(
    option: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, StartupError> {
    use std::io::Read;
    let error = |source| StartupError::DirectoryFile {
        option,
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_DIRECTORY_FILE + 1).read_to_end(&mut bytes))
        .map_err(error)?;
    if bytes.len() as u64 > MAX_DIRECTORY_FILE {
        return Err(error(io::Error::other(format!(
            "it is larger than {} MiB",
            MAX_DIRECTORY_FILE >> 20
        ))));
    }
    Ok(bytes)
}

/// The --directory-* files, read and checked now: the sandbox shuts file access before the
/// directory's client first connects, and a bad file is better named at start than found
/// at the first handshake.
fn read_directory_access(cli: &Cli) -> Result<DirectoryAccess, StartupError> {
    let Some(directory) = &cli.directory else {
        return Ok(DirectoryAccess::default());
    };
    let tls_options = [
        ("--directory-cacert", cli.directory_cacert.is_some()),
        ("--directory-cert", cli.directory_cert.is_some()),
    ];
    if !directory.tls
        && let Some(&(option, _)) = tls_options.iter().find(|(_, given)| *given)
    {
        return Err(StartupError::DirectoryNotTls(option));
    }
    let tls = if directory.tls {
        let tls = match &cli.directory_cacert {
            Some(path) => {
                let pem = read_directory_file("--directory-cacert", path)?;
                EtcdTls::with_ca(&pem).map_err(|source| StartupError::DirectoryTls {
                    what: format!("--directory-cacert {}", path.display()),
                    source,
                })?
            }
            None => EtcdTls::with_system_roots().map_err(StartupError::NoSystemRoots)?,
        };
        match (&cli.directory_cert, &cli.directory_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_directory_file("--directory-cert", cert)?;
                let key_pem = read_directory_file("--directory-key", key)?;
                let what = |source: &TlsError| match source {
                    TlsError::Key(_) => format!("--directory-key {}", key.display()),
                    TlsError::Pair(_) => format!(
                        "--directory-cert {} with --directory-key {}",
                        cert.display(),
                        key.display()
                    ),
                    _ => format!("--directory-cert {}", cert.display()),
                };
                Some(
                    tls.with_client_cert(&cert_pem, &key_pem)
                        .map_err(|source| StartupError::DirectoryTls {
                            what: what(&source),
                            source,
                        })?,
                )
            }
            // clap asks for both or neither.
            _ => Some(tls),
        }
    } else {
        None
    };
    let user = match (&cli.directory_user, &cli.directory_password_file) {
        (Some(name), Some(path)) => {
            let bytes = read_directory_file("--directory-password-file", path)?;
            let problem = |problem| StartupError::DirectoryPassword {
                path: path.clone(),
                problem,
            };
            let text = String::from_utf8(bytes).map_err(|_| problem("not UTF-8 text"))?;
            // A file written by `echo` ends in a newline that is no part of the password.
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(problem("empty"));
            }
            if !directory.tls {
                warn!(
                    "the etcd directory's password crosses the network in clear text: \
                     --directory etcds:// reaches etcd over TLS"
                );
            }
            Some(EtcdUser::new(name.clone(), password))
        }
        // clap asks for both or neither.
        _ => None,
    };
    Ok(DirectoryAccess { tls, user })
}

/// Enters the sandbox (unless --sandbox off) around opening the rdma path's device
/// (`open_rdma`): Landlock first, then the device (libibverbs reads sysfs, loads its
/// provider and opens `/dev/infiniband/uverbsN`; the device must be opened under the
/// credentials Landlock gives, or the kernel refuses the commands libibverbs writes to
/// it), then the system call filter; says what the kernel enforced.
fn enter_sandbox<T>(
    cli: &Cli,
    open_rdma: impl FnOnce() -> Result<T, StartupError>,
) -> Result<T, StartupError> {
    if cli.sandbox == Switch::Off {
        warn!("--sandbox off: the server runs with every system call and file it may reach");
        return open_rdma();
    }
    let needs = sandbox::Needs {
        sockets: cli
            .sockets
            .iter()
            .map(|spec| &spec.path)
            .chain(&cli.control)
            .cloned()
            .collect(),
        listen_port: cli.listen.map(|addr| addr.port()),
        // With the etcd directory: its endpoints, and peers on this server's own port.
        peer_ports: cli
            .peers
            .iter()
            .map(|addr| addr.port())
            .chain(
                cli.directory
                    .iter()
                    .flat_map(|d| &d.hosts)
                    .filter_map(|endpoint| {
                        endpoint
                            .rsplit_once(':')
                            .and_then(|(_, port)| port.parse().ok())
                    }),
            )
            .chain(
                cli.directory
                    .as_ref()
                    .and(cli.listen)
                    .map(|addr| addr.port()),
            )
            .collect(),
        rdma: cli.rdma_device != vfio_user_pvrdma::runtime::rdma::Choice::Off,
    };
    let landlock = sandbox::enter_files(&needs)?;
    let rdma = open_rdma()?;
    let allowed_calls = sandbox::enter_calls()?;
    let files = match (landlock, needs.rdma) {
        (Some(true), false) => "Landlock limits files and TCP ports",
        (Some(true), true) => {
            "Landlock limits files and TCP ports (and lets the rdma path read sysfs, \
             libibverbs' configuration and libraries, and use /dev/infiniband)"
        }
        (Some(false), _) => "Landlock limits files and ports as far as this kernel can",
        (None, _) => "this kernel has no Landlock, so files and ports are not limited",
    };
    info!(
        "sandbox: no new privileges, {allowed_calls} system calls allowed (others fail with \
         EPERM); {files}"
    );
    Ok(rdma)
}

/// Starts the TCP transport when --listen or --peer asks for it, chained behind the
/// fabric's own devices. With exit-free doorbells its links are served by the poller
/// (returned for it); otherwise by a thread of its own.
fn start_transport(
    cli: &Cli,
    cluster_key: Option<Vec<u8>>,
    directory_access: DirectoryAccess,
    fabric: &Fabric,
) -> Result<TransportParts, StartupError> {
    if cli.listen.is_none() && cli.peers.is_empty() && cli.directory.is_none() {
        return Ok((None, None, None));
    }
    let config = TransportConfig {
        listen: cli.listen,
        peers: cli.peers.clone(),
        cluster_key,
        directory: None,
    };
    let host = Arc::new(FabricHost(fabric.clone()));
    let (transport, pump) = if cli.doorbells == Doorbells::ExitFree {
        Transport::start_driven(config, host).map(|(transport, pump)| (transport, Some(pump)))
    } else {
        Transport::start(config, host).map(|transport| (transport, None))
    }
    .map_err(StartupError::Transport)?;
    let mut directory = None;
    if let (Some(EtcdEndpoints { hosts, tls }), Some(listening)) =
        (&cli.directory, transport.local_addr())
    {
        if listening.ip().is_unspecified() {
            return Err(StartupError::DirectoryAddress(listening));
        }
        let scheme = if *tls { "etcds" } else { "etcd" };
        info!(
            "directory: etcd at {scheme}://{}, prefix {}{}",
            hosts.join(","),
            cli.directory_prefix,
            directory_access
                .user
                .as_ref()
                .map_or_else(String::new, |user| format!(", as user {:?}", user.name()))
        );
        let etcd = Etcd::with_config(EtcdConfig {
            tls: directory_access.tls,
            user: directory_access.user,
            ..EtcdConfig::new(hosts, Duration::from_secs(5))
        });
        let rdma = !fabric.rdma_gids().is_empty();
        let me = Holder {
            server: transport.id(),
            addr: listening,
        };
        let membership = Arc::new(EtcdMembership::start(etcd, &cli.directory_prefix, me, rdma));
        transport.set_directory(membership.clone());
        fabric.set_directory(
            format!("{scheme}://{}{}", hosts.join(","), cli.directory_prefix),
            membership.clone(),
        );
        directory = Some(membership);
    }
    fabric.set_remote(Box::new(transport.network()));
    fabric.set_peer_view(transport.peer_view());
    Ok((Some(transport), pump, directory))
}

/// What [`start_transport`] started: the transport, the pump that serves its links when the
/// poller does, and the etcd directory membership.
type TransportParts = (Option<Transport>, Option<Pump>, Option<Arc<EtcdMembership>>);

/// The manual page, from the same definitions as `--help`, with the sections a manual
/// has beyond them.
fn manual() -> ExitCode {
    let command = Cli::command();
    let man = clap_mangen::Man::new(command);
    let mut page = Vec::new();
    let rendered = man
        .render_title(&mut page)
        .and_then(|()| man.render_name_section(&mut page))
        .and_then(|()| man.render_synopsis_section(&mut page))
        .and_then(|()| man.render_description_section(&mut page))
        .and_then(|()| man.render_options_section(&mut page))
        .and_then(|()| man.render_subcommands_section(&mut page));
    if let Err(e) = rendered {
        eprintln!("vfio-user-pvrdma: error: cannot render the manual: {e}");
        return ExitCode::FAILURE;
    }
    page.extend_from_slice(MANUAL_EXTRA.as_bytes());
    if let Err(e) = man.render_version_section(&mut page) {
        eprintln!("vfio-user-pvrdma: error: cannot render the manual: {e}");
        return ExitCode::FAILURE;
    }
    match io::stdout().write_all(&page) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfio-user-pvrdma: error: cannot write the manual: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The manual's sections beyond the options: an example, the service, files, signals.
const MANUAL_EXTRA: &str = r#".SH EXAMPLES
Serve two functions whose guests talk by memcpy:
.PP
.nf
vfio-user-pvrdma \-\-socket\-path /run/pvrdma/vm1.sock \-\-socket\-path /run/pvrdma/vm2.sock \-\-control /run/pvrdma/control.sock
.fi
.PP
and give each QEMU its socket, at function 1 of the slot of a vmxnet3, with shared RAM:
.PP
.nf
\-object memory\-backend\-memfd,id=ram,size=2G,share=on \-machine q35,memory\-backend=ram
\-netdev user,id=n0 \-device vmxnet3,netdev=n0,addr=0x10.0,multifunction=on
\-device '{"driver":"vfio\-user\-pci","socket":{"path":"/run/pvrdma/vm1.sock","type":"unix"},"addr":"0x10.1"}'
.fi
.PP
Add a third guest's device while the others run:
.PP
.nf
vfio-user-pvrdma device add \-\-control /run/pvrdma/control.sock \-\-socket /run/pvrdma/vm3.sock
.fi
.SH SERVICE
The package's vfio\-user\-pvrdma.socket listens on the sockets of /run/vfio\-user\-pvrdma/
(mode 0660, group kvm) and starts vfio\-user\-pvrdma.service on the first connection; the service
runs as a dynamic user, with the control socket at /run/vfio\-user\-pvrdma/dynamic/control.sock
(add sockets with ListenStream= in a drop\-in: systemctl edit vfio\-user\-pvrdma.socket).
.SH FILES
.TP
/usr/share/vfio\-user/50\-vfio\-user\-pvrdma.json
The backend descriptor management tools read.
.SH SIGNALS
SIGINT and SIGTERM disconnect every client, remove the socket files the server made and exit 0.
.SH ENVIRONMENT
.TP
RUST_LOG
The log filter (default: info), e.g. RUST_LOG=debug or RUST_LOG=info,vfio_user_pvrdma::vfio=debug.
.TP
LISTEN_FDS, LISTEN_PID
Socket activation: the listening sockets systemd passes.
"#;

/// Stops every device when dropped: each client is disconnected and each socket file the
/// server made is removed.
struct StopOnDrop(Arc<Devices>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop_all();
    }
}

/// Who may connect to the server's sockets, and, with the sandbox on, where `device add`
/// may make new ones: the directories of the sockets given at start and of the control
/// socket (Landlock allows making sockets there and nowhere else).
fn socket_policy(cli: &Cli) -> SocketPolicy {
    let directories = (cli.sandbox == Switch::On).then(|| {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let paths = cli
            .sockets
            .iter()
            .map(|spec| &spec.path)
            .chain(&cli.control);
        for dir in paths.filter_map(|path| path.parent()) {
            if !dirs.iter().any(|known| known == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
        dirs
    });
    SocketPolicy {
        force: cli.force,
        mode: cli.socket_mode,
        group: cli.socket_group,
        directories,
    }
}

/// --socket-mode: octal permission bits.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not a mode: octal permission bits such as 0660"
        )),
    }
}

/// --socket-group: a group name or number.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("there is no group {text:?}")),
        Err(e) => Err(format!("cannot look up the group {text:?}: {e}")),
    }
}

/// The etcd endpoints of --directory.
#[derive(Debug, Clone)]
struct EtcdEndpoints {
    /// `HOST:PORT` each.
    hosts: Vec<String>,
    /// Over TLS (etcds://).
    tls: bool,
}

/// --directory: `etcd://HOST:PORT[,HOST:PORT...]`, the endpoints; `etcds://` for TLS.
fn parse_directory(text: &str) -> Result<EtcdEndpoints, String> {
    let schemes = [
        ("etcd://", false),
        ("http://", false),
        ("etcds://", true),
        ("https://", true),
    ];
    let Some((list, tls)) = schemes
        .iter()
        .find_map(|&(scheme, tls)| text.strip_prefix(scheme).map(|list| (list, tls)))
    else {
        return Err(format!(
            "{text:?}: the directory is etcd://HOST:PORT[,HOST:PORT...], or etcds://... for TLS"
        ));
    };
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{text:?} names no etcd endpoint"));
    }
    for endpoint in &endpoints {
        let port = endpoint
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        if port.is_none() {
            return Err(format!("etcd endpoint {endpoint:?} is not HOST:PORT"));
        }
    }
    Ok(EtcdEndpoints {
        hosts: endpoints,
        tls,
    })
}

/// A QP number in decimal, or in hex after `0x`.
fn parse_qpn(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a QP number (decimal, or hex with 0x): {e}"))
}

/// The listening sockets systemd passed for socket activation (`LISTEN_FDS` descriptors
/// from 3 on, when `LISTEN_PID` names this process).
fn activated_fds() -> Vec<i32> {
    const FIRST: i32 = 3;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        return Vec::new();
    }
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<i32>().ok())
        .unwrap_or(0)
        .clamp(0, 1024);
    (FIRST..FIRST + count).collect()
}

/// Starts every server and returns the termination signal once it arrives.
fn run(cli: &Cli) -> Result<Signal, StartupError> {
    let mut seen = HashSet::new();
    if let Some(dup) = cli.sockets.iter().find(|spec| !seen.insert(&spec.path)) {
        return Err(StartupError::DuplicateSocket(dup.path.clone()));
    }

    // Block before any thread exists: threads inherit the mask, so only
    // `signals.wait()` below ever sees these signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(StartupError::Signals)?;

    let inherited: Vec<i32> = cli.fds.iter().copied().chain(activated_fds()).collect();
    raise_fd_limit(cli.sockets.len() + inherited.len());

    // Bind every socket before serving any, so a bad path fails the whole
    // start; servers already bound remove their files when dropped. Sockets the
    // server was started with come after its own, and are never unlinked.
    let policy = socket_policy(cli);
    let mut servers = Vec::new();
    for spec in &cli.sockets {
        let listener = listener::listen(&spec.path, cli.force)?;
        apply_policy(&policy, &spec.path)?;
        servers.push((spec.path.clone(), listener, spec.guid));
    }
    for fd in inherited {
        let listener = Listener::inherited(fd)?;
        let name = listener
            .bound_path()
            .unwrap_or_else(|| PathBuf::from(format!("fd {fd}")));
        servers.push((name, listener, None));
    }
    if servers.is_empty() {
        return Err(StartupError::NoSocket);
    }
    let control = match &cli.control {
        Some(path) if cli.sockets.iter().any(|spec| spec.path == *path) => {
            return Err(StartupError::ControlIsSocket(path.clone()));
        }
        Some(path) => {
            let listener = listener::listen(path, cli.force)?;
            // Whoever reaches it can add and remove devices: the server's user only.
            let owner_only = SocketPolicy {
                mode: Some(0o600),
                ..SocketPolicy::default()
            };
            apply_policy(&owner_only, path)?;
            Some((path.clone(), listener))
        }
        None => None,
    };

    let metrics = cli
        .metrics
        .map(|address| {
            std::net::TcpListener::bind(address)
                .map_err(|source| StartupError::Metrics { address, source })
        })
        .transpose()?;
    let cluster_key = read_cluster_key(cli)?;
    let directory_access = read_directory_access(cli)?;
    // Every socket file is bound and every file read: from here on the server needs no
    // more than serving does (and the rdma path's device, opened inside). No thread exists
    // yet, so all of them inherit the sandbox.
    let rdma = enter_sandbox(cli, || {
        RdmaPath::open(&cli.rdma_device).map_err(StartupError::Rdma)
    })?;

    // The devices of one process form one fabric: their guests reach each other by memcpy.
    let fabric = Fabric::new();
    // The rdma path: the devices drive the host device's QPs; one thread takes their
    // completions.
    if let Some(rdma) = &rdma {
        let carrier = rdma.carrier(&fabric);
        fabric.set_host(carrier.clone());
        let target = fabric.clone();
        thread::Builder::new()
            .name("rdma completions".into())
            .spawn(move || rdma_completions(carrier, target))
            .map_err(|source| StartupError::Thread {
                path: PathBuf::from("rdma completions"),
                source,
            })?;
    }
    let settings = ServeSettings {
        doorbells: match cli.doorbells {
            Doorbells::Trapped => DoorbellMode::Trapped,
            Doorbells::ExitFree => DoorbellMode::ExitFree,
        },
        spin: Duration::from_micros(cli.spin_us),
        profiling: cli.profile == Switch::On,
        profile_every: cli.profile_every,
    };
    let devices = Arc::new(Devices::new(
        fabric.clone(),
        settings,
        policy,
        Box::new(random_seed),
    ));
    // Stops every device, removing its socket, on any return from here on.
    let _stop_devices = StopOnDrop(Arc::clone(&devices));
    for (path, server, guid) in servers {
        match server.path() {
            Some(file) => info!("listening on {}", file.display()),
            None => info!(
                "serving on {} (a socket the server was started with)",
                path.display()
            ),
        }
        devices.serve(path, server, guid)?;
    }
    // Kept alive until the signal: dropping it stops the transport's thread.
    let (_transport, links, directory) =
        start_transport(cli, cluster_key, directory_access, &fabric)?;
    fabric.set_profiling(cli.profile == Switch::On);
    fabric.set_profile_sampling(cli.profile_every);
    info!(
        "profiler stage timing {}",
        if cli.profile == Switch::On {
            "on"
        } else {
            "off"
        }
    );

    if let Some((path, server)) = control {
        let target = control_server::Served {
            fabric: fabric.clone(),
            devices: Arc::clone(&devices),
        };
        let spawned = thread::Builder::new()
            .name(format!("control {}", path.display()))
            .spawn(move || control_server::serve(&server, &target));
        if let Err(source) = spawned {
            return Err(StartupError::Thread { path, source });
        }
        info!("control socket listening on {}", path.display());
    }

    if let Some(listener) = metrics {
        let address = listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let (target, devices) = (fabric.clone(), Arc::clone(&devices));
        let spawned = thread::Builder::new()
            .name("metrics".into())
            .spawn(move || metrics::serve(&listener, &target, &devices));
        if let Err(source) = spawned {
            return Err(StartupError::Thread {
                path: PathBuf::from("metrics"),
                source,
            });
        }
        info!("metrics at http://{address}/metrics");
    }

    if let Some(rdma) = rdma {
        let target = fabric.clone();
        let spawned = thread::Builder::new()
            .name("rdma gids".into())
            .spawn(move || rdma_watch(rdma, target));
        if let Err(source) = spawned {
            return Err(StartupError::Thread {
                path: PathBuf::from("rdma gids"),
                source,
            });
        }
    }

    let target = fabric.clone();
    let spawned = thread::Builder::new()
        .name("rnr timer".into())
        .spawn(move || rnr_timer::run(&target));
    if let Err(source) = spawned {
        return Err(StartupError::Thread {
            path: PathBuf::from("rnr timer"),
            source,
        });
    }

    if cli.doorbells == Doorbells::Trapped && cli.poller_cpu.is_some() {
        warn!("--poller-cpu has no effect with trapped doorbells (there is no poller)");
    }
    if cli.doorbells == Doorbells::ExitFree {
        let target = fabric.clone();
        let cpu = cli.poller_cpu;
        let spawned = thread::Builder::new()
            .name("doorbell poller".into())
            .spawn(move || poller::run(&target, cpu, links));
        if let Err(source) = spawned {
            return Err(StartupError::Thread {
                path: PathBuf::from("doorbell poller"),
                source,
            });
        }
        info!("doorbells are exit-free: polling the UAR pages");
    }

    let signal = signals.wait().map_err(StartupError::SignalWait)?;
    if let Some(directory) = directory {
        // Leave the directory at once, instead of when the lease runs out.
        directory.leave();
    }
    Ok(signal)
}

/// The `stats` and `profile` subcommands: one request to a running server's control
/// socket, its answer printed (or written to a file).
fn client(command: &Command) -> ExitCode {
    let (path, request, output) = match command {
        Command::RdmaDevices { loopback } => return rdma_devices(*loopback),
        Command::Completions { shell } => {
            let mut command = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "vfio-user-pvrdma", &mut script);
            return match io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vfio-user-pvrdma: error: cannot write the completions: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Man => return manual(),
        Command::Device(DeviceCommand::Add {
            control,
            socket,
            guid,
        }) => {
            let guid = guid.map_or(String::new(), |g| format!("guid={} ", format_guid(g)));
            (
                control,
                format!("device add {guid}{}", socket.display()),
                None,
            )
        }
        Command::Device(DeviceCommand::Remove {
            control,
            socket,
            force,
        }) => {
            let force = if *force { "force " } else { "" };
            (
                control,
                format!("device remove {force}{}", socket.display()),
                None,
            )
        }
        Command::Device(DeviceCommand::List { control }) => {
            (control, "device list".to_string(), None)
        }
        Command::Stats(args) => {
            let request = match (args.json, args.svg, args.device, args.qp) {
                (_, true, Some(device), Some(qp)) => format!("svg {device} {qp}"),
                (true, _, _, _) => "stats json".to_string(),
                _ => "stats".to_string(),
            };
            (&args.control, request, args.output.as_ref())
        }
        Command::Profile { control, state } => {
            let request = match state {
                Some(Switch::On) => "profile on",
                Some(Switch::Off) => "profile off",
                None => "profile",
            };
            (control, request.to_string(), None)
        }
    };
    let answer = match control::request(path, &request, CLIENT_TIMEOUT) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!(
                "vfio-user-pvrdma: error: cannot query the control socket {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if let Some(message) = answer.strip_prefix("error: ") {
        eprintln!(
            "vfio-user-pvrdma: error: the server says: {}",
            message.trim_end()
        );
        return ExitCode::FAILURE;
    }
    let written = match output {
        Some(file) => std::fs::write(file, &answer).map_err(|e| (file.display().to_string(), e)),
        None => io::stdout()
            .write_all(answer.as_bytes())
            .map_err(|e| ("stdout".to_string(), e)),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err((what, e)) => {
            eprintln!("vfio-user-pvrdma: error: cannot write {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `rdma-devices` subcommand.
fn rdma_devices(loopback: bool) -> ExitCode {
    use pvrdma_backend::rdma::{Verbs, devices, loopback as rdma_loopback};
    let verbs = match Verbs::load() {
        Ok(verbs) => std::sync::Arc::new(verbs),
        Err(e) => {
            eprintln!("vfio-user-pvrdma: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let found = match devices::list(&verbs) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("vfio-user-pvrdma: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if found.is_empty() {
        eprintln!(
            "vfio-user-pvrdma: libibverbs lists no RDMA device on this host (for Soft-RoCE: \
             modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IFACE)"
        );
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for device in &found {
        print!("{device}");
        if loopback {
            match rdma_loopback::run(&verbs, device) {
                Ok(report) => println!("  loopback: {report}"),
                Err(e) => {
                    println!("  loopback FAILED: {e}");
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// 64 bits from the kernel's random source, so each device's memory keys are its own and
/// unpredictable. Falls back to the clock (with a warning) if /dev/urandom cannot be read.
fn random_seed() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(e) => {
            warn!("cannot read /dev/urandom ({e}); memory keys are seeded from the clock");
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        }
    }
}

/// Removes the socket files. The serving threads still own their servers,
/// whose destructors never run because the process exits.
fn remove_sockets(paths: &[PathBuf]) {
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// `RUST_LOG`-controlled logging on stderr, tagged with the thread name
/// (the socket path) so several functions' logs can be told apart, and limited per line of
/// code, since guests and clients can make the server log (`log_limit`).
fn init_logging() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format(|buf, record| {
                let thread = thread::current();
                writeln!(
                    buf,
                    "[{} {:5} {}] {}",
                    buf.timestamp_millis(),
                    record.level(),
                    thread.name().unwrap_or("?"),
                    record.args()
                )
            })
            .build();
    let level = logger.filter();
    if log::set_boxed_logger(Box::new(RateLimited::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}

/// An error and its sources as one line: "a: b: c".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
