//! Two in-process devices on two "hosts" joined by the TCP transport's protocol: each host
//! is a memcpy fabric of one device whose remote network is a TCP node, and the two nodes
//! exchange their byte streams in memory. After every register or doorbell access the bus
//! pumps the streams until nothing moves (running the peer's requests and handing back the
//! answers, as the transport's thread does), so the datapath suite can run unchanged over
//! TCP and must see the same completions as over the memcpy fabric. Time is a fake clock
//! that the pump advances while only timers are left (receiver-not-ready retries).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pvrdma_backend::memcpy::MemcpyFabric;
use pvrdma_backend::tcp::execute::Staging;
use pvrdma_backend::tcp::wire::Decoder;
use pvrdma_backend::tcp::{Event, Node};
use pvrdma_backend::{Completion, Delivery, Gid, Network, Request};
use vfio_user_pvrdma::pvrdma::{DeviceConfig, PvrdmaDevice};

use super::Driver;
use super::bus::{BAR_REGS, BAR_UAR, Bus};
use super::fabric_bus::{Endpoint, IrqLog};
use super::memory::GuestMemory;

type Clock = Arc<Mutex<Instant>>;

/// A host's remote network: its node, at the fake clock's time.
struct NodeNet {
    node: Arc<Mutex<Node>>,
    clock: Clock,
}

impl Network for NodeNet {
    fn deliver(&mut self, request: &Request<'_>) -> Delivery {
        let now = *self.clock.lock().unwrap();
        self.node.lock().unwrap().deliver(request, now)
    }

    fn gid_taken(&self, gid: &Gid) -> bool {
        self.node.lock().unwrap().gid_taken(gid)
    }

    fn forget_qp(&self, gid: &Gid, qpn: u32) {
        self.node.lock().unwrap().forget_qp(*gid, qpn);
    }
}

struct Host {
    fabric: MemcpyFabric<Endpoint>,
    node: Arc<Mutex<Node>>,
    /// Bytes from the other host, reassembled into frames.
    decoder: Decoder,
}

/// Both hosts, the staging buffer, the clock.
pub struct World {
    hosts: [Host; 2],
    staging: Staging,
    clock: Clock,
}

/// Node ids of the two hosts.
const IDS: [u64; 2] = [0x1111, 0x2222];

impl World {
    /// Moves bytes and carries out events until nothing moves; while only timers are left,
    /// advances the clock (at most a fake second), so receiver-not-ready retries happen.
    fn pump(&mut self) {
        let mut idle_rounds = 0;
        for _ in 0..10_000 {
            self.announce_gids();
            let moved = self.transfer(0) | self.transfer(1);
            let worked = self.run_events(0) | self.run_events(1);
            if moved || worked {
                idle_rounds = 0;
                continue;
            }
            idle_rounds += 1;
            if idle_rounds > 1000 {
                if std::env::var_os("TCP_BUS_DEBUG").is_some() {
                    eprintln!("pump gave up: remote work {}", self.waiting());
                }
                return;
            }
            let now = {
                let mut clock = self.clock.lock().unwrap();
                *clock += Duration::from_millis(1);
                *clock
            };
            for host in &self.hosts {
                host.node.lock().unwrap().tick(now);
            }
            // A timer that resent something shows up as bytes to move next round.
            let pending = self
                .hosts
                .iter()
                .any(|h| !h.node.lock().unwrap().peers_with_output().is_empty());
            if !pending && idle_rounds > 1 && !self.waiting() {
                return;
            }
        }
    }

    /// Whether any device has work a transport still carries.
    fn waiting(&mut self) -> bool {
        self.hosts.iter_mut().any(|host| {
            host.fabric
                .with_endpoint(0, |e, _| e.device.has_remote_work())
                .unwrap_or(false)
        })
    }

    fn announce_gids(&mut self) {
        let now = *self.clock.lock().unwrap();
        for host in &mut self.hosts {
            let gids: Vec<Gid> = host
                .fabric
                .with_endpoint(0, |e, _| e.device.gids().collect())
                .unwrap_or_default();
            host.node.lock().unwrap().set_local_gids(gids, now);
        }
    }

    /// Moves everything host `from` queued for the other host.
    fn transfer(&mut self, from: usize) -> bool {
        let to = 1 - from;
        let now = *self.clock.lock().unwrap();
        let bytes = {
            let mut node = self.hosts[from].node.lock().unwrap();
            let out = node.outgoing(IDS[to]).to_vec();
            node.sent(IDS[to], out.len());
            out
        };
        if bytes.is_empty() {
            return false;
        }
        let host = &mut self.hosts[to];
        host.decoder.push(&bytes);
        while let Some(frame) = host.decoder.next_frame().expect("valid frames") {
            host.node.lock().unwrap().receive(IDS[from], frame, now);
        }
        true
    }

