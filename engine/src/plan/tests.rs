//! Planner tests: table tests of the documented behaviour, and property tests that execute random
//! plans on random files into an arena (the naive oracle) and check every tensor's bytes.

use std::collections::BTreeMap;
use std::ops::Range;

use proptest::prelude::*;

use super::*;
use crate::dtype::DType;
use crate::error::ErrorKind;
use crate::index::{Format, TensorIndex, TensorInfo, TensorSource};

// ---------------------------------------------------------------------------------------------
// helpers

fn stored(name: &str, range: Range<u64>) -> TensorInfo {
    TensorInfo {
        name: name.to_string(),
        dtype: DType::U8,
        shape: vec![range.end.saturating_sub(range.start)],
        range,
        source: TensorSource::Stored,
        path: None,
        prefix: None,
    }
}

fn with_prefix(mut t: TensorInfo, prefix: Range<u64>) -> TensorInfo {
    t.prefix = Some(prefix);
    t
}

fn zeros(name: &str, nbytes: u64) -> TensorInfo {
    TensorInfo {
        name: name.to_string(),
        dtype: DType::U8,
        shape: vec![nbytes],
        range: 0..0,
        source: TensorSource::Zeros,
        path: None,
        prefix: None,
    }
}

fn index(tensors: Vec<TensorInfo>, object_size: u64) -> TensorIndex {
    TensorIndex {
        format: Format::Safetensors,
        tensors,
        metadata: BTreeMap::new(),
        object_size,
        header_len: 0,
        version: 0,
    }
}

/// Unaligned, huge chunks, no gaps, no amplification: the strictest options.
fn strict(object_size: u64) -> PlanOptions {
    PlanOptions {
        alignment: 1,
        chunk_size: 1 << 40,
        max_gap: 0,
        max_amplification: 1.0,
        layout: Layout::Mirror,
        object_size,
    }
}

fn all(idx: &TensorIndex) -> Vec<usize> {
    (0..idx.tensors.len()).collect()
}

fn reads(p: &Plan) -> Vec<Range<u64>> {
    p.reads.iter().map(|r| r.obj.clone()).collect()
}

fn placement_of(p: &Plan, tensor: usize) -> &Placement {
    p.placements
        .iter()
        .find(|pl| pl.tensor == tensor)
        .expect("tensor is placed")
}

