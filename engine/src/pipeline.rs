//! The engine: executes a [`Plan`] through a backend's [`RangeReader`](crate::RangeReader) into a
//! [`Sink`].
//!
//! The calling thread keeps `queue_depth` reads in flight; finished reads travel over a
//! crossbeam channel to the sink's thread, and staging slots travel back over another. Host
//! memory beyond the sink's destination is bounded by the staging ring (`slots × slot_size`),
//! whatever the model size; direct reads use no staging at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::backend::{Backend, ObjectMeta, ReadRequest, ReaderOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{staging_slots, IoBuf};
use crate::plan::Plan;
use crate::sink::Sink;

/// Engine knobs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Reads in flight.
    pub queue_depth: usize,
    /// Total staging memory for non-direct reads (bytes). The ring always holds two of the
    /// largest staged reads, so a budget below twice the read size is exceeded up to that.
    pub ring_budget: usize,
    /// Progress: each read kept adds its planned length (so the count ends at the plan's
    /// `read_bytes`, even where the last read ends past the object's end); reads thrown away
    /// after a failure add nothing.
    pub progress: Option<Arc<AtomicU64>>,
    /// Set it (from any thread) to stop the load: no new read is issued, the reads in flight
    /// are drained, and the load fails with [`ErrorKind::Cancelled`]. Nothing is left behind.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_depth: 16,
            ring_budget: 256 << 20,
            progress: None,
            cancel: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Reads issued.
    pub reads: u64,
    /// Bytes read from storage (including alignment and gap bytes).
    pub bytes_read: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Staging bytes allocated.
    pub staging_bytes: u64,
}

enum ToSink {
    Filled(usize, IoBuf),
    /// Every read landed: complete the sink. A sink whose channel closes without this message
    /// belongs to a failed load and is dropped without `finish`.
    Finish,
}

