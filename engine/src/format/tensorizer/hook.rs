//! Verification and decryption of loaded tensors, on the sink's worker threads.

use std::collections::HashMap;
use std::sync::Mutex;

use super::crypt::{self, KeySource, PwHash};
use super::header;
use super::index::{dtype_from_tensorizer, encode_name};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::index::{TensorIndex, TensorSource};
use crate::sink::TensorHook;

struct Tensor {
    name: String,
    raw_name: Vec<u8>,
    dtype: DType,
    shape: Vec<u64>,
    data_len: u64,
    stored: bool,
}

/// Most distinct password key derivations one load performs.
pub const MAX_DERIVATIONS: usize = 16;

/// Parses each tensor's per-tensor header (which must be loaded as the tensor's prefix), checks
/// it against the index, decrypts the data in place and verifies the hashes.
pub struct TensorizerHook {
    tensors: Vec<Tensor>,
    has_crypt: bool,
    verify: bool,
    key: Option<KeySource>,
    derived: Mutex<HashMap<PwHash, [u8; 32]>>,
}

impl TensorizerHook {
    /// A hook for `index` (a tensorizer index with header prefixes).
    pub fn new(index: &TensorIndex, verify: bool, key: Option<KeySource>) -> Result<Self> {
        let tensors = index
            .tensors
            .iter()
            .map(|t| {
                Ok(Tensor {
                    name: t.name.clone(),
                    raw_name: encode_name(&t.name, t.path.as_deref())?,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_len: t.range.end - t.range.start,
                    stored: t.source == TensorSource::Stored,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorizerHook {
            tensors,
            has_crypt: super::is_encrypted(index),
            verify,
            key,
            derived: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn key_for(&self, name: &str, kdf: Option<&PwHash>) -> Result<[u8; 32]> {
        match (&self.key, kdf) {
            (Some(KeySource::Key(k)), _) => Ok(*k),
            (Some(KeySource::Password(_)), None) => Err(Error::invalid(format!(
                "tensor {name:?} was encrypted with a raw key, not a password: give the key file instead"
            ))),
            (Some(KeySource::Password(pw)), Some(p)) => {
                let mut cache = self
                    .derived
                    .lock()
                    .map_err(|_| Error::new(ErrorKind::Io, "key cache poisoned"))?;
                if let Some(k) = cache.get(p) {
                    return Ok(*k);
                }
                // The reference derives one key per file; each derivation costs up to
                // `crypt::MAX_PWHASH_WORK`, so a file asking for many would take hours.
                if cache.len() >= MAX_DERIVATIONS {
                    return Err(Error::unsupported(format!(
                        "tensor {name:?} needs yet another password key derivation (more than \
                         {MAX_DERIVATIONS} different salts or parameters in one file): corrupted or hostile file?"
                    )));
                }
                let k = crypt::derive_key(pw, p)?;
                cache.insert(p.clone(), k);
                Ok(k)
            }
            (None, _) => Err(Error::invalid(format!(
                "tensor {name:?} is encrypted but no key or password was given"
            ))),
        }
    }
}

impl TensorizerHook {
    fn tensor(&self, tensor: usize) -> Result<&Tensor> {
        self.tensors
            .get(tensor)
            .ok_or_else(|| Error::invalid(format!("tensor #{tensor} is not in the index")))
    }

    /// Checks the per-tensor header of a meta tensor (no stored data, loaded as zeros) against
    /// the index and, when verifying, its hashes: a corrupted index cannot turn a stored tensor
    /// into zeros, or change a meta tensor's shape or dtype, unnoticed.
    pub fn check_meta(&self, tensor: usize, hdr: &[u8]) -> Result<()> {
        let t = self.tensor(tensor)?;
        if hdr.is_empty() {
            return Err(Error::corrupt(format!(
                "meta tensor {:?} has no per-tensor header to verify",
                t.name
            )));
        }
        self.check(t, hdr, &mut [])
    }

    /// Parses `hdr`, checks it against the index entry `t`, decrypts `data` in place and
    /// verifies the hashes.
    fn check(&self, t: &Tensor, hdr: &[u8], data: &mut [u8]) -> Result<()> {
        let ctx = |e: Error| e.context(format!("tensor {:?}", t.name));
        let long = t.shape.iter().any(|&d| d > u32::MAX as u64);
        let h = match header::parse(hdr, self.has_crypt, long) {
            Ok(h) if h.shape == t.shape => h,
            // An entry tagged for long dimensions may hold small ones: try the other width.
            first => match header::parse(hdr, self.has_crypt, !long) {
                Ok(h) if h.shape == t.shape => h,
                _ => first.map_err(ctx)?,
            },
        };
        let h_dtype = dtype_from_tensorizer(&h.dtype)
            .map_err(|e| e.context(format!("tensor {:?}: per-tensor header", t.name)))?;
        if h.name != t.raw_name
            || h.shape != t.shape
            || h_dtype != t.dtype
            || h.data_length != t.data_len as i64
        {
            return Err(Error::corrupt(format!(
                "tensor {:?}: per-tensor header (name {:?}, {} {:?}, {} bytes) disagrees with the index ({} {:?}, {} bytes)",
                t.name,
                String::from_utf8_lossy(&h.name),
                h_dtype,
                h.shape,
                h.data_length,
                t.dtype,
                t.shape,
                t.data_len
            )));
        }
        if self.has_crypt {
            let ci = h.crypt.as_ref().ok_or_else(|| {
                Error::corrupt(format!("tensor {:?}: header lacks crypt info", t.name))
            })?;
            match &ci.cipher {
                None if data.is_empty() => {}
                None => {
                    return Err(Error::corrupt(format!(
                        "tensor {:?} is stored unencrypted inside an encrypted file",
                        t.name
                    )))
                }
                Some(_) if data.is_empty() => {}
                Some(c) => {
                    let key = self.key_for(&t.name, ci.kdf.as_ref())?;
                    crypt::decrypt(&key, c, data).map_err(|why| {
                        // The crypt info tells how the file was encrypted: a raw key given for
                        // a password-encrypted file is most likely the wrong kind of secret
                        // (a password for a key-encrypted file is refused in `key_for`).
                        let which = match (&self.key, &ci.kdf) {
                            (Some(KeySource::Key(_)), Some(_)) => {
                                "the tensor was encrypted with a password (Argon2id parameters \
                                 stored in the file) but a raw key was given: give the password \
                                 instead (a key works only if it is the one derived from it)"
                            }
                            _ => "wrong key or password, or corrupted data",
                        };
                        Error::new(
                            ErrorKind::IntegrityMismatch,
                            format!("tensor {:?}: decryption failed ({why}): {which}", t.name),
                        )
                    })?;
                }
            }
        }
        if self.verify {
            header::verify(&h, data).map_err(|why| {
                Error::new(
                    ErrorKind::IntegrityMismatch,
                    format!("tensor {:?} failed verification: {why}", t.name),
                )
            })?;
        }
        Ok(())
    }
}

impl TensorHook for TensorizerHook {
    fn process(&self, tensor: usize, bytes: &mut [u8], data_start: usize) -> Result<()> {
        let t = self.tensor(tensor)?;
        if !t.stored {
            return Ok(());
        }
        if data_start == 0 || data_start > bytes.len() {
            return Err(Error::invalid(format!(
                "tensor {:?}: its per-tensor header was not loaded with the data",
                t.name
            )));
        }
        let (hdr, data) = bytes.split_at_mut(data_start);
        self.check(t, hdr, data)
    }
}
