//! Starting inputs for each target, written in the targets' own input formats: a session
//! the way a real driver, client or peer begins one, so the fuzzer starts deep inside the
//! code instead of guessing its way past activation, VERSION or the frame header. The
//! `write_seeds` example writes them into `corpus/`; `tests/corpus.rs` replays them.

use pvrdma_backend::tcp::wire::{self, Frame, Op, RequestFrame, ResponseFrame};

/// `(target, name, input)` for every seed.
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "device_model",
            "bring-up-and-every-command",
            device_bring_up(),
        ),
        (
            "device_host",
            "bring-up-and-every-command",
            device_bring_up(),
        ),
        ("vfio_user_stream", "qemu-attach", vfio_attach()),
        ("tcp_frames", "answers-and-requests", tcp_session()),
    ]
}

/// Activation with one-page rings, then every command code with an empty body, a page
/// directory, and a doorbell of each kind.
fn device_bring_up() -> Vec<u8> {
    let mut p = Vec::new();
    // Two rings of two pages (state and data): the async ring's page directory at page
    // 16 names table page 17, which names pages 18 and 19; the CQ ring's is at 20.
    for pdir in [16u8, 20] {
        p.extend_from_slice(&[1, pdir, 0, 0, pdir + 1, 0, 0]);
        p.extend_from_slice(&[1, pdir + 1, 0, 1, pdir + 2, 0, 1]);
    }
    // Activate: driver version 20, those rings, UAR page 0.
    p.push(2);
    p.extend_from_slice(&20u32.to_le_bytes());
    for page in [16u16, 20] {
        p.push(2); // two pages
        p.push(2); // a page-aligned address ...
        p.extend_from_slice(&page.to_le_bytes()); // ... of this page
    }
    p.push(0); // UAR page 0
    // A page directory at page 32 naming table 33, which names pages 40..48.
    p.extend_from_slice(&[1, 32, 0, 0, 33, 0, 0]);
    p.extend_from_slice(&[1, 33, 0, 8, 40, 0, 1]);
    for code in 0u8..22 {
        p.push(3);
        p.extend_from_slice(&0u64.to_le_bytes()); // response cookie
        p.push(code);
        p.extend_from_slice(&[0u8; 168]);
    }
    for word in 0u8..3 {
        p.extend_from_slice(&[6, 0, word]);
        p.extend_from_slice(&(1u32 << 30 | 1).to_le_bytes());
    }
    p.push(7);
    p
}

/// One message of `vfio_user_stream`'s format: `command` 1..=15, payload, and descriptors.
fn message(p: &mut Vec<u8>, command: u8, payload: &[u8], fds: &[u8]) {
    let kind = (command - 1) | if fds.is_empty() { 0 } else { 0x80 };
    p.push(kind);
    p.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    p.extend_from_slice(payload);
    p.extend_from_slice(fds);
}

