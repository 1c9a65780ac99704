//! [`Plan::verify`]: checks a plan against everything the planner promises.

use super::{align_down, align_up, Layout, Plan, PlanOptions};
use crate::error::{Error, Result};
use crate::index::{TensorIndex, TensorSource};

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Error::invalid(format!(
                "plan invariant violated: {}",
                format!($($msg)+)
            )));
        }
    };
}

/// An arena window `[start, end)` and, for windows filled by reads, the translation
/// `arena offset − object offset` of its bytes.
struct Window {
    start: u64,
    end: u64,
    shift: Option<i128>,
}

impl Plan {
    /// Checks the structure every sink relies on, in O(reads + segments + placements), so that
    /// a plan built or changed by hand fails with an error instead of a panic or bytes in the
    /// wrong place ([`crate::execute`] calls it): placements' needed ranges and windows are
    /// well formed and inside `arena_len`; reads are non-empty, all direct or none, direct
    /// windows inside `arena_len`; segments name a placement, lie inside their read and that placement's
    /// needed range, in order, and land inside the arena. [`Plan::verify`] checks everything
    /// the planner promises.
    pub fn validate(&self) -> Result<()> {
        let arena = self.arena_len;
        let inside = |start: u64, len: u64| start.checked_add(len).is_some_and(|e| e <= arena);
        for (i, p) in self.placements.iter().enumerate() {
            ensure!(
                p.needed.start <= p.needed.end,
                "placement {i}: needed range {:?} is inverted",
                p.needed
            );
            let needed = p.needed.end - p.needed.start;
            ensure!(
                inside(p.needed_dest, needed),
                "placement {i}: needed bytes at {}+{needed} lie outside the {arena}-byte arena",
                p.needed_dest
            );
            ensure!(
                inside(p.dest, p.len),
                "placement {i}: data at {}+{} lies outside the {arena}-byte arena",
                p.dest,
                p.len
            );
            ensure!(
                needed == 0 || (p.dest >= p.needed_dest && p.dest - p.needed_dest <= needed),
                "placement {i}: data at {} does not lie in its needed window at {}",
                p.dest,
                p.needed_dest
            );
        }
        // Sinks lend either arena windows (every read direct) or staging slots (none): a plan
        // mixing the two would have a staged read's bytes taken for landed in place.
        let directs = self.reads.iter().filter(|op| op.direct.is_some()).count();
        ensure!(
            directs == 0 || directs == self.reads.len(),
            "{directs} of the {} reads land directly in the arena and the others are staged: a \
             plan's reads are all direct or none",
            self.reads.len()
        );
        for (r, op) in self.reads.iter().enumerate() {
            ensure!(
                op.obj.start < op.obj.end,
                "read {r}: range {:?} is empty or inverted",
                op.obj
            );
            if let Some(d) = op.direct {
                ensure!(
                    inside(d, op.len()),
                    "read {r}: direct window at {d}+{} lies outside the {arena}-byte arena",
                    op.len()
                );
            }
            let mut pos = op.obj.start;
            for seg in &op.segments {
                let p = self.placements.get(seg.placement);
                ensure!(
                    p.is_some(),
                    "read {r}: a segment names placement {} of {}",
                    seg.placement,
                    self.placements.len()
                );
                let p = p.expect("checked just above");
                ensure!(
                    pos <= seg.obj.start
                        && seg.obj.start <= seg.obj.end
                        && seg.obj.end <= op.obj.end,
                    "read {r}: segment {:?} is out of order or outside the read {:?}",
                    seg.obj,
                    op.obj
                );
                ensure!(
                    p.needed.start <= seg.obj.start && seg.obj.end <= p.needed.end,
                    "read {r}: segment {:?} lies outside placement {}'s needed range {:?}",
                    seg.obj,
                    seg.placement,
                    p.needed
                );
                ensure!(
                    inside(seg.dest, seg.obj.end - seg.obj.start),
                    "read {r}: segment for arena {}+{} lies outside the {arena}-byte arena",
                    seg.dest,
                    seg.obj.end - seg.obj.start
                );
                pos = seg.obj.end;
            }
        }
        Ok(())
    }

