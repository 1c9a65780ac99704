//! The CLI against the real servers that `scripts/test.sh` starts (nginx, s3s-fs, NFS-Ganesha):
//! every fixture loaded through each remote backend must give the manifest's SHA-256 digests.
//!
//! The servers' addresses come from the TS_* variables the test command exports. Without them
//! these tests fail (they never pass silently): run `scripts/test.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/checkpoint.rs"]
mod checkpoint;

#[path = "support/threads.rs"]
mod threads;
use threads::threads_named;

#[path = "../backends/tests/support/proxy.rs"]
mod proxy;

#[path = "support/nfs_relay.rs"]
mod nfs_relay;

fn fixtures() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures"));
    assert!(
        p.join("manifest.json").exists(),
        "fixtures missing at {}",
        p.display()
    );
    p
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests use the servers that scripts/test.sh starts; run scripts/test.sh")
    })
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
        .unwrap()
}

/// Copies every fixture into `dir` under a per-test prefix; returns the names.
fn stage(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut names = Vec::new();
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") || name.ends_with(".tensors") {
            std::fs::copy(&p, dir.join(format!("{prefix}{name}"))).unwrap();
            names.push(name);
        }
    }
    names.sort();
    names
}

/// The CLI.
fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tensorstream"))
}

/// Runs `cmd`; unless it succeeds, fails the test with `what` and the command's stderr.
fn succeed(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn load_json(
    uri: &str,
    name: &str,
    extra: &[&str],
    envs: &[(String, String)],
) -> serde_json::Value {
    let m = manifest();
    let enc = &m["files"][name]["encryption"];
    let mut cmd = cli();
    cmd.args(["load", uri, "--digests", "--json", "--quiet"])
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (k, v)));
    let keyfile;
    if let Some(k) = enc["key_hex"].as_str() {
        keyfile = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(keyfile.path(), k).unwrap();
        cmd.arg("--key-file").arg(keyfile.path());
    }
    if let Some(p) = enc["password"].as_str() {
        cmd.env("TENSORSTREAM_PASSWORD", p);
    }
    let out = succeed(&mut cmd, &format!("load {uri} failed"));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_all(
    base_uri: impl Fn(&str) -> String,
    dir: &Path,
    prefix: &str,
    extra: &[&str],
    envs: &[(String, String)],
) {
    let m = manifest();
    let names = stage(dir, prefix);
    assert!(names.len() >= 7, "expected every fixture, got {names:?}");
    for name in &names {
        let uri = base_uri(&format!("{prefix}{name}"));
        let v = load_json(&uri, name, extra, envs);
        let want = m["files"][name.as_str()]["tensors"].as_array().unwrap();
        let got = v["tensors"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{uri}");
        for w in want {
            // Nested (json-seq) names: the manifest gives the compact JSON path.
            let g = got
                .iter()
                .find(|g| {
                    g["name"] == w["name"]
                        || serde_json::to_string(&g["path"]).ok().as_deref() == w["name"].as_str()
                })
                .unwrap_or_else(|| panic!("{uri}: tensor {} missing", w["name"]));
            assert_eq!(g["sha256"], w["sha256"], "{uri}: {}", w["name"]);
        }
    }
}

#[test]
fn nfs_fixtures_match_manifest() {
    let root = PathBuf::from(env("TS_NFS_ROOT"));
    let port = env("TS_NFS_PORT");
    check_all(
        |n| format!("nfs://127.0.0.1:{port}/export/{n}"),
        &root,
        "cli-",
        &[],
        &[],
    );
}

#[test]
fn s3_fixtures_match_manifest() {
    let root = PathBuf::from(env("TS_S3_ROOT"));
    let endpoint = env("TS_S3_ENDPOINT");
    // A bucket is a directory under the server's root.
    let envs = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    check_all(
        |n| format!("s3://cli-fixtures/{n}"),
        &root.join("cli-fixtures"),
        "",
        &["--s3-endpoint", &endpoint],
        &envs,
    );
}

/// A public bucket (the second s3s-fs, which has no credentials) read with unsigned requests:
/// `--s3-no-sign-request`, or `AWS_NO_SIGN_REQUEST=true`. Credentials in the environment are
/// then not sent (that server would refuse a signed request).
#[test]
fn s3_public_bucket_with_unsigned_requests() {
    let root = PathBuf::from(env("TS_S3_PUBLIC_ROOT"));
    let endpoint = env("TS_S3_PUBLIC_ENDPOINT");
    let keys = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
    ];
    check_all(
        |n| format!("s3://public/{n}"),
        &root.join("public"),
        "",
        &["--s3-endpoint", &endpoint, "--s3-no-sign-request"],
        &keys,
    );
    let name = "mixed.safetensors";
    let uri = format!("s3://public/{name}");
    let mut unsigned = keys.clone();
    unsigned.push(("AWS_NO_SIGN_REQUEST".to_string(), "true".to_string()));
    let v = load_json(&uri, name, &["--s3-endpoint", &endpoint], &unsigned);
    assert!(!v["tensors"].as_array().unwrap().is_empty(), "{v}");
    // Signed (the keys, no option): that server refuses it, so the option is what worked.
    let out = cli()
        .args(["load", &uri, "--quiet", "--s3-endpoint", &endpoint])
        .envs(keys.iter().map(|(k, v)| (k, v)))
        .env_remove("AWS_NO_SIGN_REQUEST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a signed request was served");

    // The server that needs credentials: an unsigned request is denied, and says why.
    let private = PathBuf::from(env("TS_S3_ROOT")).join("cli-unsigned");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::copy(fixtures().join(name), private.join(name)).unwrap();
    let out = cli()
        .args(["load", &format!("s3://cli-unsigned/{name}"), "--quiet"])
        .args([
            "--s3-endpoint",
            &env("TS_S3_ENDPOINT"),
            "--s3-no-sign-request",
        ])
        .envs(keys.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unsigned request") && err.contains("needs credentials"),
        "{err}"
    );
}

#[test]
fn http_fixtures_match_manifest() {
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let url = env("TS_NGINX_URL");
    check_all(
        |n| format!("{url}/cli-fixtures/{n}"),
        &root.join("cli-fixtures"),
        "",
        &["--header", "X-Test: tensorstream"],
        &[],
    );
}

