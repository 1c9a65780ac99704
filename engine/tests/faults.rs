//! Fault injection through the public API: backends, readers and sinks that fail, panic, lie
//! about counts or ids, or lose buffers. Every load must end in a clear error — never a panic of
//! the caller, never a hang, never a partial model reported as complete.
//!
//! Tests that could hang on a regression run the load on a helper thread under a generous
//! watchdog (it only turns a hang into a failure; nothing here measures time).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tensorstream_engine::backend::{ReadDone, ReadRequest, ReaderOptions, ThreadPoolReader};
use tensorstream_engine::*;

/// Turns a hang into a test failure. Never reached by a correct engine.
const WATCHDOG: Duration = Duration::from_secs(120);

fn model_file(sizes: &[u64]) -> (Vec<u8>, Vec<Vec<u8>>) {
    tensorstream_engine::testkit::u8_model(sizes, 0)
}

/// Runs `f` on its own thread; fails the test if it hangs, re-raises its panic as a failure.
fn watchdog<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) => match h.join().unwrap() {
            Ok(r) => r,
            Err(_) => panic!("{what}: the caller panicked instead of getting an error"),
        },
        Err(_) => panic!("{what}: the load hung"),
    }
}

// ---------------------------------------------------------------------------------------------
// Faulty backends and readers.

