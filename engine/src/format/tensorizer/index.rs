//! The file header and the metadata index of a tensorizer file, plus dtype and name codecs.
//!
//! Layout (all little-endian), as written by the reference tool 2.12:
//!
//! ```text
//! "|TZR|"  u32 data_version  [32] feature_flags  u64 tensor_size  [8] unused  u64 tensor_count
//! u64 index_len  then index_len bytes holding tensor_count entries:
//!   [u32 entry_version]   (only with the `versioned_headers` flag, data version 5)
//!   u16 name_len, name    u8 tensor_type    u8 dtype_len, dtype    u8 ndim, dims (u32; u64 for
//!   entry version 5)      u64 header_offset   u64 data_offset   u64 data_length
//! ```
//!
//! The rest of the index (the reference reserves 256 KiB) is padding.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use super::{FLAG_ENCRYPTED, FLAG_VERSIONED_HEADERS, KNOWN_FLAGS, MAGIC, MAX_VERSION};
use crate::dtype::{numel, DType};
use crate::error::{Error, Result};
use crate::format::Probe;
use crate::index::{Format, TensorIndex, TensorInfo, TensorRole, TensorSource};

/// Size of the fixed file header (magic through tensor count).
pub const FILE_HEADER_LEN: usize = 5 + 4 + 32 + 8 + 8 + 8;
/// Offset of the first index entry (fixed header + the u64 index length).
pub const INDEX_START: u64 = FILE_HEADER_LEN as u64 + 8;
/// Smallest possible index entry (empty name and dtype, no dims).
const MIN_ENTRY: u64 = 2 + 1 + 1 + 1 + 24;
/// Largest metadata index this reader accepts.
pub const MAX_INDEX: u64 = 1 << 30;
/// Most tensors a file may hold: about 2 million, 10-20 times the largest real checkpoints
/// (mixture-of-experts models hold 10^5 tensors) and more than a safetensors header (100 MB)
/// can describe, so every safetensors file converts. Each tensor costs a few hundred bytes of
/// memory however few bytes its index entry has (29 at least): without a bound, a 1 GiB index
/// of 37 million entries would take over 10 GiB to parse (92 MB of 2 million entries took
/// 1 GiB).
pub const MAX_TENSORS: u64 = 1 << 21;

/// The fixed file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Data version (1–5).
    pub version: u32,
    /// Feature flag bits (bit 0 encrypted, bit 1 versioned index entries).
    pub flags: u128,
    /// Total tensor data bytes (informative).
    pub tensor_size: u64,
    /// Number of index entries.
    pub tensor_count: u64,
}

impl FileHeader {
    /// Whether per-tensor headers carry crypt info (the reference's rule).
    pub fn has_crypt_info(&self) -> bool {
        self.version == 3 || (self.version >= 4 && self.flags & FLAG_ENCRYPTED != 0)
    }
    /// Whether index entries carry a u32 version tag.
    pub fn versioned(&self) -> bool {
        self.flags & FLAG_VERSIONED_HEADERS != 0
    }
    /// Serialises the header (magic included). Flags are only stored from data version 4 on.
    pub fn to_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut out = [0u8; FILE_HEADER_LEN];
        out[..5].copy_from_slice(MAGIC);
        out[5..9].copy_from_slice(&self.version.to_le_bytes());
        if self.version >= 4 {
            out[9..25].copy_from_slice(&self.flags.to_le_bytes());
        }
        out[41..49].copy_from_slice(&self.tensor_size.to_le_bytes());
        out[57..65].copy_from_slice(&self.tensor_count.to_le_bytes());
        out
    }
}

