//! The http backend against a real nginx (started by the test on 127.0.0.1), directly and through
//! a fault-injecting proxy. Every fault must end with the right bytes or a clear error.
#![cfg(feature = "http")]

mod support;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::nginx::{free_port, Nginx, TestPki};
use support::proxy::{Faults, Proxy};
use tensorstream_backends::http::{HttpBackend, HttpConfig};
use tensorstream_backends::{open, OpenOptions};
use tensorstream_engine::format::read_index;
use tensorstream_engine::format::safetensors::write_header;
use tensorstream_engine::testkit::pattern;
use tensorstream_engine::testkit::{run_all, Fixture};
use tensorstream_engine::{
    execute, plan, Backend, DType, EngineOptions, EngineStats, ErrorKind, HostModel, HostSink,
    IoBuf, PlanOptions, ReadRequest, ReaderOptions, Result,
};

// ------------------------------------------------------------------------------------------------
// helpers

/// A safetensors image with U8 tensors of the given sizes; returns it and each tensor's range.
fn safetensors(sizes: &[(&str, usize)], seed: u64) -> (Vec<u8>, Vec<Range<u64>>) {
    let list: Vec<(String, DType, Vec<u64>, u64)> = sizes
        .iter()
        .map(|(n, s)| (n.to_string(), DType::U8, vec![*s as u64], *s as u64))
        .collect();
    let mut img = write_header(&list, &BTreeMap::new()).expect("header");
    let mut ranges = Vec::new();
    for (i, (_, s)) in sizes.iter().enumerate() {
        let start = img.len() as u64;
        img.extend_from_slice(&pattern(*s, seed.wrapping_add(i as u64 + 1)));
        ranges.push(start..img.len() as u64);
    }
    (img, ranges)
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write served file");
    p
}

/// Prepares a replacement for a served file (different bytes, an mtime an hour later so nginx's
/// ETag changes) and returns the hook that swaps it in atomically (a rename: instant, so the
/// other connections see the new version from their next request on).
fn replacement(path: &Path, data: &[u8]) -> impl FnOnce() + Send + 'static {
    let tmp = path.with_extension("replacing");
    std::fs::write(&tmp, data).expect("write replacement");
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    f.set_modified(later).unwrap();
    drop(f);
    let path = path.to_path_buf();
    move || std::fs::rename(&tmp, &path).expect("rename replacement")
}

fn opts(concurrency: usize, chunk: usize) -> OpenOptions {
    OpenOptions {
        concurrency: Some(concurrency),
        chunk_size: Some(chunk),
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    }
}

/// Loads tensors (`selected`: indices; `None` = all) through plan → execute → HostSink.
fn load(
    backend: Arc<dyn Backend>,
    selected: Option<Vec<usize>>,
) -> Result<(HostModel, EngineStats)> {
    let meta = backend.stat()?;
    let index = read_index(&*backend, &meta)?;
    let caps = backend.capabilities();
    let sel = selected.unwrap_or_else(|| (0..index.tensors.len()).collect());
    let mut po = PlanOptions::new(meta.size);
    po.chunk_size = caps.preferred_chunk as u64;
    po.alignment = caps.alignment as u64;
    let p = Arc::new(plan(&index, &sel, &po)?);
    let eo = EngineOptions {
        queue_depth: caps.max_concurrency,
        ..Default::default()
    };
    let (sink, stats) = execute(backend, &meta, p.clone(), HostSink::new(), &eo)?;
    let (arena, _) = sink.into_parts()?;
    Ok((HostModel::new(arena, index, &p)?, stats))
}

fn assert_tensors(model: &HostModel, img: &[u8], names: &[&str], ranges: &[Range<u64>]) {
    for (n, r) in names.iter().zip(ranges) {
        let t = model.get(n).unwrap_or_else(|| panic!("tensor {n} missing"));
        assert!(
            t.data == &img[r.start as usize..r.end as usize],
            "tensor {n}: bytes differ from the served file"
        );
    }
}

fn served_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

// ------------------------------------------------------------------------------------------------
// conformance + direct checks

struct NginxFixture {
    dir: tempfile::TempDir,
    nginx: Nginx,
}

impl Fixture for NginxFixture {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        write_file(self.dir.path(), name, data);
        open(&self.nginx.url(name), &opts(8, 1 << 20))
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        open(&self.nginx.url(name), &opts(8, 1 << 20))
    }
    /// Rewrites the served file in place with its mtime a second past the old one: nginx's ETag
    /// (mtime and size, in seconds) changes even for a rewrite of the same size.
    fn overwrite(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.dir.path().join(name);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        write_file(self.dir.path(), name, data);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(before + Duration::from_secs(1)).unwrap();
        Ok(())
    }
}

#[test]
fn conformance_suite_against_nginx() {
    let dir = served_dir();
    let nginx = Nginx::start(dir.path());
    run_all(&NginxFixture { dir, nginx });
}

