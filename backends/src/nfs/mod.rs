//! `nfs://host[:port]/export/path`: a user-space NFSv4.0 client (no mount, no kernel NFS, works in
//! unprivileged containers), in safe Rust.
//!
//! * Transport: ONC RPC over TCP with record marking, AUTH_SYS (module `rpc`), XDR (module `xdr`).
//! * Open: one COMPOUND `[PUTROOTFH, LOOKUP…, GETFH, GETATTR(type, change, size, maxread,
//!   mtime)]` resolves the path from the server's pseudo-root and pins the version (the change
//!   attribute and the size; the version tag holds the change attribute and the file handle).
//!   `stat` sends the same COMPOUND, so it finds a file replaced under its name as well as one
//!   modified. A backend opened pinned to a tag a `stat` gave (`NfsBackend::open_pinned`, a
//!   sharded checkpoint's shard after its check) sends nothing at its opening: it reads by the
//!   tag's file handle.
//! * Reads: `[PUTFH, READ(anonymous stateid), GETATTR(change, size)]`, split to the server's
//!   maxread (capped by `rsize`, default 1 MiB), pipelined on `nconnect` connections (default 4)
//!   with replies matched by xid. Each READ's GETATTR runs after the data was read, so a reply
//!   whose change attribute still matches the pinned one carries bytes of the pinned version;
//!   anything else is [`ErrorKind::ObjectChanged`]. The data goes from the socket straight into
//!   the engine's buffer.
//! * Failures: a broken or stalled connection (with calls pending, no reply for `timeout`, nor
//!   64 KiB at 256 KiB/s or faster; the answers to READs continuing a short answer are no
//!   reply of their own) fails its reads as retryable; they are re-sent on a fresh connection
//!   with backoff (50 ms doubling to 2 s), for up to `retry_for` from the first failure
//!   (default 60 s, enough for a server restart; 5 s while opening) and at most `retries`
//!   times. A TCP connect waits
//!   at most 5 s. The first retry of a backend logs one warning. NFS errors map to error kinds (NOENT → NotFound, ACCESS/PERM →
//!   PermissionDenied, STALE → ObjectChanged, DELAY/GRACE → retried).
//! * Hostile servers: every length read from the wire is bounded before use (file handle ≤ 128
//!   bytes, attributes ≤ 4 KiB, READ data ≤ what was asked, other replies ≤ 1 MiB).

mod config;
mod conn;
mod proto;
mod reader;
mod rpc;
#[cfg(test)]
mod tests;
mod xdr;

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorstream_engine::{
    Backend, Capabilities, Error, ErrorKind, ObjectMeta, RangeReader, ReaderOptions, Result,
};

pub use config::{parse as parse_uri, NfsConfig};
pub use reader::NfsReader;

use crate::OpenOptions;
use conn::{CallLimits, Conn, Pool};
use proto::{Attrs, Version};
use xdr::{SliceSource, XdrError};

/// A failure inside the backend: kind, message, retry flag. Converted to [`Error`] (with backend
/// "nfs" and the URI) once, at the backend's boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: ErrorKind,
    pub msg: String,
    pub retryable: bool,
    /// The server broke the protocol (a malformed or impossible reply): retried on a new
    /// connection, but only [`PROTOCOL_ATTEMPTS`] times, not for the whole retry budget.
    pub protocol: bool,
}

/// Attempts of one call or read that ends in a protocol error before it fails for good (a
/// garbled reply may be a one-off; a server that always breaks the protocol is not worth a
/// minute of retries).
pub(crate) const PROTOCOL_ATTEMPTS: u32 = 3;

