//! The directory's membership against a real etcd: several servers (played in this process,
//! without transports) register their GIDs under their leases. Two servers claiming one GID
//! at the same moment end with exactly one holder, and the other refuses it until the
//! holder leaves; every view names the same holder. Ignored by a plain `cargo test`;
//! scripts/test runs it with `--ignored`.

mod etcd_server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use etcd_server::EtcdServer;
use pvrdma_backend::Gid;
use pvrdma_backend::directory::membership::EtcdMembership;
use pvrdma_backend::directory::{Directory, Holder};

fn member(etcd: &EtcdServer, id: u64) -> EtcdMembership {
    let me = Holder {
        server: id,
        addr: SocketAddr::from(([127, 0, 0, id as u8], 4791)),
    };
    EtcdMembership::start(etcd.client(), "/race/", me, false)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn holder(member: &EtcdMembership, gid: &Gid) -> Option<u64> {
    member
        .gid_holders()
        .and_then(|h| h.holders.get(gid).map(|h| h.server))
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn two_servers_claiming_one_gid_at_once_end_with_one_holder_until_it_leaves() {
    let etcd = EtcdServer::start("race");
    let contested: Gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42];
    let own = move |id: u8| -> Gid {
        let mut gid = contested;
        gid[14] = id;
        gid
    };
    let members: Vec<Arc<EtcdMembership>> = (1..=2).map(|id| Arc::new(member(&etcd, id))).collect();
    // Both guests add the same GID in the same instant (each with one of its own).
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let publishers: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (m, barrier) = (Arc::clone(m), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                // Its own GID is on its host's RDMA device as well.
                m.publish_gids(&[contested, own(i as u8 + 1)], &[own(i as u8 + 1)]);
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    wait_until("both servers settled", Duration::from_secs(10), || {
        members
            .iter()
            .all(|m| m.registered_gids() + m.refused_gids().len() == 2)
            && members.iter().all(|m| m.gid_count() == 3)
    });
    let winners: Vec<u64> = (1..=2)
        .filter(|&id| members[id as usize - 1].refused_gids().is_empty())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one server holds the GID");
    let (winner, loser) = (winners[0], 3 - winners[0]);
    let (w, l) = (&members[winner as usize - 1], &members[loser as usize - 1]);
    assert_eq!(l.refused_gids(), [contested]);
    assert_eq!((w.registered_gids(), l.registered_gids()), (2, 1));
    for m in &members {
        assert_eq!(
            holder(m, &contested),
            Some(winner),
            "every view names the holder"
        );
    }
    // Each still holds its own GID, which nobody contested, and says its RDMA device holds it.
    assert_eq!(holder(w, &own(loser as u8)), Some(loser));
    assert_eq!(holder(l, &own(winner as u8)), Some(winner));
    let rdma =
        |m: &EtcdMembership, gid: &Gid| m.gid_holders().is_some_and(|h| h.rdma.contains(gid));
    assert!(rdma(w, &own(loser as u8)) && !rdma(w, &contested));

    // The holder leaves (its lease revoked): the other claims the GID within a second or so.
    w.leave();
    wait_until(
        "the GID passed to the other server",
        Duration::from_secs(5),
        || l.refused_gids().is_empty() && holder(l, &contested) == Some(loser),
    );
    assert_eq!(l.registered_gids(), 2);

    // A GID the guest removes leaves etcd; one the RDMA device no longer holds says so.
    l.publish_gids(&[own(loser as u8)], &[]);
    wait_until("the removed GID released", Duration::from_secs(5), || {
        l.registered_gids() == 1 && l.gid_count() == 1 && !rdma(l, &own(loser as u8))
    });
    let listing = etcd.client().list(b"/race/gids/").expect("list");
    assert_eq!(listing.kvs.len(), 1);
}
