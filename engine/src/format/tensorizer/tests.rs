//! Unit tests of the tensorizer reader and writer: hostile files, codecs, writer features.

use std::io::Cursor as IoCursor;

use serde_json::Value;

use super::index::{
    decode_name, dtype_from_tensorizer, dtype_to_tensorizer, encode_name, INDEX_START,
};
use super::*;
use crate::backend::MemoryBackend;
use crate::dtype::DType;
use crate::error::ErrorKind;
use crate::format::{read_index, Probe};
use crate::index::TensorSource;
use crate::Backend;

fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        path: None,
        dtype,
        shape: shape.to_vec(),
        meta: false,
        role: None,
    }
}

/// A small valid file: two f32 tensors of 4 and 8 elements.
fn sample() -> Vec<u8> {
    let specs = [spec("a", DType::F32, &[4]), spec("b", DType::F32, &[2, 4])];
    let mut s = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    s.write_tensor(&[1u8; 16]).unwrap();
    s.write_tensor(&[2u8; 32]).unwrap();
    s.finish().unwrap().into_inner()
}

fn index_of(bytes: &[u8]) -> crate::Result<crate::TensorIndex> {
    let be = MemoryBackend::new("t.tensors", bytes.to_vec());
    read_index(&be, &be.stat()?)
}

fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn expect_err(bytes: &[u8], kind: ErrorKind, needle: &str) {
    match index_of(bytes) {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
        }
    }
}

#[test]
fn sample_parses_with_exact_index() {
    let b = sample();
    let idx = index_of(&b).unwrap();
    assert_eq!(idx.version, 1);
    assert_eq!(idx.tensors.len(), 2);
    let a = idx.get("a").unwrap();
    assert_eq!(a.dtype, DType::F32);
    assert_eq!(&b[a.range.start as usize..a.range.end as usize], &[1u8; 16]);
    // The index holds exactly the two entries: no 256 KiB reservation.
    assert!(idx.header_len < 200, "{}", idx.header_len);
    assert_eq!(&b[b.len() - 8..], &[0u8; 8], "end marker");
}

#[test]
fn hostile_headers_and_indexes_fail_clearly() {
    let good = sample();
    // Wrong magic.
    let mut b = good.clone();
    b[3] = b'X';
    expect_err(&b, ErrorKind::Corrupt, "magic");
    // Unknown and invalid versions.
    let mut b = good.clone();
    b[5..9].copy_from_slice(&6u32.to_le_bytes());
    expect_err(&b, ErrorKind::Unsupported, "data version 6");
    b[5..9].copy_from_slice(&0u32.to_le_bytes());
    expect_err(&b, ErrorKind::Corrupt, "version 0");
    // Unknown feature flag (bit 2) in a v4 file; versioned flag before v5.
    let mut b = good.clone();
    b[5..9].copy_from_slice(&4u32.to_le_bytes());
    b[9] = 4;
    expect_err(&b, ErrorKind::Unsupported, "feature flags");
    b[9] = 2;
    expect_err(&b, ErrorKind::Corrupt, "versioned_headers");
    // Index length past EOF.
    let mut b = good.clone();
    set_u64(&mut b, 65, 1 << 40);
    expect_err(&b, ErrorKind::Corrupt, "runs past the end of the file");
    // Truncated index: the stored length is too short for its entries.
    let mut b = good.clone();
    set_u64(&mut b, 65, 40);
    expect_err(&b, ErrorKind::Corrupt, "truncated");
    // More tensors than the index can hold.
    let mut b = good.clone();
    set_u64(&mut b, 57, 1_000_000);
    expect_err(&b, ErrorKind::Corrupt, "cannot fit");
    // File cut short: data offsets past EOF.
    let idx = index_of(&good).unwrap();
    let cut = idx.get("b").unwrap().range.start as usize + 3;
    expect_err(&good[..cut], ErrorKind::Corrupt, "past the end of the file");
    // File shorter than the fixed header.
    expect_err(&good[..40], ErrorKind::Corrupt, "too short");
    // A data length that disagrees with shape × dtype.
    let mut b = good.clone();
    let entry_a_len_at = INDEX_START as usize + 2 + 1 + 1 + 1 + 3 + 1 + 4 + 16;
    set_u64(&mut b, entry_a_len_at, 12);
    expect_err(&b, ErrorKind::Corrupt, "needs 16 bytes");
    // Data placed 1 TiB after its per-tensor header (a header nobody could hold in memory to
    // verify): refused whatever the file's size.
    let mut b = good.clone();
    let hdr_at = entry_a_len_at - 16;
    let hdr = u64::from_le_bytes(b[hdr_at..hdr_at + 8].try_into().unwrap());
    set_u64(&mut b, hdr_at + 8, hdr + (1 << 40));
    expect_err(
        &b,
        ErrorKind::Corrupt,
        "per-tensor header of 1099511627776 bytes",
    );
}

