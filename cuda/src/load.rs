//! One-call device loads through the engine, waiting for all tensors or streaming them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tensorstream_engine::{
    execute, Backend, EngineOptions, EngineStats, Error, ErrorKind, ObjectMeta, Plan, Result,
    TensorIndex,
};

use crate::device::CudaDevice;
use crate::model::{DeviceModel, Target};
use crate::sink::CudaSink;
use crate::tracker::ReadyTensor;

/// Loads `plan` (a `Layout::Packed` plan whose chunk size is at most the slot size) from
/// `backend` onto `dev`, waiting for every tensor.
pub fn load(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    meta: &ObjectMeta,
    index: TensorIndex,
    plan: Arc<Plan>,
    opts: &EngineOptions,
) -> Result<(DeviceModel, EngineStats)> {
    load_to(dev, backend, meta, index, plan, opts, Target::default())
}

/// [`load`] into `target`: device memory given beforehand (a window of a shared allocation),
/// and a subscriber told of each tensor as it lands.
pub fn load_to(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    meta: &ObjectMeta,
    index: TensorIndex,
    plan: Arc<Plan>,
    opts: &EngineOptions,
    target: Target,
) -> Result<(DeviceModel, EngineStats)> {
    let sink = CudaSink::with_target(dev.clone(), target);
    let (sink, stats) = execute(backend, meta, plan, sink, opts)?;
    Ok((sink.into_model(index)?, stats))
}

/// A load running on its own thread; iterate it to get each tensor as soon as its bytes are on
/// the device, then [`StreamingLoad::wait`] for the model. Dropping it before `wait` stops the
/// load when it was given a stop flag ([`StreamingLoad::with_stop`]; the `Loader`'s streaming
/// loads have one): its reads and copies end, and its device memory is freed on its thread.
pub struct StreamingLoad {
    rx: Receiver<ReadyTensor>,
    handle: Option<JoinHandle<Result<(DeviceModel, EngineStats)>>>,
    index: Option<Arc<TensorIndex>>,
    stop: Option<Arc<AtomicBool>>,
}

/// Starts a load on a thread and returns at once.
pub fn load_streaming(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    meta: ObjectMeta,
    index: TensorIndex,
    plan: Arc<Plan>,
    opts: EngineOptions,
) -> Result<StreamingLoad> {
    let dev = dev.clone();
    let shared = index.clone();
    StreamingLoad::spawn(move |tx| {
        let target = Target {
            arena: None,
            subscriber: Some(tx),
        };
        load_to(&dev, backend, &meta, index, plan, &opts, target)
    })
    .map(|s| s.with_index(shared))
}

impl std::fmt::Debug for StreamingLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingLoad")
            .field("running", &self.handle.is_some())
            .field("tensors", &self.index.as_ref().map(|i| i.tensors.len()))
            .finish_non_exhaustive()
    }
}

impl StreamingLoad {
    /// Runs `load` on its own thread and returns at once; `load` sends each tensor to the
    /// sender it is given as soon as it is on the device.
    pub fn spawn<F>(load: F) -> Result<Self>
    where
        F: FnOnce(Sender<ReadyTensor>) -> Result<(DeviceModel, EngineStats)> + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("ts-cuda-load".into())
            .spawn(move || load(tx))
            .map_err(|e| Error::from_io(e, "spawning the load thread"))?;
        Ok(StreamingLoad {
            rx,
            handle: Some(handle),
            index: None,
            stop: None,
        })
    }

    /// The flag the load stops on (its engine's cancel flag): set when this handle is dropped
    /// before [`StreamingLoad::wait`], or by [`StreamingLoad::stop`].
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Asks the load to stop (with a stop flag: see [`StreamingLoad::with_stop`]); `wait` then
    /// returns its `Cancelled` error, or the model if it had finished.
    pub fn stop(&self) {
        if let Some(s) = &self.stop {
            s.store(true, Ordering::SeqCst);
        }
    }

    /// Attaches the index of the file being loaded, for [`StreamingLoad::index`].
    pub fn with_index(mut self, index: TensorIndex) -> Self {
        self.index = Some(Arc::new(index));
        self
    }

    /// The index of the file being loaded (names, dtypes, shapes): [`ReadyTensor::tensor`]
    /// indexes its `tensors`. Take it before iterating (the iteration borrows the load):
    /// `let index = load.index().unwrap(); for t in &mut load { index.tensors[t.tensor].name … }`.
    /// `None` only for loads started with [`StreamingLoad::spawn`] without
    /// [`StreamingLoad::with_index`].
    pub fn index(&self) -> Option<Arc<TensorIndex>> {
        self.index.clone()
    }

    /// Waits for the load to end; the model, or the error that stopped it.
    pub fn wait(mut self) -> Result<(DeviceModel, EngineStats)> {
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "load thread panicked"))?,
            None => Err(Error::invalid("load already waited for")),
        }
    }
}

impl Drop for StreamingLoad {
    fn drop(&mut self) {
        // Not waited for: nobody will take the model, so stop the load (it frees what it holds
        // on its own thread, which is not joined here).
        if self.handle.is_some() {
            self.stop();
        }
    }
}

impl Iterator for StreamingLoad {
    type Item = ReadyTensor;
    /// The next tensor on the device; `None` once the load finished or failed (then `wait`).
    fn next(&mut self) -> Option<ReadyTensor> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs a stand-in load (no GPU needed) that ends only when its stop flag is set, and
    /// reports how it ended.
    fn stoppable() -> (StreamingLoad, crossbeam_channel::Receiver<&'static str>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (tell, told) = crossbeam_channel::bounded(1);
        let seen = stop.clone();
        let load = StreamingLoad::spawn(move |_tx| {
            let t = std::time::Instant::now();
            while !seen.load(Ordering::SeqCst) {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = tell.send("never stopped");
                    return Err(Error::new(ErrorKind::Timeout, "never stopped"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = tell.send("stopped");
            Err(Error::new(ErrorKind::Cancelled, "stopped"))
        })
        .unwrap()
        .with_stop(stop);
        (load, told)
    }

    #[test]
    fn dropping_a_streaming_load_stops_it() {
        let (load, told) = stoppable();
        drop(load);
        assert_eq!(told.recv_timeout(Duration::from_secs(10)), Ok("stopped"));
    }

    #[test]
    fn stop_ends_a_streaming_load_and_wait_reports_it() {
        let (load, told) = stoppable();
        load.stop();
        assert_eq!(told.recv_timeout(Duration::from_secs(10)), Ok("stopped"));
        assert_eq!(load.wait().unwrap_err().kind(), ErrorKind::Cancelled);
    }

    #[test]
    fn waiting_does_not_stop_a_streaming_load() {
        // `wait` takes the handle: the drop that follows must not set the flag.
        let stop = Arc::new(AtomicBool::new(false));
        let load = StreamingLoad::spawn(move |_tx| Err(Error::invalid("done")))
            .unwrap()
            .with_stop(stop.clone());
        assert_eq!(load.wait().unwrap_err().kind(), ErrorKind::InvalidInput);
        assert!(!stop.load(Ordering::SeqCst));
    }
}
