//! The memcpy fabric: the devices served by one process, joined like ports of one switch.
//! A request to a peer in the fabric is executed by the peer's own responder, which copies
//! straight between the two guests' memories (see [`crate::copy`]).
//!
//! The fabric owns its endpoints. While one endpoint works (a doorbell, a command), it is
//! taken out of the fabric and the others are reachable through a [`Network`]; a device that
//! sends to itself (loopback) answers its own requests without the network.

use super::{Delivery, Gid, Network, RemoteError, Request, Responder};

/// Where requests for GIDs no endpoint of the fabric holds go: the transports to other
/// hosts (TCP), chained behind the fabric.
pub type Remote = Box<dyn Network + Send>;

pub struct MemcpyFabric<E> {
    /// Boxed, so that taking one out for work moves a pointer, not the endpoint (a device
    /// is several hundred bytes, and the exit-free poller takes each one on every poll).
    endpoints: Vec<Option<Box<E>>>,
    remote: Option<Remote>,
}

impl<E> Default for MemcpyFabric<E> {
    fn default() -> Self {
        MemcpyFabric {
            endpoints: Vec::new(),
            remote: None,
        }
    }
}

impl<E: Responder> MemcpyFabric<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an endpoint; returns its index.
    pub fn add(&mut self, endpoint: E) -> usize {
        self.endpoints.push(Some(Box::new(endpoint)));
        self.endpoints.len() - 1
    }

    /// Sends requests for GIDs outside the fabric to `remote` (none: they are unreachable).
    pub fn set_remote(&mut self, remote: Remote) {
        self.remote = Some(remote);
    }

    /// Whether the remote transport knows a peer that holds `gid`.
    pub fn remote_holds(&self, gid: &Gid) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|remote| remote.gid_taken(gid))
    }

    /// The endpoint that holds `gid`, if exactly one does.
    pub fn find(&self, gid: &Gid) -> Option<usize> {
        let mut holders = self
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, endpoint)| endpoint.as_ref().is_some_and(|e| e.has_gid(gid)));
        let (index, _) = holders.next()?;
        holders.next().is_none().then_some(index)
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Runs `work` on endpoint `index` with the rest of the fabric as its network. `None` if
    /// there is no such endpoint.
    pub fn with_endpoint<R>(
        &mut self,
        index: usize,
        work: impl FnOnce(&mut E, &mut dyn Network) -> R,
    ) -> Option<R> {
        let mut endpoint = self.endpoints.get_mut(index)?.take()?;
        let result = work(
            &mut endpoint,
            &mut Peers {
                endpoints: &mut self.endpoints,
                remote: self.remote.as_mut(),
            },
        );
        self.endpoints[index] = Some(endpoint);
        Some(result)
    }

    /// Every endpoint index, for work that visits them all (resuming stalled senders).
    pub fn indices(&self) -> std::ops::Range<usize> {
        0..self.endpoints.len()
    }
}

/// The endpoints other than the one at work, then the transports to other hosts.
struct Peers<'f, E> {
    endpoints: &'f mut [Option<Box<E>>],
    remote: Option<&'f mut Remote>,
}

