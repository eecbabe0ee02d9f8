//! The transport between the driver and a device: 32-bit BAR accesses, the interrupts the
//! device raised, and the guest RAM both sides share.
//!
//! [`InProcessBus`] calls a [`PvrdmaDevice`] directly. [`super::socket_bus::SocketBus`] drives
//! the real server process over its socket (a `vfio_user::Client`, the RAM's memfd
//! DMA_MAP'ed, MSI-X eventfds handed over with SET_IRQS) through the same trait. Tests that
//! look inside the device model (`Driver::device()`) only exist for [`InProcessBus`].

use vfio_user_pvrdma::pvrdma::{DeviceConfig, GuestRam, Interrupts, PvrdmaDevice};

use super::memory::GuestMemory;

/// BAR indices (device-abi §1.2).
pub const BAR_MSIX: u32 = 0;
pub const BAR_REGS: u32 = 1;
pub const BAR_UAR: u32 = 2;

pub trait Bus {
    /// A 32-bit read of `bar` at `offset`.
    fn read32(&mut self, bar: u32, offset: u64) -> u32;
    /// A 32-bit write of `bar` at `offset`; whatever it triggers has finished on return.
    fn write32(&mut self, bar: u32, offset: u64, value: u32);
    /// MSI-X vectors raised since the last call, in order where the transport knows it (an
    /// eventfd-based transport reports each vector as often as its counter says, in vector
    /// order).
    fn interrupts(&mut self) -> Vec<u16>;
    /// The guest RAM's range and backing file (a socket transport DMA_MAPs the memfd).
    fn memory(&self) -> &GuestMemory;
    /// The guest RAM the device sees.
    fn ram(&self) -> &GuestRam {
        self.memory().ram()
    }
    /// Whether the devices this bus joins are on different hosts (requests travel through
    /// a transport between servers, with its retransmissions).
    fn crosses_hosts(&self) -> bool {
        false
    }
}

/// Records raised vectors in order.
#[derive(Debug, Default)]
pub struct RecordingInterrupts {
    raised: Vec<u16>,
}

impl Interrupts for RecordingInterrupts {
    fn raise(&mut self, vector: u16) {
        self.raised.push(vector);
    }
}

/// The device model in this process.
pub struct InProcessBus {
    device: PvrdmaDevice,
    memory: GuestMemory,
    irqs: RecordingInterrupts,
}

impl InProcessBus {
    pub fn new(config: DeviceConfig, memory: GuestMemory) -> InProcessBus {
        InProcessBus {
            device: PvrdmaDevice::new(config),
            memory,
            irqs: RecordingInterrupts::default(),
        }
    }

    pub fn device(&self) -> &PvrdmaDevice {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut PvrdmaDevice {
        &mut self.device
    }
}

impl Bus for InProcessBus {
    fn read32(&mut self, bar: u32, offset: u64) -> u32 {
        match bar {
            BAR_REGS => self.device.read_register(offset),
            // Doorbells are write-only; the device reads them as 0 (device-abi §7.1). The MSI-X table is
            // the client's business.
            _ => 0,
        }
    }

    fn write32(&mut self, bar: u32, offset: u64, value: u32) {
        let ram = self.memory.ram();
        match bar {
            BAR_REGS => self.device.write_register(
                ram,
                &mut self.irqs,
                &pvrdma_backend::Isolated,
                offset,
                value,
            ),
            BAR_UAR => self.device.write_doorbell(
                ram,
                &mut self.irqs,
                &mut pvrdma_backend::Isolated,
                offset,
                value,
            ),
            _ => {}
        }
    }

    fn interrupts(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.irqs.raised)
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}
