//! tensorstream-engine: the core of tensorstream.
//!
//! Data flows one way: a [`Backend`] (storage) → a format reader ([`mod@format`]) → a
//! [`TensorIndex`] → a [`Plan`] ([`mod@plan`]) → the engine ([`pipeline`]) → a [`Sink`] → a
//! loaded model. Third-party storage implements [`Backend`] and runs the conformance suite
// The suite's module exists only with feature `testkit` (docs.rs builds with it): link it then.
#![cfg_attr(feature = "testkit", doc = "([`testkit`]) against itself.")]
#![cfg_attr(
    not(feature = "testkit"),
    doc = "(module `testkit`, feature `testkit`) against itself."
)]
//!
//! `unsafe` lives only in [`mem`] (owned I/O buffers over raw memory); every other module forbids
//! it.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod backend;
pub mod dtype;
pub mod error;
#[forbid(unsafe_code)]
pub mod format;
#[forbid(unsafe_code)]
pub mod index;
pub mod mem;
#[forbid(unsafe_code)]
pub mod model;
#[forbid(unsafe_code)]
pub mod pipeline;
#[forbid(unsafe_code)]
pub mod plan;
#[forbid(unsafe_code)]
pub mod sink;
#[cfg(feature = "testkit")]
#[forbid(unsafe_code)]
pub mod testkit;
#[forbid(unsafe_code)]
pub mod uri;

pub use backend::{
    Backend, BackendExt, Capabilities, MemoryBackend, ObjectMeta, RangeReader, ReadDone,
    ReadRequest, ReaderOptions, ThreadPoolReader,
};
pub use dtype::DType;
pub use error::{terminal_safe, Error, ErrorKind, Result};
pub use index::{Format, TensorIndex, TensorInfo, TensorRole, TensorSource};
pub use mem::{Arena, IoBuf, MemRegion};
pub use model::{HostModel, TensorView};
pub use pipeline::{execute, unchanged_since, EngineOptions, EngineStats};
pub use plan::{plan, Layout, Plan, PlanOptions};
pub use sink::{HostSink, Sink};

/// Shows the library's warnings on stderr as `tensorstream: …` lines, for programs without a
/// logger of their own (the CLI calls it). The crates report through the [`log`] facade (level
/// Warn: an I/O fallback taken, a server retried, memory that could not be pinned) and print
/// nothing themselves; a program with its own logger (`env_logger`, `tracing-log` …) gets them
/// there instead. Does nothing when a logger is already installed.
pub fn log_warnings_to_stderr() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            // Only this project's crates (targets `tensorstream_*`), not the dependencies'.
            m.level() <= log::Level::Warn && m.target().starts_with("tensorstream")
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                // Not `eprintln!`, which panics when standard error is a closed pipe.
                use std::io::Write as _;
                // Prefixed like the CLI's own warnings and errors, so that a script can find them.
                let level = match r.level() {
                    log::Level::Error => "error: ",
                    _ => "warning: ",
                };
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "tensorstream: {level}{}",
                    terminal_safe(&r.args().to_string())
                );
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}
