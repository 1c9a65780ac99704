//! Tensorizer files written by the reference tool (shared/fixtures): every tensor's bytes match the
//! manifest, through the engine, with and without verification, decrypted; round trips through
//! `convert`; hostile files fail with clear errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tensorstream_engine::format::tensorizer::{self, KeySource, ReadOptions};
use tensorstream_engine::*;

fn fixtures() -> PathBuf {
    let p = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ));
    assert!(
        p.join("manifest.json").is_file(),
        "fixtures missing at {} (shared/ must sit beside the checkout)",
        p.display()
    );
    p.to_path_buf()
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Manifest names of nested state dicts are JSON arrays; the engine shows them dotted.
fn display_name(n: &str) -> String {
    if n.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(n).unwrap();
        v.iter()
            .map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    } else {
        n.to_string()
    }
}

fn key_for(entry: &Value) -> Option<KeySource> {
    let enc = entry.get("encryption")?;
    if let Some(h) = enc.get("key_hex").and_then(Value::as_str) {
        return Some(KeySource::from_key_file(h.as_bytes()).unwrap());
    }
    enc.get("password")
        .and_then(Value::as_str)
        .map(|p| KeySource::password(p.as_bytes()).unwrap())
}

fn err<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Loads `bytes` through read_index → prepare → plan → execute → HostSink.
fn load(bytes: Vec<u8>, opts: &ReadOptions, layout: Layout) -> Result<HostModel> {
    load_from(
        Arc::new(MemoryBackend::new("mem.tensors", bytes)),
        opts,
        layout,
    )
}

/// [`load`] from any backend.
fn load_from(be: Arc<dyn Backend>, opts: &ReadOptions, layout: Layout) -> Result<HostModel> {
    let meta = be.stat()?;
    let mut index = format::read_index(be.as_ref(), &meta)?;
    let hook = tensorizer::prepare(be.as_ref(), &mut index, opts)?;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let mut po = PlanOptions::new(meta.size);
    po.layout = layout;
    po.chunk_size = 1 << 20; // several reads per big tensor: pieces must be joined
    let plan = Arc::new(plan(&index, &sel, &po)?);
    let sink = match hook {
        Some(h) => HostSink::with_hook(h, 3),
        None => HostSink::new(),
    };
    let eo = EngineOptions {
        queue_depth: 4,
        ring_budget: 4 << 20,
        progress: None,
        cancel: None,
    };
    let (sink, _) = execute(be, &meta, plan.clone(), sink, &eo)?;
    let (arena, _) = sink.into_parts()?;
    HostModel::new(arena, index, &plan)
}

/// A manifest entry's shape.
fn manifest_shape(t: &Value) -> Vec<u64> {
    t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect()
}

/// The engine's name for a manifest entry's (torch) dtype.
fn manifest_dtype(t: &Value) -> &'static str {
    match t["dtype"].as_str().unwrap() {
        "bfloat16" => "bf16",
        "float16" => "f16",
        "float32" => "f32",
        "float64" => "f64",
        "int64" => "i64",
        "int32" => "i32",
        "int16" => "i16",
        "int8" => "i8",
        "uint8" => "u8",
        "bool" => "bool",
        "float8_e4m3fn" => "f8_e4m3",
        "float8_e5m2" => "f8_e5m2",
        other => panic!("manifest dtype {other} not mapped in the test"),
    }
}

fn check_against_manifest(file: &str, entry: &Value, m: &HostModel) {
    let tensors = entry["tensors"].as_array().unwrap();
    assert_eq!(m.len(), tensors.len(), "{file}: tensor count");
    for t in tensors {
        let name = display_name(t["name"].as_str().unwrap());
        let v = m
            .get(&name)
            .unwrap_or_else(|| panic!("{file}: tensor {name} missing"));
        assert_eq!(v.shape, &manifest_shape(t)[..], "{file}/{name} shape");
        assert_eq!(
            v.data.len() as u64,
            t["nbytes"].as_u64().unwrap(),
            "{file}/{name} nbytes"
        );
        assert_eq!(
            hex(&Sha256::digest(v.data)),
            t["sha256"].as_str().unwrap(),
            "{file}/{name} bytes differ from the reference reader's"
        );
        assert_eq!(v.dtype.name(), manifest_dtype(t), "{file}/{name} dtype");
    }
}

