//! Servers finding each other, and each other's GIDs, in etcd instead of a static `--peer`
//! list. Each server registers its TCP address and transport id under
//! `PREFIX/servers/ADDR`, and every GID its guests add under `PREFIX/gids/GID`, all on one
//! lease it keeps alive while it runs; it watches the whole prefix. A GID key is created
//! only if absent (a transaction on the key), so a GID belongs to the server that
//! registered it first and a second server's claim is refused: the cross-host form of GID
//! interception is closed by etcd, not by whoever announces first. A server that dies stops
//! renewing its lease, and its address and GIDs disappear from every view when the lease
//! expires (a server that stops cleanly revokes it at once).
//!
//! etcd being away never stops a server: at start it says so and retries, serving its local
//! guests meanwhile; a lost lease is granted again and everything registered again; a watch
//! that fails (etcd restarted, or compacted the revision it watched from) lists again.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::etcd::{Etcd, EtcdError, Event};
use super::view::{self, Change, Keys, View};
use super::{Directory, GidHolders, Holder};
use crate::Gid;

/// The lease's time to live; renewed every third of it.
pub const LEASE_TTL: i64 = 10;

/// Pause before trying etcd again after a failure; also how long a GID another server
/// holds waits before it is claimed again (it is free once that server's lease ends).
const RETRY: Duration = Duration::from_secs(1);

/// GID claims made in one go before the lease's renewal is looked at again: a server
/// registering thousands of GIDs must not let its lease lapse meanwhile. A pass also ends
/// when the renewal is due, however few claims it made: on a loaded etcd one request can
/// take longer than the lease's TTL divided by this.
const CLAIMS_PER_PASS: usize = 256;

/// GIDs claimed in one transaction when none of them is held yet (the usual case: a guest
/// adding its GIDs, a server registering again). etcd allows 128 operations per
/// transaction by default; each GID takes a compare and a put.
const CLAIMS_PER_TXN: usize = 64;

/// This server's GIDs as etcd has them.
#[derive(Debug, Default)]
struct Claims {
    /// The GIDs the guests hold now (the transport's last word), each with whether the
    /// host RDMA device holds it too.
    wanted: HashMap<Gid, bool>,
    /// Those registered under this server's lease.
    claimed: HashMap<Gid, bool>,
    /// Those another server holds, and when the claim was last tried.
    refused: HashMap<Gid, Instant>,
}

/// What the membership threads share.
#[derive(Debug)]
struct Shared {
    me: Holder,
    keys: Keys,
    view: Mutex<View>,
    claims: Mutex<Claims>,
    stop: AtomicBool,
    lease: AtomicI64,
    /// The store revision the view was last brought up to (for `stats`).
    revision: AtomicI64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// This server's registration in etcd and its view of the others.
#[derive(Debug)]
pub struct EtcdMembership {
    shared: Arc<Shared>,
    etcd: Etcd,
}

impl Directory for EtcdMembership {
    // No `peers`: servers are dialed when a QP sends to one of their GIDs.

    fn publish_gids(&self, gids: &[Gid], rdma_gids: &[Gid]) {
        let rdma: HashSet<&Gid> = rdma_gids.iter().collect();
        let wanted: HashMap<Gid, bool> = gids.iter().map(|g| (*g, rdma.contains(g))).collect();
        let mut claims = lock(&self.shared.claims);
        if claims.wanted != wanted {
            claims.wanted = wanted;
        }
    }

    fn gid_holders(&self) -> Option<GidHolders> {
        Some(lock(&self.shared.view).holders())
    }

