//! File formats: pure parsers from a metadata prefix to a [`TensorIndex`].
//!
//! A parser never does I/O. [`parse_prefix`] looks at the first bytes of an object and either
//! returns the index or asks for a longer prefix; [`read_index`] drives that loop through a
//! [`Backend`], reading only the metadata, never the tensor data.

pub mod convert;
pub mod safetensors;
pub mod tensorizer;

use crate::backend::{Backend, BackendExt, ObjectMeta};
use crate::error::{Error, ErrorKind, Result};
use crate::index::TensorIndex;

/// Outcome of looking at a prefix of an object.
#[derive(Debug)]
pub enum Probe {
    /// The prefix held all the metadata.
    Index(TensorIndex),
    /// The metadata needs the first `n` bytes of the object (more than were given).
    NeedPrefix(u64),
}

/// How many bytes the first metadata read asks for.
pub const FIRST_READ: u64 = 64 * 1024;

/// Largest metadata prefix any format may ask for (hostile headers are rejected before this).
pub const MAX_METADATA: u64 = 1 << 30;

/// The error of an empty object, whatever its backend.
const EMPTY_OBJECT: &str = "the object's size is 0 bytes: it is empty";

/// [`EMPTY_OBJECT`] for a local file ([`read_index`] through a backend whose capabilities'
/// kind is `local`): a file in /proc (or /sys) reports size 0 too, whatever it holds.
const EMPTY_LOCAL_FILE: &str = "the object's size is 0 bytes: an empty file (or a special \
     file that reports no size, as those in /proc do)";

/// Detects the format from the first bytes and parses the index if `prefix` holds enough.
pub fn parse_prefix(prefix: &[u8], object_size: u64) -> Result<Probe> {
    if object_size == 0 {
        return Err(Error::corrupt(EMPTY_OBJECT));
    }
    if prefix.len() >= 5 && &prefix[..5] == tensorizer::MAGIC {
        return tensorizer::parse_prefix(prefix, object_size);
    }
    // "|???|" cannot start a safetensors file (its header length would exceed the limit).
    if prefix.len() >= 5 && prefix[0] == b'|' && prefix[4] == b'|' {
        return Err(Error::corrupt(format!(
            "unknown magic {:?}: not a tensorizer file (|TZR|) nor safetensors",
            String::from_utf8_lossy(&prefix[..5])
        ))
        .with_range(0..5));
    }
    safetensors::parse_prefix(prefix, object_size).map_err(|e| {
        if prefix.first() != Some(&b'{') {
            return e;
        }
        // A JSON file: most likely a sharded checkpoint's index under another name (a valid
        // safetensors header length may start with this byte too, hence only a hint).
        let hinted = Error::new(
            e.kind(),
            format!(
                "{}; the file starts with '{{' (JSON?): a sharded checkpoint's index is \
                 recognised by its name (NAME.safetensors.index.json, NAME.tensors.index.json) \
                 or by giving its directory",
                e.message()
            ),
        );
        match e.range() {
            Some(r) => hinted.with_range(r),
            None => hinted,
        }
    })
}

/// Reads and parses the metadata of the object behind `backend`.
pub fn read_index(backend: &dyn Backend, meta: &ObjectMeta) -> Result<TensorIndex> {
    read_index_and_object(backend, meta).map(|(index, _)| index)
}

/// [`read_index`], and the whole object's bytes when the reads of its metadata brought all of
/// it (an object of at most [`FIRST_READ`] bytes, say): the bytes the index was parsed from,
/// which a caller that loads the object's tensors next may keep instead of reading them again.
pub fn read_index_and_object(
    backend: &dyn Backend,
    meta: &ObjectMeta,
) -> Result<(TensorIndex, Option<Vec<u8>>)> {
    let loc = backend.location().to_string();
    if meta.size == 0 && backend.capabilities().kind == "local" {
        return Err(Error::corrupt(EMPTY_LOCAL_FILE).with_location(&loc));
    }
    let mut want = FIRST_READ.min(meta.size);
    let mut prefix = backend
        .read_exact_at(0, want as usize)
        .map_err(|e| e.with_location(&loc))?;
    loop {
        match parse_prefix(&prefix, meta.size).map_err(|e| e.with_location(&loc))? {
            Probe::Index(idx) => {
                // (`want` bytes were read, and `want` <= the object's size.)
                let whole = want == meta.size && prefix.len() as u64 == meta.size;
                return Ok((idx, whole.then_some(prefix)));
            }
            Probe::NeedPrefix(n) => {
                if n <= want || n > meta.size || n > MAX_METADATA {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "metadata asks for a {n}-byte prefix of a {}-byte object",
                            meta.size
                        ),
                    )
                    .with_location(&loc));
                }
                // One buffer of the final size, the rest read straight into its tail: a large
                // (or hostile) header costs its size once, not two or three copies of it.
                let mut longer = Vec::new();
                longer.try_reserve_exact(n as usize).map_err(|_| {
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot allocate {n} bytes for the metadata"),
                    )
                    .with_location(&loc)
                })?;
                longer.extend_from_slice(&prefix);
                drop(prefix);
                longer.resize(n as usize, 0);
                let mut at = want as usize;
                while at < longer.len() {
                    let asked = longer.len() - at;
                    let got = backend
                        .read_at(at as u64, &mut longer[at..])
                        .map_err(|e| e.with_location(&loc).with_range(at as u64..n))?;
                    if got > asked {
                        return Err(
                            crate::backend::over_claim(got, asked, at as u64).with_location(&loc)
                        );
                    }
                    if got == 0 {
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            format!(
                                "object ends after {at} bytes, inside its metadata ({n} bytes)"
                            ),
                        )
                        .with_location(&loc)
                        .with_range(want..n));
                    }
                    at += got;
                }
                prefix = longer;
                want = n;
            }
        }
    }
}
