//! Device tests. Without a CUDA driver or device the GPU tests print "skipped: no CUDA device"
//! and return; the no-driver behaviour and option parsing are checked everywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tensorstream_cuda::*;
use tensorstream_engine::format::safetensors::write_header;
use tensorstream_engine::*;

/// `../shared/fixtures` beside the checkout, or `$TS_FIXTURES` (the GPU check runs this test
/// binary on a machine without `../shared`).
fn fixtures() -> PathBuf {
    let p = std::env::var_os("TS_FIXTURES").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        },
        PathBuf::from,
    );
    assert!(
        p.join("manifest.json").is_file(),
        "fixtures missing: {} (shared/ must sit beside the checkout)",
        p.display()
    );
    p
}

/// The device to test on, or None (after saying so) when there is none.
fn gpu(opts: &CudaOptions) -> Option<Arc<CudaDevice>> {
    if !driver_present() {
        println!("skipped: no CUDA device (no driver)");
        return None;
    }
    match device_count() {
        Ok(n) if n > 0 => {}
        other => {
            println!("skipped: no CUDA device ({other:?})");
            return None;
        }
    }
    Some(CudaDevice::open(0, opts).expect("opening cuda:0"))
}

fn small_ring() -> CudaOptions {
    // Tiny slots so a small file cycles the ring many times and spans streams.
    CudaOptions {
        streams: 3,
        slots: 3,
        slot_size: 64 << 10,
        warm_threads: 3,
        warm_piece: 16 << 10,
        ..CudaOptions::default()
    }
}

fn sha(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn no_driver_or_no_device_is_a_clear_error_not_a_panic() {
    let r = CudaSink::new(0, &CudaOptions::default());
    if !driver_present() {
        let e = r.err().expect("no driver must be an error");
        assert_eq!(e.kind(), ErrorKind::Device);
        assert_eq!(
            e.message(),
            "no CUDA driver found (libcuda.so not loadable)"
        );
        let e = device_count().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Device);
        let e = CudaDevice::open(3, &CudaOptions::default()).unwrap_err();
        assert!(e.to_string().contains("no CUDA driver found"), "{e}");
    } else {
        let n = device_count().unwrap();
        let e = CudaSink::new(n + 3, &CudaOptions::default())
            .err()
            .expect("a missing device must be an error");
        assert_eq!(e.kind(), ErrorKind::Device);
        assert_eq!(
            e.message(),
            format!(
                "CUDA device {} not present ({n} device{})",
                n + 3,
                if n == 1 { "" } else { "s" }
            )
        );
    }
}

#[test]
fn bad_options_are_rejected_before_touching_the_driver() {
    for o in [
        CudaOptions {
            streams: 0,
            ..Default::default()
        },
        CudaOptions {
            slots: 1,
            ..Default::default()
        },
        CudaOptions {
            slot_size: 0,
            ..Default::default()
        },
        CudaOptions {
            warm: WarmMode::Auto(1.5),
            ..Default::default()
        },
    ] {
        let e = CudaDevice::open(0, &o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{o:?}: {e}");
    }
    let o = CudaOptions {
        slot_size: 5000,
        ..Default::default()
    }
    .validated()
    .unwrap();
    assert_eq!(o.slot_size, 8192);
}

#[test]
fn device_strings() {
    assert_eq!(parse_device("cuda").unwrap(), 0);
    assert_eq!(parse_device("cuda:3").unwrap(), 3);
    assert_eq!(parse_device("CUDA:1").unwrap(), 1);
    for bad in ["cpu", "cuda:", "cuda:x", "cuda:-1", "cuda3", "gpu:0", "gpu"] {
        assert!(parse_device(bad).is_err(), "{bad}");
    }
}

/// A model-shaped safetensors image with mixed sizes (some not multiples of 256, an empty one).
fn model_file() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let sizes: [u64; 9] = [1000, 0, 7, 262_144, 3, 200_001, 1, 65_536, 140_000];
    let tensors: Vec<(String, DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("layer.{i}.w"), DType::U8, vec![n], n))
        .collect();
    let mut file = write_header(&tensors, &BTreeMap::new()).unwrap();
    let mut datas = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let d: Vec<u8> = (0..n)
            .map(|j| (j as u8).wrapping_mul(37).wrapping_add(i as u8 * 11) ^ (j >> 9) as u8)
            .collect();
        file.extend_from_slice(&d);
        datas.push((format!("layer.{i}.w"), d));
    }
    (file, datas)
}