    fn address_of(&self, server: u64) -> Option<SocketAddr> {
        lock(&self.shared.view).address_of(server)
    }
}

impl EtcdMembership {
    /// Registers this server (`me`: its transport's id and the address peers dial) under
    /// `prefix` and starts watching the directory; `rdma` tells the others whether this
    /// host has an RDMA device. GIDs are registered as [`Directory::publish_gids`] names
    /// them.
    pub fn start(etcd: Etcd, prefix: &str, me: Holder, rdma: bool) -> EtcdMembership {
        let keys = Keys::new(prefix);
        let shared = Arc::new(Shared {
            me,
            view: Mutex::new(View::new(keys.clone(), me)),
            keys,
            claims: Mutex::default(),
            stop: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            revision: AtomicI64::new(0),
        });
        let record = view::server_record(me, rdma);
        {
            let (etcd, shared) = (etcd.clone(), Arc::clone(&shared));
            let spawned = thread::Builder::new()
                .name("etcd lease".into())
                .spawn(move || register(&etcd, &shared, &record));
            if let Err(e) = spawned {
                warn!("directory: cannot start the etcd registration thread: {e}");
            }
        }
        {
            let (etcd, shared) = (etcd.clone(), Arc::clone(&shared));
            let prefix = prefix.as_bytes().to_vec();
            let spawned = thread::Builder::new()
                .name("etcd watch".into())
                .spawn(move || watch(&etcd, &shared, &prefix));
            if let Err(e) = spawned {
                warn!("directory: cannot start the etcd watch thread: {e}");
            }
        }
        EtcdMembership { shared, etcd }
    }

    /// The store revision this server's view of the directory is at (0 before the first
    /// listing).
    pub fn revision(&self) -> i64 {
        self.shared.revision.load(Ordering::Relaxed)
    }

    /// The addresses of the other servers registered.
    pub fn servers(&self) -> Vec<SocketAddr> {
        let view = lock(&self.shared.view);
        view.servers(self.shared.me.server)
            .iter()
            .map(|h| h.addr)
            .collect()
    }

    /// How many GIDs the directory holds, this server's included.
    pub fn gid_count(&self) -> usize {
        lock(&self.shared.view).gid_count()
    }

    /// How many of this server's GIDs are registered under its lease.
    pub fn registered_gids(&self) -> usize {
        lock(&self.shared.claims).claimed.len()
    }

    /// This server's GIDs that another server holds in etcd: peers reach that server for
    /// them, not this one.
    pub fn refused_gids(&self) -> Vec<Gid> {
        let mut refused: Vec<Gid> = lock(&self.shared.claims).refused.keys().copied().collect();
        refused.sort_unstable();
        refused
    }

    /// Leaves the directory now (the lease is revoked, so the others see this server and
    /// its GIDs go at once rather than when the lease runs out), and stops renewing.
    pub fn leave(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let lease = self.shared.lease.swap(0, Ordering::Relaxed);
        if lease != 0 {
            match self.etcd.revoke(lease) {
                Ok(()) => info!("directory: left (lease {lease:#x} revoked)"),
                Err(e) => warn!("directory: leaving: {e}; the lease ends by itself"),
            }
        }
    }
}

impl Drop for EtcdMembership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The registration thread: grants a lease, puts this server's record under it, renews it
/// every third of its TTL and registers the GIDs the guests add (and deletes those they
/// remove) between renewals; starts over when the lease is lost.
fn register(etcd: &Etcd, shared: &Shared, record: &[u8]) {
    let key = shared.keys.server(shared.me.addr);
    let mut complained = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let registered = etcd
            .grant(LEASE_TTL)
            .and_then(|lease| etcd.put(&key, record, lease).map(|_| lease));
        let lease = match registered {
            Ok(lease) => lease,
            Err(e) => {
                if !complained {
                    warn!(
                        "directory: {e}; serving this server's own guests, and trying etcd \
                         again every {RETRY:?}"
                    );
                    complained = true;
                }
                thread::sleep(RETRY);
                continue;
            }
        };
        complained = false;
        shared.lease.store(lease, Ordering::Relaxed);
        {
            // A new lease holds nothing yet: every GID is claimed again.
            let mut claims = lock(&shared.claims);
            claims.claimed.clear();
            claims.refused.clear();
        }
        info!(
            "directory: registered {} in etcd (lease {lease:#x}, {LEASE_TTL} s)",
            String::from_utf8_lossy(&key)
        );
        let period = Duration::from_secs((LEASE_TTL / 3).max(1) as u64);
        let mut renewed = Instant::now();
        while !shared.stop.load(Ordering::Relaxed) {
            let busy = match sync_gids(etcd, shared, lease, renewed + period) {
                Ok(busy) => busy,
                Err(e) => {
                    // A lost lease shows at the next renewal; anything else is retried.
                    debug!("directory: registering GIDs: {e}");
                    false
                }
            };
            if !busy {
                thread::sleep(Duration::from_millis(100));
            }
            if renewed.elapsed() < period {
                continue;
            }
            match etcd.keep_alive(lease) {
                Ok(_) => renewed = Instant::now(),
                Err(EtcdError::LeaseGone(_)) => {
                    warn!("directory: the etcd lease expired; registering again");
                    break;
                }
                Err(e) => {
                    // Renewal is retried until the lease's TTL runs out, then it is gone.
                    debug!("directory: renewing the lease: {e}");
                    thread::sleep(RETRY);
                }
            }
        }
    }
}

