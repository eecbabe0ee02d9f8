//! Exit-free doorbells in process: BAR2 is plain memory the guest stores words into, and the
//! device only sees them when the test polls, as the server's poller does
//! (`--doorbells exit-free`, docs/doorbells.md).
//!
//! [`ExitFreeBus`] mirrors [`super::InProcessBus`] for BAR1 and the interrupts, but a BAR2
//! write only stores the 32-bit word (the last writer wins, nothing reaches the device).
//! [`ExitFreeBus::poll`] is one round of the poller: `PvrdmaDevice::poll_uar` with a `take`
//! that reads and clears the stored words, then, if anything happened, the retry of the
//! senders that wait for a receiver (`Fabric::poll_doorbells` in the server). The network is
//! [`pvrdma_backend::Isolated`]: the device reaches its own GIDs only (loopback).

use std::collections::BTreeMap;

use vfio_user_pvrdma::abi::PAGE_SIZE;
use vfio_user_pvrdma::pvrdma::{DeviceConfig, Interrupts, PvrdmaDevice};

use super::Driver;
use super::bus::{BAR_REGS, BAR_UAR, Bus};
use super::memory::{self, GuestMemory};

/// Vectors raised by the device, in order.
#[derive(Debug, Default)]
struct IrqRecord(Vec<u16>);

impl Interrupts for IrqRecord {
    fn raise(&mut self, vector: u16) {
        self.0.push(vector);
    }
}

/// A device whose UAR pages are memory polled by the test.
pub struct ExitFreeBus {
    device: PvrdmaDevice,
    memory: GuestMemory,
    irqs: IrqRecord,
    /// The doorbell words of BAR2 by offset; a missing offset holds 0.
    words: BTreeMap<u64, u32>,
    /// Offsets the last poll took (read and cleared), in the order it took them.
    taken: Vec<u64>,
    /// Polls so far.
    polls: u64,
}

impl ExitFreeBus {
    pub fn new(config: DeviceConfig, memory: GuestMemory) -> ExitFreeBus {
        ExitFreeBus {
            device: PvrdmaDevice::new(config),
            memory,
            irqs: IrqRecord::default(),
            words: BTreeMap::new(),
            taken: Vec::new(),
            polls: 0,
        }
    }

    pub fn device(&self) -> &PvrdmaDevice {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut PvrdmaDevice {
        &mut self.device
    }

    /// The word at BAR2 `offset`.
    pub fn word(&self, offset: u64) -> u32 {
        self.words.get(&offset).copied().unwrap_or(0)
    }

    /// Every non-zero doorbell word, `(offset, value)` in offset order.
    pub fn pending(&self) -> Vec<(u64, u32)> {
        self.words
            .iter()
            .filter(|&(_, &value)| value != 0)
            .map(|(&offset, &value)| (offset, value))
            .collect()
    }

    /// The offsets the last poll read and cleared, in its order.
    pub fn taken(&self) -> &[u64] {
        &self.taken
    }

    /// How many polls ran.
    pub fn polls(&self) -> u64 {
        self.polls
    }

    /// One round of the poller; whether anything happened.
    pub fn poll(&mut self) -> bool {
        self.polls += 1;
        self.taken.clear();
        let ram = self.memory.ram();
        let words = &mut self.words;
        let taken = &mut self.taken;
        let mut take = |offset: u64| {
            taken.push(offset);
            words.remove(&offset).unwrap_or(0)
        };
        let net = &mut pvrdma_backend::Isolated;
        let activity = self.device.poll_uar(ram, &mut self.irqs, net, &mut take);
        // The server retries the senders stalled on a receiver after every busy poll.
        if activity && self.device.has_stalled_work() {
            self.device.resume_stalled(ram, &mut self.irqs, net);
        }
        activity
    }
}

impl Bus for ExitFreeBus {
    fn read32(&mut self, bar: u32, offset: u64) -> u32 {
        match bar {
            BAR_REGS => self.device.read_register(offset),
            // The guest maps the words: it reads back what is there.
            BAR_UAR => self.word(offset),
            _ => 0,
        }
    }

    fn write32(&mut self, bar: u32, offset: u64, value: u32) {
        match bar {
            BAR_REGS => {
                let ram = self.memory.ram();
                self.device.write_register(
                    ram,
                    &mut self.irqs,
                    &pvrdma_backend::Isolated,
                    offset,
                    value,
                );
            }
            BAR_UAR => {
                self.words.insert(offset, value);
            }
            _ => {}
        }
    }

    fn interrupts(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.irqs.0)
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

impl Driver<ExitFreeBus> {
    /// A device with default limits, 64 MiB of guest RAM above 4 GiB and exit-free
    /// doorbells; not probed.
    pub fn exit_free() -> Driver<ExitFreeBus> {
        let memory = GuestMemory::new(memory::DEFAULT_BASE, memory::DEFAULT_SIZE);
        Driver::new(ExitFreeBus::new(DeviceConfig::default(), memory))
    }

    /// One poll of the doorbell words; whether anything happened.
    pub fn poll(&mut self) -> bool {
        self.bus.poll()
    }

    /// The doorbell word of UAR `page` at `word` (`uar::QP_OFFSET`, ...).
    pub fn doorbell_word(&self, page: u32, word: u64) -> u32 {
        self.bus.word(u64::from(page) * PAGE_SIZE + word)
    }

    pub fn device(&self) -> &PvrdmaDevice {
        self.bus.device()
    }
}