/// A header claiming more than `MAX_TENSORS` tensors is refused from the fixed header alone,
/// before its index (here 61 MB; up to 1 GiB) is read or parsed; at the limit, the index is
/// asked for as usual.
#[test]
fn a_tensor_count_over_the_limit_is_refused_before_the_index_is_read() {
    use super::index::{parse_prefix, MAX_TENSORS};
    let mut b = sample();
    b.truncate(INDEX_START as usize);
    for (count, refused) in [(MAX_TENSORS + 1, true), (MAX_TENSORS, false)] {
        set_u64(&mut b, 57, count);
        // The smallest entries (29 bytes) that many: an index that could hold them.
        let index_len = count * 29;
        set_u64(&mut b, 65, index_len);
        let size = INDEX_START + index_len + 8;
        match parse_prefix(&b, size) {
            Err(e) if refused => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(e.to_string().contains("tensors; more than 2097152"), "{e}");
            }
            Ok(Probe::NeedPrefix(n)) if !refused => assert_eq!(n, INDEX_START + index_len),
            Ok(Probe::NeedPrefix(n)) => panic!("{count} tensors: asked for a {n}-byte prefix"),
            Ok(Probe::Index(_)) => panic!("{count} tensors: parsed without an index"),
            Err(e) => panic!("{count} tensors: {e}"),
        }
    }
    // The writer does not make files readers refuse.
    let specs = vec![spec("a", DType::U8, &[0]); MAX_TENSORS as usize + 1];
    let e = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .err()
    .expect("too many tensors to write");
    assert!(e.to_string().contains("at most 2097152"), "{e}");
}

#[test]
fn probe_asks_for_exactly_the_stored_index_length() {
    let mut b = sample();
    // Pretend the index is 300 KiB (beyond the reference's 256 KiB) by padding it.
    let idx_len = u64::from_le_bytes(b[65..73].try_into().unwrap());
    let pad = 300 * 1024 - idx_len as usize;
    let at = (INDEX_START + idx_len) as usize;
    b.splice(at..at, std::iter::repeat_n(0u8, pad));
    set_u64(&mut b, 65, 300 * 1024);
    match parse_prefix(&b[..100], b.len() as u64).unwrap() {
        Probe::NeedPrefix(n) => assert_eq!(n, INDEX_START + 300 * 1024),
        Probe::Index(_) => panic!("index cannot be complete in 100 bytes"),
    }
}

#[test]
fn per_tensor_header_size_must_agree_with_the_index() {
    let b = sample();
    let idx = index_of(&b).unwrap();
    let a = idx.get("a").unwrap().clone();
    let p = a.prefix.clone().unwrap();
    let mut hdr = b[p.start as usize..a.range.end as usize].to_vec();
    let h = hook::TensorizerHook::new(&idx, true, None).unwrap();
    use crate::sink::TensorHook;
    let ai = idx.tensors.iter().position(|t| t.name == "a").unwrap();
    let ds = (a.range.start - p.start) as usize;
    h.process(ai, &mut hdr.clone(), ds).unwrap();
    set_u64(&mut hdr, 0, 9999);
    let e = h.process(ai, &mut hdr, ds).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("says it is 9999 bytes"), "{e}");
}