impl<E: Responder> Network for Peers<'_, E> {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery {
        let gid = &request.destination.gid;
        let mut holders = self
            .endpoints
            .iter_mut()
            .flatten()
            .filter(|endpoint| endpoint.has_gid(gid));
        let Some(peer) = holders.next() else {
            // Not in this process: another host's, if a transport knows it.
            return match self.remote.as_mut() {
                Some(remote) => remote.deliver(request),
                None => Delivery::Done(Err(RemoteError::Unreachable)),
            };
        };
        // Binding refuses a GID another port holds (`gid_taken`), so two holders cannot
        // arise; if they ever did, neither gets the traffic rather than the wrong one.
        if holders.next().is_some() {
            return Delivery::Done(Err(RemoteError::Unreachable));
        }
        Delivery::Done(peer.respond(request))
    }

    fn gid_taken(&self, gid: &Gid) -> bool {
        self.endpoints
            .iter()
            .flatten()
            .any(|endpoint| endpoint.has_gid(gid))
            || self
                .remote
                .as_ref()
                .is_some_and(|remote| remote.gid_taken(gid))
    }

    fn forget_qp(&self, gid: &Gid, qpn: u32) {
        if let Some(remote) = &self.remote {
            remote.forget_qp(gid, qpn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Destination, GuestMemory, Operation, Outcome, RetryPolicy, Service, Sgl, Source};

    struct Port {
        gid: [u8; 16],
        answered: u32,
    }

    impl Responder for Port {
        fn has_gid(&self, gid: &[u8; 16]) -> bool {
            *gid == self.gid
        }

        fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
            self.answered += 1;
            Ok(Outcome {
                bytes: request.destination.qpn.into(),
            })
        }
    }

    /// An empty SEND from QP 2 of GID 1 to QP 7 at `gid`.
    fn send_to<'a>(
        gid: [u8; 16],
        service: Service,
        mem: &'a GuestMemory,
        payload: &'a Sgl,
    ) -> Request<'a> {
        Request {
            source: Source {
                gid: [1; 16],
                qpn: 2,
            },
            destination: Destination { gid, qpn: 7 },
            service,
            memory: mem,
            operation: Operation::Send {
                payload,
                imm: None,
                invalidate: None,
                solicited: false,
            },
            ticket: 0,
            epoch: 0,
            retry: RetryPolicy::default(),
        }
    }

    #[test]
    fn requests_reach_the_port_with_the_gid_and_nothing_else() {
        let mut fabric = MemcpyFabric::new();
        let a = fabric.add(Port {
            gid: [1; 16],
            answered: 0,
        });
        let b = fabric.add(Port {
            gid: [2; 16],
            answered: 0,
        });
        let mem = GuestMemory::default();
        let payload = Sgl::new();
        let request = |gid| send_to(gid, Service::Reliable, &mem, &payload);
        let to_b = fabric
            .with_endpoint(a, |_, net| net.deliver(&request([2; 16])))
            .unwrap();
        assert_eq!(to_b, Delivery::Done(Ok(Outcome { bytes: 7 })));
        // The working endpoint is not its own peer; unknown GIDs are unreachable.
        let to_a = fabric
            .with_endpoint(a, |_, net| net.deliver(&request([1; 16])))
            .unwrap();
        assert_eq!(to_a, Delivery::Done(Err(RemoteError::Unreachable)));
        let answered_b = fabric.with_endpoint(b, |port, _| port.answered).unwrap();
        assert_eq!(answered_b, 1);
        assert!(fabric.with_endpoint(9, |_, _| ()).is_none());
    }

    #[test]
    fn a_gid_held_twice_reaches_neither_holder_and_is_reported_taken() {
        let mut fabric = MemcpyFabric::new();
        let sender = fabric.add(Port {
            gid: [1; 16],
            answered: 0,
        });
        let holders = [[2; 16], [2; 16]].map(|gid| fabric.add(Port { gid, answered: 0 }));
        let mem = GuestMemory::default();
        let payload = Sgl::new();
        let request = send_to([2; 16], Service::Datagram { qkey: 1 }, &mem, &payload);
        let sent = fabric
            .with_endpoint(sender, |_, net| {
                (
                    net.gid_taken(&[2; 16]),
                    net.gid_taken(&[1; 16]),
                    net.deliver(&request),
                )
            })
            .unwrap();
        // The sender's own GID is not "taken" from its point of view: it holds it itself.
        assert_eq!(
            sent,
            (true, false, Delivery::Done(Err(RemoteError::Unreachable)))
        );
        for holder in holders {
            assert_eq!(
                fabric.with_endpoint(holder, |port, _| port.answered),
                Some(0)
            );
        }
    }
}
