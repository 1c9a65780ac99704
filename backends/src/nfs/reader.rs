//! Many reads in flight: [`NfsReader`] (the engine's [`RangeReader`]) and the synchronous
//! `read_at`, both on top of [`Runner`], which spreads jobs over the connection pool and re-sends
//! jobs whose connection broke.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tensorstream_engine::{Error, ErrorKind, RangeReader, ReadDone, ReadRequest, Result};

use super::conn::{Conn, Dest, Done, Job};
use super::{gave_up, retry_delay, Failure, Inner};

/// How often a runner with a cancel flag looks at it while it waits.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Dispatches jobs to connections and collects them, retrying retryable failures.
pub(crate) struct Runner {
    inner: Arc<Inner>,
    tx: Sender<Done>,
    rx: Receiver<Done>,
    /// Jobs submitted and not yet returned by `next` (dispatched or waiting for a retry).
    in_flight: usize,
    /// Failed jobs waiting for their retry: when each is due.
    delayed: Vec<(Instant, Job)>,
    /// Set by `abandon`: no more retries; delayed jobs come back failed at once.
    abandoned: bool,
    /// The load's cancel flag: once set, like `abandoned`, and the connections holding this
    /// runner's READs are closed (see `cut`).
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The connections holding this runner's jobs, with how many each holds (entries leave
    /// when their count drops to 0).
    used: Vec<(Weak<Conn>, usize)>,
    /// Set once the cancel flag was seen: jobs are no longer sent, and the ones in flight come
    /// back as cancelled.
    cancelled: bool,
}

