//! The storage-backend trait: the only thing the engine knows about storage.
//!
//! # Contract for implementers
//!
//! A backend serves ONE object (a file, a URL, an S3 key). It answers two questions —
//! [`Backend::stat`] (how big is it, which version) and [`Backend::read_at`] (fill this buffer
//! from that offset) — and describes itself with [`Capabilities`]. It knows nothing of tensors.
//!
//! * `read_at(offset, buf)` fills `buf` completely and returns `buf.len()`, unless the object ends
//!   first: then it returns the number of bytes up to the end (possibly 0; a read that starts
//!   at or past the end may instead fail with [`ErrorKind::RangeNotSatisfiable`], not
//!   retryable). A short count anywhere else is a bug. Transient failures are retried inside
//!   the backend; the error that escapes is final for that range, with [`Error::is_retryable`]
//!   telling whether a fresh attempt might help.
//! * Every read of one load must observe the same object version as the `stat` that started it.
//!   Backends that can detect a change (ETag, mtime, size) return [`ErrorKind::ObjectChanged`]
//!   instead of mixing bytes of two versions. The engine also calls `stat` once more after a
//!   load's last read ([`crate::unchanged_since`]): a version tag that changes with the content
//!   lets it catch what no read noticed, and again when a load or conversion fails on bytes a
//!   change explains (a checksum mismatch, an object ending early), to report the change
//!   rather than a corrupt object. `stat` must therefore be cheap and callable while a reader
//!   is open.
//! * `read_at` may be called from many threads at once (`Backend: Sync`).
//! * Readers returned by [`Backend::open_reader`] own the buffers handed to them until the read
//!   completes, and give every buffer back, on success and on failure — also after
//!   [`RangeReader::abandon`]: a failing or cancelled load waits for every read in flight.
//! * Nothing interrupts a `read_at` or `stat` call. A call that can block (a network request)
//!   should time out by itself. The engine waits for a cancellable load's reads in short ticks
//!   ([`RangeReader::wait_timeout`]; the default reader implements it) and, once cancelled,
//!   gives the reads in flight 2 s before it leaves them to a thread of their own and reports
//!   the cancel; the `Loader` likewise abandons an opening (`stat`, the metadata reads) on a
//!   cancel. A reader session sees the cancel flag in [`ReaderOptions`] and can stop early.
//! * A panic in `read_at` on the engine's reader threads becomes an error of the read that
//!   panicked; a panic in a call made on the caller's thread (`stat`, the metadata reads, a
//!   conversion of a backend with `kernel_reads`) propagates to the caller like any panic.
//!
//! Backends with their own asynchronous machinery (io_uring, an HTTP client on tokio) override
//! [`Backend::open_reader`]; the default runs `read_at` on a pool of threads, which is all a simple
//! third-party backend needs. Run the conformance suite
#![cfg_attr(feature = "testkit", doc = "([`crate::testkit`], feature `testkit`)")]
#![cfg_attr(
    not(feature = "testkit"),
    doc = "(module `testkit`, feature `testkit`)"
)]
//! against your backend.
//!
//! [`ErrorKind::ObjectChanged`]: crate::ErrorKind::ObjectChanged

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, ErrorKind, Result};
use crate::mem::IoBuf;

/// What `stat` knows about the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// A version tag (HTTP ETag, S3 ETag/version id, mtime+inode for files), if any.
    pub version: Option<String>,
}