#[derive(Debug, Clone, Copy, PartialEq)]
enum BackendFault {
    None,
    /// `read_at` fails for the read covering this offset.
    ErrorAt(u64),
    /// `read_at` panics for the read covering this offset.
    PanicAt(u64),
    /// `read_at` returns one byte less than asked (not at EOF) at this offset.
    ShortAt(u64),
    /// `read_at` claims this many bytes more than asked.
    MoreBy(usize),
    /// `read_at` claims this many bytes more than asked, except at offset 0 (where the metadata
    /// of a small file is read in one go).
    MoreByPastZero(usize),
    /// Once the load has started, `stat` reports a new version (every read still succeeds: the
    /// object was rewritten in place with the same size).
    Rewritten,
    /// Once the load has started, `stat` fails.
    StatFails,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ReaderFault {
    None,
    /// `wait()` itself fails on its n-th call.
    WaitErrorAt(usize),
    /// The n-th completion carries an id that was never submitted.
    BogusIdAt(usize),
    /// The n-th completion carries the id of the previous one.
    DuplicateIdAt(usize),
    /// The n-th completion brings back a buffer of its own, not the one it was given.
    OtherBufferAt(usize),
    /// The n-th completion names another offset than the one asked.
    OtherOffsetAt(usize),
    /// After n completions, `in_flight` reports one read more than there is, and `wait` with
    /// nothing in flight blocks (as a reader waiting on its own channel would).
    OverCountAfter(usize),
    /// After the first completion, every read waits until the sink has failed and then comes
    /// back failed, as the HTTP and S3 readers fail the reads in flight once a load is abandoned.
    FailAfterSinkFailed,
}

#[derive(Debug)]
struct Faulty {
    inner: MemoryBackend,
    fault: BackendFault,
    reader: ReaderFault,
    /// Faults apply once the index was read (the header reads go through `read_at` too).
    armed: AtomicBool,
    /// Set by a [`TestSink`] given it (`TestSink::gate`) when it injects its failure.
    sink_failed: Arc<AtomicBool>,
}

fn covers(offset: u64, len: usize, at: u64) -> bool {
    offset <= at && at < offset + len as u64
}

impl Backend for Faulty {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> Result<ObjectMeta> {
        let mut m = self.inner.stat()?;
        m.version = Some("v1".into());
        if self.armed.load(Ordering::SeqCst) {
            match self.fault {
                BackendFault::Rewritten => m.version = Some("v2".into()),
                BackendFault::StatFails => {
                    return Err(Error::new(ErrorKind::Io, "injected stat failure"))
                }
                _ => {}
            }
        }
        Ok(m)
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if !self.armed.load(Ordering::SeqCst) {
            return self.inner.read_at(offset, buf);
        }
        match self.fault {
            BackendFault::ErrorAt(at) if covers(offset, buf.len(), at) => {
                Err(Error::new(ErrorKind::Io, "injected read failure"))
            }
            BackendFault::PanicAt(at) if covers(offset, buf.len(), at) => {
                panic!("injected backend panic")
            }
            BackendFault::ShortAt(at) if covers(offset, buf.len(), at) => {
                let n = buf.len() - 1;
                self.inner.read_at(offset, &mut buf[..n])
            }
            BackendFault::MoreBy(k) => {
                let n = self.inner.read_at(offset, buf)?;
                Ok(n.saturating_add(k))
            }
            BackendFault::MoreByPastZero(k) if offset > 0 => {
                let n = self.inner.read_at(offset, buf)?;
                Ok(n.saturating_add(k))
            }
            _ => self.inner.read_at(offset, buf),
        }
    }
    fn open_reader(
        self: Arc<Self>,
        _meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let fault = self.reader;
        let sink_failed = self.sink_failed.clone();
        Ok(Box::new(FaultyReader {
            inner: ThreadPoolReader::new(self, opts.queue_depth)?,
            fault,
            waits: 0,
            last_id: 0,
            sink_failed,
            abandoned: false,
        }))
    }
}

struct FaultyReader {
    inner: ThreadPoolReader,
    fault: ReaderFault,
    waits: usize,
    last_id: u64,
    sink_failed: Arc<AtomicBool>,
    /// Set when the engine told this reader the load is failing.
    abandoned: bool,
}

impl RangeReader for FaultyReader {
    fn abandon(&mut self) {
        self.abandoned = true;
        self.inner.abandon();
    }
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        self.inner.submit(req)
    }
    fn wait(&mut self) -> Result<ReadDone> {
        if let ReaderFault::OverCountAfter(_) = self.fault {
            if self.inner.in_flight() == 0 {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
        self.waits += 1;
        if self.fault == ReaderFault::WaitErrorAt(self.waits) {
            return Err(Error::new(ErrorKind::Io, "injected reader breakdown"));
        }
        let mut d = self.inner.wait()?;
        if self.fault == ReaderFault::FailAfterSinkFailed && self.waits > 1 {
            while !self.sink_failed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The sink sets this flag inside `accept`, just before it returns its error; the
            // engine learns of the failure only after that return. Give that thread time to
            // get there. A read fails only once the engine told this reader to abandon the load
            // (as a real reader's reads fail): before, it comes back as it was read, so a slow
            // machine never fails a read the engine could not yet tell from a real failure.
            std::thread::sleep(Duration::from_millis(200));
            if self.abandoned {
                d.result = Err(Error::new(
                    ErrorKind::Io,
                    "injected: read stopped because the load was abandoned",
                )
                .with_retryable(true));
            }
        }
        match self.fault {
            ReaderFault::BogusIdAt(n) if n == self.waits => d.id += 1_000_000,
            ReaderFault::DuplicateIdAt(n) if n == self.waits => d.id = self.last_id,
            ReaderFault::OtherBufferAt(n) if n == self.waits => {
                let mut own = IoBuf::aligned(d.buf.len(), 4096)?;
                own.as_mut_slice().copy_from_slice(d.buf.as_slice());
                d.buf = own;
            }
            ReaderFault::OtherOffsetAt(n) if n == self.waits => d.offset += 1,
            _ => {}
        }
        self.last_id = d.id;
        Ok(d)
    }
    fn in_flight(&self) -> usize {
        match self.fault {
            ReaderFault::OverCountAfter(n) if self.waits >= n => self.inner.in_flight() + 1,
            _ => self.inner.in_flight(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sinks that record what happened to them, and faulty ones.

#[derive(Default)]
struct Journal {
    accepted: AtomicUsize,
    finished: AtomicBool,
    dropped: AtomicBool,
    /// Regions of the staging slots this sink handed out (to check they all came back).
    regions: Mutex<Vec<Arc<dyn MemRegion>>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SinkFault {
    None,
    /// `accept` fails on its n-th call.
    ErrorAt(usize),
    /// `accept` panics on its n-th call.
    PanicAt(usize),
    /// Staging slots are dropped instead of given back.
    LoseSlots,
}

struct TestSink {
    inner: HostSink,
    fault: SinkFault,
    journal: Arc<Journal>,
    /// Set when the injected failure happens (see [`ReaderFault::FailAfterSinkFailed`]).
    gate: Option<Arc<AtomicBool>>,
}

impl TestSink {
    fn new(fault: SinkFault) -> (Self, Arc<Journal>) {
        let journal = Arc::new(Journal::default());
        (
            TestSink {
                inner: HostSink::new(),
                fault,
                journal: journal.clone(),
                gate: None,
            },
            journal,
        )
    }
}

impl Sink for TestSink {
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>> {
        self.inner.prepare(plan)
    }
    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>> {
        let n = self.journal.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            SinkFault::ErrorAt(k) if k == n => {
                if let Some(g) = &self.gate {
                    g.store(true, Ordering::SeqCst);
                }
                return Err(Error::new(ErrorKind::Device, "injected sink failure"));
            }
            SinkFault::PanicAt(k) if k == n => panic!("injected sink panic"),
            _ => {}
        }
        let back = self.inner.accept(read, buf)?;
        if self.fault == SinkFault::LoseSlots {
            return Ok(Vec::new());
        }
        Ok(back)
    }
    fn finish(&mut self) -> Result<Vec<IoBuf>> {
        self.journal.finished.store(true, Ordering::SeqCst);
        self.inner.finish()
    }
    fn staging(&mut self, count: usize, slot_size: usize) -> Result<Option<Vec<IoBuf>>> {
        let mut slots = Vec::new();
        for _ in 0..count {
            let b = IoBuf::aligned(slot_size, 4096)?;
            self.journal
                .regions
                .lock()
                .unwrap()
                .push(b.region().clone());
            slots.push(b);
        }
        Ok(Some(slots))
    }
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.journal.dropped.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Driver.

struct Setup {
    backend: Arc<dyn Backend>,
    meta: ObjectMeta,
    index: TensorIndex,
    plan: Arc<Plan>,
    datas: Vec<Vec<u8>>,
    /// The flag [`ReaderFault::FailAfterSinkFailed`] waits for.
    sink_failed: Arc<AtomicBool>,
}

fn setup(fault: BackendFault, reader: ReaderFault, layout: Layout) -> Setup {
    let (file, datas) = model_file(&[5000, 70_000, 3, 100_000, 4096, 33_333, 12_000]);
    let inner = MemoryBackend::new("mem://faulty", file);
    let faulty = Arc::new(Faulty {
        inner,
        fault,
        reader,
        armed: AtomicBool::new(false),
        sink_failed: Arc::new(AtomicBool::new(false)),
    });
    let backend: Arc<dyn Backend> = faulty.clone();
    let meta = backend.stat().unwrap();
    let index = format::read_index(backend.as_ref(), &meta).unwrap();
    faulty.armed.store(true, Ordering::SeqCst);
    let mut o = PlanOptions::new(meta.size);
    o.chunk_size = 16 << 10;
    o.layout = layout;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let plan = Arc::new(plan(&index, &sel, &o).unwrap());
    assert!(plan.reads.len() > 8, "the tests want many reads");
    Setup {
        backend,
        meta,
        index,
        plan,
        datas,
        sink_failed: faulty.sink_failed.clone(),
    }
}

fn eopts() -> EngineOptions {
    EngineOptions {
        queue_depth: 4,
        ring_budget: 4 * (16 << 10),
        progress: None,
        cancel: None,
    }
}

const PACKED: Layout = Layout::Packed { align: 256 };

/// Runs a load with `sink` under the watchdog.
fn run<S: Sink>(s: &Setup, sink: S) -> Result<(S, EngineStats)> {
    let (be, meta, plan) = (s.backend.clone(), s.meta.clone(), s.plan.clone());
    watchdog("load", move || execute(be, &meta, plan, sink, &eopts()))
}

/// The error a faulty load must end in; checks it names the object.
fn must_fail<S: Sink>(r: Result<(S, EngineStats)>) -> Error {
    let e = match r {
        Ok(_) => panic!("a faulty load was reported as complete"),
        Err(e) => e,
    };
    assert_eq!(
        e.location(),
        Some("mem://faulty"),
        "error must name the object: {e}"
    );
    e
}

fn no_slot_outstanding(j: &Journal) {
    for r in j.regions.lock().unwrap().iter() {
        assert_eq!(
            Arc::strong_count(r),
            1,
            "a staging slot is still held after the load returned"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Baseline: the harness itself loads correctly when nothing is injected.

#[test]
fn harness_loads_correctly_without_faults() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::None, layout);
        let (sink, _) = TestSink::new(SinkFault::None);
        let (sink, stats) = run(&s, sink).unwrap();
        assert_eq!(stats.reads as usize, s.plan.reads.len());
        assert!(sink.journal.finished.load(Ordering::SeqCst));
        let j = sink.journal.clone();
        let mut sink = sink;
        let (arena, _) = std::mem::take(&mut sink.inner).into_parts().unwrap();
        let m = HostModel::new(arena, s.index.clone(), &s.plan).unwrap();
        for (i, t) in m.tensors().enumerate() {
            assert_eq!(t.data, &s.datas[i][..], "{layout:?} tensor {i}");
        }
        no_slot_outstanding(&j);
    }
}

// ---------------------------------------------------------------------------------------------
// Read errors.

#[test]
fn read_error_in_flight_fails_with_range_and_gives_every_slot_back() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::ErrorAt(60_000), ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains("injected read failure"), "{e}");
        let r = e.range().expect("error names the range");
        assert!(r.contains(&60_000), "{e}");
        assert!(
            j.dropped.load(Ordering::SeqCst),
            "sink dropped before execute returned"
        );
        no_slot_outstanding(&j);
    }
}

#[test]
fn short_read_before_eof_is_an_error_naming_the_range() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::ShortAt(90_000), ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.range().expect("range").contains(&90_000), "{e}");
        no_slot_outstanding(&j);
    }
}

#[test]
fn reader_wait_error_joins_the_sink_and_names_the_object() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::WaitErrorAt(3), layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains("injected reader breakdown"), "{e}");
        // The sink thread was joined (the sink is gone) before execute returned.
        assert!(j.dropped.load(Ordering::SeqCst), "sink thread left running");
        no_slot_outstanding(&j);
    }
}