/// A bounds-checked little-endian reader over a byte slice; every failure names `what`.
pub(crate) struct Cursor<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
    pub what: &'a str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], what: &'a str) -> Self {
        Cursor { buf, pos: 0, what }
    }
    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(e) => {
                let s = &self.buf[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(Error::corrupt(format!(
                "{} is truncated: {field} needs {n} bytes at offset {} but only {} remain",
                self.what,
                self.pos,
                self.buf.len().saturating_sub(self.pos)
            ))),
        }
    }
    pub fn u8(&mut self, f: &str) -> Result<u8> {
        Ok(self.take(1, f)?[0])
    }
    pub fn u16(&mut self, f: &str) -> Result<u16> {
        let b = self.take(2, f)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, f: &str) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, f)?);
        Ok(u32::from_le_bytes(a))
    }
    pub fn u64(&mut self, f: &str) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, f)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Parses the fixed header from at least [`FILE_HEADER_LEN`] bytes.
pub fn parse_file_header(b: &[u8]) -> Result<FileHeader> {
    if b.len() < FILE_HEADER_LEN {
        return Err(Error::corrupt(format!(
            "tensorizer file header is truncated ({} of {FILE_HEADER_LEN} bytes)",
            b.len()
        )));
    }
    if &b[..5] != MAGIC {
        return Err(Error::corrupt("not a tensorizer file (magic is not |TZR|)").with_range(0..5));
    }
    let mut c = Cursor::new(&b[5..FILE_HEADER_LEN], "tensorizer file header");
    let version = c.u32("data version")?;
    if version == 0 {
        return Err(Error::corrupt("tensorizer data version 0 is invalid").with_range(5..9));
    }
    if version > MAX_VERSION {
        return Err(Error::unsupported(format!(
            "tensorizer data version {version} is not supported (this reader knows versions 1 to {MAX_VERSION})"
        ))
        .with_range(5..9));
    }
    let fl = c.take(32, "feature flags")?;
    if fl[16..].iter().any(|&x| x != 0) {
        return Err(Error::unsupported(
            "tensorizer file sets unknown feature flags (bits above 127)",
        )
        .with_range(9..41));
    }
    let mut f = [0u8; 16];
    f.copy_from_slice(&fl[..16]);
    let flags = u128::from_le_bytes(f);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(Error::unsupported(format!(
            "tensorizer file sets unknown feature flags {flags:#x} (known: encrypted, versioned_headers)"
        ))
        .with_range(9..41));
    }
    let tensor_size = c.u64("tensor size")?;
    c.take(8, "reserved")?;
    let tensor_count = c.u64("tensor count")?;
    let h = FileHeader {
        version,
        flags,
        tensor_size,
        tensor_count,
    };
    if h.versioned() && version < 5 {
        return Err(Error::corrupt(format!(
            "feature flag versioned_headers is invalid in a data version {version} file"
        ))
        .with_range(9..41));
    }
    Ok(h)
}

/// Parses header + index from a prefix of the object.
pub fn parse_prefix(prefix: &[u8], object_size: u64) -> Result<Probe> {
    if object_size < INDEX_START {
        return Err(Error::corrupt(format!(
            "file is {object_size} bytes, too short for a tensorizer header ({INDEX_START} bytes)"
        )));
    }
    if (prefix.len() as u64) < INDEX_START {
        return Ok(Probe::NeedPrefix(INDEX_START));
    }
    let fh = parse_file_header(prefix)?;
    check_tensor_count(fh.tensor_count)?;
    let mut l = [0u8; 8];
    l.copy_from_slice(&prefix[FILE_HEADER_LEN..INDEX_START as usize]);
    let index_len = u64::from_le_bytes(l);
    let index_end = INDEX_START
        .checked_add(index_len)
        .filter(|&e| e <= object_size);
    let index_end = match index_end {
        Some(e) => e,
        None => {
            return Err(Error::corrupt(format!(
                "tensorizer index length {index_len} runs past the end of the file ({object_size} bytes); truncated or corrupt"
            ))
            .with_range(FILE_HEADER_LEN as u64..INDEX_START))
        }
    };
    if index_len > MAX_INDEX {
        return Err(Error::unsupported(format!(
            "tensorizer index of {index_len} bytes exceeds the {MAX_INDEX}-byte limit"
        )));
    }
    if (prefix.len() as u64) < index_end {
        return Ok(Probe::NeedPrefix(index_end));
    }
    let body = &prefix[INDEX_START as usize..index_end as usize];
    parse_index(&fh, body, index_end, object_size).map(Probe::Index)
}

