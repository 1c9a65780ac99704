//! tensorstream-engine: the core of tensorstream.
//!
//! Data flows one way: a [`Backend`] (storage) → a format reader ([`mod@format`]) → a
//! [`TensorIndex`] → a [`Plan`] ([`mod@plan`]) → the engine ([`pipeline`]) → a [`Sink`] → a
//! loaded model. Third-party storage implements [`Backend`] and runs [`testkit`] against itself.
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

pub use backend::{
    Backend, BackendExt, Capabilities, MemoryBackend, ObjectMeta, RangeReader, ReadDone,
    ReadRequest, ReaderOptions, ThreadPoolReader,
};
pub use dtype::DType;
pub use error::{Error, ErrorKind, Result};
pub use index::{Format, TensorIndex, TensorInfo, TensorSource};
pub use mem::{Arena, IoBuf, MemRegion};
pub use model::{HostModel, TensorView};
pub use pipeline::{execute, unchanged_since, EngineOptions, EngineStats};
pub use plan::{plan, Layout, Plan, PlanOptions};
pub use sink::{HostSink, Sink};
