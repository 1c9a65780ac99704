//! The one public error type of tensorstream.
//!
//! An [`Error`] carries a [`ErrorKind`], a retryable flag and context (backend, location, byte range).
//! Crates convert their private, precise error enums into it once, at their boundary.

use std::fmt;
use std::ops::Range;

/// What went wrong, coarse enough to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// The caller may not read the object.
    PermissionDenied,
    /// The bytes are not a valid file of the expected format (bad header, offsets past EOF, …).
    Corrupt,
    /// The input is valid but asks for something this build does not support.
    Unsupported,
    /// A byte range lies outside the object.
    RangeNotSatisfiable,
    /// The object changed (size, ETag, mtime) while it was being read.
    ObjectChanged,
    /// An operation took longer than its deadline.
    Timeout,
    /// A GPU / driver error.
    Device,
    /// A checksum or MAC did not match.
    IntegrityMismatch,
    /// Bad arguments from the caller (empty filter result, bad URI, …).
    InvalidInput,
    /// Any other I/O failure.
    Io,
    /// The caller asked the operation to stop (a cancel flag was set).
    Cancelled,
}

impl ErrorKind {
    /// Short lower-case name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::RangeNotSatisfiable => "range not satisfiable",
            ErrorKind::ObjectChanged => "object changed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Device => "device error",
            ErrorKind::IntegrityMismatch => "integrity mismatch",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Io => "i/o error",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

/// The public error type: kind + retryable flag + context + message + optional source.
pub struct Error {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    backend: Option<String>,
    location: Option<String>,
    range: Option<Range<u64>>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new, permanent error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            retryable: false,
            message: message.into(),
            backend: None,
            location: None,
            range: None,
            source: None,
        }
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for a [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for a [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Builds an error from an OS I/O error, mapping its kind.
    pub fn from_io(err: std::io::Error, what: impl Into<String>) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::TimedOut => ErrorKind::Timeout,
            K::UnexpectedEof => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        let retryable = matches!(
            err.kind(),
            K::Interrupted
                | K::WouldBlock
                | K::TimedOut
                | K::ConnectionReset
                | K::ConnectionAborted
        );
        let mut e = Error::new(kind, format!("{}: {}", what.into(), err));
        e.retryable = retryable;
        e.source = Some(Box::new(err));
        e
    }

    /// Marks the error retryable (a later attempt may succeed) or permanent.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }
    /// Names the backend (`local`, `http`, `s3`, …).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = Some(backend.into());
        self
    }
    /// Names the object (path or URI) unless a location is already set. A URI's user
    /// information and query (credentials, signatures) are left out
    /// ([`crate::uri::redact_uri`]): a message may be logged anywhere.
    pub fn with_location(mut self, location: impl Into<String>) -> Self {
        if self.location.is_none() {
            self.location = Some(crate::uri::redact_uri(&location.into()));
        }
        self
    }
    /// Names the byte range concerned unless one is already set.
    pub fn with_range(mut self, range: Range<u64>) -> Self {
        if self.range.is_none() {
            self.range = Some(range);
        }
        self
    }
    /// Attaches an underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
    /// Prefixes the message with more context (`"{context}: {message}"`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
    /// The message, with any [`Error::context`] prefixes but without the location and range that
    /// `Display` adds.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The backend, if known.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }
    /// The object, if known.
    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }
    /// The byte range, if known.
    pub fn range(&self) -> Option<Range<u64>> {
        self.range.clone()
    }
    /// The underlying error attached with [`Error::with_source`] or [`Error::from_io`], even
    /// when the message already quotes it (then [`std::error::Error::source`] leaves it out, so
    /// that printing the error with its causes does not show its text twice).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
    /// The OS error behind the failure, if it came from one ([`Error::from_io`]): for
    /// `raw_os_error()` and the exact [`std::io::ErrorKind`].
    pub fn io_error(&self) -> Option<&std::io::Error> {
        self.cause()?.downcast_ref::<std::io::Error>()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(r) = &self.range {
            write!(f, " (bytes {}..{})", r.start, r.end)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("retryable", &self.retryable)
            .field("message", &self.message)
            .field("backend", &self.backend)
            .field("location", &self.location)
            .field("range", &self.range)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    /// The underlying error, unless the message already quotes it (as [`Error::from_io`]'s
    /// does): a chain printer (`anyhow`'s `{:#}`, `tracing`) would show it twice. See
    /// [`Error::cause`] for it either way.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let src = self.source.as_deref()?;
        let text = src.to_string();
        if !text.is_empty() && self.message.contains(&text) {
            return None;
        }
        Some(src as &(dyn std::error::Error + 'static))
    }
}

/// True for characters that change how the text around them is shown without being seen
/// themselves: bidirectional embeddings, overrides and isolates (a tensor name could read
/// backwards, as in "Trojan Source"), and zero-width characters and marks (two different names
/// could look alike). [`terminal_safe`] escapes them.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// `s` safe to print on a terminal: control characters other than newline and tab (escape
/// sequences in a server's error text, say) and invisible format characters
/// ([`is_invisible_format`]) are shown escaped (`\u{1b}`, `\u{202e}`), not sent raw.
pub fn terminal_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let raw = |c: char| (c.is_control() && c != '\n' && c != '\t') || is_invisible_format(c);
    if !s.chars().any(raw) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if raw(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_cause_is_not_repeated_by_source() {
        use std::error::Error as _;
        let io = std::io::Error::from_raw_os_error(2);
        let e = Error::from_io(io, "cannot open");
        assert!(e.to_string().contains("No such file or directory"), "{e}");
        // The message quotes it: `source` leaves it out, `cause` / `io_error` still give it.
        assert!(e.source().is_none(), "{e:?}");
        assert_eq!(e.io_error().and_then(|i| i.raw_os_error()), Some(2));
        assert!(e.cause().is_some());
        // A cause the message does not quote is the source.
        let e = Error::new(ErrorKind::Io, "read failed")
            .with_source(std::io::Error::other("disk on fire"));
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("disk on fire")
        );
        assert_eq!(
            e.io_error().map(|i| i.kind()),
            Some(std::io::ErrorKind::Other)
        );
    }

    #[test]
    fn terminal_safe_escapes_control_characters_only() {
        assert!(matches!(
            terminal_safe("plain\ttext\nünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            terminal_safe("a\x1b[2Jb\rc\x07"),
            "a\\u{1b}[2Jb\\u{d}c\\u{7}"
        );
        assert_eq!(
            terminal_safe("w\u{202e}thgiew\u{200b}.x"),
            "w\\u{202e}thgiew\\u{200b}.x"
        );
        assert!(matches!(
            terminal_safe("ünïcode → ok"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn display_includes_location_and_range() {
        let e = Error::corrupt("tensor offsets past end of file")
            .with_location("/m/x.safetensors")
            .with_range(10..20);
        assert_eq!(
            e.to_string(),
            "/m/x.safetensors: tensor offsets past end of file (bytes 10..20)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(!e.is_retryable());
    }

    #[test]
    fn io_error_kinds_map() {
        let e = Error::from_io(std::io::Error::from(std::io::ErrorKind::NotFound), "open");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = Error::from_io(std::io::Error::from(std::io::ErrorKind::TimedOut), "read");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
    }

    #[test]
    fn first_location_wins() {
        let e = Error::corrupt("x").with_location("a").with_location("b");
        assert_eq!(e.location(), Some("a"));
    }
}
