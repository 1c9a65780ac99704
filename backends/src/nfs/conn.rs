//! TCP connections to the NFS server: many RPCs in flight per connection, replies matched to
//! calls by xid on a reader thread, READ data read from the socket straight into the caller's
//! buffer, and a small pool of connections (like the kernel's `nconnect`).
//!
//! Ownership of a read job: the submitter registers the job (and one xid per sub-read) in the
//! connection's state, then writes the calls. From then on only the connection's reader thread
//! touches the job's buffer; it hands the job back over the job's channel exactly once — when
//! its last sub-read is answered, or when the connection dies (then with a retryable failure).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tensorstream_engine::{ErrorKind, IoBuf};

use super::proto::{self, Version};
use super::rpc::{self, AuthSys, LAST_FRAGMENT, PROC_COMPOUND};
use super::xdr::{Enc, Source, XdrError};
use super::Failure;

/// Largest reply to a non-READ call (resolve, stat) that we buffer.
pub(crate) const MAX_CALL_REPLY: usize = 1 << 20;
/// Socket read buffer of the reply reader.
const READ_BUFFER: usize = 256 << 10;
/// Largest RPC record accepted (the largest READ reply plus room for its header): a server
/// that never sets the last-fragment bit cannot keep a connection reading forever.
const MAX_RECORD: u64 = (64 << 20) + (64 << 10);
/// Bytes that count as progress on a connection with calls waiting, besides a whole reply: a
/// server trickling a few bytes at a time, each gap shorter than the timeout, still stalls.
const PROGRESS_BYTES: usize = crate::PROGRESS_BYTES;
/// Slowest transfer that counts as progress, as for the HTTP and S3 backends.
const SLOWEST_RATE: u64 = crate::SLOWEST_RATE;
/// Replies to calls never made (or given up on) in a row before the connection is dropped.
const MAX_UNKNOWN_REPLIES: u32 = 64;
/// Short READ answers for one sub-read before it fails (RFC 7530 allows short reads; a server
/// answering a byte at a time would take a million round trips for 1 MiB). The answers to the
/// READs continuing a short answer are no progress of their own on the stall clock (their
/// bytes count as any bytes do), so a server answering in small pieces slowly, each inside the
/// timeout, stalls as a trickle does instead of holding a READ for up to this many timeouts.
const MAX_SHORT_READS: u32 = 1024;

/// Locks a mutex, ignoring poisoning (the protected state stays consistent: every critical
/// section is a few map operations that cannot panic halfway).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a job's bytes go.
#[derive(Debug)]
pub(crate) enum Dest {
    /// An engine buffer (open_reader).
    Io(IoBuf),
    /// A temporary vector (read_at).
    Vec(Vec<u8>),
}

impl Dest {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Dest::Io(b) => b.as_mut_slice(),
            Dest::Vec(v) => v.as_mut_slice(),
        }
    }
}

/// One contiguous read: split into sub-reads of at most `rsize` bytes on one connection.
#[derive(Debug)]
pub(crate) struct Job {
    /// Caller's token.
    pub id: u64,
    /// Object offset of `dest[0]`.
    pub offset: u64,
    /// Bytes to read into `dest[..want]` (`want <= dest.len()`, checked by the submitter).
    pub want: usize,
    /// The destination.
    pub dest: Dest,
    /// Attempts made so far (retries after failed connections).
    pub attempt: u32,
    /// When the first attempt failed (the retry budget counts from there).
    pub first_failure: Option<Instant>,
    /// When the job was made (a failure's message says how long it was tried).
    pub started: Instant,
    /// File handle.
    pub fh: Arc<[u8]>,
    /// The version every sub-read must observe.
    pub pin: Version,
    /// Largest READ.
    pub rsize: usize,
    /// Where the finished job goes.
    pub reply: Sender<Done>,
    /// The connection it was last sent on (set by the dispatcher).
    pub sent_on: Option<std::sync::Weak<Conn>>,
    outstanding: usize,
    err: Option<Failure>,
}

