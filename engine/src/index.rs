//! The format-independent description of a file's tensors.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::dtype::DType;

/// Which file format an index came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Format {
    /// Hugging Face safetensors.
    Safetensors,
    /// CoreWeave tensorizer.
    Tensorizer,
}

impl Format {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Tensorizer => "tensorizer",
        }
    }
}

/// Where a tensor's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorSource {
    /// Stored bytes at `range` of the object.
    Stored,
    /// Not stored: load as `nbytes` zero bytes (tensorizer meta tensors).
    Zeros,
}

/// What a tensor is to the module it came from, where the format records it (tensorizer's
/// tensor type: `write_module` marks parameters and buffers, `write_state_dict` state-dict
/// entries; tensorizer's `load_into_module` accepts only the first two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorRole {
    /// A module parameter (tensorizer type 0).
    Parameter,
    /// A module buffer (type 1).
    Buffer,
    /// An entry of a state dict (type 2).
    StateDictEntry,
}

impl TensorRole {
    /// Its name in text and JSON output: `parameter`, `buffer` or `state_dict`.
    pub fn name(self) -> &'static str {
        match self {
            TensorRole::Parameter => "parameter",
            TensorRole::Buffer => "buffer",
            TensorRole::StateDictEntry => "state_dict",
        }
    }

    /// The tensorizer type byte.
    pub fn tensorizer_type(self) -> u8 {
        match self {
            TensorRole::Parameter => 0,
            TensorRole::Buffer => 1,
            TensorRole::StateDictEntry => 2,
        }
    }
    /// From a tensorizer type byte (`None` for an unknown one).
    pub fn from_tensorizer_type(t: u8) -> Option<Self> {
        match t {
            0 => Some(TensorRole::Parameter),
            1 => Some(TensorRole::Buffer),
            2 => Some(TensorRole::StateDictEntry),
            _ => None,
        }
    }
}

/// One tensor of the index.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Display name (dotted for tensorizer json-seq names).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Absolute byte range of the tensor's data in the object (empty for zero-size/meta tensors).
    pub range: Range<u64>,
    /// Whether the bytes are stored or synthesized.
    pub source: TensorSource,
    /// Structured path (tensorizer json-seq names), if the format has one.
    pub path: Option<Vec<serde_json::Value>>,
    /// Extra bytes that must be loaded together with the tensor (e.g. a per-tensor header that is
    /// hashed together with the data). Absolute object range, or `None`. Plans ignore it for
    /// [`TensorSource::Zeros`] tensors (a tensorizer meta tensor's header, which
    /// `format::tensorizer::prepare` checks and then drops).
    pub prefix: Option<Range<u64>>,
    /// What the tensor is to its module, where the format says (tensorizer); `None` for
    /// safetensors.
    pub role: Option<TensorRole>,
}

impl TensorInfo {
    /// Number of bytes of the tensor's data. (The parsers guarantee a well-formed range and a
    /// size that fits; for an index built by hand, an inverted range counts 0 bytes and a meta
    /// tensor whose size overflows counts 0.)
    pub fn nbytes(&self) -> u64 {
        match self.source {
            TensorSource::Stored => self.range.end.saturating_sub(self.range.start),
            TensorSource::Zeros => self
                .dtype
                .byte_len(crate::dtype::numel(&self.shape).unwrap_or(0))
                .unwrap_or(0),
        }
    }
}

/// Everything a format reader learned from the metadata prefix.
#[derive(Debug, Clone)]
pub struct TensorIndex {
    /// The format.
    pub format: Format,
    /// Tensors in file order (ascending `range.start`). In a sharded checkpoint's combined
    /// index (`tensorstream`'s `combined_index`), file after file, each `range` an offset in its
    /// own file: ascending within each file only.
    pub tensors: Vec<TensorInfo>,
    /// Free-form metadata (`__metadata__` in safetensors).
    pub metadata: BTreeMap<String, String>,
    /// Size of the object the index was read from.
    pub object_size: u64,
    /// Bytes of metadata before the first tensor (header size).
    pub header_len: u64,
    /// Format version (tensorizer data version; 0 for safetensors).
    pub version: u32,
}

