//! `s3://bucket/key`: objects on S3 or an S3-compatible store, read through OpenDAL.
//!
//! * **Settings** ([`S3Config`]): endpoint, region, credentials and addressing style from the
//!   standard AWS environment, overridden by [`OpenOptions::s3_endpoint`] /
//!   [`OpenOptions::s3_region`]. Path-style addressing unless asked otherwise.
//! * **Concurrency**: a small tokio runtime owned by the backend runs the requests. A read is cut
//!   into ranged GETs of `chunk_size` bytes (default 16 MiB); at most `concurrency` (default 16)
//!   are in flight per backend, whichever reader or `read_at` call issued them. Response bytes
//!   are copied once, straight from the HTTP body chunks into the caller's buffer.
//! * **Version pinning**: `stat` records the ETag; every GET carries `If-Match` with it, and the
//!   ETag of every response (including the ones the retry layer makes to resume a broken body) is
//!   compared with it on the client, for servers that ignore `If-Match`. An object served
//!   without an ETag is pinned by its Last-Modified date the same way (`If-Unmodified-Since`,
//!   every response's date compared; the version reads `last-modified: <date>`; the date has
//!   one-second resolution, so a same-size replacement within that second goes unnoticed, and
//!   a server that compared `If-Unmodified-Since` with a finer modification time would refuse
//!   the reads as `ObjectChanged`); one with neither is checked for its size only (every
//!   answer's Content-Range total against the size `stat` found). A weak ETag (`W/"…"`) is not
//!   sent as `If-Match` (its strong comparison never matches a weak one) but compared on the
//!   client all the same. A change surfaces as [`ErrorKind::ObjectChanged`]; bytes of two
//!   versions are never mixed.
//! * **Faults**: OpenDAL's retry layer (exponential backoff with jitter, [`RETRIES`] retries)
//!   retries connection errors, 5xx, 429 and timeouts, and resumes a broken body from the byte
//!   where it stopped; a timeout layer bounds every control request and every body read
//!   ([`OpenOptions::timeout`]).
//!
//! Errors carry backend `"s3"` and the location `s3://bucket/key`.

mod config;
mod pin;
mod reader;
#[cfg(test)]
mod tests;
mod transport;

use std::cell::Cell;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opendal::layers::{RetryEvent, RetryLayer, TimeoutLayer};
use opendal::Operator;
use tensorstream_engine::{
    Backend, Capabilities, Error, ErrorKind, ObjectMeta, RangeReader, ReaderOptions, Result,
};

pub use config::{
    S3Config, S3Location, DEFAULT_CHUNK, DEFAULT_CONCURRENCY, DEFAULT_IO_TIMEOUT, DEFAULT_REGION,
    DEFAULT_TIMEOUT, MAX_CHUNK, MAX_CONCURRENCY,
};
pub use reader::S3Reader;

use crate::OpenOptions;

/// Retries after a failed attempt (so at most `RETRIES + 1` attempts per request).
pub const RETRIES: usize = 4;
/// First backoff delay; it doubles up to [`MAX_BACKOFF`], plus random jitter.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Largest backoff delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

tokio::task_local! {
    /// Retries the retry layer made for the request running in this scope (see [`counted`]).
    static RETRIES_SEEN: Cell<usize>;
}

/// Runs one request (a HEAD, or a GET with its body) in its own retry-count scope, so that its
/// errors can say whether (and how often) it was retried.
pub(crate) fn counted<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    RETRIES_SEEN.scope(Cell::new(0), fut)
}

fn retries_seen() -> usize {
    RETRIES_SEEN.try_with(|c| c.get()).unwrap_or(0)
}

/// The retry layer's hook: counts the retries of the request in scope.
fn note_retry(_event: RetryEvent<'_>) {
    let _ = RETRIES_SEEN.try_with(|c| c.set(c.get() + 1));
}

/// The tokio runtime the backend runs on: the process's S3 runtime (see `crate::shared`), never
/// shut down, so dropping a backend is fine anywhere (even inside another runtime).
struct Runtime(&'static tokio::runtime::Runtime);

impl Runtime {
    fn new() -> Result<Self> {
        crate::shared::runtime("ts-s3", runtime_threads())
            .map(Runtime)
            .map_err(|e| Error::from_io(e, "starting the S3 I/O runtime").with_backend("s3"))
    }

    fn handle(&self) -> Result<tokio::runtime::Handle> {
        Ok(self.0.handle().clone())
    }
}

/// Worker threads of the S3 runtime: the machine's cores, 2 to 8.
fn runtime_threads() -> usize {
    // (Read once: on Linux it reads the cgroup files.)
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8)
    })
}

