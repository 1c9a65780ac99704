//! Sharded checkpoints (`model.safetensors.index.json` + shard files) through the library.

#[path = "support/checkpoint.rs"]
mod checkpoint;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tensorstream::{ErrorKind, Loader};

/// Three shards; the middle one spans several 8 MiB reads.
const SHARDS: [&[usize]; 3] = [&[4096, 1000, 77], &[9 << 20, 3], &[123_457]];

#[test]
fn loads_every_shard_through_the_index_or_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 1);
    let index = dir.path().join("model.safetensors.index.json");
    for uri in [
        index.display().to_string(),
        dir.path().display().to_string(),
        format!("file://{}", index.display()),
    ] {
        let m = Loader::new(&uri).load().unwrap();
        assert!(m.is_sharded(), "{uri}");
        let names: Vec<&str> = m.tensors().map(|t| t.name).collect();
        let want_names: Vec<&str> = want.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, want_names, "{uri}: shard by shard, file order");
        for w in &want {
            let t = m
                .get(&w.name)
                .unwrap_or_else(|| panic!("{uri}: {} missing", w.name));
            assert!(
                t.data == w.bytes.as_slice(),
                "{uri}: {} bytes differ",
                w.name
            );
        }
        // Each file holds what the index says.
        let files: Vec<(String, Vec<String>)> = m
            .files()
            .map(|f| {
                let file = f.uri().rsplit('/').next().unwrap().to_string();
                assert_eq!(f.shard(), Some(file.as_str()));
                (file, f.tensors().map(|t| t.name.to_string()).collect())
            })
            .collect();
        assert_eq!(files.len(), 3);
        for (file, names) in &files {
            for n in names {
                let w = want.iter().find(|w| &w.name == n).unwrap();
                assert_eq!(&w.file, file, "{n}");
            }
        }
        let total: usize = want.iter().map(|t| t.bytes.len()).sum();
        assert_eq!(m.stats().tensor_bytes, total as u64);
        assert_eq!(m.len(), want.len());
        assert_eq!(m.index().tensors.len(), want.len());
        let sizes: u64 = (1..=3)
            .map(|k| {
                std::fs::metadata(dir.path().join(checkpoint::shard_name(k, 3)))
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(m.index().object_size, sizes);
    }
    // inspect: the combined index, and file by file.
    let l = Loader::new(dir.path().display().to_string());
    let ix = l.inspect().unwrap();
    assert_eq!(ix.tensors.len(), want.len());
    let files = l.inspect_files().unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| f.shard.is_some()));
    assert_eq!(
        files[2].shard.as_deref(),
        Some("model-00003-of-00003.safetensors")
    );
    assert_eq!(files[1].index.tensors.len(), 2);
}

#[test]
fn filters_apply_to_the_whole_checkpoint_and_skip_untouched_shards() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 2);
    let uri = dir.path().display().to_string();
    let m = Loader::new(&uri)
        .filter_glob("layers.1.*")
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(
        m.files().count(),
        1,
        "only the shard holding a match is read"
    );
    let names: Vec<&str> = m.tensors().map(|t| t.name).collect();
    assert_eq!(names, ["layers.1.w0", "layers.1.w1"]);
    assert_eq!(m.get("layers.1.w1").unwrap().data, want[4].bytes.as_slice());
    // The index still lists the whole checkpoint.
    assert_eq!(m.index().tensors.len(), want.len());

    let m = Loader::new(&uri)
        .filter(|t| t.nbytes() < 2000)
        .load()
        .unwrap();
    let names: Vec<&str> = m.tensors().map(|t| t.name).collect();
    assert_eq!(names, ["layers.0.w1", "layers.0.w2", "layers.1.w1"]);

    let e = Loader::new(&uri)
        .filter_glob("nothing.*")
        .unwrap()
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(
        e.to_string()
            .contains("filter \"nothing.*\" matches none of the 6 tensors"),
        "{e}"
    );
    assert!(
        e.to_string().contains("model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn a_missing_shard_or_misplaced_tensor_fails_before_any_data_is_read() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::write(dir.path(), &SHARDS, 3);
    let uri = dir.path().display().to_string();
    let last = dir.path().join(checkpoint::shard_name(3, 3));
    std::fs::remove_file(&last).unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let e = Loader::new(&uri)
        .progress(progress.clone())
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(
        e.location(),
        Some(last.display().to_string().as_str()),
        "{e}"
    );
    assert_eq!(
        progress.load(Ordering::Relaxed),
        0,
        "no shard's data is read before every shard has been checked"
    );

    // The index places a tensor in a shard that does not hold it.
    let dir = tempfile::tempdir().unwrap();
    let mut want = checkpoint::write(dir.path(), &SHARDS, 4);
    want[0].file = checkpoint::shard_name(2, 3);
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want);
    for e in [
        Loader::new(dir.path().display().to_string())
            .load()
            .unwrap_err(),
        Loader::new(dir.path().display().to_string())
            .inspect()
            .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        let s = e.to_string();
        assert!(s.contains("\"layers.0.w0\""), "{s}");
        assert!(s.contains("does not hold"), "{s}");
        assert!(s.contains(&checkpoint::shard_name(2, 3)), "{s}");
    }
}

