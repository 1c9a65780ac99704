//! Conformance suite for [`crate::Backend`] implementations, third-party ones included.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tensorstream_engine::testkit::{self, Fixture};
//! use tensorstream_engine::{Backend, Error, ErrorKind, MemoryBackend, Result};
//!
//! // Makes objects for the suite: here in memory; yours uploads to its server or temp dir and
//! // returns your backend reading them.
//! struct MyFixture;
//! impl Fixture for MyFixture {
//!     fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
//!         Ok(Arc::new(MemoryBackend::new(name, data.to_vec())))
//!     }
//!     fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
//!         Err(Error::new(ErrorKind::NotFound, "no such object").with_location(name))
//!     }
//!     // Optional (`Fixture::overwrite`): replace an object by new bytes of the same size, so the
//!     // suite can check that a changed object is noticed. Left out here: that check is skipped.
//! }
//!
//! // In a test file: `#[test] fn conformance() { testkit::run_all(&MyFixture); }`
//! testkit::run_all(&MyFixture);
//! ```
//!
//! [`run_all`] runs every check; each check is also public so a backend can run one on its own.
//! A failed check panics with a message `testkit check '<check>' failed for <kind> backend
//! <location>: …`. Every call into the backend runs on a helper thread under the check's
//! deadline ([`check_deadline`], 120 s): a call that never returns fails the check, naming the call
//! (and, for a reader's `wait`, the ids of the reads still pending), instead of hanging the test.
//! A backend that panics fails the check the same way. (Calls into the [`Fixture`] run on the
//! test's own thread, without a deadline.)
//!
//! What the suite demands beyond the [`Backend`] contract text:
//! * [`Capabilities`]: `alignment` a power of two, `preferred_chunk > 0`, `max_concurrency > 0`,
//!   `ranged_reads`, and `alignment > 1` exactly when `direct_io` (the Loader honours the alignment
//!   only for direct-I/O backends; everything else is planned with alignment 1, and this suite
//!   plans its end-to-end loads the same way).
//! * `read_at` at or past the end returns `Ok(0)` or [`ErrorKind::RangeNotSatisfiable`], never
//!   bytes, and the error is not [`Error::is_retryable`] (probed up to 1 GiB past the end, and at
//!   4 and 8 GiB plus an offset inside the object, where a backend that keeps only 32 bits of the
//!   offset would return bytes); at offsets near `u64::MAX` any error that is not retryable will
//!   do. A read that straddles the end returns exactly the bytes up to the
//!   end; a zero-length read returns `Ok(0)` (or `RangeNotSatisfiable` at the end).
//! * Objects of at least `2 × preferred_chunk + 77` bytes (capped at 48 MiB, at least 8 MiB) read
//!   correctly with `read_at` in one piece and in reads of `preferred_chunk + 1` bytes at high
//!   offsets, and load end to end with `chunk_size = preferred_chunk`.
//! * Reader sessions ([`Backend::open_reader`]) with queue depth 1 and 32 (waited for with
//!   `wait` and, every other time, `wait_timeout` in short ticks), reads submitted in
//!   random order with buffers aligned to `capabilities().alignment`: every completion carries
//!   its id and offset, the right bytes, the right count (short only at the end: one read always
//!   runs past the end), the very buffer submitted with that id (same length), writes nothing past
//!   the requested length, and `in_flight` counts the reads not yet returned. `stat` works while a
//!   reader is open and reports the same size and version.
//! * Every buffer also comes back when reads fail: reads past the end and, when the fixture's
//!   `missing` gives a backend, reads of a missing object (they fail with `NotFound`); and after
//!   [`RangeReader::abandon`] with reads in flight (each with its bytes, or failed).
//! * A missing object reports [`ErrorKind::NotFound`], not retryable, from the fixture, `stat` or
//!   `read_at`.
//! * When the fixture can overwrite objects ([`Fixture::overwrite`]): after an object is replaced
//!   by one of the same size, a load that started before either keeps reading the old bytes or
//!   reports [`ErrorKind::ObjectChanged`] (from a read, `open_reader`, or
//!   [`crate::unchanged_since`], i.e. a second `stat`), and so does `read_at`: new bytes from a
//!   reader session must be reported by the session or the second `stat`, new bytes from
//!   `read_at` by `read_at` or the second `stat` (a load reads through the session, a
//!   conversion of a local object through `read_at`). Fixtures that cannot overwrite leave the
//!   default, and the check prints a "skipped" line.
//! * A safetensors file loads end to end (`read_index` → `plan` → `execute` → [`HostSink`]) in
//!   both layouts. Note that [`crate::format::read_index`] reads the metadata through `read_at`
//!   with plain (unaligned) `Vec` buffers, so `read_at` must accept any buffer even when reader
//!   sessions need alignment.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::format::safetensors::write_header;
use crate::mem::IoBuf;
use crate::plan::{plan, Layout, PlanOptions};
use crate::{
    execute, Backend, Capabilities, DType, EngineOptions, Error, ErrorKind, HostModel, HostSink,
    ObjectMeta, RangeReader, ReadDone, ReadRequest, ReaderOptions, Result,
};

/// How the suite makes objects for the backend under test.
pub trait Fixture {
    /// Stores `data` as a new object called `name` and returns a backend reading it.
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>>;
    /// A backend for an object that does not exist. May fail itself (with `NotFound`), or
    /// succeed and then fail `stat`/`read_at` with `NotFound`.
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>>;
    /// Replaces the contents of object `name` (made by [`Fixture::create`]) with `data`, which the
    /// suite makes the same size as before with different bytes: the replacement must look like a
    /// new version to the storage (a new ETag; for files a new mtime even within the filesystem's
    /// timestamp granularity, e.g. set explicitly). Backends opened before then must notice (see
    /// [`check_object_change`]). The default returns [`ErrorKind::Unsupported`], and the check
    /// is skipped.
    fn overwrite(&self, name: &str, data: &[u8]) -> Result<()> {
        let _ = data;
        Err(Error::unsupported(format!(
            "the fixture cannot overwrite objects (Fixture::overwrite is not implemented; \
             {name:?} left as it was)"
        )))
    }
}

/// Runs every check; panics with a message naming the failed check.
pub fn run_all(fixture: &dyn Fixture) {
    check_capabilities(fixture);
    check_stat(fixture);
    check_read_at(fixture);
    check_read_at_large(fixture);
    check_reader(fixture, 1);
    check_reader(fixture, 32);
    check_reader_abandon(fixture);
    check_reader_errors(fixture);
    check_missing(fixture);
    check_object_change(fixture);
    check_end_to_end(fixture, Layout::Mirror);
    check_end_to_end(fixture, Layout::Packed { align: 256 });
    check_end_to_end_large(fixture);
}

