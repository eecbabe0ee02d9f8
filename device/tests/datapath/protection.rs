//! Memory protection between guests (device-abi §10.3 rule 19): a requester reaches the responder's
//! memory only through an rkey of an MR in the responder QP's PD, within the MR, with the
//! right the operation needs, for as long as the MR lives. One test per rule; each checks,
//! byte for byte over the whole RAM of every device, that a refused request changed nothing
//! but the requester's error completion — in particular neither the target MR nor the
//! requester's reply buffer of a refused READ.

use vfio_user_pvrdma::abi::{
    PAGE_SIZE, QpAttr, access, qp_attr_mask, qp_type, wc_opcode, wc_status, wr_opcode,
};

use crate::driver::bus::Bus;
use crate::harness::{ALL_ACCESS, Buf, Net, Pair, QpOpts, Wr};
use crate::operations::summary;

both_topologies!(
    rkey_bounds_are_enforced,
    access_rights_are_enforced,
    rkeys_of_another_pd_or_context_are_refused,
    stale_rkey_after_destroy_mr_is_refused,
    recreated_mr_does_not_answer_the_old_key,
    dma_mr_is_not_reachable_remotely,
    responder_qp_access_flags_gate_one_sided_operations,
);

/// Posts `wr` (unsignaled: failures complete anyway), expects REM_ACCESS_ERR, and brings
/// A's QP back to RTS.
fn refused<B: Bus>(p: &mut Pair<B>, what: &str, wr: Wr) {
    let wr_id = wr.hdr.wr_id;
    p.post_a(&[wr.flags(0)]);
    let sends = p.sends_a();
    assert_eq!(
        sends
            .iter()
            .map(|c| (c.wr_id, c.status))
            .collect::<Vec<_>>(),
        [(wr_id, wc_status::REM_ACCESS_ERR)],
        "{what}"
    );
    p.recover_a();
}

/// Expects `wr` to succeed (a sanity check that the key is otherwise good).
fn allowed<B: Bus>(p: &mut Pair<B>, what: &str, wr: Wr) {
    let wr_id = wr.hdr.wr_id;
    p.post_a(&[wr]);
    let sends = p.sends_a();
    assert_eq!(
        sends
            .iter()
            .map(|c| (c.wr_id, c.status))
            .collect::<Vec<_>>(),
        [(wr_id, wc_status::SUCCESS)],
        "{what}"
    );
}

fn write(src: &Buf, len: u32, addr: u64, rkey: u32) -> Wr {
    Wr::new(1, wr_opcode::RDMA_WRITE, &[src.sge(0, len)]).rdma(addr, rkey)
}

fn read(reply: &Buf, len: u32, addr: u64, rkey: u32) -> Wr {
    Wr::new(2, wr_opcode::RDMA_READ, &[reply.sge(0, len)]).rdma(addr, rkey)
}

fn cas(reply: &Buf, addr: u64, rkey: u32) -> Wr {
    Wr::new(3, wr_opcode::ATOMIC_CMP_AND_SWP, &[reply.sge(0, 8)]).atomic(addr, 0, !0, rkey)
}

fn faa(reply: &Buf, addr: u64, rkey: u32) -> Wr {
    Wr::new(4, wr_opcode::ATOMIC_FETCH_AND_ADD, &[reply.sge(0, 8)]).atomic(addr, 1, 0, rkey)
}

