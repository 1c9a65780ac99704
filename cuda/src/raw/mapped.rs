//! The warm page-cache path's file mapping: the whole file mapped read-only and shared, so that
//! pieces of it (already in the page cache) can be host-registered read-only and copied by the
//! GPU's copy engine straight out of the page cache, with no CPU copy.
//!
//! The mapping's bytes are never exposed as a Rust slice (a concurrent truncation or write by
//! another process could not be ruled out); only the DMA engine reads them, from registered
//! (pinned) pages that truncation cannot take away.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use tensorstream_engine::{Error, Result};

use crate::raw::driver::device_error;
use crate::raw::pinned::PAGE;

/// A read-only shared mapping of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    ptr: Option<NonNull<u8>>,
    len: usize,
    map_len: usize,
    file: File,
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
        let file = File::open(path)
            .map_err(|e| Error::from_io(e, format!("opening {}", path.display())))?;
        let len64 = file
            .metadata()
            .map_err(|e| Error::from_io(e, format!("stat {}", path.display())))?
            .len();
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
        }))
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
        let bound = super::driver::bind(&self.ctx).is_ok();
        // SAFETY: unregistering the base address registered in `MappedFile::register`; the
        // copies that read it completed (HostSource is only dropped after its event).
        let r = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        if !bound || r != sys::cudaError_enum::CUDA_SUCCESS {
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
