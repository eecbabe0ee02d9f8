//! The libvirt domain of qemu/libvirt/pvrdma-guest.xml, defined and started with libvirt on
//! a service host (the Debian package and libvirt under systemd in a container, as in
//! service.rs): libvirt's QEMU, running as libvirt-qemu, connects to the packaged socket
//! unit's socket with the permissions the XML's comment names, and the guest's unmodified
//! driver probes the device and sees its port active.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guest_tests::lab::LabEnv;
use support::host::{Container, device, root_with_package, wait_for, workspace};
use support::{Checks, expect_contains};

/// The guest's /init for this test: the lab guest's own init (network, modules), but instead
/// of the lab's agent it loads the driver and prints what `ibv_devinfo` sees to the console,
/// the only channel a libvirt guest here has.
fn init_script() -> String {
    let lab_init = std::fs::read_to_string(workspace().join("guest-tests/image/init"))
        .expect("guest-tests/image/init");
    let mut init: String = lab_init
        .lines()
        .filter(|line| !line.contains("/usr/local/sbin/pvrdma-guest-agent"))
        .map(|line| format!("{line}\n"))
        .collect();
    init.push_str(
        "modprobe vmw_pvrdma\n\
         for i in $(seq 100); do [ -e /sys/class/infiniband/vmw_pvrdma0/ports/1/state ] && break; sleep 0.1; done\n\
         sleep 2\n\
         ibv_devinfo -d vmw_pvrdma0\n\
         echo 'pvrdma-lab: libvirt guest done'\n\
         exec tini -s -- sleep 1000000\n",
    );
    init
}

/// The lab's initrd with `init` appended as /init (a later cpio member wins).
fn initrd_with_init(base: &Path, init: &str, out: &Path) {
    std::fs::copy(base, out).expect("copy the lab's initrd");
    let staging = out.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("staging folder");
    let init_path = staging.join("init");
    std::fs::write(&init_path, init).expect("write init");
    let chmod = Command::new("chmod").arg("755").arg(&init_path).status();
    assert!(chmod.is_ok_and(|s| s.success()));
    let appended = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && echo init | cpio -o -H newc --quiet >> '{}'",
            staging.display(),
            out.display()
        ))
        .status();
    assert!(appended.is_ok_and(|s| s.success()), "appending /init");
    let _ = std::fs::remove_dir_all(&staging);
}

#[test]
#[ignore = "builds the Debian package and boots systemd, libvirt and a QEMU guest; run by scripts/test"]
fn libvirt_starts_the_documented_domain_and_the_driver_probes_the_device() {
    let env = LabEnv::load().unwrap_or_else(|e| panic!("{e}"));
    let work = std::env::temp_dir().join(format!("pvrdma-libvirt-{}", std::process::id()));
    let root = root_with_package(&work);
    let mut checks = Checks::default();

    // The guest's kernel and initrd where libvirt may hand them to QEMU.
    let boot = root.join("var/lib/libvirt/boot");
    std::fs::create_dir_all(&boot).expect("the boot folder");
    std::fs::copy(&env.kernel, boot.join("vmlinuz")).expect("the kernel");
    initrd_with_init(&env.initrd, &init_script(), &boot.join("initrd.img"));
    let console = "/var/log/libvirt/qemu/pvrdma-lv.console.log";
    let xml = std::fs::read_to_string(workspace().join("qemu/libvirt/pvrdma-guest.xml"))
        .expect("qemu/libvirt/pvrdma-guest.xml")
        .replace("@NAME@", "pvrdma-lv")
        .replace("@KERNEL@", "/var/lib/libvirt/boot/vmlinuz")
        .replace("@INITRD@", "/var/lib/libvirt/boot/initrd.img")
        .replace("@CONSOLE@", console)
        .replace("@SOCKET@", "/run/vfio-user-pvrdma/pvrdma0.sock");
    std::fs::write(boot.join("pvrdma-lv.xml"), xml).expect("the domain XML");

    let run = work.join("run");
    let container = Container::boot(&root, &run, &work.join("console.log"));
    let up = wait_for(
        "libvirt and the socket unit",
        Duration::from_secs(60),
        || run.join("vfio-user-pvrdma/pvrdma0.sock").exists() && run.join("libvirt").exists(),
    );
    assert!(up.is_ok(), "{up:?}; console:\n{}", container.console());
    let virsh = |args: &str| container.run(&root, &format!("virsh -c qemu:///system {args}"));
    // libvirt's daemon may still be starting: the first connection waits for it.
    let defined = virsh("define /var/lib/libvirt/boot/pvrdma-lv.xml");
    assert!(defined.is_ok(), "virsh define: {defined:?}");
    let started = virsh("start pvrdma-lv");
    assert!(
        started.is_ok(),
        "virsh start: {started:?}; QEMU's log: {:?}",
        std::fs::read_to_string(root.join("var/log/libvirt/qemu/pvrdma-lv.log"))
    );

    let guest_console = root.join(console.trim_start_matches('/'));
    let read_console = || std::fs::read_to_string(&guest_console).unwrap_or_default();
    let done = wait_for("the guest's driver", Duration::from_secs(180), || {
        read_console().contains("pvrdma-lab: libvirt guest done")
    });
    let text = read_console();
    assert!(done.is_ok(), "{done:?}; the guest's console:\n{text}");
    checks.check(
        "the driver pairs with the vmxnet3 at function 0 and attaches",
        expect_contains(&text, "vmw_pvrdma 0000:00:10.1: paired device to eth0").and(
            expect_contains(&text, "vmw_pvrdma 0000:00:10.1: attached to device"),
        ),
    );
    checks.check(
        "ibv_devinfo: the port is active",
        expect_contains(&text, "PORT_ACTIVE"),
    );
    let control = run.join("vfio-user-pvrdma/dynamic/control.sock");
    let list = device(&control, &["list"]);
    checks.check(
        "the device libvirt's QEMU attached to has the GUID the guest sees",
        list.clone().and_then(|list| {
            let row = list
                .lines()
                .find(|l| l.ends_with("\t/run/vfio-user-pvrdma/pvrdma0.sock"))
                .ok_or(format!("no pvrdma0 in {list:?}"))?;
            expect_contains(row, "attached")?;
            let guid = row.split('\t').nth(1).unwrap_or_default();
            expect_contains(&text, &format!("node_guid:\t\t\t{guid}"))
        }),
    );
    checks.check(
        "libvirt runs QEMU as libvirt-qemu, not root",
        container
            .run(&root, "ps -o user= -C qemu-system-x86_64")
            .and_then(|users| expect_contains(&users, "libvirt-qemu")),
    );
    // Destroying the domain frees the device for the next one.
    checks.check(
        "virsh destroy frees the device",
        virsh("destroy pvrdma-lv").map(drop).and_then(|()| {
            wait_for("the device idle", Duration::from_secs(30), || {
                device(&control, &["list"]).is_ok_and(|l| {
                    l.lines()
                        .any(|row| row.contains("\tidle\t/run/vfio-user-pvrdma/pvrdma0.sock"))
                })
            })
        }),
    );
    drop(container);
    if !std::thread::panicking() {
        let _ = std::fs::remove_dir_all(&work);
    }
    checks.finish();
}
