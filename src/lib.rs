//! # tensorstream
//!
//! Streams model weights (safetensors; tensorizer) from storage — local disk through io_uring,
//! and remote backends — into host memory (GPU: see `tensorstream-cuda`), as fast as the
//! hardware allows, with a small fixed host-memory footprint beyond the destination.
//!
//! ```no_run
//! use tensorstream::Loader;
//!
//! let model = Loader::new("model.safetensors")
//!     .filter_glob("model.layers.0.*")?
//!     .queue_depth(32)
//!     .load()?;
//! for t in model.tensors() {
//!     println!("{} {} {:?} {} bytes", t.name, t.dtype, t.shape, t.data.len());
//! }
//! println!("{:.2} GB/s", model.stats().gbps());
//! # Ok::<(), tensorstream::Error>(())
//! ```
//!
//! [`Loader::new`] also takes a sharded checkpoint (a `*.safetensors.index.json`, or a local
//! directory holding `model.safetensors.index.json`): its shards load into one
//! [`LoadedModel`] (or [`CudaModel`]), and [`LoadedModel::files`] tells which shard held what.
//!
//! The layers below are public too: [`engine`] (Backend trait, formats, planner, pipeline,
//! sinks), [`backends`] (local, remote) and [`cuda`]. A third-party backend implements
//! [`engine::Backend`] and is used with [`Loader::from_backend`].
//!
//! ## In a server
//! * **Blocking.** [`Loader::load`], [`Loader::load_cuda`], [`Loader::inspect`] and
//!   [`Loader::convert`] block the calling thread until done (seconds for big models; remote
//!   backends also wait on retries). From async code run them on a blocking thread
//!   (`tokio::task::spawn_blocking`). [`Loader::load_cuda_streaming`] returns once the load
//!   has started (after opening the device and the object, reading its header and planning:
//!   blocking work too, network round trips included) and loads on its own thread; dropping
//!   its handle before `wait()` stops that load, as does `stop()`
//!   or the loader's cancel flag. The drop waits for the load to let go of its device memory,
//!   up to [`cuda::load::DROP_WAIT`] (moments on a GPU; a remote read that does not end can
//!   take longer): from async code, drop the handle on a blocking thread too.
//! * **Stopping.** [`Loader::cancel_flag`] stops a load or conversion between reads (reads in
//!   retry backoff on HTTP, S3 and NFS are stopped at once); a cancel while the object is
//!   being opened (connecting, `stat`, the metadata) returns at once and leaves the opening to
//!   end on a thread of its own (the HTTP, S3 and NFS backends stop it within moments); a key
//!   derivation is not interrupted, and a sharded checkpoint's index file only on HTTP, S3 and
//!   NFS. Per-request timeouts are in [`OpenOptions::timeout`],
//!   and a server trickling bytes counts as stalled (HTTP: slower than 256 KiB/s per GET is cut
//!   and resumed; NFS: under 64 KiB per timeout). [`Loader::deadline`] bounds a whole load or
//!   conversion (it fails with `Timeout`).
//! * **Threads.** Each load starts its own: a sink thread, for local files read with `pread` a
//!   pool of up to the queue depth (at most 64), up to 8 verify/decrypt workers for tensorizer hooks, a page
//!   pre-fault thread for local host loads, and an async runtime for HTTP/S3; GPU loads add a
//!   copy-watcher thread and a device-allocation thread (a streaming load, its load thread; a
//!   streaming sharded load, a forwarding thread per shard). All are named `ts-…` or by their
//!   library and end with the load.
//! * **Output.** The library prints nothing (the testkit excepted); warnings (a fallback taken, a
//!   server being retried, memory that could not be pinned) go through the [`log`](https://docs.rs/log)
//!   facade at level Warn. The CLI shows them with [`engine::log_warnings_to_stderr`].
//! * **Environment.** Loads read `TENSORSTREAM_IO`, `TENSORSTREAM_DIRECT`,
//!   `TENSORSTREAM_PREFAULT`, `TENSORSTREAM_HUGEPAGES` and, for S3, the `AWS_*` variables; a
//!   malformed value fails the load with a clear error.
//! * **TLS.** The HTTP and S3 backends install rustls' `ring` provider as the process default
//!   when none is installed yet; a program that wants another provider installs it first. The
//!   trusted roots (the system's, or `SSL_CERT_FILE` / `SSL_CERT_DIR`'s) are read once per
//!   process, when the first HTTP or S3 backend opens: a later change is seen by a new process.
//! * **GPU.** Loads on one [`cuda::CudaDevice`] handle run one at a time: a load holds the
//!   handle from its start (before it opens its object) to its end, and a second concurrent
//!   load is refused with `InvalidInput`; open one handle per concurrent load, or queue them.
//!   Dropping a running streaming load stops it and waits (up to [`cuda::load::DROP_WAIT`])
//!   for it to let go of the device memory and the pinned slots; one that takes longer
//!   finishes on its own thread, and the next load on its handle waits for it to end (up to
//!   [`cuda::device::ABANDONED_LOAD_WAIT`]) before it allocates device memory or takes the
//!   slots, rather than failing.
//!   Releasing a [`cuda::DeviceModel`] synchronizes the device's context before freeing.
//!   GPU calls (loads, readback, release, and the drops of models and device handles) make
//!   the device's primary context current on the calling thread while they run, and put back
//!   the context that was current before (or none): a thread where a framework works on
//!   another GPU is not switched to this one.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod prefetched;
mod sharded;
mod staged;

pub use sharded::INDEX_FILE as SHARDED_INDEX_FILE;

/// The sharded-checkpoint index parser and the shard-URI rule, for the fuzz target
/// `sharded_index` in `engine/fuzz` (built only by `cargo fuzz`, which sets `cfg(fuzzing)`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::sharded::{parse_index, sibling};
}

pub use tensorstream_backends as backends;
pub use tensorstream_cuda as cuda;
pub use tensorstream_engine as engine;

pub use tensorstream_backends::{IoMode, OpenOptions};
use tensorstream_engine::format::convert::ConvertOptions;
pub use tensorstream_engine::format::convert::ConvertStats;
pub use tensorstream_engine::format::tensorizer::KeySource;
use tensorstream_engine::format::tensorizer::ReadOptions;
pub use tensorstream_engine::{
    Backend, Capabilities, DType, Error, ErrorKind, ObjectMeta, Result, TensorIndex, TensorInfo,
    TensorRole, TensorView,
};

use tensorstream_engine::{
    execute, format, plan, BackendExt, EngineOptions, HostModel, HostSink, Layout, PlanOptions,
};

/// Where tensors are loaded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Device {
    /// Host memory.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n.parse().map(Device::Cuda).map_err(|_| {
                Error::invalid(format!("bad device {s:?}: expected cpu, cuda or cuda:N"))
            });
        }
        Err(Error::invalid(format!(
            "bad device {s:?}: expected cpu, cuda or cuda:N"
        )))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

type Predicate = Arc<dyn Fn(&TensorInfo) -> bool + Send + Sync>;

/// Builder for a load: source, selection, device and I/O knobs.
#[derive(Clone)]
pub struct Loader {
    uri: String,
    backend: Option<Arc<dyn Backend>>,
    device: Device,
    globs: Vec<String>,
    predicate: Option<Predicate>,
    queue_depth: Option<usize>,
    chunk_size: Option<usize>,
    ring_budget: usize,
    open: OpenOptions,
    progress: Option<Arc<AtomicU64>>,
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The flag the backend's own calls follow (`backend_options`), when not `cancel`: one that
    /// follows `cancel` and is never cleared (see `bounded`); for a sharded GPU load's shard,
    /// one that also follows `abandoned` (see `each_shard_on_device`).
    backend_cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Set once nobody will take what this loader is preparing: a sharded GPU load's next shard
    /// whose load failed meanwhile (see `one_ahead`). The preparation stops at its next step
    /// (`check_abandoned`) and asks the store nothing more; the store call in flight stops too
    /// on the HTTP, S3 and NFS backends (`backend_cancel` follows this flag).
    abandoned: Option<Arc<std::sync::atomic::AtomicBool>>,
    deadline: Option<Duration>,
    progress_total: Option<Arc<AtomicU64>>,
    cuda: tensorstream_cuda::CudaOptions,
    opened: Option<Arc<tensorstream_cuda::CudaDevice>>,
    verify: bool,
    key: Option<KeySource>,
    fallback_password: Option<KeySource>,
    /// Set on the per-shard loaders of a sharded checkpoint.
    scope: Option<ShardScope>,
    /// Which of how many loads running side by side (the shard lanes of a sharded host load)
    /// this one is: the lanes share the queue depth. `(0, 1)` otherwise.
    lane: (usize, usize),
    /// [`Loader::convert_untyped_as`].
    untyped_role: Option<tensorstream_engine::TensorRole>,
    /// [`Loader::replace_output`].
    replace_output: bool,
}

/// One shard of a sharded checkpoint: the tensors its index places there.
#[derive(Clone)]
struct ShardScope {
    index_uri: String,
    /// The shard's file name in the index.
    file: String,
    names: Arc<std::collections::HashSet<String>>,
    /// The shard's metadata and index as read when the checkpoint was checked: reused by the
    /// load if the object still has the same size and version tag.
    known: Option<Arc<(ObjectMeta, TensorIndex)>>,
    /// A small shard's whole bytes, read with its header by the check (see
    /// [`SMALL_OBJECTS_KEPT`]): the load reads its tensors from them when the object still has
    /// the size and version tag `known` holds.
    object: Option<Arc<Vec<u8>>>,
    /// The checkpoint's progress total, corrected by each shard to its plan's read bytes.
    total: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("uri", &sharded::redact(&self.uri))
            .field("device", &self.device)
            .field("globs", &self.globs)
            .field("queue_depth", &self.queue_depth)
            .field("chunk_size", &self.chunk_size)
            .field("ring_budget", &self.ring_budget)
            .finish_non_exhaustive()
    }
}

/// Shards of a sharded checkpoint loaded to host memory at the same time.
const SHARD_LANES: usize = 2;

/// Shards loaded to host memory at the same time when none loads more than [`SMALL_SHARD`],
/// from local files or NFS; [`REMOTE_SMALL_SHARD_LANES`] from HTTP(S) and S3. Such a shard's
/// load is a few requests to a remote store (its HEADs and a GET or two), one round trip after
/// another, and with two at a time a checkpoint of many small shards spent most of its load
/// waiting (500 shards of 2 KiB on a local s3s-fs, whose small answers each wait about 40 ms
/// for the client's delayed ACK: 10.2 s, of which 8.2 s in the load phase).
const SMALL_SHARD_LANES: usize = SHARD_OPENS;

/// Small shards (see [`SMALL_SHARD_LANES`]) of an HTTP(S) or S3 store loaded to host memory at
/// the same time, never more than the queue depth (`--concurrency`) given: as many as their
/// headers are read at a time ([`REMOTE_SHARD_OPENS`]), since each load is round trips too.
/// Measured with 500 shards of two 1 KiB tensors and 100 shards of 512 KiB (medians of 7
/// alternating `load`s at 8, 16 and 32 lanes, on a busy two-core machine): over a local nginx
/// 0.70, 0.66, 0.57 s and 0.23, 0.20, 0.25 s; through a proxy adding 10 ms to each request
/// 1.42, 1.00, 0.87 s and 0.70, 0.48, 0.42 s; on a local s3s-fs 1.53, 1.44, 1.44 s and 1.74,
/// 1.71, 1.63 s, with 10 ms added 2.28, 1.79, 1.71 s and 2.14, 1.75, 1.79 s. The peak memory
/// grew 2 to 9 MiB (to 19 and 80 MiB over HTTP). Local files gain nothing (0.40, 0.34,
/// 0.42 s; 0.18, 0.17, 0.19 s). On S3, whose default is 16 reads in flight, 32 small shards
/// still load at a time (one read each), as their headers are read.
const REMOTE_SMALL_SHARD_LANES: usize = REMOTE_SHARD_OPENS;

/// The most tensor bytes a shard loads and still counts as small (see [`SMALL_SHARD_LANES`]):
/// one S3 request (16 MiB chunks), two HTTP ones (8 MiB).
const SMALL_SHARD: u64 = 16 << 20;

/// What [`Loader::open_index_with`] opens: the backend, the object's size and version, its
/// index and (when asked for and they came whole) its bytes.
type OpenedIndex = (Arc<dyn Backend>, ObjectMeta, TensorIndex, Option<Vec<u8>>);

/// A shard, its loader, and what [`Loader::each_shard`] made of it.
type Opened<'m, T> = (&'m sharded::Shard, Loader, Result<T>);

/// Shards of a sharded checkpoint whose headers are read at the same time (the first pass, and
/// `inspect`) from local files or NFS; [`REMOTE_SHARD_OPENS`] from HTTP(S) and S3 (see
/// `Loader::shard_opens`). Each is a few requests to the store, one round trip after another,
/// so that reading them one by one made the first pass over 100 shards behind a 25 ms link
/// take 11 s. (More does not help local files: `inspect` of 500 local shards of 2 KiB took
/// 0.076 s at 8, 0.079 s at 16, 0.10 s at 64.)
const SHARD_OPENS: usize = 8;

/// Shards of a sharded checkpoint on an HTTP(S) or S3 store whose headers are read at the same
/// time, never more than the queue depth (`--concurrency`) given. Their openings are round
/// trips, not bandwidth: `inspect` of 500 shards of two 1 KiB tensors on a local s3s-fs (whose
/// small answers each wait about 40 ms for the client's delayed ACK) took 2.0 s eight at a
/// time, 0.96 s at 16, 0.63 s at 32, 0.57 s at 64; over a local nginx, which answers at once,
/// 32 cost nothing (0.13 s) and 64 more (0.18 s). Each opening holds one connection and a
/// thread (two with a cancel flag, as the CLI sets: see `open_index_with`), so the CLI's check
/// runs about 70 threads instead of about 20 for that long; the HTTP backend keeps up to twice
/// its concurrency (32 by default, asserted below) idle connections per host, so the next shards
/// reuse them (32 for 40 shards, for HTTP as for S3; HTTP opened 34 to 38 while its calls ran on
/// the calling thread, which sent the next request before hyper had put the connection of the
/// one before back into the pool).
const REMOTE_SHARD_OPENS: usize = 32;

// The HTTP client keeps as many idle connections per host as the openings hold.
#[cfg(feature = "http")]
const _: () =
    assert!(REMOTE_SHARD_OPENS <= tensorstream_backends::http::config::DEFAULT_CONCURRENCY);

/// Most bytes of small shards the check of a sharded checkpoint keeps for their loads: a
/// shard of at most [`format::FIRST_READ`] bytes comes whole with its header, and its load
/// then reads its tensors from memory rather than asking the store for them again (one GET and
/// the final HEAD fewer per small remote shard). Shards past the budget are read again.
const SMALL_OBJECTS_KEPT: u64 = 64 << 20;

/// Default staging-ring budget (host memory beyond the destination).
pub const DEFAULT_RING_BUDGET: usize = 256 << 20;

impl Loader {
    /// A load of the object at `uri`: a path, `file://`, or any scheme the backends support.
    pub fn new(uri: impl Into<String>) -> Self {
        Loader {
            uri: uri.into(),
            backend: None,
            device: Device::Cpu,
            globs: Vec::new(),
            predicate: None,
            queue_depth: None,
            chunk_size: None,
            ring_budget: DEFAULT_RING_BUDGET,
            open: OpenOptions::default(),
            progress: None,
            cancel: None,
            backend_cancel: None,
            abandoned: None,
            deadline: None,
            progress_total: None,
            cuda: tensorstream_cuda::CudaOptions::default(),
            opened: None,
            verify: false,
            key: None,
            fallback_password: None,
            scope: None,
            lane: (0, 1),
            untyped_role: None,
            replace_output: true,
        }
    }

    /// Verify every tensor's CRC32 / SHA-256 against its tensorizer header while loading (on
    /// worker threads); a mismatch fails the load naming the tensor. Safetensors files have no
    /// checksums: asking to verify one is an error.
    pub fn verify_hashes(mut self, yes: bool) -> Self {
        self.verify = yes;
        self
    }
    /// Key or password for an encrypted tensorizer file (giving one for a file that is not
    /// encrypted is an error).
    pub fn key(mut self, key: KeySource) -> Self {
        self.key = Some(key);
        self
    }
    /// Reads a key file: 32 raw bytes or 64 hex characters (at most 64 KiB are read).
    pub fn key_file(self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        Ok(self.key(KeySource::from_key_path(path.as_ref())?))
    }
    /// Reads a password file (one trailing newline is ignored).
    pub fn password_file(self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        Ok(self.key(KeySource::from_password_path(path.as_ref())?))
    }
    /// A password used only if the file turns out to be encrypted and no key was given (e.g.
    /// from `TENSORSTREAM_PASSWORD`).
    pub fn password_if_encrypted(mut self, password: &[u8]) -> Result<Self> {
        self.fallback_password =
            Some(KeySource::password(password).map_err(|e| e.context("the fallback password"))?);
        Ok(self)
    }

    fn read_options(&self, index: &TensorIndex) -> ReadOptions {
        let encrypted = format::tensorizer::is_encrypted(index);
        if self.scope.is_some() {
            // A shard of a checkpoint: the checkpoint's key and verification apply to the
            // shards that take them (tensorizer ones; encrypted ones for the key), so that
            // safetensors and tensorizer shards, encrypted or not, can be mixed. A key or a
            // verification no shard takes is refused for the checkpoint as a whole
            // (`check_checkpoint_options`).
            let tensorizer = index.format == tensorstream_engine::Format::Tensorizer;
            return ReadOptions {
                verify: self.verify && tensorizer,
                key: if encrypted {
                    self.key.clone().or_else(|| self.fallback_password.clone())
                } else {
                    None
                },
            };
        }
        let key = self.key.clone().or_else(|| {
            if encrypted {
                self.fallback_password.clone()
            } else {
                None
            }
        });
        ReadOptions {
            verify: self.verify,
            key,
        }
    }

