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
//! * **Forked children**: a child process has none of its parent's threads, so the parent's
//!   runtimes would never run its tasks there (and the parent's pooled connections are served
//!   by those tasks). Both are kept per process id: a child forked after a load starts its own
//!   runtimes and clients at its first backend, and forgets (neither drops nor uses) the
//!   parent's.
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

/// What one process keeps: `items` belong to the process `pid`. In another process (a child
/// forked after they were made) they are forgotten and made again.
struct PerProcess<T> {
    pid: u32,
    items: T,
}

impl<T: Default> Default for PerProcess<T> {
    fn default() -> Self {
        PerProcess {
            pid: std::process::id(),
            items: T::default(),
        }
    }
}

impl<T: Default> PerProcess<T> {
    /// The items of the process `pid`. The items of another (the parent of a forked child) are
    /// leaked, not dropped: their runtimes' threads and connections' tasks do not exist here,
    /// and dropping them could wait on those.
    fn of(&mut self, pid: u32) -> &mut T {
        if self.pid != pid {
            std::mem::forget(std::mem::take(&mut self.items));
            self.pid = pid;
        }
        &mut self.items
    }
}

type Runtimes = PerProcess<HashMap<(&'static str, usize), &'static tokio::runtime::Runtime>>;
static RUNTIMES: OnceLock<Mutex<Runtimes>> = OnceLock::new();

/// The process's runtime `name` with `threads` worker threads (threads named `name`).
pub(crate) fn runtime(
    name: &'static str,
    threads: usize,
) -> std::io::Result<&'static tokio::runtime::Runtime> {
    runtime_in(
        RUNTIMES.get_or_init(Default::default),
        std::process::id(),
        name,
        threads,
    )
}

fn runtime_in(
    kept: &Mutex<Runtimes>,
    pid: u32,
    name: &'static str,
    threads: usize,
) -> std::io::Result<&'static tokio::runtime::Runtime> {
    if let Some(rt) = kept
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .of(pid)
        .get(&(name, threads))
    {
        return Ok(rt);
    }
    // Built outside the lock (it starts threads: a child forked meanwhile must not find the
    // lock held for ever); of two built side by side, the first kept wins and the other is
    // shut down without waiting, which is fine in any context.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()?;
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    let map = kept.of(pid);
    if let Some(won) = map.get(&(name, threads)) {
        rt.shutdown_background();
        return Ok(won);
    }
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

type Clients = PerProcess<HashMap<ClientKey, reqwest::Client>>;
static CLIENTS: OnceLock<Mutex<Clients>> = OnceLock::new();

/// The process's client for `key`, built with `build` when there is none yet. A failure is
/// not kept.
pub(crate) fn client<E>(
    key: ClientKey,
    build: impl FnOnce() -> Result<reqwest::Client, E>,
) -> Result<reqwest::Client, E> {
    client_in(
        CLIENTS.get_or_init(Default::default),
        std::process::id(),
        key,
        build,
    )
}

fn client_in<E>(
    cache: &Mutex<Clients>,
    pid: u32,
    key: ClientKey,
    build: impl FnOnce() -> Result<reqwest::Client, E>,
) -> Result<reqwest::Client, E> {
    if let Some(c) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .of(pid)
        .get(&key)
    {
        return Ok(c.clone());
    }
    // Built outside the lock; two threads may both build one, and the first kept wins.
    let built = build()?;
    let mut kept = cache.lock().unwrap_or_else(|p| p.into_inner());
    let map = kept.of(pid);
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

    fn plain_client() -> Result<reqwest::Client, reqwest::Error> {
        let tls = crate::tls::client_config(Vec::new()).unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
    }

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
            plain_client()
        };
        client(key(&[]), &mut build).unwrap();
        client(key(&[]), &mut build).unwrap();
        // Other roots: another client.
        let other = vec![rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3])];
        client(key(&other), &mut build).unwrap();
        assert_eq!(builds, 2);
    }

    /// Backends opened side by side for the first time all get one runtime (the ones built
    /// meanwhile and not kept are shut down).
    #[test]
    fn racing_first_backends_get_one_runtime() {
        let runtimes = Mutex::new(Runtimes::default());
        let start = std::sync::Barrier::new(8);
        let got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let rt = runtime_in(&runtimes, 1, "ts-test-race", 1).unwrap();
                        rt as *const tokio::runtime::Runtime as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|&p| p == got[0]), "{got:?}");
        assert_eq!(runtimes.lock().unwrap().items.len(), 1);
    }

    /// A forked child (another process id) gets runtimes and clients of its own, never its
    /// parent's, whose threads it does not have.
    #[test]
    fn a_forked_child_gets_its_own_runtimes_and_clients() {
        let runtimes = Mutex::new(Runtimes::default());
        let parent = std::process::id();
        let child = parent.wrapping_add(1);
        let a = runtime_in(&runtimes, parent, "ts-test-fork", 1).unwrap();
        assert!(std::ptr::eq(
            a,
            runtime_in(&runtimes, parent, "ts-test-fork", 1).unwrap()
        ));
        let b = runtime_in(&runtimes, child, "ts-test-fork", 1).unwrap();
        assert!(!std::ptr::eq(a, b), "the child got its parent's runtime");
        assert!(std::ptr::eq(
            b,
            runtime_in(&runtimes, child, "ts-test-fork", 1).unwrap()
        ));
        // The child's runtime runs its tasks.
        assert_eq!(b.block_on(b.spawn(async { 7 })).unwrap(), 7);

        let clients = Mutex::new(Clients::default());
        let key = || ClientKey::new("test", &[], None, Some(3), 1);
        let mut builds = 0;
        let mut build = || {
            builds += 1;
            plain_client()
        };
        client_in(&clients, parent, key(), &mut build).unwrap();
        client_in(&clients, parent, key(), &mut build).unwrap();
        client_in(&clients, child, key(), &mut build).unwrap();
        client_in(&clients, child, key(), &mut build).unwrap();
        assert_eq!(builds, 2, "the child used its parent's client");
    }
}
