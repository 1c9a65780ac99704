//! `convert`: safetensors or tensorizer in, safetensors or tensorizer out (chosen by the output's
//! extension), tensor by tensor.
//!
//! Memory: tensors that need no processing stream through one buffer of
//! [`ConvertOptions::buffer_size`] bytes (remote inputs also use the buffers of a reader session,
//! at most 8 requests of at most 8 MiB, and a read-ahead of at most 1 MiB for small tensors); a
//! tensor that must be verified or decrypted is held whole while it is (so the bound is the
//! largest such tensor, never the model). The output is written to a temporary file beside it
//! and renamed into place only when everything succeeded.

use std::io::{BufWriter, Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use super::tensorizer::{self, KeySource, ReadOptions, Serializer, SerializerOptions, TensorSpec};
use crate::backend::{Backend, ObjectMeta, ReadRequest, ReaderOptions};
use crate::error::{Error, Result};
use crate::index::{TensorIndex, TensorSource};
use crate::mem::IoBuf;
use crate::sink::TensorHook;
use crate::RangeReader;

/// A part's opened object: its backend, its index (the tensors to write, in order) and its
/// verification / decryption hook.
pub type OpenedPart<'a> = (PartBackend<'a>, TensorIndex, Option<Arc<dyn TensorHook>>);

/// One input of [`convert_parts`]: the tensors to take from one object (e.g. one shard of a
/// sharded checkpoint), opened only when its turn comes, so that one object is open at a time.
pub struct ConvertPart<'a> {
    /// Where the part is read from (for messages).
    pub location: String,
    /// The tensors to take from it, in order: their names, dtypes and shapes make the output's
    /// header before any part is opened. (A safetensors output's metadata is every part's; the
    /// first part's value wins where they differ.)
    pub index: TensorIndex,
    /// Opens the part. The index it gives must list the same tensors (name, dtype, shape) in
    /// the same order; an object that changed meanwhile fails the conversion.
    pub open: Box<dyn FnOnce() -> Result<OpenedPart<'a>> + 'a>,
}

/// A part's backend: borrowed from the caller or opened for the part, each with the metadata
/// (size, version) its index was read under. After the part's last tensor the object is checked
/// against it ([`crate::unchanged_since`], a final `stat`, as a load does), so that a change no
/// read noticed fails the conversion instead of writing bytes of two versions.
pub enum PartBackend<'a> {
    /// The caller's.
    Borrowed(&'a dyn Backend, ObjectMeta),
    /// Opened for this part (closed when the part is done).
    Owned(Arc<dyn Backend>, ObjectMeta),
    /// Opened for this part: a remote backend is then read through a reader session that
    /// follows [`ConvertOptions::cancel`], so that a cancel stops a read in flight (`read_at`
    /// on a stalled server would hold it until the request timed out).
    Session(Arc<dyn Backend>, ObjectMeta),
}

impl PartBackend<'_> {
    fn get(&self) -> &dyn Backend {
        match self {
            PartBackend::Borrowed(b, _) => *b,
            PartBackend::Owned(b, _) | PartBackend::Session(b, _) => b.as_ref(),
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            PartBackend::Borrowed(_, m) | PartBackend::Owned(_, m) | PartBackend::Session(_, m) => {
                m
            }
        }
    }

    /// The part's final check: the object is still the version its tensors were read from.
    fn check_unchanged(&self, loc: &str) -> Result<()> {
        crate::unchanged_since(self.get(), self.meta()).map_err(|e| e.with_location(loc))
    }

    /// A failure while the part's tensors were converted, or the object's change where one
    /// explains it (a checksum mismatch, an object that ends early: a rewrite in progress),
    /// as a load reports it ([`crate::pipeline::or_changed`]).
    fn or_changed(&self, e: Error, loc: &str) -> Error {
        crate::pipeline::or_changed(self.get(), self.meta(), e).with_location(loc)
    }
}

/// How a part's bytes are read: a reader session ([`PartBackend::Session`] of a remote backend)
/// or `read_at`.
struct Reads<'a> {
    be: &'a dyn Backend,
    session: Option<Session>,
    /// Remote backends: small reads widened over the tensors that follow.
    ahead: Option<Ahead>,
}

/// Read-ahead for backends whose reads are requests (not the kernel's): a read shorter than
/// [`AHEAD_WINDOW`] is widened to the end of the next tensors that fit the window (gaps of at
/// most [`AHEAD_GAP`] bytes between them), and later reads inside it are served from memory.
/// Tensors are converted one by one, and each used to cost a request (100,000 requests to
/// convert a checkpoint of 100,000 small tensors over HTTP).
struct Ahead {
    /// Object ranges the part's tensors need (per-tensor prefix and data), in object order.
    spans: Vec<std::ops::Range<u64>>,
    /// Object offset of `bytes`.
    at: u64,
    bytes: Vec<u8>,
}

/// Largest read-ahead (bytes of one widened read).
const AHEAD_WINDOW: u64 = 1 << 20;
/// Largest gap between tensors a widened read reads through.
const AHEAD_GAP: u64 = 4096;

impl Ahead {
    fn new(index: &TensorIndex) -> Self {
        let mut spans: Vec<_> = index
            .tensors
            .iter()
            .filter(|t| t.source == TensorSource::Stored && t.range.start < t.range.end)
            .map(|t| t.prefix.as_ref().map_or(t.range.start, |p| p.start)..t.range.end)
            .collect();
        spans.sort_unstable_by_key(|r| (r.start, r.end));
        Ahead {
            spans,
            at: 0,
            bytes: Vec::new(),
        }
    }

