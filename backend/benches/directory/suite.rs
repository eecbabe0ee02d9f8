//! The order of the run: etcd started, the raw-put baseline, N servers registering M GIDs
//! each until every view holds them all, then one GID added and one server leaving.

use std::io::Read as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pvrdma_backend::Gid;
use pvrdma_backend::directory::etcd::{Etcd, prefix_end};
use pvrdma_backend::directory::membership::EtcdMembership;
use pvrdma_backend::directory::{Directory, Holder};

use crate::etcd_server::EtcdServer;
use crate::metrics::{self, EtcdLoad};
use crate::warnings;

/// The directory's prefix: the server's default one (etcd is the benchmark's own).
pub const PREFIX: &str = "/vfio-user-pvrdma/";
/// Where the raw baseline puts its keys (deleted before the directory starts).
const RAW_PREFIX: &str = "/bench-raw/";
/// How often the views are looked at while they converge: the resolution of the
/// per-server times.
const POLL: Duration = Duration::from_millis(10);
/// How often the views are looked at after one change.
const CHANGE_POLL: Duration = Duration::from_millis(1);
/// Longest wait for one change to reach every view (a lease's TTL is 10 s).
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);
/// How often the emulated transport asks server 0's directory for its holders: the TCP
/// runtime's GID_REFRESH.
const TRANSPORT_REFRESH: Duration = Duration::from_millis(50);
/// Progress on stderr at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Config {
    pub servers: usize,
    pub gids: usize,
    /// Single-GID additions measured after convergence (each on another server).
    pub adds: usize,
    pub quick: bool,
}

impl Config {
    pub fn new(quick: bool) -> Config {
        if quick {
            Config {
                servers: 10,
                gids: 100,
                adds: 3,
                quick,
            }
        } else {
            Config {
                servers: 100,
                gids: 1000,
                adds: 5,
                quick,
            }
        }
    }

    pub fn total(&self) -> usize {
        self.servers * self.gids
    }

    fn check(&self) -> Result<(), String> {
        if self.servers < 2 || self.servers > 50_000 {
            return Err(format!(
                "--servers takes 2 to 50 000 (one loopback port each), not {}",
                self.servers
            ));
        }
        if self.gids == 0 || self.total() + self.adds >= 1 << 24 {
            return Err(format!(
                "--gids takes 1 to {} with {} servers (GIDs are ::ffff:10.x.y.z)",
                ((1 << 24) - 1 - self.adds) / self.servers,
                self.servers
            ));
        }
        Ok(())
    }
}

/// GID number `index` of the run: IPv4-mapped, as the device makes a guest's GID from
/// its IPv4 address (::ffff:10.x.y.z), distinct for every index below 2^24 - 1.
pub fn gid(index: usize) -> Gid {
    let v = index as u32 + 1;
    let mut gid = [0; 16];
    gid[10] = 0xff;
    gid[11] = 0xff;
    gid[12] = 10;
    gid[13..].copy_from_slice(&v.to_be_bytes()[1..]);
    gid
}

/// Simulated server `s`: a transport id and an address nothing listens on (no link is
/// ever dialed: only the directory runs).
fn holder(s: usize) -> Holder {
    Holder {
        server: 0x5e5e_0000_0000_0000 | (s as u64 + 1),
        addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + s as u16)),
    }
}

/// Percentiles of a set of durations (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub p50: Duration,
    pub max: Duration,
}

