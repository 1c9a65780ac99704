//! The NFS backend against a real NFS-Ganesha server (NFSv4.0 over TCP on 127.0.0.1), with a
//! small fault-injecting TCP proxy in front of it for broken and stalled connections.

#[allow(dead_code)]
#[path = "support/ganesha.rs"]
mod ganesha;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ganesha::Ganesha;
use sha2::{Digest, Sha256};
use tensorstream_backends::{open, OpenOptions};
use tensorstream_engine::testkit::{run_all, Fixture};
use tensorstream_engine::*;

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn opts() -> OpenOptions {
    OpenOptions::default()
}

/// A safetensors file of U8 tensors of the given sizes, and each tensor's bytes.
fn model_file(sizes: &[u64], seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    tensorstream_engine::testkit::u8_model(sizes, seed)
}

/// format → plan → execute → HostSink, with the backend's preferred chunk and concurrency.
fn load(be: Arc<dyn Backend>, layout: Layout) -> Result<HostModel> {
    let meta = be.stat()?;
    let index = format::read_index(be.as_ref(), &meta)?;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let caps = be.capabilities();
    let mut po = PlanOptions::new(meta.size);
    po.chunk_size = caps.preferred_chunk as u64;
    po.layout = layout;
    let plan = Arc::new(plan(&index, &sel, &po)?);
    let eo = EngineOptions {
        queue_depth: caps.max_concurrency,
        ring_budget: 64 << 20,
        progress: None,
        cancel: None,
    };
    let (sink, _stats) = execute(be, &meta, plan.clone(), HostSink::new(), &eo)?;
    let (arena, _) = sink.into_parts()?;
    HostModel::new(arena, index, &plan)
}

struct Fx {
    g: Ganesha,
}

impl Fixture for Fx {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        let uri = self.g.put(name, data);
        open(&uri, &opts())
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        open(&self.g.uri(name), &opts())
    }
    /// Rewrites the exported file in place with its mtime a second past the old one, so the
    /// change attribute Ganesha reports moves even within the timestamp granularity.
    fn overwrite(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.g.path(name);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        self.g.put(name, data);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(before + Duration::from_secs(1)).unwrap();
        Ok(())
    }
}

#[test]
fn conformance_suite() {
    run_all(&Fx {
        g: Ganesha::start(),
    });
}

#[test]
fn capabilities_and_stat() {
    let g = Ganesha::start();
    let data = pattern(1000, 1);
    let be = open(&g.put("c.bin", &data), &opts()).unwrap();
    let caps = be.capabilities();
    assert_eq!(caps.kind, "nfs");
    assert_eq!(caps.alignment, 1);
    assert!(!caps.direct_io && caps.ranged_reads);
    assert_eq!(caps.preferred_chunk, 4 << 20);
    assert_eq!(caps.max_concurrency, 32);
    let meta = be.stat().unwrap();
    assert_eq!(meta.size, 1000);
    assert!(meta.version.as_deref().unwrap().starts_with("nfs4-change:"));
    // Options reach the backend.
    let o = OpenOptions {
        concurrency: Some(7),
        chunk_size: Some(1 << 20),
        ..opts()
    };
    let be = open(&g.uri("c.bin"), &o).unwrap();
    assert_eq!(be.capabilities().max_concurrency, 7);
    assert_eq!(be.capabilities().preferred_chunk, 1 << 20);
}

#[test]
fn read_at_ranges_match_the_file() {
    let g = Ganesha::start();
    // Small rsize so that reads span several READs; odd sizes everywhere.
    let data = pattern(5 * 65536 + 123, 2);
    g.put("r.bin", &data);
    let uri = format!("{}?rsize=65536&nconnect=2", g.uri("r.bin"));
    let o = OpenOptions {
        chunk_size: Some(100_000),
        ..opts()
    };
    let be = open(&uri, &o).unwrap();
    let n = data.len() as u64;
    for (off, len) in [
        (0u64, 0usize),
        (0, 1),
        (1, 65535),
        (65535, 2),
        (65536, 65536),
        (12345, 250_000),
        (0, data.len()),
        (n - 10, 10),
        (n - 10, 100), // short at the end
        (n, 5),        // at the end: 0 bytes
    ] {
        let mut buf = vec![0xAAu8; len];
        let got = be.read_at(off, &mut buf).unwrap();
        let end = (off as usize + len).min(data.len());
        assert_eq!(got, end - off as usize, "read_at({off}, {len})");
        assert_eq!(
            &buf[..got],
            &data[off as usize..end],
            "read_at({off}, {len})"
        );
    }
    let e = be.read_at(n + 1, &mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RangeNotSatisfiable, "{e}");
}

#[test]
fn open_reader_many_in_flight_fills_the_buffers() {
    let g = Ganesha::start();
    let data = pattern(9 << 20, 3);
    g.put("m.bin", &data);
    let uri = format!("{}?rsize=262144", g.uri("m.bin"));
    let be = open(&uri, &opts()).unwrap();
    let meta = be.stat().unwrap();
    let mut reader = be
        .clone()
        .open_reader(&meta, &ReaderOptions::new(32))
        .unwrap();
    // 1 MiB + odd pieces over the whole file, plus one past the end and one at the end.
    let mut reqs: Vec<(u64, usize)> = Vec::new();
    let mut off = 0u64;
    let mut k = 0;
    while off < data.len() as u64 {
        let len = [1 << 20, 777, 300_001, 65536][k % 4];
        reqs.push((off, len));
        off += len as u64;
        k += 1;
    }
    reqs.push((data.len() as u64, 10));
    let mut next = 0;
    let mut seen = 0;
    while seen < reqs.len() {
        while next < reqs.len() && reader.in_flight() < 32 {
            let (o, l) = reqs[next];
            reader
                .submit(ReadRequest {
                    id: next as u64,
                    offset: o,
                    buf: IoBuf::aligned(l, 64).unwrap(),
                })
                .unwrap();
            next += 1;
        }
        let d = reader.wait().unwrap();
        let (o, l) = reqs[d.id as usize];
        assert_eq!(d.offset, o);
        assert_eq!(d.buf.len(), l, "buffer given back whole");
        let n = d.result.unwrap();
        let end = (o as usize + l).min(data.len());
        assert_eq!(n, end.saturating_sub(o as usize));
        assert!(
            d.buf.as_slice()[..n] == data[o as usize..end],
            "read {o}+{l}"
        );
        seen += 1;
    }
    assert_eq!(reader.in_flight(), 0);
    assert!(
        reader.wait().is_err(),
        "wait with nothing in flight is an error"
    );
}

