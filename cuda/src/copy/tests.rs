use proptest::prelude::*;
use tensorstream_engine::plan::{plan, Layout, PlanOptions, ReadOp, Segment};
use tensorstream_engine::{DType, Format, TensorIndex, TensorInfo, TensorSource};

use super::*;

fn index(sizes: &[u64], header: u64, gap: u64) -> (TensorIndex, Vec<u8>) {
    let mut tensors = Vec::new();
    let mut off = header;
    for (i, &n) in sizes.iter().enumerate() {
        tensors.push(TensorInfo {
            name: format!("t{i}"),
            dtype: DType::U8,
            shape: vec![n],
            range: off..off + n,
            source: TensorSource::Stored,
            path: None,
            prefix: None,
            role: None,
        });
        off += n + gap;
    }
    let file: Vec<u8> = (0..off).map(|i| (i * 7 + i / 251) as u8).collect();
    (
        TensorIndex {
            format: Format::Safetensors,
            tensors,
            metadata: Default::default(),
            object_size: off,
            header_len: header,
            version: 0,
        },
        file,
    )
}

/// Oracle: copying every read through its copy list lands each tensor's exact bytes.
fn check_reads(idx: &TensorIndex, file: &[u8], plan: &Plan) {
    let mut arena = vec![0xAAu8; plan.arena_len as usize];
    let mut landed_total = vec![0u64; plan.placements.len()];
    for op in &plan.reads {
        let end = (op.obj.end as usize).min(file.len());
        let slot = &file[op.obj.start as usize..end];
        let segs = read_copies(op, op.len(), plan.arena_len).unwrap();
        for (p, n) in landed(&segs) {
            landed_total[p] += n;
        }
        for c in coalesce(&segs) {
            let (s, d, n) = (c.src as usize, c.dst as usize, c.len as usize);
            arena[d..d + n].copy_from_slice(&slot[s..s + n]);
        }
    }
    for (i, p) in plan.placements.iter().enumerate() {
        let t = &idx.tensors[p.tensor];
        let want = &file[t.range.start as usize..t.range.end as usize];
        let got = &arena[p.dest as usize..(p.dest + p.len) as usize];
        assert_eq!(got, want, "tensor {}", t.name);
        assert_eq!(landed_total[i], p.needed.end - p.needed.start);
        assert_eq!(p.dest % 256, 0, "tensor {} not 256-aligned", t.name);
    }
}

fn packed(idx: &TensorIndex, chunk: u64, align: u64) -> Plan {
    let mut o = PlanOptions::new(idx.object_size);
    o.layout = Layout::Packed { align: 256 };
    o.chunk_size = chunk;
    o.alignment = align;
    let sel: Vec<usize> = (0..idx.tensors.len()).collect();
    plan(idx, &sel, &o).unwrap()
}

#[test]
fn read_copies_table() {
    let op = ReadOp {
        obj: 100..200,
        direct: None,
        segments: vec![
            Segment {
                placement: 0,
                obj: 100..130,
                dest: 0,
            },
            Segment {
                placement: 1,
                obj: 130..200,
                dest: 30,
            },
        ],
    };
    let segs = read_copies(&op, 100, 1000).unwrap();
    assert_eq!(
        segs,
        vec![
            SegCopy {
                placement: 0,
                src: 0,
                dst: 0,
                len: 30
            },
            SegCopy {
                placement: 1,
                src: 30,
                dst: 30,
                len: 70
            }
        ]
    );
    // Contiguous in slot and arena: one copy call.
    assert_eq!(
        coalesce(&segs),
        vec![CopyOp {
            src: 0,
            dst: 0,
            len: 100
        }]
    );
    assert_eq!(landed(&segs), vec![(0, 30), (1, 70)]);
    // Slot holds fewer bytes than the segments need.
    assert!(read_copies(&op, 99, 1000).is_err());
    // Arena too small.
    assert!(read_copies(&op, 100, 99).is_err());
    // Segment outside its read.
    let mut bad = op.clone();
    bad.segments[1].obj = 130..201;
    assert!(read_copies(&bad, 200, 1000).is_err());
    // Overflowing destination.
    let mut bad = op.clone();
    bad.segments[0].dest = u64::MAX - 5;
    assert!(read_copies(&bad, 100, u64::MAX).is_err());
}

