//! Planner tests: table tests of the documented behaviour, and property tests that execute random
//! plans on random files into an arena (the naive oracle) and check every tensor's bytes.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::backend::{Backend, MemoryBackend};
use crate::dtype::DType;
use crate::error::ErrorKind;
use crate::index::{Format, TensorIndex, TensorInfo, TensorSource};
use crate::mem::IoBuf;

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
        role: None,
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
        role: None,
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
        free_gap: 0,
        free_gap_budget: 0,
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
                if let Some(pr) = t.prefix.as_ref().filter(|pr| !pr.is_empty()) {
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
    if let Err(e) = p.verify(idx, selected, opts).and_then(|_| p.validate()) {
        panic!("{e}\nplan: {p:#?}");
    }
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

/// A chunk size of "any size" (a backend's `preferred_chunk` of `usize::MAX`) reads each run
/// in one piece, at any offset, instead of failing with an overflow.
#[test]
fn a_chunk_of_any_size_reads_each_run_whole() {
    let idx = index(vec![stored("a", 10..1000), stored("b", 1000..5000)], 5000);
    for (align, layout) in [(1, Layout::Mirror), (4096, Layout::Packed { align: 256 })] {
        let o = PlanOptions {
            alignment: align,
            chunk_size: u64::MAX,
            layout,
            ..strict(5000)
        };
        let p = plan(&idx, &all(&idx), &o).unwrap();
        assert_eq!(p.reads.len(), 1, "{layout:?}: {:?}", reads(&p));
        let file = file_bytes(5000, 3);
        let arena = execute(&p, &file);
        for (t, r) in [(0, 10..1000), (1, 1000..5000)] {
            let pl = placement_of(&p, t);
            let got = &arena[pl.dest as usize..(pl.dest + pl.len) as usize];
            assert!(got == &file[r], "{layout:?}: tensor {t}");
        }
    }
}

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
#[allow(clippy::reversed_empty_ranges)]
fn inverted_range_is_an_error_not_a_panic() {
    let idx = index(vec![stored("a", 10..5)], 20);
    expect_err(
        &idx,
        &strict(20),
        ErrorKind::Corrupt,
        "ends before it starts",
    );
}

#[test]
#[allow(clippy::reversed_empty_ranges)]
fn prefix_must_precede_the_data() {
    for (prefix, data) in [
        (30..32, 10..20),
        (12..14, 10..20),
        (5..15, 10..20),
        (8..6, 10..20),
    ] {
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
// behaviour

#[test]
fn contiguous_tensors_coalesce_into_one_read() {
    let idx = index(
        vec![stored("a", 0..10), stored("b", 10..30), stored("c", 30..35)],
        35,
    );
    let p = plan_and_check(&idx, &all(&idx), &strict(35));
    assert_eq!(reads(&p), vec![0..35]);
    assert_eq!(p.reads[0].segments.len(), 3);
    assert_eq!(p.reads[0].direct, Some(0));
    assert_eq!((p.read_bytes, p.useful_bytes), (35, 35));
    // Mirror: tensors keep their object layout.
    assert_eq!(placement_of(&p, 1).dest, 10);
}

#[test]
fn a_gap_larger_than_max_gap_splits_runs() {
    let idx = index(vec![stored("a", 0..10), stored("b", 20..30)], 30);
    let mut o = strict(30);
    o.max_amplification = 10.0;
    o.max_gap = 9;
    assert_eq!(
        reads(&plan_and_check(&idx, &all(&idx), &o)),
        vec![0..10, 20..30]
    );
    o.max_gap = 10;
    assert_eq!(reads(&plan_and_check(&idx, &all(&idx), &o)), vec![0..30]);
}

#[test]
fn amplification_bound_is_respected() {
    // 20 useful bytes, 10 gap bytes: needs max_amplification >= 1.5.
    let idx = index(vec![stored("a", 0..10), stored("b", 20..30)], 30);
    let mut o = strict(30);
    o.max_gap = 1000;
    o.max_amplification = 1.5;
    assert_eq!(reads(&plan_and_check(&idx, &all(&idx), &o)), vec![0..30]);
    o.max_amplification = 1.49;
    assert_eq!(
        reads(&plan_and_check(&idx, &all(&idx), &o)),
        vec![0..10, 20..30]
    );
    // The bound is per run and cumulative: a third tensor after another 10-byte gap brings the
    // run to 20 gap bytes for 30 useful ones, which 1.5 does not allow; it starts a new run.
    let idx = index(
        vec![stored("a", 0..10), stored("b", 20..30), stored("c", 40..50)],
        50,
    );
    o.object_size = 50;
    o.max_amplification = 1.5;
    assert_eq!(
        reads(&plan_and_check(&idx, &all(&idx), &o)),
        vec![0..30, 40..50]
    );
    o.max_amplification = f64::NAN; // counts as 1: no gap bytes
    assert_eq!(
        reads(&plan_and_check(&idx, &all(&idx), &o)),
        vec![0..10, 20..30, 40..50]
    );
}

#[test]
fn runs_are_chunked_at_the_chunk_size() {
    let idx = index(vec![stored("a", 0..100)], 100);
    let mut o = strict(100);
    o.chunk_size = 30;
    let p = plan_and_check(&idx, &all(&idx), &o);
    assert_eq!(reads(&p), vec![0..30, 30..60, 60..90, 90..100]);
    let directs: Vec<_> = p.reads.iter().map(|r| r.direct).collect();
    assert_eq!(directs, vec![Some(0), Some(30), Some(60), Some(90)]);
    // Chunks are rounded down to the alignment, and at least one unit.
    o.alignment = 8;
    o.chunk_size = 30;
    assert_eq!(
        reads(&plan_and_check(&idx, &all(&idx), &o)),
        vec![0..24, 24..48, 48..72, 72..96, 96..104]
    );
    o.chunk_size = 0;
    assert_eq!(plan_and_check(&idx, &all(&idx), &o).reads.len(), 13);
}

#[test]
fn reads_and_direct_destinations_are_aligned() {
    // a: 100..700, b: 1500..1600 (blocks 0..2048 at 512: adjacent blocks, no gap bytes).
    // c: 5000..5001 far away.
    let idx = index(
        vec![
            stored("a", 100..700),
            stored("b", 1500..1600),
            stored("c", 5000..5001),
        ],
        5001,
    );
    let mut o = strict(5001);
    o.alignment = 512;
    let p = plan_and_check(&idx, &all(&idx), &o);
    assert_eq!(reads(&p), vec![0..2048, 4608..5120]); // the last one ends past EOF
    assert_eq!(p.arena_align, 512);
    for r in &p.reads {
        let d = r.direct.unwrap();
        assert_eq!((r.obj.start % 512, r.obj.end % 512, d % 512), (0, 0, 0));
    }
    assert_eq!(placement_of(&p, 0).dest, 100);
    assert_eq!(placement_of(&p, 1).dest, 1500);
    assert_eq!(placement_of(&p, 2).dest, 2048 + 5000 - 4608);
    // Tensors sharing a block are always read together, whatever max_gap says.
    let idx = index(vec![stored("a", 0..10), stored("b", 400..410)], 410);
    let mut o = strict(410);
    o.alignment = 4096;
    assert_eq!(reads(&plan_and_check(&idx, &all(&idx), &o)), vec![0..4096]);
}

#[test]
fn zero_size_and_zeros_tensors_read_nothing() {
    let idx = index(
        vec![
            stored("a", 0..10),
            stored("empty", 10..10),
            zeros("meta", 16),
            stored("b", 10..20),
        ],
        20,
    );
    for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
        let mut o = strict(20);
        o.layout = layout;
        let p = plan_and_check(&idx, &all(&idx), &o);
        assert_eq!(reads(&p), vec![0..20]);
        assert_eq!(p.useful_bytes, 20);
        let (e, m) = (placement_of(&p, 1), placement_of(&p, 2));
        assert_eq!((e.len, e.needed.clone()), (0, 0..0));
        assert_eq!((m.len, m.needed.clone()), (16, 0..0));
        assert_eq!(m.dest % 64, 0);
        assert!(m.dest + 16 <= p.arena_len);
    }
    // Only zero-size tensors selected: nothing to read at all.
    let p = plan_and_check(&idx, &[1, 2], &strict(20));
    assert!(p.reads.is_empty());
    assert_eq!(p.read_bytes, 0);
}

#[test]
fn a_prefix_is_loaded_just_before_its_data() {
    let idx = index(
        vec![stored("a", 0..10), with_prefix(stored("b", 18..50), 10..18)],
        50,
    );
    let mut o = strict(50);
    o.layout = Layout::Packed { align: 256 };
    let p = plan_and_check(&idx, &[1], &o);
    let b = placement_of(&p, 1);
    assert_eq!(b.needed, 10..50);
    assert_eq!(b.dest % 256, 0);
    assert_eq!(b.needed_dest + 8, b.dest);
    assert_eq!(reads(&p), vec![10..50]);
    assert_eq!(p.useful_bytes, 40);
}

#[test]
fn a_filter_reads_no_skipped_bytes_beyond_the_allowed_gap() {
    let idx = index(
        vec![
            stored("a", 0..100),
            stored("skip", 100..200),
            stored("c", 200..300),
        ],
        300,
    );
    let mut o = strict(300);
    o.max_amplification = 2.0;
    o.max_gap = 99;
    let p = plan_and_check(&idx, &[0, 2], &o);
    assert_eq!(reads(&p), vec![0..100, 200..300]);
    o.max_gap = 100;
    let p = plan_and_check(&idx, &[0, 2], &o);
    assert_eq!(reads(&p), vec![0..300]);
    // A gap of a whole chunk or more is never read, even when max_gap allows it.
    o.chunk_size = 100;
    let p = plan_and_check(&idx, &[0, 2], &o);
    assert_eq!(reads(&p), vec![0..100, 200..300]);
}

#[test]
fn packed_layout_aligns_every_tensor() {
    let idx = index(
        vec![
            stored("a", 0..3),
            stored("b", 3..10),
            zeros("z", 5),
            stored("c", 10..10),
            stored("d", 10..1000),
        ],
        1000,
    );
    for align in [1u64, 64, 256, 4096] {
        let mut o = strict(1000);
        o.layout = Layout::Packed { align };
        let p = plan_and_check(&idx, &all(&idx), &o);
        assert!(p.placements.iter().all(|pl| pl.dest % align == 0));
        assert!(p.reads.iter().all(|r| r.direct.is_none()));
        assert_eq!(p.arena_align, align.max(64));
        assert_eq!(reads(&p), vec![0..1000]);
    }
}

#[test]
fn verify_rejects_broken_plans() {
    let idx = index(
        vec![stored("a", 0..100), stored("b", 100..200), zeros("z", 8)],
        200,
    );
    let mut o = strict(200);
    o.chunk_size = 64;
    let sel = all(&idx);
    let good = plan(&idx, &sel, &o).unwrap();
    good.verify(&idx, &sel, &o).unwrap();
    let bad = |f: &dyn Fn(&mut Plan), needle: &str| {
        let mut p = good.clone();
        f(&mut p);
        let e = p.verify(&idx, &sel, &o).expect_err(needle);
        assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
    };
    bad(&|p| p.reads[1].segments[0].dest += 1, "lands at");
    bad(
        &|p| {
            p.reads.pop();
        },
        "covered only up to",
    );
    bad(
        &|p| p.reads[1].direct = Some(0),
        "not where the direct read puts it",
    );
    bad(
        &|p| {
            p.reads[1].direct = Some(0);
            p.reads[1].segments.clear();
        },
        "has no segment",
    );
    bad(&|p| p.reads[0].obj.end += 64, "longer than the chunk");
    bad(
        &|p| {
            p.placements[2].dest = 10;
            p.placements[2].needed_dest = 10;
        },
        "overlap in the arena",
    );
    bad(&|p| p.arena_len -= 1, "past arena_len");
    bad(&|p| p.useful_bytes += 1, "useful_bytes");
    bad(
        &|p| {
            p.placements.pop();
        },
        "not the selected tensors",
    );
    assert!(good.verify(&idx, &[0, 1], &o).is_err());
    let mut zero_align = o;
    zero_align.layout = Layout::Packed { align: 0 };
    let e = good.verify(&idx, &sel, &zero_align).unwrap_err();
    assert!(e.to_string().contains("not a power of two"), "{e}");
}

/// Plans broken by hand fail `validate` (which `execute` runs first) with an error naming the
/// problem: no sink ever indexes past a table, subtracts into an underflow or writes outside
/// its arena because of one. Executed, each is an error, not a panic.
#[test]
fn validate_refuses_malformed_plans_and_execute_does_not_panic() {
    let idx = index(
        vec![stored("a", 0..100), stored("b", 100..200), zeros("z", 8)],
        200,
    );
    let file = file_bytes(200, 3);
    for layout in [Layout::Mirror, Layout::Packed { align: 64 }] {
        let mut o = strict(200);
        o.chunk_size = 64;
        o.layout = layout;
        let good = plan(&idx, &all(&idx), &o).unwrap();
        good.validate().unwrap();
        type Break = Box<dyn Fn(&mut Plan)>;
        let cases: Vec<(&str, Break)> = vec![
            (
                "names placement",
                Box::new(|p| p.reads[0].segments[0].placement = 99),
            ),
            (
                "is inverted",
                Box::new(|p| p.placements[0].needed = Range { start: 50, end: 10 }),
            ),
            (
                "empty or inverted",
                Box::new(|p| p.reads[1].obj = Range { start: 70, end: 64 }),
            ),
            (
                "outside the read",
                Box::new(|p| p.reads[0].segments[0].obj.end += 1000),
            ),
            (
                "out of order",
                Box::new(|p| {
                    let s = p.reads[0].segments[0].clone();
                    p.reads[0].segments.push(s);
                }),
            ),
            (
                "outside the",
                Box::new(|p| p.reads[1].segments[0].dest = u64::MAX - 4),
            ),
            (
                "lies outside the",
                Box::new(|p| p.placements[2].dest = p.arena_len),
            ),
            ("arena", Box::new(|p| p.arena_len = 10)),
            ("needed range", Box::new(|p| p.placements[0].needed = 0..10)),
            (
                "all direct or none",
                Box::new(|p| {
                    // One read of the two switched to the other kind.
                    p.reads[1].direct = match p.reads[1].direct {
                        Some(_) => None,
                        None => Some(p.reads[1].segments[0].dest),
                    }
                }),
            ),
        ];
        for (needle, f) in cases {
            let mut p = good.clone();
            f(&mut p);
            let e = p.validate().expect_err(needle);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
            let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("m", file.clone()));
            let meta = be.stat().unwrap();
            let r = crate::pipeline::execute(
                be,
                &meta,
                Arc::new(p),
                crate::sink::HostSink::new(),
                &crate::pipeline::EngineOptions::default(),
            );
            let e = r.err().expect("a malformed plan executed");
            assert!(e.to_string().contains("plan invariant violated"), "{e}");
        }
    }
}

/// A read that ends past the object's end (O_DIRECT alignment) brings fewer bytes than it
/// asked for: the sink is handed exactly those (`buf.len()`, never a staging slot's stale
/// tail), and progress still reaches the plan's `read_bytes`.
#[test]
fn a_read_past_the_end_hands_the_sink_only_its_bytes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    struct Lens(crate::sink::HostSink, Arc<Mutex<Vec<(usize, usize)>>>);
    impl crate::sink::Sink for Lens {
        fn prepare(&mut self, plan: &Arc<Plan>) -> crate::Result<Vec<Option<IoBuf>>> {
            self.0.prepare(plan)
        }
        fn accept(&mut self, read: usize, buf: IoBuf) -> crate::Result<Vec<IoBuf>> {
            self.1.lock().unwrap().push((read, buf.len()));
            self.0.accept(read, buf)
        }
        fn finish(&mut self) -> crate::Result<Vec<IoBuf>> {
            self.0.finish()
        }
    }
    let size = 10_000u64; // not a multiple of the 4096-byte alignment
    let idx = index(vec![stored("a", 0..5000), stored("b", 5000..size)], size);
    for layout in [Layout::Mirror, Layout::Packed { align: 64 }] {
        let mut o = strict(size);
        o.alignment = 4096;
        o.chunk_size = 4096;
        o.layout = layout;
        let p = Arc::new(plan(&idx, &all(&idx), &o).unwrap());
        assert!(p.reads.last().unwrap().obj.end > size);
        let file = file_bytes(size, 5);
        let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("m", file.clone()));
        let meta = be.stat().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let progress = Arc::new(AtomicU64::new(0));
        let eo = crate::pipeline::EngineOptions {
            progress: Some(progress.clone()),
            ..Default::default()
        };
        let (sink, _) = crate::pipeline::execute(
            be,
            &meta,
            p.clone(),
            Lens(crate::sink::HostSink::new(), seen.clone()),
            &eo,
        )
        .unwrap();
        for &(r, len) in seen.lock().unwrap().iter() {
            let op = &p.reads[r];
            let brought = (op.obj.end.min(size) - op.obj.start) as usize;
            assert_eq!(len, brought, "read {r} {:?} ({layout:?})", op.obj);
        }
        assert_eq!(progress.load(Ordering::Relaxed), p.read_bytes, "{layout:?}");
        let (arena, _) = sink.0.into_parts().unwrap();
        let bytes = arena.as_slice().unwrap();
        for pl in &p.placements {
            let t = &idx.tensors[pl.tensor];
            assert_eq!(
                &bytes[pl.dest as usize..(pl.dest + pl.len) as usize],
                &file[t.range.start as usize..t.range.end as usize]
            );
        }
    }
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