impl Failure {
    pub(crate) fn new(kind: ErrorKind, msg: String, retryable: bool) -> Self {
        Failure {
            kind,
            msg,
            retryable,
            protocol: false,
        }
    }
    /// Whether to give up on a failure at this attempt (0-based) regardless of the budget.
    pub(crate) fn spent(&self, attempt: u32) -> bool {
        self.protocol && attempt + 1 >= PROTOCOL_ATTEMPTS
    }
    /// A transport or protocol failure: the connection is unusable, a new one may work.
    pub(crate) fn from_xdr(e: XdrError) -> Self {
        match e {
            XdrError::Io(e) => {
                let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Io
                };
                Failure::new(kind, format!("connection failed: {e}"), true)
            }
            other => Failure {
                protocol: true,
                ..Failure::new(ErrorKind::Io, format!("protocol error: {other}"), true)
            },
        }
    }
    pub(crate) fn context(mut self, c: &str) -> Self {
        self.msg = format!("{c}: {}", self.msg);
        self
    }
    pub(crate) fn into_error(self, uri: &str) -> Error {
        Error::new(self.kind, format!("nfs: {}", self.msg))
            .with_retryable(self.retryable)
            .with_backend("nfs")
            .with_location(uri)
    }
}

/// Backoff before retry `attempt` (1-based): 50 ms doubling, capped at 2 s, with jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 50u64.saturating_mul(1 << attempt.min(6)).min(2000);
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 % (base / 2 + 1))
        .unwrap_or(0);
    Duration::from_millis(base / 2 + jitter)
}

/// Whether a call that failed `attempt + 1` times (the first failure at `since`) may be tried
/// again: the delay before the next attempt, or `None` when `retries` attempts were made or the
/// `budget` since the first failure is spent. The delay never runs past the budget.
pub(crate) fn retry_delay(
    attempt: u32,
    since: Instant,
    retries: u32,
    budget: Duration,
) -> Option<Duration> {
    retry_delay_at(attempt, since, retries, budget, Instant::now())
}

/// [`retry_delay`] as of `now`.
pub(crate) fn retry_delay_at(
    attempt: u32,
    since: Instant,
    retries: u32,
    budget: Duration,
    now: Instant,
) -> Option<Duration> {
    if attempt >= retries {
        return None;
    }
    // A retry must still have MIN_ATTEMPT of the budget when it starts (a connect given a few
    // milliseconds would fail even against a healthy server).
    let left = budget.checked_sub(now.saturating_duration_since(since))?;
    let spare = left.checked_sub(MIN_ATTEMPT).filter(|s| !s.is_zero())?;
    Some(backoff(attempt + 1).min(spare))
}

/// The least budget a retry starts with (its connect may wait that long).
pub(crate) const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// The context added to a retryable failure when the retries are used up: the attempts, and
/// the time since the first of them began (`started`; not since the first failure, from which
/// the retry budget counts: a first attempt that waited out its request timeout took that long
/// too).
pub(crate) fn gave_up(attempts: u32, started: Instant) -> String {
    format!(
        "giving up after {attempts} attempts in {:.1} s",
        started.elapsed().as_secs_f64()
    )
}

/// State shared by the backend and its readers.
pub(crate) struct Inner {
    uri: String,
    cfg: NfsConfig,
    pool: Pool,
    fh: Arc<[u8]>,
    pin: Version,
    rsize: usize,
    /// Set once the first retry after opening was logged.
    warned: AtomicBool,
    /// [`OpenOptions::cancel`]: stops the opening, `stat` and `read_at` once set.
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("uri", &self.uri)
            .field("pin", &self.pin)
            .field("rsize", &self.rsize)
            .field("nconnect", &self.pool.len())
            .finish()
    }
}

impl Inner {
    /// The version tag of the pinned version (see [`Version::tag`]).
    fn tag(&self) -> String {
        self.pin.tag(&self.fh)
    }

