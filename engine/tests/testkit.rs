//! The conformance suite run against the in-memory backend (so the suite itself is tested), and
//! against deliberately broken backends (so each kind of breakage is seen to fail the suite).
//! Needs `--features testkit`.

use std::sync::Arc;

use tensorstream_engine::testkit::{self, Fixture};
use tensorstream_engine::*;

struct MemFixture;

impl Fixture for MemFixture {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(MemoryBackend::new(name, data.to_vec())))
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        Err(Error::new(ErrorKind::NotFound, "no such object").with_location(name))
    }
}

#[test]
fn memory_backend_passes_the_suite() {
    testkit::run_all(&MemFixture);
}

/// What a broken backend gets wrong.
#[derive(Debug, Clone, Copy)]
enum Flaw {
    /// Returns stale bytes past the end instead of 0.
    GarbagePastEnd,
    /// Flips one byte of every read at an offset above 1 MiB.
    CorruptsData,
    /// Reports a missing object as a generic I/O error.
    MissingIsIo,
    /// Claims an alignment that is not a power of two.
    BadAlignment,
    /// Writes a byte past the requested length.
    Overruns,
    /// Flips one byte of reads at or above 4 MiB (above the suite's small objects).
    CorruptsAbove4MiB,
    /// Fails zero-length reads.
    ZeroLengthFails,
    /// Marks its past-the-end errors retryable (a retry can never succeed).
    RetryablePastEnd,
    /// Declares an alignment of 4096 without direct I/O (the Loader would plan unaligned reads).
    AlignedWithoutDirect,
    /// Never returns from a read of data (a backend stuck on a server that does not answer).
    HangsInReadAt,
    /// Keeps only the low 32 bits of offsets (reads at 4 GiB + k return the bytes at k).
    Keeps32BitOffsets,
    /// Its reader session drops the reads still queued when it is abandoned (they never come
    /// back: a failing load would wait for them for ever).
    LosesReadsOnAbandon,
}

#[derive(Debug)]
struct Broken {
    inner: MemoryBackend,
    flaw: Flaw,
}

impl Backend for Broken {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> Result<ObjectMeta> {
        self.inner.stat()
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.kind = "broken";
        match self.flaw {
            Flaw::BadAlignment => c.alignment = 3,
            Flaw::AlignedWithoutDirect => c.alignment = 4096,
            _ => {}
        }
        c
    }
    fn open_reader(
        self: Arc<Self>,
        _meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        if matches!(self.flaw, Flaw::LosesReadsOnAbandon) {
            return Ok(Box::new(LossyReader {
                be: self,
                queue: std::collections::VecDeque::new(),
                in_flight: 0,
            }));
        }
        Ok(Box::new(
            ThreadPoolReader::new(self, opts.queue_depth)?.cancelled_by(opts.cancel.clone()),
        ))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.inner.stat()?.size;
        match self.flaw {
            Flaw::Keeps32BitOffsets => self.inner.read_at(offset as u32 as u64, buf),
            Flaw::GarbagePastEnd if offset >= size => {
                buf.fill(7);
                Ok(buf.len())
            }
            Flaw::CorruptsData if offset > 1 << 20 && !buf.is_empty() => {
                let n = self.inner.read_at(offset, buf)?;
                if n > 0 {
                    buf[0] ^= 0xFF;
                }
                Ok(n)
            }
            Flaw::Overruns => {
                // Reads one byte into a larger window the caller never asked for: simulate by
                // dirtying the last byte of a short read's unread tail.
                let n = self.inner.read_at(offset, buf)?;
                if n < buf.len() {
                    buf[n] = 0;
                }
                Ok(n)
            }
            Flaw::CorruptsAbove4MiB if offset >= 4 << 20 && !buf.is_empty() => {
                let n = self.inner.read_at(offset, buf)?;
                if n > 0 {
                    buf[0] ^= 0xFF;
                }
                Ok(n)
            }
            Flaw::ZeroLengthFails if buf.is_empty() => Err(Error::invalid("empty read")),
            Flaw::HangsInReadAt if !buf.is_empty() => loop {
                std::thread::park();
            },
            Flaw::RetryablePastEnd if offset > size => {
                Err(Error::new(ErrorKind::RangeNotSatisfiable, "past the end").with_retryable(true))
            }
            _ => self.inner.read_at(offset, buf),
        }
    }
}