#[test]
fn loads_a_64mib_safetensors_file_through_the_engine() {
    let g = Ganesha::start();
    let sizes = [1u64, 40 << 20, 0, 3, (20 << 20) + 12345, 4 << 20, 1000];
    let (file, datas) = model_file(&sizes, 10);
    assert!(file.len() >= 64 << 20);
    let uri = g.put("model.safetensors", &file);
    for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
        let be = open(&uri, &opts()).unwrap();
        let m = load(be, layout).unwrap();
        assert_eq!(m.len(), sizes.len());
        for (i, t) in m.tensors().enumerate() {
            assert_eq!(t.name, format!("t{i:03}"));
            assert!(t.data == &datas[i][..], "{layout:?}: tensor {i} differs");
        }
    }
}

#[test]
fn reference_fixture_hashes_match_over_nfs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{dir}/manifest.json"))
            .unwrap_or_else(|e| panic!("fixtures missing at {dir}: {e}")),
    )
    .unwrap();
    let g = Ganesha::start();
    let bytes = std::fs::read(format!("{dir}/mixed.safetensors")).unwrap();
    let uri = g.put("mixed.safetensors", &bytes);
    let m = load(open(&uri, &opts()).unwrap(), Layout::Mirror).unwrap();
    let tensors = manifest["files"]["mixed.safetensors"]["tensors"]
        .as_array()
        .unwrap();
    assert_eq!(m.len(), tensors.len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let v = m
            .get(name)
            .unwrap_or_else(|| panic!("tensor {name} missing"));
        let hash = format!("{:x}", Sha256::digest(v.data));
        assert_eq!(hash, t["sha256"].as_str().unwrap(), "tensor {name}");
    }
}

#[path = "support/blackhole.rs"]
mod blackhole;

/// At a server that accepts connections and never replies: a cancel flag stops the opening
/// within moments (it ran its request timeout and a retry to the end, about 61 s with the
/// defaults, holding a thread and three sockets per connection), and without one the retry
/// waits no longer than what is left of the opening's 5 s budget (it waited a whole request
/// timeout more).
#[test]
fn a_silent_server_is_given_up_on_in_time_and_on_a_cancel() {
    use std::time::Instant;
    let hole = blackhole::Blackhole::start();
    let uri = format!("nfs://127.0.0.1:{}/export/m.safetensors", hole.port());

    let (flag, setter) = blackhole::cancel_after(Duration::from_millis(300));
    let t = Instant::now();
    let e = open(
        &uri,
        &OpenOptions {
            cancel: Some(flag),
            ..opts()
        },
    )
    .unwrap_err();
    setter.join().unwrap();
    let waited = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(
        waited < Duration::from_secs(3),
        "returned after {waited:?}: {e}"
    );
    assert!(hole.accepted() > 0, "the opening never reached the server");
    assert!(
        hole.all_closed_within(Duration::from_secs(3)),
        "{} connection(s) still open after the cancel",
        hole.open()
    );

    // No cancel, a 4 s request timeout: the first call waits it out, the retries share the
    // 5 s opening budget that follows (about 9 s in all; a retry that then waited its own
    // full timeout ended past 12 s).
    let t = Instant::now();
    let e = open(
        &uri,
        &OpenOptions {
            timeout: Some(Duration::from_secs(4)),
            ..opts()
        },
    )
    .unwrap_err();
    let waited = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("giving up after"), "{e}");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_millis(10_500),
        "gave up after {waited:?}: {e}"
    );
    // The time the message gives is the whole wait, the first call's timeout included (it said
    // "in 5.0 s", the retry budget alone, after about 9 s).
    let msg = e.to_string();
    let said: f64 = msg
        .split(" attempts in ")
        .nth(1)
        .and_then(|rest| rest.split(" s").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"attempts in N s\" in {msg}"));
    assert!(
        said >= waited.as_secs_f64() - 0.5 && said <= waited.as_secs_f64() + 0.1,
        "the message says {said} s after {waited:?}: {msg}"
    );
}