/// [`load_mapped`] into a new allocation, with no subscriber, version check or cancel flag.
fn warm_load(
    dev: &Arc<CudaDevice>,
    path: &std::path::Path,
    index: TensorIndex,
    plan: &Plan,
    strategy: WarmStrategy,
) -> Result<(DeviceModel, WarmStats)> {
    load_mapped(
        dev,
        path,
        index,
        plan,
        strategy,
        Default::default(),
        None,
        None,
    )
}

/// Engine options of the tests' loads: four reads in flight.
fn four_deep() -> EngineOptions {
    EngineOptions {
        queue_depth: 4,
        ..Default::default()
    }
}

fn gpu_plan(index: &TensorIndex, chunk: u64) -> Arc<Plan> {
    let mut o = PlanOptions::new(index.object_size);
    o.layout = Layout::Packed {
        align: TENSOR_ALIGN,
    };
    o.chunk_size = chunk;
    o.alignment = 4096;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    Arc::new(plan(index, &sel, &o).unwrap())
}

/// [`model_file`] behind a memory backend: the backend, its stat, its index, and each tensor's
/// bytes.
struct MemModel {
    be: Arc<dyn Backend>,
    meta: ObjectMeta,
    index: TensorIndex,
    want: Vec<(String, Vec<u8>)>,
}

fn mem_model() -> MemModel {
    let (file, want) = model_file();
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem", file));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    MemModel {
        be,
        meta,
        index,
        want,
    }
}

fn check_model(m: &DeviceModel, want: &[(String, Vec<u8>)]) {
    assert_eq!(m.len(), want.len());
    for (name, data) in want {
        let t = m.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.len as usize, data.len());
        if t.len > 0 {
            assert_eq!(t.ptr % TENSOR_ALIGN, 0, "{name} not aligned");
        }
        assert_eq!(sha(&m.to_host(&t).unwrap()), sha(data), "{name}");
        let mut h = Sha256::new();
        m.read_chunks(&t, 4097, |c| {
            h.update(c);
            Ok(())
        })
        .unwrap();
        let d: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(d, sha(data), "{name} (chunked readback)");
    }
}

#[test]
fn gpu_generated_file_lands_byte_exact_through_the_ring() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be,
        meta,
        index,
        want,
    } = mem_model();
    let plan = gpu_plan(&index, 64 << 10);
    let eo = four_deep();
    let (m, stats) = load(&dev, be.clone(), &meta, index.clone(), plan.clone(), &eo).unwrap();
    assert!(stats.reads as usize > 3, "the ring must cycle");
    check_model(&m, &want);
    assert!(m.times().first_tensor.is_some());
    m.release().unwrap();

    // Streaming: every tensor exactly once, then the model.
    let mut s = load_streaming(&dev, be, meta, index, plan.clone(), eo).unwrap();
    let mut seen: Vec<usize> = s.by_ref().map(|t| t.placement).collect();
    let (m, _) = s.wait().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..plan.placements.len()).collect::<Vec<_>>());
    check_model(&m, &want);
    // The pinned slots came back: a third load on the same device works.
    m.release().unwrap();
    assert_eq!(dev.take_slots().unwrap().len(), 3);
}

#[test]
fn gpu_synthesized_tensors_are_zeroed_on_the_device() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be,
        meta,
        mut index,
        ..
    } = mem_model();
    index.tensors.push(TensorInfo {
        name: "meta.zeros".into(),
        dtype: DType::F32,
        shape: vec![3, 1000],
        range: 0..0,
        source: TensorSource::Zeros,
        path: None,
        prefix: None,
        role: None,
    });
    let plan = gpu_plan(&index, 64 << 10);
    let (m, _) = load(&dev, be, &meta, index, plan, &EngineOptions::default()).unwrap();
    let t = m.get("meta.zeros").unwrap();
    assert_eq!(t.len, 12_000);
    assert!(m.to_host(&t).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn gpu_slot_smaller_than_reads_is_refused() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be, meta, index, ..
    } = mem_model();
    let plan = gpu_plan(&index, 1 << 20); // reads larger than the 64 KiB slots
    let e = load(&dev, be, &meta, index, plan, &EngineOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    // The failed load gave the slots back.
    assert_eq!(dev.take_slots().unwrap().len(), 3);
}

