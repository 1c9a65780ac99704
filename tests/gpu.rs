//! GPU loads through the `Loader` (root crate), for what only the facade does: tensorizer files
//! verified and decrypted on the host, then copied to the device (`src/staged.rs`). Without a
//! CUDA driver or device each test prints "skipped: no CUDA device" and returns.

use std::path::PathBuf;

#[path = "support/checkpoint.rs"]
mod checkpoint;

#[path = "support/threads.rs"]
mod threads;
use threads::threads_named;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tensorstream::engine::format::tensorizer::KeySource;
use tensorstream::{Device, Loader};
use tensorstream_cuda::CudaOptions;

/// `../shared/fixtures` beside the checkout, or `$TS_FIXTURES` (the GPU check runs this test
/// binary on a machine without `../shared`).
fn fixtures() -> PathBuf {
    let p = std::env::var_os("TS_FIXTURES").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
        PathBuf::from,
    );
    assert!(
        p.join("manifest.json").is_file(),
        "fixtures missing: {} (shared/ must sit beside the checkout)",
        p.display()
    );
    p
}

fn have_gpu() -> bool {
    if !tensorstream_cuda::driver_present() {
        println!("skipped: no CUDA device (no driver)");
        return false;
    }
    match tensorstream_cuda::device_count() {
        Ok(n) if n > 0 => true,
        other => {
            println!("skipped: no CUDA device ({other:?})");
            false
        }
    }
}

/// The CLI binary: `$TS_CLI` where set (the GPU check runs this test binary on a machine where
/// the build's own path does not exist), else the one cargo built.
fn cli() -> PathBuf {
    std::env::var_os("TS_CLI").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_tensorstream")),
        PathBuf::from,
    )
}

/// Runs `cmd` like `Command::output`, but fails the test if it has not ended within `secs`
/// (the child is killed): a hang is a failure, not a stalled test run.
fn output_within(cmd: &mut std::process::Command, secs: u64) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not end within {secs} s; stderr: {}",
                std::fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    std::process::Output {
        status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    }
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Manifest names of nested state dicts are the stored JSON array without its 0x1E byte; decode
/// them as the reader does (dotted).
fn display_name(n: &str) -> String {
    let raw = if n.starts_with('[') {
        [b"\x1e", n.as_bytes()].concat()
    } else {
        n.as_bytes().to_vec()
    };
    tensorstream::engine::format::tensorizer::index::decode_name(&raw)
        .unwrap()
        .0
}

/// Tiny pinned slots so even the small fixtures cycle the ring and span streams.
fn small_ring() -> CudaOptions {
    CudaOptions {
        streams: 3,
        slots: 3,
        slot_size: 64 << 10,
        ..CudaOptions::default()
    }
}

fn loader(file: &str, entry: &Value) -> Loader {
    let mut l = Loader::new(fixtures().join(file).to_str().unwrap())
        .device(Device::Cuda(0))
        .cuda_options(small_ring())
        .verify_hashes(true);
    if let Some(enc) = entry.get("encryption").filter(|e| !e.is_null()) {
        l = match enc.get("key_hex").and_then(Value::as_str) {
            Some(h) => l.key(KeySource::from_key_file(h.as_bytes()).unwrap()),
            None => {
                l.key(KeySource::password(enc["password"].as_str().unwrap().as_bytes()).unwrap())
            }
        };
    }
    l
}

fn tensorizer_fixtures() -> Vec<(String, Value)> {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let v: Vec<(String, Value)> = m["files"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, e)| e["format"] == "tensorizer")
        .map(|(f, e)| (f.clone(), e.clone()))
        .collect();
    assert!(
        v.len() >= 6,
        "tensorizer fixtures missing from the manifest"
    );
    v
}

#[test]
fn gpu_tensorizer_fixtures_verified_and_decrypted_match_manifest() {
    if !have_gpu() {
        return;
    }
    for (file, entry) in tensorizer_fixtures() {
        let m = loader(&file, &entry)
            .load_cuda()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let model = m.model().unwrap();
        let tensors = entry["tensors"].as_array().unwrap();
        assert_eq!(model.len(), tensors.len(), "{file}: tensor count");
        for t in tensors {
            let name = display_name(t["name"].as_str().unwrap());
            let dt = model
                .get(&name)
                .unwrap_or_else(|| panic!("{file}: no tensor {name}"));
            assert_eq!(dt.ptr % 256, 0, "{file}/{name}: device alignment");
            let bytes = model.to_host(&dt).unwrap();
            assert_eq!(sha(&bytes), t["sha256"].as_str().unwrap(), "{file}/{name}");
        }
        m.into_model().unwrap().release().unwrap();
    }
}

#[test]
fn gpu_streaming_verified_load_yields_every_tensor() {
    if !have_gpu() {
        return;
    }
    let (file, entry) = tensorizer_fixtures()
        .into_iter()
        .find(|(f, _)| f == "v3_encrypted_key.tensors")
        .expect("v3_encrypted_key.tensors in the manifest");
    let mut s = loader(&file, &entry).load_cuda_streaming().unwrap();
    let index = s
        .index()
        .expect("a Loader's streaming load carries the index");
    let mut seen = std::collections::BTreeSet::new();
    for r in s.by_ref() {
        assert!(
            seen.insert(r.tensor),
            "tensor #{} announced twice",
            r.tensor
        );
        let t = &index.tensors[r.tensor];
        assert_eq!(t.nbytes(), r.len, "{}: announced length", t.name);
    }
    let (model, _) = s.wait().unwrap();
    assert_eq!(seen.len(), model.len(), "every tensor announced");
    for t in entry["tensors"].as_array().unwrap() {
        let dt = model.get(t["name"].as_str().unwrap()).unwrap();
        assert_eq!(
            sha(&model.to_host(&dt).unwrap()),
            t["sha256"].as_str().unwrap()
        );
    }
}

