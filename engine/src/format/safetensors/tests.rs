//! safetensors reader tests: hostile headers, every dtype, the reference fixture, round trips.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;
use crate::backend::{Backend, CountingBackend, MemoryBackend};
use crate::error::ErrorKind;
use crate::format::{self, Probe};

/// A file image: length + header bytes (padded to 8 with spaces) + `data` zero bytes.
fn image(header: &[u8], data: usize) -> Vec<u8> {
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend(std::iter::repeat_n(0u8, data));
    out
}

fn parse(bytes: &[u8]) -> Result<TensorIndex> {
    match parse_prefix(bytes, bytes.len() as u64)? {
        Probe::Index(i) => Ok(i),
        Probe::NeedPrefix(n) => panic!("whole file given, yet asks for {n} bytes"),
    }
}

#[track_caller]
fn expect(bytes: &[u8], kind: ErrorKind, needle: &str) {
    match parse(bytes) {
        Ok(i) => panic!("expected {kind:?} containing {needle:?}, parsed {i:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
        }
    }
}

#[track_caller]
fn corrupt(header: &str, data: usize, needle: &str) {
    expect(&image(header.as_bytes(), data), ErrorKind::Corrupt, needle);
}

// ---------------------------------------------------------------------------------------------
// hostile / corrupt headers

#[test]
fn too_short_files() {
    for n in 0..8 {
        let bytes = vec![0u8; n];
        let e = format::parse_prefix(&bytes, n as u64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(
            e.to_string().contains("empty") || e.to_string().contains("too short"),
            "{e}"
        );
    }
}

/// An empty object is named, and only a local file gets the hint about /proc (whose files
/// report size 0): an empty HTTP, S3 or NFS object has nothing to do with /proc.
#[test]
fn an_empty_object_gets_the_proc_hint_only_when_local() {
    #[derive(Debug)]
    struct Local(MemoryBackend);
    impl Backend for Local {
        fn location(&self) -> &str {
            self.0.location()
        }
        fn stat(&self) -> Result<crate::backend::ObjectMeta> {
            self.0.stat()
        }
        fn capabilities(&self) -> crate::backend::Capabilities {
            crate::backend::Capabilities {
                kind: "local",
                ..self.0.capabilities()
            }
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
            self.0.read_at(offset, buf)
        }
    }
    let remote = MemoryBackend::new("s3://bkt/empty.safetensors", Vec::new());
    let e = format::read_index(&remote, &remote.stat().unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(
        e.to_string(),
        "s3://bkt/empty.safetensors: the object's size is 0 bytes: it is empty"
    );
    let local = Local(MemoryBackend::new("/proc/self/empty", Vec::new()));
    let e = format::read_index(&local, &local.stat().unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("/proc/self/empty: ")
            && msg.contains("empty file")
            && msg.contains("/proc do"),
        "{msg}"
    );
}

/// A JSON file (a sharded checkpoint's index under another name) gets a hint about index names;
/// a safetensors failure that does not start with '{' gets none.
#[test]
fn a_json_file_is_hinted_at_as_an_index() {
    let json = br#"{"metadata": {"total_size": 12}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}"#;
    let e = format::parse_prefix(json, json.len() as u64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("NAME.safetensors.index.json"), "{e}");
    let mut other = (1u64 << 40).to_le_bytes().to_vec();
    other.extend_from_slice(b"{}      ");
    let e = format::parse_prefix(&other, other.len() as u64).unwrap_err();
    assert!(!e.to_string().contains("index.json"), "{e}");
}

#[test]
fn absurd_header_lengths() {
    for n in [u64::MAX, 1 << 40, MAX_HEADER + 1] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}      ");
        expect(&bytes, ErrorKind::Corrupt, "exceeds");
    }
}

#[test]
fn header_length_past_eof() {
    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    expect(&bytes, ErrorKind::Corrupt, "past the end of the file");
}

