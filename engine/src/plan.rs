//! The planner: selected tensors → destination layout → reads.
//!
//! A [`Plan`] is plain data: where every selected tensor lands in one arena ([`Placement`]), and
//! the reads that bring the bytes there ([`ReadOp`], each split into per-tensor [`Segment`]s).
//! Tensors whose gaps are small are coalesced into one run (bounded read amplification, see
//! [`PlanOptions::max_gap`]), runs are aligned for O_DIRECT and chunked to the backend's preferred
//! size. [`Plan::verify`] checks a plan against every promise made here.
//!
//! Two layouts:
//! * [`Layout::Mirror`]: every run is placed in the arena exactly as it lies in the object (with
//!   its aligned superset reserved), so each read can land straight in the arena — no copy. Used
//!   for host loads.
//! * [`Layout::Packed`]: every tensor gets its own aligned slot (e.g. 256 B on a GPU); reads go to
//!   staging buffers and segments are copied to their slots.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::index::{TensorIndex, TensorSource};

/// How tensors are laid out in the destination arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Runs keep their object layout; reads land directly in the arena.
    Mirror,
    /// Each tensor aligned to `align` bytes (power of two); reads go through staging.
    Packed {
        /// Alignment of every tensor's first data byte in the arena.
        align: u64,
    },
}

/// Knobs of the planner.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Alignment of read offsets, lengths and (for Mirror) arena addresses; 1 = none.
    pub alignment: u64,
    /// Largest read (rounded down to a multiple of `alignment`, at least one alignment unit).
    pub chunk_size: u64,
    /// Coalescing. Two consecutive selected tensors (in object order) are read in one run when
    /// the *gap bytes* between them — the whole alignment blocks holding no byte either needs,
    /// read only to save a request — are at most `max_gap` and less than one chunk, and the
    /// run's gap bytes stay within [`max_amplification`](Self::max_amplification). Tensors that
    /// share an alignment block or lie in adjacent blocks cost no gap bytes and are always read
    /// together. With `alignment` 1 the gap bytes are simply the bytes between the tensors.
    ///
    /// So every byte a plan reads is in an aligned block holding needed bytes (alignment
    /// padding: the price of alignment, not of coalescing), or in a gap of at most `max_gap`
    /// bytes that is read completely; gaps not coalesced are not read at all.
    pub max_gap: u64,
    /// Per run, gap bytes read ≤ (`max_amplification` − 1) × the run's useful (needed) bytes.
    /// Values below 1 (and NaN) count as 1: no gap bytes. With `alignment` 1 this is: the run's
    /// read bytes ≤ `max_amplification` × its useful bytes.
    pub max_amplification: f64,
    /// Gaps of at most this many bytes (and at most `max_gap`, less than one chunk) are always
    /// read, whatever `max_amplification` says, and do not count towards a run's gap bytes:
    /// reading them costs less than the request (or system call) a split would add. Without
    /// it, tensors smaller than a few times the bytes between them (scalar scales, tensorizer's
    /// per-tensor headers when they are not verified, a filter picking every other small
    /// tensor) are read one request each: 100,000 requests for 100,000 such tensors. 0: every
    /// gap byte counts. The free gaps of a plan add up to at most `free_gap_budget` bytes or
    /// the selected tensors' bytes, whichever is more; past that, gaps count again.
    pub free_gap: u64,
    /// Most bytes of free gaps (see `free_gap`) in one plan, unless the selected tensors hold
    /// more bytes: with the `Mirror` layout gap bytes take host memory beside the tensors, so
    /// this bounds what they add (small tensors picked out between 4 KiB ones would otherwise
    /// take up to 65 times their own size).
    pub free_gap_budget: u64,
    /// Arena layout.
    pub layout: Layout,
    /// Size of the object (reads never start past it; aligned reads may end past it).
    pub object_size: u64,
}

impl PlanOptions {
    /// Defaults for an object of `object_size` bytes: unaligned, 8 MiB chunks, 256 KiB gaps,
    /// 1.25× amplification, gaps of up to 4 KiB always read, mirror layout.
    pub fn new(object_size: u64) -> Self {
        PlanOptions {
            alignment: 1,
            chunk_size: 8 << 20,
            max_gap: 256 << 10,
            max_amplification: 1.25,
            free_gap: 4096,
            free_gap_budget: 64 << 20,
            layout: Layout::Mirror,
            object_size,
        }
    }
}

/// Where one selected tensor lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Index into `TensorIndex::tensors`.
    pub tensor: usize,
    /// Arena offset of the tensor's first data byte.
    pub dest: u64,
    /// Data bytes (for `Zeros` tensors: the zero bytes to provide).
    pub len: u64,
    /// Object range that must be loaded for this tensor (prefix + data); empty when nothing is read.
    pub needed: Range<u64>,
    /// Arena offset where `needed.start` lands.
    pub needed_dest: u64,
}

/// A piece of one read belonging to one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Index into `Plan::placements`.
    pub placement: usize,
    /// Object range of the piece.
    pub obj: Range<u64>,
    /// Arena offset where the piece goes.
    pub dest: u64,
}

