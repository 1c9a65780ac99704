//! [`CudaSink`]: the engine's sink for GPU loads.
//!
//! Every read lands in a pinned staging slot; `accept` queues one `cuMemcpyHtoDAsync` per
//! contiguous run of the read's segments, from the slot to the tensors' places in the device
//! arena, on the next stream (round-robin), records an event and hands the copy to the watcher
//! thread. The watcher waits for the events in order, marks tensors as landed (streaming) and
//! sends the slot back; `accept` returns whatever slots came back without blocking, and blocks
//! only when the sink holds every slot (then the engine could not read anything anyway). So the
//! read of slot k+1 overlaps the copy of slot k.
//!
//! The device allocation is made on a thread of its own while the engine opens its reader and
//! the first reads fill the slots; the first copy waits for it (so a failed allocation, out of
//! device memory, is reported there, after the first reads were issued).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use cudarc::driver::CudaEvent;
use tensorstream_engine::{Error, ErrorKind, IoBuf, Plan, Result, Sink, TensorIndex};

use crate::copy::{coalesce, landed, read_copies, RoundRobin};
use crate::device::{CudaDevice, CudaOptions};
use crate::model::{DeviceModel, LoadTimes, Target};
use crate::raw::driver::{copy_to_device, mark, DeviceArena, HostSource, InFlight};
use crate::tracker::{spawn_watcher, Job, Pending, Readiness, ReadyTensor, Report, SlotLedger};

impl Pending for InFlight {
    type Done = (Option<HostSource>, CudaEvent);
    fn wait(self) -> Result<Self::Done> {
        InFlight::wait(self)
    }
}

type Done = (Option<HostSource>, CudaEvent);

struct Loading {
    plan: Arc<Plan>,
    arena: Arc<DeviceArena>,
    alloc: Duration,
    readiness: Arc<Mutex<Readiness>>,
    jobs: Option<Sender<Job<InFlight>>>,
    reports: Receiver<Report<Done>>,
    watcher: Option<JoinHandle<()>>,
}

/// Sink that loads a plan into one device arena through the pinned staging ring.
pub struct CudaSink {
    dev: Arc<CudaDevice>,
    state: Option<Loading>,
    rr: RoundRobin,
    slots: SlotLedger,
    start: Instant,
    subscriber: Option<Sender<ReadyTensor>>,
    /// Device memory to load into instead of allocating ([`Target::arena`]).
    given: Option<Arc<DeviceArena>>,
    /// Given a share of the device memory once it exists ([`Target::keep`]).
    keep: Option<crate::Keeper>,
    /// The plan and the thread allocating its device memory, until the first copy needs it.
    allocating: Option<(Arc<Plan>, Allocating)>,
    finished: bool,
    /// Held while this load uses the device's slots (see [`CudaDevice::lease_slots`]).
    lease: Option<crate::device::SlotLease>,
    /// The slots, taken in `prepare` (before any device memory is allocated: a load the device
    /// refuses, another one holding it, must not take memory the running one needs) until the
    /// engine asks for them in `staging`.
    taken: Option<Vec<IoBuf>>,
}

/// A device allocation being made: the arena and the time it took.
type Allocating = JoinHandle<Result<(Arc<DeviceArena>, Duration)>>;

impl CudaSink {
    /// Opens device `ordinal` with `opts` and makes a sink for one load. With no driver or no
    /// such device this is a [`ErrorKind::Device`] error, never a panic.
    pub fn new(ordinal: usize, opts: &CudaOptions) -> Result<Self> {
        Ok(Self::on(CudaDevice::open(ordinal, opts)?))
    }

    /// A sink on an already opened device (reuses its pinned staging and streams).
    pub fn on(dev: Arc<CudaDevice>) -> Self {
        Self::with_target(dev, Target::default())
    }

