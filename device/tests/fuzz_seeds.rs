//! Sessions of the host-side test driver recorded as inputs of the `device_model` fuzz
//! target (docs/fuzzing.md): every register access and doorbell the driver makes, and every
//! byte it wrote to guest memory since the previous one. Started from these, the fuzzer
//! mutates a real bring-up, real commands and real WQEs instead of guessing its way to them.
//!
//! The test checks that the seeds in `fuzz/corpus/device_model/` are what the driver does
//! today; after a change to the driver or the device, write them again with
//! `PVRDMA_WRITE_FUZZ_SEEDS=1 cargo test -p vfio-user-pvrdma --test fuzz_seeds`.

mod driver;

#[path = "datapath"]
mod datapath {
    #[allow(
        dead_code,
        reason = "the recorder uses only a few of the harness's helpers"
    )]
    pub mod harness;
}

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use datapath::harness::{ALL_ACCESS, Net, Pair, QpOpts, Wr};
use driver::Driver;
use driver::bus::{BAR_REGS, BAR_UAR, Bus, InProcessBus};
use driver::memory::{self, GuestMemory};
use vfio_user_pvrdma::abi::{PAGE_SIZE, wr_opcode};
use vfio_user_pvrdma::pvrdma::DeviceConfig;

/// The fuzz target's guest RAM: where and how much (`fuzz/src/device_model.rs`).
const RAM_BASE: u64 = 0x1_0000_0000;
const RAM: u64 = 4 << 20;

/// Program steps of the fuzz target's input format.
const STEP_MEMORY: u8 = 0;
const STEP_REGISTER_WRITE: u8 = 4;
const STEP_REGISTER_READ: u8 = 5;
const STEP_DOORBELL: u8 = 6;
/// A memory step carries at most this many bytes.
const MAX_WRITE: usize = 1024;

/// An in-process bus that writes down what the driver does, as a fuzz input.
struct Recorder {
    inner: InProcessBus,
    /// Guest RAM as the recording last saw it.
    shadow: Vec<u8>,
    program: Rc<RefCell<Vec<u8>>>,
}

impl Recorder {
    fn new(program: Rc<RefCell<Vec<u8>>>) -> Recorder {
        let inner = InProcessBus::new(DeviceConfig::default(), GuestMemory::new(RAM_BASE, RAM));
        let shadow = vec![0; RAM as usize];
        Recorder {
            inner,
            shadow,
            program,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        memory::snapshot(self.inner.ram(), RAM_BASE, RAM as usize)
    }

    /// Writes down, as memory steps, what the driver wrote since the last access.
    fn record_guest_writes(&mut self) {
        let now = self.snapshot();
        let mut program = self.program.borrow_mut();
        let mut at = 0;
        while at < now.len() {
            if now[at] == self.shadow[at] {
                at += 1;
                continue;
            }
            // A run of changes (gaps under 32 bytes joined), in whole 32-bit words.
            let start = at & !3;
            let mut end = at + 1;
            let mut last_change = at;
            while end < now.len() && end - last_change < 32 && end - start < MAX_WRITE {
                if now[end] != self.shadow[end] {
                    last_change = end;
                }
                end += 1;
            }
            let end = ((last_change + 1 + 3) & !3).min(now.len());
            program.push(STEP_MEMORY);
            program.push(0); // the address as a raw u64
            program.extend_from_slice(&(RAM_BASE + start as u64).to_le_bytes());
            program.push(((end - start) / 4 - 1) as u8);
            program.extend_from_slice(&now[start..end]);
            at = end;
        }
        self.shadow = now;
    }
}

impl Bus for Recorder {
    fn read32(&mut self, bar: u32, offset: u64) -> u32 {
        self.record_guest_writes();
        if bar == BAR_REGS {
            self.program
                .borrow_mut()
                .extend_from_slice(&[STEP_REGISTER_READ, (offset / 4) as u8]);
        }
        let value = self.inner.read32(bar, offset);
        self.shadow = self.snapshot();
        value
    }

    fn write32(&mut self, bar: u32, offset: u64, value: u32) {
        self.record_guest_writes();
        {
            let mut program = self.program.borrow_mut();
            match bar {
                BAR_REGS => program.extend_from_slice(&[STEP_REGISTER_WRITE, (offset / 4) as u8]),
                BAR_UAR => {
                    let page = u8::try_from(offset / PAGE_SIZE).expect("a UAR page under 256");
                    program.extend_from_slice(&[STEP_DOORBELL, page, ((offset & 0xfff) / 4) as u8]);
                }
                _ => {}
            }
            if bar == BAR_REGS || bar == BAR_UAR {
                program.extend_from_slice(&value.to_le_bytes());
            }
        }
        self.inner.write32(bar, offset, value);
        // What the device wrote (responses, CQEs) is not the driver's to replay.
        self.shadow = self.snapshot();
    }

