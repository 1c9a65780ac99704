//! Storage backends for tensorstream, one module per backend, each behind a cargo feature.
//!
//! Every backend module has the same file set: `mod.rs` (the [`Backend`] implementation and its
//! public type), `config.rs` (URI and option parsing: pure, unit-tested), `reader.rs` (its
//! [`tensorstream_engine::RangeReader`]: how it keeps many reads in flight) and `tests.rs` (unit
//! tests). Extra files only where a backend needs them (e.g. `local/uring.rs`, the one module that
//! submits to io_uring and so holds `unsafe`).
//!
//! [`open`] turns a URI or path into a backend: `/path` or `file:///path` → local,
//! `http(s)://` → http, `s3://bucket/key` → s3, `nfs://host[:port]/export/path` → nfs.

#![warn(missing_docs)]
// `unsafe` only in `local::uring` (io_uring submission), which allows it explicitly.
#![deny(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tensorstream_engine::{Backend, Error, Result};

#[cfg(feature = "http")]
#[forbid(unsafe_code)]
pub mod http;
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "nfs")]
#[forbid(unsafe_code)]
pub mod nfs;
#[cfg(any(feature = "http", feature = "s3"))]
#[forbid(unsafe_code)]
pub(crate) mod ranges;
#[cfg(feature = "s3")]
#[forbid(unsafe_code)]
pub mod s3;

/// Options shared by all backends; each backend reads the ones that concern it.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Requests in flight (remote backends) or queue depth (local). `None`: backend default.
    pub concurrency: Option<usize>,
    /// Preferred read size in bytes. `None`: backend default.
    pub chunk_size: Option<usize>,
    /// Extra HTTP headers (`Authorization: …`), for http(s).
    pub headers: Vec<(String, String)>,
    /// S3 endpoint URL (overrides `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    /// S3 region (overrides `AWS_REGION`).
    pub s3_region: Option<String>,
    /// Per-request timeout for remote backends. `None`: backend default.
    pub timeout: Option<Duration>,
    /// Local I/O engine: `None` = `TENSORSTREAM_IO` or automatic (io_uring, falling back to pread).
    pub io_mode: Option<IoMode>,
    /// Local page-cache bypass: `Some(true)` = O_DIRECT where the filesystem allows it,
    /// `Some(false)` = buffered, `None` = `TENSORSTREAM_DIRECT` or automatic (O_DIRECT unless the
    /// file is already mostly in the page cache).
    pub direct_io: Option<bool>,
}

/// How the local backend does I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring (O_DIRECT where possible, registered buffers).
    Uring,
    /// A thread pool of `pread` calls.
    Pread,
}

impl IoMode {
    /// Reads `TENSORSTREAM_IO` (`uring`/`io_uring` or `pread`). Unknown values are an error.
    pub fn from_env() -> Result<Option<IoMode>> {
        match std::env::var("TENSORSTREAM_IO") {
            Err(_) => Ok(None),
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "" | "auto" => Ok(None),
                "uring" | "io_uring" | "io-uring" => Ok(Some(IoMode::Uring)),
                "pread" => Ok(Some(IoMode::Pread)),
                other => Err(Error::invalid(format!(
                    "TENSORSTREAM_IO={other:?}: expected \"io_uring\", \"pread\" or \"auto\""
                ))),
            },
        }
    }
}

/// Opens the object at `uri` with the backend its scheme names.
pub fn open(uri: &str, opts: &OpenOptions) -> Result<Arc<dyn Backend>> {
    let scheme = uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        None | Some("file") => open_local(uri.strip_prefix("file://").unwrap_or(uri), opts),
        #[cfg(feature = "nfs")]
        Some("nfs") => Ok(Arc::new(nfs::NfsBackend::open(uri, opts)?)),
        #[cfg(feature = "s3")]
        Some("s3") => Ok(Arc::new(s3::S3Backend::open(uri, opts)?)),
        #[cfg(feature = "http")]
        Some("http") | Some("https") => Ok(Arc::new(http::HttpBackend::open(uri, opts)?)),
        Some(other) => Err(Error::unsupported(format!(
            "{uri}: unsupported URI scheme {other:?} (this build knows: file paths{})",
            compiled_schemes()
        ))),
    }
}

fn compiled_schemes() -> String {
    let mut s = String::new();
    if cfg!(feature = "nfs") {
        s.push_str(", nfs://");
    }
    if cfg!(feature = "s3") {
        s.push_str(", s3://bucket/key");
    }
    if cfg!(feature = "http") {
        s.push_str(", http://, https://");
    }
    s
}

#[cfg(feature = "local")]
fn open_local(path: &str, opts: &OpenOptions) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(local::LocalBackend::open(path, opts)?))
}

#[cfg(not(feature = "local"))]
fn open_local(path: &str, _opts: &OpenOptions) -> Result<Arc<dyn Backend>> {
    Err(Error::unsupported(format!(
        "{path}: the local backend is not compiled in (feature \"local\")"
    )))
}