fn tensorizer_entries() -> Vec<(String, Value)> {
    let m = manifest();
    let files = m["files"].as_object().unwrap();
    let out: Vec<(String, Value)> = files
        .iter()
        .filter(|(_, v)| v["format"] == "tensorizer")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(out.len() >= 6, "manifest lists too few tensorizer files");
    out
}

#[test]
fn every_fixture_matches_the_manifest_with_and_without_verification() {
    for (file, entry) in tensorizer_entries() {
        let bytes = std::fs::read(fixtures().join(&file)).unwrap();
        for verify in [false, true] {
            for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
                let opts = ReadOptions {
                    verify,
                    key: key_for(&entry),
                };
                let m = load(bytes.clone(), &opts, layout)
                    .unwrap_or_else(|e| panic!("{file} verify={verify} {layout:?}: {e}"));
                check_against_manifest(&file, &entry, &m);
                assert_eq!(
                    m.index().version as u64,
                    entry["data_version"].as_u64().unwrap(),
                    "{file} data version"
                );
            }
        }
    }
}

#[test]
fn nested_names_keep_their_path_and_meta_tensors_are_zeros() {
    let bytes = std::fs::read(fixtures().join("v1_nested_state_dict.tensors")).unwrap();
    let m = load(bytes, &ReadOptions::default(), Layout::Mirror).unwrap();
    let t = m.index().get("model.layers.1.w").unwrap();
    assert_eq!(
        t.path.as_ref().unwrap(),
        &vec![
            Value::from("model"),
            Value::from("layers"),
            Value::from(1),
            Value::from("w")
        ]
    );
    assert!(m.index().get("head").unwrap().path.is_none());

    let bytes = std::fs::read(fixtures().join("v4_module_with_meta.tensors")).unwrap();
    let m = load(bytes, &ReadOptions::default(), Layout::Mirror).unwrap();
    let t = m.index().get(".marker").unwrap();
    assert_eq!(t.source, TensorSource::Zeros);
    assert_eq!(m.get(".marker").unwrap().data, &[0u8; 4]);
}

#[test]
fn encrypted_files_need_the_right_key() {
    let m = manifest();
    let key_file = std::fs::read(fixtures().join("v3_encrypted_key.tensors")).unwrap();
    let pw_file = std::fs::read(fixtures().join("v3_encrypted_password.tensors")).unwrap();
    // No key at all: refused before any data is read.
    let e = err(load(
        key_file.clone(),
        &ReadOptions::default(),
        Layout::Mirror,
    ));
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("encrypted"), "{e}");
    // It says how to give one to the library (which does not read TENSORSTREAM_PASSWORD), not
    // only to the command-line tool.
    assert!(e.to_string().contains("Loader::key"), "{e}");
    assert!(e.to_string().contains("--key-file"), "{e}");
    // Wrong raw key.
    let wrong = ReadOptions {
        verify: false,
        key: Some(KeySource::Key([7u8; 32])),
    };
    let e = err(load(key_file.clone(), &wrong, Layout::Mirror));
    assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
    assert!(e.to_string().contains("wrong key or password"), "{e}");
    // Wrong password.
    let wrong = ReadOptions {
        verify: true,
        key: Some(KeySource::password(b"incorrect horse").unwrap()),
    };
    let e = err(load(pw_file.clone(), &wrong, Layout::Packed { align: 256 }));
    assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
    assert!(e.to_string().contains("\"w\""), "{e}");
    // A password for a file encrypted with a raw key.
    let e = err(load(key_file, &wrong, Layout::Mirror));
    assert!(e.to_string().contains("raw key"), "{e}");
    // A key for an unencrypted file.
    let plain = std::fs::read(fixtures().join("v1_numpy_dtypes.tensors")).unwrap();
    let e = err(load(
        plain,
        &ReadOptions {
            verify: false,
            key: Some(KeySource::Key([0; 32])),
        },
        Layout::Mirror,
    ));
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // The right password via the hex key of the other file is also refused (different key).
    let hexkey = m["files"]["v3_encrypted_key.tensors"]["encryption"]["key_hex"]
        .as_str()
        .unwrap();
    let e = err(load(
        pw_file,
        &ReadOptions {
            verify: false,
            key: Some(KeySource::from_key_file(hexkey.as_bytes()).unwrap()),
        },
        Layout::Mirror,
    ));
    assert_eq!(e.kind(), ErrorKind::IntegrityMismatch);
    // ... and says the file needs a password, not a key (its crypt info holds the KDF's).
    assert!(
        e.to_string().contains("encrypted with a password")
            && e.to_string().contains("a raw key was given")
            && !e.to_string().contains("wrong key or password"),
        "{e}"
    );
}