/// Brings this server's GIDs in etcd in line with its guests': claims up to
/// [`CLAIMS_PER_PASS`] new ones under `lease`, rewrites those whose RDMA flag changed, and
/// deletes those no guest holds any more, stopping when the lease's renewal is due
/// (`renew_by`). Returns whether work is left for the next pass.
fn sync_gids(
    etcd: &Etcd,
    shared: &Shared,
    lease: i64,
    renew_by: Instant,
) -> Result<bool, EtcdError> {
    let (to_claim, to_rewrite, to_delete) = {
        let mut claims = lock(&shared.claims);
        let claims = &mut *claims;
        claims
            .refused
            .retain(|gid, _| claims.wanted.contains_key(gid));
        let now = Instant::now();
        let mut to_claim = Vec::new();
        let mut to_rewrite = Vec::new();
        for (gid, rdma) in &claims.wanted {
            match claims.claimed.get(gid) {
                Some(registered) if registered != rdma => to_rewrite.push((*gid, *rdma)),
                Some(_) => {}
                None if claims
                    .refused
                    .get(gid)
                    .is_none_or(|tried| now.duration_since(*tried) >= RETRY) =>
                {
                    to_claim.push((*gid, *rdma))
                }
                None => {}
            }
        }
        let to_delete: Vec<Gid> = claims
            .claimed
            .keys()
            .filter(|gid| !claims.wanted.contains_key(*gid))
            .copied()
            .collect();
        (to_claim, to_rewrite, to_delete)
    };
    let due = || Instant::now() >= renew_by;
    for gid in &to_delete {
        if due() {
            return Ok(true);
        }
        etcd.delete(&shared.keys.gid(gid))?;
        lock(&shared.claims).claimed.remove(gid);
        debug!("directory: GID {} released", Ipv6Addr::from(*gid));
    }
    for (gid, rdma) in to_rewrite {
        if due() {
            return Ok(true);
        }
        // The key is this server's, under its lease: a plain put (which fails if the lease
        // is gone, so nothing of another server's is overwritten).
        let record = view::gid_record(shared.me, rdma);
        etcd.put(&shared.keys.gid(&gid), &record, lease)?;
        lock(&shared.claims).claimed.insert(gid, rdma);
    }
    let busy = to_claim.len() > CLAIMS_PER_PASS;
    let to_claim: Vec<(Gid, bool)> = to_claim.into_iter().take(CLAIMS_PER_PASS).collect();
    for batch in to_claim.chunks(CLAIMS_PER_TXN) {
        if due() {
            return Ok(true);
        }
        if batch.len() > 1 && claim_together(etcd, shared, lease, batch)? {
            continue;
        }
        for &(gid, rdma) in batch {
            claim(etcd, shared, lease, gid, rdma)?;
        }
    }
    Ok(busy)
}

