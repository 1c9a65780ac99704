//! The warm page-cache path's file mapping: the whole file mapped read-only and shared, so that
//! pieces of it (already in the page cache) can be host-registered read-only and copied by the
//! GPU's copy engine straight out of the page cache, with no CPU copy.
//!
//! The mapping's bytes are never exposed as a Rust slice (a concurrent truncation or write by
//! another process could not be ruled out). The DMA engine reads them from registered (pinned)
//! pages that truncation cannot take away, and [`MappedFile::copy_into`] copies them into
//! pinned slots with non-temporal stores under a `SIGBUS` guard: a page that a concurrent
//! truncation took away is replaced with a zero page and the copy fails with `ObjectChanged`
//! instead of the signal killing the process (see the private `guard` module).

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use tensorstream_engine::{Error, ErrorKind, Result};

use crate::raw::driver::device_error;
use crate::raw::pinned::PAGE;

/// Bytes [`MappedFile::copy_into`] copies before it drops them from the page tables (a
/// multiple of [`PAGE`]): what each copying thread keeps of the file in resident memory.
const MAP_WINDOW: usize = 1 << 20;

/// A read-only shared mapping of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    ptr: Option<NonNull<u8>>,
    len: usize,
    map_len: usize,
    file: File,
    /// Set once a guarded copy found a page gone (the file shrank): some of the mapping may
    /// now be zero pages of our own, so no later copy may trust it.
    shrank: AtomicBool,
}

impl MappedFile {
    /// `fstat` of the mapped file.
    pub fn metadata(&self) -> Result<std::fs::Metadata> {
        self.file
            .metadata()
            .map_err(|e| Error::from_io(e, "stat of the mapped file"))
    }
}