    /// Runs a small call, retrying retryable failures with backoff for at most `retries` more
    /// attempts and `budget` from the first failure. `on_retry` sees each failure retried.
    ///
    /// A retry (its connect and its wait for the reply) never runs past the budget, and once
    /// `cancel` is set the call stops within moments and fails with `Cancelled`.
    fn call_with_retry<T>(
        pool: &Pool,
        retries: u32,
        budget: Duration,
        cancel: Option<&AtomicBool>,
        mut on_retry: impl FnMut(&Failure),
        mut f: impl FnMut(&Conn, CallLimits<'_>) -> std::result::Result<T, Failure>,
    ) -> std::result::Result<T, Failure> {
        let mut attempt = 0;
        let mut since: Option<Instant> = None;
        let started = Instant::now();
        loop {
            // The first attempt gets the usual limits (a connect of at most 5 s, then the
            // request timeout); a retry never runs past the budget (it starts with at least
            // MIN_ATTEMPT left, see `retry_delay`).
            let limit = since.map(|first| budget.saturating_sub(first.elapsed()).max(MIN_ATTEMPT));
            let limits = CallLimits {
                until: limit.and_then(|l| Instant::now().checked_add(l)),
                cancel,
            };
            let result = match cancel {
                Some(c) if c.load(Ordering::SeqCst) => Err(Failure::new(
                    ErrorKind::Cancelled,
                    crate::CALL_CANCELLED.into(),
                    false,
                )),
                _ => pool.get_within(limit).and_then(|c| f(&c, limits)),
            };
            match result {
                Err(e) if e.retryable => {
                    let first = *since.get_or_insert_with(Instant::now);
                    let delay = if e.spent(attempt) {
                        None
                    } else {
                        retry_delay(attempt, first, retries, budget)
                    };
                    match delay {
                        Some(delay) => {
                            on_retry(&e);
                            attempt += 1;
                            // In ticks with a cancel flag (the next attempt looks at it).
                            let wake = Instant::now() + delay;
                            while let Some(left) = wake.checked_duration_since(Instant::now()) {
                                if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                                    break;
                                }
                                std::thread::sleep(left.min(Duration::from_millis(25)));
                            }
                        }
                        None => return Err(e.context(&gave_up(attempt + 1, started))),
                    }
                }
                other => return other,
            }
        }
    }

    /// Logs the first retry after opening (once per backend): a load that waits
    /// for a restarting server should say why it is slow.
    pub(crate) fn note_retry(&self, f: &Failure) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "nfs: {}: {}; retrying (for up to {} s, at most {} times)",
                self.uri,
                f.msg,
                self.cfg.retry_for.as_secs_f64(),
                self.cfg.retries
            );
        }
    }
}

/// Decodes a small call's reply: the RPC header, then `body`.
fn decode_call<T>(
    reply: &[u8],
    body: impl FnOnce(
        &mut SliceSource<'_>,
    ) -> std::result::Result<std::result::Result<T, Failure>, XdrError>,
) -> std::result::Result<T, Failure> {
    let mut src = SliceSource::new(reply);
    let r = match rpc::decode_reply_header(&mut src) {
        // A reply decoded whole must have nothing after it (a misframed or garbled one).
        Ok(Ok(())) => body(&mut src).and_then(|r| match src.remaining() {
            0 => Ok(r),
            left if r.is_ok() => Err(XdrError::Bad(format!(
                "{left} unexpected bytes after the reply"
            ))),
            _ => Ok(r),
        }),
        Ok(Err(f)) => Ok(Err(f)),
        Err(e) => Err(e),
    };
    r.map_err(Failure::from_xdr)?
}

/// One file on an NFSv4 server.
pub struct NfsBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NfsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

fn version_of(attrs: &Attrs, what: &str) -> std::result::Result<Version, Failure> {
    match (attrs.change, attrs.size) {
        (Some(change), Some(size)) => Ok(Version { change, size }),
        _ => Err(Failure::new(
            ErrorKind::Unsupported,
            format!("{what}: server did not return the change and size attributes"),
            false,
        )),
    }
}

