//! Writes sharded safetensors checkpoints (Hugging Face layout) for the tests.

#![allow(dead_code)] // each test crate uses part of it

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use tensorstream_engine::DType;

/// One tensor of a written checkpoint.
#[derive(Debug, Clone)]
pub struct Written {
    pub name: String,
    /// The shard file it is in.
    pub file: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The name of shard `k` of `n` (1-based), as `transformers` writes it.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Writes one safetensors file holding `tensors` (name, bytes; u8 vectors).
pub fn write_file(path: &Path, tensors: &[(String, Vec<u8>)]) {
    let header: Vec<(String, DType, Vec<u64>, u64)> = tensors
        .iter()
        .map(|(n, b)| (n.clone(), DType::U8, vec![b.len() as u64], b.len() as u64))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut file = tensorstream_engine::format::safetensors::write_header(&header, &meta).unwrap();
    for (_, b) in tensors {
        file.extend_from_slice(b);
    }
    std::fs::write(path, file).unwrap();
}

/// Writes a checkpoint into `dir`: shard k holds `shards[k].len()` u8 tensors of those sizes,
/// named `layers.{k}.w{j}`, plus `model.safetensors.index.json` mapping every one. Returns the
/// tensors in shard order.
pub fn write(dir: &Path, shards: &[&[usize]], seed: u64) -> Vec<Written> {
    std::fs::create_dir_all(dir).unwrap();
    let n = shards.len();
    let mut all = Vec::new();
    for (k, sizes) in shards.iter().enumerate() {
        let file = shard_name(k + 1, n);
        let tensors: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .enumerate()
            .map(|(j, &len)| {
                let seed = seed.wrapping_add((k * 1000 + j) as u64);
                (
                    format!("layers.{k}.w{j}"),
                    tensorstream_engine::testkit::pattern(len, seed),
                )
            })
            .collect();
        write_file(&dir.join(&file), &tensors);
        for (name, bytes) in tensors {
            all.push(Written {
                sha256: hex(&Sha256::digest(&bytes)),
                name,
                file: file.clone(),
                bytes,
            });
        }
    }
    write_index(dir, "model.safetensors.index.json", &all);
    all
}

/// Writes an index mapping each tensor of `tensors` to its file.
pub fn write_index(dir: &Path, name: &str, tensors: &[Written]) {
    let map: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .map(|t| (t.name.clone(), serde_json::Value::String(t.file.clone())))
        .collect();
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
}

/// Writes a checkpoint of three shards into `dir` whose third, a tensorizer file, holds a
/// meta tensor (`layers.2.w1`, 64 zero bytes: stored as its per-tensor header only) whose
/// per-tensor header names another tensor: a corruption only that header shows. The first
/// shard is over 16 MiB (so that a host load runs two shards at a time, the third starting
/// once one of the first two has loaded). Returns the corrupted shard's file name.
pub fn write_corrupt_meta_header(dir: &Path) -> String {
    use tensorstream_engine::format::tensorizer::{Serializer, SerializerOptions, TensorSpec};
    std::fs::create_dir_all(dir).unwrap();
    let pattern = tensorstream_engine::testkit::pattern;
    let mut all = Vec::new();
    for (k, (name, len)) in [("layers.0.w0", 17 << 20), ("layers.1.w0", 4096)]
        .into_iter()
        .enumerate()
    {
        let file = shard_name(k + 1, 3);
        let bytes = pattern(len, k as u64);
        write_file(&dir.join(&file), &[(name.to_string(), bytes.clone())]);
        all.push(Written {
            sha256: hex(&Sha256::digest(&bytes)),
            name: name.into(),
            file,
            bytes,
        });
    }
    let bad = "model-00003-of-00003.tensors".to_string();
    let spec = |name: &str, len: u64, meta: bool| TensorSpec {
        name: name.into(),
        path: None,
        dtype: DType::U8,
        shape: vec![len],
        meta,
        role: None,
    };
    let specs = [
        spec("layers.2.w0", 100, false),
        spec("layers.2.w1", 64, true),
    ];
    let stored = pattern(100, 2);
    let mut s = Serializer::new(
        std::io::Cursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    s.write_tensor(&stored).unwrap();
    s.write_tensor(&[]).unwrap();
    let mut bytes = s.finish().unwrap().into_inner();
    for (name, b) in [("layers.2.w0", stored), ("layers.2.w1", vec![0u8; 64])] {
        all.push(Written {
            sha256: hex(&Sha256::digest(&b)),
            name: name.into(),
            file: bad.clone(),
            bytes: b,
        });
    }
    write_index(dir, "model.safetensors.index.json", &all);
    // The name's second occurrence is in the meta tensor's per-tensor header (the first is
    // in the index).
    let at = bytes
        .windows(11)
        .enumerate()
        .filter(|(_, w)| *w == b"layers.2.w1")
        .map(|(i, _)| i)
        .nth(1)
        .expect("layers.2.w1's per-tensor header");
    bytes[at + 10] = b'0'; // it now names layers.2.w0
    std::fs::write(dir.join(&bad), bytes).unwrap();
    bad
}