// SAFETY: the mapping is immutable through this type (PROT_READ) and only handed to the CUDA
// driver as an address range; the File is Send + Sync.
unsafe impl Send for MappedFile {}
// SAFETY: as above.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Opens and maps `path` read-only.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Without blocking: a path swapped for a FIFO since the load checked it would block
        // the open until a writer came.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::from_io(e, format!("opening {}", path.display())))?;
        let md = file
            .metadata()
            .map_err(|e| Error::from_io(e, format!("stat {}", path.display())))?;
        if !md.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        // SAFETY: F_GETFL / F_SETFL on a descriptor this function owns change only its status
        // flags (clearing O_NONBLOCK, so that reads wait for the disk as usual).
        let cleared = unsafe {
            let fd = file.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(Error::from_io(
                std::io::Error::last_os_error(),
                format!("fcntl {}", path.display()),
            ));
        }
        let len64 = md.len();
        let len = usize::try_from(len64)
            .map_err(|_| Error::invalid("file does not fit the address space"))?;
        let map_len = len
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| Error::invalid("file size overflows"))?;
        if len == 0 {
            return Ok(Arc::new(MappedFile {
                ptr: None,
                len,
                map_len: 0,
                file,
                shrank: AtomicBool::new(false),
            }));
        }
        // SAFETY: read-only shared mapping of an open file descriptor, no address hint; the
        // result is checked for MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::from_io(
                std::io::Error::last_os_error(),
                format!("mapping {}", path.display()),
            ));
        }
        Ok(Arc::new(MappedFile {
            ptr: NonNull::new(raw.cast()),
            len,
            map_len,
            file,
            shrank: AtomicBool::new(false),
        }))
    }

    /// Copies the file's bytes `offset..offset + dst.len()` out of the mapping into `dst` (a
    /// pinned slot: the copy engine reads it next) with non-temporal stores, which skip the
    /// read of each destination line that an ordinary copy makes, then drops the copied pages
    /// from this process's page tables (they stay in the page cache) a megabyte at a time, so
    /// that resident memory does not grow with the file.
    ///
    /// A file that is shorter than the range (checked with `fstat` before and after the copy)
    /// or that shrinks while it is copied fails with [`ErrorKind::ObjectChanged`]; `dst` then
    /// holds unspecified bytes. The process never dies of the `SIGBUS` such a read raises (see
    /// the `guard` module). Cheap system calls: `fstat` twice per copy, and per megabyte a
    /// `madvise` and the guard's check that its handler is still the one installed.
    pub fn copy_into(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let want = offset..offset.saturating_add(dst.len() as u64);
        let range = || want.clone();
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(dst.len()).map(|e| (o, e)))
            .filter(|&(_, e)| e <= self.len);
        let Some((start, end)) = end else {
            return Err(Error::invalid(format!(
                "cannot copy bytes {}..{} of a {}-byte file mapping",
                offset,
                offset.saturating_add(dst.len() as u64),
                self.len
            )));
        };
        let (Some(ptr), false) = (self.ptr, dst.is_empty()) else {
            return Ok(());
        };
        let shrank = |now: Option<u64>| {
            Error::new(
                ErrorKind::ObjectChanged,
                match now {
                    Some(n) => format!(
                        "the file is now {n} bytes: it shrank after it was mapped ({} bytes)",
                        self.len
                    ),
                    None => "the file shrank while it was being copied".to_string(),
                },
            )
            .with_range(range())
        };
        if self.shrank.load(Ordering::Relaxed) {
            return Err(shrank(None));
        }
        let size = self.metadata()?.len();
        if size < end as u64 {
            return Err(shrank(Some(size)));
        }
        // In windows of MAP_WINDOW bytes (boundaries at its multiples), each dropped from the
        // page tables once copied, so that a copying thread keeps at most one window of the
        // file resident.
        let mut outcome = guard::Outcome::Copied;
        let mut at = start;
        while at < end {
            let upto = (at - at % MAP_WINDOW + MAP_WINDOW).min(end);
            let src = ptr.as_ptr().wrapping_add(at);
            let out = dst[at - start..upto - start].as_mut_ptr();
            // SAFETY: [src, src + (upto - at)) lies inside our live PROT_READ mapping (upto <=
            // end <= self.len) and `out` is the matching part of `dst`, a distinct writable
            // slice (a mapping of a file is never a Rust-owned buffer). A page of the range that
            // a concurrent truncation removes raises SIGBUS, which the guard answers for
            // exactly this window (see `guard`).
            outcome = unsafe { guard::copy(out, src, upto - at) };
            if outcome == guard::Outcome::Unguarded {
                // No guard, no reading the mapping: a plain read of the rest.
                return read_exact_at(&self.file, &mut dst[at - start..], at as u64)
                    .map_err(|e| e.with_range(range()));
            }
            // Drop the page-table entries of the window's whole pages (a partial first or
            // last page of the range may be shared with a neighbouring copy; it goes with the
            // range that covers it, or with the mapping).
            let first = at.next_multiple_of(PAGE);
            let last = if upto == self.len {
                self.map_len
            } else {
                upto - upto % PAGE
            };
            if first < last {
                // SAFETY: [first, last) is page-aligned and inside our live mapping (last <=
                // map_len). MADV_DONTNEED on a shared file mapping only drops this process's
                // page-table entries: the bytes stay in the page cache and a later access
                // faults them in again.
                unsafe {
                    libc::madvise(
                        ptr.as_ptr().wrapping_add(first).cast(),
                        last - first,
                        libc::MADV_DONTNEED,
                    )
                };
            }
            if outcome == guard::Outcome::PageGone {
                break;
            }
            at = upto;
        }
        if outcome == guard::Outcome::PageGone {
            self.shrank.store(true, Ordering::Relaxed);
            return Err(shrank(None));
        }
        // A truncation inside the range's last page zero-fills the rest of that page instead
        // of taking it away (no SIGBUS): the size after the copy tells. (A cut after this
        // point came after the bytes were copied.)
        let size = self.metadata()?.len();
        if size < end as u64 || self.shrank.load(Ordering::Relaxed) {
            self.shrank.store(true, Ordering::Relaxed);
            return Err(shrank(Some(size)));
        }
        Ok(())
    }

    /// File size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The open file (for buffered `pread` fallbacks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Fraction (0..=1) of the file's pages that are in the page cache (`mincore`).
    pub fn resident_fraction(&self) -> Result<f64> {
        let Some(ptr) = self.ptr else {
            return Ok(1.0);
        };
        let pages = self.map_len / PAGE;
        let mut vec = vec![0u8; pages];
        // SAFETY: [ptr, ptr+map_len) is our live mapping (page-aligned start); `vec` holds one
        // byte per page of it, as mincore requires.
        let r = unsafe { libc::mincore(ptr.as_ptr().cast(), self.map_len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(Error::from_io(
                std::io::Error::last_os_error(),
                "querying page-cache residency (mincore)",
            ));
        }
        let resident = vec.iter().filter(|&&b| b & 1 == 1).count();
        Ok(resident as f64 / pages.max(1) as f64)
    }

    /// Host-registers `range` (page-aligned start, end at most the mapping's page-rounded end)
    /// read-only with `ctx`, so the GPU can copy from it.
    pub fn register(
        self: &Arc<Self>,
        ctx: &Arc<CudaContext>,
        range: Range<u64>,
    ) -> Result<Registered> {
        let (Some(ptr), Ok(start), Ok(end)) = (
            self.ptr,
            usize::try_from(range.start),
            usize::try_from(range.end),
        ) else {
            return Err(Error::invalid("nothing to register in an empty file"));
        };
        if start % PAGE != 0 || start >= end || end > self.map_len {
            return Err(Error::invalid(format!(
                "cannot register {start}..{end} of a {}-byte mapping",
                self.map_len
            )));
        }
        if self.shrank.load(Ordering::Relaxed) {
            // A guarded copy replaced a page of the mapping with zeros: registering would hand
            // those zeros to the copy engine.
            return Err(Error::new(
                ErrorKind::ObjectChanged,
                "the file shrank while it was being copied",
            )
            .with_range(range));
        }
        super::driver::bind(ctx)?;
        let p = ptr.as_ptr().wrapping_add(start);
        // SAFETY: [p, p+len) lies inside our live mapping (checked above). READ_ONLY matches the
        // PROT_READ mapping. The Registered value keeps the mapping alive (Arc) and unregisters
        // exactly this base address in Drop.
        unsafe {
            sys::cuMemHostRegister_v2(p.cast(), end - start, sys::CU_MEMHOSTREGISTER_READ_ONLY)
        }
        .result()
        .map_err(|e| {
            device_error(
                &format!("registering file bytes {start}..{end} (cuMemHostRegister READ_ONLY)"),
                e,
            )
        })?;
        Ok(Registered {
            map: self.clone(),
            ptr: p,
            len: end - start,
            ctx: ctx.clone(),
            keep: super::driver::KeepCurrent::idle(),
        })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(p) = self.ptr {
            // SAFETY: our own mapping, unmapped once; no Registered piece is alive (they hold
            // an Arc of this value).
            unsafe { libc::munmap(p.as_ptr().cast(), self.len) };
        }
    }
}

