//! `http://` and `https://` objects read with byte-range requests.
//!
//! * `stat` sends `HEAD` (size from `Content-Length`, version from `ETag` / `Last-Modified`,
//!   `Accept-Ranges`); when HEAD is refused or inconclusive, a `Range: bytes=0-0` GET and its
//!   `Content-Range` answer instead. Servers without range support are refused (`Unsupported`).
//! * Reads are ranged GETs on a small tokio runtime owned by the backend, many in flight
//!   ([`reader::HttpReader`]), over a pooled reqwest client (HTTP/1.1 keep-alive; HTTP/2 when the
//!   server offers it over TLS; rustls, no OpenSSL). Bodies are streamed straight into the
//!   request's buffer.
//! * Every GET carries `If-Match` (or `If-Unmodified-Since`) for the version seen by the `stat`
//!   that started the load (or given to [`HttpBackend::open_pinned`]), and every answer's
//!   `Content-Range` total and `ETag` are checked: an object replaced mid-load fails with
//!   `ObjectChanged`, never with mixed bytes. (A server that sends neither `ETag` nor
//!   `Last-Modified` gives nothing to pin: only a change of size can be seen, and `stat` logs a
//!   warning once.)
//! * A `206` answer must start at the asked offset and end within the asked range; another
//!   window is refused as `Corrupt`.
//! * A `200` answer to a range request is never taken for the range: it is sliced when it is the
//!   whole (pinned) object and that object is small (≤ [`config::FULL_BODY_FALLBACK_MAX`]), and
//!   refused with `Unsupported` otherwise.
//! * Broken bodies resume from the byte where they stopped (under the same precondition);
//!   connection errors, stalls, 429 and 5xx are retried with exponential backoff and full jitter,
//!   honouring `Retry-After` (capped), a bounded number of times. A request that meets a
//!   kept-alive connection the server closed as it was reused (no answer began) is sent again at
//!   once without counting, up to a bound (see `retry::closed_in_a_row_max`).

pub mod config;
pub mod reader;
mod retry;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::StreamExt;
use tensorstream_engine::{
    Backend, Capabilities, Error, ErrorKind, ObjectMeta, RangeReader, ReaderOptions, Result,
};

pub use config::HttpConfig;
use config::Pin;
use retry::Ctx;

use crate::OpenOptions;

/// The tokio runtime a backend runs on: the process's one for its thread count (see
/// `crate::shared`), never shut down, so dropping a backend anywhere (even inside another
/// async context) cannot block or panic.
#[derive(Debug)]
pub(crate) struct Rt(&'static tokio::runtime::Runtime);

impl Rt {
    fn new(threads: usize) -> Result<Self> {
        crate::shared::runtime("ts-http", threads.clamp(1, 64))
            .map(Rt)
            .map_err(|e| Error::from_io(e, "starting the http runtime").with_backend("http"))
    }

    pub(crate) fn handle(&self) -> Result<&tokio::runtime::Handle> {
        Ok(self.0.handle())
    }
}

/// Stops a spawned call's task when the caller stops waiting for it (it unwinds).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one of the backend's own calls (`stat`, the opening's HEAD, `read_at`) as a task on its
/// runtime and waits for it from this (non-async) thread, as the S3 backend does; stopped with a
/// `Cancelled` error once [`HttpConfig::cancel`] is set. Safe from any thread, including threads
/// of another tokio runtime.
///
/// A task, not `Handle::block_on` on the calling thread: hyper puts a connection back into the
/// pool from a small task it spawns when the answer is done. Spawned from a worker, that task
/// runs on the same worker right after the request's own; spawned from the calling thread, it
/// waited for a worker to wake while the caller already sent its next request (a shard's
/// opening HEAD, then its header GET), which found no idle connection and opened another: a
/// 40-shard `inspect` behind a proxy holding each request 100 ms opened 2 connections at
/// `--concurrency 1`, 5 to 7 at 4 and 34 to 38 at 32; as tasks, 1 (now and then 2), 4 and 32,
/// as S3. The task also yields once before it reports (see [`let_connection_return`]).
fn call<T, F>(rt: &Rt, ctx: &Ctx, what: &str, fut: F) -> Result<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handle = rt.handle()?;
    let cancel = ctx.cfg.cancel.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let task = handle.spawn(async move {
        let out = crate::until_cancelled(cancel, fut).await;
        let_connection_return().await;
        let _ = tx.send(out);
    });
    let _abort = AbortOnDrop(task.abort_handle());
    match rx.recv() {
        Ok(Some(out)) => Ok(out),
        Ok(None) => Err(crate::call_cancelled(
            "http",
            &ctx.display,
            &format!("http {what}"),
        )),
        // The task ended without sending: it panicked.
        Err(_) => Err(ctx.err(
            ErrorKind::Io,
            format!("http {what} task ended without a result (it panicked)"),
        )),
    }
}