#[test]
fn stat_reads_and_reader_against_nginx() {
    let dir = served_dir();
    let data = pattern(3 * 1024 * 1024 + 123, 7);
    write_file(dir.path(), "obj.bin", &data);
    write_file(dir.path(), "empty.bin", b"");
    let nginx = Nginx::start(dir.path());

    // Small chunks so large reads are split and run concurrently.
    let b = Arc::new(HttpBackend::open(&nginx.url("obj.bin"), &opts(4, 256 * 1024)).unwrap());
    let meta = b.stat().unwrap();
    assert_eq!(meta.size, data.len() as u64);
    let v = meta.version.clone().expect("nginx sends an ETag");
    assert!(v.starts_with('"') && v.ends_with('"'), "ETag {v}");
    let caps = b.capabilities();
    assert_eq!(caps.kind, "http");
    assert!(caps.ranged_reads && !caps.direct_io);
    assert_eq!(
        (caps.alignment, caps.preferred_chunk, caps.max_concurrency),
        (1, 256 * 1024, 4)
    );
    assert_eq!(b.location(), nginx.url("obj.bin"));

    let n = data.len() as u64;
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (0, 8),
        (1, 100_000),
        (777, 1_000_000), // spans several chunks
        (0, data.len()),  // whole object, 13 chunks
        (n - 10, 10),
        (n - 10, 4096), // runs past the end: short
        (n, 16),        // at the end: 0
    ];
    for &(off, len) in cases {
        let mut buf = vec![0xAAu8; len];
        let got = b.read_at(off, &mut buf).unwrap();
        let end = (off + len as u64).min(n);
        assert_eq!(got as u64, end - off, "read_at({off}, {len})");
        assert!(
            buf[..got] == data[off as usize..end as usize],
            "bytes of read_at({off}, {len})"
        );
    }
    let e = b.read_at(n + 1, &mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RangeNotSatisfiable, "{e}");
    assert_eq!(e.backend(), Some("http"));
    assert_eq!(e.range(), Some(n + 1..n + 5));

    // The reader: many reads in flight (more than the concurrency), any completion order.
    let mut r = b
        .clone()
        .open_reader(&meta, &ReaderOptions::new(16))
        .unwrap();
    let piece = 100_003usize;
    let mut expected = BTreeMap::new();
    let mut id = 0u64;
    let mut off = 0u64;
    while off < n {
        let buf = IoBuf::aligned(piece, 64).unwrap();
        r.submit(ReadRequest {
            id,
            offset: off,
            buf,
        })
        .unwrap();
        expected.insert(id, off);
        id += 1;
        off += piece as u64;
    }
    assert_eq!(r.in_flight(), expected.len());
    let mut seen = 0;
    while r.in_flight() > 0 {
        let d = r.wait().unwrap();
        let off = expected[&d.id];
        assert_eq!(d.offset, off);
        let got = d.result.unwrap();
        let end = (off + piece as u64).min(n);
        assert_eq!(got as u64, end - off);
        assert!(
            d.buf.as_slice()[..got] == data[off as usize..end as usize],
            "reader bytes at {off}"
        );
        seen += 1;
    }
    assert_eq!(seen, expected.len());
    assert!(
        r.wait().is_err(),
        "wait with nothing in flight must fail, not block"
    );

    // Empty object.
    let e = HttpBackend::open(&nginx.url("empty.bin"), &opts(2, 1024)).unwrap();
    assert_eq!(e.stat().unwrap().size, 0);
    assert_eq!(e.read_at(0, &mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn loads_64mib_safetensors_through_engine() {
    let dir = served_dir();
    let sizes: Vec<(String, usize)> = (0..10)
        .map(|i| (format!("layer.{i}.weight"), (7 << 20) + i * 4099))
        .collect();
    let sz: Vec<(&str, usize)> = sizes.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let (img, ranges) = safetensors(&sz, 11);
    assert!(img.len() >= 64 << 20);
    write_file(dir.path(), "model.safetensors", &img);
    let nginx = Nginx::start(dir.path());
    let b = open(&nginx.url("model.safetensors"), &OpenOptions::default()).unwrap();
    let (model, stats) = load(b, None).unwrap();
    assert_eq!(model.len(), sizes.len());
    let names: Vec<&str> = sz.iter().map(|(n, _)| *n).collect();
    assert_tensors(&model, &img, &names, &ranges);
    assert!(stats.bytes_read >= ranges.iter().map(|r| r.end - r.start).sum::<u64>());
}

#[test]
fn not_found_denied_and_auth_headers() {
    let dir = served_dir();
    std::fs::create_dir_all(dir.path().join("secret")).unwrap();
    std::fs::create_dir_all(dir.path().join("auth")).unwrap();
    write_file(dir.path(), "secret/x.bin", b"nope");
    write_file(dir.path(), "auth/x.bin", &pattern(5000, 3));
    let nginx = Nginx::start_with(
        dir.path(),
        r#"location /secret/ { return 403; }
           location /auth/ { if ($http_authorization != "Bearer s3cret") { return 401; } }"#,
    );

    let e = open(
        &nginx.url("missing.bin?token=SECRET123"),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(e.backend(), Some("http"));
    let shown = format!("{e} {e:?}");
    assert!(shown.contains("/missing.bin"), "{shown}");
    assert!(!shown.contains("SECRET123"), "query secret leaked: {shown}");

    let e = open(&nginx.url("secret/x.bin"), &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    let e = open(&nginx.url("auth/x.bin"), &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    // The hint names the library's way to send a header too, not only the CLI flag.
    assert!(e.to_string().contains("OpenOptions::headers"), "{e}");
    assert!(e.to_string().contains("--header"), "{e}");
    let with_auth = OpenOptions {
        headers: vec![("Authorization".into(), "Bearer s3cret".into())],
        ..Default::default()
    };
    let b = open(&nginx.url("auth/x.bin"), &with_auth).unwrap();
    let mut buf = vec![0u8; 5000];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), 5000);
    assert_eq!(buf, pattern(5000, 3));
}

#[test]
fn server_without_ranges_is_refused() {
    let dir = served_dir();
    std::fs::create_dir_all(dir.path().join("norange")).unwrap();
    write_file(dir.path(), "norange/x.bin", &pattern(10_000, 1));
    let nginx = Nginx::start_with(dir.path(), "location /norange/ { max_ranges 0; }");
    let e = open(&nginx.url("norange/x.bin"), &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("range"), "{e}");
}

/// A cancel flag stops the opening (its HEAD) at a server that never answers: it returned
/// only after the request timeout and its retries (minutes), holding connections meanwhile.
#[test]
fn cancel_stops_the_opening_at_a_silent_server() {
    use std::time::Instant;
    let hole = support::blackhole::Blackhole::start();
    let (flag, setter) = support::blackhole::cancel_after(Duration::from_millis(300));
    let url = format!("{}/m.safetensors", hole.endpoint());
    let t = Instant::now();
    let e = open(
        &url,
        &OpenOptions {
            cancel: Some(flag),
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    setter.join().unwrap();
    let waited = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    assert!(waited < Duration::from_secs(3), "returned after {waited:?}");
    assert!(hole.accepted() > 0, "the HEAD never reached the server");
    assert!(
        hole.all_closed_within(Duration::from_secs(3)),
        "{} connection(s) still open after the cancel",
        hole.open()
    );
}

#[test]
fn server_down_fails_clearly_after_bounded_retries() {
    let port = free_port(); // nothing listens there
    let url = format!("http://127.0.0.1:{port}/model.safetensors");
    let e = open(&url, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.backend(), Some("http"));
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(
        e.is_retryable(),
        "a refused connection may work later: {e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(msg.contains("giving up after 6 attempts"), "{msg}");
    assert!(msg.contains(&url), "{msg}");
}

#[test]
fn https_with_http2_against_nginx() {
    let dir = served_dir();
    let data = pattern(3 << 20, 71);
    write_file(dir.path(), "x.bin", &data);
    let pki = TestPki::generate();
    let nginx = Nginx::start_tls(dir.path(), &pki);
    let url = nginx.url("x.bin");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // Not trusting the test CA: a clear, permanent TLS error (not retried), no bytes.
    let e = HttpBackend::open_with(&url, quick_cfg(4, 1 << 20, Duration::from_secs(10), 3))
        .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(e.to_string().contains("SSL_CERT_FILE"), "no hint: {e}");
    assert!(!e.is_retryable(), "{e:?}");
    assert!(
        !e.to_string().contains("giving up"),
        "certificate errors must not be retried: {e}"
    );

    let mut cfg = quick_cfg(8, 512 << 10, Duration::from_secs(10), 2);
    cfg.root_certificates_pem = vec![pki.ca_pem.clone().into_bytes()];
    let b = Arc::new(HttpBackend::open_with(&url, cfg).unwrap());
    let mut buf = vec![0u8; data.len()];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data, "bytes over https differ");
    assert_eq!(b.stat().unwrap().size, data.len() as u64);
    let log = nginx.access_log();
    let ranged = log
        .lines()
        .filter(|l| l.starts_with("HTTP/2.0 206"))
        .count();
    assert_eq!(
        ranged, 6,
        "six 512 KiB ranged GETs over HTTP/2 expected:\n{log}"
    );
    assert!(
        !log.contains("HTTP/1.1"),
        "HTTP/2 was offered but not used:\n{log}"
    );
}

// ------------------------------------------------------------------------------------------------
// faults through the proxy

struct Rig {
    dir: tempfile::TempDir,
    _nginx: Nginx,
    proxy: Proxy,
}

fn rig() -> Rig {
    let dir = served_dir();
    let nginx = Nginx::start(dir.path());
    let proxy = Proxy::start(nginx.addr());
    Rig {
        dir,
        _nginx: nginx,
        proxy,
    }
}

/// The trusted roots are built once per process and shared by the backends that trust the same
/// ones (see `tls.rs`): a private CA given to one backend must never be trusted by a backend
/// opened later without it, or with another CA, in the same process.
#[test]
fn a_private_ca_is_trusted_only_by_the_backends_given_it() {
    let dir = served_dir();
    let data = pattern(64 << 10, 73);
    write_file(dir.path(), "x.bin", &data);
    let pki = TestPki::generate();
    let other = TestPki::generate();
    let nginx = Nginx::start_tls(dir.path(), &pki);
    let url = nginx.url("x.bin");
    let cfg = |roots: &[&TestPki]| {
        let mut c = quick_cfg(2, 32 << 10, Duration::from_secs(10), 1);
        c.root_certificates_pem = roots
            .iter()
            .map(|p| p.ca_pem.clone().into_bytes())
            .collect();
        c
    };
    let refused = |c: HttpConfig, what: &str| {
        let e = HttpBackend::open_with(&url, c)
            .err()
            .unwrap_or_else(|| panic!("{what}: the private CA leaked into this backend's trust"));
        assert!(e.to_string().contains("certificate"), "{what}: {e}");
        assert!(!e.is_retryable(), "{what}: {e:?}");
    };
    let read_ok = |c: HttpConfig, what: &str| {
        let b = HttpBackend::open_with(&url, c).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut buf = vec![0u8; data.len()];
        assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len(), "{what}");
        assert!(buf == data, "{what}: bytes differ");
    };

    // Trusted first (its verifier is then cached), and kept by the backend while others open.
    let kept = HttpBackend::open_with(&url, cfg(&[&pki])).unwrap();
    refused(cfg(&[]), "no extra root, after a backend with the CA");
    refused(cfg(&[&other]), "another CA only");
    read_ok(cfg(&[&pki]), "the CA again (a cached verifier)");
    read_ok(cfg(&[&other, &pki]), "both CAs");
    refused(cfg(&[]), "no extra root, again");
    drop(kept);
    refused(cfg(&[]), "no extra root, the CA's backends gone");
    // Through the plain `open` (options from the environment) as well.
    let e = open(&url, &OpenOptions::default()).err();
    assert!(
        e.is_some_and(|e| e.to_string().contains("certificate")),
        "open() trusted the private CA"
    );
}

fn quick_cfg(concurrency: usize, chunk: usize, timeout: Duration, retries: u32) -> HttpConfig {
    HttpConfig {
        concurrency,
        chunk_size: chunk,
        timeout,
        max_retries: retries,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    }
}

#[test]
fn reset_mid_body_resumes_with_correct_bytes() {
    let r = rig();
    let (img, ranges) = safetensors(&[("a", 6 << 20), ("b", 5 << 20), ("c", 3 << 20)], 21);
    write_file(r.dir.path(), "m.safetensors", &img);
    let b = Arc::new(
        HttpBackend::open_with(
            &r.proxy.url("m.safetensors"),
            quick_cfg(4, 2 << 20, Duration::from_secs(10), 3),
        )
        .unwrap(),
    );
    // Cut the first 4 bodies longer than 300 000 bytes after 300 000 bytes.
    r.proxy.set_faults(Faults {
        reset_after: Some((300_000, 4)),
        ..Default::default()
    });
    r.proxy.clear_log();
    let (model, _) = load(b, None).unwrap();
    assert_tensors(&model, &img, &["a", "b", "c"], &ranges);

    let log = r.proxy.log();
    let cut: Vec<_> = log.iter().filter(|x| x.faulted).collect();
    assert_eq!(cut.len(), 4, "{log:#?}");
    // Each cut body was resumed from the byte where it stopped, not re-read from its start.
    for c in cut {
        let ans = c
            .answered_range()
            .expect("cut exchange had a Content-Range");
        let resume_at = ans.start + c.body_bytes;
        assert!(
            log.iter().any(|x| x
                .range
                .as_deref()
                .is_some_and(|rg| rg.starts_with(&format!("bytes={resume_at}-")))),
            "no request resumed at {resume_at}: {log:#?}"
        );
    }
}

#[test]
fn stall_past_timeout_is_retried_or_times_out() {
    let r = rig();
    let data = pattern(4 << 20, 5);
    write_file(r.dir.path(), "x.bin", &data);
    let timeout = Duration::from_millis(1500);

    // One stall: detected by the timeout, resumed, correct bytes.
    let b =
        HttpBackend::open_with(&r.proxy.url("x.bin"), quick_cfg(2, 1 << 20, timeout, 3)).unwrap();
    r.proxy.set_faults(Faults {
        stall_after: Some((100_000, Duration::from_secs(3), 1)),
        ..Default::default()
    });
    let mut buf = vec![0u8; data.len()];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data, "bytes after a stall differ");
    assert_eq!(r.proxy.log().iter().filter(|x| x.faulted).count(), 1);

    // Stalls every time: a Timeout error after the bounded retries.
    let b =
        HttpBackend::open_with(&r.proxy.url("x.bin"), quick_cfg(2, 1 << 20, timeout, 1)).unwrap();
    r.proxy.set_faults(Faults {
        stall_after: Some((0, Duration::from_secs(3), 1000)),
        ..Default::default()
    });
    let e = b.read_at(0, &mut vec![0u8; 1000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("stalled"), "{e}");
    assert_eq!(e.range(), Some(0..1000));
}

/// A redirect to another origin is followed, but the user's headers (credentials) stay with
/// the URL's own origin, and no `Referer` goes along.
#[test]
fn a_redirect_to_another_origin_keeps_the_users_headers_home() {
    let r = rig();
    let data = pattern(3 << 20, 9);
    write_file(r.dir.path(), "x.bin", &data);
    let other = Proxy::start(r._nginx.addr());
    r.proxy.set_faults(Faults {
        redirect: Some(("/r/".into(), format!("http://127.0.0.1:{}/", other.port()))),
        ..Default::default()
    });
    let mut cfg = quick_cfg(2, 1 << 20, Duration::from_secs(10), 2);
    cfg.headers = tensorstream_backends::http::config::parse_headers(&[
        ("X-Api-Key".into(), "key-123".into()),
        ("Authorization".into(), "Bearer tok-456".into()),
    ])
    .unwrap();
    let b = HttpBackend::open_with(&r.proxy.url("r/x.bin"), cfg).unwrap();
    let mut buf = vec![0u8; data.len()];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data, "bytes differ through the redirect");
    let has = |x: &support::proxy::Exchange, name: &str| {
        x.request_headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with(name))
    };
    let home = r.proxy.log();
    assert!(!home.is_empty() && home.iter().all(|x| x.status == 302));
    assert!(home
        .iter()
        .all(|x| has(x, "x-api-key:") && has(x, "authorization:")));
    let away = other.log();
    assert!(away.iter().any(|x| x.method == "GET"), "{away:?}");
    for x in &away {
        for h in ["x-api-key:", "authorization:", "referer:"] {
            assert!(
                !has(x, h),
                "{h} sent to the other origin: {:?}",
                x.request_headers
            );
        }
    }
}

/// Opens `r/x.bin` through a proxy that redirects every `/r/` request to itself (an endless
/// chain), each answer first passing `gate`, and returns the error.
fn open_endless_redirect_chain(
    r: &Rig,
    gate: Option<support::proxy::Gate>,
    cfg: HttpConfig,
) -> tensorstream_engine::Error {
    write_file(r.dir.path(), "x.bin", &pattern(1000, 1));
    r.proxy.set_faults(Faults {
        redirect: Some((
            "/r/".into(),
            format!("http://127.0.0.1:{}/r/", r.proxy.port()),
        )),
        gate,
        ..Default::default()
    });
    HttpBackend::open_with(&r.proxy.url("r/x.bin"), cfg).unwrap_err()
}

#[test]
fn a_redirect_loop_is_a_clear_error_without_retries() {
    let r = rig();
    let e = open_endless_redirect_chain(&r, None, quick_cfg(1, 1 << 20, Duration::from_secs(5), 3));
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("more than 5 redirects"), "{e}");
    assert_eq!(
        r.proxy.log().len(),
        6,
        "one request and five hops, no retry"
    );
}

/// The hops of a redirect chain share the request's timeout: a server taking 1 s over each
/// answer of an endless chain of redirects, with a 2.5 s timeout, fails with a `Timeout` before
/// the chain's end. (Each hop had a timeout of its own: the six answers came, 6 s in all, and the
/// chain failed as too long.)
#[test]
fn the_hops_of_a_redirect_chain_share_the_requests_timeout() {
    let r = rig();
    let slow: support::proxy::Gate = Arc::new(|_: &str, _: &str, _: Option<&str>| {
        std::thread::sleep(Duration::from_secs(1));
        None
    });
    let e = open_endless_redirect_chain(
        &r,
        Some(slow),
        quick_cfg(1, 1 << 20, Duration::from_millis(2500), 0),
    );
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("redirects followed)"), "{e}");
    let answered = r.proxy.log().len();
    assert!(answered < 6, "{answered} answers, the whole chain: {e}");
}

