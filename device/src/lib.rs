//! A vfio-user server that emulates VMware's paravirtual RDMA NIC (PVRDMA).
//!
//! The layers are kept apart so that the device model never sees a socket, a thread or the
//! wire protocol, and every path a guest can reach is exercised by in-process tests and
//! fuzzing:
//!
//! * [`abi`] — the device ABI of the Linux `vmw_pvrdma` driver and rdma-core's provider:
//!   register offsets, the Device Shared Region, command and response slots, ring
//!   elements, as zerocopy structs whose sizes are checked at compile time.
//! * [`pci`] — the PCI function without any transport: every device-specific number
//!   (IDs, BAR layout, MSI-X vectors), the generic register layout and the 256-byte
//!   configuration space.
//! * [`pvrdma`] — the sans-IO device model ([`pvrdma::PvrdmaDevice`]): BAR1 registers, the
//!   DSR, the command channel, rings and page directories, UAR doorbells (trapped or
//!   polled), completions, the data path, and the profiler's per-QP counters.
//! * [`vfio`] — the glue to the vfio-user client: our protocol loop ([`vfio::protocol`]),
//!   the region and IRQ tables, DMA windows and the guest RAM mapped from them, MSI-X
//!   eventfds, the PCI function that routes requests ([`vfio::PciFunction`]), sockets made
//!   or inherited, serving one client per socket, and exit-free BAR2.
//! * [`runtime`] — what joins the devices of one process: the memcpy fabric
//!   ([`runtime::fabric::Fabric`]), the devices added and removed at run time, the
//!   doorbell poller, the RNR timer, the rdma path's host device, the TCP transport's host,
//!   the control socket's server and the `--metrics` endpoint.
//! * [`profiler`] — the profiler's reporting half: per-QP figures as a table, JSON, SVG or
//!   Prometheus text, and the control socket's line protocol.
//! * [`sandbox`] — what the server gives up once its sockets are bound: no new privileges,
//!   a seccomp allowlist, Landlock limits on files and TCP ports.
//! * [`log_limit`] — log lines limited per line of code, since guests and clients can make
//!   the server log.
//!
//! The "device-abi §N" section numbers in comments refer to the device ABI, docs/device-abi.md.

// `deny`, not `forbid`: exactly two modules may opt out: `vfio::protocol::socket`, to take
// ownership of file descriptors received over the socket, and `vfio::memory_fault`, whose
// SIGBUS handler keeps a truncated DMA window from killing the process.
#![deny(unsafe_code)]

pub mod abi;
pub mod log_limit;
pub mod pci;
pub mod profiler;
pub mod pvrdma;
pub mod runtime;
pub mod sandbox;
pub mod vfio;