/// Small tensors with small gaps between them (scalar scales between tensorizer's per-tensor
/// headers, or a filter taking every other small tensor) are read in a few large reads, not one
/// read (an HTTP request) each: gaps of up to `free_gap` bytes are always read. Before, the
/// amplification bound split 100 000 such tensors into 100 000 reads.
#[test]
fn small_tensors_with_small_gaps_are_read_together() {
    let n = 100_000u64;
    // 16 data bytes, then 112 bytes the load does not need (a per-tensor header, another
    // tensor): 8x amplification in bytes, far above max_amplification.
    let idx = index(
        (0..n)
            .map(|i| stored(&format!("t{i}"), i * 128 + 112..(i + 1) * 128))
            .collect(),
        n * 128,
    );
    let mut o = PlanOptions::new(n * 128);
    o.chunk_size = 1 << 20;
    let p = plan(&idx, &all(&idx), &o).unwrap();
    p.verify(&idx, &all(&idx), &o).unwrap();
    assert_eq!(p.reads.len(), (n * 128).div_ceil(1 << 20) as usize);
    assert_eq!(p.placements.len(), n as usize);
    check_data(&idx, &all(&idx), &p, &file_bytes(n * 128, 5));
    // Larger gaps still obey the amplification bound, and `free_gap` 0 turns the rule off.
    o.free_gap = 111;
    assert_eq!(plan(&idx, &all(&idx), &o).unwrap().reads.len(), n as usize);
    o.free_gap = 4096;
    o.max_gap = 100; // and never beyond max_gap
    assert_eq!(plan(&idx, &all(&idx), &o).unwrap().reads.len(), n as usize);

    // The free gaps of a plan add up to at most the budget or the selected bytes (1.6 MB
    // here), whichever is more: with no budget, 14 285 gaps of 112 bytes are free (and a few
    // hundred more that the amplification bound allows beside the first run's 228 KB), and the
    // tensors after them are read one by one again. Memory: the selected bytes, the free gaps,
    // at most a quarter of the selected bytes more, and each run's start aligned.
    o.max_gap = 256 << 10;
    o.free_gap_budget = 0;
    let p = plan(&idx, &all(&idx), &o).unwrap();
    p.verify(&idx, &all(&idx), &o).unwrap();
    check_data(&idx, &all(&idx), &p, &file_bytes(n * 128, 5));
    let free = (n * 16) / 112;
    let reads = p.reads.len() as u64;
    assert!(
        (n - free - 1000..=n - free + 1).contains(&reads),
        "{reads} reads"
    );
    assert!(
        p.arena_len <= n * 16 + free * 112 + n * 16 / 4 + reads * p.arena_align,
        "{}",
        p.arena_len
    );
    // A budget that covers every gap: as without a limit.
    o.free_gap_budget = n * 112;
    assert_eq!(
        plan(&idx, &all(&idx), &o).unwrap().reads.len(),
        (n * 128).div_ceil(1 << 20) as usize
    );
}