/// One read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOp {
    /// Object range to read (aligned; may end past EOF only by less than the alignment).
    pub obj: Range<u64>,
    /// For Mirror plans: the arena offset where `obj.start` lands (the read goes straight there).
    pub direct: Option<u64>,
    /// The useful pieces, in object order.
    pub segments: Vec<Segment>,
}

impl ReadOp {
    /// Length of the read in bytes.
    pub fn len(&self) -> u64 {
        self.obj.end - self.obj.start
    }
    /// True for an empty read (never produced by the planner).
    pub fn is_empty(&self) -> bool {
        self.obj.is_empty()
    }
}

/// A complete load plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Selected tensors, in object order.
    pub placements: Vec<Placement>,
    /// Reads, in object order.
    pub reads: Vec<ReadOp>,
    /// Bytes the arena must hold.
    pub arena_len: u64,
    /// Alignment the arena's base address must have.
    pub arena_align: u64,
    /// Sum of the selected tensors' needed bytes.
    pub useful_bytes: u64,
    /// Sum of all reads' lengths.
    pub read_bytes: u64,
}

/// `max_amplification`, at least 1 (NaN counts as 1).
fn amplification(opts: &PlanOptions) -> f64 {
    if opts.max_amplification.is_nan() {
        1.0
    } else {
        opts.max_amplification.max(1.0)
    }
}

/// The bytes of free gaps (see [`PlanOptions::free_gap`]) a plan may read: the budget, or the
/// bytes of the `needed` ranges (disjoint, inside the object) if they are more.
pub(crate) fn free_gap_budget<'r>(
    opts: &PlanOptions,
    needed: impl Iterator<Item = &'r Range<u64>>,
) -> u64 {
    let selected = needed.fold(0u64, |a, r| a.saturating_add(r.end - r.start));
    opts.free_gap_budget.max(selected)
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}
fn align_up(x: u64, a: u64) -> Option<u64> {
    let r = x % a;
    if r == 0 {
        Some(x)
    } else {
        x.checked_add(a - r)
    }
}