impl Spread {
    fn of(mut samples: Vec<Duration>) -> Spread {
        samples.sort_unstable();
        match samples.len() {
            0 => Spread::default(),
            n => Spread {
                p50: samples[(n - 1) / 2],
                max: samples[n - 1],
            },
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub config: Option<Config>,
    pub etcd_version: String,
    pub cpus: usize,
    pub load_average: f64,
    pub elapsed: Duration,

    /// N*M plain puts from N threads.
    pub raw_put: Duration,
    /// From the first server's start until each server registered all its GIDs.
    pub registered: Spread,
    /// From the first server's start until each server's view held every GID and every
    /// other server.
    pub converged: Spread,
    /// Every view still whole after convergence was seen everywhere (no lease lapsed).
    pub views_stable: bool,

    /// One server adds one GID: until every view has it.
    pub add_gid: Spread,
    pub add_gid_samples: usize,
    /// One server leaves: its revoke call, then until its GIDs are gone from every view.
    pub leave_revoke: Duration,
    pub leave_gone: Duration,

    /// A listing of the whole prefix: what a starting server (or one whose watch broke)
    /// reads.
    pub listing_bytes: usize,
    pub listing_keys: usize,
    pub listing_time: Duration,

    /// Server 0's holder map as the TCP runtime takes it (every 50 ms, copied when it
    /// changed) while the views converge.
    pub transport_copies: usize,
    pub transport_copy: Spread,
    /// One copy of the whole map (N*M + 1 GIDs), on every server after the first add.
    pub full_copy: Spread,

    /// etcd at the start, after the baseline, once its keys were deleted, and once every
    /// view converged: the baseline's load is `etcd_raw - etcd_start`, the directory's
    /// `etcd_converged - etcd_before`.
    pub etcd_start: EtcdLoad,
    pub etcd_raw: EtcdLoad,
    pub etcd_before: EtcdLoad,
    pub etcd_converged: EtcdLoad,
    pub etcd_peak_rss: u64,

    /// This process: CPU during the baseline and during registration; by thread kind.
    pub client_raw_cpu: Duration,
    pub client_cpu: Duration,
    pub lease_threads_cpu: Duration,
    pub watch_threads_cpu: Duration,
    pub threads: u64,
    /// This process's memory once every view converged (every server's map), and at its
    /// peak (after the first add, when every server's map was copied once more).
    pub client_rss: u64,
    pub client_peak_rss: u64,

    pub warnings: usize,
    pub leases_lost: usize,
}

/// Progress lines on stderr, on one clock.
struct Progress {
    started: Instant,
    last: Instant,
}

impl Progress {
    fn say(&mut self, text: &str) {
        self.last = Instant::now();
        eprintln!(
            "[directory bench +{:.1} s] {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Says `text()` if nothing was said for a while.
    fn tick(&mut self, text: impl FnOnce() -> String) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.say(&text());
        }
    }
}

/// A thread that asks server 0's directory for its holders as the TCP runtime does, and
/// times the calls that copied the map; stopped and joined on drop.
struct Transport {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Duration>>>,
}

impl Transport {
    fn start(directory: Arc<EtcdMembership>) -> Transport {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("transport 0".into())
            .spawn(move || {
                let mut copies = Vec::new();
                let mut version = 0;
                while !stopped.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    if let Some(holders) = directory.gid_holders()
                        && holders.version != version
                    {
                        version = holders.version;
                        copies.push(started.elapsed());
                    }
                    thread::sleep(TRANSPORT_REFRESH);
                }
                copies
            })
            .ok();
        Transport { stop, handle }
    }

    fn finish(mut self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A GID record's shape and size (the baseline writes values as long as the directory's).
fn record(s: usize) -> Vec<u8> {
    let me = holder(s);
    format!(r#"{{"addr":"{}","id":"{:016x}"}}"#, me.addr, me.server).into_bytes()
}

/// N threads each putting M keys through `Etcd::put`, as the registration's N lease
/// threads each claim M GIDs.
fn raw_puts(etcd: &Etcd, config: &Config, progress: &mut Progress) -> Result<Duration, String> {
    let done = Arc::new(AtomicUsize::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut threads = Vec::new();
    for s in 0..config.servers {
        let (etcd, done, abort, gids) = (
            etcd.clone(),
            Arc::clone(&done),
            Arc::clone(&abort),
            config.gids,
        );
        let spawned = thread::Builder::new()
            .name("raw put".into())
            .spawn(move || -> Result<(), String> {
                let value = record(s);
                for g in 0..gids {
                    if abort.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let key = format!("{RAW_PREFIX}{s}/{}", Ipv6Addr::from(gid(s * gids + g)));
                    if let Err(e) = etcd.put(key.as_bytes(), &value, 0) {
                        abort.store(true, Ordering::Relaxed);
                        return Err(format!("a raw put: {e}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        threads.push(spawned);
    }
    while !threads.iter().all(JoinHandle::is_finished) {
        thread::sleep(POLL);
        progress.tick(|| {
            format!(
                "raw puts: {} of {}",
                done.load(Ordering::Relaxed),
                config.total()
            )
        });
    }
    let took = started.elapsed();
    for t in threads {
        t.join().map_err(|_| "a raw put thread panicked")??;
    }
    Ok(took)
}

/// Deletes every key under `prefix` in one request.
fn delete_prefix(endpoint: &str, prefix: &str) -> Result<(), String> {
    let body = serde_json::json!({
        "key": BASE64.encode(prefix),
        "range_end": BASE64.encode(prefix_end(prefix.as_bytes())),
    });
    ureq::post(&format!("{endpoint}/v3/kv/deleterange"))
        .send_json(&body)
        .map(drop)
        .map_err(|e| format!("deleting {prefix}: {e}"))
}

/// The size of etcd's JSON answer to a listing of `prefix`, as a server's `Etcd::list`
/// reads it.
fn listing_bytes(endpoint: &str, prefix: &str) -> Result<usize, String> {
    let body = serde_json::json!({
        "key": BASE64.encode(prefix),
        "range_end": BASE64.encode(prefix_end(prefix.as_bytes())),
    });
    let mut answer = Vec::new();
    ureq::post(&format!("{endpoint}/v3/kv/range"))
        .send_json(&body)
        .map_err(|e| format!("listing {prefix}: {e}"))?
        .body_mut()
        .as_reader()
        .read_to_end(&mut answer)
        .map_err(|e| format!("listing {prefix}: {e}"))?;
    Ok(answer.len())
}

/// Waits until `whole(member)` holds for every member but `except`; how long since
/// `started` that took.
fn wait_for_every_view(
    members: &[Arc<EtcdMembership>],
    except: Option<usize>,
    started: Instant,
    what: &str,
    whole: impl Fn(&EtcdMembership) -> bool,
) -> Result<Duration, String> {
    let mut pending: Vec<usize> = (0..members.len()).filter(|&i| Some(i) != except).collect();
    loop {
        pending.retain(|&i| !whole(&members[i]));
        if pending.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > CHANGE_DEADLINE {
            return Err(format!(
                "{what}: {} views still without it after {CHANGE_DEADLINE:?} (server {} among \
                 them)",
                pending.len(),
                pending[0]
            ));
        }
        thread::sleep(CHANGE_POLL);
    }
}

fn thread_cpu(prefix: &str) -> Duration {
    metrics::cpu_by_thread_name()
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, cpu)| cpu)
        .sum()
}

/// The whole run.
pub fn run(config: &Config) -> Result<Results, String> {
    config.check()?;
    warnings::install();
    warnings::unmute();
    let (warnings_before, lost_before) = warnings::counts();
    let mut progress = Progress {
        started: Instant::now(),
        last: Instant::now(),
    };
    let mut results = Results {
        config: Some(config.clone()),
        cpus: metrics::cpus(),
        load_average: metrics::load_average(),
        ..Results::default()
    };
    let (n, m, total) = (config.servers, config.gids, config.total());

    // Dropped in the reverse order: etcd is killed first, so the servers' last revokes
    // fail at once (silenced) instead of fanning every server's GIDs out to the others.
    let mut members: Vec<Arc<EtcdMembership>> = Vec::with_capacity(n);
    let _mute = warnings::MuteOnDrop;
    progress.say("starting etcd");
    let server = EtcdServer::start()?;
    results.etcd_version = server.version.clone();
    let etcd = server.client();

    progress.say(&format!(
        "baseline: {total} plain puts from {n} threads (Etcd::put, as the lease threads use)"
    ));
    results.etcd_start = EtcdLoad::scrape(&server.endpoint)?;
    let cpu = metrics::process_cpu();
    results.raw_put = raw_puts(&etcd, config, &mut progress)?;
    results.client_raw_cpu = metrics::process_cpu() - cpu;
    results.etcd_raw = EtcdLoad::scrape(&server.endpoint)?;
    progress.say(&format!(
        "baseline: {:.2} s ({:.0} puts/s); deleting its keys",
        results.raw_put.as_secs_f64(),
        total as f64 / results.raw_put.as_secs_f64()
    ));
    delete_prefix(&server.endpoint, RAW_PREFIX)?;
    // The directory's deltas start after the baseline's keys were deleted.
    results.etcd_before = EtcdLoad::scrape(&server.endpoint)?;

    progress.say(&format!(
        "starting {n} servers ({} threads) and publishing {m} GIDs on each",
        2 * n
    ));
    let cpu = metrics::process_cpu();
    let (lease_cpu, watch_cpu) = (thread_cpu("etcd lease"), thread_cpu("etcd watch"));
    let started = Instant::now();
    let mut gids: Vec<Vec<Gid>> = Vec::with_capacity(n);
    for s in 0..n {
        let member = Arc::new(EtcdMembership::start(
            etcd.clone(),
            PREFIX,
            holder(s),
            false,
        ));
        let mine: Vec<Gid> = (0..m).map(|g| gid(s * m + g)).collect();
        member.publish_gids(&mine, &[]);
        gids.push(mine);
        members.push(member);
    }
    let transport = Transport::start(Arc::clone(&members[0]));

    let mut registered_at: Vec<Option<Duration>> = vec![None; n];
    let mut converged_at: Vec<Option<Duration>> = vec![None; n];
    // Generous: on 2 shared cores 100 × 1 000 converged at about 100 claims/s.
    let deadline = Duration::from_secs(120) + Duration::from_millis(40 * total as u64);
    loop {
        let now = started.elapsed();
        for (i, member) in members.iter().enumerate() {
            if registered_at[i].is_none() && member.registered_gids() == m {
                registered_at[i] = Some(now);
            }
            if converged_at[i].is_none()
                && member.gid_count() == total
                && member.servers().len() == n - 1
            {
                converged_at[i] = Some(now);
            }
        }
        let registered = registered_at.iter().flatten().count();
        let converged = converged_at.iter().flatten().count();
        if registered == n && converged == n {
            break;
        }
        let state = || {
            let claimed: usize = members.iter().map(|m| m.registered_gids()).sum();
            let mut seen: Vec<usize> = members.iter().map(|m| m.gid_count()).collect();
            seen.sort_unstable();
            format!(
                "registering: {claimed} of {total} GIDs claimed, {registered} of {n} servers \
                 done; views hold {} to {} GIDs (p50 {}), {converged} of {n} converged; \
                 {} leases lost",
                seen[0],
                seen[n - 1],
                seen[(n - 1) / 2],
                warnings::counts().1 - lost_before
            )
        };
        if now > deadline {
            return Err(format!("not converged within {deadline:?}: {}", state()));
        }
        progress.tick(state);
        thread::sleep(POLL);
    }
    results.etcd_converged = EtcdLoad::scrape(&server.endpoint)?;
    results.client_cpu = metrics::process_cpu() - cpu;
    results.lease_threads_cpu = thread_cpu("etcd lease") - lease_cpu;
    results.watch_threads_cpu = thread_cpu("etcd watch") - watch_cpu;
    (results.threads, results.client_rss, _) = metrics::process_threads_and_rss();
    let copies = transport.finish();
    results.transport_copies = copies.len();
    results.transport_copy = Spread::of(copies);
    results.registered = Spread::of(registered_at.into_iter().flatten().collect());
    results.converged = Spread::of(converged_at.into_iter().flatten().collect());
    progress.say(&format!(
        "converged: every server registered in {:.2} s, every view whole in {:.2} s",
        results.registered.max.as_secs_f64(),
        results.converged.max.as_secs_f64()
    ));
    results.views_stable = members
        .iter()
        .all(|member| member.gid_count() == total && member.registered_gids() == m);

    progress.say("listing the whole directory, as a starting server does");
    results.listing_bytes = listing_bytes(&server.endpoint, PREFIX)?;
    let listed = Instant::now();
    let listing = etcd
        .list(PREFIX.as_bytes())
        .map_err(|e| format!("listing: {e}"))?;
    results.listing_time = listed.elapsed();
    results.listing_keys = listing.kvs.len();

    progress.say(&format!(
        "one change: {} times one server adds one GID",
        config.adds
    ));
    let mut adds = Vec::new();
    let mut full_copies = Vec::new();
    for k in 0..config.adds {
        let s = k * (n - 1) / config.adds;
        gids[s].push(gid(total + k));
        let expected = total + k + 1;
        let added = Instant::now();
        members[s].publish_gids(&gids[s], &[]);
        adds.push(wait_for_every_view(
            &members,
            None,
            added,
            "an added GID",
            |member| member.gid_count() == expected,
        )?);
        if k == 0 {
            // Every view changed once since the transport's last look: the next look
            // copies the whole map.
            for member in &members {
                let copying = Instant::now();
                let _ = member.gid_holders();
                full_copies.push(copying.elapsed());
            }
        }
    }
    results.add_gid_samples = adds.len();
    results.add_gid = Spread::of(adds);
    results.full_copy = Spread::of(full_copies);

    let leaver = n - 1;
    progress.say(&format!(
        "one change: server {leaver} leaves (its {m} GIDs)"
    ));
    let left = Instant::now();
    members[leaver].leave();
    results.leave_revoke = left.elapsed();
    let expected = total + config.adds - gids[leaver].len();
    results.leave_gone =
        wait_for_every_view(&members, Some(leaver), left, "a server leaving", |member| {
            member.gid_count() == expected && member.servers().len() == n - 2
        })?;

    results.etcd_peak_rss = server.peak_rss().unwrap_or(0);
    results.client_peak_rss = metrics::process_threads_and_rss().2;
    let (warned, lost) = warnings::counts();
    results.warnings = warned - warnings_before;
    results.leases_lost = lost - lost_before;
    results.elapsed = progress.started.elapsed();
    progress.say("done; stopping etcd");
    Ok(results)
}