    /// Checks that this plan is what [`super::plan`]`(index, selected, opts)` promises, and returns
    /// an [`InvalidInput`](crate::ErrorKind::InvalidInput) error naming the first violation:
    ///
    /// * placements are exactly the selected tensors, each with its needed range (prefix +
    ///   data), length and destination; their arena windows are disjoint and inside
    ///   `arena_len`; with [`Layout::Packed`] every tensor's `dest` is aligned;
    /// * reads are non-empty, sorted, disjoint, aligned (start and end), at most one chunk long,
    ///   start before the end of the object and end before its aligned end; each carries at
    ///   least one segment;
    /// * segments lie inside their read and their tensor's needed range, land at
    ///   `needed_dest + offset`, and cover every needed byte exactly once;
    /// * [`Layout::Mirror`]: every read has a `direct` window, aligned, inside `arena_len`,
    ///   disjoint from the other reads' windows and from tensors that read nothing, and landing
    ///   every byte where its tensor expects it; [`Layout::Packed`]: no read is direct;
    /// * the coalescing bound documented on [`PlanOptions::max_gap`] and
    ///   [`PlanOptions::max_amplification`], and nothing else is read;
    /// * `useful_bytes`, `read_bytes` and `arena_align` are consistent.
    ///
    /// Cost: O(n log n) in tensors and reads. Used by the tests and fuzz targets.
    pub fn verify(
        &self,
        index: &TensorIndex,
        selected: &[usize],
        opts: &PlanOptions,
    ) -> Result<()> {
        let a = opts.alignment.max(1);
        ensure!(a.is_power_of_two(), "alignment {a} is not a power of two");
        let chunk = (opts.chunk_size / a).max(1) * a;
        let eof_aligned = align_up(opts.object_size, a).unwrap_or(u64::MAX);
        let amp = super::amplification(opts);

        // Placements.
        let mut sel: Vec<usize> = selected.to_vec();
        sel.sort_unstable();
        sel.dedup();
        let mut placed: Vec<usize> = self.placements.iter().map(|p| p.tensor).collect();
        placed.sort_unstable();
        ensure!(
            placed == sel,
            "placements {placed:?} are not the selected tensors {sel:?}"
        );
        ensure!(
            self.arena_align.is_power_of_two(),
            "arena alignment {} is not a power of two",
            self.arena_align
        );
        match opts.layout {
            Layout::Mirror => ensure!(
                self.arena_align >= a,
                "arena alignment {} below the read alignment {a}",
                self.arena_align
            ),
            Layout::Packed { align } => {
                ensure!(
                    align.is_power_of_two(),
                    "tensor alignment {align} is not a power of two"
                );
                ensure!(
                    self.arena_align >= align,
                    "arena alignment {} below the tensor alignment {align}",
                    self.arena_align
                )
            }
        }
        let mut windows = Vec::with_capacity(self.placements.len());
        let mut useful = 0u64;
        let mut last_needed_start = None;
        for (k, p) in self.placements.iter().enumerate() {
            let Some(t) = index.tensors.get(p.tensor) else {
                ensure!(false, "placement {k} names tensor #{}", p.tensor);
                unreachable!()
            };
            let (needed, len) = match t.source {
                TensorSource::Stored => (
                    t.prefix.as_ref().map_or(t.range.start, |pr| pr.start)..t.range.end,
                    t.range.end.saturating_sub(t.range.start),
                ),
                TensorSource::Zeros => (0..0, t.nbytes()),
            };
            // Nothing to read is spelt `0..0`.
            let needed = if needed.is_empty() { 0..0 } else { needed };
            ensure!(
                p.needed == needed && p.len == len,
                "placement {k} ({:?}): needed {:?} len {} instead of {needed:?} len {len}",
                t.name,
                p.needed,
                p.len
            );
            if let Layout::Packed { align } = opts.layout {
                ensure!(
                    p.dest % align == 0,
                    "placement {k}: dest {} not aligned to {align}",
                    p.dest
                );
            }
            let w = if needed.is_empty() {
                ensure!(p.needed_dest == p.dest, "placement {k}: needed_dest moved");
                Window {
                    start: p.dest,
                    end: p.dest.saturating_add(len),
                    shift: None,
                }
            } else {
                if let Some(prev) = last_needed_start {
                    ensure!(prev < needed.start, "placements not in object order at {k}");
                }
                last_needed_start = Some(needed.start);
                useful = useful.saturating_add(needed.end - needed.start);
                ensure!(
                    p.dest.checked_sub(p.needed_dest) == t.range.start.checked_sub(needed.start),
                    "placement {k}: dest {} is not needed_dest {} + prefix length",
                    p.dest,
                    p.needed_dest
                );
                Window {
                    start: p.needed_dest,
                    end: p.needed_dest.saturating_add(needed.end - needed.start),
                    shift: Some(p.needed_dest as i128 - needed.start as i128),
                }
            };
            ensure!(
                w.end <= self.arena_len,
                "placement {k}: window {}..{} past arena_len {}",
                w.start,
                w.end,
                self.arena_len
            );
            if w.start < w.end {
                windows.push(w);
            }
        }
        windows.sort_by_key(|w| w.start);
        for pair in windows.windows(2) {
            ensure!(
                pair[0].end <= pair[1].start,
                "tensor windows {}..{} and {}..{} overlap in the arena",
                pair[0].start,
                pair[0].end,
                pair[1].start,
                pair[1].end
            );
        }
        ensure!(
            self.useful_bytes == useful,
            "useful_bytes {} != {useful}",
            self.useful_bytes
        );

        // Reads and segments.
        let mut covered: Vec<u64> = self.placements.iter().map(|p| p.needed.start).collect();
        let mut read_bytes = 0u64;
        let mut direct = Vec::new();
        for (i, r) in self.reads.iter().enumerate() {
            let o = &r.obj;
            ensure!(o.start < o.end, "read {i} {o:?} is empty");
            ensure!(
                o.start % a == 0 && o.end % a == 0,
                "read {i} {o:?} not aligned to {a}"
            );
            ensure!(
                r.len() <= chunk,
                "read {i} {o:?} longer than the chunk {chunk}"
            );
            ensure!(
                o.start < opts.object_size && o.end <= eof_aligned,
                "read {i} {o:?} past the end of the object ({} bytes)",
                opts.object_size
            );
            if i > 0 {
                ensure!(
                    self.reads[i - 1].obj.end <= o.start,
                    "reads {} and {i} overlap or are out of order",
                    i - 1
                );
            }
            read_bytes = read_bytes.saturating_add(r.len());
            ensure!(!r.segments.is_empty(), "read {i} {o:?} has no segment");
            match (opts.layout, r.direct) {
                (Layout::Mirror, Some(d)) => {
                    ensure!(d % a == 0, "read {i}: direct offset {d} not aligned to {a}");
                    ensure!(
                        d.checked_add(r.len()).is_some_and(|e| e <= self.arena_len),
                        "read {i}: direct window {d}+{} past arena_len {}",
                        r.len(),
                        self.arena_len
                    );
                    direct.push((d, d.saturating_add(r.len()), d as i128 - o.start as i128));
                }
                (Layout::Mirror, None) => ensure!(false, "mirror read {i} is not direct"),
                (Layout::Packed { .. }, d) => {
                    ensure!(d.is_none(), "packed read {i} is direct")
                }
            }
            let mut prev_end = o.start;
            for s in &r.segments {
                ensure!(
                    s.obj.start < s.obj.end && prev_end <= s.obj.start && s.obj.end <= o.end,
                    "read {i}: segment {:?} empty, out of order or outside {o:?}",
                    s.obj
                );
                prev_end = s.obj.end;
                let Some(p) = self.placements.get(s.placement) else {
                    ensure!(false, "read {i}: segment names placement {}", s.placement);
                    unreachable!()
                };
                ensure!(
                    covered[s.placement] == s.obj.start && s.obj.end <= p.needed.end,
                    "read {i}: segment {:?} of placement {} does not continue its coverage \
                     (covered up to {} of {:?})",
                    s.obj,
                    s.placement,
                    covered[s.placement],
                    p.needed
                );
                covered[s.placement] = s.obj.end;
                let want = p.needed_dest.checked_add(s.obj.start - p.needed.start);
                ensure!(
                    Some(s.dest) == want,
                    "read {i}: segment {:?} lands at {} instead of {want:?}",
                    s.obj,
                    s.dest
                );
                if let Some(d) = r.direct {
                    ensure!(
                        Some(s.dest) == d.checked_add(s.obj.start - o.start),
                        "read {i}: segment {:?} is not where the direct read puts it",
                        s.obj
                    );
                }
            }
        }
        for (k, p) in self.placements.iter().enumerate() {
            ensure!(
                covered[k] == p.needed.end,
                "placement {k}: needed {:?} covered only up to {}",
                p.needed,
                covered[k]
            );
        }
        ensure!(
            self.read_bytes == read_bytes,
            "read_bytes {} != {read_bytes}",
            self.read_bytes
        );

        // Direct windows: disjoint, and writing only bytes their tensors expect.
        direct.sort_by_key(|w| w.0);
        for pair in direct.windows(2) {
            ensure!(
                pair[0].1 <= pair[1].0,
                "direct windows {}..{} and {}..{} overlap",
                pair[0].0,
                pair[0].1,
                pair[1].0,
                pair[1].1
            );
        }
        let mut j = 0;
        for &(ds, de, shift) in &direct {
            while j < windows.len() && windows[j].end <= ds {
                j += 1;
            }
            let mut k = j;
            while k < windows.len() && windows[k].start < de {
                ensure!(
                    windows[k].shift == Some(shift),
                    "direct window {ds}..{de} writes over tensor window {}..{} with other bytes",
                    windows[k].start,
                    windows[k].end
                );
                k += 1;
            }
        }

        // Coalescing bound. `needed`: non-empty needed ranges in object order.
        let needed: Vec<_> = self
            .placements
            .iter()
            .filter(|p| !p.needed.is_empty())
            .map(|p| p.needed.clone())
            .collect();
        let read_in = |lo: u64, hi: u64| -> u64 {
            let first = self.reads.partition_point(|r| r.obj.end <= lo);
            self.reads[first..]
                .iter()
                .take_while(|r| r.obj.start < hi)
                .map(|r| r.obj.end.min(hi) - r.obj.start.max(lo))
                .sum()
        };
        let mut expected_read = 0u64;
        let mut free_left = super::free_gap_budget(opts, needed.iter());
        let mut chain_start = 0;
        let (mut chain_useful, mut chain_waste) = (0u64, 0u64);
        for (i, n) in needed.iter().enumerate() {
            chain_useful += n.end - n.start;
            let linked = match needed.get(i + 1) {
                None => false,
                Some(next) => {
                    let g0 = align_up(n.end, a).unwrap_or(u64::MAX);
                    let g1 = align_down(next.start, a);
                    if g1 <= g0 {
                        true
                    } else {
                        let waste = g1 - g0;
                        let got = read_in(g0, g1);
                        ensure!(
                            got == 0 || got == waste,
                            "gap {g0}..{g1} between {n:?} and {next:?} is read only in part ({got} bytes)"
                        );
                        if got == waste {
                            ensure!(
                                waste <= opts.max_gap && waste < chunk,
                                "gap {g0}..{g1} ({waste} bytes) is read: max_gap {}, chunk {chunk}",
                                opts.max_gap
                            );
                            // Free as the planner takes them: in object order, while the
                            // budget lasts.
                            if waste <= opts.free_gap && waste <= free_left {
                                free_left -= waste;
                            } else {
                                chain_waste += waste;
                            }
                        }
                        got == waste
                    }
                }
            };
            if !linked {
                let ra = align_down(needed[chain_start].start, a);
                let ru = align_up(n.end, a).unwrap_or(u64::MAX);
                expected_read += ru - ra;
                ensure!(
                    chain_waste == 0
                        || (chain_waste as f64)
                            <= (chain_useful as f64) * (amp - 1.0) * (1.0 + 1e-9),
                    "{chain_waste} gap bytes read for {chain_useful} useful bytes in \
                     {ra}..{ru}: more than max_amplification {amp} allows"
                );
                chain_start = i + 1;
                chain_useful = 0;
                chain_waste = 0;
            }
        }
        ensure!(
            read_bytes == expected_read,
            "{read_bytes} bytes read, but the needed blocks and the gaps read between them \
             are {expected_read} bytes"
        );
        Ok(())
    }
}
