//! `nfs://host[:port]/export/path[?options]` parsing and the backend's knobs. Pure; unit-tested.
//!
//! Options (query string): `nconnect` (TCP connections, default 4), `rsize` (largest READ in
//! bytes, default 1 MiB, capped by the server's maxread), `uid`/`gid` (AUTH_SYS identity,
//! default the process's), `retry_for` (seconds a call that failed on a broken connection or a
//! busy server keeps being retried, default 60: long enough to ride out a server restart; while
//! the file is being opened at most 5 s, so a server that refuses connections fails after about
//! 5 s, one whose connect hangs after about 10, and one that accepts connections but never
//! replies after the request timeout and the 5 s of retries that follow) and
//! `retries` (most attempts after the first, default 1000). For copy-paste compatibility with
//! libnfs URLs, `version=4` and `nfsport=PORT` are accepted too.

use std::time::Duration;

use tensorstream_engine::{Error, Result};

use crate::OpenOptions;

/// Default NFS port.
pub const DEFAULT_PORT: u16 = 2049;
/// Default number of TCP connections.
pub const DEFAULT_NCONNECT: usize = 4;
/// Default cap on one READ.
pub const DEFAULT_RSIZE: usize = 1 << 20;
/// Smallest READ size accepted, from the user (`rsize`) or the server (`maxread`).
pub const MIN_RSIZE: usize = 4096;
/// Default reads in flight.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default preferred read (engine chunk) size.
pub const DEFAULT_CHUNK: usize = 4 << 20;
/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on attempts after the first (the time budget, [`DEFAULT_RETRY_FOR`], is what
/// usually ends the retries).
pub const DEFAULT_RETRIES: u32 = 1000;
/// Most `retries` accepted.
pub const MAX_RETRIES: u32 = 10_000;
/// Default time a failed call keeps being retried once the file is open.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(60);
/// Most `retry_for` accepted.
pub const MAX_RETRY_FOR: Duration = Duration::from_secs(3600);
/// Retry budget while the file is being opened (capped by `retry_for`): a wrong address or a
/// server that is down fails quickly instead of after a minute.
pub const OPEN_RETRY_FOR: Duration = Duration::from_secs(5);

/// Everything the NFS backend needs to know, parsed from the URI and [`OpenOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsConfig {
    /// Server host name or address (IPv6 without brackets).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Path components from the server's pseudo-root (`export`, `dir`, `file`), decoded.
    pub components: Vec<String>,
    /// TCP connections.
    pub nconnect: usize,
    /// Largest READ this client asks for (further capped by the server's maxread).
    pub rsize: usize,
    /// Reads in flight the backend advertises.
    pub concurrency: usize,
    /// Preferred read size the backend advertises.
    pub chunk: usize,
    /// Time without progress after which a connection is declared dead.
    pub timeout: Duration,
    /// Most attempts after the first one when a connection breaks or the server says "retry".
    pub retries: u32,
    /// How long one call keeps being retried, from its first failure.
    pub retry_for: Duration,
    /// AUTH_SYS user id.
    pub uid: u32,
    /// AUTH_SYS group id.
    pub gid: u32,
    /// AUTH_SYS machine name.
    pub machine: String,
}

impl NfsConfig {
    /// `host:port` for messages and connecting (IPv6 in brackets).
    pub fn peer(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn bad(uri: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("nfs: {msg}"))
        .with_backend("nfs")
        .with_location(uri)
}

fn decode_component(uri: &str, c: &str) -> Result<String> {
    let b = c.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(uri, format!("bad percent escape in path component {c:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out)
        .map_err(|_| bad(uri, format!("path component {c:?} is not UTF-8")))?;
    if s == "." || s == ".." {
        return Err(bad(uri, "path components \".\" and \"..\" are not allowed"));
    }
    if s.contains('\0') || s.contains('/') {
        return Err(bad(uri, format!("bad character in path component {s:?}")));
    }
    if s.len() > super::proto::MAX_NAME {
        return Err(bad(
            uri,
            format!("path component of {} bytes is too long", s.len()),
        ));
    }
    Ok(s)
}

fn num<T: std::str::FromStr>(uri: &str, key: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| bad(uri, format!("option {key}={v:?} is not a valid number")))
}

/// The process's user and group (from `/proc/self`), or nobody (65534) if unknown.
fn process_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self") {
        Ok(m) => (m.uid(), m.gid()),
        Err(_) => (65534, 65534),
    }
}

fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tensorstream".to_string())
}

/// Parses `uri` (scheme `nfs`) with `opts`.
pub fn parse(uri: &str, opts: &OpenOptions) -> Result<NfsConfig> {
    let rest = match uri.split_once("://") {
        Some((s, r)) if s.eq_ignore_ascii_case("nfs") => r,
        _ => return Err(bad(uri, "expected nfs://host[:port]/export/path")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(bad(
            uri,
            "user names in nfs:// URIs are not supported (use ?uid=&gid=)",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad(uri, "unterminated [IPv6] host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad(uri, "junk after [IPv6] host")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad(uri, "missing host"));
    }
    let mut port = match port {
        Some(p) => num::<u16>(uri, "port", p)?,
        None => DEFAULT_PORT,
    };
    let components = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| decode_component(uri, c))
        .collect::<Result<Vec<_>>>()?;
    if components.is_empty() {
        return Err(bad(uri, "missing path (nfs://host/export/file)"));
    }
    if components.len() > 255 {
        return Err(bad(uri, "path has too many components"));
    }
    let (uid, gid) = process_ids();
    let mut cfg = NfsConfig {
        host,
        port,
        components,
        nconnect: DEFAULT_NCONNECT,
        rsize: DEFAULT_RSIZE,
        concurrency: opts
            .concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .clamp(1, 1024),
        chunk: opts
            .chunk_size
            .unwrap_or(DEFAULT_CHUNK)
            .clamp(4096, 1 << 30),
        timeout: opts.timeout.unwrap_or(DEFAULT_TIMEOUT),
        retries: DEFAULT_RETRIES,
        retry_for: DEFAULT_RETRY_FOR,
        uid,
        gid,
        machine: machine_name(),
    };
    if cfg.timeout.is_zero() {
        return Err(bad(uri, "timeout must be positive"));
    }
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "nconnect" => {
                cfg.nconnect = num(uri, k, v)?;
                if !(1..=64).contains(&cfg.nconnect) {
                    return Err(bad(uri, "nconnect must be between 1 and 64"));
                }
            }
            "rsize" => {
                cfg.rsize = num(uri, k, v)?;
                if !(MIN_RSIZE..=(64 << 20)).contains(&cfg.rsize) {
                    return Err(bad(uri, "rsize must be between 4096 and 67108864"));
                }
            }
            "uid" => cfg.uid = num(uri, k, v)?,
            "gid" => cfg.gid = num(uri, k, v)?,
            "retries" => {
                cfg.retries = num(uri, k, v)?;
                if cfg.retries > MAX_RETRIES {
                    return Err(bad(uri, format!("retries must be at most {MAX_RETRIES}")));
                }
            }
            "retry_for" => {
                let secs: f64 = num(uri, k, v)?;
                cfg.retry_for = Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| *d <= MAX_RETRY_FOR)
                    .ok_or_else(|| {
                        bad(
                            uri,
                            format!(
                                "retry_for must be between 0 and {} seconds",
                                MAX_RETRY_FOR.as_secs()
                            ),
                        )
                    })?;
            }
            "nfsport" => port = num(uri, k, v)?,
            "version" => {
                if v != "4" {
                    return Err(Error::unsupported(format!(
                        "nfs: version={v}: this client speaks NFSv4.0 only"
                    ))
                    .with_backend("nfs")
                    .with_location(uri));
                }
            }
            other => {
                return Err(bad(
                    uri,
                    format!(
                        "unknown option {other:?} (known: nconnect, rsize, uid, gid, retries, \
                         retry_for, nfsport, version)"
                    ),
                ))
            }
        }
    }
    cfg.port = port;
    Ok(cfg)
}