/// Loads `uri` with digests (`extra` options, `envs` environment) and checks that it holds the
/// tensors `want`, in order, with their bytes; returns the JSON rows of the tensors.
fn loaded_as_written(
    uri: &str,
    extra: &[String],
    envs: &[(String, String)],
    want: &[checkpoint::Written],
) -> Vec<serde_json::Value> {
    let out = succeed(
        cli()
            .args(["load", uri, "--digests", "--json", "--quiet"])
            .args(extra)
            .envs(envs.iter().map(|(k, v)| (k, v))),
        &format!("load {uri} failed"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = v["tensors"].as_array().unwrap().clone();
    assert_eq!(got.len(), want.len(), "{uri}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["name"], w.name.as_str(), "{uri}");
        assert_eq!(g["sha256"], w.sha256.as_str(), "{uri}: {}", w.name);
    }
    got
}

/// An object on one server: the directory the server serves it from, its URI, CLI options and
/// environment.
type Remote = (PathBuf, String, Vec<String>, Vec<(String, String)>);

/// `object` in the directory (or bucket) `name` on each server the test command runs: nginx,
/// s3s-fs and Ganesha (its URI with `nfs_query` appended). Each: the directory the server
/// serves it from, its URI, the CLI options and the environment it needs.
fn every_remote(name: &str, object: &str, nfs_query: &str) -> Vec<Remote> {
    let s3_envs = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let (url, nfs_port) = (env("TS_NGINX_URL"), env("TS_NFS_PORT"));
    vec![
        (
            PathBuf::from(env("TS_NGINX_ROOT")).join(name),
            format!("{url}/{name}/{object}"),
            vec![],
            vec![],
        ),
        (
            PathBuf::from(env("TS_S3_ROOT")).join(name),
            format!("s3://{name}/{object}"),
            vec!["--s3-endpoint".to_string(), env("TS_S3_ENDPOINT")],
            s3_envs,
        ),
        (
            PathBuf::from(env("TS_NFS_ROOT")).join(name),
            format!("nfs://127.0.0.1:{nfs_port}/export/{name}/{object}{nfs_query}"),
            vec![],
            vec![],
        ),
    ]
}

/// A URL to a folder that nginx lists (`autoindex`, as `scripts/servers.sh` sets for
/// `/listing/`) gets a web page, 200 to the Range request: the error says the URL names a
/// page, not that nginx lacks range support (it serves the file in that folder by ranges).
#[test]
fn a_directory_listing_from_nginx_is_named_as_a_web_page() {
    let dir = PathBuf::from(env("TS_NGINX_ROOT")).join("listing/models");
    let names = stage(&dir, "");
    let url = env("TS_NGINX_URL");
    let out = cli()
        .args(["inspect", &format!("{url}/listing/models/")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("web page (Content-Type: text/html)") && err.contains("directory listing"),
        "{err}"
    );
    assert!(!err.contains("byte-range"), "{err}");
    succeed(
        cli().args(["inspect", &format!("{url}/listing/models/{}", names[0])]),
        "a file in the listed folder",
    );
}

/// An empty object on each server is named in the error, which says it is empty, without the
/// hint about /proc that only a local file gets (before, every backend got "an empty file (or
/// a special file that reports no size, as those in /proc do)").
#[test]
fn an_empty_remote_object_is_named_without_the_proc_hint() {
    for (dir, uri, extra, envs) in every_remote("cli-empty", "empty.safetensors", "") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
        let out = cli()
            .args(["inspect", &uri])
            .args(&extra)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{uri}: {err}");
        assert!(
            err.contains(&format!("{uri}: the object's size is 0 bytes: it is empty")),
            "{uri}: {err}"
        );
        assert!(!err.contains("/proc"), "{uri}: {err}");
    }
}

/// s3s-fs answers a HEAD of a bucket name it finds bad with a bare 400 (its
/// `InvalidBucketName` body is not sent with a HEAD answer): the error says what a 400 with no
/// reason most often means, instead of only "HTTP 400".
#[test]
fn a_bare_400_from_s3s_fs_hints_at_the_region_and_bucket_name() {
    let out = cli()
        .args(["inspect", "s3://Bad_Bucket/model.safetensors"])
        .args(["--s3-endpoint", &env("TS_S3_ENDPOINT")])
        .env("AWS_ACCESS_KEY_ID", env("TS_S3_ACCESS_KEY"))
        .env("AWS_SECRET_ACCESS_KEY", env("TS_S3_SECRET_KEY"))
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s3://Bad_Bucket/model.safetensors: HEAD failed at ")
            && err.contains(
                "HTTP 400 (Bad Request; the answer to a HEAD carries no reason): on AWS most \
                 often a region that is not the bucket's (set --s3-region or AWS_REGION to the \
                 bucket's region); else check the bucket name and the endpoint"
            ),
        "{err}"
    );
}

/// A FIFO on the NFS server is named as one, not as `type Some(7)` (a Rust Debug dump).
#[test]
fn nfs_special_files_are_named_in_words() {
    let dir = PathBuf::from(env("TS_NFS_ROOT")).join("special-files");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("pipe.safetensors");
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    let uri = format!(
        "nfs://127.0.0.1:{}/export/special-files/pipe.safetensors",
        env("TS_NFS_PORT")
    );
    let out = cli().args(["inspect", &uri]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is a FIFO (named pipe), not a regular file"),
        "{err}"
    );
    assert!(!err.contains("Some("), "a Debug dump: {err}");
}

/// A sharded checkpoint through each remote backend: the shards are found beside the index
/// (same URL directory, bucket prefix, NFS directory; the NFS URI's query is kept) and every
/// tensor's digest matches what was written.
#[test]
fn sharded_checkpoints_load_through_every_remote_backend() {
    let shards: [&[usize]; 3] = [&[1000, 3 << 20], &[17], &[(5 << 20) + 3]];
    for (dir, uri, extra, envs) in
        every_remote("cli-sharded", "model.safetensors.index.json", "?nconnect=2")
    {
        let want = checkpoint::write(&dir, &shards, 11);
        let got = loaded_as_written(&uri, &extra, &envs, &want);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g["shard"], w.file.as_str(), "{uri}");
        }
    }
}

/// The address of a server the test command started, from its URL (`http://127.0.0.1:PORT`).
fn server_addr(url: &str) -> std::net::SocketAddr {
    url.strip_prefix("http://")
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("not an http://HOST:PORT URL: {url}"))
}

/// A checkpoint on a remote store (see [`slow_stores`]) behind a proxy holding every request
/// 100 ms.
struct SlowStore {
    /// "http" or "s3".
    kind: &'static str,
    proxy: proxy::Proxy,
    /// The checkpoint's index, through the proxy.
    uri: String,
    /// What the CLI needs besides the URI (the S3 endpoint: the proxy).
    args: Vec<String>,
    /// The environment it needs (S3 credentials).
    envs: Vec<(String, String)>,
    written: Vec<checkpoint::Written>,
}