#[test]
fn a_tiny_file_declaring_huge_zero_tensors_fails_cleanly_naming_it() {
    // A meta tensor stores nothing but loads as zeros of its declared size: 2^60 bytes here,
    // in a file of a few hundred bytes. The host arena cannot be allocated; the error says so
    // and names the file (it did not: allocation errors came without a location).
    let specs = [
        tensorizer::TensorSpec {
            name: "a".into(),
            path: None,
            dtype: DType::U8,
            shape: vec![4],
            meta: false,
            role: None,
        },
        tensorizer::TensorSpec {
            name: "huge".into(),
            path: None,
            dtype: DType::F32,
            shape: vec![1 << 58],
            meta: true,
            role: None,
        },
    ];
    let mut s = tensorizer::Serializer::new(
        std::io::Cursor::new(Vec::new()),
        &specs,
        &tensorizer::SerializerOptions::default(),
    )
    .unwrap();
    s.write_tensor(&[1, 2, 3, 4]).unwrap();
    s.write_tensor(&[]).unwrap();
    let bytes = s.finish().unwrap().into_inner();
    assert!(bytes.len() < 4096);
    let e = err(load(bytes, &ReadOptions::default(), Layout::Mirror));
    assert!(e.to_string().contains("out of host memory"), "{e}");
    assert_eq!(e.location(), Some("mem.tensors"), "{e}");
}

#[test]
fn verification_fails_for_a_tensor_whose_header_holds_no_hash() {
    // Zero the hash section's length in one per-tensor header (v1: 4-byte dimensions). The
    // section's bytes stay where they were, so the header still parses; verification would
    // then check nothing, and must fail instead of passing.
    let mut bytes = std::fs::read(fixtures().join("v1_numpy_dtypes.tensors")).unwrap();
    let be = MemoryBackend::new("x", bytes.clone());
    let index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let t = index.get("layer.0.w").unwrap();
    let mut pos = t.prefix.clone().expect("per-tensor header").start as usize + 8 + 2 + 1;
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    pos += 2 + u16_at(&bytes, pos); // name
    pos += 1 + bytes[pos] as usize; // dtype
    pos += 1 + 4 * bytes[pos] as usize; // dimensions
    assert!(u16_at(&bytes, pos) > 0, "expected a hash section at {pos}");
    bytes[pos..pos + 2].fill(0);
    // Without verification the header is fine: the bytes load.
    load(bytes.clone(), &ReadOptions::default(), Layout::Mirror).unwrap();
    let e = err(load(
        bytes,
        &ReadOptions {
            verify: true,
            key: None,
        },
        Layout::Mirror,
    ));
    assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
    assert!(e.to_string().contains("layer.0.w"), "{e}");
    assert!(e.to_string().contains("no hash"), "{e}");
}

#[test]
fn a_flipped_data_byte_fails_verification_naming_the_tensor() {
    let mut bytes = std::fs::read(fixtures().join("v1_numpy_dtypes.tensors")).unwrap();
    let be = MemoryBackend::new("x", bytes.clone());
    let meta = be.stat().unwrap();
    let index = format::read_index(&be, &meta).unwrap();
    let t = index.get("layer.0.w").unwrap();
    bytes[(t.range.start + 100) as usize] ^= 0x40;
    // Without verification the flip goes unnoticed …
    load(bytes.clone(), &ReadOptions::default(), Layout::Mirror).unwrap();
    // … with it, the load fails and names the tensor.
    for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
        let e = err(load(
            bytes.clone(),
            &ReadOptions {
                verify: true,
                key: None,
            },
            layout,
        ));
        assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
        assert!(e.to_string().contains("layer.0.w"), "{e}");
    }
    // A flipped byte in an encrypted tensor breaks its MAC even without verification.
    let mut enc = std::fs::read(fixtures().join("v3_encrypted_key.tensors")).unwrap();
    let be = MemoryBackend::new("x", enc.clone());
    let index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let t = index.get("big.w").unwrap();
    enc[(t.range.end - 5) as usize] ^= 1; // in the second 2 MiB chunk
    let e = err(load(
        enc,
        &ReadOptions {
            verify: false,
            key: Some(KeySource::from_key_file(&(0u8..32).collect::<Vec<u8>>()).unwrap()),
        },
        Layout::Mirror,
    ));
    assert_eq!(e.kind(), ErrorKind::IntegrityMismatch, "{e}");
    assert!(e.to_string().contains("chunk 1"), "{e}");
}