/// A host-registered piece of a [`MappedFile`]; unregistered on drop.
#[derive(Debug)]
pub struct Registered {
    map: Arc<MappedFile>,
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
    /// Last: restores the dropping thread's CUDA context after everything else has dropped.
    keep: super::driver::KeepCurrent,
}

// SAFETY: the piece is only an address range handed to the driver; the mapping it points into
// is kept alive by the Arc and never written.
unsafe impl Send for Registered {}
// SAFETY: as above.
unsafe impl Sync for Registered {}

impl Registered {
    /// Start of the piece.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    /// Length of the piece.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.keep.save();
        let bound = super::driver::bind(&self.ctx).is_ok();
        // SAFETY: unregistering the base address registered in `MappedFile::register`, in the
        // context it was registered in (current: only called when `bind` succeeded); the
        // copies that read it completed (HostSource is only dropped after its event).
        let r = if bound {
            unsafe { sys::cuMemHostUnregister(self.ptr.cast()) }
        } else {
            sys::cudaError_enum::CUDA_ERROR_INVALID_CONTEXT
        };
        if r != sys::cudaError_enum::CUDA_SUCCESS {
            // Still registered: the file mapping must never be unmapped (a later mapping could
            // reuse the address the driver still holds). Keep it alive until process exit.
            std::mem::forget(self.map.clone());
        } else {
            // SAFETY: [ptr, ptr+len) lies inside our live, read-only file mapping (the Arc keeps
            // it), starts on a page boundary and is no longer registered. MADV_DONTNEED only drops
            // this process's page-table entries: the bytes stay in the page cache and a later
            // access faults them in again, so resident memory stays bounded by the pieces in
            // flight instead of growing to the whole file.
            unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTNEED) };
        }
        let _ = &self.map;
    }
}

/// `pread` until `dst` is full; a file that ends first is `ObjectChanged` (it was longer when it
/// was mapped).
fn read_exact_at(file: &File, dst: &mut [u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut got = 0usize;
    while got < dst.len() {
        match file.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::ObjectChanged,
                    format!(
                        "the file ended at {} (it shrank after it was mapped)",
                        offset + got as u64
                    ),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, "reading the mapped file")),
        }
    }
    Ok(())
}