/// The error of each call that checks every shard first (`load`, `inspect`, `inspect_files`,
/// `check_data`), named; each must fail.
fn every_check_fails(l: &Loader) -> [(&'static str, tensorstream::Error); 4] {
    [
        ("load", l.load().map(drop).unwrap_err()),
        ("inspect", l.inspect().map(drop).unwrap_err()),
        ("inspect_files", l.inspect_files().map(drop).unwrap_err()),
        ("check_data", l.check_data().map(drop).unwrap_err()),
    ]
}

/// Shard headers are read several at a time; a failure is still the first in shard order, as
/// a loop over the shards would report it, whichever shard's reading ended first.
#[test]
fn of_several_failing_shards_the_first_in_order_is_reported() {
    let shards: Vec<&[usize]> = vec![&[64, 3]; 20];
    for (first, later) in [(5usize, 15usize), (2, 3), (19, 20)] {
        let dir = tempfile::tempdir().unwrap();
        checkpoint::write(dir.path(), &shards, 6);
        let missing = dir.path().join(checkpoint::shard_name(first, 20));
        std::fs::remove_file(&missing).unwrap();
        // A later shard that fails too, differently (a truncated header).
        let truncated = dir.path().join(checkpoint::shard_name(later, 20));
        std::fs::write(&truncated, [1u8, 2, 3]).unwrap();
        let uri = dir.path().display().to_string();
        let l = Loader::new(&uri);
        for (what, e) in every_check_fails(&l) {
            assert_eq!(e.kind(), ErrorKind::NotFound, "{what}: {e}");
            assert_eq!(
                e.location(),
                Some(missing.display().to_string().as_str()),
                "{what}: {e}"
            );
        }
        // Only the later one broken: it is reported.
        checkpoint::write(dir.path(), &shards, 6);
        std::fs::write(&truncated, [1u8, 2, 3]).unwrap();
        let e = l.load().map(drop).unwrap_err();
        assert_eq!(
            e.location(),
            Some(truncated.display().to_string().as_str()),
            "{e}"
        );
    }
    // And a checkpoint of many shards loads whole, in order.
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &shards, 7);
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    let files = Loader::new(dir.path().display().to_string())
        .inspect_files()
        .unwrap();
    assert_eq!(files.len(), 20);
    for (k, f) in files.iter().enumerate() {
        assert_eq!(
            f.shard.as_deref(),
            Some(checkpoint::shard_name(k + 1, 20).as_str())
        );
    }
    assert_eq!(m.len(), want.len());
    for (t, w) in m.tensors().zip(&want) {
        assert_eq!(t.name, w.name);
        assert!(t.data == &w.bytes[..], "{}", w.name);
    }
}

/// A shard that holds fewer tensors than the index places there fails the check as much as a
/// shard that cannot be opened: of the two, the first in shard order is reported, as a loop
/// over the shards reports it (the headers being read several at a time must not change that).
#[test]
fn a_misplaced_tensor_is_reported_before_a_later_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = checkpoint::write(dir.path(), &SHARDS, 11);
    // Shard 2 is said to hold a tensor of shard 1, and shard 3 is missing.
    want[0].file = checkpoint::shard_name(2, 3);
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want);
    std::fs::remove_file(dir.path().join(checkpoint::shard_name(3, 3))).unwrap();
    let uri = dir.path().display().to_string();
    let l = Loader::new(&uri);
    for (what, e) in every_check_fails(&l) {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        let s = e.to_string();
        assert!(s.contains("does not hold"), "{what}: {s}");
        assert!(s.contains(&checkpoint::shard_name(2, 3)), "{what}: {s}");
    }
}

