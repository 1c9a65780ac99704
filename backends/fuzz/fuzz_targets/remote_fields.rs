//! What HTTP and S3 servers send in headers, and what users type as URIs and headers: the
//! `Content-Range`, `Range`, `Retry-After` parsers, the S3 and NFS URI parsers, the HTTP
//! header list, and the redaction of secrets from URIs. Never panics; each parser keeps its
//! documented invariants (ranges ordered and inside their total, a retry delay within its cap,
//! a parsed S3 location printed back as itself), and no password survives redaction.
#![no_main]

use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tensorstream_backends::fuzzing::{
    parse_content_range, parse_range_request, partial_answer_problem,
};
use tensorstream_backends::http::config::{
    parse_headers, parse_retry_after, parse_unsatisfied_total,
};
use tensorstream_backends::s3::S3Location;
use tensorstream_backends::{nfs, redact_uri, OpenOptions};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    value: &'a str,
    start: u64,
    len: Option<u64>,
    headers: Vec<(String, String)>,
    scheme: u8,
    user: &'a str,
    host: &'a str,
    path: &'a str,
}

const SECRET: &str = "Zq9pSECRETw";

fuzz_target!(|i: Input<'_>| {
    let v = i.value;
    if let Some((s, e, total)) = parse_content_range(v) {
        assert!(s <= e, "{v:?}");
        if let Some(t) = total {
            assert!(e < t, "{v:?}");
        }
        let shown = match total {
            Some(t) => format!("bytes {s}-{e}/{t}"),
            None => format!("bytes {s}-{e}/*"),
        };
        assert_eq!(parse_content_range(&shown), Some((s, e, total)));
    }
    if let Some((s, e)) = parse_range_request(v) {
        assert!(e.is_none_or(|e| e >= s), "{v:?}");
    }
    let asked = (i.start, i.len.map(|l| i.start.saturating_add(l)));
    if partial_answer_problem(asked, Some(v)).is_none() {
        // Usable: it starts where asked and ends inside the request.
        let (s, e, _) = parse_content_range(v).expect("a usable answer parses");
        assert_eq!(s, asked.0);
        assert!(asked.1.is_none_or(|end| e <= end));
    }
    let max = Duration::from_secs(i.start % 1000);
    if let Some(d) = parse_retry_after(v, SystemTime::UNIX_EPOCH, max) {
        assert!(d <= max);
    }
    let _ = parse_unsatisfied_total(v);
    let _ = parse_headers(&i.headers);

    if let Ok(loc) = S3Location::parse(v) {
        assert_eq!(S3Location::parse(&loc.uri()).ok(), Some(loc));
    }
    let _ = nfs::parse_uri(v, &OpenOptions::default());

    // Redaction: idempotent, and a password in the authority never survives it.
    let r = redact_uri(v);
    assert_eq!(redact_uri(&r), r, "{v:?}");
    let scheme = ["http", "https", "s3", "nfs", "HTTPS", "git+ssh"][usize::from(i.scheme) % 6];
    if !i.user.contains('/') && !i.host.contains('/') && !i.user.contains(SECRET) {
        let uri = format!("{scheme}://{}:{SECRET}@{}/{}", i.user, i.host, i.path);
        let shown = redact_uri(&uri);
        assert!(
            !shown.contains(SECRET) || i.host.contains(SECRET) || i.path.contains(SECRET),
            "{uri:?} -> {shown:?}"
        );
    }
});
