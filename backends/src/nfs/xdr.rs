//! XDR (RFC 4506) encoding and bounded decoding.
//!
//! Decoding goes through [`Source`], implemented for byte slices ([`SliceSource`]) and for the
//! record-marked TCP stream of a connection (`conn::Wire`), so a READ reply's data can be read
//! from the socket straight into the caller's buffer. Every variable-length item is read with an
//! explicit upper bound: a hostile length is an error before anything is allocated.

use std::fmt;

/// A decoding failure. Private to the backend; turned into an [`crate::nfs::Failure`] at the
/// connection boundary.
#[derive(Debug)]
pub(crate) enum XdrError {
    /// The data (or the RPC record) ended before the item.
    Truncated(&'static str),
    /// A length field exceeds what this client accepts for that item.
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// A value that the protocol does not allow here.
    Bad(String),
    /// The transport failed.
    Io(std::io::Error),
}

impl fmt::Display for XdrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XdrError::Truncated(what) => write!(f, "reply truncated while reading {what}"),
            XdrError::TooLong { what, len, max } => {
                write!(f, "{what}: length {len} exceeds the limit of {max}")
            }
            XdrError::Bad(m) => write!(f, "{m}"),
            XdrError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for XdrError {
    fn from(e: std::io::Error) -> Self {
        XdrError::Io(e)
    }
}

/// Padding after an opaque of `len` bytes (XDR aligns to 4).
pub(crate) fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Where decoded bytes come from.
pub(crate) trait Source {
    /// Fills `dst` completely or fails.
    fn take(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), XdrError>;
    /// Discards `n` bytes.
    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), XdrError>;

    /// An unsigned 32-bit integer.
    fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        let mut b = [0u8; 4];
        self.take(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }
    /// An unsigned 64-bit integer (hyper).
    fn u64(&mut self, what: &'static str) -> Result<u64, XdrError> {
        let mut b = [0u8; 8];
        self.take(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }
    /// A boolean (0 or 1; anything else is an error).
    fn bool(&mut self, what: &'static str) -> Result<bool, XdrError> {
        match self.u32(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError::Bad(format!("{what}: {v} is not a boolean"))),
        }
    }
    /// A length prefix, checked against `max` before anything else happens.
    fn len(&mut self, what: &'static str, max: usize) -> Result<usize, XdrError> {
        let len = self.u32(what)?;
        if len as u64 > max as u64 {
            return Err(XdrError::TooLong {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        Ok(len as usize)
    }
    /// A variable-length opaque of at most `max` bytes.
    fn opaque(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, XdrError> {
        let len = self.len(what, max)?;
        let mut v = vec![0u8; len];
        self.take(&mut v, what)?;
        self.skip(pad(len) as u64, what)?;
        Ok(v)
    }
    /// Skips a variable-length opaque of at most `max` bytes.
    fn skip_opaque(&mut self, what: &'static str, max: usize) -> Result<(), XdrError> {
        let len = self.len(what, max)?;
        self.skip((len + pad(len)) as u64, what)
    }
}

/// Decodes from a byte slice.
pub(crate) struct SliceSource<'a> {
    data: &'a [u8],
}

impl<'a> SliceSource<'a> {
    /// Decodes `data`.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        SliceSource { data }
    }
    /// Bytes not decoded yet.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len()
    }
}

impl Source for SliceSource<'_> {
    fn take(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), XdrError> {
        if dst.len() > self.data.len() {
            return Err(XdrError::Truncated(what));
        }
        let (head, rest) = self.data.split_at(dst.len());
        dst.copy_from_slice(head);
        self.data = rest;
        Ok(())
    }
    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), XdrError> {
        if n > self.data.len() as u64 {
            return Err(XdrError::Truncated(what));
        }
        self.data = &self.data[n as usize..];
        Ok(())
    }
}

/// Appends XDR items to a byte vector.
#[derive(Debug, Default)]
pub(crate) struct Enc {
    /// The encoded bytes.
    pub(crate) buf: Vec<u8>,
}

impl Enc {
    /// An empty encoder.
    pub(crate) fn new() -> Self {
        Enc {
            buf: Vec::with_capacity(256),
        }
    }
    /// Appends an unsigned 32-bit integer.
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends an unsigned 64-bit integer.
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends fixed-length bytes (padded).
    pub(crate) fn fixed(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self.buf.extend_from_slice(&[0u8; 3][..pad(b.len())]);
        self
    }
    /// Appends a variable-length opaque (length + bytes + padding). Callers keep lengths small
    /// (names, handles); a length above `u32::MAX` cannot occur for them.
    pub(crate) fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.fixed(b)
    }
}
