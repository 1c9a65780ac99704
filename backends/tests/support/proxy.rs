//! A small fault-injecting HTTP/1.1 proxy (std threads) in front of a real server.
//!
//! It forwards requests and responses unchanged (keep-alive included) and logs every exchange
//! (method, Range asked, status, Content-Range answered, body bytes forwarded). Faults, armed at
//! any time with [`Proxy::set_faults`]:
//! * `reset_after`: cut the connection with a TCP RST after N body bytes of a response (the
//!   first `times` responses whose body is longer than N);
//! * `stall_after`: stop forwarding after N body bytes for a while (longer than the client's
//!   timeout), then close;
//! * `unavailable`: answer the next K requests with `503 Service Unavailable` + `Retry-After`;
//! * `hang_up`: close the connection without answering the next K requests (logged with
//!   status 0);
//! * `strip_range`: drop the `Range` header of requests (the server then answers 200);
//! * `shift_content_range`: add N to both ends of a `206` answer's `Content-Range` (the body is
//!   unchanged): a server or cache that says it sends another window than the one asked for;
//! * `replace_after`: run a hook (e.g. replace the object on disk) once N body bytes in total
//!   have gone through;
//! * `strip_etag`: drop the `ETag` header of responses (a server or gateway that sends none);
//! * `weak_etag`, `strip_last_modified`: mark the `ETag` weak, drop `Last-Modified`;
//! * `partial_as_200`: turn `206` answers into `200 OK` without `Content-Range` (a proxy or
//!   cache that ignored `Range`);
//! * `delay`: hold every request this long before forwarding it (a store's round trip);
//! * `gate`: a function each request goes through first (method, path, `Range`): it may hold
//!   the request as long as it likes, and answers it itself with a status, or lets it through.
//!   A client that closes its connection while the gate holds its request is noted
//!   ([`Proxy::hung_up_while_gated`]), and the request is then dropped, not answered.
//!
//! It also counts the requests in flight (read from a client, their answer not yet begun) and
//! keeps the most seen at once ([`Proxy::peak_in_flight`]).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request/response that went through the proxy.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `GET`, `HEAD` …
    pub method: String,
    /// The `Range` header the client sent.
    pub range: Option<String>,
    /// Status code answered (by the server, or 503 by the proxy).
    pub status: u16,
    /// The `Content-Range` the server answered.
    pub content_range: Option<String>,
    /// Body bytes forwarded to the client.
    pub body_bytes: u64,
    /// True when a fault cut this exchange.
    pub faulted: bool,
    /// Which client connection carried it (numbered from 0 in the order accepted).
    pub conn: u64,
    /// The request's header lines (`Name: value`), as the client sent them.
    pub request_headers: Vec<String>,
}

impl Exchange {
    /// The answered byte range `start..end` from `Content-Range` (exclusive end).
    pub fn answered_range(&self) -> Option<std::ops::Range<u64>> {
        let v = self.content_range.as_deref()?.strip_prefix("bytes ")?;
        let (r, _) = v.split_once('/')?;
        let (s, e) = r.split_once('-')?;
        Some(s.trim().parse().ok()?..e.trim().parse::<u64>().ok()? + 1)
    }
}