/// Refuses a tensor count over [`MAX_TENSORS`] (before the index is read).
pub fn check_tensor_count(count: u64) -> Result<()> {
    if count > MAX_TENSORS {
        return Err(Error::unsupported(format!(
            "tensorizer file holds {count} tensors; more than {MAX_TENSORS} are refused \
             (corrupt or hostile header?)"
        ))
        .with_range(57..65));
    }
    Ok(())
}

/// One raw index entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Entry version (1, or 5 for u64 dims).
    pub version: u32,
    /// Raw name bytes (plain UTF-8, or 0x1E + JSON array).
    pub name: Vec<u8>,
    /// 0 param, 1 buffer, 2 state dict.
    pub tensor_type: u8,
    /// Raw dtype string.
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Absolute offset of the per-tensor header.
    pub header_offset: u64,
    /// Absolute offset of the data.
    pub data_offset: u64,
    /// Stored data bytes (0 for meta tensors).
    pub data_length: u64,
}

/// Largest per-tensor header accepted: a name and a hash section of at most 64 KiB each, and
/// crypt info with one 16-byte MAC per 2 MiB of data (8 MiB of MACs for a 1 TiB tensor).
pub const MAX_TENSOR_HEADER: u64 = 64 << 20;

/// Reads the index entries.
pub fn parse_entries(fh: &FileHeader, body: &[u8]) -> Result<Vec<Entry>> {
    check_tensor_count(fh.tensor_count)?;
    let max_entries = body.len() as u64 / MIN_ENTRY;
    if fh.tensor_count > max_entries {
        return Err(Error::corrupt(format!(
            "tensorizer index is truncated: {} tensors cannot fit in an index of {} bytes",
            fh.tensor_count,
            body.len()
        )));
    }
    let mut c = Cursor::new(body, "tensorizer index");
    // Entries take more memory than the at least MIN_ENTRY bytes each has in the file: grow as
    // they parse rather than reserving for the count the header claims (a 1 GiB index would
    // reserve gigabytes up front).
    let mut out = Vec::with_capacity((fh.tensor_count as usize).min(1 << 16));
    for i in 0..fh.tensor_count {
        let ctx = |e: Error| e.context(format!("index entry #{i}"));
        let version = if fh.versioned() {
            let v = c.u32("entry version").map_err(ctx)?;
            if v != 1 && v != 5 {
                return Err(Error::corrupt(format!(
                    "index entry #{i} has unknown metadata version {v}"
                )));
            }
            v
        } else {
            1
        };
        let nl = c.u16("name length").map_err(ctx)? as usize;
        let name = c.take(nl, "name").map_err(ctx)?.to_vec();
        let tensor_type = c.u8("tensor type").map_err(ctx)?;
        if tensor_type > 2 {
            return Err(Error::corrupt(format!(
                "index entry #{i} has unknown tensor type {tensor_type}"
            )));
        }
        let dl = c.u8("dtype length").map_err(ctx)? as usize;
        let dtype = std::str::from_utf8(c.take(dl, "dtype").map_err(ctx)?)
            .map_err(|_| Error::corrupt(format!("index entry #{i}: dtype is not UTF-8")))?
            .to_string();
        let nd = c.u8("dimension count").map_err(ctx)? as usize;
        let mut shape = Vec::with_capacity(nd);
        for _ in 0..nd {
            shape.push(if version >= 5 {
                c.u64("dimension").map_err(ctx)?
            } else {
                c.u32("dimension").map_err(ctx)? as u64
            });
        }
        let header_offset = c.u64("header offset").map_err(ctx)?;
        let data_offset = c.u64("data offset").map_err(ctx)?;
        let data_length = c.u64("data length").map_err(ctx)?;
        out.push(Entry {
            version,
            name,
            tensor_type,
            dtype,
            shape,
            header_offset,
            data_offset,
            data_length,
        });
    }
    Ok(out)
}

