//! A host-side PVRDMA driver that plays the guest: the register traffic of the Linux
//! `vmw_pvrdma` probe, its command channel, and the ring handling of the kernel and of
//! rdma-core's provider (docs/device.md). Integration tests use it with
//! `mod driver;`.
//!
//! * [`bus`] — the transport: the [`Bus`] trait and the in-process implementation.
//! * [`fabric_bus`] — several in-process devices joined by the memcpy fabric.
//! * [`memory`] — guest RAM (memfd-backed), the page allocator, typed accessors.
//! * [`layout`] — page directories, paged buffers, ring layouts, index arithmetic.
//! * [`bringup`] — the probe sequence (device-abi §2.2) and removal.
//! * [`commands`] — one method per command (device-abi §5), returning the parsed response or ERR.
//! * [`queues`] — posting WQEs, doorbells, reading CQEs, async events, CQ notifications.
//! * [`verbs`] — composite operations as ib_core / rdma-core perform them (device-abi §11).

#![allow(
    dead_code,
    unused_imports,
    reason = "every test binary uses a different part of the driver"
)]

pub mod bringup;
pub mod bus;
pub mod commands;
pub mod fabric_bus;
pub mod layout;
pub mod memory;
pub mod queues;
pub mod socket_bus;
pub mod tcp_bus;
pub mod uar_bus;
pub mod verbs;

pub use bringup::{DeviceRing, DsrConfig, DsrImage, ProbeError};
pub use bus::{Bus, InProcessBus};
pub use commands::{CmdError, CommandRecord, QpCreated};
pub use layout::{QpOwner, QpSizes};
pub use queues::{Cq, Mr, Qp, Srq, Uc};

use vfio_user_pvrdma::abi::DeviceCaps;
use vfio_user_pvrdma::pvrdma::{DeviceConfig, GuestRam, PvrdmaDevice};

use memory::{GuestMemory, PageAllocator};

/// What a successful probe established.
#[derive(Debug, Clone)]
pub struct Session {
    /// The VERSION register.
    pub version: u32,
    pub caps: DeviceCaps,
    pub dsr: DsrImage,
    pub async_ring: DeviceRing,
    pub cq_notify: DeviceRing,
    /// The kernel's UAR index bitmap (index 0 is the kernel's own).
    pub uar_in_use: Vec<bool>,
}

pub struct Driver<B: Bus> {
    pub bus: B,
    /// The guest's page allocator.
    pub alloc: PageAllocator,
    /// The last DSR built (its slots are where commands go, loaded or not).
    pub dsr: Option<DsrImage>,
    pub session: Option<Session>,
    /// Every vector raised since the last [`Driver::take_irqs`], in order.
    irq_log: Vec<u16>,
    /// The last command executed.
    pub last: Option<CommandRecord>,
    next_cookie: u64,
    /// Byte written after each command's own struct up to the 184-byte slot, as the
    /// stale stack garbage the kernel leaves there.
    pub stale_fill: u8,
}

impl<B: Bus> Driver<B> {
    pub fn new(bus: B) -> Driver<B> {
        let memory = bus.memory();
        let alloc = PageAllocator::new(memory.base(), memory.end());
        Driver {
            bus,
            alloc,
            dsr: None,
            session: None,
            irq_log: Vec::new(),
            last: None,
            next_cookie: 0x5eed_0000_0000_0001,
            stale_fill: 0xcc,
        }
    }

    pub fn ram(&self) -> &GuestRam {
        self.bus.ram()
    }

    pub fn session(&self) -> &Session {
        self.session.as_ref().expect("the device was probed")
    }

    pub fn caps(&self) -> DeviceCaps {
        self.session().caps
    }

    /// Every vector raised since the last call.
    pub fn take_irqs(&mut self) -> Vec<u16> {
        let mut log = std::mem::take(&mut self.irq_log);
        log.extend(self.bus.interrupts());
        log
    }

    fn log_irqs(&mut self) -> Vec<u16> {
        let raised = self.bus.interrupts();
        self.irq_log.extend(&raised);
        raised
    }

    fn cookie(&mut self) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie = self
            .next_cookie
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1);
        cookie
    }
}

impl Driver<InProcessBus> {
    /// A device with default limits and 64 MiB of guest RAM above 4 GiB.
    pub fn in_process() -> Driver<InProcessBus> {
        Driver::in_process_with(DeviceConfig::default())
    }

    pub fn in_process_with(config: DeviceConfig) -> Driver<InProcessBus> {
        let memory = GuestMemory::new(memory::DEFAULT_BASE, memory::DEFAULT_SIZE);
        Driver::new(InProcessBus::new(config, memory))
    }

    /// A probed device (the driver's default DSR).
    pub fn probed() -> Driver<InProcessBus> {
        let mut driver = Driver::in_process();
        driver.probe();
        driver
    }

    pub fn device(&self) -> &PvrdmaDevice {
        self.bus.device()
    }

    pub fn device_mut(&mut self) -> &mut PvrdmaDevice {
        self.bus.device_mut()
    }
}
