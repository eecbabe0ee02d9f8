//! The process runtime: what joins the devices of one server process and the threads that
//! serve them, beside the vfio-user glue of each device (`vfio`).
//!
//! * [`fabric`] — the devices of the process in one memcpy fabric, each behind its own lock
//!   (docs/backends.md).
//! * [`poller`] — the exit-free doorbell poller thread (docs/doorbells.md).
//! * [`rnr_timer`] — the thread that ends receiver-not-ready timers.
//! * [`rdma`] — the rdma path's host device, opened at start and watched
//!   (docs/rdma-transport.md).
//! * [`remote`] — the fabric as the TCP transport's host (docs/tcp-transport.md).
//! * [`devices`] — the devices served, each on its socket: added at start or at run time.
//! * [`metrics`] — the `--metrics` HTTP endpoint (Prometheus text format).
//! * [`control`] — the control socket's server (the profiler's `stats` and `profile`, and
//!   `device add`/`remove`/`list`).

pub mod control;
pub mod devices;
pub mod fabric;
pub mod metrics;
pub mod poller;
pub mod rdma;
pub mod remote;
pub mod rnr_timer;