/// Size of the odd-sized object most checks use (3 MiB + 77).
pub const ODD_SIZE: usize = (3 << 20) + 77;

/// How long one check may run before it fails as hung, unless
/// `TENSORSTREAM_TESTKIT_DEADLINE_S` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// The deadline of one check: `TENSORSTREAM_TESTKIT_DEADLINE_S` seconds if set (and positive),
/// else [`DEFAULT_DEADLINE`] (generous: debug builds against remote servers).
pub fn check_deadline() -> Duration {
    std::env::var("TENSORSTREAM_TESTKIT_DEADLINE_S")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_DEADLINE)
}

/// Size of the large object of [`check_read_at_large`] and [`check_end_to_end_large`] for a
/// backend with this preferred chunk: `2 × preferred_chunk + 77` bytes, at least 8 MiB + 77 (so
/// reads above 4 MiB are always seen) and at most 48 MiB + 77 (so remote backends stay fast).
pub fn large_size(preferred_chunk: usize) -> usize {
    preferred_chunk.saturating_mul(2).clamp(8 << 20, 48 << 20) + 77
}

/// A safetensors file of one-dimensional U8 tensors `t000`, `t001`, … of the given sizes with
/// [`pattern`] contents (seeded `seed + i`), and each tensor's bytes — the model every backend test
/// loads.
pub fn u8_model(sizes: &[u64], seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let tensors: Vec<(String, crate::DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("t{i:03}"), crate::DType::U8, vec![n], n))
        .collect();
    let mut file = match crate::format::safetensors::write_header(&tensors, &Default::default()) {
        Ok(h) => h,
        Err(e) => panic!("testkit: cannot build a safetensors header: {e}"),
    };
    let mut datas = Vec::with_capacity(sizes.len());
    for (i, &n) in sizes.iter().enumerate() {
        let d = pattern(n as usize, seed.wrapping_add(i as u64));
        file.extend_from_slice(&d);
        datas.push(d);
    }
    (file, datas)
}

/// The `VmFlags` of the mapping in `/proc/self/smaps` that holds `addr` (e.g. `dc`: not
/// copied into forked children). Panics when no mapping holds it (a test helper).
pub fn vm_flags(addr: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut inside = false;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = range {
            inside = a <= addr && addr < b;
        } else if inside {
            if let Some(f) = line.strip_prefix("VmFlags:") {
                return f.split_whitespace().map(str::to_string).collect();
            }
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// Deterministic pseudo-random bytes (different `seed`s give different contents).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The byte every buffer is filled with before a read: what is still there was not written.
const FILL: u8 = 0xA5;

/// Bytes after the requested length of each reader buffer that must stay untouched (at least;
/// the slot is rounded up to the alignment).
const GUARD: usize = 64;

/// A job for a check's worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// Names the check and the backend in every failure message, and runs the backend's calls under
/// the check's deadline.
struct Ctx {
    check: &'static str,
    who: String,
    started: Instant,
    limit: Duration,
    /// The worker thread that makes the backend calls; abandoned (left blocked) when a call
    /// misses the deadline, which fails the check.
    jobs: mpsc::Sender<Job>,
}

impl Ctx {
    fn new(check: &'static str) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(format!("testkit {check}"))
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            panic!("testkit check '{check}': cannot start its worker thread: {e}");
        }
        Ctx {
            check,
            who: "(no backend yet)".into(),
            started: Instant::now(),
            limit: check_deadline(),
            jobs,
        }
    }
    fn on(&mut self, be: &dyn Backend) {
        self.who = format!("{} backend {}", be.capabilities().kind, be.location());
    }
    #[track_caller]
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "testkit check '{}' failed for {}: {msg}",
            self.check, self.who
        )
    }
    #[track_caller]
    fn ensure(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg())
        }
    }
    #[track_caller]
    fn ok<T>(&self, r: Result<T>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(format_args!("{what}: {e} (kind {:?})", e.kind())),
        }
    }
    #[track_caller]
    fn create(&mut self, fx: &dyn Fixture, name: &str, data: &[u8]) -> Arc<dyn Backend> {
        let be = self.ok(fx.create(name, data), &format!("fixture.create({name:?})"));
        self.on(be.as_ref());
        be
    }

    /// Runs `f` (a call into the backend) on the check's worker thread and waits for it until
    /// the check's deadline; a panic or a missed deadline fails the check, naming `what`.
    #[track_caller]
    fn call<T: Send + 'static>(
        &self,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        if self.jobs.send(job).is_err() {
            self.fail(format_args!(
                "{}: the check's worker thread is gone",
                what()
            ));
        }
        let left = self.limit.saturating_sub(self.started.elapsed());
        match rx.recv_timeout(left) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => self.fail(format_args!(
                "{} panicked: {}",
                what(),
                panic_text(p.as_ref())
            )),
            Err(mpsc::RecvTimeoutError::Timeout) => self.fail(format_args!(
                "{} did not return: the check ran past its deadline of {} s \
                 (TENSORSTREAM_TESTKIT_DEADLINE_S)",
                what(),
                self.limit.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.fail(format_args!(
                "{} never finished (worker thread lost)",
                what()
            )),
        }
    }

    #[track_caller]
    fn stat(&self, be: &Arc<dyn Backend>) -> Result<ObjectMeta> {
        let b = be.clone();
        self.call(|| "stat()".into(), move || b.stat())
    }

    #[track_caller]
    fn read_at(&self, be: &Arc<dyn Backend>, off: u64, mut buf: Buf) -> (Result<usize>, Buf) {
        let b = be.clone();
        let len = buf.len();
        self.call(
            move || format!("read_at({off}, {len} bytes)"),
            move || {
                let r = b.read_at(off, buf.as_mut_slice());
                (r, buf)
            },
        )
    }

    #[track_caller]
    fn open_reader(
        &self,
        be: &Arc<dyn Backend>,
        meta: &ObjectMeta,
        queue_depth: usize,
    ) -> Result<Session> {
        let b = be.clone();
        let m = meta.clone();
        let r = self.call(
            move || format!("open_reader(queue_depth {queue_depth})"),
            move || b.open_reader(&m, &ReaderOptions::new(queue_depth)),
        )?;
        Ok(Session {
            reader: Some(r),
            pending: BTreeMap::new(),
            waits: 0,
        })
    }

    /// Runs `f` on the session's reader under the deadline.
    #[track_caller]
    fn with_reader<T: Send + 'static>(
        &self,
        s: &mut Session,
        what: impl FnOnce() -> String,
        f: impl FnOnce(&mut dyn RangeReader) -> T + Send + 'static,
    ) -> T {
        let Some(mut r) = s.reader.take() else {
            self.fail(format_args!("{}: the reader was lost", what()))
        };
        let (r, out) = self.call(what, move || {
            let out = f(r.as_mut());
            (r, out)
        });
        s.reader = Some(r);
        out
    }

    /// `wait()` on the session, failing the check (naming the pending ids) if it errs or hangs.
    /// Every other call waits with `wait_timeout` in short ticks instead (as a cancellable load
    /// does), so that both are checked.
    #[track_caller]
    fn wait(&self, s: &mut Session) -> ReadDone {
        let ids = s.pending_ids();
        s.waits += 1;
        let ticked = s.waits.is_multiple_of(2);
        let r = self.with_reader(
            s,
            || format!("wait() with reads pending (ids {ids})"),
            move |r| {
                if !ticked {
                    return r.wait();
                }
                loop {
                    match r.wait_timeout(Duration::from_millis(5)) {
                        Ok(Some(d)) => return Ok(d),
                        Ok(None) => continue,
                        Err(e) => return Err(e),
                    }
                }
            },
        );
        match r {
            Ok(d) => d,
            Err(e) => self.fail(format_args!(
                "wait() failed with reads pending (ids {}) — a completion was lost, or a \
                 per-read failure was not returned with its buffer in ReadDone::result: {e} \
                 (kind {:?})",
                s.pending_ids(),
                e.kind()
            )),
        }
    }

    /// Drops the session's reader under the deadline (dropping waits for its reads).
    #[track_caller]
    fn close(&self, mut s: Session) {
        if let Some(r) = s.reader.take() {
            self.call(|| "dropping the reader".into(), move || drop(r));
        }
    }
}

