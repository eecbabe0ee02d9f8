//! Glue between the PVRDMA function and the vfio-user client.
//!
//! * [`protocol`] — our vfio-user server: message loop, wire formats and
//!   the [`protocol::DeviceBackend`] trait (docs/vfio-user-server.md).
//! * [`regions`] — the region and IRQ tables advertised to the client.
//! * [`dma`] — the client's DMA windows (guest memory it shared with us).
//! * [`memory_fault`] — a window whose file shrinks fails its device, not the process.
//! * [`irqs`] — decoding of `SET_IRQS` and the MSI-X eventfd table.
//! * [`function`] — the PCI function: the `DeviceBackend` that routes requests to it.
//! * [`listener`] — socket creation, or sockets inherited at start.
//! * [`serving`] — one client at a time per socket (others told EBUSY), until stopped.
//! * [`uar`] — exit-free doorbells: BAR2 shared with the client (the thread that polls it
//!   is the runtime's).
//!
//! Errors returned by the backend become error replies carrying their
//! errno, so the values chosen here are what QEMU sees.

pub mod dma;
pub mod function;
pub mod guest_ram;
pub mod irqs;
pub mod listener;
#[allow(unsafe_code)] // The SIGBUS handler; see the module docs.
pub mod memory_fault;
pub mod protocol;
pub mod regions;
pub mod serving;
pub mod uar;

pub use function::PciFunction;
