//! The NFSv4.0 (RFC 7530) subset this client speaks: COMPOUND with PUTROOTFH, LOOKUP, GETFH,
//! PUTFH, GETATTR and READ (anonymous stateid), and the attributes type, change, size, maxread
//! and time_modify.

use tensorstream_engine::ErrorKind;

use super::xdr::{Enc, SliceSource, Source, XdrError};
use super::Failure;

pub(crate) const OP_GETATTR: u32 = 9;
pub(crate) const OP_GETFH: u32 = 10;
pub(crate) const OP_LOOKUP: u32 = 15;
pub(crate) const OP_PUTFH: u32 = 22;
pub(crate) const OP_PUTROOTFH: u32 = 24;
pub(crate) const OP_READ: u32 = 25;

/// Largest file handle (NFS4_FHSIZE).
pub(crate) const MAX_FH: usize = 128;
/// Largest COMPOUND tag we accept back (we send an empty one).
pub(crate) const MAX_TAG: usize = 1024;
/// Largest GETATTR value block we accept (we ask for five small attributes).
pub(crate) const MAX_ATTRS: usize = 4096;
/// Largest path component (NFS servers allow 255).
pub(crate) const MAX_NAME: usize = 255;
/// Most bitmap words we accept in a reply.
const MAX_BITMAP_WORDS: usize = 8;

const ATTR_TYPE: u32 = 1;
const ATTR_CHANGE: u32 = 3;
const ATTR_SIZE: u32 = 4;
const ATTR_MAXREAD: u32 = 30;
const ATTR_TIME_MODIFY: u32 = 53;

/// File types (nfs_ftype4) we name in messages.
pub(crate) const NF4REG: u32 = 1;
pub(crate) const NF4DIR: u32 = 2;
pub(crate) const NF4LNK: u32 = 5;

/// The attributes asked for when resolving and stat-ing: type, change, size, maxread, mtime.
pub(crate) fn stat_bitmap() -> [u32; 2] {
    bitmap(&[
        ATTR_TYPE,
        ATTR_CHANGE,
        ATTR_SIZE,
        ATTR_MAXREAD,
        ATTR_TIME_MODIFY,
    ])
}

/// The attributes checked after every READ: change and size.
pub(crate) fn pin_bitmap() -> [u32; 2] {
    bitmap(&[ATTR_CHANGE, ATTR_SIZE])
}

fn bitmap(attrs: &[u32]) -> [u32; 2] {
    let mut w = [0u32; 2];
    for &a in attrs {
        w[(a / 32) as usize] |= 1 << (a % 32);
    }
    w
}

/// Attributes decoded from a fattr4.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub ftype: Option<u32>,
    pub change: Option<u64>,
    pub size: Option<u64>,
    pub maxread: Option<u64>,
    pub mtime: Option<(i64, u32)>,
}

/// Which version of the object a load reads: every READ checks that change and size still match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub change: u64,
    pub size: u64,
}