/// The checkpoint `name` of `shards` (written with `seed`) on the real nginx and s3s-fs, each
/// behind a proxy that holds every request 100 ms (a store's round trip, so that requests
/// started together are in flight together).
fn slow_stores(name: &str, shards: &[&[usize]], seed: u64) -> Vec<SlowStore> {
    let s3_envs = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let index = "model.safetensors.index.json";
    [
        ("http", env("TS_NGINX_URL"), env("TS_NGINX_ROOT")),
        ("s3", env("TS_S3_ENDPOINT"), env("TS_S3_ROOT")),
    ]
    .into_iter()
    .map(|(kind, url, root)| {
        let written = checkpoint::write(&PathBuf::from(root).join(name), shards, seed);
        let proxy = proxy::Proxy::start(server_addr(&url));
        proxy.set_faults(proxy::Faults {
            delay: Some(std::time::Duration::from_millis(100)),
            ..Default::default()
        });
        let (uri, args, envs) = match kind {
            "http" => (proxy.url(&format!("{name}/{index}")), vec![], vec![]),
            _ => (
                format!("s3://{name}/{index}"),
                vec![
                    "--s3-endpoint".to_string(),
                    format!("http://127.0.0.1:{}", proxy.port()),
                ],
                s3_envs.clone(),
            ),
        };
        SlowStore {
            kind,
            proxy,
            uri,
            args,
            envs,
            written,
        }
    })
    .collect()
}

/// The shards' headers of a checkpoint on an HTTP or S3 store are read 32 shards at a time
/// (eight before: each opening is a few round trips, one after another, and a check of 500
/// small shards on S3 waited on them), and never more than the `--concurrency` given. Counted
/// at a proxy in front of the real nginx and s3s-fs that holds every request 100 ms (a store's
/// round trip, so that openings started together are in flight together) and records the most
/// requests in flight at once.
#[test]
fn remote_shard_headers_are_read_32_at_a_time() {
    let name = "shard-opens";
    let shards: Vec<&[usize]> = vec![&[16, 8]; 40];
    for SlowStore {
        kind,
        proxy,
        uri,
        args: extra,
        envs,
        ..
    } in slow_stores(name, &shards, 31)
    {
        for (concurrency, most) in [(None, 32), (Some("4"), 4)] {
            proxy.reset_peak_in_flight();
            let connections = proxy.connections();
            let mut cmd = cli();
            cmd.args(["inspect", &uri, "--json"])
                .args(&extra)
                .envs(envs.iter().map(|(k, v)| (k, v)));
            if let Some(c) = concurrency {
                cmd.args(["--concurrency", c]);
            }
            let out = succeed(&mut cmd, &format!("inspect {uri}"));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                v["tensors"].as_array().map(Vec::len),
                Some(2 * shards.len()),
                "{kind}"
            );
            let (peak, opened) = (proxy.peak_in_flight(), proxy.connections() - connections);
            // (The connections, for the record: about one per opening in flight, 32 and 4;
            // HTTP took 34 to 38 and 5 to 7 while its calls ran on the calling thread.)
            eprintln!(
                "{kind}, --concurrency {concurrency:?}: {peak} requests in flight at most, \
                 {opened} connections"
            );
            // At most `most` at once; with 32, more than the eight of before (each request is
            // held 100 ms, so the openings started together are in flight together; seen 32,
            // but a loaded machine may start some late, so only more than eight is asked).
            assert!(
                peak <= most && (most < 32 || peak > 8),
                "{kind}, --concurrency {concurrency:?}: {peak} requests in flight at most"
            );
        }
    }
}

/// The small shards of a checkpoint on an HTTP or S3 store load 32 at a time (eight before:
/// each shard's load is a few round trips, one after another), and never more than the
/// `--concurrency` given. Counted at a proxy in front of the real nginx and s3s-fs that holds
/// every request 100 ms and records the most reads of tensor data (GETs of a range past the
/// header, which only the loads send: each shard, larger than what the check reads with its
/// header, holds one tensor read in one GET) in flight at once.
#[test]
fn remote_small_shards_load_32_at_a_time() {
    let name = "shard-lanes";
    let shards: Vec<&[usize]> = vec![&[100 << 10]; 40];
    for SlowStore {
        kind,
        proxy,
        uri,
        args: extra,
        envs,
        written: want,
    } in slow_stores(name, &shards, 37)
    {
        for (concurrency, most) in [(None, 32), (Some("4"), 4)] {
            proxy.reset_peak_in_flight();
            let mut extra = extra.clone();
            if let Some(c) = concurrency {
                extra.extend(["--concurrency".to_string(), c.to_string()]);
            }
            loaded_as_written(&uri, &extra, &envs, &want);
            let peak = proxy.peak_data_reads_in_flight();
            eprintln!(
                "{kind}, --concurrency {concurrency:?}: {peak} tensor reads in flight at most"
            );
            // At most `most` at once; with 32, more than the eight of before (each request is
            // held 100 ms, so the loads started together read together; a loaded machine may
            // start some late, so only more than eight is asked).
            assert!(
                peak <= most && (most < 32 || peak > 8),
                "{kind}, --concurrency {concurrency:?}: {peak} tensor reads in flight at most"
            );
        }
    }
}

/// Lines of the nginx access log (format `METHOD URI STATUS range=RANGE`, see
/// scripts/servers.sh) for `uri` with `method`.
fn request_lines<'a>(
    log: &'a str,
    method: &'a str,
    uri: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    log.lines().filter(move |l| {
        let mut w = l.split(' ');
        w.next() == Some(method) && w.next() == Some(uri)
    })
}

/// Requests for `uri` with `method` in the nginx access log.
fn requests(log: &str, method: &str, uri: &str) -> usize {
    request_lines(log, method, uri).count()
}

/// GETs for `uri` in the nginx access log that ask for a range starting at byte 0: header
/// reads.
fn header_reads(log: &str, uri: &str) -> usize {
    request_lines(log, "GET", uri)
        .filter(|l| l.contains(" range=bytes=0-"))
        .count()
}

/// The real nginx's access log from a mark on: a test counting requests looks only at what was
/// logged after its start, so that it counts right when run again against servers still
/// running (the log keeps what earlier runs asked for the same paths). Other tests running
/// meanwhile log their own paths.
struct AccessLog {
    path: PathBuf,
    from: usize,
}

impl AccessLog {
    fn mark() -> Self {
        let path = PathBuf::from(env("TS_NGINX_ACCESS_LOG"));
        let from = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .len();
        let from = usize::try_from(from).expect("an access log larger than memory");
        AccessLog { path, from }
    }

