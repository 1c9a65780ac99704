//! A CUDA device opened for loading: context, copy streams, the pinned staging region
//! (allocated once, reused by every load) and an event pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use tensorstream_engine::{Error, ErrorKind, IoBuf, Result};

use crate::raw::driver::{self, device_error, DeviceArena, KeepCurrent};
use crate::raw::pinned::{PinnedRegion, PAGE};

/// How the warm page-cache path is used (see [`crate::warm`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum WarmMode {
    /// Never: every load goes through the engine and the staging ring (the default until the
    /// mapped path has been measured on a GPU).
    Off,
    /// Use the mapped path when at least this fraction (0..=1) of the file is in the page
    /// cache.
    Auto(f64),
    /// Always use the mapped path for local files.
    Force,
}

/// How the mapped warm path's copying threads fill their pinned slots (see [`crate::warm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WarmCopy {
    /// Buffered `pread` from the file (the kernel copies out of the page cache).
    #[default]
    Pread,
    /// Copies out of the file mapping with non-temporal stores, which skip reading each
    /// destination line before writing it ([`crate::raw::mapped::MappedFile::copy_into`]). On
    /// the 2-core development machine, filling a 40 × 4 MiB ring from the page cache, this ran
    /// at 15.4-16.9 GB/s against `pread`'s 13.1-13.4 with 2 threads, but slower with 16
    /// threads (8 per core: 14.5-15.0 against 17.5-22.3); not yet measured on a GPU.
    ///
    /// The first such copy installs a process-wide `SIGBUS` handler (once), which answers
    /// only faults inside a copy's own source range (a file truncated meanwhile: the load fails
    /// with `ObjectChanged`) and hands every other `SIGBUS` to the handler it replaced. If
    /// another handler replaces it later, copies fall back to `pread`.
    Map,
}

/// Knobs of a device load.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// CUDA streams copies are spread over (round-robin), at least 1; default 2.
    pub streams: usize,
    /// Pinned staging slots, at least 2; default 40. A local file keeps up to 32 reads in
    /// flight (one per slot with fewer slots); the slots beyond are spare, so that a reader
    /// whose last slot is still being copied to the device starts its next read at once
    /// instead of waiting for it. (Until 2026-11-27 the default was 32 slots, 32 in flight:
    /// 38-40 GB/s warm on the H200 machine. The spare slots are not yet measured on a GPU: the
    /// GPU check compares `--slots 32`.)
    pub slots: usize,
    /// Bytes per slot (rounded up to 4 KiB); the planner's chunk size must not exceed it.
    /// Default 4 MiB (40 × 4 MiB = 160 MiB of pinned host memory). Many small slots beat a few
    /// large ones when the file is in the page cache (more copying threads): on the H200
    /// machine 32 × 4 MiB loaded a warm 6.6 GB file at 39-40 GB/s, 8 × 16 MiB at 22-26.
    pub slot_size: usize,
    /// Warm page-cache path; default [`WarmMode::Off`].
    pub warm: WarmMode,
    /// Threads of the warm path that register pieces ([`crate::WarmStrategy::Register`], the
    /// `Loader`'s); default 4; 0 leaves the pieces to the copying threads
    /// ([`CudaOptions::warm_pread_threads`], then at least one). With
    /// [`crate::WarmStrategy::Pread`] they copy too.
    pub warm_threads: usize,
    /// Threads of the warm path that copy pieces with buffered `pread` into pinned slots
    /// beside the registering ones (all take pieces from one queue, so the faster way takes
    /// more); default 0. A registering thread needs one slot, a pread thread two:
    /// `warm_threads + 2 × warm_pread_threads` must fit [`CudaOptions::slots`]
    /// (`2 × (warm_threads + warm_pread_threads)` with `Pread`), or fewer pread threads run.
    pub warm_pread_threads: usize,
    /// How those copying threads fill their slots; default [`WarmCopy::Pread`].
    pub warm_copy: WarmCopy,
    /// Bytes per registered piece in the warm path; default 16 MiB. Each thread holds at most
    /// two pieces registered (one being copied, the next being registered), and their file
    /// pages count in the process's resident memory while they are: threads × 2 × piece
    /// (128 MiB by default) on top of the staging ring.
    pub warm_piece: usize,
    /// Put the pinned staging ring on transparent huge pages (2 MiB-aligned, `MADV_HUGEPAGE`,
    /// whole 2 MiB pages) where the kernel gives them; default false (small pages, as
    /// measured on the GPU so far). The CPU's copies into the slots (reads of a file in the
    /// page cache) then need one TLB entry per 2 MiB, and the driver pins fewer, larger pages.
    /// On the 2-core development machine (no GPU) buffered 4 MiB reads from the page cache into
    /// such a ring ran 2-15 % faster on one thread and alike on two; the GPU check compares
    /// both on the GPU machine (`--gpu-huge-pages on`).
    pub huge_pages: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            streams: 2,
            slots: 40,
            slot_size: 4 << 20,
            warm: WarmMode::Off,
            warm_threads: 4,
            warm_pread_threads: 0,
            warm_copy: WarmCopy::Pread,
            warm_piece: 16 << 20,
            huge_pages: false,
        }
    }
}

