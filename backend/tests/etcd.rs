//! The cluster directory's etcd client against a real etcd (Debian's etcd-server, which
//! scripts/test installs), started per test on loopback ports of its own. Ignored by a plain
//! `cargo test`; scripts/test runs them with `--ignored`. The TLS tests make their
//! certificates with the openssl command (Debian's openssl, which scripts/test installs).

mod etcd_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_server::{EtcdServer, free_port, temp_folder};

use pvrdma_backend::directory::etcd::{
    Etcd, EtcdConfig, EtcdError, EtcdTls, EtcdUser, Event, TlsError,
};

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn keys_are_put_listed_by_prefix_and_deleted() {
    let server = EtcdServer::start("kv");
    let etcd = server.client();
    let r1 = etcd.put(b"pvrdma/gid/a", b"server-1", 0).expect("put a");
    let r2 = etcd.put(b"pvrdma/gid/b", b"server-2", 0).expect("put b");
    etcd.put(b"pvrdma0", b"outside the prefix", 0)
        .expect("put outside");
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let listing = etcd.list(b"pvrdma/").expect("list");
    assert_eq!(
        listing.revision,
        r2 + 1,
        "the listing's revision is the store's"
    );
    let keys: Vec<&[u8]> = listing.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [&b"pvrdma/gid/a"[..], b"pvrdma/gid/b"]);
    assert_eq!(listing.kvs[1].value, b"server-2");
    assert!(etcd.delete(b"pvrdma/gid/a").expect("delete"));
    assert!(!etcd.delete(b"pvrdma/gid/a").expect("delete again"));
    assert_eq!(etcd.list(b"pvrdma/").expect("list").kvs.len(), 1);
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn a_key_is_created_once_and_the_second_claimant_learns_the_owner() {
    let server = EtcdServer::start("claim");
    let etcd = server.client();
    let gid = b"pvrdma/gid/fe80::1";
    assert_eq!(
        etcd.put_if_absent(gid, b"server-1", 0).expect("claim"),
        (true, None)
    );
    assert_eq!(
        etcd.put_if_absent(gid, b"server-2", 0)
            .expect("claim again"),
        (false, Some(b"server-1".to_vec()))
    );
    assert_eq!(etcd.list(gid).expect("list").kvs[0].value, b"server-1");

    // Many at once: all created in one revision when none exists; nothing written when
    // one does.
    let entry = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
    let fresh = [
        entry("pvrdma/gid/fe80::2", "s1"),
        entry("pvrdma/gid/fe80::3", "s1"),
    ];
    assert!(etcd.put_all_if_absent(&fresh, 0).expect("claim both"));
    let listing = etcd.list(b"pvrdma/gid/").expect("list");
    assert_eq!(listing.kvs.len(), 3);
    assert_eq!(listing.kvs[1].mod_revision, listing.kvs[2].mod_revision);
    let mixed = [
        entry("pvrdma/gid/fe80::4", "s2"),
        entry("pvrdma/gid/fe80::3", "s2"),
    ];
    assert!(!etcd.put_all_if_absent(&mixed, 0).expect("claim again"));
    let listing = etcd.list(b"pvrdma/gid/").expect("list");
    assert_eq!(listing.kvs.len(), 3, "fe80::4 was not written");
    assert_eq!(listing.kvs[2].value, b"s1");
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn keys_under_a_lease_live_while_it_is_kept_alive_and_vanish_after() {
    let server = EtcdServer::start("lease");
    let etcd = server.client();
    let kept = etcd.grant(2).expect("grant");
    let dropped = etcd.grant(2).expect("grant");
    etcd.put(b"pvrdma/server/kept", b"1", kept).expect("put");
    etcd.put(b"pvrdma/server/dropped", b"1", dropped)
        .expect("put");
    assert_eq!(
        etcd.list(b"pvrdma/server/").expect("list").kvs[0].lease,
        dropped
    );
    // Renew one lease for 5 s; the other expires within its 2 s TTL (etcd checks
    // expiry every 500 ms).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert!(etcd.keep_alive(kept).expect("keep alive") > 0);
        std::thread::sleep(Duration::from_millis(500));
    }
    let keys: Vec<Vec<u8>> = etcd
        .list(b"pvrdma/server/")
        .expect("list")
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [b"pvrdma/server/kept".to_vec()]);
    assert!(matches!(
        etcd.keep_alive(dropped),
        Err(EtcdError::LeaseGone(_))
    ));
    // Revoking deletes at once.
    etcd.revoke(kept).expect("revoke");
    assert!(etcd.list(b"pvrdma/server/").expect("list").kvs.is_empty());
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn a_watch_from_a_listing_sees_every_later_change_and_a_compacted_start_is_named() {
    let server = EtcdServer::start("watch");
    let etcd = server.client();
    etcd.put(b"pvrdma/gid/a", b"1", 0).expect("put");
    let listing = etcd.list(b"pvrdma/").expect("list");
    let mut watch = etcd.watch(b"pvrdma/", listing.revision + 1).expect("watch");
    let writer = {
        let etcd = etcd.clone();
        std::thread::spawn(move || {
            etcd.put(b"pvrdma/gid/b", b"2", 0).expect("put b");
            etcd.put(b"elsewhere", b"x", 0).expect("put elsewhere");
            etcd.delete(b"pvrdma/gid/a").expect("delete a");
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(watch.changes().expect("events"));
    }
    writer.join().expect("writer");
    assert!(matches!(&seen[0], Event::Put(kv) if kv.key == b"pvrdma/gid/b" && kv.value == b"2"));
    assert!(matches!(&seen[1], Event::Delete { key, .. } if key == b"pvrdma/gid/a"));
    assert_eq!(seen.len(), 2, "nothing outside the prefix: {seen:?}");

    // After a compaction, a watch from before it is refused with the revision etcd keeps.
    let now = etcd.put(b"pvrdma/gid/c", b"3", 0).expect("put c");
    let compacted = ureq::post(&format!("{}/v3/kv/compaction", server.endpoint))
        .send_json(serde_json::json!({ "revision": now.to_string(), "physical": true }))
        .expect("compaction");
    assert_eq!(compacted.status().as_u16(), 200);
    // (etcd confirms the watch first, then cancels it: the refusal is the next message.)
    let refused = etcd
        .watch(b"pvrdma/", 2)
        .and_then(|mut watch| watch.changes());
    match refused {
        Err(EtcdError::Compacted { compact_revision }) => assert_eq!(compact_revision, now),
        Err(other) => panic!("a compacted start: {other}"),
        Ok(events) => panic!("a watch from a compacted revision gave {events:?}"),
    }
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn a_dead_endpoint_is_named_and_the_next_one_is_tried() {
    let server = EtcdServer::start("endpoints");
    let dead = format!("127.0.0.1:{}", free_port());
    let alone = Etcd::new(std::slice::from_ref(&dead), Duration::from_secs(2));
    match alone.list(b"x/") {
        Err(EtcdError::Unreachable { endpoint, .. }) => {
            assert_eq!(endpoint, format!("http://{dead}"));
        }
        other => panic!("a dead endpoint: {other:?}"),
    }
    let both = Etcd::new(&[dead, server.endpoint.clone()], Duration::from_secs(2));
    both.put(b"x/k", b"v", 0)
        .expect("put through the live endpoint");
    assert_eq!(both.list(b"x/").expect("list").kvs.len(), 1);
}

/// Runs openssl in `dir`; panics with its error output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install Debian's openssl"));
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A certificate authority in `dir`: `NAME.pem` and `NAME.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A certificate for `name` signed by the CA `ca`, with `extensions` (an openssl
/// extension file's lines): `NAME.pem` and `NAME.key` in `dir`.
fn make_cert(dir: &Path, ca: &str, name: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).expect("the extension file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The certificates of the TLS tests, in a folder of their own: a CA, etcd's certificate
/// (for 127.0.0.1; etcd's gateway also shows it to etcd as a client), a client's, and a
/// second CA that signed neither.
struct Pki(PathBuf);

impl Pki {
    fn make(tag: &str) -> Pki {
        let dir = temp_folder(tag);
        make_ca(&dir, "ca");
        make_ca(&dir, "other-ca");
        make_cert(
            &dir,
            "ca",
            "etcd",
            "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth, clientAuth\n",
        );
        make_cert(&dir, "ca", "client", "extendedKeyUsage = clientAuth\n");
        Pki(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.0.join(file)).expect("a file of the test's PKI")
    }

    /// Trusting the CA `ca`, presenting the client certificate when `client`.
    fn tls(&self, ca: &str, client: bool) -> EtcdTls {
        let tls = EtcdTls::with_ca(&self.read(&format!("{ca}.pem"))).expect("the CA");
        match client {
            true => tls
                .with_client_cert(&self.read("client.pem"), &self.read("client.key"))
                .expect("the client certificate"),
            false => tls,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// etcd on https only, asking clients for a certificate its CA signed.
fn start_tls_etcd(tag: &str, pki: &Pki) -> EtcdServer {
    let server = EtcdServer::spawn(
        tag,
        "https",
        &[
            "--cert-file".into(),
            pki.path("etcd.pem"),
            "--key-file".into(),
            pki.path("etcd.key"),
            "--trusted-ca-file".into(),
            pki.path("ca.pem"),
            "--client-cert-auth".into(),
        ],
    );
    server.wait_for(&server.client_with(Some(pki.tls("ca", true)), None));
    server
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn over_tls_with_a_client_certificate_keys_are_put_listed_and_watched() {
    let pki = Pki::make("pki-kv");
    let server = start_tls_etcd("tls-kv", &pki);
    let etcd = server.client_with(Some(pki.tls("ca", true)), None);
    let first = etcd
        .put(b"pvrdma/gid/a", b"server-1", 0)
        .expect("put over TLS");
    let listing = etcd.list(b"pvrdma/").expect("list over TLS");
    assert_eq!(listing.revision, first);
    assert_eq!(listing.kvs.len(), 1);
    assert_eq!(listing.kvs[0].value, b"server-1");
    let mut watch = etcd
        .watch(b"pvrdma/", listing.revision + 1)
        .expect("watch over TLS");
    let writer = {
        let etcd = etcd.clone();
        std::thread::spawn(move || etcd.put(b"pvrdma/gid/b", b"server-2", 0))
    };
    let events = watch.changes().expect("events over TLS");
    writer.join().expect("writer").expect("put b");
    assert!(
        matches!(&events[..], [Event::Put(kv)] if kv.key == b"pvrdma/gid/b"),
        "{events:?}"
    );
    // The endpoint without a scheme is https when TLS settings are given.
    let bare = server.endpoint.trim_start_matches("https://").to_string();
    let bare = Etcd::with_config(EtcdConfig {
        tls: Some(pki.tls("ca", true)),
        ..EtcdConfig::new(&[bare], Duration::from_secs(5))
    });
    assert_eq!(bare.list(b"pvrdma/").expect("list").kvs.len(), 2);
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn over_tls_a_missing_client_certificate_or_ca_is_a_clear_error() {
    let pki = Pki::make("pki-refused");
    let server = start_tls_etcd("tls-refused", &pki);
    let expect_tls_error = |etcd: Etcd, needle: &str| match etcd.list(b"pvrdma/") {
        Err(e @ EtcdError::Tls { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&server.endpoint), "{text}");
            assert!(text.contains(needle), "{text} does not say {needle:?}");
        }
        other => panic!("expected a TLS error saying {needle:?}, got {other:?}"),
    };
    // etcd refuses a client without a certificate.
    expect_tls_error(
        server.client_with(Some(pki.tls("ca", false)), None),
        "may require a client certificate",
    );
    // A client trusting another CA refuses etcd's certificate.
    expect_tls_error(
        server.client_with(Some(pki.tls("other-ca", true)), None),
        "UnknownIssuer",
    );
    // Without TLS settings an https endpoint is refused before connecting.
    assert!(matches!(
        server.client().list(b"pvrdma/"),
        Err(EtcdError::NoTls { .. })
    ));
    // A key that is not the certificate's is refused when the settings are made.
    let mismatched = EtcdTls::with_ca(&pki.read("ca.pem"))
        .expect("the CA")
        .with_client_cert(&pki.read("client.pem"), &pki.read("etcd.key"));
    assert!(
        matches!(mismatched, Err(TlsError::Pair(_))),
        "{mismatched:?}"
    );
    // A certificate given as the key holds no key.
    let no_key = EtcdTls::with_ca(&pki.read("ca.pem"))
        .expect("the CA")
        .with_client_cert(&pki.read("client.pem"), &pki.read("client.pem"));
    assert!(matches!(no_key, Err(TlsError::Key(_))), "{no_key:?}");
}

/// etcd with authentication on: a user `root` (role root) whose password is `secret`, and
/// simple tokens that expire after `token_ttl` seconds unused.
fn start_auth_etcd(tag: &str, token_ttl: u32) -> EtcdServer {
    let server = EtcdServer::spawn(tag, "http", &[format!("--auth-token-ttl={token_ttl}")]);
    server.wait_for(&server.client());
    server.admin(
        "/v3/auth/user/add",
        serde_json::json!({ "name": "root", "password": "secret" }),
    );
    server.admin(
        "/v3/auth/user/grant",
        serde_json::json!({ "user": "root", "role": "root" }),
    );
    server.admin("/v3/auth/enable", serde_json::json!({}));
    server
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn with_authentication_the_right_user_works_and_others_are_told_why_not() {
    let server = start_auth_etcd("auth", 300);
    let root = server.client_with(None, Some(EtcdUser::new("root", "secret")));
    let lease = root.grant(30).expect("grant as root");
    let revision = root.put(b"pvrdma/gid/a", b"1", lease).expect("put as root");
    assert_eq!(root.keep_alive(lease).expect("keep alive as root"), 30);
    let listing = root.list(b"pvrdma/").expect("list as root");
    assert_eq!(listing.kvs.len(), 1);
    let mut watch = root.watch(b"pvrdma/", revision).expect("watch as root");
    assert!(
        matches!(&watch.changes().expect("events")[..], [Event::Put(kv)] if kv.key == b"pvrdma/gid/a")
    );

    let wrong = server.client_with(None, Some(EtcdUser::new("root", "guess")));
    match wrong.list(b"pvrdma/") {
        Err(e @ EtcdError::AuthFailed { .. }) => {
            let text = e.to_string();
            assert!(text.contains("\"root\""), "{text}");
            assert!(text.contains("invalid user ID or password"), "{text}");
        }
        other => panic!("a wrong password: {other:?}"),
    }
    assert!(matches!(
        wrong.watch(b"pvrdma/", 0),
        Err(EtcdError::AuthFailed { .. })
    ));
    let nobody = server.client();
    match nobody.put(b"pvrdma/gid/b", b"2", 0) {
        Err(e @ EtcdError::AuthRequired { .. }) => {
            assert!(e.to_string().contains("no user was given"), "{e}");
        }
        other => panic!("no user: {other:?}"),
    }
    assert!(matches!(
        nobody.watch(b"pvrdma/", 0),
        Err(EtcdError::AuthRequired { .. })
    ));
    assert_eq!(
        root.list(b"pvrdma/").expect("list").kvs.len(),
        1,
        "nothing was written"
    );
    root.revoke(lease).expect("revoke as root");
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn an_expired_token_is_renewed_and_the_request_retried() {
    // Tokens live 1 s unused (etcd checks every second): after 3 s idle, the client's
    // token is gone from etcd, and each call below would fail without a new one.
    let server = start_auth_etcd("token", 1);
    let root = server.client_with(None, Some(EtcdUser::new("root", "secret")));
    root.put(b"pvrdma/gid/a", b"1", 0).expect("put");
    std::thread::sleep(Duration::from_secs(3));
    let listing = root.list(b"pvrdma/").expect("list with an expired token");
    assert_eq!(listing.kvs.len(), 1);
    std::thread::sleep(Duration::from_secs(3));
    let mut watch = root
        .watch(b"pvrdma/", listing.revision + 1)
        .expect("watch with an expired token");
    // A clone shares the token: it is renewed once for both.
    std::thread::sleep(Duration::from_secs(3));
    let other = root.clone();
    other
        .put(b"pvrdma/gid/b", b"2", 0)
        .expect("put with an expired token");
    // A running watch outlives its token.
    let events = watch.changes().expect("events");
    assert!(matches!(&events[..], [Event::Put(kv)] if kv.key == b"pvrdma/gid/b"));
}