/// Tensors on the device start on TENSOR_ALIGN boundaries: a plan that would put them
/// elsewhere (packed to 8 bytes, or mirroring the file's offsets) is refused before any copy,
/// and the failed load gives the slots back.
#[test]
fn gpu_plans_with_misaligned_tensors_are_refused() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be, meta, index, ..
    } = mem_model();
    for layout in [Layout::Packed { align: 8 }, Layout::Mirror] {
        let mut o = PlanOptions::new(index.object_size);
        o.layout = layout;
        o.chunk_size = 64 << 10;
        o.alignment = 4096;
        let sel: Vec<usize> = (0..index.tensors.len()).collect();
        let plan = Arc::new(plan(&index, &sel, &o).unwrap());
        assert!(
            plan.placements
                .iter()
                .any(|p| p.len > 0 && p.dest % TENSOR_ALIGN != 0),
            "{layout:?}: the test needs a misaligned tensor"
        );
        let e = load(
            &dev,
            be.clone(),
            &meta,
            index.clone(),
            plan,
            &EngineOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{layout:?}: {e}");
        assert!(
            e.to_string().contains("256-byte boundary"),
            "{layout:?}: {e}"
        );
        assert_eq!(dev.take_slots().unwrap().len(), 3, "{layout:?}");
    }
}

#[test]
fn gpu_mixed_fixture_matches_manifest() {
    let dir = fixtures();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let want: Vec<(String, String)> = manifest["files"]["mixed.safetensors"]["tensors"]
        .as_array()
        .expect("manifest lists mixed.safetensors")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!want.is_empty());
    let Some(dev) = gpu(&CudaOptions::default()) else {
        return;
    };
    let bytes = std::fs::read(dir.join("mixed.safetensors")).unwrap();
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mixed.safetensors", bytes));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let plan = gpu_plan(&index, 16 << 20);
    let (m, _) = load(&dev, be, &meta, index, plan, &EngineOptions::default()).unwrap();
    assert_eq!(m.len(), want.len());
    for (name, digest) in &want {
        let t = m.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(&sha(&m.to_host(&t).unwrap()), digest, "{name}");
    }
}

#[test]
fn gpu_warm_mapped_path_matches_both_strategies() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let (file, want) = model_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, &file).unwrap();
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem", file));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let plan = gpu_plan(&index, 64 << 10);
    assert!(residency(&path).unwrap() > 0.0);
    for strategy in [WarmStrategy::Register, WarmStrategy::Pread] {
        let (m, st) = warm_load(&dev, &path, index.clone(), &plan, strategy).unwrap();
        assert_eq!(st.registered + st.fallback, st.pieces, "{st:?}");
        if strategy == WarmStrategy::Pread {
            assert_eq!(st.registered, 0);
        }
        println!("{strategy:?}: {st:?}");
        check_model(&m, &want);
        m.release().unwrap();
    }
    // A cancel flag already set stops the load before its first piece.
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let e = load_mapped(
        &dev,
        &path,
        index.clone(),
        &plan,
        WarmStrategy::Register,
        Default::default(),
        None,
        Some(cancel),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
}