/// The message of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A reader session under test and its reads in flight (id → index of the read).
struct Session {
    reader: Option<Box<dyn RangeReader>>,
    pending: BTreeMap<u64, usize>,
    /// `wait` calls so far (every other one uses `wait_timeout`).
    waits: usize,
}

impl Session {
    fn in_flight(&self) -> usize {
        self.reader.as_ref().map_or(0, |r| r.in_flight())
    }
    fn pending_ids(&self) -> String {
        let ids: Vec<String> = self
            .pending
            .keys()
            .take(12)
            .map(|k| k.to_string())
            .collect();
        let more = self.pending.len().saturating_sub(12);
        if more > 0 {
            format!("{} and {more} more", ids.join(", "))
        } else if ids.is_empty() {
            "none".into()
        } else {
            ids.join(", ")
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Reached when a check fails with the reader open: dropping a reader waits for its
        // reads, and one of them may never finish; drop it on a detached thread so the failure
        // is reported instead of hanging.
        if let Some(r) = self.reader.take() {
            let _ = std::thread::Builder::new()
                .name("testkit drop".into())
                .spawn(move || drop(r));
        }
    }
}

/// A buffer for `read_at`: plain or aligned.
enum Buf {
    Plain(Vec<u8>),
    Aligned(IoBuf),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Plain(v) => v.len(),
            Buf::Aligned(b) => b.len(),
        }
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Plain(v) => v,
            Buf::Aligned(b) => b.as_slice(),
        }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Plain(v) => v,
            Buf::Aligned(b) => b.as_mut_slice(),
        }
    }
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

fn align_down(x: usize, a: usize) -> usize {
    x / a * a
}

/// A buffer of `len` bytes filled with [`FILL`]: aligned to the backend's alignment (at least
/// 64) when it needs alignment, a plain `Vec` otherwise.
fn filled(ctx: &Ctx, len: usize, caps: &Capabilities) -> Buf {
    if caps.alignment > 1 {
        let mut b = ctx.ok(
            IoBuf::aligned(len, caps.alignment.max(64)),
            "allocating a buffer",
        );
        b.as_mut_slice().fill(FILL);
        Buf::Aligned(b)
    } else {
        Buf::Plain(vec![FILL; len])
    }
}

/// Plan options the way the Loader makes them (`src/lib.rs`, `Loader::prepare`): the backend's
/// alignment only with `direct_io` (else 1), and chunks of whole alignment blocks, at least 4 KiB.
fn loader_plan_options(caps: &Capabilities, size: u64, chunk: usize) -> PlanOptions {
    let mut o = PlanOptions::new(size);
    o.alignment = if caps.direct_io {
        caps.alignment.max(1) as u64
    } else {
        1
    };
    let chunk = chunk.max(4096) as u64;
    o.chunk_size = (chunk / o.alignment).max(1) * o.alignment;
    o
}

/// Capabilities are sane and consistent: alignment a power of two, above 1 exactly with
/// `direct_io`; ranged reads; chunk and concurrency positive; a kind name; stable.
pub fn check_capabilities(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("capabilities");
    let be = ctx.create(fx, "caps.bin", &pattern(4096, 1));
    let c = be.capabilities();
    ctx.ensure(c.alignment.is_power_of_two(), || {
        format!("alignment {} is not a power of two", c.alignment)
    });
    ctx.ensure(c.preferred_chunk > 0, || "preferred_chunk is 0".into());
    ctx.ensure(c.max_concurrency > 0, || "max_concurrency is 0".into());
    ctx.ensure(!c.kind.is_empty(), || "kind is empty".into());
    ctx.ensure(c.ranged_reads, || {
        "implausible capabilities: ranged_reads is false, yet the engine (read_index, every \
         plan) and this suite read byte ranges"
            .into()
    });
    ctx.ensure(!c.direct_io || c.alignment > 1, || {
        "implausible capabilities: direct_io is true with alignment 1 (O_DIRECT needs aligned \
         offsets, lengths and buffers: declare the block size)"
            .into()
    });
    ctx.ensure(c.direct_io || c.alignment == 1, || {
        format!(
            "implausible capabilities: alignment {} without direct_io (the Loader plans \
             unaligned reads for backends without direct_io; declare alignment 1, or direct_io)",
            c.alignment
        )
    });
    ctx.ensure(c == be.capabilities(), || {
        "capabilities change between calls".into()
    });
}

/// `stat` reports the size of empty, 1-byte and odd-sized objects, and a stable version.
pub fn check_stat(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("stat");
    for (name, len) in [
        ("stat-empty.bin", 0usize),
        ("stat-one.bin", 1),
        ("stat-odd.bin", ODD_SIZE),
    ] {
        let data = pattern(len, len as u64);
        let be = ctx.create(fx, name, &data);
        let caps = be.capabilities();
        let m1 = ctx.ok(ctx.stat(&be), "stat");
        ctx.ensure(m1.size == len as u64, || {
            format!("stat size {} for an object of {len} bytes", m1.size)
        });
        let m2 = ctx.ok(ctx.stat(&be), "second stat");
        ctx.ensure(m1 == m2, || {
            format!("two stats of an unchanged object differ: {m1:?} vs {m2:?}")
        });
        if len == 0 {
            // (What lands in the buffer is judged by the read_at check.)
            expect_nothing_in(&ctx, &be, &caps, 0, 16.max(caps.alignment), 0, false);
        }
    }
}

