//! A private s3s-fs (S3-compatible server over a directory) on 127.0.0.1: a temp root (a bucket
//! is a directory under it), a free port, fixed test credentials; killed by PID on drop.
//!
//! Objects are uploaded with PUT through OpenDAL (not by writing files into the root): s3s-fs
//! stores the ETag at PUT time, while for files dropped into the root it would hash the whole
//! file on every GET.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorstream_backends::s3::{S3Backend, S3Config, S3Location};
use tensorstream_backends::OpenOptions;

/// Test access key.
pub const ACCESS_KEY: &str = "tensorstream-test-ak";
/// Test secret key.
pub const SECRET_KEY: &str = "tensorstream-test-sk-0123456789";

/// The s3s-fs binary, or a loud failure telling how to install it.
pub fn s3s_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("S3S_FS") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/s3s-fs"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("s3s-fs")));
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs not installed: run the README's test command (scripts/test.sh), which runs \
                 `cargo install s3s-fs --version 0.14.1 --features binary --locked`"
            )
        })
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A running s3s-fs.
pub struct S3s {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    /// Started without credentials: it serves unsigned requests (a public bucket's server).
    public: bool,
}

/// Waits until s3s-fs answers on `port` as itself: its S3 answer to an unsigned `GET /`, so that
/// a foreign listener that took the port is not mistaken for it.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start ({status})"));
        }
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut answer = String::new();
            if c.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .is_ok()
            {
                let _ = c.read_to_string(&mut answer);
            }
            // (A server without credentials lists its buckets instead.)
            if answer.contains("<Error><Code>") || answer.contains("<ListAllMyBucketsResult") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("no S3 answer within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl S3s {
    /// Starts s3s-fs on a free port over a fresh temp root and waits until it answers. A port
    /// taken between choosing and binding it is retried with another (three tries).
    pub fn start() -> S3s {
        Self::launch(false)
    }

    /// Like [`S3s::start`], but without credentials: s3s-fs then serves unsigned requests, as
    /// a public bucket does (and refuses signed ones). Uploads go unsigned too.
    pub fn start_public() -> S3s {
        Self::launch(true)
    }

    fn launch(public: bool) -> S3s {
        let bin = s3s_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("create root");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // The uploads' own HTTP client: no pool shared with the backends under test. (reqwest
        // built without a default TLS provider panics unless one is installed first.)
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = reqwest::Client::builder().build().expect("HTTP client");
        let mut tries = 0;
        loop {
            tries += 1;
            let log = std::fs::File::create(dir.path().join("s3s.log")).expect("log file");
            let log2 = log.try_clone().expect("log file");
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
            if !public {
                cmd.args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY]);
            }
            let mut child = cmd
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return S3s {
                        child,
                        port,
                        dir,
                        rt,
                        client,
                        public,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.path().join("s3s.log"));
                    if tries == 3 {
                        panic!(
                            "s3s-fs on port {port}: {why}; log:\n{}",
                            log.unwrap_or_default()
                        );
                    }
                }
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s.log")).unwrap_or_default()
    }

    /// Its socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory served (a bucket is a directory under it).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Creates bucket `name` (a directory under the root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root().join(name)).expect("create bucket dir");
    }

    /// Settings for this server with the test credentials (unsigned requests for a public
    /// server, unless `opts` says otherwise), endpoint `endpoint` (this server, or a proxy in
    /// front of it) and `opts` for the rest. The process environment is not read.
    pub fn config_for(&self, endpoint: &str, opts: &OpenOptions) -> S3Config {
        let opts = OpenOptions {
            s3_endpoint: Some(endpoint.to_string()),
            s3_no_sign_request: opts.s3_no_sign_request.or(Some(self.public)),
            ..opts.clone()
        };
        S3Config::resolve(&opts, &|name| match name {
            "AWS_ACCESS_KEY_ID" => Some(ACCESS_KEY.to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some(SECRET_KEY.to_string()),
            _ => None,
        })
        .expect("valid S3 settings")
    }

    /// A backend for `s3://bucket/key` on this server.
    pub fn backend(&self, bucket: &str, key: &str, opts: &OpenOptions) -> Arc<S3Backend> {
        self.backend_via(&self.endpoint(), bucket, key, opts)
    }

    /// A backend for `s3://bucket/key` reached through `endpoint` (e.g. a proxy).
    pub fn backend_via(
        &self,
        endpoint: &str,
        bucket: &str,
        key: &str,
        opts: &OpenOptions,
    ) -> Arc<S3Backend> {
        let loc = S3Location::parse(&format!("s3://{bucket}/{key}")).expect("valid uri");
        Arc::new(S3Backend::with_config(loc, self.config_for(endpoint, opts)).expect("backend"))
    }

    /// An OpenDAL operator on `bucket` (for uploads).
    pub fn operator(&self, bucket: &str) -> opendal::Operator {
        let _g = self.rt.enter();
        let b = opendal::services::S3::default()
            .root("/")
            .bucket(bucket)
            .region("us-east-1")
            .endpoint(&self.endpoint());
        let b = if self.public {
            b.skip_signature()
        } else {
            b.access_key_id(ACCESS_KEY).secret_access_key(SECRET_KEY)
        };
        // Uploads are set-up, not what is tested: a keep-alive race with the server is retried.
        let ctx = opendal::OperationContext::default().with_http_transport(
            opendal::HttpTransporter::new(opendal_http_transport_reqwest::ReqwestTransport::new(
                self.client.clone(),
            )),
        );
        opendal::Operator::new(b)
            .expect("operator")
            .with_context(ctx)
            .layer(opendal::layers::RetryLayer::new().with_max_times(3))
    }

    /// Uploads `data` as `bucket/key` with PUT (creating the bucket directory if needed).
    pub fn put(&self, bucket: &str, key: &str, data: Vec<u8>) {
        self.create_bucket(bucket);
        let op = self.operator(bucket);
        self.rt
            .block_on(async move { op.write(key, data).await })
            .unwrap_or_else(|e| panic!("PUT {bucket}/{key}: {e}\nserver log:\n{}", self.log()));
    }

    /// Deletes `bucket/key`.
    pub fn delete(&self, bucket: &str, key: &str) {
        let op = self.operator(bucket);
        self.rt
            .block_on(async move { op.delete(key).await })
            .unwrap_or_else(|e| panic!("DELETE {bucket}/{key}: {e}"));
    }
}

impl Drop for S3s {
    fn drop(&mut self) {
        // Child::kill signals exactly this child's PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