fn parse_index(
    fh: &FileHeader,
    body: &[u8],
    index_end: u64,
    object_size: u64,
) -> Result<TensorIndex> {
    let entries = parse_entries(fh, body)?;
    let encrypted = fh.has_crypt_info();
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = HashSet::new();
    // All tensors' bytes, meta tensors' zeros included (which the file does not bound): every
    // total a load or a conversion makes must fit u64.
    let mut total: u64 = 0;
    for e in &entries {
        let (display, path) = decode_name(&e.name)?;
        let bad = |what: String| Error::corrupt(format!("tensor {display:?}: {what}"));
        let dtype = dtype_from_tensorizer(&e.dtype)
            .map_err(|err| err.context(format!("tensor {display:?}")))?;
        let n = numel(&e.shape).ok_or_else(|| bad("shape's element count overflows".into()))?;
        let want = dtype
            .byte_len(n)
            .ok_or_else(|| bad("shape × dtype size overflows".into()))?;
        if e.header_offset < index_end {
            return Err(bad(format!(
                "per-tensor header offset {} lies inside the file header / index (which ends at {index_end})",
                e.header_offset
            )));
        }
        if e.data_offset < e.header_offset {
            return Err(bad(format!(
                "data offset {} lies before its header offset {}",
                e.data_offset, e.header_offset
            )));
        }
        // The header sits between the two and is read whole (verification, decryption).
        if e.data_offset - e.header_offset > MAX_TENSOR_HEADER {
            return Err(bad(format!(
                "per-tensor header of {} bytes (from {} to {}) is over the {MAX_TENSOR_HEADER}-byte \
                 limit",
                e.data_offset - e.header_offset,
                e.header_offset,
                e.data_offset
            )));
        }
        let end = e
            .data_offset
            .checked_add(e.data_length)
            .filter(|&x| x <= object_size)
            .ok_or_else(|| {
                bad(format!(
                    "data {}+{} bytes runs past the end of the file ({object_size} bytes): truncated or corrupt",
                    e.data_offset, e.data_length
                ))
            })?;
        total = total.checked_add(want).ok_or_else(|| {
            bad(format!(
                "the tensors' sizes add up to more than {} bytes",
                u64::MAX
            ))
        })?;
        let source = if e.data_length == 0 && want > 0 {
            // Meta tensors exist from data version 4: before, a zero length is a corrupt entry
            // (that would load as zeros instead of the stored bytes).
            if fh.version < 4 {
                return Err(bad(format!(
                    "the index stores 0 bytes for shape {:?} of {}, which needs {want}; meta \
                     tensors (stored without data) exist only from data version 4, and this \
                     file is version {}",
                    e.shape, e.dtype, fh.version
                )));
            }
            TensorSource::Zeros
        } else if e.data_length == want {
            TensorSource::Stored
        } else {
            return Err(bad(format!(
                "shape {:?} of {} needs {want} bytes but the index stores {}",
                e.shape, e.dtype, e.data_length
            )));
        };
        if !seen.insert(display.clone()) {
            return Err(Error::corrupt(format!(
                "tensorizer index names tensor {display:?} twice"
            )));
        }
        // The per-tensor header travels with the data (verification, decryption);
        // `super::prepare` drops it again when nothing needs it. A meta tensor's header is
        // checked (and its prefix dropped) by `super::prepare`.
        let prefix = Some(e.header_offset..e.data_offset);
        tensors.push(TensorInfo {
            name: display,
            dtype,
            shape: e.shape.clone(),
            range: e.data_offset..end,
            source,
            path,
            prefix,
            role: TensorRole::from_tensorizer_type(e.tensor_type),
        });
    }
    // Headers + data of different tensors must not overlap.
    let mut spans: Vec<(u64, u64, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.header_offset, e.data_offset + e.data_length, i))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::corrupt(format!(
                "tensors {:?} and {:?} overlap in the file",
                tensors[w[0].2].name, tensors[w[1].2].name
            )));
        }
    }
    tensors.sort_by_key(|t| (t.range.start, t.range.end));
    let mut metadata = BTreeMap::new();
    if encrypted {
        metadata.insert(super::META_ENCRYPTED.to_string(), "true".to_string());
    }
    Ok(TensorIndex {
        format: Format::Tensorizer,
        tensors,
        metadata,
        object_size,
        header_len: index_end,
        version: fh.version,
    })
}

