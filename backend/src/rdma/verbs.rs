//! libibverbs, loaded at run time.
//!
//! The server must start on a host without rdma-core and build without its development
//! files, so nothing links against libibverbs: [`Verbs::load`] opens `libibverbs.so.1`
//! with `dlopen` and looks up the calls used here by name (the default version of each
//! symbol, as a program linked against the library would get). The structures are declared
//! by hand, only as far as the fields read or written; `tests/rdma_abi.rs` compiles
//! rdma-core's own headers and checks every size and offset declared here against them.
//!
//! This module and `devices.rs` are the only places that call into the library.

use std::ffi::{CStr, c_char, c_int, c_void};

use super::abi::{
    IbvAhAttr, IbvAsyncEvent, IbvCompChannel, IbvContext, IbvCq, IbvDevice, IbvGid, IbvGidEntry,
    IbvMr, IbvPd, IbvPortAttr, IbvQp, IbvQpAttr, IbvQpInitAttr,
};

type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut IbvDevice;
type FreeDeviceList = unsafe extern "C" fn(*mut *mut IbvDevice);
type GetDeviceName = unsafe extern "C" fn(*mut IbvDevice) -> *const c_char;
type GetDeviceGuid = unsafe extern "C" fn(*mut IbvDevice) -> u64;
type OpenDevice = unsafe extern "C" fn(*mut IbvDevice) -> *mut IbvContext;
type CloseDevice = unsafe extern "C" fn(*mut IbvContext) -> c_int;
type QueryPort = unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr) -> c_int;
type QueryGid = unsafe extern "C" fn(*mut IbvContext, u8, c_int, *mut IbvGid) -> c_int;
type QueryGidTable =
    unsafe extern "C" fn(*mut IbvContext, *mut IbvGidEntry, usize, u32, usize) -> isize;
type AllocPd = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvPd;
type DeallocPd = unsafe extern "C" fn(*mut IbvPd) -> c_int;
type RegMr = unsafe extern "C" fn(*mut IbvPd, *mut c_void, usize, c_int) -> *mut IbvMr;
type RegMrIova = unsafe extern "C" fn(*mut IbvPd, *mut c_void, usize, u64, c_int) -> *mut IbvMr;
type DeregMr = unsafe extern "C" fn(*mut IbvMr) -> c_int;
type CreateCq = unsafe extern "C" fn(
    *mut IbvContext,
    c_int,
    *mut c_void,
    *mut IbvCompChannel,
    c_int,
) -> *mut IbvCq;
type DestroyCq = unsafe extern "C" fn(*mut IbvCq) -> c_int;
type CreateCompChannel = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvCompChannel;
type DestroyCompChannel = unsafe extern "C" fn(*mut IbvCompChannel) -> c_int;
type GetAsyncEvent = unsafe extern "C" fn(*mut IbvContext, *mut IbvAsyncEvent) -> c_int;
type AckAsyncEvent = unsafe extern "C" fn(*mut IbvAsyncEvent);
type GetCqEvent =
    unsafe extern "C" fn(*mut IbvCompChannel, *mut *mut IbvCq, *mut *mut c_void) -> c_int;
type AckCqEvents = unsafe extern "C" fn(*mut IbvCq, std::ffi::c_uint);
type CreateQp = unsafe extern "C" fn(*mut IbvPd, *mut IbvQpInitAttr) -> *mut IbvQp;
type CreateAh = unsafe extern "C" fn(*mut IbvPd, *mut IbvAhAttr) -> *mut c_void;
type DestroyAh = unsafe extern "C" fn(*mut c_void) -> c_int;
type ModifyQp = unsafe extern "C" fn(*mut IbvQp, *mut IbvQpAttr, c_int) -> c_int;
type DestroyQp = unsafe extern "C" fn(*mut IbvQp) -> c_int;