#[test]
fn missing_paths_are_not_found() {
    let g = Ganesha::start();
    g.put("here.bin", b"x");
    for uri in [
        g.uri("nope.bin"),
        g.uri("no/such/dir.bin"),
        format!("nfs://127.0.0.1:{}/not-an-export/x", g.port),
    ] {
        let e = open(&uri, &opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{uri}: {e}");
        assert_eq!(e.backend(), Some("nfs"));
        assert_eq!(e.location(), Some(uri.as_str()));
        assert!(e.to_string().contains("NFS4ERR_NOENT"), "{e}");
    }
}

#[test]
fn directories_and_permissions() {
    let g = Ganesha::start();
    std::fs::create_dir(g.path("d")).unwrap();
    let e = open(&g.uri("d"), &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");

    // A file only root may read, read as uid 1000: the server refuses the READ.
    g.put("secret.bin", &pattern(100, 4));
    std::fs::set_permissions(g.path("secret.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let uri = format!("{}?uid=1000&gid=1000", g.uri("secret.bin"));
    let r = open(&uri, &opts()).and_then(|be| be.read_exact_at(0, 100));
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.is_retryable());

    // A directory uid 1000 may not search: LOOKUP is refused.
    std::fs::create_dir(g.path("closed")).unwrap();
    std::fs::write(g.path("closed/f"), b"abc").unwrap();
    std::fs::set_permissions(g.path("closed"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let uri = format!("{}?uid=1000&gid=1000", g.uri("closed/f"));
    let e = open(&uri, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
}

#[test]
fn server_down_fails_clearly_after_bounded_retries() {
    // A port bound but not listening, kept for the whole test: refused, and no other test can
    // take it meanwhile (a listener bound and dropped could be reused at once).
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = held.local_addr().unwrap().as_socket().unwrap().port();
    let uri = format!("nfs://127.0.0.1:{port}/export/f?retries=2");
    let e = open(&uri, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(e.backend(), Some("nfs"));
    let msg = e.to_string();
    assert!(
        msg.contains("cannot connect") && msg.contains("after 3 attempts"),
        "{msg}"
    );
    assert!(msg.contains(&uri), "{msg}");
}

#[test]
fn server_killed_mid_session_gives_an_error_not_a_hang() {
    let mut g = Ganesha::start();
    let data = pattern(3 << 20, 5);
    let uri = format!("{}?retries=1", g.put("k.bin", &data));
    let o = OpenOptions {
        timeout: Some(Duration::from_secs(2)),
        ..opts()
    };
    let be = open(&uri, &o).unwrap();
    assert_eq!(be.read_exact_at(0, 1000).unwrap(), &data[..1000]);
    g.stop();
    let e = be.read_exact_at(0, data.len()).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Io | ErrorKind::Timeout),
        "{e}"
    );
    assert!(e.to_string().contains("giving up after 2 attempts"), "{e}");
}

#[test]
fn file_modified_after_open_is_object_changed() {
    let g = Ganesha::start();
    let data = pattern(2 << 20, 6);
    let uri = g.put("v.bin", &data);
    let be = open(&uri, &opts()).unwrap();
    let meta = be.stat().unwrap();
    // Same size, different bytes in the middle.
    std::thread::sleep(Duration::from_millis(20));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(g.path("v.bin"))
        .unwrap();
    f.write_all_at(&[0u8; 4096], 1 << 20).unwrap();
    drop(f);
    let e = be.read_exact_at(0, data.len()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    assert_eq!(be.stat().unwrap_err().kind(), ErrorKind::ObjectChanged);
    let mut r = be
        .clone()
        .open_reader(&meta, &ReaderOptions::new(4))
        .unwrap();
    r.submit(ReadRequest {
        id: 1,
        offset: 0,
        buf: IoBuf::aligned(4096, 64).unwrap(),
    })
    .unwrap();
    let d = r.wait().unwrap();
    assert_eq!(d.result.unwrap_err().kind(), ErrorKind::ObjectChanged);
}

#[test]
fn file_replaced_after_open_is_object_changed_or_old_bytes() {
    let g = Ganesha::start();
    let data = pattern(2 << 20, 7);
    let uri = g.put("rep.bin", &data);
    let be = open(&uri, &opts()).unwrap();
    std::fs::write(g.path("rep.new"), pattern(2 << 20, 8)).unwrap();
    std::fs::rename(g.path("rep.new"), g.path("rep.bin")).unwrap();
    match be.read_exact_at(0, data.len()) {
        Ok(v) => assert!(v == data, "bytes of the replacement were returned"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}"),
    }
}

/// A backend opened pinned to the size and version a stat gave (a checked shard's load,
/// `tensorstream_backends::open_pinned`) asks the server nothing at its opening (it opens while
/// the server is down), reads the file by the handle in the version tag, and fails with
/// `ObjectChanged` once the file was modified. A file put in place of the pinned one fails its
/// `stat`, which walks the path again and finds another file under the name.
#[test]
fn a_backend_pinned_to_a_stat_reads_the_checked_file_without_asking() {
    let mut g = Ganesha::start();
    let data = pattern(300_000, 31);
    let uri = g.put("pin.bin", &data);
    let (_, meta) = tensorstream_backends::open_stat(&uri, &opts()).unwrap();
    g.stop();
    let be = tensorstream_backends::open_pinned(&uri, &opts(), &meta)
        .unwrap()
        .expect("an NFS stat's version pins a backend");
    let e = open(&uri, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    g.restart();
    assert_eq!(be.read_exact_at(0, data.len()).unwrap(), data);
    assert_eq!(be.stat().unwrap(), meta);

    // Another file under the name: the old handle may still read the old bytes, but the stat
    // (the load's last look) walks the path.
    std::fs::write(g.path("pin.new"), pattern(300_000, 32)).unwrap();
    std::fs::rename(g.path("pin.new"), g.path("pin.bin")).unwrap();
    let e = be.stat().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");
    assert!(e.to_string().contains("pin.bin"), "{e}");
    match be.read_exact_at(0, data.len()) {
        Ok(v) => assert!(v == data, "bytes of the replacement were returned"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}"),
    }

    // Modified in place (same size, a later mtime): its next read fails.
    let (_, meta) = tensorstream_backends::open_stat(&uri, &opts()).unwrap();
    let be = tensorstream_backends::open_pinned(&uri, &opts(), &meta)
        .unwrap()
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(g.path("pin.bin"))
        .unwrap();
    f.write_all_at(&[0u8; 4096], 1000).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let e = be.read_exact_at(0, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}");

    // A version an NFS stat did not give pins nothing; NfsBackend::open_pinned refuses it.
    let other = ObjectMeta {
        size: meta.size,
        version: Some("\"etag\"".into()),
    };
    assert!(tensorstream_backends::open_pinned(&uri, &opts(), &other)
        .unwrap()
        .is_none());
    let e = tensorstream_backends::nfs::NfsBackend::open_pinned(&uri, &opts(), &other).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

#[test]
fn file_changed_during_a_load_is_never_mixed() {
    let g = Ganesha::start();
    let (file, datas) = model_file(&[48 << 20, 16 << 20], 20);
    let uri = g.put("live.safetensors", &file);
    for round in 0..3u64 {
        let be = open(&uri, &opts()).unwrap();
        let path = g.path("live.safetensors");
        let writer = std::thread::spawn(move || {
            // Rewrite a stretch in the middle while the load runs (same bytes each round would
            // hide the change, so every round writes a different pattern).
            std::thread::sleep(Duration::from_millis(5 * round));
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&pattern(8 << 20, 100 + round), 30 << 20)
                .unwrap();
        });
        let r = load(be, Layout::Mirror);
        writer.join().unwrap();
        match r {
            Ok(m) => {
                for (i, t) in m.tensors().enumerate() {
                    assert!(
                        t.data == &datas[i][..],
                        "round {round}: mixed bytes in tensor {i}"
                    );
                }
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{e}"),
        }
        // Restore the original for the next round.
        std::fs::write(g.path("live.safetensors"), &file).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy in front of the server. Server→client bytes pass until a connection has carried
/// `limit` of them; then the first `faulty` connections are reset (`stall == false`) or stop
/// forwarding while staying open (`stall == true`); later connections pass untouched.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicUsize>,
    /// Server→client bytes forwarded, all connections together.
    bytes: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: u16, limit: usize, faulty: usize, stall: bool) -> Proxy {
        Self::start_with(upstream, limit, faulty, stall, None)
    }

    /// After `after` bytes of replies on each connection, forwards `piece` bytes per `pause`
    /// (a server trickling, each gap shorter than the client's timeout).
    fn trickling(upstream: u16, after: usize, piece: usize, pause: Duration) -> Proxy {
        Self::start_with(upstream, usize::MAX, 0, false, Some((after, piece, pause)))
    }

    fn start_with(
        upstream: u16,
        limit: usize,
        faulty: usize,
        stall: bool,
        trickle: Option<(usize, usize, Duration)>,
    ) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (stop2, faults2, bytes2) = (stop.clone(), faults.clone(), bytes.clone());
        std::thread::spawn(move || {
            let mut conns = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                let (c, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                c.set_nonblocking(false).unwrap();
                let Ok(s) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let faulty_conn = conns < faulty;
                conns += 1;
                let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(Shutdown::Both);
                });
                let (mut c, mut s) = (c, s);
                let faults = faults2.clone();
                let bytes = bytes2.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut total = 0usize;
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if faulty_conn && total + n > limit {
                            faults.fetch_add(1, Ordering::Relaxed);
                            if stall {
                                // Hold both sockets open, forward nothing more.
                                std::thread::sleep(Duration::from_secs(600));
                            }
                            break;
                        }
                        // Counted before they go out, so that a client that has its bytes
                        // always finds them counted.
                        bytes.fetch_add(n, Ordering::Relaxed);
                        match trickle {
                            Some((after, piece, pause)) if total + n > after => {
                                let mut ok = true;
                                for p in buf[..n].chunks(piece.max(1)) {
                                    if c.write_all(p).is_err() {
                                        ok = false;
                                        break;
                                    }
                                    std::thread::sleep(pause);
                                }
                                if !ok {
                                    break;
                                }
                            }
                            _ => {
                                if c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                        total += n;
                    }
                    let _ = c.shutdown(Shutdown::Both);
                    let _ = s.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            stop,
            faults,
            bytes,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads `len` bytes of a 4 MiB file through a proxy that, after the first 64 KiB of replies,
/// forwards `piece` bytes every `pause`, with the client's `timeout` and `retries`: the error
/// the read ends with, and how long it took. Fails the test if the read took 60 s or succeeded.
fn read_through_trickle(
    piece: usize,
    pause: Duration,
    timeout: Duration,
    retries: u32,
    len: usize,
) -> (Error, Duration) {
    let g = Ganesha::start();
    g.put("trickle.bin", &pattern(4 << 20, 12));
    let p = Proxy::trickling(g.port, 64 << 10, piece, pause);
    let uri = format!(
        "nfs://127.0.0.1:{}/export/trickle.bin?retries={retries}&nconnect=1",
        p.port
    );
    let o = OpenOptions {
        timeout: Some(timeout),
        ..opts()
    };
    let be = open(&uri, &o).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(be.read_exact_at(0, len));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a trickling server held the read for 60 s");
    match r {
        Ok(v) => panic!("read {} bytes from a trickling server", v.len()),
        Err(e) => (e, t.elapsed()),
    }
}

#[test]
fn a_trickling_server_times_out() {
    // 100 bytes every 200 ms: never a gap as long as the timeout, but far too little to count
    // as progress. It used to keep the read waiting for ever.
    let (e, _) = read_through_trickle(
        100,
        Duration::from_millis(200),
        Duration::from_millis(1500),
        1,
        1 << 20,
    );
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
}

/// A server that sends 64 KiB well inside each timeout (16 KiB every 625 ms), but at a tenth
/// of the slowest accepted rate (256 KiB/s): the read fails as a timeout instead of taking
/// minutes (a 64 MiB reply at 64 KiB per timeout would take hours).
#[test]
fn a_slow_server_under_the_slowest_rate_times_out() {
    let (e, took) = read_through_trickle(
        16 << 10,
        Duration::from_millis(625),
        Duration::from_secs(4),
        0,
        4 << 20,
    );
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("KiB/s"), "{e}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn connections_reset_mid_load_are_retried_with_correct_bytes() {
    let g = Ganesha::start();
    let (file, datas) = model_file(&[30 << 20, 36 << 20], 30);
    g.put("reset.safetensors", &file);
    // The first three connections die after 5 MiB of replies each.
    let p = Proxy::start(g.port, 5 << 20, 3, false);
    let uri = format!(
        "nfs://127.0.0.1:{}/export/reset.safetensors?nconnect=2",
        p.port
    );
    let m = load(open(&uri, &opts()).unwrap(), Layout::Mirror).unwrap();
    for (i, t) in m.tensors().enumerate() {
        assert!(
            t.data == &datas[i][..],
            "tensor {i} differs after reconnects"
        );
    }
    assert!(
        p.faults.load(Ordering::Relaxed) >= 1,
        "the proxy never cut a connection"
    );
}

#[test]
fn stalled_server_times_out_after_bounded_retries() {
    let g = Ganesha::start();
    let data = pattern(4 << 20, 9);
    g.put("stall.bin", &data);
    // Every connection stalls after 64 KiB of replies: open works, the 4 MiB read cannot.
    let p = Proxy::start(g.port, 64 << 10, usize::MAX, true);
    let uri = format!(
        "nfs://127.0.0.1:{}/export/stall.bin?retries=1&nconnect=1",
        p.port
    );
    let o = OpenOptions {
        timeout: Some(Duration::from_millis(1500)),
        ..opts()
    };
    let be = open(&uri, &o).unwrap();
    let e = be.read_exact_at(0, data.len()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("giving up after 2 attempts"), "{e}");

    // One READ (below rsize) whose reply stops halfway: no other call is pending on the
    // connection, and the half-read reply alone must still time out (it used to wait forever).
    let be = open(&uri, &o).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(be.read_exact_at(0, 512 << 10));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a READ whose reply stalled halfway hung");
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
}

/// A session abandoned (its load failing elsewhere) while its READ stalls on the server is not
/// held until the timeout: the read comes back failed at once, and the backend reads again
/// afterwards (through a new connection).
#[test]
fn abandon_stops_a_stalled_read_at_once() {
    let g = Ganesha::start();
    let data = pattern(4 << 20, 14);
    g.put("abandon.bin", &data);
    // The first connection stalls after 64 KiB of replies (open works, the big read cannot);
    // later ones pass.
    let p = Proxy::start(g.port, 64 << 10, 1, true);
    let uri = format!("nfs://127.0.0.1:{}/export/abandon.bin?nconnect=1", p.port);
    let o = OpenOptions {
        timeout: Some(Duration::from_secs(60)),
        ..opts()
    };
    let be = open(&uri, &o).unwrap();
    let meta = be.stat().unwrap();
    let mut reader = be
        .clone()
        .open_reader(&meta, &ReaderOptions::new(2))
        .unwrap();
    reader
        .submit(ReadRequest {
            id: 1,
            offset: 0,
            buf: IoBuf::aligned(2 << 20, 4096).unwrap(),
        })
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while p.faults.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        p.faults.load(Ordering::Relaxed) > 0,
        "the read never stalled"
    );
    reader.abandon();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(reader.wait().map(|d| d.result.is_err()));
    });
    let failed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("an abandoned read waited on a stalled server");
    assert!(
        failed.unwrap_or(true),
        "the abandoned read came back as read"
    );
    let mut buf = vec![0u8; 1 << 20];
    be.read_exact_at(0, buf.len())
        .map(|v| buf.copy_from_slice(&v))
        .unwrap();
    assert!(buf == data[..1 << 20], "read after the abandoned session");
}

/// A fake server that answers every call with `reply` (a record-marked RPC reply body after
/// the xid), to check that hostile replies give errors, not panics or huge allocations.
fn fake_server(reply: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let reply = reply.clone();
            std::thread::spawn(move || loop {
                let mut h = [0u8; 8];
                if c.read_exact(&mut h).is_err() {
                    break;
                }
                let len = (u32::from_be_bytes(h[..4].try_into().unwrap()) & 0x7fff_ffff) as usize;
                let mut rest = vec![0u8; len - 4];
                if c.read_exact(&mut rest).is_err() {
                    break;
                }
                let mut out = Vec::new();
                out.extend_from_slice(&(0x8000_0000u32 | (reply.len() as u32 + 4)).to_be_bytes());
                out.extend_from_slice(&h[4..8]); // xid
                out.extend_from_slice(&reply);
                if c.write_all(&out).is_err() {
                    break;
                }
            });
        }
    });
    port
}

/// A fake server that answers every call with an endless stream of small replies to xids never
/// sent.
fn flooding_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut h = [0u8; 8];
                if c.read_exact(&mut h).is_err() {
                    return;
                }
                let xid = u32::from_be_bytes(h[4..8].try_into().unwrap());
                let mut rec = Vec::new();
                rec.extend_from_slice(&(0x8000_0000u32 | 24).to_be_bytes());
                rec.extend_from_slice(&xid.wrapping_add(1_000_000).to_be_bytes());
                rec.extend_from_slice(&be32(&[1, 0, 0, 0, 0]));
                let many: Vec<u8> = rec.iter().copied().cycle().take(rec.len() * 1000).collect();
                while c.write_all(&many).is_ok() {}
            });
        }
    });
    port
}

