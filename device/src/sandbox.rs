//! The sandbox the server enters once its sockets are bound and before any guest or client
//! is served (docs/threat-model.md): should a hostile guest or client ever take over the
//! process, it can make only the system calls the server needs, touch only the files it
//! needs, and gain no privilege.
//!
//! - `no_new_privs`: nothing the process runs can gain privileges (set by both layers).
//! - Landlock, where the kernel has it: no file may be read, written, created or executed
//!   except `/dev/urandom` (read) and the removal of the server's own socket files at exit;
//!   TCP binds only to the `--listen` port and connects only to the `--peer` ports.
//! - seccomp-BPF: an allowlist of the calls the server makes while serving; any other
//!   call fails with `EPERM` (the server goes on; a fault on a path nobody tested is an
//!   error for that request, never a dead server for every tenant). `execve`, `ptrace`,
//!   `fork`, `mount`, `bpf`, `process_vm_*`, `kexec_*` and the like are never allowed.
//!
//! `--sandbox off` skips all of it, for debugging (strace, gdb).

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

/// What the server keeps doing once sandboxed.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    /// Socket files removed at exit (their folders allow removing files, nothing else).
    pub sockets: Vec<PathBuf>,
    /// The TCP port the server listens on for peers.
    pub listen_port: Option<u16>,
    /// The TCP ports of its peers.
    pub peer_ports: Vec<u16>,
    /// The rdma path will open a host RDMA device after Landlock is entered (see
    /// [`enter_files`]): libibverbs may read what it reads to find and open one (sysfs,
    /// its configuration and provider libraries) and use `/dev/infiniband`.
    pub rdma: bool,
}

/// What libibverbs reads to list the host's RDMA devices, load its provider and open one:
/// sysfs, its driver list, the dynamic linker's cache and the libraries. Read only.
const RDMA_READS: &[&str] = &[
    "/sys",
    "/etc/libibverbs.d",
    "/etc/ld.so.cache",
    "/usr/lib",
    "/lib",
    "/lib64",
];
/// The device files the rdma path opens and writes its commands to.
const RDMA_DEVICES: &str = "/dev/infiniband";

/// How much of the sandbox the kernel could enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entered {
    /// Landlock: `None` where the kernel has none; `Some(false)` where it enforced only
    /// part of the rules (an older ABI).
    pub landlock_full: Option<bool>,
    /// System calls allowed.
    pub allowed_calls: usize,
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("cannot build the Landlock ruleset")]
    Landlock(#[from] landlock::RulesetError),
    #[error("cannot build the seccomp filter")]
    Seccomp(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[from] seccompiler::Error),
    #[error("seccomp filters are not built for this architecture ({0})")]
    Architecture(&'static str),
}

/// Enters the sandbox, for every thread of the process (call it before starting any).
pub fn enter(needs: &Needs) -> Result<Entered, SandboxError> {
    let landlock_full = enter_files(needs)?;
    let allowed_calls = enter_calls()?;
    Ok(Entered {
        landlock_full,
        allowed_calls,
    })
}

/// The first half of [`enter`]: Landlock (files and TCP ports), for the calling thread and
/// the threads it starts later. A host RDMA device must be opened after this, not before:
/// entering Landlock gives the process new credentials, and the kernel refuses the
/// commands libibverbs writes to a device file opened under other credentials (Soft-RoCE
/// posts every work request that way). Returns what [`Entered::landlock_full`] says.
pub fn enter_files(needs: &Needs) -> Result<Option<bool>, SandboxError> {
    restrict_files_and_ports(needs)
}

/// The second half of [`enter`]: the system call filter, for every thread; how many calls
/// it allows.
pub fn enter_calls() -> Result<usize, SandboxError> {
    let filter = seccomp_filter()?;
    seccompiler::apply_filter_all_threads(&filter)?;
    Ok(ALLOWED.len() + ALLOWED_ARCH.len())
}

/// The Landlock part: best effort, as the kernel allows.
fn restrict_files_and_ports(needs: &Needs) -> Result<Option<bool>, SandboxError> {
    let abi = ABI::V5;
    let folders: Vec<&Path> = needs.sockets.iter().filter_map(|p| p.parent()).collect();
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(["/dev/urandom"], AccessFs::ReadFile))?
        // The socket folders: the server removes its socket files there at exit, and makes
        // and removes those of devices added at run time.
        .add_rules(path_beneath_rules(
            folders,
            AccessFs::RemoveFile | AccessFs::MakeSock,
        ))?;
    if needs.rdma {
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        ruleset = ruleset
            .add_rules(path_beneath_rules(RDMA_READS, read))?
            // Its commands are ioctls on the device file (Landlock ABI 5 filters those).
            .add_rules(path_beneath_rules(
                [RDMA_DEVICES],
                read | AccessFs::WriteFile | AccessFs::IoctlDev,
            ))?;
    }
    if let Some(port) = needs.listen_port {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::BindTcp))?;
    }
    for &port in &needs.peer_ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Some(true),
        RulesetStatus::PartiallyEnforced => Some(false),
        RulesetStatus::NotEnforced => None,
    })
}

/// The calls a serving process makes: sockets and their descriptors, memory mappings of
/// guest RAM, eventfds, threads and their synchronisation, signals, time, and exit.
/// Measured by tracing the server through the whole test suite (docs/threat-model.md).
const ALLOWED: &[libc::c_long] = &[
    // Sockets: vfio-user clients, the control socket, TCP peers.
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_listen,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    // Descriptors: reading and writing them, their flags, the type and size of a DMA fd.
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_ftruncate,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_statx,
    libc::SYS_unlinkat,
    // The mode and group of sockets `device add` makes (--socket-mode, --socket-group).
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_write,
    libc::SYS_writev,
    // Guest RAM and the UAR pages: memfds and their mappings; the SIGBUS guard.
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_memfd_create,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    // Interrupts.
    libc::SYS_eventfd2,
    // Waiting.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_ppoll,
    libc::SYS_sched_yield,
    // Threads: each client's, the poller (pinned), the TCP transport, the timers.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_prctl,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    // Signals: SIGINT/SIGTERM are waited for; a panic that aborts signals itself.
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_tgkill,
    // Random numbers (hash seeds, nonces, memory keys).
    libc::SYS_getrandom,
];

/// The older calls x86_64 still has beside the `*at` and `ppoll` forms (std and glibc use
/// them there).
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[libc::c_long] = &[
    libc::SYS_access,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_unlink,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_ARCH: &[libc::c_long] = &[];

fn seccomp_filter() -> Result<BpfProgram, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SandboxError::Architecture(std::env::consts::ARCH))?;
    let rules = ALLOWED
        .iter()
        .chain(ALLOWED_ARCH)
        .map(|&call| (call, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests;