/// Runs `plan` against `backend` into `sink`. Returns the sink (holding the loaded bytes) and
/// statistics. On any error no partial result is returned.
pub fn execute<S: Sink>(
    backend: Arc<dyn Backend>,
    meta: &ObjectMeta,
    plan: Arc<Plan>,
    mut sink: S,
    opts: &EngineOptions,
) -> Result<(S, EngineStats)> {
    let start = Instant::now();
    let loc = backend.location().to_string();
    let depth = opts.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
    // Set-up errors (the destination's allocation, the staging ring) name the object too.
    let named = |e: Error| e.with_location(&loc);
    // A plan made by hand must not make a sink panic or misplace bytes.
    plan.validate().map_err(named)?;
    let mut direct = sink.prepare(&plan).map_err(named)?;
    if direct.len() != plan.reads.len() {
        return Err(named(Error::invalid(
            "sink prepared the wrong number of buffers",
        )));
    }
    let max_staged = plan
        .reads
        .iter()
        .zip(&direct)
        .filter(|(_, d)| d.is_none())
        .map(|(r, _)| r.len() as usize)
        .max();
    let mut free: Vec<IoBuf> = Vec::new();
    let mut staging_bytes = 0u64;
    let mut count_slots = 0usize;
    if let Some(slot) = max_staged {
        // As many slots of the largest staged read as the budget holds, but never fewer than
        // two (one being filled while the sink drains the other), even where two exceed it.
        let count = (opts.ring_budget / slot.max(1)).clamp(2, depth.max(2));
        free = match sink.staging(count, slot).map_err(named)? {
            Some(v) => v,
            None => {
                let align = backend.capabilities().alignment.max(4096);
                staging_slots(count, slot, align).map_err(named)?
            }
        };
        staging_bytes = free.iter().map(|b| b.capacity() as u64).sum();
        count_slots = free.len();
    }

    let mut reader = backend
        .clone()
        .open_reader(
            meta,
            &ReaderOptions {
                queue_depth: depth,
                cancel: opts.cancel.clone(),
            },
        )
        .map_err(named)?;
    {
        let regs: Vec<&IoBuf> = free.iter().chain(direct.iter().flatten()).collect();
        reader.register_buffers(&regs).map_err(named)?;
    }

    // Sink thread.
    let (to_sink, sink_rx): (Sender<ToSink>, Receiver<ToSink>) = crossbeam_channel::unbounded();
    let (freed_tx, freed_rx): (Sender<IoBuf>, Receiver<IoBuf>) = crossbeam_channel::unbounded();
    let sink_failed = Arc::new(AtomicBool::new(false));
    let sink_failed2 = sink_failed.clone();
    // Reads the sink has fully handled (accepted and its freed buffers sent back).
    let handled = Arc::new(AtomicU64::new(0));
    let handled2 = handled.clone();
    let sink_thread = std::thread::Builder::new()
        .name("ts-sink".into())
        .spawn(move || -> (S, Result<()>) {
            let mut run = || -> Result<()> {
                for msg in sink_rx.iter() {
                    match msg {
                        ToSink::Filled(idx, buf) => {
                            for b in sink.accept(idx, buf)? {
                                let _ = freed_tx.send(b);
                            }
                            // After the sends: whoever sees the count also sees the buffers.
                            handled2.fetch_add(1, Ordering::SeqCst);
                        }
                        ToSink::Finish => {
                            for b in sink.finish()? {
                                let _ = freed_tx.send(b);
                            }
                            return Ok(());
                        }
                    }
                }
                // The engine stopped without `Finish`: its own error is what the caller sees.
                Err(Error::new(
                    ErrorKind::Io,
                    "load stopped before all reads completed",
                ))
            };
            let r = run();
            if r.is_err() {
                sink_failed2.store(true, Ordering::SeqCst);
            }
            (sink, r)
        })
        .map_err(|e| Error::from_io(e, "spawning sink thread"))?;

    let mut stats = EngineStats {
        staging_bytes,
        ..Default::default()
    };
    let mut read_err: Option<Error> = None;
    // Reads handed to the sink.
    let mut sent = 0u64;
    let mut next = 0usize;
    let total = plan.reads.len();
    // Reads whose completion came back (each exactly once).
    let mut landed = vec![false; total];
    // What each read was given (buffer address and length, object offset): a completion must
    // bring back that very buffer, or its bytes are not where the load puts them.
    let mut given: Vec<(usize, usize, u64)> = vec![(0, 0, 0); plan.reads.len()];
    // Set once the reader was told the load is failing.
    let mut abandoned = false;
    // Reads submitted and not yet returned, as the engine counts them: it decides when to wait
    // by this count, not by the reader's word (a reader that over-counts would be waited on with
    // nothing in flight, which may block for ever).
    let mut outstanding = 0usize;
    'outer: while next < total || outstanding > 0 {
        // A failing load needs none of the reads still in flight: let the reader stop retrying
        // them (an NFS job in backoff would otherwise keep the drain waiting up to a minute).
        if !abandoned && (read_err.is_some() || sink_failed.load(Ordering::SeqCst)) {
            reader.abandon();
            abandoned = true;
        }
        // Submit while there is room and a buffer.
        while read_err.is_none() && next < total && outstanding < depth {
            if sink_failed.load(Ordering::SeqCst) {
                break 'outer;
            }
            if is_cancelled(&opts.cancel) {
                read_err = Some(cancelled(next, total));
                break;
            }
            let op = &plan.reads[next];
            let want = op.len() as usize;
            let mut buf = match direct[next].take() {
                Some(b) => b,
                None => match free.pop().or_else(|| freed_rx.try_recv().ok()) {
                    Some(b) => b,
                    None => break,
                },
            };
            if !buf.set_len(want) {
                read_err = Some(Error::invalid("staging slot smaller than a read"));
                break;
            }
            given[next] = (buf.as_ptr() as usize, buf.len(), op.obj.start);
            if let Err(e) = reader.submit(ReadRequest {
                id: next as u64,
                offset: op.obj.start,
                buf,
            }) {
                read_err = Some(e);
                break;
            }
            outstanding += 1;
            next += 1;
        }
        if reader.in_flight() != outstanding {
            read_err.get_or_insert(Error::new(
                ErrorKind::Io,
                format!(
                    "reader reports {} reads in flight, but {outstanding} were submitted and \
                     not returned (reader bug)",
                    reader.in_flight()
                ),
            ));
            break;
        }
        if outstanding == 0 {
            if read_err.is_some() || next >= total {
                break;
            }
            // Every slot is with the sink: wait for one to come back. If the sink has already
            // handled everything it was sent and gave nothing back, it never will (it returns
            // slots only from `accept`/`finish`): the slots are lost, and waiting would hang.
            if handled.load(Ordering::SeqCst) == sent {
                if let Ok(b) = freed_rx.try_recv() {
                    free.push(b);
                    continue;
                }
                read_err.get_or_insert(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the sink kept every staging slot ({count_slots} of {staging_bytes} \
                         bytes) without giving one back: staging slots lost (sink bug)"
                    ),
                ));
                break;
            }
            match freed_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(b) => free.push(b),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            continue;
        }
        let waited = if opts.cancel.is_some() {
            // A cancellable load waits in ticks, so that a read stuck in the backend does not
            // keep the cancel (or the deadline, which sets the flag) from being seen.
            match reader.wait_timeout(CANCEL_TICK) {
                Ok(Some(d)) => Ok(d),
                Ok(None) => {
                    if is_cancelled(&opts.cancel) {
                        read_err.get_or_insert(cancelled(next, total));
                        break;
                    }
                    continue;
                }
                Err(e) => Err(e),
            }
        } else {
            reader.wait()
        };
        let done = match waited {
            Ok(d) => {
                outstanding -= 1;
                d
            }
            Err(e) => {
                // The reader itself broke: stop, but still drain, join the sink and name the
                // object like any other failure (an early return would leave the sink thread
                // running on its own with a partial load).
                read_err.get_or_insert(e);
                break;
            }
        };
        // Trust nothing a reader says about ids: an id never submitted, or one returned twice,
        // would index out of the plan or let a read that never landed count as done.
        let idx = match usize::try_from(done.id) {
            Ok(i) if i < next && !landed[i] => i,
            _ => {
                let why = match usize::try_from(done.id) {
                    Ok(i) if i < next => format!(
                        "reader returned read #{i} twice (range {:?})",
                        plan.reads[i].obj
                    ),
                    _ => format!(
                        "reader returned a completion with id {} that was never submitted",
                        done.id
                    ),
                };
                read_err.get_or_insert(Error::new(ErrorKind::Io, why));
                continue;
            }
        };
        landed[idx] = true;
        let op = &plan.reads[idx];
        if (done.buf.as_ptr() as usize, done.buf.len(), done.offset) != given[idx] {
            read_err.get_or_insert(
                Error::new(
                    ErrorKind::Io,
                    format!(
                        "reader returned read #{idx} with a different buffer or offset than it \
                         was given (reader bug)"
                    ),
                )
                .with_range(op.obj.clone()),
            );
            continue;
        }
        match done.result {
            Ok(n) if n as u64 > op.len() => {
                // A reader or backend that claims more than it was asked for is broken.
                read_err.get_or_insert(crate::backend::over_claim(
                    n,
                    op.len() as usize,
                    op.obj.start,
                ));
            }
            Ok(n) => {
                let want = op.len();
                let needed_end = op.segments.last().map_or(op.obj.start, |s| s.obj.end);
                let reached = op.obj.start + n as u64;
                let short_ok = reached == meta.size && reached >= needed_end;
                if (n as u64) != want && !short_ok {
                    if read_err.is_none() {
                        read_err = Some(
                            Error::new(
                                ErrorKind::Corrupt,
                                format!(
                                    "object ended early: read {n} of {want} bytes (object size {} at stat); truncated or changed while loading",
                                    meta.size
                                ),
                            )
                            .with_range(op.obj.clone()),
                        );
                    }
                    continue;
                }
                stats.reads += 1;
                stats.bytes_read += n as u64;
                if read_err.is_none() {
                    // The whole read counts (a read that ends past the object's end, for
                    // O_DIRECT alignment, brings fewer bytes), so that progress reaches the
                    // plan's `read_bytes`; reads thrown away after a failure do not count.
                    if let Some(p) = &opts.progress {
                        p.fetch_add(want, Ordering::Relaxed);
                    }
                    // The sink sees exactly the bytes this read brought (`buf.len()`): the rest
                    // of a reused staging slot holds an earlier read's.
                    let mut buf = done.buf;
                    buf.set_len(n);
                    if to_sink.send(ToSink::Filled(idx, buf)).is_err() {
                        break;
                    }
                    sent += 1;
                }
            }
            Err(e) => {
                // Once the sink has failed, the reader was (or is about to be) told to abandon
                // the load, and the reads it fails for that are a consequence: the sink's error
                // is what the load reports.
                if read_err.is_none() && !sink_failed.load(Ordering::SeqCst) {
                    read_err = Some(e.with_range(op.obj.clone()));
                }
            }
        }
        while let Ok(b) = freed_rx.try_recv() {
            free.push(b);
        }
        if read_err.is_none() && is_cancelled(&opts.cancel) {
            read_err = Some(cancelled(next, total));
        }
    }
    // Drain anything still in flight so every buffer is given back before we return.
    if !abandoned && (read_err.is_some() || sink_failed.load(Ordering::SeqCst)) {
        reader.abandon();
    }
    let drain_until = Instant::now() + STUCK_READ_GRACE;
    let mut reader = Some(reader);
    while let Some(r) = reader.as_mut() {
        if outstanding == 0 || r.in_flight() == 0 {
            break;
        }
        if is_cancelled(&opts.cancel) {
            match r.wait_timeout(CANCEL_TICK) {
                Ok(Some(_)) => outstanding -= 1,
                Ok(None) if Instant::now() < drain_until => {}
                Ok(None) => {
                    // Cancelled, and reads are still stuck in the backend after the grace
                    // period: they are left to end on a thread of their own, which then drops
                    // them (their buffers stay alive until then: a read never writes into freed
                    // memory), and the cancel is reported now.
                    if let Some(r) = reader.take() {
                        leave_stuck_reads(r, outstanding, &loc);
                    }
                    read_err.get_or_insert(cancelled(next, total));
                }
                Err(_) => break,
            }
            continue;
        }
        if r.wait().is_err() {
            break;
        }
        outstanding -= 1;
    }
    drop(reader);
    if read_err.is_none() && next == total && landed.iter().all(|&l| l) {
        // Every byte has landed: one last look at the object, so that a change during the load
        // (a file rewritten in place, an object overwritten) that no read happened to notice
        // cannot leave bytes of two versions in the destination.
        read_err = unchanged_since(backend.as_ref(), meta).err();
        if read_err.is_none() {
            // A send failure means the sink thread already ended; its result says why.
            let _ = to_sink.send(ToSink::Finish);
        }
    }
    drop(to_sink);
    let joined = sink_thread.join();
    if let Some(mut e) = read_err {
        // Once cancelled, a read that then failed with an I/O error or a timeout most likely
        // failed because its reader stopped retrying: report the cancel, which is what happened.
        // (Only read failures the backend marked retryable: the engine's own errors, a reader
        // bug say, keep their text.)
        if is_cancelled(&opts.cancel)
            && e.is_retryable()
            && matches!(e.kind(), ErrorKind::Io | ErrorKind::Timeout)
        {
            e = Error::new(
                ErrorKind::Cancelled,
                format!(
                    "load cancelled after {next} of {total} reads were issued (a read in flight \
                     ended with: {})",
                    e.message()
                ),
            );
        }
        return Err(or_changed(backend.as_ref(), meta, e).with_location(&loc));
    }
    let (sink, sink_res) = joined.map_err(|p| {
        Error::new(
            ErrorKind::Io,
            format!("sink thread panicked: {}", panic_message(&p)),
        )
        .with_location(&loc)
    })?;
    sink_res.map_err(|e| or_changed(backend.as_ref(), meta, e).with_location(&loc))?;
    if next < total || landed.iter().any(|&l| !l) {
        return Err(
            Error::new(ErrorKind::Io, "load stopped before all reads completed")
                .with_location(&loc),
        );
    }
    stats.elapsed = start.elapsed();
    Ok((sink, stats))
}

