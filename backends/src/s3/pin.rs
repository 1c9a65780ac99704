//! Version pinning enforced on the client: an OpenDAL layer that checks the ETag of every GET
//! response against the `If-Match` ETag the read asked for (or, for an object served without
//! an ETag, its Last-Modified date against the `If-Unmodified-Since` date).
//!
//! Every ranged read carries `If-Match: <ETag from stat>`. AWS S3 answers 412 when the object was
//! replaced, but several S3-compatible servers (s3s-fs among them) ignore the header on GET and
//! serve the new object. This layer sits *below* the retry layer, so it also sees the requests the
//! retry layer makes to resume a broken body: any response whose ETag differs from the pinned one
//! fails with [`opendal::ErrorKind::ConditionNotMatch`] (permanent, never retried), which the
//! backend reports as [`tensorstream_engine::ErrorKind::ObjectChanged`]. Bytes of two versions
//! are never mixed.
//!
//! A read also runs in a [`scoped`] task-local holding what `stat` pinned (version and size):
//! the layer falls back on it where the request carries no condition (a weak ETag, which
//! `If-Match`'s strong comparison could never match, is still compared here), and the
//! transport compares each answer's object size with it (the only check left for an object
//! with neither ETag nor Last-Modified).

use opendal::raw::oio;
use opendal::raw::Timestamp;
use opendal::raw::{
    Layer, OpCompose, OpCopy, OpCreateDir, OpList, OpPresign, OpRead, OpRename, OpRestore, OpStat,
    OpWrite, RpCreateDir, RpPresign, RpRead, RpRename, RpRestore, RpStat, Service, ServiceInfo,
    Servicer,
};
use opendal::{Buffer, BytesRange, Capability, Error, ErrorKind, OperationContext, Result};
use std::future::Future;
use std::sync::Arc;

use tensorstream_engine::ObjectMeta;

tokio::task_local! {
    /// What `stat` pinned, for the GET running in this scope (see [`scoped`]).
    static READ_PIN: ObjectMeta;
}

/// Runs a read (its GETs, the retry layer's included) with `pin` as what its answers must
/// match: the version the layer checks where the request carries no condition, and the size
/// the transport checks.
pub(crate) fn scoped<F: Future>(pin: ObjectMeta, fut: F) -> impl Future<Output = F::Output> {
    READ_PIN.scope(pin, fut)
}

/// The size of the object as pinned for the read in scope, if any.
pub(crate) fn pinned_size() -> Option<u64> {
    READ_PIN.try_with(|p| p.size).ok()
}

/// The version pinned for the read in scope, if any.
fn pinned_version() -> Option<Expected> {
    READ_PIN
        .try_with(|p| {
            p.version.as_deref().map(|v| match parse_version(v) {
                Pinned::Etag(e) => Expected::Etag(e.to_string()),
                Pinned::Modified(t) => Expected::Modified(t),
            })
        })
        .ok()
        .flatten()
}

/// Prefix of `ObjectMeta::version` for an object that has no ETag, pinned by its Last-Modified
/// date instead (the HTTP backend uses the same prefix, before the date as the server wrote
/// it; here the date is RFC 3339).
pub(crate) const LM_PREFIX: &str = "last-modified: ";

/// What a load is pinned to, read back from `ObjectMeta::version`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pinned<'a> {
    /// The ETag, verbatim.
    Etag(&'a str),
    /// The Last-Modified date of an object without an ETag.
    Modified(Timestamp),
}

/// The version string `stat` reports: the ETag, else `last-modified: <date>`, else none (then
/// only the size is checked).
pub(crate) fn version_of(etag: Option<&str>, modified: Option<Timestamp>) -> Option<String> {
    match (etag, modified) {
        (Some(e), _) => Some(e.to_string()),
        (None, Some(t)) => Some(format!("{LM_PREFIX}{t}")),
        (None, None) => None,
    }
}

/// The inverse of [`version_of`]. A version that is not a date this module wrote is an ETag.
pub(crate) fn parse_version(v: &str) -> Pinned<'_> {
    match v.strip_prefix(LM_PREFIX).map(str::parse::<Timestamp>) {
        Some(Ok(t)) => Pinned::Modified(t),
        _ => Pinned::Etag(v),
    }
}

/// Checks a response's Last-Modified date against the pinned one. A response without one
/// cannot be checked and passes (the request still carried `If-Unmodified-Since`).
pub(crate) fn check_modified(expected: Timestamp, got: Option<Timestamp>) -> Result<()> {
    match got {
        Some(got) if got != expected => Err(Error::new(
            ErrorKind::ConditionNotMatch,
            format!(
                "object changed while loading: the server sent Last-Modified {got}, expected \
                 {expected} (the object has no ETag)"
            ),
        )),
        _ => Ok(()),
    }
}

/// What a read or stat asked for: the ETag or the date it is pinned to.
#[derive(Debug, Clone)]
enum Expected {
    Etag(String),
    Modified(Timestamp),
}