    /// Where a read of `offset..end` should end: past `end` over the spans that follow it
    /// closely and end within [`AHEAD_WINDOW`] of `offset`.
    fn extent(&self, offset: u64, end: u64) -> u64 {
        let mut e = end;
        let mut k = self.spans.partition_point(|r| r.end <= end);
        while let Some(r) = self.spans.get(k) {
            if r.start > e.saturating_add(AHEAD_GAP) || r.end - offset > AHEAD_WINDOW {
                break;
            }
            e = e.max(r.end);
            k += 1;
        }
        e
    }
}

/// A reader session reading pieces of a range side by side, as the backend's `read_at` would
/// (remote backends split a large read into concurrent requests).
struct Session {
    reader: Box<dyn RangeReader>,
    /// Bytes per request and requests in flight (`depth × piece` bytes of buffers at most).
    piece: usize,
    depth: usize,
    /// Buffers between reads.
    free: Vec<IoBuf>,
}

/// Most bytes of one request of a conversion's reader session, and most requests in flight.
const SESSION_PIECE: usize = 8 << 20;
const SESSION_DEPTH: usize = 8;

impl<'a> Reads<'a> {
    fn new(be: &'a PartBackend<'_>, index: &TensorIndex, opts: &ConvertOptions) -> Result<Self> {
        let session = match be {
            // Local files are read by the kernel (no request to abandon): `read_at` is as
            // quick to stop between reads.
            PartBackend::Session(b, meta) if !b.capabilities().kernel_reads => {
                let caps = b.capabilities();
                let depth = caps.max_concurrency.clamp(1, SESSION_DEPTH);
                let mut ro = ReaderOptions::new(depth);
                ro.cancel = opts.cancel.clone();
                Some(Session {
                    reader: b.clone().open_reader(meta, &ro)?,
                    piece: caps.preferred_chunk.clamp(64 << 10, SESSION_PIECE),
                    depth,
                    free: Vec::new(),
                })
            }
            _ => None,
        };
        let ahead = (!be.get().capabilities().kernel_reads).then(|| Ahead::new(index));
        Ok(Reads {
            be: be.get(),
            session,
            ahead,
        })
    }

    /// Fills `out` from `offset`; an object that ends first is an error.
    fn read_full(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let end = offset + out.len() as u64;
        if let Some(mut a) = self.ahead.take() {
            let r = (|| {
                if offset >= a.at && end <= a.at + a.bytes.len() as u64 {
                    let from = (offset - a.at) as usize;
                    out.copy_from_slice(&a.bytes[from..from + out.len()]);
                    return Ok(true);
                }
                if (out.len() as u64) >= AHEAD_WINDOW {
                    return Ok(false);
                }
                let wide = a.extent(offset, end);
                if wide <= end {
                    return Ok(false);
                }
                a.bytes.clear();
                a.bytes.resize((wide - offset) as usize, 0);
                a.at = offset;
                let r = self.read_exact(offset, &mut a.bytes);
                if r.is_err() {
                    a.bytes.clear();
                }
                r?;
                out.copy_from_slice(&a.bytes[..out.len()]);
                Ok(true)
            })();
            self.ahead = Some(a);
            if r? {
                return Ok(());
            }
        }
        self.read_exact(offset, out)
    }

    fn read_exact(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        match &mut self.session {
            None => read_full(self.be, offset, out),
            Some(s) => {
                let r = s.read_full(offset, out);
                if r.is_err() {
                    // Every buffer back before returning: the next call starts clean.
                    s.drain();
                }
                r
            }
        }
    }
}

impl Session {
    fn read_full(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let (len, piece) = (out.len(), self.piece);
        let pieces = len.div_ceil(piece);
        let span = move |k: usize| k * piece..((k + 1) * piece).min(len);
        let mut landed = vec![false; pieces];
        let mut next = 0usize;
        while next < pieces || self.reader.in_flight() > 0 {
            while next < pieces && self.reader.in_flight() < self.depth {
                let mut buf = match self.free.pop() {
                    Some(b) => b,
                    None => IoBuf::aligned(self.piece, 4096)?,
                };
                if !buf.set_len(span(next).len()) {
                    return Err(Error::invalid("conversion read buffer too small"));
                }
                self.reader.submit(ReadRequest {
                    id: next as u64,
                    offset: offset + span(next).start as u64,
                    buf,
                })?;
                next += 1;
            }
            let d = self.reader.wait()?;
            let (id, result, buf) = (d.id, d.result, d.buf);
            self.free.push(buf);
            let k = usize::try_from(id)
                .ok()
                .filter(|&k| k < next && !landed[k])
                .ok_or_else(|| Error::invalid(format!("reader returned an unknown read #{id}")))?;
            let want = span(k);
            let at = offset + want.start as u64;
            let n = result.map_err(|e| e.with_range(at..at + want.len() as u64))?;
            if n > want.len() {
                return Err(crate::backend::over_claim(n, want.len(), at));
            }
            if n != want.len() {
                return Err(Error::corrupt(format!(
                    "object ended at {} while reading {len} bytes at {offset}",
                    offset + (want.start + n) as u64,
                )));
            }
            let got = self.free.last().map(|b| &b.as_slice()[..n]).unwrap_or(&[]);
            out[want].copy_from_slice(got);
            landed[k] = true;
        }
        Ok(())
    }