#[test]
fn header_not_utf8() {
    expect(
        &image(b"{\"a\xff\": 1}", 0),
        ErrorKind::Corrupt,
        "not UTF-8",
    );
}

#[test]
fn header_not_json() {
    corrupt("{not json", 0, "not valid JSON");
    corrupt("", 0, "not a JSON object");
    corrupt("[1, 2]", 0, "not a JSON object");
    corrupt("\"text\"", 0, "not a JSON object");
    corrupt("null", 0, "not a JSON object");
}

#[test]
fn trailing_garbage_after_json() {
    corrupt("{}xyz", 0, "trailing");
    corrupt("{}{}", 0, "trailing");
    // Trailing spaces are the format's padding.
    parse(&image(b"{}      ", 0)).unwrap();
}

#[test]
fn duplicate_tensor_names() {
    let t = r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
    corrupt(&format!(r#"{{"x":{t},"x":{t}}}"#), 1, "twice");
    corrupt(r#"{"__metadata__":{},"__metadata__":{}}"#, 0, "twice");
}

/// A field named twice inside an entry is refused, as the reference crate's derived structs
/// refuse it: `"dtype":"F32","dtype":"U8"` must not quietly mean whichever comes last.
#[test]
fn duplicate_fields_inside_an_entry() {
    corrupt(
        r#"{"x":{"dtype":"F32","dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        4,
        "key \"dtype\" given twice",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[4],"shape":[2],"data_offsets":[0,4]}}"#,
        4,
        "given twice",
    );
    corrupt(r#"{"__metadata__":{"a":"1","a":"2"}}"#, 0, "given twice");
}

/// A shape of more dimensions than any array a header needs is refused while parsing, before
/// it costs memory (a 100 MB header of one shape would be gigabytes of JSON values).
#[test]
fn giant_arrays_are_refused_while_parsing() {
    let dims = vec!["1"; super::MAX_ARRAY + 1].join(",");
    corrupt(
        &format!(r#"{{"x":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#),
        1,
        "longer than 1024",
    );
    let dims = vec!["1"; super::MAX_ARRAY].join(",");
    parse(&image(
        format!(r#"{{"x":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#).as_bytes(),
        1,
    ))
    .unwrap();
}

#[test]
fn unknown_dtype() {
    corrupt(
        r#"{"x":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
        16,
        "unknown dtype \"F128\"",
    );
    corrupt(
        r#"{"x":{"dtype":"C128","shape":[1],"data_offsets":[0,16]}}"#,
        16,
        "unknown dtype \"C128\"",
    );
    corrupt(
        r#"{"x":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
        "unknown dtype",
    );
}

#[test]
fn missing_or_mistyped_fields() {
    corrupt(
        r#"{"x":{"shape":[1],"data_offsets":[0,1]}}"#,
        1,
        "\"dtype\"",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","data_offsets":[0,1]}}"#,
        1,
        "\"shape\"",
    );
    corrupt(r#"{"x":{"dtype":"U8","shape":[1]}}"#, 1, "\"data_offsets\"");
    corrupt(
        r#"{"x":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}"#,
        1,
        "\"dtype\"",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#,
        1,
        "\"shape\"",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#,
        1,
        "exactly two",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        2,
        "exactly two",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":["0",1]}}"#,
        1,
        "data_offsets[0]",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,-1]}}"#,
        1,
        "data_offsets[1]",
    );
    corrupt(r#"{"x":[1,2]}"#, 0, "not an object");
}

#[test]
fn bad_shape_dims() {
    for dim in [
        "-1",
        "2.0",
        "1.5",
        "1e2",
        "18446744073709551616",
        "\"3\"",
        "null",
    ] {
        corrupt(
            &format!(r#"{{"x":{{"dtype":"U8","shape":[{dim}],"data_offsets":[0,3]}}}}"#),
            3,
            "not an integer from 0 to 2^64 - 1",
        );
    }
}

#[test]
fn shape_and_byte_length_disagree() {
    corrupt(
        r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
        24,
        "needs 24 bytes but data_offsets give 20",
    );
    // Sub-byte dtypes must fill whole bytes.
    corrupt(
        r#"{"x":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
        2,
        "whole number of bytes",
    );
}

#[test]
fn element_count_overflow() {
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
        0,
        "overflows",
    );
    corrupt(
        r#"{"x":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}"#,
        0,
        "overflows",
    );
}

#[test]
fn data_offsets_out_of_order_or_past_eof() {
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[0],"data_offsets":[5,4]}}"#,
        8,
        "out of order",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#,
        8,
        "past the end of the data",
    );
    corrupt(
        r#"{"x":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
        8,
        "past the end of the data",
    );
}

