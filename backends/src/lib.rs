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

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tensorstream_engine::{Backend, BackendExt, Error, ObjectMeta, Result};

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
#[cfg(any(feature = "http", feature = "s3"))]
#[forbid(unsafe_code)]
pub(crate) mod shared;
#[cfg(any(feature = "http", feature = "s3"))]
#[forbid(unsafe_code)]
pub(crate) mod stop;
#[cfg(any(feature = "http", feature = "s3"))]
#[forbid(unsafe_code)]
pub(crate) mod tls;

/// The remote backends' rule for a server that trickles bytes (each gap shorter than the
/// timeout): a request for N bytes gets its timeout plus N at this rate (bytes per second);
/// cut there, its bytes are kept and the rest is asked for, but the cut counts as a failed
/// attempt, so that a slower server is given up on after a few cuts in a row...
#[cfg(any(feature = "http", feature = "s3", feature = "nfs"))]
pub(crate) const SLOWEST_RATE: u64 = 256 << 10;
/// ... and an answer that is merely shorter than asked (or broken off) counts as progress (is
/// continued rather than failed) only if it brought this many bytes. NFS applies both per
/// connection: bytes count as progress once they are this many and came at that rate or faster
/// since the connection began waiting, and a connection without progress for its timeout fails
/// (a reply is progress too, but not one to a READ continuing a shorter answer).
#[cfg(any(feature = "http", feature = "s3", feature = "nfs"))]
pub(crate) const PROGRESS_BYTES: usize = 64 << 10;

/// The HTTP and S3 backends' warning for an object served with neither ETag nor Last-Modified
/// (given once per backend).
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) fn warn_unversioned(location: &str) {
    log::warn!(
        "{location}: the server sends neither ETag nor Last-Modified, so a change of the object \
         during a load can only be seen if its size changes"
    );
}

/// For a failure that names a certificate (a server whose certificate the client does not
/// trust: a private CA, a self-signed test server): how to make it trusted. Such a failure is
/// not retried (retrying cannot make the certificate trusted).
///
/// Also for a server that answers a TLS handshake in plain text (rustls: "received corrupt
/// message of type InvalidContentType"), an `https://` URL or endpoint given for a plain HTTP
/// port: that will not change on a retry either, and rustls' words do not say it.
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) fn certificate_hint(msg: &str, s3: bool) -> Option<&'static str> {
    if msg.contains("InvalidContentType") {
        return Some(if s3 {
            "; the endpoint did not answer in TLS: if it serves plain HTTP, give an http:// \
             endpoint"
        } else {
            "; the server did not answer in TLS: if it serves plain HTTP, use an http:// URL"
        });
    }
    if !msg.to_ascii_lowercase().contains("certificate") {
        return None;
    }
    Some(if s3 {
        "; to trust a private CA, set AWS_CA_BUNDLE (added to the system's roots) or \
         SSL_CERT_FILE / SSL_CERT_DIR (used instead of them) to its PEM certificates"
    } else {
        "; to trust a private CA, set SSL_CERT_FILE / SSL_CERT_DIR to its PEM certificates \
         (used instead of the system's roots)"
    })
}

/// Runs `fut` until it ends or `cancel` is set (looked at every 25 ms): `None` when cancelled
/// (the future is dropped, and with it its requests and their connections).
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) async fn until_cancelled<F: std::future::Future>(
    cancel: Option<Arc<AtomicBool>>,
    fut: F,
) -> Option<F::Output> {
    let Some(flag) = cancel else {
        return Some(fut.await);
    };
    tokio::pin!(fut);
    loop {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
    }
}

/// Why a backend call stopped by [`OpenOptions::cancel`] failed.
#[cfg(any(feature = "http", feature = "s3", feature = "nfs"))]
pub(crate) const CALL_CANCELLED: &str = "stopped: the load was cancelled or its deadline passed";

