//! The per-tensor header that precedes every tensor's data.
//!
//! ```text
//! u64 header_size  u16 module_index  u8 tensor_type  u16 name_len, name  u8 dtype_len, dtype
//! u8 ndim, dims (u32, or u64 for long-dimension entries)
//! u16 hash_section_len, { u8 hash_count, hash_count × (u8 type, u8 len, value) }
//! [u64 crypt_info_len, crypt_info]   (encrypted files only)
//! i64 data_length
//! ```
//!
//! Hashes (CRC32 = type 0, SHA-256 = type 1) cover the header with the hash *values* zeroed and
//! the crypt info (with its length) left out, followed by the tensor's plaintext data.

use sha2::{Digest, Sha256};

use super::crypt::CryptInfo;
use super::index::Cursor;
use crate::error::{Error, Result};

/// Hash type ids.
pub const HASH_CRC32: u8 = 0;
/// See [`HASH_CRC32`].
pub const HASH_SHA256: u8 = 1;

/// A parsed per-tensor header.
#[derive(Debug, Clone)]
pub struct TensorHeader {
    /// Raw name bytes.
    pub name: Vec<u8>,
    /// Raw dtype string.
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// (type, value) pairs.
    pub hashes: Vec<(u8, Vec<u8>)>,
    /// Crypt info (encrypted files).
    pub crypt: Option<CryptInfo>,
    /// Stored data length.
    pub data_length: i64,
    /// Header bytes with hash values zeroed and the crypt info cut out: what the hashes cover.
    pub hashable: Vec<u8>,
}

/// Parses a header occupying exactly `b` (the index says the data starts right after it).
pub fn parse(b: &[u8], has_crypt: bool, long_dims: bool) -> Result<TensorHeader> {
    let mut c = Cursor::new(b, "per-tensor header");
    let size = c.u64("header size")?;
    if size != b.len() as u64 {
        return Err(Error::corrupt(format!(
            "per-tensor header says it is {size} bytes but the index places the data {} bytes after it",
            b.len()
        )));
    }
    c.u16("module index")?;
    let t = c.u8("tensor type")?;
    if t > 2 {
        return Err(Error::corrupt(format!(
            "per-tensor header has unknown tensor type {t}"
        )));
    }
    let nl = c.u16("name length")? as usize;
    let name = c.take(nl, "name")?.to_vec();
    let dl = c.u8("dtype length")? as usize;
    let dtype = std::str::from_utf8(c.take(dl, "dtype")?)
        .map_err(|_| Error::corrupt("per-tensor header dtype is not UTF-8"))?
        .to_string();
    let nd = c.u8("dimension count")? as usize;
    let mut shape = Vec::with_capacity(nd);
    for _ in 0..nd {
        shape.push(if long_dims {
            c.u64("dimension")?
        } else {
            c.u32("dimension")? as u64
        });
    }
    let hash_start = c.pos;
    let hl = c.u16("hash section length")? as usize;
    let section = c.take(hl, "hash section")?;
    let mut hashable = b.to_vec();
    let mut hashes = Vec::new();
    if hl > 0 {
        let mut h = Cursor::new(section, "hash section");
        let n = h.u8("hash count")?;
        for _ in 0..n {
            let ty = h.u8("hash type")?;
            let len = h.u8("hash length")? as usize;
            let value_at = hash_start + 2 + h.pos;
            let v = h.take(len, "hash value")?.to_vec();
            hashable[value_at..value_at + len].fill(0);
            hashes.push((ty, v));
        }
    }
    let mut crypt = None;
    if has_crypt {
        let crypt_start = c.pos;
        let cl = c.u64("crypt info length")?;
        let cl = usize::try_from(cl).map_err(|_| Error::corrupt("crypt info length overflows"))?;
        let body = c.take(cl, "crypt info")?;
        crypt = Some(CryptInfo::parse(body)?);
        hashable.drain(crypt_start..c.pos);
    }
    if b.len() - c.pos < 8 {
        return Err(Error::corrupt(
            "per-tensor header is truncated: no room for the data length",
        ));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[b.len() - 8..]);
    Ok(TensorHeader {
        name,
        dtype,
        shape,
        hashes,
        crypt,
        data_length: i64::from_le_bytes(l),
        hashable,
    })
}