/// A filter picking small tensors out between larger ones: the gaps read for free take no more
/// host memory than the budget (or the selected bytes).
#[test]
fn free_gaps_take_at_most_their_budget_of_memory() {
    // 10 000 tensors of 64 bytes, each after a 4 KiB tensor that is not selected.
    let n = 10_000u64;
    let stride = 4096 + 64;
    let mut tensors = Vec::new();
    for i in 0..n {
        tensors.push(stored(&format!("big{i}"), i * stride..i * stride + 4096));
        tensors.push(stored(
            &format!("small{i}"),
            i * stride + 4096..(i + 1) * stride,
        ));
    }
    let idx = index(tensors, n * stride);
    let small: Vec<usize> = (0..n as usize).map(|i| 2 * i + 1).collect();
    let mut o = PlanOptions::new(n * stride);
    o.free_gap_budget = 1 << 20;
    let p = plan(&idx, &small, &o).unwrap();
    p.verify(&idx, &small, &o).unwrap();
    check_data(&idx, &small, &p, &file_bytes(n * stride, 9));
    // 640 000 selected bytes, at most 1 MiB of free gaps: 256 of them (and one more that the
    // amplification bound allows beside the first run's 257 tensors); the rest, one read each.
    let reads = p.reads.len() as u64;
    assert!(
        p.arena_len <= n * 64 + (1 << 20) + n * 64 / 4 + reads * p.arena_align,
        "{}",
        p.arena_len
    );
    assert!((n - 260..=n - 256).contains(&reads), "{reads} reads");
}