/// What the I/O tasks need: shared by the backend, its readers and their tasks (which never own
/// the runtime itself).
pub(crate) struct IoCtx {
    pub(crate) op: Operator,
    pub(crate) key: String,
    pub(crate) uri: String,
    pub(crate) endpoint: String,
    /// Requests go unsigned ([`S3Config::no_sign_request`]).
    pub(crate) unsigned: bool,
    pub(crate) chunk: usize,
    pub(crate) io_timeout: Duration,
    /// Limit of a whole non-data request (HEAD).
    pub(crate) timeout: Duration,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
}

impl IoCtx {
    /// Converts an OpenDAL error into the public error, with a message that says what to do.
    /// Call it inside the request's [`counted`] scope.
    pub(crate) fn error(&self, e: opendal::Error, what: &str, range: Option<Range<u64>>) -> Error {
        let limit = limit_for(what, self.timeout, self.io_timeout);
        let err = map_error(
            e,
            what,
            &self.endpoint,
            limit,
            retries_seen(),
            self.unsigned,
        )
        .with_location(&self.uri);
        match range {
            Some(r) => err.with_range(r),
            None => err,
        }
    }
}

/// The time limit that applied to a request of kind `what`: OpenDAL's timeout layer bounds a
/// HEAD as a whole (`timeout`), data requests per I/O step (`io_timeout`).
pub(crate) fn limit_for(what: &str, timeout: Duration, io_timeout: Duration) -> Duration {
    if what == "HEAD" {
        timeout
    } else {
        io_timeout
    }
}

/// Largest temporary buffer of one `read_at` (larger reads go in pieces of this size).
const READ_AT_PIECE: usize = 64 << 20;

/// Most characters of a server's error text kept in a message.
const DETAIL_MAX: usize = 400;