/// How long a cancellable load waits for a read at a time before it looks at the cancel flag.
const CANCEL_TICK: Duration = Duration::from_millis(50);

/// How long a cancelled load waits for the reads in flight to come back before it leaves the
/// ones still stuck in the backend to a thread of their own.
const STUCK_READ_GRACE: Duration = Duration::from_secs(2);

/// Hands `reader`, with `outstanding` reads stuck in it, to a thread that waits for them and
/// then drops it, so that a cancelled load returns now. Without a thread, the reader (and the
/// buffers it holds) is leaked rather than dropped under reads that may still write into them.
fn leave_stuck_reads(reader: Box<dyn crate::RangeReader>, mut outstanding: usize, loc: &str) {
    log::warn!(
        "{loc}: {outstanding} read(s) still stuck in the backend {} s after the cancel are left \
         to finish on their own",
        STUCK_READ_GRACE.as_secs()
    );
    // (Not dropped with the closure if the thread cannot start: dropping a reader waits for
    // its reads, which is what must not happen here.)
    let mut reader = std::mem::ManuallyDrop::new(reader);
    let spawned = std::thread::Builder::new()
        .name("ts-stuck-reads".into())
        .spawn(move || {
            while outstanding > 0 && reader.in_flight() > 0 {
                if reader.wait().is_err() {
                    break;
                }
                outstanding -= 1;
            }
            drop(std::mem::ManuallyDrop::into_inner(reader));
        });
    if let Err(e) = spawned {
        log::warn!("{loc}: no thread for the stuck reads ({e}): their buffers are leaked");
    }
}

