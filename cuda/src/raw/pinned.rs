//! Pinned staging memory: an anonymous, page-aligned mapping page-locked with
//! `cuMemHostRegister(flags 0)` — not write-combined, so the CPU reads it at full speed (hashing),
//! and anonymous, so the kernel accepts it for O_DIRECT reads and io_uring fixed buffers (memory
//! from `cuMemHostAlloc` is a mapping of the NVIDIA device file, which older kernels refuse to
//! register with io_uring). Allocated once per device and lent out as [`IoBuf`] slots.
//!
//! Where the driver refuses to page-lock it (some sandboxes, e.g. gVisor's GPU proxy, may), the
//! mapping is kept unregistered: copies from it are then from pageable memory — still correct,
//! because such a copy returns only after the driver has taken the source bytes, and the events
//! still order slot reuse — just slower. [`PinnedRegion::is_page_locked`] tells which.

use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use tensorstream_engine::{Error, ErrorKind, IoBuf, MemRegion, Result};

use crate::raw::driver::device_error;

/// Page size assumed for alignment of slots (O_DIRECT needs at most this).
pub const PAGE: usize = 4096;

/// A page-locked host region registered with one CUDA context.
#[derive(Debug)]
pub struct PinnedRegion {
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
    /// Registered with `cuMemHostRegister` (false: the driver refused; plain pageable memory).
    locked: bool,
}

// SAFETY: the region is plain memory owned by this value; access to its bytes goes through
// IoBuf windows, which carry their own exclusivity rules.
unsafe impl Send for PinnedRegion {}
// SAFETY: as above; `&PinnedRegion` exposes no access to the bytes.
unsafe impl Sync for PinnedRegion {}

impl PinnedRegion {
    /// Maps `len` bytes (rounded up to whole pages) and page-locks them for `ctx`'s device.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Arc<Self>> {
        let len = len
            .max(1)
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| Error::invalid("staging size overflows"))?;
        // SAFETY: anonymous private mapping with no address hint; the result is checked for
        // MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::from_io(
                std::io::Error::last_os_error(),
                format!("mapping {len} bytes of staging memory"),
            ));
        }
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| Error::new(ErrorKind::Io, "mmap returned a null pointer"))?;
        let reg = super::driver::bind(ctx).and_then(|_| {
            // SAFETY: `raw..raw+len` is a live mapping we own; flags 0 = plain page-locked
            // (not write-combined). It is unregistered in Drop before the unmap.
            unsafe { sys::cuMemHostRegister_v2(raw, len, 0) }
                .result()
                .map_err(|e| {
                    device_error(
                        &format!("page-locking {len} bytes of staging memory (cuMemHostRegister)"),
                        e,
                    )
                })
        });
        let locked = match reg {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "{e}; staging in pageable memory instead (correct, but host to \
                     device copies are slower)"
                );
                false
            }
        };
        Ok(Arc::new(PinnedRegion {
            ptr,
            len,
            ctx: ctx.clone(),
            locked,
        }))
    }

    /// Whether the driver page-locked the region (false: copies come from pageable memory).
    pub fn is_page_locked(&self) -> bool {
        self.locked
    }

    /// Lends the region out as `count` slots of `size` bytes (`size` a multiple of the page
    /// size). Fails while windows from an earlier call are alive: `&mut Arc` plus a strong
    /// count of one and no weak handle means no other handle — and so no window — exists.
    pub fn slots(this: &mut Arc<Self>, count: usize, size: usize) -> Result<Vec<IoBuf>> {
        if Arc::strong_count(this) != 1 || Arc::weak_count(this) != 0 {
            return Err(Error::invalid(
                "the pinned staging slots are in use by another load on this device handle: \
                 loads on one CudaDevice run one at a time (open another to load in parallel)",
            ));
        }
        if size == 0 || !size.is_multiple_of(PAGE) {
            return Err(Error::invalid(format!(
                "slot size {size} is not a positive multiple of {PAGE}"
            )));
        }
        let total = count
            .checked_mul(size)
            .filter(|&t| t <= this.len)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{count} slots of {size} bytes do not fit the {}-byte staging region",
                    this.len
                ))
            })?;
        let region: Arc<dyn MemRegion> = this.clone();
        let mut out = Vec::with_capacity(count);
        let mut off = 0usize;
        while off < total {
            let p = NonNull::new(this.ptr.as_ptr().wrapping_add(off))
                .ok_or_else(|| Error::invalid("slot pointer is null"))?;
            // SAFETY: [off, off+size) lies inside the region (total <= len) and the windows
            // are pairwise disjoint; no other window exists (strong count was 1 under &mut).
            out.push(unsafe { IoBuf::from_raw_parts(p, size, region.clone()) });
            off += size;
        }
        Ok(out)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: the mapping [ptr, ptr+len) is valid for reads and writes, never moves, and is
// unmapped only in Drop, i.e. after the last Arc (and so the last IoBuf window) is gone.
unsafe impl MemRegion for PinnedRegion {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_pinned(&self) -> bool {
        self.locked
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        if self.locked {
            // `bind` (not a bare `bind_to_thread`): an error stored by earlier work must not
            // keep the context from being made current here.
            let bound = super::driver::bind(&self.ctx).is_ok();
            // SAFETY: the region was registered in `new`; no copy can still read it, because
            // every copy holds its slot (and so an Arc of this region) until its event completed.
            let r = unsafe { sys::cuMemHostUnregister(self.ptr.as_ptr().cast()) };
            if !bound || r != sys::cudaError_enum::CUDA_SUCCESS {
                // Still registered with the driver: unmapping would let a later mapping reuse
                // the address while the driver holds it. Leak the mapping instead.
                log::warn!(
                    "could not unregister {} bytes of pinned staging memory ({r:?}); \
                     leaving it mapped",
                    self.len
                );
                return;
            }
        }
        // SAFETY: unmapping our own mapping once; nothing refers to it any more, and it is not
        // (or no longer) registered with the driver.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