    /// For a sharded checkpoint: a verification or a key that no shard takes is refused, as
    /// it would be for a single file.
    fn check_checkpoint_options<'a>(
        &self,
        indexes: impl Iterator<Item = &'a TensorIndex> + Clone,
        index_uri: &str,
    ) -> Result<()> {
        let loc = || sharded::redact(index_uri);
        let mut formats = indexes.clone().map(|i| i.format);
        if self.verify && !formats.any(|f| f == tensorstream_engine::Format::Tensorizer) {
            return Err(Error::unsupported(
                "no shard of the checkpoint is a tensorizer file, and safetensors files carry no \
                 checksums to verify",
            )
            .with_location(loc()));
        }
        if self.key.is_some() && !indexes.clone().any(format::tensorizer::is_encrypted) {
            return Err(Error::invalid(
                "a key or password was given but no shard of the checkpoint is encrypted",
            )
            .with_location(loc()));
        }
        Ok(())
    }

    /// For a conversion to tensorizer: the tensor type to give tensors whose input does not
    /// record one (safetensors files). By default they are written as state-dict entries, as
    /// tensorizer's `write_state_dict` writes them; [`TensorRole::Parameter`] makes a file that
    /// tensorizer's `load_into_module` (the loader vLLM uses) accepts. A tensorizer input's own
    /// types (parameters, buffers, state-dict entries) are always kept.
    pub fn convert_untyped_as(mut self, role: TensorRole) -> Self {
        self.untyped_role = Some(role);
        self
    }

    /// Whether a conversion may replace an `output` that exists when it finishes (default:
    /// yes, as a rename does). With `false`, the finished conversion is moved into place only
    /// if no file (or link) has that name by then, else it fails with [`ErrorKind::InvalidInput`],
    /// removes what it wrote and leaves the file there as it was: what the CLI does without
    /// `--force`, for an output that appears while the conversion runs. An output that is there
    /// already when the conversion starts fails it at once, before any tensor is read.
    pub fn replace_output(mut self, replace: bool) -> Self {
        self.replace_output = replace;
        self
    }

    /// Converts the source into `output` (`.tensors` or `.safetensors`), tensor by tensor,
    /// verifying / decrypting the input as configured and encrypting the output if `encrypt`.
    /// Filters apply: only the selected tensors are written. A sharded checkpoint becomes one
    /// file: every shard's header is checked first, then the shards are written one after
    /// another (one open at a time).
    pub fn convert(
        &self,
        output: &std::path::Path,
        encrypt: Option<KeySource>,
    ) -> Result<ConvertStats> {
        self.bounded(|l| l.convert_now(output, encrypt))
    }

    fn convert_now(
        &self,
        output: &std::path::Path,
        encrypt: Option<KeySource>,
    ) -> Result<ConvertStats> {
        let this = match self.source()? {
            sharded::Source::Sharded(map) => return self.convert_sharded(&map, output, encrypt),
            sharded::Source::File(u) if u == self.uri => std::borrow::Cow::Borrowed(self),
            sharded::Source::File(u) => std::borrow::Cow::Owned(Loader {
                uri: u,
                ..self.clone()
            }),
        };
        let this = this.as_ref();
        if this.backend.is_none() {
            check_not_input(output, [this.uri.as_str()])?;
        }
        let (be, meta, index) = this.open_index()?;
        let sel = this.select(&index)?;
        check_room(output, sel.iter().map(|&i| &index.tensors[i]))?;
        let only = (sel.len() != index.tensors.len())
            .then(|| sel.iter().map(|&i| index.tensors[i].name.clone()).collect());
        if let Some(t) = &self.progress_total {
            let total = sel
                .iter()
                .fold(0u64, |a, &i| a.saturating_add(index.tensors[i].nbytes()));
            t.store(total, std::sync::atomic::Ordering::Relaxed);
        }
        let opts = ConvertOptions {
            read: self.read_options(&index),
            encrypt,
            only,
            untyped_role: self.untyped_role,
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
            replace: self.replace_output,
            ..ConvertOptions::default()
        };
        // The header already read serves the conversion too (read once).
        format::convert::convert_shared(be, Some((meta, index)), output, &opts)
    }

    /// A sharded checkpoint into one file: every shard's header checked first (as for a load),
    /// then the shards' selected tensors written shard after shard, one shard open at a time.
    fn convert_sharded(
        &self,
        map: &sharded::ShardMap,
        output: &std::path::Path,
        encrypt: Option<KeySource>,
    ) -> Result<ConvertStats> {
        use format::convert::{ConvertPart, PartBackend};
        let shards: Vec<String> = map.shards.iter().map(|s| map.uri_of(s)).collect();
        check_not_input(output, shards.iter().map(String::as_str))?;
        let (todo, _) = self.check_shards(map)?;
        let mut parts = Vec::with_capacity(todo.len());
        for (l, _) in todo {
            let Some(known) = l.scope.as_ref().and_then(|s| s.known.clone()) else {
                return Err(Error::invalid("a checked shard lost its index"));
            };
            // The part as it will be written: the shard's selected tensors, in file order.
            let sel = l.select(&known.1)?;
            let names: std::collections::HashSet<String> = sel
                .iter()
                .map(|&i| known.1.tensors[i].name.clone())
                .collect();
            let mut declared = known.1.clone();
            declared.tensors.retain(|t| names.contains(&t.name));
            let read = format::convert::conversion_read(&l.read_options(&declared), &declared);
            parts.push(ConvertPart {
                location: sharded::redact(&l.uri),
                index: declared,
                // Opened when its turn comes; verification and decryption are prepared then (a
                // request that cannot apply, such as verifying safetensors, fails at the first
                // shard, before any tensor is written).
                open: Box::new(move || {
                    let (be, meta, mut index) = l.open_index()?;
                    index.tensors.retain(|t| names.contains(&t.name));
                    let hook = format::tensorizer::prepare(be.as_ref(), &mut index, &read)?;
                    Ok((PartBackend::Session(be, meta), index, hook))
                }),
            });
        }
        check_room(output, parts.iter().flat_map(|p| p.index.tensors.iter()))?;
        let opts = ConvertOptions {
            encrypt,
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
            untyped_role: self.untyped_role,
            replace: self.replace_output,
            ..ConvertOptions::default()
        };
        format::convert::convert_parts(parts, output, &opts)
    }

    /// A load through a backend you built yourself (a third-party `Backend`). The backend is
    /// already open, so [`Loader::open_options`] (headers, timeouts, I/O mode, concurrency of
    /// the built-in backends) does not apply to it, and it is read as one model file: a
    /// sharded checkpoint's `*.index.json` is not resolved through it.
    ///
    /// Everything an implementation names is re-exported here ([`Backend`], [`Capabilities`],
    /// [`ObjectMeta`], [`Error`], [`ErrorKind`], [`Result`]), so a program that depends on
    /// `tensorstream` alone can write one; the contract is on [`engine::backend`], and the
    /// conformance suite is `engine::testkit` (a dev-dependency on `tensorstream-engine`
    /// with feature `testkit`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tensorstream::{Backend, Capabilities, Error, ErrorKind, Loader, ObjectMeta, Result};
    ///
    /// /// Serves one object from memory, under a made-up scheme.
    /// #[derive(Debug)]
    /// struct InMemory(Vec<u8>);
    ///
    /// impl Backend for InMemory {
    ///     fn location(&self) -> &str { "mem://model.safetensors" }
    ///     fn stat(&self) -> Result<ObjectMeta> {
    ///         Ok(ObjectMeta { size: self.0.len() as u64, version: Some("v1".into()) })
    ///     }
    ///     fn capabilities(&self) -> Capabilities {
    ///         Capabilities { kind: "mem", max_concurrency: 4, ..Default::default() }
    ///     }
    ///     fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
    ///         let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.0.len());
    ///         let n = buf.len().min(self.0.len() - start);
    ///         buf[..n].copy_from_slice(&self.0[start..start + n]);
    ///         Ok(n)
    ///     }
    /// }
    ///
    /// // A safetensors file of one u8 tensor `w` of 4 bytes.
    /// let header = br#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    /// let mut file = (header.len() as u64).to_le_bytes().to_vec();
    /// file.extend_from_slice(header);
    /// file.extend_from_slice(&[1, 2, 3, 4]);
    ///
    /// let model = Loader::from_backend(Arc::new(InMemory(file))).load()?;
    /// assert_eq!(model.get("w").map(|t| t.data), Some(&[1u8, 2, 3, 4][..]));
    /// assert_eq!(model.stats().backend, "mem");
    ///
    /// // Errors come back by kind, whatever the backend.
    /// let err = Loader::from_backend(Arc::new(InMemory(b"not a model".to_vec())))
    ///     .load()
    ///     .unwrap_err();
    /// assert!(matches!(err.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported), "{err}");
    /// # let _ = Error::invalid("");
    /// # Ok::<(), tensorstream::Error>(())
    /// ```
    pub fn from_backend(backend: Arc<dyn Backend>) -> Self {
        let mut l = Loader::new(backend.location().to_string());
        l.backend = Some(backend);
        l
    }

    /// Target device (default: cpu).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// Keeps only tensors whose name matches `glob`. Several calls: a tensor is kept when any
    /// of the globs matches it, and each glob must match at least one of the model's tensors
    /// (a typo beside a glob that matches would otherwise go unnoticed): one that matches none
    /// fails the load with `InvalidInput`.
    pub fn filter_glob(mut self, glob: &str) -> Result<Self> {
        filter_glob(glob)?;
        self.globs.push(glob.to_string());
        Ok(self)
    }
    /// Keeps only tensors for which `f` returns true (several calls: all must accept; combined
    /// with globs: both must accept).
    pub fn filter(mut self, f: impl Fn(&TensorInfo) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(match self.predicate.take() {
            Some(prev) => Arc::new(move |t: &TensorInfo| prev(t) && f(t)),
            None => Arc::new(f),
        });
        self
    }
    /// Reads in flight (default: the backend's preference, 16 for local files; GPU loads of
    /// local files keep 32, and never more than the pinned slots, 40 by default). Taken into
    /// 1..=1024 for every backend (0 counts as 1, more than 1024 as 1024). The shards of a
    /// checkpoint that load at the same time share them.
    pub fn queue_depth(mut self, n: usize) -> Self {
        let n = n.clamp(1, tensorstream_engine::pipeline::MAX_QUEUE_DEPTH);
        self.queue_depth = Some(n);
        self.open.concurrency = Some(n);
        self
    }
    /// Size of one read (default: the backend's preference; at least 4096 bytes, a smaller
    /// value counts as 4096).
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = Some(bytes.max(4096));
        self.open.chunk_size = Some(bytes.max(4096));
        self
    }
    /// Staging memory budget for reads that cannot land in place (default 256 MiB; at least
    /// 1 MiB). A load stages at least two reads whatever the budget, so with a budget under two
    /// chunks it uses two chunks. A sharded checkpoint loading two shards at a time gives each
    /// half the budget (and half the queue depth), the two-read minimum applying to each.
    pub fn ring_budget(mut self, bytes: usize) -> Self {
        self.ring_budget = bytes.max(1 << 20);
        self
    }
    /// Backend options (headers, S3 endpoint, timeouts, local I/O mode …).
    pub fn open_options(mut self, opts: OpenOptions) -> Self {
        let (c, s) = (self.open.concurrency, self.open.chunk_size);
        self.open = opts;
        self.open.concurrency = self.open.concurrency.or(c);
        self.open.chunk_size = self.open.chunk_size.or(s);
        self
    }
    /// GPU load options (streams, pinned staging slots and their size).
    pub fn cuda_options(mut self, opts: tensorstream_cuda::CudaOptions) -> Self {
        self.cuda = opts;
        self
    }
    /// Loads onto an already opened device (its streams, pinned staging and options), instead of
    /// opening one per load: open it once with [`tensorstream_cuda::CudaDevice::open`] and load
    /// many models without paying the open again or pinning another ring. Loads on one device
    /// handle run one at a time, each holding it from its start to its end (a second
    /// concurrent load is refused with a clear error; one
    /// that follows a dropped, still stopping streaming load waits for it). The
    /// handle's options apply; a later [`Loader::cuda_options`] with other values is an error at
    /// load time.
    pub fn on_device(mut self, dev: Arc<tensorstream_cuda::CudaDevice>) -> Self {
        self.device = Device::Cuda(dev.ordinal());
        self.cuda = dev.options().clone();
        self.opened = Some(dev);
        self
    }
    /// Set to the number of bytes the load will read (what [`Loader::progress`] counts up to)
    /// once the load is planned: a progress display's total, selection and alignment included.
    /// For [`Loader::convert`]: the bytes of the tensors to convert.
    pub fn progress_total(mut self, total: Arc<AtomicU64>) -> Self {
        self.progress_total = Some(total);
        self
    }
    /// A counter the loader adds bytes read to, for progress display.
    pub fn progress(mut self, counter: Arc<AtomicU64>) -> Self {
        self.progress = Some(counter);
        self
    }
    /// A flag that stops the load or conversion when set (from any thread, e.g. a signal
    /// handler): no new read is issued, the reads in flight are drained, and the call fails
    /// with [`ErrorKind::Cancelled`]; whatever was allocated is released and a conversion's
    /// temporary file is removed. (A GPU load on the mapped warm route finishes its copies
    /// first; they run on the device.) While the object is being opened (connecting, its
    /// `stat`, reading its metadata: backend calls nothing can interrupt), a cancel returns at
    /// once and leaves the opening to finish on a thread of its own, which then drops what it
    /// made (the HTTP, S3 and NFS backends see the flag too, through [`OpenOptions::cancel`],
    /// and stop their requests within moments);
    /// reads stuck in a backend (a hard NFS mount whose server is gone) get 2 s and are then
    /// left the same way (their buffers are freed when they end). Resolving a sharded
    /// checkpoint's index file is interrupted only on HTTP, S3 and NFS.
    pub fn cancel_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
    /// A limit on the whole of [`Loader::load`], [`Loader::load_cuda`], [`Loader::convert`],
    /// [`Loader::check_data`] or [`Loader::inspect`], counted from the call: once it has passed,
    /// the call stops as with a cancel and fails with [`ErrorKind::Timeout`] (a
    /// [`Loader::cancel_flag`] still works, seen within 50 ms, and still gives `Cancelled`).
    /// Opening the object (connecting, `stat`, the metadata) is abandoned at the limit like a
    /// cancel abandons it; a key derivation (and a sharded checkpoint's local index file) is
    /// not interrupted, but no read starts after the limit. Not for [`Loader::load_cuda_streaming`],
    /// which returns once its load has started: cancel that one with a flag.
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some(limit);
        self
    }

    /// Runs `f` with this loader, or, with a [`Loader::deadline`], with a copy whose cancel flag
    /// a timer sets when the limit passes (and which follows the caller's own cancel flag).
    fn bounded<T>(&self, f: impl FnOnce(&Loader) -> Result<T>) -> Result<T> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let Some(limit) = self.deadline else {
            if self.cancel.is_none() {
                return f(self);
            }
            // The backend follows a flag of its own, which follows the caller's and is never
            // cleared: an opening the call abandons on a cancel (left to end on its thread, its
            // backend stopping its requests once the flag is set) still sees it after the
            // caller has cleared their flag to reuse the loader. (The call itself looks at the
            // caller's flag: at once, not at the follower's next look.)
            let mut inner = self.clone();
            inner.backend_cancel = Some(stop_flag(self.cancel.clone())?);
            return f(&inner);
        };
        // Already set when the caller's flag is, or when no time at all was given: the load
        // must not finish before the timer thread has had a chance to say so.
        let user_set = self
            .cancel
            .as_ref()
            .is_some_and(|u| u.load(Ordering::SeqCst));
        let flag = Arc::new(AtomicBool::new(user_set || limit.is_zero()));
        let expired = Arc::new(AtomicBool::new(limit.is_zero()));
        let finished = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let timer = {
            let (flag, expired, finished) = (flag.clone(), expired.clone(), finished.clone());
            let user = self.cancel.clone();
            let start = Instant::now();
            std::thread::Builder::new()
                .name("ts-deadline".into())
                .spawn(move || {
                    let (lock, cv) = &*finished;
                    let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
                    while !*done {
                        if user.as_ref().is_some_and(|u| u.load(Ordering::Relaxed)) {
                            flag.store(true, Ordering::SeqCst);
                        }
                        let left = limit.saturating_sub(start.elapsed());
                        if left.is_zero() {
                            expired.store(true, Ordering::SeqCst);
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        // Wakes for the caller's flag every 50 ms, and at the limit.
                        let wait = left.min(Duration::from_millis(50));
                        done = cv
                            .wait_timeout(done, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                })
                .map_err(|e| Error::from_io(e, "starting the deadline timer"))?
        };
        /// Tells the timer the load finished, also when it panics (the timer would otherwise
        /// live until the limit, which may be hours away).
        struct Finish(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);
        impl Drop for Finish {
            fn drop(&mut self) {
                let (lock, cv) = &*self.0;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            }
        }
        let mut inner = self.clone();
        inner.cancel = Some(flag);
        inner.deadline = None;
        let result = {
            let _finish = Finish(finished);
            f(&inner)
        };
        let _ = timer.join();
        // The caller's own cancel, even if the limit passed meanwhile, stays `Cancelled`.
        let user_cancelled = self
            .cancel
            .as_ref()
            .is_some_and(|u| u.load(Ordering::SeqCst));
        match result {
            Err(e)
                if e.kind() == ErrorKind::Cancelled
                    && expired.load(Ordering::SeqCst)
                    && !user_cancelled =>
            {
                let mut t = Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "did not finish within the deadline of {limit:?} ({})",
                        e.message()
                    ),
                );
                if let Some(l) = e.location() {
                    t = t.with_location(l);
                }
                Err(t)
            }
            r => r,
        }
    }

    fn backend(&self) -> Result<Arc<dyn Backend>> {
        match &self.backend {
            Some(b) => {
                if !b.capabilities().ranged_reads {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        "the backend cannot read byte ranges (Capabilities::ranged_reads is \
                         false): tensorstream reads every object by ranges",
                    )
                    .with_location(b.location()));
                }
                Ok(b.clone())
            }
            None => backends::open(&self.uri, &self.backend_options()),
        }
    }

    /// The backend and the object's size and version: one HEAD for an HTTP object, whose
    /// opening asks for them anyway (see `tensorstream_backends::open_stat`).
    fn backend_stat(&self) -> Result<(Arc<dyn Backend>, ObjectMeta)> {
        if self.backend.is_some() {
            let be = self.backend()?;
            let meta = be.stat_located()?;
            return Ok((be, meta));
        }
        backends::open_stat(&self.uri, &self.backend_options())
    }

    /// A checked shard's backend, opened without a request: for a shard of a sharded
    /// checkpoint whose check saw a version tag the backend's reads carry as a precondition
    /// (HTTP(S), S3, NFS: see `tensorstream_backends::open_pinned`), pinned to the size and
    /// version the check saw, which `read_index` then finds unchanged. Its opening's request
    /// (a HEAD; on NFS a path walk and GETATTR) would only repeat the check's moments later: a shard replaced since fails its first read with
    /// `ObjectChanged` instead, and one replaced during its load fails the load's last look
    /// (`unchanged_since`) as always. `None` otherwise, and for a small shard whose bytes the
    /// check kept: its load reads nothing from the store, so its opening's `stat` is what
    /// finds it still the version the check read.
    fn checked_backend(&self) -> Result<Option<(Arc<dyn Backend>, ObjectMeta)>> {
        let Some(scope) = self.scope.as_ref().filter(|_| self.backend.is_none()) else {
            return Ok(None);
        };
        let (Some(known), None) = (&scope.known, &scope.object) else {
            return Ok(None);
        };
        let meta = &known.0;
        Ok(
            backends::open_pinned(&self.uri, &self.backend_options(), meta)?
                .map(|be| (be, meta.clone())),
        )
    }

    /// Reads only the metadata: the file's tensor index. With a key or password set and an
    /// encrypted tensorizer file, it also decrypts the smallest tensor (one read, skipped when
    /// that tensor is over 64 MiB or when no tensor has stored bytes) so that a wrong key is an
    /// error here (`IntegrityMismatch`), not during a load.
    ///
    /// For a sharded checkpoint this reads every shard's header and returns the combined index
    /// described at [`LoadedModel::index`]; [`Loader::inspect_files`] gives them one by one.
    pub fn inspect(&self) -> Result<TensorIndex> {
        let mut files = self.inspect_files()?;
        if files.len() == 1 {
            return Ok(files.remove(0).index);
        }
        combined_index(files.iter().map(|f| &f.index))
    }

    /// The index of each file the URI names: one for a model file; for a sharded checkpoint
    /// every shard's (restricted to the tensors the checkpoint index places in it, each checked
    /// to be there), in shard order. [`combined_index`] joins them.
    pub fn inspect_files(&self) -> Result<Vec<FileIndex>> {
        self.bounded(|l| l.inspect_files_now())
    }

    fn inspect_files_now(&self) -> Result<Vec<FileIndex>> {
        match self.source()? {
            sharded::Source::File(u) => {
                let l = Loader {
                    uri: u,
                    ..self.clone()
                };
                let index = l.inspect_file()?;
                Ok(vec![FileIndex {
                    uri: l.uri,
                    index,
                    shard: None,
                }])
            }
            sharded::Source::Sharded(map) => {
                let mut out = Vec::with_capacity(map.shards.len());
                let derivations = std::sync::Mutex::new(());
                let opened = self.each_shard(&map, |l| l.inspect_file_with(Some(&derivations)))?;
                for (shard, l, index) in opened {
                    let index = index?;
                    l.warn_unlisted(l.check_scope(&index)?);
                    out.push(FileIndex {
                        index: scoped_index(index, &shard.names),
                        uri: l.uri,
                        shard: Some(shard.file.clone()),
                    });
                }
                self.check_checkpoint_options(out.iter().map(|f| &f.index), &map.index_uri)?;
                Ok(out)
            }
        }
    }

    fn inspect_file(&self) -> Result<TensorIndex> {
        self.inspect_file_with(None)
    }

    /// [`Loader::inspect_file`]; with `derivations`, the password check (an Argon2id key
    /// derivation, up to 4 GiB of memory) holds that lock, so that shards inspected side by
    /// side ([`Loader::each_shard`]) derive their keys one at a time, as a loop over them did.
    fn inspect_file_with(&self, derivations: Option<&std::sync::Mutex<()>>) -> Result<TensorIndex> {
        let (be, _, index) = self.open_index()?;
        // The key a load would use: the one given, or the fallback password (e.g. from
        // TENSORSTREAM_PASSWORD) when the file is encrypted.
        let key = self.read_options(&index).key;
        let _one_at_a_time = match (&key, derivations) {
            (Some(KeySource::Password(_)), Some(m)) => {
                Some(m.lock().unwrap_or_else(|p| p.into_inner()))
            }
            _ => None,
        };
        if key.is_some() {
            // A key given for a file that takes none is refused here as it would be by a load.
            let mut checked = index.clone();
            let hook = format::tensorizer::prepare(
                be.as_ref(),
                &mut checked,
                &ReadOptions { verify: false, key },
            )
            .map_err(|e| e.with_location(&self.uri))?;
            // Whether the key is the right one only decrypting a tensor can tell: decrypt the
            // smallest stored one (its MAC fails under a wrong key), so that a wrong key shows
            // here and not minutes into a load.
            if let Some(hook) = hook {
                check_key_on_smallest(be.as_ref(), &checked, hook.as_ref())
                    .map_err(|e| e.with_location(&self.uri))?;
            }
        }
        Ok(index)
    }

    fn select(&self, index: &TensorIndex) -> Result<Vec<usize>> {
        let set = if self.globs.is_empty() {
            None
        } else {
            let mut b = globset::GlobSetBuilder::new();
            for g in &self.globs {
                b.add(filter_glob(g)?);
            }
            Some(
                b.build()
                    .map_err(|e| Error::invalid(format!("bad filters: {e}")))?,
            )
        };
        self.check_scope(index)?;
        let sel: Vec<usize> = index
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                self.scope
                    .as_ref()
                    .is_none_or(|s| s.names.contains(&t.name))
            })
            .filter(|(_, t)| set.as_ref().is_none_or(|s| s.is_match(&t.name)))
            .filter(|(_, t)| self.predicate.as_ref().is_none_or(|p| p(t)))
            .map(|(i, _)| i)
            .collect();
        if self.scope.is_none() {
            self.check_each_glob_matches(index.tensors.iter().map(|t| t.name.as_str()))
                .map_err(|e| e.with_location(&self.uri))?;
        }
        // A shard with nothing selected is skipped; the checkpoint as a whole is checked.
        if sel.is_empty() && !index.tensors.is_empty() && self.scope.is_none() {
            return Err(Error::invalid(format!(
                "{} matches none of the {} tensors",
                self.filter_words(),
                index.tensors.len()
            ))
            .with_location(&self.uri));
        }
        Ok(sel)
    }

    /// With several globs, each must match one of `names` (the model's tensors): a typo in one
    /// would otherwise go unnoticed beside another that matches (a single glob that matches
    /// nothing selects nothing, which is an error of its own).
    fn check_each_glob_matches<'a>(&self, names: impl Iterator<Item = &'a str>) -> Result<()> {
        if self.globs.len() < 2 {
            return Ok(());
        }
        let mut unmatched = self
            .globs
            .iter()
            .map(|g| filter_glob(g).map(|g| g.compile_matcher()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .zip(&self.globs)
            .collect::<Vec<_>>();
        let mut count = 0usize;
        for name in names {
            count += 1;
            unmatched.retain(|(m, _)| !m.is_match(name));
            if unmatched.is_empty() {
                return Ok(());
            }
        }
        match unmatched.first() {
            None => Ok(()),
            Some((_, g)) => Err(Error::invalid(format!(
                "filter {g:?} matches none of the {count} tensors (the other filters do)"
            ))),
        }
    }

    /// The filter, for messages: its globs when it has some.
    fn filter_words(&self) -> String {
        let quoted: Vec<String> = self.globs.iter().map(|g| format!("{g:?}")).collect();
        match (quoted.is_empty(), self.predicate.is_some()) {
            (true, _) => "the filter".to_string(),
            (false, false) => format!("filter {}", quoted.join(", ")),
            // The closure may be what excludes everything: name both.
            (false, true) => format!("filter {} with the filter closure", quoted.join(", ")),
        }
    }

    /// A shard's loader: every tensor its checkpoint index places in it must be in the file.
    /// Tensors the file holds but the index does not list are not part of the checkpoint (they
    /// are skipped, with a warning).
    /// Returns how many tensors the file holds that the index does not list.
    fn check_scope(&self, index: &TensorIndex) -> Result<Vec<String>> {
        let Some(scope) = &self.scope else {
            return Ok(Vec::new());
        };
        let held: std::collections::HashSet<&str> =
            index.tensors.iter().map(|t| t.name.as_str()).collect();
        let mut missing: Vec<&str> = scope
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| !held.contains(n))
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            let shown: Vec<String> = missing.iter().take(3).map(|n| sharded::quote(n)).collect();
            return Err(Error::corrupt(format!(
                "the checkpoint index {} places {} tensor(s) in this shard ({}) that it does not \
                 hold: {}{}",
                sharded::redact(&scope.index_uri),
                missing.len(),
                sharded::quote(&scope.file),
                shown.join(", "),
                if missing.len() > 3 { ", …" } else { "" }
            ))
            .with_location(sharded::redact(&self.uri)));
        }
        Ok(index
            .tensors
            .iter()
            .filter(|t| !scope.names.contains(&t.name))
            .map(|t| t.name.clone())
            .collect())
    }

    /// Warns about tensors a shard holds that its checkpoint index does not place there (not
    /// listed at all, or listed in another shard), naming the first few.
    fn warn_unlisted(&self, unlisted: Vec<String>) {
        if let (Some(scope), false) = (&self.scope, unlisted.is_empty()) {
            let shown: Vec<String> = unlisted.iter().take(3).map(|n| sharded::quote(n)).collect();
            let msg = format!(
                "{}: {} tensor(s) that the checkpoint index {} does not place in this shard are \
                 skipped: {}{}",
                sharded::redact(&self.uri),
                unlisted.len(),
                sharded::redact(&scope.index_uri),
                shown.join(", "),
                if unlisted.len() > 3 { ", …" } else { "" }
            );
            // Once per process and shard: a checkpoint is checked, then loaded (and `bench`
            // loads it again and again), and each would say it anew.
            static SAID: std::sync::Mutex<Option<std::collections::HashSet<String>>> =
                std::sync::Mutex::new(None);
            let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
            if said
                .get_or_insert_with(Default::default)
                .insert(msg.clone())
            {
                log::warn!("{msg}");
            }
        }
    }

    /// What the URI names (a loader built with [`Loader::from_backend`], or a shard's own
    /// loader, is always one file).
    fn source(&self) -> Result<sharded::Source> {
        if self.backend.is_some() || self.scope.is_some() {
            return Ok(sharded::Source::File(self.uri.clone()));
        }
        sharded::resolve(&self.uri, &self.backend_options())
    }

    /// The backend options, with the load's cancel flag (the deadline's, when one is set): the
    /// HTTP, S3 and NFS backends stop their own calls (opening, `stat`, metadata reads) once it
    /// is set, so that an opening left behind by a cancel ends within moments.
    fn backend_options(&self) -> OpenOptions {
        let mut o = self.open.clone();
        if let Some(c) = self.backend_cancel.as_ref().or(self.cancel.as_ref()) {
            o.cancel = Some(c.clone());
        }
        o
    }

    /// How many shards of `map` [`Loader::each_shard`] opens at a time: on an HTTP(S) or S3
    /// store (see [`remote_shards`]) [`REMOTE_SHARD_OPENS`], never more than the queue depth
    /// given (each opening has one request in flight); [`SHARD_OPENS`] elsewhere.
    fn shard_opens(&self, map: &sharded::ShardMap) -> usize {
        if remote_shards(map) {
            REMOTE_SHARD_OPENS
                .min(
                    self.queue_depth
                        .or(self.open.concurrency)
                        .unwrap_or(usize::MAX),
                )
                .max(1)
        } else {
            SHARD_OPENS
        }
    }

    /// `open` run on the loader of every shard of `map`, `shard_opens` shards at a time;
    /// the loaders and results in shard order, up to and including the first failure (after
    /// one, no further shard is started; every earlier one was, and has finished). The caller
    /// takes them in order, so that what it checks of an earlier shard (its scope, say) fails
    /// before a later shard's opening does, as in a loop over the shards.
    fn each_shard<'m, T: Send>(
        &self,
        map: &'m sharded::ShardMap,
        open: impl Fn(&Loader) -> Result<T> + Sync,
    ) -> Result<Vec<Opened<'m, T>>> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let n = map.shards.len();
        let results: Vec<std::sync::Mutex<Option<Result<T>>>> =
            (0..n).map(|_| std::sync::Mutex::new(None)).collect();
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        let work = || loop {
            if failed.load(Ordering::SeqCst) {
                return;
            }
            let k = next.fetch_add(1, Ordering::SeqCst);
            let Some(shard) = map.shards.get(k) else {
                return;
            };
            let r = self
                .check_cancelled()
                .and_then(|()| open(&self.shard_loader(map, shard)));
            // (A panicking `open` leaves its result empty, and the caller's scope panics.)
            failed.fetch_or(r.is_err(), Ordering::SeqCst);
            if let Ok(mut slot) = results[k].lock() {
                *slot = Some(r);
            }
        };
        let threads = n.min(self.shard_opens(map));
        if threads <= 1 {
            work();
        } else {
            std::thread::scope(|s| -> Result<()> {
                for _ in 1..threads {
                    std::thread::Builder::new()
                        .name("ts-shard-open".into())
                        .spawn_scoped(s, work)
                        .map_err(|e| {
                            Error::from_io(e, "starting a thread reading shard headers")
                        })?;
                }
                work();
                Ok(())
            })?;
        }
        let mut out = Vec::with_capacity(n);
        for (shard, r) in map.shards.iter().zip(results) {
            let l = self.shard_loader(map, shard);
            let r = match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(r) => r,
                // Not started (every shard before a failure was): the call was cancelled
                // meanwhile.
                None => Err(self.check_cancelled().err().unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::Io,
                        "a shard's header was not read (a thread reading them failed)",
                    )
                    .with_location(sharded::redact(&l.uri))
                })),
            };
            let failed = r.is_err();
            out.push((shard, l, r));
            if failed {
                break;
            }
        }
        Ok(out)
    }

    /// The loader of one shard of `map`: reads only the tensors the index places there; the
    /// progress total is the checkpoint's, set by the caller.
    fn shard_loader(&self, map: &sharded::ShardMap, shard: &sharded::Shard) -> Loader {
        let mut l = self.clone();
        l.uri = map.uri_of(shard);
        l.scope = Some(ShardScope {
            index_uri: map.index_uri.clone(),
            file: shard.file.clone(),
            names: shard.names.clone(),
            known: None,
            object: None,
            total: l.progress_total.take(),
        });
        l
    }

    /// Loads the selected tensors.
    ///
    /// The URI may also name a sharded checkpoint: a `….safetensors.index.json` (any backend;
    /// the shards are read from beside it), or a local directory, resolved as `transformers`
    /// does (its `model.safetensors`, else `model.safetensors.index.json`, else its only index,
    /// else its only model file).
    /// Every shard's header is read (eight at a time; 32 from HTTP(S) or S3, at most the queue
    /// depth) and checked against the index before any tensor data, then the shards load, two
    /// at a time; the model's [`LoadedModel::files`] tell which file each tensor came from.
    /// [`Loader::load_cuda`] loads a checkpoint too (one device allocation for all shards, a
    /// device model per shard), and so does [`Loader::load_cuda_streaming`] (one device
    /// model); [`Loader::convert`] joins a checkpoint's shards into one file.
    pub fn load(&self) -> Result<LoadedModel> {
        self.bounded(Loader::load_now)
    }

    /// Reads every selected tensor and checks it as a load would (with
    /// [`Loader::verify_hashes`], each tensorizer tensor against its hashes; decryption's MACs;
    /// the object not changing), keeping nothing: the tensors pass through host memory at most
    /// 128 MiB of the object at a time, or one larger tensor (two such groups while the next
    /// one is read), whatever the model's size. A sharded checkpoint's shards are checked one after another. Returns
    /// what was read (`tensor_bytes`: the tensors checked). What `inspect --verify` runs.
    pub fn check_data(&self) -> Result<LoadStats> {
        self.bounded(Loader::check_data_now)
    }

    fn check_data_now(&self) -> Result<LoadStats> {
        /// A destination that keeps nothing (the hook already checked each tensor).
        struct Discard;
        impl staged::Dest for Discard {
            fn write(&mut self, _placement: usize, _bytes: &[u8]) -> Result<()> {
                Ok(())
            }
            fn settle(&mut self) -> Result<()> {
                Ok(())
            }
        }
        let started = Instant::now();
        // (With the tensor bytes each shard counted in the checkpoint's progress total.)
        let loaders: Vec<(Loader, Option<u64>)> = match self.source()? {
            sharded::Source::Sharded(map) => self
                .check_shards(&map)?
                .0
                .into_iter()
                .map(|(l, b)| (l, Some(b)))
                .collect(),
            sharded::Source::File(u) => vec![(
                Loader {
                    uri: u,
                    ..self.clone()
                },
                None,
            )],
        };
        let mut total: Option<LoadStats> = None;
        for (l, counted) in &loaders {
            let p = l.prepare(None)?;
            l.correct_total(&p, *counted);
            let es = staged::fill(&p, &mut Discard, staged::GROUP_BYTES)?;
            let tensor_bytes = p.plan.placements.iter().map(|pl| pl.len).sum();
            let st = p.stats(tensor_bytes, &es, es.elapsed);
            total = Some(match total {
                None => st,
                Some(t) => LoadStats {
                    tensor_bytes: t.tensor_bytes + st.tensor_bytes,
                    bytes_read: t.bytes_read + st.bytes_read,
                    reads: t.reads + st.reads,
                    io_elapsed: t.io_elapsed + st.io_elapsed,
                    staging_bytes: t.staging_bytes.max(st.staging_bytes),
                    ..t
                },
            });
        }
        let mut st = total.ok_or_else(|| Error::invalid("no file to check"))?;
        st.elapsed = started.elapsed();
        Ok(st)
    }

    fn load_now(&self) -> Result<LoadedModel> {
        if let Device::Cuda(_) = self.device {
            return Err(Error::invalid(
                "this loader targets a CUDA device: use Loader::load_cuda (or load_cuda_streaming)",
            ));
        }
        let started = Instant::now();
        match self.source()? {
            sharded::Source::Sharded(map) => self.load_sharded(&map, started),
            sharded::Source::File(u) => {
                let one;
                let l = if u == self.uri {
                    self
                } else {
                    one = Loader {
                        uri: u,
                        ..self.clone()
                    };
                    &one
                };
                let (host, mut stats, _) = l.load_host(None)?;
                stats.elapsed = started.elapsed();
                Ok(LoadedModel {
                    parts: vec![ModelPart {
                        uri: l.uri.clone(),
                        shard: None,
                        host,
                    }],
                    merged: None,
                    by_name: None,
                    stats,
                })
            }
        }
    }

    /// One file into host memory. `selected`: the tensor bytes the caller counted into the
    /// progress total (a shard's); the total is corrected to the plan's read bytes. Also
    /// returns when the data phase began and ended.
    fn load_host(&self, selected: Option<u64>) -> Result<(HostModel, LoadStats, Span)> {
        let started = Instant::now();
        let p = self.prepare(None)?;
        self.correct_total(&p, selected);
        let sink = match p.hook.clone() {
            Some(h) => HostSink::with_hook(h, format::tensorizer::hook_threads()),
            None => HostSink::new(),
        }
        .with_prefault(p.caps.kernel_reads);
        let (sink, es) = execute(p.backend.clone(), &p.meta, p.plan.clone(), sink, &p.eopts)?;
        let ended = Instant::now();
        let span = (ended.checked_sub(es.elapsed).unwrap_or(started), ended);
        let (arena, _) = sink.into_parts()?;
        let stats = p.stats(0, &es, started.elapsed());
        let host = HostModel::new(arena, p.index, &p.plan)?;
        let stats = LoadStats {
            tensor_bytes: host.nbytes(),
            ..stats
        };
        Ok((host, stats, span))
    }

    /// A shard's loader corrects the checkpoint's progress total (which counted the shard's
    /// tensor bytes) to the bytes its plan reads.
    fn correct_total(&self, p: &Prepared, selected: Option<u64>) {
        if let (Some(counted), Some(total)) = (selected, &self.outer_total()) {
            use std::sync::atomic::Ordering::Relaxed;
            let planned = p.plan.read_bytes;
            if planned >= counted {
                total.fetch_add(planned - counted, Relaxed);
            } else {
                total.fetch_sub(counted - planned, Relaxed);
            }
        }
    }

    /// The first pass over a sharded checkpoint: every shard's header read and checked against
    /// the index, a tensorizer shard's meta tensors' headers too (`check_meta_headers`), so
    /// that a missing, mismatched or corrupted shard fails before gigabytes are read.
    /// Returns the loaders of the shards holding a selected tensor with the tensor bytes each
    /// selects, and the combined index; sets the progress total.
    fn check_shards(&self, map: &sharded::ShardMap) -> Result<(Vec<(Loader, u64)>, TensorIndex)> {
        let too_big = || {
            Error::corrupt("the shards' tensors add up to more than 2^64 bytes")
                .with_location(sharded::redact(&map.index_uri))
        };
        let mut todo = Vec::new();
        let mut indexes = Vec::with_capacity(map.shards.len());
        let mut total = 0u64;
        let opened = self.each_shard(map, |l| {
            let (be, meta, index, object) = l.open_index_with(true)?;
            l.check_meta_headers(be.as_ref(), &index)?;
            drop(be);
            Ok((meta, index, object))
        })?;
        let mut kept = 0u64;
        for (shard, mut l, opened) in opened {
            let (meta, index, object) = opened?;
            l.warn_unlisted(l.check_scope(&index)?);
            let sel = l.select(&index)?;
            let bytes = sel
                .iter()
                .try_fold(0u64, |a, &i| a.checked_add(index.tensors[i].nbytes()))
                .ok_or_else(too_big)?;
            indexes.push(scoped_index(index.clone(), &shard.names));
            if !sel.is_empty() {
                total = total.checked_add(bytes).ok_or_else(too_big)?;
                if let Some(scope) = l.scope.as_mut() {
                    scope.known = Some(Arc::new((meta, index)));
                    if let Some(bytes) = object {
                        let size = bytes.len() as u64;
                        if kept.saturating_add(size) <= SMALL_OBJECTS_KEPT {
                            kept += size;
                            scope.object = Some(Arc::new(bytes));
                        }
                    }
                }
                todo.push((l, bytes));
            }
        }
        self.check_checkpoint_options(indexes.iter(), &map.index_uri)?;
        let merged = combined_index(&indexes)
            .map_err(|e| e.with_location(sharded::redact(&map.index_uri)))?;
        drop(indexes);
        self.check_each_glob_matches(merged.tensors.iter().map(|t| t.name.as_str()))
            .map_err(|e| e.with_location(sharded::redact(&map.index_uri)))?;
        if todo.is_empty() {
            return Err(Error::invalid(format!(
                "{} matches none of the {} tensors of the checkpoint",
                self.filter_words(),
                map.tensors
            ))
            .with_location(sharded::redact(&map.index_uri)));
        }
        if let Some(t) = &self.progress_total {
            t.store(total, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((todo, merged))
    }

    /// The per-tensor headers of a tensorizer shard's meta tensors (which store no bytes and
    /// load as zeros), read and checked against its index as every load of the shard checks
    /// them (`format::tensorizer::prepare`): a corrupted one fails the checkpoint's check,
    /// before anything is loaded or allocated (the other shards' bytes, a GPU load's one
    /// device allocation), not at that shard's turn. One read for a few neighbouring headers;
    /// nothing for a shard without meta tensors. A shard whose options are refused (an
    /// encrypted one without a key) is left to `check_checkpoint_options`, which names them.
    fn check_meta_headers(&self, be: &dyn Backend, index: &TensorIndex) -> Result<()> {
        let ropts = self.read_options(index);
        if index.format != tensorstream_engine::Format::Tensorizer
            || !index
                .tensors
                .iter()
                .any(|t| t.source == tensorstream_engine::TensorSource::Zeros)
            || format::tensorizer::check_options(index, &ropts).is_err()
        {
            return Ok(());
        }
        format::tensorizer::prepare(be, &mut index.clone(), &ropts)
            .map(drop)
            .map_err(|e| e.with_location(sharded::redact(&self.uri)))
    }

    /// A sharded checkpoint: checked (see `check_shards`), then the shards with selected
    /// tensors loaded, [`SHARD_LANES`] at a time ([`SMALL_SHARD_LANES`] when all are small,
    /// [`REMOTE_SMALL_SHARD_LANES`] on an HTTP(S) or S3 store: see `shard_lanes`).
    fn load_sharded(&self, map: &sharded::ShardMap, started: Instant) -> Result<LoadedModel> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (mut todo, merged) = self.check_shards(map)?;
        // Two shards load at a time, so that one's start (open, plan, first reads) overlaps
        // the other's last reads instead of the storage idling between shards; more when all
        // are small, whose loads are mostly round trips (see `shard_lanes`). Each lane gets
        // its share of the staging budget and of the queue depth, so the load keeps the reads
        // in flight and the host memory of a single-file load. They stop on their own flag,
        // which follows the caller's cancel flag and is set when a shard fails.
        let lanes = shard_lanes(
            todo.iter().map(|(_, bytes)| *bytes),
            remote_shards(map),
            self.queue_depth.or(self.open.concurrency),
        );
        let stop = stop_flag(self.cancel.clone())?;
        for (l, _) in &mut todo {
            l.cancel = Some(stop.clone());
            l.ring_budget = (self.ring_budget / lanes).max(1 << 20);
        }
        type Loaded = Result<(HostModel, LoadStats, Span)>;
        // Each shard's result and the lane that loaded it.
        let results: Vec<std::sync::Mutex<Option<(usize, Loaded)>>> =
            todo.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let spawned: Result<()> = std::thread::scope(|s| {
            for lane in 0..lanes {
                let (todo, results, next, stop) = (&todo, &results, &next, &stop);
                let user = self.cancel.as_ref();
                std::thread::Builder::new()
                    .name("ts-shard-lane".into())
                    .spawn_scoped(s, move || {
                        // A lane that panics still stops the other.
                        let _guard = StopOnPanic(stop);
                        loop {
                            let k = next.fetch_add(1, Ordering::SeqCst);
                            let Some((l, bytes)) = todo.get(k) else {
                                return;
                            };
                            // The caller's flag directly too: the watcher sees it only
                            // every few milliseconds.
                            if stop.load(Ordering::SeqCst)
                                || user.is_some_and(|c| c.load(Ordering::SeqCst))
                            {
                                return;
                            }
                            let mut l = l.clone();
                            l.lane = (lane, lanes);
                            let r = l
                                .load_host(Some(*bytes))
                                .map_err(|e| e.with_location(sharded::redact(&l.uri)));
                            if r.is_err() {
                                stop.store(true, Ordering::SeqCst);
                            }
                            if let Ok(mut slot) = results[k].lock() {
                                *slot = Some((lane, r));
                            }
                        }
                    })
                    .map_err(|e| {
                        stop.store(true, Ordering::SeqCst);
                        Error::from_io(e, "starting a shard lane")
                    })?;
            }
            Ok(())
        });
        spawned?;
        let mut spans = Vec::with_capacity(todo.len());
        let mut parts = Vec::with_capacity(todo.len());
        let mut stats: Option<LoadStats> = None;
        // Per lane: the most staging memory any of its shards used.
        let mut lane_peak = vec![0u64; lanes];
        let mut errors = Vec::new();
        for ((l, _), r) in todo.iter().zip(results) {
            match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some((lane, Ok((host, st, span)))) => {
                    spans.push(span);
                    parts.push(ModelPart {
                        uri: l.uri.clone(),
                        shard: l.scope.as_ref().map(|s| s.file.clone()),
                        host,
                    });
                    if let Some(p) = lane_peak.get_mut(lane) {
                        *p = (*p).max(st.staging_bytes);
                    }
                    stats = Some(LoadStats::add_shard(stats, st, Duration::ZERO));
                }
                Some((_, Err(e))) => errors.push(e),
                None => {}
            }
        }
        if let Some(e) = first_failure(errors) {
            return Err(e);
        }
        let Some(mut stats) = stats else {
            return Err(Error::new(ErrorKind::Cancelled, "cancelled")
                .with_location(sharded::redact(&map.index_uri)));
        };
        if parts.len() != todo.len() {
            return Err(Error::new(
                ErrorKind::Cancelled,
                "the load stopped before every shard was read",
            )
            .with_location(sharded::redact(&map.index_uri)));
        }
        // The lanes overlap: the time some shard was in its data phase (shards' opens and plans
        // between them left out), and the staging memory the lanes held together. (Each shard
        // reports the whole load's queue depth.)
        stats.elapsed = started.elapsed();
        stats.io_elapsed = covered(&mut spans);
        stats.staging_bytes = lane_peak.iter().sum();
        let by_name = Some(names_to_parts(
            parts.iter().map(|p| p.host.tensors().map(|t| t.name)),
        ));
        Ok(LoadedModel {
            parts,
            merged: Some(merged),
            by_name,
            stats,
        })
    }

    /// The progress total a shard's loader corrects (its own is unset: see `shard_loader`).
    fn outer_total(&self) -> Option<Arc<AtomicU64>> {
        self.scope.as_ref().and_then(|s| s.total.clone())
    }

    /// Fails with `Cancelled` once what this loader prepares was given up (`abandoned`):
    /// checked before each step of a preparation that may ask the store something (opening the
    /// object, reading its metadata, the tensorizer hooks' reads) and before its plan. The step
    /// in flight when the flag is set is not looked at here: a shard's preparation gives its
    /// backend a flag that follows `abandoned` (see `each_shard_on_device`), and the HTTP, S3
    /// and NFS backends stop that step's request once it is set, failing it `Cancelled`.
    fn check_abandoned(&self) -> Result<()> {
        if self
            .abandoned
            .as_ref()
            .is_some_and(|a| a.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(Error::new(
                ErrorKind::Cancelled,
                "given up: the load this shard was being prepared for has failed",
            )
            .with_location(sharded::redact(&self.uri)));
        }
        Ok(())
    }

    /// Fails with `Cancelled` once the cancel flag is set (checked between shards).
    fn check_cancelled(&self) -> Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Error::new(ErrorKind::Cancelled, "cancelled")
                .with_location(sharded::redact(&self.uri)));
        }
        Ok(())
    }

    /// Opens the CUDA device this loader targets (clear error when there is no driver/device),
    /// or takes the handle given to `on_device`; with the time the driver took to create the
    /// CUDA context in this call (zero for a handle given to `on_device`).
    fn cuda_device(&self) -> Result<(Arc<tensorstream_cuda::CudaDevice>, Duration)> {
        let Device::Cuda(n) = self.device else {
            return Err(Error::invalid(
                "this loader targets the cpu: set .device(Device::Cuda(n)) first",
            ));
        };
        match &self.opened {
            Some(d) if d.ordinal() != n => Err(Error::invalid(format!(
                "the loader targets cuda:{n}, but the device given to on_device() is cuda:{}: \
                 a later device() does not replace that handle (give the cuda:{n} one to \
                 on_device())",
                d.ordinal()
            ))),
            Some(d) => {
                // The handle keeps its options normalised (slot size in whole pages).
                if self.cuda.validated().ok().as_ref() != Some(d.options()) {
                    return Err(Error::invalid(
                        "cuda_options() differ from those of the device given to on_device(): \
                         a handle's streams and pinned slots are fixed when it is opened",
                    ));
                }
                Ok((d.clone(), Duration::ZERO))
            }
            _ => {
                let dev = tensorstream_cuda::CudaDevice::open(n, &self.cuda)?;
                let ctx = dev.context_open_time();
                Ok((dev, ctx))
            }
        }
    }

    /// Loads the selected tensors into one device allocation on the CUDA device set with
    /// [`Loader::device`], through pinned staging slots and async copies on several streams.
    ///
    /// `stats().elapsed` runs from after the device was opened (index, plan, device allocation,
    /// reads and copies) to the last tensor on the device; opening the device is
    /// `stats().device_open`.
    ///
    /// Without [`Loader::on_device`] this opens a device handle of its own, and the model keeps
    /// it (and its pinned staging ring, 160 MiB by default) until the model is released: to
    /// keep several models, open one device and share it with `on_device`.
    pub fn load_cuda(&self) -> Result<CudaModel> {
        self.bounded(Loader::load_cuda_now)
    }

    fn load_cuda_now(&self) -> Result<CudaModel> {
        match self.source()? {
            sharded::Source::Sharded(map) => self.load_cuda_sharded(&map),
            sharded::Source::File(u) if u == self.uri => self.load_cuda_file(None),
            sharded::Source::File(u) => Loader {
                uri: u,
                ..self.clone()
            }
            .load_cuda_file(None),
        }
    }

    /// A sharded checkpoint onto the device: the shards checked (as for a host load), the
    /// device opened once, every shard's device memory laid out from the header the check read
    /// (no shard is opened again for it: `shard_layouts`), ONE device allocation made for all
    /// of them, then the shards loaded in order, each into its window of that allocation,
    /// each opened and planned again while the one before it copies (`each_shard_on_device`:
    /// no shard's backend is open more than one shard ahead).
    fn load_cuda_sharded(&self, map: &sharded::ShardMap) -> Result<CudaModel> {
        // A handle given to `on_device` is claimed before the check: another load on it is
        // refused from this load's start.
        let early = self.claim_given_device()?;
        // The checkpoint is checked before the device is opened (a bad one costs no driver
        // start-up); `elapsed` leaves the opening out, as for one file.
        let started = Instant::now();
        let (todo, merged) = self.check_shards(map)?;
        let opening = Instant::now();
        let (dev, device_context) = self.cuda_device()?;
        let device_open = opening.elapsed();
        // The device stays this load's between its shards (each takes and gives back the
        // slots): another load on the handle is refused, not let in half-way.
        let claim = self.claimed(&dev, early)?;
        let _acting = claim.enter();
        let layouts = shard_layouts(&dev, &todo)?;
        let (whole, windows, alloc) = shard_arena(&dev, &layouts, &sharded::redact(&self.uri))?;
        let mut parts = Vec::with_capacity(todo.len());
        let mut stats: Option<LoadStats> = None;
        each_shard_on_device(&dev, todo, windows, |(l, p, route, window)| {
            self.check_cancelled()?;
            let shard_start = started.elapsed().saturating_sub(device_open);
            let location = sharded::redact(&l.uri);
            let target = tensorstream_cuda::Target {
                arena: Some(window),
                subscriber: None,
                keep: None,
            };
            let t = Instant::now();
            let (model, es, mapped) =
                run_cuda(&dev, &p, route, target).map_err(|e| e.with_location(location))?;
            let st = p.cuda_stats(&dev, route, &model, &es, mapped, t.elapsed());
            parts.push(CudaPart {
                uri: l.uri.clone(),
                shard: l.scope.as_ref().map(|s| s.file.clone()),
                model,
            });
            stats = Some(LoadStats::add_shard(stats.take(), st, shard_start));
            Ok(())
        })?;
        drop(whole); // the windows hold the allocation now
        let mut stats = stats.expect("at least one shard was loaded");
        stats.elapsed = started.elapsed().saturating_sub(device_open);
        stats.device_open = device_open;
        stats.device_context = device_context;
        stats.device_alloc = alloc;
        let by_name = Some(names_to_parts(
            parts.iter().map(|p| p.model.tensors().map(|t| t.name)),
        ));
        Ok(CudaModel {
            parts,
            merged: Some(merged),
            by_name,
            stats,
        })
    }

    /// One file onto the device; `selected`: see [`Loader::load_host`].
    fn load_cuda_file(&self, selected: Option<u64>) -> Result<CudaModel> {
        let opening = Instant::now();
        let (dev, device_context) = self.cuda_device()?;
        let device_open = opening.elapsed();
        // Another load on the handle is refused from here (before the object is opened and
        // planned) until this one has ended.
        let claim = self.claimed(&dev, None)?;
        let _acting = claim.enter();
        let started = Instant::now();
        let (p, route) = self.prepare_cuda(&dev, selected)?;
        // The device model's times count from the start of its copies.
        let planned = started.elapsed();
        let (model, es, mapped) = run_cuda(&dev, &p, route, Default::default())?;
        let mut stats = p.cuda_stats(&dev, route, &model, &es, mapped, started.elapsed());
        stats.first_tensor = stats.first_tensor.map(|d| planned + d);
        stats.device_open = device_open;
        stats.device_context = device_context;
        Ok(CudaModel {
            parts: vec![CudaPart {
                uri: self.uri.clone(),
                shard: self.scope.as_ref().map(|s| s.file.clone()),
                model,
            }],
            merged: None,
            by_name: None,
            stats,
        })
    }

    /// Claims the device handle given to [`Loader::on_device`] for this load (see
    /// [`tensorstream_cuda::CudaDevice::claim`]); `None` without one (the load opens a handle
    /// of its own, which no other load can use).
    fn claim_given_device(&self) -> Result<Option<tensorstream_cuda::Claim>> {
        self.opened
            .as_ref()
            .filter(|_| matches!(self.device, Device::Cuda(_)))
            .map(|d| d.claim())
            .transpose()
            .map_err(|e| e.with_location(sharded::redact(&self.uri)))
    }

    /// The load's claim on `dev`: `early` (the claim of the handle given to `on_device`, made
    /// at the load's start), or one made now.
    fn claimed(
        &self,
        dev: &tensorstream_cuda::CudaDevice,
        early: Option<tensorstream_cuda::Claim>,
    ) -> Result<tensorstream_cuda::Claim> {
        match early {
            Some(c) => Ok(c),
            None => dev
                .claim()
                .map_err(|e| e.with_location(sharded::redact(&self.uri))),
        }
    }

    /// One file's GPU load, up to the copies: metadata, selection, plan, and which way the
    /// bytes go.
    fn prepare_cuda(
        &self,
        dev: &Arc<tensorstream_cuda::CudaDevice>,
        selected: Option<u64>,
    ) -> Result<(Prepared, GpuRoute)> {
        let p = self.prepare(Some(dev.options()))?;
        self.correct_total(&p, selected);
        let route = p.gpu_route(dev.options())?;
        Ok((p, route))
    }

    /// Like [`Loader::load_cuda`], but returns once the load has started: iterate the result to
    /// get each tensor as soon as its bytes are on the device, then `wait()` for the whole
    /// model.
    ///
    /// Before it returns, this call blocks like [`Loader::load_cuda`] does for the same steps:
    /// it opens the device (unless [`Loader::on_device`] gave one), opens the object (`stat`,
    /// connecting, retries), reads its header and plans the load; the reads and copies then
    /// run on a thread of their own. From async code, call it on a blocking thread.
    ///
    /// A sharded checkpoint is checked (every shard's header against its index) before this
    /// returns; the shards then load in order (each opened and planned while the one before it
    /// copies) into one device allocation. Each [`tensorstream_cuda::ReadyTensor::tensor`]
    /// indexes the checkpoint's combined index (the stream's `index()`), its `at` counts from
    /// the start of the whole load, and `wait()` gives one device model over all shards.
    ///
    /// A tensor is announced once its bytes are on the device, and the load can still fail
    /// after that (a later read, a later shard, or the final check that the file did not
    /// change, which on the mapped page-cache route comes after every copy): use the announced
    /// tensors only once `wait()` returned `Ok`, unless you can undo work done with them.
    pub fn load_cuda_streaming(&self) -> Result<tensorstream_cuda::StreamingLoad> {
        if self.deadline.is_some() {
            return Err(Error::invalid(
                "Loader::deadline does not apply to load_cuda_streaming (it returns once the \
                 load has started): stop a streaming load with Loader::cancel_flag",
            ));
        }
        // The load stops on its own flag: set by dropping the handle, and following the
        // caller's cancel flag (which is never set by us).
        let stop = stop_flag(self.cancel.clone())?;
        let this = match self.source()? {
            sharded::Source::Sharded(map) => return self.stream_cuda_sharded(&map, stop),
            // The backend's own calls follow the stop flag (never cleared: see `bounded`).
            sharded::Source::File(u) => Loader {
                uri: u,
                backend_cancel: Some(stop.clone()),
                ..self.clone()
            },
        };
        let (dev, _) = this.cuda_device()?;
        // Claimed before the object is opened and planned, until the load's thread ends.
        let claim = this.claimed(&dev, None)?;
        let (mut p, route) = this.prepare_cuda(&dev, None)?;
        let index = p.index.clone();
        p.eopts.cancel = Some(stop.clone());
        p.host_eopts.cancel = Some(stop.clone());
        let keeper = tensorstream_cuda::Keeper::default();
        let keep = keeper.clone();
        tensorstream_cuda::StreamingLoad::spawn(move |tx| {
            let _acting = claim.enter();
            let target = tensorstream_cuda::Target {
                arena: None,
                subscriber: Some(tx),
                keep: Some(keep),
            };
            run_cuda(&dev, &p, route, target).map(|(m, es, _)| (m, es))
        })
        .map(|s| s.with_index(index).with_stop(stop).with_keeper(keeper))
    }

    /// [`Loader::load_cuda_streaming`] of a sharded checkpoint: checked and the device opened
    /// before it returns; then, on the load's thread, every shard's device memory laid out
    /// from the header the check read, one device allocation made, and the shards loaded in
    /// order into their windows of it, each opened and planned while the one before it copies.
    /// Each tensor is announced under its place in the combined index; the model is one
    /// `DeviceModel` over the whole allocation.
    fn stream_cuda_sharded(
        &self,
        map: &sharded::ShardMap,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<tensorstream_cuda::StreamingLoad> {
        // Claimed from the start (see `load_cuda_sharded`) until the load's thread ends.
        let early = self.claim_given_device()?;
        let (mut todo, merged) = self.check_shards(map)?;
        let (dev, _) = self.cuda_device()?;
        let claim = self.claimed(&dev, early)?;
        for (l, _) in &mut todo {
            l.cancel = Some(stop.clone());
        }
        let index = merged.clone();
        let keeper = tensorstream_cuda::Keeper::default();
        let keep = keeper.clone();
        let location = sharded::redact(&self.uri);
        tensorstream_cuda::StreamingLoad::spawn(move |tx| {
            let _acting = claim.enter();
            stream_shards(&dev, &location, todo, merged, &tx, &keep)
        })
        .map(|s| s.with_index(index).with_stop(stop).with_keeper(keeper))
    }

    /// The opening steps of a load, conversion or inspection: the backend (connecting), its
    /// `stat` and the metadata. Nothing in them checks the cancel flag (a backend call cannot be
    /// interrupted: a server that does not answer holds them until the backend's own timeouts
    /// and retries give up), so with a cancel flag they run on a thread of their own, and a
    /// cancel (or the deadline, which sets the flag) returns `Cancelled` at once. The abandoned
    /// thread ends by itself when its call returns, dropping what it made. Before each step
    /// they look at the loader's `abandoned` flag: a shard's preparation that its load gave up
    /// on starts no further call (`check_abandoned`), and the call it is in stops too on the
    /// HTTP, S3 and NFS backends (its backend flag follows `abandoned`: see
    /// `each_shard_on_device`).
    fn open_index(&self) -> Result<(Arc<dyn Backend>, ObjectMeta, TensorIndex)> {
        self.open_index_with(false)
            .map(|(be, meta, index, _)| (be, meta, index))
    }

    /// [`Loader::open_index`]; with `keep_small`, also the object's bytes when they came whole
    /// with its metadata, for a remote object with a version tag (what the check of a sharded
    /// checkpoint keeps for the shard's load: see [`SMALL_OBJECTS_KEPT`]). A shard whose bytes
    /// the check kept is opened and its size and version compared as always (`read_index`),
    /// and then read from those bytes.
    fn open_index_with(&self, keep_small: bool) -> Result<OpenedIndex> {
        use std::sync::atomic::Ordering;
        let steps = move |l: &Loader| -> Result<OpenedIndex> {
            l.check_abandoned()?;
            let (be, meta) = match l.checked_backend()? {
                Some(opened) => opened,
                None => l.backend_stat()?,
            };
            l.check_abandoned()?;
            if keep_small && meta.version.is_some() && !be.capabilities().kernel_reads {
                let (index, object) = format::read_index_and_object(be.as_ref(), &meta)?;
                return Ok((be, meta, index, object));
            }
            let index = l.read_index(be.as_ref(), &meta)?;
            let be = l.prefetched(be, &meta);
            Ok((be, meta, index, None))
        };
        let Some(flag) = self.cancel.clone() else {
            return steps(self);
        };
        self.check_cancelled()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let l = self.clone();
        std::thread::Builder::new()
            .name("ts-open".into())
            .spawn(move || {
                let _ = tx.send(steps(&l));
            })
            .map_err(|e| Error::from_io(e, "starting the thread that opens the object"))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "the thread opening the object ended without a result (it panicked)",
                    )
                    .with_location(&self.uri))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if flag.load(Ordering::SeqCst) {
                        // The opening left behind stops too: its backend follows this flag,
                        // which the caller cannot clear (see `bounded`).
                        if let Some(b) = &self.backend_cancel {
                            b.store(true, Ordering::SeqCst);
                        }
                        return Err(Error::new(
                            ErrorKind::Cancelled,
                            "cancelled while opening the object (connecting, or reading its \
                             size and metadata)",
                        )
                        .with_location(&self.uri));
                    }
                }
            }
        }
    }

    /// The object's index. For a shard checked moments ago (by `check_shards`, whose combined
    /// index the load returns), the object must still be the one checked: the same size and
    /// version tag (then the index read then is reused), or, without a version tag, a header
    /// describing the same tensors. A shard replaced in between fails with `ObjectChanged`
    /// (it was loaded in its new version, under the old combined index). (A remote shard whose
    /// reads carry its version is not asked again: `checked_backend` hands the check's size and
    /// version here, and its reads fail if the shard was replaced.)
    fn read_index(&self, be: &dyn Backend, meta: &ObjectMeta) -> Result<TensorIndex> {
        let Some(known) = self.scope.as_ref().and_then(|s| s.known.as_ref()) else {
            return format::read_index(be, meta);
        };
        let changed = |why: String| {
            Error::new(
                ErrorKind::ObjectChanged,
                format!(
                    "the shard changed after the checkpoint's shards were checked ({why}); load \
                     the checkpoint again"
                ),
            )
            .with_location(sharded::redact(&self.uri))
        };
        let (then, index) = (&known.0, &known.1);
        if then.size != meta.size || then.version != meta.version {
            return Err(changed(format!(
                "{} bytes then, {} now{}",
                then.size,
                meta.size,
                if then.version != meta.version {
                    ", and another version tag"
                } else {
                    ""
                }
            )));
        }
        if then.version.is_some() {
            return Ok(index.clone());
        }
        // No version tag to compare: the header is read again and must say the same.
        let now = format::read_index(be, meta)?;
        if !same_tensors(&now, index) {
            return Err(changed("its header describes other tensors".into()));
        }
        Ok(now)
    }

    /// The shard's bytes kept by the check (see [`SMALL_OBJECTS_KEPT`]) in place of `be`, once
    /// `read_index` found the object still the size and version the check saw; `be` otherwise.
    fn prefetched(&self, be: Arc<dyn Backend>, meta: &ObjectMeta) -> Arc<dyn Backend> {
        let Some(scope) = &self.scope else {
            return be;
        };
        match (&scope.known, &scope.object) {
            (Some(known), Some(bytes))
                if known.0 == *meta
                    && meta.version.is_some()
                    && bytes.len() as u64 == meta.size =>
            {
                Arc::new(prefetched::Prefetched::new(
                    be.as_ref(),
                    meta.clone(),
                    bytes.clone(),
                ))
            }
            _ => be,
        }
    }

    /// Metadata, selection, verification hooks and the plan, for either destination.
    fn prepare(&self, gpu: Option<&tensorstream_cuda::CudaOptions>) -> Result<Prepared> {
        let (be, meta, mut index) = self.open_index()?;
        let sel = self.select(&index)?;
        let ropts = self.read_options(&index);
        self.check_abandoned()?;
        let hook = format::tensorizer::prepare(be.as_ref(), &mut index, &ropts)
            .map_err(|e| e.with_location(&self.uri))?;
        let caps = be.capabilities();
        let mut popts = PlanOptions::new(meta.size);
        popts.alignment = if caps.direct_io {
            caps.alignment.max(1) as u64
        } else {
            1
        };
        // Reported values are the ones used: chunks are whole alignment blocks (as the planner
        // cuts them), the queue depth is capped like the engine caps it.
        let chunk = self.chunk_size.unwrap_or(caps.preferred_chunk).max(4096) as u64;
        popts.chunk_size = (chunk / popts.alignment).max(1) * popts.alignment;
        let depth = self
            .queue_depth
            .unwrap_or(caps.max_concurrency.max(1))
            .min(tensorstream_engine::pipeline::MAX_QUEUE_DEPTH);
        // A lane's share: the shares of all lanes add up to the load's depth (the lanes are
        // never more than the reads in flight given: see `load_sharded`; without one, the
        // small shards of an S3 store load 32 at a time against its 16, one read each).
        let (lane, lanes) = (self.lane.0, self.lane.1.max(1));
        let share = (depth / lanes + usize::from(lane < depth % lanes)).max(1);
        let mut eopts = EngineOptions {
            queue_depth: share,
            ring_budget: self.ring_budget,
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
        };
        // Host-side options, also used by GPU loads that verify or decrypt (staged through host).
        let mut host_popts = popts;
        host_popts.layout = Layout::Mirror;
        let host_eopts = eopts.clone();
        match gpu {
            None => popts.layout = Layout::Mirror,
            Some(o) => {
                // Every read must fit one pinned slot; the ring is the device's slots.
                popts.layout = Layout::Packed {
                    align: tensorstream_cuda::TENSOR_ALIGN,
                };
                popts.chunk_size = popts.chunk_size.min(o.slot_size as u64);
                // A cold local file (O_DIRECT reads) is read in 1 MiB pieces unless a chunk
                // size was given: virtio disks served many 1 MiB reads faster than fewer 4 MiB
                // ones (development machine, 2.1 GB file cold, 32 in flight, medians of 3-7
                // interleaved loads: 2.25-2.39 GB/s against 1.66-2.14), and fastsafetensors,
                // reading 512 KiB blocks, was the fastest cold peer on the H200 machine's disk.
                // Reads from the page cache keep whole slots (fewer, larger copies).
                let chunk_given = self.chunk_size.is_some() || self.open.chunk_size.is_some();
                if caps.kernel_reads && caps.direct_io && !chunk_given {
                    popts.chunk_size = popts.chunk_size.min(GPU_DIRECT_CHUNK);
                }
                if popts.alignment > 1 {
                    popts.chunk_size =
                        (popts.chunk_size / popts.alignment).max(1) * popts.alignment;
                }
                eopts.ring_budget = o.slots * o.slot_size;
                // Local files keep 32 reads in flight (one per slot with fewer slots) unless a
                // depth was given: a file in the page cache is copied by the pread threads, one
                // per read in flight, and that copy is CPU-bound (H200 machine, 6.6 GB warm: 8
                // reads in flight 22-26 GB/s, 16 33, 32 39-40); slots beyond are spare (see
                // `CudaOptions::slots`). Other backends keep their own depth (connections), and
                // like every GPU load read at most a slot at once: 4 MiB ranges by default
                // (S3 would read 16 MiB, HTTP 8 MiB), not measured on a GPU.
                let depth = match (self.queue_depth, self.open.concurrency) {
                    (None, None) if caps.kernel_reads => o.slots.min(GPU_LOCAL_DEPTH),
                    _ => eopts.queue_depth,
                };
                eopts.queue_depth = depth
                    .min(o.slots)
                    .min(tensorstream_engine::pipeline::MAX_QUEUE_DEPTH);
            }
        }
        self.check_abandoned()?;
        let plan = Arc::new(plan(&index, &sel, &popts).map_err(|e| e.with_location(&self.uri))?);
        if let Some(t) = &self.progress_total {
            t.store(plan.read_bytes, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Prepared {
            load_depth: (lanes > 1).then_some(depth),
            total: self.progress_total.clone().or_else(|| self.outer_total()),
            backend: be,
            meta,
            index,
            plan,
            hook,
            eopts,
            caps,
            chunk: popts.chunk_size,
            host_popts,
            host_eopts,
        })
    }

    /// The device memory this shard's GPU plan will lay out, `(arena length, alignment)`,
    /// without opening it: from the metadata and index the checkpoint's check read
    /// (`ShardScope::known`), which `prepare` reuses or finds unchanged. A packed layout
    /// depends only on the index (as `format::tensorizer::prepare` leaves it, which
    /// `strip_prefixes` does without reading), the selection and the tensor alignment: not on
    /// the backend's read sizes or alignment. A loader without a checked index is prepared.
    /// Options `prepare` refuses without reading (`check_options`) are refused here too.
    fn gpu_layout(&self, o: &tensorstream_cuda::CudaOptions) -> Result<(u64, u64)> {
        let Some(known) = self.scope.as_ref().and_then(|s| s.known.clone()) else {
            let p = self.prepare(Some(o))?;
            return Ok((p.plan.arena_len, p.plan.arena_align));
        };
        let (meta, index) = (&known.0, &known.1);
        let sel = self.select(index)?;
        let ropts = self.read_options(index);
        // What `prepare` would refuse without reading (an encrypted shard without its key),
        // refused before the device memory is allocated.
        format::tensorizer::check_options(index, &ropts).map_err(|e| e.with_location(&self.uri))?;
        let mut index = index.clone();
        format::tensorizer::strip_prefixes(&mut index, &ropts);
        let mut popts = PlanOptions::new(meta.size);
        popts.layout = Layout::Packed {
            align: tensorstream_cuda::TENSOR_ALIGN,
        };
        let plan = plan(&index, &sel, &popts).map_err(|e| e.with_location(&self.uri))?;
        Ok((plan.arena_len, plan.arena_align))
    }
}