impl CudaOptions {
    /// Checks and normalises the options (slot size rounded up to whole pages).
    pub fn validated(&self) -> Result<CudaOptions> {
        let mut o = self.clone();
        if o.streams == 0 || o.streams > 64 {
            return Err(Error::invalid(format!(
                "streams (--streams) = {}: expected 1..=64",
                o.streams
            )));
        }
        if o.slots < 2 || o.slots > 4096 {
            return Err(Error::invalid(format!(
                "staging slots (--slots) = {}: expected 2..=4096",
                o.slots
            )));
        }
        if o.slot_size == 0 {
            return Err(Error::invalid("slot size (--slot-size) must be positive"));
        }
        o.slot_size = o
            .slot_size
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| Error::invalid("slot size (--slot-size) overflows"))?;
        o.slots
            .checked_mul(o.slot_size)
            .filter(|&t| t <= (64usize << 30))
            .ok_or_else(|| Error::invalid("staging ring (slots × slot size) exceeds 64 GiB"))?;
        if let WarmMode::Auto(f) = o.warm {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::invalid(format!(
                    "warm residency threshold {f} is not in 0..=1"
                )));
            }
        }
        o.warm_pread_threads = o.warm_pread_threads.min(64);
        o.warm_threads = o
            .warm_threads
            .clamp(usize::from(o.warm_pread_threads == 0), 64);
        o.warm_piece = o
            .warm_piece
            .max(PAGE)
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| Error::invalid("warm piece size overflows"))?;
        Ok(o)
    }
}

/// Parses a device string: `cuda` or `cuda:N`. Returns the ordinal.
pub fn parse_device(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_lowercase();
    // One spelling, as `tensorstream::Device` parses it (no "gpu:N").
    let rest = t
        .strip_prefix("cuda")
        .ok_or_else(|| Error::invalid(format!("device {s:?}: expected \"cuda:N\"")))?;
    if rest.is_empty() {
        return Ok(0);
    }
    rest.strip_prefix(':')
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| Error::invalid(format!("device {s:?}: expected \"cuda:N\"")))
}

/// True when the CUDA driver library can be loaded (no device needed).
pub fn driver_present() -> bool {
    driver::driver_present()
}

/// Number of CUDA devices; a Device error when there is no driver.
pub fn device_count() -> Result<usize> {
    driver::device_count()
}