#[test]
fn tensors_the_index_does_not_list_are_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 5);
    // Drop one tensor from the index: it stays in its shard but is not part of the checkpoint.
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want[1..]);
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    assert!(m.get(&want[0].name).is_none());
    assert_eq!(m.len(), want.len() - 1);
    assert_eq!(m.index().tensors.len(), want.len() - 1);
}

#[test]
fn directories_resolve_to_their_model_or_say_why_not() {
    // One model file: loaded as such.
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; 100];
    checkpoint::write_file(
        &dir.path().join("only.safetensors"),
        &[("x".to_string(), data.clone())],
    );
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    assert!(!m.is_sharded());
    assert_eq!(m.get("x").unwrap().data, data.as_slice());
    // Two model files, no index: which one?
    checkpoint::write_file(&dir.path().join("other.safetensors"), &[]);
    let e = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(
        e.to_string()
            .contains("only.safetensors, other.safetensors"),
        "{e}"
    );
    // Nothing at all.
    let empty = tempfile::tempdir().unwrap();
    let e = Loader::new(empty.path().display().to_string())
        .inspect()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // An index under another name (a variant, as transformers names them), when it is the
    // only one; and given by name.
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 6);
    let variant = dir.path().join("model.safetensors.index.fp16.json");
    std::fs::rename(dir.path().join("model.safetensors.index.json"), &variant).unwrap();
    for uri in [dir.path(), variant.as_path()] {
        let m = Loader::new(uri.display().to_string()).load().unwrap();
        assert!(m.is_sharded());
        assert_eq!(m.len(), want.len());
    }
    // As in transformers, a model.safetensors beside an index is what a directory means.
    checkpoint::write_file(
        &dir.path().join("model.safetensors"),
        &[("whole".to_string(), vec![1u8; 10])],
    );
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    assert!(!m.is_sharded());
    assert_eq!(m.len(), 1);
    // A PyTorch index beside the safetensors copy is not counted: neither beside a variant
    // index, nor beside a single model file.
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 9);
    std::fs::rename(
        dir.path().join("model.safetensors.index.json"),
        dir.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
    )
    .unwrap();
    let bin_index = r#"{"weight_map": {"x": "pytorch_model-00001-of-00001.bin"}}"#;
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.bin.index.json"),
        bin_index,
    )
    .unwrap();
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    assert!(m.is_sharded());
    assert_eq!(m.len(), want.len());
    let dir = tempfile::tempdir().unwrap();
    checkpoint::write_file(
        &dir.path().join("weights.safetensors"),
        &[("x".to_string(), data.clone())],
    );
    std::fs::write(dir.path().join("pytorch_model.bin.index.json"), bin_index).unwrap();
    let m = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap();
    assert_eq!(m.get("x").unwrap().data, data.as_slice());
}

#[test]
fn an_index_listing_a_tensor_twice_or_pytorch_shards_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::write(dir.path(), &SHARDS, 12);
    let index = dir.path().join("model.safetensors.index.json");
    // A duplicate key: "the last one wins" would hide the first shard name.
    std::fs::write(
        &index,
        br#"{"weight_map": {"layers.0.w0": "missing.safetensors",
                            "layers.0.w1": "model-00001-of-00003.safetensors",
                            "layers.0.w0": "model-00001-of-00003.safetensors"}}"#,
    )
    .unwrap();
    let e = Loader::new(dir.path().display().to_string())
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("\"layers.0.w0\" is listed twice"),
        "{e}"
    );
    std::fs::write(
        &index,
        br#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}"#,
    )
    .unwrap();
    let e = Loader::new(index.display().to_string())
        .inspect()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("PyTorch .bin shards"), "{e}");
}