    /// Stops the reads in flight and takes their buffers back.
    fn drain(&mut self) {
        if self.reader.in_flight() > 0 {
            self.reader.abandon();
        }
        while self.reader.in_flight() > 0 {
            match self.reader.wait() {
                Ok(d) => self.free.push(d.buf),
                Err(_) => break,
            }
        }
    }
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Key for reading a tensorizer input (its hashes are checked in any case:
    /// [`conversion_read`]).
    pub read: ReadOptions,
    /// Encrypt a tensorizer output with this key or password.
    pub encrypt: Option<KeySource>,
    /// Argon2id limits when encrypting with a password: (opslimit, the passes; memlimit, in
    /// bytes).
    pub pwhash_limits: (u64, u64),
    /// Bytes per read when streaming.
    pub buffer_size: usize,
    /// Convert only the tensors with these (display) names; `None`: all of them.
    pub only: Option<Vec<String>>,
    /// Tensor bytes converted so far, for progress display.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Set it (from any thread) to stop: the conversion fails with
    /// [`crate::ErrorKind::Cancelled`] and removes its temporary file.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A tensorizer output's tensor type for tensors whose input does not say (safetensors):
    /// `None` writes state-dict entries (as tensorizer's `write_state_dict`);
    /// [`crate::TensorRole::Parameter`] makes a file that tensorizer's `load_into_module` (vLLM's
    /// loader) accepts. A tensorizer input's own types are kept.
    pub untyped_role: Option<crate::TensorRole>,
    /// Whether the finished output may replace a file (or link) that has its name by then
    /// (default: yes, as a rename does). With `false`, such a file is left as it was and the
    /// conversion fails with [`crate::ErrorKind::InvalidInput`], removing what it wrote; one
    /// that is there when the conversion starts fails it at once, before anything is read.
    pub replace: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        let s = SerializerOptions::default();
        ConvertOptions {
            read: ReadOptions::default(),
            encrypt: None,
            pwhash_limits: s.pwhash_limits,
            buffer_size: 8 << 20,
            only: None,
            progress: None,
            cancel: None,
            untyped_role: None,
            replace: true,
        }
    }
}

/// What [`convert`] wrote. (Fields may be added: build none yourself.)
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConvertStats {
    /// Tensors written.
    pub tensors: usize,
    /// Tensor data bytes written (plaintext).
    pub bytes: u64,
}

/// Output format, from the path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputFormat {
    /// `.safetensors`
    Safetensors,
    /// `.tensors`
    Tensorizer,
}

impl OutputFormat {
    /// `.tensors` → tensorizer, `.safetensors` → safetensors.
    pub fn from_path(p: &Path) -> Result<Self> {
        match p.extension().and_then(|e| e.to_str()) {
            Some("tensors") => Ok(OutputFormat::Tensorizer),
            Some("safetensors") => Ok(OutputFormat::Safetensors),
            _ => Err(Error::invalid(format!(
                "cannot tell the output format of {}: use a .tensors or .safetensors extension",
                p.display()
            ))),
        }
    }
}

/// Converts the object behind `input` into `output`.
pub fn convert(input: &dyn Backend, output: &Path, opts: &ConvertOptions) -> Result<ConvertStats> {
    convert_one(input, None, None, output, opts)
}

/// [`convert`] of a backend the conversion may share: a remote one is then read through a
/// reader session, so that [`ConvertOptions::cancel`] also stops a read in flight. `known`: the
/// object's metadata and index as the caller already read them (from `input`), so that they are
/// not fetched again.
pub fn convert_shared(
    input: Arc<dyn Backend>,
    known: Option<(ObjectMeta, TensorIndex)>,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    convert_one(input.as_ref(), Some(input.clone()), known, output, opts)
}

fn convert_one(
    input: &dyn Backend,
    shared: Option<Arc<dyn Backend>>,
    known: Option<(ObjectMeta, TensorIndex)>,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let fmt = OutputFormat::from_path(output)?;
    if opts.encrypt.is_some() && fmt != OutputFormat::Tensorizer {
        return Err(Error::invalid("only .tensors outputs can be encrypted"));
    }
    let loc = input.location().to_string();
    let (meta, mut index) = match known {
        Some(k) => k,
        None => {
            let meta = input.stat().map_err(|e| e.with_location(&loc))?;
            let index = super::read_index(input, &meta)?;
            (meta, index)
        }
    };
    if let Some(only) = &opts.only {
        let keep: std::collections::HashSet<&str> = only.iter().map(String::as_str).collect();
        index.tensors.retain(|t| keep.contains(t.name.as_str()));
        if index.tensors.len() != keep.len() {
            return Err(Error::invalid(format!(
                "{} of the {} tensors to convert are not in the input",
                keep.len() - index.tensors.len(),
                keep.len()
            ))
            .with_location(&loc));
        }
    }
    let read = conversion_read(&opts.read, &index);
    let hook = tensorizer::prepare(input, &mut index, &read).map_err(|e| e.with_location(&loc))?;
    let declared = index.clone();
    let part = ConvertPart {
        location: loc,
        index: declared,
        open: Box::new(move || {
            let be = match shared {
                Some(b) => PartBackend::Session(b, meta),
                None => PartBackend::Borrowed(input, meta),
            };
            Ok((be, index, hook))
        }),
    };
    convert_parts(vec![part], output, opts)
}

