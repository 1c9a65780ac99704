//! One-call device loads through the engine, waiting for all tensors or streaming them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    let _keep = crate::raw::driver::KeepCurrent::now();
    let sink = CudaSink::with_target(dev.clone(), target);
    let (sink, stats) = execute(backend, meta, plan, sink, opts)?;
    Ok((sink.into_model(index)?, stats))
}

/// Holds the device memory of a streaming load ([`Target::keep`]) until the load's outcome is
/// taken: [`StreamingLoad::wait`] lets go of it once the load has ended (a finished load's model
/// owns the memory from then on; a failed load's is freed there), and so does dropping the
/// [`StreamingLoad`]. So a streamed tensor's pointer stays valid until then even if a later read
/// fails, and a model's [`DeviceModel::release`] is not held up afterwards.
#[derive(Clone, Default)]
pub struct Keeper(Arc<Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>>);

impl Keeper {
    /// Holds a share of `memory` (a device allocation, or a window of one).
    pub fn hold<T: Send + Sync + 'static>(&self, memory: Arc<T>) {
        if let Ok(mut held) = self.0.lock() {
            held.push(memory);
        }
    }
    /// Lets go of everything held (the memory is freed where this was its last share).
    pub fn release(&self) {
        let held = self.0.lock().map(|mut v| std::mem::take(&mut *v));
        drop(held);
    }
    /// How many shares are held.
    pub fn held(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keeper({} held)", self.held())
    }
}

/// A load running on its own thread; iterate it to get each tensor as soon as its bytes are on
/// the device, then [`StreamingLoad::wait`] for the model. Dropping it before `wait` stops the
/// load when it was given a stop flag ([`StreamingLoad::with_stop`]; the `Loader`'s streaming
/// loads have one, and so do [`load_streaming`]'s without a caller's cancel flag): its reads
/// and copies end, and its device memory is freed; the drop waits for that, up to
/// [`DROP_WAIT`].
///
/// A streamed tensor's device pointer ([`ReadyTensor::ptr`]) stays valid until `wait` returns
/// (and then, if the load succeeded, for as long as the model lives), even if the load fails
/// after announcing it — for loads started with [`load_streaming`] or by a `Loader`, and for
/// [`StreamingLoad::spawn`]ed ones that hold their memory in the handle's
/// [`StreamingLoad::keeper`]. When a failed load's memory is freed, the device is synchronized
/// first, so kernels already launched on streamed tensors finish.
pub struct StreamingLoad {
    rx: Receiver<ReadyTensor>,
    handle: Option<JoinHandle<Result<(DeviceModel, EngineStats)>>>,
    index: Option<Arc<TensorIndex>>,
    stop: Option<Arc<AtomicBool>>,
    keeper: Keeper,
    /// Alive while the load's thread runs its load (see [`crate::device::LoadToken`]).
    running: Weak<crate::device::LoadToken>,
}

/// How long dropping a running [`StreamingLoad`] that has a stop flag waits for its thread to
/// stop (and free what it holds) before leaving it to finish on its own.
pub const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts a load on a thread and returns at once. Dropping the handle before
/// [`StreamingLoad::wait`] stops the load if `opts.cancel` is `None` (it then gets a stop flag
/// of its own); a caller's cancel flag is left to the caller.
pub fn load_streaming(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    meta: ObjectMeta,
    index: TensorIndex,
    plan: Arc<Plan>,
    mut opts: EngineOptions,
) -> Result<StreamingLoad> {
    let dev = dev.clone();
    let shared = index.clone();
    let keeper = Keeper::default();
    let keep = keeper.clone();
    let stop = match opts.cancel {
        Some(_) => None,
        None => {
            let flag = Arc::new(AtomicBool::new(false));
            opts.cancel = Some(flag.clone());
            Some(flag)
        }
    };
    let s = StreamingLoad::spawn(move |tx| {
        let target = Target {
            arena: None,
            subscriber: Some(tx),
            keep: Some(keep),
        };
        load_to(&dev, backend, &meta, index, plan, &opts, target)
    })?
    .with_index(shared)
    .with_keeper(keeper);
    Ok(match stop {
        Some(flag) => s.with_stop(flag),
        None => s,
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
        let token = Arc::new(crate::device::LoadToken::default());
        let running = Arc::downgrade(&token);
        let handle = std::thread::Builder::new()
            .name("ts-cuda-load".into())
            .spawn(move || {
                // The device learns from the token which load holds its slots; the token goes
                // when the load has returned (and, for a load whose handle was dropped, after
                // what it returned is freed, so that its device memory is gone too).
                crate::device::LoadToken::enter(&token);
                let r = load(tx);
                if token.is_left() {
                    drop(r);
                    return Err(Error::new(
                        ErrorKind::Cancelled,
                        "the load's handle was dropped",
                    ));
                }
                r
            })
            .map_err(|e| Error::from_io(e, "spawning the load thread"))?;
        Ok(StreamingLoad {
            rx,
            handle: Some(handle),
            index: None,
            stop: None,
            keeper: Keeper::default(),
            running,
        })
    }

    /// Uses `keeper` (given to the load, e.g. in its [`Target::keep`]) to hold the load's
    /// device memory until [`StreamingLoad::wait`] returns or this handle is dropped.
    pub fn with_keeper(mut self, keeper: Keeper) -> Self {
        self.keeper = keeper;
        self
    }

    /// The keeper of this load's device memory (see [`Keeper`]).
    pub fn keeper(&self) -> &Keeper {
        &self.keeper
    }

    /// The flag the load stops on (its engine's cancel flag): set when this handle is dropped
    /// before [`StreamingLoad::wait`], or by [`StreamingLoad::stop`].
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        if let Some(t) = self.running.upgrade() {
            t.set_stop(stop.clone());
        }
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

    /// Waits for the load to end; the model, or the error that stopped it. The memory the
    /// keeper held goes now: the model owns it, or, after an error, it is freed.
    pub fn wait(mut self) -> Result<(DeviceModel, EngineStats)> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        let r = match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "load thread panicked"))
                .and_then(|r| r),
            None => Err(Error::invalid("load already waited for")),
        };
        self.keeper.release();
        r
    }
}

