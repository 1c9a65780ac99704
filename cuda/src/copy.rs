//! Pure copy planning: which bytes of a filled staging slot (or a mapped piece of the file) go
//! where in the device arena, how pieces of a mapped file are cut, and stream round-robin.
//!
//! Everything here is plain data and testable without a GPU.

use std::ops::Range;

use tensorstream_engine::plan::ReadOp;
use tensorstream_engine::{Error, Plan, Result};

/// One tensor's piece of a copy: `len` bytes from offset `src` of the host source to arena
/// offset `dst`, counted towards placement `placement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegCopy {
    /// Index into `Plan::placements`.
    pub placement: usize,
    /// Offset in the host source (slot or mapped piece).
    pub src: u64,
    /// Offset in the device arena.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// One host→device copy call (adjacent tensor pieces merged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    /// Offset in the host source.
    pub src: u64,
    /// Offset in the device arena.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The per-tensor copies of one finished read whose `filled` bytes sit in a slot, checked
/// against the read, the slot and the arena (`arena_len` bytes).
pub fn read_copies(op: &ReadOp, filled: u64, arena_len: u64) -> Result<Vec<SegCopy>> {
    let mut out = Vec::with_capacity(op.segments.len());
    for seg in &op.segments {
        if seg.obj.start < op.obj.start || seg.obj.end > op.obj.end || seg.obj.start > seg.obj.end {
            return Err(Error::invalid(format!(
                "segment {}..{} lies outside its read {}..{}",
                seg.obj.start, seg.obj.end, op.obj.start, op.obj.end
            )));
        }
        let src = seg.obj.start - op.obj.start;
        let len = seg.obj.end - seg.obj.start;
        if src + len > filled {
            return Err(Error::invalid(format!(
                "segment {}..{} lies past the {filled} bytes in the staging slot",
                seg.obj.start, seg.obj.end
            )));
        }
        let end = seg
            .dest
            .checked_add(len)
            .ok_or_else(|| Error::invalid("arena offset overflows"))?;
        if end > arena_len {
            return Err(Error::invalid(format!(
                "segment for arena {}..{end} lies outside the device arena ({arena_len} bytes)",
                seg.dest
            )));
        }
        if len > 0 {
            out.push(SegCopy {
                placement: seg.placement,
                src,
                dst: seg.dest,
                len,
            });
        }
    }
    Ok(out)
}

/// Merges copies that are contiguous both in the source and in the arena into single calls.
pub fn coalesce(copies: &[SegCopy]) -> Vec<CopyOp> {
    let mut out: Vec<CopyOp> = Vec::with_capacity(copies.len());
    for c in copies.iter().filter(|c| c.len > 0) {
        if let Some(last) = out.last_mut() {
            if last.src + last.len == c.src && last.dst + last.len == c.dst {
                last.len += c.len;
                continue;
            }
        }
        out.push(CopyOp {
            src: c.src,
            dst: c.dst,
            len: c.len,
        });
    }
    out
}

/// Bytes landed per placement by `copies` (consecutive pieces of one placement summed).
pub fn landed(copies: &[SegCopy]) -> Vec<(usize, u64)> {
    let mut out: Vec<(usize, u64)> = Vec::new();
    for c in copies {
        match out.last_mut() {
            Some((p, n)) if *p == c.placement => *n += c.len,
            _ => out.push((c.placement, c.len)),
        }
    }
    out
}

/// The copies of `copies` that fall into source range `range`, re-based to `range.start`.
pub fn clip(copies: &[SegCopy], range: Range<u64>) -> Vec<SegCopy> {
    copies
        .iter()
        .filter_map(|c| {
            let s = c.src.max(range.start);
            let e = (c.src + c.len).min(range.end);
            (s < e).then(|| SegCopy {
                placement: c.placement,
                src: s - range.start,
                dst: c.dst + (s - c.src),
                len: e - s,
            })
        })
        .collect()
}

/// A page-aligned piece of a mapped file and the copies out of it (sources relative to
/// `obj.start`). Pieces of one plan never share a page, so each can be host-registered alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Object (file) range, page-aligned at both ends (the end may lie past EOF, inside the
    /// last page of the mapping).
    pub obj: Range<u64>,
    /// Copies out of the piece.
    pub copies: Vec<SegCopy>,
}