/// Converts the tensors of several objects (the shards of a sharded checkpoint, say) into one
/// `output`, part after part, opening each part's object only when its turn comes. Tensor names
/// must be unique across the parts.
pub fn convert_parts(
    parts: Vec<ConvertPart<'_>>,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let fmt = OutputFormat::from_path(output)?;
    if opts.encrypt.is_some() && fmt != OutputFormat::Tensorizer {
        return Err(Error::invalid("only .tensors outputs can be encrypted"));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &parts {
        for t in &p.index.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(Error::invalid(format!(
                    "tensor {:?} would be written twice (it is in more than one input)",
                    t.name
                ))
                .with_location(&p.location));
            }
        }
    }
    drop(seen);
    // What would fail the final rename fails now, before any tensor is converted: a path that
    // names a directory (`out.tensors/` is not the file `out.tensors`, whatever `Path` makes
    // of the slash) or is one.
    let raw = output.as_os_str().as_encoded_bytes();
    if raw.ends_with(b"/") || raw.ends_with(b"/.") || raw == b"." {
        return Err(Error::invalid(format!(
            "the output {} names a directory: give a file name",
            output.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::invalid(format!(
            "the output {} is a directory",
            output.display()
        )));
    }
    // An output that must not be replaced and is there already (a file, or a link, even a
    // dangling one) fails now, not after the whole conversion as one that appeared meanwhile.
    if !opts.replace && output.symlink_metadata().is_ok() {
        return Err(taken(format!(
            "{} exists: it is not replaced",
            output.display()
        )));
    }
    // A fresh temporary file next to the output (created exclusively, removed on every path
    // unless it is renamed into place): the output is never half-written.
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = output_dir(output);
    let tmp = tempfile::Builder::new()
        .prefix(&partial_prefix(&name))
        // Like File::create: 0666 less the umask (tempfile's default is 0600).
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| {
            let e = without_temp_path(e);
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                format!("the directory {} does not exist", dir.display())
            } else {
                format!("creating a temporary file in {}", dir.display())
            };
            Error::from_io(e, format!("cannot write {}: {what}", output.display()))
        })?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| Error::from_io(e, "duplicating the output descriptor"))?;
    let result = (|| -> Result<ConvertStats> {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let stats = match fmt {
            OutputFormat::Safetensors => write_safetensors(parts, &mut w, opts)?,
            OutputFormat::Tensorizer => {
                let (stats, w2) = write_tensorizer(parts, w, opts)?;
                w = w2;
                stats
            }
        };
        let f = w
            .into_inner()
            .map_err(|e| Error::from_io(e.into_error(), "flushing output"))?;
        f.sync_all()
            .map_err(|e| Error::from_io(e, "syncing output"))?;
        Ok(stats)
    })();
    // Dropping `tmp` (an error, or a failed rename) removes the temporary file. Errors that
    // name no input (writing, flushing) concern the output.
    let stats = result.map_err(|e| e.with_location(output.display().to_string()))?;
    if opts.replace {
        // A file replaced keeps its permission bits (as `sed -i` and `cp` keep them): a forced
        // conversion over a file kept private must not make the new one readable by all. Its
        // owner and group too, where this process may give them (root may; others may keep
        // their own uid and a group they are in), as `sed -i` does: bits kept for a new owner
        // or group would lock out those the old file let read it.
        if let Ok(old) = output.symlink_metadata() {
            if old.is_file() {
                use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
                let f = tmp.as_file();
                if std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid())).is_err() {
                    let _ = std::os::unix::fs::fchown(f, None, Some(old.gid()));
                }
                let mode = old.permissions().mode() & 0o777;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| {
                        Error::from_io(
                            e,
                            format!("giving the output the mode of {}", output.display()),
                        )
                    })?;
            }
        }
        tmp.persist(output)
            .map_err(|e| Error::from_io(e.error, format!("renaming into {}", output.display())))?;
    } else {
        // Moved into place only if the name is still free (no file or link appeared there while
        // the conversion ran); otherwise that file stays as it is and ours is removed.
        match tmp.persist_noclobber(output) {
            Ok(_) => {}
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(appeared(output));
            }
            // A file system that takes neither a no-replace rename nor a hard link (vfat, many
            // FUSE mounts): look, then rename.
            Err(e) => move_if_free(e.file, output)?,
        }
    }
    // The rename itself made durable too (best effort: some file systems cannot sync a
    // directory; the file's bytes are synced already).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(stats)
}

/// The error of a conversion that must not replace `output`, a name taken meanwhile.
fn appeared(output: &Path) -> Error {
    taken(format!(
        "{} appeared while the conversion ran: it was left as it is and the conversion \
         discarded",
        output.display()
    ))
}

/// What the error of a conversion refused because its output name is taken adds to its
/// message, for a library caller. A front end with its own way to ask for a replacement (the
/// CLI's `--force`) strips it ([`output_taken`]) and adds its own.
pub const REPLACE_HINT: &str =
    " (set ConvertOptions::replace, or Loader::replace_output(true), to replace it)";

/// The error of a conversion that must not replace its output, whose name is taken: `what`
/// and [`REPLACE_HINT`], with an [`std::io::ErrorKind::AlreadyExists`] cause
/// ([`output_taken`] tells it apart).
fn taken(what: String) -> Error {
    Error::invalid(format!("{what}{REPLACE_HINT}")).with_source(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "output exists",
    ))
}

/// If `e` is the error of a conversion refused because its output exists (there before it
/// began, or there when it ended), its message without [`REPLACE_HINT`].
pub fn output_taken(e: &Error) -> Option<&str> {
    if e.kind() != crate::ErrorKind::InvalidInput
        || e.io_error()?.kind() != std::io::ErrorKind::AlreadyExists
    {
        return None;
    }
    Some(
        e.message()
            .strip_suffix(REPLACE_HINT)
            .unwrap_or(e.message()),
    )
}

/// Renames `tmp` to `output` if no file (or link) has that name: the fallback of a no-replace
/// rename where the file system has none (a file created between the look and the rename is
/// replaced, a window of microseconds instead of the whole conversion).
fn move_if_free(tmp: tempfile::NamedTempFile, output: &Path) -> Result<()> {
    if output.symlink_metadata().is_ok() {
        return Err(appeared(output));
    }
    tmp.persist(output)
        .map_err(|e| Error::from_io(e.error, format!("renaming into {}", output.display())))?;
    Ok(())
}

