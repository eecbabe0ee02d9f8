//! The probe sequence of `pvrdma_pci_probe` (device-abi §2.2), step by step, and the removal path.

use vfio_user_pvrdma::abi::{self, DeviceCaps, Dsr, PAGE_SIZE, RingPages, regs};

use super::bus::{BAR_REGS, Bus};
use super::layout::{RingBuffer, RingIdx, RingLayout};
use super::memory;
use super::{Driver, Session};

/// The driver's own API version (`PVRDMA_VERSION`).
pub const DRIVER_VERSION: u32 = 20;
/// `gos_info` of a 64-bit Linux guest: bits = 2, type = 1, version = 1.
pub const GOS_INFO_LINUX_64: u32 = 2 | (1 << 2) | (1 << 6);
/// `PVRDMA_NUM_RING_PAGES`.
pub const NUM_RING_PAGES: u32 = 4;
/// Where the guest's BIOS put BAR2: UAR page 0 has this page frame number.
pub const DEFAULT_UAR_PFN: u64 = 0xfe000;

/// What the driver writes into the DSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsrConfig {
    pub driver_version: u32,
    pub gos_info: u32,
    pub async_ring_pages: u32,
    pub cq_ring_pages: u32,
    pub uar_pfn: u64,
}

impl Default for DsrConfig {
    fn default() -> Self {
        DsrConfig {
            driver_version: DRIVER_VERSION,
            gos_info: GOS_INFO_LINUX_64,
            async_ring_pages: NUM_RING_PAGES,
            cq_ring_pages: NUM_RING_PAGES,
            uar_pfn: DEFAULT_UAR_PFN,
        }
    }
}

/// The DSR and everything it points at, as built in guest memory.
#[derive(Debug, Clone)]
pub struct DsrImage {
    pub addr: u64,
    pub config: DsrConfig,
    pub cmd_slot: u64,
    pub resp_slot: u64,
    pub async_ring: RingBuffer,
    pub cq_ring: RingBuffer,
}

/// A device-produced ring (async events, CQ notifications) as the driver consumes it.
#[derive(Debug, Clone)]
pub struct DeviceRing {
    pub ring: RingBuffer,
    pub layout: RingLayout,
}

impl DeviceRing {
    /// The driver's sizing: `(num_pages - 1) * PAGE_SIZE / elem_size` elements.
    pub fn new(ring: RingBuffer, elem_size: u64) -> DeviceRing {
        let pages = ring.buf.pages.len() as u64;
        let max = ((pages.max(1) - 1) * PAGE_SIZE / elem_size).max(1) as u32;
        DeviceRing {
            ring,
            layout: RingLayout {
                state: abi::RING_STATE_RX,
                first: PAGE_SIZE,
                idx: RingIdx { max },
                stride: elem_size,
            },
        }
    }
}

/// Why a probe failed, with the driver's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeError {
    /// "driver needs RoCE v1 or v2 support"
    Unsupported { mode: u8, gid_types: u8 },
    /// "failed to allocate UAR table"
    UarTable(u32),
    /// "failed to activate device"
    Activate(u32),
}

/// `PVRDMA_SUPPORTED(dev)`.
pub fn caps_supported(caps: &DeviceCaps, dsr_version: u32) -> bool {
    caps.mode == abi::MODE_ROCE
        && ((dsr_version == 17 && caps.gid_types == abi::GID_TYPE_ROCE_V1)
            || (dsr_version >= 18
                && (caps.gid_types == abi::GID_TYPE_ROCE_V1
                    || caps.gid_types == abi::GID_TYPE_ROCE_V2)))
}