fn all_entries() -> Vec<(String, Value)> {
    let m = manifest();
    m["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn every_fixture_round_trips_through_convert() {
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let dir = tempfile::tempdir().unwrap();
    let entries = all_entries();
    assert!(entries.iter().any(|(_, v)| v["format"] == "safetensors"));
    for (file, entry) in entries {
        let src = std::fs::read(fixtures().join(&file)).unwrap();
        let be = MemoryBackend::new(file.clone(), src);
        for ext in ["tensors", "safetensors"] {
            let out = dir.path().join(format!("{file}.{ext}"));
            let opts = ConvertOptions {
                read: ReadOptions {
                    verify: entry["format"] == "tensorizer",
                    key: key_for(&entry),
                },
                buffer_size: 4096, // many pieces per tensor
                ..Default::default()
            };
            let stats = convert(&be, &out, &opts)
                .unwrap_or_else(|e| panic!("convert {file} -> {ext}: {e}"));
            assert_eq!(stats.tensors, entry["tensors"].as_array().unwrap().len());
            let bytes = std::fs::read(&out).unwrap();
            let verify = ext == "tensors";
            let m = load(bytes, &ReadOptions { verify, key: None }, Layout::Mirror)
                .unwrap_or_else(|e| panic!("load converted {file} -> {ext}: {e}"));
            check_against_manifest(&file, &entry, &m);
            if ext == "tensors" {
                // Same data version as the reference would choose (encryption dropped → 1, 2 or 4).
                let v = m.index().version;
                assert!((1..=4).contains(&v) && v != 3, "{file}: version {v}");
            }
        }
    }
}

#[test]
fn converted_files_can_be_encrypted_with_a_key_or_a_password() {
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let dir = tempfile::tempdir().unwrap();
    let file = "v2_opaque_dtypes.tensors";
    let entry = manifest()["files"][file].clone();
    let be = MemoryBackend::new("in", std::fs::read(fixtures().join(file)).unwrap());
    for (i, key) in [
        KeySource::Key([9u8; 32]),
        KeySource::password(b"hunter2").unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("enc{i}.tensors"));
        let opts = ConvertOptions {
            encrypt: Some(key.clone()),
            pwhash_limits: (1, 8192),
            ..Default::default()
        };
        convert(&be, &out, &opts).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let m = load(
            bytes.clone(),
            &ReadOptions {
                verify: true,
                key: Some(key),
            },
            Layout::Packed { align: 256 },
        )
        .unwrap();
        check_against_manifest(file, &entry, &m);
        assert_eq!(m.index().version, 3);
        let e = err(load(
            bytes,
            &ReadOptions {
                verify: true,
                key: Some(KeySource::Key([1u8; 32])),
            },
            Layout::Mirror,
        ));
        assert!(
            matches!(
                e.kind(),
                ErrorKind::IntegrityMismatch | ErrorKind::InvalidInput
            ),
            "{e}"
        );
    }
}

/// Byte positions of `bytes` outside every tensor's data that hold structure: the file header,
/// the index entries and the per-tensor headers (runs of zeros far from any other byte, such as
/// the reference writer's unused index reservation, are left out).
fn metadata_positions(bytes: &[u8]) -> Vec<usize> {
    let be = MemoryBackend::new("x", bytes.to_vec());
    let index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let in_data = |i: usize| index.tensors.iter().any(|t| t.range.contains(&(i as u64)));
    let near_nonzero = |i: usize| {
        let lo = i.saturating_sub(16);
        let hi = (i + 17).min(bytes.len());
        bytes[lo..hi].iter().any(|&b| b != 0)
    };
    (0..bytes.len())
        .filter(|&i| !in_data(i) && near_nonzero(i))
        .collect()
}

/// The raw key of a fixture (derived once from its password, so that thousands of loads do not
/// each run Argon2id; `key_derivation_parameters_from_a_file_are_bounded` covers the stored
/// derivation parameters).
fn derived_key_for(bytes: &[u8], entry: &Value) -> Option<KeySource> {
    let key = key_for(entry)?;
    let KeySource::Password(pw) = &key else {
        return Some(key);
    };
    let be = MemoryBackend::new("x", bytes.to_vec());
    let index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let t = &index.tensors[0];
    let span = t.prefix.clone().unwrap();
    let hdr = &bytes[span.start as usize..span.end as usize];
    let h = tensorizer::header::parse(hdr, true, false).unwrap();
    let kdf = h.crypt.unwrap().kdf.unwrap();
    Some(KeySource::Key(
        tensorizer::crypt::derive_key(pw, &kdf).unwrap(),
    ))
}

