//! The rdma path's host device in the server (docs/rdma-transport.md): chosen at start
//! (`--rdma-device`), opened between Landlock and the system call filter (libibverbs reads
//! sysfs, opens `/dev/infiniband` and loads its provider then), and watched: each GID the
//! guests bind is looked up in the host device's GID table, because the path can carry a
//! guest's traffic only where the host device holds the guest's GID (a host interface
//! carries its address).
//!
//! The GIDs the device holds are published to the fabric, and the TCP transport tells its
//! peers which of this server's GIDs the rdma path reaches.
//!
//! The devices drive the host device through a [`Carrier`] (host QPs and registrations
//! behind their guest QPs and MRs), and one thread ([`serve_completions`]) takes the host
//! completions and writes them into the guests' CQs.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};
use pvrdma_backend::rdma::carrier::Carrier;
use pvrdma_backend::rdma::host::HostDevice;
use pvrdma_backend::rdma::{HostDevice as ListedDevice, LinkLayer, Verbs, devices};

use super::fabric::Fabric;

type Gid = [u8; 16];

/// `--rdma-device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The first device with an active port, if libibverbs is there and lists one.
    Auto,
    /// Never load libibverbs.
    Off,
    /// This device, or the server does not start.
    Named(String),
}

impl std::str::FromStr for Choice {
    type Err = String;

    fn from_str(s: &str) -> Result<Choice, String> {
        match s {
            "" => Err("an RDMA device name, auto or off".into()),
            "auto" => Ok(Choice::Auto),
            "off" => Ok(Choice::Off),
            name => Ok(Choice::Named(name.to_string())),
        }
    }
}

/// The open device and the port the path uses.
#[derive(Debug)]
pub struct RdmaPath {
    device: Arc<HostDevice>,
    port: u8,
}

/// How often the guests' GIDs are looked up in the host device's table.
const WATCH_EVERY: Duration = Duration::from_millis(200);

impl RdmaPath {
    /// Opens the device `choice` names. `Ok(None)`: no rdma path, and the log says why.
    /// `Err`: a device was named and cannot be used.
    pub fn open(choice: &Choice) -> Result<Option<RdmaPath>, String> {
        let named = match choice {
            Choice::Off => {
                info!("rdma path off (--rdma-device off)");
                return Ok(None);
            }
            Choice::Auto => None,
            Choice::Named(name) => Some(name.as_str()),
        };
        // A named device must work; auto gives up quietly when the host has no RDMA.
        let give_up = |reason: String| match named {
            Some(name) => Err(format!("--rdma-device {name}: {reason}")),
            None => {
                info!("rdma path off: {reason}");
                Ok(None)
            }
        };
        let verbs = match Verbs::load() {
            Ok(verbs) => Arc::new(verbs),
            Err(e) => return give_up(e.to_string()),
        };
        let listed = match devices::list(&verbs) {
            Ok(listed) => listed,
            Err(e) => return give_up(e.to_string()),
        };
        let names = || {
            let all: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
            if all.is_empty() {
                "it has none".to_string()
            } else {
                format!("it has {}", all.join(", "))
            }
        };
        let chosen = match named {
            Some(name) => match listed.iter().find(|d| d.name == name) {
                Some(device) => device,
                None => {
                    return give_up(format!(
                        "no RDMA device of this host is called {name}; {}",
                        names()
                    ));
                }
            },
            None => match listed.iter().find(|d| d.ports.iter().any(|p| p.active)) {
                Some(device) => device,
                None => {
                    return give_up(format!("no RDMA device with an active port ({})", names()));
                }
            },
        };
        let Some(port) = chosen.ports.iter().find(|p| p.active) else {
            return give_up(format!("{} has no active port", chosen.name));
        };
        let device = match HostDevice::open(verbs, &chosen.name) {
            Ok(device) => device,
            Err(e) => return give_up(format!("{}: {e}", chosen.name)),
        };
        info!("rdma path: {}", describe(chosen, port.number));
        Ok(Some(RdmaPath {
            device,
            port: port.number,
        }))
    }

    /// The host device as the devices of `fabric` drive it. A destination takes the rdma
    /// path when it is not a guest of this server (memcpy serves those) and a peer server
    /// said its RDMA device holds it.
    pub fn carrier(&self, fabric: &Fabric) -> Arc<Carrier> {
        let fabric = fabric.clone();
        let route = Box::new(move |dgid: &Gid| {
            let addr = Ipv6Addr::from(*dgid);
            if fabric.holds(dgid) {
                Err(format!("{addr} is a guest of this server (memcpy)"))
            } else if fabric.peer_rdma_reachable(dgid) {
                Ok(())
            } else {
                Err(format!(
                    "no peer server said its RDMA device holds {addr} (TCP carries it)"
                ))
            }
        });
        Arc::new(Carrier::new(Arc::clone(&self.device), self.port, route))
    }

