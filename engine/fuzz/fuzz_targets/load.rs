//! A whole host load of arbitrary bytes through the public `Loader`: format detection, the
//! parsers, the planner, the engine and the tensorizer checks (per-tensor headers; hashes with
//! `verify`; MACs and decryption with a key) together. Never panics; a load that succeeds gives
//! every selected tensor exactly its declared size, and `check_data` (which reads and checks
//! the same bytes, keeping none) succeeds exactly when it does.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tensorstream::engine::dtype::numel;
use tensorstream::engine::MemoryBackend;
use tensorstream::{KeySource, Loader};

fuzz_target!(|input: (u8, &[u8])| {
    let (mode, bytes) = input;
    let backend = Arc::new(MemoryBackend::new("fuzz.bin", bytes.to_vec()));
    let mut l = Loader::from_backend(backend).verify_hashes(mode & 1 != 0);
    if mode & 2 != 0 {
        // The key scripts/fuzz.sh encrypts its seeds with.
        l = l.key(KeySource::Key([7; 32]));
    }
    if mode & 4 != 0 {
        l = l.chunk_size(4096).queue_depth(2);
    }
    if mode & 8 != 0 {
        l = l.filter(|t| t.name.len() % 2 == 0);
    }
    let loaded = l.load();
    if let Ok(m) = &loaded {
        for t in m.tensors() {
            let n = numel(t.shape).expect("a loaded tensor's shape has a size");
            assert_eq!(
                t.dtype.byte_len(n),
                Some(t.data.len() as u64),
                "tensor {}",
                t.name
            );
        }
    }
    // Both fail or both succeed (a file with several faults may fail each at another one).
    let checked = l.check_data();
    assert_eq!(
        loaded.is_ok(),
        checked.is_ok(),
        "load: {:?}\ncheck_data: {:?}",
        loaded.as_ref().err(),
        checked.as_ref().err()
    );
});