impl Job {
    /// A job reading `want` bytes at `offset` into `dest`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        offset: u64,
        want: usize,
        dest: Dest,
        fh: Arc<[u8]>,
        pin: Version,
        rsize: usize,
        reply: Sender<Done>,
    ) -> Job {
        Job {
            id,
            offset,
            want,
            dest,
            attempt: 0,
            first_failure: None,
            started: Instant::now(),
            fh,
            pin,
            rsize,
            reply,
            sent_on: None,
            outstanding: 0,
            err: None,
        }
    }
    /// Gives the destination back.
    pub(crate) fn into_dest(self) -> Dest {
        self.dest
    }
    fn finish(mut self, result: Result<usize, Failure>) {
        let reply = self.reply.clone();
        self.outstanding = 0;
        // The receiver may be gone (reader dropped): then the buffer is simply freed.
        let _ = reply.send(Done { job: self, result });
    }
}

/// A finished job.
#[derive(Debug)]
pub(crate) struct Done {
    /// The job (with its buffer).
    pub job: Job,
    /// Bytes read (`job.want`) or the failure.
    pub result: Result<usize, Failure>,
}

enum Pending {
    Call(Sender<Result<Vec<u8>, Failure>>),
    Read {
        key: u64,
        off: usize,
        len: usize,
        /// Short answers so far for this sub-read.
        short: u32,
    },
}

struct State {
    dead: Option<Failure>,
    calls: HashMap<u32, Pending>,
    jobs: HashMap<u64, Job>,
    next_key: u64,
    busy_since: Instant,
    /// When the last reply to a call of ours began (not one to a READ continuing a short
    /// answer: see [`MAX_SHORT_READS`]).
    progress: Instant,
    /// When the last reply to a READ continuing a short answer began.
    continued: Instant,
    /// Replies in a row to calls not (or no longer) waiting.
    unknown_in_row: u32,
}

impl State {
    /// Registers a call sent (or about to be) with `xid`; the stall clock starts with the first
    /// call of an idle connection.
    fn expect(&mut self, xid: u32, p: Pending) {
        if self.calls.is_empty() {
            self.busy_since = Instant::now();
        }
        self.calls.insert(xid, p);
    }
}

struct Shared {
    peer: String,
    timeout: Duration,
    auth: AuthSys,
    writer: Mutex<TcpStream>,
    shut: TcpStream,
    state: Mutex<State>,
    next_xid: AtomicU32,
    /// A reply's record has started and is not yet read to its end (its call is no longer in
    /// `state.calls`, but a silent server must still time out).
    mid_reply: AtomicBool,
}

impl Shared {
    fn xid(&self) -> u32 {
        self.next_xid.fetch_add(1, Ordering::Relaxed)
    }
    fn shutdown(&self) {
        let _ = self.shut.shutdown(Shutdown::Both);
    }
    /// Appends the call reading `job.dest[off..off + len]` to `msg`; returns its xid.
    fn encode_read(&self, msg: &mut Vec<u8>, job: &Job, off: usize, len: usize) -> u32 {
        let xid = self.xid();
        let at = job.offset + off as u64;
        rpc::encode_call(msg, xid, &self.auth, PROC_COMPOUND, |e| {
            proto::encode_read(e, &job.fh, at, len as u32)
        });
        xid
    }
    /// When the wait for the bytes now expected began: the latest of `last_recv` (the last
    /// progress of the stream), the moment calls began waiting and the last whole reply.
    /// `None` while nothing is expected.
    fn waiting_since(&self, last_recv: Instant) -> Option<Instant> {
        let st = lock(&self.state);
        if st.calls.is_empty() && !self.mid_reply.load(Ordering::Relaxed) {
            return None;
        }
        Some(last_recv.max(st.busy_since).max(st.progress))
    }
    /// Whether answers to READs continuing short answers began after `since`: a stall since
    /// then is their slowness, not silence.
    fn continued_since(&self, since: Instant) -> bool {
        lock(&self.state).continued > since
    }
    fn send(&self, msg: &[u8]) {
        let mut w = lock(&self.writer);
        if w.write_all(msg).is_err() {
            drop(w);
            // The reader thread notices and fails every registered call and job.
            self.shutdown();
        }
    }
    /// Marks the connection dead and hands every call and job back with `f`.
    fn fail_all(&self, f: Failure, taken: Option<Job>) {
        let (calls, jobs) = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(f.clone());
            }
            (std::mem::take(&mut st.calls), std::mem::take(&mut st.jobs))
        };
        self.shutdown();
        for (_, p) in calls {
            if let Pending::Call(tx) = p {
                let _ = tx.send(Err(f.clone()));
            }
        }
        for job in jobs.into_values().chain(taken) {
            job.finish(Err(f.clone()));
        }
    }
}