/// Reads a GPU load of a local file keeps in flight by default (one per pinned slot with fewer
/// slots): each is a pread thread when the file is in the page cache.
const GPU_LOCAL_DEPTH: usize = 32;

/// Read size of GPU loads of cold local files (O_DIRECT) when no chunk size was given.
const GPU_DIRECT_CHUNK: u64 = 1 << 20;

/// Whether the shards of `map` are on an HTTP(S) or S3 store (they are beside the index).
fn remote_shards(map: &sharded::ShardMap) -> bool {
    matches!(
        tensorstream_backends::scheme_of(&map.index_uri).as_deref(),
        Some("http" | "https" | "s3")
    )
}

/// How many shards of a sharded checkpoint load to host memory at the same time, given the
/// tensor bytes each loads, whether they are on an HTTP(S) or S3 store and the queue depth
/// asked for (if any): [`SHARD_LANES`], or when no shard loads more than [`SMALL_SHARD`]
/// [`SMALL_SHARD_LANES`] ([`REMOTE_SMALL_SHARD_LANES`] from a remote store); never more than
/// the shards nor than the reads in flight.
fn shard_lanes(
    shard_bytes: impl Iterator<Item = u64>,
    remote: bool,
    depth: Option<usize>,
) -> usize {
    let (mut shards, mut small) = (0usize, true);
    for bytes in shard_bytes {
        shards += 1;
        small &= bytes <= SMALL_SHARD;
    }
    let most = match (small, remote) {
        (true, true) => REMOTE_SMALL_SHARD_LANES,
        (true, false) => SMALL_SHARD_LANES,
        (false, _) => SHARD_LANES,
    };
    shards.min(most).min(depth.unwrap_or(usize::MAX)).max(1)
}