/// Faults to inject (all off by default).
#[derive(Default)]
pub struct Faults {
    /// `(bytes, times)`: reset after `bytes` body bytes, for `times` responses.
    pub reset_after: Option<(u64, usize)>,
    /// `(bytes, pause, times)`: stall after `bytes` body bytes for `pause`, for `times` responses.
    pub stall_after: Option<(u64, Duration, usize)>,
    /// `(count, retry_after_header)`: answer the next `count` requests with 503.
    pub unavailable: Option<(usize, String)>,
    /// Send those 503 answers with `Content-Encoding: gzip` (a CDN's compressed error page).
    pub unavailable_gzip: bool,
    /// Close the connection, unanswered, on each of the next this many requests (a server or
    /// gateway that drops requests); logged with status 0.
    pub hang_up: usize,
    /// Remove `Range` from requests.
    pub strip_range: bool,
    /// Shift the `Content-Range` of `206` answers by this many bytes.
    pub shift_content_range: Option<u64>,
    /// Run the hook once this many body bytes (counted from when the faults were set) went by.
    pub replace_after: Option<(u64, Box<dyn FnOnce() + Send>)>,
    /// Answer every `HEAD` with this `Content-Length` (a CDN whose HEAD describes another
    /// representation than its GETs send).
    pub head_length: Option<u64>,
    /// Cut every `206` answer longer than this to this many bytes, with `Content-Range` and
    /// `Content-Length` saying so (a server or gateway that sends less than the range asked).
    pub shorten_206: Option<u64>,
    /// `(path_prefix, to)`: answer requests for paths starting with `path_prefix` with
    /// `302 Found` to `to` followed by the rest of the path.
    pub redirect: Option<(String, String)>,
    /// `(count, status, body_bytes)`: answer the next `count` requests with `status` and an
    /// error body of `body_bytes` bytes (XML-looking, with a terminal escape sequence in it).
    pub error_answer: Option<(usize, u16, u64)>,
    /// `(bytes, pause)`: forward every body `bytes` at a time with `pause` after each piece (a
    /// server that trickles, never pausing long enough to look stalled).
    pub trickle: Option<(usize, Duration)>,
    /// Remove `ETag` from responses.
    pub strip_etag: bool,
    /// Mark every `ETag` weak (`W/"…"`), as some gateways and proxies do.
    pub weak_etag: bool,
    /// Remove `Last-Modified` from responses.
    pub strip_last_modified: bool,
    /// Answer `206` responses as `200 OK` without `Content-Range` (a proxy or cache that
    /// ignores `Range`; the body is still the range the server sent).
    pub partial_as_200: bool,
    /// Hold every request this long before forwarding it to the server.
    pub delay: Option<Duration>,
    /// Called with each request (method, path, `Range`) before anything else: it may block
    /// (holding the request); `Some(status)` answers with that status and an empty body,
    /// `None` lets the request through. A request whose client hangs up meanwhile is noted
    /// ([`Proxy::hung_up_while_gated`]) and dropped with its connection when the gate returns.
    pub gate: Option<Gate>,
}

/// See [`Faults::gate`].
pub type Gate = Arc<dyn Fn(&str, &str, Option<&str>) -> Option<u16> + Send + Sync>;

struct Armed {
    reset_bytes: u64,
    reset_left: AtomicUsize,
    stall_bytes: u64,
    stall_pause: Duration,
    stall_left: AtomicUsize,
    unavailable_left: AtomicUsize,
    retry_after: String,
    unavailable_gzip: bool,
    hang_up_left: AtomicUsize,
    strip_range: bool,
    shift_content_range: Option<u64>,
    replace_at: u64,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    bytes_since: AtomicU64,
    trickle: Option<(usize, Duration)>,
    redirect: Option<(String, String)>,
    shorten_206: Option<u64>,
    head_length: Option<u64>,
    error_left: AtomicUsize,
    error_status: u16,
    error_bytes: u64,
    strip_etag: bool,
    weak_etag: bool,
    strip_last_modified: bool,
    partial_as_200: bool,
    delay: Option<Duration>,
    gate: Option<Gate>,
}