    /// What was logged since the mark.
    fn since(&self) -> String {
        let all = std::fs::read(&self.path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        let new = all.get(self.from..).unwrap_or_else(|| {
            panic!(
                "{} shrank from {} to {} bytes during the test",
                self.path.display(),
                self.from,
                all.len()
            )
        });
        String::from_utf8_lossy(new).into_owned()
    }
}

/// A shard's header is read once per load or conversion of a checkpoint: the check before any
/// tensor data reads it, and the shard's open later reuses it, as the object's size and
/// version show it unchanged. Counted in the access log of the real nginx.
#[test]
fn sharded_loads_and_conversions_read_each_shard_header_once() {
    let url = env("TS_NGINX_URL");
    let log = AccessLog::mark();
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let shards: [&[usize]; 3] = [&[1000, 3 << 20], &[17, 40], &[(5 << 20) + 3]];
    let out_dir = tempfile::tempdir().unwrap();
    for what in ["load", "convert"] {
        let name = format!("header-once-{what}");
        let want = checkpoint::write(&root.join(&name), &shards, 21);
        let uri = format!("{url}/{name}/model.safetensors.index.json");
        let out_file = out_dir.path().join(format!("{what}.safetensors"));
        let mut cmd = cli();
        match what {
            "load" => cmd.args(["load", &uri, "--digests", "--json", "--quiet"]),
            _ => cmd.arg("convert").arg(&uri).arg(&out_file).arg("--quiet"),
        };
        let out = succeed(&mut cmd, &format!("{what} {uri} failed"));
        // What was loaded or written is right (the check reads what it checks).
        let digests = if what == "load" {
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        } else {
            let out = succeed(
                cli()
                    .arg("load")
                    .arg(&out_file)
                    .args(["--digests", "--json", "--quiet"]),
                "load",
            );
            serde_json::from_slice(&out.stdout).unwrap()
        };
        let got = digests["tensors"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g["sha256"], w.sha256.as_str(), "{what}: {}", w.name);
        }
        let log = log.since();
        for k in 1..=shards.len() {
            let shard = format!("/{name}/{}", checkpoint::shard_name(k, shards.len()));
            assert_eq!(
                header_reads(&log, &shard),
                1,
                "{what}: requests for {shard}:\n{}",
                log.lines()
                    .filter(|l| l.contains(&shard))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// An HTTP object's opening asks the server for its size and version (the HEAD that checks the
/// object and the server's range support), and a load takes them from that answer instead of
/// asking again at once: a sharded load sends the index one HEAD, and each shard two (the
/// check's, and the last look after its bytes landed) and two GETs (its header, its tensors).
/// The shard's load does not ask again what the check asked moments before: it reads pinned
/// to the version the check saw (`If-Match`), so that a shard replaced in between fails its
/// first read (three HEADs per shard before). A shard small enough to come whole with its
/// header (64 KiB) is read once: its load, after the HEAD that finds it unchanged, takes its
/// tensors from the bytes the check read (two HEADs, one GET). Counted in the access log of
/// the real nginx.
#[test]
fn a_sharded_http_load_asks_no_question_twice() {
    let url = env("TS_NGINX_URL");
    let log = AccessLog::mark();
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let name = "heads-per-shard";
    let shards: [&[usize]; 3] = [&[1000, 3000], &[17, 40], &[(1 << 20) + 3]];
    let want = checkpoint::write(&root.join(name), &shards, 23);
    let uri = format!("{url}/{name}/model.safetensors.index.json");
    loaded_as_written(&uri, &[], &[], &want);
    let log = log.since();
    let index = format!("/{name}/model.safetensors.index.json");
    assert_eq!(requests(&log, "HEAD", &index), 1, "HEADs for the index");
    assert_requests_per_shard(&log, &root.join(name), name, shards.len());
}

/// Each of the `n` shards of the checkpoint `name` (in `dir`, served by nginx or s3s-fs) was
/// asked what a load asks, by the log `log` (lines `METHOD /name/file …`, as nginx's access
/// log): the check's HEAD and header read, then for a shard larger than 64 KiB its tensor read
/// (pinned to the version the check saw) and the last look (a HEAD); a smaller one the check
/// read whole, and its load's HEAD finds it unchanged.
fn assert_requests_per_shard(log: &str, dir: &std::path::Path, name: &str, n: usize) {
    for k in 1..=n {
        let file = checkpoint::shard_name(k, n);
        let small = std::fs::metadata(dir.join(&file)).unwrap().len() <= 64 << 10;
        let (heads, gets) = if small { (2, 1) } else { (2, 2) };
        let shard = format!("/{name}/{file}");
        let lines = log
            .lines()
            .filter(|l| l.contains(&shard))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            requests(log, "HEAD", &shard),
            heads,
            "HEADs for {shard}:\n{lines}"
        );
        assert_eq!(
            requests(log, "GET", &shard),
            gets,
            "GETs for {shard}:\n{lines}"
        );
    }
}

/// A sharded load from S3 asks each shard what it asks an HTTP store (see
/// `a_sharded_http_load_asks_no_question_twice`): two HEADs, the check's and the last look
/// (three before: the shard's load asked again what the check asked moments before), and two
/// GETs, its header and its tensors (a small shard: one GET, read whole by the check). Counted
/// at a proxy in front of the real s3s-fs that records every request.
#[test]
fn a_sharded_s3_load_asks_no_question_twice() {
    use std::sync::{Arc, Mutex};
    let name = "s3-heads-per-shard";
    let dir = PathBuf::from(env("TS_S3_ROOT")).join(name);
    let shards: [&[usize]; 3] = [&[1000, 3000], &[17, 40], &[(1 << 20) + 3]];
    let want = checkpoint::write(&dir, &shards, 43);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let proxy = proxy::Proxy::start(server_addr(&env("TS_S3_ENDPOINT")));
    let gate: proxy::Gate = {
        let seen = seen.clone();
        Arc::new(move |method: &str, target: &str, _: Option<&str>| {
            let path = target.split('?').next().unwrap_or(target);
            seen.lock().unwrap().push(format!("{method} {path}"));
            None
        })
    };
    proxy.set_faults(proxy::Faults {
        gate: Some(gate),
        ..Default::default()
    });
    let extra = [
        "--s3-endpoint".to_string(),
        format!("http://127.0.0.1:{}", proxy.port()),
    ];
    let envs = [
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let uri = format!("s3://{name}/model.safetensors.index.json");
    loaded_as_written(&uri, &extra, &envs, &want);
    let log = seen.lock().unwrap().join("\n");
    assert_requests_per_shard(&log, &dir, name, shards.len());
}

/// A shard replaced after the check read its header, before its load reads its tensors,
/// fails the load with `ObjectChanged` naming the shard, on HTTP and S3: the load reads pinned
/// to the version the check saw (it does not ask for the shard's version again). The proxy in
/// front of the real nginx and s3s-fs replaces the shard (same size, other bytes, another
/// modification time) when the shard's first tensor read arrives, before passing it on.
#[test]
fn a_shard_replaced_after_the_check_fails_its_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let name = "shard-replaced-after-check";
    let shards: [&[usize]; 2] = [&[17, 40], &[(1 << 20) + 3]];
    let s3_envs = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    for (kind, url, root) in [
        ("http", env("TS_NGINX_URL"), env("TS_NGINX_ROOT")),
        ("s3", env("TS_S3_ENDPOINT"), env("TS_S3_ROOT")),
    ] {
        let dir = PathBuf::from(root).join(name);
        let written = checkpoint::write(&dir, &shards, 47);
        let file = checkpoint::shard_name(2, shards.len());
        let replaced = Arc::new(AtomicBool::new(false));
        let gate: proxy::Gate = {
            let (replaced, dir, file) = (replaced.clone(), dir.clone(), file.clone());
            let path = format!("/{name}/{file}");
            Arc::new(move |method: &str, target: &str, range: Option<&str>| {
                let tensors = method == "GET"
                    && target.split('?').next() == Some(path.as_str())
                    && range.is_some_and(|r| !r.starts_with("bytes=0-"));
                if tensors && !replaced.swap(true, Ordering::SeqCst) {
                    let t: Vec<(String, Vec<u8>)> = written
                        .iter()
                        .filter(|w| w.file == file)
                        .map(|w| (w.name.clone(), w.bytes.iter().map(|b| !b).collect()))
                        .collect();
                    let new = dir.join(".replacement");
                    checkpoint::write_file(&new, &t);
                    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                    std::fs::File::options()
                        .write(true)
                        .open(&new)
                        .and_then(|f| f.set_modified(later))
                        .unwrap();
                    std::fs::rename(&new, dir.join(&file)).unwrap();
                }
                None
            })
        };
        let proxy = proxy::Proxy::start(server_addr(&url));
        proxy.set_faults(proxy::Faults {
            gate: Some(gate),
            ..Default::default()
        });
        let (uri, args, envs) = match kind {
            "http" => (
                proxy.url(&format!("{name}/model.safetensors.index.json")),
                vec![],
                vec![],
            ),
            _ => (
                format!("s3://{name}/model.safetensors.index.json"),
                vec![
                    "--s3-endpoint".to_string(),
                    format!("http://127.0.0.1:{}", proxy.port()),
                ],
                s3_envs.clone(),
            ),
        };
        let out = cli()
            .args(["load", &uri, "--quiet"])
            .args(&args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            replaced.load(Ordering::SeqCst),
            "{kind}: the shard's tensors were never read: {stderr}"
        );
        eprintln!("{kind}: {}", stderr.trim());
        assert!(
            !out.status.success() && stderr.contains("changed") && stderr.contains(&file),
            "{kind}: a shard replaced after the check did not fail its load ({}): {stderr}",
            out.status
        );
    }
}

/// The calls of `calls` naming `file`: (path walks, GETATTRs by handle, READs at offset 0,
/// READs elsewhere).
fn nfs_calls_for(calls: &[nfs_relay::Call], file: &str) -> (usize, usize, usize, usize) {
    use nfs_relay::Call;
    let mut n = (0, 0, 0, 0);
    for c in calls {
        match c {
            Call::Lookup(f) if f == file => n.0 += 1,
            Call::Getattr(f) if f == file => n.1 += 1,
            Call::Read(f, 0) if f == file => n.2 += 1,
            Call::Read(f, _) if f == file => n.3 += 1,
            _ => {}
        }
    }
    n
}

/// A sharded load from NFS asks each shard's attributes twice: the check's opening (its
/// COMPOUND walks the path and ends with the file's GETATTR, which the check takes as the
/// shard's size and version) and the load's last look after the bytes landed (which walks the
/// path too, so that a file replaced under the name is found). The shard's load opens it by
/// the file handle in the version tag the check saw, without a request (before: the check's
/// opening and a GETATTR, the load's opening and a GETATTR, then the last look's GETATTR: two
/// walks and three GETATTRs per shard). A shard small enough to come whole with its header
/// (64 KiB) is read once, by the check; its load's opening walks the path to find it unchanged
/// (two GETATTRs besides before). Counted at a relay in front of the real Ganesha that notes
/// every call.
#[test]
fn a_sharded_nfs_load_asks_each_shards_attributes_twice() {
    let name = "nfs-calls-per-shard";
    let dir = PathBuf::from(env("TS_NFS_ROOT")).join(name);
    let shards: [&[usize]; 3] = [&[1000, 3000], &[17, 40], &[(1 << 20) + 3]];
    let want = checkpoint::write(&dir, &shards, 53);
    let relay =
        nfs_relay::Relay::start(format!("127.0.0.1:{}", env("TS_NFS_PORT")).parse().unwrap());
    let uri = format!(
        "nfs://127.0.0.1:{}/export/{name}/model.safetensors.index.json",
        relay.port()
    );
    loaded_as_written(&uri, &[], &[], &want);
    let calls = relay.calls();
    for k in 1..=shards.len() {
        let file = checkpoint::shard_name(k, shards.len());
        let small = std::fs::metadata(dir.join(&file)).unwrap().len() <= 64 << 10;
        let (walks, getattrs, header_reads, tensor_reads) = nfs_calls_for(&calls, &file);
        let all: Vec<_> = calls
            .iter()
            .filter(|c| format!("{c:?}").contains(&file))
            .collect();
        assert_eq!(
            (walks, getattrs, header_reads),
            (2, 0, 1),
            "{file}: (path walks, GETATTRs by handle, header READs):\n{all:?}"
        );
        assert_eq!(tensor_reads > 0, !small, "{file}: tensor READs:\n{all:?}");
    }
}

/// A shard replaced after the check read its header, before its load reads its tensors, fails
/// the load with `ObjectChanged` naming the shard, on NFS, whose shard loads read by the file
/// handle the check saw, without walking the path again: a shard rewritten in place (same size,
/// other bytes, a later modification time) fails the READ whose GETATTR shows another change
/// attribute, and one replaced by another file under its name (rename) fails the READ by the old
/// handle (stale) or, where the server still serves the old file by it, the load's last look,
/// which walks the path. The relay in front of the real Ganesha changes the shard when the
/// shard's first tensor READ arrives, before passing it on.
#[test]
fn a_shard_replaced_after_the_check_fails_its_nfs_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let shards: [&[usize]; 2] = [&[17, 40], &[(1 << 20) + 3]];
    for how in ["rewritten", "renamed"] {
        let name = format!("nfs-shard-{how}-after-check");
        let dir = PathBuf::from(env("TS_NFS_ROOT")).join(&name);
        let written = checkpoint::write(&dir, &shards, 59);
        let file = checkpoint::shard_name(2, shards.len());
        let replaced = Arc::new(AtomicBool::new(false));
        let relay =
            nfs_relay::Relay::start(format!("127.0.0.1:{}", env("TS_NFS_PORT")).parse().unwrap());
        relay.set_on_read({
            let (replaced, dir, file) = (replaced.clone(), dir.clone(), file.clone());
            Arc::new(move |f: &str, offset: u64| {
                if f != file || offset == 0 || replaced.swap(true, Ordering::SeqCst) {
                    return;
                }
                let t: Vec<(String, Vec<u8>)> = written
                    .iter()
                    .filter(|w| w.file == file)
                    .map(|w| (w.name.clone(), w.bytes.iter().map(|b| !b).collect()))
                    .collect();
                let path = dir.join(&file);
                let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                if how == "rewritten" {
                    let tmp = dir.join(".replacement");
                    checkpoint::write_file(&tmp, &t);
                    let bytes = std::fs::read(&tmp).unwrap();
                    std::fs::remove_file(&tmp).unwrap();
                    let f = std::fs::File::options().write(true).open(&path).unwrap();
                    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
                    f.set_modified(later).unwrap();
                } else {
                    let new = dir.join(".replacement");
                    checkpoint::write_file(&new, &t);
                    std::fs::File::options()
                        .write(true)
                        .open(&new)
                        .and_then(|f| f.set_modified(later))
                        .unwrap();
                    std::fs::rename(&new, &path).unwrap();
                }
            })
        });
        let uri = format!(
            "nfs://127.0.0.1:{}/export/{name}/model.safetensors.index.json",
            relay.port()
        );
        let out = cli().args(["load", &uri, "--quiet"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            replaced.load(Ordering::SeqCst),
            "{how}: the shard's tensors were never read: {stderr}"
        );
        eprintln!("{how}: {}", stderr.trim());
        assert!(
            !out.status.success() && stderr.contains("changed") && stderr.contains(&file),
            "{how}: a shard {how} after the check did not fail its load ({}): {stderr}",
            out.status
        );
    }
}

/// A proxy variable the HTTP client cannot use is refused (naming it) only for a request it
/// would carry: a host that `NO_PROXY` exempts is asked directly whatever the proxy variables
/// say, so a load from the real nginx and s3s-fs on 127.0.0.1 with `NO_PROXY=127.0.0.1` works
/// (it was refused before), and without `NO_PROXY` the same load is refused.
#[test]
fn an_unusable_proxy_variable_is_no_error_for_a_host_no_proxy_exempts() {
    let name = "proxy-exempt";
    let shards: [&[usize]; 1] = [&[1000, 3000]];
    let s3_envs = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), env("TS_S3_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY".to_string(), env("TS_S3_SECRET_KEY")),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    for (kind, root, uri, extra, mut envs) in [
        (
            "http",
            env("TS_NGINX_ROOT"),
            format!(
                "{}/{name}/model.safetensors.index.json",
                env("TS_NGINX_URL")
            ),
            vec![],
            vec![],
        ),
        (
            "s3",
            env("TS_S3_ROOT"),
            format!("s3://{name}/model.safetensors.index.json"),
            vec!["--s3-endpoint".to_string(), env("TS_S3_ENDPOINT")],
            s3_envs.clone(),
        ),
    ] {
        let want = checkpoint::write(&PathBuf::from(root).join(name), &shards, 67);
        envs.push((
            "HTTP_PROXY".to_string(),
            "http://user:pr0xysecret@bad host:3128".to_string(),
        ));
        let mut cmd = cli();
        cmd.args(["load", &uri, "--quiet"])
            .args(&extra)
            .envs(envs.iter().map(|(k, v)| (k, v)));
        for v in [
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            cmd.env_remove(v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{kind}: {err}");
        assert!(
            err.contains("HTTP_PROXY is set but is not a proxy URL")
                && !err.contains("pr0xysecret"),
            "{kind}: {err}"
        );
        for no_proxy in ["NO_PROXY", "no_proxy"] {
            let mut envs = envs.clone();
            envs.push((no_proxy.to_string(), "localhost,127.0.0.1".to_string()));
            loaded_as_written(&uri, &extra, &envs, &want);
        }
    }
}

/// The folder of fakecuda's libcuda.so (`scripts/fakecuda.sh` builds it), to load to "cuda:0"
/// on a machine without a GPU.
fn fakecuda() -> String {
    let out = succeed(
        &mut Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fakecuda.sh")),
        "building fakecuda (scripts/fakecuda.sh)",
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A sharded GPU load asks an HTTP store what a host load does, per shard (see
/// `a_sharded_http_load_asks_no_question_twice`): the device memory is laid out from the
/// headers the check read, without opening the shards again for it. Against fakecuda.
#[test]
fn a_sharded_http_gpu_load_opens_no_shard_to_lay_out_its_memory() {
    let url = env("TS_NGINX_URL");
    let log = AccessLog::mark();
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let name = "gpu-heads-per-shard";
    let shards: [&[usize]; 4] = [&[1000, 3000], &[17, 40], &[(1 << 20) + 3], &[5, 6, 7]];
    let want = checkpoint::write(&root.join(name), &shards, 29);
    let uri = format!("{url}/{name}/model.safetensors.index.json");
    let gpu = ["--device", "cuda:0"].map(String::from);
    let envs = [
        ("LD_LIBRARY_PATH".to_string(), fakecuda()),
        ("FAKECUDA_DELAY_US".to_string(), "20".to_string()),
    ];
    loaded_as_written(&uri, &gpu, &envs, &want);
    let log = log.since();
    assert_requests_per_shard(&log, &root.join(name), name, shards.len());
}

/// Whether this process runs under fakecuda (its driver library is looked up when the process
/// starts). If not, runs the test `name` alone in a child process of this test binary that
/// does, checks that it passed, and returns `false`: the caller then returns.
fn under_fakecuda(name: &str) -> bool {
    if std::env::var_os("TS_TEST_UNDER_FAKECUDA").is_some() {
        return true;
    }
    let lib = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", fakecuda()),
        _ => fakecuda(),
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", lib)
        .env("FAKECUDA_DELAY_US", "20")
        .env("TS_TEST_UNDER_FAKECUDA", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("test result: ok. 1 passed"),
        "under fakecuda:\n{text}"
    );
    false
}

/// Waits (looking every 5 ms) until `done`, and fails with `what` once `limit` has passed: a
/// bounded wait for an event, not a timing.
fn wait_for(limit: std::time::Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let until = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < until, "{}", what());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// nginx behind a proxy that asks `gate` about each request and strips the version tags (so
/// the check keeps no shard's bytes: each shard's load asks the store), and a GPU load of the
/// checkpoint `name` through it, whose filter holds `marker` (every loader of the load holds a
/// copy: the count drops back once they have all ended).
fn gated_gpu_load(
    url: &str,
    name: &str,
    gate: proxy::Gate,
    marker: &std::sync::Arc<()>,
) -> (proxy::Proxy, tensorstream::Loader) {
    let proxy = proxy::Proxy::start(server_addr(url));
    proxy.set_faults(proxy::Faults {
        strip_etag: true,
        strip_last_modified: true,
        gate: Some(gate),
        ..Default::default()
    });
    let marker = marker.clone();
    let l = tensorstream::Loader::new(proxy.url(&format!("{name}/model.safetensors.index.json")))
        .device(tensorstream::Device::Cuda(0))
        .filter(move |_| {
            let _ = &marker;
            true
        });
    (proxy, l)
}

/// A sharded GPU load whose shard fails while the next shard is being opened gives up the
/// request that opening has in flight and asks the store nothing more for that shard: here
/// shard 2's HEAD, held by the store until the load has returned (shard 1's reads are refused
/// with 404 once that HEAD is in flight). Once the load has returned, the client closes that
/// request's connection (it used to wait for the answer, up to the backend's 30 s timeout);
/// the opening left behind used to go on and read shard 2's header again (the store sends no
/// version tag, so the load compares the header with the one the check read). Shard 3 is never
/// asked for after the check, and the flags' watcher thread (`ts-stop-watch`) ends.
/// Through the library, against fakecuda, in a child process of this test binary (the driver
/// library is looked up when the process starts).
#[test]
fn a_failed_sharded_http_gpu_load_stops_opening_its_next_shard() {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};
    if !under_fakecuda("a_failed_sharded_http_gpu_load_stops_opening_its_next_shard") {
        return;
    }
    let url = env("TS_NGINX_URL");
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let name = "gpu-failed-shard-stops-next";
    let shards: [&[usize]; 3] = [&[1000, 3000], &[17, 40], &[5, 6]];
    checkpoint::write(&root.join(name), &shards, 37);
    let file = |k: usize| format!("/{name}/{}", checkpoint::shard_name(k, shards.len()));
    #[derive(Default)]
    struct State {
        /// Every request, in the order the store got them: (method, path, Range).
        seen: Vec<(String, String, Option<String>)>,
        /// Where in `seen` the load's HEAD of shard 2 (its second) is: held until `release`.
        held: Option<usize>,
        release: bool,
    }
    // Without a cancel flag, and with one (never set: the shards' openings then run on
    // threads of their own, and their backends follow the load's flag too).
    for with_cancel in [false, true] {
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let gate: proxy::Gate = {
            let state = state.clone();
            let (one, two) = (file(1), file(2));
            Arc::new(move |method: &str, path: &str, range: Option<&str>| {
                let (lock, cv) = &*state;
                let mut g = lock.lock().unwrap();
                g.seen
                    .push((method.into(), path.into(), range.map(String::from)));
                let wait = Duration::from_secs(30);
                let heads = |g: &State| {
                    g.seen
                        .iter()
                        .filter(|s| s.0 == "HEAD" && s.1 == two)
                        .count()
                };
                if method == "HEAD" && path == two && heads(&g) == 2 {
                    // The opening of shard 2 while shard 1 loads: answered once the load
                    // returned.
                    g.held = Some(g.seen.len() - 1);
                    cv.notify_all();
                    drop(cv.wait_timeout_while(g, wait, |g| !g.release).unwrap());
                    return None;
                }
                if method == "GET"
                    && path == one
                    && range.is_some_and(|r| !r.starts_with("bytes=0-"))
                {
                    // Shard 1's tensors: refused once shard 2's opening is in flight.
                    drop(
                        cv.wait_timeout_while(g, wait, |g| g.held.is_none())
                            .unwrap(),
                    );
                    return Some(404);
                }
                None
            })
        };
        // Gone once shard 2's opening has ended.
        let marker = Arc::new(());
        let (proxy, l) = gated_gpu_load(&url, name, gate, &marker);
        let l = if with_cancel {
            l.cancel_flag(Arc::new(std::sync::atomic::AtomicBool::new(false)))
        } else {
            l
        };
        let e = l.load_cuda().expect_err("shard 1's tensors were refused");
        drop(l);
        assert!(
            e.to_string()
                .contains(&checkpoint::shard_name(1, shards.len())),
            "cancel flag: {with_cancel}: not shard 1's failure: {e}"
        );
        // The preparation left behind stops its request in flight: the client hangs up on
        // shard 2's HEAD, which the store still holds. (A bounded wait for that event: without
        // it the client waits for the answer until the gate lets it go, after 30 s, or its own
        // timeout.)
        let hung_up = |p: &proxy::Proxy| {
            p.hung_up_while_gated()
                .iter()
                .any(|(m, path)| m == "HEAD" && *path == file(2))
        };
        wait_for(
            Duration::from_secs(10),
            || hung_up(&proxy),
            || {
                format!(
                    "cancel flag: {with_cancel}: shard 2's HEAD, held since before the load \
                     returned, was still awaited by the client 10 s after the load returned \
                     (requests given up while held: {:?})",
                    proxy.hung_up_while_gated()
                )
            },
        );
        let held = {
            let (lock, cv) = &*state;
            let mut g = lock.lock().unwrap();
            g.release = true;
            cv.notify_all();
            g.held.unwrap_or_else(|| {
                panic!(
                    "cancel flag: {with_cancel}: shard 2 was not being opened: {:?}",
                    g.seen
                )
            })
        };
        let until = Instant::now() + Duration::from_secs(30);
        wait_for(
            until.saturating_duration_since(Instant::now()),
            || Arc::strong_count(&marker) == 1,
            || format!("cancel flag: {with_cancel}: shard 2's opening did not end"),
        );
        // No flag's watcher is left behind (this process runs this test alone).
        wait_for(
            until.saturating_duration_since(Instant::now()),
            || threads_named("ts-stop-watch") == 0,
            || format!("cancel flag: {with_cancel}: the flags' watcher (ts-stop-watch) still runs"),
        );
        let g = state.0.lock().unwrap();
        let after: Vec<_> = g.seen[held + 1..]
            .iter()
            .filter(|s| s.1 == file(2) || s.1 == file(3))
            .collect();
        assert!(
            after.is_empty(),
            "cancel flag: {with_cancel}: asked after shard 1 failed, while shard 2's HEAD was in \
             flight: {after:?} (all: {:?})",
            g.seen
        );
    }
}

/// A sharded GPU load cancelled while shard 1 copies (its first tensor read held by the store)
/// and shard 2 is being opened (its HEAD held too) returns `Cancelled`, and the client gives up
/// both requests while the store still holds them; no flag's watcher is left behind. Against
/// fakecuda, in a child process (see `under_fakecuda`).
#[test]
fn a_cancelled_sharded_http_gpu_load_gives_up_its_requests() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;
    if !under_fakecuda("a_cancelled_sharded_http_gpu_load_gives_up_its_requests") {
        return;
    }
    let url = env("TS_NGINX_URL");
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let name = "gpu-cancelled-shards";
    let shards: [&[usize]; 3] = [&[1000, 3000], &[17, 40], &[5, 6]];
    checkpoint::write(&root.join(name), &shards, 41);
    let file = |k: usize| format!("/{name}/{}", checkpoint::shard_name(k, shards.len()));
    #[derive(Default)]
    struct State {
        /// Held until `release`: shard 1's first read of tensor data, shard 2's load-time HEAD
        /// (its second).
        data: bool,
        head: bool,
        heads: usize,
        release: bool,
    }
    let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
    let gate: proxy::Gate = {
        let state = state.clone();
        let (one, two) = (file(1), file(2));
        Arc::new(move |method: &str, path: &str, range: Option<&str>| {
            let (lock, cv) = &*state;
            let mut g = lock.lock().unwrap();
            let held = if method == "HEAD" && path == two {
                g.heads += 1;
                g.heads == 2 && !std::mem::replace(&mut g.head, true)
            } else {
                method == "GET"
                    && path == one
                    && range.is_some_and(|r| !r.starts_with("bytes=0-"))
                    && !std::mem::replace(&mut g.data, true)
            };
            if held {
                cv.notify_all();
                let wait = Duration::from_secs(30);
                drop(cv.wait_timeout_while(g, wait, |g| !g.release).unwrap());
            }
            None
        })
    };
    let cancel = Arc::new(AtomicBool::new(false));
    // Gone once the load's last loader has ended.
    let marker = Arc::new(());
    let (proxy, l) = gated_gpu_load(&url, name, gate, &marker);
    let l = l.cancel_flag(cancel.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(l.load_cuda().map(|_| ()));
    });
    {
        let (lock, cv) = &*state;
        let g = lock.lock().unwrap();
        let (g, _) = cv
            .wait_timeout_while(g, Duration::from_secs(30), |g| !(g.data && g.head))
            .unwrap();
        assert!(
            g.data && g.head,
            "held: shard 1's read {}, shard 2's HEAD {}",
            g.data,
            g.head
        );
    }
    cancel.store(true, Ordering::SeqCst);
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the cancelled load did not return");
    let e = r.expect_err("the load was cancelled");
    assert_eq!(e.kind(), tensorstream::ErrorKind::Cancelled, "{e}");
    // Both requests are given up while the store still holds them (a bounded wait for that).
    let given_up = |p: &proxy::Proxy| {
        let h = p.hung_up_while_gated();
        let has = |m: &str, f: String| h.iter().any(|(hm, hp)| hm == m && *hp == f);
        has("GET", file(1)) && has("HEAD", file(2))
    };
    wait_for(
        Duration::from_secs(10),
        || given_up(&proxy),
        || {
            format!(
                "10 s after the load was cancelled, the client still awaited a held request \
                 (given up: {:?})",
                proxy.hung_up_while_gated()
            )
        },
    );
    {
        let (lock, cv) = &*state;
        lock.lock().unwrap().release = true;
        cv.notify_all();
    }
    wait_for(
        Duration::from_secs(30),
        || Arc::strong_count(&marker) == 1 && threads_named("ts-stop-watch") == 0,
        || {
            format!(
                "the load's loaders ({} left) or the flags' watcher ({} left) did not end",
                Arc::strong_count(&marker) - 1,
                threads_named("ts-stop-watch")
            )
        },
    );
}

/// A tensorizer file converted through each remote backend, verified, read in 1 MiB requests
/// (several side by side per tensor): the output holds the source's bytes.
#[test]
fn verified_conversions_through_every_remote_backend_keep_every_byte() {
    let src_dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(src_dir.path(), &[&[1000, (5 << 20) + 3, 17]], 33);
    let local = src_dir.path().join("src.tensors");
    succeed(
        cli()
            .arg("convert")
            .arg(src_dir.path().join(checkpoint::shard_name(1, 1)))
            .arg(&local)
            .arg("--quiet"),
        "convert",
    );
    let out_dir = tempfile::tempdir().unwrap();
    for (k, (dir, uri, extra, envs)) in every_remote("cli-convert", "src.tensors", "")
        .into_iter()
        .enumerate()
    {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&local, dir.join("src.tensors")).unwrap();
        let dst = out_dir.path().join(format!("out{k}.safetensors"));
        succeed(
            cli()
                .arg("convert")
                .arg(&uri)
                .arg(&dst)
                .args(["--verify", "--chunk-size", "1MiB", "--quiet"])
                .args(&extra)
                .envs(envs.iter().map(|(k, v)| (k, v))),
            &format!("convert {uri}"),
        );
        loaded_as_written(dst.to_str().unwrap(), &[], &[], &want);
    }
}

/// A one-file conversion reads the file's header once too (the conversion reuses what the
/// loader read to select the tensors).
#[test]
fn a_one_file_conversion_reads_the_header_once() {
    let url = env("TS_NGINX_URL");
    let log = AccessLog::mark();
    let root = PathBuf::from(env("TS_NGINX_ROOT"));
    let dir = root.join("header-once-file");
    let want = checkpoint::write(&dir, &[&[1000, 3 << 20]], 23);
    let name = checkpoint::shard_name(1, 1);
    let out_dir = tempfile::tempdir().unwrap();
    let dst = out_dir.path().join("one.safetensors");
    succeed(
        cli()
            .arg("convert")
            .arg(format!("{url}/header-once-file/{name}"))
            .arg(&dst)
            .arg("--quiet"),
        "convert",
    );
    loaded_as_written(dst.to_str().unwrap(), &[], &[], &want);
    let log = log.since();
    let uri = format!("/header-once-file/{name}");
    assert_eq!(header_reads(&log, &uri), 1, "{log}");
}

/// Credentials in a URI (user information, a signed query) and in a `--header` never reach
/// the CLI's output or its messages, whatever the command and whether it succeeds: they show
/// as `http://host/path?…`.
#[test]
fn secrets_in_uris_and_headers_are_never_printed() {
    let root = PathBuf::from(env("TS_NGINX_ROOT")).join("secret-cli");
    stage(&root, "");
    let url = env("TS_NGINX_URL");
    let host = url.strip_prefix("http://").expect("an http:// URL");
    let secret = |name: &str| format!("http://alice:hunter2@{host}/secret-cli/{name}?sig=SECRET");
    let plain = secret("mixed.safetensors");
    let enc = secret("v3_encrypted_key.tensors");
    let runs: Vec<(Vec<String>, bool)> = vec![
        (vec!["inspect".into(), plain.clone()], true),
        (vec!["inspect".into(), plain.clone(), "--json".into()], true),
        (
            vec![
                "load".into(),
                plain.clone(),
                "--json".into(),
                "--quiet".into(),
            ],
            true,
        ),
        (
            vec![
                "load".into(),
                plain.clone(),
                "--filter".into(),
                "zzz".into(),
            ],
            false,
        ),
        (vec!["load".into(), plain.clone(), "--verify".into()], false),
        (vec!["load".into(), enc.clone()], false),
        (vec!["inspect".into(), enc.clone()], true),
        (vec!["inspect".into(), enc, "--verify".into()], false),
        (
            vec![
                "load".into(),
                plain.clone(),
                "--header".into(),
                "Authorization Bearer sk-SECRET".into(),
            ],
            false,
        ),
    ];
    for (args, ok) in runs {
        let out = cli().args(&args).output().unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.success(), ok, "{args:?}: {e}");
        for s in ["hunter2", "SECRET", "alice"] {
            assert!(
                !o.contains(s) && !e.contains(s),
                "{s} shown by {args:?}:\n{o}\n{e}"
            );
        }
        if !ok {
            assert!(!e.trim().is_empty(), "{args:?}: no message");
        }
    }
}