fn rkey_bounds_are_enforced<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 3 * PAGE_SIZE, access::LOCAL_WRITE);
    let target = p.net.mr(&p.b, 2 * PAGE_SIZE + 96, ALL_ACCESS);
    let (t, key) = (target.clone(), target.rkey());
    allowed(&mut p, "WRITE at the start", write(&src, 16, t.at(0), key));
    allowed(
        &mut p,
        "READ of the last bytes",
        read(&src, 16, t.end() - 16, key),
    );
    allowed(
        &mut p,
        "FETCH_AND_ADD on the last word",
        faa(&src, t.end() - 8, key),
    );
    p.net.fill(&src, 0x71);
    p.net.fill(&target, 0x72);
    p.recv_b(1, &[]);
    let watch = p.net.watch();

    let long = (t.len + 1) as u32;
    refused(
        &mut p,
        "WRITE across the end",
        write(&src, 16, t.end() - 8, key),
    );
    refused(
        &mut p,
        "WRITE one byte past the end",
        write(&src, 1, t.end(), key),
    );
    refused(
        &mut p,
        "WRITE across the start",
        write(&src, 16, t.at(0) - 8, key),
    );
    refused(
        &mut p,
        "WRITE longer than the MR",
        write(&src, long, t.at(0), key),
    );
    refused(
        &mut p,
        "WRITE at an address that wraps",
        write(&src, 16, u64::MAX - 7, key),
    );
    refused(
        &mut p,
        "WRITE_WITH_IMM across the end",
        Wr::new(5, wr_opcode::RDMA_WRITE_WITH_IMM, &[src.sge(0, 16)]).rdma(t.end() - 8, key),
    );
    refused(
        &mut p,
        "READ across the end",
        read(&src, 16, t.end() - 8, key),
    );
    refused(
        &mut p,
        "READ before the start",
        read(&src, 16, t.at(0) - 16, key),
    );
    refused(
        &mut p,
        "READ longer than the MR",
        read(&src, long, t.at(0), key),
    );
    refused(&mut p, "CMP_AND_SWP past the end", cas(&src, t.end(), key));
    refused(
        &mut p,
        "FETCH_AND_ADD before the start",
        faa(&src, t.at(0) - 8, key),
    );
    p.net.assert_unchanged_except(&watch, &[]);
    assert_eq!(p.recvs_b(), [], "the WRITE_WITH_IMM consumed no receive");
}

fn access_rights_are_enforced<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let read_only = p.net.mr(&p.b, 256, access::REMOTE_READ);
    let write_only = p
        .net
        .mr(&p.b, 256, access::LOCAL_WRITE | access::REMOTE_WRITE);
    let no_atomic = p.net.mr(
        &p.b,
        256,
        access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
    );
    let local_only = p.net.mr(&p.b, 256, access::LOCAL_WRITE);
    let nothing = p.net.mr(&p.b, 256, 0);
    allowed(
        &mut p,
        "READ with REMOTE_READ",
        read(&src, 64, read_only.at(0), read_only.rkey()),
    );
    allowed(
        &mut p,
        "WRITE with REMOTE_WRITE",
        write(&src, 64, write_only.at(0), write_only.rkey()),
    );
    allowed(
        &mut p,
        "READ with REMOTE_READ",
        read(&src, 64, no_atomic.at(0), no_atomic.rkey()),
    );
    for buf in [
        &src,
        &read_only,
        &write_only,
        &no_atomic,
        &local_only,
        &nothing,
    ] {
        p.net.fill(buf, buf.mr.handle as u8);
    }
    p.recv_b(1, &[]);
    let watch = p.net.watch();

    for (name, buf) in [
        ("REMOTE_READ only", &read_only),
        ("LOCAL_WRITE only", &local_only),
        ("no access", &nothing),
    ] {
        refused(
            &mut p,
            &format!("WRITE to {name}"),
            write(&src, 8, buf.at(0), buf.rkey()),
        );
        refused(
            &mut p,
            &format!("WRITE_WITH_IMM to {name}"),
            Wr::new(5, wr_opcode::RDMA_WRITE_WITH_IMM, &[src.sge(0, 8)])
                .rdma(buf.at(0), buf.rkey()),
        );
    }
    for (name, buf) in [
        ("REMOTE_WRITE only", &write_only),
        ("LOCAL_WRITE only", &local_only),
        ("no access", &nothing),
    ] {
        refused(
            &mut p,
            &format!("READ from {name}"),
            read(&src, 8, buf.at(0), buf.rkey()),
        );
    }
    for (name, buf) in [
        ("no REMOTE_ATOMIC", &no_atomic),
        ("REMOTE_READ only", &read_only),
        ("REMOTE_WRITE only", &write_only),
    ] {
        refused(
            &mut p,
            &format!("CMP_AND_SWP on {name}"),
            cas(&src, buf.at(8), buf.rkey()),
        );
        refused(
            &mut p,
            &format!("FETCH_AND_ADD on {name}"),
            faa(&src, buf.at(8), buf.rkey()),
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);
    assert_eq!(p.recvs_b(), []);
}

