//! GPU loads that need host work on every tensor first (tensorizer hash verification and
//! decryption cannot run on the device).
//!
//! The selected tensors are taken in object order, a group at a time (at most [`GROUP_BYTES`]
//! of the object, or one tensor if it alone is larger). Each group is loaded into host memory by
//! the engine with the tensorizer hook (which verifies / decrypts on worker threads as tensors
//! complete), then copied through the device's pinned staging slots into the one device arena
//! and announced to streaming readers, while the next group loads. Host memory stays bounded by
//! two groups (plus the pinned slots); nothing reaches the device before its hook accepted it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use tensorstream_cuda::{CudaDevice, DeviceModel, HostUpload, Target};
use tensorstream_engine::plan::Placement;
use tensorstream_engine::{execute, format, plan, EngineStats, Error, HostSink, Result};

use crate::Prepared;

/// Most object bytes one group spans in host memory (two groups are in memory at a time).
pub(crate) const GROUP_BYTES: u64 = 128 << 20;

/// Consecutive runs of `placements` (object order) whose needed object ranges span at most
/// `budget` bytes; a tensor larger than `budget` makes a group of its own. Placements that read
/// nothing join whichever group they fall in. Every placement is in exactly one group.
pub(crate) fn groups(placements: &[Placement], budget: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut span: Option<(u64, u64)> = None; // (first needed start, last needed end)
    for (i, p) in placements.iter().enumerate() {
        if p.needed.is_empty() {
            continue;
        }
        if let Some((lo, hi)) = span {
            let new_hi = hi.max(p.needed.end);
            if new_hi.saturating_sub(lo) > budget && i > start {
                out.push(start..i);
                start = i;
                span = Some((p.needed.start, p.needed.end));
                continue;
            }
            span = Some((lo, new_hi));
        } else {
            span = Some((p.needed.start, p.needed.end));
        }
    }
    if start < placements.len() {
        out.push(start..placements.len());
    }
    out
}

/// Where a staged load puts each processed tensor: the device ([`HostUpload`]), or host memory
/// in tests.
pub(crate) trait Dest {
    /// The whole data of `placement` (an index into the device plan's placements).
    fn write(&mut self, placement: usize, bytes: &[u8]) -> Result<()>;
    /// Called after each group: wait for queued copies, announce landed tensors.
    fn settle(&mut self) -> Result<()>;
}

impl Dest for HostUpload {
    fn write(&mut self, placement: usize, bytes: &[u8]) -> Result<()> {
        HostUpload::write(self, placement, bytes)
    }
    fn settle(&mut self) -> Result<()> {
        HostUpload::settle(self)
    }
}

/// Loads `p` (prepared with a hook) onto `dev` group by group through host memory, into
/// `target`.
pub(crate) fn load(
    dev: &Arc<CudaDevice>,
    p: &Prepared,
    target: Target,
) -> Result<(DeviceModel, EngineStats)> {
    if p.hook.is_none() {
        return Err(Error::invalid("staged GPU load without a tensor hook"));
    }
    let mut up = HostUpload::with_target(dev, p.plan.clone(), target)?;
    let mut es = fill(p, &mut up, GROUP_BYTES)?;
    // The pinned slots the groups are copied through, besides the groups themselves.
    let o = dev.options();
    es.staging_bytes += (o.slots as u64).saturating_mul(o.slot_size as u64);
    Ok((up.finish(p.index.clone())?, es))
}

/// One group loaded into host memory and checked by the hook: its plan and arena.
type Group = (
    Arc<tensorstream_engine::Plan>,
    tensorstream_engine::Arena,
    EngineStats,
);