/// Loads abandoned with copies in flight: a streaming load dropped after its first tensor, and
/// a load whose cancel flag is set while it runs. Both end without touching freed memory, and
/// the device then serves a full load with every byte right (the slots came back).
#[test]
fn gpu_abandoned_loads_clean_up_and_the_device_serves_the_next() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be,
        meta,
        index,
        want,
    } = mem_model();
    let plan = gpu_plan(&index, 16 << 10);
    let eo = EngineOptions {
        queue_depth: 3,
        ..Default::default()
    };
    for round in 0..3 {
        let mut s = load_streaming(
            &dev,
            be.clone(),
            meta.clone(),
            index.clone(),
            plan.clone(),
            eo.clone(),
        )
        .unwrap();
        let first = s.next().expect("a first tensor");
        assert!(first.placement < plan.placements.len(), "round {round}");
        drop(s);

        // Cancelled once the first bytes have landed: copies are in flight.
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, seen) = (cancel.clone(), progress.clone());
        let setter = std::thread::spawn(move || {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen.load(std::sync::atomic::Ordering::SeqCst) == 0
                && std::time::Instant::now() < until
            {
                std::thread::yield_now();
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let r = load(
            &dev,
            be.clone(),
            &meta,
            index.clone(),
            plan.clone(),
            &EngineOptions {
                cancel: Some(cancel),
                progress: Some(progress),
                ..eo.clone()
            },
        );
        setter.join().unwrap();
        match r {
            Ok((m, _)) => check_model(&m, &want), // finished before the flag was seen
            Err(e) => assert_eq!(e.kind(), ErrorKind::Cancelled, "round {round}: {e}"),
        }
    }
    // A streaming load under a caller's cancel flag (never set): dropping it does not stop it,
    // so it goes on in the background holding the slots, and the next load waits for them.
    let mut s = load_streaming(
        &dev,
        be.clone(),
        meta.clone(),
        index.clone(),
        plan.clone(),
        EngineOptions {
            cancel: Some(Arc::new(std::sync::atomic::AtomicBool::new(false))),
            ..eo.clone()
        },
    )
    .unwrap();
    assert!(s.next().is_some());
    drop(s);
    // Whatever the abandoned loads held comes back: a full load on the same device, at once.
    let (m, _) = load(&dev, be.clone(), &meta, index.clone(), plan.clone(), &eo)
        .unwrap_or_else(|e| panic!("the device did not come back: {e}"));
    check_model(&m, &want);
    m.release().unwrap();
}

/// A device allocation waits for a dropped load as the slot wait does: the memory such a load
/// still holds is free again before the next load allocates its own (else a model larger than
/// half the device fails with out-of-memory after a dropped load). The dropped load itself
/// allocates without waiting on itself, and a live load is not waited for.
#[test]
fn gpu_device_allocation_waits_for_a_dropped_load() {
    use std::time::{Duration, Instant};
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let (got, has) = crossbeam_channel::bounded::<()>(1);
    let (release, hold) = crossbeam_channel::bounded::<()>(1);
    let (tell, told) = crossbeam_channel::bounded::<Duration>(1);
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (d, e) = (dev.clone(), ended.clone());
    let load = StreamingLoad::spawn(move |_tx| {
        let slots = d.take_slots()?;
        let mem = d.alloc(1 << 20)?;
        got.send(()).unwrap();
        let _ = hold.recv_timeout(Duration::from_secs(60));
        // Left running by now: its own allocation does not wait for itself.
        let t = Instant::now();
        let more = d.alloc(4096);
        tell.send(t.elapsed()).unwrap();
        drop((more, mem, slots));
        e.store(true, std::sync::atomic::Ordering::SeqCst);
        Err(Error::invalid("released"))
    })
    .unwrap();
    has.recv_timeout(Duration::from_secs(10)).unwrap();
    // Live: an allocation beside it goes ahead at once.
    let t = Instant::now();
    drop(dev.alloc(4096).unwrap());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited for a live load"
    );
    drop(load); // no stop flag: returns at once, the load goes on
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        release.send(()).unwrap();
    });
    let mem = dev
        .alloc(1 << 20)
        .expect("an allocation after the dropped load");
    // (That the allocation waited is what this says: the load ends only once released.)
    assert!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        "allocated before the dropped load had freed its memory"
    );
    let own = told.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        own < Duration::from_secs(5),
        "the dropped load waited on itself: {own:?}"
    );
    releaser.join().unwrap();
    drop(mem);
}

/// Anything a stand-in load holds (dropping it lets go).
trait Held {}
impl<T> Held for T {}

/// A stand-in load: takes what `take` takes from the device (its slots, a reservation), says
/// so, and holds it until released (or for 60 s). Returns the load and its release.
fn holding(
    dev: &Arc<CudaDevice>,
    take: impl for<'a> FnOnce(&'a CudaDevice) -> Result<Box<dyn Held + 'a>> + Send + 'static,
) -> (StreamingLoad, crossbeam_channel::Sender<()>) {
    use std::time::Duration;
    let (got, has) = crossbeam_channel::bounded::<()>(1);
    let (release, hold) = crossbeam_channel::bounded::<()>(1);
    let d = dev.clone();
    let load = StreamingLoad::spawn(move |_tx| {
        let held = take(&d)?;
        got.send(()).unwrap();
        let _ = hold.recv_timeout(Duration::from_secs(60));
        drop(held);
        Err(Error::invalid("released"))
    })
    .unwrap();
    has.recv_timeout(Duration::from_secs(10)).unwrap();
    (load, release)
}

/// Releases a stand-in load ([`holding`]) 300 ms from now, on a thread; the flag says whether
/// it has been released yet.
fn release_later(
    release: crossbeam_channel::Sender<()>,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let released = Arc::new(AtomicBool::new(false));
    let r = released.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        r.store(true, Ordering::SeqCst);
        release.send(()).unwrap();
    });
    (released, releaser)
}

/// A ring load that is waiting for a dropped one (its device allocation, on a thread of its
/// own, and its slots) stops waiting when it is dropped in turn: the drop does not sit out the
/// dropped load's time. Then, once that one ends, the device serves a full load.
#[test]
fn gpu_a_load_waiting_for_a_dropped_one_can_be_dropped() {
    use std::time::{Duration, Instant};
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        be,
        meta,
        index,
        want,
    } = mem_model();
    let plan = gpu_plan(&index, 16 << 10);
    let (first, release) = holding(&dev, |d| Ok(Box::new(d.take_slots()?)));
    drop(first); // no stop flag: left running, holding the slots
    let waiting = load_streaming(
        &dev,
        be.clone(),
        meta.clone(),
        index.clone(),
        plan.clone(),
        EngineOptions::default(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200)); // allocating and taking the slots: waiting
    let t = Instant::now();
    drop(waiting);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "dropping a waiting load took {:?}",
        t.elapsed()
    );
    release.send(()).unwrap();
    let (m, _) = load(&dev, be, &meta, index, plan, &EngineOptions::default())
        .unwrap_or_else(|e| panic!("the device did not come back: {e}"));
    check_model(&m, &want);
    m.release().unwrap();
}