fn rkeys_of_another_pd_or_context_are_refused<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let b = p.b.clone();
    let pd2 = p.net.another_pd(&b);
    let other_pd = p.net.mr_in(&b, pd2, 256, ALL_ACCESS);
    let ctx2 = p.net.ctx(b.host);
    let other_ctx = p.net.mr(&ctx2, 256, ALL_ACCESS);
    let mut foreign = vec![("another PD", other_pd), ("another context", other_ctx)];
    if p.net.is_loopback() {
        // On one device the requester's own MR is just another context's.
        let own = p.net.mr(&p.a.clone(), 256, ALL_ACCESS);
        foreign.push(("the requester's own MR", own));
    }
    for (_, buf) in &foreign {
        p.net.fill(buf, 0x73);
    }
    p.net.fill(&src, 0x74);
    let watch = p.net.watch();
    for (name, buf) in &foreign {
        refused(
            &mut p,
            &format!("WRITE to {name}"),
            write(&src, 8, buf.at(0), buf.rkey()),
        );
        refused(
            &mut p,
            &format!("READ from {name}"),
            read(&src, 8, buf.at(0), buf.rkey()),
        );
        refused(
            &mut p,
            &format!("FETCH_AND_ADD on {name}"),
            faa(&src, buf.at(0), buf.rkey()),
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);
}

fn stale_rkey_after_destroy_mr_is_refused<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let target = p.net.mr(&p.b, PAGE_SIZE, ALL_ACCESS);
    let (t, key) = (target.clone(), target.rkey());
    allowed(
        &mut p,
        "WRITE while the MR lives",
        write(&src, 8, t.at(0), key),
    );
    p.net
        .dev(t.dev)
        .destroy_mr(t.mr.handle)
        .expect("DESTROY_MR");
    // The pages are the guest's again; the device must not reach them through the old key.
    p.net.fill(&target, 0x75);
    p.net.fill(&src, 0x76);
    let watch = p.net.watch();
    refused(
        &mut p,
        "WRITE with a destroyed MR's rkey",
        write(&src, 8, t.at(0), key),
    );
    refused(
        &mut p,
        "READ with a destroyed MR's rkey",
        read(&src, 8, t.at(0), key),
    );
    refused(
        &mut p,
        "CMP_AND_SWP with a destroyed MR's rkey",
        cas(&src, t.at(0), key),
    );
    p.net.assert_unchanged_except(&watch, &[]);
}

fn recreated_mr_does_not_answer_the_old_key<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let old = p.net.mr(&p.b, PAGE_SIZE, ALL_ACCESS);
    p.net
        .dev(old.dev)
        .destroy_mr(old.mr.handle)
        .expect("DESTROY_MR");
    let new = p.net.mr(&p.b.clone(), PAGE_SIZE, ALL_ACCESS);
    assert_eq!(new.mr.handle, old.mr.handle, "the handle is reused");
    assert_ne!(new.rkey(), old.rkey(), "but the key is not");
    p.net.fill(&old, 0x77);
    p.net.fill(&new, 0x78);
    p.net.fill(&src, 0x79);
    let watch = p.net.watch();
    let stale = old.rkey();
    for (name, addr) in [("the old range", old.at(0)), ("the new range", new.at(0))] {
        refused(
            &mut p,
            &format!("WRITE to {name} with the old key"),
            write(&src, 8, addr, stale),
        );
        refused(
            &mut p,
            &format!("READ of {name} with the old key"),
            read(&src, 8, addr, stale),
        );
        refused(
            &mut p,
            &format!("FETCH_AND_ADD on {name} with the old key"),
            faa(&src, addr, stale),
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);
    allowed(
        &mut p,
        "the new key works",
        write(&src, 8, new.at(0), new.rkey()),
    );
    assert_eq!(p.net.read(&new, 0, 8), p.net.read(&src, 0, 8));
}