/// A flag a streaming load stops on: set by dropping its handle, and set when `user` (the
/// caller's cancel flag) is (see `follower`: the process's one watcher thread,
/// `ts-stop-watch`, looks at it until the load finished and its handle is gone).
fn stop_flag(
    user: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<Arc<std::sync::atomic::AtomicBool>> {
    follower("ts-stream-stop", user)
}

/// A flag `follower` made that follows others, as the watcher keeps it: `name` says what it
/// is for (the tests count them by it).
struct Following {
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests (`followed_named`)
    name: &'static str,
    flag: std::sync::Weak<std::sync::atomic::AtomicBool>,
    followed: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

/// The flags that follow others (`follower`), and whether the watcher thread that looks at
/// them runs: one for the whole process, not one per flag (a sharded GPU load makes one such
/// flag per shard), started with the first flag and ending once none is left.
static FOLLOWING: std::sync::Mutex<(Vec<Following>, bool)> =
    std::sync::Mutex::new((Vec::new(), false));

/// How often the watcher looks at the followed flags.
const FOLLOW_LOOK: Duration = Duration::from_millis(10);

/// A new flag, set once any of `followed` is: seen within 10 ms by the process's one watcher
/// thread (`ts-stop-watch`), which stops looking at it once nothing holds the new flag any
/// more or it was set (by the watcher, or by whoever holds it: the followed flags are only
/// read, never written), and ends once it looks at no flag. Set from the start, without being
/// watched, when one of `followed` already is; without any to follow, it is not watched either
/// (only its holders set it). `name` says what the flag is for.
fn follower(
    name: &'static str,
    followed: impl IntoIterator<Item = Arc<std::sync::atomic::AtomicBool>>,
) -> Result<Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let followed: Vec<_> = followed.into_iter().collect();
    // The followed flags read once: one set already, the new flag is set from the start;
    // otherwise the watcher follows them.
    let set = followed.iter().any(|f| f.load(Ordering::SeqCst));
    let stop = Arc::new(AtomicBool::new(set));
    if set || followed.is_empty() {
        return Ok(stop);
    }
    let mut g = FOLLOWING.lock().unwrap_or_else(|p| p.into_inner());
    g.0.push(Following {
        name,
        flag: Arc::downgrade(&stop),
        followed,
    });
    if !g.1 {
        // Started under the lock: it looks at the flags once this call has let go of it.
        let started = std::thread::Builder::new()
            .name("ts-stop-watch".into())
            .spawn(watch_followed);
        if let Err(e) = started {
            g.0.pop();
            return Err(Error::from_io(e, "starting the stop watcher"));
        }
        g.1 = true;
    }
    Ok(stop)
}

/// The watcher thread of `follower`'s flags: every `FOLLOW_LOOK`, sets each flag one of whose
/// followed flags is set, and forgets the flags set or no longer held; ends once it has none.
fn watch_followed() {
    use std::sync::atomic::Ordering;
    loop {
        {
            let mut g = FOLLOWING.lock().unwrap_or_else(|p| p.into_inner());
            g.0.retain(|f| {
                let Some(stop) = f.flag.upgrade() else {
                    return false;
                };
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
                if f.followed.iter().any(|x| x.load(Ordering::SeqCst)) {
                    stop.store(true, Ordering::SeqCst);
                    return false;
                }
                true
            });
            if g.0.is_empty() {
                g.1 = false;
                return;
            }
        }
        std::thread::sleep(FOLLOW_LOOK);
    }
}

/// How many flags named `name` the watcher looks at (`follower`).
#[cfg(test)]
fn followed_named(name: &str) -> usize {
    FOLLOWING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .iter()
        .filter(|f| f.name == name && f.flag.strong_count() > 0)
        .count()
}

/// Sets the flag when the thread holding it unwinds from a panic.
struct StopOnPanic<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The error a load of several shards reports, from their errors in shard order: the first
/// shard's own failure, not the `Cancelled` it caused in the other lane — `Cancelled` only
/// when nothing else failed.
fn first_failure(errors: Vec<Error>) -> Option<Error> {
    let mut first: Option<Error> = None;
    for e in errors {
        match &first {
            None => first = Some(e),
            Some(f) if f.kind() == ErrorKind::Cancelled && e.kind() != ErrorKind::Cancelled => {
                first = Some(e)
            }
            Some(_) => {}
        }
    }
    first
}

/// When a load's data phase began and ended.
type Span = (Instant, Instant);

/// How long at least one of `spans` was running: the length of their union (spans that
/// overlap or touch count once; the gaps between them not at all). Sorts `spans`.
fn covered(spans: &mut [Span]) -> Duration {
    spans.sort_by_key(|s| s.0);
    let mut total = Duration::ZERO;
    let mut run: Option<Span> = None;
    for &(a, b) in spans.iter() {
        let b = b.max(a);
        run = match run {
            Some((ra, rb)) if a <= rb => Some((ra, rb.max(b))),
            Some((ra, rb)) => {
                total += rb - ra;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((ra, rb)) = run {
        total += rb - ra;
    }
    total
}

/// Most bytes [`Loader::inspect`] reads to check a key.
const MAX_KEY_CHECK: u64 = 64 << 20;

/// Decrypts (and so authenticates) the smallest stored, non-empty tensor of an encrypted file,
/// unless even that one is larger than [`MAX_KEY_CHECK`].
fn check_key_on_smallest(
    be: &dyn Backend,
    index: &TensorIndex,
    hook: &dyn tensorstream_engine::sink::TensorHook,
) -> Result<()> {
    use tensorstream_engine::{BackendExt, TensorSource};
    // The bytes one tensor's check reads: its per-tensor header (prefix) and its data.
    let span = |t: &TensorInfo| t.range.end - t.prefix.as_ref().map_or(t.range.start, |p| p.start);
    let Some((ti, t)) = index
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| t.source == TensorSource::Stored && t.nbytes() > 0)
        .min_by_key(|(_, t)| span(t))
    else {
        // Nothing stored (only meta or empty tensors): there is nothing a key decrypts.
        return Ok(());
    };
    if span(t) > MAX_KEY_CHECK {
        // Even the smallest tensor is big: a load will tell soon enough; `inspect` stays cheap.
        return Ok(());
    }
    let start = t.prefix.as_ref().map_or(t.range.start, |p| p.start);
    let len = usize::try_from(span(t))
        .map_err(|_| Error::invalid("tensor too large for this machine"))?;
    let mut bytes = be.read_exact_at(start, len)?;
    let data_start = (t.range.start - start) as usize;
    hook.process(ti, &mut bytes, data_start)
        // (The error names the tensor.)
        .map_err(|e| e.context("checking the key"))
}

/// How a GPU load moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GpuRoute {
    /// Engine reads into the pinned staging ring, async copies from the slots.
    Ring,
    /// Tensorizer verification / decryption: groups through host memory, then the slots.
    Staged,
    /// Local file in the page cache: mapped, host-registered pieces copied by the copy engine.
    Mapped,
}

impl GpuRoute {
    fn name(self) -> &'static str {
        match self {
            GpuRoute::Ring => "ring",
            GpuRoute::Staged => "staged",
            GpuRoute::Mapped => "mapped",
        }
    }
}

/// A GPU load's result: the model, the engine's figures and, for the mapped route, the
/// pieces registered and read with pread.
type CudaRun = (
    tensorstream_cuda::DeviceModel,
    tensorstream_engine::EngineStats,
    Option<(usize, usize)>,
);

/// The copies of a prepared GPU load, the way `route` says, into `target`.
fn run_cuda(
    dev: &Arc<tensorstream_cuda::CudaDevice>,
    p: &Prepared,
    route: GpuRoute,
    target: tensorstream_cuda::Target,
) -> Result<CudaRun> {
    // Every error names the object (a device error at the end of the mapped route came
    // without it).
    let located = |e: Error| e.with_location(sharded::redact(p.backend.location()));
    match route {
        GpuRoute::Staged => staged::load(dev, p, target).map(|(m, es)| (m, es, None)),
        GpuRoute::Mapped => mapped_load(dev, p, target)
            .map(|(m, es, ws)| (m, es, Some((ws.registered, ws.fallback)))),
        GpuRoute::Ring => tensorstream_cuda::load_to(
            dev,
            p.backend.clone(),
            &p.meta,
            p.index.clone(),
            p.plan.clone(),
            &p.eopts,
            target,
        )
        .map(|(m, es)| (m, es, None)),
    }
    .map_err(located)
}

/// Each shard's device memory as its GPU plan will lay it out (arena length and alignment),
/// from the index the checkpoint's check read (`Loader::gpu_layout`): no shard is opened again
/// for it (a `stat`, and on a remote store a round trip or more, per shard, one after another).
fn shard_layouts(
    dev: &tensorstream_cuda::CudaDevice,
    todo: &[(Loader, u64)],
) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(todo.len());
    for (l, _) in todo {
        l.check_cancelled()?;
        let layout = l
            .gpu_layout(dev.options())
            .map_err(|e| e.with_location(sharded::redact(&l.uri)))?;
        out.push(layout);
    }
    Ok(out)
}

