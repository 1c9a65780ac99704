//! Stopping the reads of an async reader session (HTTP, S3): a signal every read task waits on
//! beside its work, raised by `abandon`, on drop, and once the load's cancel flag is seen while
//! the engine waits for a completion.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::watch;

/// How often a waiting `wait()` looks at the cancel flag.
const LOOK: Duration = Duration::from_millis(100);

/// The stop signal of one reader session, and the load's cancel flag.
pub(crate) struct Stop {
    tx: watch::Sender<bool>,
    flag: Option<Arc<AtomicBool>>,
}

impl Stop {
    pub(crate) fn new(flag: Option<Arc<AtomicBool>>) -> Self {
        Stop {
            tx: watch::channel(false).0,
            flag,
        }
    }

    /// Stops every read waiting on [`Stop::stopped`] (and any started later).
    pub(crate) fn stop(&self) {
        self.tx.send_replace(true);
    }

    /// A future that completes once the session is stopped: `select!` it against the work.
    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// The next completion from `rx`; looks at the cancel flag meanwhile and stops the session
    /// once it is set (the stopped reads then come back at once). `None`: every sender is gone.
    pub(crate) fn recv<T>(&self, rx: &Receiver<T>) -> Option<T> {
        loop {
            match rx.recv_timeout(LOOK) {
                Ok(d) => return Some(d),
                Err(RecvTimeoutError::Timeout) => {
                    if self
                        .flag
                        .as_ref()
                        .is_some_and(|f| f.load(Ordering::Relaxed))
                    {
                        self.stop();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}