#[test]
fn coalesce_keeps_gaps_apart() {
    let segs = [
        SegCopy {
            placement: 0,
            src: 0,
            dst: 0,
            len: 10,
        },
        SegCopy {
            placement: 1,
            src: 10,
            dst: 256,
            len: 10,
        },
        SegCopy {
            placement: 2,
            src: 20,
            dst: 266,
            len: 5,
        },
        SegCopy {
            placement: 3,
            src: 40,
            dst: 271,
            len: 5,
        },
    ];
    let c = coalesce(&segs);
    assert_eq!(c.len(), 3);
    assert_eq!(
        c[1],
        CopyOp {
            src: 10,
            dst: 256,
            len: 15
        }
    );
}

#[test]
fn planner_plans_copy_exactly_and_align_256() {
    let (idx, file) = index(&[1000, 0, 7, 65536, 3, 200_000, 1, 4096], 77, 0);
    for (chunk, align) in [(4096u64, 1u64), (8192, 512), (1 << 20, 4096), (300, 1)] {
        let p = packed(&idx, chunk, align);
        check_reads(&idx, &file, &p);
        assert_eq!(p.arena_align % 256, 0);
    }
}

#[test]
fn round_robin_cycles() {
    let mut rr = RoundRobin::new(3);
    let v: Vec<usize> = (0..7).map(|_| rr.next_index()).collect();
    assert_eq!(v, vec![0, 1, 2, 0, 1, 2, 0]);
    let mut one = RoundRobin::new(0);
    assert_eq!((one.next_index(), one.next_index()), (0, 0));
}

#[test]
fn pieces_reject_bad_page_and_past_eof() {
    let (idx, _) = index(&[100, 100], 8, 0);
    let p = packed(&idx, 1 << 20, 1);
    assert!(pieces(&p, 4096, 3000, 4096, idx.object_size).is_err());
    assert!(pieces(&p, 4096, 4096, 4096, idx.object_size - 1).is_err());
}

#[test]
fn pieces_refuse_segments_out_of_file_order() {
    // A hand-built plan (the fields are public) whose second segment lies before the first,
    // in the same piece: refused, not an underflowing offset (a panic in debug builds).
    let (idx, _) = index(&[8000], 0, 0);
    let mut p = packed(&idx, 1 << 20, 1);
    let seg = |obj: std::ops::Range<u64>, dest| Segment {
        placement: 0,
        obj,
        dest,
    };
    p.reads = vec![ReadOp {
        obj: 0..8192,
        direct: None,
        segments: vec![seg(5000..6000, 5000), seg(100..200, 100)],
    }];
    let e = pieces(&p, 16 << 20, 4096, 1 << 20, idx.object_size).unwrap_err();
    assert!(e.to_string().contains("out of file order"), "{e}");
    // Overlapping ones too.
    p.reads[0].segments = vec![seg(100..300, 100), seg(200..400, 200)];
    assert!(pieces(&p, 16 << 20, 4096, 1 << 20, idx.object_size).is_err());
}