impl Drop for StreamingLoad {
    fn drop(&mut self) {
        let _keep = crate::raw::driver::KeepCurrent::now();
        // Nobody will take the model: stop the load. With a stop flag it ends within moments
        // (its reads and copies stop): wait for that, up to DROP_WAIT, so that its device
        // memory and pinned slots are free when the drop returns and the next load on the
        // device starts clean. What it returns (a model, or the error) is dropped here,
        // freeing its device memory.
        if let Some(h) = self.handle.take() {
            self.stop();
            if self.stop.is_some() {
                let until = std::time::Instant::now() + DROP_WAIT;
                while !h.is_finished() && std::time::Instant::now() < until {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            if let Some(t) = self.running.upgrade() {
                // Still running (no stop flag, or a read that does not end): it finishes on its
                // own thread, which frees what it returns; the device's next allocation
                // and slot taking wait for it to end.
                t.leave();
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        self.keeper.release();
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
    fn dropping_a_streaming_load_stops_it_and_waits_for_it() {
        let (load, told) = stoppable();
        drop(load);
        // The drop returned after the load ended (its memory and slots are free by then).
        assert_eq!(told.try_recv(), Ok("stopped"));
    }

    #[test]
    fn dropping_a_load_without_a_stop_flag_does_not_wait() {
        let (release, hold) = crossbeam_channel::bounded::<()>(0);
        let load = StreamingLoad::spawn(move |_tx| {
            let _ = hold.recv_timeout(Duration::from_secs(30));
            Err(Error::invalid("done"))
        })
        .unwrap();
        let running = load.running.clone();
        let t = std::time::Instant::now();
        drop(load);
        assert!(t.elapsed() < DROP_WAIT / 2, "the drop waited");
        assert!(running.strong_count() > 0, "the load still runs");
        release.send(()).unwrap();
        // The token goes when the load has returned.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while running.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < until,
                "the token outlived the load"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
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

    /// A stand-in for device memory that records when its last share goes.
    struct Memory(Arc<AtomicBool>);
    impl Drop for Memory {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A stand-in load that holds its "memory" in `keep`, announces one tensor, then fails
    /// (dropping its own share, as a failed load frees its arena).
    fn failing_after_one_tensor() -> (StreamingLoad, Arc<AtomicBool>) {
        let freed = Arc::new(AtomicBool::new(false));
        let keeper = Keeper::default();
        let keep = keeper.clone();
        let memory = Memory(freed.clone());
        let load = StreamingLoad::spawn(move |tx| {
            let own = Arc::new(memory);
            keep.hold(own.clone());
            let _ = tx.send(ReadyTensor {
                placement: 0,
                tensor: 0,
                ptr: 0x1000,
                len: 4,
                at: Duration::ZERO,
            });
            drop(own);
            Err(Error::new(ErrorKind::ObjectChanged, "a later read failed"))
        })
        .unwrap()
        .with_keeper(keeper);
        (load, freed)
    }

    #[test]
    fn a_failed_streaming_loads_memory_lasts_until_wait_returns() {
        let (mut load, freed) = failing_after_one_tensor();
        let first = load.next().expect("one tensor announced");
        assert_eq!(first.ptr, 0x1000);
        // The stream ends: the load thread has failed and let go of its own share …
        assert!(load.next().is_none());
        // … but the memory of the announced tensor is still there until `wait`.
        assert!(
            !freed.load(Ordering::SeqCst),
            "freed under a streamed tensor"
        );
        assert_eq!(load.keeper().held(), 1);
        assert_eq!(load.wait().unwrap_err().kind(), ErrorKind::ObjectChanged);
        assert!(
            freed.load(Ordering::SeqCst),
            "not freed once the failure was taken"
        );
    }

    #[test]
    fn dropping_a_failed_streaming_load_frees_its_memory() {
        let (mut load, freed) = failing_after_one_tensor();
        assert!(load.next().is_some() && load.next().is_none());
        assert!(!freed.load(Ordering::SeqCst));
        drop(load);
        assert!(freed.load(Ordering::SeqCst));
    }
}
