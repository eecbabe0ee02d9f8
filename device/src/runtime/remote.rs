//! The process's fabric as the TCP transport's host: the transport runs peers' requests on
//! local devices and hands them the answers to theirs.

use pvrdma_backend::tcp::runtime::Host;
use pvrdma_backend::{Completion, Gid, Outcome, RemoteError, Request};

use super::fabric::Fabric;

pub struct FabricHost(pub Fabric);

impl Host for FabricHost {
    fn local_gids(&self) -> Vec<Gid> {
        self.0.local_gids()
    }

    fn local_rdma_gids(&self) -> Vec<Gid> {
        self.0.rdma_gids()
    }

    fn respond(&self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        self.0.respond_remote(request)
    }

    fn complete(&self, gid: &Gid, completion: &Completion<'_>) {
        self.0.complete_remote(gid, completion);
    }
}
