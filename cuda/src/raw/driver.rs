//! Raw CUDA driver calls behind a safe API: driver presence, contexts, the device arena,
//! host→device copies guarded by events, memsets and device→host readback.
//!
//! The rule that makes asynchronous copies sound: the host memory a copy reads (a staging slot
//! or a registered piece of a mapped file) and the device arena it writes are owned by the
//! [`InFlight`] value until the copy's event has completed. Dropping an `InFlight` waits for the
//! event; if even that fails, the host memory is leaked rather than reused.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};
use tensorstream_engine::{Error, ErrorKind, IoBuf, Result};

use crate::copy::CopyOp;
use crate::raw::mapped::Registered;

/// Converts a driver error into the public error, naming what was being done.
pub fn device_error(what: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .ok()
        .and_then(|c| c.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", e.0));
    Error::new(ErrorKind::Device, format!("{what}: {name}")).with_source(e)
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded. Nothing else in this crate
/// touches the driver before this returned true (cudarc panics when the library is missing).
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only dlopen()s candidate library names and closes them again;
    // it calls no CUDA API function. (Loading runs the library's own initializers, which is why
    // cudarc marks it unsafe; the driver library's are written to be loaded this way.)
    unsafe { sys::is_culib_present() }
}

fn no_driver() -> Error {
    Error::new(
        ErrorKind::Device,
        "no CUDA driver found (libcuda.so not loadable)",
    )
}

/// Whether the driver library can be loaded, asked once per process (it does not change, and
/// the context guards below ask on every call).
fn driver_loaded() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(driver_present)
}

/// The calling thread's current CUDA context as an address (0: none, also before `cuInit`), or
/// `None` where that cannot be known (no driver, or the query failed).
fn current_context() -> Option<usize> {
    if !driver_loaded() {
        return None;
    }
    let mut c: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: cuCtxGetCurrent writes one context handle to the out parameter, which points at a
    // live local, and changes nothing.
    match unsafe { sys::cuCtxGetCurrent(&mut c) }.result() {
        Ok(()) => Some(c as usize),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_INITIALIZED)) => Some(0),
        Err(_) => None,
    }
}

/// Puts back the calling thread's current CUDA context. The driver keeps one current context
/// per thread, and this crate makes its device's primary context current for its calls (as
/// cudarc's own drops do): without this, a load or a drop on a thread where an application
/// works on another device would switch that thread to this crate's device (the CUDA runtime
/// follows the current context: a framework's next allocation would land on the wrong GPU).
///
/// Made with [`KeepCurrent::now`] at the start of a public call, it saves the thread's context
/// and restores it when dropped. As the last field of a type whose drop makes CUDA calls (its
/// own or its fields'), it starts [`KeepCurrent::idle`], the type's `Drop` calls
/// [`KeepCurrent::save`] first, and the restore runs after every other field has dropped.
#[derive(Debug, Default)]
pub struct KeepCurrent {
    /// The context to put back (0: none); `None`: leave the thread as it is.
    saved: Option<usize>,
}

impl KeepCurrent {
    /// Saves the thread's current context now.
    pub fn now() -> Self {
        KeepCurrent {
            saved: current_context(),
        }
    }

    /// Saves nothing until [`KeepCurrent::save`].
    pub const fn idle() -> Self {
        KeepCurrent { saved: None }
    }

    /// Saves the thread's current context now (at the start of a `Drop`).
    pub fn save(&mut self) {
        self.saved = current_context();
    }
}

impl Drop for KeepCurrent {
    fn drop(&mut self) {
        let Some(saved) = self.saved else {
            return;
        };
        if current_context().is_none_or(|now| now == saved) {
            return;
        }
        // SAFETY: `saved` is null or the context that was current on this thread when it was
        // saved. This crate never destroys a context another owner made current (it only
        // releases its own references to primary contexts), and a primary context of its own
        // that was current then is the one its calls bound since, so `now == saved` above
        // returned before this point; so `saved` is still a live context (or null, which
        // unbinds the thread).
        let r = unsafe { sys::cuCtxSetCurrent(saved as sys::CUcontext) }.result();
        if let Err(e) = r {
            log::warn!(
                "could not make the thread's earlier CUDA context current again: {}",
                device_error("", e)
            );
        }
    }
}