/// A read waiting out a long `Retry-After` is stopped at once when the load is cancelled (the
/// reader sees the flag) or abandoned (another read failed), not after all its retries.
#[test]
fn cancel_and_abandon_stop_reads_in_backoff() {
    for how in ["cancel", "abandon"] {
        let r = rig();
        write_file(r.dir.path(), "x.bin", &pattern(1 << 20, 3));
        let b = Arc::new(
            HttpBackend::open_with(
                &r.proxy.url("x.bin"),
                quick_cfg(2, 1 << 20, Duration::from_secs(5), 5),
            )
            .unwrap(),
        );
        let meta = b.stat().unwrap();
        r.proxy.clear_log();
        r.proxy.set_faults(Faults {
            unavailable: Some((1000, "20".into())),
            ..Default::default()
        });
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut o = tensorstream_engine::backend::ReaderOptions::new(2);
        o.cancel = Some(flag.clone());
        let mut reader = b.clone().open_reader(&meta, &o).unwrap();
        reader
            .submit(tensorstream_engine::backend::ReadRequest {
                id: 7,
                offset: 0,
                buf: tensorstream_engine::IoBuf::aligned(1 << 20, 1).unwrap(),
            })
            .unwrap();
        // Let the first 503 arrive, so that the read sits in its 20 s Retry-After.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.proxy.log().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !r.proxy.log().is_empty(),
            "{how}: no request reached the server in 10 s"
        );
        if how == "cancel" {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            reader.abandon();
        }
        let done = within(Duration::from_secs(10), move || {
            reader.wait().map(|d| (d.id, d.result))
        });
        let (id, result) = done.expect("wait gives the read back");
        assert_eq!(id, 7);
        let e = result.expect_err("the read was stopped");
        assert!(e.to_string().contains("stopped"), "{how}: {e}");
        assert_eq!(r.proxy.log().len(), 1, "{how}: no retry after the stop");
    }
}