/// Maps a tensorizer dtype string (numpy `<f4`, `|b1`, … or opaque `<V2\0torch.bfloat16`) to a
/// [`DType`].
pub fn dtype_from_tensorizer(s: &str) -> Result<DType> {
    let mut parts = s.split('\0');
    let np = parts.next().unwrap_or("");
    let torch = parts.next();
    if parts.next().is_some() {
        return Err(Error::corrupt(format!(
            "dtype {s:?} has more than one opaque separator"
        )));
    }
    if let Some(t) = torch {
        let d = match t {
            "torch.bfloat16" => Some(DType::BF16),
            "torch.float8_e4m3fn" => Some(DType::F8E4M3),
            "torch.float8_e5m2" => Some(DType::F8E5M2),
            "torch.float8_e8m0fnu" => Some(DType::F8E8M0),
            "torch.float16" => Some(DType::F16),
            "torch.float32" => Some(DType::F32),
            "torch.float64" => Some(DType::F64),
            "torch.complex64" => Some(DType::C64),
            "torch.complex128" => Some(DType::C128),
            "torch.bool" => Some(DType::Bool),
            "torch.uint8" => Some(DType::U8),
            "torch.int8" => Some(DType::I8),
            "torch.int16" => Some(DType::I16),
            "torch.int32" => Some(DType::I32),
            "torch.int64" => Some(DType::I64),
            "torch.uint16" => Some(DType::U16),
            "torch.uint32" => Some(DType::U32),
            "torch.uint64" => Some(DType::U64),
            _ => None,
        };
        let d = d.ok_or_else(|| {
            Error::unsupported(format!(
                "tensorizer dtype {:?} ({t}) has no equivalent here",
                s.replace('\0', "\\0")
            ))
        })?;
        // The numpy part must describe elements of the same size.
        let size: Option<u64> = np
            .get(2..)
            .and_then(|x| x.parse().ok())
            .filter(|_| np.len() > 2 && matches!(np.as_bytes()[0], b'<' | b'|' | b'='));
        if size.and_then(|sz| sz.checked_mul(8)) != Some(d.bits()) {
            return Err(Error::corrupt(format!(
                "opaque dtype {:?}: storage {np:?} does not match {t}",
                s.replace('\0', "\\0")
            )));
        }
        return Ok(d);
    }
    let d = match np {
        "|b1" | "<b1" | "=b1" => DType::Bool,
        "|u1" | "<u1" | "=u1" => DType::U8,
        "|i1" | "<i1" | "=i1" => DType::I8,
        "<i2" => DType::I16,
        "<u2" => DType::U16,
        "<f2" => DType::F16,
        "<i4" => DType::I32,
        "<u4" => DType::U32,
        "<f4" => DType::F32,
        "<c8" => DType::C64,
        "<i8" => DType::I64,
        "<u8" => DType::U64,
        "<f8" => DType::F64,
        "<c16" => DType::C128,
        _ => {
            let hint = if np.starts_with('>') {
                " (big-endian data is not supported)"
            } else {
                ""
            };
            return Err(Error::unsupported(format!(
                "tensorizer dtype {:?} is not supported{hint}",
                s.replace('\0', "\\0")
            )));
        }
    };
    Ok(d)
}