/// Runs a driver call, turning a panic inside cudarc (a symbol missing from an old driver)
/// into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::Device,
            format!("{what}: the CUDA driver library lacks a required function (driver too old?)"),
        )),
    }
}

/// Number of CUDA devices (0 when the driver is present but sees no GPU).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(no_driver());
    }
    guarded("initialising CUDA", || {
        match result::init() {
            Ok(()) => {}
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => return Ok(0),
            Err(e) => return Err(device_error("initialising CUDA (cuInit)", e)),
        }
        let n =
            result::device::get_count().map_err(|e| device_error("counting CUDA devices", e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    })
}

/// Opens (retains) the primary context of device `ordinal`, with clear errors when there is no
/// driver or no such device.
pub fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::new(
            ErrorKind::Device,
            format!(
                "CUDA device {ordinal} not present ({n} device{})",
                if n == 1 { "" } else { "s" }
            ),
        ));
    }
    guarded("opening the CUDA device", || {
        CudaContext::new(ordinal)
            .map_err(|e| device_error(&format!("opening CUDA device {ordinal}"), e))
    })
}

/// A device attribute as an integer. (After `bind`: cudarc's `attribute` would first hand
/// back an error stored by earlier, unrelated work.)
pub fn device_attribute(ctx: &CudaContext, attr: sys::CUdevice_attribute) -> Result<i32> {
    bind(ctx)?;
    // SAFETY: a query of a device this live context was created on; no memory is involved.
    unsafe { result::device::get_attribute(ctx.cu_device(), attr) }
        .map_err(|e| device_error("querying a device attribute", e))
}

/// The error a context answers every call with after an unrecoverable fault (an illegal
/// address, a failed launch, an ECC error: "sticky" errors), or `None` while it works. One
/// cheap query (free memory) stands for every call.
pub(crate) fn context_fault(ctx: &CudaContext) -> Option<Error> {
    if let Err(e) = bind(ctx) {
        return Some(e);
    }
    result::mem_get_info()
        .err()
        .map(|e| device_error("the CUDA context", e))
}

/// Records `ev` on `stream` (both of one context) after [`bind`]: cudarc's `record` would
/// first hand back an error stored by earlier, unrelated work, and fail this load with it.
fn record_event(ev: &CudaEvent, stream: &CudaStream) -> Result<()> {
    if ev.context() != stream.context() {
        return Err(Error::invalid(
            "a CUDA event and the stream it is recorded on belong to different contexts",
        ));
    }
    bind(stream.context())?;
    // SAFETY: a live event and a live stream of the context made current just above.
    unsafe { result::event::record(ev.cu_event(), stream.cu_stream()) }
        .map_err(|e| device_error("recording a CUDA event", e))
}

pub(crate) fn bind(ctx: &CudaContext) -> Result<()> {
    // cudarc stores an error that failed in a Drop (where it cannot be returned) and hands it
    // to the next `bind_to_thread` on any thread, clearing it. That error belongs to earlier,
    // unrelated work: say so, and bind again so that this operation is judged on its own.
    if let Err(stale) = ctx.bind_to_thread() {
        if ctx.bind_to_thread().is_err() {
            return Err(device_error("making the CUDA context current", stale));
        }
        log::warn!(
            "an earlier CUDA error surfaced late: {}",
            device_error("", stale)
        );
    }
    Ok(())
}

/// One device allocation holding every selected tensor of a load, or a window of one
/// ([`DeviceArena::window`]: the shards of a sharded checkpoint share one allocation).
#[derive(Debug)]
pub struct DeviceArena {
    ptr: sys::CUdeviceptr,
    len: u64,
    ctx: Arc<CudaContext>,
    freed: bool,
    /// For a window: the allocation it lies in, kept alive (and freed) through this handle.
    parent: Option<Arc<DeviceArena>>,
    /// Last: restores the dropping thread's context after everything else has dropped.
    keep: KeepCurrent,
}

