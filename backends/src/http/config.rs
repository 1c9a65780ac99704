//! Configuration of the HTTP backend and the pure pieces of protocol handling: URL redaction,
//! header parsing (`Content-Range`, `Retry-After`), version pins and retry delays. No I/O here,
//! so everything is unit-tested in `tests.rs`.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tensorstream_engine::{Error, Result};

pub use crate::ranges::parse_content_range;
use crate::OpenOptions;

/// Default number of ranged GETs in flight.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default size of one ranged GET.
pub const DEFAULT_CHUNK: usize = 8 << 20;
/// Default per-request timeout (time to response headers, redirects included, and longest pause
/// between body bytes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default slowest accepted transfer rate: one GET for N bytes may take the timeout plus
/// N / this long (8 MiB: 30 s + 32 s). A slower answer is cut and resumed, and counts as a
/// failed attempt; see [`HttpConfig::min_rate`].
pub const DEFAULT_MIN_RATE: u64 = crate::SLOWEST_RATE;
/// Bytes a shorter answer or a broken-off body must bring to count as progress (which restarts
/// the retry count). An answer cut for slowness never counts as progress.
pub const PROGRESS_MIN: usize = crate::PROGRESS_BYTES;
/// Default number of retries of one range without progress.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
/// Upper bound on concurrency (each request may hold a connection).
pub const MAX_CONCURRENCY: usize = 1024;
/// A `200 OK` answer to a range request (the server ignored `Range`) is sliced only when the
/// whole object is at most this big; larger objects are refused with `Unsupported`, because every
/// chunk of a load would download the whole object again.
pub const FULL_BODY_FALLBACK_MAX: u64 = 16 << 20;

/// Everything the HTTP backend needs to know besides the URL.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Ranged GETs in flight (reader sessions and large `read_at` calls).
    pub concurrency: usize,
    /// Size of one ranged GET (the planner's preferred chunk).
    pub chunk_size: usize,
    /// Time allowed until response headers arrive (the final answer's: the hops of a redirect
    /// chain share it), and longest pause between body bytes (stall).
    pub timeout: Duration,
    /// Time allowed to open a TCP (+ TLS) connection.
    pub connect_timeout: Duration,
    /// Slowest transfer accepted, in bytes per second: one GET for N bytes gets `timeout` plus
    /// N / `min_rate` in all, so that a server trickling bytes (each pause shorter than the
    /// timeout) cannot hold a load forever. A GET cut this way is resumed where it stopped (its
    /// bytes are kept), but counts as a failed attempt whatever it brought: a range that is
    /// still not complete after `max_retries` such cuts in a row fails with a `Timeout` error
    /// ("too slow"). The answers to a GET that the server answered with a shorter range share
    /// that GET's time (the waits for them too), and progress does not take a cut off the count, so a server answering
    /// small ranges slowly is given up on as well. In practice a connection slower than about
    /// 30 KiB/s fails with the defaults (six attempts of 30 s or more for 8 MiB). 0: no limit.
    pub min_rate: u64,
    /// Retries of one range that made no progress (connection errors, 429, 5xx, stalls, fewer
    /// than [`PROGRESS_MIN`] bytes, answers cut for being slower than `min_rate`). A request
    /// that meets a connection closed before any answer (a kept-alive one the server closed as
    /// it was reused) is sent again at once and not counted, up to `2 × concurrency + 1` in a row.
    pub max_retries: u32,
    /// First retry delay; doubles on each retry (full jitter).
    pub backoff_base: Duration,
    /// Largest retry delay from backoff.
    pub backoff_max: Duration,
    /// Largest delay taken from a `Retry-After` header.
    pub retry_after_max: Duration,
    /// Worker threads of the backend's tokio runtime. With more than one, hyper (1.12) now and
    /// then leaves a GET it sends on a pooled connection at the moment that connection's task
    /// ends (the server closed it, and the other thread saw it) neither written nor failed
    /// (hyperium/hyper#4122): that GET waits out `timeout` and counts as a failed attempt.
    /// Against nginx closing idle connections after 5 ms, 1024 GETs of 16 KiB 32 at a time,
    /// 9 loads of 220 had such a GET with two threads, none of 180 with one.
    pub runtime_threads: usize,
    /// Extra headers sent with every request (`Authorization`, …).
    pub headers: HeaderMap,
    /// Extra trusted root certificates (PEM, one or more per entry), added to the system's
    /// roots (which also honour `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub root_certificates_pem: Vec<Vec<u8>>,
    /// [`OpenOptions::cancel`]: once set, opening, `stat` and `read_at` stop and fail with
    /// `Cancelled`.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            concurrency: DEFAULT_CONCURRENCY,
            chunk_size: DEFAULT_CHUNK,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            min_rate: DEFAULT_MIN_RATE,
            max_retries: DEFAULT_MAX_RETRIES,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            retry_after_max: Duration::from_secs(30),
            runtime_threads: 2,
            headers: HeaderMap::new(),
            root_certificates_pem: Vec::new(),
            cancel: None,
        }
    }
}