/// The error of a backend call stopped by [`OpenOptions::cancel`].
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) fn call_cancelled(backend: &str, location: &str, what: &str) -> Error {
    Error::new(
        tensorstream_engine::ErrorKind::Cancelled,
        format!("{what} {CALL_CANCELLED}"),
    )
    .with_backend(backend)
    .with_location(location)
}

/// For a failure to connect: which proxy variables are set (HTTP and S3 requests go through
/// the proxy they name, so "cannot connect" may be about the proxy, not the server). Names
/// only: a proxy URL may hold credentials. `env` looks a variable up.
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) fn proxy_note(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set: Vec<&str> = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .filter(|v| env(v).is_some_and(|x| !x.trim().is_empty()))
    .collect();
    (!set.is_empty()).then(|| {
        format!(
            " (requests go through the proxy that {} names, except to the hosts NO_PROXY lists)",
            set.join(" / ")
        )
    })
}

/// The proxy variables that apply to requests of the scheme `https` tells (`HTTPS_PROXY` or
/// `HTTP_PROXY`, and `ALL_PROXY`) set to a value the HTTP client cannot use: `reqwest`
/// (hyper-util's matcher) skips such a value without a word and connects directly, so a
/// mistyped `HTTPS_PROXY` would bypass the proxy meant to carry every request. A variable of
/// the other scheme is not looked at (it would carry none of these requests), nor any for a
/// `host` that `NO_PROXY` (or `no_proxy`) exempts, whose requests go to it directly whatever
/// the proxy variables say, nor any where `REQUEST_METHOD` is set (a CGI program, where the
/// matcher uses no proxy at all). The checks are the matcher's: of `X_PROXY` and `x_proxy`
/// the first that is set counts; a value must parse as a URI with an authority, and a scheme,
/// if any, of http, https or socks4/4a/5/5h; `NO_PROXY` is asked of the matcher itself (a
/// comma-separated list of host names, each matching itself and its subdomains, with or
/// without a leading dot; IP addresses and CIDR ranges; `*` for every host). An error names
/// the variable, never its value (it may hold credentials).
#[cfg(any(feature = "http", feature = "s3"))]
pub(crate) fn check_proxy_env(
    env: &dyn Fn(&str) -> Option<String>,
    https: bool,
    host: &str,
) -> Result<()> {
    if env("REQUEST_METHOD").is_some() {
        return Ok(());
    }
    let scheme = if https {
        ["HTTPS_PROXY", "https_proxy"]
    } else {
        ["HTTP_PROXY", "http_proxy"]
    };
    let mut no_proxy = None;
    for [upper, lower] in [scheme, ["ALL_PROXY", "all_proxy"]] {
        let (name, value) = match (env(upper), env(lower)) {
            (Some(v), _) => (upper, v),
            (None, Some(v)) => (lower, v),
            (None, None) => continue,
        };
        if value.is_empty() {
            continue;
        }
        let usable = value.parse::<::http::Uri>().is_ok_and(|u| {
            u.authority().is_some()
                && u.scheme_str().is_none_or(|s| {
                    matches!(
                        s,
                        "http" | "https" | "socks4" | "socks4a" | "socks5" | "socks5h"
                    )
                })
        });
        if usable {
            continue;
        }
        let exempt = *no_proxy.get_or_insert_with(|| {
            let list = env("NO_PROXY").or_else(|| env("no_proxy"));
            list.is_some_and(|list| no_proxy_exempts(&list, https, host))
        });
        if !exempt {
            return Err(Error::invalid(format!(
                "{name} is set but is not a proxy URL the HTTP client can use (expected \
                 http://host:port, https://… or socks5://…; the value is not shown): requests \
                 would bypass the proxy; fix or unset it"
            )));
        }
    }
    Ok(())
}