/// A shard's GPU load, prepared (index, selection, plan, route) with the device's options `o`
/// to go into a window of `room` bytes, the device memory `shard_layouts` laid out for it. It
/// needs no device, and touches nothing the load shares: the checkpoint's progress total is
/// corrected to its plan by the load's thread, once it takes the shard (see
/// `each_shard_on_device`).
fn prepare_shard(
    o: &tensorstream_cuda::CudaOptions,
    l: &Loader,
    room: u64,
) -> Result<(Prepared, GpuRoute)> {
    let location = sharded::redact(&l.uri);
    l.check_cancelled()?;
    let p = l.prepare(Some(o)).map_err(|e| e.with_location(&location))?;
    l.check_abandoned()?;
    let route = p.gpu_route(o).map_err(|e| e.with_location(&location))?;
    if p.plan.arena_len > room {
        return Err(Error::new(
            ErrorKind::ObjectChanged,
            format!(
                "the shard changed while the checkpoint was loading: its tensors need {} bytes \
                 of device memory, {room} when it was planned",
                p.plan.arena_len,
            ),
        )
        .with_location(location));
    }
    Ok((p, route))
}

/// The shards of a sharded GPU load, in order, each prepared (`prepare_shard`) and handed to
/// `run` with its window, the next one prepared while `run` copies the current one (see
/// `one_ahead`): neither the device nor the store waits for a shard's opening and plan (on a
/// remote store a round trip or more each), and at most two shards' backends are open at once,
/// the one copying and the next. After a failure, a preparation still running is told to stop
/// (its loader's `abandoned` flag) and left to end by itself: the store call it is in (opening
/// the shard, its `stat`, its metadata) stops within moments on the HTTP, S3 and NFS backends,
/// and it starts no other call, the next step seeing the flag (`check_abandoned`); on other
/// backends that call runs to its end. For that, each shard's backend follows a flag of its own
/// (its loader's `backend_cancel`, a `follower`): set when the load's backend flag is (its
/// cancel flag, or the deadline's, without one), and when the preparation is abandoned; the
/// watcher stops looking at it once it is set, or dropped with the shard's loader and backend
/// (one watcher thread for all such flags, not one per shard). A preparation whose result
/// `run` takes is never abandoned: that shard's backend then stops on the load's flag alone,
/// as before (seen through the watcher, within 10 ms).
/// A preparation holds neither the device (only its options: not its context, pinned staging
/// ring or memory) nor anything of the load's it could change (the progress total is corrected
/// here, on the calling thread, for the shard `run` takes). `run` stays on the calling thread
/// (the one that reserved the device).
fn each_shard_on_device(
    dev: &Arc<tensorstream_cuda::CudaDevice>,
    todo: Vec<(Loader, u64)>,
    windows: Vec<Arc<tensorstream_cuda::DeviceArena>>,
    mut run: impl FnMut(ShardOnDevice) -> Result<()>,
) -> Result<()> {
    let rooms: Vec<u64> = windows.iter().map(|w| w.len()).collect();
    let mut windows = windows.into_iter();
    let o = dev.options().clone();
    one_ahead(
        todo.into_iter().zip(rooms),
        move |((mut l, bytes), room), abandoned: Arc<std::sync::atomic::AtomicBool>| {
            // A device given to `on_device` stays with the load's thread too.
            l.opened = None;
            // The shard's backend stops its calls once the load's flag (the one it followed
            // before: see `backend_options`) is set, or once this preparation is abandoned.
            let load = l.backend_cancel.clone().or_else(|| l.cancel.clone());
            l.backend_cancel = Some(follower(
                "ts-shard-stop",
                load.into_iter().chain([abandoned.clone()]),
            )?);
            l.abandoned = Some(abandoned);
            let (p, route) = prepare_shard(&o, &l, room)?;
            Ok((l, bytes, p, route))
        },
        |(l, bytes, p, route)| {
            let window = windows
                .next()
                .ok_or_else(|| Error::invalid("a shard without its window of device memory"))?;
            l.correct_total(&p, Some(bytes));
            run((l.on_device(dev.clone()), p, route, window))
        },
    )
}

/// A shard prepared for its GPU load (`prepare_shard`), with its window of the device memory.
type ShardOnDevice = (
    Loader,
    Prepared,
    GpuRoute,
    Arc<tensorstream_cuda::DeviceArena>,
);

/// `run` on what `prepare` made of each item, in order, with the next item's `prepare` on a
/// helper thread while `run` works on the current one: one item ahead, never more (item k+2
/// is not started before `run` of item k has returned). The first failure in item order ends
/// it and is the one returned: `run`'s on item k comes before `prepare`'s on item k+1; no
/// further item is started. A failure returns at once: a preparation still running then (an
/// opening waiting on a store that does not answer, say) is left to end by itself, its result
/// dropped, rather than waited for; its flag (the one `prepare` is handed) is set then, for it
/// to stop at its next look (`run` failing or panicking both set it; a preparation whose
/// result is taken never sees it set, nor does the first item's, which runs on the calling
/// thread before anything can fail).
fn one_ahead<T, P>(
    items: impl IntoIterator<Item = T>,
    prepare: impl Fn(T, Arc<std::sync::atomic::AtomicBool>) -> Result<P> + Send + Sync + 'static,
    mut run: impl FnMut(P) -> Result<()>,
) -> Result<()>
where
    T: Send + 'static,
    P: Send + 'static,
{
    use std::sync::atomic::{AtomicBool, Ordering};
    /// The next item's preparation on its thread, and its flag: set when this is dropped
    /// before its result was taken (`run` failed or panicked meanwhile).
    struct Ahead<P> {
        thread: Option<std::thread::JoinHandle<Result<P>>>,
        abandoned: Arc<AtomicBool>,
    }
    impl<P> Ahead<P> {
        /// The preparation's result (waited for). The handle is there: only this, which
        /// consumes `self`, takes it (`Option` only so that `drop` can tell).
        fn take(mut self) -> Result<P> {
            self.thread
                .take()
                .expect("a preparation's handle is taken once, here")
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
    }
    impl<P> Drop for Ahead<P> {
        fn drop(&mut self) {
            // Dropping the handle detaches the thread; the flag tells it to stop.
            if self.thread.is_some() {
                self.abandoned.store(true, Ordering::SeqCst);
            }
        }
    }
    let prepare = Arc::new(prepare);
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return Ok(());
    };
    let mut current = prepare(first, Arc::new(AtomicBool::new(false)));
    loop {
        let prepared = current?;
        let next = match items.next() {
            None => None,
            Some(item) => {
                let prepare = prepare.clone();
                let abandoned = Arc::new(AtomicBool::new(false));
                let flag = abandoned.clone();
                let thread = std::thread::Builder::new()
                    .name("ts-shard-prepare".into())
                    .spawn(move || prepare(item, flag))
                    .map_err(|e| Error::from_io(e, "starting the thread preparing a shard"))?;
                Some(Ahead {
                    thread: Some(thread),
                    abandoned,
                })
            }
        };
        // On an error here (or a panic) `next`, dropped, sets its flag and detaches its thread.
        run(prepared)?;
        let Some(next) = next else {
            return Ok(());
        };
        current = next.take();
    }
}

