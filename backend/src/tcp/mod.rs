//! The TCP transport: guests on servers of different hosts (docs/tcp-transport.md).
//!
//! * [`wire`] — the frames, and a decoder that treats every peer byte as hostile;
//! * [`node`] — one server's end, sans-IO: routing by the GIDs peers announce, the
//!   reliable protocol of RC work (sequence numbers, answers, resends, retry budgets);
//! * [`execute`] — runs a peer's request against a local device through a staging
//!   buffer, so the device's responder is the same one the memcpy fabric uses;
//! * `out_queue` — the bytes queued for a link, written from the front without moving
//!   the rest;
//! * [`runtime`] — the thread, sockets, handshake and cluster key.

pub mod execute;
pub mod node;
mod out_queue;
pub mod runtime;
pub mod wire;

pub use node::{Event, Node, PeerId};