/// Reads `len` bytes at `off` and checks count, bytes, and that nothing past the count was
/// written.
fn expect_bytes(
    ctx: &Ctx,
    be: &Arc<dyn Backend>,
    caps: &Capabilities,
    data: &[u8],
    off: usize,
    len: usize,
) {
    let size = data.len();
    let (r, got) = ctx.read_at(be, off as u64, filled(ctx, len, caps));
    let n = ctx.ok(r, &format!("read_at({off}, {len} bytes)"));
    let got = got.as_slice();
    let want = len.min(size.saturating_sub(off));
    ctx.ensure(n == want, || {
        format!(
            "read_at({off}, {len} bytes) returned {n} bytes, expected {want} (object {size} bytes)"
        )
    });
    ctx.ensure(got[..n] == data[off..off + n], || {
        format!("read_at({off}, {len} bytes) returned wrong bytes")
    });
    ctx.ensure(got[n..].iter().all(|&b| b == FILL), || {
        format!("read_at({off}, {len} bytes) wrote past the {n} bytes it returned")
    });
}

/// A read at or past the end (object of `size` bytes): `Ok(0)` or a `RangeNotSatisfiable` that
/// is not retryable; nothing written. Near `u64::MAX` (where `offset + len` may not be a valid
/// file offset) any error that is not retryable will do.
fn expect_nothing(
    ctx: &Ctx,
    be: &Arc<dyn Backend>,
    caps: &Capabilities,
    off: u64,
    len: usize,
    size: u64,
) {
    expect_nothing_in(ctx, be, caps, off, len, size, true)
}

/// [`expect_nothing`], optionally without checking that the buffer was left alone.
fn expect_nothing_in(
    ctx: &Ctx,
    be: &Arc<dyn Backend>,
    caps: &Capabilities,
    off: u64,
    len: usize,
    size: u64,
    untouched: bool,
) {
    let far = off > i64::MAX as u64;
    let (r, buf) = ctx.read_at(be, off, filled(ctx, len, caps));
    match r {
        Ok(0) => {}
        Ok(n) => ctx.fail(format_args!(
            "read_at({off}, {len} bytes) at/past the end ({size} bytes) returned {n} bytes"
        )),
        Err(e) if e.kind() == ErrorKind::RangeNotSatisfiable || far => {
            ctx.ensure(!e.is_retryable(), || {
                format!(
                    "read_at({off}, {len} bytes) at/past the end ({size} bytes) failed with a \
                     retryable error (a fresh attempt cannot help): {e} (kind {:?})",
                    e.kind()
                )
            })
        }
        Err(e) => ctx.fail(format_args!(
            "read_at({off}, {len} bytes) at/past the end ({size} bytes) returned {e} (kind {:?}), \
             expected Ok(0) or RangeNotSatisfiable",
            e.kind()
        )),
    }
    ctx.ensure(
        !untouched || buf.as_slice().iter().all(|&b| b == FILL),
        || format!("read_at({off}, {len} bytes) at/past the end wrote into the buffer"),
    );
}

