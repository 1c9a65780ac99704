//! Pinned staging memory: an anonymous, page-aligned mapping page-locked with
//! `cuMemHostRegister(flags 0)` — not write-combined, so the CPU reads it at full speed (hashing),
//! and anonymous, so the kernel accepts it for O_DIRECT reads and io_uring fixed buffers (memory
//! from `cuMemHostAlloc` is a mapping of the NVIDIA device file, which older kernels refuse to
//! register with io_uring). Allocated once per device and lent out as [`IoBuf`] slots.
//!
//! With [`CudaOptions::huge_pages`](crate::CudaOptions::huge_pages) (off by default) the mapping is
//! 2 MiB-aligned and advised to use transparent huge pages before it is populated: the CPU copies
//! into the slots (page-cache reads) then touch one TLB entry per 2 MiB instead of per 4 KiB,
//! and the driver pins fewer, larger pages. Where the kernel gives no huge pages the region is
//! simply made of small ones; [`PinnedRegion::huge_bytes`] tells how much is huge.
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

/// Transparent huge page size the region is aligned to when huge pages are asked for.
pub const HUGE_PAGE: usize = 2 << 20;

/// An anonymous private mapping of at least `len` bytes (whole pages; with `huge`, whole 2 MiB
/// pages, 2 MiB-aligned and advised `MADV_HUGEPAGE`), every page populated. Returns its start
/// and length; the caller unmaps it.
fn map_staging(len: usize, huge: bool) -> Result<(NonNull<u8>, usize)> {
    let unit = if huge { HUGE_PAGE } else { PAGE };
    let too_big = || Error::invalid("staging size overflows");
    let len = len
        .max(1)
        .checked_next_multiple_of(unit)
        .ok_or_else(too_big)?;
    // Room to slide to an aligned start; the slack is unmapped again below.
    let map_len = len.checked_add(unit - PAGE).ok_or_else(too_big)?;
    // SAFETY: anonymous private mapping with no address hint; the result is checked for
    // MAP_FAILED before use.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
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
    let start = raw as usize;
    let head = start.next_multiple_of(unit) - start;
    let tail = map_len - head - len;
    let base = raw.cast::<u8>().wrapping_add(head);
    // SAFETY: the head and tail slices lie inside the mapping just made and outside
    // [base, base+len), which is all that is kept; nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap(base.wrapping_add(len).cast(), tail);
        }
    }
    if huge {
        // SAFETY: advice on our own, not yet populated mapping; it changes no contents. A
        // kernel without transparent huge pages refuses it, and small pages are used.
        let r = unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        if r != 0 {
            log::debug!(
                "no transparent huge pages for the staging ring: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // Never in a forked child: reads DMA into the slots for the ring's whole life, and on
    // kernels before 5.19 a fork during one (another thread starting a subprocess) makes
    // copy-on-write move the parent's page away from the one the read lands in.
    // SAFETY: advice on our own mapping, exactly its length; it changes no contents.
    unsafe { libc::madvise(base.cast(), len, libc::MADV_DONTFORK) };
    // SAFETY: populating our own read-write mapping changes no contents (fresh zero pages).
    let populated = unsafe { libc::madvise(base.cast(), len, libc::MADV_POPULATE_WRITE) } == 0;
    if !populated {
        // Kernels before 5.14: touch every page instead.
        for off in (0..len).step_by(PAGE) {
            // SAFETY: `off < len`, inside our own writable mapping, which nothing else
            // references yet; writing the zero a fresh page already holds changes nothing.
            unsafe { std::ptr::write_volatile(base.wrapping_add(off), 0u8) };
        }
    }
    let ptr = NonNull::new(base)
        .ok_or_else(|| Error::new(ErrorKind::Io, "mmap returned a null pointer"))?;
    Ok((ptr, len))
}

/// Bytes of `[addr, addr+len)` backed by transparent huge pages, from `/proc/self/smaps` (the
/// mapping that starts at `addr`); `None` where that cannot be read.
fn huge_bytes_at(addr: usize) -> Option<u64> {
    smaps_huge_kb(&std::fs::read_to_string("/proc/self/smaps").ok()?, addr)
        .map(|kb| kb.saturating_mul(1024))
}

/// `AnonHugePages` (kB) of the mapping in `smaps` whose range holds `addr`.
fn smaps_huge_kb(smaps: &str, addr: usize) -> Option<u64> {
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
    }
    None
}

/// A page-locked host region registered with one CUDA context.
#[derive(Debug)]
pub struct PinnedRegion {
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
    /// Registered with `cuMemHostRegister` (false: the driver refused; plain pageable memory).
    locked: bool,
    /// Last: restores the dropping thread's CUDA context after everything else has dropped.
    keep: super::driver::KeepCurrent,
}

// SAFETY: the region is plain memory owned by this value; access to its bytes goes through
// IoBuf windows, which carry their own exclusivity rules.
unsafe impl Send for PinnedRegion {}
// SAFETY: as above; `&PinnedRegion` exposes no access to the bytes.
unsafe impl Sync for PinnedRegion {}

impl PinnedRegion {
    /// Maps `len` bytes (rounded up to whole pages; with `huge`, to whole 2 MiB pages on
    /// transparent huge pages where the kernel gives them) and page-locks them for `ctx`'s
    /// device.
    pub fn new(ctx: &Arc<CudaContext>, len: usize, huge: bool) -> Result<Arc<Self>> {
        let (ptr, len) = map_staging(len, huge)?;
        let raw: *mut libc::c_void = ptr.as_ptr().cast();
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
            keep: super::driver::KeepCurrent::idle(),
        }))
    }

    /// Bytes of the region on transparent huge pages (`None`: unknown, e.g. no `/proc`). Reads
    /// `/proc/self/smaps`, which walks the whole process's memory map: a diagnostic, not for
    /// every load.
    pub fn huge_bytes(&self) -> Option<u64> {
        huge_bytes_at(self.ptr.as_ptr() as usize).map(|b| b.min(self.len as u64))
    }

    /// Whether the driver page-locked the region (false: copies come from pageable memory).
    pub fn is_page_locked(&self) -> bool {
        self.locked
    }

    /// Lends the region out as `count` slots of `size` bytes (`size` a multiple of the page
    /// size). Fails while windows from an earlier call are alive: `&mut Arc` plus a strong
    /// count of one and no weak handle means no other handle — and so no window — exists.
    pub fn slots(this: &mut Arc<Self>, count: usize, size: usize) -> Result<Vec<IoBuf>> {
        if Self::in_use(this) {
            return Err(Error::invalid(
                "the pinned staging slots are in use by another load on this device handle: \
                 loads on one CudaDevice run one at a time (open another to load in parallel)",
            ));
        }
        // `strong_count` is a relaxed load: order this load's use of the memory after whatever
        // the previous holders (another thread's load) wrote before dropping their handles.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
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

    /// True while windows from an earlier [`PinnedRegion::slots`] call (or other handles to
    /// the region) are alive.
    pub fn in_use(this: &Arc<Self>) -> bool {
        Arc::strong_count(this) != 1 || Arc::weak_count(this) != 0
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
        self.keep.save();
        if self.locked {
            // `bind` (not a bare `bind_to_thread`): an error stored by earlier work must not
            // keep the context from being made current here.
            let bound = super::driver::bind(&self.ctx).is_ok();
            // SAFETY: the region was registered in `new`, and the context it was registered in
            // is current (only called when `bind` succeeded); no copy can still read it,
            // because every copy holds its slot (and so an Arc of this region) until its event
            // completed.
            let r = if bound {
                unsafe { sys::cuMemHostUnregister(self.ptr.as_ptr().cast()) }
            } else {
                sys::cudaError_enum::CUDA_ERROR_INVALID_CONTEXT
            };
            if r != sys::cudaError_enum::CUDA_SUCCESS {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_gives_the_huge_bytes_of_the_mapping_holding_the_address() {
        let smaps = "\
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
AnonHugePages:    129024 kB
7f0008000000-7f0008001000 r--p 00000000 08:01 12 /usr/lib/x
Size:                  4 kB
AnonHugePages:         0 kB
";
        assert_eq!(smaps_huge_kb(smaps, 0x7f00_0000_0000), Some(129_024));
        assert_eq!(smaps_huge_kb(smaps, 0x7f00_0400_0000), Some(129_024));
        assert_eq!(smaps_huge_kb(smaps, 0x7f00_0800_0000), Some(0));
        assert_eq!(smaps_huge_kb(smaps, 0x1000), None);
        assert_eq!(smaps_huge_kb("", 0x1000), None);
    }

    fn unmap(ptr: NonNull<u8>, len: usize) {
        // SAFETY: a mapping made by map_staging in the test, unmapped once.
        unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    }

    #[test]
    fn staging_is_aligned_whole_writable_pages() {
        for (want, huge, unit) in [(3 * PAGE + 1, false, PAGE), (5 << 20, true, HUGE_PAGE)] {
            let (ptr, len) = map_staging(want, huge).unwrap();
            assert_eq!(ptr.as_ptr() as usize % unit, 0);
            assert!(len >= want && len % unit == 0 && len - want < unit);
            // Writable end to end.
            // SAFETY: inside the fresh mapping, which only this test uses.
            unsafe {
                ptr.as_ptr().write(7);
                ptr.as_ptr().add(len - 1).write(9);
            }
            let huge_now = huge_bytes_at(ptr.as_ptr() as usize);
            let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .unwrap_or_default();
            if huge && (thp.contains("[madvise]") || thp.contains("[always]")) {
                // Huge pages may be short (fragmented memory): reported, not asserted. What
                // smaps says must fit the mapping.
                println!("huge pages: {huge_now:?} of {len} bytes");
                assert!(huge_now.is_some_and(|b| b <= len as u64), "{huge_now:?}");
            }
            unmap(ptr, len);
        }
    }
}