/// Whether the `NO_PROXY` list `list` exempts requests to `host` (as a URI writes it: an IPv6
/// address in brackets) from the proxy, as the HTTP client's matcher decides: asked of the
/// matcher itself, given a stand-in proxy that it would otherwise use.
#[cfg(any(feature = "http", feature = "s3"))]
fn no_proxy_exempts(list: &str, https: bool, host: &str) -> bool {
    use hyper_util::client::proxy::matcher::Matcher;
    let scheme = if https { "https" } else { "http" };
    let Ok(dst) = format!("{scheme}://{host}/").parse::<::http::Uri>() else {
        return false;
    };
    let matcher = Matcher::builder()
        .all("http://proxy.invalid:3128")
        .no(list)
        .build();
    matcher.intercept(&dst).is_none()
}

/// Options shared by all backends; each backend reads the ones that concern it.
///
/// Its `Debug` output leaves out the headers' values (an `Authorization` token) and the
/// endpoint's user information and query.
#[derive(Clone, Default)]
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
    /// S3 requests without a signature, for public buckets: `Some(true)` = unsigned (no
    /// credentials looked up or sent), `Some(false)` = signed, `None` = `AWS_NO_SIGN_REQUEST`,
    /// else signed.
    pub s3_no_sign_request: Option<bool>,
    /// Per-request timeout for remote backends. `None`: backend default.
    pub timeout: Option<Duration>,
    /// Local I/O engine: `None` = `TENSORSTREAM_IO`, else automatic ([`IoMode::Auto`]).
    pub io_mode: Option<IoMode>,
    /// Local page-cache bypass: `Some(true)` = O_DIRECT where the filesystem allows it,
    /// `Some(false)` = buffered, `None` = `TENSORSTREAM_DIRECT` or automatic (O_DIRECT unless the
    /// file is already mostly in the page cache).
    pub direct_io: Option<bool>,
    /// Once set, the backend's own calls (HTTP, S3 and NFS: opening it, `stat`, `read_at`)
    /// stop within moments (25-100 ms) and fail with `Cancelled`, instead of running their
    /// timeouts and retries to the end: a load's cancel flag or deadline, so that an abandoned
    /// opening does not hold threads and connections for minutes. (Readers follow
    /// [`tensorstream_engine::ReaderOptions::cancel`].) Not used by the local backend, whose
    /// calls the kernel serves.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, _)| (name.as_str(), "…"))
            .collect();
        f.debug_struct("OpenOptions")
            .field("concurrency", &self.concurrency)
            .field("chunk_size", &self.chunk_size)
            .field("headers", &headers)
            .field("s3_endpoint", &self.s3_endpoint.as_deref().map(redact_uri))
            .field("s3_region", &self.s3_region)
            .field("s3_no_sign_request", &self.s3_no_sign_request)
            .field("timeout", &self.timeout)
            .field("io_mode", &self.io_mode)
            .field("direct_io", &self.direct_io)
            .field("cancel", &self.cancel)
            .finish()
    }
}

/// How the local backend does I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoMode {
    /// io_uring (O_DIRECT where possible, registered buffers).
    Uring,
    /// A thread pool of `pread` calls.
    Pread,
    /// Chosen per file: `pread` threads for a file already mostly in the page cache, io_uring
    /// otherwise (falling back to `pread` where the kernel refuses it). This is also what
    /// `None` means without `TENSORSTREAM_IO`; `Some(Auto)` asks for it whatever the variable
    /// says. A backend's resolved mode ([`local::LocalBackend::io_mode`]) is never `Auto`.
    Auto,
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

pub use tensorstream_engine::uri::{redact_uri, scheme_of};

/// The parsers that are private to their backend, for the fuzz targets in `backends/fuzz`
/// (built only by `cargo fuzz`, which sets `cfg(fuzzing)`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    #[cfg(feature = "nfs")]
    pub use crate::nfs::fuzz_replies as nfs_replies;
    #[cfg(any(feature = "http", feature = "s3"))]
    pub use crate::ranges::parse_content_range;
    #[cfg(feature = "s3")]
    pub use crate::ranges::{parse_range_request, partial_answer_problem};
}