/// A socket whose reads wait through read-timeout ticks until the connection stalls.
struct TimedStream {
    s: TcpStream,
    shared: Arc<Shared>,
    /// When the raw bytes last added up to [`PROGRESS_BYTES`].
    last_recv: Instant,
    /// Raw bytes since then.
    bytes: usize,
}

impl TimedStream {
    /// What a connection that brought bytes, but no progress, for a timeout since `since` (the
    /// wait began) fails with.
    fn too_slow(&self, since: Instant) -> String {
        let what = if self.shared.continued_since(since) {
            "answered READs only in short pieces, too slowly: it sent"
        } else {
            "sent"
        };
        format!(
            "{} {what} only {} bytes in {:?} (progress needs {PROGRESS_BYTES} bytes, at {} \
             KiB/s or faster)",
            self.shared.peer,
            self.bytes,
            self.shared.timeout,
            SLOWEST_RATE >> 10
        )
    }
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind as K;
        loop {
            match self.s.read(buf) {
                Ok(n) => {
                    self.bytes = self.bytes.saturating_add(n);
                    // Progress: PROGRESS_BYTES, and at least SLOWEST_RATE since the wait began
                    // (else a server sending 64 KiB just inside every timeout would hold a
                    // 64 MiB reply for hours).
                    // Fast path, no lock: PROGRESS_BYTES within the time they take at
                    // SLOWEST_RATE since the last progress (the wait began no earlier) is
                    // progress.
                    let quick = self.last_recv.elapsed().as_secs_f64()
                        <= PROGRESS_BYTES as f64 / SLOWEST_RATE as f64;
                    if self.bytes >= PROGRESS_BYTES && quick {
                        self.last_recv = Instant::now();
                        self.bytes = 0;
                        return Ok(n);
                    }
                    let since = self.shared.waiting_since(self.last_recv);
                    let at_rate =
                        since.map_or(0.0, |s| s.elapsed().as_secs_f64() * SLOWEST_RATE as f64);
                    if self.bytes >= PROGRESS_BYTES && self.bytes as f64 >= at_rate {
                        self.last_recv = Instant::now();
                        self.bytes = 0;
                    } else if let Some(since) =
                        since.filter(|s| n > 0 && s.elapsed() > self.shared.timeout)
                    {
                        // Bytes keep coming, too few to be progress (a trickle).
                        return Err(std::io::Error::new(K::TimedOut, self.too_slow(since)));
                    }
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), K::WouldBlock | K::TimedOut) => {
                    let since = self.shared.waiting_since(self.last_recv);
                    if let Some(since) = since.filter(|s| s.elapsed() > self.shared.timeout) {
                        let msg = if self.shared.continued_since(since) {
                            self.too_slow(since)
                        } else {
                            format!(
                                "no reply from {} within {:?}",
                                self.shared.peer, self.shared.timeout
                            )
                        };
                        return Err(std::io::Error::new(K::TimedOut, msg));
                    }
                }
                Err(e) if e.kind() == K::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The record-marked reply stream (RFC 5531 §11): a record is fragments, each with a 4-byte
/// header (last-fragment bit + 31-bit length). Decoding spans fragments transparently.
pub(crate) struct Wire<R: BufRead> {
    inner: R,
    frag_left: u32,
    last: bool,
    /// Bytes announced by the current record's fragments so far.
    record_len: u64,
}

impl<R: BufRead> Wire<R> {
    /// Reads records from `inner`.
    pub(crate) fn new(inner: R) -> Self {
        Wire {
            inner,
            frag_left: 0,
            last: true,
            record_len: 0,
        }
    }
    fn header(&mut self) -> Result<(), XdrError> {
        let mut raw = [0u8; 4];
        self.inner.read_exact(&mut raw)?;
        let h = u32::from_be_bytes(raw);
        self.last = h & LAST_FRAGMENT != 0;
        self.frag_left = h & !LAST_FRAGMENT;
        // An empty fragment counts its header's 4 bytes, so that empty fragments that never end
        // the record (each "0 bytes, more to come") reach the cap instead of being read for
        // ever; other fragments count their bytes only (the cap has no room for headers).
        let counted = if self.frag_left == 0 {
            4
        } else {
            u64::from(self.frag_left)
        };
        self.record_len = self.record_len.saturating_add(counted);
        if self.record_len > MAX_RECORD {
            // A record that starts with text, over the limit: another protocol's server on
            // this port ("HTTP", "SSH-"), which a length of a billion bytes does not say.
            if self.record_len == u64::from(self.frag_left)
                && raw.iter().all(|b| b.is_ascii_graphic())
            {
                return Err(XdrError::Bad(format!(
                    "the server answered with text ({:?}), not an NFS (ONC RPC) reply: is this \
                     the port of an NFS server?",
                    String::from_utf8_lossy(&raw)
                )));
            }
            return Err(XdrError::TooLong {
                what: "RPC record",
                len: self.record_len,
                max: MAX_RECORD,
            });
        }
        Ok(())
    }
    /// Starts the next record (the previous one must be finished).
    pub(crate) fn start_record(&mut self) -> Result<(), XdrError> {
        self.record_len = 0;
        self.header()
    }
    /// Makes bytes of the current record available; errors at the record's end.
    fn avail(&mut self, what: &'static str) -> Result<(), XdrError> {
        while self.frag_left == 0 {
            if self.last {
                return Err(XdrError::Truncated(what));
            }
            self.header()?;
        }
        Ok(())
    }
    /// Skips the rest of the current record.
    pub(crate) fn finish(&mut self) -> Result<(), XdrError> {
        loop {
            let n = self.frag_left as u64;
            self.skip_raw(n)?;
            self.frag_left = 0;
            if self.last {
                return Ok(());
            }
            self.header()?;
        }
    }
    /// Ends the current record, which must hold nothing more: a reply decoded whole with
    /// bytes after it is misframed or garbled.
    pub(crate) fn end_exact(&mut self) -> Result<(), XdrError> {
        loop {
            if self.frag_left != 0 {
                return Err(XdrError::Bad(format!(
                    "{} or more unexpected bytes after the reply",
                    self.frag_left
                )));
            }
            if self.last {
                return Ok(());
            }
            self.header()?;
        }
    }
    /// The rest of the current record, at most `max` bytes.
    pub(crate) fn rest(&mut self, max: usize) -> Result<Vec<u8>, XdrError> {
        let mut v = Vec::new();
        loop {
            let n = self.frag_left as usize;
            let total = v.len().saturating_add(n);
            if total > max {
                return Err(XdrError::TooLong {
                    what: "RPC reply",
                    len: total as u64,
                    max: max as u64,
                });
            }
            let start = v.len();
            v.resize(total, 0);
            self.take_raw(&mut v[start..])?;
            self.frag_left = 0;
            if self.last {
                return Ok(v);
            }
            self.header()?;
        }
    }
    fn take_raw(&mut self, dst: &mut [u8]) -> Result<(), XdrError> {
        self.inner.read_exact(dst).map_err(XdrError::Io)
    }
    fn skip_raw(&mut self, mut n: u64) -> Result<(), XdrError> {
        while n > 0 {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                return Err(XdrError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let k = (buf.len() as u64).min(n) as usize;
            self.inner.consume(k);
            n -= k as u64;
        }
        Ok(())
    }
}

impl<R: BufRead> Source for Wire<R> {
    fn take(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), XdrError> {
        let mut done = 0;
        while done < dst.len() {
            self.avail(what)?;
            let n = (dst.len() - done).min(self.frag_left as usize);
            self.take_raw(&mut dst[done..done + n])?;
            self.frag_left -= n as u32;
            done += n;
        }
        Ok(())
    }
    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), XdrError> {
        while n > 0 {
            self.avail(what)?;
            let k = n.min(self.frag_left as u64);
            self.skip_raw(k)?;
            self.frag_left -= k as u32;
            n -= k;
        }
        Ok(())
    }
}

/// One TCP connection with its reply-reader thread.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Conn {
    /// Connects to `addr`.
    pub(crate) fn connect(
        addr: SocketAddr,
        peer: &str,
        timeout: Duration,
        connect_timeout: Duration,
        auth: AuthSys,
    ) -> Result<Conn, Failure> {
        let fail = |e: std::io::Error| {
            let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                ErrorKind::Timeout
            } else {
                ErrorKind::Io
            };
            Failure::new(kind, format!("cannot connect to {peer}: {e}"), true)
        };
        let s = TcpStream::connect_timeout(&addr, connect_timeout).map_err(fail)?;
        s.set_nodelay(true).map_err(fail)?;
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        s.set_read_timeout(Some(tick)).map_err(fail)?;
        s.set_write_timeout(Some(timeout)).map_err(fail)?;
        let reader = s.try_clone().map_err(fail)?;
        let shut = s.try_clone().map_err(fail)?;
        let seed = std::process::id().rotate_left(16)
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0));
        let shared = Arc::new(Shared {
            peer: peer.to_string(),
            timeout,
            auth,
            writer: Mutex::new(s),
            shut,
            state: Mutex::new(State {
                dead: None,
                calls: HashMap::new(),
                jobs: HashMap::new(),
                next_key: 0,
                busy_since: Instant::now(),
                progress: Instant::now(),
                continued: Instant::now(),
                unknown_in_row: 0,
            }),
            next_xid: AtomicU32::new(seed),
            mid_reply: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ts-nfs-conn".into())
            .spawn(move || reader_thread(sh, reader))
            .map_err(fail)?;
        Ok(Conn {
            shared,
            thread: Some(thread),
        })
    }

    /// Closes the connection: its reader thread fails every call and job still waiting (with
    /// a retryable "connection closed"), and the pool replaces it.
    pub(crate) fn close(&self) {
        self.shared.shutdown();
    }

    /// True once the connection failed (it never recovers; the pool replaces it).
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.shared.state).dead.is_some()
    }

    /// Sends the job's READs. `Some(job)`: the connection is dead and the job untouched.
    pub(crate) fn submit(&self, mut job: Job) -> Option<Job> {
        if job.want == 0 {
            // Nothing to ask for: done at once (no reply would ever finish it).
            job.finish(Ok(0));
            return None;
        }
        let rsize = job.rsize.clamp(1, u32::MAX as usize);
        let subs = job.want.div_ceil(rsize);
        let mut msg = Vec::with_capacity(subs * 160);
        let mut xids = Vec::with_capacity(subs);
        for i in 0..subs {
            let off = i * rsize;
            let len = rsize.min(job.want - off);
            let xid = self.shared.encode_read(&mut msg, &job, off, len);
            xids.push((xid, off, len));
        }
        {
            let mut st = lock(&self.shared.state);
            if st.dead.is_some() {
                return Some(job);
            }
            let key = st.next_key;
            st.next_key += 1;
            for (xid, off, len) in xids {
                st.expect(
                    xid,
                    Pending::Read {
                        key,
                        off,
                        len,
                        short: 0,
                    },
                );
            }
            job.outstanding = subs;
            job.err = None;
            st.jobs.insert(key, job);
        }
        self.shared.send(&msg);
        None
    }

    /// One COMPOUND call whose reply is small: returns the reply after the xid. Besides the
    /// connection's stall timeout, `limits` may end the wait earlier (its time, its cancel flag);
    /// the connection is then shut down, as for a stall (its reply would come to nobody).
    pub(crate) fn call(
        &self,
        limits: CallLimits<'_>,
        args: impl FnOnce(&mut Enc),
    ) -> Result<Vec<u8>, Failure> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let xid = self.shared.xid();
        let mut msg = Vec::new();
        rpc::encode_call(&mut msg, xid, &self.shared.auth, PROC_COMPOUND, args);
        {
            let mut st = lock(&self.shared.state);
            if let Some(f) = &st.dead {
                return Err(f.clone());
            }
            st.expect(xid, Pending::Call(tx));
        }
        self.shared.send(&msg);
        // The reader thread answers, or fails the call when the connection stalls; the extra
        // margin only guards against a reader thread that cannot run at all.
        let margin = self
            .shared
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(1));
        let started = Instant::now();
        // (No end at all where the time cannot be represented: a timeout of centuries.)
        let cap = started.checked_add(margin);
        let end = match (limits.until, cap) {
            (Some(u), Some(c)) => Some(u.min(c)),
            (u, c) => u.or(c),
        };
        let give_up = |f: Failure| {
            lock(&self.shared.state).calls.remove(&xid);
            self.shared.shutdown();
            Err(f)
        };
        loop {
            if limits.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return give_up(Failure::new(
                    ErrorKind::Cancelled,
                    crate::CALL_CANCELLED.into(),
                    false,
                ));
            }
            let now = Instant::now();
            if let Some(end) = end.filter(|&e| now >= e) {
                let waited = if limits.until == Some(end) && cap != Some(end) {
                    now - started
                } else {
                    self.shared.timeout
                };
                return give_up(Failure::new(
                    ErrorKind::Timeout,
                    format!("no reply from {} within {waited:.1?}", self.shared.peer),
                    true,
                ));
            }
            let mut tick = end.map_or(Duration::from_secs(3600), |e| e - now);
            if limits.cancel.is_some() {
                tick = tick.min(CANCEL_TICK);
            }
            match rx.recv_timeout(tick) {
                Ok(r) => return r,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    // The reader thread dropped the call without answering: the connection died.
                    let dead = lock(&self.shared.state).dead.clone();
                    return Err(dead.unwrap_or_else(|| {
                        Failure::new(
                            ErrorKind::Io,
                            format!("connection to {} closed", self.shared.peer),
                            true,
                        )
                    }));
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reader_thread(shared: Arc<Shared>, s: TcpStream) {
    let ts = TimedStream {
        s,
        shared: shared.clone(),
        last_recv: Instant::now(),
        bytes: 0,
    };
    let mut wire = Wire::new(BufReader::with_capacity(READ_BUFFER, ts));
    let (f, taken) = loop {
        if let Err(fatal) = one_reply(&shared, &mut wire) {
            break *fatal;
        }
    };
    shared.fail_all(f, taken);
}

type Fatal = Box<(Failure, Option<Job>)>;

fn fatal(shared: &Shared, e: XdrError) -> Failure {
    Failure::from_xdr(e).context(&shared.peer)
}

fn one_reply<R: BufRead>(shared: &Shared, wire: &mut Wire<R>) -> Result<(), Fatal> {
    wire.start_record()
        .map_err(|e| Box::new((fatal(shared, e), None)))?;
    shared.mid_reply.store(true, Ordering::Relaxed);
    let r = reply_body(shared, wire);
    shared.mid_reply.store(false, Ordering::Relaxed);
    r
}

/// The rest of a reply whose record has started.
fn reply_body<R: BufRead>(shared: &Shared, wire: &mut Wire<R>) -> Result<(), Fatal> {
    let xid = wire
        .u32("xid")
        .map_err(|e| Box::new((fatal(shared, e), None)))?;
    let pending = {
        let mut st = lock(&shared.state);
        let p = st.calls.remove(&xid);
        if p.is_some() {
            st.unknown_in_row = 0;
            // The answer to a READ continuing a short answer is no progress of its own (see
            // MAX_SHORT_READS): only its bytes count, at the slowest rate or faster.
            if matches!(p, Some(Pending::Read { short: 1.., .. })) {
                st.continued = Instant::now();
            } else {
                st.progress = Instant::now();
            }
        } else {
            st.unknown_in_row += 1;
            if st.unknown_in_row > MAX_UNKNOWN_REPLIES {
                let f = Failure::new(
                    ErrorKind::Io,
                    format!(
                        "{} sent {MAX_UNKNOWN_REPLIES} replies in a row to calls that were not \
                         made or were given up on",
                        shared.peer
                    ),
                    true,
                );
                return Err(Box::new((f, None)));
            }
        }
        p
    };
    match pending {
        None => wire
            .finish()
            .map_err(|e| Box::new((fatal(shared, e), None))),
        Some(Pending::Call(tx)) => match wire.rest(MAX_CALL_REPLY) {
            Ok(body) => {
                let _ = tx.send(Ok(body));
                Ok(())
            }
            Err(e) => {
                // The caller hears the real cause (not a timeout), then the connection dies.
                let f = fatal(shared, e);
                let _ = tx.send(Err(f.clone()));
                Err(Box::new((f, None)))
            }
        },
        Some(Pending::Read {
            key,
            off,
            len,
            short,
        }) => {
            let job = lock(&shared.state).jobs.remove(&key);
            let Some(mut job) = job else {
                return wire
                    .finish()
                    .map_err(|e| Box::new((fatal(shared, e), None)));
            };
            let outcome = {
                let dst = match job.dest.as_mut_slice().get_mut(off..off + len) {
                    Some(d) => d,
                    None => {
                        let f = Failure::new(
                            ErrorKind::Io,
                            "internal error: sub-read outside its buffer".into(),
                            false,
                        );
                        return Err(Box::new((f, Some(job))));
                    }
                };
                match rpc::decode_reply_header(wire) {
                    Ok(Ok(())) => proto::decode_read(wire, dst),
                    Ok(Err(f)) => Ok(Err(f)),
                    Err(e) => Err(e),
                }
            };
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => return Err(Box::new((fatal(shared, e), Some(job)))),
            };
            // A READ that succeeded was decoded whole: nothing may follow it. (After a failed
            // operation the rest of the record is skipped.)
            let ended = match &outcome {
                Ok(_) => wire.end_exact(),
                Err(_) => wire.finish(),
            };
            if let Err(e) = ended {
                return Err(Box::new((fatal(shared, e), Some(job))));
            }
            match check_read(&job, off, len, outcome) {
                Ok(None) => {}
                Ok(Some(_)) if short >= MAX_SHORT_READS => {
                    job.err.get_or_insert(Failure::new(
                        ErrorKind::Io,
                        format!(
                            "{} answered {MAX_SHORT_READS} READs in a row with fewer bytes than \
                             asked",
                            shared.peer
                        ),
                        false,
                    ));
                }
                Ok(Some(n)) => {
                    // Fewer bytes than asked, not at EOF (RFC 7530 §16.23 allows it): ask for
                    // the rest in place of this sub-read; the job's count is unchanged.
                    let (off, len) = (off + n, len - n);
                    let mut msg = Vec::new();
                    let xid = shared.encode_read(&mut msg, &job, off, len);
                    let mut st = lock(&shared.state);
                    if st.dead.is_none() {
                        // Not `expect`: the wait goes on, its stall clock with it.
                        st.calls.insert(
                            xid,
                            Pending::Read {
                                key,
                                off,
                                len,
                                short: short + 1,
                            },
                        );
                        st.jobs.insert(key, job);
                        drop(st);
                        shared.send(&msg);
                        return Ok(());
                    }
                    drop(st);
                    return Err(Box::new((
                        Failure::new(ErrorKind::Io, "connection closed".into(), true),
                        Some(job),
                    )));
                }
                Err(f) => {
                    job.err.get_or_insert(f);
                }
            }
            job.outstanding = job.outstanding.saturating_sub(1);
            if job.outstanding == 0 {
                let result = match job.err.take() {
                    Some(f) => Err(f),
                    None => Ok(job.want),
                };
                job.finish(result);
            } else {
                lock(&shared.state).jobs.insert(key, job);
            }
            Ok(())
        }
    }
}

