//! What the http and s3 backends of one process share (runtimes, HTTP clients): a sharded
//! checkpoint opens a backend per shard, so per-backend threads and connections add up. A test
//! file of its own: it counts the process's threads and sockets, which other tests running beside
//! it in one process would change.
#![cfg(any(feature = "http", feature = "s3"))]

mod support;

/// Threads of this process whose name is `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Open sockets of this process.
#[cfg(feature = "http")]
fn sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Resident memory of this process, in KiB.
#[cfg(feature = "http")]
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Backends of one host (a sharded checkpoint's shards) share the runtime and the connection
/// pool; many rounds of opening, reading and dropping them leave no threads, sockets or
/// memory behind.
#[cfg(feature = "http")]
#[test]
fn http_backends_share_runtime_and_connections() {
    use std::sync::Arc;
    use support::nginx::Nginx;
    use tensorstream_backends::http::{HttpBackend, HttpConfig};
    use tensorstream_engine::Backend;

    let root = tempfile::tempdir().unwrap();
    const SHARDS: usize = 16;
    for i in 0..SHARDS {
        std::fs::write(root.path().join(format!("s{i}")), vec![i as u8; 4096]).unwrap();
    }
    let nginx = Nginx::start(root.path());
    let cfg = HttpConfig::default();
    let threads = cfg.runtime_threads;
    let open_all = || -> Vec<Arc<HttpBackend>> {
        (0..SHARDS)
            .map(|i| {
                Arc::new(HttpBackend::open_with(&nginx.url(&format!("s{i}")), cfg.clone()).unwrap())
            })
            .collect()
    };
    let sockets_before = sockets();
    let shards = open_all();
    // One runtime of the configured size for all of them (was one per backend: 32 threads).
    assert_eq!(threads_named("ts-http"), threads);
    // Their opening requests went one after another over one pooled connection (was one
    // connection per backend).
    let opened = sockets() - sockets_before;
    assert!(
        opened <= 2,
        "{opened} sockets for {SHARDS} backends of one host"
    );
    drop(shards);

    let round = || {
        let shards = open_all();
        for (i, b) in shards.iter().enumerate() {
            let mut buf = vec![0u8; 4096];
            assert_eq!(b.read_at(0, &mut buf).unwrap(), 4096);
            assert!(buf.iter().all(|&x| x == i as u8));
        }
    };
    round();
    let (sockets_1, rss_1) = (sockets(), rss_kib());
    for _ in 0..50 {
        round();
    }
    let (sockets_50, rss_50) = (sockets(), rss_kib());
    eprintln!(
        "after 1 round: {sockets_1} sockets, {rss_1} KiB resident; after 51: {sockets_50} \
         sockets, {rss_50} KiB resident"
    );
    assert_eq!(threads_named("ts-http"), threads);
    // A leak grows with the rounds (a socket per backend or per round: 50 or more here). A
    // few more may be open without one: hyper puts a connection back in the pool a moment
    // after its answer, and a request meanwhile opens another, which the pool then keeps
    // (seen: 1 then 4 on two busy cores, failing a bound of one more about one run in five,
    // before and after the pool kept twice `concurrency` idle).
    assert!(
        sockets_50 <= sockets_1 + 8,
        "sockets leak: {sockets_1} then {sockets_50}"
    );
    assert!(
        rss_50 < rss_1 + 32 * 1024,
        "memory grows: {rss_1} KiB then {rss_50} KiB"
    );
}

/// S3 backends run on the process's S3 runtime: opening many starts no threads of their own.
#[cfg(feature = "s3")]
#[test]
fn s3_backends_share_one_runtime() {
    use tensorstream_backends::s3::{S3Backend, S3Config, S3Location};
    use tensorstream_backends::OpenOptions;

    let opts = OpenOptions {
        s3_endpoint: Some("http://127.0.0.1:9".into()),
        ..OpenOptions::default()
    };
    let cfg = S3Config::resolve(&opts, &|name| match name {
        "AWS_ACCESS_KEY_ID" => Some("k".into()),
        "AWS_SECRET_ACCESS_KEY" => Some("s".into()),
        _ => None,
    })
    .unwrap();
    let backends: Vec<S3Backend> = (0..16)
        .map(|i| {
            S3Backend::with_config(
                S3Location::parse(&format!("s3://bkt/shard-{i}")).unwrap(),
                cfg.clone(),
            )
            .unwrap()
        })
        .collect();
    let n = threads_named("ts-s3");
    // (The runtime has 2 to 8 workers; 16 runtimes had at least 32.)
    assert!(
        (2..=8).contains(&n),
        "{n} S3 runtime threads for 16 backends"
    );
    // Dropping them inside another runtime neither blocks nor panics.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move { drop(backends) });
    assert_eq!(threads_named("ts-s3"), n);
}