/// The library, open, and the calls looked up in it.
pub struct Verbs {
    handle: *mut c_void,
    pub(super) get_device_list: GetDeviceList,
    pub(super) free_device_list: FreeDeviceList,
    pub(super) get_device_name: GetDeviceName,
    pub(super) get_device_guid: GetDeviceGuid,
    pub(super) open_device: OpenDevice,
    pub(super) close_device: CloseDevice,
    pub(super) query_port: QueryPort,
    pub(super) query_gid: QueryGid,
    /// `_ibv_query_gid_table` (rdma-core 29 and later): the GID table with each entry's
    /// type in one call. Older libraries give GIDs one at a time, without types.
    pub(super) query_gid_table: Option<QueryGidTable>,
    pub(super) alloc_pd: AllocPd,
    pub(super) dealloc_pd: DeallocPd,
    pub(super) reg_mr: RegMr,
    /// `ibv_reg_mr_iova` (rdma-core 20 and later): an MR whose addresses on the wire are
    /// not the server's but the guest's.
    pub(super) reg_mr_iova: Option<RegMrIova>,
    pub(super) dereg_mr: DeregMr,
    pub(super) create_cq: CreateCq,
    pub(super) destroy_cq: DestroyCq,
    /// A completion channel: an fd that becomes readable when an armed CQ completes, so a
    /// server's event loop can wait for completions instead of polling.
    pub(super) create_comp_channel: CreateCompChannel,
    pub(super) destroy_comp_channel: DestroyCompChannel,
    pub(super) get_cq_event: GetCqEvent,
    pub(super) ack_cq_events: AckCqEvents,
    /// The device's own events (a QP's fatal error, a port down, the device gone), read
    /// from the context's async fd.
    pub(super) get_async_event: GetAsyncEvent,
    pub(super) ack_async_event: AckAsyncEvent,
    pub(super) create_qp: CreateQp,
    /// Address handles: where a UD send goes.
    pub(super) create_ah: CreateAh,
    pub(super) destroy_ah: DestroyAh,
    pub(super) modify_qp: ModifyQp,
    pub(super) destroy_qp: DestroyQp,
}

// SAFETY: the handle is only used to close the library, once, in `drop`; libibverbs' calls
// are thread-safe for distinct objects, and the wrappers in `devices.rs` never share one
// object between threads without `&mut`.
unsafe impl Send for Verbs {}
// SAFETY: as above; the function pointers are plain addresses.
unsafe impl Sync for Verbs {}

/// Why libibverbs could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{library} could not be loaded ({reason}); the rdma path needs rdma-core's \
         libibverbs (Debian: libibverbs1 and ibverbs-providers)"
    )]
    Missing { library: String, reason: String },
    #[error("{library} has no {symbol} ({reason}); rdma-core is too old for the rdma path")]
    NoSymbol {
        library: String,
        symbol: String,
        reason: String,
    },
}

/// The library's name as every rdma-core since 2005 installs it.
pub const LIBRARY: &str = "libibverbs.so.1";

impl Verbs {
    /// Opens [`LIBRARY`] from the loader's search path.
    pub fn load() -> Result<Verbs, LoadError> {
        Verbs::load_from(LIBRARY)
    }