/// Maps an OpenDAL error to the public one (kind, retryable flag, clear message, source kept).
/// `retries`: how many times the retry layer retried the request before giving up. (The retry
/// layer marks every error it returns "persistent", so the status alone cannot tell.)
pub(crate) fn map_error(
    e: opendal::Error,
    what: &str,
    endpoint: &str,
    limit: Duration,
    retries: usize,
    unsigned: bool,
) -> Error {
    use opendal::ErrorKind as K;
    let retryable = retries > 0 || e.is_temporary();
    let gave_up = if retries > 0 {
        format!(" (gave up after {} attempts)", retries + 1)
    } else {
        String::new()
    };
    let mut cause = String::new();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    // OpenDAL gives an S3 error body as the Debug text of its `S3Error`: show its Code and
    // Message as a person would read them.
    let s3 = s3_error(e.message());
    let text = match &s3 {
        Some((code, msg)) if msg.is_empty() => code.clone(),
        Some((code, msg)) => format!("{code}: {msg}"),
        None => e.message().trim().to_string(),
    };
    let mut detail = if cause.is_empty() || text.contains(&cause) {
        text
    } else {
        format!("{text}: {cause}")
    };
    // The server's words, but not a whole page of them.
    if let Some((cut, _)) = detail.char_indices().nth(DETAIL_MAX) {
        detail.truncate(cut);
        detail.push_str(" …");
    }
    let display = e.to_string();
    let status = http_status(&display);
    let bare = detail.is_empty();
    if bare {
        // An error response without a body (HEAD, or a proxy's 503): name the HTTP status.
        detail = status.map(|s| format!("HTTP {s}")).unwrap_or_default();
    }
    let region = region_hint(s3.as_ref(), &display, status, bare);
    let timed_out = e.message().contains("timeout reached");
    let paren = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    };
    let (kind, message) = match e.kind() {
        K::NotFound => (
            ErrorKind::NotFound,
            format!("{what}: no such object or bucket at {endpoint}"),
        ),
        K::PermissionDenied if unsigned => (
            ErrorKind::PermissionDenied,
            format!(
                "{what}: access denied by {endpoint} to an unsigned request \
                 (AWS_NO_SIGN_REQUEST / --s3-no-sign-request, which read public buckets only): \
                 this bucket or object needs credentials (AWS_ACCESS_KEY_ID / \
                 AWS_SECRET_ACCESS_KEY){paren}"
            ),
        ),
        K::PermissionDenied => (
            ErrorKind::PermissionDenied,
            format!(
                "{what}: access denied by {endpoint}: check the credentials \
                 (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), the region and \
                 the bucket policy{paren}"
            ),
        ),
        K::ConditionNotMatch => (
            ErrorKind::ObjectChanged,
            format!(
                "{what}: the object was replaced while it was being loaded (its ETag, its \
                 Last-Modified date or its size changed); load it again{paren}"
            ),
        ),
        K::RangeNotSatisfied => (
            ErrorKind::RangeNotSatisfiable,
            format!("{what}: range not satisfiable{paren}"),
        ),
        _ if detail.contains("signing credential") => (
            ErrorKind::PermissionDenied,
            format!(
                "{what}: no S3 credentials found: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), or \
                 for a public bucket AWS_NO_SIGN_REQUEST=true (--s3-no-sign-request){paren}"
            ),
        ),
        K::ConfigInvalid => (
            ErrorKind::InvalidInput,
            format!("{what}: invalid S3 configuration: {detail}"),
        ),
        K::Unsupported => (ErrorKind::Unsupported, format!("{what}: {detail}")),
        _ if e.message().starts_with(transport::WRONG_RANGE) => (
            ErrorKind::Corrupt,
            format!("{what}: {endpoint} {}", e.message()),
        ),
        K::IsADirectory | K::NotADirectory => (
            ErrorKind::InvalidInput,
            format!("{what}: not an object: {detail}"),
        ),
        _ if timed_out => (
            ErrorKind::Timeout,
            format!(
                "{what}: no answer from {endpoint} within {:.1} s{gave_up}",
                limit.as_secs_f64()
            ),
        ),
        _ => (
            ErrorKind::Io,
            format!(
                "{what} failed at {endpoint}{gave_up}: {detail}{region}{}{}",
                crate::certificate_hint(&detail, true).unwrap_or_default(),
                // A failed connect may be the proxy's.
                detail
                    .to_ascii_lowercase()
                    .contains("connect")
                    .then(|| crate::proxy_note(&|v| std::env::var(v).ok()))
                    .flatten()
                    .unwrap_or_default()
            ),
        ),
    };
    Error::new(kind, message)
        .with_retryable(retryable)
        .with_backend("s3")
        .with_source(e)
}

/// The Code and Message of an S3 error body, from the Debug text (`S3Error { code: "…",
/// message: "…", … }`) OpenDAL makes the message of an error whose body parsed as one.
pub(crate) fn s3_error(message: &str) -> Option<(String, String)> {
    let rest = message.trim().strip_prefix("S3Error {")?;
    let code = debug_field(rest, "code")?;
    if code.is_empty() {
        return None;
    }
    Some((code, debug_field(rest, "message").unwrap_or_default()))
}

/// The string field `name: "…"` of a derived Debug text, unescaped, except that control
/// characters (a newline, an escape sequence) stay written as escapes: the message is one line
/// of plain text.
fn debug_field(text: &str, name: &str) -> Option<String> {
    let at = text.find(&format!("{name}: \""))? + name.len() + 3;
    let mut out = String::new();
    let mut chars = text[at..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'u' => {
                    // `\u{XXXX}`
                    let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                    match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        Some(c) if !c.is_control() => out.push(c),
                        _ => out.push_str(&format!("\\u{{{hex}}}")),
                    }
                }
                c @ ('"' | '\'' | '\\') => out.push(c),
                c => {
                    out.push('\\');
                    out.push(c);
                }
            },
            c => out.push(c),
        }
    }
}

/// The region a server names in an error answer's `x-amz-bucket-region` header (AWS sends it
/// with the 400 to a request signed for another region, HEAD included), from the response
/// headers OpenDAL shows in its error's context.
pub(crate) fn bucket_region(display: &str) -> Option<&str> {
    let at = display.find("\"x-amz-bucket-region\": \"")? + "\"x-amz-bucket-region\": \"".len();
    let value = &display[at..];
    let value = &value[..value.find('"')?];
    let plausible = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    plausible.then_some(value)
}