/// Claims every GID of `batch` in one transaction, if none is held; whether it did.
fn claim_together(
    etcd: &Etcd,
    shared: &Shared,
    lease: i64,
    batch: &[(Gid, bool)],
) -> Result<bool, EtcdError> {
    let entries: Vec<(Vec<u8>, Vec<u8>)> = batch
        .iter()
        .map(|(gid, rdma)| (shared.keys.gid(gid), view::gid_record(shared.me, *rdma)))
        .collect();
    if !etcd.put_all_if_absent(&entries, lease)? {
        return Ok(false);
    }
    let mut claims = lock(&shared.claims);
    for &(gid, rdma) in batch {
        claims.refused.remove(&gid);
        claims.claimed.insert(gid, rdma);
    }
    Ok(true)
}

/// Claims `gid` alone: created if absent, taken over from an earlier run of this server,
/// or refused (and logged once) if another server holds it.
fn claim(etcd: &Etcd, shared: &Shared, lease: i64, gid: Gid, rdma: bool) -> Result<(), EtcdError> {
    let key = shared.keys.gid(&gid);
    let record = view::gid_record(shared.me, rdma);
    let (mut created, owner) = etcd.put_if_absent(&key, &record, lease)?;
    let holder = owner.as_deref().and_then(view::holder_of);
    if let (Some(owner), Some(holder)) = (&owner, holder)
        && holder.addr == shared.me.addr
        && holder.server != shared.me.server
    {
        // An earlier run of this server (killed, its lease not ended yet): the GID is
        // this server's guests' again, moved to the new lease if still unchanged.
        created = etcd.put_if_value(&key, owner, &record, lease)?;
    }
    let mut claims = lock(&shared.claims);
    if created || holder.is_some_and(|h| h.server == shared.me.server) {
        if claims.refused.remove(&gid).is_some() {
            info!(
                "directory: GID {} is free again and registered here",
                Ipv6Addr::from(gid)
            );
        }
        // A record found already ours keeps the flag it has; a stale one is rewritten next
        // pass.
        let registered = match &owner {
            Some(value) if !created => view::rdma_of(value),
            _ => rdma,
        };
        claims.claimed.insert(gid, registered);
    } else if claims.refused.insert(gid, Instant::now()).is_none() {
        warn!(
            "directory: GID {} is registered by {}; refused here (a GID names one port of \
             the cluster): other servers reach that one for it",
            Ipv6Addr::from(gid),
            holder.map_or_else(|| "another server".to_string(), |h| h.addr.to_string()),
        );
    }
    Ok(())
}

/// The watch thread: lists the directory, then follows changes from the listing's
/// revision; lists again whenever the watch ends.
fn watch(etcd: &Etcd, shared: &Shared, prefix: &[u8]) {
    while !shared.stop.load(Ordering::Relaxed) {
        let listing = match etcd.list(prefix) {
            Ok(listing) => listing,
            Err(e) => {
                debug!("directory: listing: {e}");
                thread::sleep(RETRY);
                continue;
            }
        };
        {
            let mut view = lock(&shared.view);
            view.reset(&listing.kvs);
            info!(
                "directory: {} other servers and {} GIDs registered (etcd revision {})",
                view.servers(shared.me.server).len(),
                view.gid_count(),
                listing.revision
            );
        }
        shared.revision.store(listing.revision, Ordering::Relaxed);
        let mut stream = match etcd.watch(prefix, listing.revision + 1) {
            Ok(stream) => stream,
            Err(e) => {
                debug!("directory: watching: {e}");
                thread::sleep(RETRY);
                continue;
            }
        };
        loop {
            match stream.changes() {
                Ok(events) => {
                    let mut view = lock(&shared.view);
                    for event in events {
                        let (change, revision) = match event {
                            Event::Put(kv) => (view.put(&kv), kv.mod_revision),
                            Event::Delete { key, mod_revision } => {
                                (view.delete(&key), mod_revision)
                            }
                        };
                        shared.revision.store(revision, Ordering::Relaxed);
                        // (This server's own key goes when it leaves: not news.)
                        if let Change::ServerLeft(addr) = change
                            && addr != shared.me.addr
                        {
                            info!("directory: server {addr} left");
                        }
                    }
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                Err(e) => {
                    debug!("directory: the watch ended ({e}); listing again");
                    break;
                }
            }
        }
    }
}