#[test]
fn a_flood_of_replies_to_calls_never_made_is_an_error() {
    let port = flooding_server();
    let uri = format!("nfs://127.0.0.1:{port}/export/x.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(open(&uri, &opts()).map(|_| ()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a flood of unknown replies held the open for 60 s");
    let e = r.unwrap_err();
    assert!(e.to_string().contains("calls that were not made"), "{e}");
}

fn be32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

#[test]
fn hostile_server_replies_are_errors() {
    // After the xid: REPLY, MSG_ACCEPTED, null verifier, SUCCESS; then COMPOUND OK, empty tag,
    // 3 results: PUTROOTFH ok, LOOKUP ok, then GETFH with a 4 GiB file handle length.
    let huge_fh = be32(&[1, 0, 0, 0, 0, 0, 0, 3, 24, 0, 15, 0, 10, 0, 0xFFFF_FFF0]);
    // A tag claiming 2 GiB.
    let huge_tag = be32(&[1, 0, 0, 0, 0, 0, 0x8000_0000]);
    // More results than operations sent.
    let many = be32(&[1, 0, 0, 0, 0, 0, 0, 1_000_000]);
    // Not a reply at all.
    let call = be32(&[0, 2, 100003, 4, 1]);
    for (what, reply) in [
        ("huge fh", huge_fh),
        ("huge tag", huge_tag),
        ("many results", many),
        ("call", call),
    ] {
        let port = fake_server(reply);
        let uri = format!("nfs://127.0.0.1:{port}/x?retries=1");
        let e = open(&uri, &opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{what}: {e}");
        assert!(e.to_string().contains("protocol error"), "{what}: {e}");
        eprintln!("{what}: {e}");
    }
}

/// The reply to a one-component path lookup (PUTROOTFH, LOOKUP, GETFH, GETATTR) for a regular
/// file of 1 MiB whose server allows `maxread` bytes per READ.
fn resolve_reply(maxread: u64) -> Vec<u8> {
    let mut v = be32(&[
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        4,
        24,
        0,
        15,
        0,
        10,
        0,
        4,
        0xdead_beef,
        9,
        0,
        2,
    ]);
    // Bitmap: type, change, size, maxread; then 28 bytes of values.
    v.extend(be32(&[
        (1 << 1) | (1 << 3) | (1 << 4) | (1 << 30),
        0,
        28,
        1,
    ]));
    for x in [7u64, 1 << 20, maxread] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// A server that allows only a few bytes per READ is refused at open (each READ is one RPC: a
/// 1-byte maxread turned a 1 MiB read into a million calls and 300 MB of bookkeeping); a small
/// call's reply too large to accept is reported as such, not as a timeout.
#[test]
fn tiny_maxread_and_oversized_replies_are_clear_errors() {
    let port = fake_server(resolve_reply(1));
    let e = open(&format!("nfs://127.0.0.1:{port}/x?retries=0"), &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("only 1 bytes per READ"), "{e}");
    // The same reply with a usable maxread opens (so the reply above is well formed).
    let port = fake_server(resolve_reply(1 << 20));
    open(&format!("nfs://127.0.0.1:{port}/x?retries=0"), &opts()).unwrap();
    // "No timeout" spelt as the largest Duration: no overflow panic.
    let forever = OpenOptions {
        timeout: Some(Duration::MAX),
        ..opts()
    };
    open(&format!("nfs://127.0.0.1:{port}/x?retries=0"), &forever).unwrap();

    let port = fake_server(vec![0u8; 2 << 20]);
    let e = open(&format!("nfs://127.0.0.1:{port}/x?retries=0"), &opts()).unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("protocol error"), "{e}");
}

/// Replies that contradict themselves are refused, not taken at their word: a COMPOUND whose
/// overall status is an error while every operation reports success, bytes after a reply, and
/// an empty file handle (every READ with it would fail as a replaced file).
#[test]
fn self_contradicting_replies_are_errors() {
    let good = resolve_reply(1 << 20);
    let mut failed = good.clone();
    failed[20..24].copy_from_slice(&5u32.to_be_bytes()); // COMPOUND status NFS4ERR_IO
    let mut trailing = good.clone();
    trailing.extend(be32(&[0]));
    let mut empty_fh = good[..56].to_vec();
    empty_fh.extend(be32(&[0])); // fh length 0, no fh word
    empty_fh.extend_from_slice(&good[64..]);
    assert_eq!(&good[56..64], &be32(&[4, 0xdead_beef])[..]);
    for (what, reply, needle) in [
        ("compound status", failed, "NFS4ERR_IO"),
        (
            "trailing bytes",
            trailing,
            "unexpected bytes after the reply",
        ),
        ("empty fh", empty_fh, "empty file handle"),
    ] {
        let port = fake_server(reply);
        let e = open(&format!("nfs://127.0.0.1:{port}/x?retries=0"), &opts()).unwrap_err();
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    open(
        &format!("nfs://127.0.0.1:{}/x?retries=0", fake_server(good)),
        &opts(),
    )
    .unwrap();
}

/// A scripted NFSv4 server for the 1 MiB file of [`resolve_reply`] (byte `i` is `i % 251`) that
/// answers every READ with at most `cap` bytes and no EOF flag before the end — legal (RFC 7530
/// §16.23), and something no real server here can be made to do on demand. Counts the READs.
fn short_read_server(cap: u32) -> (u16, Arc<AtomicUsize>) {
    read_server(cap, 0, Duration::ZERO)
}

/// Like [`short_read_server`], but every READ answer carries `over` bytes more than asked (a
/// protocol violation), and each is sent `pause` after its READ came.
fn read_server(cap: u32, over: u32, pause: Duration) -> (u16, Arc<AtomicUsize>) {
    const SIZE: u64 = 1 << 20;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let reads = Arc::new(AtomicUsize::new(0));
    let r2 = reads.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let reads = r2.clone();
            std::thread::spawn(move || loop {
                let mut h = [0u8; 4];
                if c.read_exact(&mut h).is_err() {
                    break;
                }
                let mut b = vec![0u8; (u32::from_be_bytes(h) & 0x7fff_ffff) as usize];
                if c.read_exact(&mut b).is_err() {
                    break;
                }
                let rd = |at: &mut usize| {
                    let x = u32::from_be_bytes(b[*at..*at + 4].try_into().unwrap());
                    *at += 4;
                    x
                };
                // xid, CALL, rpcvers, prog, vers, proc; credential; verifier; tag, minorversion,
                // op count; the first op.
                let mut at = 0;
                let xid = rd(&mut at);
                at += 24;
                let cl = rd(&mut at) as usize;
                at += cl.div_ceil(4) * 4 + 8 + 12;
                let body = if rd(&mut at) == 24 {
                    resolve_reply(1 << 20) // PUTROOTFH …: the open's lookup
                } else {
                    // PUTFH fh, READ stateid offset count, GETATTR.
                    let fl = rd(&mut at) as usize;
                    at += fl.div_ceil(4) * 4 + 4 + 16;
                    let off = (u64::from(rd(&mut at)) << 32) | u64::from(rd(&mut at));
                    let asked = rd(&mut at);
                    reads.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(pause);
                    let n = asked.min(cap).min((SIZE - off.min(SIZE)) as u32) + over;
                    let eof = off + u64::from(n) >= SIZE;
                    let mut v = be32(&[1, 0, 0, 0, 0, 0, 0, 3, 22, 0, 25, 0, eof as u32, n]);
                    v.extend((0..u64::from(n)).map(|i| ((off + i) % 251) as u8));
                    v.resize(v.len().div_ceil(4) * 4, 0);
                    v.extend(be32(&[9, 0, 2, (1 << 3) | (1 << 4), 0, 16]));
                    for x in [7u64, SIZE] {
                        v.extend_from_slice(&x.to_be_bytes());
                    }
                    v
                };
                let mut out = (0x8000_0000u32 | (body.len() as u32 + 4))
                    .to_be_bytes()
                    .to_vec();
                out.extend_from_slice(&xid.to_be_bytes());
                out.extend_from_slice(&body);
                if c.write_all(&out).is_err() {
                    break;
                }
            });
        }
    });
    (port, reads)
}