/// VERSION, DMA_MAP of 1 MiB of RAM, the device and region queries, an MSI-X eventfd, a
/// config read and register accesses, as QEMU attaches a device.
fn vfio_attach() -> Vec<u8> {
    let mut p = Vec::new();
    let mut version = vec![0, 0, 1, 0];
    version.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
    message(&mut p, 1, &version, &[]);
    let mut map = Vec::new();
    for v in [32u32, 3] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u64, 0x1000_0000, 1 << 20] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    // One memfd (count 0 means one) of 1 MiB, no contents.
    let mut memfd = vec![0, 0];
    memfd.extend_from_slice(&(1u32 << 20).to_le_bytes());
    memfd.push(0);
    message(&mut p, 2, &map, &memfd);
    let mut info = Vec::new();
    for v in [16u32, 0, 0, 0] {
        info.extend_from_slice(&v.to_le_bytes());
    }
    message(&mut p, 4, &info, &[]);
    for index in 0u32..10 {
        let mut query = Vec::new();
        for v in [32u32, 0, index, 0, 0, 0, 0, 0] {
            query.extend_from_slice(&v.to_le_bytes());
        }
        message(&mut p, 5, &query, &[]);
    }
    // MSI-X (index 2), eventfd data, trigger action, vector 0, one eventfd.
    let mut irqs = Vec::new();
    for v in [20u32, (1 << 2) | (1 << 5), 2, 0, 1] {
        irqs.extend_from_slice(&v.to_le_bytes());
    }
    message(&mut p, 8, &irqs, &[0, 1]);
    // Region accesses: config space (7) read, BAR1 (1) VERSION read, DSR writes, BAR2 (2).
    let access = |region: u32, offset: u64, data: &[u8]| {
        let mut a = Vec::new();
        a.extend_from_slice(&offset.to_le_bytes());
        a.extend_from_slice(&region.to_le_bytes());
        a.extend_from_slice(&4u32.to_le_bytes());
        a.extend_from_slice(data);
        a
    };
    message(&mut p, 9, &access(7, 0, &[]), &[]);
    message(&mut p, 9, &access(1, 0, &[]), &[]);
    message(
        &mut p,
        10,
        &access(1, 4, &0x1000_1000u32.to_le_bytes()),
        &[],
    );
    message(&mut p, 10, &access(1, 8, &0u32.to_le_bytes()), &[]);
    message(&mut p, 10, &access(1, 0xc, &0u32.to_le_bytes()), &[]);
    message(
        &mut p,
        10,
        &access(2, 0, &(1u32 << 30 | 1).to_le_bytes()),
        &[],
    );
    message(&mut p, 13, &[], &[]);
    let mut unmap = Vec::new();
    for v in [24u32, 0] {
        unmap.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0x1000_0000u64, 1 << 20] {
        unmap.extend_from_slice(&v.to_le_bytes());
    }
    message(&mut p, 3, &unmap, &[]);
    p
}

/// The answers to the node's own four requests, then a peer's request of each operation,
/// a GID announcement and a ping, in pieces of 257 bytes.
fn tcp_session() -> Vec<u8> {
    const LOCAL: [u8; 16] = [0x10; 16];
    const REMOTE: [u8; 16] = [0x20; 16];
    let mut p = vec![16, 16, 16, 16];
    let answer = |seq: u32, ticket: u64, last: bool, reply: Vec<u8>| ResponseFrame {
        src_gid: LOCAL,
        src_qpn: 3,
        epoch: 1,
        seq,
        ticket,
        status: 0,
        flags: if last { wire::flags::LAST } else { 0 },
        bytes: 64,
        reply_offset: 0,
        reply,
    };
    let mut frames = vec![Frame::Response(answer(0, 0, true, Vec::new()))];
    for seq in 1..5 {
        frames.push(Frame::Response(answer(seq, 1, seq == 4, Vec::new())));
    }
    let request = |seq: u32, op: Op, payload: Vec<u8>| RequestFrame {
        src_gid: REMOTE,
        src_qpn: 4,
        epoch: 1,
        dst_gid: LOCAL,
        dst_qpn: 3,
        seq,
        ticket: u64::from(seq),
        op,
        flags: wire::flags::LAST,
        qkey: 0,
        imm: 0,
        invalidate: 0,
        rkey: 7,
        remote_addr: 0x1000,
        read_len: if op == Op::Read { 64 } else { 0 },
        compare_add: 1,
        swap: 2,
        reply_offset: 0,
        payload,
    };
    for (seq, op) in [Op::Send, Op::Write, Op::Read, Op::CompareSwap, Op::FetchAdd]
        .into_iter()
        .enumerate()
    {
        let payload = if matches!(op, Op::Send | Op::Write) {
            vec![0xab; 64]
        } else {
            Vec::new()
        };
        frames.push(Frame::Request(request(seq as u32, op, payload)));
    }
    frames.push(Frame::Gids(vec![REMOTE, [0x21; 16]]));
    frames.push(Frame::RdmaGids(vec![REMOTE, [0x22; 16]]));
    frames.push(Frame::Ping);
    for frame in &frames {
        wire::encode(frame, &mut p);
    }
    p
}
