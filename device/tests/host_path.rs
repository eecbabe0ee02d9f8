//! The device model's side of the rdma path, in process: a device of the memcpy fabric
//! given a host RDMA device that records every call and lets the test complete work
//! (`Recorder`). What reaches the host (numbers, keys, scatter entries, attributes) and what
//! the guest sees of the host's completions and failures are checked here without any
//! RDMA hardware; `rdma_path.rs` runs the real thing on Soft-RoCE in the lab's host VM.

mod driver;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use driver::Driver;
use driver::fabric_bus::{FabricBus, fabric};
use driver::verbs::{self, PINGPONG_SIZES, QpSpec, ipv4_gid};
use driver::{Cq, Mr, Qp};
use pvrdma_backend::{
    Connect, GuestMemory, HostEvent, HostOp, HostPathError, HostQpCaps, HostQps, HostReceipt,
    HostRegion, HostSend, KeyedSge, RemoteError, SendSide,
};
use vfio_user_pvrdma::abi::{
    self, GID_TYPE_ROCE_V1, PAGE_SIZE, access, qp_state, qp_type, send_flags, wc_flags, wc_opcode,
    wc_status, wr_opcode,
};

/// Every call the device made, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    CreateQp(usize, u32, HostQpCaps),
    CreateUdQp(usize, u32, HostQpCaps),
    ReadyUd(u32, u32, u32),
    DestroyQp(u32),
    Init(u32, u32),
    Connect(u32, Connect),
    Ready(u32, SendSide),
    Stop(u32, bool),
    Send(u32, u64, HostOp, Vec<KeyedSge>),
    Recv(u32, u64, Vec<KeyedSge>),
    Register { pd: u32, iova: u64, length: u64 },
    Deregister(u32),
    Forget(usize),
}

/// A host device that records calls. It holds the GIDs in `offered`, numbers QPs from
/// 0x4000 and keys MRs from 0x7700_0000 (or `next_key`), and refuses connections while
/// `refuse` says why.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    offered: Mutex<Vec<[u8; 16]>>,
    refuse: Mutex<Option<String>>,
    next_key: Mutex<Option<u32>>,
    qpns: AtomicU32,
    keys: AtomicU32,
}

impl Recorder {
    fn log(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn sends(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Send(..)))
            .collect()
    }

    fn recvs(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Recv(..)))
            .collect()
    }
}

impl HostQps for Recorder {
    fn offers(&self, gid: &[u8; 16]) -> bool {
        self.offered.lock().unwrap().contains(gid)
    }

    fn create_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.log(Call::CreateQp(owner, pd, caps));
        Ok(0x4000 + self.qpns.fetch_add(1, Ordering::Relaxed))
    }

    fn create_ud_qp(&self, owner: usize, pd: u32, caps: HostQpCaps) -> Result<u32, HostPathError> {
        self.log(Call::CreateUdQp(owner, pd, caps));
        Ok(0x4000 + self.qpns.fetch_add(1, Ordering::Relaxed))
    }

    fn ready_ud_qp(&self, qpn: u32, qkey: u32, sq_psn: u32) -> Result<(), HostPathError> {
        self.log(Call::ReadyUd(qpn, qkey, sq_psn));
        Ok(())
    }

    fn carries_to(&self, sgid: &[u8; 16], dgid: &[u8; 16]) -> bool {
        self.offers(sgid) && *dgid == ipv4_gid(PEER)
    }

    fn destroy_qp(&self, qpn: u32) {
        self.log(Call::DestroyQp(qpn));
    }

    fn init_qp(&self, qpn: u32, access: u32) -> Result<(), HostPathError> {
        self.log(Call::Init(qpn, access));
        Ok(())
    }

    fn connect_qp(&self, qpn: u32, connect: &Connect) -> Result<(), HostPathError> {
        self.log(Call::Connect(qpn, *connect));
        match self.refuse.lock().unwrap().clone() {
            Some(why) => Err(HostPathError(why)),
            None => Ok(()),
        }
    }

    fn ready_qp(&self, qpn: u32, send: &SendSide) -> Result<(), HostPathError> {
        self.log(Call::Ready(qpn, *send));
        Ok(())
    }

    fn stop_qp(&self, qpn: u32, error: bool) {
        self.log(Call::Stop(qpn, error));
    }

    fn post_send(&self, qpn: u32, send: &HostSend<'_>) -> Result<(), HostPathError> {
        self.log(Call::Send(qpn, send.ticket, send.op, send.sges.to_vec()));
        Ok(())
    }

    fn post_recv(&self, qpn: u32, ticket: u64, sges: &[KeyedSge]) -> Result<(), HostPathError> {
        self.log(Call::Recv(qpn, ticket, sges.to_vec()));
        Ok(())
    }

    fn register(
        &self,
        _owner: usize,
        pd: u32,
        _memory: &GuestMemory,
        _pages: &[u64],
        _page_size: usize,
        _offset: u64,
        length: u64,
        iova: u64,
        _access: u32,
    ) -> Result<HostRegion, HostPathError> {
        self.log(Call::Register { pd, iova, length });
        let key = self.next_key.lock().unwrap().take().unwrap_or_else(|| {
            0x7700_0000 + (self.keys.fetch_add(1, Ordering::Relaxed) << 8) + 0x42
        });
        Ok(HostRegion { key })
    }

    fn deregister(&self, _owner: usize, key: u32) {
        self.log(Call::Deregister(key));
    }

    fn forget_owner(&self, owner: usize) {
        self.log(Call::Forget(owner));
    }
}