#[test]
fn completion_with_unknown_id_is_an_error_not_a_panic() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::BogusIdAt(2), layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains("id"), "{e}");
        no_slot_outstanding(&j);
    }
}

/// A load through a reader with `fault`, in both layouts, must fail with `needle` in its message.
fn reader_fault_fails_with(fault: ReaderFault, needle: &str) {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, fault, layout);
        let (sink, _j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains(needle), "{fault:?}: {e}");
    }
}

#[test]
fn a_completion_with_another_buffer_or_offset_is_an_error() {
    // A reader that reads into a buffer of its own and returns that one would leave the
    // destination unwritten (zeros) while the load reported success.
    reader_fault_fails_with(ReaderFault::OtherBufferAt(3), "different buffer");
    reader_fault_fails_with(ReaderFault::OtherOffsetAt(3), "different buffer");
}

#[test]
fn a_reader_over_counting_its_reads_is_an_error_not_a_hang() {
    reader_fault_fails_with(ReaderFault::OverCountAfter(3), "reader bug");
}

#[test]
fn duplicate_completion_is_not_reported_as_a_complete_load() {
    reader_fault_fails_with(ReaderFault::DuplicateIdAt(4), "twice");
}

#[test]
fn backend_claiming_more_bytes_than_asked_is_an_error_not_a_panic() {
    for more in [1usize, usize::MAX] {
        let s = setup(BackendFault::MoreBy(more), ReaderFault::None, PACKED);
        let (sink, _j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.message().contains("more"), "{e}");
        assert!(e.range().is_some(), "{e}");
    }
}