/// Every single-byte corruption of a fixture's header, index and per-tensor headers, loaded with
/// verification: never a panic, and a load that succeeds gives exactly the reference's bytes,
/// dtype and shape for every tensor it names like the reference (a corrupted name may only make
/// a tensor unknown, never give it another tensor's or wrong bytes).
#[test]
fn every_corrupted_metadata_byte_fails_cleanly_or_loads_true_bytes() {
    let mut tried = 0usize;
    let mut failed = 0usize;
    let mut wrong = Vec::new();
    for (file, entry) in tensorizer_entries() {
        let bytes = std::fs::read(fixtures().join(&file)).unwrap();
        let opts = ReadOptions {
            verify: true,
            key: derived_key_for(&bytes, &entry),
        };
        let want: Vec<(String, &Value)> = entry["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (display_name(t["name"].as_str().unwrap()), t))
            .collect();
        let positions = metadata_positions(&bytes);
        for at in positions {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                tried += 1;
                let r = std::panic::catch_unwind(|| load(b, &opts, Layout::Mirror));
                let m = match r {
                    Err(_) => panic!("{file}: byte {at} ^ {flip:#x} panicked"),
                    Ok(Err(e)) => {
                        failed += 1;
                        assert!(
                            !e.to_string().contains("panick"),
                            "{file}: byte {at} ^ {flip:#x}: {e}"
                        );
                        continue;
                    }
                    Ok(Ok(m)) => m,
                };
                for (name, t) in &want {
                    let Some(v) = m.get(name) else { continue };
                    let ctx = format!("{file}: byte {at} ^ {flip:#x} loaded {name}");
                    if v.data.len() as u64 != t["nbytes"].as_u64().unwrap() {
                        wrong.push(format!("{ctx}: {} bytes", v.data.len()));
                    } else if hex(&Sha256::digest(v.data)) != t["sha256"].as_str().unwrap() {
                        wrong.push(format!("{ctx}: wrong bytes"));
                    }
                    if v.shape != &manifest_shape(t)[..] {
                        wrong.push(format!("{ctx}: wrong shape {:?}", v.shape));
                    }
                    if v.dtype.name() != manifest_dtype(t) {
                        wrong.push(format!("{ctx}: wrong dtype {}", v.dtype));
                    }
                }
            }
        }
    }
    eprintln!("{tried} corruptions, {failed} refused");
    assert!(
        wrong.is_empty(),
        "{} wrong loads:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        tried > 1000 && failed > tried / 2,
        "{tried} tried, {failed} refused"
    );
}

