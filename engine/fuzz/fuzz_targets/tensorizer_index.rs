//! The tensorizer parsers on arbitrary bytes: `format::parse_prefix` on a `|TZR|` file (the
//! fixed header, the index, names, dtypes, shapes), the per-tensor header parser and the name
//! decoder. Never panics, and an index it returns stays inside the object (every data range,
//! and every per-tensor header range, ordered and within `size`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream_engine::format::tensorizer::{header, index, MAGIC};
use tensorstream_engine::format::{parse_prefix, Probe};
use tensorstream_engine::TensorSource;

fuzz_target!(|input: (u8, u64, &[u8])| {
    let (mode, extra, rest) = input;
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(rest);
    let size = match extra % 4 {
        0 | 1 => bytes.len() as u64,
        2 => (bytes.len() as u64).saturating_add(extra >> 2),
        _ => extra,
    };
    match parse_prefix(&bytes, size) {
        Ok(Probe::Index(idx)) => {
            assert_eq!(idx.object_size, size);
            for t in &idx.tensors {
                assert!(t.range.start <= t.range.end && t.range.end <= size, "{t:?}");
                if let Some(p) = &t.prefix {
                    assert!(p.start <= p.end && p.end <= size, "{t:?}");
                    if t.source == TensorSource::Stored && !t.range.is_empty() {
                        assert!(p.end <= t.range.start, "header after its data: {t:?}");
                    }
                }
                let _ = t.nbytes();
            }
        }
        Ok(Probe::NeedPrefix(n)) => {
            assert!(
                n > bytes.len() as u64 && n <= size,
                "asks for {n} of {size}"
            );
        }
        Err(_) => {}
    }
    let _ = header::parse(rest, mode & 1 == 1, mode & 2 == 2);
    let _ = index::decode_name(rest);
});
