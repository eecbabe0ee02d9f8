//! Several in-process devices joined by the memcpy fabric, the way the server joins the
//! devices of one process (`runtime::fabric`): each device has its own guest RAM and its own
//! interrupt log, and a doorbell on one device may execute requests on another (carried
//! through the other's inbox before the access returns). Each device is driven by its own
//! [`Driver`] over a [`FabricBus`].

use std::rc::Rc;

use pvrdma_backend::memcpy::MemcpyFabric;
use pvrdma_backend::{Completion, Gid, Network, Outcome, RemoteError, Request, Responder};
use vfio_user_pvrdma::pvrdma::{DeviceConfig, GuestRam, Interrupts, PvrdmaDevice};

use super::Driver;
use super::bus::{BAR_REGS, BAR_UAR, Bus};
use super::memory::GuestMemory;

/// Vectors raised by one device, in order.
#[derive(Debug, Default)]
pub struct IrqLog(pub Vec<u16>);

impl Interrupts for IrqLog {
    fn raise(&mut self, vector: u16) {
        self.0.push(vector);
    }
}

/// One device of the fabric: the model, the RAM it reaches, its interrupts.
pub struct Endpoint {
    pub device: PvrdmaDevice,
    pub ram: GuestRam,
    pub irqs: IrqLog,
}

impl Responder for Endpoint {
    fn has_gid(&self, gid: &[u8; 16]) -> bool {
        self.device.has_gid(gid)
    }

    fn respond(&mut self, request: &Request<'_>) -> Result<Outcome, RemoteError> {
        self.device.respond(&self.ram, &mut self.irqs, request)
    }
}

impl pvrdma_backend::memcpy::Endpoint for Endpoint {
    fn complete(&mut self, completion: &Completion<'_>, net: &mut dyn Network) {
        self.device
            .complete_remote(&self.ram, &mut self.irqs, net, completion);
    }

    fn receiver_not_ready(&mut self, qpn: u32) {
        self.device.note_receiver_not_ready(qpn);
    }

    fn wake_events(&self) -> u64 {
        self.device.wake_events()
    }

    fn resume_stalled(&mut self, net: &mut dyn Network) {
        if self.device.has_stalled_work() {
            self.device.resume_stalled(&self.ram, &mut self.irqs, net);
        }
    }

    fn gids(&self) -> Vec<Gid> {
        self.device.gids().collect()
    }

    fn same_gids(&self, gids: &[Gid]) -> bool {
        self.device.gids().eq(gids.iter().copied())
    }
}

pub type SharedFabric = Rc<MemcpyFabric<Endpoint>>;

/// The bus of one fabric device.
pub struct FabricBus {
    fabric: SharedFabric,
    index: usize,
    memory: GuestMemory,
}

impl FabricBus {
    /// Runs `work` on this bus's endpoint with the rest of the fabric as its network.
    fn with_endpoint<R>(
        &self,
        work: impl FnOnce(&mut Endpoint, &mut dyn pvrdma_backend::Network) -> R,
    ) -> R {
        self.fabric
            .with_endpoint(self.index, work)
            .expect("the endpoint is in the fabric")
    }

    pub fn index(&self) -> usize {
        self.index
    }
}

impl Bus for FabricBus {
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
                        .write_doorbell(&e.ram, &mut e.irqs, net, offset, value)
                });
            }
            _ => {}
        }
    }

    fn interrupts(&mut self) -> Vec<u16> {
        self.with_endpoint(|e, _| std::mem::take(&mut e.irqs.0))
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

/// `count` devices with default limits in one fabric, each with `ram_size` bytes of its own
/// RAM at the same guest-physical base (different guests may well use the same addresses).
pub fn fabric(count: usize, ram_size: u64) -> Vec<Driver<FabricBus>> {
    let shared: SharedFabric = Rc::new(MemcpyFabric::new());
    (0..count)
        .map(|_| {
            let memory = GuestMemory::new(super::memory::DEFAULT_BASE, ram_size);
            let index = shared.add(Endpoint {
                device: PvrdmaDevice::new(DeviceConfig::default()),
                ram: memory.ram().clone(),
                irqs: IrqLog::default(),
            });
            Driver::new(FabricBus {
                fabric: Rc::clone(&shared),
                index,
                memory,
            })
        })
        .collect()
}

impl Driver<FabricBus> {
    /// Runs `f` on this driver's device model.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut PvrdmaDevice) -> R) -> R {
        self.bus.with_endpoint(|e, _| f(&mut e.device))
    }

    /// The fabric this driver's device is part of (to give it a host RDMA device).
    pub fn shared_fabric(&self) -> &SharedFabric {
        &self.bus.fabric
    }

    /// A completion of a host QP for this driver's device, as the server's completion
    /// thread hands it over.
    pub fn complete_host(&self, qpn: u32, event: &pvrdma_backend::HostEvent) {
        self.bus
            .with_endpoint(|e, net| e.device.complete_host(&e.ram, &mut e.irqs, net, qpn, event));
    }
}
