//! Many ranged GETs in flight: the [`RangeReader`] of the S3 backend and the read routine shared
//! with `read_at`.
//!
//! Each submitted read becomes one task on the backend's runtime. The task cuts its buffer into
//! `chunk_size` pieces and fetches them concurrently, each piece waiting for one of the backend's
//! `concurrency` permits first, so the number of GETs in flight never exceeds it whatever the
//! engine's queue depth. Body chunks are copied straight from the HTTP client's buffers into the
//! request's [`IoBuf`]: one copy, no intermediate allocation.
//!
//! Every buffer comes back exactly once: the task holds it in a [`Completion`] whose `Drop` sends
//! it back with the result, so even a cancelled task (runtime shut down) or a panicking one
//! returns its buffer, with an error.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use futures::TryStreamExt;
use tensorstream_engine::{
    Error, ErrorKind, IoBuf, ObjectMeta, RangeReader, ReadDone, ReadRequest, Result,
};

use super::pin::Pinned;
use super::{clamp_read, counted, IoCtx, S3Backend};
use crate::stop::Stop;

/// Fetches `dst.len()` bytes at `offset` (the caller has clamped the range to the object) with
/// `chunk`-sized GETs in flight at once. Returns the number of contiguous bytes read from
/// `offset`: `dst.len()` unless the object turned out shorter.
/// Every GET (the retry layer's included) must answer for `pin`, what `stat` found: its
/// version and its size.
pub(crate) async fn read_into(
    io: &IoCtx,
    pin: &ObjectMeta,
    offset: u64,
    dst: &mut [u8],
) -> Result<usize> {
    let chunk = io.chunk.max(1);
    let etag = pin.version.as_deref();
    let parts = dst.chunks_mut(chunk).enumerate().map(|(i, part)| {
        // i * chunk <= dst.len(), which fits u64; offset + that was clamped to the object size.
        let part_off = offset + (i as u64) * (chunk as u64);
        super::pin::scoped(pin.clone(), counted(read_part(io, etag, part_off, part)))
    });
    let results = futures::future::join_all(parts).await;
    let mut total = 0usize;
    for (i, r) in results.into_iter().enumerate() {
        let n = r?;
        let want = chunk.min(dst.len() - i * chunk);
        total += n;
        if n < want {
            // The object ended here: later pieces (if any) cannot have data.
            break;
        }
    }
    Ok(total)
}

/// Ranged GETs in a row one part may take when the server answers each with fewer than
/// [`PROGRESS_MIN`] bytes, though more were asked for (a `206` for a shorter range: allowed, and
/// the rest is asked for). Shorter answers that bring more are continued without limit: each
/// brings the part closer to its end.
const MAX_SHORT_ANSWERS: u32 = 64;

/// Slowest accepted transfer: one GET for N bytes gets the retry layer's attempts at the timeout
/// and their backoff, plus N / this long in all (16 MiB: 6 × 10 s + 4 × 4 s + 64 s), so that a
/// server trickling bytes, each gap shorter than the timeout, cannot hold a load for ever. A GET
/// cut this way is continued where it stopped if it brought [`PROGRESS_MIN`] bytes (with the
/// shorter answers before it that it continues), and is a `Timeout` error otherwise;
/// [`MAX_SLOW_CUTS`] cuts in a row are a `Timeout` error too.
const MIN_RATE: u64 = crate::SLOWEST_RATE;
/// Bytes a GET cut for slowness (or shorter than asked) must have brought to be continued
/// (without counting towards [`MAX_SHORT_ANSWERS`]).
const PROGRESS_MIN: usize = crate::PROGRESS_BYTES;
/// GETs of one part cut for slowness in a row (shorter answers between them do not break the
/// row) after which the part fails, however much each brought: a server slower than
/// [`MIN_RATE`] must not hold a load for hours by bringing a little each time (with the
/// defaults a connection slower than about 50 KiB/s fails).
const MAX_SLOW_CUTS: u32 = 3;