// ---------------------------------------------------------------------------------------------
// property tests against the naive oracle

/// One tensor of a generated object: gap before it, prefix length (taken from the gap), data
/// length, whether it is a synthesized `Zeros` tensor.
#[derive(Debug, Clone)]
struct Gen {
    gap: u64,
    prefix: Option<u64>,
    len: u64,
    zeros: bool,
}

fn gen_tensor() -> impl Strategy<Value = Gen> {
    (
        prop_oneof![3 => Just(0u64), 2 => 0u64..64, 2 => 0u64..6000],
        prop_oneof![4 => Just(None), 1 => (0u64..24).prop_map(Some)],
        prop_oneof![1 => Just(0u64), 3 => 1u64..300, 2 => 1u64..9000],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(gap, prefix, len, zeros)| Gen {
            gap,
            prefix,
            len,
            zeros,
        })
}

fn build(gens: &[Gen], tail: u64) -> TensorIndex {
    let mut off = 0u64;
    let mut tensors = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        if g.zeros {
            tensors.push(zeros(&format!("z{i}"), g.len));
            continue;
        }
        off += g.gap;
        let mut t = stored(&format!("t{i}"), off..off + g.len);
        if let Some(pl) = g.prefix {
            let pl = pl.min(g.gap);
            t.prefix = Some(off - pl..off);
        }
        off += g.len;
        tensors.push(t);
    }
    index(tensors, (off + tail).max(1))
}