    /// Opens `library` (a name the dynamic loader searches for, or a path).
    pub fn load_from(library: &str) -> Result<Verbs, LoadError> {
        let name = std::ffi::CString::new(library).map_err(|_| LoadError::Missing {
            library: library.to_string(),
            reason: "the name holds a NUL byte".into(),
        })?;
        // SAFETY: `name` is a valid C string; dlopen runs the library's constructors, which
        // for libibverbs only initialise its own state.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(LoadError::Missing {
                library: library.to_string(),
                reason: last_dl_error(),
            });
        }
        let symbol = |symbol: &CStr| -> Result<*mut c_void, LoadError> {
            // SAFETY: `handle` is an open library and `symbol` a valid C string.
            let address = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
            if address.is_null() {
                Err(LoadError::NoSymbol {
                    library: library.to_string(),
                    symbol: symbol.to_string_lossy().into_owned(),
                    reason: last_dl_error(),
                })
            } else {
                Ok(address)
            }
        };
        let required = |name: &CStr| {
            let found = symbol(name);
            if found.is_err() {
                // SAFETY: nothing from the library is in use yet.
                unsafe { libc::dlclose(handle) };
            }
            found
        };
        // SAFETY: every cast below turns the address of the libibverbs function of that
        // name into a pointer of the type its C prototype (verbs.h) spells out.
        unsafe {
            Ok(Verbs {
                handle,
                get_device_list: cast(required(c"ibv_get_device_list")?),
                free_device_list: cast(required(c"ibv_free_device_list")?),
                get_device_name: cast(required(c"ibv_get_device_name")?),
                get_device_guid: cast(required(c"ibv_get_device_guid")?),
                open_device: cast(required(c"ibv_open_device")?),
                close_device: cast(required(c"ibv_close_device")?),
                query_port: cast(required(c"ibv_query_port")?),
                query_gid: cast(required(c"ibv_query_gid")?),
                query_gid_table: symbol(c"_ibv_query_gid_table").ok().map(|a| cast(a)),
                alloc_pd: cast(required(c"ibv_alloc_pd")?),
                dealloc_pd: cast(required(c"ibv_dealloc_pd")?),
                reg_mr: cast(required(c"ibv_reg_mr")?),
                reg_mr_iova: symbol(c"ibv_reg_mr_iova").ok().map(|a| cast(a)),
                dereg_mr: cast(required(c"ibv_dereg_mr")?),
                create_cq: cast(required(c"ibv_create_cq")?),
                destroy_cq: cast(required(c"ibv_destroy_cq")?),
                create_comp_channel: cast(required(c"ibv_create_comp_channel")?),
                destroy_comp_channel: cast(required(c"ibv_destroy_comp_channel")?),
                get_cq_event: cast(required(c"ibv_get_cq_event")?),
                ack_cq_events: cast(required(c"ibv_ack_cq_events")?),
                get_async_event: cast(required(c"ibv_get_async_event")?),
                ack_async_event: cast(required(c"ibv_ack_async_event")?),
                create_qp: cast(required(c"ibv_create_qp")?),
                create_ah: cast(required(c"ibv_create_ah")?),
                destroy_ah: cast(required(c"ibv_destroy_ah")?),
                modify_qp: cast(required(c"ibv_modify_qp")?),
                destroy_qp: cast(required(c"ibv_destroy_qp")?),
            })
        }
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: every object made through the library is owned by something that borrows
        // this `Verbs` (`devices.rs`) or holds an `Arc` of it (`host.rs`), so none outlives
        // the handle.
        unsafe { libc::dlclose(self.handle) };
    }
}

impl std::fmt::Debug for Verbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verbs")
            .field("gid_table", &self.query_gid_table.is_some())
            .finish_non_exhaustive()
    }
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `address` must be a function whose C prototype `F` spells out. (A data pointer and a
/// function pointer have the same size and representation on the platforms rdma-core
/// supports; the size is checked at compile time.)
unsafe fn cast<F: Copy>(address: *mut c_void) -> F {
    const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
    // SAFETY: same size (above); the caller vouches for the type.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) }
}

/// `dlerror()`'s message, or a placeholder when it has none.
fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call
    // on this thread; it is copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "no reason given".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_with_the_packages_that_bring_it() {
        let error = Verbs::load_from("libibverbs-that-does-not-exist.so.9").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("libibverbs-that-does-not-exist.so.9") && text.contains("libibverbs1"),
            "{text}"
        );
    }

    #[test]
    fn a_library_without_the_calls_is_refused_by_the_first_missing_one() {
        // libc is there on every host and has none of libibverbs' calls.
        let error = Verbs::load_from("libc.so.6").unwrap_err();
        assert!(
            matches!(&error, LoadError::NoSymbol { symbol, .. } if symbol == "ibv_get_device_list"),
            "{error}"
        );
    }
}