/// The `SIGBUS` guard of [`MappedFile::copy_into`].
///
/// Reading a page of a shared file mapping that lies past the file's end (the file was
/// truncated after it was mapped) raises `SIGBUS`, which kills the process by default. Before a
/// guarded copy the thread records the source range in thread-local storage; a process-wide
/// handler (installed once, chaining to the handler it replaced: Rust's own, which reports
/// stack overflows) checks the fault address: inside the current thread's range, it maps an
/// anonymous zero page over the faulting page (`MAP_FIXED`, our own mapping's address), notes
/// the hit and returns, so the copy goes on and reads zeros there; the copy then reports the
/// hit and the caller fails the load. A fault anywhere else goes to the previous handler, or
/// with none to the default action, as before.
mod guard {
    use std::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use super::PAGE;

    thread_local! {
        // Atomics (of this thread only), not `Cell`s: the signal handler writes and reads them
        // in the middle of the copy, and only atomics are ordered against a handler.
        /// The start of this thread's guarded source range (`WINDOW_LO..WINDOW_HI`; empty when
        /// none).
        static WINDOW_LO: AtomicUsize = const { AtomicUsize::new(0) };
        /// Its end.
        static WINDOW_HI: AtomicUsize = const { AtomicUsize::new(0) };
        /// Set by the handler when it replaced a page of the window.
        static HIT: AtomicBool = const { AtomicBool::new(false) };
    }

    /// The action the handler replaced, once it is installed (`None`: not installed, the
    /// system refused or the page size is not [`PAGE`]). Set exactly once.
    static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

    /// The action in place before ours, saved before ours is installed: the handler passes
    /// other faults to it, also one that comes while `PREVIOUS` is still being set (another
    /// thread's fault right after the install would otherwise find nothing to pass it to, and
    /// put back the default action for good).
    static REPLACED: OnceLock<libc::sigaction> = OnceLock::new();