    /// Carries out host `at`'s events: peers' requests against its device, answers to its
    /// device's requests.
    fn run_events(&mut self, at: usize) -> bool {
        let mut worked = false;
        loop {
            let event = self.hosts[at].node.lock().unwrap().next_event();
            let Some(event) = event else {
                return worked;
            };
            worked = true;
            let host = &mut self.hosts[at];
            match event {
                Event::Execute {
                    peer,
                    request,
                    replay,
                } => {
                    let fabric = &mut host.fabric;
                    let (result, reply) = self.staging.execute(&request, |r| {
                        let Some(index) = fabric.find(&r.destination.gid) else {
                            return Err(pvrdma_backend::RemoteError::Unreachable);
                        };
                        fabric
                            .with_endpoint(index, |e, _| {
                                e.device.respond_to_remote_host(&e.ram, &mut e.irqs, r)
                            })
                            .unwrap_or(Err(pvrdma_backend::RemoteError::Unreachable))
                    });
                    host.node.lock().unwrap().answer(
                        peer,
                        &request,
                        replay,
                        result,
                        reply,
                        std::time::Instant::now(),
                    );
                }
                Event::Complete {
                    gid,
                    qpn,
                    ticket,
                    result,
                    reply,
                    reply_offset,
                    last,
                } => {
                    let Some(index) = host.fabric.find(&gid) else {
                        continue;
                    };
                    let completion = Completion {
                        qpn,
                        ticket,
                        result,
                        reply: &reply,
                        reply_offset,
                        last,
                    };
                    host.fabric.with_endpoint(index, |e, net| {
                        e.device
                            .complete_remote(&e.ram, &mut e.irqs, net, &completion)
                    });
                }
            }
        }
    }
}

pub type SharedWorld = Rc<RefCell<World>>;

/// The bus of one of the two hosts' devices.
pub struct TcpBus {
    world: SharedWorld,
    host: usize,
    memory: GuestMemory,
}

impl TcpBus {
    fn with_endpoint<R>(&self, work: impl FnOnce(&mut Endpoint, &mut dyn Network) -> R) -> R {
        self.world.borrow_mut().hosts[self.host]
            .fabric
            .with_endpoint(0, work)
            .expect("the host's device")
    }
}

impl Bus for TcpBus {
    fn read32(&mut self, bar: u32, offset: u64) -> u32 {
        match bar {
            BAR_REGS => self.with_endpoint(|e, _| e.device.read_register(offset)),
            _ => 0,
        }
    }

    fn write32(&mut self, bar: u32, offset: u64, value: u32) {
        match bar {
            BAR_REGS => self.with_endpoint(|e, net| {
                e.device
                    .write_register(&e.ram, &mut e.irqs, net, offset, value)
            }),
            BAR_UAR => {
                self.with_endpoint(|e, net| {
                    e.device
                        .write_doorbell(&e.ram, &mut e.irqs, net, offset, value);
                    if e.device.has_stalled_work() {
                        e.device.resume_stalled(&e.ram, &mut e.irqs, net);
                    }
                });
            }
            _ => {}
        }
        self.world.borrow_mut().pump();
    }

    fn interrupts(&mut self) -> Vec<u16> {
        self.with_endpoint(|e, _| std::mem::take(&mut e.irqs.0))
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn crosses_hosts(&self) -> bool {
        true
    }
}

/// Two devices with `ram_size` bytes of RAM each, on two hosts joined by TCP.
pub fn pair(ram_size: u64) -> Vec<Driver<TcpBus>> {
    let clock: Clock = Arc::new(Mutex::new(Instant::now()));
    let now = *clock.lock().unwrap();
    let memories: Vec<GuestMemory> = (0..2)
        .map(|_| GuestMemory::new(super::memory::DEFAULT_BASE, ram_size))
        .collect();
    let hosts = [0, 1].map(|i| {
        let node = Arc::new(Mutex::new(Node::new(IDS[i])));
        node.lock().unwrap().link_up(IDS[1 - i], now);
        let fabric = MemcpyFabric::new();
        fabric.add(Endpoint {
            device: PvrdmaDevice::new(DeviceConfig::default()),
            ram: memories[i].ram().clone(),
            irqs: IrqLog::default(),
        });
        fabric.set_remote(Box::new(NodeNet {
            node: Arc::clone(&node),
            clock: Arc::clone(&clock),
        }));
        Host {
            fabric,
            node,
            decoder: Decoder::new(),
        }
    });
    let world = Rc::new(RefCell::new(World {
        hosts,
        staging: Staging::new().expect("the staging buffer"),
        clock,
    }));
    memories
        .into_iter()
        .enumerate()
        .map(|(host, memory)| {
            Driver::new(TcpBus {
                world: Rc::clone(&world),
                host,
                memory,
            })
        })
        .collect()
}
