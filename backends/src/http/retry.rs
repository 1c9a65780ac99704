//! One ranged GET, done right: version-pinned, streamed straight into the caller's memory,
//! resumed from the byte where a broken body stopped, retried with backoff and jitter, with a
//! per-request timeout and stall detection. Also the `stat` request (HEAD, or a one-byte GET when
//! HEAD is refused).

use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap};
use reqwest::{Client, Response, Url};
use tensorstream_engine::{Error, ErrorKind, Result};

use super::config::{
    backoff_delay, classify, jitter_sample, next_hop, only_chunked, parse_content_range,
    parse_retry_after, parse_unsatisfied_total, HttpConfig, Pin, StatusClass,
    FULL_BODY_FALLBACK_MAX, PROGRESS_MIN,
};

/// What every request needs: the client (connection pool), the URL and the configuration.
/// Its `Debug` shows the URL without secrets (see [`super::config::redact_url`]).
pub(crate) struct Ctx {
    pub client: Client,
    pub url: Url,
    /// The URL without secrets, for messages.
    pub display: String,
    pub cfg: HttpConfig,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("url", &self.display)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// An error with this backend's context.
    pub fn err(&self, kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error::new(kind, msg)
            .with_backend("http")
            .with_location(&self.display)
    }

    /// A request to `url`. The user's headers (credentials, often) go only to the URL's own
    /// origin, never to another host a redirect leads to.
    fn request_to(
        &self,
        url: &Url,
        method: reqwest::Method,
        pin: Option<&Pin>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, url.clone());
        if url.origin() == self.url.origin() {
            req = req.headers(self.cfg.headers.clone());
        }
        req = req.header(header::ACCEPT_ENCODING, "identity");
        if let Some((name, value)) = pin.and_then(|p| p.precondition()) {
            req = req.header(name, value);
        }
        req
    }
}

/// Why an attempt failed.
pub(crate) enum Failure {
    /// Try again after `after` (from `Retry-After`) or after the backoff delay.
    Retry {
        err: Box<Error>,
        after: Option<Duration>,
    },
    /// The body came slower than [`HttpConfig::min_rate`] allows and was cut: its bytes are
    /// kept and the rest is asked for, but the attempt counts as failed whatever it brought, so
    /// that a server slower than the slowest accepted rate is given up on after the retries.
    Slow(Box<Error>),
    /// Give up.
    Fatal(Box<Error>),
    /// The connection closed before any answer came (see [`closed_before_answer`]): a
    /// kept-alive connection the server closed just as this request went out on it, most
    /// likely. Sent again at once, and no failed attempt up to [`closed_in_a_row_max`] in a row.
    Closed(Box<Error>),
}

fn fatal(e: Error) -> Failure {
    Failure::Fatal(Box::new(e))
}

fn retry(err: Error) -> Failure {
    Failure::Retry {
        err: Box::new(err.with_retryable(true)),
        after: None,
    }
}

/// The message of a reqwest error with its causes, without the URL (which may hold secrets).
pub(crate) fn describe_reqwest(e: reqwest::Error) -> (ErrorKind, bool, String) {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_builder() {
        ErrorKind::InvalidInput
    } else {
        ErrorKind::Io
    };
    let mut retryable = !(e.is_builder() || e.is_redirect());
    let connect = e.is_connect();
    let what = if connect {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "response body broke off"
    } else if e.is_redirect() {
        "redirect failed"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    let mut depth = 0;
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    // A certificate the client does not trust will not become trusted by retrying.
    if let Some(hint) = crate::certificate_hint(&msg, false) {
        retryable = false;
        msg.push_str(hint);
    }
    if connect {
        if let Some(note) = crate::proxy_note(&|v| std::env::var(v).ok()) {
            msg.push_str(&note);
        }
    }
    (kind, retryable, msg)
}

/// Whether a request failed on a connection that closed (or was reset) before any answer came,
/// not one that could not be opened: what a kept-alive connection from the pool gives when the
/// server closed it (its idle timeout: nginx's `keepalive_timeout`, Apache's `KeepAliveTimeout`)
/// as the request was sent on it. hyper's "connection closed before message completed".
fn closed_before_answer(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() || !e.is_request() {
        return false;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                io.kind(),
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            );
        }
        src = s.source();
    }
    false
}