/// What a backend can do and how it likes to be read. Plain data: the planner and the
/// conformance suite read it; nothing matches on a backend's concrete type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Arbitrary byte ranges can be read. Every reader in this project reads by ranges: a
    /// backend that says `false` is refused (`Unsupported`) by the `Loader`, and fails the
    /// conformance suite.
    pub ranged_reads: bool,
    /// Reads bypass the page cache (O_DIRECT): offsets, lengths and buffers must be aligned.
    pub direct_io: bool,
    /// Required alignment of offset, length and buffer address (power of two; 1 = none).
    /// Honoured only together with `direct_io`: the `Loader` plans a backend without
    /// `direct_io` with alignment 1 whatever this says, and the `testkit` refuses
    /// `alignment > 1` without `direct_io` (and `direct_io` with alignment 1).
    pub alignment: usize,
    /// Preferred size of one read request: the `Loader`'s read size unless the caller sets one
    /// (`Loader::chunk_size`); below 4096 it counts as 4096.
    pub preferred_chunk: usize,
    /// Reads the backend is happy to have in flight at once: the `Loader`'s queue depth unless
    /// the caller sets one (`Loader::queue_depth`), taken into 1..=1024; the default reader
    /// ([`Backend::open_reader`]) runs that many threads, at most 64.
    pub max_concurrency: usize,
    /// Name of the backend kind (`local`, `http`, `s3`, `nfs`, …) for messages and stats.
    pub kind: &'static str,
    /// Reads are done by the kernel straight into the destination buffer (io_uring, `pread`),
    /// not copied out of the backend's own user-space buffers. The host sink then faults the
    /// destination's pages in ahead of the reads on a helper thread (measured faster for local
    /// files; slower for network clients, which allocate while they copy).
    pub kernel_reads: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            ranged_reads: true,
            direct_io: false,
            alignment: 1,
            preferred_chunk: 8 << 20,
            max_concurrency: 8,
            kind: "custom",
            kernel_reads: false,
        }
    }
}

/// One read handed to a [`RangeReader`].
#[derive(Debug)]
pub struct ReadRequest {
    /// Caller's token, returned in the completion.
    pub id: u64,
    /// Object offset of the first byte.
    pub offset: u64,
    /// Destination; `buf.len()` bytes are requested.
    pub buf: IoBuf,
}

/// A finished read: the buffer comes back with the outcome.
#[derive(Debug)]
pub struct ReadDone {
    /// The request's token.
    pub id: u64,
    /// The request's offset.
    pub offset: u64,
    /// The buffer, given back.
    pub buf: IoBuf,
    /// Bytes read (`buf.len()` unless the object ended), or the error.
    pub result: Result<usize>,
}

/// Options for a reader session (build with [`ReaderOptions::new`]; fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReaderOptions {
    /// Reads to keep in flight.
    pub queue_depth: usize,
    /// The load's cancel flag ([`crate::EngineOptions::cancel`]), if any. A reader that waits on
    /// its own (retries, backoff) should stop retrying once it is set and return the reads in
    /// flight, failed, as soon as it can. Readers that never wait long may ignore it.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl ReaderOptions {
    /// `queue_depth` reads in flight, no cancel flag.
    pub fn new(queue_depth: usize) -> Self {
        ReaderOptions {
            queue_depth,
            cancel: None,
        }
    }
}

/// A session of many reads in flight: submit requests, wait for completions (any order).
pub trait RangeReader: Send {
    /// Queues a read. The caller keeps at most `queue_depth` reads in flight.
    fn submit(&mut self, req: ReadRequest) -> Result<()>;
    /// Blocks until a read completes and returns it. Errors only when the reader itself broke
    /// (per-read failures come back in [`ReadDone::result`] together with the buffer).
    fn wait(&mut self) -> Result<ReadDone>;
    /// Optional: [`RangeReader::wait`] for at most about `timeout`; `Ok(None)` when no read
    /// completed by then. The engine waits this way when a load can be cancelled, so that a
    /// read stuck in the backend (a hung server, a hard NFS mount) does not keep a cancel or a
    /// deadline from being seen. The default waits without a limit.
    fn wait_timeout(&mut self, timeout: std::time::Duration) -> Result<Option<ReadDone>> {
        let _ = timeout;
        self.wait().map(Some)
    }
    /// Reads submitted and not yet returned by `wait`.
    fn in_flight(&self) -> usize;
    /// Optional: buffers (by region) that should be registered with the kernel for faster I/O.
    /// Called once before the first submit. The default does nothing.
    fn register_buffers(&mut self, _bufs: &[&IoBuf]) -> Result<()> {
        Ok(())
    }
    /// Optional: the load is failing (an error, or the caller cancelled) and only waits for the
    /// reads in flight to come back. A reader that would retry or back off may stop doing so and
    /// return the remaining reads at once (failed, each with its buffer). The default does
    /// nothing; reads still come back through `wait` either way.
    fn abandon(&mut self) {}
}