impl DeviceArena {
    /// Allocates `len` bytes (at least one) on the context's device.
    pub fn alloc(ctx: &Arc<CudaContext>, len: u64) -> Result<Self> {
        let n = usize::try_from(len.max(1))
            .map_err(|_| Error::invalid("device arena does not fit the address space"))?;
        bind(ctx)?;
        // SAFETY: cuMemAlloc with a non-zero size on the current context; the pointer is freed
        // exactly once (in `free` or Drop).
        let ptr = unsafe { result::malloc_sync(n) }.map_err(|e| {
            // Out of memory: say how much the device has, so the shortfall is plain.
            let room = match e.0 {
                sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => result::mem_get_info()
                    .map(|(free, total)| {
                        format!(
                            ", with {:.2} GiB free of {:.2} GiB on the device",
                            free as f64 / f64::from(1u32 << 30),
                            total as f64 / f64::from(1u32 << 30)
                        )
                    })
                    .unwrap_or_default(),
                _ => String::new(),
            };
            device_error(
                &format!(
                    "allocating {len} bytes ({:.2} GiB) on CUDA device {} for the tensors{room}",
                    len as f64 / f64::from(1u32 << 30),
                    ctx.ordinal()
                ),
                e,
            )
        })?;
        Ok(DeviceArena {
            ptr,
            len,
            ctx: ctx.clone(),
            freed: false,
            parent: None,
            keep: KeepCurrent::idle(),
        })
    }

    /// The `len` bytes at offset `off` of `parent`, as an arena of their own: loads into the
    /// window write only there. The allocation is freed when its last handle (the parent or
    /// any window of it) goes.
    pub fn window(parent: &Arc<DeviceArena>, off: u64, len: u64) -> Result<Arc<DeviceArena>> {
        parent.check(off, len)?;
        Ok(Arc::new(DeviceArena {
            ptr: parent.ptr + off,
            len,
            ctx: parent.ctx.clone(),
            freed: false,
            parent: Some(parent.clone()),
            keep: KeepCurrent::idle(),
        }))
    }

    /// True for a window of a larger allocation ([`DeviceArena::window`]).
    pub fn is_window(&self) -> bool {
        self.parent.is_some()
    }

    /// Device address of the first byte.
    pub fn base(&self) -> u64 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for an empty arena (one byte is still allocated).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The context the arena lives in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid(format!(
                "device range {off}+{len} lies outside the arena ({} bytes)",
                self.len
            ))),
        }
    }

    fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context() != &self.ctx {
            return Err(Error::invalid("stream belongs to another CUDA context"));
        }
        Ok(())
    }

    /// Queues zeroing of `len` bytes at `off` on `stream`.
    pub fn memset_async(&self, off: u64, len: u64, stream: &CudaStream) -> Result<()> {
        self.check(off, len)?;
        self.check_stream(stream)?;
        if len == 0 {
            return Ok(());
        }
        bind(&self.ctx)?;
        // SAFETY: the range was checked to lie inside this live allocation; device memory only,
        // no host memory is involved; the stream belongs to the arena's context.
        unsafe { result::memset_d8_async(self.ptr + off, 0, len as usize, stream.cu_stream()) }
            .map_err(|e| device_error("zeroing device memory (cuMemsetD8Async)", e))
    }

    /// Copies `dst.len()` bytes at arena offset `off` back to host memory (synchronous). The
    /// copy runs on the legacy default stream, which does not wait for the crate's copy streams
    /// (non-blocking): call it once the copies into the arena are complete (a [`DeviceModel`]'s
    /// are; so are a streamed tensor's bytes once it was announced).
    ///
    /// [`DeviceModel`]: crate::DeviceModel
    pub fn read(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        self.check(off, dst.len() as u64)?;
        if dst.is_empty() {
            return Ok(());
        }
        bind(&self.ctx)?;
        // SAFETY: the source range lies inside this live allocation (checked); `dst` is an
        // exclusive host slice of exactly the copied length; the call is synchronous, so `dst`
        // is not touched after it returns.
        unsafe { result::memcpy_dtoh_sync(dst, self.ptr + off) }
            .map_err(|e| device_error("reading device memory back (cuMemcpyDtoH)", e))
    }

    /// Waits for all work on the device and frees the arena, reporting any error. A window
    /// lets go of its allocation, which is freed (in the same way) if this was its last handle.
    pub fn free(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.freed {
            return Ok(());
        }
        self.freed = true;
        if let Some(parent) = self.parent.take() {
            // A window owns no allocation: the allocation goes with its last handle, and is
            // freed here (errors reported) when this was it.
            // (`into_inner`, not `try_unwrap`: of two last handles let go of at once on two
            // threads, exactly one gets the allocation, and its errors are reported.)
            return match Arc::into_inner(parent) {
                Some(p) => p.free(),
                None => Ok(()),
            };
        }
        // `bind` absorbs an error stored by earlier, unrelated work and binds again; then the
        // context is waited on directly (cudarc's `CudaContext::synchronize` would hand back
        // such an error without waiting, and the arena would leak for nothing).
        let synced = bind(&self.ctx).and_then(|()| {
            result::ctx::synchronize()
                .map_err(|e| device_error("waiting for the device before freeing the arena", e))
        });
        if let Err(e) = synced {
            // The device could not confirm that no copy into the arena is still running:
            // leave it allocated (until the context goes) rather than free it under a copy.
            return Err(e.context("the device arena was not freed"));
        }
        // SAFETY: `ptr` came from cuMemAlloc and is freed once (guarded by `freed`). Work into
        // it (this crate's copies, its memsets, and anything a caller queued at `base()`) may
        // have been queued on any stream of the context, so what makes this sound is the
        // context synchronization above, which returned without error: nothing queued before
        // it is still running.
        unsafe { result::free_sync(self.ptr) }
            .map_err(|e| device_error("freeing the device arena", e))
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        self.keep.save();
        let _ = self.release();
    }
}