/// `e`, an error of `tempfile`'s, without the ` at path "…/.NAME.partial-XXXXXX"` it appends
/// to the OS error: that quoted name of a file never created means nothing to the user, and
/// the caller names the directory itself.
pub fn without_temp_path(e: std::io::Error) -> std::io::Error {
    let shown = e.to_string();
    match shown.rsplit_once(" at path \"") {
        Some((msg, _)) => std::io::Error::new(e.kind(), msg.to_string()),
        None => e,
    }
}

/// The directory a conversion writes `output` in (and its temporary file): `.` for a bare
/// file name.
pub fn output_dir(output: &Path) -> &Path {
    match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The name prefix of the temporary file a conversion writes beside its output named `name`
/// (`.NAME.partial-` and six random characters): `NAME` is cut, at a character boundary, so
/// that the whole name fits the 255 bytes a file name may have wherever the output's does.
pub fn partial_prefix(name: &str) -> String {
    // 1 ('.') + name + 9 (".partial-") + 6 random characters.
    const ROOM: usize = 255 - 16;
    let mut cut = name.len().min(ROOM);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}.partial-", &name[..cut])
}

/// The read options of a conversion: a tensorizer input's hashes are checked whether or not
/// `read` asks for it. A conversion writes new hashes (a tensorizer output) or none
/// (safetensors), so bytes it did not check would come out vouched for, or with no check left.
pub fn conversion_read(read: &ReadOptions, index: &TensorIndex) -> ReadOptions {
    ReadOptions {
        verify: read.verify || index.format == crate::index::Format::Tensorizer,
        key: read.key.clone(),
    }
}

/// Opens a part and checks it still lists the declared tensors.
fn open_part<'a>(part: ConvertPart<'a>) -> Result<(OpenedPart<'a>, String)> {
    let loc = part.location;
    let (be, index, hook) = (part.open)().map_err(|e| e.with_location(&loc))?;
    if !index.same_tensors_as(&part.index) {
        return Err(Error::new(
            crate::ErrorKind::ObjectChanged,
            "its tensors are not the ones listed when the conversion started",
        )
        .with_location(&loc));
    }
    Ok(((be, index, hook), loc))
}

/// Streams one tensor's plaintext to `sink` in pieces.
#[allow(clippy::too_many_arguments)]
fn for_each_piece(
    input: &mut Reads<'_>,
    loc: &str,
    index: &TensorIndex,
    ti: usize,
    hook: &Option<Arc<dyn TensorHook>>,
    buf: &mut [u8],
    opts: &ConvertOptions,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let t = &index.tensors[ti];
    let n = t.nbytes();
    // Every piece goes through here: cancellation is checked and progress counted per piece.
    let mut sink = |p: &[u8]| -> Result<()> {
        check_cancel(opts)?;
        sink(p)?;
        count(opts, p.len() as u64);
        Ok(())
    };
    match (&t.source, hook) {
        (TensorSource::Zeros, _) => {
            buf.iter_mut().for_each(|b| *b = 0);
            let mut left = n;
            while left > 0 {
                let k = (buf.len() as u64).min(left) as usize;
                sink(&buf[..k])?;
                left -= k as u64;
            }
        }
        (TensorSource::Stored, Some(h)) => {
            let (whole, data_start) = checked_whole(input, loc, t, ti, h)?;
            sink(&whole[data_start..])?;
        }
        (TensorSource::Stored, None) => {
            let mut off = t.range.start;
            while off < t.range.end {
                let k = (buf.len() as u64).min(t.range.end - off) as usize;
                input
                    .read_full(off, &mut buf[..k])
                    .map_err(|e| e.with_location(loc))?;
                sink(&buf[..k])?;
                off += k as u64;
            }
        }
    }
    Ok(n)
}

/// A stored tensor with its per-tensor header, read whole and run through the hook (checked,
/// decrypted in place); returns the bytes and where the data starts in them. Memory the
/// allocator refuses is an error naming the tensor, not an abort (with overcommit the kernel
/// may still grant more than it can give).
fn checked_whole(
    input: &mut Reads<'_>,
    loc: &str,
    t: &crate::index::TensorInfo,
    ti: usize,
    h: &Arc<dyn TensorHook>,
) -> Result<(Vec<u8>, usize)> {
    let start = t.prefix.as_ref().map_or(t.range.start, |p| p.start);
    let too_large = || {
        Error::new(
            crate::ErrorKind::Io,
            format!(
                "tensor {:?}: {} bytes (with its header) do not fit in host memory, where it is \
                 checked or decrypted",
                t.name,
                t.range.end - start
            ),
        )
        .with_location(loc)
    };
    let len = usize::try_from(t.range.end - start).map_err(|_| too_large())?;
    let mut whole = Vec::new();
    whole.try_reserve_exact(len).map_err(|_| too_large())?;
    whole.resize(len, 0);
    input
        .read_full(start, &mut whole)
        .map_err(|e| e.with_location(loc))?;
    let data_start = (t.range.start - start) as usize;
    h.process(ti, &mut whole, data_start)
        .map_err(|e| e.with_location(loc))?;
    Ok((whole, data_start))
}

fn read_full(input: &dyn Backend, offset: u64, out: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    while done < out.len() {
        let at = offset + done as u64;
        let asked = out.len() - done;
        let n = input
            .read_at(at, &mut out[done..])
            .map_err(|e| e.with_range(at..at.saturating_add(asked as u64)))?;
        if n > asked {
            return Err(crate::backend::over_claim(n, asked, at));
        }
        if n == 0 {
            return Err(Error::corrupt(format!(
                "object ended at {} while reading {} bytes at {offset}",
                offset + done as u64,
                out.len()
            )));
        }
        done += n;
    }
    Ok(())
}

