//! The HTTP [`RangeReader`]: every submitted read becomes a task on the backend's tokio runtime
//! that runs one version-pinned ranged GET (with resume and retries) straight into the read's
//! [`IoBuf`](tensorstream_engine::IoBuf); a semaphore keeps at most `concurrency` GETs in flight; completions come back
//! over a channel, each with its buffer.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use futures_util::FutureExt;
use tensorstream_engine::{Error, ErrorKind, RangeReader, ReadDone, ReadRequest, Result};
use tokio::sync::Semaphore;

use super::config::Pin;
use super::retry::{fetch_range, Ctx};
use super::Rt;
use crate::stop::Stop;

/// Many ranged GETs in flight for one load, all pinned to one object version.
pub struct HttpReader {
    ctx: Arc<Ctx>,
    rt: Arc<Rt>,
    pin: Arc<Pin>,
    permits: Arc<Semaphore>,
    done_tx: Sender<ReadDone>,
    done_rx: Receiver<ReadDone>,
    in_flight: usize,
    /// Stops every read in flight: on `abandon`, once the load's cancel flag is seen, on drop.
    stop: Stop,
}

impl HttpReader {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        rt: Arc<Rt>,
        pin: Pin,
        flag: Option<Arc<AtomicBool>>,
    ) -> Result<Self> {
        let permits = Arc::new(Semaphore::new(ctx.cfg.concurrency.max(1)));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Ok(HttpReader {
            ctx,
            rt,
            pin: Arc::new(pin),
            permits,
            done_tx,
            done_rx,
            in_flight: 0,
            stop: Stop::new(flag),
        })
    }
}

impl RangeReader for HttpReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        let handle = self.rt.handle()?;
        let ctx = self.ctx.clone();
        let pin = self.pin.clone();
        let permits = self.permits.clone();
        let tx = self.done_tx.clone();
        let stopped = self.stop.stopped();
        handle.spawn(async move {
            let ReadRequest { id, offset, mut buf } = req;
            let range = offset..offset.saturating_add(buf.len() as u64);
            let work = async {
                let _permit = permits
                    .acquire()
                    .await
                    .map_err(|_| Error::new(ErrorKind::Io, "http reader closed"))?;
                let r = fetch_range(&ctx, &pin, offset, buf.as_mut_slice()).await;
                super::let_connection_return().await;
                r
            };
            let result = tokio::select! {
                r = AssertUnwindSafe(work).catch_unwind() => match r {
                    Ok(r) => r,
                    Err(_) => Err(ctx.err(ErrorKind::Io, "http read task panicked").with_range(range)),
                },
                _ = stopped => {
                    Err(ctx.err(ErrorKind::Cancelled, "http read stopped: the load was cancelled or another read failed").with_range(range))
                }
            };
            let _ = tx.send(ReadDone {
                id,
                offset,
                buf,
                result,
            });
        });
        self.in_flight += 1;
        Ok(())
    }

    fn wait(&mut self) -> Result<ReadDone> {
        if self.in_flight == 0 {
            return Err(Error::invalid("wait() with no read in flight"));
        }
        // Reads in backoff or waiting out a `Retry-After` are stopped at once on a cancel.
        let done = self
            .stop
            .recv(&self.done_rx)
            .ok_or_else(|| Error::new(ErrorKind::Io, "http reader channel closed"))?;
        self.in_flight -= 1;
        Ok(done)
    }

    fn abandon(&mut self) {
        self.stop.stop();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for HttpReader {
    fn drop(&mut self) {
        // Stop reads still in flight (their buffers are dropped with the tasks).
        self.stop.stop();
        self.permits.close();
    }
}
