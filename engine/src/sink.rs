//! Sinks: where the bytes of finished reads go.
//!
//! The engine hands every finished read to the sink (on the sink's own thread). A sink either
//! lent the engine a buffer inside its destination for the read ("direct": nothing to copy) or
//! copies the read's segments out of a staging slot and gives the slot back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use crate::error::{Error, ErrorKind, Result};
use crate::mem::{Arena, IoBuf};
use crate::plan::{Layout, Plan, ReadOp};

/// Destination of a load.
pub trait Sink: Send + 'static {
    /// Called once before any read: for each read of `plan`, a buffer inside the destination the
    /// read may land in directly, or `None` to have it read into a staging slot.
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>>;
    /// The bytes of `plan.reads[read]` are in `buf` (`buf.len()` bytes valid: fewer than the
    /// read's length only where the read ends past the object's end). Take them. Returns
    /// staging buffers that are free again (this one, now or in a later call, and/or earlier
    /// ones), and only buffers the engine handed over. A sink may hold staging buffers across
    /// calls, but never all of them once `accept` returns: the engine needs a free one to go
    /// on, and fails the load as a sink bug otherwise.
    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>>;
    /// Called when every read was accepted: complete outstanding work (e.g. wait for device
    /// copies) and return the remaining staging buffers.
    fn finish(&mut self) -> Result<Vec<IoBuf>>;
    /// Staging slots this sink wants (count, size) for non-direct reads, if it has its own
    /// (pinned memory); `None` lets the engine allocate host slots.
    fn staging(&mut self, _count: usize, _slot_size: usize) -> Result<Option<Vec<IoBuf>>> {
        Ok(None)
    }
}

/// Per-tensor work done once all bytes a tensor needs have landed (hash verification,
/// decryption). Runs on the sink's worker threads while later reads proceed.
pub trait TensorHook: Send + Sync + 'static {
    /// `bytes` holds the tensor's needed object range (its prefix, if any, then its data), writable
    /// and exclusive to this call; the data starts at `data_start`. `tensor` indexes
    /// `TensorIndex::tensors`. An error fails the load.
    fn process(&self, tensor: usize, bytes: &mut [u8], data_start: usize) -> Result<()>;
}

struct Job {
    tensor: usize,
    buf: IoBuf,
    data_start: usize,
}

/// Worker pool and per-placement bookkeeping of a [`HostSink`] with a [`TensorHook`].
struct HookState {
    hook: Arc<dyn TensorHook>,
    threads: usize,
    /// Direct (Mirror) plans: the pieces of each placement's needed range received so far.
    pieces: Vec<Vec<IoBuf>>,
    /// Staged (Packed) plans: one arena window per placement's needed range.
    slots: Vec<Option<IoBuf>>,
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    first_error: Arc<Mutex<Option<Error>>>,
    failed: Arc<AtomicBool>,
}

impl HookState {
    fn start(&mut self) -> Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..self.threads.max(1) {
            let rx = rx.clone();
            let hook = self.hook.clone();
            let first_error = self.first_error.clone();
            let failed = self.failed.clone();
            let h = std::thread::Builder::new()
                .name(format!("ts-hook-{i}"))
                .spawn(move || {
                    for mut job in rx.iter() {
                        if failed.load(Ordering::SeqCst) {
                            continue; // drain: the load already failed
                        }
                        let tensor = job.tensor;
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            hook.process(tensor, job.buf.as_mut_slice(), job.data_start)
                        }))
                        .unwrap_or_else(|_| {
                            Err(Error::new(
                                ErrorKind::Io,
                                format!("the tensor hook panicked on tensor #{tensor}"),
                            ))
                        });
                        drop(job.buf);
                        if let Err(e) = r {
                            // The error first, then the flag: whoever sees the flag finds it.
                            if let Ok(mut slot) = first_error.lock() {
                                if slot.is_none() {
                                    *slot = Some(e);
                                }
                            }
                            failed.store(true, Ordering::SeqCst);
                        }
                    }
                })
                .map_err(|e| Error::from_io(e, "spawning tensor hook worker"))?;
            self.workers.push(h);
        }
        self.tx = Some(tx);
        Ok(())
    }

    fn take_error(&self) -> Error {
        self.first_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or_else(|| Error::new(ErrorKind::Io, "a tensor hook worker failed"))
    }

    fn dispatch(&self, tensor: usize, buf: IoBuf, data_start: usize) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.take_error());
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::invalid("tensor hook workers are not running"))?;
        tx.send(Job {
            tensor,
            buf,
            data_start,
        })
        .map_err(|_| Error::new(ErrorKind::Io, "tensor hook workers stopped"))
    }

    /// Stops the workers after they drained the queue; the first error, if any.
    fn stop(&mut self) -> Result<()> {
        self.tx = None;
        let mut panicked = false;
        for w in self.workers.drain(..) {
            panicked |= w.join().is_err();
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.take_error());
        }
        if panicked {
            return Err(Error::new(ErrorKind::Io, "a tensor hook worker panicked"));
        }
        Ok(())
    }
}