/// `dst` from `offset`: one ranged GET, and more for the rest when the server answers with a
/// shorter range. Returns fewer bytes than `dst` holds only where the object ends.
///
/// The GETs that continue a shorter answer share the time of the GET it answered (see
/// [`get_deadline`]), and a cut for slowness stays counted whatever answers follow it: each on
/// its own time, with the count restarted by every answer of 64 KiB, a server answering small
/// ranges slowly held a part for as long as it lasted.
async fn read_part(io: &IoCtx, etag: Option<&str>, offset: u64, dst: &mut [u8]) -> Result<usize> {
    let mut n = 0usize;
    let mut short = 0u32;
    let mut cuts = 0u32;
    let started = tokio::time::Instant::now();
    let part = offset..offset.saturating_add(dst.len() as u64);
    // The deadline of the GET answering the part since the last cut (set by its `read_once`),
    // and the bytes its answers must still bring by then to be continued rather than fail.
    let mut deadline: Option<Option<tokio::time::Instant>> = None;
    let mut need = PROGRESS_MIN.min(dst.len());
    while n < dst.len() {
        let at = offset + n as u64; // n <= dst.len(), and the range was clamped to the object
        let Got { bytes: got, cut } =
            read_once(io, etag, at, &mut dst[n..], &mut deadline, need).await?;
        n += got;
        if n >= dst.len() {
            break;
        }
        if cut {
            deadline = None;
            need = PROGRESS_MIN.min(dst.len() - n);
            cuts += 1;
            if cuts >= MAX_SLOW_CUTS {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "GET too slow: {cuts} GETs in a row were cut for being slower than \
                         {MIN_RATE} bytes/s ({n} of {} bytes in {:.1} s)",
                        dst.len(),
                        started.elapsed().as_secs_f64()
                    ),
                )
                .with_retryable(true)
                .with_backend("s3")
                .with_location(&io.uri)
                .with_range(part));
            }
            continue;
        }
        if got == 0 {
            break; // the object ends here
        }
        need = need.saturating_sub(got);
        if got >= PROGRESS_MIN {
            short = 0;
            continue;
        }
        short += 1;
        if short >= MAX_SHORT_ANSWERS {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "GET: the server answered {MAX_SHORT_ANSWERS} ranged GETs in a row with \
                     under {PROGRESS_MIN} bytes each, fewer than asked"
                ),
            )
            .with_backend("s3")
            .with_location(&io.uri)
            .with_range(part));
        }
    }
    Ok(n)
}

/// What one ranged GET brought.
struct Got {
    /// Bytes written to the front of the destination.
    bytes: usize,
    /// The GET was cut for being slower than [`MIN_RATE`] (it brought the bytes it needed).
    cut: bool,
}

/// When one GET for `len` bytes must be done: room for the retry layer's own attempts at a
/// stalled body first (each `io_timeout`, with backoff between them), plus `len` at
/// [`MIN_RATE`], from now. This is the backstop for bodies that never stall outright. `None`
/// when the clock would overflow.
fn get_deadline(io: &IoCtx, len: usize) -> Option<tokio::time::Instant> {
    let allowed = io
        .timeout
        .max(io.io_timeout)
        .saturating_mul(super::RETRIES as u32 + 2)
        // (twice the largest backoff: the retry layer adds jitter)
        .saturating_add(super::MAX_BACKOFF.saturating_mul(2 * super::RETRIES as u32))
        .saturating_add(Duration::from_secs(len as u64 / MIN_RATE));
    tokio::time::Instant::now().checked_add(allowed)
}

/// One ranged GET into `dst` (the server may answer a shorter range), done by `deadline`: the
/// one of the GET it continues, or set here once the answer begins (see [`get_deadline`]). Cut
/// then, it is continued if it brought `need` bytes, and a `Timeout` error otherwise. OpenDAL
/// sends the GET when its stream is first polled, so the wait for a continuing GET's answer
/// counts against the deadline too, not only its body.
async fn read_once(
    io: &IoCtx,
    etag: Option<&str>,
    offset: u64,
    dst: &mut [u8],
    deadline: &mut Option<Option<tokio::time::Instant>>,
    need: usize,
) -> Result<Got> {
    let end = offset.saturating_add(dst.len() as u64);
    let range = offset..end;
    let _permit =
        io.permits.acquire().await.map_err(|_| {
            Error::new(ErrorKind::Io, "S3 request limiter closed").with_backend("s3")
        })?;
    // (The GETs must run in this task, inside `pin::scoped`: the pin layer and the transport
    // read what `stat` pinned from the task-local. OpenDAL's reader without `.concurrent(n)`
    // fetches inline; with it, fetches would move to spawned tasks, and those checks would
    // find no pin and check nothing.)
    let mut req = io.op.reader_with(&io.key);
    match etag.map(super::pin::parse_version) {
        // A weak ETag (`W/"…"`) never matches under If-Match's strong comparison: a strict
        // server would refuse every read. The pin layer still checks each answer's ETag (it
        // finds the pinned one in the read's scope, `pin::scoped`).
        Some(Pinned::Etag(e)) if !e.trim_start().starts_with("W/") => req = req.if_match(e),
        Some(Pinned::Modified(t)) => req = req.if_unmodified_since(t),
        _ => {}
    }
    let reader = req
        .await
        .map_err(|e| io.error(e, "GET", Some(range.clone())))?;
    let mut stream = reader
        .into_stream(range.clone())
        .await
        .map_err(|e| io.error(e, "GET", Some(range.clone())))?;
    let mut n = 0usize;
    let started = tokio::time::Instant::now();
    let deadline = *deadline.get_or_insert_with(|| get_deadline(io, dst.len()));
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.try_next()).await {
                Ok(r) => r,
                Err(_) if n >= need => {
                    return Ok(Got {
                        bytes: n,
                        cut: true,
                    })
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "GET too slow: {n} of {} bytes in {:.1} s (slowest accepted rate \
                             {MIN_RATE} bytes/s)",
                            dst.len(),
                            started.elapsed().as_secs_f64()
                        ),
                    )
                    .with_retryable(true)
                    .with_backend("s3")
                    .with_location(&io.uri)
                    .with_range(range.clone()))
                }
            },
            None => stream.try_next().await,
        };
        let buf = match next {
            Ok(Some(buf)) => buf,
            Ok(None) => break,
            // OpenDAL fails a body shorter than the range it asked for, after handing over the
            // bytes that came (each answer's Content-Range was checked in `transport.rs`): keep
            // them, the caller asks for the rest.
            Err(e) if n > 0 && is_short_answer(&e) => {
                return Ok(Got {
                    bytes: n,
                    cut: false,
                })
            }
            Err(e) => return Err(io.error(e, "GET", Some(range.clone()))),
        };
        for bytes in buf {
            let next = n
                .checked_add(bytes.len())
                .filter(|&e| e <= dst.len())
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "GET: the server sent more than the {} bytes requested (Range header \
                             ignored?)",
                            dst.len()
                        ),
                    )
                    .with_backend("s3")
                    .with_location(&io.uri)
                    .with_range(range.clone())
                })?;
            dst[n..next].copy_from_slice(&bytes);
            n = next;
        }
    }
    Ok(Got {
        bytes: n,
        cut: false,
    })
}

