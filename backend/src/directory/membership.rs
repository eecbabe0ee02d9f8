//! Servers finding each other in etcd instead of a static `--peer` list. Each server
//! registers its TCP address under `PREFIX/servers/ADDR`, on a lease it keeps alive while it
//! runs, and watches `PREFIX/servers/`: every address registered there but its own is a peer
//! for the TCP transport to dial. A server that dies stops renewing its lease and disappears
//! from every other server's view when the lease expires (a server that stops cleanly
//! revokes it at once).
//!
//! etcd being away never stops a server: at start it says so and retries, serving its local
//! guests meanwhile; a lost lease is granted again and the address registered again; a watch
//! that fails (etcd restarted, or compacted the revision it watched from) lists again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{Value, json};

use super::PeerSource;
use super::etcd::{Etcd, EtcdError, Event, KeyValue};

/// The lease's time to live; renewed every third of it.
pub const LEASE_TTL: i64 = 10;

/// Pause before trying etcd again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// What the membership threads share.
#[derive(Debug, Default)]
struct Shared {
    /// Other servers' addresses, as the last listing and the watch since say.
    peers: Mutex<Vec<SocketAddr>>,
    stop: AtomicBool,
    lease: AtomicI64,
    /// The store revision the view was last brought up to (for `stats`).
    revision: AtomicI64,
}

/// This server's registration in etcd and its view of the others.
#[derive(Debug)]
pub struct EtcdMembership {
    shared: Arc<Shared>,
    etcd: Etcd,
}

impl PeerSource for EtcdMembership {
    fn peers(&self) -> Vec<SocketAddr> {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The key of the server listening on `addr`.
fn server_key(prefix: &str, addr: SocketAddr) -> Vec<u8> {
    format!("{prefix}servers/{addr}").into_bytes()
}

/// The address a registration names, if it is one.
fn registered_addr(kv: &KeyValue) -> Option<SocketAddr> {
    let record: Value = serde_json::from_slice(&kv.value).ok()?;
    record.get("addr")?.as_str()?.parse().ok()
}

impl EtcdMembership {
    /// Registers `me` (this server's TCP address, as peers dial it) under `prefix` and
    /// starts watching the other servers; `rdma` tells them whether this host has an RDMA
    /// device.
    pub fn start(etcd: Etcd, prefix: &str, me: SocketAddr, rdma: bool) -> EtcdMembership {
        let shared = Arc::new(Shared::default());
        let record = json!({ "addr": me.to_string(), "tcp": true, "rdma": rdma }).to_string();
        {
            let (etcd, shared, key) = (etcd.clone(), Arc::clone(&shared), server_key(prefix, me));
            let spawned = thread::Builder::new()
                .name("etcd lease".into())
                .spawn(move || register(&etcd, &shared, &key, record.as_bytes()));
            if let Err(e) = spawned {
                warn!("directory: cannot start the etcd registration thread: {e}");
            }
        }
        {
            let (etcd, shared) = (etcd.clone(), Arc::clone(&shared));
            let servers = format!("{prefix}servers/").into_bytes();
            let spawned = thread::Builder::new()
                .name("etcd watch".into())
                .spawn(move || watch(&etcd, &shared, &servers, me));
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
}

impl EtcdMembership {
    /// Leaves the directory now (the lease is revoked, so the others see this server go at
    /// once rather than when the lease runs out), and stops renewing.
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
/// every third of its TTL; starts over when the lease is lost.
fn register(etcd: &Etcd, shared: &Shared, key: &[u8], record: &[u8]) {
    let mut complained = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let registered = etcd
            .grant(LEASE_TTL)
            .and_then(|lease| etcd.put(key, record, lease).map(|_| lease));
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
        info!(
            "directory: registered {} in etcd (lease {lease:#x}, {LEASE_TTL} s)",
            String::from_utf8_lossy(key)
        );
        let period = Duration::from_secs((LEASE_TTL / 3).max(1) as u64);
        let mut renewed = Instant::now();
        while !shared.stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
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

/// The watch thread: lists the servers, then follows changes from the listing's revision;
/// lists again whenever the watch ends.
fn watch(etcd: &Etcd, shared: &Shared, servers: &[u8], me: SocketAddr) {
    let publish = |view: &std::collections::BTreeMap<Vec<u8>, SocketAddr>| {
        let peers: Vec<SocketAddr> = view.values().copied().filter(|a| *a != me).collect();
        *shared.peers.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let listing = match etcd.list(servers) {
            Ok(listing) => listing,
            Err(e) => {
                debug!("directory: listing the servers: {e}");
                thread::sleep(RETRY);
                continue;
            }
        };
        let mut view: std::collections::BTreeMap<Vec<u8>, SocketAddr> = listing
            .kvs
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), registered_addr(kv)?)))
            .collect();
        publish(&view);
        shared.revision.store(listing.revision, Ordering::Relaxed);
        info!(
            "directory: {} other servers registered (etcd revision {})",
            view.keys().filter(|k| view[*k] != me).count(),
            listing.revision
        );
        let mut stream = match etcd.watch(servers, listing.revision + 1) {
            Ok(stream) => stream,
            Err(e) => {
                debug!("directory: watching the servers: {e}");
                thread::sleep(RETRY);
                continue;
            }
        };
        loop {
            match stream.changes() {
                Ok(events) => {
                    for event in events {
                        match event {
                            Event::Put(kv) => {
                                shared.revision.store(kv.mod_revision, Ordering::Relaxed);
                                if let Some(addr) = registered_addr(&kv) {
                                    view.insert(kv.key, addr);
                                }
                            }
                            Event::Delete { key, mod_revision } => {
                                shared.revision.store(mod_revision, Ordering::Relaxed);
                                if let Some(addr) = view.remove(&key) {
                                    info!("directory: server {addr} left");
                                }
                            }
                        }
                    }
                    publish(&view);
                }
                Err(e) => {
                    debug!("directory: the watch ended ({e}); listing again");
                    break;
                }
            }
        }
    }
}
