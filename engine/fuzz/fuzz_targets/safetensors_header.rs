//! `parse_prefix` on arbitrary bytes and an arbitrary object size: never panics, and an index it
//! returns is consistent (ranges sorted, disjoint, after the header, inside the object, sized by
//! shape × dtype).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream_engine::dtype::numel;
use tensorstream_engine::format::{parse_prefix, Probe};

fuzz_target!(|input: (u64, &[u8])| {
    let (extra, bytes) = input;
    if bytes.starts_with(b"|TZR|") {
        return; // the tensorizer parser: its own target (tensorizer_index)
    }
    // Mostly the prefix is the whole object; sometimes the object is longer (or absurd).
    let size = match extra % 4 {
        0 | 1 => bytes.len() as u64,
        2 => (bytes.len() as u64).saturating_add(extra >> 2),
        _ => extra,
    };
    match parse_prefix(bytes, size) {
        Ok(Probe::Index(idx)) => {
            assert_eq!(idx.object_size, size);
            let mut prev_end = idx.header_len;
            for t in &idx.tensors {
                assert!(t.range.start <= t.range.end, "{t:?}");
                assert!(t.range.end <= size, "{t:?}");
                let n = numel(&t.shape).expect("validated shape");
                assert_eq!(t.dtype.byte_len(n), Some(t.range.end - t.range.start));
                if !t.range.is_empty() {
                    assert!(
                        t.range.start >= prev_end,
                        "overlap or inside the header: {t:?}"
                    );
                    prev_end = t.range.end;
                }
                assert!(t.dtype.is_safetensors());
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
});
