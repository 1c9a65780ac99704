//! The pread thread-pool reader (fallback when io_uring is unavailable or not wanted), the
//! read loops it shares with `read_at`, and the change guard both reader kinds use.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tensorstream_engine::{
    Error, ErrorKind, ObjectMeta, RangeReader, ReadDone, ReadRequest, Result, ThreadPoolReader,
};

use super::Files;

/// Re-check the file's version after this many bytes were read without a check.
pub(crate) const CHECK_EVERY: u64 = 1 << 30;

/// How often an `EINTR`/`EAGAIN` is retried before giving up on a read.
pub(crate) const MAX_RETRIES: u32 = 1000;

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
    )
}

/// Fills `buf` from `offset` with buffered `pread`s; fewer bytes only at the end of the file.
pub(crate) fn pread_full(file: &File, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0usize;
    let mut retries = 0u32;
    while done < buf.len() {
        let off = offset
            .checked_add(done as u64)
            .ok_or_else(|| Error::new(ErrorKind::RangeNotSatisfiable, "read offset overflows"))?;
        match file.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if is_transient(&e) && retries < MAX_RETRIES => retries += 1,
            Err(e) => {
                return Err(Error::from_io(e, "read")
                    .with_range(offset..offset.saturating_add(buf.len() as u64)))
            }
        }
    }
    Ok(done)
}

/// Fills `buf` from `offset`, through the O_DIRECT descriptor whenever the piece is aligned,
/// else buffered. An `EINVAL` from a direct read switches the file to buffered reads.
pub(crate) fn read_range(files: &Files, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0usize;
    let mut retries = 0u32;
    let range = offset..offset.saturating_add(buf.len() as u64);
    while done < buf.len() {
        let off = offset
            .checked_add(done as u64)
            .ok_or_else(|| Error::new(ErrorKind::RangeNotSatisfiable, "read offset overflows"))?;
        let part = &mut buf[done..];
        let direct = files
            .direct
            .as_ref()
            .filter(|_| files.direct_fits(off, part.as_ptr() as usize, part.len()));
        match direct.unwrap_or(&files.buffered).read_at(part, off) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if is_transient(&e) && retries < MAX_RETRIES => retries += 1,
            Err(e) if direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                files.disable_direct("EINVAL")
            }
            Err(e) => {
                return Err(Error::from_io(e, "read")
                    .with_location(&files.path)
                    .with_range(range))
            }
        }
    }
    Ok(done)
}

/// Detects a file that changed (replaced, resized, written) while a reader session runs, with
/// `fstat` at cheap moments: when the session opens, when a read comes back short or reaches the
/// end of the object, and after every [`CHECK_EVERY`] bytes.
pub(crate) struct ChangeGuard {
    files: Arc<Files>,
    meta: ObjectMeta,
    unchecked: u64,
}

impl ChangeGuard {
    /// A guard for the version in `meta` (the `stat` that started the load).
    pub fn new(files: Arc<Files>, meta: ObjectMeta) -> Self {
        ChangeGuard {
            files,
            meta,
            unchecked: 0,
        }
    }

    /// Size of the object at `stat`.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Fails with `ObjectChanged` if the file is no longer the version the load started with.
    pub fn check(&mut self) -> Result<()> {
        self.unchecked = 0;
        let now = self.files.meta()?;
        let same_version = match (&self.meta.version, &now.version) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if now.size != self.meta.size || !same_version {
            return Err(Error::new(
                ErrorKind::ObjectChanged,
                format!(
                    "file changed while loading (size {} at stat, now {}; version {} → {})",
                    self.meta.size,
                    now.size,
                    self.meta.version.as_deref().unwrap_or("?"),
                    now.version.as_deref().unwrap_or("?")
                ),
            )
            .with_location(&self.files.path)
            .with_backend("local"));
        }
        Ok(())
    }

    /// Passes a finished read's outcome through, turning it into `ObjectChanged` when a check
    /// (due now: short read, end of object, or enough bytes since the last one) finds a change.
    pub fn on_done(
        &mut self,
        offset: u64,
        requested: usize,
        result: Result<usize>,
    ) -> Result<usize> {
        let n = result?;
        self.unchecked = self.unchecked.saturating_add(n as u64);
        let end = offset.saturating_add(n as u64);
        if n < requested || end >= self.meta.size || self.unchecked >= CHECK_EVERY {
            self.check()
                .map_err(|e| e.with_range(offset..offset.saturating_add(requested as u64)))?;
        }
        Ok(n)
    }
}

/// Reads on a pool of threads, each calling [`read_range`] (pread, O_DIRECT when aligned): the
/// engine's [`ThreadPoolReader`] plus this backend's change check on every completion.
pub(crate) struct PreadReader {
    pool: ThreadPoolReader,
    guard: ChangeGuard,
}

impl PreadReader {
    /// Starts `threads` workers (1..=64).
    pub fn new(files: Arc<Files>, threads: usize, guard: ChangeGuard) -> Result<Self> {
        let read = move |off: u64, buf: &mut [u8]| read_range(&files, off, buf);
        Ok(PreadReader {
            pool: ThreadPoolReader::with_fn(Arc::new(read), threads, "ts-pread")?,
            guard,
        })
    }

    /// Reads not yet started when `flag` is set are given back unread (`Cancelled`).
    pub fn cancelled_by(mut self, flag: Option<Arc<std::sync::atomic::AtomicBool>>) -> Self {
        self.pool = self.pool.cancelled_by(flag);
        self
    }
}

impl RangeReader for PreadReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        self.pool.submit(req)
    }

    fn wait(&mut self) -> Result<ReadDone> {
        let mut d = self.pool.wait()?;
        let len = d.buf.len();
        d.result = self.guard.on_done(d.offset, len, d.result);
        Ok(d)
    }

    fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }

    fn abandon(&mut self) {
        self.pool.abandon();
    }
}