/// An opened device: context, streams, pinned staging, event pool.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    streams: Vec<Arc<CudaStream>>,
    staging: Mutex<Arc<PinnedRegion>>,
    events: Mutex<Vec<CudaEvent>>,
    opts: CudaOptions,
    context_open: std::time::Duration,
    /// The streaming load that took the slots last (`None`: a load on a thread that is not a
    /// streaming load's). Weak: the device must not keep a load's results (models hold the
    /// device).
    holder: Mutex<Option<Weak<LoadToken>>>,
    /// The load that claimed the device ([`CudaDevice::claim`]), from its start to its end:
    /// before it takes the slots, and between its parts (a sharded checkpoint's shards), no
    /// other load may take them.
    reserved: Arc<Mutex<Option<Claimed>>>,
    /// Set once the load that took the slots last has ended (its [`SlotLease`] dropped);
    /// `None` for slots taken with [`CudaDevice::take_slots`], whose end is not known. Slots
    /// still held after their load ended are held by reads that load left behind on a cancel
    /// (a backend read that does not return): no load will give them back.
    lent: Mutex<Option<Arc<AtomicBool>>>,
    /// Last: restores the dropping thread's CUDA context after the streams, events, staging
    /// and context (whose drops make it current) have gone.
    keep: KeepCurrent,
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        self.keep.save();
    }
}

/// A device reserved for the calling thread's loads ([`CudaDevice::reserve`]) until dropped:
/// a [`Claim`] the thread acts for.
#[derive(Debug)]
pub struct Reservation<'a> {
    _acting: Acting,
    _claim: Claim,
    _dev: std::marker::PhantomData<&'a CudaDevice>,
}

/// Who holds a device's claim: the claim's number, and the streaming load acting for it, if
/// any (one whose handle was dropped is waited for, not refused).
#[derive(Debug)]
struct Claimed {
    id: u64,
    load: Option<Weak<LoadToken>>,
}

