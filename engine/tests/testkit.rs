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
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.inner.stat()?.size;
        match self.flaw {
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
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_runs_the_suite_against_a_hanging_backend",
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
    assert!(
        !out.status.success(),
        "the suite passed a hanging backend: {text}"
    );
    assert!(
        text.contains("did not return: the check ran past its deadline of 2 s")
            && text.contains("read_at(")
            && text.contains("broken backend"),
        "{text}"
    );
}