/// The body of a sharded streaming GPU load (see `Loader::stream_cuda_sharded`): each shard's
/// tensors are forwarded to `tx` as they land, renumbered into `merged` and timed from the
/// start of the whole load.
fn stream_shards(
    dev: &Arc<tensorstream_cuda::CudaDevice>,
    location: &str,
    todo: Vec<(Loader, u64)>,
    merged: TensorIndex,
    tx: &crossbeam_channel::Sender<tensorstream_cuda::ReadyTensor>,
    keep: &tensorstream_cuda::Keeper,
) -> Result<(
    tensorstream_cuda::DeviceModel,
    tensorstream_engine::EngineStats,
)> {
    let started = Instant::now();
    // The device is this load's (the caller's claim, which this thread works for) between
    // the shards too (see `load_cuda_sharded`).
    let layouts = shard_layouts(dev, &todo)?;
    let (whole, windows, alloc) = shard_arena(dev, &layouts, location)?;
    // Every shard's window is in it: streamed tensors stay valid if a later shard fails.
    keep.hold(whole.clone());
    let position = merged.positions();
    let mut parts = Vec::with_capacity(todo.len());
    let mut total = tensorstream_engine::EngineStats::default();
    each_shard_on_device(dev, todo, windows, |(l, p, route, window)| {
        let at = started.elapsed();
        // The shard's own numbering → the combined index's (every selected tensor of a shard
        // is in it: `check_shards` scoped the shard to the names the checkpoint lists).
        let renumber: Vec<Option<usize>> = p
            .index
            .tensors
            .iter()
            .map(|t| position.get(t.name.as_str()).copied())
            .collect();
        let (stx, srx) = crossbeam_channel::unbounded::<tensorstream_cuda::ReadyTensor>();
        let out = tx.clone();
        let forward = std::thread::Builder::new()
            .name("ts-shard-ready".into())
            .spawn(move || {
                for mut t in srx {
                    if let Some(Some(k)) = renumber.get(t.tensor) {
                        t.tensor = *k;
                        t.at += at;
                        let _ = out.send(t);
                    }
                }
            })
            .map_err(|e| Error::from_io(e, "spawning a forwarding thread"))?;
        let target = tensorstream_cuda::Target {
            arena: Some(window),
            subscriber: Some(stx),
            keep: None,
        };
        // The load drops its sender when it ends (either way), which ends the forwarder.
        let loaded = run_cuda(dev, &p, route, target);
        let _ = forward.join();
        let (model, es, _) = loaded.map_err(|e| e.with_location(sharded::redact(&l.uri)))?;
        total.reads += es.reads;
        total.bytes_read += es.bytes_read;
        total.staging_bytes = total.staging_bytes.max(es.staging_bytes);
        parts.push((model, at));
        Ok(())
    })?;
    total.elapsed = started.elapsed();
    let model = tensorstream_cuda::DeviceModel::combine(whole, merged, parts, alloc)?;
    Ok((model, total))
}

/// One device allocation for the shards' `(arena length, alignment)`: the allocation, each
/// shard's window of it (in order, aligned as asked) and the time the allocation took. Errors
/// name `location` (the checkpoint).
fn shard_arena(
    dev: &tensorstream_cuda::CudaDevice,
    layouts: &[(u64, u64)],
    location: &str,
) -> Result<(
    Arc<tensorstream_cuda::DeviceArena>,
    Vec<Arc<tensorstream_cuda::DeviceArena>>,
    Duration,
)> {
    use tensorstream_cuda::DeviceArena;
    let (offsets, total) = tensorstream_cuda::copy::pack_windows(layouts.iter().copied())?;
    let t = Instant::now();
    let whole = Arc::new(dev.alloc(total).map_err(|e| e.with_location(location))?);
    let alloc = t.elapsed();
    let windows = offsets
        .iter()
        .zip(layouts)
        .map(|(&off, &(len, _))| DeviceArena::window(&whole, off, len))
        .collect::<Result<Vec<_>>>()?;
    Ok((whole, windows, alloc))
}

/// The mapped warm path (`CudaOptions::warm`), for a local file; also gives what it did
/// (pieces registered / read with pread).
fn mapped_load(
    dev: &Arc<tensorstream_cuda::CudaDevice>,
    p: &Prepared,
    target: tensorstream_cuda::Target,
) -> Result<(
    tensorstream_cuda::DeviceModel,
    tensorstream_engine::EngineStats,
    tensorstream_cuda::WarmStats,
)> {
    let started = Instant::now();
    let version = p.meta.version.clone();
    let same_file = move |md: &std::fs::Metadata| {
        version.as_deref() == Some(tensorstream_backends::local::file_version(md).as_str())
    };
    let (model, ws) = tensorstream_cuda::load_mapped(
        dev,
        std::path::Path::new(p.backend.location()),
        p.index.clone(),
        &p.plan,
        tensorstream_cuda::WarmStrategy::Register,
        target,
        Some(&same_file),
        p.eopts.cancel.clone(),
    )?;
    if let Some(c) = &p.eopts.progress {
        // All at once at the end (the copies run on the device): the planned read bytes, the
        // total `progress_total` announced.
        c.fetch_add(p.plan.read_bytes, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(why) = &ws.refused {
        // Refused piece by piece (a registering thread fell back), or up front (the device
        // cannot register read-only: every piece went to pread threads).
        let preads = if ws.refused_pieces > 0 {
            ws.refused_pieces
        } else {
            ws.fallback
        };
        log::warn!(
            "{}: the driver refused to register the file's pages ({why}); {preads} of {} \
             pieces were read with pread into the pinned slots instead",
            p.backend.location(),
            ws.pieces
        );
    }
    let es = tensorstream_engine::EngineStats {
        reads: ws.pieces as u64,
        bytes_read: p.plan.useful_bytes,
        elapsed: started.elapsed(),
        staging_bytes: 0,
    };
    Ok((model, es, ws))
}

struct Prepared {
    backend: Arc<dyn Backend>,
    meta: ObjectMeta,
    index: TensorIndex,
    plan: Arc<tensorstream_engine::Plan>,
    hook: Option<Arc<dyn tensorstream_engine::sink::TensorHook>>,
    eopts: EngineOptions,
    caps: tensorstream_engine::Capabilities,
    chunk: u64,
    /// Plan and engine options for host loads of (a group of) the selection.
    host_popts: PlanOptions,
    host_eopts: EngineOptions,
    /// A shard lane's load: the reads in flight of the whole load (reported instead of the
    /// lane's share).
    load_depth: Option<usize>,
    /// The progress total this load's reads count towards (the caller's, or a checkpoint's),
    /// set to `plan.read_bytes` here or by the checkpoint; a route that reads otherwise (the
    /// staged groups) corrects it.
    total: Option<Arc<AtomicU64>>,
}

impl Prepared {
    /// A GPU load's statistics: [`Prepared::stats`] plus the route's and the device's figures.
    fn cuda_stats(
        &self,
        dev: &tensorstream_cuda::CudaDevice,
        route: GpuRoute,
        model: &tensorstream_cuda::DeviceModel,
        es: &tensorstream_engine::EngineStats,
        mapped: Option<(usize, usize)>,
        elapsed: Duration,
    ) -> LoadStats {
        let mut stats = self.stats(model.nbytes(), es, elapsed);
        stats.route = route.name();
        if route == GpuRoute::Staged {
            // The groups load with the host settings, not the pinned ring's.
            stats.queue_depth = self.host_eopts.queue_depth;
            stats.chunk_size = self.host_popts.chunk_size;
        }
        stats.mapped_pieces = mapped;
        stats.staging_page_locked = Some(dev.staging_page_locked());
        let times = model.times();
        stats.first_tensor = times.first_tensor;
        stats.device_alloc = times.alloc;
        stats
    }

    /// Which way a GPU load of this preparation goes.
    fn gpu_route(&self, opts: &tensorstream_cuda::CudaOptions) -> Result<GpuRoute> {
        if self.hook.is_some() {
            return Ok(GpuRoute::Staged);
        }
        // Residency from RWF_NOWAIT reads, not mincore (which some sandboxes answer "all
        // resident" for any mapping).
        let path = std::path::Path::new(self.backend.location());
        if self.caps.kind == "local"
            && tensorstream_cuda::use_mapped(opts.warm, || {
                tensorstream_backends::local::cached_fraction_of(path)
            })
        {
            return Ok(GpuRoute::Mapped);
        }
        Ok(GpuRoute::Ring)
    }

    fn stats(
        &self,
        tensor_bytes: u64,
        es: &tensorstream_engine::EngineStats,
        elapsed: Duration,
    ) -> LoadStats {
        LoadStats {
            tensor_bytes,
            bytes_read: es.bytes_read,
            reads: es.reads,
            elapsed,
            io_elapsed: es.elapsed,
            staging_bytes: es.staging_bytes,
            backend: self.caps.kind,
            direct_io: self.caps.direct_io,
            queue_depth: self.load_depth.unwrap_or(self.eopts.queue_depth),
            chunk_size: self.chunk,
            device_open: Duration::ZERO,
            device_context: Duration::ZERO,
            device_alloc: Duration::ZERO,
            staging_page_locked: None,
            first_tensor: None,
            mapped_pieces: None,
            route: "host",
        }
    }
}

/// Tensors loaded onto a CUDA device: one device allocation (a sharded checkpoint's shards each
/// in their window of it, with a device model per shard), per-tensor device pointers.
#[derive(Debug)]
pub struct CudaModel {
    /// One per file (at least one).
    parts: Vec<CudaPart>,
    /// A sharded checkpoint's combined index.
    merged: Option<TensorIndex>,
    /// A sharded checkpoint's tensor names → part.
    by_name: Option<std::collections::HashMap<String, usize>>,
    stats: LoadStats,
}

struct CudaPart {
    uri: String,
    shard: Option<String>,
    model: tensorstream_cuda::DeviceModel,
}

impl std::fmt::Debug for CudaPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPart")
            .field("uri", &sharded::redact(&self.uri))
            .field("shard", &self.shard)
            .field("model", &self.model)
            .finish()
    }
}

/// One file of a [`CudaModel`]: the model file, or one shard of a sharded checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CudaFile<'a> {
    part: &'a CudaPart,
}

impl<'a> CudaFile<'a> {
    /// Where the file was read from.
    pub fn uri(&self) -> &'a str {
        &self.part.uri
    }
    /// For a shard of a sharded checkpoint: its file name as the checkpoint index gives it.
    pub fn shard(&self) -> Option<&'a str> {
        self.part.shard.as_deref()
    }
    /// The file's tensors on the device (device pointers, readback).
    pub fn model(&self) -> &'a tensorstream_cuda::DeviceModel {
        &self.part.model
    }
}

impl CudaModel {
    /// The device model (tensors with device pointers, readback, release) of a model file. A
    /// sharded checkpoint has one per shard, so this is an error there (it used to be the first
    /// shard's, which silently missed the other shards' tensors): use [`CudaModel::files`] or
    /// [`CudaModel::get`], which cover them all.
    pub fn model(&self) -> Result<&tensorstream_cuda::DeviceModel> {
        match self.parts.as_slice() {
            [one] if self.merged.is_none() => Ok(&one.model),
            parts => Err(Error::invalid(format!(
                "a sharded checkpoint is loaded as one device model per shard ({}): use \
                 CudaModel::files or CudaModel::get",
                parts.len()
            ))),
        }
    }
    /// The device the model is on.
    pub fn device(&self) -> &Arc<tensorstream_cuda::CudaDevice> {
        self.parts[0].model.device()
    }
    /// The files loaded, in load order: one for a model file; for a sharded checkpoint, each
    /// shard that held a selected tensor.
    pub fn files(&self) -> impl Iterator<Item = CudaFile<'_>> {
        self.parts.iter().map(|part| CudaFile { part })
    }
    /// True when the model came from a sharded checkpoint.
    pub fn is_sharded(&self) -> bool {
        self.merged.is_some()
    }
    /// Number of tensors loaded (all files).
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.model.len()).sum()
    }
    /// True when nothing was loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The index: the file's, or a sharded checkpoint's combined one (see
    /// [`LoadedModel::index`]).
    pub fn index(&self) -> &TensorIndex {
        match &self.merged {
            Some(m) => m,
            None => self.parts[0].model.index(),
        }
    }
    /// A tensor by name, with the device model that holds it (for `to_host`, `read_chunks`).
    pub fn get(
        &self,
        name: &str,
    ) -> Option<(
        &tensorstream_cuda::DeviceModel,
        tensorstream_cuda::DeviceTensor<'_>,
    )> {
        fn find<'m>(
            p: &'m CudaPart,
            name: &str,
        ) -> Option<(
            &'m tensorstream_cuda::DeviceModel,
            tensorstream_cuda::DeviceTensor<'m>,
        )> {
            p.model.get(name).map(|t| (&p.model, t))
        }
        match &self.by_name {
            Some(m) => m.get(name).and_then(|&k| find(&self.parts[k], name)),
            None => self.parts.iter().find_map(|p| find(p, name)),
        }
    }
    /// Takes the device model of a model file out (e.g. to `release()` it explicitly). A
    /// sharded checkpoint has one per shard: use [`CudaModel::into_models`].
    pub fn into_model(mut self) -> Result<tensorstream_cuda::DeviceModel> {
        if self.parts.len() != 1 || self.merged.is_some() {
            return Err(Error::invalid(format!(
                "a sharded checkpoint is loaded as one device model per shard ({}): use \
                 CudaModel::into_models",
                self.parts.len()
            )));
        }
        Ok(self.parts.remove(0).model)
    }
    /// Takes every device model out, in load order (one per file). A sharded checkpoint's
    /// models are windows of one allocation, freed when the last of them is released.
    pub fn into_models(self) -> Vec<tensorstream_cuda::DeviceModel> {
        self.parts.into_iter().map(|p| p.model).collect()
    }
    /// Frees the device memory now (see `DeviceModel::release`); the first error is returned
    /// after all were tried.
    pub fn release(self) -> Result<()> {
        let mut first = Ok(());
        for m in self.into_models() {
            if let Err(e) = m.release() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
    /// Load statistics.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }
}

/// What a load did. (Fields may be added: build none yourself.)
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadStats {
    /// Bytes of tensor data loaded.
    pub tensor_bytes: u64,
    /// Bytes read from storage (alignment and gap bytes included).
    pub bytes_read: u64,
    /// Read requests.
    pub reads: u64,
    /// Wall time from start (metadata included) to the last byte in place. GPU loads leave
    /// out the opening of the device ([`LoadStats::device_open`], paid once per device handle).
    pub elapsed: Duration,
    /// Wall time of the data phase. For a sharded checkpoint loaded to host memory: the time
    /// at least one shard was in its data phase (shards load two at a time; their opens and
    /// plans are left out).
    pub io_elapsed: Duration,
    /// Host staging memory used besides the destination.
    pub staging_bytes: u64,
    /// Backend kind (`local`, `http` …).
    pub backend: &'static str,
    /// Whether reads bypassed the page cache.
    pub direct_io: bool,
    /// Reads in flight.
    pub queue_depth: usize,
    /// Read size.
    pub chunk_size: u64,
    /// GPU loads: opening the device (driver, context, streams, pinned staging), not part of
    /// `elapsed`: paid by each [`Loader::load_cuda`] call that opens a handle of its own; near
    /// zero for one given a handle with [`Loader::on_device`] (opened before). Zero for host
    /// loads.
    pub device_open: Duration,
    /// GPU loads: the part of `device_open` the driver took to create the CUDA context (zero
    /// when the device handle was already open, and for host loads). A process whose framework
    /// already holds a context on the device pays less there.
    pub device_context: Duration,
    /// GPU loads: how long allocating the device memory took (one allocation per load, a
    /// sharded checkpoint's included; on the ring route it overlaps the first reads). Zero for
    /// host loads.
    pub device_alloc: Duration,
    /// GPU loads: whether the staging ring is page-locked (`Some(false)` where the driver
    /// refused: copies then come from pageable memory). `None` for host loads.
    pub staging_page_locked: Option<bool>,
    /// GPU loads: from the start of the load (after the device was open, like `elapsed`) until
    /// the first tensor was complete on the device.
    pub first_tensor: Option<Duration>,
    /// GPU loads through the `mapped` route: pieces the copy engine read from registered
    /// page-cache pages, and pieces read with `pread` into the pinned slots because the driver
    /// refused to register them (a warning says why). `None` for other routes.
    pub mapped_pieces: Option<(usize, usize)>,
    /// How the bytes travelled: `host` (cpu loads), or for GPU loads `ring` (pinned staging
    /// slots), `staged` (verified / decrypted on the host first) or `mapped` (page cache read by
    /// the copy engine, `CudaOptions::warm`); `mixed` for a sharded checkpoint whose shards went
    /// different ways (their `queue_depth` and `chunk_size` are then the first shard's).
    pub route: &'static str,
}

impl LoadStats {
    /// The statistics of the shards loaded so far (`acc`) and of the next one (`st`, whose load
    /// began `start` after the checkpoint's): counts summed; the first shard's settings;
    /// `first_tensor` from the first shard that reports one, counted from the checkpoint's
    /// start. The caller sets `elapsed`.
    fn add_shard(acc: Option<LoadStats>, st: LoadStats, start: Duration) -> LoadStats {
        let first = st.first_tensor.map(|d| start + d);
        let Some(acc) = acc else {
            return LoadStats {
                first_tensor: first,
                ..st
            };
        };
        LoadStats {
            tensor_bytes: acc.tensor_bytes.saturating_add(st.tensor_bytes),
            bytes_read: acc.bytes_read.saturating_add(st.bytes_read),
            reads: acc.reads.saturating_add(st.reads),
            io_elapsed: acc.io_elapsed + st.io_elapsed,
            staging_bytes: acc.staging_bytes.max(st.staging_bytes),
            direct_io: acc.direct_io && st.direct_io,
            first_tensor: acc.first_tensor.or(first),
            route: if acc.route == st.route {
                acc.route
            } else {
                "mixed"
            },
            mapped_pieces: match (acc.mapped_pieces, st.mapped_pieces) {
                (Some((a, b)), Some((c, d))) => Some((a + c, b + d)),
                (a, b) => a.or(b),
            },
            ..acc
        }
    }

    /// Tensor bytes per second over [`LoadStats::elapsed`], in GB/s (10^9).
    pub fn gbps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.tensor_bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

/// Tensors loaded into memory.
pub struct LoadedModel {
    /// One per file: a single model file, or the shards of a checkpoint that held a selected
    /// tensor, in load order.
    parts: Vec<ModelPart>,
    /// A sharded checkpoint's combined index.
    merged: Option<TensorIndex>,
    /// A sharded checkpoint's tensor names → part.
    by_name: Option<std::collections::HashMap<String, usize>>,
    stats: LoadStats,
}

struct ModelPart {
    uri: String,
    /// A shard's file name in the checkpoint index.
    shard: Option<String>,
    host: HostModel,
}

/// One file of a [`LoadedModel`]: the model file, or one shard of a sharded checkpoint.
#[derive(Clone, Copy)]
pub struct ModelFile<'a> {
    part: &'a ModelPart,
}

impl<'a> ModelFile<'a> {
    /// Where the file was read from.
    pub fn uri(&self) -> &'a str {
        &self.part.uri
    }
    /// The file's own index (every tensor the file holds, loaded or not).
    pub fn index(&self) -> &'a TensorIndex {
        self.part.host.index()
    }
    /// For a shard of a sharded checkpoint: its file name as the checkpoint index gives it.
    pub fn shard(&self) -> Option<&'a str> {
        self.part.shard.as_deref()
    }
    /// The tensors loaded from this file, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'a>> {
        self.part.host.tensors()
    }
}

impl std::fmt::Debug for ModelFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("uri", &sharded::redact(&self.part.uri))
            .field("tensors", &self.part.host.len())
            .finish()
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("files", &self.parts.len())
            .field("tensors", &self.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Tensors in file order (a sharded checkpoint: shard by shard).
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.parts.iter().flat_map(|p| p.host.tensors())
    }
    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        match &self.by_name {
            Some(m) => m.get(name).and_then(|&k| self.parts[k].host.get(name)),
            None => self.parts.iter().find_map(|p| p.host.get(name)),
        }
    }
    /// Number of tensors loaded.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.host.len()).sum()
    }
    /// True when nothing was loaded.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|p| p.host.is_empty())
    }
    /// The whole file's index. For a sharded checkpoint: every shard's tensors (those the
    /// checkpoint index lists), shard by shard, each `range` an offset in its own shard;
    /// `object_size` and `header_len` are the shards' sums, `format`, `version` and `metadata`
    /// the first shard's.
    pub fn index(&self) -> &TensorIndex {
        match &self.merged {
            Some(m) => m,
            None => self.parts[0].host.index(),
        }
    }
    /// The files the tensors came from, in load order: one for a model file; for a sharded
    /// checkpoint, each shard that held a selected tensor.
    pub fn files(&self) -> impl Iterator<Item = ModelFile<'_>> {
        self.parts.iter().map(|part| ModelFile { part })
    }
    /// True when the model came from a sharded checkpoint.
    pub fn is_sharded(&self) -> bool {
        self.merged.is_some()
    }
    /// Load statistics.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }
}

/// Tensor names → the part holding them (the first, should two hold one), so that looking a
/// tensor up does not scan every shard.
fn names_to_parts<'a, N: Iterator<Item = &'a str>>(
    parts: impl Iterator<Item = N>,
) -> std::collections::HashMap<String, usize> {
    let mut by_name = std::collections::HashMap::new();
    for (k, names) in parts.enumerate() {
        for n in names {
            by_name.entry(n.to_string()).or_insert(k);
        }
    }
    by_name
}

/// Whether two indexes of one object describe the same tensors at the same places.
fn same_tensors(a: &TensorIndex, b: &TensorIndex) -> bool {
    a.same_tensors_as(b)
        && a.tensors.iter().zip(&b.tensors).all(|(x, y)| {
            x.range == y.range && x.prefix == y.prefix && x.role == y.role && x.path == y.path
        })
}

/// A shard's index restricted to the tensors the checkpoint index places in it.
fn scoped_index(mut index: TensorIndex, names: &std::collections::HashSet<String>) -> TensorIndex {
    index.tensors.retain(|t| names.contains(&t.name));
    index
}

/// One file's index, from [`Loader::inspect_files`]. (`Debug` shows the URI without its
/// secrets, as messages do.)
#[derive(Clone)]
#[non_exhaustive]
pub struct FileIndex {
    /// Where the file is read from.
    pub uri: String,
    /// Its index (a shard's: the tensors the checkpoint index places in it).
    pub index: TensorIndex,
    /// For a shard of a sharded checkpoint: its file name in the checkpoint index.
    pub shard: Option<String>,
}

impl std::fmt::Debug for FileIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileIndex")
            .field("uri", &sharded::redact(&self.uri))
            .field("index", &self.index)
            .field("shard", &self.shard)
            .finish()
    }
}

