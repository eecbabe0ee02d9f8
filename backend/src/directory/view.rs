//! One server's view of the directory in etcd: the servers registered under
//! `PREFIX/servers/ADDR` and the server holding each GID under `PREFIX/gids/GID`, kept from a
//! listing of the prefix and the watch events after it. Records are JSON written by other
//! servers: anything that does not parse is ignored (and so routes nowhere), never trusted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde_json::{Value, json};

use super::etcd::KeyValue;
use super::{GidHolders, Holder};
use crate::Gid;

/// The key prefixes of the two kinds of records.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub servers: String,
    pub gids: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            servers: format!("{prefix}servers/"),
            gids: format!("{prefix}gids/"),
        }
    }

    /// The key of the server listening on `addr`.
    pub fn server(&self, addr: SocketAddr) -> Vec<u8> {
        format!("{}{addr}", self.servers).into_bytes()
    }

    /// The key of `gid` (its IPv6 text, as `ip addr` and the guest's tools print GIDs).
    pub fn gid(&self, gid: &Gid) -> Vec<u8> {
        format!("{}{}", self.gids, Ipv6Addr::from(*gid)).into_bytes()
    }

    /// The GID a key under the GID prefix names.
    fn gid_of(&self, key: &[u8]) -> Option<Gid> {
        let text = std::str::from_utf8(key).ok()?.strip_prefix(&self.gids)?;
        Some(text.parse::<Ipv6Addr>().ok()?.octets())
    }
}

/// This server's record at its server key.
pub(super) fn server_record(me: Holder, rdma: bool) -> Vec<u8> {
    json!({
        "addr": me.addr.to_string(),
        "id": format!("{:016x}", me.server),
        "tcp": true,
        "rdma": rdma,
    })
    .to_string()
    .into_bytes()
}

/// The record at the key of a GID this server holds; `rdma`: its host RDMA device holds
/// the GID too.
pub(super) fn gid_record(me: Holder, rdma: bool) -> Vec<u8> {
    json!({ "addr": me.addr.to_string(), "id": format!("{:016x}", me.server), "rdma": rdma })
        .to_string()
        .into_bytes()
}

/// Whether a GID record says the holder's RDMA device holds the GID.
pub(super) fn rdma_of(value: &[u8]) -> bool {
    serde_json::from_slice::<Value>(value)
        .ok()
        .and_then(|record| record.get("rdma")?.as_bool())
        .unwrap_or(false)
}

/// The holder a server or GID record names, if it is well formed.
pub(super) fn holder_of(value: &[u8]) -> Option<Holder> {
    let record: Value = serde_json::from_slice(value).ok()?;
    Some(Holder {
        addr: record.get("addr")?.as_str()?.parse().ok()?,
        server: u64::from_str_radix(record.get("id")?.as_str()?, 16).ok()?,
    })
}

/// What a change did, for the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    ServerLeft(SocketAddr),
    Other,
}

#[derive(Debug)]
pub(super) struct View {
    keys: Keys,
    /// This server: a GID registered at its address by an earlier run of it (a transport id
    /// of before a restart, whose lease has not ended yet) is taken for its own.
    me: Holder,
    servers: BTreeMap<Vec<u8>, Holder>,
    gids: HashMap<Gid, Holder>,
    /// The GIDs of `gids` whose holder's RDMA device holds them.
    rdma: HashSet<Gid>,
    /// Bumped whenever `gids` or `rdma` changes.
    version: u64,
    /// Both as last handed out, while `version` has not moved.
    snapshot: Option<GidHolders>,
}

impl View {
    pub fn new(keys: Keys, me: Holder) -> View {
        View {
            keys,
            me,
            servers: BTreeMap::new(),
            gids: HashMap::new(),
            rdma: HashSet::new(),
            version: 0,
            snapshot: None,
        }
    }

    /// Starts over from a listing of the whole prefix.
    pub fn reset(&mut self, kvs: &[KeyValue]) {
        self.servers.clear();
        self.gids.clear();
        self.rdma.clear();
        for kv in kvs {
            self.put(kv);
        }
        self.version += 1;
    }

    /// A key was created or changed.
    pub fn put(&mut self, kv: &KeyValue) -> Change {
        if let Some(gid) = self.keys.gid_of(&kv.key) {
            match holder_of(&kv.value) {
                // Two live servers cannot listen on one address: this one is the earlier.
                Some(holder) if holder.addr == self.me.addr => self.gids.insert(gid, self.me),
                Some(holder) => self.gids.insert(gid, holder),
                None => self.gids.remove(&gid),
            };
            if self.gids.contains_key(&gid) && rdma_of(&kv.value) {
                self.rdma.insert(gid);
            } else {
                self.rdma.remove(&gid);
            }
            self.version += 1;
        } else if kv.key.starts_with(self.keys.servers.as_bytes()) {
            match holder_of(&kv.value) {
                Some(holder) => self.servers.insert(kv.key.clone(), holder),
                None => self.servers.remove(&kv.key),
            };
        }
        Change::Other
    }