/// READs answered with fewer bytes than asked (not at EOF) are continued from where they
/// stopped: the load gets every byte right instead of failing after retries.
#[test]
fn short_reads_are_continued() {
    let (port, reads) = short_read_server(10_000);
    let be = open(
        &format!("nfs://127.0.0.1:{port}/x?retries=0&nconnect=1"),
        &opts(),
    )
    .unwrap();
    let mut buf = vec![0u8; 300_000];
    assert_eq!(be.read_at(1000, &mut buf).unwrap(), buf.len());
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((1000 + i) % 251) as u8));
    assert_eq!(
        reads.load(Ordering::SeqCst),
        30,
        "one READ per 10 000 bytes"
    );
    // Up to the end of the file: the last answer carries EOF.
    let mut tail = vec![0u8; 50_000];
    assert_eq!(be.read_at((1 << 20) - 50_000, &mut tail).unwrap(), 50_000);
    assert!(tail
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (((1 << 20) - 50_000 + i) % 251) as u8));
}

#[test]
fn a_server_breaking_the_protocol_is_not_retried_for_the_whole_budget() {
    // Every READ answered with more bytes than asked: refused, retried on a new connection a
    // few times (a garbled reply may be a one-off), then an error; not a minute of retries.
    let (port, reads) = read_server(u32::MAX, 8, Duration::ZERO);
    let be = open(
        &format!("nfs://127.0.0.1:{port}/x?nconnect=1&retry_for=600"),
        &opts(),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 10_000];
        let _ = tx.send(be.read_at(0, &mut buf));
    });
    let e = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a protocol-breaking server was retried for 60 s")
        .unwrap_err();
    assert!(e.to_string().contains("protocol error"), "{e}");
    assert!(e.to_string().contains("giving up after 3 attempts"), "{e}");
    assert_eq!(reads.load(Ordering::SeqCst), 3);
}