/// Host memory a copy reads from, kept alive until the copy completed.
#[derive(Debug)]
pub enum HostSource {
    /// A staging slot (pinned when it came from this crate).
    Slot(IoBuf),
    /// A host-registered piece of a mapped file.
    Mapped(Registered),
}

impl HostSource {
    fn ptr_len(&self) -> (*const u8, usize) {
        match self {
            HostSource::Slot(b) => (b.as_ptr(), b.len()),
            HostSource::Mapped(r) => (r.as_ptr(), r.len()),
        }
    }
}

/// Copies (or memsets) queued on a stream, with the event that tells when they are done. Owns
/// the host source and an Arc of the arena until then.
#[derive(Debug)]
pub struct InFlight {
    source: Option<HostSource>,
    event: Option<CudaEvent>,
    arena: Arc<DeviceArena>,
    /// Last: restores the dropping thread's context after everything else has dropped.
    keep: KeepCurrent,
}

/// Creates an event whose `synchronize` sleeps instead of spinning.
pub fn new_event(ctx: &Arc<CudaContext>) -> Result<CudaEvent> {
    // `bind` first takes any error stored by earlier work, which cudarc would return here.
    bind(ctx)?;
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
        .map_err(|e| device_error("creating a CUDA event", e))
}

/// A failed [`copy_to_device`]: the error, and the host source when it is safe to reuse.
#[derive(Debug)]
pub struct CopyError {
    /// What went wrong.
    pub error: Error,
    /// The source, or `None` if the device could not confirm earlier copies stopped.
    pub source: Option<HostSource>,
}

fn copy_err(error: Error, source: Option<HostSource>) -> Box<CopyError> {
    Box::new(CopyError { error, source })
}

/// Queues `copies` from `source` into `arena` on `stream` and records `event` after them.
/// On error nothing is left pending: the source comes back (or `None` if the device could not
/// confirm that earlier copies stopped, in which case the memory is deliberately leaked).
pub fn copy_to_device(
    arena: &Arc<DeviceArena>,
    source: HostSource,
    copies: &[CopyOp],
    stream: &CudaStream,
    event: CudaEvent,
) -> std::result::Result<InFlight, Box<CopyError>> {
    let (ptr, len) = source.ptr_len();
    for c in copies {
        let ok_src = c.src.checked_add(c.len).is_some_and(|e| e <= len as u64);
        if !ok_src {
            return Err(copy_err(
                Error::invalid(format!(
                    "copy of {} bytes at {} lies outside the {len}-byte host buffer",
                    c.len, c.src
                )),
                Some(source),
            ));
        }
        if let Err(e) = arena.check(c.dst, c.len) {
            return Err(copy_err(e, Some(source)));
        }
    }
    if let Err(e) = arena.check_stream(stream).and_then(|_| bind(&arena.ctx)) {
        return Err(copy_err(e, Some(source)));
    }
    for c in copies.iter().filter(|c| c.len > 0) {
        // SAFETY: source and destination ranges were checked above to lie inside the host
        // buffer and the arena; both stay alive until the event recorded below completes,
        // because the returned InFlight owns the host buffer (an exclusive IoBuf window, or a
        // registered read-only mapping no one writes) and an Arc of the arena, and waits for
        // the event before giving either up. (Nothing stops a caller from queueing other device
        // work into the same arena bytes — overlapping windows, `base()` — but that is a race
        // on device memory, which the driver tolerates, not host memory freed or reused.)
        let r = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                arena.ptr + c.dst,
                ptr.add(c.src as usize).cast(),
                c.len as usize,
                stream.cu_stream(),
            )
        }
        .result();
        if let Err(e) = r {
            let err = device_error("queueing a host-to-device copy (cuMemcpyHtoDAsync)", e);
            return Err(copy_err(err, settle(stream, source)));
        }
    }
    if let Err(err) = record_event(&event, stream) {
        return Err(copy_err(err, settle(stream, source)));
    }
    Ok(InFlight {
        source: Some(source),
        event: Some(event),
        arena: arena.clone(),
        keep: KeepCurrent::idle(),
    })
}

