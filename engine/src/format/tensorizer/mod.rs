//! CoreWeave tensorizer files: reader (data versions 1–5), hash verification, decryption, and a
//! streaming writer ([`Serializer`]) producing files the reference tool (2.12) reads.
//!
//! * [`index`]: file header, feature flags, metadata index, dtype and name codecs.
//! * [`header`]: per-tensor headers and their hashes.
//! * [`crypt`]: XSalsa20-Poly1305 chunked encryption and Argon2id key derivation.
//! * [`hook`]: the per-tensor [`crate::sink::TensorHook`] that verifies and decrypts while loading.
//! * [`writer`]: the [`Serializer`].
//!
//! Loading: [`crate::format::read_index`] gives a [`TensorIndex`] whose stored tensors carry their
//! per-tensor header as [`crate::TensorInfo::prefix`]; [`prepare`] drops those prefixes when
//! nothing needs them, or returns the hook to pass to [`crate::HostSink::with_hook`].
//!
//! Meta tensors (stored with data length 0, from data version 4) load as zeros
//! ([`crate::TensorSource::Zeros`]); [`prepare`] always reads their per-tensor headers and
//! checks them against the index (and their hashes, with verification), so a corrupted index
//! cannot turn a stored tensor into zeros unnoticed. Names stored as json-seq (0x1E + JSON array) are exposed as
//! [`crate::TensorInfo::path`] with the components joined by `.` as the display name.

pub mod crypt;
pub mod header;
pub mod hook;
pub mod index;
pub mod writer;

use std::sync::Arc;

pub use crypt::KeySource;
pub use index::parse_prefix;
pub use writer::{Serializer, SerializerOptions, TensorSpec};

use crate::backend::{Backend, BackendExt};
use crate::error::{Error, Result};
use crate::index::{Format, TensorIndex, TensorSource};
use crate::sink::TensorHook;

/// File magic.
pub const MAGIC: &[u8; 5] = b"|TZR|";
/// Newest data version this reader understands.
pub const MAX_VERSION: u32 = 5;
/// Feature flag: per-tensor headers carry crypt info.
pub const FLAG_ENCRYPTED: u128 = 1;
/// Feature flag: index entries carry a u32 version tag (data version 5).
pub const FLAG_VERSIONED_HEADERS: u128 = 2;
/// Every flag this reader knows.
pub const KNOWN_FLAGS: u128 = FLAG_ENCRYPTED | FLAG_VERSIONED_HEADERS;
/// `TensorIndex::metadata` key set to `"true"` for encrypted tensorizer files.
pub const META_ENCRYPTED: &str = "tensorizer.encrypted";

/// What a load of a tensorizer file should do beyond copying bytes.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Check every tensor's CRC32 / SHA-256 against its header.
    pub verify: bool,
    /// Key or password for encrypted files.
    pub key: Option<KeySource>,
}

/// True when the index comes from an encrypted tensorizer file.
pub fn is_encrypted(index: &TensorIndex) -> bool {
    index.format == Format::Tensorizer
        && index.metadata.get(META_ENCRYPTED).map(String::as_str) == Some("true")
}

/// Number of worker threads for verification / decryption.
pub fn hook_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
}

/// Largest per-tensor header of a meta tensor [`prepare`] reads (they hold a name, a shape, two
/// hashes and, when encrypted, a few dozen bytes of crypt info).
pub const MAX_META_HEADER: u64 = 1 << 20;
/// Meta tensors' headers at most this far apart are read together.
const META_BATCH_GAP: u64 = 64 << 10;
/// Largest read of meta tensors' headers together.
const META_BATCH_MAX: u64 = 4 << 20;