    fn interrupts(&mut self) -> Vec<u16> {
        self.inner.interrupts()
    }

    fn memory(&self) -> &GuestMemory {
        self.inner.memory()
    }
}

/// A probed device with two RC QPs connected to each other (loopback), recording.
fn recorded_pair() -> (Pair<Recorder>, Rc<RefCell<Vec<u8>>>) {
    let program = Rc::new(RefCell::new(Vec::new()));
    let net = Net::new(vec![Driver::new(Recorder::new(Rc::clone(&program)))]);
    (Pair::rc(net, QpOpts::default()), program)
}

fn recorded_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let mut sessions = Vec::new();

    // Bring-up, contexts, PD, CQs, two connected RC QPs, MRs; then one of each operation.
    let (mut p, program) = recorded_pair();
    let a = p.net.mr(&p.a.clone(), 8192, ALL_ACCESS);
    let b = p.net.mr(&p.b.clone(), 8192, ALL_ACCESS);
    p.net.write(
        &a,
        0,
        b"a message from A to B, through the device's own responder",
    );
    p.recv_b(1, &[b.sge(0, 4096)]);
    p.recv_b(2, &[b.sge(4096, 64)]);
    p.post_a(&[
        Wr::new(10, wr_opcode::SEND, &[a.sge(0, 64)]),
        Wr::new(11, wr_opcode::RDMA_WRITE, &[a.sge(0, 128)]).rdma(b.at(256), b.rkey()),
        Wr::new(12, wr_opcode::RDMA_WRITE_WITH_IMM, &[a.sge(0, 8)])
            .rdma(b.at(512), b.rkey())
            .imm(7),
        Wr::new(13, wr_opcode::RDMA_READ, &[a.sge(1024, 256)]).rdma(b.at(0), b.rkey()),
        Wr::new(14, wr_opcode::ATOMIC_FETCH_AND_ADD, &[a.sge(2048, 8)]).atomic(
            b.at(4000),
            5,
            0,
            b.rkey(),
        ),
        Wr::new(15, wr_opcode::ATOMIC_CMP_AND_SWP, &[a.sge(2056, 8)]).atomic(
            b.at(4000),
            5,
            9,
            b.rkey(),
        ),
    ]);
    assert_eq!(p.sends_a().len(), 6, "every operation completes");
    assert_eq!(
        p.recvs_b().len(),
        2,
        "the SEND and the WRITE with immediate"
    );
    sessions.push(("rc-every-operation", program.take()));

    // A UD pair: a datagram with its address vector.
    let program = Rc::new(RefCell::new(Vec::new()));
    let net = Net::new(vec![Driver::new(Recorder::new(Rc::clone(&program)))]);
    let mut p = Pair::ud(net, 0x1111, 0x1111);
    let a = p.net.mr(&p.a.clone(), 4096, ALL_ACCESS);
    let b = p.net.mr(&p.b.clone(), 4096, ALL_ACCESS);
    p.recv_b(1, &[b.sge(0, 4096)]);
    let av = p.av_to_b();
    p.post_a(&[Wr::new(20, wr_opcode::SEND, &[a.sge(0, 100)]).ud(p.qb.qpn, 0x1111, av)]);
    assert_eq!(p.sends_a().len(), 1);
    assert_eq!(p.recvs_b().len(), 1);
    sessions.push(("ud-datagram", program.take()));
    sessions
}

#[test]
fn the_device_model_seeds_are_the_drivers_sessions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/device_model");
    let write = std::env::var_os("PVRDMA_WRITE_FUZZ_SEEDS").is_some();
    for (name, program) in recorded_sessions() {
        let path = dir.join(format!("seed-driver-{name}"));
        if write {
            std::fs::write(&path, &program).expect("write the seed");
            eprintln!("wrote {} ({} bytes)", path.display(), program.len());
        } else {
            assert!(
                std::fs::read(&path).ok() == Some(program),
                "{} is not what the driver does today: write the seeds again with \
                 PVRDMA_WRITE_FUZZ_SEEDS=1 cargo test -p vfio-user-pvrdma --test fuzz_seeds",
                path.display()
            );
        }
    }
}