/// After a failed submission: wait for what was queued; give the source back only if that
/// worked.
fn settle(stream: &CudaStream, source: HostSource) -> Option<HostSource> {
    match sync_stream(stream) {
        Ok(()) => Some(source),
        Err(_) => {
            std::mem::forget(source);
            None
        }
    }
}

/// Records `event` on `stream` after work that reads no host memory (memsets).
pub fn mark(arena: &Arc<DeviceArena>, stream: &CudaStream, event: CudaEvent) -> Result<InFlight> {
    arena.check_stream(stream)?;
    record_event(&event, stream)?;
    Ok(InFlight {
        source: None,
        event: Some(event),
        arena: arena.clone(),
        keep: KeepCurrent::idle(),
    })
}

/// Waits for the work queued on `stream`. Binds, then waits on the stream itself: cudarc's
/// `CudaStream::synchronize` would return an error stored by unrelated work without waiting.
pub(crate) fn sync_stream(stream: &CudaStream) -> Result<()> {
    bind(stream.context())?;
    // SAFETY: a live stream of the context just made current on this thread.
    unsafe { result::stream::synchronize(stream.cu_stream()) }
        .map_err(|e| device_error("waiting for a CUDA stream", e))
}

/// Waits for `ev` (recorded in `ctx`). The event's own answer decides whether the work is done,
/// not an error another thread's Drop stored in the context (cudarc's `CudaEvent::synchronize`
/// binds first and would return that one without waiting): bind, then wait on the event.
fn sync_event(ctx: &CudaContext, ev: &CudaEvent) -> Result<()> {
    bind(ctx)?;
    // SAFETY: `ev` is a live event of this context; the context is current on this thread
    // (bound just above).
    unsafe { result::event::synchronize(ev.cu_event()) }.map_err(|e| {
        // A sticky fault is reported by every call, whichever work caused it.
        device_error(
            "waiting for a host-to-device copy (or earlier device work)",
            e,
        )
    })
}

impl InFlight {
    /// True once the work completed (never blocks).
    pub fn is_done(&self) -> Result<bool> {
        let Some(ev) = &self.event else {
            return Ok(true);
        };
        bind(ev.context())?;
        // SAFETY: a live event of the context made current just above.
        match unsafe { result::event::query(ev.cu_event()) } {
            Ok(()) => Ok(true),
            Err(result::DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(device_error("querying a CUDA event", e)),
        }
    }

    /// Waits for the work; gives back the host source and the event for reuse.
    pub fn wait(mut self) -> Result<(Option<HostSource>, CudaEvent)> {
        let ev = match self.event.take() {
            Some(ev) => ev,
            None => return Err(Error::invalid("copy already waited for")),
        };
        match sync_event(&self.arena.ctx, &ev) {
            Ok(()) => Ok((self.source.take(), ev)),
            Err(e) => {
                // The copy may still be running: neither its source nor its destination may
                // be released.
                if let Some(s) = self.source.take() {
                    std::mem::forget(s);
                }
                std::mem::forget(self.arena.clone());
                Err(e)
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.keep.save();
        let Some(src) = self.source.take() else {
            return;
        };
        let ok = match &self.event {
            Some(ev) => sync_event(&self.arena.ctx, ev).is_ok(),
            None => true,
        };
        if !ok {
            // The device could not confirm the copy finished: never hand the memory back, on
            // either side of the copy.
            std::mem::forget(src);
            std::mem::forget(self.arena.clone());
        }
        let _ = &self.arena;
    }
}