const OWN: [u8; 4] = [10, 7, 0, 1];
const PEER: [u8; 4] = [10, 8, 0, 1];
const BUF_VA: u64 = 0x20_0000;

/// One guest: a device whose GID the recorder holds (unless `offered` is false), a user
/// context with a PD, a CQ, an MR and an RC QP.
struct Guest {
    d: Driver<FabricBus>,
    host: Arc<Recorder>,
    cq: Cq,
    mr: Mr,
    qp: Qp,
}

fn guest(offered: bool) -> Guest {
    let mut d = fabric(1, 16 << 20).pop().unwrap();
    let host = Arc::new(Recorder::default());
    if offered {
        host.offered.lock().unwrap().push(ipv4_gid(OWN));
    }
    d.shared_fabric().set_host(host.clone());
    d.probe();
    d.create_bind(0, ipv4_gid(OWN), GID_TYPE_ROCE_V1)
        .expect("CREATE_BIND");
    let uc = d.open_context().expect("CREATE_UC");
    let pd = d.create_pd(uc.handle).expect("CREATE_PD");
    let cq = d.create_cq_on(uc, 64).expect("CREATE_CQ");
    let mr = d
        .reg_user_mr(
            pd,
            BUF_VA,
            4 * PAGE_SIZE,
            access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
        )
        .expect("REG_MR");
    let qp = d
        .create_qp_with(QpSpec::user(
            qp_type::RC,
            uc,
            pd,
            cq.handle,
            driver::QpSizes {
                max_send_wr: 16,
                max_send_sge: 2,
                ..PINGPONG_SIZES
            },
        ))
        .expect("CREATE_QP");
    Guest {
        d,
        host,
        cq,
        mr,
        qp,
    }
}

/// RESET → INIT → RTR → RTS towards QP 0x4321 at `PEER`, send PSN 0x55 and receive PSN 0x66.
fn connect(g: &mut Guest) {
    let d = &mut g.d;
    let init = abi::QpAttr {
        qp_access_flags: access::REMOTE_WRITE | access::REMOTE_READ,
        ..verbs::rc_init_attrs()
    };
    d.modify_qp(g.qp.handle, verbs::RC_INIT_MASK, &init)
        .expect("INIT");
    d.modify_qp(
        g.qp.handle,
        verbs::RC_RTR_MASK,
        &verbs::rc_rtr_attrs(0x4321, 0x66, ipv4_gid(PEER), 0),
    )
    .expect("RTR");
    d.modify_qp(g.qp.handle, verbs::RC_RTS_MASK, &verbs::rc_rts_attrs(0x55))
        .expect("RTS");
}

fn sge(addr: u64, length: u32, lkey: u32) -> abi::Sge {
    abi::Sge { addr, length, lkey }
}

fn keyed(addr: u64, length: u32, lkey: u32) -> KeyedSge {
    KeyedSge { addr, length, lkey }
}

#[test]
fn qps_and_mrs_take_the_host_numbers_and_keys_where_the_host_holds_a_gid() {
    let g = guest(true);
    assert_eq!(g.qp.qpn, 0x4000, "the QP adopted the host QP's number");
    assert_eq!(g.mr.lkey, 0x7700_0042, "the MR adopted the host key");
    assert_eq!(g.mr.rkey, g.mr.lkey);
    let calls = g.host.calls();
    assert!(
        calls.contains(&Call::Register {
            pd: 1,
            iova: BUF_VA,
            length: 4 * PAGE_SIZE
        }),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| matches!(
            c,
            Call::CreateQp(
                0,
                1,
                HostQpCaps {
                    send_wr: 16,
                    recv_wr: 512,
                    send_sge: 2,
                    recv_sge: 1
                }
            )
        )),
        "{calls:?}"
    );

    // Without a GID the host holds, nothing is made on it and nothing is adopted (loading
    // the DSR at probe only releases what the device might have held).
    let other = guest(false);
    assert_eq!(other.host.calls(), [Call::Forget(0)]);
    assert_ne!(other.qp.qpn, 0x4000);
    assert_ne!(other.mr.lkey, 0x7700_0042);
}