/// True when `flag` is set.
pub fn is_cancelled(flag: &Option<Arc<AtomicBool>>) -> bool {
    flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
}

fn cancelled(issued: usize, total: usize) -> Error {
    Error::new(
        ErrorKind::Cancelled,
        format!("load cancelled after {issued} of {total} reads were issued"),
    )
}

/// Most reads one load keeps in flight (larger `EngineOptions::queue_depth` values are capped).
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// Fails with `ObjectChanged` when the object behind `backend` is no longer the version `meta`
/// describes (size, and version tag where the backend has one).
pub fn unchanged_since(backend: &dyn Backend, meta: &ObjectMeta) -> Result<()> {
    let now = backend
        .stat()
        .map_err(|e| e.context("checking that the object did not change during the load"))?;
    let same_version = meta.version.is_none() || now.version == meta.version;
    if now.size == meta.size && same_version {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::ObjectChanged,
        format!(
            "the object changed during the load (size {} -> {}, version {} -> {}): loaded bytes may mix two versions",
            meta.size,
            now.size,
            meta.version.as_deref().unwrap_or("-"),
            now.version.as_deref().unwrap_or("-")
        ),
    ))
}

/// `e`, unless it is a failure that a change of the object explains (bytes that fail their
/// checksum, a per-tensor header that disagrees with the index, an object that ends early)
/// and the object did change since `meta`: then the change (`ObjectChanged`, naming `e` too),
/// so that a file rewritten during a load or conversion is not reported as a corrupt one. (One
/// more `stat`, on such a failure only.)
pub(crate) fn or_changed(backend: &dyn Backend, meta: &ObjectMeta, e: Error) -> Error {
    if !matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::IntegrityMismatch) {
        return e;
    }
    match unchanged_since(backend, meta) {
        Err(changed) if changed.kind() == ErrorKind::ObjectChanged => {
            let changed = changed.context(e.message());
            match e.range() {
                Some(r) => changed.with_range(r),
                None => changed,
            }
        }
        _ => e,
    }
}

/// The message of a panic payload, for errors that report a panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = p.downcast_ref::<&str>() {
        s
    } else if let Some(s) = p.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}