/// Checks one sub-read's outcome against what was asked and the pinned version: `Ok(None)`
/// when it is complete, `Ok(Some(n))` when the server sent only `n` (> 0) of the bytes, not at
/// the end of the file (the rest must be asked for).
fn check_read(
    job: &Job,
    off: usize,
    len: usize,
    outcome: Result<proto::ReadOutcome, Failure>,
) -> Result<Option<usize>, Failure> {
    let o = outcome?;
    let at = job.offset + off as u64;
    if let (Some(c), Some(s)) = (o.after.change, o.after.size) {
        if c != job.pin.change || s != job.pin.size {
            return Err(Failure::new(
                ErrorKind::ObjectChanged,
                format!(
                    "file changed on the server while it was being read (change attribute \
                     {:x} -> {c:x}, size {} -> {s})",
                    job.pin.change, job.pin.size
                ),
                false,
            ));
        }
    } else {
        return Err(Failure::new(
            ErrorKind::Io,
            "server did not return the change and size attributes after READ".into(),
            false,
        ));
    }
    if o.count != len {
        if o.eof {
            return Err(Failure::new(
                ErrorKind::ObjectChanged,
                format!(
                    "file ended at byte {} but was {} bytes when the load started",
                    at + o.count as u64,
                    job.pin.size
                ),
                false,
            ));
        }
        if o.count == 0 {
            // Nothing and no EOF: asking again could go on forever.
            return Err(Failure::new(
                ErrorKind::Io,
                format!("empty READ at {at} before the end of the file ({len} bytes asked)"),
                true,
            ));
        }
        return Ok(Some(o.count));
    }
    Ok(None)
}