/// Builds the plan for the tensors `selected` (indices into `index.tensors`, any order).
pub fn plan(index: &TensorIndex, selected: &[usize], opts: &PlanOptions) -> Result<Plan> {
    let a = opts.alignment.max(1);
    if !a.is_power_of_two() {
        return Err(Error::invalid(format!(
            "alignment {a} is not a power of two"
        )));
    }
    if let Layout::Packed { align } = opts.layout {
        if !align.is_power_of_two() {
            return Err(Error::invalid(format!(
                "tensor alignment {align} is not a power of two"
            )));
        }
    }
    let chunk = (opts.chunk_size / a).max(1) * a;
    let overflow = || Error::invalid("plan offsets overflow");
    let arena_align = match opts.layout {
        Layout::Mirror => a.max(64),
        Layout::Packed { align } => align.max(64),
    };

    // Needed ranges, sorted by object position.
    let mut sel: Vec<usize> = selected.to_vec();
    sel.sort_unstable();
    sel.dedup();
    let mut items: Vec<(usize, Range<u64>, u64)> = Vec::with_capacity(sel.len()); // (tensor, needed, data offset within needed)
    for &ti in &sel {
        let t = index
            .tensors
            .get(ti)
            .ok_or_else(|| Error::invalid(format!("tensor #{ti} is not in the index")))?;
        let (needed, data_off) = match t.source {
            TensorSource::Zeros => (0..0, 0),
            TensorSource::Stored => {
                if t.range.start > t.range.end {
                    return Err(Error::corrupt(format!(
                        "tensor {:?}: byte range {}..{} ends before it starts",
                        t.name, t.range.start, t.range.end
                    )));
                }
                if let Some(p) = &t.prefix {
                    if p.start > p.end || p.end > t.range.start {
                        return Err(Error::corrupt(format!(
                            "tensor {:?}: prefix {}..{} does not precede its data {}..{}",
                            t.name, p.start, p.end, t.range.start, t.range.end
                        )));
                    }
                }
                let start = t.prefix.as_ref().map_or(t.range.start, |p| p.start);
                if t.range.end > opts.object_size {
                    return Err(Error::corrupt(format!(
                        "tensor {:?}: byte range {}..{} lies outside the object ({} bytes)",
                        t.name, t.range.start, t.range.end, opts.object_size
                    )));
                }
                (start..t.range.end, t.range.start - start)
            }
        };
        items.push((ti, needed, data_off));
    }
    items.sort_by_key(|(ti, r, _)| (r.is_empty(), r.start, *ti));
    for w in items.windows(2) {
        if !w[0].1.is_empty() && !w[1].1.is_empty() && w[1].1.start < w[0].1.end {
            return Err(Error::corrupt(format!(
                "tensors {:?} and {:?} overlap in the object",
                index.tensors[w[0].0].name, index.tensors[w[1].0].name
            )));
        }
    }

    // Group into runs of consecutive non-empty needed ranges (see `PlanOptions::max_gap` for
    // the rule). The gap bytes a merge reads are the whole alignment blocks between the run and
    // the next range: blocks holding needed bytes are read either way.
    let amp = amplification(opts);
    let mut free_left = free_gap_budget(opts, items.iter().map(|(_, r, _)| r));
    // (object range, item indices, useful bytes, gap bytes read)
    let mut runs: Vec<(Range<u64>, Vec<usize>, u64, u64)> = Vec::new();
    for (i, (_, r, _)) in items.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        let len = r.end - r.start;
        if let Some((run, members, run_useful, run_waste)) = runs.last_mut() {
            let waste =
                align_down(r.start, a).saturating_sub(align_up(run.end, a).ok_or_else(overflow)?);
            // Disjoint ranges inside the object: these sums cannot overflow.
            let useful = *run_useful + len;
            let allowed = waste <= opts.max_gap && waste < chunk;
            let free = waste <= opts.free_gap && waste <= free_left;
            let total_waste = *run_waste + if free { 0 } else { waste };
            let merge = waste == 0
                || (allowed && (free || (total_waste as f64) <= (useful as f64) * (amp - 1.0)));
            if merge {
                if free {
                    free_left -= waste;
                }
                run.end = r.end;
                members.push(i);
                *run_useful = useful;
                *run_waste = total_waste;
                continue;
            }
        }
        runs.push((r.clone(), vec![i], len, 0));
    }

    let mut placements: Vec<Placement> = Vec::with_capacity(items.len());
    let mut place_of_item = vec![usize::MAX; items.len()];
    let mut reads = Vec::new();
    let mut cursor: u64 = 0;

    for (run, members, _, _) in &runs {
        let ra = align_down(run.start, a);
        // `run.end <= object_size`, so this ends less than one alignment unit past the object.
        let ru = align_up(run.end, a).ok_or_else(overflow)?;
        // Placements of the run's tensors.
        let run_dest = match opts.layout {
            Layout::Mirror => {
                cursor = align_up(cursor, arena_align).ok_or_else(overflow)?;
                let d = cursor;
                cursor = cursor.checked_add(ru - ra).ok_or_else(overflow)?;
                Some(d)
            }
            Layout::Packed { .. } => None,
        };
        for &m in members {
            let (ti, ref needed, data_off) = items[m];
            let needed_dest = match (run_dest, opts.layout) {
                (Some(d), _) => d + (needed.start - ra),
                (None, Layout::Packed { align }) => {
                    let data_dest =
                        align_up(cursor.checked_add(data_off).ok_or_else(overflow)?, align)
                            .ok_or_else(overflow)?;
                    let nd = data_dest - data_off;
                    cursor = nd
                        .checked_add(needed.end - needed.start)
                        .ok_or_else(overflow)?;
                    nd
                }
                (None, Layout::Mirror) => unreachable!("mirror runs always have a destination"),
            };
            place_of_item[m] = placements.len();
            placements.push(Placement {
                tensor: ti,
                dest: needed_dest + data_off,
                len: needed.end - needed.start - data_off,
                needed: needed.clone(),
                needed_dest,
            });
        }
        // Chunked reads over the aligned superset, with their segments.
        let mut off = ra;
        let mut mi = 0usize;
        while off < ru {
            // (Saturating: a chunk of "any size", u64::MAX say, makes one read of the run.)
            let end = off.saturating_add(chunk).min(ru);
            let mut segments = Vec::new();
            while mi < members.len() {
                let m = members[mi];
                let needed = &items[m].1;
                if needed.start >= end {
                    break;
                }
                let s = needed.start.max(off);
                let e = needed.end.min(end);
                if s < e {
                    let p = &placements[place_of_item[m]];
                    segments.push(Segment {
                        placement: place_of_item[m],
                        obj: s..e,
                        dest: p.needed_dest + (s - needed.start),
                    });
                }
                if needed.end <= end {
                    mi += 1;
                } else {
                    break;
                }
            }
            if !segments.is_empty() {
                reads.push(ReadOp {
                    obj: off..end,
                    direct: run_dest.map(|d| d + (off - ra)),
                    segments,
                });
            }
            off = end;
        }
    }
    // Tensors with nothing to read: zero-size and synthesized ones get their own slots.
    for (m, (ti, needed, _)) in items.iter().enumerate() {
        if !needed.is_empty() {
            continue;
        }
        let t = &index.tensors[*ti];
        let len = t.nbytes();
        let align = match opts.layout {
            Layout::Packed { align } => align,
            Layout::Mirror => 64,
        };
        cursor = align_up(cursor, align).ok_or_else(overflow)?;
        place_of_item[m] = placements.len();
        placements.push(Placement {
            tensor: *ti,
            dest: cursor,
            len,
            needed: 0..0,
            needed_dest: cursor,
        });
        cursor = cursor.checked_add(len).ok_or_else(overflow)?;
    }
    let useful_bytes = placements
        .iter()
        .map(|p| p.needed.end - p.needed.start)
        .sum();
    let read_bytes = reads.iter().map(|r| r.len()).sum();
    Ok(Plan {
        placements,
        reads,
        arena_len: cursor,
        arena_align,
        useful_bytes,
        read_bytes,
    })
}

#[cfg(test)]
mod tests;
mod verify;