impl Version {
    /// The string reported as [`tensorstream_engine::ObjectMeta::version`] for this version of
    /// the file whose handle is `fh`: the change attribute and the file handle (in hex), as a
    /// local file's tag holds its inode. A file put in place of another under the same name
    /// has another handle, so its tag differs even where its change attribute happens not to;
    /// and a backend opened pinned to a tag ([`parse_tag`]) reads by that handle, without
    /// walking the path again.
    pub(crate) fn tag(&self, fh: &[u8]) -> String {
        let mut s = format!("nfs4-change:{:x};fh=", self.change);
        for b in fh {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The change attribute and the file handle of a tag [`Version::tag`] made; `None` for any
/// other string (a tag of another backend, or of an older version of this one).
pub(crate) fn parse_tag(tag: &str) -> Option<(u64, Vec<u8>)> {
    let (change, fh) = tag.strip_prefix("nfs4-change:")?.split_once(";fh=")?;
    let change = u64::from_str_radix(change, 16).ok()?;
    if fh.is_empty() || fh.len() % 2 != 0 || fh.len() / 2 > MAX_FH || !fh.is_ascii() {
        return None;
    }
    let fh = (0..fh.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&fh[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    // (Only the tag this function's twin writes: lowercase, no sign, no leading zeros.)
    (Version { change, size: 0 }.tag(&fh) == tag).then_some((change, fh))
}

/// Writes COMPOUND4args' header (empty tag, minor version 0) for `nops` operations.
pub(crate) fn compound(e: &mut Enc, nops: u32) {
    e.opaque(b"").u32(0).u32(nops);
}

/// Appends a GETATTR of `bits`.
pub(crate) fn op_getattr(e: &mut Enc, bits: [u32; 2]) {
    e.u32(OP_GETATTR).u32(2).u32(bits[0]).u32(bits[1]);
}

/// Appends READ with the anonymous stateid.
pub(crate) fn op_read(e: &mut Enc, offset: u64, count: u32) {
    e.u32(OP_READ)
        .u32(0)
        .fixed(&[0u8; 12])
        .u64(offset)
        .u32(count);
}

/// Encodes the resolve compound: PUTROOTFH, LOOKUP per component, GETFH, GETATTR(stat).
pub(crate) fn encode_resolve(e: &mut Enc, components: &[String]) {
    compound(e, components.len() as u32 + 3);
    e.u32(OP_PUTROOTFH);
    for c in components {
        e.u32(OP_LOOKUP).opaque(c.as_bytes());
    }
    e.u32(OP_GETFH);
    op_getattr(e, stat_bitmap());
}

/// Encodes PUTFH + READ + GETATTR(change, size): the data and the version it came from.
pub(crate) fn encode_read(e: &mut Enc, fh: &[u8], offset: u64, count: u32) {
    compound(e, 3);
    e.u32(OP_PUTFH).opaque(fh);
    op_read(e, offset, count);
    op_getattr(e, pin_bitmap());
}

/// Reads COMPOUND4res' header; returns the overall status and the number of results (bounded by
/// `nops`, the number of operations sent).
pub(crate) fn decode_compound_header(
    src: &mut impl Source,
    nops: usize,
) -> Result<(u32, usize), XdrError> {
    let status = src.u32("COMPOUND status")?;
    src.skip_opaque("COMPOUND tag", MAX_TAG)?;
    let n = src.len("COMPOUND result count", nops)?;
    Ok((status, n))
}

/// Reads one result's opcode (checked against `expect`) and status.
pub(crate) fn decode_op_header(src: &mut impl Source, expect: u32) -> Result<u32, XdrError> {
    let op = src.u32("operation code")?;
    if op != expect {
        return Err(XdrError::Bad(format!(
            "result for operation {op} where {expect} was expected"
        )));
    }
    src.u32("operation status")
}

/// Reads a fattr4 (bitmap + values) holding only attributes this client knows.
pub(crate) fn decode_fattr(src: &mut impl Source) -> Result<Attrs, XdrError> {
    let words = src.len("attribute bitmap", MAX_BITMAP_WORDS)?;
    let mut bits = [0u32; MAX_BITMAP_WORDS];
    for w in bits.iter_mut().take(words) {
        *w = src.u32("attribute bitmap")?;
    }
    let vals = src.opaque("attribute values", MAX_ATTRS)?;
    let mut v = SliceSource::new(&vals);
    let mut a = Attrs::default();
    for (wi, &w) in bits.iter().enumerate().take(words) {
        for b in 0..32u32 {
            if w & (1 << b) == 0 {
                continue;
            }
            let attr = wi as u32 * 32 + b;
            match attr {
                ATTR_TYPE => a.ftype = Some(v.u32("type")?),
                ATTR_CHANGE => a.change = Some(v.u64("change")?),
                ATTR_SIZE => a.size = Some(v.u64("size")?),
                ATTR_MAXREAD => a.maxread = Some(v.u64("maxread")?),
                ATTR_TIME_MODIFY => {
                    let s = v.u64("time_modify")? as i64;
                    let ns = v.u32("time_modify")?;
                    a.mtime = Some((s, ns));
                }
                other => {
                    return Err(XdrError::Bad(format!(
                        "server returned attribute {other}, which was not asked for"
                    )))
                }
            }
        }
    }
    if v.remaining() != 0 {
        return Err(XdrError::Bad(format!(
            "{} unexpected bytes after the attribute values",
            v.remaining()
        )));
    }
    Ok(a)
}

/// Result of the resolve compound.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub fh: Vec<u8>,
    pub attrs: Attrs,
}

/// Checks the result of operation number `i` (0-based) of a COMPOUND reply that holds `n`
/// results with overall `status`: the server stopped before it (its failure is the overall
/// status) or it failed (its own status) → the failure, named `name`.
fn op_result(
    src: &mut impl Source,
    status: u32,
    n: usize,
    i: usize,
    op: u32,
    name: &str,
) -> Result<Result<(), Failure>, XdrError> {
    if n <= i {
        return Ok(Err(nfs_failure(status, name)));
    }
    let st = decode_op_header(src, op)?;
    if st != 0 {
        return Ok(Err(nfs_failure(st, name)));
    }
    Ok(Ok(()))
}

/// After the last result: the overall status must agree (RFC 7530 §16.2.3: it is the status of
/// the last operation run, so with every result OK it is OK). A reply that says otherwise is not
/// taken at its word either way: it fails with that status.
fn compound_ok(status: u32) -> Result<(), Failure> {
    match status {
        0 => Ok(()),
        st => Err(nfs_failure(
            st,
            "COMPOUND (every operation reported success)",
        )),
    }
}

/// `op_result`, returning the failure from the enclosing decoder.
macro_rules! op {
    ($src:expr, $status:expr, $n:expr, $i:expr, $op:expr, $name:expr) => {
        if let Err(f) = op_result($src, $status, $n, $i, $op, $name)? {
            return Ok(Err(f));
        }
    };
}

/// Decodes the resolve compound's results (after the RPC header). An NFS error names the
/// operation (and for LOOKUP the path up to the failing component).
pub(crate) fn decode_resolve(
    src: &mut impl Source,
    components: &[String],
) -> Result<Result<Resolved, Failure>, XdrError> {
    let nops = components.len() + 3;
    let (status, n) = decode_compound_header(src, nops)?;
    op!(src, status, n, 0, OP_PUTROOTFH, "PUTROOTFH");
    for i in 0..components.len() {
        if n < i + 2 {
            return Ok(Err(nfs_failure(status, "LOOKUP")));
        }
        let st = decode_op_header(src, OP_LOOKUP)?;
        if st != 0 {
            let path = components[..=i].join("/");
            return Ok(Err(nfs_failure(st, &format!("LOOKUP /{path}"))));
        }
    }
    op!(src, status, n, nops - 2, OP_GETFH, "GETFH");
    let fh = src.opaque("file handle", MAX_FH)?;
    if fh.is_empty() {
        // (Every READ with it would fail as NFS4ERR_BADHANDLE, which reads as a replaced file.)
        return Err(XdrError::Bad("GETFH returned an empty file handle".into()));
    }
    op!(src, status, n, nops - 1, OP_GETATTR, "GETATTR");
    let attrs = decode_fattr(src)?;
    if let Err(f) = compound_ok(status) {
        return Ok(Err(f));
    }
    Ok(Ok(Resolved { fh, attrs }))
}

/// Outcome of a READ compound whose data went into the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReadOutcome {
    /// Bytes written to the destination.
    pub count: usize,
    /// The server says the file ends with these bytes.
    pub eof: bool,
    /// Change and size after the READ (None if the server left them out).
    pub after: Attrs,
}

/// Decodes PUTFH + READ + GETATTR results, reading the data straight into `dst` (at most
/// `dst.len()` bytes: more is a protocol error, detected before any byte is copied).
pub(crate) fn decode_read(
    src: &mut impl Source,
    dst: &mut [u8],
) -> Result<Result<ReadOutcome, Failure>, XdrError> {
    let (status, n) = decode_compound_header(src, 3)?;
    op!(src, status, n, 0, OP_PUTFH, "PUTFH");
    op!(src, status, n, 1, OP_READ, "READ");
    let eof = src.bool("READ eof")?;
    let count = src.len("READ data", dst.len())?;
    src.take(&mut dst[..count], "READ data")?;
    src.skip(super::xdr::pad(count) as u64, "READ data padding")?;
    op!(src, status, n, 2, OP_GETATTR, "GETATTR");
    let after = decode_fattr(src)?;
    if let Err(f) = compound_ok(status) {
        return Ok(Err(f));
    }
    Ok(Ok(ReadOutcome { count, eof, after }))
}

/// Name of an nfsstat4 value.
pub(crate) fn status_name(st: u32) -> &'static str {
    match st {
        0 => "NFS4_OK",
        1 => "NFS4ERR_PERM",
        2 => "NFS4ERR_NOENT",
        5 => "NFS4ERR_IO",
        6 => "NFS4ERR_NXIO",
        13 => "NFS4ERR_ACCESS",
        17 => "NFS4ERR_EXIST",
        18 => "NFS4ERR_XDEV",
        20 => "NFS4ERR_NOTDIR",
        21 => "NFS4ERR_ISDIR",
        22 => "NFS4ERR_INVAL",
        27 => "NFS4ERR_FBIG",
        63 => "NFS4ERR_NAMETOOLONG",
        70 => "NFS4ERR_STALE",
        10001 => "NFS4ERR_BADHANDLE",
        10004 => "NFS4ERR_NOTSUPP",
        10006 => "NFS4ERR_SERVERFAULT",
        10007 => "NFS4ERR_BADTYPE",
        10008 => "NFS4ERR_DELAY",
        10011 => "NFS4ERR_EXPIRED",
        10013 => "NFS4ERR_GRACE",
        10014 => "NFS4ERR_FHEXPIRED",
        10016 => "NFS4ERR_WRONGSEC",
        10018 => "NFS4ERR_RESOURCE",
        10019 => "NFS4ERR_MOVED",
        10020 => "NFS4ERR_NOFILEHANDLE",
        10021 => "NFS4ERR_MINOR_VERS_MISMATCH",
        10025 => "NFS4ERR_BAD_STATEID",
        10029 => "NFS4ERR_SYMLINK",
        10032 => "NFS4ERR_ATTRNOTSUPP",
        10036 => "NFS4ERR_BADXDR",
        10038 => "NFS4ERR_OPENMODE",
        10040 => "NFS4ERR_BADCHAR",
        10041 => "NFS4ERR_BADNAME",
        10044 => "NFS4ERR_OP_ILLEGAL",
        _ => "NFS4ERR_(unknown)",
    }
}

/// Maps an nfsstat4 from operation `op` to a failure with the right kind and retry flag.
pub(crate) fn nfs_failure(st: u32, op: &str) -> Failure {
    let (kind, retryable, hint) = match st {
        2 => (ErrorKind::NotFound, false, "no such file or directory"),
        1 | 13 => (ErrorKind::PermissionDenied, false, "permission denied"),
        10016 => (
            ErrorKind::PermissionDenied,
            false,
            "the export requires another security flavor (only AUTH_SYS is supported)",
        ),
        70 | 10001 | 10014 => (
            ErrorKind::ObjectChanged,
            false,
            "the file was removed or replaced on the server",
        ),
        10008 | 10013 | 10018 => (ErrorKind::Io, true, "server busy, try again"),
        10006 => (ErrorKind::Io, true, "server fault"),
        20 | 21 | 22 | 63 | 10007 | 10029 | 10040 | 10041 => (
            ErrorKind::InvalidInput,
            false,
            "bad path or not a regular file",
        ),
        10019 => (
            ErrorKind::Unsupported,
            false,
            "the export moved (NFSv4 referrals are not supported)",
        ),
        10021 => (
            ErrorKind::Unsupported,
            false,
            "the server does not support NFSv4.0",
        ),
        0 => (
            ErrorKind::Io,
            false,
            "server returned fewer results than operations",
        ),
        _ => (ErrorKind::Io, false, "server error"),
    };
    Failure::new(
        kind,
        format!("{op} failed: {} ({st}): {hint}", status_name(st)),
        retryable,
    )
}