impl Runner {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Runner {
            inner,
            tx,
            rx,
            in_flight: 0,
            delayed: Vec::new(),
            abandoned: false,
            cancel: None,
            used: Vec::new(),
            cancelled: false,
        }
    }

    fn job(&self, id: u64, offset: u64, want: usize, dest: Dest) -> Job {
        Job::new(
            id,
            offset,
            want,
            dest,
            self.inner.fh.clone(),
            self.inner.pin,
            self.inner.rsize,
            self.tx.clone(),
        )
    }

    fn submit(&mut self, job: Job) {
        self.in_flight += 1;
        self.dispatch(job);
    }

    fn dispatch(&mut self, mut job: Job) {
        // Counted in `used` only once a connection took it (a retried job starts afresh).
        job.sent_on = None;
        if self.cancelled {
            let _ = self.tx.send(Done {
                job,
                result: Err(cancelled_failure()),
            });
            return;
        }
        let failed = match self.inner.pool.get() {
            Ok(conn) => {
                let w = Arc::downgrade(&conn);
                job.sent_on = Some(w.clone());
                match conn.submit(job) {
                    None => {
                        match self.used.iter_mut().find(|(u, _)| u.ptr_eq(&w)) {
                            Some((_, n)) => *n += 1,
                            None => self.used.push((w, 1)),
                        }
                        return;
                    }
                    Some(mut job) => {
                        job.sent_on = None;
                        (
                            job,
                            Failure::new(ErrorKind::Io, "connection closed".into(), true),
                        )
                    }
                }
            }
            Err(f) => (job, f),
        };
        // Our own receiver is alive (we hold it), so this cannot fail.
        let _ = self.tx.send(Done {
            job: failed.0,
            result: Err(failed.1),
        });
    }

    /// Cancel with jobs in flight: closes the connections holding them, so that READs a hung
    /// server never answers come back now (failed by the connection's reader thread, which
    /// hands each job's buffer back once it no longer writes to it) instead of when the
    /// request timeout notices the stall. Connections this runner no longer uses are left
    /// alone; other users of a closed one see a closed connection, which they retry on a new
    /// one.
    fn cut(&mut self) {
        for conn in self.used.drain(..).filter_map(|(w, _)| w.upgrade()) {
            conn.close();
        }
    }

    /// The next finished job (after retries). `None` when nothing is in flight.
    ///
    /// A retry waits in `delayed` (it does not block the loop), so the jobs that failed together
    /// back off together instead of one after another.
    fn next(&mut self) -> Option<(Job, std::result::Result<usize, Failure>)> {
        if self.in_flight == 0 {
            return None;
        }
        loop {
            if !self.cancelled && tensorstream_engine::pipeline::is_cancelled(&self.cancel) {
                self.cancelled = true;
                self.abandoned = true;
                self.cut();
            }
            if self.abandoned {
                if let Some((_, job)) = self.delayed.pop() {
                    self.in_flight -= 1;
                    let f = Failure::new(
                        ErrorKind::Cancelled,
                        "the load stopped; retry abandoned".into(),
                        false,
                    );
                    return Some((job, Err(f)));
                }
            }
            let now = Instant::now();
            let mut i = 0;
            while i < self.delayed.len() {
                if self.delayed[i].0 <= now {
                    let (_, job) = self.delayed.swap_remove(i);
                    self.dispatch(job);
                } else {
                    i += 1;
                }
            }
            // Every dispatched job comes back exactly once (conn.rs), and we hold a sender. With
            // a cancel flag, wake up now and then to look at it.
            let next_due = self
                .delayed
                .iter()
                .map(|(due, _)| due.saturating_duration_since(now));
            let poll = self.cancel.is_some().then_some(CANCEL_POLL);
            let wake = next_due.chain(poll).min();
            let done = match wake {
                None => self.rx.recv().ok()?,
                Some(d) => match self.rx.recv_timeout(d) {
                    Ok(d) => d,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return None,
                },
            };
            let Done { mut job, result } = done;
            if let Some(w) = job.sent_on.take() {
                if let Some(i) = self.used.iter().position(|(u, _)| u.ptr_eq(&w)) {
                    self.used[i].1 -= 1;
                    if self.used[i].1 == 0 {
                        self.used.swap_remove(i);
                    }
                }
            }
            match result {
                Err(f) if f.retryable && !self.abandoned => {
                    let cfg = &self.inner.cfg;
                    let since = *job.first_failure.get_or_insert_with(Instant::now);
                    let delay = if f.spent(job.attempt) {
                        None
                    } else {
                        retry_delay(job.attempt, since, cfg.retries, cfg.retry_for)
                    };
                    match delay {
                        Some(delay) => {
                            self.inner.note_retry(&f);
                            job.attempt += 1;
                            self.delayed.push((Instant::now() + delay, job));
                        }
                        None => {
                            self.in_flight -= 1;
                            let msg = gave_up(job.attempt + 1, job.started);
                            return Some((job, Err(f.context(&msg))));
                        }
                    }
                }
                Err(_) if self.cancelled => {
                    self.in_flight -= 1;
                    return Some((job, Err(cancelled_failure())));
                }
                other => {
                    self.in_flight -= 1;
                    return Some((job, other));
                }
            }
        }
    }
}

/// What a job cut short by the load's cancel flag fails with.
fn cancelled_failure() -> Failure {
    Failure::new(
        ErrorKind::Cancelled,
        "the load was cancelled; its READ in flight was dropped".into(),
        false,
    )
}

/// The NFS backend's [`RangeReader`]: every submitted read becomes one job, split into READs of
/// the negotiated size and pipelined on one connection; jobs are spread round-robin over the
/// connections. The data lands directly in the request's buffer.
pub struct NfsReader {
    runner: Runner,
    ready: VecDeque<ReadDone>,
}