#[test]
fn a_server_answering_a_byte_at_a_time_is_given_up_on() {
    // Every READ answered with one byte: continued (RFC 7530 allows short reads), but not a
    // million times for a megabyte.
    let (port, reads) = short_read_server(1);
    let be = open(
        &format!("nfs://127.0.0.1:{port}/x?retries=0&nconnect=1"),
        &opts(),
    )
    .unwrap();
    let mut small = vec![0u8; 500];
    assert_eq!(be.read_at(7, &mut small).unwrap(), small.len());
    assert!(small
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((7 + i) % 251) as u8));
    let mut buf = vec![0u8; 5000];
    let e = be.read_at(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("fewer bytes than asked"), "{e}");
    assert!(
        reads.load(Ordering::SeqCst) <= 500 + 1025,
        "{reads:?} READs"
    );
}

/// A server answering every READ with 16 KiB, each answer well inside the timeout (300 ms, the
/// timeout 2 s) but at about 53 KiB/s in all: the answers to the READs continuing a short one
/// are no progress of their own, so the connection stalls as under a trickle and the read
/// fails as a timeout after its retry, instead of being read to the end (64 READs for the
/// 1 MiB, at any pace the server likes: 1 KiB every 25 s would have held one READ 7 hours).
#[test]
fn a_server_answering_short_and_slowly_times_out() {
    let (port, reads) = read_server(16 << 10, 0, Duration::from_millis(300));
    let o = OpenOptions {
        timeout: Some(Duration::from_secs(2)),
        ..opts()
    };
    let be = open(
        &format!("nfs://127.0.0.1:{port}/x?retries=1&nconnect=1"),
        &o,
    )
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let e = be.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("short pieces, too slowly"), "{e}");
    assert!(e.to_string().contains("giving up after 2 attempts"), "{e}");
    // Each attempt: the first answer, then those within the 2 s that follow (about 7) and the
    // one after them.
    let n = reads.load(Ordering::SeqCst);
    assert!(n <= 2 * 10, "{n} READs");

    // Answers 1.5 s apart: the stall shows between two of them, and says so too.
    let (port, reads) = read_server(16 << 10, 0, Duration::from_millis(1500));
    let be = open(
        &format!("nfs://127.0.0.1:{port}/x?retries=0&nconnect=1"),
        &o,
    )
    .unwrap();
    let e = be.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("short pieces, too slowly"), "{e}");
    let n = reads.load(Ordering::SeqCst);
    assert!(n <= 3, "{n} READs");
}