#[test]
fn gpu_verify_failure_is_a_clear_error() {
    if !have_gpu() {
        return;
    }
    let file = "v1_numpy_dtypes.tensors";
    let mut bytes = std::fs::read(fixtures().join(file)).unwrap();
    let idx = Loader::new(fixtures().join(file).to_str().unwrap())
        .inspect()
        .unwrap();
    let last = idx.tensors.iter().rfind(|t| !t.range.is_empty()).unwrap();
    bytes[last.range.start as usize] ^= 0x55;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join(file);
    std::fs::write(&bad, bytes).unwrap();
    let e = Loader::new(bad.to_str().unwrap())
        .device(Device::Cuda(0))
        .cuda_options(small_ring())
        .verify_hashes(true)
        .load_cuda()
        .expect_err("a flipped byte must fail verification");
    assert!(e.to_string().contains(&last.name), "names the tensor: {e}");
}

#[test]
fn gpu_one_device_handle_serves_several_loads() {
    if !have_gpu() {
        return;
    }
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    let entries = tensorizer_fixtures();
    let mut models = Vec::new();
    for (file, entry) in entries.iter().take(3) {
        let m = loader(file, entry)
            .on_device(dev.clone())
            .load_cuda()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for t in entry["tensors"].as_array().unwrap() {
            let name = display_name(t["name"].as_str().unwrap());
            let dt = m.model().unwrap().get(&name).unwrap();
            let bytes = m.model().unwrap().to_host(&dt).unwrap();
            assert_eq!(sha(&bytes), t["sha256"].as_str().unwrap(), "{file}/{name}");
        }
        models.push(m); // earlier models stay alive and intact while later ones load
    }
    for ((file, entry), m) in entries.iter().zip(&models) {
        for t in entry["tensors"].as_array().unwrap() {
            let name = display_name(t["name"].as_str().unwrap());
            let dt = m.model().unwrap().get(&name).unwrap();
            let bytes = m.model().unwrap().to_host(&dt).unwrap();
            assert_eq!(
                sha(&bytes),
                t["sha256"].as_str().unwrap(),
                "{file}/{name} later"
            );
        }
    }
    // The same options that opened a handle are accepted with it, even when the handle rounded
    // them (slot size to whole pages).
    let odd = CudaOptions {
        slot_size: (64 << 10) + 100,
        ..small_ring()
    };
    let dev2 = tensorstream_cuda::CudaDevice::open(0, &odd).unwrap();
    let (file, entry) = &entries[0];
    loader(file, entry)
        .cuda_options(odd)
        .on_device(dev2)
        .load_cuda()
        .unwrap_or_else(|e| panic!("{file} with rounded options: {e}"));
    // A later device() naming another ordinal is refused, not served by a new handle.
    let Err(e) = loader(file, entry)
        .on_device(dev.clone())
        .device(tensorstream::Device::Cuda(1))
        .load_cuda()
    else {
        panic!("device(cuda:1) after on_device(cuda:0) loaded");
    };
    assert_eq!(e.kind(), tensorstream::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("on_device()"), "{e}");

    // A streaming load dropped after its first tensor (its thread still stopping: 4 MiB
    // through 64 KiB slots) and then the next load on the same handle: it waits for the pinned
    // slots instead of failing.
    let sizes = [1000u64, 2 << 20, 3, 2 << 20];
    let (bytes, data) = tensorstream_engine::testkit::u8_model(&sizes, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("four.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.to_str().unwrap();
    for round in 0..3 {
        let mut s = Loader::new(path)
            .on_device(dev.clone())
            .load_cuda_streaming()
            .unwrap();
        assert!(s.next().is_some(), "round {round}: a first tensor");
        drop(s);
        let m = Loader::new(path)
            .on_device(dev.clone())
            .load_cuda()
            .unwrap_or_else(|e| panic!("round {round}, after a dropped streaming load: {e}"));
        for (i, want) in data.iter().enumerate() {
            let (dm, t) = m.get(&format!("t{i:03}")).unwrap();
            assert!(dm.to_host(&t).unwrap() == *want, "round {round}: t{i:03}");
        }
    }
    // The same with a sharded checkpoint's stream (its shards load one after another).
    let ckpt = checkpoint::write(dir.path(), &[&[4096, 2 << 20], &[3 << 20], &[7]], 5);
    let cdir = dir.path().display().to_string();
    let mut s = Loader::new(&cdir)
        .on_device(dev.clone())
        .load_cuda_streaming()
        .unwrap();
    assert!(s.next().is_some(), "a first tensor of the checkpoint");
    drop(s);
    let m = Loader::new(&cdir)
        .on_device(dev.clone())
        .load_cuda()
        .unwrap_or_else(|e| panic!("the checkpoint after its dropped stream: {e}"));
    for w in &ckpt {
        let (dm, t) = m.get(&w.name).unwrap();
        assert_eq!(sha(&dm.to_host(&t).unwrap()), w.sha256, "{}", w.name);
    }
}

#[test]
fn gpu_mapped_route_through_the_loader_matches_manifest() {
    if !have_gpu() {
        return;
    }
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let entry = &m["files"]["mixed.safetensors"];
    // The third: one registering and two pread threads side by side (6 slots: 1 + 2 × 2),
    // one-page pieces so that the 9 KiB file has several to share. The fourth: no registering
    // thread, two threads copying out of the mapping with non-temporal stores.
    use tensorstream_cuda::{WarmCopy::*, WarmMode::*};
    for (warm, route, reg_threads, pread_threads, copy) in [
        (Force, "mapped", 1, 0, Pread),
        (Off, "ring", 1, 0, Pread),
        (Force, "mapped", 1, 2, Pread),
        (Force, "mapped", 0, 2, Map),
    ] {
        let cm = Loader::new(fixtures().join("mixed.safetensors").to_str().unwrap())
            .device(Device::Cuda(0))
            .cuda_options(CudaOptions {
                warm,
                slots: if pread_threads > 0 { 6 } else { 3 },
                warm_threads: reg_threads,
                warm_pread_threads: pread_threads,
                warm_copy: copy,
                warm_piece: 4096,
                ..small_ring()
            })
            .load_cuda()
            .unwrap_or_else(|e| panic!("{warm:?}, {pread_threads} {copy:?} threads: {e}"));
        assert_eq!(cm.stats().route, route);
        if route == "mapped" {
            let (registered, pread) = cm
                .stats()
                .mapped_pieces
                .expect("the mapped route reports its pieces");
            assert!(
                registered + pread > 1,
                "several pieces: {registered} + {pread}"
            );
            if reg_threads == 0 {
                assert_eq!(
                    registered, 0,
                    "no registering thread, yet pieces registered"
                );
            }
        } else {
            assert!(cm.stats().mapped_pieces.is_none(), "{route}");
        }
        for t in entry["tensors"].as_array().unwrap() {
            let name = t["name"].as_str().unwrap();
            let dt = cm.model().unwrap().get(name).unwrap();
            let bytes = cm.model().unwrap().to_host(&dt).unwrap();
            assert_eq!(
                sha(&bytes),
                t["sha256"].as_str().unwrap(),
                "{name} via {route} ({copy:?})"
            );
        }
    }
}

/// A sharded checkpoint onto the device: one device handle, ONE allocation for all shards (each
/// shard's tensors in its window of it, in load order), every tensor's device bytes equal to
/// what was written, filters across shards.
#[test]
fn gpu_sharded_checkpoint_loads_every_shard() {
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &[&[4096, 100], &[3 << 20], &[7, 1 << 20]], 21);
    let m = Loader::new(dir.path().display().to_string())
        .device(Device::Cuda(0))
        .cuda_options(small_ring())
        .load_cuda()
        .unwrap();
    assert!(m.is_sharded());
    assert_eq!(m.files().count(), 3);
    // One device model per shard: `model()` refuses rather than give the first shard's only.
    let e = m.model().expect_err("model() of a sharded checkpoint");
    assert!(e.to_string().contains("CudaModel::files"), "{e}");
    assert_eq!(m.len(), want.len());
    assert_eq!(m.index().tensors.len(), want.len());
    for w in &want {
        let (dm, t) = m.get(&w.name).unwrap();
        assert_eq!(sha(&dm.to_host(&t).unwrap()), w.sha256, "{}", w.name);
        assert_eq!(t.ptr % 256, 0, "{}", w.name);
    }
    for f in m.files() {
        let file = f.shard().unwrap();
        for t in f.model().tensors() {
            let w = want.iter().find(|w| w.name == t.name).unwrap();
            assert_eq!(w.file, file);
        }
    }
    assert!(m.stats().first_tensor.is_some());
    let total: usize = want.iter().map(|w| w.bytes.len()).sum();
    assert_eq!(m.stats().tensor_bytes, total as u64);
    // One allocation: the windows follow one another, each aligned, with less than the
    // alignment between them (separate allocations would not be packed like this).
    let spans: Vec<(u64, u64)> = m
        .files()
        .map(|f| (f.model().arena_ptr(), f.model().arena_len()))
        .collect();
    for w in spans.windows(2) {
        let end = w[0].0 + w[0].1;
        assert!(w[1].0 >= end && w[1].0 - end < 256, "{spans:x?}");
    }
    assert!(m.stats().device_alloc > std::time::Duration::ZERO);
    let e = m.into_model().unwrap_err();
    assert!(e.to_string().contains("into_models"), "{e}");
    // A filter: only the shards holding a match are read.
    let m = Loader::new(dir.path().display().to_string())
        .filter_glob("layers.2.*")
        .unwrap()
        .device(Device::Cuda(0))
        .load_cuda()
        .unwrap();
    assert_eq!(m.files().count(), 1);
    assert_eq!(m.len(), 2);
    m.release().unwrap();
    // The mapped route (registered page-cache pages) into the shards' windows as well.
    let m = Loader::new(dir.path().display().to_string())
        .device(Device::Cuda(0))
        .cuda_options(CudaOptions {
            warm: tensorstream_cuda::WarmMode::Force,
            warm_threads: 1,
            warm_piece: 1 << 20,
            ..small_ring()
        })
        .load_cuda()
        .unwrap();
    assert_eq!(m.stats().route, "mapped");
    for w in &want {
        let (dm, t) = m.get(&w.name).unwrap();
        assert_eq!(
            sha(&dm.to_host(&t).unwrap()),
            w.sha256,
            "{} (mapped)",
            w.name
        );
    }
    m.release().unwrap();
}

/// A sharded checkpoint streamed onto the device: each selected tensor announced once, under
/// its place in the combined index, with the device address the finished model gives it; the
/// bytes equal what was written; one model over one allocation.
#[test]
fn gpu_sharded_checkpoint_streams_every_tensor() {
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &[&[4096, 100], &[3 << 20], &[7, 1 << 20]], 22);
    for filter in [None, Some("layers.[02].*")] {
        let mut l = Loader::new(dir.path().display().to_string())
            .device(Device::Cuda(0))
            .cuda_options(small_ring());
        if let Some(f) = filter {
            l = l.filter_glob(f).unwrap();
        }
        let mut s = l.load_cuda_streaming().unwrap();
        let index = s.index().unwrap();
        assert_eq!(index.tensors.len(), want.len());
        let ready: Vec<_> = (&mut s).collect();
        let (m, es) = s.wait().unwrap();
        let expect: Vec<_> = want
            .iter()
            .filter(|w| filter.is_none() || !w.name.starts_with("layers.1."))
            .collect();
        assert_eq!(ready.len(), expect.len(), "{filter:?}");
        assert_eq!(m.len(), expect.len());
        let mut names: Vec<&str> = ready
            .iter()
            .map(|r| index.tensors[r.tensor].name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), expect.len(), "a tensor was announced twice");
        for r in &ready {
            let t = m.get(&index.tensors[r.tensor].name).unwrap();
            assert_eq!((r.ptr, r.len), (t.ptr, t.len), "{}", t.name);
        }
        for w in &expect {
            let t = m.get(&w.name).unwrap();
            assert_eq!(sha(&m.to_host(&t).unwrap()), w.sha256, "{}", w.name);
            assert_eq!(t.ptr % 256, 0, "{}", w.name);
        }
        let bytes: usize = expect.iter().map(|w| w.bytes.len()).sum();
        assert!(es.bytes_read >= bytes as u64);
        assert!(m.times().first_tensor.is_some());
        m.release().unwrap();
    }
}