impl NfsBackend {
    /// The configuration of `uri` and a pool of connections to its server (none made yet).
    fn connect(uri: &str, opts: &OpenOptions) -> Result<(NfsConfig, Pool)> {
        let cfg = config::parse(uri, opts)?;
        let peer = cfg.peer();
        let addrs: Vec<_> = (cfg.host.as_str(), cfg.port)
            .to_socket_addrs()
            .map_err(|e| {
                Failure::new(
                    ErrorKind::Io,
                    format!("cannot resolve {}: {e}", cfg.host),
                    e.kind() == std::io::ErrorKind::TimedOut,
                )
                .into_error(uri)
            })?
            .collect();
        let auth = rpc::AuthSys::new(&cfg.machine, cfg.uid, cfg.gid);
        let pool = Pool::new(addrs, peer, cfg.nconnect, cfg.timeout, auth);
        Ok((cfg, pool))
    }

    /// Connects to the server of `uri`, resolves the path and pins the file's version.
    pub fn open(uri: &str, opts: &OpenOptions) -> Result<Self> {
        let (cfg, pool) = Self::connect(uri, opts)?;
        let components = cfg.components.clone();
        let open_budget = cfg.retry_for.min(config::OPEN_RETRY_FOR);
        let resolved = Inner::call_with_retry(
            &pool,
            cfg.retries,
            open_budget,
            opts.cancel.as_deref(),
            |_| {},
            |c, limits| {
                let reply = c.call(limits, |e| proto::encode_resolve(e, &components))?;
                decode_call(&reply, |s| proto::decode_resolve(s, &components))
            },
        )
        .map_err(|f| f.into_error(uri))?;
        let a = &resolved.attrs;
        match a.ftype {
            Some(proto::NF4REG) => {}
            Some(proto::NF4DIR) => {
                return Err(Failure::new(
                    ErrorKind::InvalidInput,
                    "is a directory, not a file".into(),
                    false,
                )
                .into_error(uri))
            }
            Some(proto::NF4LNK) => {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    "is a symbolic link (NFSv4 LOOKUP does not follow links; use the target's \
                     path)"
                        .into(),
                    false,
                )
                .into_error(uri))
            }
            other => {
                // The type in words (RFC 7530 nfs_ftype4), not a Debug `Some(7)`.
                let what: std::borrow::Cow<str> = match other {
                    Some(3) => "a block device".into(),
                    Some(4) => "a character device".into(),
                    Some(6) => "a socket".into(),
                    Some(7) => "a FIFO (named pipe)".into(),
                    Some(8 | 9) => "a named attribute".into(),
                    Some(t) => format!("an object of NFS type {t}").into(),
                    None => "an object whose type the server did not say".into(),
                };
                return Err(Failure::new(
                    ErrorKind::InvalidInput,
                    format!("is {what}, not a regular file"),
                    false,
                )
                .into_error(uri));
            }
        }
        let pin = version_of(a, "GETATTR").map_err(|f| f.into_error(uri))?;
        let maxread = a
            .maxread
            .filter(|&m| m > 0)
            .map(|m| m.min(usize::MAX as u64) as usize)
            .unwrap_or(cfg.rsize);
        // Every READ is one RPC: a server allowing only a few bytes per READ would turn a load
        // into millions of calls (and as many pending entries in memory).
        if maxread < config::MIN_RSIZE {
            return Err(Failure::new(
                ErrorKind::Unsupported,
                format!(
                    "the server allows only {maxread} bytes per READ (maxread); at least {} are needed",
                    config::MIN_RSIZE
                ),
                false,
            )
            .into_error(uri));
        }
        let rsize = cfg.rsize.min(maxread);
        Ok(NfsBackend {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                fh: Arc::from(resolved.fh),
                cfg,
                pool,
                pin,
                rsize,
                warned: AtomicBool::new(false),
                cancel: opts.cancel.clone(),
            }),
        })
    }

    /// Whether `meta` is what a [`Backend::stat`] of an NFS file gives (its version tag holds
    /// the change attribute and the file handle), so that [`NfsBackend::open_pinned`] can open
    /// the file it describes.
    pub fn pins(meta: &ObjectMeta) -> bool {
        meta.version.as_deref().and_then(proto::parse_tag).is_some()
    }

    /// Opens the file of `uri` pinned to `meta`, the size and version a [`Backend::stat`] of
    /// the same URI gave moments ago (the check of a sharded checkpoint before its shards
    /// load), without a request: the file handle comes from the version tag, so the path is
    /// not walked again, and every READ's GETATTR is compared with the pinned change attribute
    /// and size as after [`NfsBackend::open`]. A file modified since fails its first read with
    /// `ObjectChanged`; one replaced (another file under the name) fails it with
    /// `ObjectChanged` too once the server finds the old handle stale, and a [`Backend::stat`]
    /// (the load's last look) fails for it in any case, as it walks the path. The READ size is
    /// `rsize` (the server's maxread is not asked for; a server that allows less answers
    /// shorter READs, which are continued). Refused (`InvalidInput`) for a `meta` without such
    /// a tag (see [`NfsBackend::pins`]).
    pub fn open_pinned(uri: &str, opts: &OpenOptions, meta: &ObjectMeta) -> Result<Self> {
        let Some((change, fh)) = meta.version.as_deref().and_then(proto::parse_tag) else {
            return Err(Failure::new(
                ErrorKind::InvalidInput,
                format!(
                    "a read is pinned only to a version an NFS stat gave (change attribute and \
                     file handle), not to {:?}",
                    meta.version
                ),
                false,
            )
            .into_error(uri));
        };
        let (cfg, pool) = Self::connect(uri, opts)?;
        let rsize = cfg.rsize;
        Ok(NfsBackend {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                fh: Arc::from(fh),
                cfg,
                pool,
                pin: Version {
                    change,
                    size: meta.size,
                },
                rsize,
                warned: AtomicBool::new(false),
                cancel: opts.cancel.clone(),
            }),
        })
    }

    /// The size and version pinned at the opening (by the GETATTR of [`NfsBackend::open`]'s
    /// request, or given to [`NfsBackend::open_pinned`]), without asking the server again.
    pub fn last_seen(&self) -> ObjectMeta {
        ObjectMeta {
            size: self.inner.pin.size,
            version: Some(self.inner.tag()),
        }
    }

    /// The READ size in use (the smaller of `rsize` and the server's maxread; `rsize` for a
    /// backend opened by [`NfsBackend::open_pinned`]).
    pub fn read_size(&self) -> usize {
        self.inner.rsize
    }

    /// The parsed configuration.
    pub fn config(&self) -> &NfsConfig {
        &self.inner.cfg
    }

    fn changed(&self, now: Version) -> Error {
        Failure::new(
            ErrorKind::ObjectChanged,
            format!(
                "file changed on the server since it was opened (change attribute {:x} -> {:x}, \
                 size {} -> {})",
                self.inner.pin.change, now.change, self.inner.pin.size, now.size
            ),
            false,
        )
        .into_error(&self.inner.uri)
    }
}

