//! The lab fixture: start N guests, each with its own PVRDMA device socket on one server
//! process (or on two, see [`LabConfig::servers`]), joined by a private Ethernet segment; run
//! commands in them; always clean up.
//!
//! ```no_run
//! # use guest_tests::lab::{Lab, LabConfig};
//! // In an integration test of this crate: env!("CARGO_BIN_EXE_pvrdma-guest-agent").
//! let agent = "target/debug/pvrdma-guest-agent";
//! let mut lab = Lab::start(LabConfig::new("example", 2, agent)).unwrap();
//! let lspci = lab.guest(0).check("lspci -n").unwrap();
//! lab.shut_down().unwrap();
//! ```
//!
//! Cleanup is unconditional: dropping a `Lab` (also while a test panics) kills every QEMU, stops
//! the servers and their etcd, deletes their namespaces, closes the segment and removes the
//! sockets. Children are also tied to the test thread with PR_SET_PDEATHSIG, so even a killed
//! test process leaves nothing running (its namespaces are deleted by the next two-server
//! lab). Logs are kept (and their folder printed) when the test fails, or always with
//! PVRDMA_KEEP_RUN=1.

mod child;
mod cpio;
mod env;
mod error;
mod etcd;
mod guest;
mod hosts;
mod hub;
mod server;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use env::{LabEnv, cache_dir, server_binary};
pub use error::{LabError, Result};
pub use guest::{DEFAULT_COMMAND_TIMEOUT, Guest, Output};
pub use server::ServerProcess;

use etcd::EtcdProcess;
use guest::GuestSpec;
use hosts::{Hosts, TRANSPORT_PORT};
use hub::Hub;

/// What to start.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Names the run folder; use the test's name.
    pub name: String,
    pub guests: usize,
    /// The agent binary to put into the guests (`env!("CARGO_BIN_EXE_pvrdma-guest-agent")`).
    pub agent: PathBuf,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
    /// Let a guest reboot restart the guest instead of ending its QEMU.
    pub allow_reboot: bool,
    /// Extra arguments for the server (e.g. `--doorbells exit-free`).
    pub server_args: Vec<String>,
    /// Server processes: 1 (every guest on one server, the memcpy fabric), or 2 (guest `i`
    /// on server `i % 2`, each server in a network namespace of its own, the two joined
    /// by the TCP transport over a veth pair).
    pub servers: usize,
    /// How the two servers of a two-server lab find each other.
    pub discovery: Discovery,
    /// Host files put into every guest as well: `(host path, path in the guest)`, with the
    /// host file's permission bits (e.g. the server binary, for tests that run it inside a
    /// guest as a host of its own).
    pub extra_files: Vec<(PathBuf, String)>,
    /// The device sockets of a server the lab does not start (one started by systemd, say):
    /// guest `i` connects to `external_sockets[i]`. Empty: the lab starts its own servers.
    pub external_sockets: Vec<PathBuf>,
    /// How many guests `start` boots (all when `None`); the others wait for
    /// [`Lab::launch_next`] (a guest whose device is added at run time, say).
    pub launched: Option<usize>,
}

impl LabConfig {
    pub fn new(name: &str, guests: usize, agent: impl Into<PathBuf>) -> LabConfig {
        LabConfig {
            name: name.into(),
            guests,
            agent: agent.into(),
            memory_mib: 1024,
            boot_timeout: Duration::from_secs(180),
            allow_reboot: false,
            server_args: Vec::new(),
            servers: 1,
            discovery: Discovery::default(),
            extra_files: Vec::new(),
            external_sockets: Vec::new(),
            launched: None,
        }
    }
}

/// How the servers of a two-server lab find each other (docs/tcp-transport.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Discovery {
    /// Each server names the other with `--peer`: the static list.
    #[default]
    PeerList,
    /// Both register in an etcd the lab starts in host 0's namespace (`--directory
    /// etcd://…` with a prefix of this lab's own), and neither is given a `--peer`.
    Etcd,
}