/// `read_at` at the start, in the middle, at and past the end (up to 1 GiB past it, and near
/// `u64::MAX`), of zero length, and (when the backend needs no alignment) with buffers and
/// offsets of odd sizes.
pub fn check_read_at(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("read_at");
    let data = pattern(ODD_SIZE, 7);
    let be = ctx.create(fx, "read-at.bin", &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let size = data.len();
    let size_up = align_up(size, a);

    let mut cases: Vec<(usize, usize)> = vec![
        (0, a.max(4096)),
        (0, align_up(size, a)), // whole object, aligned length runs past the end
        (align_up(size / 2, a), 64 * a), // middle
        (size_up - a, a),       // last block (short unless size is aligned)
        (size_up - 2 * a, 4 * a), // straddles the end
        // Zero-length reads return 0 (= buf.len()), at the start and in the middle.
        (0, 0),
        (align_up(size / 2, a), 0),
    ];
    if a == 1 {
        cases.extend([
            (1, 1),
            (3, 3),
            (4095, 4097),
            (size / 3 + 1, 65537),
            (size - 1, 1),
            (size - 10, 100),
            (12_345, 1_000_003),
        ]);
    }
    for (off, len) in cases {
        expect_bytes(&ctx, &be, &caps, &data, off, len);
    }
    // At the exact end and past it: no bytes.
    let probe = a.max(16);
    let down = |x: u64| x / a as u64 * a as u64;
    for off in [
        size_up as u64,
        (size_up + a) as u64,
        (size_up + 1024 * a) as u64,
        size_up as u64 + (1 << 30),        // 1 GiB past the end
        1 << 32,                           // 4 GiB: offset 0 for a backend that keeps 32 bits
        (1 << 32) + down(size as u64 / 2), // the middle, likewise
        (1 << 33) + down(size as u64 / 3),
        down(u64::MAX - 2 * probe as u64), // near u64::MAX: offset + len just fits
    ] {
        expect_nothing(&ctx, &be, &caps, off, probe, size as u64);
    }
    // Zero-length at the end.
    expect_nothing(&ctx, &be, &caps, size_up as u64, 0, size as u64);
    if a == 1 {
        // Exactly at the (unaligned) end.
        expect_nothing(&ctx, &be, &caps, size as u64, 7, size as u64);
        expect_nothing(&ctx, &be, &caps, size as u64, 0, size as u64);
    }
}

/// `read_at` on a large object ([`large_size`]: at least `2 × preferred_chunk + 77` bytes):
/// the whole object in one read, reads of `preferred_chunk + 1` bytes at a high offset and
/// across the end.
pub fn check_read_at_large(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("read_at large");
    let probe = ctx.create(fx, "read-at-large-caps.bin", &pattern(4096, 3));
    let pc = probe.capabilities().preferred_chunk.max(1);
    drop(probe);
    let size = large_size(pc);
    let data = pattern(size, 9);
    let be = ctx.create(fx, "read-at-large.bin", &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    // preferred_chunk + 1, or half the object when the object was capped.
    let len = align_up((pc + 1).min(size / 2), a);
    // A full read ending well before the end, at an offset at or above preferred_chunk.
    let high = align_down(size - len - 4096, a);
    for (off, len) in [
        (high, len),
        (align_down(size - len / 2, a), len), // straddles the end
        (0, align_up(size, a)),               // the whole object
    ] {
        expect_bytes(&ctx, &be, &caps, &data, off, len);
    }
    if a == 1 {
        expect_bytes(&ctx, &be, &caps, &data, high + 1, pc + 1);
    }
}

/// Checks one reader completion of the read `(off, len)` of `data`: the right count and bytes
/// (short only at the end), or a non-retryable `RangeNotSatisfiable` for a read past the end.
fn judge_read(
    ctx: &Ctx,
    (off, len): (u64, usize),
    data: &[u8],
    result: &Result<usize>,
    got: &[u8],
) {
    let size = data.len();
    let start = off as usize;
    match result {
        Ok(n) => {
            let n = *n;
            let want = len.min(size.saturating_sub(start));
            ctx.ensure(n == want, || {
                format!("read at {off} of {len} bytes returned {n} bytes, expected {want} (object {size} bytes)")
            });
            ctx.ensure(n == 0 || got[..n] == data[start..start + n], || {
                format!("read at {off} of {len} bytes returned wrong bytes")
            });
        }
        Err(e) if start >= size && e.kind() == ErrorKind::RangeNotSatisfiable => {
            ctx.ensure(!e.is_retryable(), || {
                format!("read at {off} past the end failed with a retryable error: {e}")
            });
        }
        Err(e) => ctx.fail(format_args!(
            "read at {off} of {len} bytes failed: {e} (kind {:?})",
            e.kind()
        )),
    }
}

/// Reads the pieces `reads` through `s` with at most `qd` in flight, each into its own slot of
/// one registered region (`len` bytes plus a guard band, aligned to `align`), and checks what
/// every completion must satisfy whatever the outcome: a submitted id, not seen before, its
/// offset, the very buffer submitted with it (same length and capacity), nothing written into
/// the guard band, and `in_flight`. `judge(i, &result, bytes)` checks the outcome of read `i`
/// (`bytes` are the requested `len` bytes of the buffer). With `stat_meta`, `stat` is called
/// after the first submit and every 16th, and must still report that meta. New reads are
/// submitted before a completion is judged, so the backend keeps working while the suite checks.
/// With `abandon_after: Some(k)`, the reader is abandoned ([`RangeReader::abandon`]) once `k`
/// reads came back (at once for 0), nothing more is submitted, and the reads in flight must
/// still come back, each with its buffer (what a failing load waits for).
#[allow(clippy::too_many_arguments)]
fn run_reads(
    ctx: &Ctx,
    be: &Arc<dyn Backend>,
    s: &mut Session,
    reads: &[(u64, usize)],
    qd: usize,
    align: usize,
    stat_meta: Option<&ObjectMeta>,
    abandon_after: Option<usize>,
    mut judge: impl FnMut(usize, &Result<usize>, &[u8]),
) {
    let slot_align = align.max(64);
    let slot_sizes: Vec<usize> = reads
        .iter()
        .map(|&(_, len)| align_up(len + GUARD, slot_align))
        .collect();
    let total: usize = slot_sizes.iter().sum();
    let mut whole = ctx.ok(
        IoBuf::aligned(total, align.max(4096)),
        "allocating reader buffers",
    );
    let mut slots: Vec<Option<IoBuf>> = Vec::with_capacity(reads.len());
    for &n in &slot_sizes {
        match whole.split_to(n) {
            Some(b) => slots.push(Some(b)),
            None => ctx.fail("splitting reader buffers"),
        }
    }
    let ptrs: Vec<usize> = slots
        .iter()
        .map(|b| b.as_ref().map_or(0, |b| b.as_ptr() as usize))
        .collect();
    {
        let held: Vec<IoBuf> = slots.iter_mut().filter_map(Option::take).collect();
        let (held, r) = ctx.with_reader(
            s,
            || "register_buffers".into(),
            move |r| {
                let regs: Vec<&IoBuf> = held.iter().collect();
                let res = r.register_buffers(&regs);
                (held, res)
            },
        );
        ctx.ok(r, "register_buffers");
        for (slot, b) in slots.iter_mut().zip(held) {
            *slot = Some(b);
        }
    }
    let id_of = |i: usize| (i as u64) * 7919 + 13; // not indices: catches invented ids
    let mut done_ids: HashSet<u64> = HashSet::new();
    let mut next = 0usize;
    let mut completed = 0usize;
    // Fills the queue up to `qd` reads, submitting them in one go (one call on the worker thread,
    // so the reads overlap even when each hop to it is slow); `in_flight` is recorded after each.
    let mut submit_upto = |ctx: &Ctx, s: &mut Session, next: &mut usize| {
        let mut batch: Vec<(u64, u64, usize, IoBuf)> = Vec::new();
        let mut stat_due = false;
        while *next + batch.len() < reads.len() && s.pending.len() + batch.len() < qd {
            let i = *next + batch.len();
            let (off, len) = reads[i];
            let Some(mut buf) = slots[i].take() else {
                ctx.fail("a reader buffer was used twice")
            };
            buf.as_mut_slice().fill(FILL);
            // The slot holds len + GUARD bytes at least.
            let fits = buf.set_len(len);
            debug_assert!(fits);
            stat_due |= i.is_multiple_of(16);
            batch.push((id_of(i), off, len, buf));
        }
        if batch.is_empty() {
            return;
        }
        let first = batch[0].0;
        let count = batch.len();
        let outcomes = ctx.with_reader(
            s,
            move || format!("submit of {count} reads (ids from {first})"),
            move |r| {
                let mut out = Vec::with_capacity(batch.len());
                for (id, offset, len, buf) in batch {
                    let res = r.submit(ReadRequest { id, offset, buf });
                    let failed = res.is_err();
                    out.push((id, offset, len, res, r.in_flight()));
                    if failed {
                        break;
                    }
                }
                out
            },
        );
        for (id, off, len, res, in_flight) in outcomes {
            ctx.ok(res, &format!("submit(id {id}, offset {off}, {len} bytes)"));
            s.pending.insert(id, *next);
            *next += 1;
            ctx.ensure(in_flight == s.pending.len(), || {
                format!(
                    "in_flight() is {in_flight} after submit(id {id}), with {} reads submitted \
                     and not returned (ids {})",
                    s.pending.len(),
                    s.pending_ids()
                )
            });
        }
        if let (Some(meta), true) = (stat_meta, stat_due) {
            let m = ctx.ok(ctx.stat(be), "stat() while a reader is open");
            ctx.ensure(&m == meta, || {
                format!("stat() while a reader is open reports {m:?}, before it {meta:?}")
            });
        }
    };
    let mut abandoned = false;
    while completed < reads.len() {
        if !abandoned {
            submit_upto(ctx, s, &mut next);
        }
        if abandon_after.is_some_and(|k| completed >= k) && !abandoned {
            abandoned = true;
            let pending = s.pending_ids();
            ctx.with_reader(
                s,
                move || format!("abandon() with reads pending (ids {pending})"),
                |r| r.abandon(),
            );
        }
        if abandoned && s.pending.is_empty() {
            break;
        }
        let done = ctx.wait(s);
        let Some(i) = s.pending.remove(&done.id) else {
            if done_ids.contains(&done.id) {
                ctx.fail(format_args!(
                    "id {} completed twice (a duplicate completion; pending: ids {})",
                    done.id,
                    s.pending_ids()
                ))
            }
            ctx.fail(format_args!(
                "a completion carries id {}, which was never submitted (pending: ids {})",
                done.id,
                s.pending_ids()
            ))
        };
        done_ids.insert(done.id);
        ctx.ensure(s.in_flight() == s.pending.len(), || {
            format!(
                "in_flight() is {} after wait() returned id {}; {} reads are pending (ids {})",
                s.in_flight(),
                done.id,
                s.pending.len(),
                s.pending_ids()
            )
        });
        // Keep the queue full while this completion is checked.
        if !abandoned {
            submit_upto(ctx, s, &mut next);
        }
        let (off, len) = reads[i];
        ctx.ensure(done.offset == off, || {
            format!(
                "completion id {} carries offset {}, submitted {off}",
                done.id, done.offset
            )
        });
        let mut buf = done.buf;
        ctx.ensure(buf.as_ptr() as usize == ptrs[i], || {
            format!(
                "the completion of id {} (offset {off}, {len} bytes) gave back another buffer \
                 than the one submitted with it",
                done.id
            )
        });
        ctx.ensure(buf.len() == len && buf.capacity() == slot_sizes[i], || {
            format!(
                "the buffer of id {} came back with length {} (capacity {}), submitted {len} \
                 (capacity {})",
                done.id,
                buf.len(),
                buf.capacity(),
                slot_sizes[i]
            )
        });
        if let Ok(n) = &done.result {
            ctx.ensure(*n <= len, || {
                format!("read at {off} of {len} bytes returned {n} bytes, more than asked")
            });
        }
        judge(i, &done.result, buf.as_slice());
        // Same pointer and capacity as submitted (checked above): the guard band is ours.
        let cap = buf.capacity();
        let grown = buf.set_len(cap);
        debug_assert!(grown);
        ctx.ensure(buf.as_slice()[len..].iter().all(|&b| b == FILL), || {
            format!("read at {off} of {len} bytes wrote past the requested length")
        });
        completed += 1;
    }
}

/// Many reads through a reader session with `queue_depth` in flight: shuffled order, aligned
/// buffers (one slot per read) from one registered region, every byte and every buffer checked,
/// `stat` in between.
pub fn check_reader(fx: &dyn Fixture, queue_depth: usize) {
    let mut ctx = Ctx::new(if queue_depth <= 1 {
        "reader qd1"
    } else {
        "reader deep queue"
    });
    let qd = queue_depth.max(1);
    let data = pattern(ODD_SIZE, 11 + qd as u64);
    let be = ctx.create(fx, &format!("reader-qd{qd}.bin"), &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let size = data.len();
    let end = align_up(size, a);
    let mut rng = 0x5EED ^ qd as u64;

    // Cover the object with reads of varied (aligned) lengths.
    let mut reads: Vec<(u64, usize)> = Vec::new();
    let mut off = 0usize;
    while off < end {
        let len = if a == 1 {
            1 + (splitmix(&mut rng) % 40_000) as usize
        } else {
            a * (1 + (splitmix(&mut rng) % 16) as usize)
        };
        let len = len.min(end - off);
        reads.push((off as u64, len));
        off += len;
    }
    // Large reads too (overlapping the ones above; each is checked on its own): the whole
    // object in one read, and one from an aligned middle offset to the end. A reader that
    // truncates big reads (e.g. to its own chunk size) must fail here, not only end to end.
    reads.push((0, end));
    let mid = align_up(size / 3, a);
    reads.push((mid as u64, end - mid));
    // One read that runs past the end whatever the alignment: short, with the last bytes.
    let tail = align_down(size - 100, a);
    reads.push((tail as u64, align_up(size - tail + 1000, a)));
    // One read entirely past the end.
    reads.push((end as u64 + (a as u64) * 8, a.max(512)));
    // Shuffle (Fisher–Yates).
    for i in (1..reads.len()).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        reads.swap(i, j);
    }

    let meta = ctx.ok(ctx.stat(&be), "stat");
    let mut s = ctx.ok(ctx.open_reader(&be, &meta, qd), "open_reader");
    let judge = |i: usize, result: &Result<usize>, got: &[u8]| {
        judge_read(&ctx, reads[i], &data, result, got)
    };
    run_reads(&ctx, &be, &mut s, &reads, qd, a, Some(&meta), None, judge);
    ctx.close(s);
}

/// A reader session abandoned ([`RangeReader::abandon`], what a failing or cancelled load
/// does) with reads in flight still gives every one of them back through `wait`, each with its
/// buffer: with the right bytes, or failed (any error). A reader that drops them would hold the
/// failing load for ever. Abandoned at once after the first submits, and after some reads came
/// back.
pub fn check_reader_abandon(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("reader abandon");
    let data = pattern(ODD_SIZE, 17);
    let be = ctx.create(fx, "reader-abandon.bin", &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let piece = align_up(64 << 10, a);
    let reads: Vec<(u64, usize)> = (0..align_down(data.len(), a))
        .step_by(piece)
        .take(24)
        .map(|off| (off as u64, piece))
        .collect();
    let meta = ctx.ok(ctx.stat(&be), "stat");
    for after in [0, 5] {
        let mut s = ctx.ok(ctx.open_reader(&be, &meta, 8), "open_reader");
        let judge = |i: usize, result: &Result<usize>, got: &[u8]| {
            if result.is_ok() {
                judge_read(&ctx, reads[i], &data, result, got)
            }
        };
        run_reads(&ctx, &be, &mut s, &reads, 8, a, None, Some(after), judge);
        ctx.close(s);
    }
}

/// Reader sessions whose reads fail or find nothing give every buffer back with the outcome in
/// `ReadDone::result`: reads past the end of an object (`Ok(0)` or `RangeNotSatisfiable`) and,
/// when the fixture's `missing` gives a backend, reads of a missing object (`NotFound`).
pub fn check_reader_errors(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("reader errors");
    let data = pattern((64 << 10) + 77, 31);
    let be = ctx.create(fx, "reader-errors.bin", &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let size = data.len();
    let end = align_up(size, a);
    let reads: Vec<(u64, usize)> = vec![
        (end as u64, a.max(512)),
        (0, a.max(4096)),
        ((end + 64 * a) as u64, a),
        (align_down(size - 1, a) as u64, align_up(4096, a)), // short: the last bytes
        (end as u64 + (1 << 30), a.max(512)),                // 1 GiB past the end
        (1 << 32, a.max(512)), // offset 0 for a backend that keeps 32 bits of the offset
    ];
    let meta = ctx.ok(ctx.stat(&be), "stat");
    let mut s = ctx.ok(ctx.open_reader(&be, &meta, 4), "open_reader");
    let judge = |i: usize, result: &Result<usize>, got: &[u8]| {
        judge_read(&ctx, reads[i], &data, result, got)
    };
    run_reads(&ctx, &be, &mut s, &reads, 4, a, None, None, judge);
    ctx.close(s);

    // A missing object, read through a session opened with a made-up meta.
    let name = "reader-missing.bin";
    let Ok(be) = fx.missing(name) else {
        return; // the fixture reports it (judged by check_missing)
    };
    ctx.on(be.as_ref());
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let fake = ObjectMeta {
        size: 1 << 20,
        version: None,
    };
    let mut s = match ctx.open_reader(&be, &fake, 4) {
        Ok(s) => s,
        Err(e) => {
            ctx.ensure(e.kind() == ErrorKind::NotFound, || {
                format!(
                    "open_reader on a missing object failed with kind {:?}, expected NotFound: {e}",
                    e.kind()
                )
            });
            return;
        }
    };
    let reads: Vec<(u64, usize)> = (0..4u64)
        .map(|k| (k * (a.max(4096) as u64) * 16, a.max(4096)))
        .collect();
    let judge = |i: usize, result: &Result<usize>, _: &[u8]| {
        let (off, len) = reads[i];
        match result {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => ctx.fail(format_args!(
                "read at {off} of {len} bytes of a missing object failed with kind {:?}, \
                 expected NotFound: {e}",
                e.kind()
            )),
            Ok(n) => ctx.fail(format_args!(
                "read at {off} of {len} bytes of a missing object returned Ok({n})"
            )),
        }
    };
    run_reads(&ctx, &be, &mut s, &reads, 4, a, None, None, judge);
    ctx.close(s);
}

/// A missing object reports `NotFound`, not retryable (from the fixture, `stat` or `read_at`),
/// naming it.
pub fn check_missing(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("missing object");
    let name = "does-not-exist.bin";
    let be = match fx.missing(name) {
        Err(e) => {
            ctx.who = format!("the fixture of a missing object {name:?}");
            ctx.ensure(e.kind() == ErrorKind::NotFound, || {
                format!(
                    "fixture.missing failed with kind {:?}, expected NotFound: {e}",
                    e.kind()
                )
            });
            ctx.ensure(e.to_string().contains(name), || {
                format!("the NotFound error does not name the object: {e}")
            });
            ctx.ensure(!e.is_retryable(), || {
                format!(
                    "the NotFound error is flagged retryable (a fresh attempt cannot help): {e}"
                )
            });
            return;
        }
        Ok(be) => be,
    };
    ctx.on(be.as_ref());
    let loc = be.location().to_string();
    let err = match ctx.stat(&be) {
        Err(e) => e,
        Ok(_) => match ctx.read_at(&be, 0, Buf::Plain(vec![0u8; 4096])) {
            (Err(e), _) => e,
            (Ok(n), _) => ctx.fail(format_args!(
                "stat succeeded and read_at returned {n} bytes for a missing object"
            )),
        },
    };
    ctx.ensure(err.kind() == ErrorKind::NotFound, || {
        format!(
            "missing object gave kind {:?}, expected NotFound: {err}",
            err.kind()
        )
    });
    ctx.ensure(
        err.to_string().contains(&loc) || err.to_string().contains(name),
        || format!("the NotFound error does not name the object: {err}"),
    );
    ctx.ensure(!err.is_retryable(), || {
        format!("the NotFound error is flagged retryable (a fresh attempt cannot help): {err}")
    });
}

/// An object replaced (same size, new bytes, via [`Fixture::overwrite`]) after `stat` is not
/// read silently: `read_at` and a reader session opened with the old meta either keep returning
/// the old bytes, or report `ObjectChanged` themselves, or [`crate::unchanged_since`] (the
/// engine's final `stat`) does. Reader buffers come back on failed reads too.
/// Skipped (with a line on stderr) when the fixture cannot overwrite.
pub fn check_object_change(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("object change");
    let name = "object-change.bin";
    let size = (256 << 10) + 77;
    let old = pattern(size, 41);
    let new = pattern(size, 42);
    let be = ctx.create(fx, name, &old);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let meta = ctx.ok(ctx.stat(&be), "stat");
    expect_bytes(&ctx, &be, &caps, &old, 0, a.max(4096));
    match fx.overwrite(name, &new) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            eprintln!("testkit check 'object change' skipped for {}: {e}", ctx.who);
            return;
        }
        Err(e) => ctx.fail(format_args!(
            "fixture.overwrite({name:?}): {e} (kind {:?})",
            e.kind()
        )),
    }
    // What each path saw: ObjectChanged, or bytes that are not the old ones. A load reads
    // through a reader session and then calls unchanged_since; a conversion of a local object
    // (and the metadata reads of any load) read through read_at, and then unchanged_since. So
    // new bytes from a path must be caught on that path or by unchanged_since: a read_at that
    // notices does not protect a load whose reader session does not.
    #[derive(Clone, Copy, PartialEq)]
    enum Path {
        ReadAt,
        Reader,
    }
    let mut detected: Vec<(Path, String)> = Vec::new();
    let mut not_old: Vec<(Path, String)> = Vec::new();
    let mut judge = |path: Path, what: String, r: &Result<usize>, got: &[u8], off: usize| match r {
        Ok(n) => {
            if got[..*n] != old[off..off + n] {
                not_old.push((path, what));
            }
        }
        Err(e) if e.kind() == ErrorKind::ObjectChanged => detected.push((path, what)),
        Err(e) => ctx.fail(format_args!(
            "{what} after the object was overwritten failed with {e} (kind {:?}), expected the \
             old bytes or ObjectChanged",
            e.kind()
        )),
    };
    let len = a.max(4096);
    let (r, got) = ctx.read_at(&be, 0, filled(&ctx, len, &caps));
    judge(
        Path::ReadAt,
        format!("read_at(0, {len} bytes)"),
        &r,
        got.as_slice(),
        0,
    );

    match ctx.open_reader(&be, &meta, 4) {
        Err(e) if e.kind() == ErrorKind::ObjectChanged => {
            detected.push((Path::Reader, "open_reader".into()));
        }
        Err(e) => ctx.fail(format_args!(
            "open_reader after the object was overwritten failed with {e} (kind {:?}), \
             expected ObjectChanged or a session",
            e.kind()
        )),
        Ok(mut s) => {
            let piece = align_up(64 << 10, a);
            let reads: Vec<(u64, usize)> = (0..align_up(size, a))
                .step_by(piece)
                .map(|off| (off as u64, piece))
                .collect();
            run_reads(&ctx, &be, &mut s, &reads, 4, a, None, None, |i, r, got| {
                let (off, len) = reads[i];
                judge(
                    Path::Reader,
                    format!("read at {off} of {len} bytes"),
                    r,
                    got,
                    off as usize,
                )
            });
            ctx.close(s);
        }
    }
    let b = be.clone();
    let m = meta.clone();
    let stat_detected = match ctx.call(
        || "unchanged_since (stat)".into(),
        move || crate::unchanged_since(b.as_ref(), &m),
    ) {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::ObjectChanged => true,
        Err(e) => ctx.fail(format_args!(
            "unchanged_since (stat) after the object was overwritten failed with {e} (kind \
             {:?}), expected Ok or ObjectChanged",
            e.kind()
        )),
    };
    for (path, name, route) in [
        (Path::Reader, "the reader session", "a load"),
        (
            Path::ReadAt,
            "read_at",
            "a conversion or a load's metadata read",
        ),
    ] {
        let fresh: Vec<&str> = not_old
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, w)| w.as_str())
            .collect();
        let caught = stat_detected || detected.iter().any(|(p, _)| *p == path);
        ctx.ensure(fresh.is_empty() || caught, || {
            format!(
                "after the object was overwritten (same size, new bytes), {} returned bytes of \
                 the new version, and neither {name} nor unchanged_since (a second stat) \
                 reported ObjectChanged{}: {route} would silently mix two versions (stat's \
                 version before: {:?})",
                fresh.join(", "),
                if detected.is_empty() {
                    String::new()
                } else {
                    let other: Vec<&str> = detected.iter().map(|(_, w)| w.as_str()).collect();
                    format!(" (only {} did)", other.join(", "))
                },
                meta.version
            )
        });
    }
}