impl Backend for NfsBackend {
    fn location(&self) -> &str {
        &self.inner.uri
    }

    /// Fresh attributes from the server, of the file the path names now (one request that
    /// walks the path, as the opening's); an error if it changed since it was opened, or if the
    /// path now names another file (a backend serves one version of one file). Walking the
    /// path finds a file replaced under its name even while the server still serves the old
    /// one by its handle.
    fn stat(&self) -> Result<ObjectMeta> {
        let i = &self.inner;
        let retry = |f: &Failure| i.note_retry(f);
        let components = &i.cfg.components;
        let resolved = Inner::call_with_retry(
            &i.pool,
            i.cfg.retries,
            i.cfg.retry_for,
            i.cancel.as_deref(),
            retry,
            |c, limits| {
                let reply = c.call(limits, |e| proto::encode_resolve(e, components))?;
                decode_call(&reply, |s| proto::decode_resolve(s, components))
            },
        )
        .map_err(|f| f.into_error(&i.uri))?;
        if *resolved.fh != *i.fh {
            return Err(Failure::new(
                ErrorKind::ObjectChanged,
                "the file was replaced on the server since it was opened (the path names \
                 another file now)"
                    .into(),
                false,
            )
            .into_error(&i.uri));
        }
        let now = version_of(&resolved.attrs, "GETATTR").map_err(|f| f.into_error(&i.uri))?;
        if now != i.pin {
            return Err(self.changed(now));
        }
        Ok(self.last_seen())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ranged_reads: true,
            direct_io: false,
            alignment: 1,
            preferred_chunk: self.inner.cfg.chunk,
            max_concurrency: self.inner.cfg.concurrency,
            kind: "nfs",
            kernel_reads: false,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        reader::read_at(&self.inner, offset, buf)
    }