/// How often a small call with a cancel flag looks at it while it waits for its reply.
const CANCEL_TICK: Duration = Duration::from_millis(25);

/// What may end a small call's wait before the connection's stall timeout does.
#[derive(Clone, Copy, Default)]
pub(crate) struct CallLimits<'a> {
    /// The reply must have come by then (a retry within what is left of its budget).
    pub until: Option<Instant>,
    /// Once set, the call stops and fails with `Cancelled` ([`crate::OpenOptions::cancel`]).
    pub cancel: Option<&'a AtomicBool>,
}

/// Longest wait for one TCP connect (also capped by the per-request timeout): a server that
/// does not answer at all (filtered, black-holed) must not hold a load for the kernel's minutes,
/// nor an open for longer than its retry budget ([`super::config::OPEN_RETRY_FOR`]).
pub(crate) const MAX_CONNECT: Duration = super::config::OPEN_RETRY_FOR;

/// After a connect that took this long to fail, further connects fail at once for
/// [`SLOW_FAILURE_GATE`]: jobs retried together must not each wait out their own connect.
const SLOW_FAILURE: Duration = Duration::from_secs(1);
const SLOW_FAILURE_GATE: Duration = Duration::from_secs(2);

/// A fixed number of connection slots, each reconnected when found dead.
pub(crate) struct Pool {
    addrs: Vec<SocketAddr>,
    peer: String,
    timeout: Duration,
    auth: AuthSys,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    /// The last connect failure that took [`SLOW_FAILURE`] or longer, and when it ended.
    slow_failure: Mutex<Option<(Instant, Failure)>>,
}

