//! A server that accepts connections and never answers (a hung server, a dead load balancer),
//! counting the connections its clients still hold open. Also used by the facade's tests
//! (`tests/api.rs`, through `#[path]`).
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// See the module docs. The listener lives as long as the test process.
pub struct Blackhole {
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Blackhole {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                std::thread::spawn(move || {
                    // Reads (and drops) whatever comes until the client closes the connection.
                    let mut buf = [0u8; 4096];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Blackhole {
            port,
            accepted,
            open,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the clients have not closed yet.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits up to `within` for the clients to close every connection; true if they did.
    pub fn all_closed_within(&self, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.open() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.open() == 0
    }
}

/// A cancel flag that a thread sets after `delay` (a caller giving up on a silent server), and
/// that thread (join it to be sure it has set the flag).
pub fn cancel_after(delay: Duration) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let flag = Arc::new(AtomicBool::new(false));
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            flag.store(true, Ordering::SeqCst);
        })
    };
    (flag, setter)
}