impl HttpConfig {
    /// The configuration for the shared [`OpenOptions`]; invalid values are `InvalidInput`.
    pub fn from_options(opts: &OpenOptions) -> Result<Self> {
        let mut c = HttpConfig::default();
        if let Some(n) = opts.concurrency {
            if n == 0 || n > MAX_CONCURRENCY {
                return Err(Error::invalid(format!(
                    "http concurrency {n} is out of range (1..={MAX_CONCURRENCY})"
                )));
            }
            c.concurrency = n;
        }
        if let Some(n) = opts.chunk_size {
            if n == 0 {
                return Err(Error::invalid("http chunk size must be at least 1 byte"));
            }
            c.chunk_size = n;
        }
        if let Some(t) = opts.timeout {
            if t.is_zero() {
                return Err(Error::invalid("http timeout must be longer than 0"));
            }
            c.timeout = t;
            c.connect_timeout = c.connect_timeout.min(t);
        }
        c.headers = parse_headers(&opts.headers)?;
        c.cancel = opts.cancel.clone();
        Ok(c)
    }
}

/// Validates user-supplied headers. Headers the backend manages itself (`Range`, `If-Match`, …)
/// are refused so that they cannot break version pinning.
pub fn parse_headers(list: &[(String, String)]) -> Result<HeaderMap> {
    const RESERVED: &[&str] = &[
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "accept-encoding",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
    ];
    let mut map = HeaderMap::new();
    for (k, v) in list {
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| Error::invalid(format!("invalid HTTP header name {k:?}")))?;
        if RESERVED.contains(&name.as_str()) {
            return Err(Error::invalid(format!(
                "HTTP header {k:?} is managed by the http backend and cannot be set"
            )));
        }
        let mut value = HeaderValue::from_str(v.trim()).map_err(|_| {
            Error::invalid(format!(
                "invalid value for HTTP header {k:?} (control characters or non-ASCII)"
            ))
        })?;
        // Any header the user adds may be a credential (`X-Api-Key`, a token): none is shown
        // by `Debug`, and HTTP/2 never puts one in its compression tables.
        value.set_sensitive(true);
        map.append(name, value);
    }
    Ok(map)
}

/// The URL without secrets, for messages: user info is dropped and a query string (which may
/// hold a signature or token) is replaced by `?…`.
pub fn redact_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// Whether a `Transfer-Encoding` value names only `chunked` framing (which the HTTP client
/// undoes); any other coding (`gzip, chunked` …) would hand over transformed bytes.
pub fn only_chunked(te: &str) -> bool {
    te.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .all(|t| t.eq_ignore_ascii_case("chunked") || t.eq_ignore_ascii_case("identity"))
}

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

/// Where a redirect (`301`, `302`, `303`, `307`, `308`) from `current` leads, or why it is refused:
/// no `Location`, a scheme other than http(s), https to plain http (the bytes and the version
/// pin would travel unprotected), or more than [`MAX_REDIRECTS`] hops (`hops` already taken).
pub fn next_hop(
    current: &reqwest::Url,
    status: u16,
    location: Option<&str>,
    hops: usize,
) -> std::result::Result<reqwest::Url, String> {
    let Some(loc) = location else {
        return Err(format!("redirect ({status}) without a Location header"));
    };
    let next = current
        .join(loc.trim())
        .map_err(|e| format!("redirect ({status}) to an invalid Location: {e}"))?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(format!(
            "redirect ({status}) to a {}: URL refused",
            next.scheme()
        ));
    }
    if current.scheme() == "https" && next.scheme() == "http" {
        return Err(format!(
            "redirect ({status}) from https to plain http refused ({})",
            redact_url(&next)
        ));
    }
    if hops >= MAX_REDIRECTS {
        return Err(format!(
            "more than {MAX_REDIRECTS} redirects (the last to {})",
            redact_url(&next)
        ));
    }
    Ok(next)
}

/// Parses the total of an unsatisfied range, `Content-Range: bytes */TOTAL` (sent with 416).
pub fn parse_unsatisfied_total(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.strip_prefix("*/")?.trim().parse().ok()
}