fn gen_opts() -> impl Strategy<Value = (u64, u64, u64, f64, Layout)> {
    (
        prop_oneof![Just(1u64), Just(512), Just(4096)],
        prop_oneof![1u64..64, 1u64..20_000, Just(8u64 << 20)],
        prop_oneof![Just(0u64), 0u64..3000, 0u64..40_000],
        prop_oneof![
            Just(1.0f64),
            1.0f64..3.0,
            Just(f64::INFINITY),
            Just(f64::NAN)
        ],
        prop_oneof![
            Just(Layout::Mirror),
            prop_oneof![Just(1u64), Just(64), Just(256), Just(4096)]
                .prop_map(|align| Layout::Packed { align }),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn random_plans_load_every_selected_byte(
        gens in prop::collection::vec(gen_tensor(), 0..14),
        tail in prop_oneof![Just(0u64), 0u64..5000],
        pick in prop::collection::vec(prop::bool::weighted(0.7), 14),
        (alignment, chunk_size, max_gap, max_amplification, layout) in gen_opts(),
        seed in any::<u64>(),
    ) {
        let idx = build(&gens, tail);
        let selected: Vec<usize> = (0..idx.tensors.len()).filter(|&i| pick[i]).collect();
        let opts = PlanOptions {
            alignment,
            chunk_size,
            max_gap,
            max_amplification,
            // Sometimes none, sometimes more or less than max_gap.
            free_gap: [0, 7, 300, 5000][(seed % 4) as usize],
            free_gap_budget: [0, 100, 1 << 40][((seed / 4) % 3) as usize],
            layout,
            object_size: idx.object_size,
        };
        let p = plan(&idx, &selected, &opts).expect("valid input plans");
        if let Err(e) = p.verify(&idx, &selected, &opts) {
            panic!("{e}\nopts: {opts:?}\nplan: {p:#?}");
        }
        check_data(&idx, &selected, &p, &file_bytes(idx.object_size, seed));
    }

    /// Every tensor selected and no gap allowed: exactly the aligned needed blocks are read.
    #[test]
    fn without_gaps_only_needed_blocks_are_read(
        gens in prop::collection::vec(gen_tensor(), 1..10),
        alignment in prop_oneof![Just(1u64), Just(512), Just(4096)],
    ) {
        let idx = build(&gens, 0);
        let mut opts = strict(idx.object_size);
        opts.alignment = alignment;
        let p = plan_and_check(&idx, &all(&idx), &opts);
        let mut blocks = std::collections::BTreeSet::new();
        for t in idx.tensors.iter().filter(|t| t.source == TensorSource::Stored) {
            let s = t.prefix.as_ref().map_or(t.range.start, |pr| pr.start);
            // An empty needed range reads nothing.
            if s == t.range.end {
                continue;
            }
            for b in s / alignment..t.range.end.div_ceil(alignment) {
                blocks.insert(b);
            }
        }
        prop_assert_eq!(p.read_bytes, blocks.len() as u64 * alignment);
    }
}

/// A HostSink holds one load: running a second load into it fails (before, it dropped the
/// first load's memory without a word).
#[test]
fn a_host_sink_takes_one_load() {
    let idx = index(vec![stored("a", 0..100)], 100);
    let file = file_bytes(100, 9);
    let p = Arc::new(plan(&idx, &all(&idx), &strict(100)).unwrap());
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("m", file.clone()));
    let meta = be.stat().unwrap();
    let eo = crate::pipeline::EngineOptions::default();
    let (sink, _) = crate::pipeline::execute(
        be.clone(),
        &meta,
        p.clone(),
        crate::sink::HostSink::new(),
        &eo,
    )
    .unwrap();
    let e = crate::pipeline::execute(be, &meta, p.clone(), sink, &eo)
        .err()
        .expect("a second load into one sink");
    assert!(e.to_string().contains("already holds a load"), "{e}");
}

/// A host load's arena is kept out of forked children while reads land in it, and a child
/// forked after the load gets the model (no `dc`, "do not copy on fork", once it is done).
#[test]
fn a_loaded_arena_is_inherited_by_fork_again() {
    let size = 4u64 << 20;
    let idx = index(vec![stored("a", 0..size)], size);
    let file = file_bytes(size, 11);
    let p = Arc::new(plan(&idx, &all(&idx), &strict(size)).unwrap());
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("m", file));
    let meta = be.stat().unwrap();
    struct Watch(crate::sink::HostSink, Option<usize>);
    impl crate::sink::Sink for Watch {
        fn prepare(&mut self, plan: &Arc<Plan>) -> crate::Result<Vec<Option<IoBuf>>> {
            self.0.prepare(plan)
        }
        fn accept(&mut self, read: usize, buf: IoBuf) -> crate::Result<Vec<IoBuf>> {
            // During the load: the arena (where this read's bytes go) is out of children.
            let at = buf.region().base() as usize;
            if self.1.is_none() && buf.region().len() >= 4 << 20 {
                assert!(crate::testkit::vm_flags(at).contains(&"dc".to_string()));
                self.1 = Some(at);
            }
            self.0.accept(read, buf)
        }
        fn finish(&mut self) -> crate::Result<Vec<IoBuf>> {
            self.0.finish()
        }
    }
    let (sink, _) = crate::pipeline::execute(
        be,
        &meta,
        p,
        Watch(crate::sink::HostSink::new(), None),
        &crate::pipeline::EngineOptions::default(),
    )
    .unwrap();
    let at = sink.1.expect("a read landed in the arena");
    let (arena, _) = sink.0.into_parts().unwrap();
    assert_eq!(arena.region().base() as usize, at);
    assert!(!crate::testkit::vm_flags(at).contains(&"dc".to_string()));
}