impl Expected {
    fn of(if_match: Option<&str>, if_unmodified_since: Option<Timestamp>) -> Option<Expected> {
        match (if_match, if_unmodified_since) {
            (Some(e), _) => Some(Expected::Etag(e.to_string())),
            (None, Some(t)) => Some(Expected::Modified(t)),
            (None, None) => None,
        }
    }

    fn check(&self, md: &opendal::Metadata) -> Result<()> {
        match self {
            Expected::Etag(e) => check_etag(e, md.etag()),
            Expected::Modified(t) => check_modified(*t, md.last_modified()),
        }
    }
}

/// Strips the weak marker and the quotes: `W/"abc"` and `"abc"` compare equal to `abc`.
pub(crate) fn normalize_etag(e: &str) -> &str {
    let e = e.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"')
}

/// Checks a response's ETag against the expected one. A response without an ETag cannot be
/// checked and passes (the request still carried `If-Match`).
pub(crate) fn check_etag(expected: &str, got: Option<&str>) -> Result<()> {
    match got {
        Some(got) if normalize_etag(got) != normalize_etag(expected) => Err(Error::new(
            ErrorKind::ConditionNotMatch,
            format!(
                "object changed while loading: the server sent ETag {got}, expected {expected}"
            ),
        )),
        _ => Ok(()),
    }
}

/// The layer: add it before (i.e. below) the retry layer.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EtagPinLayer;

impl Layer for EtagPinLayer {
    fn apply_service(&self, inner: Servicer) -> Servicer {
        Arc::new(EtagPinService { inner })
    }
}

#[derive(Debug)]
pub(crate) struct EtagPinService {
    inner: Servicer,
}

/// A reader that checks every opened response.
pub(crate) struct EtagPinReader {
    inner: oio::Reader,
    expected: Option<Expected>,
}

impl EtagPinReader {
    fn check(&self, rp: &RpRead) -> Result<()> {
        match (&self.expected, rp.metadata()) {
            (Some(exp), Some(md)) => exp.check(md),
            _ => Ok(()),
        }
    }
}

impl oio::Read for EtagPinReader {
    async fn open(&self, range: BytesRange) -> Result<(RpRead, Box<dyn oio::ReadStreamDyn>)> {
        let (rp, stream) = self.inner.open(range).await?;
        self.check(&rp)?;
        Ok((rp, stream))
    }

    async fn read(&self, range: BytesRange) -> Result<(RpRead, Buffer)> {
        let (rp, buf) = self.inner.read(range).await?;
        self.check(&rp)?;
        Ok((rp, buf))
    }
}

impl Service for EtagPinService {
    type Reader = EtagPinReader;
    type Writer = oio::Writer;
    type Lister = oio::Lister;
    type Deleter = oio::Deleter;
    type Copier = oio::Copier;
    type Composer = oio::Composer;

    fn info(&self) -> ServiceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    async fn create_dir(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpCreateDir,
    ) -> Result<RpCreateDir> {
        self.inner.create_dir(ctx, path, args).await
    }

    async fn stat(&self, ctx: &OperationContext, path: &str, args: OpStat) -> Result<RpStat> {
        let expected = Expected::of(args.if_match(), args.if_unmodified_since());
        let rp = self.inner.stat(ctx, path, args).await?;
        if let Some(exp) = expected {
            exp.check(&rp.clone().into_metadata())?;
        }
        Ok(rp)
    }

    fn read(&self, ctx: &OperationContext, path: &str, args: OpRead) -> Result<Self::Reader> {
        // A read without a condition (a weak ETag is not sent as `If-Match`) is still checked
        // against what its scope pinned.
        let expected =
            Expected::of(args.if_match(), args.if_unmodified_since()).or_else(pinned_version);
        let inner = self.inner.read(ctx, path, args)?;
        Ok(EtagPinReader { inner, expected })
    }

    fn write(&self, ctx: &OperationContext, path: &str, args: OpWrite) -> Result<Self::Writer> {
        self.inner.write(ctx, path, args)
    }

    fn delete(&self, ctx: &OperationContext) -> Result<Self::Deleter> {
        self.inner.delete(ctx)
    }

    fn list(&self, ctx: &OperationContext, path: &str, args: OpList) -> Result<Self::Lister> {
        self.inner.list(ctx, path, args)
    }

    fn copy(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpCopy,
    ) -> Result<Self::Copier> {
        self.inner.copy(ctx, from, to, args)
    }

    fn compose(&self, ctx: &OperationContext, to: &str, args: OpCompose) -> Result<Self::Composer> {
        self.inner.compose(ctx, to, args)
    }

    async fn rename(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpRename,
    ) -> Result<RpRename> {
        self.inner.rename(ctx, from, to, args).await
    }

    async fn restore(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpRestore,
    ) -> Result<RpRestore> {
        self.inner.restore(ctx, path, args).await
    }

    async fn presign(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpPresign,
    ) -> Result<RpPresign> {
        self.inner.presign(ctx, path, args).await
    }
}