    fn open_reader(
        self: Arc<Self>,
        meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let (pin, tag) = (self.inner.pin, self.inner.tag());
        if meta.size != pin.size || meta.version.as_ref().is_some_and(|v| *v != tag) {
            return Err(Failure::new(
                ErrorKind::ObjectChanged,
                format!(
                    "load was planned for another version of the file ({} bytes, {:?}; the \
                     backend serves {} bytes, {})",
                    meta.size, meta.version, pin.size, tag
                ),
                false,
            )
            .into_error(&self.inner.uri));
        }
        Ok(Box::new(NfsReader::new(
            self.inner.clone(),
            opts.cancel.clone(),
        )))
    }
}

/// Decodes `data` as a hostile server's replies would be decoded (the fuzz target
/// `nfs_replies` in `backends/fuzz`): up to four RPC records through a connection's
/// record-marking reader, each as the reply to a LOOKUP of a path of `mode % 4` components
/// (`mode / 4 % 3 == 0`), of the export's root (`1`) or to a READ of `read_len` bytes (`2`, decoded
/// straight from the stream as a connection does). Returns at the first error; panics only
/// where a decoder broke its own contract.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_replies(data: &[u8], mode: u8, read_len: u16) {
    use xdr::Source as _;
    let components: Vec<String> = (0..mode % 4).map(|i| format!("d{i}")).collect();
    let mut wire = conn::Wire::new(data);
    let mut dst = vec![0u8; usize::from(read_len)];
    for _ in 0..4 {
        if wire.start_record().is_err() || wire.u32("xid").is_err() {
            return;
        }
        let ended = match mode / 4 % 3 {
            kind @ (0 | 1) => {
                let Ok(body) = wire.rest(conn::MAX_CALL_REPLY) else {
                    return;
                };
                assert!(body.len() <= conn::MAX_CALL_REPLY);
                // (Kind 1 was a GETATTR by handle, before `stat` walked the path.)
                let path = if kind == 0 { &components[..] } else { &[] };
                if let Ok(r) = decode_call(&body, |s| proto::decode_resolve(s, path)) {
                    assert!(!r.fh.is_empty() && r.fh.len() <= proto::MAX_FH, "{r:?}");
                    let _ = version_of(&r.attrs, "LOOKUP");
                }
                Ok(())
            }
            _ => {
                let outcome = match rpc::decode_reply_header(&mut wire) {
                    Ok(Ok(())) => proto::decode_read(&mut wire, &mut dst),
                    Ok(Err(f)) => Ok(Err(f)),
                    Err(_) => return,
                };
                match outcome {
                    Ok(Ok(o)) => {
                        assert!(o.count <= dst.len(), "{o:?}");
                        wire.end_exact()
                    }
                    Ok(Err(_)) => wire.finish(),
                    Err(_) => return,
                }
            }
        };
        if ended.is_err() {
            return;
        }
    }
}
