//! The sandbox is entered in a child process (it cannot be left again), which runs this
//! same test binary: what the server needs still works inside, what it must never do is
//! refused.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use super::*;

/// Set in the child: the folder it may remove its socket stand-in from.
const CHILD: &str = "PVRDMA_SANDBOX_TEST_CHILD";
const TEST: &str = "sandbox::tests::inside_the_sandbox_the_server_works_and_nothing_else_does";

#[test]
fn inside_the_sandbox_the_server_works_and_nothing_else_does() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvrdma-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.sock"), b"").unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, &dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = vec![
        "needed: memfd, eventfd, mmap",
        "needed: a thread",
        "needed: /dev/urandom",
        "needed: its socket file removed",
        "refused: setuid",
        "refused: running a program",
    ];
    if stdout.contains("has no Landlock") {
        eprintln!("NOTE: this kernel has no Landlock; only the seccomp half was checked");
    } else {
        expected.extend([
            "refused: reading another file",
            "refused: writing a file",
            "refused: a TCP port that is not a peer's",
        ]);
    }
    for line in expected {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
}

fn child(dir: &Path) {
    let entered = enter(&Needs {
        sockets: vec![dir.join("a.sock")],
        listen_port: None,
        peer_ports: vec![4791],
        rdma: false,
    })
    .expect("enter the sandbox");
    let landlock = entered.landlock_full.is_some();
    println!("entered: {entered:?}");

    let memfd = nix::sys::memfd::memfd_create("sandbox-test", nix::sys::memfd::MFdFlags::empty())
        .expect("memfd_create");
    let file = std::fs::File::from(memfd);
    file.set_len(1 << 20).expect("ftruncate");
    let map = crate::pvrdma::GuestRam::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
        .expect("mmap");
    drop(map);
    nix::sys::eventfd::EventFd::new().expect("eventfd");
    println!("needed: memfd, eventfd, mmap");
    std::thread::spawn(|| 1).join().expect("a thread");
    println!("needed: a thread");
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("/dev/urandom");
    println!("needed: /dev/urandom");
    std::fs::remove_file(dir.join("a.sock")).expect("remove the socket file");
    println!("needed: its socket file removed");

    assert_eq!(
        nix::unistd::setuid(nix::unistd::getuid()),
        Err(nix::errno::Errno::EPERM)
    );
    println!("refused: setuid");
    assert!(Command::new("/bin/true").status().is_err(), "ran a program");
    println!("refused: running a program");
    if landlock {
        assert!(
            std::fs::read("/etc/hostname").is_err(),
            "read /etc/hostname"
        );
        println!("refused: reading another file");
        assert!(
            std::fs::write(dir.join("new"), b"x").is_err(),
            "created a file"
        );
        println!("refused: writing a file");
        let refused = TcpStream::connect(("127.0.0.1", 1)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        println!("refused: a TCP port that is not a peer's");
    } else {
        println!("this kernel has no Landlock: file and port rules not checked");
    }
}