/// A hint on the region for a 400 answer: AWS answers a request signed for another region than
/// the bucket's with `400 AuthorizationHeaderMalformed` ("the region 'us-east-1' is wrong;
/// expecting 'eu-west-1'") and an `x-amz-bucket-region` header, and a HEAD (no body) with a
/// bare 400 and that header. s3s-fs answers a bad bucket name with `400 InvalidBucketName`,
/// which a HEAD shows as a bare 400 too. Empty when nothing points at the region.
fn region_hint(
    s3: Option<&(String, String)>,
    display: &str,
    status: Option<u16>,
    bare: bool,
) -> String {
    let set = "set --s3-region or AWS_REGION to the bucket's region";
    let regional = s3.is_some_and(|(code, msg)| {
        code == "AuthorizationHeaderMalformed"
            || code.contains("Region")
            || msg.to_ascii_lowercase().contains("region")
    });
    if let Some(r) =
        bucket_region(display).filter(|_| regional || matches!(status, Some(301 | 400)))
    {
        return format!("; the bucket is in region {r} (x-amz-bucket-region): {set}");
    }
    if regional {
        return format!("; the request was signed for another region than the bucket's: {set}");
    }
    if bare && status == Some(400) {
        return format!(
            " (Bad Request; the answer to a HEAD carries no reason): on AWS most often a \
             region that is not the bucket's ({set}); else check the bucket name and the \
             endpoint"
        );
    }
    String::new()
}

/// The `status: NNN` an OpenDAL error shows in its context, if any.
pub(crate) fn http_status(display: &str) -> Option<u16> {
    let at = display.find("status: ")? + "status: ".len();
    let digits: String = display[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Runs `fut` on the runtime and waits for it from this (non-async) thread. Safe to call from any
/// thread, including threads of another tokio runtime.
fn run<T, F>(handle: &tokio::runtime::Handle, fut: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let (tx, rx) = crossbeam_channel::bounded(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| {
        Error::new(
            ErrorKind::Io,
            "S3 I/O task ended without a result (runtime shut down)",
        )
        .with_backend("s3")
    })?
}

/// An object on S3 (or an S3-compatible store). See the module docs.
pub struct S3Backend {
    loc: S3Location,
    uri: String,
    cfg: S3Config,
    io: Arc<IoCtx>,
    /// The version the most recent `stat` saw; `read_at` reads that version.
    pinned: Mutex<Option<ObjectMeta>>,
    /// [`OpenOptions::cancel`]: stops `stat` and `read_at` once set.
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    // Last field: dropped after everything that might still use it.
    rt: Runtime,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("uri", &self.uri)
            .field("config", &self.cfg)
            .finish()
    }
}

impl S3Backend {
    /// Opens `s3://bucket/key` with settings from `opts` and the process environment. No request
    /// is made until [`Backend::stat`] or a read.
    pub fn open(uri: &str, opts: &OpenOptions) -> Result<Self> {
        let loc = S3Location::parse(uri)?;
        let cfg = S3Config::from_env(opts).map_err(|e| e.with_location(uri).with_backend("s3"))?;
        Ok(Self::with_config(loc, cfg)?.with_cancel(opts.cancel.clone()))
    }

    /// Opens `s3://bucket/key` as [`S3Backend::open`] does, its reads pinned to `meta` (see
    /// [`S3Backend::with_pin`]).
    pub fn open_pinned(uri: &str, opts: &OpenOptions, meta: &ObjectMeta) -> Result<Self> {
        Self::open(uri, opts)?.with_pin(meta.clone())
    }

    /// Pins the backend's reads to `meta`: the size and version a [`Backend::stat`] of the same
    /// object gave moments ago (the check of a sharded checkpoint before its shards load),
    /// which no `stat` then asks for again. Every read carries that version's precondition (or
    /// compares it), so an object replaced since fails its first read with `ObjectChanged`, as
    /// a load's last `stat` fails for one replaced during the load. Refused (`InvalidInput`)
    /// without a version: then only a `stat` can tell a replaced object.
    pub fn with_pin(self, meta: ObjectMeta) -> Result<Self> {
        if meta.version.is_none() {
            return Err(Error::invalid(
                "an S3 object's reads are pinned to a size and version only with a version",
            )
            .with_backend("s3")
            .with_location(&self.uri));
        }
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta);
        Ok(self)
    }

    /// [`OpenOptions::cancel`] for a backend built with [`S3Backend::with_config`]: once the
    /// flag is set, `stat` and `read_at` stop and fail with `Cancelled`.
    pub fn with_cancel(mut self, cancel: Option<Arc<std::sync::atomic::AtomicBool>>) -> Self {
        self.cancel = cancel;
        self
    }

    /// Runs one of the backend's own calls (`stat`, `read_at`) on its runtime, stopped with a
    /// `Cancelled` error once [`OpenOptions::cancel`] is set.
    fn call<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let stopped = crate::call_cancelled("s3", &self.uri, &format!("S3 {what}"));
        run(&self.rt.handle()?, async move {
            crate::until_cancelled(cancel, fut)
                .await
                .unwrap_or(Err(stopped))
        })
    }

    /// Opens an object with explicit settings (no environment lookup).
    pub fn with_config(loc: S3Location, cfg: S3Config) -> Result<Self> {
        let uri = loc.uri();
        // (Without an endpoint, AWS's own, over https.)
        let https = cfg
            .endpoint
            .as_deref()
            .is_none_or(|e| e.to_ascii_lowercase().starts_with("https:"));
        crate::check_proxy_env(&|v| std::env::var(v).ok(), https, &request_host(&loc, &cfg))
            .map_err(|e| e.with_backend("s3").with_location(&uri))?;
        let rt = Runtime::new()?;
        let handle = rt.handle()?;
        let _guard = handle.enter();
        let roots = ca_bundle(&cfg).map_err(|e| e.with_location(&uri))?;
        let op = build_operator(&loc, &cfg, roots)
            .map_err(|e| {
                map_error(
                    e,
                    "configuring S3",
                    &cfg.endpoint_display(),
                    cfg.io_timeout,
                    0,
                    cfg.no_sign_request,
                )
            })
            .map_err(|e| e.with_location(&uri))?;
        let io = Arc::new(IoCtx {
            op,
            key: loc.key.clone(),
            uri: uri.clone(),
            endpoint: cfg.endpoint_display(),
            unsigned: cfg.no_sign_request,
            chunk: cfg.chunk_size,
            io_timeout: cfg.io_timeout,
            timeout: cfg.timeout,
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.concurrency)),
        });
        Ok(S3Backend {
            loc,
            uri,
            cfg,
            io,
            pinned: Mutex::new(None),
            cancel: None,
            rt,
        })
    }

    /// Bucket and key.
    pub fn s3_location(&self) -> &S3Location {
        &self.loc
    }

    /// The resolved settings.
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    fn pinned(&self) -> Result<ObjectMeta> {
        let cur = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match cur {
            Some(m) => Ok(m),
            None => self.stat(),
        }
    }
}