/// The slot wait, deterministically: a streaming load that holds the slots and is left running
/// (handle dropped, no stop flag) is waited for by the next `take_slots`, which succeeds as soon
/// as it lets go; a load that is itself waiting and is asked to stop gives up at once; and slots
/// held by anything else (a live load) are refused at once.
#[test]
fn gpu_slot_wait_is_only_for_dropped_loads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    // Live holder: refused at once.
    let (load, release) = holding(&dev, |d| Ok(Box::new(d.take_slots()?)));
    let t = Instant::now();
    let e = dev.take_slots().unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited for a live load"
    );
    assert!(e.to_string().contains("one at a time"), "{e}");
    release.send(()).unwrap();
    assert_eq!(load.wait().unwrap_err().kind(), ErrorKind::InvalidInput);

    // Dropped holder, still running: waited for, and the slots come as soon as it lets go.
    let (load, release) = holding(&dev, |d| Ok(Box::new(d.take_slots()?)));
    drop(load); // no stop flag: returns at once, the load goes on
    let (released, releaser) = release_later(release);
    let slots = dev.take_slots().expect("the dropped load's slots");
    assert!(
        released.load(Ordering::SeqCst),
        "did not wait for the dropped load"
    );
    releaser.join().unwrap();

    // A load waiting for a dropped one's slots stops waiting when asked to stop.
    drop(slots);
    let (first, release) = holding(&dev, |d| Ok(Box::new(d.take_slots()?)));
    drop(first);
    let stop = Arc::new(AtomicBool::new(false));
    let d = dev.clone();
    let waiting = StreamingLoad::spawn(move |_tx| {
        let _slots = d.take_slots()?;
        Err(Error::invalid("got the slots"))
    })
    .unwrap()
    .with_stop(stop.clone());
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let t = Instant::now();
    assert_eq!(waiting.wait().unwrap_err().kind(), ErrorKind::Cancelled);
    assert!(t.elapsed() < Duration::from_secs(5));
    release.send(()).unwrap();

    // A dropped load that takes the slots again (a checkpoint's next shard) does not wait on
    // itself; and the next load waits until the dropped one has ended.
    let (got, has) = crossbeam_channel::bounded::<()>(1);
    let (release, hold) = crossbeam_channel::bounded::<()>(1);
    let (tell, told) = crossbeam_channel::bounded::<(bool, Duration)>(1);
    let d = dev.clone();
    let load = StreamingLoad::spawn(move |_tx| {
        drop(d.take_slots()?);
        got.send(()).unwrap();
        let _ = hold.recv_timeout(Duration::from_secs(60));
        let t = Instant::now();
        let again = d.take_slots();
        tell.send((again.is_ok(), t.elapsed())).unwrap();
        drop(again);
        Err(Error::invalid("done"))
    })
    .unwrap();
    has.recv_timeout(Duration::from_secs(10)).unwrap();
    drop(load); // no stop flag: left running
    release.send(()).unwrap();
    let (ok, waited) = told.recv_timeout(Duration::from_secs(120)).unwrap();
    assert!(
        ok && waited < Duration::from_secs(5),
        "{ok} after {waited:?}"
    );
    drop(
        dev.take_slots()
            .expect("the slots once the dropped load ended"),
    );
}

/// The pinned staging ring is never copied into a forked child (`dc` in its mapping's
/// VmFlags): reads DMA into it for its whole life, and on kernels before 5.19 a fork during
/// one would move the parent's page away from the one the read lands in.
#[test]
fn gpu_staging_ring_is_kept_out_of_forked_children() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let slots = dev.take_slots().unwrap();
    let flags = tensorstream_engine::testkit::vm_flags(slots[0].as_ptr() as usize);
    assert!(flags.contains(&"dc".to_string()), "{flags:?}");
}

/// Whether this process is a child started by [`run_in_child`].
fn in_child() -> bool {
    std::env::var_os("TS_TEST_CHILD").is_some()
}

/// Runs test `name` of this binary again in a child process with fakecuda settings `env`
/// (fakecuda reads them once, at `cuInit`), and checks that it passed and printed "child
/// checked" (so that a filter that matched nothing cannot pass).
fn run_in_child(name: &str, env: &[(&str, &str)]) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env("TS_TEST_CHILD", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("child checked"), "{text}\n{err}");
}