/// A reader that serves its queue one read per `wait`, and forgets the queue on `abandon`.
struct LossyReader {
    be: Arc<Broken>,
    queue: std::collections::VecDeque<ReadRequest>,
    in_flight: usize,
}

impl RangeReader for LossyReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        self.queue.push_back(req);
        self.in_flight += 1;
        Ok(())
    }
    fn wait(&mut self) -> Result<ReadDone> {
        let Some(mut req) = self.queue.pop_front() else {
            // The abandoned reads are gone: nothing will ever complete.
            loop {
                std::thread::park();
            }
        };
        self.in_flight -= 1;
        let result = self.be.inner.read_at(req.offset, req.buf.as_mut_slice());
        Ok(ReadDone {
            id: req.id,
            offset: req.offset,
            buf: req.buf,
            result,
        })
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn abandon(&mut self) {
        self.queue.clear(); // the flaw: the buffers and their completions are dropped
    }
}

struct BrokenFixture(Flaw);

impl Fixture for BrokenFixture {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(Broken {
            inner: MemoryBackend::new(name, data.to_vec()),
            flaw: self.0,
        }))
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        match self.0 {
            Flaw::MissingIsIo => Err(Error::new(ErrorKind::Io, "oops").with_location(name)),
            _ => MemFixture.missing(name),
        }
    }
}

fn failure_message(flaw: Flaw) -> String {
    let r = std::panic::catch_unwind(|| testkit::run_all(&BrokenFixture(flaw)));
    let err = r.expect_err("the suite passed a broken backend");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn broken_backends_fail_the_suite_with_a_named_check() {
    for (flaw, check) in [
        (Flaw::BadAlignment, "capabilities"),
        (Flaw::GarbagePastEnd, "stat"),
        (Flaw::CorruptsData, "read_at"),
        (Flaw::Overruns, "read_at"),
        (Flaw::MissingIsIo, "missing object"),
        (Flaw::CorruptsAbove4MiB, "read_at large"),
        (Flaw::ZeroLengthFails, "read_at"),
        (Flaw::RetryablePastEnd, "read_at"),
        (Flaw::AlignedWithoutDirect, "capabilities"),
        (Flaw::Keeps32BitOffsets, "read_at"),
    ] {
        let msg = failure_message(flaw);
        assert!(
            msg.contains(&format!("testkit check '{check}' failed for ")),
            "{flaw:?}: unexpected failure message {msg:?}"
        );
        if !matches!(flaw, Flaw::MissingIsIo) {
            assert!(
                msg.contains("broken backend"),
                "{flaw:?}: message does not name the backend: {msg:?}"
            );
        }
    }
}

/// Runs the ignored test `name` of this binary in a child process whose checks have a 2 s
/// deadline, checks that it failed, and returns its output.
fn failing_child(name: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TENSORSTREAM_TESTKIT_DEADLINE_S", "2")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{name}: the suite passed: {text}");
    text
}

/// Run by `a_backend_call_that_never_returns_fails_the_check_at_its_deadline`, in a child
/// process with a short deadline (the variable is read per check; setting it here would race
/// the other tests of this binary).
#[test]
#[ignore = "run in a child process by a_backend_call_that_never_returns_fails_the_check_at_its_deadline"]
fn child_runs_the_suite_against_a_hanging_backend() {
    testkit::run_all(&BrokenFixture(Flaw::HangsInReadAt));
}

#[test]
fn a_backend_call_that_never_returns_fails_the_check_at_its_deadline() {
    let text = failing_child("child_runs_the_suite_against_a_hanging_backend");
    assert!(
        text.contains("did not return: the check ran past its deadline of 2 s")
            && text.contains("read_at(")
            && text.contains("broken backend"),
        "{text}"
    );
}

/// Run by `a_reader_that_loses_abandoned_reads_fails_the_abandon_check`, in a child process
/// with a short deadline.
#[test]
#[ignore = "run in a child process by a_reader_that_loses_abandoned_reads_fails_the_abandon_check"]
fn child_runs_the_suite_against_a_reader_that_loses_abandoned_reads() {
    testkit::run_all(&BrokenFixture(Flaw::LosesReadsOnAbandon));
}