/// The certificates of `AWS_CA_BUNDLE` ([`S3Config::ca_bundle`]), if set.
fn ca_bundle(cfg: &S3Config) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let Some(path) = &cfg.ca_bundle else {
        return Ok(Vec::new());
    };
    let what = format!("AWS_CA_BUNDLE={}", path.display());
    let unreadable = |e: std::io::Error| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{what}: cannot read the CA bundle: {e}"),
        )
        .with_backend("s3")
    };
    // A sharded checkpoint opens a backend per shard: the bundle (often the whole system store,
    // some 150 certificates) is parsed once per process and file version, not once per shard.
    let stamp = bundle_stamp(&std::fs::metadata(path).map_err(unreadable)?);
    if let Some(certs) = bundles::get(path, stamp) {
        return Ok(certs);
    }
    let pem = std::fs::read(path).map_err(unreadable)?;
    let certs = crate::tls::parse_pem_bundle(&pem).map_err(|e| {
        Error::invalid(format!("{what}: not a PEM certificate bundle: {e}")).with_backend("s3")
    })?;
    if certs.is_empty() {
        return Err(
            Error::invalid(format!("{what}: the file holds no PEM certificate")).with_backend("s3"),
        );
    }
    bundles::put(path, stamp, &certs);
    Ok(certs)
}

/// What tells one version of a bundle file from another: size, modification time, inode.
type BundleStamp = (u64, Option<std::time::SystemTime>, u64);