/// Requests in a row (for one `stat` or range) that may meet a connection closed before any
/// answer ([`Failure::Closed`]) without counting as failed attempts: one more than the idle
/// connections the pool keeps (see `HttpBackend::unopened`), each of which the server may have
/// closed, so that past them a fresh connection was tried. Beyond that, such failures count
/// (with backoff), and a server that closes every connection unanswered is given up on after
/// the retries, as before.
pub(crate) fn closed_in_a_row_max(cfg: &HttpConfig) -> u32 {
    u32::try_from(cfg.concurrency.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

fn from_reqwest(ctx: &Ctx, e: reqwest::Error) -> Failure {
    if closed_before_answer(&e) {
        let (kind, _, msg) = describe_reqwest(e);
        return Failure::Closed(Box::new(ctx.err(kind, msg).with_retryable(true)));
    }
    let (kind, retryable, msg) = describe_reqwest(e);
    let err = ctx.err(kind, msg);
    if retryable {
        retry(err)
    } else {
        fatal(err)
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn status_text(resp: &Response) -> String {
    let s = resp.status();
    match s.canonical_reason() {
        Some(r) => format!("HTTP {} {r}", s.as_u16()),
        None => format!("HTTP {}", s.as_u16()),
    }
}

/// The failure for a status that is not a success.
fn status_failure(ctx: &Ctx, resp: &Response, class: StatusClass) -> Failure {
    let mut text = status_text(resp);
    // The answer of a redirect's target: name it, or the URL given is blamed for its 404.
    if resp.url() != &ctx.url {
        text.push_str(&format!(
            " from {}, where a redirect led",
            super::config::redact_url(resp.url())
        ));
    }
    match class {
        StatusClass::Retry => {
            let after = header_str(resp.headers(), header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now(), ctx.cfg.retry_after_max));
            Failure::Retry {
                err: Box::new(
                    ctx.err(ErrorKind::Io, format!("server answered {text}"))
                        .with_retryable(true),
                ),
                after,
            }
        }
        StatusClass::NotFound => fatal(ctx.err(ErrorKind::NotFound, text)),
        StatusClass::Denied => fatal(ctx.err(
            ErrorKind::PermissionDenied,
            format!(
                "{text} (check credentials: an Authorization header, --header on the command \
                 line, OpenOptions::headers in the library)"
            ),
        )),
        StatusClass::Unsatisfiable => fatal(ctx.err(ErrorKind::RangeNotSatisfiable, text)),
        _ => fatal(ctx.err(ErrorKind::Io, format!("unexpected answer {text}"))),
    }
}

/// Loops over attempts with backoff; `progress` resets the count of failed attempts.
async fn backoff(ctx: &Ctx, failures: u32, after: Option<Duration>) {
    let delay = after.unwrap_or_else(|| {
        backoff_delay(
            failures,
            ctx.cfg.backoff_base,
            ctx.cfg.backoff_max,
            jitter_sample(),
        )
    });
    tokio::time::sleep(delay).await;
}

fn give_up(ctx: &Ctx, err: Error, attempts: u32) -> Error {
    let retryable = err.is_retryable();
    err.context(format!(
        "giving up after {attempts} attempts ({} retries)",
        ctx.cfg.max_retries
    ))
    .with_retryable(retryable)
}

// ---------------------------------------------------------------------------------------------
// stat

/// Size, version and range support of the object (HEAD; a one-byte ranged GET if HEAD is refused
/// or inconclusive), with retries.
pub(crate) async fn stat(ctx: &Ctx) -> Result<Pin> {
    let mut failures = 0u32;
    let mut closed = 0u32;
    loop {
        let outcome = stat_once(ctx).await;
        // (Only another kind of answer ends a row: past the bound, closed connections count,
        // each of them, as in `fetch_inner`.)
        if !matches!(outcome, Err(Failure::Closed(_))) {
            closed = 0;
        }
        let (err, after) = match outcome {
            Ok(p) => return Ok(p),
            Err(Failure::Fatal(e)) => return Err(*e),
            Err(Failure::Closed(err)) => {
                closed += 1;
                if closed <= closed_in_a_row_max(&ctx.cfg) {
                    continue;
                }
                (err, None)
            }
            Err(Failure::Retry { err, after }) => (err, after),
            Err(Failure::Slow(err)) => (err, None),
        };
        failures += 1;
        if failures > ctx.cfg.max_retries {
            return Err(give_up(ctx, *err, failures));
        }
        backoff(ctx, failures, after).await;
    }
}

/// Sends `method` (with the version pin's precondition and a `Range`, if given) to the URL,
/// following up to [`super::config::MAX_REDIRECTS`] redirects by hand (see [`next_hop`]); the client follows
/// none itself, so that the user's headers never reach another origin. The final answer's
/// headers must arrive within the timeout, redirects included (the hops share it), and by
/// `allowance` (the time left to the ranged GET that a shorter answer came to, see
/// [`attempt_deadline`]) when that comes first: past it, the answer is too slow.
async fn send(
    ctx: &Ctx,
    method: reqwest::Method,
    pin: Option<&Pin>,
    range: Option<&str>,
    allowance: Option<tokio::time::Instant>,
) -> Result<Response, Failure> {
    let mut url = ctx.url.clone();
    let mut hops = 0;
    // `None` (each hop on its own timeout) only where a huge timeout would overflow the clock.
    let own = tokio::time::Instant::now().checked_add(ctx.cfg.timeout);
    let (deadline, by_allowance) = match (own, allowance) {
        (Some(o), Some(a)) if a < o => (Some(a), true),
        (None, Some(a)) => (Some(a), true),
        (o, _) => (o, false),
    };
    loop {
        let mut req = ctx.request_to(&url, method.clone(), pin);
        if let Some(r) = range {
            req = req.header(header::RANGE, r);
        }
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d, req.send()).await,
            None => tokio::time::timeout(ctx.cfg.timeout, req.send()).await,
        };
        let resp = match answer {
            Err(_) if by_allowance => {
                return Err(Failure::Slow(Box::new(
                    ctx.err(
                        ErrorKind::Timeout,
                        format!(
                            "response too slow: no answer before the time of the ranged GET \
                             ran out (the shorter answers to a GET share its time; slowest \
                             accepted rate {} bytes/s)",
                            ctx.cfg.min_rate
                        ),
                    )
                    .with_retryable(true),
                )))
            }
            Err(_) => {
                let redirects = match hops {
                    0 => String::new(),
                    1 => " (1 redirect followed)".to_string(),
                    n => format!(" ({n} redirects followed)"),
                };
                return Err(retry(ctx.err(
                    ErrorKind::Timeout,
                    format!("no response within {:?}{redirects}", ctx.cfg.timeout),
                )));
            }
            Ok(Err(e)) => return Err(from_reqwest(ctx, e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        if !matches!(status, 301 | 302 | 303 | 307 | 308) {
            return Ok(resp);
        }
        let location = header_str(resp.headers(), header::LOCATION);
        url = next_hop(&url, status, location, hops)
            .map_err(|why| fatal(ctx.err(ErrorKind::Unsupported, why)))?;
        hops += 1;
    }
}

fn check_identity_encoding(ctx: &Ctx, h: &HeaderMap) -> Result<(), Failure> {
    if let Some(te) = header_str(h, header::TRANSFER_ENCODING) {
        if !only_chunked(te) {
            return Err(fatal(ctx.err(
                ErrorKind::Unsupported,
                format!(
                    "server sends the object with Transfer-Encoding {te:?}; only chunked framing \
                     leaves the raw bytes"
                ),
            )));
        }
    }
    match header_str(h, header::CONTENT_ENCODING) {
        None => Ok(()),
        Some(v) if v.trim().eq_ignore_ascii_case("identity") => Ok(()),
        Some(v) => Err(fatal(ctx.err(
            ErrorKind::Unsupported,
            format!("server sends the object with Content-Encoding {v:?}; byte ranges need the raw object"),
        ))),
    }
}

fn validators(h: &HeaderMap) -> (Option<String>, Option<String>) {
    (
        header_str(h, header::ETAG).map(str::to_string),
        header_str(h, header::LAST_MODIFIED).map(str::to_string),
    )
}

async fn stat_once(ctx: &Ctx) -> Result<Pin, Failure> {
    let resp = send(ctx, reqwest::Method::HEAD, None, None, None).await?;
    let status = resp.status().as_u16();
    if resp.status().is_success() {
        let h = resp.headers();
        check_identity_encoding(ctx, h)?;
        let accept = header_str(h, header::ACCEPT_RANGES).map(|v| v.trim().to_ascii_lowercase());
        if accept.as_deref() == Some("none") {
            return Err(fatal(no_ranges(ctx, "it sends Accept-Ranges: none")));
        }
        let len = header_str(h, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(size), Some("bytes")) = (len, accept.as_deref()) {
            let (etag, last_modified) = validators(h);
            return Ok(Pin {
                size,
                etag,
                last_modified,
            });
        }
        // No length or no Accept-Ranges: ask for one byte to find out.
        return probe(ctx).await;
    }
    match status {
        // HEAD refused (presigned URLs are often signed for GET only): probe with a GET.
        405 | 501 | 403 => probe(ctx).await,
        _ => Err(status_failure(ctx, &resp, classify(status))),
    }
}

/// Whether an answer is an HTML page.
fn is_html(h: &HeaderMap) -> bool {
    header_str(h, header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.trim_start().to_ascii_lowercase();
        v.starts_with("text/html") || v.starts_with("application/xhtml")
    })
}

fn no_ranges(ctx: &Ctx, why: &str) -> Error {
    ctx.err(
        ErrorKind::Unsupported,
        format!("server does not support byte-range requests ({why}); tensorstream needs ranged reads over HTTP"),
    )
}

async fn probe(ctx: &Ctx) -> Result<Pin, Failure> {
    let mut resp = send(ctx, reqwest::Method::GET, None, Some("bytes=0-0"), None).await?;
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    match classify(status) {
        StatusClass::Partial => {
            check_identity_encoding(ctx, &h)?;
            let cr = header_str(&h, header::CONTENT_RANGE).and_then(parse_content_range);
            let size = match cr {
                Some((0, 0, Some(total))) => total,
                _ => {
                    return Err(fatal(ctx.err(
                        ErrorKind::Unsupported,
                        "server answered a range request without a usable Content-Range total (object size unknown)",
                    )))
                }
            };
            // Drain the one byte so the connection goes back to the pool (a few bytes at most:
            // a server sending more is not waited for).
            let _ = tokio::time::timeout(ctx.cfg.timeout.min(Duration::from_secs(2)), async {
                let mut seen = 0usize;
                while let Ok(Some(c)) = resp.chunk().await {
                    seen += c.len();
                    if seen > 64 {
                        break;
                    }
                }
            })
            .await;
            let (etag, last_modified) = validators(&h);
            Ok(Pin {
                size,
                etag,
                last_modified,
            })
        }
        // A web page (a directory listing, a page about the file, a login page) is not a
        // server without ranges: the URL is wrong, and saying the server lacks ranges would
        // send the user after the server.
        StatusClass::Whole if is_html(&h) => Err(fatal(ctx.err(
            ErrorKind::InvalidInput,
            "the server answered with a web page (Content-Type: text/html), not a model file: \
             the URL may name a directory listing, a page about the file or a login page; give \
             the URL of the file itself",
        ))),
        StatusClass::Whole => Err(fatal(no_ranges(
            ctx,
            "it answered 200 with the whole object to a Range request",
        ))),
        StatusClass::Unsatisfiable => {
            // bytes=0-0 of an empty object.
            match header_str(&h, header::CONTENT_RANGE).and_then(parse_unsatisfied_total) {
                Some(0) => {
                    let (etag, last_modified) = validators(&h);
                    Ok(Pin {
                        size: 0,
                        etag,
                        last_modified,
                    })
                }
                _ => Err(status_failure(ctx, &resp, StatusClass::Unsatisfiable)),
            }
        }
        class => Err(status_failure(ctx, &resp, class)),
    }
}

// ---------------------------------------------------------------------------------------------
// ranged GET

/// Reads `dest.len()` bytes at `offset` of the pinned object version into `dest` (fewer only
/// where the object ends). Retries and resumes inside; the error that escapes is final.
pub(crate) async fn fetch_range(
    ctx: &Ctx,
    pin: &Pin,
    offset: u64,
    dest: &mut [u8],
) -> Result<usize> {
    let requested = offset..offset.saturating_add(dest.len() as u64);
    fetch_inner(ctx, pin, offset, dest)
        .await
        .map_err(|e| e.with_range(requested))
}

async fn fetch_inner(ctx: &Ctx, pin: &Pin, offset: u64, dest: &mut [u8]) -> Result<usize> {
    if offset > pin.size {
        return Err(ctx.err(
            ErrorKind::RangeNotSatisfiable,
            format!(
                "offset {offset} is past the end of the object ({} bytes)",
                pin.size
            ),
        ));
    }
    let avail = pin.size - offset;
    let want = usize::try_from(avail.min(dest.len() as u64)).unwrap_or(dest.len());
    let dest = &mut dest[..want];
    let mut pos = 0usize;
    let mut failures = 0u32;
    // Answers cut for slowness so far: progress never takes them off the count of failures.
    let mut slow_cuts = 0u32;
    // The deadline of the GETs answering the range since the last failed attempt: a shorter
    // answer is continued within the time the GET it answered had (see `attempt_deadline`),
    // so that a server answering small ranges slowly is cut as a slow one is. (Each answer on
    // its own time, and the count of failures restarted by each, let 64 KiB every 30 s count
    // as progress for as long as the range lasted.)
    let mut chain: Option<Option<tokio::time::Instant>> = None;
    // GETs in a row that met a connection closed before any answer (see `Failure::Closed`).
    let mut closed = 0u32;
    // Where the GETs sharing `chain` began, and when.
    let (mut chain_from, mut chain_started) = (pos, tokio::time::Instant::now());
    while pos < want {
        let deadline = *chain.get_or_insert_with(|| {
            (chain_from, chain_started) = (pos, tokio::time::Instant::now());
            attempt_deadline(&ctx.cfg, want - pos)
        });
        let (got, outcome) = if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
            // The time ran out between two answers: too slow, as when it runs out in a body
            // (not a GET sent only to be cut at once, as stalled).
            let err = ctx.err(
                ErrorKind::Timeout,
                format!(
                    "response too slow: {} of {} bytes in {:.1} s, in answers shorter than \
                     asked (slowest accepted rate {} bytes/s)",
                    pos - chain_from,
                    want - chain_from,
                    chain_started.elapsed().as_secs_f64(),
                    ctx.cfg.min_rate
                ),
            );
            (0, Err(Failure::Slow(Box::new(err.with_retryable(true)))))
        } else {
            // (Only a GET continuing shorter answers waits for its answer within `deadline`: a
            // new one has the timeout, which ends first unless the range is a few bytes.)
            let continues = pos > chain_from;
            let at = offset + pos as u64;
            attempt(ctx, pin, at, &mut dest[pos..], deadline, continues).await
        };
        // Progress restarts the retry count only when it is real: a server that sends a byte
        // and then fails (or trickles) must not be retried forever.
        let progress = got > 0 && got >= PROGRESS_MIN.min(want - pos);
        pos += got;
        if !matches!(outcome, Err(Failure::Closed(_))) {
            closed = 0;
        }
        let (err, after, slow) = match outcome {
            Ok(()) if got == 0 => {
                return Err(ctx.err(
                    ErrorKind::Io,
                    "server answered a range request with no bytes",
                ))
            }
            Ok(()) if pos < want && !progress => {
                // A shorter range than asked, and a small one: allowed now and then, but a
                // server answering a few bytes at a time counts as failing.
                failures += 1;
                if failures > ctx.cfg.max_retries {
                    return Err(ctx.err(
                        ErrorKind::Io,
                        format!(
                            "server answered {failures} ranged GETs in a row with under \
                             {PROGRESS_MIN} bytes each"
                        ),
                    ));
                }
                continue;
            }
            Ok(()) => {
                failures = slow_cuts;
                continue;
            }
            Err(Failure::Fatal(e)) => return Err(*e),
            Err(Failure::Closed(err)) => {
                closed += 1;
                if closed <= closed_in_a_row_max(&ctx.cfg) {
                    // No answer began (nothing arrived): the same GET again at once, on
                    // another connection, within the same time.
                    continue;
                }
                (err, None, false)
            }
            Err(Failure::Retry { err, after }) => (err, after, false),
            Err(Failure::Slow(err)) => (err, None, true),
        };
        if pos >= want {
            // Everything arrived; only the tail of the exchange failed.
            break;
        }
        // The next GET starts a new allowance.
        chain = None;
        if progress && !slow {
            // Progress: resume from `pos`; only attempts without progress count. (An answer
            // cut for slowness is resumed too, but counted whatever it brought: a server slower
            // than `min_rate` must not hold a load for hours by bringing a little each time.)
            failures = slow_cuts;
        }
        if slow {
            slow_cuts += 1;
        }
        failures += 1;
        if failures > ctx.cfg.max_retries {
            return Err(give_up(ctx, *err, failures));
        }
        backoff(ctx, failures, after).await;
    }
    Ok(want)
}

/// One GET for `dest.len()` bytes at `start`. Returns the bytes written to `dest` (a prefix),
/// also when the attempt failed part-way. A `206` must arrive whole by `deadline` (from
/// [`attempt_deadline`], for this GET or, when it `continues` a shorter answer, for the GET
/// that answer came to, and then the answer's headers too) or it is cut as too slow.
async fn attempt(
    ctx: &Ctx,
    pin: &Pin,
    start: u64,
    dest: &mut [u8],
    deadline: Option<tokio::time::Instant>,
    continues: bool,
) -> (usize, Result<(), Failure>) {
    let end = start + dest.len() as u64 - 1; // dest is non-empty
    let allowance = deadline.filter(|_| continues);
    let range = format!("bytes={start}-{end}");
    let mut resp = match send(
        ctx,
        reqwest::Method::GET,
        Some(pin),
        Some(&range),
        allowance,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => return (0, Err(f)),
    };
    let h = resp.headers().clone();
    let class = classify(resp.status().as_u16());
    // Only an answer that carries the object's bytes must be unencoded (an error page may well
    // come gzipped; its status is what counts).
    if matches!(class, StatusClass::Partial | StatusClass::Whole) {
        if let Err(f) = check_identity_encoding(ctx, &h) {
            return (0, Err(f));
        }
    }
    match class {
        StatusClass::Partial => {
            let (cs, ce, total) =
                match header_str(&h, header::CONTENT_RANGE).and_then(parse_content_range) {
                    Some(v) => v,
                    None => {
                        return (
                            0,
                            Err(fatal(ctx.err(
                                ErrorKind::Io,
                                "206 Partial Content without a valid Content-Range header",
                            ))),
                        )
                    }
                };
            if let Some(t) = total {
                if t != pin.size {
                    return (0, Err(fatal(size_changed(ctx, pin, &h, t))));
                }
            }
            if let Some(f) = version_mismatch(ctx, pin, &h) {
                return (0, Err(f));
            }
            if cs != start || ce > end {
                return (
                    0,
                    Err(fatal(ctx.err(
                        ErrorKind::Corrupt,
                        format!(
                            "server answered bytes {cs}-{ce} to a request for bytes {start}-{end}"
                        ),
                    ))),
                );
            }
            // A server may send less than asked (ce < end): take it; the caller asks for the rest.
            let n = (ce - cs + 1) as usize;
            stream_body(ctx, &mut resp, 0, &mut dest[..n], true, deadline).await
        }
        StatusClass::Whole => {
            // The server ignored Range and sends the whole object.
            let len =
                header_str(&h, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(f) = version_mismatch(ctx, pin, &h) {
                return (0, Err(f));
            }
            if let Some(l) = len {
                if l != pin.size {
                    return (0, Err(fatal(size_changed(ctx, pin, &h, l))));
                }
            }
            if len.is_none() || pin.size > FULL_BODY_FALLBACK_MAX {
                return (
                    0,
                    Err(fatal(ctx.err(
                        ErrorKind::Unsupported,
                        format!(
                            "server ignored the Range header and answered 200 with the whole object ({}); \
                             only objects up to {FULL_BODY_FALLBACK_MAX} bytes are read that way",
                            len.map_or("unknown size".to_string(), |l| format!("{l} bytes"))
                        ),
                    ))),
                );
            }
            // Small object: skip to `start` and slice out the bytes wanted.
            // The body brings the `start` bytes before the range too: they get time as well.
            let whole = usize::try_from(start)
                .unwrap_or(usize::MAX)
                .saturating_add(dest.len());
            let deadline = attempt_deadline(&ctx.cfg, whole);
            stream_body(ctx, &mut resp, start, dest, false, deadline).await
        }
        StatusClass::Changed => {
            let now = current_version(ctx).await;
            (0, Err(fatal(changed(ctx, pin, &now))))
        }
        StatusClass::Unsatisfiable => {
            match header_str(&h, header::CONTENT_RANGE).and_then(parse_unsatisfied_total) {
                Some(t) if t != pin.size => (
                    0,
                    Err(fatal(changed(
                        ctx,
                        pin,
                        &format!("size {t} bytes, was {}", pin.size),
                    ))),
                ),
                _ => (0, Err(status_failure(ctx, &resp, class))),
            }
        }
        _ => (0, Err(status_failure(ctx, &resp, class))),
    }
}

/// An `ObjectChanged` error: "object changed while loading: ETag was X, now Y".
fn changed(ctx: &Ctx, pin: &Pin, now: &str) -> Error {
    ctx.err(
        ErrorKind::ObjectChanged,
        format!(
            "object changed while loading: {}, now {now}; restart the load to read the new version",
            pin.describe()
        ),
    )
}

/// An answer giving the object another size than the pin: a new version, or (same strong ETag)
/// a server whose HEAD and GET disagree, which no restart would cure.
fn size_changed(ctx: &Ctx, pin: &Pin, h: &HeaderMap, now: u64) -> Error {
    let (etag, _) = validators(h);
    let same = match (&pin.etag, &etag) {
        (Some(a), Some(b)) => a == b && !a.trim_start().starts_with("W/"),
        _ => false,
    };
    if same {
        return ctx.err(
            ErrorKind::Corrupt,
            format!(
                "the server gives one version (ETag {}) two sizes: {} bytes when the load \
                 started (HEAD or the first ranged GET), {now} bytes in a ranged GET",
                etag.unwrap_or_default(),
                pin.size
            ),
        );
    }
    changed(ctx, pin, &format!("size {now} bytes, was {}", pin.size))
}

/// Compares the response's validators with the pin.
fn version_mismatch(ctx: &Ctx, pin: &Pin, h: &HeaderMap) -> Option<Failure> {
    let (etag, lm) = validators(h);
    if pin.etag_differs(etag.as_deref()) {
        let now = etag.unwrap_or_default();
        return Some(fatal(changed(ctx, pin, &now)));
    }
    if pin.etag.is_none() {
        if let (Some(a), Some(b)) = (&pin.last_modified, &lm) {
            if a != b {
                return Some(fatal(changed(ctx, pin, &format!("Last-Modified {b}"))));
            }
        }
    }
    None
}

/// Best-effort description of the object's current version after a 412.
async fn current_version(ctx: &Ctx) -> String {
    let unknown = "a different version (412 Precondition Failed)";
    let head = || {
        let fut = send(ctx, reqwest::Method::HEAD, None, None, None);
        tokio::time::timeout(ctx.cfg.timeout.min(Duration::from_secs(5)), fut)
    };
    let mut answer = head().await;
    if matches!(answer, Ok(Err(_))) {
        // Once more: a pooled connection may have been closed by the server meanwhile.
        answer = head().await;
    }
    match answer {
        Ok(Ok(r)) if r.status().is_success() => {
            let (etag, lm) = validators(r.headers());
            match (etag, lm) {
                (Some(e), _) => e,
                (None, Some(lm)) => format!("Last-Modified {lm}"),
                _ => unknown.into(),
            }
        }
        Ok(Ok(r)) => format!(
            "{unknown}; a HEAD for the new version got {}",
            status_text(&r)
        ),
        Ok(Err(
            Failure::Retry { err, .. }
            | Failure::Slow(err)
            | Failure::Fatal(err)
            | Failure::Closed(err),
        )) => {
            format!("{unknown}; a HEAD for the new version failed: {err}")
        }
        Err(_) => format!("{unknown}; a HEAD for the new version timed out"),
    }
}

/// When one GET for `len` bytes must be done: the timeout plus `len` at the slowest accepted
/// rate ([`HttpConfig::min_rate`]); `None` without a rate limit.
pub(crate) fn attempt_deadline(cfg: &HttpConfig, len: usize) -> Option<tokio::time::Instant> {
    if cfg.min_rate == 0 {
        return None;
    }
    let slow = Duration::try_from_secs_f64(len as f64 / cfg.min_rate as f64).ok()?;
    // `None` (no deadline) when a huge timeout would overflow the clock.
    tokio::time::Instant::now().checked_add(cfg.timeout.saturating_add(slow))
}

/// Streams the body into `dest`, first discarding `skip` bytes. Every chunk is copied straight
/// from the connection's buffer into `dest`. With `exact`, the body must be exactly
/// `dest.len()` bytes; otherwise reading stops once `dest` is full. Stalls (no bytes for the
/// timeout), a body slower than the attempt's `deadline` allows and broken bodies are
/// retryable failures carrying the bytes written so far.
async fn stream_body(
    ctx: &Ctx,
    resp: &mut Response,
    mut skip: u64,
    dest: &mut [u8],
    exact: bool,
    deadline: Option<tokio::time::Instant>,
) -> (usize, Result<(), Failure>) {
    let mut got = 0usize;
    let started = tokio::time::Instant::now();
    let mut last_bytes = started;
    loop {
        let wait = match deadline {
            Some(d) => ctx
                .cfg
                .timeout
                .min(d.saturating_duration_since(tokio::time::Instant::now())),
            None => ctx.cfg.timeout,
        };
        let chunk = match tokio::time::timeout(wait, resp.chunk()).await {
            // Cut by the deadline (the GET's time ran out before the timeout did): too slow,
            // also with no byte of this answer yet (a shorter answer continuing a GET, whose
            // time ran out as this one began, stalled for no time at all).
            Err(_) if wait < ctx.cfg.timeout => {
                return (
                    got,
                    Err(Failure::Slow(Box::new(
                        ctx.err(
                            ErrorKind::Timeout,
                            format!(
                                "response body too slow: {got} of {} bytes in {:.1} s (slowest \
                                 accepted rate {} bytes/s)",
                                dest.len(),
                                started.elapsed().as_secs_f64(),
                                ctx.cfg.min_rate
                            ),
                        )
                        .with_retryable(true),
                    ))),
                )
            }
            Err(_) => {
                return (
                    got,
                    Err(retry(ctx.err(
                        ErrorKind::Timeout,
                        format!(
                            "response body stalled: no bytes for {:.1} s after {got} of {} \
                             bytes",
                            last_bytes.elapsed().as_secs_f64(),
                            dest.len()
                        ),
                    ))),
                )
            }
            Ok(Err(e)) => {
                let f = from_reqwest(ctx, e);
                return (got, Err(f));
            }
            Ok(Ok(None)) => {
                if got < dest.len() {
                    return (
                        got,
                        Err(retry(ctx.err(
                            ErrorKind::Io,
                            format!("response body ended early: {got} of {} bytes", dest.len()),
                        ))),
                    );
                }
                return (got, Ok(()));
            }
            Ok(Ok(Some(c))) => {
                last_bytes = tokio::time::Instant::now();
                c
            }
        };
        let mut data: &[u8] = &chunk;
        if skip > 0 {
            let s = (skip.min(data.len() as u64)) as usize;
            data = &data[s..];
            skip -= s as u64;
        }
        let room = dest.len() - got;
        if data.len() > room {
            if exact {
                return (
                    got,
                    Err(fatal(ctx.err(
                        ErrorKind::Corrupt,
                        format!(
                            "server sent more than the {} bytes of the range",
                            dest.len()
                        ),
                    ))),
                );
            }
            data = &data[..room];
        }
        dest[got..got + data.len()].copy_from_slice(data);
        got += data.len();
        if got == dest.len() && !exact {
            // Enough of a whole-object answer: drop the rest (the connection is closed).
            return (got, Ok(()));
        }
    }
}