    /// What a guarded copy did.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Outcome {
        /// Every byte copied.
        Copied,
        /// A page of the source was gone (the file shrank); its bytes in `dst` are zeros.
        PageGone,
        /// The guard could not be armed (the system refused the handler, or another one
        /// replaced it): nothing was copied.
        Unguarded,
    }

    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler. A positive
        // si_code marks a fault the kernel raised (a `kill -BUS` has none, and no address).
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        let lo = WINDOW_LO
            .try_with(|w| w.load(Ordering::SeqCst))
            .unwrap_or(0);
        let hi = WINDOW_HI
            .try_with(|w| w.load(Ordering::SeqCst))
            .unwrap_or(0);
        if code > 0 && lo <= addr && addr < hi {
            // SAFETY: errno of this thread, saved around the mmap below and restored, so the
            // interrupted code sees its own.
            let errno = unsafe { *libc::__errno_location() };
            let page = addr - addr % PAGE;
            // SAFETY: `page` lies in the current thread's copy window, inside a live read-only
            // file mapping of ours (see `MappedFile::copy_into`); replacing that page of our
            // own mapping with an anonymous read-only zero page changes no other memory. mmap
            // is a plain system call here (no locks taken in the C library).
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = errno };
            if r != libc::MAP_FAILED {
                let _ = HIT.try_with(|h| h.store(true, Ordering::SeqCst));
                return;
            }
        }
        // Not ours: the previous handler decides (Rust's reports a stack overflow, or restores
        // the default action so that the fault, raised again on return, ends the process).
        match REPLACED.get().copied() {
            Some(prev) if prev.sa_sigaction > libc::SIG_IGN => {
                if prev.sa_flags & libc::SA_SIGINFO != 0 {
                    // SAFETY: an SA_SIGINFO handler installed by someone else, called as the
                    // kernel would call it.
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        unsafe { std::mem::transmute(prev.sa_sigaction) };
                    f(sig, info, ctx);
                } else {
                    // SAFETY: a plain handler installed by someone else, called as the kernel
                    // would call it.
                    let f: extern "C" fn(libc::c_int) =
                        unsafe { std::mem::transmute(prev.sa_sigaction) };
                    f(sig);
                }
                // A sent signal (not a fault, which comes back by itself) that the previous
                // handler answered by restoring the default action, as Rust's does: send it
                // again, so that the default action happens.
                if code <= 0 {
                    // SAFETY: reads the current action into a zeroed struct; sigaction and
                    // raise are async-signal-safe.
                    unsafe {
                        let mut now: libc::sigaction = std::mem::zeroed();
                        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut now) == 0
                            && now.sa_sigaction == libc::SIG_DFL
                        {
                            libc::raise(sig);
                        }
                    }
                }
            }
            // Ignored before: a sent signal is ignored still (a fault never is: the kernel
            // ends the process whatever the action, as the default branch does).
            Some(prev) if prev.sa_sigaction == libc::SIG_IGN && code <= 0 => {}
            _ => {
                // SAFETY: restoring the default action for SIGBUS (a zeroed sigaction is
                // SIG_DFL with an empty mask); sigaction and raise are async-signal-safe.
                unsafe {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                    // A fault comes back by itself when the faulting instruction runs again;
                    // a signal sent with kill or raise does not: send it again, so that the
                    // default action (ending the process) happens as without this handler.
                    if code <= 0 {
                        libc::raise(sig);
                    }
                }
            }
        }
    }

    fn handler_address() -> usize {
        on_sigbus as *const () as usize
    }

    /// Whether our handler is the one in place now, installing it the first time; false if
    /// the system refused, if pages are not [`PAGE`] bytes (the handler replaces one page of
    /// that size), or if another handler replaced ours since (then this module stays out of its
    /// way and copies fall back to `pread`).
    fn armed() -> bool {
        let installed = PREVIOUS.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
                return None;
            }
            // SAFETY: reads the current SIGBUS action into a zeroed struct and saves it where
            // the handler finds it, then installs an SA_SIGINFO handler whose code only touches
            // its thread-local window, errno, mmap, sigaction and raise, or calls the handler
            // it replaced (see `on_sigbus`), with an empty mask. Runs once per process
            // (OnceLock), so the action saved is the one ours replaced.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                    return None;
                }
                let _ = REPLACED.set(old);
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = handler_address();
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                (libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0).then_some(old)
            }
        });
        if installed.is_none() {
            return false;
        }
        // SAFETY: querying the current SIGBUS action into a zeroed struct.
        unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) == 0
                && cur.sa_sigaction == handler_address()
        }
    }

    /// Copies `len` bytes from `src` (inside a file mapping) to `dst` with the guard armed for
    /// `[src, src + len)`.
    ///
    /// # Safety
    /// `src..src + len` must lie inside a live read-only shared file mapping owned by the
    /// caller, and `dst..dst + len` must be writable memory that does not overlap it.
    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Outcome {
        if !armed() {
            return Outcome::Unguarded;
        }
        let lo = src as usize;
        HIT.with(|h| h.store(false, Ordering::SeqCst));
        WINDOW_LO.with(|w| w.store(lo, Ordering::SeqCst));
        WINDOW_HI.with(|w| w.store(lo.saturating_add(len), Ordering::SeqCst));
        // The handler runs on this thread: keep the copy's loads between the window's set and
        // clear.
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as the caller promised; faults in the window are answered by the handler.
        unsafe { stream_copy(dst, src, len) };
        compiler_fence(Ordering::SeqCst);
        WINDOW_HI.with(|w| w.store(0, Ordering::SeqCst));
        WINDOW_LO.with(|w| w.store(0, Ordering::SeqCst));
        if HIT.with(|h| h.load(Ordering::SeqCst)) {
            Outcome::PageGone
        } else {
            Outcome::Copied
        }
    }

    /// `len` bytes from `src` to `dst`: 16-byte non-temporal stores (SSE2, always there on
    /// x86-64) for the aligned middle, plain copies for the ends, then a store fence so the
    /// bytes are in memory before the copy engine is told to read them.
    ///
    /// # Safety
    /// As [`copy`]: both ranges valid, not overlapping.
    #[cfg(target_arch = "x86_64")]
    unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let head = dst.align_offset(16).min(len);
        // SAFETY (this block): every access below stays inside [0, len) of both ranges, which
        // the caller guarantees valid and disjoint; the streaming stores go to 16-byte-aligned
        // destinations (`head` aligns them).
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            let mut i = head;
            while i + 64 <= len {
                let a = _mm_loadu_si128(src.add(i).cast::<__m128i>());
                let b = _mm_loadu_si128(src.add(i + 16).cast::<__m128i>());
                let c = _mm_loadu_si128(src.add(i + 32).cast::<__m128i>());
                let d = _mm_loadu_si128(src.add(i + 48).cast::<__m128i>());
                _mm_stream_si128(dst.add(i).cast::<__m128i>(), a);
                _mm_stream_si128(dst.add(i + 16).cast::<__m128i>(), b);
                _mm_stream_si128(dst.add(i + 32).cast::<__m128i>(), c);
                _mm_stream_si128(dst.add(i + 48).cast::<__m128i>(), d);
                i += 64;
            }
            while i + 16 <= len {
                let a = _mm_loadu_si128(src.add(i).cast::<__m128i>());
                _mm_stream_si128(dst.add(i).cast::<__m128i>(), a);
                i += 16;
            }
            std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
            _mm_sfence();
        }
    }

    /// Elsewhere: a plain copy.
    ///
    /// # Safety
    /// As [`copy`].
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: as the caller promised.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: usize, seed: u8) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[test]
    fn opening_a_fifo_is_an_error_not_a_wait_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(MappedFile::open(&fifo).map(|_| ()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("opening a FIFO blocked");
        let e = r.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn copies_any_range_of_the_file_exactly() {
        let len = 3 * PAGE * 64 + 123;
        let (f, data) = file_of(len, 7);
        let map = MappedFile::open(f.path()).unwrap();
        // Odd offsets and lengths, destination starts on and off 16-byte boundaries, the
        // file's last byte included.
        let cases = [
            (0, len),
            (1, 17),
            (PAGE - 3, 2 * PAGE + 5),
            (5 * PAGE, 512 << 10),
            (len - 100, 100),
            (len - 1, 1),
            (77, 0),
        ];
        for (off, n) in cases {
            for shift in [0usize, 1, 8, 15] {
                let mut buf = vec![0xAAu8; n + shift];
                map.copy_into(off as u64, &mut buf[shift..]).unwrap();
                assert!(buf[..shift].iter().all(|&b| b == 0xAA), "{off} {n} {shift}");
                assert!(buf[shift..] == data[off..off + n], "{off} {n} {shift}");
            }
        }
        // Past the mapping: refused, nothing read.
        let mut buf = vec![0u8; 10];
        let e = map.copy_into(len as u64 - 5, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        let e = map.copy_into(u64::MAX - 2, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }

    #[test]
    fn a_file_that_shrank_before_the_copy_is_object_changed() {
        let (f, _) = file_of(8 * PAGE, 3);
        let map = MappedFile::open(f.path()).unwrap();
        f.as_file().set_len(2 * PAGE as u64).unwrap();
        let mut buf = vec![0u8; PAGE];
        let e = map.copy_into(4 * PAGE as u64, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
        assert!(e.to_string().contains("shrank"), "{e}");
        // The part still there copies.
        map.copy_into(0, &mut buf).unwrap();
    }

    /// The guard itself: a page the truncation took away raises SIGBUS inside the copy, and
    /// the process lives on; the copy reports the gone page and reads zeros there.
    #[test]
    fn a_page_gone_during_the_copy_is_reported_not_fatal() {
        let (f, data) = file_of(6 * PAGE, 9);
        let map = MappedFile::open(f.path()).unwrap();
        let base = map.ptr.unwrap().as_ptr();
        // Fault the pages in, then cut the file: their page-table entries go with it.
        let mut all = vec![0u8; 6 * PAGE];
        map.copy_into(0, &mut all).unwrap();
        assert!(all == data);
        f.as_file().set_len(3 * PAGE as u64).unwrap();
        let mut buf = vec![0xAAu8; 6 * PAGE];
        // SAFETY: the whole mapping (6 pages) of a file we own; `buf` is a separate buffer.
        let got = unsafe { guard::copy(buf.as_mut_ptr(), base, buf.len()) };
        assert_eq!(got, guard::Outcome::PageGone);
        assert!(buf[..3 * PAGE] == data[..3 * PAGE]);
        assert!(buf[3 * PAGE..].iter().all(|&b| b == 0));
        // A copy of the part still there goes on working (here, outside copy_into, the
        // mapping's replaced pages read as zeros; copy_into refuses them: see `shrank`).
        let mut head = vec![0u8; PAGE];
        // SAFETY: as above, the first page.
        let got = unsafe { guard::copy(head.as_mut_ptr(), base, PAGE) };
        assert_eq!(got, guard::Outcome::Copied);
        assert!(head == data[..PAGE]);
    }

    /// A cut inside a page leaves that page mapped with its tail zeroed (no SIGBUS): the guard
    /// sees nothing, which is why `copy_into` checks the size again after copying.
    #[test]
    fn a_cut_inside_a_page_zeroes_its_tail_without_a_fault() {
        let (f, data) = file_of(4 * PAGE, 5);
        let map = MappedFile::open(f.path()).unwrap();
        let base = map.ptr.unwrap().as_ptr();
        let cut = 2 * PAGE + 100;
        f.as_file().set_len(cut as u64).unwrap();
        let mut buf = vec![0xAAu8; 2 * PAGE + 500];
        // SAFETY: the mapping's first 2 pages + 500 bytes, inside its 4 pages; `buf` is ours.
        let got = unsafe { guard::copy(buf.as_mut_ptr(), base, buf.len()) };
        assert_eq!(got, guard::Outcome::Copied);
        assert!(buf[..cut] == data[..cut]);
        assert!(buf[cut..].iter().all(|&b| b == 0));
        // copy_into refuses the range (its size check).
        let e = map.copy_into(0, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    }

    /// Truncations racing with copies: every copy either gives the file's bytes or fails with
    /// ObjectChanged, and once one failed so does every later one.
    #[test]
    fn copies_racing_a_truncation_never_kill_the_process() {
        use std::time::{Duration, Instant};
        let len = 256 * PAGE;
        let (f, data) = file_of(len, 11);
        let map = MappedFile::open(f.path()).unwrap();
        let path = f.path().to_path_buf();
        let copied = Arc::new(AtomicBool::new(false));
        let seen = copied.clone();
        // Cuts the file once a copy went through, at a moment the copies do not know.
        let cutter = std::thread::spawn(move || {
            while !seen.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_micros(300));
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(PAGE as u64).unwrap();
        });
        let mut buf = vec![0u8; len];
        let (mut ok, mut changed) = (0, 0);
        let t0 = Instant::now();
        while changed < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "ok {ok}, failed {changed}"
            );
            match map.copy_into(0, &mut buf) {
                Ok(()) => {
                    assert_eq!(changed, 0, "a copy succeeded after one failed");
                    assert!(buf == data);
                    ok += 1;
                    copied.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
                    changed += 1;
                }
            }
        }
        cutter.join().unwrap();
        assert!(ok > 0, "no copy before the cut");
    }

    /// Several threads copying their own ranges (each guard window is its thread's) while the
    /// file is cut: every copy gives the right bytes or ObjectChanged, none kills the process.
    #[test]
    fn threads_copying_their_own_ranges_through_a_cut_each_see_it_cleanly() {
        use std::sync::atomic::AtomicUsize;
        use std::time::{Duration, Instant};
        let len = 512 * PAGE;
        let (f, data) = file_of(len, 13);
        let map = MappedFile::open(f.path()).unwrap();
        let stop = AtomicBool::new(false);
        // Threads that copied once, and threads (of those whose range the cut takes) that saw
        // the cut.
        let (copied, saw_cut) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let wait_for = |what: &AtomicUsize, n: usize, why: &str| {
            let t0 = Instant::now();
            while what.load(Ordering::SeqCst) < n {
                assert!(t0.elapsed() < Duration::from_secs(30), "{why}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let (map, data, stop) = (&map, &data, &stop);
                    let (copied, saw_cut) = (&copied, &saw_cut);
                    s.spawn(move || {
                        let (lo, n) = (t * len / 4, len / 4);
                        let mut buf = vec![0u8; n];
                        let (mut ok, mut changed) = (0usize, 0usize);
                        while !stop.load(Ordering::SeqCst) {
                            match map.copy_into(lo as u64, &mut buf) {
                                Ok(()) => {
                                    assert!(buf[..] == data[lo..lo + n], "thread {t}");
                                    if ok == 0 {
                                        copied.fetch_add(1, Ordering::SeqCst);
                                    }
                                    ok += 1;
                                }
                                Err(e) => {
                                    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
                                    if changed == 0 && t > 0 {
                                        saw_cut.fetch_add(1, Ordering::SeqCst);
                                    }
                                    changed += 1;
                                }
                            }
                        }
                    })
                })
                .collect();
            wait_for(&copied, 4, "every thread copies its range before the cut");
            // The cut keeps the first quarter and a part of the second.
            f.as_file().set_len(len as u64 / 3).unwrap();
            wait_for(&saw_cut, 3, "the threads whose range the cut takes see it");
            stop.store(true, Ordering::SeqCst);
            for w in workers {
                w.join().unwrap();
            }
        });
    }
}