/// Several files' indexes as one, as [`LoadedModel::index`] describes: tensors file by file,
/// each `range` an offset in its own file; `object_size` and `header_len` summed; `format`,
/// `version` and `metadata` the first file's. Fails (`Corrupt`) when there are none or when the
/// sizes add up to more than 2^64 bytes.
pub fn combined_index<'a>(
    indexes: impl IntoIterator<Item = &'a TensorIndex>,
) -> Result<TensorIndex> {
    let overflow = || Error::corrupt("the files' sizes add up to more than 2^64 bytes");
    let mut it = indexes.into_iter();
    let mut merged = it
        .next()
        .ok_or_else(|| Error::corrupt("no file index to combine"))?
        .clone();
    let mut data = merged
        .tensors
        .iter()
        .try_fold(0u64, |a, t| a.checked_add(t.nbytes()))
        .ok_or_else(overflow)?;
    for ix in it {
        merged.object_size = merged
            .object_size
            .checked_add(ix.object_size)
            .ok_or_else(overflow)?;
        merged.header_len = merged
            .header_len
            .checked_add(ix.header_len)
            .ok_or_else(overflow)?;
        for t in &ix.tensors {
            data = data.checked_add(t.nbytes()).ok_or_else(overflow)?;
        }
        merged.tensors.extend(ix.tensors.iter().cloned());
    }
    Ok(merged)
}

/// A `--filter` glob, or an error naming it.
fn filter_glob(glob: &str) -> Result<globset::Glob> {
    globset::Glob::new(glob).map_err(|e| Error::invalid(format!("bad filter {glob:?}: {e}")))
}