/// The metadata of the output: every part's (the shards of a checkpoint each have theirs; the
/// first part's value wins where they differ, with a warning), less what the tensorizer reader
/// synthesizes (`tensorizer.encrypted`), which describes the input, not the tensors.
fn merged_metadata(parts: &[ConvertPart<'_>]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for p in parts {
        for (k, v) in &p.index.metadata {
            if p.index.format == crate::Format::Tensorizer && k == super::tensorizer::META_ENCRYPTED
            {
                continue;
            }
            match out.get(k) {
                None => {
                    out.insert(k.clone(), v.clone());
                }
                Some(first) if first != v => log::warn!(
                    "metadata {k:?} differs between the inputs ({first:?}, then {v:?}): the \
                     output keeps {first:?}"
                ),
                Some(_) => {}
            }
        }
    }
    out
}

fn write_safetensors(
    parts: Vec<ConvertPart<'_>>,
    w: &mut dyn Write,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let entries: Vec<(String, crate::DType, Vec<u64>, u64)> = parts
        .iter()
        .flat_map(|p| p.index.tensors.iter())
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.nbytes()))
        .collect();
    let metadata = merged_metadata(&parts);
    let header = super::safetensors::write_header(&entries, &metadata)?;
    w.write_all(&header)
        .map_err(|e| Error::from_io(e, "writing safetensors header"))?;
    let mut buf = vec![0u8; opts.buffer_size.max(4096)];
    let mut stats = ConvertStats::default();
    for part in parts {
        let ((be, index, hook), loc) = open_part(part)?;
        let mut reads = Reads::new(&be, &index, opts).map_err(|e| e.with_location(&loc))?;
        for ti in 0..index.tensors.len() {
            // Read errors name the part (inside); write errors are the output's.
            stats.bytes += for_each_piece(
                &mut reads,
                &loc,
                &index,
                ti,
                &hook,
                &mut buf,
                opts,
                &mut |p| {
                    w.write_all(p)
                        .map_err(|e| Error::from_io(e, "writing safetensors data"))
                },
            )
            .map_err(|e| be.or_changed(e, &loc))?;
            stats.tensors += 1;
        }
        drop(reads);
        be.check_unchanged(&loc)?;
    }
    Ok(stats)
}

fn write_tensorizer<W: Write + Seek>(
    parts: Vec<ConvertPart<'_>>,
    w: W,
    opts: &ConvertOptions,
) -> Result<(ConvertStats, W)> {
    // (Not `format`: the framework marker every Hugging Face file carries, which has no
    // meaning in a tensorizer file.)
    let mut dropped = merged_metadata(&parts);
    dropped.remove("format");
    if !dropped.is_empty() {
        log::warn!(
            "the tensorizer format has no place for file metadata: {} key(s) not written ({})",
            dropped.len(),
            dropped.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let specs: Vec<TensorSpec> = parts
        .iter()
        .flat_map(|p| p.index.tensors.iter())
        .map(|t| TensorSpec {
            name: t.name.clone(),
            path: t.path.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            meta: t.source == TensorSource::Zeros,
            role: t.role.or(opts.untyped_role),
        })
        .collect();
    let so = SerializerOptions {
        encryption: opts.encrypt.clone(),
        pwhash_limits: opts.pwhash_limits,
        buffer_size: opts.buffer_size,
    };
    let mut ser = Serializer::new(w, &specs, &so)?;
    let mut stats = ConvertStats::default();
    for part in parts {
        let ((be, index, hook), loc) = open_part(part)?;
        let mut reads = Reads::new(&be, &index, opts).map_err(|e| e.with_location(&loc))?;
        for (ti, t) in index.tensors.iter().enumerate() {
            if t.source == TensorSource::Zeros {
                ser.write_tensor(&[])?;
                count(opts, t.nbytes());
            } else {
                // Feed the serializer through a reader that pulls pieces on demand.
                check_cancel(opts)?;
                // Read errors name the part (inside); write errors are the output's.
                PieceReader::new(&mut reads, &loc, &index, ti, &hook, opts)
                    .and_then(|mut pieces| ser.write_tensor_from(&mut pieces))
                    .map_err(|e| be.or_changed(e, &loc))?;
            }
            stats.bytes = stats.bytes.saturating_add(t.nbytes());
            stats.tensors += 1;
        }
        drop(reads);
        be.check_unchanged(&loc)?;
    }
    Ok((stats, ser.finish()?))
}

/// `Read` over one tensor's plaintext: chunks straight from the backend, or the processed whole
/// tensor when a hook must see it first.
struct PieceReader<'a, 'b> {
    input: &'a mut Reads<'b>,
    loc: &'a str,
    opts: &'a ConvertOptions,
    off: u64,
    end: u64,
    whole: Option<(Vec<u8>, usize)>,
}

impl<'a, 'b> PieceReader<'a, 'b> {
    fn new(
        input: &'a mut Reads<'b>,
        loc: &'a str,
        index: &TensorIndex,
        ti: usize,
        hook: &Option<Arc<dyn TensorHook>>,
        opts: &'a ConvertOptions,
    ) -> Result<Self> {
        let t = &index.tensors[ti];
        let whole = match hook {
            Some(h) => Some(checked_whole(&mut *input, loc, t, ti, h)?),
            None => None,
        };
        Ok(PieceReader {
            input,
            loc,
            opts,
            off: t.range.start,
            end: t.range.end,
            whole,
        })
    }
}

impl Read for PieceReader<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        check_cancel(self.opts).map_err(std::io::Error::other)?;
        if let Some((whole, pos)) = &mut self.whole {
            let n = out.len().min(whole.len() - *pos);
            out[..n].copy_from_slice(&whole[*pos..*pos + n]);
            *pos += n;
            count(self.opts, n as u64);
            return Ok(n);
        }
        let n = (out.len() as u64).min(self.end - self.off) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.input
            .read_full(self.off, &mut out[..n])
            .map_err(|e| std::io::Error::other(e.with_location(self.loc)))?;
        self.off += n as u64;
        count(self.opts, n as u64);
        Ok(n)
    }
}

