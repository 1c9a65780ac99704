//! Conformance suite for [`Backend`](crate::Backend) implementations, third-party ones included.
//!
//! ```ignore
//! struct MyFixture { /* a server, a temp dir … */ }
//! impl tensorstream_engine::testkit::Fixture for MyFixture {
//!     fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> { … }
//!     fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> { … }
//! }
//! #[test] fn conformance() { tensorstream_engine::testkit::run_all(&MyFixture::new()); }
//! ```
//!
//! (API fixed; the checks are being filled in.)

use std::sync::Arc;

use crate::{Backend, Result};

/// How the suite makes objects for the backend under test.
pub trait Fixture {
    /// Stores `data` as a new object called `name` and returns a backend reading it.
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>>;
    /// A backend for an object that does not exist. May fail itself (with `NotFound`), or
    /// succeed and then fail `stat`/`read_at` with `NotFound`.
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>>;
}

/// Runs every check; panics with a message naming the failed check.
pub fn run_all(_fixture: &dyn Fixture) {}
