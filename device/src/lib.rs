//! A vfio-user server that emulates VMware's paravirtual RDMA NIC (PVRDMA).
//!
//! The crate is layered so that the device model never sees the wire protocol:
//!
//! * [`pci`] — sans-IO PCI function state: identity constants and the
//!   configuration space. No sockets, no file descriptors.
//! * [`vfio`] — the vfio-user side: our protocol loop
//!   ([`vfio::protocol`]), the region and IRQ tables it advertises, the
//!   backend that routes client requests to the PCI function, the DMA-window
//!   and MSI-X eventfd tables, and the accept loop.
//!
//! The PVRDMA register file (BAR1), the device shared region, the command
//! channel and the data path will be added as further modules next to `pci`
//! and plugged into [`vfio::PciFunction`].

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