/// Readies `index` (read from `backend`) for a load with `opts`: returns the hook that verifies /
/// decrypts (to pass to [`crate::HostSink::with_hook`]), or `None` and strips the per-tensor
/// header prefixes when the load needs neither. The headers of meta tensors are read from
/// `backend` and checked against the index here, in every case (they load as zeros, so no sink
/// sees them): a stored tensor whose index entry was corrupted to length 0 would otherwise load
/// as zeros, unnoticed (its header still gives its real length). Their hashes are checked with
/// verification. Their prefixes are dropped in every case. Works for any format: a safetensors index passes through
/// unchanged unless verification or a key is asked for, which is an error (safetensors has no
/// checksums and no encryption).
pub fn prepare(
    backend: &dyn Backend,
    index: &mut TensorIndex,
    opts: &ReadOptions,
) -> Result<Option<Arc<dyn TensorHook>>> {
    check_options(index, opts)?;
    if index.format != Format::Tensorizer {
        return Ok(None);
    }
    let encrypted = is_encrypted(index);
    let plain = !encrypted && !opts.verify;
    if plain
        && index
            .tensors
            .iter()
            .all(|t| t.source != TensorSource::Zeros)
    {
        strip_prefixes(index, opts);
        return Ok(None);
    }
    let hook = hook::TensorizerHook::new(index, opts.verify, opts.key.clone())?;
    // The meta tensors' headers, in file order, read in batches of neighbours (on a remote
    // backend each read is a round trip: a model with many meta tensors would pay one each).
    let mut metas = Vec::new();
    for (i, t) in index.tensors.iter().enumerate() {
        if t.source != TensorSource::Zeros {
            continue;
        }
        let span = t.prefix.clone().unwrap_or(0..0);
        let len = span.end.saturating_sub(span.start);
        if len > MAX_META_HEADER {
            return Err(Error::corrupt(format!(
                "meta tensor {:?}: its per-tensor header at {}..{} is {len} bytes (at most {MAX_META_HEADER} expected)",
                t.name, span.start, span.end
            )));
        }
        metas.push((i, span.start..span.start + len));
    }
    metas.sort_by_key(|(_, r)| r.start);
    let mut k = 0;
    while k < metas.len() {
        // A batch: following headers while the gap to the next is small and the read stays
        // bounded.
        let start = metas[k].1.start;
        let mut end = metas[k].1.end;
        let mut last = k + 1;
        while let Some((_, r)) = metas.get(last) {
            if r.start < end || r.start - end > META_BATCH_GAP || r.end - start > META_BATCH_MAX {
                break;
            }
            end = end.max(r.end);
            last += 1;
        }
        let bytes = backend.read_exact_at(start, (end - start) as usize)?;
        for (i, r) in &metas[k..last] {
            let (a, b) = ((r.start - start) as usize, (r.end - start) as usize);
            hook.check_meta(*i, &bytes[a..b])?;
        }
        k = last;
    }
    strip_prefixes(index, opts);
    if plain {
        return Ok(None);
    }
    Ok(Some(Arc::new(hook)))
}

/// The refusals of [`prepare`] that need nothing read: verification or a key asked of a file
/// that takes none, an encrypted file without a key.
pub fn check_options(index: &TensorIndex, opts: &ReadOptions) -> Result<()> {
    if index.format != Format::Tensorizer {
        if opts.verify {
            return Err(Error::unsupported(format!(
                "{} files carry no checksums to verify",
                index.format.name()
            )));
        }
        if opts.key.is_some() {
            return Err(Error::invalid(format!(
                "{} files are never encrypted; no key or password is needed",
                index.format.name()
            )));
        }
        return Ok(());
    }
    match (is_encrypted(index), &opts.key) {
        (true, None) => Err(Error::invalid(
            "this tensorizer file is encrypted: give its key or password (library: \
             Loader::key, key_file or password_file; command line: --key-file, \
             --password-file or TENSORSTREAM_PASSWORD)",
        )),
        (false, Some(_)) => Err(Error::invalid(
            "a key or password was given but this tensorizer file is not encrypted",
        )),
        _ => Ok(()),
    }
}

/// The changes [`prepare`] makes to `index` for a load with `opts` (when it succeeds), without
/// reading anything: a tensorizer file's per-tensor header prefixes dropped, all of them when
/// the load neither verifies nor decrypts, else the meta tensors' ones. A plan made from the
/// index this leaves lays out the same memory as one made after `prepare` (what a sharded GPU
/// load sizes its shards' device memory by before it opens them again). Other formats' indexes
/// are left as they are.
pub fn strip_prefixes(index: &mut TensorIndex, opts: &ReadOptions) {
    if index.format != Format::Tensorizer {
        return;
    }
    let plain = !is_encrypted(index) && !opts.verify;
    for t in &mut index.tensors {
        if plain || t.source == TensorSource::Zeros {
            t.prefix = None;
        }
    }
}

#[cfg(test)]
mod tests;