/// The dtype string the reference tool writes for `d`.
pub fn dtype_to_tensorizer(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::Bool => "|b1",
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::F16 => "<f2",
        DType::BF16 => "<V2\0torch.bfloat16",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::F32 => "<f4",
        DType::C64 => "<c8",
        DType::F64 => "<f8",
        DType::C128 => "<c16",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::F8E5M2 => "|V1\0torch.float8_e5m2",
        DType::F8E4M3 => "|V1\0torch.float8_e4m3fn",
        DType::F8E8M0 => "|V1\0torch.float8_e8m0fnu",
        other => {
            return Err(Error::unsupported(format!(
                "dtype {other} cannot be stored in a tensorizer file"
            )))
        }
    })
}

/// True when the dtype string is opaque (needs data version 2).
pub fn is_opaque(s: &str) -> bool {
    s.contains('\0')
}

/// Decodes a stored name: plain UTF-8, or 0x1E + a compact JSON array of strings and
/// non-negative integers (json-seq). Returns the display name (components joined by `.`) and the
/// structured path.
pub fn decode_name(raw: &[u8]) -> Result<(String, Option<Vec<Value>>)> {
    if raw.first() == Some(&0x1E) {
        let body = &raw[1..];
        if body.len() < 2 || body[0] != b'[' || body[body.len() - 1] != b']' {
            return Err(Error::corrupt(
                "tensor name is a json-seq that is not an array",
            ));
        }
        if body.contains(&b'\n') || body.contains(&b'\r') {
            return Err(Error::corrupt("tensor name (json-seq) contains a newline"));
        }
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            Error::corrupt(format!("tensor name (json-seq) is not valid JSON: {e}"))
        })?;
        let arr = v
            .as_array()
            .ok_or_else(|| Error::corrupt("tensor name (json-seq) is not an array"))?;
        if arr.is_empty() {
            return Err(Error::corrupt("tensor name (json-seq) is an empty path"));
        }
        let mut parts = Vec::with_capacity(arr.len());
        for c in arr {
            match c {
                Value::String(s) => parts.push(s.clone()),
                Value::Number(n) if n.as_u64().is_some() => parts.push(n.to_string()),
                _ => {
                    return Err(Error::corrupt(
                        "tensor name (json-seq) holds something other than strings and non-negative integers",
                    ))
                }
            }
        }
        Ok((parts.join("."), Some(arr.clone())))
    } else {
        let s = std::str::from_utf8(raw).map_err(|_| Error::corrupt("tensor name is not UTF-8"))?;
        if s.is_empty() {
            return Err(Error::corrupt("tensor name is empty"));
        }
        Ok((s.to_string(), None))
    }
}

/// Encodes a name the way the reference does: a path of one string is stored plain, anything else
/// as 0x1E + compact, ASCII-only JSON.
pub fn encode_name(name: &str, path: Option<&[Value]>) -> Result<Vec<u8>> {
    let path = match path {
        None => return Ok(name.as_bytes().to_vec()),
        Some(p) => p,
    };
    if path.is_empty() {
        return Err(Error::invalid("tensor path is empty"));
    }
    if let [Value::String(s)] = path {
        return Ok(s.as_bytes().to_vec());
    }
    let mut out = vec![0x1E, b'['];
    for (i, c) in path.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match c {
            Value::Number(n) if n.as_u64().is_some() => {
                out.extend_from_slice(n.to_string().as_bytes())
            }
            Value::String(s) => json_ascii_string(s, &mut out),
            _ => {
                return Err(Error::invalid(
                    "tensor path components must be strings or non-negative integers",
                ))
            }
        }
    }
    out.push(b']');
    Ok(out)
}

/// JSON string with Python's `ensure_ascii=True` escaping.
fn json_ascii_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{:04x}", u).as_bytes());
                }
            }
            c => out.push(c as u8),
        }
    }
    out.push(b'"');
}