/// The metadata reads and both read paths of a conversion (`read_at`, and a reader session)
/// refuse a count larger than asked too, naming the range (they used to call it the end of the
/// object, or take it).
#[test]
fn over_claims_in_metadata_reads_and_conversions_are_corrupt_errors() {
    use tensorstream_engine::format::convert::{convert, convert_shared, ConvertOptions};
    let more_than_asked = |e: &Error, what: &str| {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message().contains("more than requested"), "{what}: {e}");
        assert!(e.range().is_some(), "{what}: {e}");
        assert_eq!(e.location(), Some("mem://faulty"), "{what}: {e}");
    };
    let s = setup(BackendFault::MoreBy(5), ReaderFault::None, PACKED);
    let e = format::read_index(s.backend.as_ref(), &s.meta).unwrap_err();
    more_than_asked(&e, "read_index");

    let s = setup(BackendFault::MoreByPastZero(5), ReaderFault::None, PACKED);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let e = convert(s.backend.as_ref(), &out, &ConvertOptions::default()).unwrap_err();
    more_than_asked(&e, "convert (read_at)");
    let known = Some((s.meta.clone(), s.index.clone()));
    let e = convert_shared(s.backend.clone(), known, &out, &ConvertOptions::default()).unwrap_err();
    more_than_asked(&e, "convert (reader session)");
    assert!(!out.exists());
}