#[test]
fn overlapping_ranges() {
    corrupt(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[3,7]}}"#,
        8,
        "overlap",
    );
    // Not adjacent in name or header order: found after sorting by offset.
    corrupt(
        r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"c":{"dtype":"U8","shape":[1],"data_offsets":[9,10]},"b":{"dtype":"U8","shape":[1],"data_offsets":[5,6]}}"#,
        10,
        "overlap",
    );
}

#[test]
fn data_section_has_no_holes() {
    // Bytes before the first tensor, between two, after the last (as the reference reader).
    corrupt(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
        6,
        "data bytes 0..2 belong to no tensor (before \"a\")",
    );
    corrupt(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}"#,
        8,
        "data bytes 4..6 belong to no tensor",
    );
    corrupt(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        5,
        "the last 1 bytes of the file belong to no tensor (data bytes 4..5)",
    );
    corrupt(r#"{}"#, 3, "the last 3 bytes");
    // Covered wholly: fine, empty tensors anywhere inside included.
    let ok = image(
        br#"{"e":{"dtype":"F32","shape":[0],"data_offsets":[3,3]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        6,
    );
    let idx = parse(&ok).unwrap();
    assert_eq!(idx.tensors.len(), 3);
    assert!(parse(&image(br#"{}"#, 0)).unwrap().tensors.is_empty());
}

#[test]
fn metadata_values_must_be_strings() {
    corrupt(r#"{"__metadata__":{"k":1}}"#, 0, "not a string");
    corrupt(r#"{"__metadata__":{"k":{"a":"b"}}}"#, 0, "not a string");
    corrupt(r#"{"__metadata__":["k"]}"#, 0, "__metadata__");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!("{{\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    corrupt(&deep, 0, "not valid JSON");
}

// ---------------------------------------------------------------------------------------------
// valid files

#[test]
fn every_dtype_of_the_format() {
    let shape = vec![2u64, 4];
    let mut tensors = Vec::new();
    for (i, d) in DType::SAFETENSORS.iter().enumerate() {
        let n = d.byte_len(8).unwrap();
        tensors.push((format!("t{i}"), *d, shape.clone(), n));
    }
    let header = write_header(&tensors, &BTreeMap::new()).unwrap();
    let total: u64 = tensors.iter().map(|t| t.3).sum();
    let mut bytes = header.clone();
    bytes.resize(header.len() + total as usize, 0);
    let idx = parse(&bytes).unwrap();
    assert_eq!(idx.tensors.len(), DType::SAFETENSORS.len());
    assert_eq!(idx.header_len, header.len() as u64);
    for (t, (name, d, s, n)) in idx.tensors.iter().zip(&tensors) {
        assert_eq!((&t.name, t.dtype, &t.shape, t.nbytes()), (name, *d, s, *n));
    }
    // Widths: F4 packs two per byte, F6 four per three bytes, C64 is 8 bytes.
    let nbytes = |d: DType| idx.tensors.iter().find(|t| t.dtype == d).unwrap().nbytes();
    assert_eq!(nbytes(DType::F4), 4);
    assert_eq!(nbytes(DType::F6E2M3), 6);
    assert_eq!(nbytes(DType::C64), 64);
    assert_eq!(nbytes(DType::Bool), 8);
    // C128 is not a safetensors dtype: the writer refuses it.
    let e = write_header(&[("c".into(), DType::C128, vec![1], 16)], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("not a safetensors dtype"), "{e}");
}

#[test]
fn the_writer_refuses_headers_readers_would_refuse() {
    let t = |name: &str| (name.to_string(), DType::F32, vec![1], 4);
    // A tensor named like the metadata key, with or without metadata beside it.
    let mut meta = BTreeMap::new();
    for m in [BTreeMap::new(), {
        meta.insert("format".to_string(), "pt".to_string());
        meta.clone()
    }] {
        let e = write_header(&[t("w"), t("__metadata__")], &m).unwrap_err();
        assert!(e.to_string().contains("__metadata__"), "{e}");
    }
    // A name listed twice.
    let e = write_header(&[t("w"), t("w")], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    // A header over the readers' limit: 300 names of 65,535 control characters, each of
    // which JSON escapes into 6 bytes.
    let long: Vec<_> = (0..300u32)
        .map(|i| t(&format!("{i:04}{}", "\u{1}".repeat(65_531))))
        .collect();
    let e = write_header(&long, &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("100000000-byte limit"), "{e}");
}

#[test]
fn scalars_empty_tensors_and_metadata() {
    let header = br#"{"__metadata__":{"format":"pt","note":"x"},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"BF16","shape":[3,0],"data_offsets":[4,4]},"z":{"dtype":"I64","shape":[0],"data_offsets":[4,4]}}"#;
    let idx = parse(&image(header, 4)).unwrap();
    assert_eq!(idx.metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(idx.metadata.len(), 2);
    let s = idx.get("s").unwrap();
    assert_eq!((s.shape.len(), s.nbytes()), (0, 4));
    for name in ["e", "z"] {
        let t = idx.get(name).unwrap();
        assert_eq!(t.nbytes(), 0);
        assert!(t.range.is_empty());
    }
    // An empty header object is a valid file with no tensors.
    assert!(parse(&image(b"{}", 0)).unwrap().tensors.is_empty());
}

#[test]
fn null_metadata_is_no_metadata() {
    // The reference crate reads `__metadata__` as Option<HashMap<String, String>>.
    let idx = parse(&image(br#"{"__metadata__":null}"#, 0)).unwrap();
    assert!(idx.metadata.is_empty());
}

#[test]
fn short_prefix_asks_for_more() {
    let bytes = image(
        br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
        2,
    );
    let size = bytes.len() as u64;
    assert!(matches!(
        parse_prefix(&bytes[..3], size).unwrap(),
        Probe::NeedPrefix(8)
    ));
    let header_end = size - 2;
    assert!(matches!(
        parse_prefix(&bytes[..12], size).unwrap(),
        Probe::NeedPrefix(n) if n == header_end
    ));
    assert!(matches!(
        parse_prefix(&bytes[..header_end as usize], size).unwrap(),
        Probe::Index(_)
    ));
}

#[test]
fn a_large_header_is_read_through_the_backend_and_nothing_more() {
    // ~3000 tensors: a header of about 200 KiB, more than the 64 KiB first read.
    let tensors: Vec<_> = (0..3000)
        .map(|i| {
            (
                format!("model.layers.{i}.weight"),
                DType::F32,
                vec![16u64, 16],
                1024,
            )
        })
        .collect();
    let header = write_header(&tensors, &BTreeMap::new()).unwrap();
    assert!(header.len() as u64 > format::FIRST_READ * 2);
    let data = 3000 * 1024;
    let mut bytes = header.clone();
    bytes.resize(header.len() + data, 0xEE);
    let backend = CountingBackend::new("mem://big", bytes);
    let meta = backend.stat().unwrap();
    let idx = format::read_index(&backend, &meta).unwrap();
    assert_eq!(idx.tensors.len(), 3000);
    assert_eq!(idx.header_len, header.len() as u64);
    let reads = backend.reads.lock().unwrap().clone();
    assert_eq!(
        reads,
        vec![
            (0, format::FIRST_READ as usize),
            (
                format::FIRST_READ,
                header.len() - format::FIRST_READ as usize
            )
        ]
    );
    assert_eq!(
        backend.bytes.load(Ordering::Relaxed),
        header.len() as u64,
        "only the header is read"
    );
}

#[test]
fn read_index_reports_the_location() {
    let backend = MemoryBackend::new("mem://bad", image(b"[1]", 0));
    let e = format::read_index(&backend, &backend.stat().unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.location(), Some("mem://bad"));
}

fn fixtures() -> std::path::PathBuf {
    let dir = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ));
    assert!(
        dir.join("manifest.json").is_file(),
        "fixtures missing at {} (see BRIEF: shared/fixtures beside the checkout)",
        dir.display()
    );
    dir.to_path_buf()
}

#[test]
fn reference_fixture_matches_its_manifest() {
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("mixed.safetensors")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let entry = &manifest["files"]["mixed.safetensors"];
    assert_eq!(entry["format"], "safetensors");
    let want = entry["tensors"].as_array().unwrap();
    let backend = MemoryBackend::new("mixed.safetensors", bytes.clone());
    let idx = format::read_index(&backend, &backend.stat().unwrap()).unwrap();
    assert_eq!(idx.tensors.len(), want.len());
    assert!(!idx.metadata.is_empty(), "the fixture carries metadata");
    // torch dtype names in the manifest → safetensors dtypes.
    let torch = |s: &str| match s {
        "bfloat16" => DType::BF16,
        "float32" => DType::F32,
        "int64" => DType::I64,
        "bool" => DType::Bool,
        "float8_e4m3fn" => DType::F8E4M3,
        "uint8" => DType::U8,
        other => panic!("manifest dtype {other} not mapped in this test"),
    };
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = idx.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype, torch(w["dtype"].as_str().unwrap()), "{name}");
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.nbytes(), w["nbytes"].as_u64().unwrap(), "{name}");
        let data = &bytes[t.range.start as usize..t.range.end as usize];
        let sha: String = Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, w["sha256"].as_str().unwrap(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// properties

fn arb_tensor() -> impl Strategy<Value = (DType, Vec<u64>)> {
    (
        prop::sample::select(DType::SAFETENSORS.to_vec()),
        prop::collection::vec(0u64..6, 0..4),
    )
        .prop_map(|(d, mut shape)| {
            // Sub-byte dtypes need a whole number of bytes: make the element count even / a
            // multiple of 4.
            if d.byte_len(crate::dtype::numel(&shape).unwrap()).is_none() {
                shape.push(4);
            }
            (d, shape)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn write_header_round_trips(
        tensors in prop::collection::vec(arb_tensor(), 0..12),
        meta in prop::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,12}", 0..3),
    ) {
        let spec: Vec<_> = tensors
            .iter()
            .enumerate()
            .map(|(i, (d, s))| {
                let n = d.byte_len(crate::dtype::numel(s).unwrap()).unwrap();
                (format!("t.{i}"), *d, s.clone(), n)
            })
            .collect();
        let header = write_header(&spec, &meta).unwrap();
        prop_assert_eq!(header.len() % 8, 0);
        let total: u64 = spec.iter().map(|t| t.3).sum();
        let mut bytes = header.clone();
        bytes.resize(header.len() + total as usize, 0);
        let idx = parse(&bytes).unwrap();
        prop_assert_eq!(&idx.metadata, &meta);
        prop_assert_eq!(idx.tensors.len(), spec.len());
        let mut off = header.len() as u64;
        for (name, d, s, n) in &spec {
            let t = idx.get(name).unwrap();
            prop_assert_eq!((t.dtype, &t.shape), (*d, s));
            prop_assert_eq!(t.range.clone(), off..off + n);
            off += n;
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        extra in prop_oneof![Just(0u64), 0u64..1000, Just(u64::MAX - 300)],
    ) {
        let _ = parse_prefix(&bytes, bytes.len() as u64);
        let _ = format::parse_prefix(&bytes, (bytes.len() as u64).saturating_add(extra));
        let _ = format::parse_prefix(&bytes, extra);
    }

    #[test]
    fn mutated_headers_never_panic(
        tensors in prop::collection::vec(arb_tensor(), 1..5),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let spec: Vec<_> = tensors
            .iter()
            .enumerate()
            .map(|(i, (d, s))| {
                (format!("t{i}"), *d, s.clone(), d.byte_len(crate::dtype::numel(s).unwrap()).unwrap())
            })
            .collect();
        let header = write_header(&spec, &BTreeMap::new()).unwrap();
        // The data follows, so that a header the flips leave valid parses (and the invariants
        // below are checked); the flips hit the header only.
        let total: u64 = spec.iter().map(|t| t.3).sum();
        let mut bytes = header.clone();
        bytes.resize(header.len() + total as usize, 0);
        for (at, b) in flips {
            let i = 8 + at.index(header.len() - 8);
            bytes[i] = b;
        }
        if let Ok(idx) = parse(&bytes) {
            let mut prev_end = 0;
            for t in idx.tensors.iter().filter(|t| !t.range.is_empty()) {
                prop_assert!(t.range.start >= idx.header_len.max(prev_end));
                prop_assert!(t.range.end <= bytes.len() as u64);
                prev_end = t.range.end;
            }
        }
    }
}

/// Every single-byte corruption of the reference fixture's header (length prefix and JSON):
/// never a panic; an index that still parses places every tensor inside the data buffer, without
/// overlaps, with the byte count its dtype and shape need; and a tensor that keeps its name,
/// dtype and shape keeps its bytes (safetensors has no checksums, so only a change the reference
/// reader would also accept — in a name, or metadata — may go through).
#[test]
fn every_corrupted_header_byte_fails_cleanly_or_keeps_true_bytes() {
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("mixed.safetensors")).unwrap();
    let backend = MemoryBackend::new("m", bytes.clone());
    let good = format::read_index(&backend, &backend.stat().unwrap()).unwrap();
    let header_end = good.header_len as usize;
    let (mut tried, mut refused) = (0, 0);
    let mut wrong = Vec::new();
    for at in 0..header_end {
        for flip in [0x01u8, 0x20, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[at] ^= flip;
            tried += 1;
            let be = MemoryBackend::new("m", b.clone());
            let idx =
                match std::panic::catch_unwind(|| format::read_index(&be, &be.stat().unwrap())) {
                    Err(_) => panic!("byte {at} ^ {flip:#x} panicked"),
                    Ok(Err(_)) => {
                        refused += 1;
                        continue;
                    }
                    Ok(Ok(idx)) => idx,
                };
            let mut prev_end = idx.header_len;
            for t in &idx.tensors {
                let ctx = format!("byte {at} ^ {flip:#x}: {}", t.name);
                if t.range.start < prev_end || t.range.end > b.len() as u64 {
                    wrong.push(format!("{ctx}: range {:?} outside/overlapping", t.range));
                }
                prev_end = prev_end.max(t.range.end);
                let need = t.dtype.byte_len(crate::dtype::numel(&t.shape).unwrap());
                if need != Some(t.range.end - t.range.start) {
                    wrong.push(format!(
                        "{ctx}: {:?} bytes for {:?} {}",
                        t.range, t.shape, t.dtype
                    ));
                }
                if let Some(g) = good.get(&t.name) {
                    let same = g.dtype == t.dtype && g.shape == t.shape;
                    let data = |x: &[u8], r: &std::ops::Range<u64>| {
                        x[r.start as usize..r.end as usize].to_vec()
                    };
                    if same && data(&b, &t.range) != data(&bytes, &g.range) {
                        wrong.push(format!(
                            "{ctx}: other bytes ({:?} instead of {:?})",
                            t.range, g.range
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{tried} corruptions, {refused} refused");
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(refused > tried / 2, "{refused} of {tried}");
}