/// The local path named by a plain path or a `file://` URI: `file:///abs/path` or
/// `file://localhost/abs/path` (no percent-decoding). `file://name/…` names a host, which is an
/// error rather than the relative path `name/…`; other schemes are an error too.
pub fn local_path(uri: &str) -> Result<&str> {
    match scheme_of(uri).as_deref() {
        None => Ok(uri),
        Some("file") => {
            let rest = &uri["file://".len()..];
            if rest.starts_with('/') {
                return Ok(rest);
            }
            if let Some(p) = rest
                .strip_prefix("localhost")
                .filter(|p| p.starts_with('/'))
            {
                return Ok(p);
            }
            let host = rest.split('/').next().unwrap_or(rest);
            // (Without its user information, as the URI is shown.)
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            Err(Error::invalid(format!(
                "{}: a file:// URI needs an absolute path (file:///path); {host:?} would be a \
                 host name",
                redact_uri(uri)
            )))
        }
        Some(other) => Err(Error::invalid(format!(
            "{uri}: a {other}:// URI is not a local path"
        ))),
    }
}

/// Opens the object at `uri` with the backend its scheme names.
pub fn open(uri: &str, opts: &OpenOptions) -> Result<Arc<dyn Backend>> {
    let scheme = scheme_of(uri);
    match scheme.as_deref() {
        None | Some("file") => open_local(local_path(uri)?, opts),
        #[cfg(feature = "nfs")]
        Some("nfs") => Ok(Arc::new(nfs::NfsBackend::open(uri, opts)?)),
        #[cfg(feature = "s3")]
        Some("s3") => Ok(Arc::new(s3::S3Backend::open(uri, opts)?)),
        #[cfg(feature = "http")]
        Some("http") | Some("https") => Ok(Arc::new(http::HttpBackend::open(uri, opts)?)),
        Some(other) => Err(Error::unsupported(format!(
            "{}: unsupported URI scheme {other:?} (this build knows: file paths{})",
            redact_uri(uri),
            compiled_schemes()
        ))),
    }
}

/// [`open`], then the object's size and version ([`Backend::stat`], its errors located): the
/// opening of a read. A backend whose opening already asked the server for them answers from that
/// request instead of making the same one again moments later: HTTP(S), whose opening sends the
/// HEAD that checks the object and the server's range support (`http::HttpBackend::open`),
/// so an HTTP object opened this way costs one HEAD, not two; and NFS, whose opening's
/// request (`nfs::NfsBackend::open`) ends with the file's GETATTR: one request, not two.
pub fn open_stat(uri: &str, opts: &OpenOptions) -> Result<(Arc<dyn Backend>, ObjectMeta)> {
    #[cfg(feature = "http")]
    if matches!(scheme_of(uri).as_deref(), Some("http") | Some("https")) {
        let be = http::HttpBackend::open(uri, opts)?;
        let meta = be.last_seen();
        return Ok((Arc::new(be), meta));
    }
    #[cfg(feature = "nfs")]
    if scheme_of(uri).as_deref() == Some("nfs") {
        let be = nfs::NfsBackend::open(uri, opts)?;
        let meta = be.last_seen();
        return Ok((Arc::new(be), meta));
    }
    let be = open(uri, opts)?;
    let meta = be.stat_located()?;
    Ok((be, meta))
}

