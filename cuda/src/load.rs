//! One-call device loads through the engine, waiting for all tensors or streaming them.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tensorstream_engine::{
    execute, Backend, EngineOptions, EngineStats, Error, ErrorKind, ObjectMeta, Plan, Result,
    TensorIndex,
};

use crate::device::CudaDevice;
use crate::model::DeviceModel;
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
    let sink = CudaSink::on(dev.clone());
    let (sink, stats) = execute(backend, meta, plan, sink, opts)?;
    Ok((sink.into_model(index)?, stats))
}

/// A load running on its own thread; iterate it to get each tensor as soon as its bytes are on
/// the device, then [`StreamingLoad::wait`] for the model.
pub struct StreamingLoad {
    rx: Receiver<ReadyTensor>,
    handle: Option<JoinHandle<Result<(DeviceModel, EngineStats)>>>,
    index: Option<Arc<TensorIndex>>,
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
    let mut sink = CudaSink::on(dev.clone());
    let rx = sink.subscribe();
    let shared = Arc::new(index.clone());
    let handle = std::thread::Builder::new()
        .name("ts-cuda-load".into())
        .spawn(move || {
            let (sink, stats) = execute(backend, &meta, plan, sink, &opts)?;
            Ok((sink.into_model(index)?, stats))
        })
        .map_err(|e| Error::from_io(e, "spawning the load thread"))?;
    Ok(StreamingLoad {
        rx,
        handle: Some(handle),
        index: Some(shared),
    })
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
        })
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

impl Iterator for StreamingLoad {
    type Item = ReadyTensor;
    /// The next tensor on the device; `None` once the load finished or failed (then `wait`).
    fn next(&mut self) -> Option<ReadyTensor> {
        self.rx.recv().ok()
    }
}