/// Parses `Retry-After` (delay in seconds, or an HTTP date), relative to `now`, capped at `max`.
pub fn parse_retry_after(v: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = httpdate::parse_http_date(v).ok()?;
        when.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(max))
}

/// Delay before retry number `attempt` (1-based): full jitter over an exponential ceiling,
/// `random(0..=min(max, base·2^(attempt-1)))`, at least 1 ms. `rand` is a uniform sample in [0,1).
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, rand: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exp).min(max);
    let r = rand.clamp(0.0, 1.0);
    ceiling.mul_f64(r).max(Duration::from_millis(1))
}

/// Which object version a load is pinned to: sent as a precondition with every GET and compared
/// with every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Object size at stat.
    pub size: u64,
    /// ETag at stat, verbatim (with quotes, maybe `W/`).
    pub etag: Option<String>,
    /// Last-Modified at stat, verbatim.
    pub last_modified: Option<String>,
}

/// Prefix of [`Pin::version`] when the object has no ETag but a Last-Modified date.
const LM_PREFIX: &str = "last-modified: ";

impl Pin {
    /// The version string reported in `ObjectMeta::version`: the ETag, else
    /// `last-modified: <date>`, else none.
    pub fn version(&self) -> Option<String> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(lm)) => Some(format!("{LM_PREFIX}{lm}")),
            (None, None) => None,
        }
    }

    /// Rebuilds a pin from `ObjectMeta` (the inverse of [`Pin::version`]).
    pub fn from_meta(size: u64, version: Option<&str>) -> Pin {
        match version {
            Some(v) => match v.strip_prefix(LM_PREFIX) {
                Some(lm) => Pin {
                    size,
                    etag: None,
                    last_modified: Some(lm.to_string()),
                },
                None => Pin {
                    size,
                    etag: Some(v.to_string()),
                    last_modified: None,
                },
            },
            None => Pin {
                size,
                etag: None,
                last_modified: None,
            },
        }
    }

    /// The precondition header to send: `If-Match` with a strong ETag, else
    /// `If-Unmodified-Since` with the Last-Modified date (weak ETags never match `If-Match`).
    pub fn precondition(&self) -> Option<(&'static str, &str)> {
        match &self.etag {
            Some(e) if !is_weak(e) => Some(("if-match", e.as_str())),
            _ => self
                .last_modified
                .as_deref()
                .map(|lm| ("if-unmodified-since", lm)),
        }
    }

    /// Whether a response's ETag shows a different version (weak comparison; a missing ETag on
    /// either side proves nothing).
    pub fn etag_differs(&self, response_etag: Option<&str>) -> bool {
        match (&self.etag, response_etag) {
            (Some(a), Some(b)) => strip_weak(a) != strip_weak(b),
            _ => false,
        }
    }

    /// Human-readable description of the pinned version.
    pub fn describe(&self) -> String {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => format!("ETag was {e}"),
            (None, Some(lm)) => format!("Last-Modified was {lm}"),
            (None, None) => format!("size was {}", self.size),
        }
    }
}

fn is_weak(etag: &str) -> bool {
    etag.starts_with("W/")
}

fn strip_weak(etag: &str) -> &str {
    etag.strip_prefix("W/").unwrap_or(etag)
}

/// How a status code is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 206 Partial Content.
    Partial,
    /// 200 OK: the whole object (range ignored).
    Whole,
    /// Worth retrying after a delay (429, 5xx except 501/505).
    Retry,
    /// 412: the precondition failed, the object changed.
    Changed,
    /// 404 / 410.
    NotFound,
    /// 401 / 403.
    Denied,
    /// 416.
    Unsatisfiable,
    /// Anything else: a permanent failure.
    Fatal,
}

/// Classifies an HTTP status code.
pub fn classify(status: u16) -> StatusClass {
    match status {
        206 => StatusClass::Partial,
        200 => StatusClass::Whole,
        412 => StatusClass::Changed,
        404 | 410 => StatusClass::NotFound,
        401 | 403 => StatusClass::Denied,
        416 => StatusClass::Unsatisfiable,
        408 | 425 | 429 => StatusClass::Retry,
        501 | 505 => StatusClass::Fatal,
        500..=599 => StatusClass::Retry,
        _ => StatusClass::Fatal,
    }
}

/// A uniform sample in [0, 1) from a small thread-local xorshift generator (jitter needs no
/// cryptographic quality, only different values in different threads).
pub fn jitter_sample() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    fn seed() -> u64 {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let local = 0u8;
        (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}
