//! Glue between the PVRDMA function and the `vfio_user` crate.
//!
//! * [`regions`] — the region and IRQ tables advertised to the client.
//! * [`dma`] — the client's DMA windows (guest memory it shared with us).
//! * [`irqs`] — decoding of `SET_IRQS` and the MSI-X eventfd table.
//! * [`backend`] — the `ServerBackend` that routes requests to the function.
//! * [`listener`] — socket creation and the accept-serve-accept loop.
//!
//! Errors returned to the crate become error replies. Note that `vfio_user`
//! 0.1.7 sends every backend error with errno 0 (vfio-user.md §2.4 bug B), so
//! errno values chosen here matter for logs and for a future protocol loop,
//! not for what QEMU sees today.

pub mod backend;
pub mod dma;
pub mod irqs;
pub mod listener;
pub mod regions;

pub use backend::PciFunctionBackend;