    /// Where each of `gids` is in the host device's GID table, if it is.
    fn look_up(&self, gids: &[Gid]) -> Result<Vec<(Gid, Option<u32>)>, String> {
        let table = self.device.gids(self.port).map_err(|e| e.to_string())?;
        Ok(gids
            .iter()
            .map(|gid| (*gid, table.iter().find(|e| e.gid == *gid).map(|e| e.index)))
            .collect())
    }
}

fn describe(device: &ListedDevice, port: u8) -> String {
    let link = device
        .ports
        .iter()
        .find(|p| p.number == port)
        .map(|p| match p.link_layer {
            LinkLayer::Ethernet => format!("Ethernet (RoCE), MTU {}", p.active_mtu),
            LinkLayer::InfiniBand => format!("InfiniBand, MTU {}", p.active_mtu),
            LinkLayer::Unknown(n) => format!("link layer {n}"),
        })
        .unwrap_or_default();
    format!("{} port {port}, {link}", device.name)
}

/// Looks the guests' GIDs up in the host device's table every [`WATCH_EVERY`] and logs each
/// GID's standing when it appears or changes; never returns.
pub fn watch(path: RdmaPath, fabric: Fabric) -> ! {
    let name = path.device.name().to_string();
    let mut known: HashMap<Gid, Option<u32>> = HashMap::new();
    let mut failing = false;
    loop {
        let gids = fabric.local_gids();
        match path.look_up(&gids) {
            Ok(found) => {
                failing = false;
                // Peers hear of these through the TCP transport's GID announcements.
                fabric.set_rdma_gids(
                    found
                        .iter()
                        .filter(|(_, index)| index.is_some())
                        .map(|(gid, _)| *gid)
                        .collect(),
                );
                known.retain(|gid, _| gids.contains(gid));
                for (gid, index) in found {
                    if known.get(&gid) == Some(&index) {
                        continue;
                    }
                    known.insert(gid, index);
                    let addr = Ipv6Addr::from(gid);
                    match index {
                        Some(index) => info!(
                            "rdma path: guest GID {addr} is in {name}'s GID table (index {index})"
                        ),
                        None => info!(
                            "rdma path: guest GID {addr} is not in {name}'s GID table: the \
                             rdma path needs a host interface of {name} to carry that address"
                        ),
                    }
                }
            }
            Err(e) if !failing => {
                failing = true;
                warn!("rdma path: cannot read {name}'s GID table: {e}");
            }
            Err(_) => {}
        }
        thread::sleep(WATCH_EVERY);
    }
}

/// How long the completion thread waits on the channel before looking again.
const COMPLETIONS_WAIT: Duration = Duration::from_millis(200);

/// Takes the host completions of every QP the host device carries and hands each to the
/// device that owns it; never returns.
pub fn serve_completions(carrier: Arc<Carrier>, fabric: Fabric) -> ! {
    let mut taken = Vec::new();
    loop {
        taken.clear();
        carrier.wait(COMPLETIONS_WAIT, &mut taken);
        for completion in &taken {
            fabric.complete_host(completion);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_takes_auto_off_or_a_name() {
        assert_eq!("auto".parse::<Choice>(), Ok(Choice::Auto));
        assert_eq!("off".parse::<Choice>(), Ok(Choice::Off));
        assert_eq!("rxe0".parse::<Choice>(), Ok(Choice::Named("rxe0".into())));
        assert!("".parse::<Choice>().is_err());
    }

    #[test]
    fn auto_without_a_device_is_off_and_a_missing_named_device_is_an_error() {
        assert!(matches!(RdmaPath::open(&Choice::Off), Ok(None)));
        let error = RdmaPath::open(&Choice::Named("no-such-rdma-device".into())).unwrap_err();
        assert!(
            error.starts_with("--rdma-device no-such-rdma-device: "),
            "{error}"
        );
        // Where the host has no active RDMA port (these build machines), auto is off.
        let has_rdma = Verbs::load()
            .ok()
            .and_then(|verbs| devices::list(&verbs).ok())
            .is_some_and(|found| found.iter().any(|d| d.ports.iter().any(|p| p.active)));
        if !has_rdma {
            assert!(matches!(RdmaPath::open(&Choice::Auto), Ok(None)));
        }
    }
}