impl NfsReader {
    pub(crate) fn new(
        inner: Arc<Inner>,
        cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Self {
        let mut runner = Runner::new(inner);
        runner.cancel = cancel;
        NfsReader {
            runner,
            ready: VecDeque::new(),
        }
    }
}

fn past_end(inner: &Inner, offset: u64) -> Error {
    Error::new(
        ErrorKind::RangeNotSatisfiable,
        format!(
            "nfs: offset {offset} is past the end ({} bytes)",
            inner.pin.size
        ),
    )
    .with_backend("nfs")
    .with_location(&inner.uri)
}

impl RangeReader for NfsReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        let inner = &self.runner.inner;
        let size = inner.pin.size;
        if req.offset > size {
            let e = past_end(inner, req.offset);
            self.ready.push_back(ReadDone {
                id: req.id,
                offset: req.offset,
                buf: req.buf,
                result: Err(e),
            });
            return Ok(());
        }
        let want = (req.buf.len() as u64).min(size - req.offset) as usize;
        if want == 0 {
            self.ready.push_back(ReadDone {
                id: req.id,
                offset: req.offset,
                buf: req.buf,
                result: Ok(0),
            });
            return Ok(());
        }
        let job = self.runner.job(req.id, req.offset, want, Dest::Io(req.buf));
        self.runner.submit(job);
        Ok(())
    }

    fn wait(&mut self) -> Result<ReadDone> {
        if let Some(d) = self.ready.pop_front() {
            return Ok(d);
        }
        let uri = self.runner.inner.uri.clone();
        let Some((job, result)) = self.runner.next() else {
            return Err(Error::invalid("wait() with no read in flight"));
        };
        let (id, offset, want) = (job.id, job.offset, job.want);
        let Dest::Io(buf) = job.into_dest() else {
            return Err(Error::new(
                ErrorKind::Io,
                "nfs: internal error: reader job without its buffer",
            ));
        };
        Ok(ReadDone {
            id,
            offset,
            buf,
            result: result.map_err(|f| f.into_error(&uri).with_range(offset..offset + want as u64)),
        })
    }

    fn in_flight(&self) -> usize {
        self.runner.in_flight + self.ready.len()
    }

    fn abandon(&mut self) {
        // The load is failing: its READs still on the wire are not waited out (a stalled
        // server would hold them until the timeout). Closing the connections this session used
        // fails them at once; a later read reconnects.
        self.runner.abandoned = true;
        self.runner.cut();
    }
}

/// Synchronous read: pieces of the preferred chunk size, a few in flight, copied into `buf`.
pub(crate) fn read_at(inner: &Arc<Inner>, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let size = inner.pin.size;
    if offset > size {
        return Err(past_end(inner, offset));
    }
    let want = (buf.len() as u64).min(size - offset) as usize;
    if want == 0 {
        return Ok(0);
    }
    let piece = inner.cfg.chunk.max(1);
    let depth = (inner.pool.len() * 2).clamp(1, inner.cfg.concurrency);
    let mut runner = Runner::new(inner.clone());
    // The backend's cancel flag ([`crate::OpenOptions::cancel`]): a metadata read stops too.
    runner.cancel = inner.cancel.clone();
    let mut next = 0usize;
    let mut first_err: Option<Error> = None;
    loop {
        while first_err.is_none() && next < want && runner.in_flight < depth {
            let len = piece.min(want - next);
            let job = runner.job(
                next as u64,
                offset + next as u64,
                len,
                Dest::Vec(vec![0; len]),
            );
            runner.submit(job);
            next += len;
        }
        let Some((job, result)) = runner.next() else {
            break;
        };
        let (at, len) = (job.id as usize, job.want);
        match result {
            Ok(n) => match (job.into_dest(), buf.get_mut(at..at + n)) {
                (Dest::Vec(v), Some(dst)) if n <= v.len() => dst.copy_from_slice(&v[..n]),
                _ => {
                    first_err.get_or_insert(
                        Error::new(
                            ErrorKind::Io,
                            format!("internal error: a piece of {n} bytes at {at} does not fit"),
                        )
                        .with_location(&inner.uri),
                    );
                    runner.abandoned = true;
                }
            },
            Err(f) => {
                let range = offset + at as u64..offset + (at + len) as u64;
                first_err.get_or_insert(f.into_error(&inner.uri).with_range(range));
                // The call fails anyway: the other pieces need not be retried.
                runner.abandoned = true;
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(want),
    }
}