#[test]
fn combined_indexes_refuse_sizes_past_2_to_the_64() {
    use tensorstream::engine::{DType, Format, TensorInfo, TensorSource};
    let ix = |size: u64| tensorstream::TensorIndex {
        format: Format::Safetensors,
        tensors: vec![TensorInfo {
            name: format!("t{size}"),
            dtype: DType::U8,
            shape: vec![size - 8],
            range: 8..size,
            source: TensorSource::Stored,
            path: None,
            prefix: None,
            role: None,
        }],
        metadata: Default::default(),
        object_size: size,
        header_len: 8,
        version: 0,
    };
    let ok = tensorstream::combined_index([&ix(100), &ix(200)]).unwrap();
    assert_eq!(ok.object_size, 300);
    assert_eq!(ok.tensors.len(), 2);
    let (a, b) = (ix(1 << 63), ix(1 << 63));
    let e = tensorstream::combined_index([&a, &b]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("more than 2^64"), "{e}");
    assert!(tensorstream::combined_index([]).is_err());
}

#[test]
fn hostile_indexes_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.safetensors.index.json");
    // Over the size cap (sparse: nothing is written).
    let f = std::fs::File::create(&index).unwrap();
    f.set_len(33 << 20).unwrap();
    let e = Loader::new(index.display().to_string()).load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("larger than 33554432 is refused"),
        "{e}"
    );
    // A shard outside the directory.
    std::fs::write(&index, br#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap();
    let e = Loader::new(index.display().to_string())
        .inspect()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("plain file names"), "{e}");
}

#[test]
fn streaming_gpu_loads_check_a_sharded_checkpoint_before_the_device() {
    // (Sharded GPU loads, streaming or not, on a device: tests/gpu.rs.) The checkpoint is
    // checked before the device is opened: a missing shard is reported as such with or without
    // a GPU, and a sound checkpoint gets as far as the device.
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 7);
    let uri = dir.path().display().to_string();
    let gpu = tensorstream_cuda::driver_present()
        && tensorstream_cuda::device_count().is_ok_and(|n| n > 0);
    match Loader::new(&uri)
        .device(tensorstream::Device::Cuda(0))
        .load_cuda_streaming()
    {
        Ok(mut s) => {
            assert!(gpu, "a streaming GPU load started without a GPU");
            let index = s.index().unwrap();
            assert_eq!(index.tensors.len(), want.len());
            let seen = (&mut s).count();
            assert_eq!(seen, want.len());
            let (m, _) = s.wait().unwrap();
            assert_eq!(m.len(), want.len());
            m.release().unwrap();
        }
        Err(e) => {
            assert!(!gpu, "{e}");
            assert_eq!(e.kind(), ErrorKind::Device, "{e}");
            assert!(e.to_string().contains("CUDA"), "{e}");
        }
    }
    let gone = dir.path().join(&want.last().unwrap().file);
    std::fs::remove_file(&gone).unwrap();
    let e = Loader::new(&uri)
        .device(tensorstream::Device::Cuda(0))
        .load_cuda_streaming()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string()
            .contains(gone.file_name().unwrap().to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn shards_loading_side_by_side_load_every_byte_and_report_the_whole_queue_depth() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 2);
    let budget = 8 << 20;
    let m = Loader::new(dir.path().display().to_string())
        .queue_depth(8)
        .chunk_size(1 << 20)
        .ring_budget(budget)
        .load()
        .unwrap();
    let st = m.stats();
    let total: usize = want.iter().map(|t| t.bytes.len()).sum();
    assert_eq!(st.tensor_bytes, total as u64);
    // Two lanes of 4 reads each: the load reports what it kept in flight in all (how the
    // lanes split it is checked where the lanes are made, in the crate's unit tests).
    assert_eq!(st.queue_depth, 8, "{st:?}");
    // The lanes overlap: the data phase is the time some shard was reading, within the whole
    // load's wall time.
    assert!(st.io_elapsed <= st.elapsed, "{st:?}");
    assert!(st.io_elapsed > std::time::Duration::ZERO, "{st:?}");
    // One read in flight: one shard at a time, not one read per lane.
    let m = Loader::new(dir.path().display().to_string())
        .queue_depth(1)
        .load()
        .unwrap();
    assert_eq!(m.stats().queue_depth, 1);
    assert_eq!(m.stats().tensor_bytes, total as u64);
}