/// A safetensors file built with `write_header` loads through `read_index`, `plan`, `execute`
/// and `HostSink` with `layout`, every tensor byte-identical. Planned like the Loader plans
/// (alignment only with `direct_io`), with chunks of at most 256 KiB so the load needs many reads.
pub fn check_end_to_end(fx: &dyn Fixture, layout: Layout) {
    let mut ctx = Ctx::new(match layout {
        Layout::Mirror => "end-to-end mirror",
        Layout::Packed { .. } => "end-to-end packed",
    });
    let sizes: [u64; 9] = [1000, 0, 7, 65536, 3, (1 << 20) + 5, 1, 300_001, 4096];
    let mut specs: Vec<(String, DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("layer.{i}.weight"), DType::U8, vec![n], n))
        .collect();
    specs.push(("f32.bias".into(), DType::F32, vec![3, 5], 60));
    let mut meta_kv = BTreeMap::new();
    meta_kv.insert("format".to_string(), "pt".to_string());
    let mut file = ctx.ok(write_header(&specs, &meta_kv), "write_header");
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    for (i, (name, _, _, n)) in specs.iter().enumerate() {
        let d = pattern(*n as usize, 100 + i as u64);
        file.extend_from_slice(&d);
        expected.insert(name.clone(), d);
    }
    let be = ctx.create(fx, "model.safetensors", &file);
    let pc = be.capabilities().preferred_chunk;
    load_and_compare(&ctx, &be, &expected, layout, pc.min(256 << 10));
}

