//! The HTTP transport under the S3 service: OpenDAL's reqwest transport plus a check OpenDAL does
//! not make. OpenDAL's S3 reader takes any `206 Partial Content` for the range it asked and
//! never looks at `Content-Range`, so a proxy or server that answers another range (a shifted
//! window, a cached piece of the object) would put wrong bytes at the right place. Here every
//! ranged GET's answer must start at the asked offset and end within the asked range; otherwise
//! the request fails (permanently: a retry would ask the same server again) and the backend
//! reports it as [`tensorstream_engine::ErrorKind::Corrupt`].

use futures::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use opendal::{Buffer, Error, ErrorKind, HttpBody, HttpTransport, Result};
use opendal_http_transport_reqwest::ReqwestTransport;

use crate::ranges::{parse_range_request, partial_answer_problem};

/// Start of the message of a refused answer (the backend maps it to `Corrupt`).
pub(crate) const WRONG_RANGE: &str = "wrong range in a 206 answer";

/// The transport: see the module docs.
pub(crate) struct RangeCheckedTransport {
    inner: ReqwestTransport,
}

impl RangeCheckedTransport {
    /// A transport with its own connection pool. Each backend owns one, built on the backend's
    /// own runtime: a pooled connection is served by a task of the runtime that opened it, so a
    /// pool shared across backends (OpenDAL's process-wide default client) would hand one backend
    /// connections whose task died with another backend's runtime ("error sending request").
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
        let resp = self.inner.fetch(req).await?;
        if !resp.status().is_success() {
            return Ok(cap_error_body(resp));
        }
        if let Some(asked) = asked {
            if resp.status() == StatusCode::PARTIAL_CONTENT {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok());
                if let Some(why) = partial_answer_problem(asked, cr) {
                    return Err(Error::new(
                        ErrorKind::Unexpected,
                        format!("{WRONG_RANGE}: {why}"),
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
