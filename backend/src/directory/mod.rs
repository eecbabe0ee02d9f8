//! Where a server learns which other servers hold which GIDs. A static `--peer` list is
//! the embedded default: the TCP transport keeps a link to each, and the servers tell each
//! other their guests' GIDs over the links. [`membership`] keeps the cluster in etcd for
//! sites with many hosts: each server registers itself and every GID its guests add under
//! a lease, a GID belongs to the server that registered it first, and the transport dials
//! a server only when a QP sends to one of its GIDs.
//!
//! [`etcd`] is the small etcd v3 client the membership uses.
pub mod etcd;
pub mod membership;
mod view;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::Gid;

/// The server a directory says holds a GID: its transport's id (as its handshake names it)
/// and the address it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub server: u64,
    pub addr: SocketAddr,
}

/// Which server holds each GID the directory knows, as of `version` (which changes
/// whenever the maps do, so a reader copies them only then).
#[derive(Debug, Clone, Default)]
pub struct GidHolders {
    pub version: u64,
    pub holders: Arc<HashMap<Gid, Holder>>,
    /// The GIDs whose holder's host RDMA device holds them too (the rdma path reaches them).
    pub rdma: Arc<HashSet<Gid>>,
}

/// What the TCP transport asks of a directory.
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// Servers to keep a link to whether or not a QP needs them.
    fn peers(&self) -> Vec<SocketAddr> {
        Vec::new()
    }

    /// This server's GIDs now, and which of them its host RDMA device holds (called
    /// whenever they may have changed); a directory that keeps GIDs registers them.
    fn publish_gids(&self, _gids: &[Gid], _rdma_gids: &[Gid]) {}

    /// Who holds which GID, if this directory keeps GIDs. A GID it names is routed to
    /// that server alone, whatever any peer announces; others as the peers announce them.
    fn gid_holders(&self) -> Option<GidHolders> {
        None
    }

    /// The address of the server whose transport has id `server`, to dial it on demand.
    fn address_of(&self, _server: u64) -> Option<SocketAddr> {
        None
    }
}

/// The `--peer` list: the same addresses for ever, and no word on GIDs.
#[derive(Debug, Clone, Default)]
pub struct StaticPeers(pub Vec<SocketAddr>);

impl Directory for StaticPeers {
    fn peers(&self) -> Vec<SocketAddr> {
        self.0.clone()
    }
}