impl Armed {
    fn from(f: Faults) -> Armed {
        let (reset_bytes, reset_left) = f.reset_after.unwrap_or((0, 0));
        let (stall_bytes, stall_pause, stall_left) =
            f.stall_after.unwrap_or((0, Duration::ZERO, 0));
        let (unavailable_left, retry_after) = f.unavailable.unwrap_or((0, String::new()));
        let (replace_at, hook) = match f.replace_after {
            Some((n, h)) => (n, Some(h)),
            None => (0, None),
        };
        Armed {
            reset_bytes,
            reset_left: AtomicUsize::new(reset_left),
            stall_bytes,
            stall_pause,
            stall_left: AtomicUsize::new(stall_left),
            unavailable_left: AtomicUsize::new(unavailable_left),
            retry_after,
            unavailable_gzip: f.unavailable_gzip,
            hang_up_left: AtomicUsize::new(f.hang_up),
            strip_range: f.strip_range,
            shift_content_range: f.shift_content_range,
            replace_at,
            hook: Mutex::new(hook),
            bytes_since: AtomicU64::new(0),
            trickle: f.trickle,
            redirect: f.redirect,
            shorten_206: f.shorten_206,
            head_length: f.head_length,
            error_left: AtomicUsize::new(f.error_answer.map_or(0, |e| e.0)),
            error_status: f.error_answer.map_or(0, |e| e.1),
            error_bytes: f.error_answer.map_or(0, |e| e.2),
            strip_etag: f.strip_etag,
            weak_etag: f.weak_etag,
            strip_last_modified: f.strip_last_modified,
            partial_as_200: f.partial_as_200,
            delay: f.delay,
            gate: f.gate,
        }
    }
}

fn take_one(a: &AtomicUsize) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    faults: Mutex<Arc<Armed>>,
    log: Mutex<Vec<Exchange>>,
    body_bytes: AtomicU64,
    clients: Mutex<std::collections::HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Requests read and not yet answered, and the most at once.
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    /// The same for GETs of a range that does not start at byte 0 (reads of tensor data, not
    /// of a header).
    data_in_flight: AtomicUsize,
    peak_data_in_flight: AtomicUsize,
    /// The requests (method, path) whose client closed its connection while the gate held
    /// them, in the order seen.
    gated_hang_ups: Mutex<Vec<(String, String)>>,
}

