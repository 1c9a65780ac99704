//! Tensor encryption as the reference does it: libsodium `crypto_secretbox` (XSalsa20-Poly1305,
//! detached MACs) over 2 MiB chunks of a tensor's data, the nonce incremented (little-endian,
//! `sodium_increment`) per chunk, one MAC per chunk; keys raw (32 bytes) or derived from a password
//! with `crypto_pwhash` (Argon2id v1.3, parameters stored in the file).
//!
//! Crypt info, stored in every per-tensor header of an encrypted file:
//!
//! ```text
//! u16 chunk_count, then per chunk: u64 size, u16 chunk_type, body
//!   type 1 (key derivation): u16 method (1 = pwhash): u64 opslimit, u64 memlimit, i32 alg,
//!                            u16 salt_len, salt
//!   type 2 (XSalsa20, parallel chunks): u64 chunk_size, [24] nonce, u64 mac_count, [16] × macs
//!   type 3 (XSalsa20, one box):          [24] nonce, [16] mac
//! ```

use xsalsa20poly1305::aead::{AeadInPlace, KeyInit};
use xsalsa20poly1305::{Tag, XSalsa20Poly1305};

use super::index::Cursor;
use crate::error::{Error, ErrorKind, Result};

/// Bytes per encryption chunk written by the reference (and by [`super::Serializer`]).
pub const CHUNK_SIZE: u64 = 2 << 20;
/// XSalsa20 nonce length.
pub const NONCE_LEN: usize = 24;
/// Poly1305 MAC length.
pub const MAC_LEN: usize = 16;
/// `crypto_pwhash_SALTBYTES`.
pub const SALT_LEN: usize = 16;
/// `crypto_pwhash_ALG_ARGON2ID13`.
pub const ALG_ARGON2ID13: i32 = 2;
/// `crypto_pwhash_OPSLIMIT_MODERATE` / `MEMLIMIT_MODERATE` (the reference's defaults).
pub const OPSLIMIT_MODERATE: u64 = 3;
/// See [`OPSLIMIT_MODERATE`].
pub const MEMLIMIT_MODERATE: u64 = 268_435_456;
/// Largest Argon2 memory this reader agrees to spend on a key derivation stored in a file.
pub const MAX_MEMLIMIT: u64 = 4 << 30;
/// Largest Argon2 work (passes × memory bytes) this reader agrees to spend on a key derivation
/// stored in a file: 4 × libsodium's `SENSITIVE` limits (4 passes over 1 GiB), tens of seconds
/// at most. A corrupted or hostile opslimit (up to 2^32 passes) would otherwise run for days.
pub const MAX_PWHASH_WORK: u64 = 16 << 30;

/// Largest key or password file read ([`KeySource::from_key_path`]).
pub const MAX_SECRET_FILE: u64 = 64 << 10;

/// The contents of a key or password file, at most [`MAX_SECRET_FILE`] bytes.
fn read_secret_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let named = |e: std::io::Error| Error::from_io(e, format!("reading {what} {}", path.display()));
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes))
        .map_err(named)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(Error::invalid(format!(
            "{what} {} is larger than {} KiB: not a key or password",
            path.display(),
            MAX_SECRET_FILE >> 10
        )));
    }
    Ok(bytes)
}

/// A decryption/encryption key: raw, or a password to derive it from.
#[derive(Clone)]
#[non_exhaustive]
pub enum KeySource {
    /// The exact 32-byte XSalsa20 key.
    Key([u8; 32]),
    /// A password (any bytes) for Argon2id with the parameters stored in the file.
    Password(Vec<u8>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Key(_) => f.write_str("KeySource::Key(..)"),
            KeySource::Password(_) => f.write_str("KeySource::Password(..)"),
        }
    }
}