impl<B: Bus> Driver<B> {
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        self.bus.read32(BAR_REGS, offset)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.bus.write32(BAR_REGS, offset, value);
    }

    /// Step 3: read VERSION.
    pub fn read_version(&mut self) -> u32 {
        self.read_reg(regs::VERSION)
    }

    /// Steps 4–6: allocate and fill the DSR, the slots and both device rings. The pfn is
    /// written as a 32-bit `uar_pfn` when `dsr_version < 19`, as `uar_pfn64` otherwise.
    pub fn build_dsr(&mut self, config: DsrConfig, dsr_version: u32) -> DsrImage {
        let ram = self.bus.ram();
        let addr = self.alloc.page(ram);
        let cmd_slot = self.alloc.page(ram);
        let resp_slot = self.alloc.page(ram);
        let ring_pages = |pages: u32| u64::from(pages).clamp(1, 512);
        let async_ring = RingBuffer::new(&mut self.alloc, ram, ring_pages(config.async_ring_pages));
        let cq_ring = RingBuffer::new(&mut self.alloc, ram, ring_pages(config.cq_ring_pages));
        let uar_pfn64 = if dsr_version < abi::version::PPN64 {
            config.uar_pfn & u64::from(u32::MAX)
        } else {
            config.uar_pfn
        };
        let dsr = Dsr {
            driver_version: config.driver_version,
            gos_info: config.gos_info,
            cmd_slot_dma: cmd_slot,
            resp_slot_dma: resp_slot,
            async_ring_pages: RingPages {
                num_pages: config.async_ring_pages,
                reserved: 0,
                pdir_dma: async_ring.pdir.dir,
            },
            cq_ring_pages: RingPages {
                num_pages: config.cq_ring_pages,
                reserved: 0,
                pdir_dma: cq_ring.pdir.dir,
            },
            uar_pfn64,
            ..Dsr::default()
        };
        memory::write(ram, addr, &dsr);
        let image = DsrImage {
            addr,
            config,
            cmd_slot,
            resp_slot,
            async_ring,
            cq_ring,
        };
        self.dsr = Some(image.clone());
        image
    }

    pub fn read_dsr(&self, image: &DsrImage) -> Dsr {
        memory::read(self.bus.ram(), image.addr)
    }

    /// Rewrites fields of the DSR before it is loaded (malformed-DSR tests).
    pub fn edit_dsr(&mut self, image: &DsrImage, edit: impl FnOnce(&mut Dsr)) {
        let mut dsr = self.read_dsr(image);
        edit(&mut dsr);
        memory::write(self.bus.ram(), image.addr, &dsr);
        if let Some(d) = self.dsr.as_mut() {
            d.cmd_slot = dsr.cmd_slot_dma;
            d.resp_slot = dsr.resp_slot_dma;
        }
    }

    /// Step 7: DSRLOW, then DSRHIGH (the trigger).
    pub fn write_dsr_address(&mut self, addr: u64) {
        self.write_reg(regs::DSR_LOW, addr as u32);
        self.write_reg(regs::DSR_HIGH, (addr >> 32) as u32);
    }

    /// Step 8's input: the capabilities the device wrote into the DSR.
    pub fn read_caps(&self, image: &DsrImage) -> DeviceCaps {
        memory::read(self.bus.ram(), image.addr + abi::DSR_CAPS_OFFSET)
    }

    /// Steps 13–14: IMR = 0, CTL = ACTIVATE, read ERR.
    pub fn activate(&mut self) -> u32 {
        self.write_reg(regs::IMR, 0);
        self.write_reg(regs::CTL, regs::CTL_ACTIVATE);
        self.read_reg(regs::ERR)
    }

    /// The whole probe with `config`: on success the session is ready for commands.
    pub fn try_probe(&mut self, config: DsrConfig) -> Result<(), ProbeError> {
        self.session = None;
        let version = self.read_version();
        let image = self.build_dsr(config, version);
        self.write_dsr_address(image.addr);
        let caps = self.read_caps(&image);
        if !caps_supported(&caps, version) {
            return Err(ProbeError::Unsupported {
                mode: caps.mode,
                gid_types: caps.gid_types,
            });
        }
        if !caps.max_uar.is_power_of_two() {
            return Err(ProbeError::UarTable(caps.max_uar));
        }
        let err = self.activate();
        if err != 0 {
            return Err(ProbeError::Activate(err));
        }
        // Interrupts of the bring-up are not part of any later command's record.
        self.take_irqs();
        let mut uar_in_use = vec![false; caps.max_uar as usize];
        uar_in_use[0] = true;
        self.session = Some(Session {
            version,
            caps,
            async_ring: DeviceRing::new(image.async_ring.clone(), abi::EQE_SIZE),
            cq_notify: DeviceRing::new(image.cq_ring.clone(), abi::CQNE_SIZE),
            dsr: image,
            uar_in_use,
        });
        Ok(())
    }

    /// The driver's probe with default settings; panics if it fails.
    pub fn probe(&mut self) -> &Session {
        self.probe_with(DsrConfig::default())
    }

    pub fn probe_with(&mut self, config: DsrConfig) -> &Session {
        if let Err(e) = self.try_probe(config) {
            panic!("probe failed: {e:?}");
        }
        self.session()
    }

    /// Link up on the paired vmxnet3: CTL = UNQUIESCE, read ERR (device-abi §2.4).
    pub fn unquiesce(&mut self) -> u32 {
        self.write_reg(regs::CTL, regs::CTL_UNQUIESCE);
        self.read_reg(regs::ERR)
    }

    /// `pvrdma_pci_remove`: mask interrupts, reset the device, forget the session (device-abi §2.4).
    pub fn remove(&mut self) {
        self.write_reg(regs::IMR, u32::MAX);
        self.write_reg(regs::CTL, regs::CTL_RESET);
        self.session = None;
    }
}