/// After an unrecoverable device fault (a "sticky" error: every later call in the context
/// fails) the failed load's slots stay leaked (the device could not confirm its copies ended),
/// and the next load on the handle says that the device is unusable, naming the fault, rather
/// than that another load holds the slots. Needs fakecuda's fault injection, which is set for
/// the whole process at `cuInit`: the test runs itself again in a child process with it.
#[test]
fn gpu_a_load_after_a_sticky_device_fault_names_the_fault() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    if !in_child() {
        if !dev.name().unwrap().contains("fakecuda") {
            println!("skipped: needs fakecuda's fault injection (a real device has no such fault)");
            return;
        }
        drop(dev);
        run_in_child(
            "gpu_a_load_after_a_sticky_device_fault_names_the_fault",
            &[("FAKECUDA_FAIL_SYNC_AT", "1")],
        );
        return;
    }
    let MemModel {
        be, meta, index, ..
    } = mem_model();
    let plan = gpu_plan(&index, 64 << 10);
    let eo = four_deep();
    let first = load(&dev, be.clone(), &meta, index.clone(), plan.clone(), &eo);
    let e = first.expect_err("the injected fault fails the first load");
    assert!(e.to_string().contains("CUDA_ERROR_LAUNCH_FAILED"), "{e}");
    let e = load(&dev, be, &meta, index, plan, &eo).expect_err("the context is broken");
    let msg = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Device, "{msg}");
    assert!(
        msg.contains("unusable after an unrecoverable error"),
        "{msg}"
    );
    assert!(msg.contains("CUDA_ERROR_LAUNCH_FAILED"), "{msg}");
    assert!(!msg.contains("in use by another load"), "{msg}");
    println!("child checked: {msg}");
}

/// The calling thread's current CUDA context (null when none), as an address.
fn current_ctx() -> usize {
    cudarc::driver::result::ctx::get_current()
        .expect("cuCtxGetCurrent")
        .map_or(0, |c| c as usize)
}

/// The calling thread's current CUDA context is the same after every call of this crate as
/// before it, whether another device's context was current (an application working on
/// another GPU: the CUDA runtime follows the current context) or none: opening, loading,
/// streaming, reading back, releasing and dropping models and the device. Needs two devices:
/// under fakecuda the test runs itself again in a child process with two.
#[test]
fn gpu_calls_leave_the_threads_cuda_context_as_they_found_it() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    if !in_child() && device_count().unwrap() < 2 {
        if !dev.name().unwrap().contains("fakecuda") {
            println!("skipped: needs a second CUDA device");
            return;
        }
        drop(dev);
        run_in_child(
            "gpu_calls_leave_the_threads_cuda_context_as_they_found_it",
            &[("FAKECUDA_DEVICES", "2")],
        );
        return;
    }
    drop(dev);
    // The sequence, on a thread whose current context is `other` (null: none).
    let sequence = |other: usize| {
        let check = |what: &str| assert_eq!(current_ctx(), other, "after {what}");
        let dev = CudaDevice::open(0, &small_ring()).unwrap();
        check("CudaDevice::open");
        dev.name().unwrap();
        dev.mem_info().unwrap();
        check("name and mem_info");
        let MemModel {
            be,
            meta,
            index,
            want,
        } = mem_model();
        let plan = gpu_plan(&index, 64 << 10);
        let eo = four_deep();
        let (m, _) = load(&dev, be.clone(), &meta, index.clone(), plan.clone(), &eo).unwrap();
        check("load");
        check_model(&m, &want);
        check("to_host and read_chunks");
        m.release().unwrap();
        check("release");
        let s = load_streaming(
            &dev,
            be.clone(),
            meta.clone(),
            index.clone(),
            plan.clone(),
            eo.clone(),
        )
        .unwrap();
        let (m, _) = s.wait().unwrap();
        check("a streaming load");
        drop(m);
        check("dropping a model");
        let mut s = load_streaming(
            &dev,
            be.clone(),
            meta.clone(),
            index.clone(),
            plan.clone(),
            eo,
        )
        .unwrap();
        let _first = s.next();
        drop(s);
        check("dropping a streaming load");
        // The warm path (a cached file, registered and copied in pieces).
        let (file, _) = model_file();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &file).unwrap();
        for strategy in [WarmStrategy::Register, WarmStrategy::Pread] {
            let (m, _) = warm_load(&dev, &path, index.clone(), &plan, strategy).unwrap();
            check("load_mapped");
            drop(m);
            check("dropping a model of the warm path");
        }
        // Host bytes uploaded placement by placement.
        let mut up = HostUpload::new(&dev, plan.clone()).unwrap();
        check("HostUpload::new");
        for (i, p) in plan.placements.iter().enumerate() {
            if !p.needed.is_empty() {
                let t = &index.tensors[p.tensor];
                let bytes = be
                    .read_exact_at(t.range.start, t.nbytes() as usize)
                    .unwrap();
                up.write(i, &bytes).unwrap();
            }
        }
        check("HostUpload::write");
        let m = up.finish(index).unwrap();
        check("HostUpload::finish");
        check_model(&m, &want);
        drop(m);
        drop(dev);
        check("dropping the device");
    };
    let other = cudarc::driver::CudaContext::new(1).unwrap();
    other.bind_to_thread().unwrap();
    let mine = current_ctx();
    assert_ne!(mine, 0);
    sequence(mine);
    std::thread::spawn(move || {
        assert_eq!(current_ctx(), 0, "a new thread has no current context");
        sequence(0);
    })
    .join()
    .unwrap();
    drop(other);
    println!("child checked");
}

