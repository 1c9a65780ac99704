//! The HTTP transport under the S3 service: OpenDAL's reqwest transport plus a check OpenDAL does
//! not make. OpenDAL's S3 reader takes any `206 Partial Content` for the range it asked and
//! never looks at `Content-Range`, so a proxy or server that answers another range (a shifted
//! window, a cached piece of the object) would put wrong bytes at the right place. Here every
//! ranged GET's answer must start at the asked offset and end within the asked range; otherwise
//! the request fails (permanently: a retry would ask the same server again) and the backend
//! reports it as [`tensorstream_engine::ErrorKind::Corrupt`]. So does a `200` with the whole
//! object for a range that does not start at 0. An answer whose object size (Content-Range
//! total, or a `200`'s length) differs from the size the read is pinned to
//! ([`super::pin::scoped`]) fails as a changed object.

use futures::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use opendal::{Buffer, Error, ErrorKind, HttpBody, HttpTransport, Result};
use opendal_http_transport_reqwest::ReqwestTransport;

use crate::ranges::{parse_content_range, parse_range_request, partial_answer_problem};

/// Start of the message of a refused answer (the backend maps it to `Corrupt`).
pub(crate) const WRONG_RANGE: &str = "wrong range in the answer";

/// The transport: see the module docs.
pub(crate) struct RangeCheckedTransport {
    inner: ReqwestTransport,
}

impl RangeCheckedTransport {
    /// A transport over `client`: the process's S3 client for the backend's roots (see
    /// `crate::shared`). Its pooled connections are served by tasks of the process's S3 runtime,
    /// which is never shut down; a pool shared with a runtime that a backend shut down would
    /// hand out connections whose task had died ("error sending request"), which is why the
    /// client and the runtime are shared together.
    pub(crate) fn new(client: reqwest::Client) -> Self {
        RangeCheckedTransport {
            inner: ReqwestTransport::new(client),
        }
    }
}

impl HttpTransport for RangeCheckedTransport {
    async fn fetch(&self, req: Request<Buffer>) -> Result<Response<HttpBody>> {
        let asked = (req.method() == Method::GET)
            .then(|| req.headers().get(header::RANGE))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(parse_range_request);
        let resp = match self.inner.fetch(req).await {
            Ok(r) => r,
            // A certificate the client does not trust will not become trusted by retrying
            // (OpenDAL marks every failed send as temporary).
            Err(e) if names_certificate(&e) => return Err(e.set_permanent()),
            Err(e) => return Err(e),
        };
        if !resp.status().is_success() {
            return Ok(cap_error_body(resp));
        }
        if let Some(asked) = asked {
            let headers = resp.headers();
            let text = |h| headers.get(h).and_then(|v| v.to_str().ok());
            // The object's size, as this answer gives it: a 206's Content-Range total, a
            // 200's length (the whole object).
            let size = if resp.status() == StatusCode::PARTIAL_CONTENT {
                let cr = text(header::CONTENT_RANGE);
                if let Some(why) = partial_answer_problem(asked, cr) {
                    return Err(Error::new(
                        ErrorKind::Unexpected,
                        format!("{WRONG_RANGE}: {why}"),
                    ));
                }
                cr.and_then(parse_content_range)
                    .and_then(|(_, _, total)| total)
            } else {
                // A whole object for a range (a proxy or cache that ignored the Range header):
                // its bytes start at 0, so they are the asked ones only for a range from 0
                // (a longer body is then refused as it arrives). From any other offset they
                // would land at the wrong place.
                if asked.0 != 0 {
                    return Err(Error::new(
                        ErrorKind::Unexpected,
                        format!(
                            "{WRONG_RANGE}: {} with the whole object to a request for bytes \
                             {}-{} (the server or a proxy ignored the Range header)",
                            resp.status(),
                            asked.0,
                            asked.1.map(|e| e.to_string()).unwrap_or_default()
                        ),
                    ));
                }
                text(header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok())
            };
            // The object the answer came from must have the size `stat` found: for an object
            // with neither ETag nor Last-Modified this is the only sign of a replacement.
            if let (Some(got), Some(want)) = (size, crate::s3::pin::pinned_size()) {
                if got != want {
                    return Err(Error::new(
                        ErrorKind::ConditionNotMatch,
                        format!(
                            "object changed while loading: the server now holds {got} bytes, \
                             {want} when the load began"
                        ),
                    ));
                }
            }
        }
        Ok(resp)
    }
}

/// Most bytes of an error answer's body kept. OpenDAL reads the whole body of an error answer
/// into memory to build its message; a hostile or broken server could send gigabytes.
pub(crate) const ERROR_BODY_MAX: usize = 16 << 10;

/// The answer with its body cut to [`ERROR_BODY_MAX`] bytes (and no announced size, so that
/// the cut body is not taken for a truncated transfer).
fn cap_error_body(resp: Response<HttpBody>) -> Response<HttpBody> {
    let (parts, body) = resp.into_parts();
    let mut inner = None;
    let _ = body.map_inner(|s| {
        inner = Some(s);
        Box::new(futures::stream::empty())
    });
    let Some(inner) = inner else {
        return Response::from_parts(parts, HttpBody::new(futures::stream::empty(), None));
    };
    let mut left = ERROR_BODY_MAX;
    let capped = inner
        .map(move |r| {
            r.map(|b| {
                let n = b.len().min(left);
                left -= n;
                b.slice(0..n)
            })
        })
        .take_while(|r| std::future::ready(!matches!(r, Ok(b) if b.is_empty())));
    Response::from_parts(parts, HttpBody::new(capped, None))
}

/// Whether `e` or one of its causes is about a TLS certificate.
fn names_certificate(e: &Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.to_string().to_ascii_lowercase().contains("certificate") {
            return true;
        }
        cur = c.source();
    }
    false
}