/// One local file of awkwardly sized tensors (1 byte, page ± 1, larger than a slot, a slot
/// plus a few bytes …) through every route and ring shape the options offer: each load's
/// device bytes, read back, equal the file's. Covers the ring with one and four streams, tiny
/// and odd slot counts, huge pages, both I/O engines and chunk sizes smaller than a slot, and
/// the mapped route with registering threads only, pread threads only (pread or copies out of
/// the mapping) and both side by side.
#[test]
fn gpu_every_route_and_ring_shape_lands_the_file_bytes() {
    if !have_gpu() {
        return;
    }
    use tensorstream::{IoMode, OpenOptions};
    use tensorstream_cuda::{WarmCopy, WarmMode};
    let sizes = [
        1u64,
        4095,
        4097,
        (1 << 20) + 3,
        7,
        (3 << 20) + 5,
        64 << 10,
        300_001,
        2 << 20,
        (5 << 20) - 1,
    ];
    let (file, data) = tensorstream_engine::testkit::u8_model(&sizes, 11);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shapes.safetensors");
    std::fs::write(&path, &file).unwrap();
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("t{i:03}")).collect();
    let base = CudaOptions {
        streams: 2,
        slots: 8,
        slot_size: 1 << 20,
        ..CudaOptions::default()
    };
    let mapped = |threads, pread, copy| CudaOptions {
        warm: WarmMode::Force,
        warm_threads: threads,
        warm_pread_threads: pread,
        warm_copy: copy,
        warm_piece: 1 << 20,
        ..base.clone()
    };
    let io = |mode| OpenOptions {
        io_mode: Some(mode),
        ..Default::default()
    };
    let cases: Vec<(&str, CudaOptions, OpenOptions, &str)> = vec![
        ("ring", base.clone(), OpenOptions::default(), "ring"),
        (
            "one stream",
            CudaOptions {
                streams: 1,
                ..base.clone()
            },
            OpenOptions::default(),
            "ring",
        ),
        (
            "four streams, two slots",
            CudaOptions {
                streams: 4,
                slots: 2,
                ..base.clone()
            },
            OpenOptions::default(),
            "ring",
        ),
        (
            "odd slots, small reads",
            CudaOptions {
                slots: 3,
                slot_size: 256 << 10,
                ..base.clone()
            },
            OpenOptions {
                chunk_size: Some(64 << 10),
                concurrency: Some(5),
                ..Default::default()
            },
            "ring",
        ),
        (
            "huge pages",
            CudaOptions {
                huge_pages: true,
                ..base.clone()
            },
            OpenOptions::default(),
            "ring",
        ),
        ("pread", base.clone(), io(IoMode::Pread), "ring"),
        ("io_uring", base.clone(), io(IoMode::Uring), "ring"),
        (
            "mapped, registering",
            mapped(2, 0, WarmCopy::Pread),
            OpenOptions::default(),
            "mapped",
        ),
        (
            "mapped, pread threads",
            mapped(0, 2, WarmCopy::Pread),
            OpenOptions::default(),
            "mapped",
        ),
        (
            "mapped, map copies",
            mapped(0, 3, WarmCopy::Map),
            OpenOptions::default(),
            "mapped",
        ),
        (
            "mapped, both",
            mapped(1, 2, WarmCopy::Map),
            OpenOptions::default(),
            "mapped",
        ),
    ];
    for (what, opts, open, route) in cases {
        let m = Loader::new(path.to_str().unwrap())
            .device(Device::Cuda(0))
            .cuda_options(opts)
            .open_options(open)
            .load_cuda()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.stats().route, route, "{what}");
        assert_eq!(m.len(), sizes.len(), "{what}");
        for (name, want) in names.iter().zip(&data) {
            let (dm, t) = m.get(name).unwrap();
            assert_eq!(t.ptr % 256, 0, "{what}: {name} alignment");
            let got = dm.to_host(&t).unwrap();
            assert!(
                got == *want,
                "{what}: {name}: device bytes differ from the file's"
            );
        }
        m.release().unwrap();
    }
}