/// Checks `data` (plaintext) against the header's hashes. Returns a description of the first
/// mismatch.
pub fn verify(h: &TensorHeader, data: &[u8]) -> std::result::Result<(), String> {
    // Verification that checks nothing must not pass: tensorizer writes a SHA-256 (and a CRC32)
    // for every tensor, so a header without any was made by something else, or altered.
    if h.hashes.is_empty() {
        return Err("its header holds no hash to check the data against".into());
    }
    for (ty, v) in &h.hashes {
        match *ty {
            HASH_CRC32 => {
                let mut c = crc32fast::Hasher::new();
                c.update(&h.hashable);
                c.update(data);
                let got = c.finalize();
                let want = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| format!("CRC32 value is {} bytes, not 4", v.len()))?;
                if got != want {
                    return Err(format!(
                        "CRC32 mismatch: stored {want:08x}, computed {got:08x}"
                    ));
                }
            }
            HASH_SHA256 => {
                let mut s = Sha256::new();
                s.update(&h.hashable);
                s.update(data);
                let got = s.finalize();
                if got.as_slice() != v.as_slice() {
                    return Err(format!(
                        "SHA-256 mismatch: stored {}, computed {}",
                        hex(v),
                        hex(&got)
                    ));
                }
            }
            t => return Err(format!("unknown hash type {t}")),
        }
    }
    Ok(())
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A per-tensor header being written: the bytes with placeholders, and where to patch.
#[derive(Debug, Clone)]
pub struct HeaderBuilder {
    /// The header bytes.
    pub buf: Vec<u8>,
    crc_at: Option<usize>,
    sha_at: usize,
    crypt_at: Option<(usize, usize)>,
}

impl HeaderBuilder {
    /// Lays out a header. `crypt` must already have its final size (MAC placeholders).
    pub fn new(
        name: &[u8],
        dtype: &str,
        shape: &[u64],
        data_length: u64,
        include_crc: bool,
        crypt: Option<&CryptInfo>,
        long_dims: bool,
    ) -> Result<Self> {
        let nl = u16::try_from(name.len())
            .map_err(|_| Error::invalid("tensor name longer than 65535 bytes"))?;
        let dl = u8::try_from(dtype.len()).map_err(|_| Error::invalid("dtype name too long"))?;
        let nd = u8::try_from(shape.len())
            .map_err(|_| Error::invalid("tensorizer files hold at most 255 dimensions"))?;
        let mut b = Vec::new();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.push(2); // state-dict entry unless set (`set_tensor_type`)
        b.extend_from_slice(&nl.to_le_bytes());
        b.extend_from_slice(name);
        b.push(dl);
        b.extend_from_slice(dtype.as_bytes());
        b.push(nd);
        for &d in shape {
            if long_dims {
                b.extend_from_slice(&d.to_le_bytes());
            } else {
                let d = u32::try_from(d)
                    .map_err(|_| Error::invalid("dimension needs the long-dimension format"))?;
                b.extend_from_slice(&d.to_le_bytes());
            }
        }
        let section: u16 = 1 + if include_crc { 6 } else { 0 } + 34;
        b.extend_from_slice(&section.to_le_bytes());
        b.push(if include_crc { 2 } else { 1 });
        let mut crc_at = None;
        if include_crc {
            b.extend_from_slice(&[HASH_CRC32, 4]);
            crc_at = Some(b.len());
            b.extend_from_slice(&[0; 4]);
        }
        b.extend_from_slice(&[HASH_SHA256, 32]);
        let sha_at = b.len();
        b.extend_from_slice(&[0; 32]);
        let mut crypt_at = None;
        if let Some(ci) = crypt {
            let body = ci.to_bytes();
            let start = b.len();
            b.extend_from_slice(&(body.len() as u64).to_le_bytes());
            b.extend_from_slice(&body);
            crypt_at = Some((start, b.len()));
        }
        b.extend_from_slice(&data_length.to_le_bytes());
        let size = b.len() as u64;
        b[..8].copy_from_slice(&size.to_le_bytes());
        Ok(HeaderBuilder {
            buf: b,
            crc_at,
            sha_at,
            crypt_at,
        })
    }

    /// Sets the tensor type byte (0 parameter, 1 buffer, 2 state-dict entry, the default);
    /// before the hashes are computed.
    pub fn set_tensor_type(&mut self, t: u8) {
        self.buf[10] = t;
    }

    /// The bytes the hashes start from (hash values zero, crypt info left out).
    pub fn hashable(&self) -> Vec<u8> {
        let mut h = self.buf.clone();
        if let Some((s, e)) = self.crypt_at {
            h.drain(s..e);
        }
        h
    }

    /// Fills in the hash values.
    pub fn set_hashes(&mut self, crc: u32, sha: &[u8; 32]) {
        if let Some(at) = self.crc_at {
            self.buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        self.buf[self.sha_at..self.sha_at + 32].copy_from_slice(sha);
    }

    /// Replaces the crypt info (same serialised size: only MACs change).
    pub fn set_crypt(&mut self, ci: &CryptInfo) -> Result<()> {
        let (s, e) = self
            .crypt_at
            .ok_or_else(|| Error::invalid("header has no crypt info"))?;
        let body = ci.to_bytes();
        if body.len() + 8 != e - s {
            return Err(Error::invalid("crypt info changed size"));
        }
        self.buf[s + 8..e].copy_from_slice(&body);
        Ok(())
    }
}
