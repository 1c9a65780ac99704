//! The warm page-cache path: load a local file that is already in the page cache without the
//! CPU copying it.
//!
//! Measured on the GPU machine (DESIGN.md): one thread of buffered reads into pinned buffers
//! reaches 7 GB/s, 4–16 threads 18–22 GB/s (memcpy bound), while mapping the file and
//! host-registering it read-only lets the copy engine read the page cache at the PCIe ceiling
//! (55 GB/s) — but registering the whole file first took 0.17–0.21 s, which done in series caps
//! the whole at 17–19 GB/s. So this path maps the file, cuts the wanted bytes into page-aligned
//! pieces ([`crate::copy::pieces`]) and has several threads each register a piece
//! (`cuMemHostRegister(READ_ONLY)`), queue its copies on a stream, and register the next piece
//! while that copy runs; a piece is unregistered once its event completed. Where registration
//! is refused (no driver support, a file system that cannot pin its pages) the thread falls back
//! to buffered `pread` into its pinned bounce slots plus async copies — the "several reader
//! threads" design — for that and every later piece.
//!
//! Threads of a second kind ([`crate::CudaOptions::warm_pread_threads`]) can run beside the
//! registering ones, taking pieces from the same queue and copying them with `pread` through
//! their pinned slots, so that the faster way takes more pieces. With
//! [`crate::WarmCopy::Map`] they copy out of the mapping instead, with non-temporal stores
//! ([`MappedFile::copy_into`]); with no registering threads (`warm_threads` 0) that makes a
//! CPU-copy route in which the kernel copies nothing (the pages are mapped and copied by the
//! thread).
//!
//! Measured on the H200 machine (2026-11-27, 6.6 GB file in the page cache; README, *Measured on
//! a GPU*), this path lost to the staging ring: registering pieces ran at 14–23 GB/s whatever the
//! thread count (256 MiB pieces were the fastest, with 3.8 GB resident), 2 registering + 12 pread
//! threads at 36 GB/s, while the ring with 32 pread threads reached 38–40. So
//! [`crate::WarmMode::Off`] stays the default.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tensorstream_engine::{Error, ErrorKind, IoBuf, Plan, Result, TensorIndex};

use crate::copy::{clip, coalesce, landed, pieces, Piece};
use crate::device::{CudaDevice, WarmCopy, WarmMode};
use crate::model::{DeviceModel, LoadTimes, Target};
use crate::raw::driver::{copy_to_device, DeviceArena, HostSource, InFlight};
use crate::raw::mapped::MappedFile;
use crate::raw::pinned::PAGE;
use crate::tracker::Readiness;

/// How the warm path moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WarmStrategy {
    /// Register mapped pieces read-only and let the copy engine read them (falls back to
    /// `Pread` per piece when registration is refused).
    Register,
    /// Buffered `pread` on several threads into pinned slots, then async copies.
    Pread,
}

/// What the warm path did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Pieces the plan was cut into.
    pub pieces: usize,
    /// Pieces copied straight from registered page-cache pages.
    pub registered: usize,
    /// Pieces that went through `pread` + pinned slots (by the pread threads, and by the
    /// registering ones once registration was refused).
    pub fallback: usize,
    /// Of those, the pieces registering threads read with `pread` because the driver refused
    /// to register (see `refused`).
    pub refused_pieces: usize,
    /// Worker threads used.
    pub threads: usize,
    /// Of those, the threads that registered pieces (the others read theirs with `pread`).
    pub registering: usize,
    /// Why registration was abandoned, if it was.
    pub refused: Option<String>,
}

/// Fraction (0..=1) of `path` that is in the page cache, from `mincore` on a mapping. Some
/// sandboxes (gVisor) answer "resident" for every mapped page; the `Loader` decides the route
/// with `tensorstream_backends::local::cached_fraction_of` (non-blocking reads) instead.
pub fn residency(path: &Path) -> Result<f64> {
    MappedFile::open(path)?.resident_fraction()
}