#[test]
fn progress_cancel_and_deadline_cover_the_whole_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::write(dir.path(), &SHARDS, 8);
    let uri = dir.path().display().to_string();
    let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let m = Loader::new(&uri)
        .progress(done.clone())
        .progress_total(total.clone())
        .load()
        .unwrap();
    let (done, total) = (done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
    assert_eq!(done, total, "progress ends at its total");
    assert!(total >= m.stats().tensor_bytes, "{total}");
    // Reading every tensor to check it, with O_DIRECT (aligned reads: more bytes than the
    // tensors hold): progress ends at its total too.
    let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let st = Loader::new(&uri)
        .open_options(tensorstream::OpenOptions {
            direct_io: Some(true),
            ..Default::default()
        })
        .progress(done.clone())
        .progress_total(total.clone())
        .check_data()
        .unwrap();
    let (done, total) = (done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
    assert_eq!(done, total, "check_data's progress ends at its total");
    if st.direct_io {
        // (Where the filesystem took O_DIRECT: aligned reads, more bytes than the tensors.)
        assert!(st.bytes_read > st.tensor_bytes, "{st:?}");
    }

    let flag = Arc::new(AtomicBool::new(true));
    let e = Loader::new(&uri).cancel_flag(flag).load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    let e = Loader::new(&uri)
        .deadline(std::time::Duration::ZERO)
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // The caller's own cancel stays a cancel, even when the deadline has passed too.
    let e = Loader::new(&uri)
        .cancel_flag(Arc::new(AtomicBool::new(true)))
        .deadline(std::time::Duration::ZERO)
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
}

#[test]
fn convert_joins_the_shards_into_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 13);
    let uri = dir.path().display().to_string();
    for ext in ["safetensors", "tensors"] {
        let out = dir.path().join(format!("joined.{ext}"));
        let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let st = Loader::new(&uri)
            .progress(done.clone())
            .progress_total(total.clone())
            .convert(&out, None)
            .unwrap();
        assert_eq!(st.tensors, want.len());
        let bytes: usize = want.iter().map(|w| w.bytes.len()).sum();
        assert_eq!(st.bytes, bytes as u64);
        assert_eq!(done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
        let m = Loader::new(out.display().to_string()).load().unwrap();
        assert!(!m.is_sharded());
        let names: Vec<&str> = m.tensors().map(|t| t.name).collect();
        let want_names: Vec<&str> = want.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, want_names, "{ext}: shard by shard");
        for w in &want {
            assert!(
                m.get(&w.name).unwrap().data == w.bytes.as_slice(),
                "{ext}: {}",
                w.name
            );
        }
        if ext == "safetensors" {
            assert_eq!(
                m.index().metadata.get("format").map(String::as_str),
                Some("pt")
            );
        }
    }
    // Filters apply; encrypting the output works as for one file.
    let out = dir.path().join("some.tensors");
    let key = tensorstream::KeySource::from_key_file("ab".repeat(32).as_bytes()).unwrap();
    Loader::new(&uri)
        .filter_glob("layers.1.*")
        .unwrap()
        .convert(&out, Some(key.clone()))
        .unwrap();
    let m = Loader::new(out.display().to_string())
        .key(key)
        .verify_hashes(true)
        .load()
        .unwrap();
    let names: Vec<&str> = m.tensors().map(|t| t.name).collect();
    assert_eq!(names, ["layers.1.w0", "layers.1.w1"]);
    assert_eq!(m.get("layers.1.w0").unwrap().data, want[3].bytes.as_slice());
    // Asking to verify safetensors shards is refused before anything is written.
    let out = dir.path().join("verified.safetensors");
    let e = Loader::new(&uri)
        .verify_hashes(true)
        .convert(&out, None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A shard missing when its turn comes: the conversion fails naming it, and leaves nothing.
    let out = dir.path().join("gone.safetensors");
    let gone = dir.path().join(checkpoint::shard_name(3, 3));
    let moved = dir.path().join("moved-away");
    std::fs::rename(&gone, &moved).unwrap();
    let e = Loader::new(&uri).convert(&out, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!out.exists());
    std::fs::rename(&moved, &gone).unwrap();
}