#[test]
fn a_carried_qp_hands_its_work_to_the_host_as_written_and_completes_on_its_events() {
    let mut g = guest(true);
    // A receive posted before RTR goes to the host QP at RTR.
    g.d.post_recv(&g.qp, 7, &[sge(BUF_VA, 256, g.mr.lkey)])
        .unwrap();
    assert_eq!(g.host.recvs(), [], "not before the QP is connected");
    connect(&mut g);
    let calls = g.host.calls();
    let connected = calls
        .iter()
        .find_map(|c| match c {
            Call::Connect(0x4000, connect) => Some(*connect),
            _ => None,
        })
        .expect("connected on the host");
    assert_eq!(
        (
            connected.sgid,
            connected.dgid,
            connected.dest_qpn,
            connected.rq_psn
        ),
        (ipv4_gid(OWN), ipv4_gid(PEER), 0x4321, 0x66)
    );
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::Ready(0x4000, SendSide { sq_psn: 0x55, .. }))),
        "{calls:?}"
    );
    let recvs = g.host.recvs();
    assert_eq!(recvs.len(), 1, "{recvs:?}");
    let Call::Recv(0x4000, recv_ticket, recv_sges) = &recvs[0] else {
        panic!("{recvs:?}");
    };
    assert_eq!(recv_sges, &[keyed(BUF_VA, 256, g.mr.lkey)]);
    assert!(g.d.with_device(|dev| dev.qps_on_host()).contains(&0x4000));

    // A SEND with immediate and two SGEs goes to the host QP unchanged; no completion yet.
    let mut wqe = driver::queues::send_wqe(
        11,
        wr_opcode::SEND_WITH_IMM,
        send_flags::SIGNALED,
        &[
            sge(BUF_VA + 100, 10, g.mr.lkey),
            sge(BUF_VA + 4096, 20, g.mr.lkey),
        ],
    );
    let ex = std::mem::offset_of!(abi::SendWqeHeader, ex);
    wqe[ex..ex + 4].copy_from_slice(&0xabcd_0123u32.to_le_bytes());
    g.d.post_send_raw(&g.qp, &wqe).unwrap();
    g.d.ring_qp(&g.qp, abi::uar::QP_SEND);
    let sends = g.host.sends();
    let [Call::Send(0x4000, ticket, op, sges)] = sends.as_slice() else {
        panic!("{sends:?}");
    };
    assert_eq!(
        *op,
        HostOp::Send {
            imm: Some(0xabcd_0123)
        }
    );
    assert_eq!(
        sges,
        &[
            keyed(BUF_VA + 100, 10, g.mr.lkey),
            keyed(BUF_VA + 4096, 20, g.mr.lkey)
        ]
    );
    assert_eq!(
        g.d.drain_cq(&g.cq),
        [],
        "complete only when the host says so"
    );
    g.d.complete_host(
        0x4000,
        &HostEvent::Sent {
            ticket: *ticket,
            result: Ok(()),
        },
    );
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(
        cqes.iter()
            .map(|c| (c.wr_id, c.status, c.opcode, c.byte_len))
            .collect::<Vec<_>>(),
        [(11, wc_status::SUCCESS, wc_opcode::SEND, 30)]
    );

    // The host filled the receive: the guest's RQ head completes with what it says.
    g.d.complete_host(
        0x4000,
        &HostEvent::Received(HostReceipt {
            ticket: *recv_ticket,
            result: Ok(()),
            byte_len: 42,
            imm: Some(0x1111_2222),
            by_write: true,
            src_qp: 0x4321,
        }),
    );
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(cqes.len(), 1, "{cqes:?}");
    let c = &cqes[0];
    assert_eq!(
        (
            c.wr_id, c.status, c.opcode, c.byte_len, c.imm_data, c.wc_flags, c.src_qp
        ),
        (
            7,
            wc_status::SUCCESS,
            wc_opcode::RECV_RDMA_WITH_IMM,
            42,
            0x1111_2222,
            wc_flags::WITH_IMM,
            0x4321
        )
    );
    // A receipt nothing waits for (one receive was posted, and it completed) changes nothing.
    g.d.complete_host(
        0x4000,
        &HostEvent::Received(HostReceipt {
            ticket: *recv_ticket,
            result: Ok(()),
            byte_len: 1,
            imm: None,
            by_write: false,
            src_qp: 0x4321,
        }),
    );
    assert_eq!(g.d.drain_cq(&g.cq), []);
}