#[test]
fn backend_panic_is_an_error_not_a_hang() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::PanicAt(60_000), ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains("panic"), "{e}");
        assert!(e.range().expect("range").contains(&60_000), "{e}");
        no_slot_outstanding(&j);
    }
}

// ---------------------------------------------------------------------------------------------
// Sink faults.

#[test]
fn sink_error_mid_load_stops_the_load() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::ErrorAt(3));
        let e = must_fail(run(&s, sink));
        assert_eq!(e.kind(), ErrorKind::Device, "{e}");
        assert!(e.message().contains("injected sink failure"), "{e}");
        assert!(!j.finished.load(Ordering::SeqCst));
        no_slot_outstanding(&j);
    }
}

#[test]
fn a_sink_failure_is_reported_not_the_reads_it_made_the_reader_abandon() {
    // The reads still in flight when the sink fails come back failed (an HTTP or S3 reader
    // fails them at once on `abandon`): the load must report why it stopped, the sink's
    // error, not those consequences.
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::FailAfterSinkFailed, layout);
        let (mut sink, j) = TestSink::new(SinkFault::ErrorAt(1));
        sink.gate = Some(s.sink_failed.clone());
        let e = must_fail(run(&s, sink));
        assert_eq!(e.kind(), ErrorKind::Device, "{layout:?}: {e}");
        assert!(e.message().contains("injected sink failure"), "{e}");
        no_slot_outstanding(&j);
    }
}

#[test]
fn sink_panic_is_an_error() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::None, ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::PanicAt(2));
        let e = must_fail(run(&s, sink));
        assert!(e.message().contains("panicked"), "{e}");
        no_slot_outstanding(&j);
    }
}

#[test]
fn sink_losing_staging_slots_is_an_error_not_a_hang() {
    let s = setup(BackendFault::None, ReaderFault::None, PACKED);
    let (sink, _j) = TestSink::new(SinkFault::LoseSlots);
    let e = must_fail(run(&s, sink));
    assert!(e.message().contains("staging"), "{e}");
}

#[test]
fn failed_load_never_finishes_the_sink() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::ErrorAt(60_000), ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        must_fail(run(&s, sink));
        assert!(j.dropped.load(Ordering::SeqCst));
        assert!(
            !j.finished.load(Ordering::SeqCst),
            "finish() was called on a load with a failed read"
        );
    }
}