#[test]
fn a_filter_never_downloads_skipped_tensors() {
    let g = Ganesha::start();
    let (file, datas) = model_file(&[8 << 20, 8 << 20, 8 << 20], 41);
    g.put("filter.safetensors", &file);
    let p = Proxy::start(g.port, usize::MAX, 0, false);
    let uri = format!("nfs://127.0.0.1:{}/export/filter.safetensors", p.port);
    let be = open(&uri, &opts()).unwrap();
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let mut po = PlanOptions::new(meta.size);
    po.max_gap = 0;
    let plan = Arc::new(plan(&index, &[1], &po).unwrap());
    let (sink, _) = execute(
        be,
        &meta,
        plan.clone(),
        HostSink::new(),
        &EngineOptions::default(),
    )
    .unwrap();
    let (arena, _) = sink.into_parts().unwrap();
    let m = HostModel::new(arena, index, &plan).unwrap();
    assert_eq!(m.len(), 1);
    let t = m.tensors().next().unwrap();
    assert!(t.data == &datas[1][..], "selected tensor differs");
    let wire = p.bytes.load(Ordering::Relaxed);
    // The selected tensor (8 MiB) + the header prefix (64 KiB) + RPC overhead; a skipped tensor
    // would add 8 MiB.
    assert!(
        ((8 << 20)..(9 << 20)).contains(&wire),
        "{wire} bytes came over the wire for one 8 MiB tensor"
    );
}

