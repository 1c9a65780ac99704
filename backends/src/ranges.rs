//! HTTP byte-range header values, shared by the backends that speak HTTP (http, s3).

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`). Returns
/// `(start, end_inclusive, total)`.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.trim().split_once('-')?;
    let start: u64 = s.trim().parse().ok()?;
    let end: u64 = e.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if let Some(t) = total {
        if end >= t {
            return None;
        }
    }
    Some((start, end, total))
}

#[cfg(feature = "s3")]
/// Parses a request's `Range: bytes=START-END` or `bytes=START-` (one range, no suffix form).
/// Returns `(start, end_inclusive)`.
pub fn parse_range_request(v: &str) -> Option<(u64, Option<u64>)> {
    let (s, e) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = s.trim().parse().ok()?;
    let end = match e.trim() {
        "" => None,
        e => Some(e.parse::<u64>().ok().filter(|&e| e >= start)?),
    };
    Some((start, end))
}

#[cfg(feature = "s3")]
/// Why a `206` answer to a request for `asked` (from [`parse_range_request`]) cannot be used,
/// given its `Content-Range` value; `None` when it can. A shorter answer starting at the asked
/// offset is usable (the caller reads on); a shifted or longer one never is.
pub fn partial_answer_problem(
    asked: (u64, Option<u64>),
    content_range: Option<&str>,
) -> Option<String> {
    let (start, end) = asked;
    let want = match end {
        Some(e) => format!("bytes {start}-{e}"),
        None => format!("bytes {start}-"),
    };
    let Some(v) = content_range else {
        return Some(format!(
            "206 Partial Content without a Content-Range header (asked for {want})"
        ));
    };
    let Some((cs, ce, _)) = parse_content_range(v) else {
        return Some(format!(
            "206 Partial Content with an invalid Content-Range {v:?} (asked for {want})"
        ));
    };
    if cs != start || end.is_some_and(|e| ce > e) {
        return Some(format!(
            "the server answered bytes {cs}-{ce} to a request for {want}"
        ));
    }
    None
}
