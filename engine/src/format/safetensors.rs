//! safetensors: `u64 LE header length` + JSON header + data.
//!
//! Validation follows the reference crate: checked arithmetic, every offset checked against the
//! object size at construction, shape × dtype size must equal the byte length, no overlapping
//! ranges, no duplicate names, and the header length is bounded before anything is allocated.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::Probe;
use crate::dtype::{numel, DType};
use crate::error::{Error, Result};
use crate::index::{Format, TensorIndex, TensorInfo, TensorSource};

/// Largest header the reader accepts (the reference crate uses the same bound).
pub const MAX_HEADER: u64 = 100_000_000;

/// Parses a safetensors header from a prefix of the object.
pub fn parse_prefix(prefix: &[u8], object_size: u64) -> Result<Probe> {
    if object_size < 8 {
        return Err(Error::corrupt(format!(
            "file is {object_size} bytes, too short for a safetensors header (8-byte length + JSON)"
        )));
    }
    if prefix.len() < 8 {
        return Ok(Probe::NeedPrefix(8));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&prefix[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER {
        return Err(Error::corrupt(format!(
            "not a safetensors file: header length {n} exceeds the {MAX_HEADER}-byte limit"
        ))
        .with_range(0..8));
    }
    let header_end = 8 + n; // n <= MAX_HEADER, no overflow
    if header_end > object_size {
        return Err(Error::corrupt(format!(
            "safetensors header length {n} runs past the end of the file ({object_size} bytes); \
             the file is truncated or not safetensors"
        ))
        .with_range(0..8));
    }
    if (prefix.len() as u64) < header_end {
        return Ok(Probe::NeedPrefix(header_end));
    }
    let header = &prefix[8..header_end as usize];
    parse_header(header, object_size).map(Probe::Index)
}

/// Parses the JSON header (without the length prefix) of an object of `object_size` bytes.
pub fn parse_header(header: &[u8], object_size: u64) -> Result<TensorIndex> {
    let header_len = 8 + header.len() as u64;
    let data_start = header_len;
    let data_len = object_size
        .checked_sub(data_start)
        .ok_or_else(|| Error::corrupt("safetensors header runs past the end of the file"))?;
    let text = std::str::from_utf8(header)
        .map_err(|e| Error::corrupt(format!("safetensors header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(Error::corrupt(
            "safetensors header is not a JSON object (does not start with '{'): \
             not a safetensors file",
        ));
    }
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Each entry becomes a tensor as soon as it is parsed: the JSON values of a whole header
    // took about 1 KB per tensor besides the index (1.4 GB for a million tensors).
    let mut each = |name: String, value: Value| -> Result<()> {
        if !seen.insert(name.clone()) {
            return Err(Error::corrupt(format!(
                "safetensors header names tensor {name:?} twice"
            )));
        }
        if name == "__metadata__" {
            // The reference crate reads it as `Option<HashMap<String, String>>`: null is none.
            if value.is_null() {
                return Ok(());
            }
            let obj = value.as_object().ok_or_else(|| {
                Error::corrupt("safetensors __metadata__ is not an object of strings")
            })?;
            for (k, v) in obj {
                let v = v.as_str().ok_or_else(|| {
                    Error::corrupt(format!(
                        "safetensors __metadata__ value for {k:?} is not a string"
                    ))
                })?;
                metadata.insert(k.clone(), v.to_string());
            }
            return Ok(());
        }
        tensors.push(parse_tensor(&name, &value, data_start, data_len)?);
        Ok(())
    };
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de
        .deserialize_map(EntriesVisitor {
            each: &mut each,
            failed: &mut failed,
        })
        .and_then(|()| de.end());
    if let Some(e) = failed {
        return Err(e);
    }
    parsed.map_err(|e| Error::corrupt(format!("safetensors header is not valid JSON: {e}")))?;
    drop(seen);
    tensors.sort_by_key(|t| (t.range.start, t.range.end));
    // The format (and the reference reader) wants the data section wholly covered: no bytes
    // between tensors nor after the last one, which could hide another file's bytes (a
    // polyglot) or be a corrupted offset.
    let mut covered = data_start;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        if t.range.is_empty() {
            continue;
        }
        if t.range.start > covered {
            return Err(Error::corrupt(format!(
                "data bytes {}..{} belong to no tensor (before {:?}): a safetensors data \
                 section has no holes",
                covered - data_start,
                t.range.start - data_start,
                t.name
            )));
        }
        covered = covered.max(t.range.end);
        if let Some(p) = prev {
            if t.range.start < p.range.end {
                return Err(Error::corrupt(format!(
                    "tensors {:?} and {:?} overlap (data bytes {}..{} and {}..{})",
                    p.name,
                    t.name,
                    p.range.start - data_start,
                    p.range.end - data_start,
                    t.range.start - data_start,
                    t.range.end - data_start
                )));
            }
        }
        prev = Some(t);
    }
    if covered != object_size {
        return Err(Error::corrupt(format!(
            "the last {} bytes of the file belong to no tensor (data bytes {}..{}): a \
             safetensors data section has no holes",
            object_size - covered,
            covered - data_start,
            object_size - data_start
        )));
    }
    Ok(TensorIndex {
        format: Format::Safetensors,
        tensors,
        metadata,
        object_size,
        header_len,
        version: 0,
    })
}

fn parse_tensor(name: &str, v: &Value, data_start: u64, data_len: u64) -> Result<TensorInfo> {
    let bad = |what: &str| Error::corrupt(format!("tensor {name:?}: {what}"));
    let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string \"dtype\""))?;
    let dtype = DType::from_safetensors_name(dtype_s)
        .ok_or_else(|| bad(&format!("unknown dtype {dtype_s:?}")))?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"shape\""))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        shape.push(d.as_u64().ok_or_else(|| {
            bad(&format!(
                "shape holds {d}, which is not an integer from 0 to 2^64 - 1"
            ))
        })?);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"data_offsets\""))?;
    if offs.len() != 2 {
        return Err(bad("\"data_offsets\" must hold exactly two integers"));
    }
    let begin = offs[0].as_u64().ok_or_else(|| {
        bad(&format!(
            "data_offsets[0] is {}, not an integer from 0 to 2^64 - 1",
            offs[0]
        ))
    })?;
    let end = offs[1].as_u64().ok_or_else(|| {
        bad(&format!(
            "data_offsets[1] is {}, not an integer from 0 to 2^64 - 1",
            offs[1]
        ))
    })?;
    if begin > end {
        return Err(bad(&format!(
            "data_offsets are out of order ({begin} > {end})"
        )));
    }
    if end > data_len {
        return Err(bad(&format!(
            "data_offsets {begin}..{end} run past the end of the data ({data_len} bytes): file truncated or corrupt"
        )));
    }
    let n = numel(&shape).ok_or_else(|| bad("shape's element count overflows"))?;
    let want = dtype
        .byte_len(n)
        .ok_or_else(|| bad("shape × dtype size overflows or is not a whole number of bytes"))?;
    if want != end - begin {
        return Err(bad(&format!(
            "shape {shape:?} of {} needs {want} bytes but data_offsets give {}",
            dtype.safetensors_name(),
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        range: (data_start + begin)..(data_start + end),
        source: TensorSource::Stored,
        path: None,
        prefix: None,
        role: None,
    })
}

/// Hands the header's top-level entries, in order and duplicates included (so that they can be
/// refused), to `each` as they are parsed. The first error of `each` stops the parse and is
/// left in `failed`.
struct EntriesVisitor<'a, F: FnMut(String, Value) -> Result<()>> {
    each: &'a mut F,
    failed: &'a mut Option<Error>,
}