/// `Err(Cancelled)` once the caller set the cancel flag.
fn check_cancel(opts: &ConvertOptions) -> Result<()> {
    if crate::pipeline::is_cancelled(&opts.cancel) {
        return Err(Error::new(
            crate::ErrorKind::Cancelled,
            "conversion cancelled; the temporary output was removed",
        ));
    }
    Ok(())
}

/// Adds `n` converted bytes to the progress counter.
fn count(opts: &ConvertOptions, n: u64) {
    if let Some(p) = &opts.progress {
        p.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CountingBackend, MemoryBackend};
    use crate::dtype::DType;

    /// 20,000 tensors of 16 bytes converted from a backend whose reads are requests: a few
    /// dozen reads, not one per tensor (20,000 before), through `read_at` and through a reader
    /// session, and the bytes come out the same.
    #[test]
    fn small_tensors_of_a_remote_input_are_not_read_one_request_each() {
        let n = 20_000usize;
        let tensors: Vec<_> = (0..n)
            .map(|i| (format!("t{i}"), DType::U8, vec![16u64], 16u64))
            .collect();
        let mut file =
            super::super::safetensors::write_header(&tensors, &Default::default()).unwrap();
        let data_at = file.len();
        file.extend((0..n * 16).map(|i| (i * 7 % 251) as u8));
        let dir = tempfile::tempdir().unwrap();
        for (k, ext) in ["safetensors", "tensors"].iter().enumerate() {
            for shared in [false, true] {
                // A memory backend: no `kernel_reads`, as a remote one.
                let be = Arc::new(CountingBackend::new("mem://m.safetensors", file.clone()));
                let out = dir.path().join(format!("o{k}{shared}.{ext}"));
                let opts = ConvertOptions::default();
                let st = if shared {
                    convert_shared(be.clone(), None, &out, &opts).unwrap()
                } else {
                    convert(be.as_ref(), &out, &opts).unwrap()
                };
                assert_eq!(st.tensors, n);
                let reads = be.read_count();
                assert!(
                    reads < 50,
                    "{ext}, shared {shared}: {reads} reads for {n} tensors"
                );
                // Same bytes: read the output back.
                let back = std::fs::read(&out).unwrap();
                let obe = MemoryBackend::new("out", back.clone());
                let idx = super::super::read_index(&obe, &obe.stat().unwrap()).unwrap();
                for t in idx.tensors.iter().step_by(997) {
                    let i: usize = t.name[1..].parse().unwrap();
                    let want = &file[data_at + i * 16..data_at + i * 16 + 16];
                    assert_eq!(&back[t.range.start as usize..t.range.end as usize], want);
                }
            }
        }
    }

    /// A file that takes the output's name while the conversion runs (here: when the input is
    /// opened, after every check made up front) is kept, byte for byte, unless the options say
    /// to replace it; no temporary file is left either way. A path that names a directory
    /// (`x.safetensors/`, `x.safetensors/.`) is refused before anything is read or written.
    #[test]
    fn an_output_that_appears_during_a_conversion_is_replaced_only_if_asked() {
        let tensors = vec![("a".to_string(), DType::U8, vec![4u64], 4u64)];
        let mut file =
            super::super::safetensors::write_header(&tensors, &Default::default()).unwrap();
        file.extend([1u8, 2, 3, 4]);
        let be = MemoryBackend::new("mem://m.safetensors", file);
        let meta = be.stat().unwrap();
        let index = super::super::read_index(&be, &meta).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        let part = |appears: bool| {
            let (be, out, idx, meta) = (&be, out.clone(), index.clone(), meta.clone());
            ConvertPart {
                location: "mem://m.safetensors".into(),
                index: index.clone(),
                open: Box::new(move || {
                    if appears {
                        std::fs::write(&out, b"theirs").unwrap();
                    }
                    Ok((PartBackend::Borrowed(be, meta), idx, None))
                }),
            }
        };
        for replace in [false, true] {
            let _ = std::fs::remove_file(&out);
            let opts = ConvertOptions {
                replace,
                ..Default::default()
            };
            let r = convert_parts(vec![part(true)], &out, &opts);
            let now = std::fs::read(&out).unwrap();
            if replace {
                assert_eq!(r.unwrap().tensors, 1);
                assert!(now.ends_with(&[1, 2, 3, 4]), "{now:?}");
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{e}");
                assert!(
                    e.to_string().contains("appeared while the conversion ran"),
                    "{e}"
                );
                // A library caller is told of the library's switch, not of the CLI's flag.
                assert!(
                    e.to_string().contains("Loader::replace_output(true)")
                        && !e.to_string().contains("--force"),
                    "{e}"
                );
                let what = output_taken(&e).expect("not told apart as an output taken");
                assert!(
                    what.contains("appeared while") && !what.contains("Loader::"),
                    "{what}"
                );
                assert_eq!(now, b"theirs", "the file that appeared was replaced");
            }
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["o.safetensors"], "replace {replace}");
        }
        // A file replaced keeps its permission bits; a new one gets 0666 less the umask.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).unwrap();
            convert_parts(vec![part(false)], &out, &Default::default()).unwrap();
            assert_eq!(mode(&out), 0o600);
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
            convert_parts(vec![part(false)], &out, &Default::default()).unwrap();
            assert_eq!(mode(&out), 0o640);
            let fresh = dir.path().join("fresh.safetensors");
            convert_parts(vec![part(false)], &fresh, &Default::default()).unwrap();
            // (What File::create gives: 0666 less the umask.)
            let probe = dir.path().join("probe");
            std::fs::File::create(&probe).unwrap();
            assert_eq!(mode(&fresh), mode(&probe));
            std::fs::remove_file(&fresh).unwrap();
            std::fs::remove_file(&probe).unwrap();
        }
        // With nothing in the way, `replace: false` writes the output as usual.
        std::fs::remove_file(&out).unwrap();
        let opts = ConvertOptions {
            replace: false,
            ..Default::default()
        };
        convert_parts(vec![part(false)], &out, &opts).unwrap();
        assert!(std::fs::read(&out).unwrap().ends_with(&[1, 2, 3, 4]));

        for bad in ["x.safetensors/", "x.safetensors/."] {
            let p = dir.path().join(bad);
            let e = convert_parts(vec![part(false)], &p, &Default::default()).unwrap_err();
            assert!(e.to_string().contains("names a directory"), "{bad}: {e}");
        }
        assert!(!dir.path().join("x.safetensors").exists());
    }

    /// The fallback where the file system has no no-replace rename (nor hard links): a free
    /// name gets the file; a taken one (file, or dangling link) is kept and the file dropped.
    #[test]
    fn without_a_no_replace_rename_a_taken_name_is_still_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = |bytes: &[u8]| {
            let mut t = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
            std::io::Write::write_all(&mut t, bytes).unwrap();
            t
        };
        let out = dir.path().join("o.tensors");
        move_if_free(tmp(b"ours"), &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"ours");
        let e = move_if_free(tmp(b"second"), &out).unwrap_err();
        assert!(e.to_string().contains("appeared while"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"ours");
        let link = dir.path().join("l.tensors");
        std::os::unix::fs::symlink("nowhere", &link).unwrap();
        assert!(move_if_free(tmp(b"third"), &link).is_err());
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("nowhere"));
        // Only the two names: the refused temporary files are gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// A one-tensor safetensors part whose `open` sets `opened` (the conversion's work starts).
    fn counted_part<'a>(
        be: &'a MemoryBackend,
        opened: &'a std::sync::atomic::AtomicBool,
    ) -> ConvertPart<'a> {
        let meta = be.stat().unwrap();
        let index = super::super::read_index(be, &meta).unwrap();
        let idx = index.clone();
        ConvertPart {
            location: "mem://m.safetensors".into(),
            index,
            open: Box::new(move || {
                opened.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok((PartBackend::Borrowed(be, meta), idx, None))
            }),
        }
    }

    fn one_tensor_file() -> MemoryBackend {
        let tensors = vec![("a".to_string(), DType::U8, vec![4u64], 4u64)];
        let mut file =
            super::super::safetensors::write_header(&tensors, &Default::default()).unwrap();
        file.extend([1u8, 2, 3, 4]);
        MemoryBackend::new("mem://m.safetensors", file)
    }

    /// With `replace: false`, an output that is there before the conversion starts (a file, or
    /// a dangling link) is refused up front, before any input is opened, as existing: not after
    /// the whole conversion as one that "appeared while the conversion ran".
    #[test]
    fn without_replace_an_existing_output_is_refused_before_converting() {
        let be = one_tensor_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        std::fs::write(&out, b"theirs").unwrap();
        let link = dir.path().join("l.safetensors");
        std::os::unix::fs::symlink("nowhere", &link).unwrap();
        let opts = ConvertOptions {
            replace: false,
            ..Default::default()
        };
        for p in [&out, &link] {
            let opened = std::sync::atomic::AtomicBool::new(false);
            let e = convert_parts(vec![counted_part(&be, &opened)], p, &opts).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{e}");
            assert!(
                e.to_string().contains("exists") && !e.to_string().contains("appeared"),
                "{e}"
            );
            assert!(
                e.to_string().contains("ConvertOptions::replace")
                    && !e.to_string().contains("--force"),
                "{e}"
            );
            let what = output_taken(&e).expect("not told apart as an output taken");
            assert!(what.ends_with("exists: it is not replaced"), "{what}");
            assert!(
                !opened.load(std::sync::atomic::Ordering::SeqCst),
                "{}: converted before refusing",
                p.display()
            );
        }
        assert_eq!(std::fs::read(&out).unwrap(), b"theirs");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("nowhere"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// A replaced file keeps its owner and group along with its permission bits, where the
    /// process may give them (as root): a 0600 file of another user that became root's would
    /// lock its owner out (it was readable by all, 0644, before the bits were kept). Checked
    /// only where this process can chown (root).
    #[test]
    fn a_replaced_output_keeps_its_owner_and_group() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let be = one_tensor_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        std::fs::write(&out, b"old").unwrap();
        if std::os::unix::fs::chown(&out, Some(65534), Some(65534)).is_err() {
            eprintln!("skipped: this process cannot chown (not root)");
            return;
        }
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
        let opened = std::sync::atomic::AtomicBool::new(false);
        convert_parts(vec![counted_part(&be, &opened)], &out, &Default::default()).unwrap();
        let m = std::fs::metadata(&out).unwrap();
        assert!(std::fs::read(&out).unwrap().ends_with(&[1, 2, 3, 4]));
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
    }
}