/// Simulates the warm path: each piece is "registered" (its page range must be disjoint from
/// every other piece's), its copies run, and chunked pread fallbacks give the same bytes.
fn check_pieces(idx: &TensorIndex, file: &[u8], plan: &Plan, piece: u64, chunk: u64) {
    let page = 4096u64;
    let ps = pieces(plan, piece, page, 1 << 20, file.len() as u64).unwrap();
    let map_end = (file.len() as u64).div_ceil(page) * page;
    let mut prev_end = 0u64;
    let mut a = vec![0u8; plan.arena_len as usize];
    let mut b = vec![0u8; plan.arena_len as usize];
    let mut total = vec![0u64; plan.placements.len()];
    for p in &ps {
        assert_eq!(p.obj.start % page, 0);
        assert_eq!(p.obj.end % page, 0);
        assert!(p.obj.start >= prev_end, "pieces share a page");
        assert!(p.obj.end <= map_end);
        assert!(p.obj.end - p.obj.start <= piece.max(page) / page * page + page);
        prev_end = p.obj.end;
        // Registered: copies straight from the mapped piece.
        for c in coalesce(&p.copies) {
            assert!(c.src + c.len <= p.obj.end - p.obj.start);
            let s = (p.obj.start + c.src) as usize;
            a[c.dst as usize..(c.dst + c.len) as usize]
                .copy_from_slice(&file[s..s + c.len as usize]);
        }
        for (pl, n) in landed(&p.copies) {
            total[pl] += n;
        }
        // Fallback: chunked reads through a bounce slot.
        let mut off = 0;
        while off < p.obj.end - p.obj.start {
            let end = (off + chunk).min(p.obj.end - p.obj.start);
            for c in coalesce(&clip(&p.copies, off..end)) {
                assert!(c.src + c.len <= end - off);
                let s = (p.obj.start + off + c.src) as usize;
                b[c.dst as usize..(c.dst + c.len) as usize]
                    .copy_from_slice(&file[s..s + c.len as usize]);
            }
            off = end;
        }
    }
    for (i, pl) in plan.placements.iter().enumerate() {
        let t = &idx.tensors[pl.tensor];
        let want = &file[t.range.start as usize..t.range.end as usize];
        assert_eq!(&a[pl.dest as usize..(pl.dest + pl.len) as usize], want);
        assert_eq!(&b[pl.dest as usize..(pl.dest + pl.len) as usize], want);
        assert_eq!(total[i], pl.needed.end - pl.needed.start);
    }
}

#[test]
fn pieces_cover_plan_exactly() {
    let (idx, file) = index(&[10_000, 5, 70_000, 0, 123_457, 4096, 1], 100, 0);
    let p = packed(&idx, 1 << 20, 1);
    for (piece, chunk) in [(4096, 4096), (8192, 3000), (1 << 20, 65536), (12288, 1)] {
        check_pieces(&idx, &file, &p, piece, chunk);
    }
    // Large gaps between selected tensors start new pieces.
    let (idx, file) = index(&[5000, 5000, 5000], 10, 3 << 20);
    let p = packed(&idx, 1 << 20, 1);
    let ps = pieces(&p, 64 << 20, 4096, 1 << 20, idx.object_size).unwrap();
    assert_eq!(ps.len(), 3);
    check_pieces(&idx, &file, &p, 64 << 20, 8192);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_plans_copy_exactly(
        sizes in proptest::collection::vec(0u64..40_000, 1..12),
        header in 8u64..5000,
        gap in 0u64..3000,
        chunk in 1u64..70_000,
        align_pow in 0u32..13,
        piece_pages in 1u64..8,
        bounce in 1u64..20_000,
    ) {
        let (idx, file) = index(&sizes, header, gap);
        let p = packed(&idx, chunk, 1u64 << align_pow);
        check_reads(&idx, &file, &p);
        check_pieces(&idx, &file, &p, piece_pages * 4096, bounce);
    }
}

#[test]
fn windows_follow_one_another_aligned() {
    let (off, total) = pack_windows([(1000, 256), (0, 256), (256, 256), (1, 512), (5, 0)]).unwrap();
    assert_eq!(off, vec![0, 1024, 1024, 1536, 1537]);
    assert_eq!(total, 1542);
    assert_eq!(pack_windows([]).unwrap(), (vec![], 0));
}

#[test]
fn windows_refuse_overflow_and_odd_alignments() {
    assert!(pack_windows([(u64::MAX - 10, 1), (5, 256)]).is_err());
    assert!(pack_windows([(u64::MAX, 1), (1, 1)]).is_err());
    assert!(pack_windows([(10, 3)]).is_err());
}

proptest! {
    /// Windows never overlap, keep their order and alignment, and fit the total.
    #[test]
    fn windows_are_disjoint_and_aligned(parts in proptest::collection::vec((0u64..1 << 40, 0u32..13), 0..20)) {
        let parts: Vec<(u64, u64)> = parts.into_iter().map(|(l, a)| (l, 1u64 << a)).collect();
        let (off, total) = pack_windows(parts.iter().copied()).unwrap();
        let mut end = 0;
        for (&o, &(len, align)) in off.iter().zip(&parts) {
            prop_assert!(o >= end && o % align == 0 && o - end < align);
            end = o + len;
        }
        prop_assert_eq!(end, total);
    }
}