impl<'de, F: FnMut(String, Value) -> Result<()>> Visitor<'de> for EntriesVisitor<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some((k, v)) = map.next_entry::<String, Strict>()? {
            if let Err(e) = (self.each)(k, v.0) {
                *self.failed = Some(e);
                return Err(serde::de::Error::custom("stopped at an invalid entry"));
            }
        }
        Ok(())
    }
}

/// Longest JSON array a header may hold (shapes, data offsets). Bounds the memory a header
/// costs: a 100 MB header of one giant shape would otherwise become gigabytes of `Value`s.
pub const MAX_ARRAY: usize = 1024;

/// A JSON value parsed like `serde_json::Value`, except that an object naming a key twice is an
/// error (the reference crate's derived structs refuse duplicate fields, so `{"dtype": "F32",
/// "dtype": "U8"}` must not quietly mean U8 here) and arrays are bounded by [`MAX_ARRAY`].
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            if out.len() == MAX_ARRAY {
                return Err(serde::de::Error::custom(format!(
                    "an array longer than {MAX_ARRAY} elements"
                )));
            }
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, Strict(v))) = map.next_entry::<String, Strict>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("key {k:?} given twice")));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Serialises a safetensors file image: header + data, tensors written in the given order.
/// Used by tests, the demo and `convert`. `tensors`: (name, dtype, shape, bytes).
pub fn write_header(
    tensors: &[(String, DType, Vec<u64>, u64)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".into(), Value::Object(m));
    }
    let mut off = 0u64;
    for (name, dtype, shape, nbytes) in tensors {
        // Readers take `__metadata__` for the metadata map, and a repeated key would leave one
        // tensor's entry over the other's: neither can be written.
        if name == "__metadata__" {
            return Err(Error::invalid(
                "a tensor named \"__metadata__\" cannot be stored in a safetensors file (the \
                 name is its metadata key)",
            ));
        }
        if map.contains_key(name) {
            return Err(Error::invalid(format!("tensor {name:?} is listed twice")));
        }
        if !dtype.is_safetensors() {
            return Err(Error::invalid(format!(
                "tensor {name:?}: {} is not a safetensors dtype",
                dtype.safetensors_name()
            )));
        }
        let end = off
            .checked_add(*nbytes)
            .ok_or_else(|| Error::invalid("tensor sizes overflow"))?;
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(map))
        .map_err(|e| Error::invalid(format!("cannot encode header: {e}")))?;
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    if json.len() as u64 > MAX_HEADER {
        return Err(Error::invalid(format!(
            "the safetensors header would be {} bytes, over the {MAX_HEADER}-byte limit readers \
             accept (too many tensors, or very long names)",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

#[cfg(test)]
mod tests;