/// A server (or gateway) that answers every ranged GET with a shorter range: the rest is asked
/// for, and the bytes are right.
#[test]
fn shorter_206_answers_are_continued() {
    let r = rig();
    let data = pattern(3 << 20, 4);
    write_file(r.dir.path(), "x.bin", &data);
    let b = HttpBackend::open_with(
        &r.proxy.url("x.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 2),
    )
    .unwrap();
    r.proxy.clear_log();
    r.proxy.set_faults(Faults {
        shorten_206: Some(300_000),
        ..Default::default()
    });
    let mut buf = vec![0u8; data.len()];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data, "bytes differ after short answers");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert!(gets >= 3 * 4, "{:?}", r.proxy.log());
}

#[test]
fn a_server_answering_a_few_bytes_at_a_time_is_given_up_on() {
    let r = rig();
    write_file(r.dir.path(), "x.bin", &pattern(1 << 20, 4));
    let b = HttpBackend::open_with(
        &r.proxy.url("x.bin"),
        quick_cfg(1, 1 << 20, Duration::from_secs(10), 3),
    )
    .unwrap();
    r.proxy.clear_log();
    // Every ranged GET answered with a 206 of 100 bytes: each is taken, but a million of them
    // for a megabyte is not progress.
    r.proxy.set_faults(Faults {
        shorten_206: Some(100),
        ..Default::default()
    });
    let e = within(Duration::from_secs(60), move || {
        b.read_at(0, &mut vec![0u8; 1 << 20]).unwrap_err()
    });
    assert!(e.to_string().contains("with under 65536 bytes each"), "{e}");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert!((4..10).contains(&gets), "{gets} GETs");
}

/// A HEAD giving another size than the GETs of the same version (same ETag) is the server's
/// inconsistency, reported as such: not "object changed, restart the load", which would fail
/// the same way every time.
#[test]
fn a_head_disagreeing_with_the_gets_is_named() {
    let r = rig();
    let data = pattern(1 << 20, 5);
    write_file(r.dir.path(), "x.bin", &data);
    r.proxy.set_faults(Faults {
        head_length: Some(900_000),
        ..Default::default()
    });
    let b = HttpBackend::open_with(
        &r.proxy.url("x.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 2),
    )
    .unwrap();
    let e = b.read_at(0, &mut vec![0u8; 4096]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("two sizes"), "{e}");
    assert!(
        e.to_string().contains("900000") && e.to_string().contains("1048576"),
        "{e}"
    );
}

/// Runs `f` on a thread and fails the test if it has not finished in `limit` (a hang guard, not
/// a performance check).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still running after {limit:?}"))
}

#[test]
fn a_trickling_server_is_cut_and_given_up_on() {
    let r = rig();
    let data = pattern(1 << 20, 6);
    write_file(r.dir.path(), "x.bin", &data);
    // 1000 bytes every 100 ms (10 kB/s): never a pause as long as the 3 s timeout. Each GET of
    // 1 MiB gets 3 s + 1 s at the slowest accepted 1 MiB/s, brings ~40 kB (no progress) and
    // counts as a failure: three attempts, then a Timeout error.
    r.proxy.set_faults(Faults {
        trickle: Some((1000, Duration::from_millis(100))),
        ..Default::default()
    });
    let cfg = HttpConfig {
        min_rate: 1 << 20,
        ..quick_cfg(1, 1 << 20, Duration::from_secs(3), 2)
    };
    let b = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg).unwrap();
    let e = within(Duration::from_secs(60), move || {
        b.read_at(0, &mut vec![0u8; 1 << 20]).unwrap_err()
    });
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("too slow"), "{e}");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert_eq!(gets, 3, "{:?}", r.proxy.log());
}

