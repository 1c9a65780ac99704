//! [`Serializer`]: writes tensorizer files tensor by tensor with bounded memory.
//!
//! The caller declares every tensor up front ([`TensorSpec`]); the serializer sizes the index
//! exactly (no 256 KiB cap), lays out each per-tensor header followed by its data like the
//! reference tool 2.12, streams each tensor's bytes through in chunks (hashing, and encrypting in
//! 2 MiB chunks if asked), then patches the header's hashes / MACs. The data version is the one the
//! reference would pick for the features used: 1, 2 for opaque dtypes (bf16, float8), 3 when
//! encrypted, 4 with meta tensors, 5 (+ versioned index entries) for dimensions ≥ 2³².

use std::io::{Read, Seek, SeekFrom, Write};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::crypt::{self, Cipher, CryptInfo, KeySource, PwHash, CHUNK_SIZE, MAC_LEN};
use super::header::HeaderBuilder;
use super::index::{
    decode_name, dtype_to_tensorizer, encode_name, is_opaque, FileHeader, INDEX_START,
};
use super::{FLAG_ENCRYPTED, FLAG_VERSIONED_HEADERS};
use crate::dtype::{numel, DType};
use crate::error::{Error, Result};
use crate::index::TensorRole;

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Name (used when `path` is `None`).
    pub name: String,
    /// Structured path, stored as json-seq (a path of one string is stored as that string).
    pub path: Option<Vec<Value>>,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Store as a meta tensor: no data, loads as zeros (data version 4).
    pub meta: bool,
    /// Its tensorizer type: `None` writes a state-dict entry (as tensorizer's
    /// `write_state_dict` does); parameters and buffers are what `load_into_module` takes.
    pub role: Option<TensorRole>,
}

impl TensorSpec {
    /// Bytes of data the tensor holds (0 for meta tensors).
    pub fn stored_bytes(&self) -> Result<u64> {
        // A meta tensor stores nothing, but a reader still sizes its zeros by the shape: one
        // whose size overflows would make a file no reader (this one included) accepts.
        let len = numel(&self.shape)
            .and_then(|n| self.dtype.byte_len(n))
            .ok_or_else(|| Error::invalid(format!("tensor {:?}: size overflows", self.name)))?;
        Ok(if self.meta { 0 } else { len })
    }
}

/// Serializer knobs.
#[derive(Debug, Clone)]
pub struct SerializerOptions {
    /// Encrypt with this key, or with a key derived from this password.
    pub encryption: Option<KeySource>,
    /// Argon2id (opslimit, memlimit) for password encryption; libsodium's "moderate" by default.
    pub pwhash_limits: (u64, u64),
    /// Bytes per read/write for unencrypted data (encrypted data goes in 2 MiB chunks).
    pub buffer_size: usize,
}

impl Default for SerializerOptions {
    fn default() -> Self {
        SerializerOptions {
            encryption: None,
            pwhash_limits: (crypt::OPSLIMIT_MODERATE, crypt::MEMLIMIT_MODERATE),
            buffer_size: 8 << 20,
        }
    }
}

struct Planned {
    header: HeaderBuilder,
    header_offset: u64,
    nbytes: u64,
    meta: bool,
}

/// Writes one tensorizer file. See the module docs.
pub struct Serializer<W: Write + Seek> {
    out: W,
    names: Vec<String>,
    plan: Vec<Planned>,
    next: usize,
    key: Option<[u8; 32]>,
    kdf: Option<PwHash>,
    buf: Vec<u8>,
    end: u64,
    version: u32,
}