pub struct Lab {
    run_dir: PathBuf,
    launcher: PathBuf,
    initrd: PathBuf,
    specs: Vec<GuestSpec>,
    boot_timeout: Duration,
    guests: Vec<Guest>,
    servers: Vec<ServerProcess>,
    /// The servers' directory ([`Discovery::Etcd`]); stopped after the servers, whose
    /// clean shutdown revokes their leases in it.
    etcd: Option<EtcdProcess>,
    /// The namespaces the servers run in (labs with two servers); deleted last.
    hosts: Option<Hosts>,
    hub: Option<Hub>,
    boot_time: Duration,
}

static RUN_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Lab {
    /// Starts the server, the segment and every guest (booting in parallel), and waits until
    /// each guest's agent is ready. Call it from the test's own thread (see the module docs).
    pub fn start(config: LabConfig) -> Result<Lab> {
        let started = Instant::now();
        let env = LabEnv::load()?;
        // Shown with the test's output, so a failure can be tied to the versions it ran on.
        eprintln!("lab {}: {}", config.name, env.versions);
        let server_binary = server_binary()?;
        let run_dir = std::env::temp_dir().join(format!(
            "pvrdma-lab-{}-{}-{}",
            config.name,
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&run_dir)
            .map_err(LabError::io(format!("creating {}", run_dir.display())))?;
        let initrd = run_dir.join("initrd.img");
        let mut lab = Lab {
            launcher: env.launcher.clone(),
            initrd: initrd.clone(),
            specs: Vec::new(),
            boot_timeout: config.boot_timeout,
            run_dir,
            guests: Vec::new(),
            servers: Vec::new(),
            etcd: None,
            hosts: None,
            hub: None,
            boot_time: Duration::ZERO,
        };
        with_files(&env.initrd, &config.agent, &config.extra_files, &initrd)?;

        let names: Vec<String> = (0..config.guests).map(|i| format!("guest{i}")).collect();
        let ports: Vec<PathBuf> = names
            .iter()
            .map(|n| lab.run_dir.join(format!("{n}.net")))
            .collect();
        let segment = lab.run_dir.join("segment.sock");
        lab.hub = Some(Hub::start(&segment, ports.clone())?);
        if config.external_sockets.is_empty() {
            lab.start_servers(&config, &server_binary, &names)?;
        } else if config.external_sockets.len() != config.guests {
            return Err(LabError::Setup(format!(
                "{} external sockets for {} guests",
                config.external_sockets.len(),
                config.guests
            )));
        }
        let launched = config.launched.unwrap_or(config.guests).min(config.guests);

        let mut listeners = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let spec = GuestSpec {
                name: name.clone(),
                ip: format!("10.99.0.{}/24", i + 1),
                mac: format!("52:54:00:5e:00:{:02x}", i + 1),
                pvrdma_socket: config
                    .external_sockets
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| lab.run_dir.join(format!("{name}.pvrdma.sock"))),
                segment: segment.clone(),
                port: ports[i].clone(),
                memory_mib: config.memory_mib,
                allow_reboot: config.allow_reboot,
            };
            if i >= launched {
                lab.specs.push(spec);
                continue;
            }
            let (guest, listener) = Guest::launch(&env.launcher, &lab.run_dir, &initrd, &spec)?;
            lab.guests.push(guest);
            lab.specs.push(spec);
            listeners.push(listener);
        }
        // The guests boot concurrently; waiting for them one by one costs nothing extra.
        let deadline = Instant::now() + config.boot_timeout;
        for (guest, listener) in lab.guests.iter_mut().zip(&listeners) {
            guest.wait_ready(listener, deadline.saturating_duration_since(Instant::now()))?;
        }
        lab.boot_time = started.elapsed();
        Ok(lab)
    }

    pub fn guest(&mut self, index: usize) -> &mut Guest {
        &mut self.guests[index]
    }

    pub fn guests(&mut self) -> &mut [Guest] {
        &mut self.guests
    }

    /// The (first) server process.
    pub fn server(&mut self) -> &mut ServerProcess {
        self.servers
            .first_mut()
            .expect("the lab's servers run until shut_down")
    }

    /// Every server process (two in a two-server lab: guest `i` is on server `i % 2`).
    pub fn servers(&mut self) -> &mut [ServerProcess] {
        &mut self.servers
    }

    /// Starts the servers: one with every guest's socket, or one per "host" namespace,
    /// joined by the TCP transport with a cluster key of this lab, each naming the other
    /// with `--peer` or both finding each other in an etcd started here first.
    fn start_servers(&mut self, config: &LabConfig, binary: &Path, names: &[String]) -> Result<()> {
        let socket = |name: &String| self.run_dir.join(format!("{name}.pvrdma.sock"));
        if config.servers <= 1 {
            let sockets = names.iter().map(socket).collect();
            let server = ServerProcess::start(
                binary,
                sockets,
                &config.server_args,
                self.run_dir.join("server.log"),
            )?;
            self.servers.push(server);
            return Ok(());
        }
        if config.servers != 2 {
            return Err(LabError::Setup(format!(
                "a lab has 1 or 2 servers, not {}",
                config.servers
            )));
        }
        let hosts = Hosts::pair()?;
        let key = self.run_dir.join("cluster.key");
        let secret: String = (0..4)
            .map(|i| {
                format!(
                    "{:016x}",
                    std::process::id() as u64 ^ (i * 0x9e37_79b9) ^ nanos()
                )
            })
            .collect();
        std::fs::write(&key, secret).map_err(LabError::io("writing the cluster key"))?;
        // Held by the lab from here on: its drop deletes the namespaces after the servers and
        // etcd are gone, also when starting one of those fails.
        let hosts = self.hosts.insert(hosts);
        let find = match config.discovery {
            Discovery::PeerList => None,
            Discovery::Etcd => {
                let etcd = EtcdProcess::start_in(hosts.netns(0), hosts.addr(0), &self.run_dir)?;
                let endpoint = etcd.endpoint().to_string();
                self.etcd = Some(etcd);
                // A prefix of this lab's own (from its run folder's name): the keys say which
                // lab wrote them, and labs sharing one etcd would not see each other's servers.
                let lab = self
                    .run_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().replace("pvrdma-lab-", ""))
                    .unwrap_or_default();
                Some((endpoint, format!("/lab-{lab}/")))
            }
        };
        for host in 0..2 {
            let sockets = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == host)
                .map(|(_, name)| socket(name))
                .collect();
            let mut args = config.server_args.clone();
            args.extend([
                "--listen".to_string(),
                format!("{}:{TRANSPORT_PORT}", hosts.addr(host)),
                "--cluster-key".to_string(),
                key.display().to_string(),
            ]);
            match &find {
                None => args.extend([
                    "--peer".to_string(),
                    format!("{}:{TRANSPORT_PORT}", hosts.addr(1 - host)),
                ]),
                Some((endpoint, prefix)) => args.extend([
                    "--directory".to_string(),
                    format!("etcd://{endpoint}"),
                    "--directory-prefix".to_string(),
                    prefix.clone(),
                ]),
            }
            let server = ServerProcess::start_in(
                Some(hosts.netns(host)),
                binary,
                sockets,
                &args,
                self.run_dir.join(format!("server{host}.log")),
            )?;
            self.servers.push(server);
        }
        Ok(())
    }

    /// The address server `index` of a two-server lab takes peers at (`ADDR:PORT`, as its
    /// `--listen`, the directory and the servers' logs name it); `None` with one server.
    pub fn transport_addr(&self, index: usize) -> Option<String> {
        let hosts = self.hosts.as_ref()?;
        (index < 2).then(|| format!("{}:{TRANSPORT_PORT}", hosts.addr(index)))
    }

    /// Replaces guest `index` with a fresh QEMU on the same device socket (killing the old
    /// one if it still runs) and waits until it is ready: a new client of the same server.
    pub fn relaunch(&mut self, index: usize) -> Result<()> {
        let spec = self
            .specs
            .get(index)
            .cloned()
            .ok_or_else(|| LabError::Setup(format!("no guest {index}")))?;
        self.guests[index].kill();
        let agent = self.run_dir.join(format!("{}.agent.sock", spec.name));
        let _ = std::fs::remove_file(&agent);
        let (guest, listener) = Guest::launch(&self.launcher, &self.run_dir, &self.initrd, &spec)?;
        self.guests[index] = guest;
        self.guests[index].wait_ready(&listener, self.boot_timeout)
    }

    /// Boots the next guest `start` left for later ([`LabConfig::launched`]) and waits
    /// until it is ready; returns its index.
    pub fn launch_next(&mut self) -> Result<usize> {
        let index = self.guests.len();
        let spec = self
            .specs
            .get(index)
            .cloned()
            .ok_or_else(|| LabError::Setup(format!("no guest {index} left to launch")))?;
        let (guest, listener) = Guest::launch(&self.launcher, &self.run_dir, &self.initrd, &spec)?;
        self.guests.push(guest);
        self.guests[index].wait_ready(&listener, self.boot_timeout)?;
        Ok(index)
    }

    /// Wall time from `start` until every agent was ready.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Powers every guest off, then stops the server and checks that it shut down cleanly.
    pub fn shut_down(mut self) -> Result<()> {
        for guest in &mut self.guests {
            guest.power_off(Duration::from_secs(30))?;
        }
        let mut result = Ok(());
        for server in self.servers.drain(..) {
            let stopped = server.shut_down();
            if result.is_ok() {
                result = stopped;
            }
        }
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for guest in &mut self.guests {
            guest.kill();
        }
        self.servers.clear();
        drop(self.etcd.take());
        drop(self.hosts.take());
        drop(self.hub.take());
        remove_sockets(&self.run_dir);
        let _ = std::fs::remove_file(self.run_dir.join("initrd.img"));
        if std::thread::panicking() || std::env::var_os("PVRDMA_KEEP_RUN").is_some() {
            eprintln!("lab logs kept in {}", self.run_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

fn remove_sockets(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `base` followed by a cpio archive holding the agent and `extra` to `out`.
fn with_files(base: &Path, agent: &Path, extra: &[(PathBuf, String)], out: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(base, out).map_err(LabError::io(format!("copying {}", base.display())))?;
    let read = |path: &Path| {
        std::fs::read(path).map_err(LabError::io(format!("reading {}", path.display())))
    };
    let mut files = vec![(
        "usr/local/sbin/pvrdma-guest-agent".to_string(),
        0o100_755,
        read(agent)?,
    )];
    for (host, guest) in extra {
        let mode = std::fs::metadata(host)
            .map_err(LabError::io(format!("reading {}", host.display())))?
            .permissions()
            .mode();
        files.push((
            guest.trim_start_matches('/').to_string(),
            0o100_000 | (mode & 0o777),
            read(host)?,
        ));
    }
    let entries: Vec<(&str, u32, &[u8])> = files
        .iter()
        .map(|(path, mode, bytes)| (path.as_str(), *mode, bytes.as_slice()))
        .collect();
    let mut file: File = OpenOptions::new()
        .append(true)
        .open(out)
        .map_err(LabError::io(format!("opening {}", out.display())))?;
    cpio::write_archive(&mut file, &entries)
        .and_then(|()| file.flush())
        .map_err(LabError::io(format!(
            "appending files to {}",
            out.display()
        )))
}

/// Nanoseconds of the wall clock, to make a lab's cluster key its own.
fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