/// A device that cannot register host memory read-only (fakecuda's "refuse-readonly": the
/// device attribute says 0, and every such registration fails) gets the warm path's pread
/// threads from the start, with every slot, and the stats say why; the bytes are right.
#[test]
fn gpu_a_device_without_read_only_registration_copies_through_the_slots() {
    // Seven slots: room for three pread threads of two slots each.
    let opts = CudaOptions {
        slots: 7,
        ..small_ring()
    };
    let Some(dev) = gpu(&opts) else {
        return;
    };
    if !in_child() && dev.supports_read_only_registration() {
        if !dev.name().unwrap().contains("fakecuda") {
            println!("skipped: the device registers read-only memory");
            return;
        }
        drop(dev);
        run_in_child(
            "gpu_a_device_without_read_only_registration_copies_through_the_slots",
            &[("FAKECUDA_REGISTER", "refuse-readonly")],
        );
        return;
    }
    assert!(!dev.supports_read_only_registration());
    let (file, want) = model_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, &file).unwrap();
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem", file));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let plan = gpu_plan(&index, 64 << 10);
    let (m, st) = warm_load(&dev, &path, index, &plan, WarmStrategy::Register).unwrap();
    assert_eq!(st.registering, 0, "{st:?}");
    assert_eq!(st.registered, 0, "{st:?}");
    assert_eq!(st.fallback, st.pieces, "{st:?}");
    assert_eq!(st.threads, 3, "every wanted thread reads: {st:?}");
    let why = st.refused.as_deref().unwrap_or_default();
    assert!(why.contains("READ_ONLY_HOST_REGISTER_SUPPORTED"), "{st:?}");
    check_model(&m, &want);
    println!("child checked: {st:?}");
}

/// A reservation keeps the device for the reserving thread's loads between their parts (a
/// sharded checkpoint's shards): that thread takes and gives back the slots as it likes,
/// another thread is refused at once, and once the reservation is dropped it is not.
#[test]
fn gpu_a_reserved_device_serves_only_its_thread() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let r = dev.reserve().unwrap();
    drop(dev.take_slots().expect("the reserving thread's first part"));
    drop(
        dev.take_slots()
            .expect("the reserving thread's second part"),
    );
    let d = dev.clone();
    let other = std::thread::spawn(move || d.take_slots().map(drop).err().map(|e| e.to_string()));
    let e = other
        .join()
        .unwrap()
        .expect("another thread took a reserved device's slots");
    assert!(e.contains("reserved by another load"), "{e}");
    let d = dev.clone();
    let e = std::thread::spawn(move || d.reserve().map(drop).err().map(|e| e.to_string()))
        .join()
        .unwrap()
        .expect("another thread reserved a reserved device");
    assert!(e.contains("reserved by another load"), "{e}");
    // Slots lent out: no reservation either.
    drop(r);
    let slots = dev.take_slots().unwrap();
    let d = dev.clone();
    let e = std::thread::spawn(move || d.reserve().map(drop).err().map(|e| e.to_string()))
        .join()
        .unwrap()
        .expect("a reservation while the slots were lent");
    assert!(e.contains("one at a time"), "{e}");
    drop(slots);
    let d = dev.clone();
    std::thread::spawn(move || drop(d.take_slots().expect("slots after the reservation ended")))
        .join()
        .unwrap();

    // A streaming load that reserved the device and was dropped while it ran (between two
    // shards, say) is waited for, as one holding the slots would be, not refused.
    use std::sync::atomic::Ordering;
    let (load, release) = holding(&dev, |d| Ok(Box::new(d.reserve()?)));
    drop(load); // no stop flag: left running, the device still reserved
    let (released, releaser) = release_later(release);
    drop(dev.take_slots().expect("slots once the dropped load ended"));
    assert!(
        released.load(Ordering::SeqCst),
        "refused or taken before the dropped load ended"
    );
    releaser.join().unwrap();
}