impl<W: Write + Seek> Serializer<W> {
    /// Writes the file header and the complete index for `specs` to `out` (positioned at 0).
    pub fn new(mut out: W, specs: &[TensorSpec], opts: &SerializerOptions) -> Result<Self> {
        if specs.len() as u64 > super::index::MAX_TENSORS {
            return Err(Error::invalid(format!(
                "{} tensors: a tensorizer file holds at most {} (readers refuse more)",
                specs.len(),
                super::index::MAX_TENSORS
            )));
        }
        let encrypted = opts.encryption.is_some();
        let (key, kdf) = match &opts.encryption {
            None => (None, None),
            Some(KeySource::Key(k)) => (Some(*k), None),
            Some(KeySource::Password(pw)) => {
                let p = PwHash {
                    opslimit: opts.pwhash_limits.0,
                    memlimit: opts.pwhash_limits.1,
                    alg: crypt::ALG_ARGON2ID13,
                    salt: crypt::random::<{ crypt::SALT_LEN }>()?.to_vec(),
                };
                (Some(crypt::derive_key(pw, &p)?), Some(p))
            }
        };
        let mut version: u32 = if encrypted { 3 } else { 1 };
        let mut long_any = false;
        let mut seen = std::collections::HashSet::new();
        let mut shown = std::collections::HashSet::new();
        struct Pre {
            raw: Vec<u8>,
            dtype: &'static str,
            long: bool,
            nbytes: u64,
            kind: u8,
        }
        let mut pre = Vec::with_capacity(specs.len());
        for s in specs {
            let raw = encode_name(&s.name, s.path.as_deref())?;
            if !seen.insert(raw.clone()) {
                return Err(Error::invalid(format!(
                    "tensor {:?} is declared twice",
                    s.name
                )));
            }
            // What a reader makes of the stored name: it must read back (an empty name, or a
            // plain one starting with the json-seq marker 0x1E, would not) as this tensor's name,
            // and no two tensors may read back alike (a plain "a.b" beside the path [a, b]).
            let (display, _) = decode_name(&raw).map_err(|e| {
                Error::invalid(format!(
                    "tensor {:?} cannot be stored under that name: {}",
                    s.name,
                    e.message()
                ))
            })?;
            if s.path.is_none() && display != s.name {
                return Err(Error::invalid(format!(
                    "tensor {:?} would read back as {display:?} (a name starting with 0x1E is a \
                     structured path to tensorizer readers)",
                    s.name
                )));
            }
            if !shown.insert(display.clone()) {
                return Err(Error::invalid(format!(
                    "two tensors would read back as {display:?}"
                )));
            }
            let dtype = dtype_to_tensorizer(s.dtype)?;
            if is_opaque(dtype) {
                version = version.max(2);
            }
            if s.meta {
                version = version.max(4);
            }
            let long = s.shape.iter().any(|&d| d > u32::MAX as u64);
            if long {
                version = 5;
                long_any = true;
            }
            let nbytes = s.stored_bytes()?;
            pre.push(Pre {
                raw,
                dtype,
                long,
                nbytes,
                kind: s
                    .role
                    .unwrap_or(TensorRole::StateDictEntry)
                    .tensorizer_type(),
            });
        }
        let mut flags = 0u128;
        if encrypted {
            flags |= FLAG_ENCRYPTED;
        }
        if long_any {
            flags |= FLAG_VERSIONED_HEADERS;
        }
        // Headers (with placeholder hashes / MACs of their final size).
        let mut headers = Vec::with_capacity(specs.len());
        for (s, p) in specs.iter().zip(&pre) {
            let has_data = !s.meta;
            let crypt_info = if encrypted {
                Some(if has_data {
                    CryptInfo {
                        kdf: kdf.clone(),
                        cipher: Some(Cipher::Parallel {
                            chunk_size: CHUNK_SIZE,
                            nonce: [0; crypt::NONCE_LEN],
                            macs: vec![[0; MAC_LEN]; p.nbytes.div_ceil(CHUNK_SIZE) as usize],
                        }),
                    }
                } else {
                    CryptInfo::default()
                })
            } else {
                None
            };
            let mut h = HeaderBuilder::new(
                &p.raw,
                p.dtype,
                &s.shape,
                p.nbytes,
                !(encrypted && has_data),
                crypt_info.as_ref(),
                p.long,
            )?;
            h.set_tensor_type(p.kind);
            headers.push(h);
        }
        // Index entries need absolute offsets, which need the index length: compute the length
        // first (it does not depend on the offsets' values).
        let entry_len = |p: &Pre, s: &TensorSpec| -> u64 {
            (if long_any { 4 } else { 0 })
                + 2
                + p.raw.len() as u64
                + 1
                + 1
                + p.dtype.len() as u64
                + 1
                + s.shape.len() as u64 * if p.long { 8 } else { 4 }
                + 24
        };
        let index_len: u64 = specs.iter().zip(&pre).map(|(s, p)| entry_len(p, s)).sum();
        let mut pos = INDEX_START + index_len;
        let mut index = Vec::with_capacity(index_len as usize);
        let mut plan = Vec::with_capacity(specs.len());
        let mut total = 0u64;
        for ((s, p), h) in specs.iter().zip(&pre).zip(headers) {
            let header_offset = pos;
            let data_offset = header_offset + h.buf.len() as u64;
            if long_any {
                index.extend_from_slice(&(if p.long { 5u32 } else { 1u32 }).to_le_bytes());
            }
            index.extend_from_slice(&(p.raw.len() as u16).to_le_bytes());
            index.extend_from_slice(&p.raw);
            index.push(p.kind);
            index.push(p.dtype.len() as u8);
            index.extend_from_slice(p.dtype.as_bytes());
            index.push(s.shape.len() as u8);
            for &d in &s.shape {
                if p.long {
                    index.extend_from_slice(&d.to_le_bytes());
                } else {
                    index.extend_from_slice(&(d as u32).to_le_bytes());
                }
            }
            index.extend_from_slice(&header_offset.to_le_bytes());
            index.extend_from_slice(&data_offset.to_le_bytes());
            index.extend_from_slice(&p.nbytes.to_le_bytes());
            pos = data_offset
                .checked_add(p.nbytes)
                .ok_or_else(|| Error::invalid("file size overflows"))?;
            total += p.nbytes;
            plan.push(Planned {
                header: h,
                header_offset,
                nbytes: p.nbytes,
                meta: s.meta,
            });
        }
        debug_assert_eq!(index.len() as u64, index_len);
        let fh = FileHeader {
            version,
            flags,
            tensor_size: total,
            tensor_count: specs.len() as u64,
        };
        let io = |e| Error::from_io(e, "writing tensorizer header");
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        out.write_all(&fh.to_bytes()).map_err(io)?;
        out.write_all(&index_len.to_le_bytes()).map_err(io)?;
        out.write_all(&index).map_err(io)?;
        let chunk = if encrypted {
            CHUNK_SIZE as usize
        } else {
            opts.buffer_size.max(4096)
        };
        Ok(Serializer {
            out,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            plan,
            next: 0,
            key,
            kdf,
            buf: vec![0u8; chunk],
            end: INDEX_START + index_len,
            version,
        })
    }