/// Whether OpenDAL's error says the answer brought fewer bytes than the range asked.
fn is_short_answer(e: &opendal::Error) -> bool {
    e.kind() == opendal::ErrorKind::Unexpected && e.message().contains("too little data")
}

/// Sends the buffer back when dropped: on completion, on cancellation and on panic.
struct Completion {
    id: u64,
    offset: u64,
    buf: Option<IoBuf>,
    result: Option<Result<usize>>,
    tx: Sender<ReadDone>,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let result = self.result.take().unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Io,
                    "S3 read task was cancelled before it finished (runtime shut down or task \
                     panicked)",
                )
                .with_backend("s3"))
            });
            let _ = self.tx.send(ReadDone {
                id: self.id,
                offset: self.offset,
                buf,
                result,
            });
        }
    }
}

/// The S3 backend's reader session: reads run as tasks on the backend's runtime, pinned to the
/// object version of the `stat` that started the load.
pub struct S3Reader {
    handle: tokio::runtime::Handle,
    io: Arc<IoCtx>,
    meta: ObjectMeta,
    tx: Sender<ReadDone>,
    rx: Receiver<ReadDone>,
    in_flight: usize,
    /// Stops every read in flight: on `abandon`, once the load's cancel flag is seen, on drop.
    stop: Stop,
    /// Keeps the runtime alive while the session exists.
    _backend: Arc<S3Backend>,
}

impl S3Reader {
    pub(crate) fn new(
        backend: Arc<S3Backend>,
        handle: tokio::runtime::Handle,
        io: Arc<IoCtx>,
        meta: ObjectMeta,
        flag: Option<Arc<AtomicBool>>,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        S3Reader {
            handle,
            io,
            meta,
            tx,
            rx,
            in_flight: 0,
            stop: Stop::new(flag),
            _backend: backend,
        }
    }
}

impl Drop for S3Reader {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

impl RangeReader for S3Reader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        let ReadRequest { id, offset, buf } = req;
        let mut done = Completion {
            id,
            offset,
            buf: Some(buf),
            result: None,
            tx: self.tx.clone(),
        };
        let io = self.io.clone();
        let pin = self.meta.clone();
        let stopped = self.stop.stopped();
        self.handle.spawn(async move {
            let result = match done.buf.as_mut() {
                Some(buf) => tokio::select! {
                    r = read_buf(&io, &pin, offset, buf) => r,
                    _ = stopped => Err(Error::new(
                        ErrorKind::Cancelled,
                        "S3 read stopped: the load was cancelled or another read failed",
                    )
                    .with_backend("s3")
                    .with_location(&io.uri)),
                },
                None => Ok(0),
            };
            done.result = Some(result);
            drop(done);
        });
        self.in_flight += 1;
        Ok(())
    }

    fn wait(&mut self) -> Result<ReadDone> {
        if self.in_flight == 0 {
            return Err(Error::invalid("wait() with no read in flight"));
        }
        // Reads in retry backoff are stopped at once on a cancel.
        let d = self.stop.recv(&self.rx).ok_or_else(|| {
            Error::new(ErrorKind::Io, "S3 reader: completion channel closed").with_backend("s3")
        })?;
        self.in_flight -= 1;
        Ok(d)
    }

    fn abandon(&mut self) {
        self.stop.stop();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

async fn read_buf(io: &IoCtx, pin: &ObjectMeta, offset: u64, buf: &mut IoBuf) -> Result<usize> {
    let want = clamp_read(offset, buf.len(), pin.size).map_err(|e| e.with_location(&io.uri))?;
    if want == 0 {
        return Ok(0);
    }
    read_into(io, pin, offset, &mut buf.as_mut_slice()[..want]).await
}