/// A backend over [`model_file`] whose reads of the tensor data block until released: a
/// stand-in for a read stuck in its backend (a hard NFS mount whose server went away).
#[derive(Debug)]
struct StuckReads {
    inner: MemoryBackend,
    /// Reads at or past this offset block until `release` is closed.
    from: u64,
    release: crossbeam_channel::Receiver<()>,
    blocked: std::sync::atomic::AtomicUsize,
}

impl Backend for StuckReads {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> Result<ObjectMeta> {
        self.inner.stat()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.from {
            self.blocked
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Disconnected once the test lets the reads go (or after a minute).
            let _ = self
                .release
                .recv_timeout(std::time::Duration::from_secs(60));
        }
        self.inner.read_at(offset, buf)
    }
}

/// A load cancelled while a read is stuck in its backend returns after the engine's grace
/// period, leaving that read (and the pinned slot it reads into) to end on its own thread.
/// The device handle must still serve the next load: it is not "in use by another load".
#[test]
fn gpu_a_read_left_stuck_by_a_cancelled_load_does_not_block_the_device() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel {
        meta, index, want, ..
    } = mem_model();
    let (file, _) = model_file();
    let plan = gpu_plan(&index, 16 << 10);
    let (release, released) = crossbeam_channel::bounded::<()>(0);
    let stuck = Arc::new(StuckReads {
        inner: MemoryBackend::new("stuck", file.clone()),
        from: index.tensors[5].range.start,
        release: released,
        blocked: Default::default(),
    });
    let cancel = Arc::new(AtomicBool::new(false));
    let (flag, seen) = (cancel.clone(), stuck.clone());
    let setter = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while seen.blocked.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        flag.store(true, Ordering::SeqCst);
    });
    let be: Arc<dyn Backend> = stuck.clone();
    let r = load(
        &dev,
        be,
        &meta,
        index.clone(),
        plan.clone(),
        &EngineOptions {
            queue_depth: 3,
            cancel: Some(cancel),
            ..Default::default()
        },
    );
    setter.join().unwrap();
    assert_eq!(
        r.map(drop).unwrap_err().kind(),
        ErrorKind::Cancelled,
        "the stuck load"
    );
    // The read is still stuck: the next load on the handle is served all the same.
    let good: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem", file));
    let eo = four_deep();
    let (m, _) = load(&dev, good.clone(), &meta, index.clone(), plan.clone(), &eo)
        .unwrap_or_else(|e| panic!("the device did not serve the next load: {e}"));
    check_model(&m, &want);
    m.release().unwrap();
    // Once the stuck read ends, the device still serves loads.
    drop(release);
    for _ in 0..2 {
        let (m, _) = load(&dev, good.clone(), &meta, index.clone(), plan.clone(), &eo)
            .unwrap_or_else(|e| panic!("after the stuck read ended: {e}"));
        check_model(&m, &want);
        m.release().unwrap();
    }
}

/// A load that the device refuses because another load holds it is refused before it
/// allocates device memory: otherwise its allocation, made on a thread of its own while the
/// running load allocates too, could leave the running load out of device memory (two loads
/// of a model larger than half the device on one handle: the refused one made the other fail
/// with CUDA_ERROR_OUT_OF_MEMORY in about 4 % of tries under fakecuda). So the sink refuses in
/// `prepare`, which comes before the allocation, and the warm route does too.
#[test]
fn gpu_a_refused_concurrent_load_allocates_nothing() {
    let Some(dev) = gpu(&small_ring()) else {
        return;
    };
    let MemModel { index, .. } = mem_model();
    let plan = gpu_plan(&index, 16 << 10);
    // The running load, as far as the device can tell.
    let held = dev.take_slots().unwrap();
    let mut sink = CudaSink::on(dev.clone());
    let e = sink
        .prepare(&plan)
        .map(drop)
        .expect_err("prepared (and allocating) while another load holds the device");
    assert!(e.to_string().contains("one at a time"), "{e}");
    drop(sink);
    // The warm route likewise.
    let (file, _) = model_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, &file).unwrap();
    let e = warm_load(&dev, &path, index.clone(), &plan, WarmStrategy::Pread)
        .map(drop)
        .unwrap_err();
    assert!(e.to_string().contains("one at a time"), "{e}");
    drop(held);
    // The device serves the next load.
    let (m, _) = warm_load(&dev, &path, index, &plan, WarmStrategy::Pread).unwrap();
    m.release().unwrap();
}