impl TensorIndex {
    /// Sum of all tensors' byte lengths (saturating: a parsed file's always fits, a combination
    /// of many might not).
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.nbytes()))
    }
    /// Whether `other` lists the same tensors in the same order: names, dtypes, shapes and
    /// sources (what a reader of the tensors sees; not where their bytes sit).
    pub fn same_tensors_as(&self, other: &TensorIndex) -> bool {
        self.tensors.len() == other.tensors.len()
            && self.tensors.iter().zip(&other.tensors).all(|(a, b)| {
                a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.source == b.source
            })
    }
    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Each tensor's name → its place in `tensors` (for many lookups; names are unique in a
    /// valid index, and a repeated one maps to its first place, as [`TensorIndex::get`] finds).
    pub fn positions(&self) -> std::collections::HashMap<&str, usize> {
        let mut m = std::collections::HashMap::with_capacity(self.tensors.len());
        for (i, t) in self.tensors.iter().enumerate() {
            m.entry(t.name.as_str()).or_insert(i);
        }
        m
    }
}

/// Positions of a list's items sorted by name, for lookups by name in O(log n) without copying
/// the names (the models' `get`). The names come from a function of the position, called both
/// when sorting and when looking up.
#[derive(Debug, Clone, Default)]
pub struct NameOrder(Vec<usize>);

impl NameOrder {
    /// Sorts positions `0..len` by `name(position)`.
    pub fn new<'a>(len: usize, name: impl Fn(usize) -> &'a str) -> Self {
        let mut v: Vec<usize> = (0..len).collect();
        v.sort_by(|&a, &b| name(a).cmp(name(b)).then(a.cmp(&b)));
        NameOrder(v)
    }
    /// The first position (in list order) whose name is `want`, with the same `name` function
    /// as [`NameOrder::new`].
    pub fn find<'a>(&self, want: &str, name: impl Fn(usize) -> &'a str) -> Option<usize> {
        let at = self.0.partition_point(|&k| name(k) < want);
        self.0.get(at).copied().filter(|&k| name(k) == want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_order_finds_each_name_and_nothing_else() {
        let names = ["b", "a", "c", "a", "", "ab"];
        let order = NameOrder::new(names.len(), |k| names[k]);
        for (k, n) in names.iter().enumerate() {
            let first = names.iter().position(|m| m == n).unwrap();
            assert_eq!(order.find(n, |k| names[k]), Some(first), "{n:?} (at {k})");
        }
        for missing in ["aa", "d", "B", "c\0"] {
            assert_eq!(order.find(missing, |k| names[k]), None, "{missing:?}");
        }
        assert_eq!(
            NameOrder::new(0, |k| names[k]).find("a", |k| names[k]),
            None
        );
    }

    #[test]
    fn positions_name_each_tensors_place() {
        let t = |name: &str, at: u64| TensorInfo {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![4],
            range: at..at + 4,
            source: TensorSource::Stored,
            path: None,
            prefix: None,
            role: None,
        };
        let index = TensorIndex {
            format: Format::Safetensors,
            tensors: vec![t("b", 8), t("a", 12), t("c", 16)],
            metadata: BTreeMap::new(),
            object_size: 20,
            header_len: 8,
            version: 0,
        };
        let p = index.positions();
        assert_eq!((p["b"], p["a"], p["c"], p.len()), (0, 1, 2, 3));
        assert!(!p.contains_key("d"));
        // A repeated name maps where `get` finds it: its first place.
        let mut twice = index.clone();
        twice.tensors.push(t("a", 16));
        assert_eq!(twice.positions()["a"], 1);
        assert_eq!(twice.get("a").unwrap().range.start, 12);
    }
}