impl KeySource {
    /// A key from the contents of a key file: exactly 32 raw bytes, or 64 hex characters
    /// (surrounding whitespace ignored).
    pub fn from_key_file(bytes: &[u8]) -> Result<Self> {
        if bytes.len() == 32 {
            let mut k = [0u8; 32];
            k.copy_from_slice(bytes);
            return Ok(KeySource::Key(k));
        }
        let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
        if text.len() == 64 {
            let digit = |c: u8| (c as char).to_digit(16);
            let mut k = [0u8; 32];
            for (out, pair) in k.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
                match (digit(pair[0]), digit(pair[1])) {
                    (Some(hi), Some(lo)) => *out = (hi * 16 + lo) as u8,
                    _ => {
                        return Err(Error::invalid(
                            "key file is 64 bytes long but not 64 hexadecimal digits",
                        ))
                    }
                }
            }
            return Ok(KeySource::Key(k));
        }
        Err(Error::invalid(format!(
            "a key must be 32 raw bytes or 64 hex characters, not {} bytes",
            bytes.len()
        )))
    }

    /// A key read from a key file ([`KeySource::from_key_file`] of its contents). The file is
    /// read only up to [`MAX_SECRET_FILE`] bytes: a larger one (`/dev/zero` given by mistake)
    /// is refused rather than read until memory runs out. Errors name the file.
    pub fn from_key_path(path: &std::path::Path) -> Result<Self> {
        Self::from_key_file(&read_secret_file(path, "key file")?)
            .map_err(|e| e.context(format_args!("key file {}", path.display())))
    }

    /// A password read from a password file ([`KeySource::password`] of its contents), read
    /// like [`KeySource::from_key_path`] reads a key file.
    pub fn from_password_path(path: &std::path::Path) -> Result<Self> {
        Self::password(&read_secret_file(path, "password file")?)
            .map_err(|e| e.context(format_args!("password file {}", path.display())))
    }

    /// A password from the contents of a password file or variable (one trailing newline is
    /// dropped).
    pub fn password(text: &[u8]) -> Result<Self> {
        let t = text
            .strip_suffix(b"\n")
            .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
            .unwrap_or(text);
        if t.is_empty() {
            return Err(Error::invalid("password is empty"));
        }
        Ok(KeySource::Password(t.to_vec()))
    }
}

/// `crypto_pwhash` parameters stored in a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PwHash {
    /// Argon2 passes (t_cost).
    pub opslimit: u64,
    /// Memory in bytes (m_cost = memlimit / 1024 KiB).
    pub memlimit: u64,
    /// Algorithm id (2 = Argon2id v1.3).
    pub alg: i32,
    /// Salt.
    pub salt: Vec<u8>,
}

/// How a tensor's data was encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cipher {
    /// Independent boxes of `chunk_size` bytes, nonces `nonce`, `nonce + 1`, … (one MAC each).
    Parallel {
        /// Bytes per chunk (the last may be shorter).
        chunk_size: u64,
        /// Nonce of the first chunk.
        nonce: [u8; NONCE_LEN],
        /// One MAC per chunk.
        macs: Vec<[u8; MAC_LEN]>,
    },
    /// One box over the whole data.
    Sequential {
        /// Nonce.
        nonce: [u8; NONCE_LEN],
        /// MAC.
        mac: [u8; MAC_LEN],
    },
}

/// Parsed crypt info of one per-tensor header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CryptInfo {
    /// Key derivation, if the key came from a password.
    pub kdf: Option<PwHash>,
    /// The cipher; `None` for the empty crypt info of tensors without data.
    pub cipher: Option<Cipher>,
}

