//! Where a server learns which other servers to link to. A static `--peer` list is the
//! embedded default; [`membership`] finds them in etcd, where each server registers itself
//! under a lease, for sites with many hosts. Either way the TCP transport dials the
//! addresses, and the servers then tell each other their guests' GIDs over the links.
//!
//! [`etcd`] is the small etcd v3 client the membership uses.
pub mod etcd;
pub mod membership;

use std::net::SocketAddr;

/// A source of peer servers' addresses, read by the TCP transport before it dials.
pub trait PeerSource: Send + Sync + std::fmt::Debug {
    /// The addresses of the other servers now.
    fn peers(&self) -> Vec<SocketAddr>;
}

/// The `--peer` list: the same addresses for ever.
#[derive(Debug, Clone, Default)]
pub struct StaticPeers(pub Vec<SocketAddr>);

impl PeerSource for StaticPeers {
    fn peers(&self) -> Vec<SocketAddr> {
        self.0.clone()
    }
}
