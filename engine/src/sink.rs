//! Sinks: where the bytes of finished reads go.
//!
//! The engine hands every finished read to the sink (on the sink's own thread). A sink either
//! lent the engine a buffer inside its destination for the read ("direct": nothing to copy) or
//! copies the read's segments out of a staging slot and gives the slot back.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mem::{Arena, IoBuf};
use crate::plan::{Layout, Plan, ReadOp};

/// Destination of a load.
pub trait Sink: Send + 'static {
    /// Called once before any read: for each read of `plan`, a buffer inside the destination the
    /// read may land in directly, or `None` to have it read into a staging slot.
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>>;
    /// The bytes of `plan.reads[read]` are in `buf` (`buf.len()` bytes valid). Take them. Returns
    /// staging buffers that are free again (this one, now or in a later call, and/or earlier ones).
    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>>;
    /// Called when every read was accepted: complete outstanding work (e.g. wait for device
    /// copies) and return the remaining staging buffers.
    fn finish(&mut self) -> Result<Vec<IoBuf>>;
    /// Staging slots this sink wants (count, size) for non-direct reads, if it has its own
    /// (pinned memory); `None` lets the engine allocate host slots.
    fn staging(&mut self, _count: usize, _slot_size: usize) -> Result<Option<Vec<IoBuf>>> {
        Ok(None)
    }
}

/// Loads into one aligned host arena. With a Mirror plan every read lands in the arena directly;
/// with a Packed plan segments are copied from staging slots.
pub struct HostSink {
    arena: Option<Arena>,
    plan: Option<Arc<Plan>>,
    remaining: Vec<u64>,
    done_order: Vec<usize>,
}

impl HostSink {
    /// A sink without an arena yet (allocated in `prepare` from the plan).
    pub fn new() -> Self {
        HostSink {
            arena: None,
            plan: None,
            remaining: Vec::new(),
            done_order: Vec::new(),
        }
    }

    /// The arena, once the load finished. Placements that finished, in completion order.
    pub fn into_parts(self) -> Result<(Arena, Vec<usize>)> {
        let arena = self
            .arena
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        Ok((arena, self.done_order))
    }

    fn land(&mut self, read: usize) -> Result<()> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        for seg in &plan.reads[read].segments {
            let r = &mut self.remaining[seg.placement];
            *r = r.saturating_sub(seg.obj.end - seg.obj.start);
            if *r == 0 {
                self.done_order.push(seg.placement);
            }
        }
        Ok(())
    }
}

impl Default for HostSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for HostSink {
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>> {
        let len = usize::try_from(plan.arena_len)
            .map_err(|_| Error::invalid("arena does not fit in the address space"))?;
        let mut arena = Arena::host(len, plan.arena_align as usize)?;
        self.remaining = plan
            .placements
            .iter()
            .map(|p| p.needed.end - p.needed.start)
            .collect();
        // Placements with nothing to read (empty and synthesized tensors) are done at once: the
        // arena is zero-initialised.
        self.done_order = (0..plan.placements.len())
            .filter(|&i| self.remaining[i] == 0)
            .collect();
        let direct = match plan.reads.first() {
            Some(r) => r.direct.is_some(),
            None => false,
        };
        let out = if direct {
            let ranges = direct_ranges(&plan.reads)?;
            arena.windows(&ranges)?.into_iter().map(Some).collect()
        } else {
            plan.reads.iter().map(|_| None).collect()
        };
        self.arena = Some(arena);
        self.plan = Some(plan.clone());
        Ok(out)
    }

    fn accept(&mut self, read: usize, buf: IoBuf) -> Result<Vec<IoBuf>> {
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| Error::invalid("host sink was never prepared"))?;
        let op: &ReadOp = plan
            .reads
            .get(read)
            .ok_or_else(|| Error::invalid(format!("read #{read} is not in the plan")))?;
        let give_back = if op.direct.is_some() {
            drop(buf); // the bytes are already in place; the window goes away
            Vec::new()
        } else {
            let arena = self
                .arena
                .as_mut()
                .ok_or_else(|| Error::invalid("host sink was never prepared"))?
                .as_mut_slice()?;
            let src = buf.as_slice();
            for seg in &op.segments {
                let s = (seg.obj.start - op.obj.start) as usize;
                let n = (seg.obj.end - seg.obj.start) as usize;
                let d = seg.dest as usize;
                arena[d..d + n].copy_from_slice(&src[s..s + n]);
            }
            vec![buf]
        };
        self.land(read)?;
        Ok(give_back)
    }

    fn finish(&mut self) -> Result<Vec<IoBuf>> {
        Ok(Vec::new())
    }
}

/// The arena windows of a Mirror plan's reads (sorted, disjoint by construction).
pub fn direct_ranges(reads: &[ReadOp]) -> Result<Vec<std::ops::Range<usize>>> {
    reads
        .iter()
        .map(|r| {
            let d = r
                .direct
                .ok_or_else(|| Error::invalid("plan mixes direct and staged reads"))?;
            let s = usize::try_from(d).map_err(|_| Error::invalid("arena offset too large"))?;
            let e = usize::try_from(d + r.len())
                .map_err(|_| Error::invalid("arena offset too large"))?;
            Ok(s..e)
        })
        .collect()
}

/// True when `layout` lets reads land in the destination directly.
pub fn is_direct(layout: Layout) -> bool {
    matches!(layout, Layout::Mirror)
}