fn bundle_stamp(m: &std::fs::Metadata) -> BundleStamp {
    use std::os::unix::fs::MetadataExt;
    (m.len(), m.modified().ok(), m.ino())
}

/// The parsed `AWS_CA_BUNDLE` files of the process, by path and file version (at most 16, the
/// lot forgotten when a 17th comes; a file whose stamp changed is parsed again). Only bundles that parsed are kept.
mod bundles {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, OnceLock};

    use rustls::pki_types::CertificateDer;

    use super::BundleStamp;

    type Certs = Vec<CertificateDer<'static>>;
    /// Per path: the stamp parsed, its certificates, and how often the path was parsed.
    type Kept = HashMap<PathBuf, (BundleStamp, Certs, usize)>;
    static KEPT: OnceLock<Mutex<Kept>> = OnceLock::new();

    fn kept() -> std::sync::MutexGuard<'static, Kept> {
        KEPT.get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(path: &Path, stamp: BundleStamp) -> Option<Certs> {
        kept()
            .get(path)
            .filter(|(s, _, _)| *s == stamp)
            .map(|(_, c, _)| c.clone())
    }

    pub(super) fn put(path: &Path, stamp: BundleStamp, certs: &Certs) {
        let mut map = kept();
        let parses = map.get(path).map_or(0, |e| e.2) + 1;
        if map.len() >= 16 && !map.contains_key(path) {
            // (A program cycling through many bundles: start over rather than grow.)
            map.clear();
        }
        map.insert(path.to_path_buf(), (stamp, certs.clone(), parses));
    }

    /// How often `path` was parsed (tests).
    #[cfg(test)]
    pub(super) fn parses(path: &Path) -> usize {
        kept().get(path).map_or(0, |e| e.2)
    }
}

/// The host S3 requests for `loc` go to, as OpenDAL builds it (`build_operator`): the
/// endpoint's (without a leading `bucket.`; AWS's global endpoint, or none, for the region's:
/// `s3.REGION.amazonaws.com`), after `bucket.` with virtual-host style. For the proxy check
/// (`NO_PROXY` is matched against it).
fn request_host(loc: &S3Location, cfg: &S3Config) -> String {
    let endpoint_host = cfg.endpoint.as_deref().and_then(|e| {
        let e = if e.starts_with("http") {
            e.to_string()
        } else {
            format!("https://{e}")
        };
        e.parse::<::http::Uri>()
            .ok()?
            .host()
            .map(str::to_ascii_lowercase)
    });
    let host = match endpoint_host {
        Some(h) => {
            let h = h
                .strip_prefix(&format!("{}.", loc.bucket))
                .map_or(h.clone(), str::to_string);
            if h == "s3.amazonaws.com" {
                format!("s3.{}.amazonaws.com", cfg.region)
            } else {
                h
            }
        }
        None => format!("s3.{}.amazonaws.com", cfg.region),
    };
    if cfg.virtual_host_style {
        format!("{}.{host}", loc.bucket)
    } else {
        host
    }
}