    /// Data version of the file being written.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The 32-byte key in use (derived from the password if one was given).
    pub fn key(&self) -> Option<[u8; 32]> {
        self.key
    }

    /// Writes the next declared tensor from a byte slice (its exact length).
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let want = self
            .plan
            .get(self.next)
            .map(|p| p.nbytes)
            .ok_or_else(|| Error::invalid("every declared tensor was already written"))?;
        if data.len() as u64 != want {
            return Err(Error::invalid(format!(
                "tensor {:?} needs {want} bytes, got {}",
                self.names[self.next],
                data.len()
            )));
        }
        let mut r = data;
        self.write_tensor_from(&mut r)
    }

    /// Writes the next declared tensor, reading exactly its byte length from `src`.
    pub fn write_tensor_from(&mut self, src: &mut dyn Read) -> Result<()> {
        let i = self.next;
        let name = self
            .names
            .get(i)
            .cloned()
            .ok_or_else(|| Error::invalid("every declared tensor was already written"))?;
        let (hashable, header_offset, nbytes, meta) = {
            let p = &self.plan[i];
            (p.header.hashable(), p.header_offset, p.nbytes, p.meta)
        };
        let io = |e| Error::from_io(e, format!("writing tensor {name:?}"));
        let mut crc = crc32fast::Hasher::new();
        let mut sha = Sha256::new();
        crc.update(&hashable);
        sha.update(&hashable);
        self.out.seek(SeekFrom::Start(header_offset)).map_err(io)?;
        let hlen = self.plan[i].header.buf.len();
        self.out.write_all(&self.plan[i].header.buf).map_err(io)?;
        let mut nonce = crypt::random::<{ crypt::NONCE_LEN }>()?;
        let first_nonce = nonce;
        let mut macs = Vec::new();
        let mut left = nbytes;
        while left > 0 {
            let n = (self.buf.len() as u64).min(left) as usize;
            let chunk = &mut self.buf[..n];
            src.read_exact(chunk).map_err(|e| {
                let what = format!(
                    "reading tensor {name:?} ({} of {nbytes} bytes done)",
                    nbytes - left
                );
                // A source that fails with our own error (a backend's ObjectChanged, Timeout,
                // Cancelled …) wraps it in an io::Error: unwrap it so its kind survives.
                if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    if let Some(Ok(inner)) = e.into_inner().map(|b| b.downcast::<Error>()) {
                        return inner.context(what);
                    }
                    return Error::new(crate::ErrorKind::Io, what);
                }
                Error::from_io(e, what)
            })?;
            crc.update(chunk);
            sha.update(&*chunk);
            if let Some(k) = &self.key {
                macs.push(crypt::encrypt_chunk(k, &nonce, chunk)?);
                crypt::increment(&mut nonce);
            }
            self.out.write_all(chunk).map_err(io)?;
            left -= n as u64;
        }
        let p = &mut self.plan[i];
        let digest: [u8; 32] = sha.finalize().into();
        p.header.set_hashes(crc.finalize(), &digest);
        if self.key.is_some() && !meta {
            p.header.set_crypt(&CryptInfo {
                kdf: self.kdf.clone(),
                cipher: Some(Cipher::Parallel {
                    chunk_size: CHUNK_SIZE,
                    nonce: first_nonce,
                    macs,
                }),
            })?;
        }
        self.out.seek(SeekFrom::Start(header_offset)).map_err(io)?;
        self.out.write_all(&p.header.buf).map_err(io)?;
        self.end = header_offset + hlen as u64 + nbytes;
        self.out.seek(SeekFrom::Start(self.end)).map_err(io)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written, writes the reference's end marker (a zero u64)
    /// and flushes. Returns the writer.
    pub fn finish(mut self) -> Result<W> {
        if self.next != self.plan.len() {
            return Err(Error::invalid(format!(
                "only {} of {} declared tensors were written",
                self.next,
                self.plan.len()
            )));
        }
        let io = |e| Error::from_io(e, "finishing tensorizer file");
        self.out.seek(SeekFrom::Start(self.end)).map_err(io)?;
        self.out.write_all(&0u64.to_le_bytes()).map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(self.out)
    }
}
