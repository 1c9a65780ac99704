//! Memory the engine owns and lends to readers: aligned host buffers, the host arena, and
//! [`IoBuf`], the owned buffer handle every read takes and gives back.
//!
//! This is one of the named modules where `unsafe` is allowed (with the io_uring submission module
//! and the CUDA crate): an [`IoBuf`] is a raw window into memory kept alive by an owner, so that
//! the kernel (io_uring), a DMA engine (CUDA) or a reader thread may write into it while the engine
//! keeps the rest of the region. The invariants that make this sound are stated on each type.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Owner of a memory region that [`IoBuf`] windows point into.
///
/// # Safety
/// Implementors guarantee that the region `[base(), base() + len())` is valid for reads and writes,
/// initialized (its bytes are handed out as `&[u8]`: zero it if the allocator does not), never
/// moves, and stays allocated for as long as the owner value lives (windows hold an `Arc`).
/// Once a region is given to an [`Arena`] or windows, its bytes are read and written only
/// through those (an [`Arena`] checks that no other handle to the region exists before it
/// hands out the whole region).
pub unsafe trait MemRegion: Send + Sync + 'static {
    /// Start of the region.
    fn base(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// True when the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when the region is page-locked for DMA by a GPU (pinned host memory).
    fn is_pinned(&self) -> bool {
        false
    }
    /// Whether a child forked from now on gets this region (`true`, the default) or not
    /// (`MADV_DONTFORK`, while reads DMA into it: on kernels before 5.19 a `fork` by another
    /// thread during a direct read makes copy-on-write move the parent's page away from the
    /// one the read lands in, and the parent sees zeros). Best effort; regions that cannot
    /// tell their own pages from other memory's do nothing.
    fn set_inherited_by_fork(&self, _inherited: bool) {}
}

/// An owned, exclusive window of `len` bytes into a [`MemRegion`].
///
/// A read takes an `IoBuf` and gives it back when it completes (the ownership model of
/// tokio-uring / io-uring): nobody else can touch the window while a read owns it.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    region: Arc<dyn MemRegion>,
}

// SAFETY: an IoBuf is the only handle to its window (windows of one region never overlap, see the
// constructors), and the region itself is Send + Sync, so moving the handle to another thread is
// sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reading the window (`as_slice`).
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Builds a window from raw parts.
    ///
    /// # Safety
    /// `ptr..ptr+len` must lie inside `region`, and no other live `IoBuf` (or any other reference)
    /// may overlap it for the lifetime of the returned value.
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize, region: Arc<dyn MemRegion>) -> Self {
        IoBuf {
            ptr,
            len,
            cap: len,
            region,
        }
    }

    /// A window covering a whole, freshly allocated aligned buffer.
    pub fn aligned(len: usize, align: usize) -> Result<Self> {
        let buf = AlignedBuf::zeroed(len, align)?;
        let region: Arc<dyn MemRegion> = Arc::new(buf);
        let ptr = NonNull::new(region.base()).unwrap_or(NonNull::dangling());
        // SAFETY: the region was just created and nothing else refers to it.
        Ok(unsafe { IoBuf::from_raw_parts(ptr, len, region) })
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a zero-length window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw pointer for submission to the kernel / a DMA engine.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Raw pointer for reading.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    /// The bytes of the window.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window is valid (region invariant), exclusively ours (constructor invariant),
        // and `&self` forbids concurrent mutation through this handle.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The bytes of the window, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The region this window belongs to (for buffer registration and pinned checks).
    pub fn region(&self) -> &Arc<dyn MemRegion> {
        &self.region
    }
    /// Offset of the window inside its region.
    pub fn offset_in_region(&self) -> usize {
        self.ptr.as_ptr() as usize - self.region.base() as usize
    }
    /// Splits off the first `at` bytes into their own window; `self` keeps the rest.
    pub fn split_to(&mut self, at: usize) -> Option<IoBuf> {
        if at > self.len {
            return None;
        }
        let head = IoBuf {
            ptr: self.ptr,
            len: at,
            cap: at,
            region: self.region.clone(),
        };
        // SAFETY: at <= len <= cap, so the new start stays inside (or one past the end of) the
        // window.
        self.ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(at)) };
        self.len -= at;
        self.cap -= at;
        Some(head)
    }
    /// Joins two windows of the same region that are exactly adjacent (`self` ends where `other`
    /// starts, and `self` is not shortened by [`IoBuf::set_len`]) into one window. Gives both back
    /// unchanged if they are not.
    pub fn try_join(self, other: IoBuf) -> std::result::Result<IoBuf, (IoBuf, IoBuf)> {
        let same_region = Arc::ptr_eq(&self.region, &other.region);
        let adjacent = self.len == self.cap
            && (self.ptr.as_ptr() as usize).checked_add(self.cap)
                == Some(other.ptr.as_ptr() as usize);
        if !same_region || !adjacent {
            return Err((self, other));
        }
        let (len, cap) = match (
            self.len.checked_add(other.len),
            self.cap.checked_add(other.cap),
        ) {
            (Some(l), Some(c)) => (l, c),
            _ => return Err((self, other)),
        };
        // The union of two exclusive, adjacent windows of one region is exclusive and lies inside
        // that region: no unsafe needed, the fields simply widen `self`.
        Ok(IoBuf {
            ptr: self.ptr,
            len,
            cap,
            region: self.region,
        })
    }
    /// Capacity of the window (its length when it was created).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Sets the visible length to `len` (at most the capacity). Returns false if too large.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.cap {
            return false;
        }
        self.len = len;
        true
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// A zero-initialised heap buffer whose start is aligned to `align` (a power of two). Large
/// buffers come from `calloc`-style zero pages, so allocating a multi-GiB arena costs no RSS until
/// it is written.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
    len: usize,
    /// Allocated with an anonymous `mmap` (freed with `munmap`) instead of the global allocator.
    mapped: bool,
}

