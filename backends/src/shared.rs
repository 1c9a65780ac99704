//! What the http and s3 backends of one process share: their tokio runtimes and HTTP clients.
//!
//! A sharded checkpoint opens a backend per shard (hundreds), and each used to start its own
//! multi-threaded tokio runtime (threads spawned, then shut down, per shard) and its own HTTP
//! client (a new connection, and over TLS a full handshake, per shard). Here:
//!
//! * **Runtimes**: one per (name, worker-thread count), started by the first backend that asks
//!   for it and kept for the life of the process. A backend's `runtime_threads` still decides the
//!   size of the runtime it runs on. Nothing ever drops these runtimes, so dropping a backend
//!   anywhere (even inside another async runtime) neither blocks nor panics. Work a backend
//!   leaves behind is stopped by its own means (a reader's stop signal, `until_cancelled`),
//!   not by a runtime shutdown.
//! * **Clients**: one per [`ClientKey`] (backend kind, the extra trusted roots, the client
//!   settings, the proxy environment), at most [`MAX_CLIENTS`] kept; past that a client is
//!   built and not kept. Backends with the same key share the client's connection pool and TLS
//!   session cache; a backend given a private CA gets a client that trusts it, and a backend
//!   not given it never gets that client. Idle pooled connections close after reqwest's idle
//!   timeout (90 s) and at most `pool_max_idle_per_host` are kept per host.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Distinct clients kept (see the module docs).
pub(crate) const MAX_CLIENTS: usize = 16;

type Runtimes = HashMap<(&'static str, usize), &'static tokio::runtime::Runtime>;
static RUNTIMES: OnceLock<Mutex<Runtimes>> = OnceLock::new();

/// The process's runtime `name` with `threads` worker threads (threads named `name`).
pub(crate) fn runtime(
    name: &'static str,
    threads: usize,
) -> std::io::Result<&'static tokio::runtime::Runtime> {
    let mut map = RUNTIMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = map.get(&(name, threads)) {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()?;
    // Kept for the life of the process (bounded: one per name and thread count).
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(rt));
    map.insert((name, threads), rt);
    Ok(rt)
}

/// What makes two backends' HTTP clients interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    /// `"http"` or `"s3"` (they build their clients differently).
    pub(crate) kind: &'static str,
    /// The extra trusted roots (DER), in order.
    pub(crate) roots: Vec<Vec<u8>>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) pool_max_idle_per_host: Option<usize>,
    /// The runtime the client's connections run on.
    pub(crate) runtime_threads: usize,
    /// The proxy variables reqwest reads when it builds a client.
    proxy_env: Vec<Option<std::ffi::OsString>>,
}

impl ClientKey {
    pub(crate) fn new(
        kind: &'static str,
        roots: &[rustls::pki_types::CertificateDer<'static>],
        connect_timeout: Option<Duration>,
        pool_max_idle_per_host: Option<usize>,
        runtime_threads: usize,
    ) -> Self {
        const PROXY_VARS: [&str; 9] = [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
            "REQUEST_METHOD",
        ];
        ClientKey {
            kind,
            roots: roots.iter().map(|c| c.as_ref().to_vec()).collect(),
            connect_timeout,
            pool_max_idle_per_host,
            runtime_threads,
            proxy_env: PROXY_VARS.iter().map(std::env::var_os).collect(),
        }
    }
}

static CLIENTS: OnceLock<Mutex<HashMap<ClientKey, reqwest::Client>>> = OnceLock::new();

/// The process's client for `key`, built with `build` when there is none yet. A failure is
/// not kept.
pub(crate) fn client<E>(
    key: ClientKey,
    build: impl FnOnce() -> Result<reqwest::Client, E>,
) -> Result<reqwest::Client, E> {
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    // Built outside the lock; two threads may both build one, and the first kept wins.
    let built = build()?;
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(&key) {
        return Ok(c.clone());
    }
    if map.len() < MAX_CLIENTS {
        map.insert(key, built.clone());
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_runtime_per_name_and_size() {
        let a = runtime("ts-test-rt", 2).unwrap();
        let b = runtime("ts-test-rt", 2).unwrap();
        let c = runtime("ts-test-rt", 3).unwrap();
        assert!(std::ptr::eq(a, b));
        assert!(!std::ptr::eq(a, c));
        assert_eq!(c.metrics().num_workers(), 3);
    }

    #[test]
    fn clients_are_kept_per_key_only() {
        let key = |roots: &[rustls::pki_types::CertificateDer<'static>]| {
            ClientKey::new("test", roots, None, Some(7), 2)
        };
        let mut builds = 0;
        let mut build = || {
            builds += 1;
            let tls = crate::tls::client_config(Vec::new()).unwrap();
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .build()
        };
        client(key(&[]), &mut build).unwrap();
        client(key(&[]), &mut build).unwrap();
        // Other roots: another client.
        let other = vec![rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3])];
        client(key(&other), &mut build).unwrap();
        assert_eq!(builds, 2);
    }
}