/// Shards load two at a time: a shard that fails while loading (here: tensorizer shards, one
/// with a flipped data byte, loaded with verification) fails the load with its own error — not
/// the cancellation it causes in the other lane — and nothing is returned.
#[test]
fn a_shard_failing_mid_load_fails_the_load_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let want = checkpoint::write(src.path(), &[&[1 << 20, 10], &[3 << 20], &[2 << 20, 5]], 14);
    // The same checkpoint as tensorizer shards.
    let mut tz = want.clone();
    for k in 1..=3 {
        let from = src.path().join(checkpoint::shard_name(k, 3));
        let to = checkpoint::shard_name(k, 3).replace(".safetensors", ".tensors");
        Loader::new(from.display().to_string())
            .convert(&dir.path().join(&to), None)
            .unwrap();
        for t in tz
            .iter_mut()
            .filter(|t| t.file == checkpoint::shard_name(k, 3))
        {
            t.file = to.clone();
        }
    }
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &tz);
    let uri = dir.path().display().to_string();
    let m = Loader::new(&uri).verify_hashes(true).load().unwrap();
    for w in &want {
        assert!(
            m.get(&w.name).unwrap().data == w.bytes.as_slice(),
            "{}",
            w.name
        );
    }
    // Flip a byte in the middle of shard 2's only tensor.
    let bad = dir.path().join("model-00002-of-00003.tensors");
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len();
    bytes[n - (1 << 20)] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    for _ in 0..3 {
        let e = Loader::new(&uri).verify_hashes(true).load().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
        assert!(e.to_string().contains("layers.1.w0"), "{e}");
    }
}

#[test]
fn check_data_reads_every_selected_tensor_of_every_shard_and_keeps_none() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &SHARDS, 7);
    let uri = dir.path().display().to_string();
    let all: u64 = want.iter().map(|w| w.bytes.len() as u64).sum();
    let st = Loader::new(&uri).check_data().unwrap();
    assert_eq!(st.tensor_bytes, all);
    assert!(st.bytes_read >= all, "{st:?}");
    let st = Loader::new(&uri)
        .filter_glob("layers.1.*")
        .unwrap()
        .check_data()
        .unwrap();
    assert_eq!(st.tensor_bytes, (9 << 20) + 3);
    // A shard cut short after its index was read: the check fails and names that shard.
    let last = dir.path().join(checkpoint::shard_name(2, 3));
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1000).unwrap();
    let e = Loader::new(&uri).check_data().unwrap_err();
    assert_eq!(
        e.location(),
        Some(last.display().to_string().as_str()),
        "{e}"
    );
}

#[test]
fn a_conversion_keeps_every_shards_metadata() {
    // Two shards with metadata of their own (a key that starts with "tensorizer." included:
    // only the tensorizer reader's synthetic key is left out of a conversion).
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    for (k, meta) in [
        (1, vec![("format", "pt"), ("tensorizer.note", "keep me")]),
        (2, vec![("format", "pt"), ("shard", "2")]),
    ] {
        let file = checkpoint::shard_name(k, 2);
        let name = format!("w{k}");
        let bytes = vec![k as u8; 8];
        let meta: std::collections::BTreeMap<String, String> = meta
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let mut image = tensorstream_engine::format::safetensors::write_header(
            &[(name.clone(), tensorstream_engine::DType::U8, vec![8], 8)],
            &meta,
        )
        .unwrap();
        image.extend_from_slice(&bytes);
        std::fs::write(dir.path().join(&file), image).unwrap();
        written.push(checkpoint::Written {
            sha256: checkpoint::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            name,
            file,
            bytes,
        });
    }
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &written);
    let out = dir.path().join("joined.safetensors");
    Loader::new(dir.path().display().to_string())
        .convert(&out, None)
        .unwrap();
    let index = Loader::new(out.display().to_string()).inspect().unwrap();
    let meta: Vec<(&str, &str)> = index
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        meta,
        [
            ("format", "pt"),
            ("shard", "2"),
            ("tensorizer.note", "keep me")
        ]
    );
}