/// Whether `mode` picks the mapped path, given how much of the file is in the page cache
/// (asked only for [`WarmMode::Auto`]; `None`, unknown, means no).
pub fn use_mapped(mode: WarmMode, resident: impl FnOnce() -> Option<f64>) -> bool {
    match mode {
        WarmMode::Off => false,
        WarmMode::Force => true,
        WarmMode::Auto(min) => resident().is_some_and(|f| f >= min),
    }
}

struct Shared<'a> {
    dev: &'a Arc<CudaDevice>,
    arena: &'a Arc<DeviceArena>,
    map: &'a Arc<MappedFile>,
    pieces: &'a [Piece],
    next: AtomicUsize,
    stop: AtomicBool,
    refused: Mutex<Option<String>>,
    registered: AtomicUsize,
    fallback: AtomicUsize,
    refused_pieces: AtomicUsize,
    readiness: &'a Mutex<Readiness>,
    /// Threads `0..registering` register pieces; the others read theirs with `pread` (all of
    /// them with [`WarmStrategy::Pread`], for which `split_threads` gives 0).
    registering: usize,
    cancel: Option<Arc<AtomicBool>>,
}

/// Tells whether an open file (its `fstat`) is still the version a load's index was read from.
pub type SameFile = dyn Fn(&std::fs::Metadata) -> bool + Sync;

/// Loads `plan` from the local file `path` (whose index is `index`) onto `dev` through the
/// mapped warm path, into `target` (its device memory, or a new allocation; its subscriber
/// receives tensors as they land). `same_file`, when given, is
/// asked right after the file is mapped (it is opened again by path: it may have been replaced)
/// and once every copy has finished (it may have been rewritten in place meanwhile); a `false`
/// fails the load with `ObjectChanged`. `cancel`, once set, stops the load before its next
/// piece (`Cancelled`).
#[allow(clippy::too_many_arguments)]
pub fn load_mapped(
    dev: &Arc<CudaDevice>,
    path: &Path,
    index: TensorIndex,
    plan: &Plan,
    strategy: WarmStrategy,
    target: Target,
    same_file: Option<&SameFile>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<(DeviceModel, WarmStats)> {
    let _keep = crate::raw::driver::KeepCurrent::now();
    let start = Instant::now();
    let loc = path.display().to_string();
    let map = MappedFile::open(path).map_err(|e| e.with_location(&loc))?;
    let check = |when: &str| -> Result<()> {
        let Some(same) = same_file else {
            return Ok(());
        };
        if same(&map.metadata().map_err(|e| e.with_location(&loc))?) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::ObjectChanged,
            format!("the file is no longer the version whose index was read ({when})"),
        )
        .with_location(&loc))
    };
    check("when it was mapped")?;
    if map.len() as u64 != index.object_size {
        return Err(Error::new(
            ErrorKind::ObjectChanged,
            format!(
                "file is {} bytes, but was {} bytes when its index was read",
                map.len(),
                index.object_size
            ),
        )
        .with_location(&loc));
    }
    // The slots before the device memory: a load refused because another one holds the device
    // must not allocate memory the running load may need.
    let slots = dev.take_slots()?;
    let (arena, alloc) = crate::sink::arena_for(dev, plan, target.arena)?;
    if let Some(k) = &target.keep {
        k.hold(arena.clone());
    }
    let readiness = Mutex::new(Readiness::new(plan, arena.base(), start, target.subscriber));
    // Synthesized tensors: zero them first.
    let s0 = dev.stream(0).clone();
    let mut zeros = Vec::new();
    for (i, p) in plan.placements.iter().enumerate() {
        if p.needed.is_empty() && p.len > 0 {
            arena.memset_async(p.dest, p.len, &s0)?;
            zeros.push((i, p.len));
        }
    }
    if !zeros.is_empty() {
        dev.synchronize()?;
        lock(&readiness)?.complete(&zeros)?;
    }
    let pieces = pieces(
        plan,
        dev.options().warm_piece as u64,
        PAGE as u64,
        1 << 20,
        map.len() as u64,
    )
    .map_err(|e| e.with_location(&loc))?;
    // A device that cannot register memory read-only would refuse every piece: copy through
    // the slots from the start, every slot dealt to pread threads (a registering thread has
    // one slot only, and would copy its pieces one at a time after the refusal).
    let mut refused_up_front = None;
    let strategy = match strategy {
        WarmStrategy::Register if !dev.supports_read_only_registration() => {
            refused_up_front = Some(
                "the device cannot register host memory read-only \
                 (CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED is 0)"
                    .to_string(),
            );
            WarmStrategy::Pread
        }
        s => s,
    };
    let o = dev.options();
    let (registering, preading) = split_threads(
        strategy,
        o.warm_threads,
        o.warm_pread_threads,
        slots.len(),
        pieces.len(),
    );
    let threads = registering + preading;
    let per_thread = deal_slots(slots, registering, preading);
    let shared = Shared {
        dev,
        arena: &arena,
        map: &map,
        pieces: &pieces,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        refused: Mutex::new(refused_up_front),
        registered: AtomicUsize::new(0),
        fallback: AtomicUsize::new(0),
        refused_pieces: AtomicUsize::new(0),
        readiness: &readiness,
        registering,
        cancel,
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = per_thread
            .into_iter()
            .enumerate()
            .map(|(t, bounce)| {
                let sh = &shared;
                s.spawn(move || {
                    let r = worker(sh, t, bounce);
                    if r.is_err() {
                        sh.stop.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "warm-path thread panicked")))
            })
            .collect()
    });
    for r in results {
        r.map_err(|e| e.with_location(&loc))?;
    }
    dev.synchronize()?;
    check("after the copies")?;
    let times = {
        let mut g = lock(&readiness)?;
        g.check_complete()?;
        g.close();
        LoadTimes {
            first_tensor: g.first(),
            last_tensor: g.last(),
            alloc,
        }
    };
    let stats = WarmStats {
        pieces: pieces.len(),
        registered: shared.registered.load(Ordering::SeqCst),
        fallback: shared.fallback.load(Ordering::SeqCst),
        refused_pieces: shared.refused_pieces.load(Ordering::SeqCst),
        threads,
        registering,
        refused: shared.refused.lock().ok().and_then(|g| g.clone()),
    };
    let model = DeviceModel::new(dev.clone(), arena, index, plan, times)?;
    Ok((model, stats))
}