/// Buffers at least this large (and aligned to at most a page) come from an anonymous `mmap`:
/// zero pages appear lazily on first touch, so nothing is written up front. (`alloc_zeroed` with
/// an alignment above 16 does `posix_memalign` + `memset`, touching every page on the calling
/// thread before the first read.)
const MMAP_THRESHOLD: usize = 1 << 20;

/// `madvise`, or (under Miri, which has no shim for it) a refusal: every caller treats advice
/// as best effort.
///
/// # Safety
/// As `libc::madvise`.
#[cfg(not(miri))]
unsafe fn madvise(addr: *mut libc::c_void, len: usize, advice: libc::c_int) -> libc::c_int {
    // SAFETY: as the caller promised.
    unsafe { libc::madvise(addr, len, advice) }
}
#[cfg(miri)]
unsafe fn madvise(_addr: *mut libc::c_void, _len: usize, _advice: libc::c_int) -> libc::c_int {
    -1
}
const PAGE: usize = 4096;

// SAFETY: AlignedBuf owns its allocation exclusively; the raw pointer is not shared with anyone
// except through IoBuf windows, which carry their own Send/Sync reasoning.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`as_slice`); writes need `&mut` or an exclusive IoBuf window.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes aligned to `align`.
    pub fn zeroed(len: usize, align: usize) -> Result<Self> {
        Self::zeroed_with(len, align, false)
    }

    /// Like [`AlignedBuf::zeroed`]; with `huge_pages`, a large buffer is backed by transparent
    /// huge pages where the kernel allows (`MADV_HUGEPAGE`): 512× fewer page faults when it is
    /// filled. Measured on a warm local load: 6.3–6.5 GB/s with, 2.2–2.8 without; slower for
    /// network backends, so it is the caller's choice.
    pub fn zeroed_with(len: usize, align: usize, huge_pages: bool) -> Result<Self> {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), align.max(1)).map_err(|_| {
                Error::invalid(format!(
                "cannot allocate {len} bytes aligned to {align} (alignment must be a power of two)"
            ))
            })?;
        if len >= MMAP_THRESHOLD && align <= PAGE {
            // SAFETY: an anonymous private mapping at an address of the kernel's choice; no
            // existing memory is affected. The result is checked against MAP_FAILED below.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw != libc::MAP_FAILED {
                if huge_pages {
                    // SAFETY: advice on the mapping just created, exactly its length.
                    unsafe {
                        madvise(raw, len, libc::MADV_HUGEPAGE);
                    }
                }
                if let Some(ptr) = NonNull::new(raw.cast::<u8>()) {
                    return Ok(AlignedBuf {
                        ptr,
                        layout,
                        len,
                        mapped: true,
                    });
                }
            }
            // Fall through to the global allocator.
        }
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::new(
                crate::ErrorKind::Io,
                format!("out of host memory allocating {len} bytes"),
            )
        })?;
        Ok(AlignedBuf {
            ptr,
            layout,
            len,
            mapped: false,
        })
    }
    /// The aligned bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The aligned bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `zeroed` with exactly this length, unmapped once; no window
            // outlives the buffer (windows hold it through an Arc).
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            }
        } else {
            // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

// SAFETY: the allocation never moves and lives as long as the AlignedBuf; `len` bytes from `ptr`
// are valid. Windows (IoBuf) keep the AlignedBuf alive through an Arc.
unsafe impl MemRegion for AlignedBuf {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn set_inherited_by_fork(&self, inherited: bool) {
        // Only a mapping of its own: heap memory shares its pages with other allocations.
        if self.mapped {
            let advice = if inherited {
                libc::MADV_DOFORK
            } else {
                libc::MADV_DONTFORK
            };
            // SAFETY: advice on exactly the mapping made in `zeroed_with` (page-aligned, this
            // length), which lives as long as `self`; it changes no contents.
            unsafe {
                madvise(self.ptr.as_ptr().cast(), self.len, advice);
            }
        }
    }
}

/// One host allocation that tensors are loaded into, lent out in non-overlapping windows while
/// a load runs and readable as a whole once every window is gone.
pub struct Arena {
    inner: Arc<dyn MemRegion>,
}

impl Arena {
    /// A zeroed host arena of `len` bytes, aligned to `align`.
    pub fn host(len: usize, align: usize) -> Result<Self> {
        Self::host_with(len, align, false)
    }

    /// A zeroed host arena, optionally on transparent huge pages (see
    /// [`AlignedBuf::zeroed_with`]).
    pub fn host_with(len: usize, align: usize, huge_pages: bool) -> Result<Self> {
        Ok(Arena {
            inner: Arc::new(AlignedBuf::zeroed_with(len, align, huge_pages)?),
        })
    }

    /// Whether a child forked from now on gets the arena (see
    /// [`MemRegion::set_inherited_by_fork`]): the host sink keeps it out of children while reads
    /// land in it, and lets them have it again once the load is complete.
    pub fn set_inherited_by_fork(&self, inherited: bool) {
        self.inner.set_inherited_by_fork(inherited);
    }

    /// Starts a thread that faults in the arena's pages (`MADV_POPULATE_WRITE`) in the order of
    /// `ranges`, so reads landing there later find their pages present instead of taking one page
    /// fault per 4 KiB inside the read path. Contents are not changed. Best effort: stops silently
    /// where the kernel refuses (older than 5.14) and when `stop` is set. Join the handle before
    /// reading the arena (it holds the region alive).
    pub fn prefault(
        &self,
        ranges: Vec<std::ops::Range<usize>>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let region = self.inner.clone();
        std::thread::Builder::new()
            .name("ts-prefault".into())
            .spawn(move || {
                const STEP: usize = 8 << 20;
                const PAGE: usize = 4096;
                let base = region.base() as usize;
                for r in ranges {
                    // Whole pages strictly inside the region: round the start up, the end down.
                    // Ranges come from the caller: clamp them to the region (checked, so a
                    // hostile range can never point the madvise outside it).
                    let end = r.end.min(region.len());
                    let start = r.start.min(end);
                    let (Some(lo), Some(hi)) = (base.checked_add(start), base.checked_add(end))
                    else {
                        continue;
                    };
                    let Some(mut addr) = lo.checked_next_multiple_of(PAGE) else {
                        continue;
                    };
                    let stop_addr = hi / PAGE * PAGE;
                    while addr < stop_addr {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let len = STEP.min(stop_addr - addr);
                        // SAFETY: [addr, addr+len) is page-aligned and lies inside the region,
                        // which stays allocated while `region` (an Arc clone) lives.
                        // MADV_POPULATE_WRITE only faults the pages in, writable, without
                        // changing their contents, so concurrent window owners (reader threads,
                        // the kernel's DMA) observe nothing.
                        let rc = unsafe {
                            madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE)
                        };
                        if rc != 0 {
                            return;
                        }
                        addr += len;
                    }
                }
            })
            .ok()
    }

    /// An arena over any region (e.g. pinned memory from the CUDA crate).
    pub fn from_region(region: Arc<dyn MemRegion>) -> Self {
        Arena { inner: region }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len() == 0
    }
    /// The region (for buffer registration).
    pub fn region(&self) -> &Arc<dyn MemRegion> {
        &self.inner
    }

    /// True when no window (and no other handle, strong or weak) to the region exists. The
    /// Acquire fence orders every write made through a window before it was dropped (an `Arc`
    /// drop is a Release decrement) before what the caller does next.
    fn exclusive(&self) -> bool {
        let only = Arc::strong_count(&self.inner) == 1 && Arc::weak_count(&self.inner) == 0;
        if only {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        }
        only
    }

    /// Lends out windows for `ranges`, which must be sorted, non-overlapping and inside the
    /// arena. Fails if windows from an earlier call are still alive.
    pub fn windows(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<Vec<IoBuf>> {
        if !self.exclusive() {
            return Err(Error::invalid("arena windows are still lent out"));
        }
        let mut prev_end = 0usize;
        for r in ranges {
            if r.start > r.end || r.start < prev_end || r.end > self.inner.len() {
                return Err(Error::invalid(format!(
                    "arena window {}..{} overlaps another or lies outside the arena ({} bytes)",
                    r.start,
                    r.end,
                    self.inner.len()
                )));
            }
            prev_end = r.end;
        }
        let base = self.inner.base();
        Ok(ranges
            .iter()
            .map(|r| {
                let ptr = NonNull::new(base.wrapping_add(r.start)).unwrap_or(NonNull::dangling());
                // SAFETY: the ranges were checked above to be inside the region and pairwise
                // disjoint, and no windows from earlier calls (nor weak handles that could become
                // one) are alive (`exclusive`), so each window is exclusive. `&mut self` prevents `as_slice` while we hand them out,
                // and `as_slice` refuses while any window is alive.
                unsafe { IoBuf::from_raw_parts(ptr, r.len(), self.inner.clone()) }
            })
            .collect())
    }

    /// The whole arena, once no window is lent out.
    pub fn as_slice(&self) -> Result<&[u8]> {
        if !self.exclusive() {
            return Err(Error::invalid(
                "arena is still being written (windows lent out)",
            ));
        }
        // SAFETY: no IoBuf window and no weak handle exists (`exclusive`; windows hold a
        // clone), writes made through dropped windows are ordered before this read (its fence),
        // and nothing can write the region while this shared borrow of `self` lives (`windows`
        // needs &mut; the region is only accessed through windows, see `MemRegion`).
        Ok(unsafe { std::slice::from_raw_parts(self.inner.base(), self.inner.len()) })
    }

    /// The whole arena, writable, once no window is lent out.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        if !self.exclusive() {
            return Err(Error::invalid(
                "arena is still being written (windows lent out)",
            ));
        }
        // SAFETY: as for `as_slice`; `&mut self` makes this the only access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.inner.base(), self.inner.len()) })
    }
}