/// Lets hyper's task that puts a finished request's connection back into the pool run before
/// whoever waits for the request hears of it (and sends the next one): woken on this worker as
/// the answer ended, that task runs before a task that yields is resumed.
pub(crate) async fn let_connection_return() {
    tokio::task::yield_now().await;
}

/// Largest temporary buffer of one `read_at` (larger reads go in pieces of this size, or of
/// the chunk size when that is larger).
const READ_AT_PIECE: usize = 64 << 20;

/// An object served over HTTP(S).
#[derive(Debug)]
pub struct HttpBackend {
    ctx: Arc<Ctx>,
    rt: Arc<Rt>,
    /// The version seen by the latest `stat`; `read_at` is pinned to it.
    pin: Mutex<Pin>,
    /// Set once the "no validators" warning was printed.
    warned_unversioned: AtomicBool,
}

impl HttpBackend {
    /// Records the version `read_at` is pinned to; warns once when there is nothing to pin.
    fn set_pin(&self, pin: Pin) {
        if pin.version().is_none() && !self.warned_unversioned.swap(true, Ordering::Relaxed) {
            crate::warn_unversioned(&self.ctx.display);
        }
        match self.pin.lock() {
            Ok(mut p) => *p = pin,
            Err(poisoned) => *poisoned.into_inner() = pin,
        }
    }

    /// Opens `uri` (`http://…` or `https://…`) with the shared options and checks that the
    /// object exists and the server supports ranges (one HEAD).
    pub fn open(uri: &str, opts: &OpenOptions) -> Result<Self> {
        Self::open_with(uri, HttpConfig::from_options(opts)?)
    }

    /// Opens `uri` with a full configuration (retry counts, backoff, runtime size …).
    pub fn open_with(uri: &str, cfg: HttpConfig) -> Result<Self> {
        let b = Self::unopened(uri, cfg)?;
        let c = b.ctx.clone();
        let pin = call(
            &b.rt,
            &b.ctx,
            "opening",
            async move { retry::stat(&c).await },
        )??;
        b.set_pin(pin);
        Ok(b)
    }

    /// Opens `uri` without a request, its reads pinned to `meta`: the size and version a
    /// [`Backend::stat`] (or an opening) of the same object gave moments ago, such as the check
    /// of a sharded checkpoint before its shards load. Every read then carries the precondition
    /// of that version, so an object replaced since fails its first read with `ObjectChanged`,
    /// as the load's last `stat` fails for one replaced during the load.
    ///
    /// Only for a version the precondition carries whole: a strong ETag, or a Last-Modified
    /// date of an object without an ETag. Refused (`InvalidInput`) without a version and with a
    /// weak ETag (whose reads the opening's HEAD pins with its Last-Modified date too, which
    /// `meta` does not hold): open those with [`HttpBackend::open`].
    pub fn open_pinned(uri: &str, opts: &OpenOptions, meta: &ObjectMeta) -> Result<Self> {
        if !Self::pins_whole(meta) {
            return Err(Error::invalid(
                "an http object is opened without a request only for a strong ETag or a \
                 Last-Modified date",
            )
            .with_backend("http")
            .with_location(crate::redact_uri(uri)));
        }
        let b = Self::unopened(uri, HttpConfig::from_options(opts)?)?;
        b.set_pin(Pin::from_meta(meta.size, meta.version.as_deref()));
        Ok(b)
    }