#[test]
fn host_errors_and_failures_reach_the_guest_as_the_other_paths_report_them() {
    let mut g = guest(true);
    connect(&mut g);
    g.d.post_send(
        &g.qp,
        21,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 8, g.mr.lkey)],
    )
    .unwrap();
    let sends = g.host.sends();
    let [Call::Send(_, ticket, ..)] = sends.as_slice() else {
        panic!("{sends:?}");
    };
    g.d.complete_host(
        0x4000,
        &HostEvent::Sent {
            ticket: *ticket,
            result: Err(RemoteError::AccessError),
        },
    );
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (21, wc_status::REM_ACCESS_ERR)
    );
    assert_eq!(
        g.d.query_qp(g.qp.handle, 0).unwrap().qp_state,
        qp_state::ERR
    );
    // A late answer for the failed request is stale.
    g.d.complete_host(
        0x4000,
        &HostEvent::Sent {
            ticket: *ticket,
            result: Ok(()),
        },
    );
    assert_eq!(g.d.drain_cq(&g.cq), []);

    // Back through RESET: the host QP is reset too, and connected again.
    g.d.modify_qp(
        g.qp.handle,
        abi::qp_attr_mask::STATE,
        &verbs::state_attrs(qp_state::RESET),
    )
    .unwrap();
    assert!(g.host.calls().contains(&Call::Stop(0x4000, false)));
    connect(&mut g);
    // The host QP failed on its own: QP_FATAL, and the QP is in the error state.
    g.d.complete_host(0x4000, &HostEvent::Failed);
    let events = g.d.poll_async().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.event_type == abi::event::QP_FATAL && e.info == g.qp.handle),
        "{events:?}"
    );
    assert_eq!(
        g.d.query_qp(g.qp.handle, 0).unwrap().qp_state,
        qp_state::ERR
    );
}

#[test]
fn an_mr_the_host_does_not_hold_fails_locally_and_nothing_is_posted() {
    let mut g = guest(true);
    connect(&mut g);
    // A second MR whose registration the host keyed like the first: not adopted.
    *g.host.next_key.lock().unwrap() = Some(g.mr.lkey);
    let pd = 1;
    let other =
        g.d.reg_user_mr(pd, 0x40_0000, PAGE_SIZE, access::LOCAL_WRITE)
            .expect("REG_MR keeps the device's key");
    assert_ne!(other.lkey, g.mr.lkey);
    assert!(
        g.host.calls().contains(&Call::Deregister(g.mr.lkey)),
        "the colliding registration is dropped"
    );
    g.d.post_send(
        &g.qp,
        31,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(0x40_0000, 8, other.lkey)],
    )
    .unwrap();
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (31, wc_status::LOC_PROT_ERR)
    );
    assert_eq!(g.host.sends(), []);
}

#[test]
fn a_refused_connection_leaves_the_qp_to_the_other_paths() {
    let mut g = guest(true);
    *g.host.refuse.lock().unwrap() = Some("no peer server said so".into());
    connect(&mut g);
    assert!(g.d.with_device(|dev| dev.qps_on_host()).is_empty());
    g.d.post_send(
        &g.qp,
        41,
        wr_opcode::SEND,
        send_flags::SIGNALED,
        &[sge(BUF_VA, 8, g.mr.lkey)],
    )
    .unwrap();
    assert_eq!(g.host.sends(), [], "the host carries nothing");
    // Nobody else holds the peer's GID here: the network says unreachable.
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(
        (cqes[0].wr_id, cqes[0].status),
        (41, wc_status::RETRY_EXC_ERR)
    );
}

#[test]
fn a_reset_device_releases_what_the_host_holds_for_it_and_destroy_releases_each_object() {
    let mut g = guest(true);
    g.d.destroy_qp(g.qp.handle).expect("DESTROY_QP");
    g.d.destroy_mr(g.mr.handle).expect("DESTROY_MR");
    let calls = g.host.calls();
    assert!(calls.contains(&Call::DestroyQp(0x4000)), "{calls:?}");
    assert!(calls.contains(&Call::Deregister(g.mr.lkey)), "{calls:?}");
    // pvrdma_pci_remove: the device is reset.
    g.d.remove();
    assert!(g.host.calls().contains(&Call::Forget(0)));
}

