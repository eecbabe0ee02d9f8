//! The etcd directory of a secured etcd: a server started with `--directory etcds://`, a CA,
//! a client certificate and a user registers in an etcd that asks for all three, from inside
//! its sandbox (the files are read before it); and the options' files that are missing or
//! not what they should be stop the start, named. The etcd test is ignored by a plain
//! `cargo test`: scripts/test runs it with `--ignored` (it needs Debian's etcd-server and
//! openssl).

mod driver;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driver::socket_bus::SocketServer;
use pvrdma_backend::directory::etcd::{Etcd, EtcdConfig, EtcdUser};

/// What the server logs that the tests wait for (and the socket bus needs).
const LOG: &str = "info,vfio_user_pvrdma::vfio=debug";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A fresh folder of the test's own; removed on drop.
struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Folder {
        let dir = std::env::temp_dir().join(format!("pvrdma-secure-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp folder");
        Folder(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }

    fn write(&self, file: &str, bytes: &[u8]) -> String {
        std::fs::write(self.0.join(file), bytes).expect("a file of the test");
        self.path(file)
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the server with `args` (and a socket in `folder`); its exit code and what it
/// printed, once it exits, which a start refused must do at once.
fn refused_start(folder: &Folder, args: &[&str]) -> (Option<i32>, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-user-pvrdma"))
        .args([
            "--socket-path",
            &folder.path("fn0.sock"),
            "--listen",
            &listen,
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the server");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn directory_files_that_cannot_be_used_stop_the_start_and_are_named() {
    let folder = Folder::new("files");
    let missing = folder.path("missing.pem");
    let (code, err) = refused_start(
        &folder,
        &[
            "--directory",
            "etcds://127.0.0.1:1",
            "--directory-cacert",
            &missing,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read --directory-cacert {missing}: ")),
        "{err}"
    );

    let garbage = folder.write("garbage.pem", b"\x00\xffnot a certificate\n");
    let (code, err) = refused_start(
        &folder,
        &[
            "--directory",
            "etcds://127.0.0.1:1",
            "--directory-cacert",
            &garbage,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot use --directory-cacert {garbage} for the etcd directory: the CA bundle: \
             no PEM certificate in it"
        )),
        "{err}"
    );

    // A CA for plain HTTP is a mistake, not a silent downgrade.
    let (code, err) = refused_start(
        &folder,
        &[
            "--directory",
            "etcd://127.0.0.1:1",
            "--directory-cacert",
            &garbage,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--directory-cacert is for TLS"), "{err}");

    let empty = folder.write("empty", b"\n");
    let directory = [
        "--directory",
        "etcd://127.0.0.1:1",
        "--directory-user",
        "root",
    ];
    let (code, err) = refused_start(
        &folder,
        &[&directory[..], &["--directory-password-file", &empty]].concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("the password file {empty} is empty")),
        "{err}"
    );
    let (code, err) = refused_start(
        &folder,
        &[&directory[..], &["--directory-password-file", &missing]].concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read --directory-password-file {missing}")),
        "{err}"
    );

    // A user needs its password file, a certificate its key: clap's usage errors.
    let (code, err) = refused_start(&folder, &directory);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--directory-password-file"), "{err}");
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

/// In `dir`: a CA (`ca.pem`), etcd's certificate for 127.0.0.1 (`etcd.pem`, `etcd.key`;
/// etcd's gateway shows it to etcd as a client too) and a client's (`client.pem`,
/// `client.key`), both signed by the CA. The client's has no Common Name: with
/// authentication on, etcd's JSON gateway refuses a client certificate that has one.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509", "-days", "2", "-subj", "/CN=ca"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    for (name, subject, extensions) in [
        (
            "etcd",
            "/CN=etcd",
            "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth, clientAuth\n",
        ),
        (
            "client",
            "/",
            "subjectAltName = DNS:pvrdma-server\nextendedKeyUsage = clientAuth\n",
        ),
    ] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), extensions).expect("the extension file");
        openssl(
            dir,
            &[
                &["req", "-subj", subject][..],
                &ec,
                &["-keyout", &key, "-out", &csr],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
}

/// etcd on loopback: clients over https (with a certificate its CA signed) and over plain
/// HTTP (for the test to set it up and look), authentication on; killed on drop.
struct SecureEtcd {
    child: Child,
    /// HOST:PORT of the https listener.
    tls: String,
    /// http://HOST:PORT.
    plain: String,
}

impl SecureEtcd {
    fn start(folder: &Folder) -> SecureEtcd {
        let (tls_port, plain_port, peer) = (free_port(), free_port(), free_port());
        let tls = format!("127.0.0.1:{tls_port}");
        let plain = format!("http://127.0.0.1:{plain_port}");
        let clients = format!("https://{tls},{plain}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--data-dir", &folder.path("data"), "--name", "lab"])
            .args(["--listen-client-urls", &clients])
            .args(["--advertise-client-urls", &clients])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lab={peer_url}")])
            .args(["--cert-file", &folder.path("etcd.pem")])
            .args(["--key-file", &folder.path("etcd.key")])
            .args(["--trusted-ca-file", &folder.path("ca.pem")])
            .arg("--client-cert-auth")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(folder.0.join("etcd.log")).expect("etcd's log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install Debian's etcd-server (scripts/test does)")
            });
        let etcd = SecureEtcd { child, tls, plain };
        let probe = Etcd::new(std::slice::from_ref(&etcd.plain), Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = probe.list(b"probe/") {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for (path, body) in [
            (
                "/v3/auth/user/add",
                serde_json::json!({ "name": "root", "password": "secret" }),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({ "user": "root", "role": "root" }),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ] {
            let status = ureq::post(&format!("{}{path}", etcd.plain))
                .send_json(body)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .status();
            assert_eq!(status.as_u16(), 200, "{path}");
        }
        etcd
    }

    /// The keys under `/lab/servers/`, read as root over plain HTTP.
    fn registered(&self) -> Vec<String> {
        let root = Etcd::with_config(EtcdConfig {
            user: Some(EtcdUser::new("root", "secret")),
            ..EtcdConfig::new(std::slice::from_ref(&self.plain), Duration::from_secs(5))
        });
        let listing = root.list(b"/lab/servers/").expect("list as root");
        listing
            .kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect()
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server of the directory at `etcd` over TLS, as root with the password in `password`.
fn secure_server(
    etcd: &SecureEtcd,
    folder: &Folder,
    listen: &str,
    password: &str,
) -> std::sync::Arc<SocketServer> {
    let directory = format!("etcds://{}", etcd.tls);
    let (ca, cert, key) = (
        folder.path("ca.pem"),
        folder.path("client.pem"),
        folder.path("client.key"),
    );
    SocketServer::start_with(
        1,
        LOG,
        &[
            "--listen",
            listen,
            "--directory",
            &directory,
            "--directory-prefix",
            "/lab/",
            "--directory-cacert",
            &ca,
            "--directory-cert",
            &cert,
            "--directory-key",
            &key,
            "--directory-user",
            "root",
            "--directory-password-file",
            password,
        ],
    )
}

#[test]
#[ignore = "starts etcd; run by scripts/test"]
fn a_server_registers_over_tls_with_a_client_certificate_and_a_user() {
    let folder = Folder::new("etcd");
    make_pki(&folder.0);
    let etcd = SecureEtcd::start(&folder);
    // Written by `echo`: the newline is no part of the password.
    let password = folder.write("password", b"secret\n");
    let listen = format!("127.0.0.1:{}", free_port());
    // The sandbox is on (the default): the files were read before it.
    let server = secure_server(&etcd, &folder, &listen, &password);
    server.wait_for_server_line(&format!("directory: registered /lab/servers/{listen}"));
    assert_eq!(etcd.registered(), [format!("/lab/servers/{listen}")]);
    // Past the lease's 10 s the registration lives on: the server's keep-alives get through
    // too.
    std::thread::sleep(Duration::from_secs(13));
    assert_eq!(etcd.registered(), [format!("/lab/servers/{listen}")]);

    // A wrong password: the server says why, and serves its own guests meanwhile.
    let wrong = folder.write("wrong", b"guess");
    let other = format!("127.0.0.1:{}", free_port());
    let refused = secure_server(&etcd, &folder, &other, &wrong);
    refused.wait_for_server_line("refused to authenticate the user \"root\"");
    assert_eq!(etcd.registered(), [format!("/lab/servers/{listen}")]);
}