#[test]
fn a_slow_but_steady_server_finishes_by_resuming() {
    let r = rig();
    let data = pattern(2 << 20, 7);
    write_file(r.dir.path(), "x.bin", &data);
    // 16 KiB every 100 ms (~160 kB/s), below the accepted 1 MiB/s: each GET is cut after its
    // 3 s + 1 s, but brings more than 64 KiB, so it is resumed, not counted as a failure.
    r.proxy.set_faults(Faults {
        trickle: Some((16 << 10, Duration::from_millis(100))),
        ..Default::default()
    });
    let cfg = HttpConfig {
        min_rate: 1 << 20,
        ..quick_cfg(2, 1 << 20, Duration::from_secs(3), 2)
    };
    let b = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg).unwrap();
    let got = within(Duration::from_secs(120), move || {
        let mut buf = vec![0u8; 2 << 20];
        b.read_at(0, &mut buf).map(|n| (n, buf))
    });
    let (n, buf) = got.expect("a slow server is resumed, not given up on");
    assert_eq!(n, data.len());
    assert!(buf == data, "bytes differ after resumes");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert!(gets > 2, "no GET was cut and resumed: {:?}", r.proxy.log());
}

#[test]
fn a_server_slower_than_min_rate_is_given_up_on_even_when_each_cut_brings_much() {
    let r = rig();
    let data = pattern(4 << 20, 9);
    write_file(r.dir.path(), "x.bin", &data);
    // 8 KiB every 100 ms (~80 kB/s) against an accepted 1 MiB/s: each GET of what is left of
    // 4 MiB gets 3 s + up to 4 s, brings about 0.5 MB (well over the 64 KiB that count as
    // progress for a merely short answer) and is cut. Cuts for slowness count as failures
    // whatever they bring, so after 1 + 2 retries the range is given up on: a trickle cannot
    // hold a load for hours by bringing a little each time (it did: each cut reset the count).
    r.proxy.set_faults(Faults {
        trickle: Some((8 << 10, Duration::from_millis(100))),
        ..Default::default()
    });
    let cfg = HttpConfig {
        min_rate: 1 << 20,
        ..quick_cfg(1, 4 << 20, Duration::from_secs(3), 2)
    };
    let b = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg).unwrap();
    let e = within(Duration::from_secs(90), move || {
        b.read_at(0, &mut vec![0u8; 4 << 20]).unwrap_err()
    });
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("too slow"), "{e}");
    assert!(e.to_string().contains("giving up after 3 attempts"), "{e}");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert_eq!(gets, 3, "{:?}", r.proxy.log());
}

#[test]
fn a_slow_server_answering_short_ranges_is_given_up_on() {
    let r = rig();
    let data = pattern(1 << 20, 10);
    write_file(r.dir.path(), "x.bin", &data);
    // Every 206 is cut to 64 KiB (enough to count as progress for a shorter answer) and sent
    // at 16 KiB every 400 ms (~40 KiB/s) against an accepted 1 MiB/s. Each answer, on its own,
    // arrives well within the 3 s + 1 s one GET for the 1 MiB range gets; the answers for the
    // range together must do so too, or the server could hold a load for hours at a few KiB/s
    // (it did: 16 answers of 64 KiB, the range read whole, however slowly they came).
    let faults = Faults {
        trickle: Some((16 << 10, Duration::from_millis(400))),
        ..Default::default()
    };
    short_answers_are_given_up_on(&r, faults, "short answers");
}

/// Reads 1 MiB of `x.bin` through `r`'s proxy with `faults`, every 206 cut to 64 KiB, from
/// a backend accepting 1 MiB/s (timeout 3 s, 2 retries, one GET at a time): it must fail as
/// too slow after 3 attempts, in fewer than the 16 GETs reading it to the end would take.
fn short_answers_are_given_up_on(r: &Rig, faults: Faults, what: &str) {
    r.proxy.set_faults(Faults {
        shorten_206: Some(64 << 10),
        ..faults
    });
    let cfg = HttpConfig {
        min_rate: 1 << 20,
        ..quick_cfg(1, 1 << 20, Duration::from_secs(3), 2)
    };
    let b = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg).unwrap();
    r.proxy.clear_log();
    let got = within(Duration::from_secs(90), move || {
        b.read_at(0, &mut vec![0u8; 1 << 20])
    });
    let Err(e) = got else {
        panic!("a server slower than min_rate in {what} was read to the end")
    };
    // (Cut mid-answer or between answers: too slow either way, not stalled.)
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("too slow"), "{e}");
    assert!(e.to_string().contains("giving up after 3 attempts"), "{e}");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert!(gets < 16, "{gets} GETs: {:?}", r.proxy.log());
}

/// The answers continuing a GET share its time also while the next answer is awaited: a server
/// that holds every request 1 s and answers it with 64 KiB (fast) reads 1 MiB at ~64 KiB/s
/// against an accepted 1 MiB/s, and is given up on as too slow. (Only a body's bytes were held
/// to the GET's time: with the time run out, the next answer was still awaited on a timeout of
/// its own and then read whole, each answer progress, and the range was read to the end, 16
/// GETs in 16 s.)
#[test]
fn a_server_answering_short_ranges_each_after_a_pause_is_given_up_on() {
    let r = rig();
    let data = pattern(1 << 20, 12);
    write_file(r.dir.path(), "x.bin", &data);
    let faults = Faults {
        delay: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    short_answers_are_given_up_on(&r, faults, "paused short answers");
}

#[test]
fn a_server_that_resets_after_every_few_bytes_is_given_up_on() {
    let r = rig();
    let data = pattern(1 << 20, 8);
    write_file(r.dir.path(), "x.bin", &data);
    // Every answer is cut after 100 bytes: each attempt "progresses", but by less than 64 KiB,
    // so the retries stay bounded (they used to restart after any progress).
    r.proxy.set_faults(Faults {
        reset_after: Some((100, usize::MAX)),
        ..Default::default()
    });
    let b = HttpBackend::open_with(
        &r.proxy.url("x.bin"),
        quick_cfg(1, 1 << 20, Duration::from_secs(5), 3),
    )
    .unwrap();
    let e = within(Duration::from_secs(60), move || {
        b.read_at(0, &mut vec![0u8; 1 << 20]).unwrap_err()
    });
    assert!(e.is_retryable(), "{e}");
    let gets = r.proxy.log().iter().filter(|x| x.method == "GET").count();
    assert_eq!(gets, 4, "{:?}", r.proxy.log());
}

/// A server that closes kept-alive connections after a short idle time (nginx's
/// `keepalive_timeout`, here 5 ms) closes some of them just as the client takes them from its
/// pool for the next GET, which then meets a closed connection before any answer ("connection
/// closed before message completed", or a reset). Such a GET is sent again at once and is no
/// failed attempt: with no retries allowed, a load of 1024 small ranges still arrives whole.
/// (Counted, about one GET in ten failed here, and the load failed at its first.)
///
/// The backend's runtime has one thread here: with two, hyper (1.12) now and then strands a GET
/// sent on a pooled connection just as that connection's task ends on the other thread (its
/// queue closed and drained while the send was between reserving its place and putting the
/// request in it), and that GET is neither written nor failed: it waits out the timeout, and
/// with no retries the load fails (hyperium/hyper#4122). Counted, this test failed so in 3 of
/// 80 runs with two threads (and a load like it with a 3 s timeout in 4 of 100), in none of 80
/// (and 100) with one.
#[test]
fn connections_the_server_closes_as_they_are_reused_are_no_failed_attempts() {
    let dir = served_dir();
    let nginx = Nginx::start_with(dir.path(), "keepalive_timeout 5ms;");
    let (img, ranges) = safetensors(&[("a", 6 << 20), ("b", 5 << 20), ("c", 5 << 20)], 41);
    write_file(dir.path(), "m.safetensors", &img);
    let b = Arc::new(
        HttpBackend::open_with(
            &nginx.url("m.safetensors"),
            HttpConfig {
                runtime_threads: 1,
                ..quick_cfg(32, 16 << 10, Duration::from_secs(10), 0)
            },
        )
        .unwrap(),
    );
    let (model, _) = load(b, None).unwrap_or_else(|e| {
        panic!(
            "the load failed: {e}\nnginx's error log:\n{}",
            nginx.error_log()
        )
    });
    assert_tensors(&model, &img, &["a", "b", "c"], &ranges);
}

#[test]
fn a_server_closing_every_request_unanswered_is_given_up_on_soon() {
    // Connections closed before any answer are sent again at once, uncounted, only up to
    // 2 × concurrency + 1 in a row (as many as may be stale kept-alive ones); past that each
    // counts, so a server that drops every request sees few of them before the error.
    let r = rig();
    let data = pattern(1 << 20, 12);
    write_file(r.dir.path(), "x.bin", &data);
    let (concurrency, retries) = (2, 2);
    let cfg = || quick_cfg(concurrency, 1 << 20, Duration::from_secs(10), retries);
    let most = 2 * concurrency + 1 + retries as usize + 1;
    let hung_up = |r: &Rig| r.proxy.log().iter().filter(|x| x.status == 0).count();

    // The HEAD of the opening.
    r.proxy.set_faults(Faults {
        hang_up: 1000,
        ..Default::default()
    });
    r.proxy.clear_log();
    let e = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg()).unwrap_err();
    assert!(e.to_string().contains("giving up after"), "{e}");
    let n = hung_up(&r);
    assert!(
        (1..=most).contains(&n),
        "the opening sent {n} requests to a server closing each (at most {most})"
    );

    // A ranged GET.
    r.proxy.set_faults(Faults::default());
    let b = HttpBackend::open_with(&r.proxy.url("x.bin"), cfg()).unwrap();
    r.proxy.set_faults(Faults {
        hang_up: 1000,
        ..Default::default()
    });
    r.proxy.clear_log();
    let mut buf = vec![0u8; data.len()];
    let e = b.read_at(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("giving up after"), "{e}");
    let n = hung_up(&r);
    assert!(
        (1..=most).contains(&n),
        "a read sent {n} requests to a server closing each (at most {most})"
    );
}