fn dma_mr_is_not_reachable_remotely<B: Bus>(mut net: Net<B>) {
    // B is a kernel consumer: an RC QP in the kernel PD, which has the DMA MR (device-abi §9.6).
    let (ha, hb) = (net.host_a(), net.host_b());
    let a = net.ctx(ha);
    let k = net.kernel_ctx(hb);
    let qa = net.qp(&a, qp_type::RC, QpOpts::default());
    let qk = net.qp(&k, qp_type::RC, QpOpts::default());
    net.connect(&a, &qa, hb.gid, qk.qpn);
    net.connect(&k, &qk, ha.gid, qa.qpn);
    let dma = net.dev(hb.dev).get_dma_mr(k.pd).expect("DMA MR");
    let mut p = Pair {
        net,
        a,
        b: k,
        qa,
        qb: qk,
    };
    let src = p.net.mr(&p.a.clone(), 256, access::LOCAL_WRITE);
    // Guest-physical addresses of B: a page nobody uses, and its QP's page directory.
    let d = p.net.dev(hb.dev);
    let spare = d.alloc.page(d.bus.ram());
    let pdir = p.qb.layout.ring.pdir.dir;
    p.net.fill(&src, 0x7a);
    let watch = p.net.watch();
    for (name, addr) in [("a spare page", spare), ("a page directory", pdir)] {
        refused(
            &mut p,
            &format!("WRITE to {name} with the DMA key"),
            write(&src, 8, addr, dma.rkey),
        );
        refused(
            &mut p,
            &format!("READ of {name} with the DMA key"),
            read(&src, 8, addr, dma.rkey),
        );
        refused(
            &mut p,
            &format!("FETCH_AND_ADD on {name} with the DMA key"),
            faa(&src, addr, dma.rkey),
        );
    }
    p.net.assert_unchanged_except(&watch, &[]);
    // The kernel QP itself works.
    p.net.recv(&p.b.clone(), &p.qb.clone(), 1, &[]);
    allowed(
        &mut p,
        "a SEND to the kernel QP",
        Wr::new(6, wr_opcode::SEND, &[]),
    );
    assert_eq!(
        summary(&p.recvs_b()),
        [(1, wc_opcode::RECV, wc_status::SUCCESS)]
    );
}

fn responder_qp_access_flags_gate_one_sided_operations<B: Bus>(net: Net<B>) {
    let mut p = Pair::rc(net, QpOpts::default());
    let src = p.net.mr(&p.a, 256, access::LOCAL_WRITE);
    let target = p.net.mr(&p.b, 256, ALL_ACCESS);
    let (t, key) = (target.clone(), target.rkey());
    p.net.fill(&src, 0x7b);
    p.net.fill(&target, 0x7c);
    let watch = p.net.watch();
    let all = access::REMOTE_WRITE | access::REMOTE_READ | access::REMOTE_ATOMIC;
    // The MR allows everything; the responder QP's access flags (MODIFY_QP ACCESS_FLAGS)
    // withhold one right at a time.
    for (withheld, what, wr) in [
        (access::REMOTE_WRITE, "WRITE", write(&src, 8, t.at(0), key)),
        (access::REMOTE_READ, "READ", read(&src, 8, t.at(0), key)),
        (
            access::REMOTE_ATOMIC,
            "CMP_AND_SWP",
            cas(&src, t.at(0), key),
        ),
        (
            access::REMOTE_ATOMIC,
            "FETCH_AND_ADD",
            faa(&src, t.at(8), key),
        ),
    ] {
        let flags = QpAttr {
            qp_access_flags: all & !withheld,
            ..QpAttr::default()
        };
        let (b, qb) = (p.b.clone(), p.qb.clone());
        p.net
            .dev(b.dev())
            .modify_qp(qb.handle, qp_attr_mask::ACCESS_FLAGS, &flags)
            .expect("MODIFY_QP ACCESS_FLAGS");
        refused(&mut p, &format!("{what} to a QP without the right"), wr);
    }
    p.net.assert_unchanged_except(&watch, &[]);
}

/// The watch itself: a byte changed in a guard page (not a ring, not an allowed buffer) of
/// the other device is found.
#[test]
#[should_panic(expected = "device 1 changed guest memory it had no right to")]
fn the_watch_sees_a_stray_byte() {
    let mut p = Pair::rc(Net::two_devices(), QpOpts::default());
    let target = p.net.mr(&p.b.clone(), 64, ALL_ACCESS);
    let watch = p.net.watch();
    p.net.assert_unchanged_except(&watch, &[]);
    let d = p.net.dev(1);
    let guard = d.bus.memory().end() - 100;
    crate::driver::memory::write_bytes(d.ram(), guard, &[0]);
    p.net.assert_unchanged_except(&watch, &[&target]);
}