    /// Whether [`HttpBackend::open_pinned`] takes `meta`: its version is a strong ETag or a
    /// Last-Modified date.
    pub fn pins_whole(meta: &ObjectMeta) -> bool {
        Pin::from_meta(meta.size, meta.version.as_deref())
            .precondition()
            .is_some()
    }

    /// The backend for `uri` with its client and runtime, before any request (its pin empty).
    fn unopened(uri: &str, cfg: HttpConfig) -> Result<Self> {
        let url = reqwest::Url::parse(uri).map_err(|e| {
            // A user name or password holding '/', '?', '#' or '@' cuts the URL at the wrong
            // place (the message does not show it).
            let hint = if uri.contains('@') {
                " (credentials in a URL must have their '/', '?', '#' and '@' \
                 percent-encoded: %2F, %3F, %23, %40)"
            } else {
                ""
            };
            Error::invalid(format!("invalid http URL: {e}{hint}"))
                .with_backend("http")
                .with_location(crate::redact_uri(uri))
        })?;
        let display = config::redact_url(&url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(
                Error::invalid(format!("not an http(s) URL (scheme {:?})", url.scheme()))
                    .with_backend("http")
                    .with_location(display),
            );
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid("http URL has no host")
                .with_backend("http")
                .with_location(display));
        }
        let host = url.host_str().unwrap_or_default();
        crate::check_proxy_env(&|v| std::env::var(v).ok(), url.scheme() == "https", host)
            .map_err(|e| e.with_backend("http").with_location(&display))?;
        if cfg.concurrency == 0 || cfg.chunk_size == 0 || cfg.timeout.is_zero() {
            return Err(Error::invalid(
                "http concurrency, chunk size and timeout must be positive",
            )
            .with_location(display));
        }
        let mut roots = Vec::new();
        for pem in &cfg.root_certificates_pem {
            let certs = crate::tls::parse_pem_bundle(pem).map_err(|msg| {
                Error::invalid(format!("invalid root certificate (PEM): {msg}"))
                    .with_backend("http")
                    .with_location(&display)
            })?;
            roots.extend(certs);
        }
        // Idle connections kept per host: room for twice the connections in use. A request that
        // finds no idle connection opens one, also while another is a moment from coming back
        // (hyper returns a connection to the pool only once its task asks for the next
        // request), so a load may hold more connections than its concurrency for a while
        // (rarely since the calls run as tasks, see `call`, but a busy machine may delay that
        // task). Capped at `concurrency`, the pool closed those, and the next such moment
        // opened yet another (sequential openings at --concurrency 1 opened a connection every
        // few shards).
        let max_idle = cfg.concurrency.saturating_mul(2);
        // One client (connection pool, TLS sessions) for every backend of the process with the
        // same roots and client settings: a sharded checkpoint's shards on one host share
        // connections (see `crate::shared`).
        let key = crate::shared::ClientKey::new(
            "http",
            &roots,
            Some(cfg.connect_timeout),
            Some(max_idle),
            cfg.runtime_threads.clamp(1, 64),
        );
        // The system's roots are loaded once per process (see `crate::tls`).
        let tls = crate::tls::client_config(roots).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot build the http client: TLS settings: {e}"),
            )
            .with_backend("http")
            .with_location(&display)
        })?;
        let build = || {
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .user_agent(concat!("tensorstream/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(cfg.connect_timeout)
                .pool_max_idle_per_host(max_idle)
                .tcp_nodelay(true)
                .http2_adaptive_window(true)
                // Redirects are followed by hand (retry::send): the user's headers stay with the
                // URL's origin, https never leads to http. No Referer (it would carry the URL's
                // query, often a signature).
                .redirect(reqwest::redirect::Policy::none())
                .referer(false)
                .build()
                .map_err(|e| {
                    let (_, _, msg) = retry::describe_reqwest(e);
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot build the http client: {msg}"),
                    )
                    .with_backend("http")
                    .with_location(&display)
                })
        };
        let client = crate::shared::client(key, build)?;
        let rt = Arc::new(Rt::new(cfg.runtime_threads)?);
        let ctx = Arc::new(Ctx {
            client,
            url,
            display,
            cfg,
        });
        Ok(HttpBackend {
            ctx,
            rt,
            pin: Mutex::new(Pin::from_meta(0, None)),
            warned_unversioned: AtomicBool::new(false),
        })
    }

    /// The object's size and version as the latest request that asked for them saw them (the
    /// opening's HEAD, or the latest [`Backend::stat`]), without a request: what
    /// [`crate::open_stat`] returns, so that an opening followed at once by a `stat` costs one
    /// HEAD, not two.
    pub fn last_seen(&self) -> ObjectMeta {
        let pin = self.current_pin();
        ObjectMeta {
            size: pin.size,
            version: pin.version(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &HttpConfig {
        &self.ctx.cfg
    }

    fn current_pin(&self) -> Pin {
        match self.pin.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Backend for HttpBackend {
    fn location(&self) -> &str {
        &self.ctx.display
    }

    fn stat(&self) -> Result<ObjectMeta> {
        let c = self.ctx.clone();
        let pin = call(
            &self.rt,
            &self.ctx,
            "stat",
            async move { retry::stat(&c).await },
        )??;
        let meta = ObjectMeta {
            size: pin.size,
            version: pin.version(),
        };
        self.set_pin(pin);
        Ok(meta)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ranged_reads: true,
            direct_io: false,
            alignment: 1,
            preferred_chunk: self.ctx.cfg.chunk_size,
            max_concurrency: self.ctx.cfg.concurrency,
            kind: "http",
            kernel_reads: false,
        }
    }

    /// Reads through the pin of the latest `stat`. Buffers larger than the chunk size are split
    /// into chunk-sized GETs run concurrently (up to the configured concurrency).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let pin = self.current_pin();
        let ctx = &*self.ctx;
        let chunk = ctx.cfg.chunk_size;
        if offset > pin.size {
            return Err(ctx
                .err(
                    ErrorKind::RangeNotSatisfiable,
                    format!(
                        "offset {offset} is past the end of the object ({} bytes)",
                        pin.size
                    ),
                )
                .with_range(offset..offset.saturating_add(buf.len() as u64)));
        }
        let want = usize::try_from((pin.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        // The borrowed `buf` cannot travel to the runtime's task (see `call`): read through a
        // temporary buffer, in pieces, so that a large read costs one piece more, not a second
        // copy of it all. Each piece is split into chunk-sized GETs run concurrently.
        let piece = READ_AT_PIECE.max(chunk);
        let mut done = 0usize;
        while done < want {
            let len = (want - done).min(piece);
            let at = offset + done as u64;
            let (c, pin) = (self.ctx.clone(), pin.clone());
            let (data, results) = call(&self.rt, ctx, "read", async move {
                let mut data = vec![0u8; len];
                // Collected first: a lazy `map` here makes the task's future not `Send` as
                // far as the compiler can tell (a closure over borrowed parts).
                let mut parts = Vec::with_capacity(len.div_ceil(chunk));
                for (i, part) in data.chunks_mut(chunk).enumerate() {
                    let off = at + (i * chunk) as u64;
                    parts.push(retry::fetch_range(&c, &pin, off, part));
                }
                let results: Vec<Result<usize>> = futures_util::stream::iter(parts)
                    .buffer_unordered(c.cfg.concurrency)
                    .collect()
                    .await;
                (data, results)
            })?;
            let mut total = 0usize;
            for r in results {
                total += r?;
            }
            if total != len {
                return Err(ctx
                    .err(
                        ErrorKind::Io,
                        format!("read {total} of {len} bytes (internal short read)"),
                    )
                    .with_range(at..at + len as u64));
            }
            buf[done..done + len].copy_from_slice(&data);
            done += len;
        }
        Ok(want)
    }

    fn open_reader(
        self: Arc<Self>,
        meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let current = self.current_pin();
        let pin = if current.size == meta.size && current.version() == meta.version {
            current
        } else {
            Pin::from_meta(meta.size, meta.version.as_deref())
        };
        Ok(Box::new(reader::HttpReader::new(
            self.ctx.clone(),
            self.rt.clone(),
            pin,
            opts.cancel.clone(),
        )?))
    }
}