impl Pool {
    /// A pool of `n` (≥ 1) connections to `addrs` (tried in order), opened lazily.
    pub(crate) fn new(
        addrs: Vec<SocketAddr>,
        peer: String,
        n: usize,
        timeout: Duration,
        auth: AuthSys,
    ) -> Pool {
        Pool {
            addrs,
            peer,
            timeout,
            auth,
            slots: (0..n.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            slow_failure: Mutex::new(None),
        }
    }

    /// Number of connection slots.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The next connection in round-robin order, (re)connecting if needed.
    pub(crate) fn get(&self) -> Result<Arc<Conn>, Failure> {
        self.get_within(None)
    }

    /// Like [`Pool::get`], with a connect that waits at most `limit` (besides the usual caps).
    pub(crate) fn get_within(&self, limit: Option<Duration>) -> Result<Arc<Conn>, Failure> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = lock(&self.slots[i]);
        if let Some(c) = slot.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        if let Some((at, f)) = lock(&self.slow_failure).as_ref() {
            if at.elapsed() < SLOW_FAILURE_GATE {
                return Err(f.clone());
            }
        }
        let mut last = Failure::new(
            ErrorKind::InvalidInput,
            format!("{}: no address to connect to", self.peer),
            false,
        );
        let started = Instant::now();
        let connect_timeout = self
            .timeout
            .min(MAX_CONNECT)
            .min(limit.unwrap_or(MAX_CONNECT))
            .max(Duration::from_millis(10));
        for a in &self.addrs {
            match Conn::connect(
                *a,
                &self.peer,
                self.timeout,
                connect_timeout,
                self.auth.clone(),
            ) {
                Ok(c) => {
                    // The server answers again: let the other slots reconnect at once.
                    *lock(&self.slow_failure) = None;
                    let c = Arc::new(c);
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(f) => last = f,
            }
        }
        if started.elapsed() >= SLOW_FAILURE && last.retryable {
            *lock(&self.slow_failure) = Some((Instant::now(), last.clone()));
        }
        Err(last)
    }
}

#[cfg(test)]
pub(crate) fn wire_for_tests(data: &[u8]) -> Wire<&[u8]> {
    Wire::new(data)
}