/// A fixed set of equally sized staging buffers carved out of one aligned allocation.
pub fn staging_slots(count: usize, slot_size: usize, align: usize) -> Result<Vec<IoBuf>> {
    let total = count
        .checked_mul(slot_size)
        .ok_or_else(|| Error::invalid("staging ring size overflows"))?;
    let mut whole = IoBuf::aligned(total, align)?;
    // Reads land in the slots for their whole life: never in a forked child (see
    // `MemRegion::set_inherited_by_fork`).
    whole.region().set_inherited_by_fork(false);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        match whole.split_to(slot_size) {
            Some(s) => out.push(s),
            None => return Err(Error::invalid("staging ring split failed")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::vm_flags;

    /// Staging slots are never in a forked child (`dc`: do not copy on fork); an arena is kept
    /// out while reads land in it and let back in after; small heap buffers are left alone.
    #[test]
    #[cfg_attr(miri, ignore = "reads /proc (vm flags, RSS), which Miri cannot")]
    fn fork_inheritance_of_read_targets() {
        let slots = staging_slots(4, 1 << 20, 4096).unwrap();
        let f = vm_flags(slots[0].as_ptr() as usize);
        assert!(
            f.contains(&"dc".to_string()),
            "{f:?} {:p}",
            slots[0].as_ptr()
        );
        let arena = Arena::host(8 << 20, 4096).unwrap();
        let at = arena.region().base() as usize;
        assert!(!vm_flags(at).contains(&"dc".to_string()));
        arena.set_inherited_by_fork(false);
        assert!(vm_flags(at).contains(&"dc".to_string()));
        arena.set_inherited_by_fork(true);
        assert!(!vm_flags(at).contains(&"dc".to_string()));
        // Heap memory (under the mmap threshold) shares pages with other allocations: no advice.
        let small = Arena::host(4096, 64).unwrap();
        small.set_inherited_by_fork(false);
        assert!(!vm_flags(small.region().base() as usize).contains(&"dc".to_string()));
    }

    #[test]
    fn an_arena_with_another_handle_to_its_region_lends_nothing() {
        let region = Arc::new(AlignedBuf::zeroed(4096, 64).unwrap());
        let weak = Arc::downgrade(&region);
        let mut arena = Arena::from_region(region);
        // A weak handle could become a second reader/writer of the bytes at any time.
        assert!(arena.as_mut_slice().is_err());
        assert!(arena.as_slice().is_err());
        assert!(arena.windows(std::slice::from_ref(&(0..16))).is_err());
        drop(weak);
        arena.as_mut_slice().unwrap()[0] = 42;
        let w = arena.windows(std::slice::from_ref(&(0..16))).unwrap();
        assert!(arena.as_slice().is_err(), "a window is lent out");
        drop(w);
        assert_eq!(arena.as_slice().unwrap()[0], 42);
    }

    #[test]
    fn prefault_with_hostile_ranges_stays_inside_the_arena() {
        let mut arena = Arena::host(1 << 20, 4096).unwrap();
        arena.as_mut_slice().unwrap()[12345] = 7;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Ranges past the end, reversed, or near usize::MAX (whose address arithmetic used to
        // wrap): clamped or skipped, never a panic and never a write.
        #[allow(clippy::reversed_empty_ranges)]
        let ranges = vec![
            usize::MAX - 10..usize::MAX,
            usize::MAX..3,
            (1 << 20) + 4096..usize::MAX,
            9000..100,
            0..1 << 20,
        ];
        if let Some(h) = arena.prefault(ranges, stop) {
            h.join().expect("prefault thread panicked");
        }
        let s = arena.as_slice().unwrap();
        assert_eq!(s[12345], 7);
        assert_eq!(s.iter().map(|&b| b as u64).sum::<u64>(), 7);
    }

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() {
        for align in [1usize, 512, 4096] {
            let b = AlignedBuf::zeroed(10_000, align).unwrap();
            assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            assert_eq!(b.len(), 10_000);
        }
        assert!(AlignedBuf::zeroed(10, 3).is_err());
    }

    fn rss_bytes() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads /proc (vm flags, RSS), which Miri cannot")]
    fn large_buffers_are_zeroed_lazily() {
        // 256 MiB aligned to a page: must not be written up front (no memset of every page).
        let before = rss_bytes();
        let mut b = AlignedBuf::zeroed(256 << 20, 4096).unwrap();
        let after = rss_bytes();
        assert!(
            after.saturating_sub(before) < 64 << 20,
            "allocation touched {} MiB up front",
            (after - before) >> 20
        );
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        let s = b.as_mut_slice();
        for i in (0..s.len()).step_by(1 << 20) {
            assert_eq!(s[i], 0);
            s[i] = 1;
        }
        assert_eq!(s[(1 << 20) * 3], 1);
    }

    #[test]
    fn arena_windows_are_exclusive_and_checked() {
        let mut a = Arena::host(8192, 4096).unwrap();
        assert!(a.windows(&[0..10, 5..20]).is_err());
        assert!(a.windows(&[0..10, 8000..8193]).is_err());
        let mut w = a.windows(&[0..4, 4096..4100]).unwrap();
        assert!(a.as_slice().is_err());
        let one = 0..1usize;
        assert!(a.windows(std::slice::from_ref(&one)).is_err());
        w[0].as_mut_slice().copy_from_slice(&[1, 2, 3, 4]);
        w[1].as_mut_slice().copy_from_slice(&[5, 6, 7, 8]);
        drop(w);
        let s = a.as_slice().unwrap();
        assert_eq!(&s[0..4], &[1, 2, 3, 4]);
        assert_eq!(&s[4096..4100], &[5, 6, 7, 8]);
    }

    #[test]
    fn staging_slots_are_disjoint() {
        let mut slots = staging_slots(4, 4096, 4096).unwrap();
        for (i, s) in slots.iter_mut().enumerate() {
            assert_eq!(s.len(), 4096);
            assert_eq!(s.as_ptr() as usize % 4096, 0);
            s.as_mut_slice().fill(i as u8);
        }
        for (i, s) in slots.iter().enumerate() {
            assert!(s.as_slice().iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn try_join_only_adjacent_windows_of_one_region() {
        let mut b = IoBuf::aligned(100, 8).unwrap();
        let a = b.split_to(10).unwrap();
        let m = b.split_to(20).unwrap();
        let j = a.try_join(m).unwrap();
        assert_eq!((j.len(), j.offset_in_region()), (30, 0));
        // Not adjacent: `b` starts at 30 but we skip a window.
        let skip = b.split_to(5).unwrap();
        let (j, b) = j.try_join(b).unwrap_err();
        let j = j.try_join(skip).unwrap();
        let mut j = j.try_join(b).unwrap();
        assert_eq!(j.len(), 100);
        // A shortened left window cannot be joined (it would hide owned bytes).
        let mut c = IoBuf::aligned(10, 8).unwrap();
        let mut left = c.split_to(4).unwrap();
        assert!(left.set_len(2));
        assert!(left.try_join(c).is_err());
        // Different regions never join, even if addresses happened to touch.
        let other = IoBuf::aligned(10, 8).unwrap();
        let tail = j.split_to(100).unwrap();
        assert!(tail.try_join(other).is_err());
    }

    #[test]
    fn split_to_partitions() {
        let mut b = IoBuf::aligned(100, 8).unwrap();
        let h = b.split_to(30).unwrap();
        assert_eq!(h.len(), 30);
        assert_eq!(b.len(), 70);
        assert_eq!(b.offset_in_region(), 30);
        assert!(b.split_to(71).is_none());
    }
}

#[cfg(test)]
mod handoff_tests {
    use super::*;

    /// A window written on another thread and dropped there, with no other synchronization:
    /// the arena must see the bytes once it is whole again (what a load whose reader threads
    /// drop their windows relies on). The only edge is the window's `Arc` release decrement,
    /// read by `exclusive`'s relaxed count followed by its Acquire fence. Miri checks it
    /// (`cargo +nightly miri test -p tensorstream-engine --lib handoff`, with
    /// `-Zmiri-many-seeds`): without the fence it reports a data race. ThreadSanitizer does
    /// not model fences and reports this (correct) hand-off as a race.
    #[test]
    fn bytes_written_through_a_window_dropped_on_another_thread_are_seen() {
        let rounds: u8 = if cfg!(miri) { 3 } else { 50 };
        for round in 0..rounds {
            let mut arena = Arena::host(4096, 64).unwrap();
            let mut w = arena.windows(std::slice::from_ref(&(0..4096))).unwrap();
            let mut w = w.pop().unwrap();
            let t = std::thread::spawn(move || {
                w.as_mut_slice().fill(round);
                drop(w);
            });
            // Spin on the arena alone (no join, no channel) until the window is gone.
            let bytes = loop {
                if let Ok(s) = arena.as_slice() {
                    break s.to_vec();
                }
                std::hint::spin_loop();
            };
            assert!(bytes.iter().all(|&b| b == round));
            assert!(arena.as_mut_slice().is_ok());
            t.join().unwrap();
        }
    }
}