impl Drop for HookState {
    fn drop(&mut self) {
        // Dropped without `finish` (the load failed or was abandoned): queued jobs are skipped,
        // not hashed or decrypted for nothing.
        if self.tx.is_some() {
            self.failed.store(true, Ordering::SeqCst);
        }
        let _ = self.stop();
    }
}

/// Loads into one aligned host arena. With a Mirror plan every read lands in the arena directly;
/// with a Packed plan segments are copied from staging slots.
///
/// With a [`TensorHook`] ([`HostSink::with_hook`]), each tensor's needed bytes are handed, as one
/// exclusive window of the arena, to a small worker pool as soon as they are complete; `finish`
/// waits for the workers and returns the first error. Without a hook nothing of this runs.
pub struct HostSink {
    arena: Option<Arena>,
    plan: Option<Arc<Plan>>,
    remaining: Vec<u64>,
    done_order: Vec<usize>,
    hook: Option<HookState>,
    prefault: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
    /// Fault the arena in ahead of the reads (see [`HostSink::with_prefault`]).
    want_prefault: bool,
    /// Packed plans without a hook: one window over the whole arena, lent for the load, that
    /// staged segments are copied into. (Going through `Arena::as_mut_slice` instead would be
    /// refused while the prefault thread holds the region.)
    staged: Option<IoBuf>,
}

impl HostSink {
    /// A sink without an arena yet (allocated in `prepare` from the plan).
    pub fn new() -> Self {
        HostSink {
            arena: None,
            plan: None,
            remaining: Vec::new(),
            done_order: Vec::new(),
            hook: None,
            prefault: None,
            want_prefault: false,
            staged: None,
        }
    }

    /// Faults the arena's pages in on a helper thread ahead of the reads (`MADV_POPULATE_WRITE`),
    /// instead of one page fault per 4 KiB inside the read path. Worth it when the kernel does
    /// the reads ([`crate::Capabilities::kernel_reads`]). `TENSORSTREAM_PREFAULT=0|1` overrides;
    /// `TENSORSTREAM_HUGEPAGES=1` also backs the arena with transparent huge pages.
    pub fn with_prefault(mut self, on: bool) -> Self {
        self.want_prefault = on;
        self
    }

    fn stop_prefault(&mut self, early: bool) {
        if let Some((h, stop)) = self.prefault.take() {
            if early {
                stop.store(true, Ordering::Relaxed);
            }
            let _ = h.join();
        }
    }

    /// A sink that runs `hook` on `threads` worker threads for every loaded tensor.
    pub fn with_hook(hook: Arc<dyn TensorHook>, threads: usize) -> Self {
        let mut s = Self::new();
        s.hook = Some(HookState {
            hook,
            threads: threads.clamp(1, 64),
            pieces: Vec::new(),
            slots: Vec::new(),
            tx: None,
            workers: Vec::new(),
            first_error: Arc::new(Mutex::new(None)),
            failed: Arc::new(AtomicBool::new(false)),
        });
        s
    }