/// The two index corruptions the tensor hashes alone cannot see (the hashes cover the per-tensor
/// header and the data, not the index): a stored tensor's index length set to 0 (it would load as
/// zeros) and a dtype swapped for another of the same size. The first is refused in every case:
/// before data version 4 no tensor may be stored without data, and from version 4 a meta
/// tensor's per-tensor header (which still gives the real length) is always checked. The second
/// is refused with verification, naming the tensor; without it the index is trusted.
#[test]
fn verification_checks_the_index_against_the_per_tensor_headers() {
    let file = "v1_numpy_dtypes.tensors";
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let be = MemoryBackend::new("x", bytes.clone());
    let index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let t = index.get("layer.0.b").unwrap();
    assert_eq!((t.dtype, t.shape.len()), (DType::F32, 1));
    // The index entry: name, u8 type, u8 dtype len, "<f4", u8 ndim, u32 dim, u64 header offset,
    // u64 data offset, u64 data length.
    let name_at = bytes.windows(9).position(|w| w == b"layer.0.b").unwrap();
    let dtype_at = name_at + 9 + 2;
    assert_eq!(&bytes[dtype_at..dtype_at + 3], b"<f4");
    let len_at = dtype_at + 3 + 1 + 4 + 16;
    assert_eq!(
        u64::from_le_bytes(bytes[len_at..len_at + 8].try_into().unwrap()),
        t.range.end - t.range.start
    );
    let verify = ReadOptions {
        verify: true,
        key: None,
    };

    // The index length at `at` set to 0: refused with and without verification, naming the
    // tensor and why.
    let refused_as_meta = |file: &[u8], at: usize, tensor: &str, why: &str| {
        let mut as_meta = file.to_vec();
        as_meta[at..at + 8].fill(0);
        for opts in [&ReadOptions::default(), &verify] {
            let e = err(load(as_meta.clone(), opts, Layout::Mirror));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains(tensor), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
    };
    refused_as_meta(&bytes, len_at, "layer.0.b", "from data version 4");
    // The same in a version-4 file (where meta tensors exist): its header gives it away.
    let v4 = std::fs::read(fixtures().join("v4_module_with_meta.tensors")).unwrap();
    let v4_name = v4.windows(8).position(|w| w == b"lin.bias").unwrap();
    let v4_dtype = v4_name + 8 + 2;
    assert_eq!(&v4[v4_dtype..v4_dtype + 3], b"<f4");
    let v4_len = v4_dtype + 3 + 1 + 4 + 16;
    assert_eq!(
        u64::from_le_bytes(v4[v4_len..v4_len + 8].try_into().unwrap()),
        32
    );
    refused_as_meta(&v4, v4_len, "lin.bias", "disagrees with the index");
    let m = load(v4, &ReadOptions::default(), Layout::Mirror).unwrap();
    assert_eq!(m.get("lin.bias").unwrap().data.len(), 32);

    let mut retyped = bytes.clone();
    retyped[dtype_at..dtype_at + 3].copy_from_slice(b"<i4");
    let m = load(retyped.clone(), &ReadOptions::default(), Layout::Mirror).unwrap();
    assert_eq!(m.get("layer.0.b").unwrap().dtype, DType::I32);
    let e = err(load(retyped, &verify, Layout::Mirror));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("layer.0.b") && e.to_string().contains("i32"),
        "{e}"
    );
}

/// `convert` writes through a temporary file next to the output: on success the output has the
/// permissions a plain `File::create` would give (not the temp file's 0600); when the final
/// rename fails (the output path is a directory) or the input is bad, no temporary file stays.
#[test]
fn convert_leaves_no_temporary_file_and_normal_permissions() {
    use std::os::unix::fs::PermissionsExt;
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(fixtures().join("mixed.safetensors")).unwrap();
    let be = MemoryBackend::new("mixed.safetensors", src.clone());
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    let out = dir.path().join("ok.tensors");
    convert(&be, &out, &ConvertOptions::default()).unwrap();
    let reference = dir.path().join("reference");
    std::fs::File::create(&reference).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), mode(&reference));
    std::fs::remove_file(&reference).unwrap();
    assert_eq!(listing(), vec!["ok.tensors".to_string()]);

    let blocked = dir.path().join("blocked.tensors");
    std::fs::create_dir(&blocked).unwrap();
    let e = convert(&be, &blocked, &ConvertOptions::default()).unwrap_err();
    assert!(e.to_string().contains("blocked.tensors"), "{e}");
    assert_eq!(listing(), vec!["blocked.tensors", "ok.tensors"]);

    let bad = MemoryBackend::new("bad.safetensors", src[..src.len() - 10].to_vec());
    assert!(convert(
        &bad,
        &dir.path().join("bad.tensors"),
        &ConvertOptions::default()
    )
    .is_err());
    assert_eq!(listing(), vec!["blocked.tensors", "ok.tensors"]);
}

