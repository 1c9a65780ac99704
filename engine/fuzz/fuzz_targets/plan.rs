//! `plan` on an arbitrary tensor list, selection and options: never panics, and a plan it
//! returns passes `Plan::verify` (every invariant the planner documents).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tensorstream_engine::plan::{plan, Layout, PlanOptions};
use tensorstream_engine::{DType, Format, TensorIndex, TensorInfo, TensorSource};

#[derive(Debug, Arbitrary)]
struct Tensor {
    /// Laid out after the previous tensor (gap, len) …
    gap: u16,
    len: u16,
    prefix: u8,
    zeros: bool,
    /// … or at raw absolute offsets (mostly invalid: overlaps, inverted, past the end).
    raw: Option<(u64, u64, Option<(u64, u64)>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    tensors: Vec<Tensor>,
    selected: Vec<u8>,
    select_all: bool,
    alignment_log2: u8,
    chunk_size: u64,
    max_gap: u64,
    max_amplification: f64,
    free_gap: u64,
    free_gap_budget: u64,
    packed: Option<u8>,
    tail: u16,
    object_size: Option<u64>,
}

fuzz_target!(|input: Input| {
    let mut off = 0u64;
    let mut tensors = Vec::new();
    for (i, t) in input.tensors.iter().take(64).enumerate() {
        let (range, prefix, source) = match t.raw {
            Some((s, e, p)) => (s..e, p.map(|(a, b)| a..b), TensorSource::Stored),
            None if t.zeros => (0..0, None, TensorSource::Zeros),
            None => {
                off += u64::from(t.gap);
                let pl = u64::from(t.prefix).min(u64::from(t.gap));
                let r = off..off + u64::from(t.len);
                off = r.end;
                let p = (t.prefix > 0).then(|| r.start - pl..r.start);
                (r, p, TensorSource::Stored)
            }
        };
        tensors.push(TensorInfo {
            name: format!("t{i}"),
            dtype: DType::U8,
            shape: vec![if source == TensorSource::Zeros {
                u64::from(t.len)
            } else {
                range.end.saturating_sub(range.start)
            }],
            range,
            source,
            path: None,
            prefix,
            role: None,
        });
    }
    let object_size = input.object_size.unwrap_or(off + u64::from(input.tail));
    let selected: Vec<usize> = if input.select_all {
        (0..tensors.len()).collect()
    } else {
        input.selected.iter().map(|&s| usize::from(s)).collect()
    };
    let idx = TensorIndex {
        format: Format::Safetensors,
        tensors,
        metadata: BTreeMap::new(),
        object_size,
        header_len: 0,
        version: 0,
    };
    let alignment = 1u64 << (input.alignment_log2 % 14);
    // Bound the work: at most ~100k reads.
    let chunk_size = input.chunk_size.max(object_size / 100_000);
    let opts = PlanOptions {
        alignment: if input.alignment_log2 >= 250 {
            3
        } else {
            alignment
        },
        chunk_size,
        max_gap: input.max_gap,
        max_amplification: input.max_amplification,
        free_gap: input.free_gap,
        free_gap_budget: input.free_gap_budget,
        layout: match input.packed {
            None => Layout::Mirror,
            Some(x) if x >= 250 => Layout::Packed { align: 0 },
            Some(x) => Layout::Packed {
                align: 1 << (x % 14),
            },
        },
        object_size,
    };
    if let Ok(p) = plan(&idx, &selected, &opts) {
        if let Err(e) = p.verify(&idx, &selected, &opts) {
            panic!("{e}\nopts: {opts:?}\nplan: {p:#?}");
        }
    }
});