/// A model of at least `2 × preferred_chunk` bytes ([`large_size`]) with a tensor larger than
/// `preferred_chunk` loads end to end with `chunk_size = preferred_chunk` (as the Loader plans).
pub fn check_end_to_end_large(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("end-to-end preferred chunk");
    let probe = ctx.create(fx, "e2e-large-caps.bin", &pattern(4096, 5));
    let pc = probe.capabilities().preferred_chunk.max(1);
    drop(probe);
    let half = (large_size(pc) / 2) as u64;
    let sizes = [half + 1, 3, 0, half - 8192 - 5, 4096 + 77];
    let (file, datas) = u8_model(&sizes, 300);
    let expected: HashMap<String, Vec<u8>> = datas
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("t{i:03}"), d))
        .collect();
    let be = ctx.create(fx, "model-large.safetensors", &file);
    load_and_compare(&ctx, &be, &expected, Layout::Mirror, pc);
}

/// stat → read_index → plan (Loader-style, `chunk`) → execute → HostSink → HostModel, and every
/// tensor compared with `expected`.
fn load_and_compare(
    ctx: &Ctx,
    be: &Arc<dyn Backend>,
    expected: &HashMap<String, Vec<u8>>,
    layout: Layout,
    chunk: usize,
) {
    let caps = be.capabilities();
    let meta = ctx.ok(ctx.stat(be), "stat");
    let (b, m) = (be.clone(), meta.clone());
    let index = ctx.ok(
        ctx.call(
            || "read_index".into(),
            move || crate::format::read_index(b.as_ref(), &m),
        ),
        "read_index",
    );
    ctx.ensure(index.tensors.len() == expected.len(), || {
        format!(
            "index has {} tensors, wrote {}",
            index.tensors.len(),
            expected.len()
        )
    });
    let mut opts = loader_plan_options(&caps, meta.size, chunk);
    opts.layout = layout;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let p = Arc::new(ctx.ok(plan(&index, &sel, &opts), "plan"));
    let eopts = EngineOptions {
        queue_depth: caps.max_concurrency.clamp(1, 32),
        ring_budget: (4 * opts.chunk_size as usize).max(4 << 20),
        progress: None,
        cancel: None,
    };
    let (b, m, pp) = (be.clone(), meta.clone(), p.clone());
    let (sink, stats) = ctx.ok(
        ctx.call(
            || format!("execute (chunk_size {})", opts.chunk_size),
            move || execute(b, &m, pp, HostSink::new(), &eopts),
        ),
        "execute",
    );
    ctx.ensure(stats.reads as usize == p.reads.len(), || {
        format!("{} reads done, plan has {}", stats.reads, p.reads.len())
    });
    let (arena, _) = ctx.ok(sink.into_parts(), "HostSink::into_parts");
    let model = ctx.ok(HostModel::new(arena, index, &p), "HostModel::new");
    ctx.ensure(model.len() == expected.len(), || {
        format!(
            "model has {} tensors, wrote {}",
            model.len(),
            expected.len()
        )
    });
    let mut seen = BTreeSet::new();
    for t in model.tensors() {
        let Some(want) = expected.get(t.name) else {
            ctx.fail(format_args!(
                "the model has a tensor {:?} never written",
                t.name
            ))
        };
        seen.insert(t.name.to_string());
        ctx.ensure(t.data == &want[..], || {
            format!(
                "tensor {:?} ({} bytes) loaded with wrong bytes (chunk_size {})",
                t.name,
                want.len(),
                opts.chunk_size
            )
        });
        if let Layout::Packed { align } = layout {
            ctx.ensure(
                t.data.is_empty() || (t.data.as_ptr() as u64).is_multiple_of(align),
                || {
                    format!(
                        "tensor {:?} is not aligned to {align} in a packed load",
                        t.name
                    )
                },
            );
        }
    }
    ctx.ensure(seen.len() == expected.len(), || {
        format!("{} of {} tensors loaded", seen.len(), expected.len())
    });
}
