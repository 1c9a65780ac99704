//! A loaded model: the arena plus views of its tensors.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::index::{NameOrder, TensorIndex};
use crate::mem::Arena;
use crate::plan::Plan;

/// One tensor of a loaded model.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [u64],
    /// Offset of the data in the object it came from.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
}

/// Tensors loaded into host memory.
pub struct HostModel {
    arena: Arena,
    index: TensorIndex,
    /// (tensor index, arena offset, len), in file order of the selected tensors.
    entries: Vec<(usize, usize, usize)>,
    /// `entries` positions by tensor name (for `get`).
    by_name: NameOrder,
}

impl HostModel {
    /// Assembles a model from a finished load. Checks every view lies inside the arena.
    pub fn new(arena: Arena, index: TensorIndex, plan: &Plan) -> Result<Self> {
        let mut entries: Vec<(usize, usize, usize)> = Vec::with_capacity(plan.placements.len());
        for p in &plan.placements {
            // Views index `index.tensors` later: a plan made from another index must fail here,
            // not panic in `tensors()` / `get()`.
            if p.tensor >= index.tensors.len() {
                return Err(Error::invalid(format!(
                    "plan places tensor #{} but the index has only {} tensors (plan from another index?)",
                    p.tensor,
                    index.tensors.len()
                )));
            }
            let t = &index.tensors[p.tensor];
            if p.len != t.nbytes() {
                return Err(Error::invalid(format!(
                    "plan places {} bytes for tensor {:?}, which has {} (plan from another index?)",
                    p.len,
                    t.name,
                    t.nbytes()
                )));
            }
            let d =
                usize::try_from(p.dest).map_err(|_| Error::invalid("arena offset too large"))?;
            let n = usize::try_from(p.len).map_err(|_| Error::invalid("tensor too large"))?;
            if d.checked_add(n).is_none_or(|e| e > arena.len()) {
                return Err(Error::invalid("tensor view lies outside the arena"));
            }
            entries.push((p.tensor, d, n));
        }
        entries.sort_by_key(|e| e.0);
        arena.as_slice()?; // fails if any window is still lent out
        let by_name = NameOrder::new(entries.len(), |k| &index.tensors[entries[k].0].name);
        Ok(HostModel {
            arena,
            index,
            entries,
            by_name,
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when no tensor was loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The index of the whole file (all tensors, selected or not).
    pub fn index(&self) -> &TensorIndex {
        &self.index
    }

    fn view(&self, e: &(usize, usize, usize)) -> TensorView<'_> {
        let t = &self.index.tensors[e.0];
        let data = match self.arena.as_slice() {
            Ok(s) => &s[e.1..e.1 + e.2],
            Err(_) => &[],
        };
        TensorView {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            offset: t.range.start,
            data,
        }
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.entries.iter().map(|e| self.view(e))
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.by_name
            .find(name, |k| &self.index.tensors[self.entries[k].0].name)
            .map(|k| self.view(&self.entries[k]))
    }

    /// Bytes of tensor data held.
    pub fn nbytes(&self) -> u64 {
        self.entries.iter().map(|e| e.2 as u64).sum()
    }
}