    /// A key was deleted (or its lease ended).
    pub fn delete(&mut self, key: &[u8]) -> Change {
        if let Some(gid) = self.keys.gid_of(key) {
            self.rdma.remove(&gid);
            if self.gids.remove(&gid).is_some() {
                self.version += 1;
            }
            return Change::Other;
        }
        match self.servers.remove(key) {
            Some(holder) => Change::ServerLeft(holder.addr),
            None => Change::Other,
        }
    }

    /// The servers registered, but `me`.
    pub fn servers(&self, me: u64) -> Vec<Holder> {
        self.servers
            .values()
            .filter(|h| h.server != me)
            .copied()
            .collect()
    }

    pub fn address_of(&self, server: u64) -> Option<SocketAddr> {
        self.servers
            .values()
            .find(|h| h.server == server)
            .map(|h| h.addr)
    }

    pub fn gid_count(&self) -> usize {
        self.gids.len()
    }

    /// Who holds each GID, copied only when it changed since the last call.
    pub fn holders(&mut self) -> GidHolders {
        match &self.snapshot {
            Some(snapshot) if snapshot.version == self.version => snapshot.clone(),
            _ => {
                let snapshot = GidHolders {
                    version: self.version,
                    holders: Arc::new(self.gids.clone()),
                    rdma: Arc::new(self.rdma.clone()),
                };
                self.snapshot = Some(snapshot.clone());
                snapshot
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            mod_revision: 1,
            lease: 0,
        }
    }

    fn holder(id: u64, addr: &str) -> Holder {
        Holder {
            server: id,
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn servers_and_gids_are_read_from_their_records_and_garbage_is_ignored() {
        let keys = Keys::new("/lab/");
        let a = holder(0xa, "10.0.0.1:4791");
        let b = holder(0xb, "10.0.0.2:4791");
        let gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            String::from_utf8(keys.gid(&gid)).unwrap(),
            "/lab/gids/fe80::1"
        );
        let me = holder(0xa, "10.0.0.1:4791");
        let mut view = View::new(keys.clone(), me);
        view.reset(&[
            kv("/lab/servers/10.0.0.1:4791", &server_record(a, false)),
            kv("/lab/servers/10.0.0.2:4791", &server_record(b, true)),
            kv("/lab/servers/junk", b"{not json"),
            kv("/lab/gids/fe80::1", &gid_record(b, true)),
            kv("/lab/gids/not-a-gid", &gid_record(b, false)),
            kv(
                "/lab/gids/fe80::2",
                br#"{"addr":"10.0.0.2:4791","id":"zz"}"#,
            ),
        ]);
        assert_eq!(view.servers(0xa), [b]);
        // A GID an earlier run of this server registered (another id, the same address).
        view.put(&kv(
            "/lab/gids/fe80::3",
            &gid_record(holder(0x1234, "10.0.0.1:4791"), false),
        ));
        let mut three = gid;
        three[15] = 3;
        assert_eq!(view.holders().holders.get(&three), Some(&me));
        view.delete(&keys.gid(&three));
        assert_eq!(view.address_of(0xb), Some(b.addr));
        assert_eq!(view.holders().holders.get(&gid).copied(), Some(b));
        assert_eq!(view.gid_count(), 1);

        assert!(
            view.holders().rdma.contains(&gid),
            "B's RDMA device holds it"
        );
        let (first, second) = (view.holders(), view.holders());
        let v1 = first.version;
        assert!(
            v1 == second.version && Arc::ptr_eq(&first.holders, &second.holders),
            "copied once per change"
        );
        assert_eq!(view.delete(&keys.gid(&gid)), Change::Other);
        assert_eq!(view.holders().holders.get(&gid).copied(), None);
        assert!(view.holders().version > v1);
        assert!(!view.holders().rdma.contains(&gid));
        assert_eq!(
            view.delete(b"/lab/servers/10.0.0.2:4791"),
            Change::ServerLeft(b.addr)
        );
        assert_eq!(view.address_of(0xb), None);
        // A record rewritten as garbage no longer routes anywhere.
        view.put(&kv("/lab/gids/fe80::1", &gid_record(a, false)));
        assert_eq!(view.holders().holders.get(&gid).copied(), Some(a));
        view.put(&kv("/lab/gids/fe80::1", b"[]"));
        assert_eq!(view.holders().holders.get(&gid).copied(), None);
    }
}
