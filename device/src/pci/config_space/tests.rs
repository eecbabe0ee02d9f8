use super::*;
use crate::pci::{ids, regs};

fn read_u8(cs: &ConfigSpace, offset: usize) -> u8 {
    let mut b = [0; 1];
    cs.read(offset as u64, &mut b);
    b[0]
}

fn read_u16(cs: &ConfigSpace, offset: usize) -> u16 {
    let mut b = [0; 2];
    cs.read(offset as u64, &mut b);
    u16::from_le_bytes(b)
}

fn read_u32(cs: &ConfigSpace, offset: usize) -> u32 {
    let mut b = [0; 4];
    cs.read(offset as u64, &mut b);
    u32::from_le_bytes(b)
}

fn write_u16(cs: &mut ConfigSpace, offset: usize, value: u16) {
    cs.write(offset as u64, &value.to_le_bytes());
}

fn write_u32(cs: &mut ConfigSpace, offset: usize, value: u32) {
    cs.write(offset as u64, &value.to_le_bytes());
}

fn dump(cs: &ConfigSpace) -> [u8; SIZE] {
    let mut all = [0; SIZE];
    cs.read(0, &mut all);
    all
}

const MSIX: usize = ids::MSIX_CAP_OFFSET as usize;

#[test]
fn identity_bytes() {
    let cs = ConfigSpace::new();
    assert_eq!(read_u16(&cs, regs::VENDOR_ID), 0x15AD);
    assert_eq!(read_u16(&cs, regs::DEVICE_ID), 0x0820);
    assert_eq!(read_u32(&cs, 0x00), 0x0820_15AD);
    assert_eq!(read_u16(&cs, regs::SUBSYSTEM_VENDOR_ID), 0x15AD);
    assert_eq!(read_u16(&cs, regs::SUBSYSTEM_ID), 0x0820);
    assert_eq!(read_u8(&cs, regs::REVISION_ID), 0);
    assert_eq!(
        read_u8(&cs, regs::HEADER_TYPE),
        0,
        "type-0, single function"
    );
    assert_eq!(read_u8(&cs, regs::BIST), 0);
    assert_eq!(read_u8(&cs, regs::INTERRUPT_PIN), 0, "MSI-X only");
    assert_eq!(read_u8(&cs, regs::INTERRUPT_LINE), 0);
    assert_eq!(read_u16(&cs, regs::COMMAND), 0, "decoding off at power-on");
}

#[test]
fn class_code() {
    let cs = ConfigSpace::new();
    assert_eq!(read_u8(&cs, regs::CLASS_CODE), 0x02);
    assert_eq!(read_u8(&cs, regs::SUBCLASS), 0x80);
    assert_eq!(read_u8(&cs, regs::PROG_IF), 0x00);
    // Revision in the low byte, class code in the upper three.
    assert_eq!(read_u32(&cs, 0x08), 0x0280_0000);
}

#[test]
fn capability_chain_has_exactly_msix() {
    let cs = ConfigSpace::new();
    assert_ne!(read_u16(&cs, regs::STATUS) & regs::STATUS_CAPABILITIES, 0);
    let mut ptr = read_u8(&cs, regs::CAPABILITY_POINTER) & !0x3;
    assert_eq!(ptr, 0x40);
    let mut ids_seen = Vec::new();
    // A list longer than the space can hold would be a cycle.
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        assert!(ptr >= 0x40, "capability inside the header at {ptr:#x}");
        ids_seen.push(read_u8(&cs, usize::from(ptr)));
        ptr = read_u8(&cs, usize::from(ptr) + 1) & !0x3;
    }
    assert_eq!(ptr, 0, "capability list does not terminate");
    assert_eq!(ids_seen, vec![regs::CAP_ID_MSIX]);
}