#[test]
fn unavailable_503_is_retried_then_bounded() {
    let r = rig();
    let data = pattern(1 << 20, 9);
    write_file(r.dir.path(), "x.bin", &data);
    let b = HttpBackend::open_with(
        &r.proxy.url("x.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 3),
    )
    .unwrap();

    r.proxy.set_faults(Faults {
        unavailable: Some((2, "1".into())),
        ..Default::default()
    });
    r.proxy.clear_log();
    let mut buf = vec![0u8; data.len()];
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data);
    let statuses: Vec<u16> = r.proxy.log().iter().map(|x| x.status).collect();
    assert_eq!(statuses, vec![503, 503, 206]);

    // The same with a gzipped error page: still a 503 to retry, not an encoding problem.
    r.proxy.set_faults(Faults {
        unavailable: Some((1, "0".into())),
        unavailable_gzip: true,
        ..Default::default()
    });
    r.proxy.clear_log();
    buf.fill(0);
    assert_eq!(b.read_at(0, &mut buf).unwrap(), data.len());
    assert!(buf == data);
    let statuses: Vec<u16> = r.proxy.log().iter().map(|x| x.status).collect();
    assert_eq!(statuses, vec![503, 206]);

    // 503 forever: gives up after max_retries + 1 attempts with a retryable error.
    r.proxy.set_faults(Faults {
        unavailable: Some((1000, "0".into())),
        ..Default::default()
    });
    r.proxy.clear_log();
    let e = b.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(r.proxy.log().len(), 4, "1 attempt + 3 retries");
}