/// One request in flight: counted from when the proxy read it until its answer begins (or the
/// exchange ends otherwise). Not until the answer's end: a client that got a whole answer and
/// sent its next request could find the first still counted. A data read (see
/// [`is_data_read`]) is counted twice: among all requests and among data reads.
struct InFlight<'a>(&'a Shared, bool);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared, data: bool) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        if data {
            let now = shared.data_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            shared.peak_data_in_flight.fetch_max(now, Ordering::SeqCst);
        }
        InFlight(shared, data)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.1 {
            self.0.data_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Whether a request (its head's lines) is a GET of a range that does not start at byte 0: a
/// read of tensor data, not of a file's header.
fn is_data_read(req: &[String]) -> bool {
    req.first().is_some_and(|l| l.starts_with("GET "))
        && header(req, "range").is_some_and(|r| {
            r.strip_prefix("bytes=")
                .is_some_and(|r| !r.starts_with("0-"))
        })
}

/// The running proxy. Dropping it stops accepting and closes every connection.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            faults: Mutex::new(Arc::new(Armed::from(Faults::default()))),
            log: Mutex::new(Vec::new()),
            body_bytes: AtomicU64::new(0),
            clients: Mutex::new(std::collections::HashMap::new()),
            next_conn: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            data_in_flight: AtomicUsize::new(0),
            peak_data_in_flight: AtomicUsize::new(0),
            gated_hang_ups: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let id = s.next_conn.fetch_add(1, Ordering::SeqCst);
                    if let Ok(c) = conn.try_clone() {
                        s.clients.lock().unwrap().insert(id, c);
                    }
                    let s2 = s.clone();
                    let _ =
                        std::thread::Builder::new()
                            .name("proxy-conn".into())
                            .spawn(move || {
                                let _ = handle(conn, &s2, id);
                                // Drop our clone so the socket really closes (RST with linger 0).
                                s2.clients.lock().unwrap().remove(&id);
                            });
                }
            })
            .expect("spawn proxy acceptor");
        Proxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Replaces the armed faults.
    pub fn set_faults(&self, f: Faults) {
        *self.shared.faults.lock().unwrap() = Arc::new(Armed::from(f));
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// URL of `name` through the proxy.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, name)
    }
    /// Every exchange so far.
    pub fn log(&self) -> Vec<Exchange> {
        self.shared.log.lock().unwrap().clone()
    }
    /// Forgets the log and the byte count.
    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
        self.shared.body_bytes.store(0, Ordering::SeqCst);
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.next_conn.load(Ordering::SeqCst)
    }
    /// Body bytes forwarded to clients so far.
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }
    /// The most requests in flight at once (read from a client, their answer not yet begun)
    /// since the start or the last [`Proxy::reset_peak_in_flight`].
    pub fn peak_in_flight(&self) -> usize {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }
    /// The most GETs of a range not starting at byte 0 (reads of tensor data, not of headers)
    /// in flight at once since the start or the last [`Proxy::reset_peak_in_flight`].
    pub fn peak_data_reads_in_flight(&self) -> usize {
        self.shared.peak_data_in_flight.load(Ordering::SeqCst)
    }
    /// The requests (method, path) whose client closed its connection while the gate
    /// ([`Faults::gate`]) held them: the client gave up waiting for the answer.
    pub fn hung_up_while_gated(&self) -> Vec<(String, String)> {
        self.shared.gated_hang_ups.lock().unwrap().clone()
    }
    /// Starts [`Proxy::peak_in_flight`] and [`Proxy::peak_data_reads_in_flight`] again from the
    /// requests in flight now.
    pub fn reset_peak_in_flight(&self) {
        let now = self.shared.in_flight.load(Ordering::SeqCst);
        self.shared.peak_in_flight.store(now, Ordering::SeqCst);
        let now = self.shared.data_in_flight.load(Ordering::SeqCst);
        self.shared.peak_data_in_flight.store(now, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for (_, c) in self.shared.clients.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Reads an HTTP head (up to the empty line). `None` at a clean EOF.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        let l = line.trim_end_matches(['\r', '\n']).to_string();
        if l.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(l);
        if lines.len() > 200 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// `bytes A-B/TOTAL` → (A, B, TOTAL as written).
fn content_range_parts(v: &str) -> Option<(u64, u64, String)> {
    let r = v.trim().strip_prefix("bytes ")?;
    let (range, total) = r.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.to_string()))
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn head_bytes(lines: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn pause(shared: &Shared, d: Duration) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() && !shared.stop.load(Ordering::SeqCst) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}

/// Watches a connection whose request the gate holds, on a thread of its own: a client that
/// closes the connection (or resets it) before [`GateWatch::released`] is noted in
/// `gated_hang_ups`. The thread looks at the client's side (without taking its bytes) every
/// 10 ms, with a read timeout set on the socket for the hold (nothing else reads it meanwhile:
/// the request's thread is in the gate); `released` ends the thread and puts the socket's
/// timeout back, so that nothing but the request's thread holds the connection afterwards.
struct GateWatch {
    state: Arc<std::sync::atomic::AtomicU8>,
    thread: JoinHandle<()>,
    sock: TcpStream,
    timeout_before: Option<Duration>,
}

impl GateWatch {
    const HELD: u8 = 0;
    const RELEASED: u8 = 1;
    const HUNG_UP: u8 = 2;

    fn start(
        client: &TcpStream,
        shared: &Arc<Shared>,
        method: &str,
        path: &str,
    ) -> std::io::Result<GateWatch> {
        let state = Arc::new(std::sync::atomic::AtomicU8::new(Self::HELD));
        let sock = client.try_clone()?;
        let timeout_before = sock.read_timeout()?;
        sock.set_read_timeout(Some(Duration::from_millis(10)))?;
        let (st, shared, watched) = (state.clone(), shared.clone(), sock.try_clone()?);
        let what = (method.to_string(), path.to_string());
        let thread = std::thread::Builder::new()
            .name("proxy-gate-watch".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                while st.load(Ordering::SeqCst) == Self::HELD {
                    let gone = match watched.peek(&mut b) {
                        Ok(0) => true,
                        // More bytes from the client: not a hang-up.
                        Ok(_) => return,
                        Err(e) => !matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted
                                | std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                        ),
                    };
                    if gone {
                        if st
                            .compare_exchange(
                                Self::HELD,
                                Self::HUNG_UP,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            )
                            .is_ok()
                        {
                            shared.gated_hang_ups.lock().unwrap().push(what);
                        }
                        return;
                    }
                }
            })?;
        Ok(GateWatch {
            state,
            thread,
            sock,
            timeout_before,
        })
    }

    /// The gate returned: whether the client was still there (it hung up otherwise). Ends the
    /// watch (its thread, the socket's read timeout).
    fn released(self) -> std::io::Result<bool> {
        let there = self
            .state
            .compare_exchange(
                Self::HELD,
                Self::RELEASED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        let _ = self.thread.join();
        self.sock.set_read_timeout(self.timeout_before)?;
        Ok(there)
    }
}