/// The server goes away after the file was opened and comes back (same port, same export) 3 s
/// later: with the default options (the old ones gave up after about 1.5 s) the load rides the
/// restart out and every byte is right.
#[test]
fn server_restart_between_open_and_load_is_ridden_out() {
    let mut g = Ganesha::start();
    let (file, datas) = model_file(&[20 << 20, 12 << 20], 41);
    let uri = g.put("restart.safetensors", &file);
    let be = open(&uri, &opts()).unwrap();
    assert_eq!(be.read_exact_at(0, 1000).unwrap(), &file[..1000]);
    g.stop();
    let t0 = std::time::Instant::now();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        g.restart();
        eprintln!("server back after {:?}", t0.elapsed());
        g
    });
    let m = load(be, Layout::Mirror).unwrap();
    eprintln!("load done after {:?}", t0.elapsed());
    for (i, t) in m.tensors().enumerate() {
        assert!(
            t.data == &datas[i][..],
            "tensor {i} differs after the restart"
        );
    }
    let _g = back.join().unwrap();
}

/// A server that stays away longer than `retry_for`: the read fails when the time budget is
/// spent (not after the default minute, not at once), saying how long it tried.
#[test]
fn server_down_longer_than_retry_for_fails_when_the_budget_is_spent() {
    let mut g = Ganesha::start();
    let data = pattern(1 << 20, 43);
    let uri = format!("{}?retry_for=1.5", g.put("gone.bin", &data));
    let be = open(&uri, &opts()).unwrap();
    assert_eq!(be.read_exact_at(0, 4096).unwrap(), &data[..4096]);
    g.stop();
    let t0 = std::time::Instant::now();
    let e = be.read_exact_at(0, data.len()).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.is_retryable(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("giving up after") && msg.contains(" s"),
        "{msg}"
    );
    assert!(
        // The last retry starts with at least 0.25 s of the budget left.
        took >= Duration::from_millis(1200) && took < Duration::from_secs(20),
        "gave up after {took:?} with retry_for=1.5"
    );
    // stat() (a small call) keeps to the same budget.
    let e = be.stat().unwrap_err();
    assert!(e.to_string().contains("giving up after"), "{e}");
}

/// The plan of every tensor of the object behind `be`, in 1 MiB reads.
fn plan_all_1mib(be: &Arc<dyn Backend>) -> (ObjectMeta, Arc<Plan>) {
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let mut po = PlanOptions::new(meta.size);
    po.chunk_size = 1 << 20;
    let plan = Arc::new(plan(&index, &sel, &po).unwrap());
    (meta, plan)
}

/// Runs `plan` (8 reads in flight) with a cancel flag set after 500 ms; expects the load to
/// fail and returns its error and how long it took.
fn load_cancelled_after_500ms(
    be: Arc<dyn Backend>,
    meta: &ObjectMeta,
    plan: Arc<Plan>,
) -> (tensorstream_engine::Error, Duration) {
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        c2.store(true, Ordering::SeqCst);
    });
    let eo = EngineOptions {
        queue_depth: 8,
        ring_budget: 16 << 20,
        progress: None,
        cancel: Some(cancel),
    };
    let t0 = std::time::Instant::now();
    let Err(e) = execute(be, meta, plan, HostSink::new(), &eo) else {
        panic!("a load that was cancelled succeeded");
    };
    (e, t0.elapsed())
}

/// The server goes away mid-session and the caller cancels: the load stops at once instead of
/// waiting out the minute of retries (`retry_for`), and says it was cancelled.
#[test]
fn cancel_during_an_outage_does_not_wait_out_the_retries() {
    let mut g = Ganesha::start();
    let (file, _) = model_file(&[6 << 20, 6 << 20], 47);
    let uri = g.put("outage.safetensors", &file);
    let be = open(&uri, &opts()).unwrap();
    let (meta, plan) = plan_all_1mib(&be);
    g.stop();
    let (e, took) = load_cancelled_after_500ms(be, &meta, plan);
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
}

/// The server hangs with READs in flight (frozen: its connections stay open, nothing comes
/// back) and the caller cancels: the load ends as cancelled at once, not when the 30 s request
/// timeout notices the stall, and the backend reads again once the server is back.
#[test]
fn cancel_while_reads_hang_on_a_frozen_server_returns_at_once() {
    let g = Ganesha::start();
    let (file, _) = model_file(&[8 << 20, 8 << 20], 53);
    let uri = g.put("frozen.safetensors", &file);
    let be = open(&uri, &opts()).unwrap();
    let (meta, plan) = plan_all_1mib(&be);
    g.freeze();
    // Whatever happens below, the server must not stay frozen (its kill on drop would hang).
    struct Thaw<'a>(&'a Ganesha);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.thaw();
        }
    }
    let thaw = Thaw(&g);
    let (e, took) = load_cancelled_after_500ms(be.clone(), &meta, plan);
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(
        took < Duration::from_secs(5),
        "cancel with READs in flight took {took:?}"
    );
    drop(thaw);
    // The connections the cancel closed are replaced: the same backend reads the right bytes.
    assert_eq!(be.read_exact_at(0, 1 << 20).unwrap(), &file[..1 << 20]);
}

/// A server that never answers the TCP handshake (its accept queue is full: the kernel drops the
/// SYNs, as a firewall would): opening fails within the 5 s open budget with a timeout, instead
/// of waiting out the 30 s request timeout per attempt (one 5 s connect, then 5 s of retries).
#[test]
fn unanswered_connects_fail_within_the_open_budget() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Connects that complete wait in the accept queue (never accepted); once it is full, a
    // connect gets no answer.
    let mut held = Vec::new();
    let mut full = false;
    for _ in 0..4096 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(
        full,
        "the accept queue never filled ({} connections)",
        held.len()
    );
    let t0 = std::time::Instant::now();
    let uri = format!("nfs://127.0.0.1:{}/export/f", addr.port());
    let e = open(&uri, &opts()).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("cannot connect"), "{e}");
    assert!(
        took < Duration::from_secs(15),
        "open took {took:?} against a 5 s budget"
    );
    drop(l);
}