/// Numbers claims; 0 is no claim.
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The claim the calling thread acts for ([`Claim::enter`]); 0: none.
    static ACTING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A load's hold on a device handle, from the load's start (before it opens its object and
/// plans) to its end ([`CudaDevice::claim`]): while it lives, every other load on the handle
/// is refused at once (one whose streaming handle was dropped while it ran is waited for).
/// The threads that work for the load take the slots and allocate once they
/// [`Claim::enter`] it. Dropping it gives the device back. It can be moved to the thread that
/// runs the load (a streaming load's).
#[derive(Debug)]
pub struct Claim {
    reserved: Arc<Mutex<Option<Claimed>>>,
    id: u64,
    /// False for a claim made on a thread that already acts for the device's claim (a load
    /// inside another's reservation): it gives nothing back when dropped.
    owner: bool,
}

impl Claim {
    /// Marks the calling thread as working for this claim's load until the result is dropped
    /// (the mark made before is restored then). A streaming load's thread also tells the
    /// device which load it is, so that a load that follows its dropped handle waits for it.
    pub fn enter(&self) -> Acting {
        if let (Some(load), Ok(mut r)) = (LoadToken::own(), self.reserved.lock()) {
            if let Some(c) = r.as_mut().filter(|c| c.id == self.id) {
                c.load = Some(load);
            }
        }
        Acting {
            before: ACTING.with(|a| a.replace(self.id)),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        if let Ok(mut r) = self.reserved.lock() {
            if r.as_ref().is_some_and(|c| c.id == self.id) {
                *r = None;
            }
        }
    }
}

/// The calling thread's work for a [`Claim`] ([`Claim::enter`]); it ends when this is dropped.
#[derive(Debug)]
pub struct Acting {
    before: u64,
    /// Stays on the thread that made it (it restores that thread's mark).
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Acting {
    fn drop(&mut self) {
        ACTING.with(|a| a.set(self.before));
    }
}

/// Held by a load for as long as it uses the slots it took ([`CudaDevice::lease_slots`]):
/// dropping it tells the device that the load has ended, so that slots still out after that
/// are known to be held by reads the load left behind, not by a load.
#[derive(Debug)]
pub(crate) struct SlotLease(Arc<AtomicBool>);

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Held by a streaming load's thread while its load runs: a device can tell whether the load
/// holding its slots is one whose handle was dropped (it is stopping: worth waiting for) and
/// when it has ended, without keeping anything of it.
#[derive(Debug, Default)]
pub struct LoadToken {
    /// The load's stop flag, once its handle has one.
    stop: std::sync::OnceLock<Arc<AtomicBool>>,
    /// Set when the handle was dropped while the load still ran.
    left: AtomicBool,
}

thread_local! {
    /// The token of the streaming load this thread runs, if any.
    static OWN_TOKEN: std::cell::RefCell<Option<Weak<LoadToken>>> =
        const { std::cell::RefCell::new(None) };
}

impl LoadToken {
    /// Marks the current thread as the one running the load of `token`.
    pub(crate) fn enter(token: &Arc<LoadToken>) {
        OWN_TOKEN.with(|t| *t.borrow_mut() = Some(Arc::downgrade(token)));
    }
    /// Marks the current thread as a helper of the load `token` names (a thread the load
    /// spawned): it counts as that load's own when it waits (see [`CudaDevice::take_slots`]).
    pub(crate) fn adopt(token: Option<Weak<LoadToken>>) {
        OWN_TOKEN.with(|t| *t.borrow_mut() = token);
    }
    /// Records the load's stop flag.
    pub(crate) fn set_stop(&self, stop: Arc<AtomicBool>) {
        let _ = self.stop.set(stop);
    }
    /// Marks the load as left running by its dropped handle.
    pub(crate) fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
    }
    /// True once the handle was dropped while the load ran.
    pub(crate) fn is_left(&self) -> bool {
        self.left.load(Ordering::SeqCst)
    }
    /// The calling thread's own load token, if it runs a streaming load.
    pub(crate) fn own() -> Option<Weak<LoadToken>> {
        OWN_TOKEN.with(|t| t.borrow().clone())
    }
    /// True when the calling thread's load was asked to stop.
    fn own_stopped() -> bool {
        Self::own()
            .and_then(|w| w.upgrade())
            .and_then(|t| t.stop.get().map(|s| s.load(Ordering::SeqCst)))
            .unwrap_or(false)
    }
}

/// How long [`CudaDevice::take_slots`] waits for a dropped streaming load to let go of the slots.
pub const ABANDONED_LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl CudaDevice {
    /// Opens device `ordinal`: checks the driver and the device exist (clear errors, never a
    /// panic), creates the streams and pins the staging region once.
    pub fn open(ordinal: usize, opts: &CudaOptions) -> Result<Arc<Self>> {
        let opts = opts.validated()?;
        let _keep = KeepCurrent::now();
        let t = std::time::Instant::now();
        let ctx = driver::open_context(ordinal)?;
        let context_open = t.elapsed();
        let mut streams = Vec::with_capacity(opts.streams);
        for _ in 0..opts.streams {
            streams.push(
                ctx.new_stream()
                    .map_err(|e| device_error("creating a CUDA stream", e))?,
            );
        }
        let staging = PinnedRegion::new(&ctx, opts.slots * opts.slot_size, opts.huge_pages)?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            ctx,
            streams,
            staging: Mutex::new(staging),
            events: Mutex::new(Vec::new()),
            opts,
            context_open,
            holder: Mutex::new(None),
            reserved: Arc::new(Mutex::new(None)),
            lent: Mutex::new(None),
            keep: KeepCurrent::idle(),
        }))
    }

    /// How long [`CudaDevice::open`] waited for the driver to create the CUDA context (driver
    /// start-up included); the rest of the opening made the streams and the pinned staging.
    /// A process that already has a context on the device (a framework's) pays less here.
    pub fn context_open_time(&self) -> std::time::Duration {
        self.context_open
    }

    /// The device ordinal (`cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The options in effect (normalised).
    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }
    /// The device's name.
    pub fn name(&self) -> Result<String> {
        let _keep = KeepCurrent::now();
        self.ctx
            .name()
            .map_err(|e| device_error("querying the device name", e))
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        let _keep = KeepCurrent::now();
        self.ctx
            .mem_get_info()
            .map_err(|e| device_error("querying device memory", e))
    }
    /// True when the device can host-register memory read-only (the mapped warm path).
    pub fn supports_read_only_registration(&self) -> bool {
        let _keep = KeepCurrent::now();
        driver::device_attribute(
            &self.ctx,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
        )
        .is_ok_and(|v| v > 0)
    }

    /// The cudarc context (for callers that issue their own CUDA work on this device).
    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// Copy stream `i` (modulo the stream count).
    pub fn cuda_stream(&self, i: usize) -> &Arc<CudaStream> {
        self.stream(i)
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub(crate) fn stream(&self, i: usize) -> &Arc<CudaStream> {
        &self.streams[i % self.streams.len()]
    }
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Whether the driver page-locked the staging ring (false where it refused: the slots are
    /// then pageable memory, correct but slower to copy from).
    pub fn staging_page_locked(&self) -> bool {
        self.staging
            .lock()
            .map(|g| g.is_page_locked())
            .unwrap_or(false)
    }

    /// Bytes of the staging ring on transparent huge pages ([`CudaOptions::huge_pages`]);
    /// `None` where unknown. Reads `/proc/self/smaps`: a diagnostic, not for every load.
    pub fn staging_huge_bytes(&self) -> Option<u64> {
        self.staging.lock().ok().and_then(|g| g.huge_bytes())
    }

    /// The pinned staging slots (all of them). Fails at once while another load holds them or
    /// has claimed the device ([`CudaDevice::claim`]: a thread that works for the claim is
    /// that load's) — except a streaming load whose handle was dropped while it ran (it is stopping on its own
    /// thread): that one is waited for until it has ended, up to [`ABANDONED_LOAD_WAIT`], so
    /// that dropping a [`crate::StreamingLoad`] and starting the next load on the same device
    /// just works. A waiting streaming load that is asked to stop stops waiting (`Cancelled`).
    pub fn take_slots(&self) -> Result<Vec<IoBuf>> {
        self.take_slots_for(false).map(|(slots, _)| slots)
    }

    /// [`CudaDevice::take_slots`] for a load that holds the returned lease for as long as it
    /// uses the slots. If, when the next load takes them, some are still out although that
    /// load has ended, they are held by reads it left behind when it was cancelled (reads
    /// stuck in a backend, left to end on a thread of their own, which keeps their slots until
    /// then): the device then lends a fresh pinned region, the old one being freed when those
    /// reads end, instead of refusing every later load as if one were still running.
    pub(crate) fn lease_slots(&self) -> Result<(Vec<IoBuf>, SlotLease)> {
        let (slots, lease) = self.take_slots_for(true)?;
        let lease = lease.ok_or_else(|| Error::invalid("slots lent without a lease"))?;
        Ok((slots, lease))
    }

    fn take_slots_for(&self, leased: bool) -> Result<(Vec<IoBuf>, Option<SlotLease>)> {
        let until = std::time::Instant::now() + ABANDONED_LOAD_WAIT;
        loop {
            let mut g = self
                .staging
                .lock()
                .map_err(|_| Error::invalid("staging lock poisoned"))?;
            // A dropped holder is waited for until it has ended, not just until its slots are
            // free: it frees what it returned (its device memory) before its token goes, so
            // the next load's device allocation finds that memory free too.
            if !self.holder_left() {
                self.check_reservation()?;
                let mut lent = self
                    .lent
                    .lock()
                    .map_err(|_| Error::invalid("staging lock poisoned"))?;
                let left_behind = PinnedRegion::in_use(&g)
                    && lent.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
                // (Not after a device fault: a load that failed on one keeps its slots on
                // purpose, and the context is unusable anyway; `slots_refused` says so.)
                if left_behind && {
                    let _keep = KeepCurrent::now();
                    driver::context_fault(&self.ctx).is_none()
                } {
                    let _keep = KeepCurrent::now();
                    let fresh = PinnedRegion::new(&self.ctx, g.len(), self.opts.huge_pages)?;
                    log::warn!(
                        "cuda:{}: {} pinned staging slot(s) are still held by reads that an \
                         earlier, cancelled load left in its backend; the device lends a fresh \
                         staging region (the old one is freed when those reads end)",
                        self.ordinal,
                        // The device's own handle aside, one per slot still out.
                        Arc::strong_count(&g).saturating_sub(1)
                    );
                    *g = fresh;
                }
                let slots = PinnedRegion::slots(&mut g, self.opts.slots, self.opts.slot_size)
                    .map_err(|e| self.slots_refused(e))?;
                let flag = leased.then(|| Arc::new(AtomicBool::new(false)));
                *lent = flag.clone();
                if let Ok(mut h) = self.holder.lock() {
                    *h = LoadToken::own();
                }
                return Ok((slots, flag.map(SlotLease)));
            }
            drop(g);
            self.wait_for_dropped_load(until)?;
        }
    }

    /// Reserves the device for the calling thread's loads until the result is dropped: a
    /// [`CudaDevice::claim`] the thread acts for.
    pub fn reserve(&self) -> Result<Reservation<'_>> {
        let claim = self.claim()?;
        Ok(Reservation {
            _acting: claim.enter(),
            _claim: claim,
            _dev: std::marker::PhantomData,
        })
    }

    /// Claims the device for a load from its start to its end (until the result is dropped);
    /// the threads that work for the load, the claiming one included, [`Claim::enter`] it: a
    /// load made of several steps (opening its object and planning, then the copies; or the
    /// shards of a checkpoint, each taking and giving back the slots) keeps the device
    /// throughout, so that another load on this handle is refused at once instead of slipping
    /// in before or between them and failing this one half-way. Fails as
    /// [`CudaDevice::take_slots`] does while another load holds the slots or has claimed the
    /// device, and waits, as it does, for a dropped streaming load. On a thread that already
    /// works for the device's claim it gives a claim that leaves the device to that one.
    pub fn claim(&self) -> Result<Claim> {
        let until = std::time::Instant::now() + ABANDONED_LOAD_WAIT;
        let acting = ACTING.with(|a| a.get());
        loop {
            let mut r = self
                .reserved
                .lock()
                .map_err(|_| Error::invalid("device claim lock poisoned"))?;
            match r.as_ref() {
                Some(c) if c.id == acting => {
                    return Ok(Claim {
                        reserved: self.reserved.clone(),
                        id: acting,
                        owner: false,
                    })
                }
                Some(c) => {
                    let left = c
                        .load
                        .as_ref()
                        .and_then(Weak::upgrade)
                        .is_some_and(|t| t.is_left());
                    if !left {
                        return Err(self.claimed_error());
                    }
                    drop(r);
                    self.wait_for_dropped_load(until)?;
                }
                None => {
                    let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
                    *r = Some(Claimed {
                        id,
                        load: LoadToken::own(),
                    });
                    drop(r);
                    let claim = Claim {
                        reserved: self.reserved.clone(),
                        id,
                        owner: true,
                    };
                    // Taken (which also makes this load the holder, so that a dropped one is
                    // waited for) while claimed: the slots are free, or held by a dropped load
                    // that was waited for. On an error the claim goes again.
                    let acting = claim.enter();
                    drop(self.take_slots()?);
                    drop(acting);
                    return Ok(claim);
                }
            }
        }
    }

    /// The error for slots that cannot be lent: in use by another load — or kept by a load
    /// that failed on an unrecoverable device fault, whose copies the device could not confirm
    /// finished (they are never handed back then). The context then fails every call, so that
    /// is what to say, not "in use".
    fn slots_refused(&self, e: Error) -> Error {
        let _keep = KeepCurrent::now();
        match driver::context_fault(&self.ctx) {
            Some(fault) => Error::new(
                ErrorKind::Device,
                format!(
                    "cuda:{}: the device is unusable after an unrecoverable error in an earlier \
                     load ({}); a CUDA context does not recover from it: start a new process",
                    self.ordinal,
                    fault.message()
                ),
            ),
            None => e.context(format!("cuda:{}", self.ordinal)),
        }
    }

    /// Refuses when another load claimed the device ([`CudaDevice::claim`]) and the calling
    /// thread does not work for it.
    fn check_reservation(&self) -> Result<()> {
        let acting = ACTING.with(|a| a.get());
        match self.reserved.lock().ok().as_deref() {
            Some(Some(c)) if c.id != acting => Err(self.claimed_error()),
            _ => Ok(()),
        }
    }

    /// The error for a load on a device another load has claimed.
    fn claimed_error(&self) -> Error {
        Error::invalid(format!(
            "cuda:{}: the device handle is reserved by another load (from its start to its \
             end, between a sharded checkpoint's shards too): loads on one CudaDevice run one \
             at a time (open another to load in parallel)",
            self.ordinal
        ))
    }

    /// Allocates `len` bytes (at least one) of device memory on this device, as one
    /// [`DeviceArena`]. Like [`CudaDevice::take_slots`], it first waits (up to
    /// [`ABANDONED_LOAD_WAIT`]) for a streaming load whose handle was dropped while it ran, so
    /// that the memory that load still holds is free again before this allocation asks for
    /// its own: the next load after a dropped one does not fail with out-of-memory for a model
    /// larger than half the device. The loads allocate through this.
    pub fn alloc(&self, len: u64) -> Result<DeviceArena> {
        let _keep = KeepCurrent::now();
        let until = std::time::Instant::now() + ABANDONED_LOAD_WAIT;
        while self.holder_left() {
            self.wait_for_dropped_load(until)?;
        }
        DeviceArena::alloc(&self.ctx, len)
    }

    /// One step of the wait for a dropped streaming load: `Cancelled` when the calling load was
    /// asked to stop, an error once `until` has passed, else a short sleep.
    fn wait_for_dropped_load(&self, until: std::time::Instant) -> Result<()> {
        if LoadToken::own_stopped() {
            return Err(Error::new(
                ErrorKind::Cancelled,
                "load cancelled while it waited for a dropped load to end",
            ));
        }
        if std::time::Instant::now() >= until {
            return Err(Error::invalid(format!(
                "cuda:{}: a dropped streaming load still holds the pinned staging slots and its \
                 device memory: it has not stopped after {} s",
                self.ordinal,
                ABANDONED_LOAD_WAIT.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        Ok(())
    }

    /// True when the slots' holder is a streaming load whose handle was dropped while it ran
    /// (and it still runs), other than the calling thread's own (a load of several shards
    /// takes the slots once per shard).
    fn holder_left(&self) -> bool {
        let own = LoadToken::own();
        self.holder.lock().is_ok_and(|h| {
            h.as_ref()
                .filter(|w| !own.as_ref().is_some_and(|o| o.ptr_eq(w)))
                .and_then(Weak::upgrade)
                .is_some_and(|t| t.is_left())
        })
    }

    pub(crate) fn event(&self) -> Result<CudaEvent> {
        if let Some(ev) = self.events.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(ev);
        }
        driver::new_event(&self.ctx)
    }

    pub(crate) fn recycle_event(&self, ev: CudaEvent) {
        if let Ok(mut v) = self.events.lock() {
            if v.len() < 1024 {
                v.push(ev);
            }
        }
    }

    /// Waits for every stream; reports the first error.
    pub fn synchronize(&self) -> Result<()> {
        let _keep = KeepCurrent::now();
        for s in &self.streams {
            driver::sync_stream(s)?;
        }
        Ok(())
    }
}