    /// The arena, once the load finished. Placements that finished, in completion order.
    pub fn into_parts(mut self) -> Result<(Arena, Vec<usize>)> {
        if let Some(h) = self.hook.as_mut() {
            h.stop()?;
        }
        self.hook = None;
        self.stop_prefault(true);
        self.staged = None;
        let arena = self
            .arena
            .take()
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        Ok((arena, std::mem::take(&mut self.done_order)))
    }

    fn land(&mut self, read: usize) -> Result<()> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        for seg in &plan.reads[read].segments {
            let r = &mut self.remaining[seg.placement];
            *r = r.saturating_sub(seg.obj.end - seg.obj.start);
            if *r == 0 {
                self.done_order.push(seg.placement);
            }
        }
        Ok(())
    }
}

impl Default for HostSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for HostSink {
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>> {
        if self.arena.is_some() || self.plan.is_some() {
            // (A second load into the same sink would drop the first one's memory.)
            return Err(Error::invalid(
                "this HostSink already holds a load: take it with into_parts, and use a new \
                 sink for the next load",
            ));
        }
        let len = usize::try_from(plan.arena_len)
            .map_err(|_| Error::invalid("arena does not fit in the address space"))?;
        // On/off switches from the environment; anything but 0/1 (or unset/empty) is an error,
        // like the other TENSORSTREAM_* variables, rather than silently the default.
        let env_flag = |name: &str, default: bool| -> Result<bool> {
            match std::env::var(name) {
                Err(std::env::VarError::NotPresent) => Ok(default),
                Ok(v) => match v.trim() {
                    "" => Ok(default),
                    "0" | "false" | "off" | "no" => Ok(false),
                    "1" | "true" | "on" | "yes" => Ok(true),
                    other => Err(Error::invalid(format!(
                        "environment variable {name}={other:?}: expected 0 or 1 (or \
                         false/true, off/on, no/yes)"
                    ))),
                },
                Err(std::env::VarError::NotUnicode(_)) => Err(Error::invalid(format!(
                    "environment variable {name} is not valid UTF-8: expected 0 or 1"
                ))),
            }
        };
        // Huge pages: off unless asked for. Measured on this project's 2-core machine, warm local
        // 2 GiB loads ran at 6.3-7.1 GB/s with them when free memory was unfragmented, but at
        // 0.7-1.7 GB/s (vs 1.7-3.4 without) right after another process had freed gigabytes of
        // small pages (direct compaction stalls the faults).
        let huge = env_flag("TENSORSTREAM_HUGEPAGES", false)?;
        let prefault = env_flag("TENSORSTREAM_PREFAULT", self.want_prefault)?;
        let mut arena = Arena::host_with(len, plan.arena_align as usize, huge)?;
        // Out of forked children while reads land in it (until `finish`).
        arena.set_inherited_by_fork(false);
        self.remaining = plan
            .placements
            .iter()
            .map(|p| p.needed.end - p.needed.start)
            .collect();
        // Placements with nothing to read (empty and synthesized tensors) are done at once: the
        // arena is zero-initialised.
        self.done_order = (0..plan.placements.len())
            .filter(|&i| self.remaining[i] == 0)
            .collect();
        let direct = match plan.reads.first() {
            Some(r) => r.direct.is_some(),
            None => false,
        };
        let out = if direct {
            let ranges = direct_ranges(&plan.reads)?;
            arena.windows(&ranges)?.into_iter().map(Some).collect()
        } else {
            plan.reads.iter().map(|_| None).collect()
        };
        if let Some(h) = self.hook.as_mut() {
            h.pieces = plan.placements.iter().map(|_| Vec::new()).collect();
            h.slots = plan.placements.iter().map(|_| None).collect();
            if !direct {
                // One window per placement that reads anything, lent for the whole load.
                let mut order: Vec<usize> = (0..plan.placements.len())
                    .filter(|&i| !plan.placements[i].needed.is_empty())
                    .collect();
                order.sort_by_key(|&i| plan.placements[i].needed_dest);
                let ranges = order
                    .iter()
                    .map(|&i| {
                        let p = &plan.placements[i];
                        let s = usize::try_from(p.needed_dest)
                            .map_err(|_| Error::invalid("arena offset too large"))?;
                        let n = usize::try_from(p.needed.end - p.needed.start)
                            .map_err(|_| Error::invalid("tensor too large"))?;
                        let e = s
                            .checked_add(n)
                            .ok_or_else(|| Error::invalid("arena offset too large"))?;
                        Ok(s..e)
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (w, &i) in arena.windows(&ranges)?.into_iter().zip(&order) {
                    h.slots[i] = Some(w);
                }
            }
            h.start()?;
        } else if !direct && !arena.is_empty() {
            let whole = 0..arena.len();
            self.staged = arena.windows(std::slice::from_ref(&whole))?.pop();
        }
        // Fault the arena's pages in ahead of the reads, on another thread, so the read path does
        // not take one page fault per 4 KiB of a fresh allocation.
        let ranges = if direct {
            direct_ranges(&plan.reads)?
        } else {
            std::iter::once(0..arena.len()).collect()
        };
        let stop = Arc::new(AtomicBool::new(false));
        if prefault {
            self.prefault = arena.prefault(ranges, stop.clone()).map(|h| (h, stop));
        }
        self.arena = Some(arena);
        self.plan = Some(plan.clone());
        Ok(out)
    }

    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>> {
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        let op: &ReadOp = plan
            .reads
            .get(read)
            .ok_or_else(|| Error::invalid(format!("read #{read} is not in the plan")))?;
        if self.hook.is_some() {
            return self.accept_hooked(&plan, read, buf);
        }
        let give_back = if op.direct.is_some() {
            drop(buf); // the bytes are already in place; the window goes away
            Vec::new()
        } else {
            let arena = self
                .staged
                .as_mut()
                .ok_or_else(|| Error::invalid("host sink has no staged window"))?
                .as_mut_slice();
            let src = buf.as_slice();
            for seg in &op.segments {
                let s = usize::try_from(seg.obj.start.saturating_sub(op.obj.start))
                    .map_err(|_| Error::invalid("segment offset too large"))?;
                let n = usize::try_from(seg.obj.end.saturating_sub(seg.obj.start))
                    .map_err(|_| Error::invalid("segment too large"))?;
                let d = usize::try_from(seg.dest)
                    .map_err(|_| Error::invalid("arena offset too large"))?;
                let from = s
                    .checked_add(n)
                    .and_then(|e| src.get(s..e))
                    .ok_or_else(|| Error::invalid("segment lies outside its read"))?;
                d.checked_add(n)
                    .and_then(|e| arena.get_mut(d..e))
                    .ok_or_else(|| Error::invalid("segment lies outside the arena"))?
                    .copy_from_slice(from);
            }
            vec![buf]
        };
        self.land(read)?;
        Ok(give_back)
    }

    fn finish(&mut self) -> Result<Vec<IoBuf>> {
        self.stop_prefault(true);
        self.staged = None;
        if let Some(h) = self.hook.as_mut() {
            h.stop()?;
            if h.pieces.iter().any(|p| !p.is_empty()) || h.slots.iter().any(|s| s.is_some()) {
                return Err(Error::invalid(
                    "load finished with tensors whose bytes never completed",
                ));
            }
        }
        // Every read has landed: a forked child may have the loaded model again.
        if let Some(a) = &self.arena {
            a.set_inherited_by_fork(true);
        }
        Ok(Vec::new())
    }
}

impl Drop for HostSink {
    fn drop(&mut self) {
        self.stop_prefault(true);
    }
}

impl HostSink {
    fn accept_hooked(
        &mut self,
        plan: &Arc<Plan>,
        read: usize,
        mut buf: IoBuf,
    ) -> Result<Vec<IoBuf>> {
        let op = &plan.reads[read];
        let h = self
            .hook
            .as_mut()
            .ok_or_else(|| Error::invalid("host sink has no hook"))?;
        let mut complete: Vec<usize> = Vec::new();
        let give_back = if op.direct.is_some() {
            // Cut the read's arena window at the segments' boundaries; keep each tensor's pieces.
            let mut pos = op.obj.start;
            for seg in &op.segments {
                let skip = usize::try_from(seg.obj.start - pos)
                    .map_err(|_| Error::invalid("segment offset too large"))?;
                let n = usize::try_from(seg.obj.end - seg.obj.start)
                    .map_err(|_| Error::invalid("segment too large"))?;
                buf.split_to(skip)
                    .ok_or_else(|| Error::invalid("segment lies outside its read"))?;
                let piece = buf
                    .split_to(n)
                    .ok_or_else(|| Error::invalid("segment lies outside its read"))?;
                pos = seg.obj.end;
                h.pieces[seg.placement].push(piece);
                let r = &mut self.remaining[seg.placement];
                *r = r.saturating_sub(seg.obj.end - seg.obj.start);
                if *r == 0 {
                    complete.push(seg.placement);
                }
            }
            drop(buf);
            Vec::new()
        } else {
            let src = buf.as_slice();
            for seg in &op.segments {
                let p = &plan.placements[seg.placement];
                let slot = h.slots[seg.placement]
                    .as_mut()
                    .ok_or_else(|| Error::invalid("segment for a tensor that already completed"))?;
                // Checked like the unhooked path: a malformed plan is an error, not a panic.
                let off = |a: u64, b: u64| a.checked_sub(b).and_then(|x| usize::try_from(x).ok());
                let outside = || Error::invalid("segment lies outside its read or its tensor");
                let s = off(seg.obj.start, op.obj.start).ok_or_else(outside)?;
                let n = off(seg.obj.end, seg.obj.start).ok_or_else(outside)?;
                let d = off(seg.obj.start, p.needed.start).ok_or_else(outside)?;
                let from = s
                    .checked_add(n)
                    .and_then(|e| src.get(s..e))
                    .ok_or_else(outside)?;
                let dst = d
                    .checked_add(n)
                    .and_then(|e| slot.as_mut_slice().get_mut(d..e))
                    .ok_or_else(outside)?;
                dst.copy_from_slice(from);
                let r = &mut self.remaining[seg.placement];
                *r = r.saturating_sub(seg.obj.end - seg.obj.start);
                if *r == 0 {
                    complete.push(seg.placement);
                }
            }
            vec![buf]
        };
        for pi in complete {
            let p = &plan.placements[pi];
            let data_start = usize::try_from(p.dest - p.needed_dest)
                .map_err(|_| Error::invalid("tensor prefix too large"))?;
            let whole = if op.direct.is_some() {
                let mut pieces = std::mem::take(&mut h.pieces[pi]);
                pieces.sort_by_key(|b| b.as_ptr() as usize);
                let mut it = pieces.into_iter();
                let mut acc = it
                    .next()
                    .ok_or_else(|| Error::invalid("completed tensor has no bytes"))?;
                for next in it {
                    acc = acc.try_join(next).map_err(|_| {
                        Error::invalid("pieces of one tensor are not adjacent in the arena")
                    })?;
                }
                acc
            } else {
                h.slots[pi]
                    .take()
                    .ok_or_else(|| Error::invalid("tensor completed twice"))?
            };
            self.done_order.push(pi);
            h.dispatch(p.tensor, whole, data_start)?;
        }
        Ok(give_back)
    }
}

/// The arena windows of a Mirror plan's reads (sorted, disjoint by construction).
pub fn direct_ranges(reads: &[ReadOp]) -> Result<Vec<std::ops::Range<usize>>> {
    reads
        .iter()
        .map(|r| {
            let d = r
                .direct
                .ok_or_else(|| Error::invalid("plan mixes direct and staged reads"))?;
            let s = usize::try_from(d).map_err(|_| Error::invalid("arena offset too large"))?;
            let e = usize::try_from(d + r.len())
                .map_err(|_| Error::invalid("arena offset too large"))?;
            Ok(s..e)
        })
        .collect()
}

/// True when `layout` lets reads land in the destination directly.
pub fn is_direct(layout: Layout) -> bool {
    matches!(layout, Layout::Mirror)
}