/// A storage backend serving one object. See the module docs for the contract.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// The object's location as the user wrote it (path or URI), for messages.
    fn location(&self) -> &str;
    /// Size and version of the object.
    fn stat(&self) -> Result<ObjectMeta>;
    /// How the backend likes to be read.
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` from `offset`; returns fewer bytes only at the end of the object.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// A reader session with many reads in flight. The default runs `read_at` on
    /// `opts.queue_depth` threads (capped at 64).
    fn open_reader(
        self: Arc<Self>,
        _meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        Ok(Box::new(
            ThreadPoolReader::new(self, opts.queue_depth)?.cancelled_by(opts.cancel.clone()),
        ))
    }
}

/// The error for a read of `asked` bytes at `offset` that a backend or reader said brought `n`,
/// more than it was asked for: the count cannot be trusted (and `offset + n` could overflow).
pub(crate) fn over_claim(n: usize, asked: usize, offset: u64) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("backend reported {n} bytes for a read of {asked} bytes (more than requested)"),
    )
    .with_range(offset..offset.saturating_add(asked as u64))
}

/// Conveniences over any [`Backend`] (blanket-implemented; not part of the implementer contract).
pub trait BackendExt: Backend {
    /// [`Backend::stat`], with the backend's location on an error that names none.
    fn stat_located(&self) -> Result<ObjectMeta> {
        self.stat().map_err(|e| e.with_location(self.location()))
    }
    /// Reads exactly `len` bytes at `offset`, failing with `Corrupt` if the object ends first
    /// (or the backend claims more bytes than asked). Errors name the location and the range.
    fn read_exact_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let range = offset..offset.saturating_add(len as u64);
        let mut v = vec![0u8; len];
        let n = self
            .read_at(offset, &mut v)
            .map_err(|e| e.with_location(self.location()).with_range(range.clone()))?;
        if n > len {
            return Err(over_claim(n, len, offset).with_location(self.location()));
        }
        if n < len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "object ends at byte {}, inside the {len} bytes read from {offset}",
                    offset.saturating_add(n as u64)
                ),
            )
            .with_location(self.location())
            .with_range(range));
        }
        Ok(v)
    }
}
impl<B: Backend + ?Sized> BackendExt for B {}

/// Dispatches `read_at` calls to a fixed pool of threads: the default [`RangeReader`].
pub struct ThreadPoolReader {
    tx: Option<Sender<ReadRequest>>,
    rx: Receiver<ReadDone>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    stops: Arc<Stops>,
}

/// What makes the workers give back the reads they have not started yet: `abandon` or the
/// load's cancel flag.
#[derive(Default)]
struct Stops {
    abandoned: std::sync::atomic::AtomicBool,
    cancel: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
}

impl Stops {
    fn stopped(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.abandoned.load(Relaxed) || self.cancel.get().is_some_and(|c| c.load(Relaxed))
    }
}

/// The function a [`ThreadPoolReader`] runs for each read: fill the buffer from the offset.
pub type ReadFn = dyn Fn(u64, &mut [u8]) -> Result<usize> + Send + Sync;

impl ThreadPoolReader {
    /// Starts `threads` workers (1..=64) reading through `backend`.
    pub fn new<B: Backend + ?Sized>(backend: Arc<B>, threads: usize) -> Result<Self> {
        Self::with_fn(
            Arc::new(move |off, buf: &mut [u8]| backend.read_at(off, buf)),
            threads,
            "ts-read",
        )
    }

    /// Starts `threads` workers (1..=64, named `{name}-{i}`) that each run `read` for the
    /// requests they take. Backends with their own positional read use this directly.
    pub fn with_fn(read: Arc<ReadFn>, threads: usize, name: &str) -> Result<Self> {
        let threads = threads.clamp(1, 64);
        let stops = Arc::new(Stops::default());
        let (tx, jobs) = crossbeam_channel::unbounded::<ReadRequest>();
        let (done_tx, rx) = crossbeam_channel::unbounded::<ReadDone>();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let jobs = jobs.clone();
            let done_tx = done_tx.clone();
            let read = read.clone();
            let stops = stops.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for mut req in jobs.iter() {
                        if stops.stopped() {
                            // Queued behind the workers when the load stopped: not worth a read.
                            let done = ReadDone {
                                id: req.id,
                                offset: req.offset,
                                result: Err(Error::new(
                                    ErrorKind::Cancelled,
                                    "read not started: the load was cancelled or another read \
                                     failed",
                                )),
                                buf: req.buf,
                            };
                            if done_tx.send(done).is_err() {
                                break;
                            }
                            continue;
                        }
                        // A panicking backend must not take the read (and its buffer) with it:
                        // the caller waits for every read it submitted, so a lost completion
                        // would hang it while the other workers keep the channel open.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            read(req.offset, req.buf.as_mut_slice())
                        }))
                        .unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<&str>()
                                .copied()
                                .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                                .unwrap_or("(no message)");
                            Err(
                                Error::new(ErrorKind::Io, format!("backend read panicked: {msg}"))
                                    .with_range(
                                        req.offset..req.offset.saturating_add(req.buf.len() as u64),
                                    ),
                            )
                        });
                        let done = ReadDone {
                            id: req.id,
                            offset: req.offset,
                            buf: req.buf,
                            result,
                        };
                        if done_tx.send(done).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::from_io(e, "spawning reader thread"))?;
            workers.push(h);
        }
        Ok(ThreadPoolReader {
            tx: Some(tx),
            rx,
            workers,
            in_flight: 0,
            stops,
        })
    }

    /// Reads not yet started when `flag` is set are given back unread (failed, `Cancelled`).
    pub fn cancelled_by(self, flag: Option<Arc<std::sync::atomic::AtomicBool>>) -> Self {
        if let Some(f) = flag {
            let _ = self.stops.cancel.set(f);
        }
        self
    }
}

impl RangeReader for ThreadPoolReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "reader closed"))?;
        tx.send(req)
            .map_err(|_| Error::new(ErrorKind::Io, "reader threads exited"))?;
        self.in_flight += 1;
        Ok(())
    }
    fn wait(&mut self) -> Result<ReadDone> {
        if self.in_flight == 0 {
            return Err(Error::invalid("wait() with no read in flight"));
        }
        let d = self
            .rx
            .recv()
            .map_err(|_| Error::new(ErrorKind::Io, "reader threads exited"))?;
        self.in_flight -= 1;
        Ok(d)
    }
    fn wait_timeout(&mut self, timeout: std::time::Duration) -> Result<Option<ReadDone>> {
        if self.in_flight == 0 {
            return Err(Error::invalid("wait() with no read in flight"));
        }
        match self.rx.recv_timeout(timeout) {
            Ok(d) => {
                self.in_flight -= 1;
                Ok(Some(d))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(Error::new(ErrorKind::Io, "reader threads exited"))
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn abandon(&mut self) {
        self.stops
            .abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ThreadPoolReader {
    fn drop(&mut self) {
        self.tx.take();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A backend over bytes in memory: for tests, examples and the conformance suite's self-check.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    name: String,
    data: Arc<Vec<u8>>,
}

impl MemoryBackend {
    /// Serves `data` under the name `name`.
    pub fn new(name: impl Into<String>, data: Vec<u8>) -> Self {
        MemoryBackend {
            name: name.into(),
            data: Arc::new(data),
        }
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> &str {
        &self.name
    }
    fn stat(&self) -> Result<ObjectMeta> {
        Ok(ObjectMeta {
            size: self.data.len() as u64,
            version: None,
        })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kind: "memory",
            ..Capabilities::default()
        }
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = self.data.len() as u64;
        if offset > len {
            return Err(Error::new(
                ErrorKind::RangeNotSatisfiable,
                format!("offset {offset} is past the end ({len} bytes)"),
            )
            .with_location(&self.name));
        }
        let start = offset as usize;
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
}

/// A [`MemoryBackend`] that records every read (offset, length asked) and the bytes it served:
/// for the crate's tests of how many reads a parse or conversion makes.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct CountingBackend {
    inner: MemoryBackend,
    pub(crate) bytes: std::sync::atomic::AtomicU64,
    pub(crate) reads: std::sync::Mutex<Vec<(u64, usize)>>,
}

#[cfg(test)]
impl CountingBackend {
    pub(crate) fn new(name: impl Into<String>, data: Vec<u8>) -> Self {
        CountingBackend {
            inner: MemoryBackend::new(name, data),
            bytes: Default::default(),
            reads: Default::default(),
        }
    }

    /// How many reads were made.
    pub(crate) fn read_count(&self) -> usize {
        self.reads.lock().map_or(0, |r| r.len())
    }
}

#[cfg(test)]
impl Backend for CountingBackend {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> Result<ObjectMeta> {
        self.inner.stat()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = self.inner.read_at(offset, buf)?;
        self.bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut r) = self.reads.lock() {
            r.push((offset, buf.len()));
        }
        Ok(n)
    }
}