#[test]
fn msix_capability_fields() {
    let cs = ConfigSpace::new();
    let control = read_u16(&cs, MSIX + regs::MSIX_MESSAGE_CONTROL);
    assert_eq!(
        control & regs::MSIX_CONTROL_TABLE_SIZE_MASK,
        2,
        "N-1 for 3 vectors"
    );
    assert_eq!(control & regs::MSIX_CONTROL_ENABLE, 0);
    assert_eq!(control & regs::MSIX_CONTROL_FUNCTION_MASK, 0);
    let table = read_u32(&cs, MSIX + regs::MSIX_TABLE);
    assert_eq!(table & regs::MSIX_BIR_MASK, 0, "table in BAR0");
    assert_eq!(table & !regs::MSIX_BIR_MASK, 0, "table at offset 0");
    let pba = read_u32(&cs, MSIX + regs::MSIX_PBA);
    assert_eq!(pba & regs::MSIX_BIR_MASK, 0, "PBA in BAR0");
    assert_eq!(pba & !regs::MSIX_BIR_MASK, 0x2000);
    assert!(!cs.msix_enabled());
    assert!(!cs.msix_function_masked());
    // Nothing follows the capability.
    assert!(
        dump(&cs)[MSIX + regs::MSIX_CAP_LEN..]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn bar_sizing_protocol() {
    let expected: [(usize, u32); 6] = [
        (0, 0xFFFF_C000), // 16 KiB
        (1, 0xFFFF_E000), // 8 KiB
        (2, 0xFFE0_0000), // 2 MiB
        (3, 0),
        (4, 0),
        (5, 0),
    ];
    for (bar, sized) in expected {
        let mut cs = ConfigSpace::new();
        let offset = regs::bar(bar);
        assert_eq!(read_u32(&cs, offset), 0, "BAR{bar} power-on");
        write_u32(&mut cs, offset, 0xFFFF_FFFF);
        assert_eq!(read_u32(&cs, offset), sized, "BAR{bar} sizing");
        if sized != 0 {
            let size = !sized + 1;
            assert_eq!(u64::from(size), ids::BAR_SIZES[bar]);
            // Type bits: 32-bit, non-prefetchable memory.
            assert_eq!(read_u32(&cs, offset) & 0xF, 0);
            // Program an address, with junk below the size that must drop.
            write_u32(&mut cs, offset, 0xE000_0000 | (size - 1));
            assert_eq!(read_u32(&cs, offset), 0xE000_0000);
            assert_eq!(cs.bar_address(bar), Some(0xE000_0000));
        } else {
            assert_eq!(cs.bar_address(bar), None);
        }
    }
}

#[test]
fn bar_sizing_with_byte_writes() {
    let mut cs = ConfigSpace::new();
    let offset = regs::bar(ids::UAR_BAR);
    for i in 0..4 {
        cs.write((offset + i) as u64, &[0xFF]);
    }
    assert_eq!(read_u32(&cs, offset), 0xFFE0_0000);
}

#[test]
fn rom_bar_is_absent() {
    let mut cs = ConfigSpace::new();
    write_u32(&mut cs, regs::ROM_BAR, 0xFFFF_FFFF);
    assert_eq!(read_u32(&cs, regs::ROM_BAR), 0);
    write_u32(&mut cs, regs::ROM_BAR, 0xFFFF_F801);
    assert_eq!(read_u32(&cs, regs::ROM_BAR), 0);
}

#[test]
fn read_only_fields_ignore_writes() {
    let mut cs = ConfigSpace::new();
    let before = dump(&cs);
    for offset in [
        0x00,
        0x08,
        0x0C,
        regs::bar(3),
        regs::bar(4),
        regs::bar(5),
        0x28,
        0x2C,
        regs::CAPABILITY_POINTER,
        MSIX,
        MSIX + regs::MSIX_TABLE,
        MSIX + regs::MSIX_PBA,
        0x80,
        0xFC,
    ] {
        write_u32(&mut cs, offset, 0xFFFF_FFFF);
        write_u32(&mut cs, offset, 0x1234_5678);
    }
    // Interrupt pin and Min_Gnt/Max_Lat share a dword with the line register.
    cs.write(regs::INTERRUPT_PIN as u64, &[0xFF, 0xFF, 0xFF]);
    assert_eq!(dump(&cs), before);
}

#[test]
fn command_register_writable_bits() {
    let mut cs = ConfigSpace::new();
    write_u16(&mut cs, regs::COMMAND, 0xFFFF);
    let command = read_u16(&cs, regs::COMMAND);
    assert_eq!(
        command, 0x0546,
        "memory, master, parity, SERR, INTx disable"
    );
    assert!(cs.memory_enabled());
    assert!(cs.bus_master_enabled());
    assert_eq!(cs.command(), command);
    write_u16(&mut cs, regs::COMMAND, 0);
    assert!(!cs.memory_enabled());
    assert!(!cs.bus_master_enabled());
    // A byte write to the low half leaves the high half alone.
    write_u16(&mut cs, regs::COMMAND, regs::COMMAND_INTX_DISABLE);
    cs.write(regs::COMMAND as u64, &[0x06]);
    assert_eq!(read_u16(&cs, regs::COMMAND), 0x0406);
}

#[test]
fn interrupt_line_is_scratch() {
    let mut cs = ConfigSpace::new();
    cs.write(regs::INTERRUPT_LINE as u64, &[0x0B]);
    assert_eq!(read_u8(&cs, regs::INTERRUPT_LINE), 0x0B);
    // A dword write only changes the line byte.
    write_u32(&mut cs, regs::INTERRUPT_LINE, 0xFFFF_FF2A);
    assert_eq!(read_u32(&cs, regs::INTERRUPT_LINE), 0x0000_002A);
}

#[test]
fn msix_control_enable_and_mask() {
    let mut cs = ConfigSpace::new();
    let control = MSIX + regs::MSIX_MESSAGE_CONTROL;
    write_u16(&mut cs, control, 0xFFFF);
    assert_eq!(read_u16(&cs, control), 0xC002, "table size stays read-only");
    assert!(cs.msix_enabled());
    assert!(cs.msix_function_masked());
    write_u16(&mut cs, control, regs::MSIX_CONTROL_ENABLE);
    assert!(cs.msix_enabled());
    assert!(!cs.msix_function_masked());
    // Linux writes the whole first dword of the capability.
    write_u32(&mut cs, MSIX, 0);
    assert!(!cs.msix_enabled());
    assert_eq!(read_u32(&cs, MSIX), 0x0002_0011);
}

#[test]
fn status_error_bits_are_rw1c() {
    let mut cs = ConfigSpace::new();
    let errors = regs::STATUS_RECEIVED_MASTER_ABORT | regs::STATUS_DETECTED_PARITY_ERROR;
    // Non-error bits cannot be injected.
    cs.set_status_error(errors | 0x0020);
    assert_eq!(cs.status(), regs::STATUS_CAPABILITIES | errors);

    // Writing 0 changes nothing, nor does a command-register dword write
    // with the status half zero.
    write_u16(&mut cs, regs::STATUS, 0);
    write_u32(&mut cs, regs::COMMAND, u32::from(regs::COMMAND_MEMORY));
    assert_eq!(cs.status(), regs::STATUS_CAPABILITIES | errors);

    // Writing 1 clears only that bit.
    write_u16(&mut cs, regs::STATUS, regs::STATUS_RECEIVED_MASTER_ABORT);
    assert_eq!(
        cs.status(),
        regs::STATUS_CAPABILITIES | regs::STATUS_DETECTED_PARITY_ERROR
    );

    // Writing all-ones clears every error bit but not the read-only ones.
    cs.set_status_error(regs::STATUS_RW1C);
    write_u16(&mut cs, regs::STATUS, 0xFFFF);
    assert_eq!(cs.status(), regs::STATUS_CAPABILITIES);
}

#[test]
fn reset_restores_power_on_state() {
    let mut cs = ConfigSpace::new();
    write_u16(&mut cs, regs::COMMAND, 0xFFFF);
    for bar in 0..ids::NUM_BARS {
        write_u32(&mut cs, regs::bar(bar), 0xFFFF_FFFF);
    }
    cs.write(regs::INTERRUPT_LINE as u64, &[0x05]);
    write_u16(&mut cs, MSIX + regs::MSIX_MESSAGE_CONTROL, 0xFFFF);
    cs.set_status_error(regs::STATUS_SIGNALED_SYSTEM_ERROR);
    assert_ne!(cs, ConfigSpace::new());
    cs.reset();
    assert_eq!(cs, ConfigSpace::new());
    assert_eq!(dump(&cs), POWER_ON);
}

#[test]
fn reads_past_the_end_are_zero() {
    let cs = ConfigSpace::new();
    let mut buf = [0xAA; 8];
    cs.read(0xFC, &mut buf);
    assert_eq!(
        buf, [0; 8],
        "last dword of the space is zero, the rest absent"
    );

    let mut buf = [0xAA; 8];
    cs.read(0xFA, &mut buf);
    assert_eq!(buf, [0; 8]);

    for offset in [256, 257, 4096, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
        let mut buf = [0xAA; 16];
        cs.read(offset, &mut buf);
        assert_eq!(buf, [0; 16], "offset {offset:#x}");
    }

    let mut big = vec![0xAA; 1000];
    cs.read(0, &mut big);
    assert_eq!(big[..SIZE], POWER_ON[..]);
    assert!(big[SIZE..].iter().all(|&b| b == 0));

    cs.read(u64::MAX, &mut []);
}

#[test]
fn odd_length_and_unaligned_reads() {
    let cs = ConfigSpace::new();
    let mut three = [0; 3];
    cs.read(0x01, &mut three);
    assert_eq!(three, [0x15, 0x20, 0x08]);
    let mut five = [0; 5];
    cs.read(0x09, &mut five);
    assert_eq!(five, [0x00, 0x80, 0x02, 0x00, 0x00]);
    // A 2-byte read across a dword boundary.
    let mut two = [0; 2];
    cs.read(0x0B, &mut two);
    assert_eq!(two, [0x02, 0x00]);
}

#[test]
fn writes_past_the_end_are_ignored() {
    let mut cs = ConfigSpace::new();
    let before = dump(&cs);
    for offset in [256, 4096, u64::MAX - 3, u64::MAX] {
        cs.write(offset, &[0xFF; 16]);
    }
    cs.write(0, &[]);
    cs.write(u64::MAX, &[]);
    assert_eq!(dump(&cs), before);

    // A write straddling the end applies the in-range part only.
    cs.write(0xFE, &[0xFF; 4]);
    assert_eq!(dump(&cs), before);
}

#[test]
fn odd_length_and_unaligned_writes() {
    let mut cs = ConfigSpace::new();
    // Three bytes over line, pin, Min_Gnt: only the line is writable.
    cs.write(regs::INTERRUPT_LINE as u64, &[0x11, 0x22, 0x33]);
    assert_eq!(read_u32(&cs, regs::INTERRUPT_LINE), 0x0000_0011);
    // Two bytes across BAR0's top byte and BAR1's bottom byte.
    cs.write(0x13, &[0xFF, 0xFF]);
    assert_eq!(read_u32(&cs, regs::bar(0)), 0xFF00_0000);
    assert_eq!(read_u32(&cs, regs::bar(1)), 0);
    // A whole-space write only changes writable bits.
    cs.write(0, &[0xFF; SIZE]);
    assert_eq!(read_u16(&cs, regs::VENDOR_ID), ids::VENDOR_ID);
    assert_eq!(read_u32(&cs, regs::bar(2)), 0xFFE0_0000);
}

/// A cheap fuzz: random accesses never panic and never change a read-only bit.
#[test]
fn random_accesses_preserve_read_only_bits() {
    let mut cs = ConfigSpace::new();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        // xorshift64*: deterministic, no external crate.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for _ in 0..20_000 {
        let r = next();
        let offset = match r % 4 {
            0 => r >> 32,
            1 => (r >> 8) % 300,
            2 => u64::MAX - (r >> 56),
            _ => (r >> 8) % 256,
        };
        let len = match (r >> 4) % 5 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 0,
            _ => ((r >> 20) % 300) as usize,
        };
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if r & 1 << 63 == 0 {
            cs.write(offset, &data);
        } else {
            let mut buf = data;
            cs.read(offset, &mut buf);
        }
    }
    let now = dump(&cs);
    for i in 0..SIZE {
        let fixed = !WRITABLE[i] & !RW1C[i];
        assert_eq!(now[i] & fixed, POWER_ON[i] & fixed, "byte {i:#x}");
        assert_eq!(now[i] & RW1C[i], 0, "RW1C bit set at {i:#x}");
    }
}
