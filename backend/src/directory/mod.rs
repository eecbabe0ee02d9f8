//! Where a server learns which servers hold which guests' GIDs. Today the TCP transport's
//! peers announce their GIDs over their links (a static `--peer` list); `etcd` is the client
//! for the cluster directory kept in etcd, which the servers of a large site register in.
pub mod etcd;