/// Deterministic pseudo-random file contents.
fn file_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The naive oracle: executes `plan` on `file` the way the pipeline does (direct reads land in
/// the arena, staged reads are copied segment by segment, reads past EOF come back short and
/// the rest is left as it was), in reverse order to show that order does not matter.
fn execute(plan: &Plan, file: &[u8]) -> Vec<u8> {
    let mut arena = vec![0xA5u8; plan.arena_len as usize];
    // The sink provides the zeros of tensors that read nothing.
    for p in plan.placements.iter().filter(|p| p.needed.is_empty()) {
        arena[p.dest as usize..(p.dest + p.len) as usize].fill(0);
    }
    for r in plan.reads.iter().rev() {
        let start = r.obj.start as usize;
        let end = (r.obj.end as usize).min(file.len());
        assert!(start < file.len(), "read {:?} starts past EOF", r.obj);
        let buf = &file[start..end];
        match r.direct {
            Some(d) => arena[d as usize..d as usize + buf.len()].copy_from_slice(buf),
            None => {
                for s in &r.segments {
                    let from = (s.obj.start - r.obj.start) as usize;
                    let n = (s.obj.end - s.obj.start) as usize;
                    arena[s.dest as usize..s.dest as usize + n]
                        .copy_from_slice(&buf[from..from + n]);
                }
            }
        }
    }
    arena
}

/// Every selected tensor's bytes (and prefix bytes) at its destination equal the file's.
fn check_data(idx: &TensorIndex, selected: &[usize], plan: &Plan, file: &[u8]) {
    let arena = execute(plan, file);
    let mut want: Vec<usize> = selected.to_vec();
    want.sort_unstable();
    want.dedup();
    let mut got: Vec<usize> = plan.placements.iter().map(|p| p.tensor).collect();
    got.sort_unstable();
    assert_eq!(got, want, "placements are exactly the selected tensors");
    for p in &plan.placements {
        let t = &idx.tensors[p.tensor];
        let at = &arena[p.dest as usize..(p.dest + p.len) as usize];
        match t.source {
            TensorSource::Stored => {
                assert_eq!(
                    at,
                    &file[t.range.start as usize..t.range.end as usize],
                    "data of {}",
                    t.name
                );
                if let Some(pr) = &t.prefix {
                    let d = (p.needed_dest + (pr.start - p.needed.start)) as usize;
                    assert_eq!(
                        &arena[d..d + (pr.end - pr.start) as usize],
                        &file[pr.start as usize..pr.end as usize],
                        "prefix of {}",
                        t.name
                    );
                }
            }
            TensorSource::Zeros => {
                assert_eq!(p.len, t.nbytes());
                assert!(at.iter().all(|&b| b == 0), "zeros of {}", t.name);
            }
        }
    }
}

/// Plans, verifies the invariants and executes the plan.
fn plan_and_check(idx: &TensorIndex, selected: &[usize], opts: &PlanOptions) -> Plan {
    let p = plan(idx, selected, opts).expect("plan");
    check_data(idx, selected, &p, &file_bytes(opts.object_size, 7));
    p
}

fn expect_err(idx: &TensorIndex, opts: &PlanOptions, kind: ErrorKind, needle: &str) {
    match plan(idx, &all(idx), opts) {
        Ok(p) => panic!("expected an error containing {needle:?}, got {p:#?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// errors

#[test]
fn overlapping_tensors_are_rejected() {
    let idx = index(vec![stored("a", 0..10), stored("b", 5..15)], 20);
    expect_err(&idx, &strict(20), ErrorKind::Corrupt, "overlap");
    // Selecting only one of them is fine.
    plan_and_check(&idx, &[1], &strict(20));
}

#[test]
fn ranges_past_the_object_are_rejected() {
    let idx = index(vec![stored("a", 0..10), stored("b", 10..21)], 20);
    expect_err(&idx, &strict(20), ErrorKind::Corrupt, "outside the object");
}

#[test]
fn inverted_range_is_an_error_not_a_panic() {
    let idx = index(vec![stored("a", 10..5)], 20);
    expect_err(&idx, &strict(20), ErrorKind::Corrupt, "ends before it starts");
}

#[test]
fn prefix_must_precede_the_data() {
    for (prefix, data) in [(30..32, 10..20), (12..14, 10..20), (5..15, 10..20), (8..6, 10..20)] {
        let idx = index(vec![with_prefix(stored("a", data), prefix)], 40);
        expect_err(&idx, &strict(40), ErrorKind::Corrupt, "does not precede");
    }
}

#[test]
fn bad_options_are_invalid_input() {
    let idx = index(vec![stored("a", 0..10)], 10);
    let mut o = strict(10);
    o.alignment = 3;
    expect_err(&idx, &o, ErrorKind::InvalidInput, "power of two");
    let mut o = strict(10);
    o.layout = Layout::Packed { align: 0 };
    expect_err(&idx, &o, ErrorKind::InvalidInput, "power of two");
    let e = plan(&idx, &[1], &strict(10)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("not in the index"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// scale

/// 200 000 contiguous tensors form one run. The planner used to re-sum a run's useful bytes at
/// every merge (quadratic: this test then ran for many minutes); it must stay linear.
#[test]
fn many_small_tensors_plan_in_linear_time() {
    let n = 200_000u64;
    let idx = index(
        (0..n).map(|i| stored("t", i * 3..i * 3 + 3)).collect(),
        n * 3,
    );
    let p = plan(&idx, &all(&idx), &strict(n * 3)).unwrap();
    assert_eq!(reads(&p), vec![0..n * 3]);
    assert_eq!(p.placements.len(), n as usize);
    assert_eq!(p.reads[0].segments.len(), n as usize);
}