/// Several inputs into one output: a part whose object changed between the header being
/// written and its turn (other tensors) fails the conversion with `ObjectChanged`, naming the
/// part, and leaves no output or temporary file.
#[test]
fn convert_parts_refuses_a_part_that_changed() {
    use std::sync::Arc;
    use tensorstream_engine::format::convert::{
        convert_parts, ConvertOptions, ConvertPart, PartBackend,
    };
    use tensorstream_engine::{Backend, BackendExt};
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = tensorstream_engine::testkit::u8_model(&[10, 20], 1);
    let (b, _) = tensorstream_engine::testkit::u8_model(&[30], 2);
    let (c, _) = tensorstream_engine::testkit::u8_model(&[30, 5], 3);
    let index_of = |bytes: &[u8]| {
        let be = MemoryBackend::new("mem://x", bytes.to_vec());
        let meta = be.stat().unwrap();
        tensorstream_engine::format::read_index(&be, &meta).unwrap()
    };
    // Two parts with distinct names: rename the second file's tensor.
    let mut ib = index_of(&b);
    ib.tensors[0].name = "second".into();
    let part = |loc: &str, bytes: Vec<u8>, declared, opened: tensorstream_engine::TensorIndex| {
        ConvertPart {
            location: loc.to_string(),
            index: declared,
            open: Box::new(move || {
                let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem://p", bytes));
                let meta = be.stat()?;
                Ok((PartBackend::Owned(be, meta), opened, None))
            }),
        }
    };
    // Both parts as declared: one output with all three tensors.
    let out = dir.path().join("joined.safetensors");
    let st = convert_parts(
        vec![
            part("mem://a", a.clone(), index_of(&a), index_of(&a)),
            part("mem://b", b.clone(), ib.clone(), ib.clone()),
        ],
        &out,
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(st.tensors, 3);
    let be = MemoryBackend::new("mem://out", std::fs::read(&out).unwrap());
    let meta = be.stat().unwrap();
    let joined = tensorstream_engine::format::read_index(&be, &meta).unwrap();
    let names: Vec<&str> = joined.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t000", "t001", "second"]);
    let second = &joined.tensors[2];
    let bytes = be
        .read_exact_at(second.range.start, second.nbytes() as usize)
        .unwrap();
    assert_eq!(bytes, &b[b.len() - 30..]);
    // A part that changed before its turn: ObjectChanged naming it, no output, no leftovers.
    let changed = |parts, name: &str| {
        let out = dir.path().join(name);
        let e = convert_parts(parts, &out, &ConvertOptions::default()).unwrap_err();
        assert_eq!(
            e.kind(),
            tensorstream_engine::ErrorKind::ObjectChanged,
            "{e}"
        );
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only joined.safetensors"
        );
        e
    };
    // … the second part now holds other tensors;
    let mut ic = index_of(&c);
    ic.tensors[0].name = "second".into();
    let e = changed(
        vec![
            part("mem://a", a.clone(), index_of(&a), index_of(&a)),
            part("mem://b", c, ib.clone(), ic),
        ],
        "changed.safetensors",
    );
    assert_eq!(e.location(), Some("mem://b"));
    // … same names, dtypes and shapes, but a stored tensor became a meta (zeros) one.
    let mut meta = index_of(&a);
    meta.tensors[1].source = tensorstream_engine::TensorSource::Zeros;
    changed(
        vec![part("mem://a", a.clone(), index_of(&a), meta)],
        "meta.tensors",
    );
    // The same tensor name in two parts is refused before anything is written.
    let out = dir.path().join("dup.safetensors");
    let e = convert_parts(
        vec![
            part("mem://a", a.clone(), index_of(&a), index_of(&a)),
            part("mem://a2", a.clone(), index_of(&a), index_of(&a)),
        ],
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("written twice"), "{e}");
    assert!(!out.exists());
}

/// A backend whose object is overwritten (same size, new version) after `after` reads: what a
/// file rewritten in place, or an object replaced, looks like to a backend whose only change
/// detection is its `stat` version.
#[derive(Debug)]
struct Overwritten {
    old: Vec<u8>,
    new: Vec<u8>,
    after: usize,
    reads: std::sync::atomic::AtomicUsize,
}

impl Overwritten {
    fn changed(&self) -> bool {
        self.reads.load(std::sync::atomic::Ordering::SeqCst) >= self.after
    }
}

impl Backend for Overwritten {
    fn location(&self) -> &str {
        "mem://overwritten"
    }
    fn stat(&self) -> Result<ObjectMeta> {
        let now = if self.changed() { &self.new } else { &self.old };
        Ok(ObjectMeta {
            size: now.len() as u64,
            version: Some(if self.changed() { "v2" } else { "v1" }.into()),
        })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let src = if self.changed() { &self.new } else { &self.old };
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let start = (offset as usize).min(src.len());
        let n = buf.len().min(src.len() - start);
        buf[..n].copy_from_slice(&src[start..start + n]);
        Ok(n)
    }
}