/// Cuts the plan's segments into pieces for the mapped (warm page cache) path: a new piece
/// starts at every multiple of `piece_size` (a multiple of `page`) and wherever the gap between
/// two segments exceeds `max_gap` (at least one page), so no two pieces share a page.
pub fn pieces(
    plan: &Plan,
    piece_size: u64,
    page: u64,
    max_gap: u64,
    map_len: u64,
) -> Result<Vec<Piece>> {
    if page == 0 || !page.is_power_of_two() {
        return Err(Error::invalid(format!(
            "page size {page} is not a power of two"
        )));
    }
    let piece_size = piece_size.max(page) / page * page;
    let max_gap = max_gap.max(page);
    let up = |x: u64| -> Result<u64> {
        x.checked_add(page - 1)
            .map(|v| v / page * page)
            .ok_or_else(|| Error::invalid("offset overflows"))
    };
    let mut out: Vec<Piece> = Vec::new();
    // (piece grid index, absolute copies, first byte, last byte)
    let mut cur: Option<(u64, Vec<SegCopy>, u64, u64)> = None;
    let mut flush = |cur: &mut Option<(u64, Vec<SegCopy>, u64, u64)>| -> Result<()> {
        if let Some((_, copies, first, last)) = cur.take() {
            let start = first / page * page;
            // Ends at a page boundary: past EOF only inside the last mapped page.
            let end = up(last)?;
            let copies = copies
                .into_iter()
                .map(|mut c| {
                    c.src -= start;
                    c
                })
                .collect();
            out.push(Piece {
                obj: start..end,
                copies,
            });
        }
        Ok(())
    };
    // The pieces assume segments in file order, disjoint (as the planner makes them); a plan
    // built otherwise is refused rather than cut into wrong pieces.
    let mut prev_end = 0u64;
    for op in &plan.reads {
        for seg in &op.segments {
            if seg.obj.start < prev_end || seg.obj.end < seg.obj.start {
                return Err(Error::invalid(format!(
                    "plan segment {}..{} is out of file order (after a segment ending at {prev_end})",
                    seg.obj.start, seg.obj.end
                )));
            }
            prev_end = seg.obj.end;
            seg.dest
                .checked_add(seg.obj.end - seg.obj.start)
                .ok_or_else(|| Error::invalid("plan segment's destination overflows"))?;
            if seg.obj.end > map_len {
                return Err(Error::corrupt(format!(
                    "tensor bytes {}..{} lie past the end of the file ({map_len} bytes)",
                    seg.obj.start, seg.obj.end
                )));
            }
            let mut s = seg.obj.start;
            while s < seg.obj.end {
                let grid = s / piece_size;
                let grid_end = (grid + 1).saturating_mul(piece_size);
                let e = seg.obj.end.min(grid_end);
                let piece = SegCopy {
                    placement: seg.placement,
                    src: s,
                    dst: seg.dest + (s - seg.obj.start),
                    len: e - s,
                };
                let new_piece = match &cur {
                    Some((g, _, _, last)) => *g != grid || s.saturating_sub(*last) > max_gap,
                    None => true,
                };
                if new_piece {
                    flush(&mut cur)?;
                    cur = Some((grid, Vec::new(), s, s));
                }
                if let Some((_, copies, _, last)) = cur.as_mut() {
                    copies.push(piece);
                    *last = e;
                }
                s = e;
            }
        }
    }
    flush(&mut cur)?;
    Ok(out)
}

/// Picks streams in turn.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    n: usize,
    next: usize,
}

impl RoundRobin {
    /// Over `n` streams (at least one).
    pub fn new(n: usize) -> Self {
        RoundRobin {
            n: n.max(1),
            next: 0,
        }
    }
    /// The next stream index.
    pub fn next_index(&mut self) -> usize {
        let i = self.next;
        self.next = (self.next + 1) % self.n;
        i
    }
}

/// Packs arenas of `(len, align)` one after another into one allocation: each one's offset (a
/// multiple of its alignment, taken as 1 when 0) and the total length. Fails when the total
/// overflows or an alignment is not a power of two.
pub fn pack_windows(parts: impl IntoIterator<Item = (u64, u64)>) -> Result<(Vec<u64>, u64)> {
    let overflow =
        || Error::invalid("the device memory of the files adds up to more than 2^64 bytes");
    let mut offsets = Vec::new();
    let mut end = 0u64;
    for (len, align) in parts {
        let align = align.max(1);
        if !align.is_power_of_two() {
            return Err(Error::invalid(format!(
                "arena alignment {align} is not a power of two"
            )));
        }
        let off = end.checked_next_multiple_of(align).ok_or_else(overflow)?;
        end = off.checked_add(len).ok_or_else(overflow)?;
        offsets.push(off);
    }
    Ok((offsets, end))
}

#[cfg(test)]
mod tests;