    /// A sink on an already opened device that loads into `target`'s device memory (if given)
    /// and announces each tensor to `target`'s subscriber (if any).
    pub fn with_target(dev: Arc<CudaDevice>, target: Target) -> Self {
        let streams = dev.stream_count();
        CudaSink {
            dev,
            state: None,
            rr: RoundRobin::new(streams),
            slots: SlotLedger::default(),
            start: Instant::now(),
            subscriber: target.subscriber,
            given: target.arena,
            keep: target.keep,
            allocating: None,
            finished: false,
            lease: None,
            taken: None,
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Tensors as they land on the device (call before the load starts). The channel closes
    /// when the load finished or failed.
    pub fn subscribe(&mut self) -> Receiver<ReadyTensor> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.subscriber = Some(tx);
        rx
    }

    /// The loaded model, after the engine finished with this sink.
    pub fn into_model(mut self, index: TensorIndex) -> Result<DeviceModel> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        if !self.finished {
            return Err(Error::invalid("CUDA sink: load did not finish"));
        }
        let st = self
            .state
            .take()
            .ok_or_else(|| Error::invalid("CUDA sink was never prepared"))?;
        let (first, last) = match st.readiness.lock() {
            Ok(g) => (g.first(), g.last()),
            Err(_) => (None, None),
        };
        DeviceModel::new(
            self.dev.clone(),
            st.arena.clone(),
            index,
            &st.plan,
            LoadTimes {
                first_tensor: first,
                last_tensor: last,
                alloc: st.alloc,
            },
        )
    }

    /// The load's state, once its device memory exists (waiting for the allocation thread the
    /// first time).
    fn loading(&mut self) -> Result<&mut Loading> {
        if self.state.is_none() {
            if let Some((plan, handle)) = self.allocating.take() {
                let made = handle.join().map_err(|_| {
                    Error::new(ErrorKind::Io, "the device allocation thread panicked")
                })??;
                self.open(&plan, made)?;
            }
        }
        self.state
            .as_mut()
            .ok_or_else(|| Error::invalid("CUDA sink was never prepared"))
    }

    /// Sets the load up on its device memory: readiness tracking, the watcher thread, and the
    /// zeroing of synthesized tensors.
    fn open(
        &mut self,
        plan: &Arc<Plan>,
        (arena, alloc): (Arc<DeviceArena>, Duration),
    ) -> Result<()> {
        if let Some(k) = &self.keep {
            k.hold(arena.clone());
        }
        let readiness = Arc::new(Mutex::new(Readiness::new(
            plan,
            arena.base(),
            self.start,
            self.subscriber.take(),
        )));
        let (jobs, reports, watcher) = spawn_watcher::<InFlight>(readiness.clone())?;
        // Synthesized (zero) tensors: memset on the device, on stream 0 before any copy.
        let mut zero_landed = Vec::new();
        let s0 = self.dev.stream(0).clone();
        for (i, p) in plan.placements.iter().enumerate() {
            if p.needed.is_empty() && p.len > 0 {
                arena.memset_async(p.dest, p.len, &s0)?;
                zero_landed.push((i, p.len));
            }
        }
        if !zero_landed.is_empty() {
            let ev = self.dev.event()?;
            let pending = mark(&arena, &s0, ev)?;
            let _ = jobs.send(Job {
                pending,
                landed: zero_landed,
            });
        }
        self.state = Some(Loading {
            plan: plan.clone(),
            arena,
            alloc,
            readiness,
            jobs: Some(jobs),
            reports,
            watcher: Some(watcher),
        });
        Ok(())
    }

    /// Handles one watcher report; returns a freed slot if it carried one.
    fn take_report(&mut self, rep: Report<Done>, out: &mut Vec<IoBuf>) -> Result<()> {
        match rep {
            Report::Done((src, ev)) => {
                self.dev.recycle_event(ev);
                if let Some(HostSource::Slot(b)) = src {
                    self.slots.returned();
                    out.push(b);
                }
                Ok(())
            }
            Report::Failed(e) => Err(e),
        }
    }