/// An object rewritten in place during the load (same size, every read succeeds) is caught by
/// the engine's last look at the object: the load fails, the sink is never finished.
#[test]
fn object_changed_during_the_load_is_an_error_not_a_mixed_model() {
    for layout in [Layout::Mirror, PACKED] {
        let s = setup(BackendFault::Rewritten, ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
        assert!(e.message().contains("v1 -> v2"), "{e}");
        assert!(!j.finished.load(Ordering::SeqCst));
        no_slot_outstanding(&j);

        let s = setup(BackendFault::StatFails, ReaderFault::None, layout);
        let (sink, j) = TestSink::new(SinkFault::None);
        let e = must_fail(run(&s, sink));
        assert!(e.to_string().contains("did not change"), "{e}");
        assert!(!j.finished.load(Ordering::SeqCst));
    }
}

// ---------------------------------------------------------------------------------------------
// Host sink and model.

/// A Packed host load of a large arena: the arena's prefault thread is still running when the
/// first staged reads arrive (here: right after `prepare`); the copies must not be refused for it.
#[test]
fn packed_host_load_while_the_arena_prefaults() {
    let (file, datas) = model_file(&[64 << 20, 4096]);
    let be = MemoryBackend::new("mem", file);
    let meta = be.stat().unwrap();
    let index = format::read_index(&be, &meta).unwrap();
    let mut o = PlanOptions::new(meta.size);
    o.chunk_size = 1 << 20;
    o.layout = PACKED;
    let plan = Arc::new(plan(&index, &[0, 1], &o).unwrap());
    let mut sink = HostSink::new().with_prefault(true);
    let direct = sink.prepare(&plan).unwrap();
    assert!(
        direct.iter().all(|d| d.is_none()),
        "a Packed plan is staged"
    );
    // Drive the sink the way the engine does, as fast as possible after `prepare`.
    let mut slot = IoBuf::aligned(1 << 20, 4096).unwrap();
    for (i, r) in plan.reads.iter().enumerate() {
        assert!(slot.set_len(r.len() as usize));
        let n = be.read_at(r.obj.start, slot.as_mut_slice()).unwrap();
        assert_eq!(n as u64, r.len());
        let mut back = sink.accept(i, slot).unwrap();
        slot = back.pop().expect("a staged slot comes back");
    }
    assert!(sink.finish().unwrap().is_empty());
    let (arena, _) = sink.into_parts().unwrap();
    let m = HostModel::new(arena, index, &plan).unwrap();
    for (i, t) in m.tensors().enumerate() {
        assert!(t.data == &datas[i][..], "tensor {i} differs");
    }
}

#[test]
fn host_model_rejects_a_plan_from_another_index() {
    let s = setup(BackendFault::None, ReaderFault::None, Layout::Mirror);
    // A finished load of the setup's plan: its arena.
    let loaded = || {
        let (sink, _) = execute(
            s.backend.clone(),
            &s.meta,
            s.plan.clone(),
            HostSink::new(),
            &eopts(),
        )
        .unwrap();
        sink.into_parts().unwrap().0
    };
    let arena = loaded();
    let mut small = s.index.clone();
    small.tensors.truncate(2);
    let r = HostModel::new(arena, small, &s.plan);
    let e = match r {
        Ok(m) => {
            // Before the fix this is where a caller would panic.
            let n = m.tensors().count();
            panic!("model over a mismatched index accepted ({n} tensors)")
        }
        Err(e) => e,
    };
    assert!(e.message().contains("index"), "{e}");

    // An index of as many tensors, but other ones (here: the same tensors in reverse order,
    // every size different): names, dtypes and shapes would be attached to wrong bytes.
    let arena = loaded();
    let mut other = s.index.clone();
    other.tensors.reverse();
    let e = match HostModel::new(arena, other, &s.plan) {
        Ok(_) => panic!("model over another index of the same length accepted"),
        Err(e) => e,
    };
    assert!(e.message().contains("another index"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Tensor hooks (verification / decryption run on worker threads).

/// A hook that panics on one tensor and counts the calls.
struct PanickyHook {
    on: usize,
    calls: Arc<AtomicUsize>,
}

impl tensorstream_engine::sink::TensorHook for PanickyHook {
    fn process(&self, tensor: usize, _bytes: &mut [u8], _data_start: usize) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if tensor == self.on {
            panic!("injected hook panic");
        }
        Ok(())
    }
}

/// A panicking hook fails the load with an error naming the tensor (not a generic "worker
/// panicked" or "workers stopped"), with one worker or several.
#[test]
fn hook_panic_is_an_error_naming_the_tensor() {
    for threads in [1, 4] {
        let s = setup(BackendFault::None, ReaderFault::None, Layout::Mirror);
        let calls = Arc::new(AtomicUsize::new(0));
        let hook = Arc::new(PanickyHook {
            on: 1,
            calls: calls.clone(),
        });
        let e = must_fail(run(&s, HostSink::with_hook(hook, threads)));
        assert!(e.message().contains("tensor #1"), "{threads} threads: {e}");
        assert!(calls.load(Ordering::SeqCst) >= 1);
    }
}

/// A backend whose data reads cancel the load and then fail, as a reader that stops retrying
/// once the cancel flag is set does.
#[derive(Debug)]
struct CancelThenFail {
    inner: MemoryBackend,
    flag: Arc<AtomicBool>,
    armed: AtomicBool,
}

impl Backend for CancelThenFail {
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
        if !self.armed.load(Ordering::SeqCst) {
            return self.inner.read_at(offset, buf);
        }
        self.flag.store(true, Ordering::SeqCst);
        Err(Error::new(ErrorKind::Io, "stopped retrying: load cancelled").with_retryable(true))
    }
}

#[test]
fn a_read_failing_after_a_cancel_reports_the_cancel() {
    let (file, _) = model_file(&[70_000, 100_000]);
    let flag = Arc::new(AtomicBool::new(false));
    let be = Arc::new(CancelThenFail {
        inner: MemoryBackend::new("mem://cancelled", file),
        flag: flag.clone(),
        armed: AtomicBool::new(false),
    });
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    be.armed.store(true, Ordering::SeqCst);
    let mut o = PlanOptions::new(meta.size);
    o.chunk_size = 16 << 10;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let plan = Arc::new(plan(&index, &sel, &o).unwrap());
    // One read at a time: the failing read is the only one (no other read can come back
    // first, given back unread as Cancelled by the reader).
    let opts = EngineOptions {
        cancel: Some(flag),
        queue_depth: 1,
        ..eopts()
    };
    let backend: Arc<dyn Backend> = be;
    let r = watchdog("load", move || {
        execute(backend, &meta, plan, HostSink::new(), &opts).map(|_| ())
    });
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(e.to_string().contains("stopped retrying"), "{e}");
}

/// A backend whose reads are counted; every read after the first waits until `released`.
#[derive(Debug)]
struct Slow {
    inner: MemoryBackend,
    reads: AtomicUsize,
    released: AtomicBool,
}

impl Backend for Slow {
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
        if self.reads.fetch_add(1, Ordering::SeqCst) > 0 {
            while !self.released.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.inner.read_at(offset, buf)
    }
}

#[test]
fn the_default_reader_gives_back_queued_reads_unread_once_stopped() {
    for how in ["abandon", "cancel"] {
        let be = Arc::new(Slow {
            inner: MemoryBackend::new("mem://slow", vec![7u8; 1 << 20]),
            reads: AtomicUsize::new(0),
            released: AtomicBool::new(false),
        });
        let meta = be.stat().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut o = ReaderOptions::new(1); // one worker: the other reads queue behind it
        o.cancel = Some(flag.clone());
        let mut r = be.clone().open_reader(&meta, &o).unwrap();
        for id in 0..20u64 {
            r.submit(ReadRequest {
                id,
                offset: id * 4096,
                buf: IoBuf::aligned(4096, 1).unwrap(),
            })
            .unwrap();
        }
        let first = r.wait().unwrap();
        assert!(first.result.is_ok());
        if how == "abandon" {
            r.abandon();
        } else {
            flag.store(true, Ordering::SeqCst);
        }
        // The one worker may have started the second read (it waits for this): no later one.
        be.released.store(true, Ordering::SeqCst);
        let mut unread = 0;
        while r.in_flight() > 0 {
            let d = r.wait().unwrap();
            if let Err(e) = d.result {
                assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
                unread += 1;
            }
        }
        let reads = be.reads.load(Ordering::SeqCst);
        assert!(reads <= 2, "{how}: {reads} reads of 20 after the stop");
        assert_eq!(unread + reads, 20, "{how}: every read given back");
    }
}