/// A checkpoint mixing a safetensors shard, an encrypted tensorizer shard and a plain one:
/// the key and verification apply to the shards that take them (they were refused for the
/// safetensors shard, so such a checkpoint could not be used at all), and a key or a
/// verification that no shard takes is still refused.
#[test]
fn keys_and_verification_apply_to_the_shards_that_take_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = checkpoint::write(dir.path(), &SHARDS, 21);
    let key = tensorstream::KeySource::from_key_file("cd".repeat(32).as_bytes()).unwrap();
    // Shard 2 becomes an encrypted tensorizer file, shard 3 a plain one.
    for (k, encrypt) in [(2usize, Some(key.clone())), (3, None)] {
        let st = dir.path().join(checkpoint::shard_name(k, 3));
        let tz = dir.path().join(format!("part-{k}.tensors"));
        Loader::new(st.display().to_string())
            .convert(&tz, encrypt)
            .unwrap();
        std::fs::remove_file(&st).unwrap();
        let old = checkpoint::shard_name(k, 3);
        for w in want.iter_mut().filter(|w| w.file == old) {
            w.file = format!("part-{k}.tensors");
        }
    }
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want);
    let uri = dir.path().display().to_string();
    let m = Loader::new(&uri)
        .key(key.clone())
        .verify_hashes(true)
        .load()
        .unwrap();
    for w in &want {
        assert!(
            m.get(&w.name).unwrap().data == w.bytes.as_slice(),
            "{}",
            w.name
        );
    }
    Loader::new(&uri).key(key.clone()).inspect().unwrap();
    let out = dir.path().join("joined.safetensors");
    let st = Loader::new(&uri)
        .key(key.clone())
        .verify_hashes(true)
        .convert(&out, None)
        .unwrap();
    assert_eq!(st.tensors, want.len());
    // Without the key, the encrypted shard is refused, naming it.
    let e = Loader::new(&uri).load().unwrap_err();
    assert!(e.to_string().contains("part-2.tensors"), "{e}");
    // A checkpoint of safetensors shards takes neither.
    let plain = tempfile::tempdir().unwrap();
    checkpoint::write(plain.path(), &SHARDS, 22);
    let uri = plain.path().display().to_string();
    let e = Loader::new(&uri).verify_hashes(true).load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = Loader::new(&uri).key(key.clone()).load().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(
        e.to_string()
            .contains("no shard of the checkpoint is encrypted"),
        "{e}"
    );
    let e = Loader::new(&uri).key(key).inspect().unwrap_err();
    assert!(
        e.to_string()
            .contains("no shard of the checkpoint is encrypted"),
        "{e}"
    );
}

/// A later shard whose tensorizer meta tensor's per-tensor header is corrupted fails the
/// checkpoint's check, naming the shard and the tensor, before any shard is loaded (no bytes
/// counted) — for the host, and for a device before one is opened (asked for one that does
/// not exist, the load still names the shard, not the device). Before, the host had loaded
/// the first shards, and a GPU load had made its device allocation and copied them, when that
/// shard's turn came.
#[test]
fn a_corrupt_meta_header_in_a_later_shard_fails_before_any_shard_loads() {
    let dir = tempfile::tempdir().unwrap();
    let bad = checkpoint::write_corrupt_meta_header(dir.path());
    let uri = dir.path().display().to_string();
    let check = |e: tensorstream::Error, what: &str| {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        let s = e.to_string();
        assert!(
            s.contains(&bad) && s.contains("layers.2.w1") && s.contains("per-tensor header"),
            "{what}: {e}"
        );
    };
    let progress = Arc::new(AtomicU64::new(0));
    let e = Loader::new(&uri)
        .progress(progress.clone())
        .load()
        .unwrap_err();
    assert_eq!(
        progress.load(Ordering::SeqCst),
        0,
        "shards were loaded before the corrupt one was found: {e}"
    );
    check(e, "host");
    let on = || {
        Loader::new(&uri)
            .device(tensorstream::Device::Cuda(99))
            .progress(progress.clone())
    };
    check(on().load_cuda().unwrap_err(), "cuda:99");
    check(
        on().load_cuda_streaming().unwrap_err(),
        "cuda:99, streaming",
    );
    assert_eq!(progress.load(Ordering::SeqCst), 0);
}