    fn drain(&mut self, out: &mut Vec<IoBuf>) -> Result<()> {
        loop {
            let rep = match self.loading()?.reports.try_recv() {
                Ok(r) => r,
                Err(_) => return Ok(()),
            };
            self.take_report(rep, out)?;
        }
    }

    fn shutdown(&mut self) -> Result<Vec<IoBuf>> {
        let mut out = Vec::new();
        let mut first_err: Option<Error> = None;
        if let Some((_, handle)) = self.allocating.take() {
            // Never needed (the load failed before its first copy): the memory is freed as
            // the result drops.
            let _ = handle.join();
        }
        if let Some(st) = self.state.as_mut() {
            st.jobs.take(); // the watcher finishes what is queued, then exits
        }
        loop {
            let rep = match self.state.as_ref().map(|s| s.reports.recv()) {
                Some(Ok(r)) => r,
                _ => break,
            };
            if let Err(e) = self.take_report(rep, &mut out) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(st) = self.state.as_mut() {
            if let Some(h) = st.watcher.take() {
                if h.join().is_err() {
                    first_err
                        .get_or_insert(Error::new(ErrorKind::Io, "CUDA watcher thread panicked"));
                }
            }
            if let Ok(mut g) = st.readiness.lock() {
                g.close();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// The device memory for `plan`: `given` (checked to fit the plan and the device), or one new
/// allocation; and the time spent allocating. Checked against the plan's alignment.
pub(crate) fn arena_for(
    dev: &CudaDevice,
    plan: &Plan,
    given: Option<Arc<DeviceArena>>,
) -> Result<(Arc<DeviceArena>, Duration)> {
    // Every route starts here: a plan made by hand fails before any device work.
    plan.validate()?;
    // Every tensor on the device starts on a TENSOR_ALIGN boundary (what `DeviceModel`
    // promises): a plan laid out otherwise (`Layout::Mirror`, a smaller `Packed` alignment) is
    // refused rather than loaded to misaligned pointers. (The arena's base is checked below.)
    if let Some(p) = plan
        .placements
        .iter()
        .find(|p| p.len > 0 && p.dest % crate::TENSOR_ALIGN != 0)
    {
        return Err(Error::invalid(format!(
            "the plan puts a tensor at arena offset {}, not on a {}-byte boundary: plan GPU \
             loads with Layout::Packed {{ align: TENSOR_ALIGN }}",
            p.dest,
            crate::TENSOR_ALIGN
        )));
    }
    let started = Instant::now();
    let (arena, alloc) = match given {
        Some(a) => {
            if a.len() < plan.arena_len {
                return Err(Error::invalid(format!(
                    "the device memory given to the load holds {} bytes; its tensors need {}",
                    a.len(),
                    plan.arena_len
                )));
            }
            if a.context() != dev.context() {
                return Err(Error::invalid(
                    "the device memory given to the load belongs to another CUDA context",
                ));
            }
            (a, Duration::ZERO)
        }
        None => {
            let a = Arc::new(dev.alloc(plan.arena_len)?);
            (a, started.elapsed())
        }
    };
    let align = plan.arena_align.max(crate::TENSOR_ALIGN);
    if arena.base() % align != 0 {
        return Err(Error::new(
            ErrorKind::Device,
            format!(
                "device arena at {:#x} is not aligned to {align} bytes",
                arena.base()
            ),
        ));
    }
    Ok((arena, alloc))
}

impl Sink for CudaSink {
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>> {
        if self.state.is_some() || self.allocating.is_some() {
            return Err(Error::invalid("CUDA sink prepared twice"));
        }
        self.start = Instant::now();
        // The slots first: while another load holds the device this load is refused here,
        // before it allocates device memory (which could leave the running load, allocating
        // on its own thread meanwhile, out of memory).
        if self.taken.is_none() && self.lease.is_none() {
            let (slots, lease) = self.dev.lease_slots()?;
            self.taken = Some(slots);
            self.lease = Some(lease);
        }
        match self.given.take() {
            Some(memory) => {
                let made = arena_for(&self.dev, plan, Some(memory))?;
                self.open(plan, made)?;
            }
            None => {
                // The allocation runs on its own thread while the engine opens its reader and
                // the first reads fill the slots; the first copy waits for it (`loading`).
                // It acts for this load: a wait in it for a dropped load (`CudaDevice::alloc`)
                // neither waits on this load itself nor outlasts this load's stop flag.
                let (dev, p) = (self.dev.clone(), plan.clone());
                let token = crate::device::LoadToken::own();
                let handle = std::thread::Builder::new()
                    .name("ts-cuda-alloc".into())
                    .spawn(move || {
                        crate::device::LoadToken::adopt(token);
                        arena_for(&dev, &p, None)
                    })
                    .map_err(|e| Error::from_io(e, "spawning the device allocation thread"))?;
                self.allocating = Some((plan.clone(), handle));
            }
        }
        Ok(plan.reads.iter().map(|_| None).collect())
    }

    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>> {
        let (plan, arena) = {
            let st = self.loading()?;
            (st.plan.clone(), st.arena.clone())
        };
        let op = plan
            .reads
            .get(read)
            .ok_or_else(|| Error::invalid(format!("read #{read} is not in the plan")))?;
        let segs = read_copies(op, buf.len() as u64, arena.len())?;
        let copies = coalesce(&segs);
        let stream = self.dev.stream(self.rr.next_index()).clone();
        let ev = self.dev.event()?;
        let pending = match copy_to_device(&arena, HostSource::Slot(buf), &copies, &stream, ev) {
            Ok(p) => p,
            Err(e) => return Err(e.error.with_range(op.obj.clone())),
        };
        self.slots.queued();
        let sent = self
            .loading()?
            .jobs
            .as_ref()
            .map(|j| {
                j.send(Job {
                    pending,
                    landed: landed(&segs),
                })
                .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            return Err(Error::new(ErrorKind::Io, "CUDA watcher thread is gone"));
        }
        let mut out = Vec::new();
        self.drain(&mut out)?;
        // Block only when every slot is queued for the device: the engine has none to read into.
        while self.slots.must_wait(out.len()) {
            let rep = self
                .loading()?
                .reports
                .recv_timeout(Duration::from_secs(600))
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        "no host-to-device copy completed within 600 s",
                    )
                })?;
            self.take_report(rep, &mut out)?;
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<Vec<IoBuf>> {
        // A plan without reads (only empty or synthesized tensors) still needs its memory.
        self.loading()?;
        let out = self.shutdown()?;
        self.dev.synchronize()?;
        if let Some(st) = self.state.as_ref() {
            match st.readiness.lock() {
                Ok(g) => g.check_complete()?,
                Err(_) => return Err(Error::invalid("readiness lock poisoned")),
            }
        }
        self.finished = true;
        Ok(out)
    }

    fn staging(&mut self, _count: usize, slot_size: usize) -> Result<Option<Vec<IoBuf>>> {
        let have = self.dev.options().slot_size;
        if slot_size > have {
            return Err(Error::invalid(format!(
                "plan reads of up to {slot_size} bytes do not fit the {have}-byte pinned slots; \
                 plan with a chunk size of at most the slot size (--slot-size)"
            )));
        }
        let slots = match self.taken.take() {
            Some(s) => s,
            None => {
                let (slots, lease) = self.dev.lease_slots()?;
                self.lease = Some(lease);
                slots
            }
        };
        self.slots.lend(slots.len());
        Ok(Some(slots))
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        let _keep = crate::raw::driver::KeepCurrent::now();
        // Wait for queued copies before the slots and the arena can go away.
        let _ = self.shutdown();
    }
}