fn lock(m: &Mutex<Readiness>) -> Result<std::sync::MutexGuard<'_, Readiness>> {
    m.lock()
        .map_err(|_| Error::invalid("readiness lock poisoned"))
}

type Queue = VecDeque<(InFlight, Vec<(usize, u64)>)>;

/// Waits for the oldest queued copy, recycles what it held, marks its tensors.
fn retire(sh: &Shared<'_>, q: &mut Queue, bounce: &mut Vec<IoBuf>) -> Result<()> {
    let Some((f, landed)) = q.pop_front() else {
        // Called to free a slot with nothing in flight: a thread without slots, which would
        // otherwise wait here for ever.
        return Err(Error::invalid(
            "warm path: a copying thread has no pinned slot to copy through",
        ));
    };
    let (src, ev) = f.wait()?;
    sh.dev.recycle_event(ev);
    if let Some(HostSource::Slot(b)) = src {
        bounce.push(b);
    }
    // A registered piece is unregistered here, on this thread, by dropping it.
    lock(sh.readiness)?.complete(&landed)?;
    Ok(())
}

fn worker(sh: &Shared<'_>, t: usize, mut bounce: Vec<IoBuf>) -> Result<()> {
    let stream = sh.dev.stream(t).clone();
    let ctx = sh.dev.context();
    let registers = t < sh.registering;
    let depth = bounce.len().max(2);
    let mut q: Queue = VecDeque::new();
    let run = (|| -> Result<()> {
        loop {
            if sh.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if sh
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::new(ErrorKind::Cancelled, "load cancelled"));
            }
            let k = sh.next.fetch_add(1, Ordering::SeqCst);
            let Some(piece) = sh.pieces.get(k) else {
                return Ok(());
            };
            let try_register = registers && lock_refused(sh).is_none();
            if try_register {
                // At most two pieces registered per thread, since their file pages are resident
                // while they are: the previous one (its copy running) and this one. (Before, the
                // next piece was registered first: three each.)
                while q.len() >= 2 {
                    retire(sh, &mut q, &mut bounce)?;
                }
                match sh.map.register(ctx, piece.obj.clone()) {
                    Ok(reg) => {
                        let ev = sh.dev.event()?;
                        let copies = coalesce(&piece.copies);
                        let f =
                            copy_to_device(sh.arena, HostSource::Mapped(reg), &copies, &stream, ev)
                                .map_err(|e| e.error)?;
                        q.push_back((f, landed(&piece.copies)));
                        sh.registered.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Err(e) => {
                        if let Ok(mut g) = sh.refused.lock() {
                            g.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            }
            // pread fallback through this thread's pinned slots.
            let mut off = piece.obj.start;
            while off < piece.obj.end {
                let slot_len = sh.dev.options().slot_size as u64;
                let end = (off + slot_len).min(piece.obj.end);
                let rel = (off - piece.obj.start)..(end - piece.obj.start);
                let segs = clip(&piece.copies, rel);
                if segs.is_empty() {
                    off = end;
                    continue;
                }
                let need = segs.iter().map(|c| c.src + c.len).max().unwrap_or(0) as usize;
                while bounce.is_empty() || q.len() >= depth {
                    retire(sh, &mut q, &mut bounce)?;
                }
                let mut slot = bounce
                    .pop()
                    .ok_or_else(|| Error::invalid("warm path: no bounce slot"))?;
                if !slot.set_len(need) {
                    return Err(Error::invalid("warm path: piece chunk larger than a slot"));
                }
                match sh.dev.options().warm_copy {
                    WarmCopy::Pread => read_full(sh.map, &mut slot, off)?,
                    WarmCopy::Map => sh.map.copy_into(off, slot.as_mut_slice())?,
                }
                let ev = sh.dev.event()?;
                let f = copy_to_device(
                    sh.arena,
                    HostSource::Slot(slot),
                    &coalesce(&segs),
                    &stream,
                    ev,
                )
                .map_err(|e| e.error)?;
                q.push_back((f, landed(&segs)));
                off = end;
            }
            sh.fallback.fetch_add(1, Ordering::SeqCst);
            if registers {
                sh.refused_pieces.fetch_add(1, Ordering::SeqCst);
            }
        }
    })();
    // Drain what is queued whatever happened (copies must finish before slots go away).
    let mut drained = Ok(());
    while !q.is_empty() {
        if let Err(e) = retire(sh, &mut q, &mut bounce) {
            drained = Err(e);
        }
    }
    run.and(drained)
}

/// How many threads register pieces and how many read them with `pread`, from the wanted
/// counts (`CudaOptions::warm_threads` and `warm_pread_threads`), the pinned slots there are and
/// the pieces to copy. A registering thread needs one slot (its fallback, should registration be
/// refused), a pread thread two (double buffering); pread threads are cut first when slots or
/// pieces run short. `Pread` turns every wanted thread into a pread thread. At least one thread.
pub fn split_threads(
    strategy: WarmStrategy,
    register: usize,
    pread: usize,
    slots: usize,
    pieces: usize,
) -> (usize, usize) {
    let (mut reg, mut pre) = match strategy {
        WarmStrategy::Register => (register, pread),
        WarmStrategy::Pread => (0, register.saturating_add(pread)),
    };
    let most = pieces.max(1);
    pre = pre.min(most.saturating_sub(reg));
    reg = reg.min(most);
    while pre > 0 && reg + 2 * pre > slots {
        pre -= 1;
    }
    reg = reg.min(slots);
    if reg + pre == 0 {
        match strategy {
            WarmStrategy::Register => reg = 1,
            WarmStrategy::Pread => pre = 1,
        }
    }
    (reg, pre)
}

/// Hands the pinned slots out: one to each registering thread (the first `registering`), the
/// rest round-robin to the pread threads (or, without any, to the registering ones).
fn deal_slots(slots: Vec<IoBuf>, registering: usize, preading: usize) -> Vec<Vec<IoBuf>> {
    let threads = (registering + preading).max(1);
    let mut per_thread: Vec<Vec<IoBuf>> = (0..threads).map(|_| Vec::new()).collect();
    let mut rest = slots.into_iter();
    for t in per_thread.iter_mut().take(registering) {
        if let Some(s) = rest.next() {
            t.push(s);
        }
    }
    let (first, count) = if preading > 0 {
        (registering, preading)
    } else {
        (0, threads)
    };
    for (i, s) in rest.enumerate() {
        per_thread[first + i % count].push(s);
    }
    per_thread
}

fn lock_refused(sh: &Shared<'_>) -> Option<String> {
    sh.refused.lock().ok().and_then(|g| g.clone())
}

fn read_full(map: &MappedFile, slot: &mut IoBuf, off: u64) -> Result<()> {
    let buf = slot.as_mut_slice();
    let mut got = 0usize;
    while got < buf.len() {
        match map.file().read_at(&mut buf[got..], off + got as u64) {
            // The plan was checked against the file's size: a shorter file now was cut during
            // the load (as the mapped copy reports it).
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::ObjectChanged,
                    format!(
                        "the file ended at {} while {} bytes were expected from {off}: it shrank during the load",
                        off + got as u64,
                        buf.len()
                    ),
                )
                .with_range(off..off + buf.len() as u64))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, "reading the file (warm path)")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_threads_keep_one_slot_and_pread_threads_two() {
        use WarmStrategy::*;
        // Register only: as many threads as wanted, one slot each at least.
        assert_eq!(split_threads(Register, 4, 0, 8, 100), (4, 0));
        assert_eq!(split_threads(Register, 8, 0, 4, 100), (4, 0));
        // Mixed: 2 registering + 3 pread fit 8 slots (2 + 6); a fourth pread thread does not.
        assert_eq!(split_threads(Register, 2, 4, 8, 100), (2, 3));
        assert_eq!(split_threads(Register, 2, 7, 16, 100), (2, 7));
        // Pread: every wanted thread reads, two slots each.
        assert_eq!(split_threads(Pread, 8, 0, 16, 100), (0, 8));
        assert_eq!(split_threads(Pread, 4, 4, 10, 100), (0, 5));
        // No registering threads: the copying threads take every piece (at most one per two
        // slots).
        assert_eq!(split_threads(Register, 0, 16, 40, 100), (0, 16));
        assert_eq!(split_threads(Register, 0, 25, 40, 100), (0, 20));
        // Few pieces: no more threads than pieces, pread threads cut first.
        assert_eq!(split_threads(Register, 2, 6, 16, 3), (2, 1));
        assert_eq!(split_threads(Register, 4, 0, 8, 0), (1, 0));
        assert_eq!(split_threads(Pread, 4, 0, 2, 0), (0, 1));
    }

    #[test]
    fn slots_are_dealt_one_per_registering_thread_and_the_rest_to_pread_threads() {
        let slots = tensorstream_engine::mem::staging_slots(9, 4096, 4096).unwrap();
        let got: Vec<usize> = deal_slots(slots, 2, 3).iter().map(Vec::len).collect();
        assert_eq!(got, vec![1, 1, 3, 2, 2]);
        let slots = tensorstream_engine::mem::staging_slots(5, 4096, 4096).unwrap();
        let got: Vec<usize> = deal_slots(slots, 2, 0).iter().map(Vec::len).collect();
        assert_eq!(got, vec![3, 2]);
    }
}
