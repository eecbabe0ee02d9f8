//! The device model as a hostile guest kernel drives it: guest memory it writes at will (the
//! DSR, page directories, rings, WQEs, command bodies), BAR1 register writes and reads, the
//! command slot with every command code, and UAR doorbells. The fuzzer's bytes are a
//! program of such steps; the harness only places the DSR and the command slot where the
//! device will look, so that inputs reach the commands and the data path quickly.
//!
//! The device is alone on an isolated network, so a work request to one of its own GIDs is
//! answered by its own responder (loopback): the requester and the responder both run.

use pvrdma_backend::{Isolated, Network};
use vfio_user_pvrdma::abi::{self, Dsr, RequestHeader, RingPages, regs, uar};
use vfio_user_pvrdma::pvrdma::{DeviceConfig, GuestRam, Interrupts, PvrdmaDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::input::Input;

/// Guest RAM: enough for rings and queues of a few pages, small enough to reset per input.
/// Above 4 GiB, as the test driver puts it (so its recorded sessions replay unchanged,
/// and address 0 is not RAM).
pub const RAM_BASE: u64 = 0x1_0000_0000;
pub const RAM: u64 = 4 << 20;
const PAGES: u64 = RAM / abi::PAGE_SIZE;
const DSR_AT: u64 = RAM_BASE + 0x1000;
const COMMAND_AT: u64 = RAM_BASE + 0x2000;
const RESPONSE_AT: u64 = RAM_BASE + 0x3000;
/// Steps per input: enough for a recorded verbs session, bounded so one input is quick.
const MAX_STEPS: usize = 4096;

/// Counts interrupts (their order is the device's business).
pub struct Raised(pub u64);

impl Interrupts for Raised {
    fn raise(&mut self, _vector: u16) {
        self.0 += 1;
    }
}

pub fn run(data: &[u8]) {
    run_with(
        data,
        &mut Isolated,
        &mut |op, device, mem, irq, net, input| step(op % 8, device, mem, irq, net, input),
    );
}

/// One step of a harness: the step's first byte, the device, its memory and interrupts,
/// its network, and the rest of the input.
pub type Step<'a> =
    dyn FnMut(u8, &mut PvrdmaDevice, &GuestRam, &mut Raised, &mut dyn Network, &mut Input<'_>) + 'a;

/// Runs the steps `data` spells with `net` as the device's network; `step` reads each one.
pub fn run_with(data: &[u8], net: &mut dyn Network, step: &mut Step<'_>) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_BASE), RAM as usize)]) else {
        return;
    };
    let mut device = PvrdmaDevice::new(DeviceConfig::default());
    let mut irq = Raised(0);
    let mut input = Input::new(data);
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        step(op, &mut device, &mem, &mut irq, net, &mut input);
    }
    // Whatever the guest did, the device still answers and resets.
    let _ = device.read_register(regs::ERR);
    device.reset_on(net);
}

/// A guest address the fuzzer chooses: usually inside RAM and page-aligned, since that is
/// what the device checks most; sometimes anything at all.
fn address(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => input.u64(),
        1 => page(input) + u64::from(input.u16() & 0xfff),
        _ => page(input),
    }
}

/// A page of guest RAM the fuzzer chooses.
fn page(input: &mut Input<'_>) -> u64 {
    RAM_BASE + u64::from(input.u16()) % PAGES * abi::PAGE_SIZE
}

/// Step `op` (0..8) of the guest: memory, activation, commands, registers, doorbells.
pub fn step(
    op: u8,
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut Raised,
    net: &mut dyn Network,
    input: &mut Input<'_>,
) {
    match op {
        // The guest writes its memory: rings, WQEs, page directories, command bodies.
        0 => {
            let at = address(input);
            let len = usize::from(input.u8()) * 4 + 4;
            let bytes = input.bytes(len);
            let _ = mem.write_slice(bytes, GuestAddress(at));
        }
        // A page of 64-bit entries, the shape of a page directory or table.
        1 => {
            let at = page(input);
            let count = u64::from(input.u8() % 64) + 1;
            let first = u64::from(input.u16()) % PAGES;
            let stride = u64::from(input.u8() % 4);
            for i in 0..count {
                let entry = RAM_BASE + (first + i * stride) % PAGES * abi::PAGE_SIZE;
                let _ = mem.write_obj(entry, GuestAddress(at + i * 8));
            }
        }
        // Activation with a DSR of the fuzzer's rings.
        2 => {
            let ring = |input: &mut Input<'_>| RingPages {
                num_pages: u32::from(input.u8() % 8),
                reserved: 0,
                pdir_dma: address(input),
            };
            let dsr = Dsr {
                driver_version: input.u32(),
                cmd_slot_dma: COMMAND_AT,
                resp_slot_dma: RESPONSE_AT,
                async_ring_pages: ring(input),
                cq_ring_pages: ring(input),
                uar_pfn64: u64::from(input.u8()),
                ..Dsr::default()
            };
            let _ = mem.write_slice(dsr.as_bytes(), GuestAddress(DSR_AT));
            write(device, mem, irq, net, regs::DSR_LOW, DSR_AT as u32);
            write(device, mem, irq, net, regs::DSR_HIGH, 0);
            write(device, mem, irq, net, regs::CTL, regs::CTL_ACTIVATE);
        }
        // A command: a code (one past the last is invalid), the slot's body, REQUEST, ERR.
        3 => {
            let header = RequestHeader {
                response: input.u64(),
                cmd: u32::from(input.u8() % 22),
                reserved: 0,
            };
            let body = input.bytes(abi::REQUEST_SLOT_BYTES - size_of::<RequestHeader>());
            let _ = mem.write_slice(header.as_bytes(), GuestAddress(COMMAND_AT));
            let _ = mem.write_slice(
                body,
                GuestAddress(COMMAND_AT + size_of::<RequestHeader>() as u64),
            );
            write(device, mem, irq, net, regs::REQUEST, 0);
            let _ = device.read_register(regs::ERR);
        }
        // Any register write or read (offsets 0..=0x2c: every register and a few past).
        4 => {
            let offset = u64::from(input.u8() % 12) * 4;
            let value = input.u32();
            write(device, mem, irq, net, offset, value);
        }
        5 => {
            let _ = device.read_register(u64::from(input.u8() % 12) * 4);
        }
        // A doorbell: QP (send or receive), CQ (arm or poll) or SRQ word of a UAR page
        // (the first 256 pages of BAR2).
        6 => {
            let page = u64::from(input.u8()) * abi::PAGE_SIZE;
            let word = match input.u8() % 3 {
                0 => uar::QP_OFFSET,
                1 => uar::CQ_OFFSET,
                _ => uar::SRQ_OFFSET,
            };
            let value = input.u32();
            device.write_doorbell(mem, irq, net, page + word, value);
        }
        // Work waiting for a receiver is tried again.
        _ => device.resume_stalled(mem, irq, net),
    }
}

fn write(
    device: &mut PvrdmaDevice,
    mem: &GuestRam,
    irq: &mut Raised,
    net: &mut dyn Network,
    offset: u64,
    value: u32,
) {
    device.write_register(mem, irq, net, offset, value);
}
