//! Conversion of arbitrary bytes (safetensors ⇄ tensorizer, plain or encrypted) through the
//! public `Loader`: never panics, and whatever converts loads back with the same tensors —
//! names, dtypes, shapes and bytes — as loading the input directly gives.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tensorstream::engine::{DType, MemoryBackend};
use tensorstream::{KeySource, LoadedModel, Loader};

type Tensors = BTreeMap<String, (DType, Vec<u64>, Vec<u8>)>;

fn tensors(m: &LoadedModel) -> Tensors {
    m.tensors()
        .map(|t| {
            let v = (t.dtype, t.shape.to_vec(), t.data.to_vec());
            (t.name.to_string(), v)
        })
        .collect()
}

fuzz_target!(|input: (u8, &[u8])| {
    let (mode, bytes) = input;
    let key = KeySource::Key([7; 32]);
    let backend = Arc::new(MemoryBackend::new("fuzz.bin", bytes.to_vec()));
    let mut src = Loader::from_backend(backend).verify_hashes(mode & 1 != 0);
    if mode & 2 != 0 {
        src = src.key(key.clone());
    }
    let Ok(direct) = src.load() else { return };
    let dir = tempfile::tempdir().expect("temporary directory");
    let (name, encrypt) = match mode >> 2 & 3 {
        0 => ("out.safetensors", None),
        1 => ("out.tensors", None),
        _ => ("out.tensors", Some(key.clone())),
    };
    let out = dir.path().join(name);
    let encrypted = encrypt.is_some();
    if src.convert(&out, encrypt).is_err() {
        // Some inputs have no form in the other format (a tensorizer dtype safetensors lacks).
        return;
    }
    let mut back = Loader::new(out.display().to_string()).verify_hashes(name.ends_with(".tensors"));
    if encrypted {
        back = back.key(key);
    }
    let again = back
        .load()
        .unwrap_or_else(|e| panic!("the converted file does not load: {e}"));
    assert_eq!(tensors(&direct), tensors(&again));
});