/// Refuses a conversion whose `output` is one of its local `inputs` (the same file, by device
/// and inode, whatever the path or link leading to it): renaming the output into place would
/// replace the input (a shard of the checkpoint being read, an encrypted file by its
/// plaintext).
fn check_not_input<'a>(
    output: &std::path::Path,
    inputs: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // no such file yet
    };
    for uri in inputs {
        let Ok(path) = tensorstream_backends::local_path(uri) else {
            continue; // remote
        };
        if let Ok(m) = std::fs::metadata(path) {
            if (m.dev(), m.ino()) == (out.dev(), out.ino()) {
                return Err(Error::invalid(format!(
                    "the output {} is the input {} itself: write the conversion to another path",
                    output.display(),
                    sharded::redact(uri)
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a conversion whose output cannot fit the free space beside `output`, before anything
/// is written: the tensors' bytes (a tensorizer output stores no bytes for all-zero meta tensors;
/// a safetensors output writes their zeros). Headers are not counted; where the free space
/// cannot be read, the conversion goes ahead.
fn check_room<'a>(
    output: &std::path::Path,
    tensors: impl Iterator<Item = &'a TensorInfo>,
) -> Result<()> {
    use format::convert::OutputFormat;
    let zeros_written = OutputFormat::from_path(output)? == OutputFormat::Safetensors;
    let needed = tensors
        .filter(|t| zeros_written || t.source != tensorstream_engine::TensorSource::Zeros)
        .fold(0u64, |n, t| n.saturating_add(t.nbytes()));
    let dir = format::convert::output_dir(output);
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    // Root may also write into the blocks reserved for it.
    let blocks = if rustix::process::geteuid().is_root() {
        st.f_bfree
    } else {
        st.f_bavail
    };
    let free = blocks.saturating_mul(st.f_frsize);
    if needed > free {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "the output needs {needed} bytes of tensor data, but {} has {free} bytes free",
                dir.display()
            ),
        )
        .with_location(output.display().to_string()));
    }
    Ok(())
}

/// Peak resident set size of this process so far (Linux: VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Resets this process's peak resident set size to its current size (Linux ≥ 4.0: writes `5`
/// to `/proc/self/clear_refs`), so that [`peak_rss_bytes`] then reports the peak of what runs
/// next. False where the kernel refused.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The README's Rust examples, compiled as doctests (`cargo test --doc`) so that they cannot
/// drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Shards that are all small (a request or two each: loading one is mostly waiting for
    /// round trips) load SMALL_SHARD_LANES at a time, REMOTE_SMALL_SHARD_LANES (32) from an
    /// HTTP(S) or S3 store; once one is large, SHARD_LANES at a time wherever they are; never
    /// more at a time than there are shards or reads in flight.
    #[test]
    fn small_shards_load_more_at_a_time() {
        const { assert!(SMALL_SHARD_LANES > SHARD_LANES) };
        assert_eq!((SMALL_SHARD_LANES, REMOTE_SMALL_SHARD_LANES), (8, 32));
        let mib = 1u64 << 20;
        let cases: &[(&[u64], bool, Option<usize>, usize)] = &[
            (&[2048; 500], false, None, SMALL_SHARD_LANES),
            (&[2048; 500], true, None, REMOTE_SMALL_SHARD_LANES),
            (&[16 * mib; 20], false, None, SMALL_SHARD_LANES),
            (&[16 * mib; 20], true, None, 20),
            (&[16 * mib; 40], true, None, REMOTE_SMALL_SHARD_LANES),
            (&[0, 1, 2], false, None, 3),
            (&[0, 1, 2], true, None, 3),
            (&[2048, 2048, 2048, 16 * mib + 1], false, None, SHARD_LANES),
            (&[2048, 2048, 2048, 16 * mib + 1], true, None, SHARD_LANES),
            (&[5 << 30; 4], false, None, SHARD_LANES),
            (&[5 << 30; 4], true, None, SHARD_LANES),
            (&[2048; 500], false, Some(4), 4),
            (&[2048; 500], true, Some(4), 4),
            (&[2048; 500], true, Some(16), 16),
            (&[2048; 500], true, Some(1000), REMOTE_SMALL_SHARD_LANES),
            (&[2048; 500], false, Some(64), SMALL_SHARD_LANES),
            (&[2048; 500], false, Some(1), 1),
            (&[5 << 30; 4], true, Some(1), 1),
            (&[], false, None, 1),
            (&[], true, None, 1),
        ];
        for &(bytes, remote, depth, want) in cases {
            assert_eq!(
                shard_lanes(bytes.iter().copied(), remote, depth),
                want,
                "{} shards, largest {:?}, remote {remote}, depth {depth:?}",
                bytes.len(),
                bytes.iter().max()
            );
        }
    }

    #[test]
    fn covered_counts_overlapping_spans_once_and_gaps_not_at_all() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ms = |n: u64| Duration::from_millis(n);
        let cases: &[(&[(u64, u64)], u64)] = &[
            (&[], 0),
            (&[(10, 30)], 20),
            // Two lanes overlapping, listed out of order.
            (&[(20, 50), (0, 30)], 50),
            // A shard's open and plan between two data phases is a gap.
            (&[(0, 10), (15, 25)], 20),
            // Touching, nested, and a reversed (empty) span.
            (&[(0, 10), (10, 20), (2, 5), (40, 30)], 20),
            // Two lanes: shard 1 and 3 in one, 2 and 4 in the other, with gaps in each.
            (&[(0, 40), (5, 30), (45, 90), (35, 60)], 90),
        ];
        for (spans, want) in cases {
            let mut v: Vec<Span> = spans.iter().map(|&(a, b)| (at(a), at(b))).collect();
            assert_eq!(covered(&mut v), ms(*want), "{spans:?}");
        }
    }

    /// Threads of this process named `name` (Linux).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.trim() == name)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    fn within(secs: u64, mut f: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The shards of a checkpoint loading side by side share the load's reads in flight.
    #[test]
    fn shard_lanes_split_the_queue_depth_between_them() {
        use tensorstream_engine::DType;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut file = format::safetensors::write_header(
            &[("w".to_string(), DType::U8, vec![64], 64)],
            &Default::default(),
        )
        .unwrap();
        file.resize(file.len() + 64, 1);
        std::fs::write(&path, &file).unwrap();
        let uri = path.display().to_string();
        for (depth, lanes) in [(8usize, 2usize), (9, 2), (1, 1), (3, 2)] {
            let shares: Vec<usize> = (0..lanes)
                .map(|lane| {
                    let mut l = Loader::new(&uri).queue_depth(depth);
                    l.lane = (lane, lanes);
                    l.prepare(None).unwrap().eopts.queue_depth
                })
                .collect();
            // The lanes' reads in flight add up to what the load was given, each at least one.
            assert_eq!(
                shares.iter().sum::<usize>(),
                depth,
                "{depth} over {lanes}: {shares:?}"
            );
            assert!(shares.iter().all(|&s| s >= 1), "{shares:?}");
            assert!(
                shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1,
                "{shares:?}"
            );
        }
    }

    /// GPU plans of a local file: 1 MiB reads when they bypass the page cache (unless a chunk
    /// size was given), whole slots when they go through it; one read in flight per slot.
    #[test]
    fn gpu_plans_read_cold_local_files_in_1mib_pieces() {
        use tensorstream_engine::DType;
        // (On the checkout's disk, not a tmpfs /tmp where O_DIRECT is refused; target/ is
        // created when CARGO_TARGET_DIR builds elsewhere.)
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
        std::fs::create_dir_all(base).unwrap();
        let dir = tempfile::Builder::new().tempdir_in(base).unwrap();
        let path = dir.path().join("m.safetensors");
        let n = 12u64 << 20;
        let mut file = format::safetensors::write_header(
            &[("w".to_string(), DType::U8, vec![n], n)],
            &Default::default(),
        )
        .unwrap();
        file.resize(file.len() + n as usize, 7);
        std::fs::write(&path, &file).unwrap();
        let gpu = tensorstream_cuda::CudaOptions::default();
        let uri = path.display().to_string();
        for (direct, given, want) in [
            (true, None, 1u64 << 20),
            (false, None, 4 << 20),
            (true, Some(2usize << 20), 2 << 20),
        ] {
            let mut l = Loader::new(&uri).open_options(OpenOptions {
                direct_io: Some(direct),
                ..Default::default()
            });
            if let Some(c) = given {
                l = l.chunk_size(c);
            }
            let p = l.prepare(Some(&gpu)).unwrap();
            assert_eq!(p.caps.direct_io, direct, "O_DIRECT refused under target/?");
            assert_eq!(p.chunk, want, "direct {direct}, chunk {given:?}");
            assert!(p.plan.reads.iter().all(|r| r.len() <= want));
            assert!(p.plan.reads.len() as u64 >= n / want);
            assert_eq!(p.eopts.queue_depth, GPU_LOCAL_DEPTH.min(gpu.slots));
            assert!(gpu.slots > GPU_LOCAL_DEPTH, "spare slots by default");
        }
        // Fewer slots than that: one read in flight per slot.
        let few = tensorstream_cuda::CudaOptions { slots: 16, ..gpu };
        let p = Loader::new(&uri).prepare(Some(&few)).unwrap();
        assert_eq!(p.eopts.queue_depth, 16);
    }

    #[test]
    fn a_streaming_loads_stop_flag_follows_the_callers_and_stops_being_watched() {
        // The caller's flag is seen (and never written).
        let user = Arc::new(AtomicBool::new(false));
        let stop = stop_flag(Some(user.clone())).unwrap();
        assert!(!stop.load(Ordering::SeqCst));
        user.store(true, Ordering::SeqCst);
        assert!(within(5, || stop.load(Ordering::SeqCst)));
        // Set by the handle's drop, the flag is not copied back to the caller's.
        let user = Arc::new(AtomicBool::new(false));
        let stop = stop_flag(Some(user.clone())).unwrap();
        stop.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(120));
        assert!(!user.load(Ordering::SeqCst));
        // Once nothing holds the flag, it is not watched any more. (Other tests' loads may
        // make such flags meanwhile: only the count going down is looked for.)
        drop(stop);
        let before = followed_named("ts-stream-stop");
        let stop = stop_flag(Some(Arc::new(AtomicBool::new(false)))).unwrap();
        assert!(followed_named("ts-stream-stop") > before);
        drop(stop);
        assert!(within(5, || followed_named("ts-stream-stop") <= before));
        // Without a caller's flag nothing is watched; nor with one set already (stopped from
        // the start).
        let before = followed_named("ts-stream-stop");
        let _stop = stop_flag(None).unwrap();
        let stop = stop_flag(Some(Arc::new(AtomicBool::new(true)))).unwrap();
        assert!(stop.load(Ordering::SeqCst));
        assert!(followed_named("ts-stream-stop") <= before);
    }

    /// The flag a shard's preparation gives its backend (`each_shard_on_device`) follows
    /// several: set once any of them is (each alone), never writing them; it stops being
    /// watched once it is set or dropped, and one watcher thread serves every such flag, which
    /// ends once none is left. (Its own name: other tests' flags are not counted.)
    #[test]
    fn a_flag_following_several_is_set_by_any_and_stops_being_watched() {
        const NAME: &str = "ts-test-follow";
        for k in 0..2 {
            let flags = [0, 1].map(|_| Arc::new(AtomicBool::new(false)));
            let f = follower(NAME, flags.iter().cloned()).unwrap();
            assert_eq!(followed_named(NAME), 1);
            std::thread::sleep(Duration::from_millis(30));
            assert!(!f.load(Ordering::SeqCst), "set with none of its flags set");
            flags[k].store(true, Ordering::SeqCst);
            assert!(
                within(5, || f.load(Ordering::SeqCst)),
                "flag {k} not followed"
            );
            assert!(
                !flags[1 - k].load(Ordering::SeqCst),
                "a followed flag was written"
            );
            // Set, it has nothing more to watch (though still held).
            assert!(within(5, || followed_named(NAME) == 0));
        }
        // Dropped unset: no longer watched.
        let flags = [0, 1].map(|_| Arc::new(AtomicBool::new(false)));
        let f = follower(NAME, flags.iter().cloned()).unwrap();
        assert_eq!(followed_named(NAME), 1);
        drop(f);
        assert!(within(5, || followed_named(NAME) == 0));
        // One of them set already: set from the start, not watched.
        flags[1].store(true, Ordering::SeqCst);
        let f = follower(NAME, flags.iter().cloned()).unwrap();
        assert!(f.load(Ordering::SeqCst));
        assert_eq!(followed_named(NAME), 0);
        // None to follow: never set but by its holders, not watched.
        let f = follower(NAME, []).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(!f.load(Ordering::SeqCst));
        assert_eq!(followed_named(NAME), 0);
        // Many at once: one watcher thread, which ends once none is left.
        let flags: Vec<_> = (0..50).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let many: Vec<_> = flags
            .iter()
            .map(|x| follower(NAME, [x.clone()]).unwrap())
            .collect();
        assert_eq!(followed_named(NAME), 50);
        // (A watcher that has just ended may still be listed beside the new one for a moment.)
        assert!(within(5, || threads_named("ts-stop-watch") == 1));
        flags[7].store(true, Ordering::SeqCst);
        assert!(within(5, || many[7].load(Ordering::SeqCst)));
        assert!(many
            .iter()
            .enumerate()
            .all(|(i, m)| i == 7 || !m.load(Ordering::SeqCst)));
        drop(many);
        assert!(within(5, || followed_named(NAME) == 0));
    }

    #[test]
    fn a_sharded_load_reports_the_failure_that_stopped_it_not_the_stop() {
        let cancelled = |m: &str| Error::new(ErrorKind::Cancelled, m);
        let corrupt = |m: &str| Error::new(ErrorKind::Corrupt, m);
        let pick = |v: Vec<Error>| first_failure(v).map(|e| (e.kind(), e.message().to_string()));
        assert!(pick(vec![]).is_none());
        // Shard 1 failed, which stopped shard 0 in the other lane: shard 1's error.
        assert_eq!(
            pick(vec![cancelled("s0"), corrupt("s1")]),
            Some((ErrorKind::Corrupt, "s1".into()))
        );
        // Two real failures: the first in shard order.
        assert_eq!(
            pick(vec![cancelled("s0"), corrupt("s1"), corrupt("s2")]),
            Some((ErrorKind::Corrupt, "s1".into()))
        );
        assert_eq!(
            pick(vec![corrupt("s0"), cancelled("s1")]),
            Some((ErrorKind::Corrupt, "s0".into()))
        );
        // Only stops (the caller cancelled): the first of them.
        assert_eq!(
            pick(vec![cancelled("s0"), cancelled("s1")]),
            Some((ErrorKind::Cancelled, "s0".into()))
        );
    }

    /// A shard replaced between the checkpoint's check and its own load fails with
    /// `ObjectChanged` (it was loaded in its new version, under the combined index of the old
    /// one, with success); an unchanged one reuses or re-reads its index.
    #[test]
    fn a_shard_changed_since_the_check_is_refused() {
        let file = |sizes: &[u64]| {
            let (bytes, _) = tensorstream_engine::testkit::u8_model(sizes, 5);
            tensorstream_engine::MemoryBackend::new("mem://s.safetensors", bytes)
        };
        let (old, new) = (file(&[16, 32]), file(&[16, 64]));
        let stat = |b: &tensorstream_engine::MemoryBackend| b.stat().unwrap();
        let index_of =
            |b: &tensorstream_engine::MemoryBackend| format::read_index(b, &stat(b)).unwrap();
        let checked = |meta: ObjectMeta, index: TensorIndex| {
            let mut l = Loader::new("http://h/ckpt/model-00001-of-00002.safetensors");
            l.scope = Some(ShardScope {
                index_uri: "http://h/ckpt/model.safetensors.index.json".into(),
                file: "model-00001-of-00002.safetensors".into(),
                names: Arc::new(Default::default()),
                known: Some(Arc::new((meta, index))),
                object: None,
                total: None,
            });
            l
        };
        let tagged = |b: &tensorstream_engine::MemoryBackend, tag: &str| ObjectMeta {
            version: Some(tag.into()),
            ..stat(b)
        };
        let untagged = |b: &tensorstream_engine::MemoryBackend| ObjectMeta {
            version: None,
            ..stat(b)
        };
        let refused = |r: Result<TensorIndex>, what: &str| {
            let e = r.expect_err(what);
            assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{what}: {e}");
            assert!(
                e.to_string().contains("model-00001-of-00002"),
                "{what}: {e}"
            );
        };
        // Same size and tag: the checked index, as it was.
        let l = checked(tagged(&old, "v1"), index_of(&old));
        let got = l.read_index(&old, &tagged(&old, "v1")).unwrap();
        assert!(same_tensors(&got, &index_of(&old)));
        // Another tag, or another size: refused.
        refused(l.read_index(&old, &tagged(&old, "v2")), "new tag");
        refused(l.read_index(&new, &tagged(&new, "v1")), "new size");
        // No tag: read again, and it must describe the tensors checked.
        let l = checked(untagged(&old), index_of(&old));
        assert!(same_tensors(
            &l.read_index(&old, &untagged(&old)).unwrap(),
            &index_of(&old)
        ));
        let (same_size, _) = tensorstream_engine::testkit::u8_model(&[32, 16], 5);
        let other = tensorstream_engine::MemoryBackend::new("mem://s.safetensors", same_size);
        assert_eq!(
            stat(&other).size,
            stat(&old).size,
            "the test needs equal sizes"
        );
        refused(
            l.read_index(&other, &untagged(&other)),
            "same size, other header",
        );
    }

    /// A small shard's bytes kept by the check serve its load only while the store still has
    /// the version the check read: the load then asks the store for nothing more than its look
    /// at the object; a shard replaced meanwhile is refused with `ObjectChanged`, never loaded
    /// from the kept bytes; kept bytes that are not the whole object are not used.
    #[test]
    fn a_kept_small_shard_serves_its_load_only_while_the_store_has_its_version() {
        use std::sync::atomic::AtomicUsize;
        /// A remote-like object with a version tag, counting the reads it serves.
        #[derive(Debug)]
        struct Store {
            inner: tensorstream_engine::MemoryBackend,
            tag: &'static str,
            reads: AtomicUsize,
        }
        impl Backend for Store {
            fn location(&self) -> &str {
                self.inner.location()
            }
            fn stat(&self) -> Result<ObjectMeta> {
                Ok(ObjectMeta {
                    version: Some(self.tag.into()),
                    ..self.inner.stat()?
                })
            }
            fn capabilities(&self) -> tensorstream_engine::Capabilities {
                let mut caps = self.inner.capabilities();
                caps.kernel_reads = false;
                caps
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
                self.reads.fetch_add(1, Ordering::SeqCst);
                self.inner.read_at(offset, buf)
            }
        }
        let store = |bytes: Vec<u8>, tag| {
            Arc::new(Store {
                inner: tensorstream_engine::MemoryBackend::new(
                    "http://h/ckpt/model-00001-of-00002.safetensors",
                    bytes,
                ),
                tag,
                reads: AtomicUsize::new(0),
            })
        };
        let (old, _) = tensorstream_engine::testkit::u8_model(&[16, 32], 5);
        let (new, _) = tensorstream_engine::testkit::u8_model(&[16, 32], 6);
        assert!(
            old.len() == new.len() && old != new,
            "the test needs two versions"
        );
        // The check reads the small shard whole with its header.
        let (_, meta, index, object) = Loader::from_backend(store(old.clone(), "v1"))
            .open_index_with(true)
            .unwrap();
        assert_eq!(object.as_deref(), Some(&old[..]), "not kept whole");
        let load = |now: Arc<Store>, kept: Vec<u8>| {
            let mut l = Loader::from_backend(now);
            l.scope = Some(ShardScope {
                index_uri: "http://h/ckpt/model.safetensors.index.json".into(),
                file: "model-00001-of-00002.safetensors".into(),
                names: Arc::new(Default::default()),
                known: Some(Arc::new((meta.clone(), index.clone()))),
                object: Some(Arc::new(kept)),
                total: None,
            });
            l.open_index()
        };
        // Still v1: served from the kept bytes, the store not read again.
        let now = store(old.clone(), "v1");
        let (be, _, _) = load(now.clone(), old.clone()).unwrap();
        assert_eq!(be.read_exact_at(0, old.len()).unwrap(), old);
        assert_eq!(
            now.reads.load(Ordering::SeqCst),
            0,
            "the store was read again"
        );
        // Replaced since the check (another tag): refused, whatever was kept.
        let e = load(store(new.clone(), "v2"), old.clone()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
        // Kept bytes that are not the whole object: the store is read.
        let now = store(old.clone(), "v1");
        let (be, _, _) = load(now.clone(), old[..old.len() - 1].to_vec()).unwrap();
        assert_eq!(be.read_exact_at(0, old.len()).unwrap(), old);
        assert!(now.reads.load(Ordering::SeqCst) > 0);
    }

    /// The device memory a sharded GPU load lays out for a shard from the index its check
    /// read (`gpu_layout`, without opening it) is what the shard's plan needs when it loads
    /// (`prepare`): safetensors, and tensorizer files (whose per-tensor headers a load keeps
    /// only to verify or decrypt) with a meta tensor and an empty one, plain, verified and
    /// encrypted, whole or filtered.
    #[test]
    fn a_shards_device_memory_is_laid_out_without_opening_it_as_its_load_plans_it() {
        use tensorstream_engine::format::tensorizer::{Serializer, SerializerOptions, TensorSpec};
        let spec = |name: &str, shape: &[u64], meta: bool| TensorSpec {
            name: name.into(),
            path: None,
            dtype: tensorstream_engine::DType::F32,
            shape: shape.to_vec(),
            meta,
            role: None,
        };
        let key = [7u8; 32];
        let tensorizer = |encryption: Option<KeySource>| {
            let specs = [
                spec("a", &[5], false),
                spec("m", &[3, 4], true),
                spec("e", &[0], false),
                spec("b", &[300], false),
                spec("c", &[1], false),
            ];
            let opts = SerializerOptions {
                encryption,
                ..SerializerOptions::default()
            };
            let mut w = Serializer::new(std::io::Cursor::new(Vec::new()), &specs, &opts).unwrap();
            for t in [&[1u8; 20][..], &[], &[], &[2u8; 1200], &[3u8; 4]] {
                w.write_tensor(t).unwrap();
            }
            w.finish().unwrap().into_inner()
        };
        let (st, _) = tensorstream_engine::testkit::u8_model(&[16, 0, 1000, 3, 257], 5);
        let cases: Vec<(&str, Vec<u8>, bool, Option<KeySource>)> = vec![
            ("safetensors", st, false, None),
            ("tensorizer", tensorizer(None), false, None),
            ("tensorizer verified", tensorizer(None), true, None),
            (
                "tensorizer encrypted",
                tensorizer(Some(KeySource::Key(key))),
                false,
                Some(KeySource::Key(key)),
            ),
            (
                "tensorizer encrypted, verified",
                tensorizer(Some(KeySource::Key(key))),
                true,
                Some(KeySource::Key(key)),
            ),
        ];
        let o = tensorstream_cuda::CudaOptions::default();
        for (what, bytes, verify, key) in cases {
            let be: Arc<dyn Backend> = Arc::new(tensorstream_engine::MemoryBackend::new(
                "mem://ckpt/model-00001-of-00002.safetensors",
                bytes,
            ));
            let mut l = Loader::from_backend(be).verify_hashes(verify);
            if let Some(k) = key {
                l = l.key(k);
            }
            let (_, meta, index) = l.open_index().unwrap();
            let names: std::collections::HashSet<String> =
                index.tensors.iter().map(|t| t.name.clone()).collect();
            l.scope = Some(ShardScope {
                index_uri: "mem://ckpt/model.safetensors.index.json".into(),
                file: "model-00001-of-00002.safetensors".into(),
                names: Arc::new(names),
                known: Some(Arc::new((meta, index))),
                object: None,
                total: None,
            });
            for filter in [None, Some("[!a]*")] {
                let l = match filter {
                    Some(g) => l.clone().filter_glob(g).unwrap(),
                    None => l.clone(),
                };
                let p = l.prepare(Some(&o)).unwrap();
                assert!(p.plan.arena_len > 0, "{what}: nothing planned");
                assert_eq!(
                    l.gpu_layout(&o).unwrap(),
                    (p.plan.arena_len, p.plan.arena_align),
                    "{what}, filter {filter:?}"
                );
            }
        }
        // An encrypted shard without its key is refused as its load would refuse it.
        let be: Arc<dyn Backend> = Arc::new(tensorstream_engine::MemoryBackend::new(
            "mem://ckpt/model-00001-of-00002.safetensors",
            tensorizer(Some(KeySource::Key(key))),
        ));
        let mut l = Loader::from_backend(be);
        let (_, meta, index) = l.open_index().unwrap();
        l.scope = Some(ShardScope {
            index_uri: "mem://ckpt/model.safetensors.index.json".into(),
            file: "model-00001-of-00002.safetensors".into(),
            names: Arc::new(index.tensors.iter().map(|t| t.name.clone()).collect()),
            known: Some(Arc::new((meta, index))),
            object: None,
            total: None,
        });
        let (want, got) = (
            l.prepare(Some(&o)).err().expect("refused by prepare"),
            l.gpu_layout(&o).unwrap_err(),
        );
        assert_eq!(
            (got.kind(), got.to_string()),
            (want.kind(), want.to_string())
        );
        assert!(got.to_string().contains("give its key"), "{got}");
    }

    /// The shards of a sharded GPU load: the next one is prepared while the current one is
    /// run (each run waits to see the next preparation start, which a loop preparing each item
    /// only when its turn comes never does), never two ahead, in order; the first failure in
    /// item order is the one returned (a run's, not the next item's preparation's, which is
    /// dropped), at once (not after a preparation still running), and nothing after it starts.
    #[test]
    fn the_next_shard_is_prepared_while_the_current_one_runs_and_never_two_ahead() {
        use std::sync::{Condvar, Mutex};
        #[derive(Default)]
        struct Seen {
            started: Vec<usize>,
            runs: Vec<usize>,
            /// Set by the test once `one_ahead` returned (a preparation told to wait for it).
            returned: bool,
            /// Whether the preparation that waited saw `returned` (rather than giving up).
            waited_saw_return: Option<bool>,
        }
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        let fail = |what: &str, i: usize| Error::new(ErrorKind::Io, format!("{what} {i}"));
        let go =
            |n: usize, bad_prepare: Option<usize>, bad_run: Option<usize>, stall: Option<usize>| {
                *seen.0.lock().unwrap() = Seen::default();
                let s = seen.clone();
                let r = one_ahead(
                    0..n,
                    move |i, _| {
                        let mut g = s.0.lock().unwrap();
                        // Never two ahead: the run two items back has finished.
                        assert!(
                            i < 2 || g.runs.contains(&(i - 2)),
                            "item {i} prepared before the run of item {} ended",
                            i - 2
                        );
                        g.started.push(i);
                        s.1.notify_all();
                        if stall == Some(i) {
                            // A store that does not answer: this preparation ends only once
                            // `one_ahead` has returned (or after 10 s).
                            let (mut g, _) =
                                s.1.wait_timeout_while(g, Duration::from_secs(10), |g| !g.returned)
                                    .unwrap();
                            g.waited_saw_return = Some(g.returned);
                            s.1.notify_all();
                        } else {
                            drop(g);
                        }
                        if bad_prepare == Some(i) {
                            return Err(fail("prepare", i));
                        }
                        Ok(i * 10)
                    },
                    |p| {
                        let i = p / 10;
                        let g = seen.0.lock().unwrap();
                        let (mut g, _) = seen
                            .1
                            .wait_timeout_while(g, Duration::from_secs(10), |g| {
                                i + 1 < n && !g.started.contains(&(i + 1))
                            })
                            .unwrap();
                        assert!(
                            i + 1 >= n || g.started.contains(&(i + 1)),
                            "item {} was not being prepared while item {i} ran",
                            i + 1
                        );
                        g.runs.push(i);
                        if bad_run == Some(i) {
                            return Err(fail("run", i));
                        }
                        Ok(())
                    },
                );
                let mut g = seen.0.lock().unwrap();
                g.returned = true;
                seen.1.notify_all();
                if stall.is_some() {
                    // The stalled preparation tells what it saw before the next case starts.
                    g = seen
                        .1
                        .wait_timeout_while(g, Duration::from_secs(20), |g| {
                            g.waited_saw_return.is_none()
                        })
                        .unwrap()
                        .0;
                }
                (r, g.started.clone(), g.runs.clone(), g.waited_saw_return)
            };
        let (r, started, runs, _) = go(6, None, None, None);
        r.unwrap();
        assert_eq!(started, (0..6).collect::<Vec<_>>());
        assert_eq!(runs, (0..6).collect::<Vec<_>>());
        let (r, _, runs, _) = go(1, None, None, None);
        r.unwrap();
        assert_eq!(runs, [0]);
        go(0, None, None, None).0.unwrap();
        // Item 2's run fails while item 3's preparation fails too: item 2's error, and
        // nothing after item 3 was started.
        let (r, started, runs, _) = go(6, Some(3), Some(2), None);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("run 2"), "{e}");
        assert_eq!(started, [0, 1, 2, 3]);
        assert_eq!(runs, [0, 1, 2]);
        // Item 2's run fails while item 3's preparation hangs: item 2's error comes at once,
        // the preparation left to end by itself (it saw `one_ahead` return).
        let (r, started, runs, saw) = go(6, None, Some(2), Some(3));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("run 2"), "{e}");
        assert_eq!(started, [0, 1, 2, 3]);
        assert_eq!(runs, [0, 1, 2]);
        assert_eq!(
            saw,
            Some(true),
            "the error waited for the next shard's preparation"
        );
        // Item 3's preparation fails: reported once item 2 has run; item 3 never runs.
        let (r, started, runs, _) = go(6, Some(3), None, None);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("prepare 3"), "{e}");
        assert_eq!(started, [0, 1, 2, 3]);
        assert_eq!(runs, [0, 1, 2]);
        // The first item's preparation fails: nothing runs.
        let (r, started, runs, _) = go(6, Some(0), None, None);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("prepare 0"), "{e}");
        assert_eq!((started, runs), (vec![0], vec![]));
    }

    /// A preparation left behind by a failure (item k's run fails while item k+1's preparation
    /// waits on a store call, answered here only once `one_ahead` has returned) stops at its
    /// next look at the flag it was handed: the call in flight is its last. The same when the
    /// run panics. The preparations whose results were taken, the first item's included, never
    /// see their flag set.
    #[test]
    fn a_preparation_left_behind_by_a_failure_stops_at_its_next_look() {
        use std::sync::{Condvar, Mutex};
        #[derive(Default)]
        struct Seen {
            /// The store calls made: (item, call).
            calls: Vec<(usize, usize)>,
            /// The items whose preparation stopped at a look at its flag.
            stopped: Vec<usize>,
            /// The items whose preparation has ended.
            ended: Vec<usize>,
            /// Set once `one_ahead` has returned.
            returned: bool,
        }
        /// What a run does once the call `hold` of the next preparation is in flight.
        #[derive(Clone, Copy, PartialEq)]
        enum Run {
            Fail,
            Panic,
        }
        const CALLS: usize = 3;
        // Bounds on the waits below, there only so that a hang fails the test rather than
        // stalling it: every wait is answered long before on a working `one_ahead`. Printing
        // the run's panic with RUST_BACKTRACE=1 under ThreadSanitizer made this test take 9 s
        // on two cores (0.01 s without the backtrace), 22 s with the other core busy: the held
        // call, given up on after the 10 s it had, went on as if its flag were never set.
        const BOUND: Duration = Duration::from_secs(120);
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        // Items 0..n, each prepared with CALLS store calls and a look at its flag before each;
        // the run of item `hold.0 - 1` waits for the call `hold` to be in flight, then does
        // `then`. Returns the store calls each item made, the items that stopped, and whether
        // a taken preparation's flag was set.
        let go = |n: usize, hold: Option<(usize, usize)>, then: Option<Run>| {
            *seen.0.lock().unwrap() = Seen::default();
            let s = seen.clone();
            let mut taken: Vec<Arc<AtomicBool>> = Vec::new();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                one_ahead(
                    0..n,
                    move |i, abandoned: Arc<AtomicBool>| {
                        let mut made = Ok(());
                        for call in 0..CALLS {
                            if abandoned.load(Ordering::SeqCst) {
                                s.0.lock().unwrap().stopped.push(i);
                                made = Err(Error::new(ErrorKind::Cancelled, "stopped"));
                                break;
                            }
                            let mut g = s.0.lock().unwrap();
                            g.calls.push((i, call));
                            s.1.notify_all();
                            if hold == Some((i, call)) {
                                // Answered once `one_ahead` has returned (or after BOUND).
                                drop(s.1.wait_timeout_while(g, BOUND, |g| !g.returned).unwrap());
                            }
                        }
                        s.0.lock().unwrap().ended.push(i);
                        s.1.notify_all();
                        made.map(|()| (i, abandoned))
                    },
                    |(i, flag)| {
                        taken.push(flag);
                        let Some(held) = hold.filter(|h| h.0 == i + 1) else {
                            return Ok(());
                        };
                        let g = seen.0.lock().unwrap();
                        let (g, _) = seen
                            .1
                            .wait_timeout_while(g, BOUND, |g| !g.calls.contains(&held))
                            .unwrap();
                        assert!(g.calls.contains(&held), "call {held:?} was not made");
                        drop(g);
                        match then {
                            Some(Run::Fail) => Err(Error::new(ErrorKind::Io, format!("run {i}"))),
                            Some(Run::Panic) => panic!("run {i} panics (as the test asks)"),
                            None => Ok(()),
                        }
                    },
                )
            }));
            let mut g = seen.0.lock().unwrap();
            g.returned = true;
            seen.1.notify_all();
            if let Some((k, _)) = hold {
                // The preparation left behind tells what it did before the next case starts.
                g = seen
                    .1
                    .wait_timeout_while(g, BOUND, |g| !g.ended.contains(&k))
                    .unwrap()
                    .0;
                assert!(g.ended.contains(&k), "item {k}'s preparation did not end");
            }
            let calls: Vec<Vec<usize>> = (0..n)
                .map(|i| g.calls.iter().filter(|c| c.0 == i).map(|c| c.1).collect())
                .collect();
            let taken_set = taken.iter().any(|f| f.load(Ordering::SeqCst));
            (r, calls, g.stopped.clone(), taken_set)
        };
        // Nothing fails: every call is made, no flag is set.
        let (r, calls, stopped, taken_set) = go(4, None, None);
        r.unwrap().unwrap();
        assert_eq!(calls, vec![vec![0, 1, 2]; 4]);
        assert_eq!((stopped, taken_set), (vec![], false));
        // Item 0's run fails during item 1's first call: that call is item 1's only one.
        let (r, calls, stopped, taken_set) = go(4, Some((1, 0)), Some(Run::Fail));
        let e = r.unwrap().unwrap_err().to_string();
        assert!(e.contains("run 0"), "{e}");
        assert_eq!(
            (calls, stopped, taken_set),
            (vec![vec![0, 1, 2], vec![0], vec![], vec![]], vec![1], false),
            "(the calls of each item, the items that stopped, a taken preparation's flag set)"
        );
        // Item 1's run fails during item 2's second call (item 1's preparation was taken).
        let (r, calls, stopped, taken_set) = go(4, Some((2, 1)), Some(Run::Fail));
        let e = r.unwrap().unwrap_err().to_string();
        assert!(e.contains("run 1"), "{e}");
        assert_eq!(
            (calls, stopped, taken_set),
            (
                vec![vec![0, 1, 2], vec![0, 1, 2], vec![0, 1], vec![]],
                vec![2],
                false
            ),
            "(the calls of each item, the items that stopped, a taken preparation's flag set)"
        );
        // Item 0's run panics during item 1's second call.
        let (r, calls, stopped, taken_set) = go(3, Some((1, 1)), Some(Run::Panic));
        assert!(r.is_err(), "the run's panic was not passed on");
        assert_eq!(
            (calls, stopped, taken_set),
            (vec![vec![0, 1, 2], vec![0, 1], vec![]], vec![1], false),
            "(the calls of each item, the items that stopped, a taken preparation's flag set)"
        );
    }

    /// A shard's preparation whose load gave up on it (its `abandoned` flag set) asks the store
    /// nothing more: set while a store call is in flight, that call is the last one made (the
    /// preparation ends `Cancelled`, without a plan); set before it starts, it asks nothing.
    /// Also when a cancel flag makes the opening run on a thread of its own.
    #[test]
    fn an_abandoned_shard_preparation_asks_the_store_nothing_more() {
        use std::sync::Mutex;
        /// An object that logs the calls it serves and sets `flag` during call `give_up_at`.
        #[derive(Debug)]
        struct Store {
            inner: tensorstream_engine::MemoryBackend,
            calls: Mutex<Vec<&'static str>>,
            give_up_at: Option<usize>,
            flag: Arc<AtomicBool>,
        }
        impl Store {
            fn call(&self, what: &'static str) {
                let mut calls = self.calls.lock().unwrap();
                if self.give_up_at == Some(calls.len()) {
                    self.flag.store(true, Ordering::SeqCst);
                }
                calls.push(what);
            }
        }
        impl Backend for Store {
            fn location(&self) -> &str {
                self.inner.location()
            }
            fn stat(&self) -> Result<ObjectMeta> {
                self.call("stat");
                self.inner.stat()
            }
            fn capabilities(&self) -> tensorstream_engine::Capabilities {
                self.inner.capabilities()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
                self.call("read");
                self.inner.read_at(offset, buf)
            }
        }
        let (bytes, _) = tensorstream_engine::testkit::u8_model(&[16, 32], 5);
        let o = tensorstream_cuda::CudaOptions::default();
        // (The flag set before the preparation, or during call k; with a cancel flag or not.)
        for (before, give_up_at) in [
            (false, None),
            (true, None),
            (false, Some(0)),
            (false, Some(1)),
        ] {
            for with_cancel in [false, true] {
                let what = format!(
                    "set before: {before}, during call {give_up_at:?}, cancel flag: {with_cancel}"
                );
                let flag = Arc::new(AtomicBool::new(before));
                let store = Arc::new(Store {
                    inner: tensorstream_engine::MemoryBackend::new(
                        "http://h/ckpt/model-00002-of-00002.safetensors",
                        bytes.clone(),
                    ),
                    calls: Mutex::new(Vec::new()),
                    give_up_at,
                    flag: flag.clone(),
                });
                let mut l = Loader::from_backend(store.clone());
                if with_cancel {
                    l = l.cancel_flag(Arc::new(AtomicBool::new(false)));
                }
                l.abandoned = Some(flag);
                let r = prepare_shard(&o, &l, u64::MAX);
                let calls = store.calls.lock().unwrap().clone();
                match (before, give_up_at) {
                    (false, None) => {
                        r.unwrap();
                        assert_eq!(calls, ["stat", "read"], "{what}");
                    }
                    _ => {
                        let Err(e) = r else {
                            panic!("{what}: a preparation given up made its plan");
                        };
                        assert_eq!(e.kind(), ErrorKind::Cancelled, "{what}: {e}");
                        // The calls up to and including the one in flight when it gave up.
                        let made = give_up_at.map_or(0, |k| k + 1);
                        assert_eq!(calls, ["stat", "read"][..made], "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn queue_depth_is_taken_into_the_range_every_backend_accepts() {
        let max = tensorstream_engine::pipeline::MAX_QUEUE_DEPTH;
        for (n, want) in [
            (0, 1),
            (7, 7),
            (max, max),
            (max + 1, max),
            (usize::MAX, max),
        ] {
            let l = Loader::new("m.safetensors").queue_depth(n);
            assert_eq!(
                (l.queue_depth, l.open.concurrency),
                (Some(want), Some(want)),
                "{n}"
            );
        }
        // The HTTP and S3 backends refuse more than this: the clamp keeps them agreeing.
        #[cfg(feature = "http")]
        assert_eq!(tensorstream_backends::http::config::MAX_CONCURRENCY, max);
        #[cfg(feature = "s3")]
        assert_eq!(tensorstream_backends::s3::MAX_CONCURRENCY, max);
    }

    #[test]
    fn debug_output_leaves_uri_secrets_out() {
        let uri = "https://u:s3cret@h/m.safetensors?X-Amz-Signature=s3cret";
        let index = TensorIndex {
            format: tensorstream_engine::Format::Safetensors,
            tensors: Vec::new(),
            metadata: Default::default(),
            object_size: 8,
            header_len: 8,
            version: 0,
        };
        let fi = FileIndex {
            uri: uri.into(),
            index,
            shard: None,
        };
        let map = sharded::ShardMap {
            index_uri: uri.into(),
            shards: Vec::new(),
            tensors: 0,
        };
        for shown in [format!("{fi:?}"), format!("{map:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("https://h/m.safetensors?…"), "{shown}");
        }
    }

    /// Shards on an HTTP(S) or S3 store are opened 32 at a time, at most the queue depth given;
    /// local and NFS ones eight at a time whatever the queue depth.
    #[test]
    fn remote_shards_are_opened_more_at_a_time() {
        let map = |index_uri: &str| sharded::ShardMap {
            index_uri: index_uri.into(),
            shards: Vec::new(),
            tensors: 0,
        };
        let index = "m.safetensors.index.json";
        for (uri, depth, opens) in [
            (format!("http://h/{index}"), None, REMOTE_SHARD_OPENS),
            (format!("https://h/{index}?sig"), None, REMOTE_SHARD_OPENS),
            (format!("s3://b/{index}"), None, REMOTE_SHARD_OPENS),
            (format!("s3://b/{index}"), Some(4), 4),
            (format!("http://h/{index}"), Some(1000), REMOTE_SHARD_OPENS),
            (format!("/models/{index}"), None, SHARD_OPENS),
            (format!("file:///models/{index}"), Some(64), SHARD_OPENS),
            (format!("nfs://h/export/{index}"), Some(64), SHARD_OPENS),
        ] {
            let mut l = Loader::new(&uri);
            if let Some(d) = depth {
                l = l.queue_depth(d);
            }
            assert_eq!(l.shard_opens(&map(&uri)), opens, "{uri}, depth {depth:?}");
        }
        assert_eq!((SHARD_OPENS, REMOTE_SHARD_OPENS), (8, 32));
    }
}