/// Builds the operator: S3 service, then (inner to outer) ETag pin check, timeouts, retries.
fn build_operator(
    loc: &S3Location,
    cfg: &S3Config,
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> opendal::Result<Operator> {
    let key = crate::shared::ClientKey::new("s3", &roots, None, None, runtime_threads());
    // The process's client for these roots (one connection pool for every S3 backend with
    // them: see `crate::shared` and `transport.rs`). TLS: the system's roots (loaded once per
    // process, see `crate::tls`) plus AWS_CA_BUNDLE's; installs rustls' ring provider unless the
    // process already chose one. No redirects (a signed request cannot follow one to another
    // host anyway; S3's own redirects name the right endpoint in the error), no Referer.
    let client = crate::shared::client(key, || {
        let building =
            || opendal::Error::new(opendal::ErrorKind::Unexpected, "building the HTTP client");
        let tls = crate::tls::client_config(roots).map_err(|e| building().set_source(e))?;
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .build()
            .map_err(|e| building().set_source(e))
    })?;
    let mut b = opendal::services::S3::default()
        .root("/")
        .bucket(&loc.bucket)
        .region(&cfg.region);
    if let Some(e) = &cfg.endpoint {
        b = b.endpoint(e);
    }
    if cfg.no_sign_request {
        // No credential lookup (profile files, instance metadata) and no signature.
        b = b.skip_signature();
    } else if let (Some(ak), Some(sk)) = (&cfg.access_key_id, &cfg.secret_access_key) {
        b = b.access_key_id(ak).secret_access_key(sk);
        if let Some(t) = &cfg.session_token {
            b = b.session_token(t);
        }
    }
    if cfg.virtual_host_style {
        b = b.enable_virtual_host_style();
    }
    // OpenDAL's reqwest transport, plus the Content-Range check OpenDAL lacks (transport.rs).
    let ctx = opendal::OperationContext::default().with_http_transport(
        opendal::HttpTransporter::new(transport::RangeCheckedTransport::new(client)),
    );
    Ok(Operator::new(b)?
        .with_context(ctx)
        .layer(pin::EtagPinLayer)
        .layer(
            TimeoutLayer::new()
                .with_timeout(cfg.timeout)
                .with_io_timeout(cfg.io_timeout),
        )
        .layer(
            RetryLayer::new()
                .with_jitter()
                .with_factor(2.0)
                .with_min_delay(MIN_BACKOFF)
                .with_max_delay(MAX_BACKOFF)
                .with_max_times(RETRIES)
                .with_notify(note_retry),
        ))
}

/// Checks a read of `len` bytes at `offset` against the object size and returns how many bytes
/// to fetch (fewer at the end of the object, 0 at the end).
pub(crate) fn clamp_read(offset: u64, len: usize, size: u64) -> Result<usize> {
    if offset > size {
        return Err(Error::new(
            ErrorKind::RangeNotSatisfiable,
            format!("offset {offset} is past the end of the object ({size} bytes)"),
        )
        .with_backend("s3"));
    }
    let left = size - offset;
    Ok(usize::try_from(left).map_or(len, |l| l.min(len)))
}

impl Backend for S3Backend {
    fn location(&self) -> &str {
        &self.uri
    }

    fn stat(&self) -> Result<ObjectMeta> {
        let io = self.io.clone();
        let md = self.call(
            "HEAD",
            counted(async move {
                io.op
                    .stat(&io.key)
                    .await
                    .map_err(|e| io.error(e, "HEAD", None))
            }),
        )?;
        if !md.is_file() {
            return Err(Error::invalid("not an object").with_location(&self.uri));
        }
        let meta = ObjectMeta {
            size: md.content_length(),
            version: pin::version_of(md.etag(), md.last_modified()),
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        // Once per backend (as the HTTP backend does), not at every stat.
        if meta.version.is_none() && pinned.as_ref().is_none_or(|p| p.version.is_some()) {
            crate::warn_unversioned(&self.uri);
        }
        *pinned = Some(meta.clone());
        drop(pinned);
        Ok(meta)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ranged_reads: true,
            direct_io: false,
            alignment: 1,
            preferred_chunk: self.cfg.chunk_size,
            max_concurrency: self.cfg.concurrency,
            kind: "s3",
            kernel_reads: false,
        }
    }

    /// Reads through a temporary buffer (the borrowed `buf` cannot travel to the runtime); the
    /// engine's hot path is [`Backend::open_reader`], which reads straight into its buffers.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let pin = self.pinned()?;
        let want =
            clamp_read(offset, buf.len(), pin.size).map_err(|e| e.with_location(&self.uri))?;
        if want == 0 {
            return Ok(0);
        }
        // The borrowed `buf` cannot travel to the runtime: read through a temporary buffer,
        // in pieces, so that a large read costs one piece more, not a second copy of it all.
        let mut done = 0usize;
        while done < want {
            let len = (want - done).min(READ_AT_PIECE);
            let io = self.io.clone();
            let pin = pin.clone();
            let at = offset + done as u64;
            let data = self.call("GET", async move {
                let mut v = vec![0u8; len];
                let n = reader::read_into(&io, &pin, at, &mut v).await?;
                v.truncate(n);
                Ok(v)
            })?;
            buf[done..done + data.len()].copy_from_slice(&data);
            done += data.len();
            if data.len() < len {
                break; // the object ends here
            }
        }
        Ok(done)
    }

    fn open_reader(
        self: Arc<Self>,
        meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let handle = self.rt.handle()?;
        Ok(Box::new(S3Reader::new(
            self.clone(),
            handle,
            self.io.clone(),
            meta.clone(),
            opts.cancel.clone(),
        )))
    }
}