/// A UD QP takes a host QP too; a datagram to a destination the host reaches goes to it
/// (with the address vector's GID and QPN and the Q_Key), one to elsewhere takes the other
/// paths, and a datagram the host received reaches the guest's receive queue with its GRH.
#[test]
fn a_ud_qp_sends_through_the_host_where_it_reaches_and_receives_its_datagrams() {
    let mut g = guest(true);
    let uc = g.qp.uc;
    let ud =
        g.d.create_qp_with(QpSpec::user(
            qp_type::UD,
            uc,
            g.qp.pd,
            g.cq.handle,
            PINGPONG_SIZES,
        ))
        .expect("CREATE_QP UD");
    assert_eq!(ud.qpn, 0x4001, "the UD QP adopted the host QP's number");
    g.d.ud_activate(&ud, 0x2222).expect("UD to RTS");
    assert!(
        g.host
            .calls()
            .iter()
            .any(|c| matches!(c, Call::ReadyUd(0x4001, 0x2222, _)))
    );

    let datagram = |g: &mut Guest, wr_id: u64, to: [u8; 4]| {
        let mut wqe = driver::queues::send_wqe(
            wr_id,
            wr_opcode::SEND,
            send_flags::SIGNALED,
            &[sge(BUF_VA, 10, g.mr.lkey)],
        );
        let av = abi::AddressVector {
            port_pd: g.qp.pd | 1 << 24,
            dgid: ipv4_gid(to),
            hop_limit: 64,
            ..abi::AddressVector::default()
        };
        wqe[32..36].copy_from_slice(&0x4777u32.to_le_bytes());
        wqe[36..40].copy_from_slice(&0x2222u32.to_le_bytes());
        wqe[40..80].copy_from_slice(zerocopy::IntoBytes::as_bytes(&av));
        g.d.post_send_raw(&ud, &wqe).unwrap();
        g.d.ring_qp(&ud, abi::uar::QP_SEND);
    };
    datagram(&mut g, 61, PEER);
    let sends = g.host.sends();
    let [Call::Send(0x4001, ticket, op, _)] = sends.as_slice() else {
        panic!("{sends:?}");
    };
    assert_eq!(
        *op,
        HostOp::Datagram {
            sgid: ipv4_gid(OWN),
            dgid: ipv4_gid(PEER),
            remote_qpn: 0x4777,
            qkey: 0x2222,
            imm: None
        }
    );
    g.d.complete_host(
        0x4001,
        &HostEvent::Sent {
            ticket: *ticket,
            result: Ok(()),
        },
    );
    assert_eq!(g.d.drain_cq(&g.cq)[0].wr_id, 61);
    // Elsewhere: not through the host (nobody here holds it: dropped, a successful send).
    datagram(&mut g, 62, [10, 9, 9, 9]);
    assert_eq!(g.host.sends().len(), 1);
    assert_eq!(
        g.d.drain_cq(&g.cq)
            .iter()
            .map(|c| (c.wr_id, c.status))
            .collect::<Vec<_>>(),
        [(62, wc_status::SUCCESS)]
    );

    // The host received a datagram: the guest's receive gets the GRH and the payload.
    g.d.post_recv(&ud, 63, &[sge(BUF_VA + 2048, 256, g.mr.lkey)])
        .unwrap();
    g.d.complete_host(
        0x4001,
        &HostEvent::Datagram(pvrdma_backend::HostDatagram {
            sgid: ipv4_gid(PEER),
            dgid: ipv4_gid(OWN),
            src_qp: 0x4777,
            imm: Some(9),
            payload: b"from the host".as_slice().into(),
        }),
    );
    let cqes = g.d.drain_cq(&g.cq);
    assert_eq!(
        cqes.iter()
            .map(|c| (c.wr_id, c.status, c.src_qp, c.byte_len, c.imm_data))
            .collect::<Vec<_>>(),
        [(63, wc_status::SUCCESS, 0x4777, 40 + 13, 9)]
    );
    let landed = driver::memory::snapshot(
        g.d.ram(),
        g.mr.buffer.as_ref().unwrap().translate(BUF_VA + 2048),
        53,
    );
    assert_eq!(&landed[8..24], &ipv4_gid(PEER), "the GRH names the sender");
    assert_eq!(&landed[40..53], b"from the host");
}