fn handle(client: TcpStream, shared: &Arc<Shared>, conn: u64) -> std::io::Result<()> {
    let mut client_r = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        let Some(mut req) = read_head(&mut client_r)? else {
            return Ok(());
        };
        // Until its answer starts: a client that has its answer never finds it counted.
        let in_flight = InFlight::new(shared, is_data_read(&req));
        let armed = shared.faults.lock().unwrap().clone();
        let method = req[0].split(' ').next().unwrap_or("").to_string();
        let range = header(&req, "range").map(str::to_string);
        // Logs an answer the proxy makes up itself (a fault), before sending it, so that a client
        // that saw the answer finds it in the log.
        let log_answer = |status: u16| {
            shared.log.lock().unwrap().push(Exchange {
                method: method.clone(),
                range: range.clone(),
                status,
                content_range: None,
                body_bytes: 0,
                faulted: true,
                conn,
                request_headers: req[1..].to_vec(),
            })
        };
        if let Some(gate) = &armed.gate {
            let path = req[0].split(' ').nth(1).unwrap_or("");
            let watch = GateWatch::start(&client_w, shared, &method, path)?;
            let answer = gate(&method, path, range.as_deref());
            if !watch.released()? {
                // The client gave up on the request while it was held: nobody to answer.
                return Ok(());
            }
            if let Some(status) = answer {
                log_answer(status);
                let resp = format!("HTTP/1.1 {status} Gated\r\nContent-Length: 0\r\n\r\n");
                drop(in_flight);
                client_w.write_all(resp.as_bytes())?;
                continue;
            }
        }
        if take_one(&armed.hang_up_left) {
            // Logged before hanging up, so a client that saw the close finds it in the log.
            log_answer(0);
            drop(in_flight);
            return Ok(());
        }
        if take_one(&armed.unavailable_left) {
            // Logged before answering, so a client that saw the answer finds it in the log.
            log_answer(503);
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\n{}Content-Length: 0\r\n\r\n",
                armed.retry_after,
                if armed.unavailable_gzip {
                    "Content-Encoding: gzip\r\n"
                } else {
                    ""
                }
            );
            drop(in_flight);
            client_w.write_all(resp.as_bytes())?;
            continue;
        }
        let path = req[0].split(' ').nth(1).unwrap_or("").to_string();
        if let Some((prefix, to)) = &armed.redirect {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                log_answer(302);
                let resp = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {to}{rest}\r\nContent-Length: 0\r\n\r\n"
                );
                drop(in_flight);
                client_w.write_all(resp.as_bytes())?;
                continue;
            }
        }
        if take_one(&armed.error_left) {
            log_answer(armed.error_status);
            let head = format!(
                "HTTP/1.1 {} Boom\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
                armed.error_status, armed.error_bytes
            );
            drop(in_flight);
            client_w.write_all(head.as_bytes())?;
            let start =
                b"<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>\x1b[31mboom ";
            let mut piece = start.to_vec();
            piece.resize(64 << 10, b'A');
            let mut left = armed.error_bytes;
            let mut first = true;
            while left > 0 {
                let p = if first {
                    &piece[..]
                } else {
                    &piece[start.len()..]
                };
                first = false;
                let n = (p.len() as u64).min(left) as usize;
                if client_w.write_all(&p[..n]).is_err() {
                    return Ok(()); // the client hung up
                }
                left -= n as u64;
                shared.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            continue;
        }
        if armed.strip_range {
            req.retain(|l| {
                !l.split_once(':')
                    .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
            });
        }
        if let Some(d) = armed.delay {
            pause(shared, d);
        }
        if upstream.is_none() {
            let s = TcpStream::connect(shared.upstream)?;
            s.set_nodelay(true)?;
            let r = BufReader::with_capacity(256 << 10, s.try_clone()?);
            upstream = Some((s, r));
        }
        let Some((up_w, up_r)) = upstream.as_mut() else {
            return Ok(());
        };
        up_w.write_all(&head_bytes(&req))?;
        let Some(mut resp) = read_head(up_r)? else {
            return Ok(());
        };
        let drop_header = |resp: &mut Vec<String>, name: &str| {
            resp.retain(|l| {
                !l.split_once(':')
                    .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            })
        };
        if armed.strip_etag {
            drop_header(&mut resp, "etag");
        }
        if armed.strip_last_modified {
            drop_header(&mut resp, "last-modified");
        }
        if armed.weak_etag {
            for line in resp.iter_mut() {
                if let Some((k, v)) = line.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("etag") && !v.trim().starts_with("W/") {
                        *line = format!("ETag: W/{}", v.trim());
                    }
                }
            }
        }
        if armed.partial_as_200 && resp[0].split(' ').nth(1) == Some("206") {
            resp[0] = "HTTP/1.1 200 OK".to_string();
            drop_header(&mut resp, "content-range");
        }
        if let Some(d) = armed.shift_content_range {
            for line in resp.iter_mut() {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                if !k.trim().eq_ignore_ascii_case("content-range") {
                    continue;
                }
                if let Some((a, b, total)) = content_range_parts(v) {
                    *line = format!("Content-Range: bytes {}-{}/{total}", a + d, b + d);
                }
            }
        }
        let status: u16 = resp[0]
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if let (true, Some(n)) = (method == "HEAD", armed.head_length) {
            for line in resp.iter_mut() {
                if line.to_ascii_lowercase().starts_with("content-length:") {
                    *line = format!("Content-Length: {n}");
                }
            }
        }
        let mut shortened = false;
        if let (206, Some(max)) = (status, armed.shorten_206) {
            let cr = header(&resp, "content-range").and_then(content_range_parts);
            if let Some((a, b, total)) = cr {
                if b.saturating_sub(a).saturating_add(1) > max {
                    for line in resp.iter_mut() {
                        let k = line
                            .split_once(':')
                            .map(|(k, _)| k.trim().to_ascii_lowercase());
                        match k.as_deref() {
                            Some("content-range") => {
                                *line = format!("Content-Range: bytes {a}-{}/{total}", a + max - 1)
                            }
                            Some("content-length") => *line = format!("Content-Length: {max}"),
                            _ => {}
                        }
                    }
                    shortened = true;
                }
            }
        }
        let content_range = header(&resp, "content-range").map(str::to_string);
        let no_body = method == "HEAD" || status == 204 || status == 304 || status / 100 == 1;
        let body_len: Option<u64> = if no_body {
            Some(0)
        } else {
            header(&resp, "content-length").and_then(|v| v.parse().ok())
        };
        let close_after = header(&resp, "connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || body_len.is_none();
        // Decide this response's fault.
        let len = body_len.unwrap_or(u64::MAX);
        let reset_at =
            (len > armed.reset_bytes && take_one(&armed.reset_left)).then_some(armed.reset_bytes);
        let stall_at =
            (reset_at.is_none() && len > armed.stall_bytes && take_one(&armed.stall_left))
                .then_some(armed.stall_bytes);
        let cut_at = reset_at.or(stall_at);

        // Log the exchange before any body byte goes out, and count bytes before writing them,
        // so that a client that has its bytes always finds them in the log.
        let idx = {
            let mut log = shared.log.lock().unwrap();
            log.push(Exchange {
                method,
                range,
                status,
                content_range,
                body_bytes: 0,
                faulted: false,
                conn,
                request_headers: req[1..].to_vec(),
            });
            log.len() - 1
        };
        drop(in_flight);
        client_w.write_all(&head_bytes(&resp))?;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        let mut faulted = false;
        while sent < len {
            let mut want = ((len - sent).min(buf.len() as u64)) as usize;
            if let Some(c) = cut_at {
                if sent >= c {
                    faulted = true;
                    break;
                }
                want = want.min((c - sent) as usize);
            }
            if let Some((k, _)) = armed.trickle {
                want = want.min(k.max(1));
            }
            let n = up_r.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            if let Some(x) = shared.log.lock().unwrap().get_mut(idx) {
                x.body_bytes = sent;
                x.faulted = cut_at.is_some_and(|c| sent >= c) && sent < len;
            }
            shared.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
            let total = armed.bytes_since.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if total >= armed.replace_at {
                let hook = armed.hook.lock().unwrap().take();
                if let Some(h) = hook {
                    h();
                }
            }
            client_w.write_all(&buf[..n])?;
            if let Some((_, pause)) = armed.trickle {
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                std::thread::sleep(pause);
            }
        }
        if cut_at.is_some_and(|c| sent >= c) && sent < len {
            faulted = true;
        }
        if let Some(x) = shared.log.lock().unwrap().get_mut(idx) {
            x.faulted = faulted;
        }
        if faulted {
            if reset_at.is_some() {
                // Let the client take what was sent (an RST drops unread data), then reset.
                wait_until_read(&client_w);
                // Linger 0: closing the socket sends RST (the caller drops the last clone).
                let _ = socket2::SockRef::from(&client_w).set_linger(Some(Duration::ZERO));
            } else {
                pause(shared, armed.stall_pause);
                let _ = client_w.shutdown(Shutdown::Both);
            }
            return Ok(());
        }
        if shortened {
            // The rest of the server's answer is still on that connection: drop it.
            upstream = None;
        }
        if close_after {
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Waits (at most 5 s) until everything written to `sock` has been read by the client at the
/// other end: the proxy side's send queue and the client side's receive queue, both in
/// `/proc/net/tcp` (client and proxy run in this process), are empty. A fixed sleep instead
/// would depend on the client's thread being scheduled in time.
fn wait_until_read(sock: &TcpStream) {
    let (Ok(me), Ok(peer)) = (sock.local_addr(), sock.peer_addr()) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
            break;
        };
        let mut pending = 0u64;
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let (Some(l), Some(r), Some(q)) = (f.get(1), f.get(2), f.get(4)) else {
                continue;
            };
            let Some((tx, rx)) = q.split_once(':') else {
                continue;
            };
            let hex = |v: &str| u64::from_str_radix(v, 16).unwrap_or(0);
            if port(l) == Some(me.port()) && port(r) == Some(peer.port()) {
                pending += hex(tx);
            } else if port(l) == Some(peer.port()) && port(r) == Some(me.port()) {
                pending += hex(rx);
            }
        }
        if pending == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