#[test]
fn dtypes_round_trip_and_reject_unknowns() {
    for d in DType::ALL {
        match dtype_to_tensorizer(d) {
            Ok(s) => assert_eq!(dtype_from_tensorizer(s).unwrap(), d, "{s:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported),
        }
    }
    assert_eq!(dtype_from_tensorizer("<c8").unwrap(), DType::C64);
    assert_eq!(dtype_from_tensorizer("<c16").unwrap(), DType::C128);
    assert_eq!(
        dtype_from_tensorizer("<V2\0torch.bfloat16").unwrap(),
        DType::BF16
    );
    // A storage size whose bit count overflows must not wrap around to a matching width
    // (2^61 + 2 bytes × 8 = 16 bits modulo 2^64).
    let e = dtype_from_tensorizer("<V2305843009213693954\0torch.bfloat16").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(dtype_from_tensorizer(">f4")
        .unwrap_err()
        .to_string()
        .contains("big-endian"));
    assert!(dtype_from_tensorizer("|V1\0torch.bfloat16").is_err());
    assert!(dtype_from_tensorizer("<V2\0torch.quint8").is_err());
    assert!(dtype_from_tensorizer("<V2\0a\0b").is_err());
}

#[test]
fn names_round_trip_like_the_reference() {
    let path = vec![
        Value::from("model"),
        Value::from(3),
        Value::from("w\u{e9}\"\u{1F600}"),
    ];
    let raw = encode_name("ignored", Some(&path)).unwrap();
    assert_eq!(
        raw,
        b"\x1e[\"model\",3,\"w\\u00e9\\\"\\ud83d\\ude00\"]".to_vec()
    );
    let (display, p) = decode_name(&raw).unwrap();
    assert_eq!(display, "model.3.w\u{e9}\"\u{1F600}");
    assert_eq!(p.unwrap(), path);
    assert_eq!(
        encode_name("x", Some(&[Value::from("solo")])).unwrap(),
        b"solo"
    );
    assert_eq!(decode_name(b"plain.name").unwrap().0, "plain.name");
    for bad in [
        &b"\x1e{}"[..],
        b"\x1e[1.5]",
        b"\x1e[-1]",
        b"\x1e[]",
        b"\x1e[\"a\"\n]",
        b"",
        b"\xff",
    ] {
        assert!(decode_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn writer_picks_the_reference_data_version() {
    let cases: Vec<(Vec<TensorSpec>, u32)> = vec![
        (vec![spec("a", DType::F16, &[2])], 1),
        (vec![spec("a", DType::BF16, &[2])], 2),
        (
            vec![TensorSpec {
                meta: true,
                role: None,
                ..spec("m", DType::F32, &[3])
            }],
            4,
        ),
    ];
    for (specs, want) in cases {
        let s = Serializer::new(
            IoCursor::new(Vec::new()),
            &specs,
            &SerializerOptions::default(),
        )
        .unwrap();
        assert_eq!(s.version(), want);
    }
    // Long dimensions (a meta tensor, so no data): v5 with versioned index entries.
    let specs = vec![
        spec("small", DType::U8, &[3]),
        TensorSpec {
            meta: true,
            role: None,
            ..spec("huge", DType::U8, &[1 << 32, 2])
        },
    ];
    let mut s = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.version(), 5);
    // A meta tensor whose size overflows is refused like a stored one (a reader could not
    // size its zeros).
    let overflowing = [TensorSpec {
        meta: true,
        role: None,
        ..spec("m", DType::F32, &[u64::MAX, 2])
    }];
    let e = Serializer::new(
        IoCursor::new(Vec::new()),
        &overflowing,
        &SerializerOptions::default(),
    )
    .err()
    .expect("an overflowing meta tensor must be refused");
    assert!(e.to_string().contains("overflows"), "{e}");
    s.write_tensor(&[1, 2, 3]).unwrap();
    s.write_tensor(&[]).unwrap();
    let b = s.finish().unwrap().into_inner();
    let idx = index_of(&b).unwrap();
    assert_eq!(idx.version, 5);
    let h = idx.get("huge").unwrap();
    assert_eq!(h.shape, vec![1 << 32, 2]);
    assert_eq!(h.source, TensorSource::Zeros);
    assert_eq!(h.nbytes(), 1 << 33);
    // Verification of the small tensor through the hook (u32 dims next to a long entry).
    let small = idx.get("small").unwrap();
    let p = small.prefix.clone().unwrap();
    let mut bytes = b[p.start as usize..small.range.end as usize].to_vec();
    let hk = hook::TensorizerHook::new(&idx, true, None).unwrap();
    use crate::sink::TensorHook;
    let si = idx.tensors.iter().position(|t| t.name == "small").unwrap();
    hk.process(si, &mut bytes, (small.range.start - p.start) as usize)
        .unwrap();
}

#[test]
fn writer_rejects_misuse() {
    let specs = [spec("a", DType::U8, &[4])];
    let mut s = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    assert!(s.write_tensor(&[1, 2]).is_err());
    let short: &mut dyn std::io::Read = &mut &[1u8, 2][..];
    assert!(s.write_tensor_from(short).is_err());
    let s = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    assert!(s.finish().is_err());
    let dup = [spec("a", DType::U8, &[1]), spec("a", DType::U8, &[1])];
    assert!(Serializer::new(
        IoCursor::new(Vec::new()),
        &dup,
        &SerializerOptions::default()
    )
    .is_err());
    let f4 = [spec("a", DType::F4, &[2])];
    assert!(Serializer::new(
        IoCursor::new(Vec::new()),
        &f4,
        &SerializerOptions::default()
    )
    .is_err());
}

#[test]
fn key_files_and_nonces() {
    assert!(matches!(
        KeySource::from_key_file(&[5u8; 32]).unwrap(),
        KeySource::Key(k) if k == [5u8; 32]
    ));
    let hexkey = "00ff".repeat(16) + "\n";
    match KeySource::from_key_file(hexkey.as_bytes()).unwrap() {
        KeySource::Key(k) => assert_eq!(&k[..2], &[0, 255]),
        _ => panic!(),
    }
    assert!(KeySource::from_key_file(b"short").is_err());
    assert!(KeySource::from_key_file("zz".repeat(32).as_bytes()).is_err());
    // 64 bytes that are not 64 ASCII hex digits: a multi-byte character where a digit pair
    // would be split, and sign characters, which integer parsing would accept.
    let split = format!("{}é{}", "a".repeat(61), "a");
    assert_eq!(split.len(), 64);
    let e = KeySource::from_key_file(split.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("hexadecimal"), "{e}");
    assert!(KeySource::from_key_file("+f".repeat(32).as_bytes()).is_err());
    match KeySource::from_key_file(format!("  {}\n", "0A".repeat(32)).as_bytes()).unwrap() {
        KeySource::Key(k) => assert_eq!(k, [10u8; 32]),
        _ => panic!("expected a key"),
    }
    assert!(KeySource::password(b"\n").is_err());
    let mut n = [0xffu8; 24];
    n[1] = 7;
    crypt::increment(&mut n);
    assert_eq!(&n[..3], &[0, 8, 0xff]);
}

#[test]
fn key_derivation_parameters_from_a_file_are_bounded() {
    let p = |opslimit: u64, memlimit: u64| crypt::PwHash {
        opslimit,
        memlimit,
        alg: crypt::ALG_ARGON2ID13,
        salt: vec![7; crypt::SALT_LEN],
    };
    // A corrupted opslimit (the reference's 3 with its top bit flipped) over the reference's
    // 256 MiB would run for days: refused at once, saying why.
    let e = crypt::derive_key(b"pw", &p(3 | 1 << 31, crypt::MEMLIMIT_MODERATE)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("passes over"), "{e}");
    for (ops, mem) in [
        (0, 8192),
        (1, 1024),
        (1, crypt::MAX_MEMLIMIT + 1),
        (u64::MAX, u64::MAX),
    ] {
        assert!(
            crypt::derive_key(b"pw", &p(ops, mem)).is_err(),
            "{ops} {mem}"
        );
    }
    // Small legitimate parameters still derive (deterministically).
    let a = crypt::derive_key(b"pw", &p(1, 8192)).unwrap();
    assert_eq!(a, crypt::derive_key(b"pw", &p(1, 8192)).unwrap());
    assert_ne!(a, crypt::derive_key(b"pw", &p(2, 8192)).unwrap());
}

#[test]
fn one_load_derives_a_bounded_number_of_password_keys() {
    let b = sample();
    let be = MemoryBackend::new("t.tensors", b);
    let index = read_index(&be, &be.stat().unwrap()).unwrap();
    let h = hook::TensorizerHook::new(&index, false, Some(KeySource::password(b"pw").unwrap()))
        .unwrap();
    let p = |salt: u8| crypt::PwHash {
        opslimit: 1,
        memlimit: 8192,
        alg: crypt::ALG_ARGON2ID13,
        salt: vec![salt; crypt::SALT_LEN],
    };
    for salt in 0..hook::MAX_DERIVATIONS as u8 {
        h.key_for("a", Some(&p(salt))).unwrap();
    }
    // Known parameters come from the cache; one more new salt is refused.
    h.key_for("a", Some(&p(0))).unwrap();
    let e = h
        .key_for("b", Some(&p(hook::MAX_DERIVATIONS as u8)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("\"b\""), "{e}");
}

#[test]
fn the_writer_refuses_names_that_would_not_read_back() {
    let new = |specs: &[TensorSpec]| {
        Serializer::new(
            IoCursor::new(Vec::new()),
            specs,
            &SerializerOptions::default(),
        )
        .err()
    };
    // Empty; a plain name starting with the json-seq marker (it would read back as x.1).
    for name in ["", "\u{1e}[\"x\",1]"] {
        let e = new(&[spec(name, DType::F32, &[1])]).expect(name);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}");
    }
    // A plain "a.b" beside the path [a, b]: both read back as a.b.
    let nested = TensorSpec {
        path: Some(vec!["a".into(), "b".into()]),
        ..spec("a.b", DType::F32, &[1])
    };
    let e = new(&[spec("a.b", DType::F32, &[1]), nested.clone()]).expect("a clash");
    assert!(e.to_string().contains("read back as \"a.b\""), "{e}");
    // Each alone is fine.
    assert!(new(&[nested]).is_none());
    assert!(new(&[spec("a.b", DType::F32, &[1])]).is_none());
}

/// Meta tensors store nothing, so the file does not bound their sizes: sizes that add up past
/// `u64::MAX` (every total a load, `inspect` or `convert` makes would overflow) are refused when
/// the index is read, whoever wrote the file.
#[test]
fn meta_tensor_sizes_that_overflow_together_are_refused() {
    let meta = |i: usize| TensorSpec {
        meta: true,
        ..spec(&format!("m{i}"), DType::U8, &[1 << 30, 1 << 30]) // 2^60 bytes each
    };
    let written = |n: usize| {
        let specs: Vec<_> = (0..n).map(meta).collect();
        let mut s = Serializer::new(
            IoCursor::new(Vec::new()),
            &specs,
            &SerializerOptions::default(),
        )?;
        for _ in 0..n {
            s.write_tensor(&[])?;
        }
        Ok::<_, crate::Error>(s.finish()?.into_inner())
    };
    // 15 × 2^60 fits.
    let ok = index_of(&written(15).unwrap()).unwrap();
    assert_eq!(ok.total_bytes(), 15 << 60);
    assert!(ok.tensors.iter().all(|t| t.source == TensorSource::Zeros));
    // 16 × 2^60 = 2^64 does not (the writer checks each tensor alone, as the reference's does).
    expect_err(
        &written(16).unwrap(),
        ErrorKind::Corrupt,
        "add up to more than",
    );
}

/// The meta tensors' per-tensor headers, checked on every load, are read in batches of
/// neighbours (on a remote backend each read is a round trip), and every one is still checked:
/// a corrupted one among many is found.
#[test]
fn meta_tensor_headers_are_read_in_batches() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    #[derive(Debug)]
    struct Counting(MemoryBackend, AtomicUsize);
    impl crate::Backend for Counting {
        fn location(&self) -> &str {
            self.0.location()
        }
        fn stat(&self) -> crate::Result<crate::ObjectMeta> {
            self.0.stat()
        }
        fn capabilities(&self) -> crate::Capabilities {
            self.0.capabilities()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<usize> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.read_at(offset, buf)
        }
    }
    let mut specs: Vec<TensorSpec> = (0..60)
        .map(|i| TensorSpec {
            meta: true,
            ..spec(&format!("m{i}"), DType::F32, &[3, 4])
        })
        .collect();
    specs.push(spec("stored", DType::F32, &[4]));
    let mut s = Serializer::new(
        IoCursor::new(Vec::new()),
        &specs,
        &SerializerOptions::default(),
    )
    .unwrap();
    for _ in 0..60 {
        s.write_tensor(&[]).unwrap();
    }
    s.write_tensor(&[7u8; 16]).unwrap();
    let bytes = s.finish().unwrap().into_inner();
    let run = |bytes: Vec<u8>| {
        let be = Counting(MemoryBackend::new("t.tensors", bytes), AtomicUsize::new(0));
        let mut index = read_index(&be, &be.stat()?)?;
        let before = be.1.load(Ordering::SeqCst);
        prepare(&be, &mut index, &ReadOptions::default())?;
        Ok::<_, crate::Error>(be.1.load(Ordering::SeqCst) - before)
    };
    let reads = run(bytes.clone()).unwrap();
    assert!(
        (1..=2).contains(&reads),
        "{reads} reads for 60 meta headers"
    );
    // The 40th meta tensor's header claims another shape: found, named.
    let mut bad = bytes.clone();
    let at = bad
        .windows(3)
        .enumerate()
        .filter(|(_, w)| *w == b"m39")
        .map(|(i, _)| i)
        .nth(1)
        .expect("m39's per-tensor header");
    bad[at + 2] = b'8'; // its header now names "m38"
    let e = run(bad).unwrap_err();
    assert!(e.to_string().contains("m39"), "{e}");
}

/// `strip_prefixes` makes the index `prepare` makes, without reading: plain, verified and
/// encrypted files, with meta tensors among stored ones (a sharded GPU load sizes its shards'
/// device memory from it, and a plan over another index would lay out other memory).
#[test]
fn strip_prefixes_leaves_the_index_prepare_leaves() {
    let specs = [
        spec("a", DType::F32, &[4]),
        TensorSpec {
            meta: true,
            ..spec("m", DType::F32, &[3, 4])
        },
        spec("b", DType::F32, &[2, 4]),
    ];
    let key = [5u8; 32];
    let file = |encryption: Option<KeySource>| {
        let opts = SerializerOptions {
            encryption,
            ..SerializerOptions::default()
        };
        let mut s = Serializer::new(IoCursor::new(Vec::new()), &specs, &opts).unwrap();
        s.write_tensor(&[1u8; 16]).unwrap();
        s.write_tensor(&[]).unwrap();
        s.write_tensor(&[2u8; 32]).unwrap();
        s.finish().unwrap().into_inner()
    };
    let cases = [
        (file(None), ReadOptions::default()),
        (
            file(None),
            ReadOptions {
                verify: true,
                key: None,
            },
        ),
        (
            file(Some(KeySource::Key(key))),
            ReadOptions {
                verify: false,
                key: Some(KeySource::Key(key)),
            },
        ),
        (
            file(Some(KeySource::Key(key))),
            ReadOptions {
                verify: true,
                key: Some(KeySource::Key(key)),
            },
        ),
    ];
    let prefixes = |i: &crate::TensorIndex| -> Vec<_> {
        i.tensors
            .iter()
            .map(|t| (t.range.clone(), t.prefix.clone()))
            .collect()
    };
    for (k, (bytes, opts)) in cases.iter().enumerate() {
        let be = MemoryBackend::new("t.tensors", bytes.clone());
        let read = read_index(&be, &be.stat().unwrap()).unwrap();
        assert!(
            read.tensors.iter().all(|t| t.prefix.is_some()),
            "case {k}: {read:?}"
        );
        let mut prepared = read.clone();
        let hook = prepare(&be, &mut prepared, opts).unwrap();
        let mut stripped = read.clone();
        strip_prefixes(&mut stripped, opts);
        assert_eq!(prefixes(&stripped), prefixes(&prepared), "case {k}");
        // With a hook, the stored tensors keep their headers (the hook reads them).
        assert_eq!(
            stripped.tensors.iter().any(|t| t.prefix.is_some()),
            hook.is_some(),
            "case {k}"
        );
    }
}