impl CryptInfo {
    /// Parses the crypt info body (after its u64 length).
    pub fn parse(b: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(b, "crypt info");
        let count = c.u16("chunk count")?;
        let mut out = CryptInfo::default();
        for _ in 0..count {
            let size = c.u64("chunk size")?;
            let size = usize::try_from(size)
                .map_err(|_| Error::corrupt("crypt info chunk size overflows"))?;
            let body = c.take(size, "chunk")?;
            let mut k = Cursor::new(body, "crypt info chunk");
            match k.u16("chunk type")? {
                1 => {
                    let method = k.u16("key derivation method")?;
                    if method != 1 {
                        return Err(Error::unsupported(format!(
                            "unknown key derivation method {method} in crypt info"
                        )));
                    }
                    let opslimit = k.u64("opslimit")?;
                    let memlimit = k.u64("memlimit")?;
                    let alg = k.u32("algorithm")? as i32;
                    let sl = k.u16("salt length")? as usize;
                    let salt = k.take(sl, "salt")?.to_vec();
                    if out.kdf.is_some() {
                        return Err(Error::corrupt("crypt info holds two key derivations"));
                    }
                    out.kdf = Some(PwHash {
                        opslimit,
                        memlimit,
                        alg,
                        salt,
                    });
                }
                2 => {
                    let chunk_size = k.u64("chunk size")?;
                    let mut nonce = [0u8; NONCE_LEN];
                    nonce.copy_from_slice(k.take(NONCE_LEN, "nonce")?);
                    let n = k.u64("MAC count")?;
                    if n > (body.len() / MAC_LEN) as u64 {
                        return Err(Error::corrupt(format!(
                            "crypt info claims {n} MACs in a {}-byte chunk",
                            body.len()
                        )));
                    }
                    let mut macs = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let mut m = [0u8; MAC_LEN];
                        m.copy_from_slice(k.take(MAC_LEN, "MAC")?);
                        macs.push(m);
                    }
                    if chunk_size % 64 != 0 || chunk_size < 1024 {
                        return Err(Error::corrupt(format!(
                            "invalid encryption chunk size {chunk_size}"
                        )));
                    }
                    out.set_cipher(Cipher::Parallel {
                        chunk_size,
                        nonce,
                        macs,
                    })?;
                }
                3 => {
                    let mut nonce = [0u8; NONCE_LEN];
                    nonce.copy_from_slice(k.take(NONCE_LEN, "nonce")?);
                    let mut mac = [0u8; MAC_LEN];
                    mac.copy_from_slice(k.take(MAC_LEN, "MAC")?);
                    out.set_cipher(Cipher::Sequential { nonce, mac })?;
                }
                t => {
                    return Err(Error::unsupported(format!(
                        "unknown crypt info chunk type {t}"
                    )))
                }
            }
        }
        Ok(out)
    }

    fn set_cipher(&mut self, c: Cipher) -> Result<()> {
        if self.cipher.is_some() {
            return Err(Error::corrupt(
                "crypt info names more than one encryption method",
            ));
        }
        self.cipher = Some(c);
        Ok(())
    }

    /// Serialises the body (without the outer u64 length), chunks in the reference's order (key
    /// derivation first).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        if let Some(k) = &self.kdf {
            let mut b = Vec::new();
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&k.opslimit.to_le_bytes());
            b.extend_from_slice(&k.memlimit.to_le_bytes());
            b.extend_from_slice(&k.alg.to_le_bytes());
            b.extend_from_slice(&(k.salt.len() as u16).to_le_bytes());
            b.extend_from_slice(&k.salt);
            chunks.push(b);
        }
        match &self.cipher {
            Some(Cipher::Parallel {
                chunk_size,
                nonce,
                macs,
            }) => {
                let mut b = Vec::new();
                b.extend_from_slice(&2u16.to_le_bytes());
                b.extend_from_slice(&chunk_size.to_le_bytes());
                b.extend_from_slice(nonce);
                b.extend_from_slice(&(macs.len() as u64).to_le_bytes());
                for m in macs {
                    b.extend_from_slice(m);
                }
                chunks.push(b);
            }
            Some(Cipher::Sequential { nonce, mac }) => {
                let mut b = Vec::new();
                b.extend_from_slice(&3u16.to_le_bytes());
                b.extend_from_slice(nonce);
                b.extend_from_slice(mac);
                chunks.push(b);
            }
            None => {}
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(chunks.len() as u16).to_le_bytes());
        for c in chunks {
            out.extend_from_slice(&(c.len() as u64).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    /// Size of the serialised body for a tensor of `data_len` bytes encrypted in [`CHUNK_SIZE`]
    /// chunks (used to lay a file out before the MACs are known).
    pub fn body_len(kdf: Option<&PwHash>, data_len: u64) -> u64 {
        let mut n = 2u64;
        if let Some(k) = kdf {
            n += 8 + 2 + 2 + 8 + 8 + 4 + 2 + k.salt.len() as u64;
        }
        n + 8 + 2 + 8 + NONCE_LEN as u64 + 8 + MAC_LEN as u64 * data_len.div_ceil(CHUNK_SIZE)
    }
}

/// Derives the 32-byte key from `password` like libsodium's `crypto_pwhash` (Argon2id v1.3,
/// t = opslimit, m = memlimit / 1024 KiB, one lane).
pub fn derive_key(password: &[u8], p: &PwHash) -> Result<[u8; 32]> {
    if p.alg != ALG_ARGON2ID13 {
        return Err(Error::unsupported(format!(
            "password hashing algorithm {} is not supported (only Argon2id v1.3)",
            p.alg
        )));
    }
    if p.salt.len() != SALT_LEN {
        return Err(Error::corrupt(format!(
            "password salt is {} bytes, libsodium uses {SALT_LEN}",
            p.salt.len()
        )));
    }
    if p.opslimit < 1 || p.opslimit > u32::MAX as u64 {
        return Err(Error::corrupt(format!(
            "invalid pwhash opslimit {}",
            p.opslimit
        )));
    }
    if p.memlimit < 8192 {
        return Err(Error::corrupt(format!(
            "invalid pwhash memlimit {}",
            p.memlimit
        )));
    }
    if p.memlimit > MAX_MEMLIMIT {
        return Err(Error::unsupported(format!(
            "key derivation asks for {} bytes of memory (limit {MAX_MEMLIMIT})",
            p.memlimit
        )));
    }
    if p.opslimit
        .checked_mul(p.memlimit)
        .is_none_or(|w| w > MAX_PWHASH_WORK)
    {
        return Err(Error::unsupported(format!(
            "key derivation asks for {} passes over {} bytes of memory (at most {MAX_PWHASH_WORK} \
             pass-bytes in all are accepted): corrupted or hostile file?",
            p.opslimit, p.memlimit
        )));
    }
    let params = argon2::Params::new((p.memlimit / 1024) as u32, p.opslimit as u32, 1, Some(32))
        .map_err(|e| Error::corrupt(format!("invalid Argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    a.hash_password_into(password, &p.salt, &mut key)
        .map_err(|e| Error::new(ErrorKind::Io, format!("key derivation failed: {e}")))?;
    Ok(key)
}

/// `sodium_increment`: little-endian +1 with carry.
pub fn increment(nonce: &mut [u8; NONCE_LEN]) {
    for b in nonce.iter_mut() {
        let (v, carry) = b.overflowing_add(1);
        *b = v;
        if !carry {
            break;
        }
    }
}

/// Decrypts `data` in place. Each box's MAC is checked before its bytes are touched; on failure
/// returns the failing chunk's index and leaves that chunk as ciphertext.
pub fn decrypt(
    key: &[u8; 32],
    cipher: &Cipher,
    data: &mut [u8],
) -> std::result::Result<(), String> {
    let aead = XSalsa20Poly1305::new(key.into());
    match cipher {
        Cipher::Sequential { nonce, mac } => aead
            .decrypt_in_place_detached(nonce.into(), b"", data, Tag::from_slice(mac))
            .map_err(|_| "MAC mismatch".to_string()),
        Cipher::Parallel {
            chunk_size,
            nonce,
            macs,
        } => {
            if macs.len() == 1 {
                return aead
                    .decrypt_in_place_detached(nonce.into(), b"", data, Tag::from_slice(&macs[0]))
                    .map_err(|_| "MAC mismatch".to_string());
            }
            let cs =
                usize::try_from(*chunk_size).map_err(|_| "chunk size too large".to_string())?;
            let want = data.len().div_ceil(cs);
            if want != macs.len() {
                return Err(format!(
                    "{} bytes in {cs}-byte chunks need {want} MACs, the header has {}",
                    data.len(),
                    macs.len()
                ));
            }
            let mut n = *nonce;
            for (i, (chunk, mac)) in data.chunks_mut(cs).zip(macs).enumerate() {
                aead.decrypt_in_place_detached((&n).into(), b"", chunk, Tag::from_slice(mac))
                    .map_err(|_| format!("MAC mismatch in chunk {i}"))?;
                increment(&mut n);
            }
            Ok(())
        }
    }
}

/// Encrypts one chunk in place with `nonce`; returns its MAC.
pub fn encrypt_chunk(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    chunk: &mut [u8],
) -> Result<[u8; MAC_LEN]> {
    let aead = XSalsa20Poly1305::new(key.into());
    let tag = aead
        .encrypt_in_place_detached(nonce.into(), b"", chunk)
        .map_err(|_| Error::new(ErrorKind::Io, "encryption failed"))?;
    let mut m = [0u8; MAC_LEN];
    m.copy_from_slice(&tag);
    Ok(m)
}

/// Random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::new(ErrorKind::Io, format!("no OS randomness: {e}")))?;
    Ok(b)
}