/// An object overwritten while it is converted (noticed by no read, only by the final `stat`
/// that loads make too) fails the conversion with `ObjectChanged`, and no output is written:
/// the output would have mixed the two versions' bytes (with fresh hashes, for tensorizer).
#[test]
fn a_conversion_of_an_object_that_changed_meanwhile_fails_and_writes_nothing() {
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let (old, _) = tensorstream_engine::testkit::u8_model(&[3 << 20, 3 << 20, 3 << 20], 5);
    let (new, _) = tensorstream_engine::testkit::u8_model(&[3 << 20, 3 << 20, 3 << 20], 6);
    assert_eq!(old.len(), new.len());
    let dir = tempfile::tempdir().unwrap();
    for out in ["o.safetensors", "o.tensors"] {
        // Unchanged: the conversion succeeds (and its output holds the old bytes).
        let be = Overwritten {
            old: old.clone(),
            new: new.clone(),
            after: usize::MAX,
            reads: 0.into(),
        };
        let path = dir.path().join(out);
        convert(&be, &path, &ConvertOptions::default()).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Overwritten after the index and a little data were read.
        let be = Overwritten {
            after: 3,
            reads: 0.into(),
            ..be
        };
        let e = convert(&be, &path, &ConvertOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{out}: {e}");
        assert_eq!(e.location(), Some("mem://overwritten"), "{out}: {e}");
        assert!(!path.exists(), "{out}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{out}");
    }
}

/// Reads `read_index` makes of `bytes` (a conversion's or a load's first reads): an
/// [`Overwritten`] changed after that many reads is changed before any tensor is read.
fn index_reads(bytes: &[u8]) -> usize {
    let be = Overwritten {
        old: bytes.to_vec(),
        new: bytes.to_vec(),
        after: usize::MAX,
        reads: 0.into(),
    };
    let mut index = format::read_index(&be, &be.stat().unwrap()).unwrap();
    let ro = ReadOptions {
        verify: index.format == Format::Tensorizer,
        key: None,
    };
    tensorizer::prepare(&be, &mut index, &ro).unwrap();
    be.reads.load(std::sync::atomic::Ordering::SeqCst)
}

/// The three ways a rewrite in progress meets the reads of a conversion or a load: a
/// tensorizer file whose last tensor is half rewritten (its bytes fail their checksum), and a
/// tensorizer or safetensors file cut short (as a writer that truncates first leaves it, the
/// reads find it ending early). Each as (name, bytes before, bytes seen after the change).
fn rewrites_in_progress() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let (st, _) = tensorstream_engine::testkit::u8_model(&[3 << 20, 3 << 20, 3 << 20], 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.tensors");
    convert(
        &MemoryBackend::new("mem://m", st.clone()),
        &path,
        &ConvertOptions::default(),
    )
    .unwrap();
    let tz = std::fs::read(&path).unwrap();
    let mut torn = tz.clone();
    let n = torn.len();
    torn[n - (1 << 20)..].iter_mut().for_each(|b| *b ^= 0x5a);
    let cut = |b: &[u8]| b[..b.len() - (1 << 20)].to_vec();
    vec![
        ("tensorizer, half rewritten", tz.clone(), torn),
        ("tensorizer, cut short", tz.clone(), cut(&tz)),
        ("safetensors, cut short", st.clone(), cut(&st)),
    ]
}

/// An object rewritten while it is converted, whose new bytes a read meets before the final
/// check (a tensor half written, a file cut short): the conversion reports the change
/// (`ObjectChanged`), not a corrupt input (a checksum mismatch, an object that "ended at" an
/// offset it does not end at), and writes nothing.
#[test]
fn a_conversion_that_meets_a_rewrite_in_progress_reports_the_change() {
    use tensorstream_engine::format::convert::{convert, ConvertOptions};
    let dir = tempfile::tempdir().unwrap();
    for (what, old, new) in rewrites_in_progress() {
        let after = index_reads(&old);
        for out in ["o.safetensors", "o.tensors"] {
            let be = Overwritten {
                old: old.clone(),
                new: new.clone(),
                after,
                reads: 0.into(),
            };
            let path = dir.path().join(out);
            let e = convert(&be, &path, &ConvertOptions::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{what} → {out}: {e}");
            assert_eq!(
                e.location(),
                Some("mem://overwritten"),
                "{what} → {out}: {e}"
            );
            assert!(!path.exists(), "{what} → {out}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}

/// The same for a load (verifying a tensorizer file's hashes): the change, not a corrupt file,
/// is what fails it.
#[test]
fn a_load_that_meets_a_rewrite_in_progress_reports_the_change() {
    for (what, old, new) in rewrites_in_progress() {
        let be = Arc::new(Overwritten {
            after: index_reads(&old),
            old,
            new,
            reads: 0.into(),
        });
        let ro = ReadOptions {
            verify: what.starts_with("tensorizer"),
            key: None,
        };
        let e = err(load_from(be, &ro, Layout::Mirror));
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{what}: {e}");
    }
}
