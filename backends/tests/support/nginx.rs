//! A private nginx on 127.0.0.1 serving a directory: its own config, pid file, logs and temp
//! paths in a temp dir, a free port, started in the foreground and killed by PID on drop.
#![allow(dead_code)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's nginx lives.
const CANDIDATES: &[&str] = &["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"];

/// The nginx binary, or a loud failure telling how to install it.
pub fn nginx_binary() -> PathBuf {
    for c in CANDIDATES {
        if Path::new(c).is_file() {
            return PathBuf::from(c);
        }
    }
    panic!(
        "nginx not installed: run the README's test command (scripts/test.sh) which installs it \
         (Debian package nginx-light or nginx)"
    );
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A running nginx.
pub struct Nginx {
    child: Child,
    port: u16,
    root: PathBuf,
    dir: tempfile::TempDir,
    scheme: &'static str,
}

/// A private test CA and a server certificate for 127.0.0.1 / localhost signed by it.
pub struct TestPki {
    /// The CA certificate (PEM): what a client must trust.
    pub ca_pem: String,
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
}

impl TestPki {
    /// Generates a fresh CA and server certificate (pure Rust, no openssl CLI).
    pub fn generate() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tensorstream test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let key = KeyPair::generate().expect("server key");
        let mut leaf =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        leaf.distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let issuer = Issuer::from_params(&ca, &ca_key);
        let cert = leaf.signed_by(&key, &issuer).expect("server cert");
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Nginx {
    /// Serves `root` on a free port.
    pub fn start(root: &Path) -> Nginx {
        Self::start_with(root, "")
    }

    /// Serves `root`, with `extra` inserted in the `server` block (more `location`s …).
    pub fn start_with(root: &Path, extra: &str) -> Nginx {
        Self::launch(root, extra, None)
    }

    /// Serves `root` over HTTPS with HTTP/2 offered (ALPN), using `pki`'s server certificate.
    /// The access log records the protocol of every request (see [`Nginx::access_log`]).
    pub fn start_tls(root: &Path, pki: &TestPki) -> Nginx {
        Self::launch(root, "", Some(pki))
    }

    /// [`Nginx::start_tls`] with `extra` added to the server block (as [`Nginx::start_with`]).
    pub fn start_tls_with(root: &Path, pki: &TestPki, extra: &str) -> Nginx {
        Self::launch(root, extra, Some(pki))
    }

    fn launch(root: &Path, extra: &str, tls: Option<&TestPki>) -> Nginx {
        let bin = nginx_binary();
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("nginx temp dir");
            let port = free_port();
            let conf = config(dir.path(), root, port, extra, tls);
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let err_log = dir.path().join("error.log");
            let child = Command::new(&bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(&err_log)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut n = Nginx {
                child,
                port,
                root: root.to_path_buf(),
                dir,
                scheme: if tls.is_some() { "https" } else { "http" },
            };
            if n.wait_ready(Duration::from_secs(10)) {
                return n;
            }
            last_log = std::fs::read_to_string(&err_log).unwrap_or_default();
            // Port taken between free_port() and nginx's bind: try another one.
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start; its error log:\n{last_log}");
    }

    fn wait_ready(&mut self, within: Duration) -> bool {
        let t0 = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while t0.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.scheme == "https" {
                // A TLS listener: accepting a connection is all we can check without a client.
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                // A full request proves the server (not some other listener) answers.
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .is_ok()
                {
                    let mut b = [0u8; 12];
                    if std::io::Read::read(&mut s, &mut b)
                        .map(|n| n > 0 && b.starts_with(b"HTTP/1.1"))
                        .unwrap_or(false)
                    {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The port nginx listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `host:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
    /// The URL of `name` under the served root.
    pub fn url(&self, name: &str) -> String {
        format!("{}://127.0.0.1:{}/{}", self.scheme, self.port, name)
    }
    /// The served directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The access log so far (TLS servers only): one line per request,
    /// `PROTOCOL STATUS "REQUEST"`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
    /// nginx's error log so far (for assertion messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // master_process is off: the child is the only nginx process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, root: &Path, port: u16, extra: &str, tls: Option<&TestPki>) -> String {
    let d = dir.display();
    let (listen, tls_conf, access) = match tls {
        None => (
            format!("listen 127.0.0.1:{port};"),
            String::new(),
            "access_log off;".to_string(),
        ),
        Some(p) => {
            std::fs::write(dir.join("cert.pem"), &p.cert_pem).expect("write cert");
            std::fs::write(dir.join("key.pem"), &p.key_pem).expect("write key");
            (
                format!("listen 127.0.0.1:{port} ssl http2;"),
                format!("ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;"),
                format!(
                    "log_format proto '$server_protocol $status \"$request\"'; access_log {d}/access.log proto;"
                ),
            )
        }
    };
    let tmp = dir.join("tmp");
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = std::fs::create_dir_all(tmp.join(sub));
    }
    let t = tmp.display();
    format!(
        r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {access}
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        {listen}
        {tls_conf}
        server_name localhost;
        root {root};
        location / {{ }}
        {extra}
    }}
}}
"#,
        root = root.display()
    )
}