#[test]
fn object_replaced_mid_load_is_object_changed() {
    let r = rig();
    let (img, _) = safetensors(&[("a", 8 << 20), ("b", 8 << 20), ("c", 8 << 20)], 31);
    let path = write_file(r.dir.path(), "m.safetensors", &img);
    let b: Arc<dyn Backend> = Arc::new(
        HttpBackend::open_with(
            &r.proxy.url("m.safetensors"),
            quick_cfg(2, 1 << 20, Duration::from_secs(10), 3),
        )
        .unwrap(),
    );
    // Same size, different bytes: only the version tells them apart.
    let (img2, _) = safetensors(&[("a", 8 << 20), ("b", 8 << 20), ("c", 8 << 20)], 32);
    assert_eq!(img.len(), img2.len());
    r.proxy.set_faults(Faults {
        replace_after: Some((3 << 20, Box::new(replacement(&path, &img2)))),
        ..Default::default()
    });
    let meta_before = b.stat().unwrap();
    let e = match load(b.clone(), None) {
        Err(e) => e,
        Ok(_) => panic!("a load across a replacement must fail, not return mixed bytes"),
    };
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    let msg = e.to_string();
    let old = meta_before.version.unwrap();
    assert!(msg.contains(&format!("ETag was {old}, now \"")), "{msg}");
    assert!(
        r.proxy.log().iter().any(|x| x.status == 412),
        "server refused with 412"
    );

    // read_at pinned to the old stat fails the same way; a fresh stat reads the new version.
    let e = b.read_at(1 << 20, &mut [0u8; 100]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    assert_ne!(b.stat().unwrap().version, Some(old));
    let (model, _) = load(b, None).unwrap();
    assert!(model.get("b").unwrap().data == &img2[img2.len() - (16 << 20)..img2.len() - (8 << 20)]);
}

/// `open_pinned` (a sharded checkpoint's shard, opened for its load after the check stat'ed
/// it) asks the server nothing, and its reads carry the version it was given: the object's
/// bytes while it is that version, `ObjectChanged` once it was replaced. A version the
/// precondition cannot carry whole (none, a weak ETag) is left to `open_stat`.
#[test]
fn open_pinned_asks_nothing_and_reads_only_the_version_given() {
    let r = rig();
    let (img, _) = safetensors(&[("a", 3000)], 51);
    let path = write_file(r.dir.path(), "p.safetensors", &img);
    let url = r.proxy.url("p.safetensors");
    let o = opts(2, 1 << 20);
    let (_, meta) = tensorstream_backends::open_stat(&url, &o).unwrap();
    assert!(meta.version.is_some(), "nginx sends an ETag");
    r.proxy.clear_log();
    let b = tensorstream_backends::open_pinned(&url, &o, &meta)
        .unwrap()
        .expect("a strong ETag is pinned without a request");
    assert!(r.proxy.log().is_empty(), "asked: {:?}", r.proxy.log());
    let mut got = vec![0u8; img.len()];
    assert_eq!(b.read_at(0, &mut got).unwrap(), img.len());
    assert_eq!(got, img);
    let log = r.proxy.log();
    assert_eq!(log.len(), 1, "one GET: {log:?}");
    let want = format!("if-match: {}", meta.version.as_deref().unwrap());
    assert!(
        log[0]
            .request_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&want)),
        "not pinned: {:?}",
        log[0].request_headers
    );
    // Replaced (same size, other bytes): the pinned read refuses it.
    let (img2, _) = safetensors(&[("a", 3000)], 52);
    replacement(&path, &img2)();
    let e = b.read_at(0, &mut got).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    // Nothing to pin whole: left to `open_stat`, and refused by `HttpBackend::open_pinned`.
    for version in [None, Some("W/\"abc\"".to_string())] {
        let m = tensorstream_engine::ObjectMeta {
            size: meta.size,
            version,
        };
        assert!(tensorstream_backends::open_pinned(&url, &o, &m)
            .unwrap()
            .is_none());
        let e = HttpBackend::open_pinned(&url, &o, &m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    // A Last-Modified date (an object without an ETag) is pinned too.
    let m = tensorstream_engine::ObjectMeta {
        size: meta.size,
        version: Some("last-modified: Mon, 02 Jan 2006 15:04:05 GMT".into()),
    };
    assert!(HttpBackend::pins_whole(&m));
    // A local file is not opened this way.
    let m = tensorstream_engine::ObjectMeta {
        size: meta.size,
        version: Some("\"x\"".into()),
    };
    assert!(
        tensorstream_backends::open_pinned(path.to_str().unwrap(), &o, &m)
            .unwrap()
            .is_none()
    );
}

#[test]
fn range_ignored_200_is_sliced_when_small_refused_when_large() {
    let r = rig();
    let small = pattern(100_000, 41);
    let large = pattern(17 << 20, 42);
    write_file(r.dir.path(), "small.bin", &small);
    write_file(r.dir.path(), "large.bin", &large);
    let bs = HttpBackend::open_with(
        &r.proxy.url("small.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 1),
    )
    .unwrap();
    let bl = HttpBackend::open_with(
        &r.proxy.url("large.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 1),
    )
    .unwrap();
    r.proxy.set_faults(Faults {
        strip_range: true,
        ..Default::default()
    });
    r.proxy.clear_log();
    let mut buf = vec![0u8; 5000];
    assert_eq!(bs.read_at(1234, &mut buf).unwrap(), 5000);
    assert!(
        buf == small[1234..6234],
        "a 200 answer must be sliced at the requested offset"
    );
    assert_eq!(
        r.proxy.log()[0].status,
        200,
        "the server really answered 200"
    );

    let e = bl.read_at(1 << 20, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("ignored the Range header"), "{e}");
}

/// A `206` that says it carries another window than the one asked for is refused as corrupt
/// (never taken for the asked range, never retried into success).
#[test]
fn a_206_for_another_range_is_refused() {
    let r = rig();
    let data = pattern(1 << 20, 43);
    write_file(r.dir.path(), "w.bin", &data);
    let b = HttpBackend::open_with(
        &r.proxy.url("w.bin"),
        quick_cfg(2, 1 << 20, Duration::from_secs(10), 2),
    )
    .unwrap();
    r.proxy.set_faults(Faults {
        shift_content_range: Some(4096),
        ..Default::default()
    });
    let mut buf = vec![0u8; 5000];
    let e = b.read_at(1000, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("bytes 5096-10095"), "{e}");
    r.proxy.set_faults(Faults::default());
    assert_eq!(b.read_at(1000, &mut buf).unwrap(), 5000);
    assert!(buf == data[1000..6000]);
}

#[test]
fn filter_never_downloads_skipped_tensors() {
    let r = rig();
    let (img, ranges) = safetensors(
        &[
            ("keep.0", 1 << 20),
            ("skip.0", 6 << 20),
            ("keep.1", 1 << 20),
            ("skip.1", 6 << 20),
            ("keep.2", 3 << 20),
        ],
        51,
    );
    write_file(r.dir.path(), "m.safetensors", &img);
    let b = open(&r.proxy.url("m.safetensors"), &opts(8, 1 << 20)).unwrap();
    r.proxy.clear_log();
    let (model, _) = load(b, Some(vec![0, 2, 4])).unwrap();
    assert_eq!(model.len(), 3);
    assert_tensors(
        &model,
        &img,
        &["keep.0", "keep.1", "keep.2"],
        &[ranges[0].clone(), ranges[2].clone(), ranges[4].clone()],
    );
    let log = r.proxy.log();
    for x in &log {
        if let Some(got) = x.answered_range() {
            for skipped in [&ranges[1], &ranges[3]] {
                assert!(
                    got.end <= skipped.start || got.start >= skipped.end,
                    "downloaded {got:?}, which overlaps skipped tensor bytes {skipped:?}"
                );
            }
        }
    }
    let useful: u64 = [0, 2, 4]
        .iter()
        .map(|&i| ranges[i].end - ranges[i].start)
        .sum();
    let header = ranges[0].start;
    assert!(
        r.proxy.body_bytes() <= useful + header + (64 << 10),
        "{} body bytes through the proxy for {useful} useful bytes",
        r.proxy.body_bytes()
    );
}

// ------------------------------------------------------------------------------------------------
// measurement (not a test): cargo test --release -p tensorstream-backends --features http \
//   --test http -- --ignored --nocapture bench_http_vs_curl

/// User + system CPU seconds of this process so far (all threads), from /proc/self/stat.
fn self_cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 of the line (utime, stime) are 11 and 12 after the command name.
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / 100.0
}

#[test]
#[ignore]
fn bench_http_vs_curl() {
    let gib: usize = std::env::var("TS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        << 20;
    let dir = served_dir();
    let n = 16;
    let sizes: Vec<(String, usize)> = (0..n).map(|i| (format!("t{i}"), gib / n)).collect();
    let sz: Vec<(&str, usize)> = sizes.iter().map(|(a, s)| (a.as_str(), *s)).collect();
    let (img, ranges) = safetensors(&sz, 61);
    write_file(dir.path(), "big.safetensors", &img);
    let total = img.len() as f64;
    drop(img);
    let nginx = Nginx::start(dir.path());
    let url = nginx.url("big.safetensors");
    // Warm the page cache once so both runs read from memory.
    let _ = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", &url])
        .status();
    for round in 0..2 {
        let t = std::time::Instant::now();
        let out = std::process::Command::new("bash")
            .args(["-c", "curl -s -o /dev/null \"$0\" && times", &url])
            .output()
            .expect("curl");
        assert!(out.status.success());
        let curl = t.elapsed().as_secs_f64();
        let times = String::from_utf8_lossy(&out.stdout);
        let curl_cpu = times.lines().nth(1).unwrap_or("").to_string();
        // What allocating the host arena alone costs (the engine's AlignedBuf::zeroed, which
        // touches every page), and the backend alone: its reader filling an already-touched
        // buffer of the same size with 8 MiB reads, 32 in flight.
        let ta = std::time::Instant::now();
        let mut whole = IoBuf::aligned(total as usize, 4096).unwrap();
        let alloc_s = ta.elapsed().as_secs_f64();
        let chunk = 8usize << 20;
        let mut windows = Vec::new();
        while !whole.is_empty() {
            let n = chunk.min(whole.len());
            windows.push(whole.split_to(n).unwrap());
        }
        let tr = std::time::Instant::now();
        let b = Arc::new(HttpBackend::open(&url, &OpenOptions::default()).unwrap());
        let meta = b.stat().unwrap();
        let mut r = b
            .clone()
            .open_reader(&meta, &ReaderOptions::new(32))
            .unwrap();
        let mut next = 0usize;
        let mut done_bytes = 0u64;
        let count = windows.len();
        let mut bufs = windows.into_iter();
        while next < count || r.in_flight() > 0 {
            while next < count && r.in_flight() < 32 {
                let buf = bufs.next().unwrap();
                r.submit(ReadRequest {
                    id: next as u64,
                    offset: (next * chunk) as u64,
                    buf,
                })
                .unwrap();
                next += 1;
            }
            let d = r.wait().unwrap();
            done_bytes += d.result.unwrap() as u64;
        }
        let reader_s = tr.elapsed().as_secs_f64();
        assert_eq!(done_bytes, total as u64);
        println!(
            "backend reader alone: {:.3} GB/s ({reader_s:.3}s); arena-sized zeroed allocation alone: {alloc_s:.3}s",
            total / reader_s / 1e9
        );
        let cpu0 = self_cpu_secs();
        let t = std::time::Instant::now();
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        let o = OpenOptions {
            concurrency: env("TS_BENCH_CONCURRENCY"),
            chunk_size: env("TS_BENCH_CHUNK_MIB").map(|m| m << 20),
            ..Default::default()
        };
        let mut cfg = HttpConfig::from_options(&o).unwrap();
        if let Some(n) = env("TS_BENCH_THREADS") {
            cfg.runtime_threads = n;
        }
        let b: Arc<dyn Backend> = Arc::new(HttpBackend::open_with(&url, cfg).unwrap());
        let t_open = t.elapsed().as_secs_f64();
        let (model, stats) = load(b, None).unwrap();
        let ours = t.elapsed().as_secs_f64();
        println!(
            "open {t_open:.3}s, engine {:.3}s, total {ours:.3}s; cpu: ours {:.2}s, curl (user sys) {curl_cpu}",
            stats.elapsed.as_secs_f64(),
            self_cpu_secs() - cpu0
        );
        assert_eq!(model.len(), n);
        let check = model.get("t3").unwrap().data;
        assert_eq!(check.len() as u64, ranges[3].end - ranges[3].start);
        println!(
            "{{\"round\":{round},\"bytes\":{total},\"curl_gbps\":{:.3},\"tensorstream_http_gbps\":{:.3},\"ratio\":{:.2}}}",
            total / curl / 1e9,
            total / ours / 1e9,
            curl / ours
        );
    }
}

/// Lanes of openings and reads, `LANES` requests in flight at once (a sharded checkpoint's
/// check: each lane opens a shard, its HEAD, and reads its header, a GET, then the next
/// shard's), open one connection per lane. These calls ran on the calling thread: hyper puts a
/// connection back into the pool from a task it spawns as the answer ends, which then waited
/// for a runtime worker to wake while the lane already sent its next request; that found no
/// idle connection and opened another (a 40-shard `inspect` opened 34 to 38 connections at
/// `--concurrency 32`, 5 to 7 at 4). As tasks on the runtime, as the S3 backend's calls are,
/// the connection is back first. Each round goes through a new proxy (a new host: a pool of
/// its own), so that extra connections do not hide in the ones a round before kept.
#[test]
fn lanes_of_openings_open_one_connection_each() {
    let dir = served_dir();
    let nginx = Nginx::start(dir.path());
    const LANES: usize = 16;
    const SHARDS_PER_LANE: usize = 3;
    const ROUNDS: usize = 8;
    for i in 0..LANES * SHARDS_PER_LANE {
        write_file(dir.path(), &format!("l{i}"), &pattern(4096, i as u64));
    }
    let cfg = quick_cfg(LANES, 1 << 20, Duration::from_secs(10), 1);
    let mut extra = Vec::new();
    for _ in 0..ROUNDS {
        let proxy = Proxy::start(nginx.addr());
        // A store's round trip: the lanes' requests are in flight together.
        proxy.set_faults(Faults {
            delay: Some(Duration::from_millis(20)),
            ..Default::default()
        });
        let start = std::sync::Barrier::new(LANES);
        std::thread::scope(|s| {
            for lane in 0..LANES {
                let (start, cfg, proxy) = (&start, &cfg, &proxy);
                s.spawn(move || {
                    start.wait();
                    for k in 0..SHARDS_PER_LANE {
                        let i = lane * SHARDS_PER_LANE + k;
                        let url = proxy.url(&format!("l{i}"));
                        let b = HttpBackend::open_with(&url, cfg.clone()).unwrap();
                        let mut buf = vec![0u8; 4096];
                        assert_eq!(b.read_at(0, &mut buf).unwrap(), 4096);
                        assert!(buf == pattern(4096, i as u64), "l{i}: wrong bytes");
                    }
                });
            }
        });
        assert!(proxy.peak_in_flight() <= LANES);
        extra.push(proxy.connections().saturating_sub(LANES as u64));
    }
    eprintln!("connections past one per lane, each round: {extra:?}");
    // One per lane, now and then one more on a busy machine (a worker preempted before it puts
    // a connection back: 0 to 6 over the 8 rounds on two busy cores); on the calling thread,
    // up to four more each round (11 to 14 over the 8 rounds).
    assert!(
        extra.iter().sum::<u64>() <= 8,
        "connections past one per lane ({LANES} lanes), each round: {extra:?}"
    );
}

/// Connections opened side by side stay pooled for the next requests, up to twice
/// `concurrency` of them. A request that finds no idle connection opens one, also when its
/// predecessor's is a moment from coming back to the pool (hyper puts a connection back only
/// once its task asks for the next request), so a load can hold more connections than its
/// concurrency. The pool kept only `concurrency` idle: it closed the others, and the next such
/// moment opened yet another (a sharded load at `--concurrency 1` opened 13 to 23 connections
/// for 40 shards). Here each burst of twice `concurrency` openings (their HEADs held together at
/// the proxy) opened two connections more than the one before; now all are reused.
#[test]
fn connections_opened_side_by_side_stay_pooled() {
    let r = rig();
    const CONCURRENCY: usize = 2;
    const BURST: usize = 2 * CONCURRENCY;
    for i in 0..BURST {
        write_file(r.dir.path(), &format!("s{i}"), &pattern(4096, i as u64));
    }
    // A store's round trip: the openings of a burst are in flight together.
    r.proxy.set_faults(Faults {
        delay: Some(Duration::from_millis(100)),
        ..Default::default()
    });
    let cfg = quick_cfg(CONCURRENCY, 1 << 20, Duration::from_secs(10), 1);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let start = std::sync::Barrier::new(BURST);
        std::thread::scope(|s| {
            for i in 0..BURST {
                let (start, cfg, url) = (&start, cfg.clone(), r.proxy.url(&format!("s{i}")));
                s.spawn(move || {
                    start.wait();
                    let b = HttpBackend::open_with(&url, cfg).unwrap();
                    assert_eq!(b.last_seen().size, 4096);
                });
            }
        });
        seen.push(r.proxy.connections());
        // The last answers' connections back in the pool (a moment after the answers).
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "connections after each burst of {BURST} openings: {seen:?} (at most {} requests in \
         flight at once)",
        r.proxy.peak_in_flight()
    );
    // All reused: `BURST` connections (seen each time). Two more are let pass for a busy
    // machine, where a connection may come back to the pool after the next burst has started;
    // the pool that closed the extra ones reached 10.
    assert!(
        r.proxy.connections() <= BURST as u64 + 2,
        "connections after each burst of {BURST} openings at concurrency {CONCURRENCY}: {seen:?}"
    );
}