/// Loads the tensors of `p.plan` that are read (not zero-filled) into host memory, at most
/// `budget` object bytes at a time, runs the hook (if any) on them and hands each to `dest`.
///
/// A producer thread loads and checks group n+1 while this thread hands group n to `dest`; the
/// hand-over is a rendezvous, so at most two groups are in host memory. A group reaches `dest`
/// only after the hook accepted every tensor in it; the first error stops both sides (a
/// failing `dest` cancels the group being read).
pub(crate) fn fill(p: &Prepared, dest: &mut dyn Dest, budget: u64) -> Result<EngineStats> {
    let hook = p.hook.clone();
    let placement_of: HashMap<usize, usize> = p
        .plan
        .placements
        .iter()
        .enumerate()
        .map(|(i, pl)| (pl.tensor, i))
        .collect();
    // The producer's reads stop on this flag: set when the consumer fails (so the group being
    // loaded is not read to its end for nothing), and following the load's own cancel flag.
    let stop = crate::stop_flag(p.host_eopts.cancel.clone())?;
    let mut eopts = p.host_eopts.clone();
    eopts.cancel = Some(stop.clone());
    let eopts = &eopts;
    let started = std::time::Instant::now();
    // Every group's plan first (planning is cheap): the groups read what their own plans say,
    // which is not quite the whole plan's reads (a gap the whole plan read across a group
    // boundary is left out; a block straddling one is read twice), so the progress total is
    // corrected to what will be read before anything is.
    let plans = groups(&p.plan.placements, budget)
        .into_iter()
        .map(|g| {
            let sel: Vec<usize> = p.plan.placements[g]
                .iter()
                .filter(|pl| !pl.needed.is_empty())
                .map(|pl| pl.tensor)
                .collect();
            plan(&p.index, &sel, &p.host_popts)
                .map(Arc::new)
                .map_err(|e| e.with_location(p.backend.location()))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(t) = &p.total {
        use std::sync::atomic::Ordering::Relaxed;
        let reads: u64 = plans.iter().map(|hp| hp.read_bytes).sum();
        if reads >= p.plan.read_bytes {
            t.fetch_add(reads - p.plan.read_bytes, Relaxed);
        } else {
            t.fetch_sub(p.plan.read_bytes - reads, Relaxed);
        }
    }
    let mut total = std::thread::scope(|s| -> Result<EngineStats> {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Group>>(0);
        let producer = std::thread::Builder::new()
            .name("ts-staged-load".into())
            .spawn_scoped(s, move || {
                for host_plan in plans {
                    if host_plan.placements.is_empty() {
                        continue; // zero-filled on the device already
                    }
                    let r = load_group(p, eopts, &hook, host_plan);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return; // the consumer stopped, or this was the error it gets
                    }
                }
            })
            .map_err(|e| Error::from_io(e, "spawning the staged-load thread"))?;
        // The consumer side; whatever it returns, the producer is joined below (it stops at its
        // next hand-over once `rx` is gone), so a panic in the producer becomes an error, not a
        // panic here. (A panic in this closure, a bug, unwinds to the caller once the producer
        // has finished the group it is reading.)
        let consumed = (|| -> Result<EngineStats> {
            let mut total = EngineStats::default();
            let mut largest = 0u64;
            for r in rx.iter() {
                let (host_plan, arena, es) = r?;
                let bytes = arena.as_slice()?;
                for hp in &host_plan.placements {
                    // A group read before the load was cancelled is not copied on (it can be
                    // gigabytes, for one large tensor).
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err(Error::new(
                            tensorstream_engine::ErrorKind::Cancelled,
                            "load cancelled",
                        ));
                    }
                    let Some(&i) = placement_of.get(&hp.tensor) else {
                        return Err(Error::invalid(format!(
                            "tensor #{} is in a group but not in the device plan",
                            hp.tensor
                        )));
                    };
                    let range = usize::try_from(hp.dest)
                        .ok()
                        .zip(usize::try_from(hp.len).ok())
                        .and_then(|(d, n)| Some(d..d.checked_add(n)?))
                        .filter(|r| r.end <= bytes.len())
                        .ok_or_else(|| {
                            Error::invalid("tensor lies outside the host group arena")
                        })?;
                    dest.write(i, &bytes[range])?;
                }
                drop(arena);
                dest.settle()?;
                total.reads += es.reads;
                total.bytes_read += es.bytes_read;
                // Host memory besides the destination: this group's arena and the next one's,
                // which the producer fills meanwhile (at most two; the largest counted twice),
                // plus their own staging.
                largest = largest.max(host_plan.arena_len);
                total.staging_bytes = total
                    .staging_bytes
                    .max(largest.saturating_mul(2).saturating_add(es.staging_bytes));
            }
            Ok(total)
        })();
        if consumed.is_err() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        drop(rx);
        let joined = producer.join();
        let total = consumed?;
        if joined.is_err() {
            return Err(Error::new(
                tensorstream_engine::ErrorKind::Io,
                "staged-load thread panicked",
            ));
        }
        Ok(total)
    })?;
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Loads a group's tensors (`host_plan`) into host memory through the engine and runs the
/// hook on each.
fn load_group(
    p: &Prepared,
    eopts: &tensorstream_engine::EngineOptions,
    hook: &Option<Arc<dyn tensorstream_engine::sink::TensorHook>>,
    host_plan: Arc<tensorstream_engine::Plan>,
) -> Result<Group> {
    let sink = match hook {
        Some(h) => HostSink::with_hook(h.clone(), format::tensorizer::hook_threads()),
        None => HostSink::new(),
    }
    .with_prefault(p.caps.kernel_reads);
    let (sink, es) = execute(p.backend.clone(), &p.meta, host_plan.clone(), sink, eopts)?;
    let (arena, _) = sink.into_parts()?;
    Ok((host_plan, arena, es))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pl(tensor: usize, needed: Range<u64>) -> Placement {
        Placement {
            tensor,
            dest: 0,
            len: needed.end - needed.start,
            needed: needed.clone(),
            needed_dest: 0,
        }
    }

    /// Every placement in exactly one group, groups consecutive and in order.
    fn covers(g: &[Range<usize>], n: usize) -> bool {
        let mut next = 0;
        for r in g {
            if r.start != next || r.end <= r.start {
                return false;
            }
            next = r.end;
        }
        next == n
    }

    #[test]
    fn groups_respect_the_budget() {
        let ps: Vec<Placement> = (0..10)
            .map(|i| pl(i, i as u64 * 100..(i as u64 + 1) * 100))
            .collect();
        let g = groups(&ps, 300);
        assert!(covers(&g, 10), "{g:?}");
        assert_eq!(g, vec![0..3, 3..6, 6..9, 9..10]);
    }

    #[test]
    fn a_tensor_over_the_budget_is_a_group_of_its_own() {
        let ps = vec![pl(0, 0..10), pl(1, 10..1000), pl(2, 1000..1010)];
        let g = groups(&ps, 100);
        assert_eq!(g, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn gaps_count_towards_the_span() {
        // Tensorizer headers between tensors are not needed but sit in the host arena's span.
        let ps = vec![pl(0, 0..40), pl(1, 90..130)];
        assert_eq!(groups(&ps, 100), vec![0..1, 1..2]);
        assert_eq!(groups(&ps, 130), vec![0..2]);
    }

    #[test]
    fn placements_that_read_nothing_join_a_group() {
        let ps = vec![
            pl(0, 0..0),
            pl(1, 0..50),
            pl(2, 50..50),
            pl(3, 50..200),
            pl(4, 0..0),
        ];
        let g = groups(&ps, 100);
        assert!(covers(&g, 5), "{g:?}");
        assert_eq!(g, vec![0..3, 3..5]);
        let none = vec![pl(0, 0..0), pl(1, 0..0)];
        assert_eq!(groups(&none, 100), vec![0..2]);
        assert!(groups(&[], 100).is_empty());
    }

    // ------------------------------------------------------------ staged loads, host side
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use tensorstream_engine::format::tensorizer::KeySource;
    use tensorstream_engine::{MemoryBackend, Plan};

    use crate::Loader;

    /// The device arena's stand-in: the same layout (the device plan), in host memory.
    struct VecDest {
        plan: Arc<Plan>,
        arena: Vec<u8>,
        written: Vec<bool>,
        settles: usize,
    }

    impl VecDest {
        fn new(plan: Arc<Plan>) -> Self {
            let n = plan.placements.len();
            VecDest {
                arena: vec![0; plan.arena_len as usize],
                plan,
                written: vec![false; n],
                settles: 0,
            }
        }
        fn bytes(&self, placement: usize) -> &[u8] {
            let p = &self.plan.placements[placement];
            &self.arena[p.dest as usize..(p.dest + p.len) as usize]
        }
    }

    impl Dest for VecDest {
        fn write(&mut self, placement: usize, bytes: &[u8]) -> Result<()> {
            let p = &self.plan.placements[placement];
            assert_eq!(bytes.len() as u64, p.len, "placement #{placement} length");
            assert!(
                !self.written[placement],
                "placement #{placement} written twice"
            );
            self.arena[p.dest as usize..(p.dest + p.len) as usize].copy_from_slice(bytes);
            self.written[placement] = true;
            Ok(())
        }
        fn settle(&mut self) -> Result<()> {
            self.settles += 1;
            Ok(())
        }
    }

    fn fixtures() -> std::path::PathBuf {
        let p = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures"));
        assert!(
            p.join("manifest.json").is_file(),
            "fixtures missing at {} (shared/ must sit beside the checkout)",
            p.display()
        );
        p.to_path_buf()
    }

    fn manifest() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap()
    }

    /// Manifest names of nested state dicts are the stored JSON array without its 0x1E byte; decode
    /// them as the reader does (dotted).
    fn display_name(n: &str) -> String {
        let raw = if n.starts_with('[') {
            [b"\x1e", n.as_bytes()].concat()
        } else {
            n.as_bytes().to_vec()
        };
        tensorstream_engine::format::tensorizer::index::decode_name(&raw)
            .unwrap()
            .0
    }

    fn with_key(l: Loader, entry: &Value) -> Loader {
        let Some(enc) = entry.get("encryption").filter(|e| !e.is_null()) else {
            return l;
        };
        if let Some(h) = enc.get("key_hex").and_then(Value::as_str) {
            return l.key(KeySource::from_key_file(h.as_bytes()).unwrap());
        }
        let pw = enc["password"].as_str().unwrap();
        l.key(KeySource::password(pw.as_bytes()).unwrap())
    }

    fn prepared(l: &Loader) -> Result<Prepared> {
        l.prepare(Some(&tensorstream_cuda::CudaOptions::default()))
    }

    fn sha(b: &[u8]) -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    /// Every tensorizer fixture, verified (and decrypted), through the staged path into the
    /// device plan's layout: each tensor's bytes are the manifest's, at a 256-byte aligned
    /// offset, whatever the group size.
    #[test]
    fn staged_fixtures_match_the_manifest() {
        let m = manifest();
        let mut files = 0;
        for (file, entry) in m["files"].as_object().unwrap() {
            if entry["format"] != "tensorizer" {
                continue;
            }
            files += 1;
            let path = fixtures().join(file);
            for budget in [1, GROUP_BYTES] {
                let l = with_key(Loader::new(path.to_str().unwrap()), entry).verify_hashes(true);
                let p = prepared(&l).unwrap_or_else(|e| panic!("{file}: {e}"));
                assert!(p.hook.is_some(), "{file}: verification needs the hook");
                let mut d = VecDest::new(p.plan.clone());
                fill(&p, &mut d, budget).unwrap_or_else(|e| panic!("{file}: {e}"));
                let read = p
                    .plan
                    .placements
                    .iter()
                    .filter(|x| !x.needed.is_empty())
                    .count();
                if budget == 1 {
                    assert_eq!(d.settles, read, "{file}: one group per tensor read");
                }
                let tensors = entry["tensors"].as_array().unwrap();
                assert_eq!(
                    p.plan.placements.len(),
                    tensors.len(),
                    "{file}: tensor count"
                );
                for t in tensors {
                    let name = display_name(t["name"].as_str().unwrap());
                    let ti = p.index.tensors.iter().position(|x| x.name == name);
                    let ti = ti.unwrap_or_else(|| panic!("{file}: no tensor {name}"));
                    let pi = p
                        .plan
                        .placements
                        .iter()
                        .position(|x| x.tensor == ti)
                        .unwrap();
                    assert_eq!(
                        p.plan.placements[pi].dest % 256,
                        0,
                        "{file}/{name} alignment"
                    );
                    assert_eq!(
                        sha(d.bytes(pi)),
                        t["sha256"].as_str().unwrap(),
                        "{file}/{name} (budget {budget})"
                    );
                    assert!(
                        d.written[pi] || p.plan.placements[pi].needed.is_empty(),
                        "{file}/{name} never written"
                    );
                }
            }
        }
        assert!(
            files >= 6,
            "only {files} tensorizer fixtures in the manifest"
        );
    }

    /// A flipped data byte under verification: the load fails naming the tensor, and the bad
    /// tensor never reaches the destination (the ones before it were written intact).
    #[test]
    fn staged_verify_failure_never_writes_the_bad_tensor() {
        let m = manifest();
        let file = "v1_numpy_dtypes.tensors";
        let entry = &m["files"][file];
        let mut bytes = std::fs::read(fixtures().join(file)).unwrap();
        let idx = Loader::new(fixtures().join(file).to_str().unwrap())
            .inspect()
            .unwrap();
        let (bad, victim) = idx
            .tensors
            .iter()
            .enumerate()
            .rfind(|(_, t)| !t.range.is_empty())
            .map(|(i, t)| (i, t.range.start as usize))
            .unwrap();
        bytes[victim] ^= 0x55;
        let be = Arc::new(MemoryBackend::new(file, bytes));
        let p = prepared(&Loader::from_backend(be).verify_hashes(true)).unwrap();
        let mut d = VecDest::new(p.plan.clone());
        let e = fill(&p, &mut d, 1).expect_err("a corrupted tensor must fail verification");
        let msg = e.to_string();
        let name = &p.index.tensors[bad].name;
        assert!(msg.contains(name.as_str()), "error names the tensor: {msg}");
        let pi = p
            .plan
            .placements
            .iter()
            .position(|x| x.tensor == bad)
            .unwrap();
        assert!(
            !d.written[pi],
            "the corrupted tensor reached the destination"
        );
        let good: Vec<&Value> = entry["tensors"].as_array().unwrap().iter().collect();
        let mut intact = 0;
        for (i, pl) in p.plan.placements.iter().enumerate() {
            if d.written[i] {
                let t = &p.index.tensors[pl.tensor];
                let want = good
                    .iter()
                    .find(|g| display_name(g["name"].as_str().unwrap()) == t.name);
                assert_eq!(sha(d.bytes(i)), want.unwrap()["sha256"].as_str().unwrap());
                intact += 1;
            }
        }
        assert!(intact > 0, "tensors before the bad one were written");
    }

    /// Counts reads and makes each one slow, in front of an in-memory object.
    #[derive(Debug)]
    struct SlowBackend {
        inner: MemoryBackend,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl tensorstream_engine::Backend for SlowBackend {
        fn location(&self) -> &str {
            self.inner.location()
        }
        fn stat(&self) -> Result<tensorstream_engine::ObjectMeta> {
            self.inner.stat()
        }
        fn capabilities(&self) -> tensorstream_engine::Capabilities {
            self.inner.capabilities()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.inner.read_at(offset, buf)
        }
    }

    /// A destination that fails stops the reads of the group being loaded beside it, instead
    /// of letting them run to the group's end.
    #[test]
    fn a_failing_destination_cancels_the_group_being_read() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.safetensors");
        let big = 4u64 << 20;
        let (file, _) = tensorstream_engine::testkit::u8_model(&[4096, big], 3);
        std::fs::write(&src, file).unwrap();
        let out = dir.path().join("m.tensors");
        Loader::new(src.to_str().unwrap())
            .convert(&out, None)
            .unwrap();
        let be = Arc::new(SlowBackend {
            inner: MemoryBackend::new("m.tensors", std::fs::read(&out).unwrap()),
            reads: Default::default(),
        });
        let chunk: usize = 64 << 10;
        let l = Loader::from_backend(be.clone())
            .verify_hashes(true)
            .queue_depth(1)
            .chunk_size(chunk);
        let p = prepared(&l).unwrap();
        assert!(p.hook.is_some());
        /// Fails, and notes how many reads the backend had made when it did.
        struct Failing(Arc<SlowBackend>, Option<usize>);
        impl Dest for Failing {
            fn write(&mut self, _: usize, _: &[u8]) -> Result<()> {
                self.1 = Some(self.0.reads.load(Ordering::SeqCst));
                Err(Error::invalid("the device copy failed"))
            }
            fn settle(&mut self) -> Result<()> {
                Ok(())
            }
        }
        // One group per tensor: the first reaches the destination, which fails, while the
        // second (64 reads of 5 ms) is being read.
        let mut failing = Failing(be.clone(), None);
        let e = fill(&p, &mut failing, 1).expect_err("the destination fails");
        assert!(e.to_string().contains("the device copy failed"), "{e}");
        let at = failing.1.expect("the destination was written to");
        // Counted from the failure, not from the start: the second group's reads before it
        // (while the first group was checked and handed over) do not count against the stop.
        let data_reads = be.reads.load(Ordering::SeqCst) - at;
        let big_reads = big as usize / chunk;
        assert!(
            data_reads < big_reads / 2,
            "{data_reads} reads after the destination failed; the big tensor alone takes {big_reads}"
        );
    }

    /// The wrong key: a clear error before anything is written.
    #[test]
    fn staged_wrong_key_writes_nothing() {
        let path = fixtures().join("v3_encrypted_key.tensors");
        let l = Loader::new(path.to_str().unwrap()).key(KeySource::Key([7; 32]));
        let p = prepared(&l).unwrap();
        let mut d = VecDest::new(p.plan.clone());
        let e = fill(&p, &mut d, GROUP_BYTES).expect_err("wrong key must fail");
        assert!(!d.written.iter().any(|w| *w), "nothing may be written: {e}");
    }
}