/// A reader session that drops its queued reads on `abandon` passes every other check (it
/// serves reads correctly), and fails 'reader abandon' at the deadline, naming the wait.
#[test]
fn a_reader_that_loses_abandoned_reads_fails_the_abandon_check() {
    let text = failing_child("child_runs_the_suite_against_a_reader_that_loses_abandoned_reads");
    assert!(
        text.contains("testkit check 'reader abandon' failed for broken backend")
            && text.contains("wait() with reads pending"),
        "{text}"
    );
}

/// Objects that can be overwritten in place (same size), read by backends that notice a change
/// in different places.
#[derive(Clone, Copy, Debug)]
enum Detects {
    /// `stat` reports a version that changes with every overwrite (the engine's final `stat`
    /// catches it): correct.
    StatVersion,
    /// Only `read_at` checks the bytes against the version it was opened on; its reader
    /// session does not, and `stat` has no version: loads would mix versions.
    OnlyReadAt,
}

/// An object's generation (bumped by each overwrite) and bytes.
type Cell = Arc<std::sync::Mutex<(u64, Arc<Vec<u8>>)>>;

#[derive(Debug)]
struct Stored {
    name: String,
    cell: Cell,
    opened: u64,
    detects: Detects,
}

impl Stored {
    fn current(&self) -> (u64, Arc<Vec<u8>>) {
        let g = self.cell.lock().unwrap();
        (g.0, g.1.clone())
    }
}

fn copy_out(data: &[u8], offset: u64, buf: &mut [u8]) -> usize {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

impl Backend for Stored {
    fn location(&self) -> &str {
        &self.name
    }
    fn stat(&self) -> Result<ObjectMeta> {
        let (generation, data) = self.current();
        Ok(ObjectMeta {
            size: data.len() as u64,
            version: match self.detects {
                Detects::StatVersion => Some(format!("g{generation}")),
                Detects::OnlyReadAt => None,
            },
        })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kind: "stored",
            ..Capabilities::default()
        }
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (generation, data) = self.current();
        if matches!(self.detects, Detects::OnlyReadAt) && generation != self.opened {
            return Err(
                Error::new(ErrorKind::ObjectChanged, "overwritten").with_location(&self.name)
            );
        }
        Ok(copy_out(&data, offset, buf))
    }
    fn open_reader(
        self: Arc<Self>,
        _meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let cell = self.cell.clone();
        let read = move |off: u64, buf: &mut [u8]| -> Result<usize> {
            let data = cell.lock().unwrap().1.clone();
            Ok(copy_out(&data, off, buf))
        };
        Ok(Box::new(ThreadPoolReader::with_fn(
            Arc::new(read),
            opts.queue_depth.clamp(1, 64),
            "stored",
        )?))
    }
}

struct StoreFixture {
    detects: Detects,
    objects: std::sync::Mutex<std::collections::HashMap<String, Cell>>,
}

impl Fixture for StoreFixture {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        let cell = Arc::new(std::sync::Mutex::new((0, Arc::new(data.to_vec()))));
        self.objects
            .lock()
            .unwrap()
            .insert(name.to_string(), cell.clone());
        Ok(Arc::new(Stored {
            name: name.to_string(),
            cell,
            opened: 0,
            detects: self.detects,
        }))
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        Err(Error::new(ErrorKind::NotFound, "no such object").with_location(name))
    }
    fn overwrite(&self, name: &str, data: &[u8]) -> Result<()> {
        let objects = self.objects.lock().unwrap();
        let cell = objects
            .get(name)
            .expect("overwrite of an object never created");
        let mut g = cell.lock().unwrap();
        *g = (g.0 + 1, Arc::new(data.to_vec()));
        Ok(())
    }
}

/// The object-change check passes a backend whose `stat` version catches an overwrite, and
/// fails one where only `read_at` notices it (its reader session, which loads read through,
/// returns the new bytes and `stat` has no version to compare).
#[test]
fn a_change_noticed_only_by_read_at_fails_the_object_change_check() {
    let fixture = |detects| StoreFixture {
        detects,
        objects: Default::default(),
    };
    testkit::check_object_change(&fixture(Detects::StatVersion));
    let r = std::panic::catch_unwind(|| {
        testkit::check_object_change(&fixture(Detects::OnlyReadAt));
    });
    let err = r.expect_err("the check passed a reader that mixes versions");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("testkit check 'object change' failed for stored backend")
            && msg.contains("neither the reader session nor unchanged_since")
            && msg.contains("(only read_at("),
        "{msg}"
    );
}