/// The CLI on the device: `load --device cuda:0 --digests --json` hashes what it reads back from
/// the device (equal to the manifest's digests), `bench --device cuda:0` times loads there, and
/// `demo` picks the GPU, names it and checks every byte read back.
#[test]
fn gpu_cli_loads_and_demo_use_the_device() {
    if !have_gpu() {
        return;
    }
    let cli = cli();
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let file = fixtures().join("mixed.safetensors");
    let out = std::process::Command::new(&cli)
        .args(["load", file.to_str().unwrap(), "--device", "cuda:0"])
        .args(["--digests", "--json", "--quiet", "--slots", "2"])
        .args(["--slot-size", "64KiB"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["device"], "cuda:0");
    assert_eq!(j["route"], "ring");
    let want = m["files"]["mixed.safetensors"]["tensors"]
        .as_array()
        .unwrap();
    let got = j["tensors"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for w in want {
        let g = got.iter().find(|g| g["name"] == w["name"]).unwrap();
        assert_eq!(g["sha256"], w["sha256"], "{}", w["name"]);
    }

    // bench --device: one JSON line per run, each naming the device, all the tensor bytes.
    let out = std::process::Command::new(&cli)
        .args(["bench", file.to_str().unwrap(), "--device", "cuda:0"])
        .args(["--warm", "--repeat", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let runs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|j: &Value| j["name"] == "tensorstream")
        .collect();
    assert_eq!(runs.len(), 2, "{out:?}");
    for r in &runs {
        assert_eq!(r["device"], "cuda:0");
        assert_eq!(r["bytes"], j["bytes"]);
        assert!(r["gbps"].as_f64().unwrap() > 0.0);
    }

    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&cli)
        .args(["demo", "--size", "16MiB", "--quiet", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("device: cuda:0, "), "{text}");
    assert!(text.contains("(read back and checked)"), "{text}");
    assert!(text.contains("every byte matches"), "{text}");
}

/// A model larger than the device's memory (a sparse file: nothing is stored) fails with the
/// driver's out-of-memory error, naming the file and saying how much the device has.
#[test]
fn gpu_a_model_larger_than_the_device_fails_clearly() {
    if !have_gpu() {
        return;
    }
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    let (_, total) = dev.mem_info().unwrap();
    let n = total as u64 + (1 << 30);
    let header = tensorstream_engine::format::safetensors::write_header(
        &[("huge".into(), tensorstream_engine::DType::U8, vec![n], n)],
        &Default::default(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    let f = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut &f, &header).unwrap();
    f.set_len(header.len() as u64 + n).unwrap();
    let Err(e) = Loader::new(path.to_str().unwrap())
        .on_device(dev)
        .load_cuda()
    else {
        panic!("a model larger than the device loaded");
    };
    let msg = e.to_string();
    assert_eq!(e.kind(), tensorstream::ErrorKind::Device, "{msg}");
    assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{msg}");
    assert!(
        msg.contains("free of") && msg.contains("huge.safetensors"),
        "{msg}"
    );
}

/// The device faults fakecuda injects, swept: `load FILE --device cuda:0 --digests --json` of
/// each `(file, options)` case with a 3 × 256 KiB ring and each of `FAKECUDA_FAIL_H2D_AT` /
/// `FAKECUDA_FAIL_SYNC_AT` = 1, 2, 3, 5, 8, 13 (on a real GPU, whose driver ignores the
/// variables, one load per case: each opens the device, a CUDA context). Every load ends
/// within 120 s without a panic, with exit 0 (`ok` checks its JSON) or 1 (`failed` checks its
/// stderr); the arguments of both start with a description of the load (`failed` gets the
/// file next). Returns whether the driver is fakecuda and how many loads failed.
fn device_fault_sweep(
    cases: &[(&str, &[&str])],
    ok: impl Fn(&str, &Value),
    failed: impl Fn(&str, &str, &str),
) -> (bool, usize) {
    let cli = cli();
    let fake = tensorstream_cuda::CudaDevice::open(0, &small_ring())
        .unwrap()
        .name()
        .unwrap()
        .contains("fakecuda");
    let small = ["--slots", "3", "--slot-size", "256KiB"];
    let (vars, ns): (&[&str], &[u32]) = if fake {
        (
            &["FAKECUDA_FAIL_H2D_AT", "FAKECUDA_FAIL_SYNC_AT"],
            &[1, 2, 3, 5, 8, 13],
        )
    } else {
        (&["FAKECUDA_FAIL_H2D_AT"], &[1])
    };
    let mut failures = 0;
    for &(file, extra) in cases {
        for var in vars {
            for n in ns {
                let what = format!("{file} {extra:?} {var}={n}");
                let out = output_within(
                    std::process::Command::new(&cli)
                        .args(["load", file, "--device", "cuda:0"])
                        .args(["--digests", "--json", "--quiet"])
                        .args(small)
                        .args(extra)
                        .env(var, n.to_string()),
                    120,
                );
                let err = String::from_utf8_lossy(&out.stderr);
                match out.status.code() {
                    Some(0) => ok(&what, &serde_json::from_slice(&out.stdout).unwrap()),
                    Some(1) => {
                        failures += 1;
                        failed(&what, file, &err);
                    }
                    other => panic!("{what}: exit {other:?}: {err}"),
                }
                assert!(!err.contains("panicked"), "{what}: {err}");
            }
        }
    }
    (fake, failures)
}

/// Device faults in the middle of a load (under fakecuda, which injects them when
/// `FAKECUDA_FAIL_H2D_AT=N` / `FAKECUDA_FAIL_SYNC_AT=N` is set: the Nth copy submission fails,
/// or the Nth wait reports a device fault), on the ring, mapped and staged routes: every load
/// either succeeds with the right bytes or fails with a clear device error naming the file —
/// never a panic, a hang or a signal. A real driver ignores the variables: there every load
/// must succeed.
#[test]
fn gpu_device_faults_fail_cleanly() {
    if !have_gpu() {
        return;
    }
    let sizes = [1000u64, (1 << 20) + 7, 5, 600_000, 1 << 20];
    let (bytes, data) = tensorstream_engine::testkit::u8_model(&sizes, 9);
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("f.safetensors");
    std::fs::write(&st, &bytes).unwrap();
    let tz = dir.path().join("f.tensors");
    let out = std::process::Command::new(cli())
        .args([
            "convert",
            st.to_str().unwrap(),
            tz.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let want: Vec<String> = data.iter().map(|d| sha(d)).collect();
    let (st, tz) = (st.to_str().unwrap(), tz.to_str().unwrap());
    let cases: [(&str, &[&str]); 3] = [
        (st, &[]),
        (st, &["--gpu-warm", "force", "--gpu-warm-piece", "1MiB"]),
        (tz, &["--verify"]),
    ];
    let (fake, failed) = device_fault_sweep(
        &cases,
        |what, j| {
            for (i, w) in want.iter().enumerate() {
                let name = format!("t{i:03}");
                let mut t = j["tensors"].as_array().unwrap().iter();
                let g = t.find(|t| t["name"] == name.as_str());
                assert_eq!(g.unwrap()["sha256"], w.as_str(), "{what}: {name}");
            }
        },
        |what, file, err| {
            assert!(err.contains("CUDA_ERROR_"), "{what}: {err}");
            assert!(err.contains(file), "{what}: {err}");
        },
    );
    if fake {
        assert!(
            failed > 20,
            "the injected faults failed only {failed} loads"
        );
    } else {
        assert_eq!(failed, 0, "a real driver ignores the fault variables");
    }
}

/// Device faults in the middle of a sharded checkpoint's load (fakecuda's injected ones, as in
/// `gpu_device_faults_fail_cleanly`), while the next shard is being opened and planned beside
/// the copies: every load either succeeds with every tensor's bytes right or fails with a
/// device error naming the shard that failed (not the next one's preparation) — never a panic,
/// a hang or a signal. A real driver ignores the variables: there every load must succeed.
#[test]
fn gpu_device_faults_in_a_sharded_load_name_the_shard() {
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shards: [&[usize]; 4] = [&[1000, 300_000], &[5], &[(1 << 20) + 7, 17], &[600_000]];
    let want = checkpoint::write(dir.path(), &shards, 41);
    let ckpt = dir.path().to_str().unwrap();
    let cases: [(&str, &[&str]); 2] = [
        (ckpt, &[]),
        (ckpt, &["--gpu-warm", "force", "--gpu-warm-piece", "1MiB"]),
    ];
    let (fake, failed) = device_fault_sweep(
        &cases,
        |what, j| {
            let got = j["tensors"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{what}");
            for w in &want {
                let g = got.iter().find(|t| t["name"] == w.name.as_str());
                assert_eq!(g.unwrap()["sha256"], w.sha256.as_str(), "{what}");
            }
        },
        |what, _, err| {
            // (Warnings before it may name other shards.)
            let error = err.lines().find(|l| l.contains(" error: ")).unwrap_or("");
            assert!(error.contains("CUDA_ERROR_"), "{what}: {err}");
            let named = (1..=shards.len())
                .filter(|&k| error.contains(&checkpoint::shard_name(k, shards.len())))
                .count();
            assert_eq!(named, 1, "{what}: not one shard named: {err}");
        },
    );
    if fake {
        assert!(failed > 6, "the injected faults failed only {failed} loads");
    } else {
        assert_eq!(failed, 0, "a real driver ignores the fault variables");
    }
}

/// A sharded GPU load whose shard fails while the next shard is being prepared (on a thread of
/// its own, left to end by itself): that preparation holds neither the device
/// (a failed load's device handle, its context and pinned staging ring, would live on until
/// the preparation ended: a store that does not answer for minutes) nor writes to the failed
/// load's progress total when it ends (a retry with the same counter, or a later load, would
/// see its total change under it).
///
/// The preparation must be caught inside its work when shard 1 fails: one that has not got
/// that far by then is told to stop and never reaches its filter (`one_ahead`'s flag), which
/// leaves nothing to check. Shard 1's failure cannot wait for it (nothing of a load's copies
/// calls back into the test), so a try where the preparation stopped early is only checked
/// for the total and run again, up to 20 times; the test fails if no try caught it.
#[test]
fn gpu_a_failed_sharded_load_leaves_its_next_shards_preparation_nothing() {
    if !have_gpu() {
        return;
    }
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    const TRIES: usize = 20;
    for _ in 0..TRIES {
        if a_failed_sharded_load_while_its_next_shard_prepares(&dev) {
            return;
        }
    }
    panic!(
        "in {TRIES} tries, shard 2's preparation never reached its filter before shard 1 \
         failed (each time it was told to stop first)"
    );
}

/// One try of `gpu_a_failed_sharded_load_leaves_its_next_shards_preparation_nothing`: whether
/// shard 2's preparation was caught in its filter when the load failed (and was checked then).
fn a_failed_sharded_load_while_its_next_shard_prepares(
    dev: &std::sync::Arc<tensorstream_cuda::CudaDevice>,
) -> bool {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    // Shard 2's middle tensor is left out: its plan reads that small gap, so the shard
    // corrects the progress total (the selected tensors' bytes) by it.
    checkpoint::write(dir.path(), &[&[300_000], &[1000, 100, 1000]], 7);
    let shard1 = dir.path().join(checkpoint::shard_name(1, 2));
    let (release, waited) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    // Held by every loader of the load (in their filter): gone once the preparation has ended.
    let marker = Arc::new(());
    let filter = {
        let (release, waited, calls, marker) = (
            release.clone(),
            waited.clone(),
            calls.clone(),
            marker.clone(),
        );
        let shard1 = shard1.clone();
        move |t: &tensorstream::TensorInfo| {
            let _ = &marker;
            let preparing = std::thread::current().name() == Some("ts-shard-prepare");
            // Shard 1's preparation (after the check and the layout, on the load's thread):
            // its file cut short once opened, so that its copies fail.
            if t.name == "layers.0.w0" && !preparing && calls.fetch_add(1, SeqCst) == 2 {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&shard1)
                    .and_then(|f| f.set_len(1000))
                    .unwrap();
            }
            // Shard 2's preparation: a store that does not answer until told to.
            if t.name == "layers.1.w0" && preparing && !waited.swap(true, SeqCst) {
                let until = Instant::now() + Duration::from_secs(30);
                while !release.load(SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            t.name != "layers.1.w1"
        }
    };
    let total = Arc::new(AtomicU64::new(0));
    let l = Loader::new(dir.path().display().to_string())
        .on_device(dev.clone())
        .progress_total(total.clone())
        .filter(filter);
    let e = l.load_cuda().expect_err("shard 1 was cut short");
    drop(l);
    assert!(
        e.to_string().contains(&checkpoint::shard_name(1, 2)),
        "not shard 1's failure: {e}"
    );
    let at_failure = total.load(SeqCst);
    // Shard 2's preparation either reaches its filter (and waits there: it may get there only
    // after the load returned) or, told to stop before it got that far, ends without it.
    let until = Instant::now() + Duration::from_secs(30);
    while !waited.load(SeqCst) && Arc::strong_count(&marker) > 1 {
        assert!(
            Instant::now() < until,
            "shard 2's preparation neither reached its filter nor ended: {e}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let caught = waited.load(SeqCst);
    let held = Arc::strong_count(dev) - 1;
    release.store(true, SeqCst);
    while Arc::strong_count(&marker) > 1 {
        assert!(Instant::now() < until, "shard 2's preparation did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    let after = total.load(SeqCst);
    assert_eq!(
        after, at_failure,
        "after the load failed, the preparation left running changed its progress total"
    );
    if caught {
        assert_eq!(
            held, 0,
            "the preparation left running held the failed load's device handle"
        );
    }
    caught
}

/// Loads on separate device handles run side by side, each with its own bytes right; a second
/// load on a handle whose slots a live load holds is refused at once (not waited for: only
/// dropped streaming loads are), and the handle serves loads again once they are free.
#[test]
fn gpu_separate_handles_load_in_parallel_and_a_busy_handle_refuses() {
    if !have_gpu() {
        return;
    }
    let sizes = [3000u64, (1 << 20) + 1, 77, 500_000];
    let (bytes, data) = tensorstream_engine::testkit::u8_model(&sizes, 13);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.to_str().unwrap();
    let handles: Vec<_> = (0..3)
        .map(|_| tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap())
        .collect();
    std::thread::scope(|s| {
        for (h, dev) in handles.iter().enumerate() {
            let data = &data;
            s.spawn(move || {
                for round in 0..4 {
                    let m = Loader::new(path)
                        .on_device(dev.clone())
                        .load_cuda()
                        .unwrap_or_else(|e| panic!("handle {h}, round {round}: {e}"));
                    for (i, want) in data.iter().enumerate() {
                        let (dm, t) = m.get(&format!("t{i:03}")).unwrap();
                        assert!(dm.to_host(&t).unwrap() == *want, "handle {h}: t{i:03}");
                    }
                }
            });
        }
    });
    let dev = &handles[0];
    let held = dev.take_slots().unwrap(); // a live load's slots
    let t = std::time::Instant::now();
    let Err(e) = Loader::new(path).on_device(dev.clone()).load_cuda() else {
        panic!("a second load on a busy handle loaded");
    };
    assert_eq!(e.kind(), tensorstream::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("one at a time"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "it waited");
    drop(held);
    Loader::new(path)
        .on_device(dev.clone())
        .load_cuda()
        .expect("the handle serves loads once its slots are free");
}

/// A backend over a file's bytes whose first `stat` says so on `entered`, then waits for a word
/// on `go` (later ones answer at once): a load held at its very start, before it opened its
/// object, read its header or planned anything.
#[derive(Debug)]
struct HeldStat {
    inner: tensorstream_engine::MemoryBackend,
    entered: std::sync::mpsc::Sender<()>,
    go: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl tensorstream::Backend for HeldStat {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> tensorstream::Result<tensorstream::ObjectMeta> {
        let go = self.go.lock().unwrap().take();
        if let Some(go) = go {
            let _ = self.entered.send(());
            let _ = go.recv_timeout(std::time::Duration::from_secs(60));
        }
        self.inner.stat()
    }
    fn capabilities(&self) -> tensorstream::Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> tensorstream::Result<usize> {
        self.inner.read_at(offset, buf)
    }
}

/// A load on a device handle holds it from its start, not only once it reaches its copies: a
/// second load (plain or streaming, one file or a checkpoint) while the first is still
/// opening its object is refused at once with the clear error, and once the first has ended
/// the handle serves the next load. (Before, the second load got the handle and the first
/// failed, or ran after it, depending on which reached its copies first.)
#[test]
fn gpu_a_handle_is_refused_to_a_second_load_from_the_first_loads_start() {
    if !have_gpu() {
        return;
    }
    let sizes = [3000u64, (1 << 20) + 1, 77];
    let (bytes, data) = tensorstream_engine::testkit::u8_model(&sizes, 31);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.to_str().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    checkpoint::write(ckpt.path(), &[&[4096], &[100]], 32);
    let ckpt = ckpt.path().display().to_string();
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    let check = |m: &tensorstream::CudaModel, what: &str| {
        for (i, want) in data.iter().enumerate() {
            let (dm, t) = m.get(&format!("t{i:03}")).unwrap();
            assert!(dm.to_host(&t).unwrap() == *want, "{what}: t{i:03}");
        }
    };
    for streaming in [false, true] {
        let (entered, entered_rx) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let be = std::sync::Arc::new(HeldStat {
            inner: tensorstream_engine::MemoryBackend::new("mem://held.safetensors", bytes.clone()),
            entered,
            go: std::sync::Mutex::new(Some(go_rx)),
        });
        let d = dev.clone();
        let first = std::thread::spawn(move || {
            let l = Loader::from_backend(be).on_device(d);
            if streaming {
                l.load_cuda_streaming()?.wait().map(|(m, _)| m.len())
            } else {
                l.load_cuda().map(|m| m.len())
            }
        });
        entered_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the first load's stat");
        let second = [
            (
                "a load",
                Loader::new(path)
                    .on_device(dev.clone())
                    .load_cuda()
                    .map(drop),
            ),
            (
                "a streaming load",
                Loader::new(path)
                    .on_device(dev.clone())
                    .load_cuda_streaming()
                    .and_then(|s| s.wait())
                    .map(drop),
            ),
            (
                "a checkpoint's load",
                Loader::new(&ckpt)
                    .on_device(dev.clone())
                    .load_cuda()
                    .map(drop),
            ),
            (
                "a checkpoint's streaming load",
                Loader::new(&ckpt)
                    .on_device(dev.clone())
                    .load_cuda_streaming()
                    .and_then(|s| s.wait())
                    .map(drop),
            ),
        ];
        for (what, r) in second {
            let Err(e) = r else {
                panic!(
                    "{what} on a handle whose load (streaming: {streaming}) was opening its \
                     object loaded"
                );
            };
            assert_eq!(
                e.kind(),
                tensorstream::ErrorKind::InvalidInput,
                "{what}: {e}"
            );
            assert!(e.to_string().contains("one at a time"), "{what}: {e}");
        }
        go.send(()).unwrap();
        let n = first
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the first load (streaming: {streaming}): {e}"));
        assert_eq!(n, sizes.len());
        let m = Loader::new(path)
            .on_device(dev.clone())
            .load_cuda()
            .expect("a load once the first has ended");
        check(&m, "after the first ended");
    }
}

/// A load that fails or is cancelled before its copies (no such file, a filter matching
/// nothing, a cancel flag set from the start), plain or streaming, one file or a checkpoint,
/// gives its device handle back: the next load on it loads.
#[test]
fn gpu_a_load_that_fails_early_gives_its_handle_back() {
    if !have_gpu() {
        return;
    }
    let sizes = [3000u64, 77];
    let (bytes, data) = tensorstream_engine::testkit::u8_model(&sizes, 33);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.to_str().unwrap().to_string();
    let ckpt = tempfile::tempdir().unwrap();
    checkpoint::write(ckpt.path(), &[&[4096], &[100]], 34);
    let ckpt = ckpt.path().display().to_string();
    let missing = dir.path().join("missing.safetensors").display().to_string();
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    type Case = (&'static str, Box<dyn Fn(Loader) -> Loader>);
    let cases: Vec<(String, Case)> = [&path, &missing, &ckpt]
        .into_iter()
        .flat_map(|uri| {
            let early: [Case; 3] = [
                ("as it is", Box::new(|l| l)),
                (
                    "a filter matching nothing",
                    Box::new(|l: Loader| l.filter_glob("nothing.*").unwrap()),
                ),
                (
                    "cancelled from the start",
                    Box::new(|l: Loader| {
                        l.cancel_flag(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
                            true,
                        )))
                    }),
                ),
            ];
            early.into_iter().map(move |c| (uri.clone(), c))
        })
        .collect();
    let mut failed = 0;
    for (uri, (how, make)) in &cases {
        for streaming in [false, true] {
            let l = make(Loader::new(uri).on_device(dev.clone()));
            let r = if streaming {
                l.load_cuda_streaming().and_then(|s| s.wait()).map(drop)
            } else {
                l.load_cuda().map(drop)
            };
            failed += usize::from(r.is_err());
            let m = Loader::new(&path)
                .on_device(dev.clone())
                .load_cuda()
                .unwrap_or_else(|e| {
                    panic!("a load after {uri} ({how}, streaming: {streaming}): {e}")
                });
            for (i, want) in data.iter().enumerate() {
                let (dm, t) = m.get(&format!("t{i:03}")).unwrap();
                assert!(dm.to_host(&t).unwrap() == *want, "t{i:03}");
            }
        }
    }
    // Every case but the two plain loads of files that exist failed.
    assert_eq!(failed, cases.len() * 2 - 4);
}

/// A later shard whose tensorizer meta tensor's per-tensor header is corrupted fails a sharded
/// GPU load on an open device before anything is copied: no bytes counted, no tensor
/// announced by a streaming load, and the error names the shard and the tensor. (Before, the
/// first shards had been copied into the load's device allocation when that shard's turn
/// came.) The handle then loads the checkpoint once the shard is repaired.
#[test]
fn gpu_a_corrupt_meta_header_in_a_later_shard_fails_before_any_copy() {
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = checkpoint::write_corrupt_meta_header(dir.path());
    let uri = dir.path().display().to_string();
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let on = || {
        Loader::new(&uri)
            .on_device(dev.clone())
            .progress(progress.clone())
    };
    let check = |e: tensorstream::Error, what: &str| {
        assert_eq!(e.kind(), tensorstream::ErrorKind::Corrupt, "{what}: {e}");
        let s = e.to_string();
        assert!(
            s.contains(&bad) && s.contains("layers.2.w1") && s.contains("per-tensor header"),
            "{what}: {e}"
        );
        assert_eq!(
            progress.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{what}: shards were copied before the corrupt one was found: {e}"
        );
    };
    check(on().load_cuda().unwrap_err(), "load_cuda");
    let e = match on().load_cuda_streaming() {
        Err(e) => e,
        Ok(mut s) => {
            let announced = (&mut s).count();
            let e = s.wait().unwrap_err();
            assert_eq!(announced, 0, "tensors were announced before: {e}");
            e
        }
    };
    check(e, "load_cuda_streaming");
    // Repaired (the header names its tensor again), the checkpoint loads on the handle.
    let path = dir.path().join(&bad);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(11)
        .enumerate()
        .filter(|(_, w)| *w == b"layers.2.w0")
        .map(|(i, _)| i)
        .nth(2)
        .expect("the corrupted header");
    bytes[at + 10] = b'1';
    std::fs::write(&path, bytes).unwrap();
    let m = on().load_cuda().expect("the repaired checkpoint");
    let (dm, t) = m.get("layers.2.w1").unwrap();
    assert_eq!(dm.to_host(&t).unwrap(), vec![0u8; 64]);
}

/// A sharded GPU load (streaming or not, with a cancel flag) of many shards runs no stop-flag
/// watcher thread per shard: whenever its filter is asked about a tensor (the check, each
/// shard's layout and each shard's preparation, while the shard before it copies) the process
/// has at most one such thread (`ts-stop-watch`, which serves every load's flags; before, a
/// `ts-shard-stop` per shard being prepared or copied, beside the load's `ts-stream-stop`).
/// The cancel flag still stops such a load.
#[test]
fn gpu_a_sharded_load_runs_no_watcher_thread_per_shard() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes: Vec<[usize; 1]> = (0..24).map(|k| [4096 + k]).collect();
    let shards: Vec<&[usize]> = sizes.iter().map(|s| &s[..]).collect();
    let want = checkpoint::write(dir.path(), &shards, 41);
    let uri = dir.path().display().to_string();
    let watchers = || {
        ["ts-stream-stop", "ts-shard-stop", "ts-stop-watch"]
            .iter()
            .map(|n| threads_named(n))
            .sum::<usize>()
    };
    let dev = tensorstream_cuda::CudaDevice::open(0, &small_ring()).unwrap();
    for streaming in [false, true] {
        let most = Arc::new(AtomicUsize::new(0));
        let (seen, asked) = (most.clone(), Arc::new(AtomicUsize::new(0)));
        let count = asked.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let l = Loader::new(&uri)
            .on_device(dev.clone())
            .cancel_flag(cancel.clone())
            .filter(move |_| {
                seen.fetch_max(watchers(), Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
                true
            });
        let n = if streaming {
            let mut s = l.load_cuda_streaming().unwrap();
            let ready = (&mut s).count();
            let (m, _) = s.wait().unwrap();
            assert_eq!(ready, want.len());
            m.len()
        } else {
            l.load_cuda().unwrap().len()
        };
        assert_eq!(n, want.len());
        assert!(asked.load(Ordering::SeqCst) >= 2 * want.len());
        assert!(
            most.load(Ordering::SeqCst) <= 1,
            "streaming: {streaming}: {} stop-flag watcher threads at once during a load of {} \
             shards",
            most.load(Ordering::SeqCst),
            want.len()
        );
        // The cancel flag still stops it.
        cancel.store(true, Ordering::SeqCst);
        let l = Loader::new(&uri)
            .on_device(dev.clone())
            .cancel_flag(cancel.clone());
        let r = if streaming {
            l.load_cuda_streaming().and_then(|s| s.wait()).map(drop)
        } else {
            l.load_cuda().map(drop)
        };
        let e = r.expect_err("a cancelled load loaded");
        assert_eq!(e.kind(), tensorstream::ErrorKind::Cancelled, "{e}");
    }
}