/// The opening of a read of an object whose size and version `meta` a recent [`open_stat`] of
/// the same URI gave (the check of a sharded checkpoint, before its shards load): a backend
/// opened without a request, its reads pinned to `meta`, where the backend's reads carry that
/// version's precondition, so that an object replaced since fails its first read with
/// `ObjectChanged` (and one replaced during the load fails the load's last `stat`, as always).
/// That is HTTP(S) with a strong ETag or a Last-Modified date
/// (`http::HttpBackend::open_pinned`), S3 with a version (`s3::S3Backend::open_pinned`), and
/// NFS, whose version tag holds the file handle the reads go to and the change attribute each
/// READ's GETATTR is compared with (`nfs::NfsBackend::open_pinned`).
/// `None` otherwise (no version, a weak HTTP ETag, local files): open those with
/// [`open_stat`], whose `stat` is what tells a replaced object there.
#[cfg_attr(
    not(any(feature = "http", feature = "s3", feature = "nfs")),
    allow(unused_variables)
)]
pub fn open_pinned(
    uri: &str,
    opts: &OpenOptions,
    meta: &ObjectMeta,
) -> Result<Option<Arc<dyn Backend>>> {
    match scheme_of(uri).as_deref() {
        #[cfg(feature = "http")]
        Some("http") | Some("https") if http::HttpBackend::pins_whole(meta) => Ok(Some(Arc::new(
            http::HttpBackend::open_pinned(uri, opts, meta)?,
        ))),
        #[cfg(feature = "s3")]
        Some("s3") if meta.version.is_some() => {
            Ok(Some(Arc::new(s3::S3Backend::open_pinned(uri, opts, meta)?)))
        }
        #[cfg(feature = "nfs")]
        Some("nfs") if nfs::NfsBackend::pins(meta) => Ok(Some(Arc::new(
            nfs::NfsBackend::open_pinned(uri, opts, meta)?,
        ))),
        _ => Ok(None),
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

#[cfg(test)]
mod uri_tests {
    use super::{local_path, scheme_of};

    #[test]
    fn schemes_and_local_paths() {
        assert_eq!(scheme_of("S3://b/k").as_deref(), Some("s3"));
        assert_eq!(scheme_of("/data/a://b"), None, "a path with :// inside");
        assert_eq!(scheme_of("relative/x"), None);
        assert_eq!(local_path("/abs/p").unwrap(), "/abs/p");
        assert_eq!(local_path("rel/p").unwrap(), "rel/p");
        assert_eq!(local_path("file:///abs/p").unwrap(), "/abs/p");
        assert_eq!(local_path("FILE:///abs/p").unwrap(), "/abs/p");
        assert_eq!(local_path("file://localhost/abs/p").unwrap(), "/abs/p");
        let e = local_path("file://host/p").unwrap_err();
        assert!(
            e.to_string().contains("\"host\" would be a host name"),
            "{e}"
        );
        let e = local_path("file://user:s3cret@host/p")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("s3cret") && e.contains("\"host\" would be a host name"),
            "{e}"
        );
        assert!(local_path("file://localhostx/p").is_err());
        assert!(local_path("s3://b/k").is_err());
    }
}

#[cfg(test)]
mod debug_tests {
    use super::OpenOptions;

    /// An environment made of `pairs` (name, value), as the proxy checks read one.
    #[cfg(any(feature = "http", feature = "s3"))]
    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[cfg(any(feature = "http", feature = "s3"))]
    #[test]
    fn unusable_proxy_variables_are_refused_by_name() {
        for https in [false, true] {
            for ok in [
                &[][..],
                &[("HTTPS_PROXY", "http://u:p@proxy:3128")],
                &[("HTTP_PROXY", "proxy:3128")],
                &[("all_proxy", "socks5h://p:1")],
                &[("HTTPS_PROXY", "")],
            ] {
                assert!(
                    super::check_proxy_env(&env_of(ok), https, "example.com").is_ok(),
                    "{ok:?}"
                );
            }
        }
        // (https, variables, the one named): a variable of the other scheme carries none of
        // the requests and is not looked at.
        for (https, bad, name) in [
            (
                false,
                &[("HTTP_PROXY", "http://u:s3cret@bad host:1")][..],
                Some("HTTP_PROXY"),
            ),
            (true, &[("HTTP_PROXY", "http://u:s3cret@bad host:1")], None),
            (
                true,
                &[("https_proxy", "ftp://s3cret@p:1")],
                Some("https_proxy"),
            ),
            (false, &[("https_proxy", "ftp://s3cret@p:1")], None),
            (false, &[("ALL_PROXY", "http://")], Some("ALL_PROXY")),
            (true, &[("ALL_PROXY", "http://")], Some("ALL_PROXY")),
        ] {
            let r = super::check_proxy_env(&env_of(bad), https, "example.com");
            let Some(name) = name else {
                assert!(r.is_ok(), "https {https}, {bad:?}: {r:?}");
                continue;
            };
            let e = r.unwrap_err().to_string();
            assert!(e.contains(name) && !e.contains("s3cret"), "{bad:?}: {e}");
        }
    }

    /// An unusable proxy variable is not refused for a host that NO_PROXY (or no_proxy)
    /// exempts, as the HTTP client's matcher reads it: its requests go there directly.
    #[cfg(any(feature = "http", feature = "s3"))]
    #[test]
    fn an_unusable_proxy_variable_is_not_refused_for_a_host_no_proxy_exempts() {
        let bad = "http://u:s3cret@bad host:1";
        // (NO_PROXY, host, exempt)
        for (no, host, exempt) in [
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("10.0.0.0/8, example.com", "10.1.2.3", true),
            ("10.0.0.0/8", "11.1.2.3", false),
            ("::1", "[::1]", true),
            ("example.com", "example.com", true),
            ("example.com", "s3.example.com", true),
            ("example.com", "S3.EXAMPLE.COM", true),
            (".example.com", "s3.example.com", true),
            ("example.com", "notexample.com", false),
            ("other.org,example.com", "a.example.com", true),
            (" other.org , example.com ", "a.example.com", true),
            ("*", "anything.at.all", true),
            ("*.example.com", "a.example.com", false),
            ("", "example.com", false),
        ] {
            for (var, https) in [("HTTP_PROXY", false), ("https_proxy", true)] {
                for no_var in ["NO_PROXY", "no_proxy"] {
                    let vars = [(var, bad), (no_var, no)];
                    let r = super::check_proxy_env(&env_of(&vars), https, host);
                    assert_eq!(r.is_ok(), exempt, "{var}, {no_var}={no:?}, {host}: {r:?}");
                }
            }
        }
        // NO_PROXY counts before no_proxy, as for the matcher.
        let vars = [
            ("HTTP_PROXY", bad),
            ("NO_PROXY", "other.org"),
            ("no_proxy", "*"),
        ];
        assert!(super::check_proxy_env(&env_of(&vars), false, "example.com").is_err());
        // A CGI program (REQUEST_METHOD set): the matcher uses no proxy at all.
        let vars = [("ALL_PROXY", bad), ("REQUEST_METHOD", "GET")];
        assert!(super::check_proxy_env(&env_of(&vars), true, "example.com").is_ok());
    }

    #[cfg(any(feature = "http", feature = "s3"))]
    #[test]
    fn a_connect_failure_names_the_proxy_variables_set_not_their_values() {
        assert_eq!(super::proxy_note(&env_of(&[("NO_PROXY", "h")])), None);
        assert_eq!(super::proxy_note(&env_of(&[("HTTPS_PROXY", " ")])), None);
        let note = super::proxy_note(&env_of(&[
            ("HTTPS_PROXY", "http://u:s3cret@proxy:3128"),
            ("all_proxy", "socks5://p:1"),
        ]))
        .unwrap();
        assert!(note.contains("HTTPS_PROXY / all_proxy"), "{note}");
        assert!(
            !note.contains("s3cret") && !note.contains("proxy:3128"),
            "{note}"
        );
    }

    #[test]
    fn open_options_debug_leaves_secrets_out() {
        let o = OpenOptions {
            headers: vec![("Authorization".into(), "Bearer s3cret-token".into())],
            s3_endpoint: Some("https://u:s3cret@h:9000/?sig=s3cret".into()),
            chunk_size: Some(4096),
            ..Default::default()
        };
        let shown = format!("{o:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("Authorization") && shown.contains("https://h:9000/?…"),
            "{shown}"
        );
        assert!(shown.contains("chunk_size: Some(4096)"), "{shown}");
    }
}
