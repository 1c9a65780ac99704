//! Unit tests of the S3 backend's pure parts (the server tests live in `backends/tests/s3.rs`).

use std::time::Duration;

use tensorstream_engine::ErrorKind;

use super::pin::{
    check_etag, check_modified, normalize_etag, parse_version, version_of, Pinned, LM_PREFIX,
};
use super::{clamp_read, http_status, map_error, S3Backend, S3Config, S3Location};
use crate::OpenOptions;
use tensorstream_engine::Backend;

#[test]
fn clamp_to_object_size() {
    assert_eq!(clamp_read(0, 10, 100).unwrap(), 10);
    assert_eq!(clamp_read(95, 10, 100).unwrap(), 5);
    assert_eq!(clamp_read(100, 10, 100).unwrap(), 0);
    assert_eq!(clamp_read(0, 0, 0).unwrap(), 0);
    assert_eq!(clamp_read(u64::MAX - 1, 10, u64::MAX).unwrap(), 1);
    let e = clamp_read(101, 10, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RangeNotSatisfiable);
}

#[test]
fn etags_compare_without_quotes_or_weak_marker() {
    assert_eq!(normalize_etag("\"abc\""), "abc");
    assert_eq!(normalize_etag("W/\"abc\""), "abc");
    assert_eq!(normalize_etag(" abc "), "abc");
    assert!(check_etag("\"abc\"", Some("abc")).is_ok());
    assert!(check_etag("\"abc\"", None).is_ok());
    let e = check_etag("\"abc\"", Some("\"abd\"")).unwrap_err();
    assert_eq!(e.kind(), opendal::ErrorKind::ConditionNotMatch);
    assert!(!e.is_temporary(), "a changed object must not be retried");
}

#[test]
fn objects_without_an_etag_are_versioned_by_their_last_modified_date() {
    use opendal::raw::Timestamp;
    let t = Timestamp::from_second(1_795_000_000).unwrap();
    // An ETag wins; without one the date is the version, and it reads back as the same date.
    assert_eq!(
        version_of(Some("\"e1\""), Some(t)).as_deref(),
        Some("\"e1\"")
    );
    assert_eq!(parse_version("\"e1\""), Pinned::Etag("\"e1\""));
    let v = version_of(None, Some(t)).unwrap();
    assert!(v.starts_with(LM_PREFIX), "{v}");
    assert_eq!(parse_version(&v), Pinned::Modified(t));
    assert_eq!(version_of(None, None), None);
    // Something after the prefix that is no date is taken for an ETag (and would not match).
    let odd = format!("{LM_PREFIX}yesterday");
    assert_eq!(parse_version(&odd), Pinned::Etag(&odd));
    // A response with the pinned date, or none, passes; another date is a changed object.
    assert!(check_modified(t, Some(t)).is_ok());
    assert!(check_modified(t, None).is_ok());
    let later = Timestamp::from_second(1_795_000_001).unwrap();
    let e = check_modified(t, Some(later)).unwrap_err();
    assert_eq!(e.kind(), opendal::ErrorKind::ConditionNotMatch);
    assert!(e.to_string().contains("Last-Modified"), "{e}");
}

#[test]
fn error_mapping() {
    use opendal::ErrorKind as K;
    let t = Duration::from_secs(3);
    let cases = [
        (K::NotFound, ErrorKind::NotFound, "no such object"),
        (
            K::PermissionDenied,
            ErrorKind::PermissionDenied,
            "AWS_SECRET_ACCESS_KEY",
        ),
        (K::ConditionNotMatch, ErrorKind::ObjectChanged, "replaced"),
        (
            K::RangeNotSatisfied,
            ErrorKind::RangeNotSatisfiable,
            "range",
        ),
        (K::ConfigInvalid, ErrorKind::InvalidInput, "configuration"),
        (K::Unexpected, ErrorKind::Io, "GET failed at http://e:1"),
    ];
    for (from, to, msg) in cases {
        let e = map_error(
            opendal::Error::new(from, "boom"),
            "GET",
            "http://e:1",
            t,
            0,
            false,
        );
        assert_eq!(e.kind(), to, "{from:?}");
        assert_eq!(e.backend(), Some("s3"));
        assert!(e.to_string().contains(msg), "{from:?}: {e}");
        assert!(!e.is_retryable());
    }
    let e = map_error(
        opendal::Error::new(K::Unexpected, "io operation timeout reached").set_persistent(),
        "GET",
        "http://e:1",
        t,
        4,
        false,
    );
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.is_retryable());
    assert!(e.to_string().contains("3.0 s"), "{e}");
    assert!(e.to_string().contains("gave up after 5 attempts"), "{e}");
    // Marked persistent by the retry layer but never retried: permanent, no "gave up".
    let e = map_error(
        opendal::Error::new(K::NotFound, "nope").set_persistent(),
        "HEAD",
        "http://e:1",
        t,
        0,
        false,
    );
    assert!(!e.is_retryable());
    assert!(!e.to_string().contains("gave up"), "{e}");
}

#[test]
fn open_builds_lazily_and_reports_capabilities() {
    let cfg = S3Config::resolve(
        &OpenOptions {
            s3_endpoint: Some("http://127.0.0.1:1".into()),
            concurrency: Some(7),
            chunk_size: Some(1 << 20),
            ..Default::default()
        },
        &|_| None,
    )
    .unwrap();
    let b = S3Backend::with_config(S3Location::parse("s3://b/k").unwrap(), cfg).unwrap();
    assert_eq!(b.location(), "s3://b/k");
    let c = b.capabilities();
    assert_eq!(c.kind, "s3");
    assert_eq!(c.alignment, 1);
    assert_eq!(c.preferred_chunk, 1 << 20);
    assert_eq!(c.max_concurrency, 7);
    assert!(c.ranged_reads && !c.direct_io);
}

#[test]
fn open_dispatches_s3_uris() {
    let e = crate::open("s3://bucket", &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("missing object key"), "{e}");
}

#[test]
fn http_status_from_error_context() {
    assert_eq!(
        http_status("Unexpected at stat, context: { response: Parts { status: 503, version"),
        Some(503)
    );
    assert_eq!(http_status("no status here"), None);
    assert_eq!(http_status("status: x"), None);
}

#[test]
fn partial_answers_must_be_the_range_asked() {
    use crate::ranges::{parse_range_request, partial_answer_problem};
    assert_eq!(parse_range_request("bytes=10-19"), Some((10, Some(19))));
    assert_eq!(parse_range_request("bytes=10-"), Some((10, None)));
    for bad in ["bytes=-5", "bytes=9-3", "items=0-1", "bytes=a-b", ""] {
        assert_eq!(parse_range_request(bad), None, "{bad:?}");
    }
    let asked = (1000, Some(5999));
    assert_eq!(
        partial_answer_problem(asked, Some("bytes 1000-5999/9000")),
        None
    );
    // Shorter, from the asked start: usable (the reader reads on).
    assert_eq!(
        partial_answer_problem(asked, Some("bytes 1000-1999/9000")),
        None
    );
    assert_eq!(
        partial_answer_problem((1000, None), Some("bytes 1000-8999/9000")),
        None
    );
    for (cr, needle) in [
        (Some("bytes 5096-10095/20000"), "bytes 5096-10095"),
        (Some("bytes 0-4999/9000"), "bytes 0-4999"),
        (Some("bytes 1000-6000/9000"), "bytes 1000-6000"),
        (Some("bytes */9000"), "invalid Content-Range"),
        (None, "without a Content-Range"),
    ] {
        let why = partial_answer_problem(asked, cr).expect("must be refused");
        assert!(why.contains(needle), "{why}");
    }
}

#[test]
fn access_denied_to_unsigned_requests_says_so() {
    let t = Duration::from_secs(3);
    let denied = || opendal::Error::new(opendal::ErrorKind::PermissionDenied, "AccessDenied");
    let signed = map_error(denied(), "HEAD", "http://e:1", t, 0, false);
    let unsigned = map_error(denied(), "HEAD", "http://e:1", t, 0, true);
    for e in [&signed, &unsigned] {
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("access denied by http://e:1"), "{e}");
    }
    assert!(!signed.to_string().contains("unsigned"), "{signed}");
    assert!(
        unsigned.to_string().contains("unsigned request")
            && unsigned.to_string().contains("needs credentials"),
        "{unsigned}"
    );
    // No credentials found: the message names the way to read a public bucket.
    let none = opendal::Error::new(
        opendal::ErrorKind::Unexpected,
        "failed to load signing credential",
    );
    let e = map_error(none, "HEAD", "http://e:1", t, 0, false);
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("AWS_NO_SIGN_REQUEST=true"), "{e}");
}

#[test]
fn head_timeouts_name_the_head_limit() {
    let (whole, io) = (Duration::from_secs(30), Duration::from_secs(10));
    assert_eq!(super::limit_for("HEAD", whole, io), whole);
    assert_eq!(super::limit_for("GET", whole, io), io);
    let e = opendal::Error::new(opendal::ErrorKind::Unexpected, "operation timeout reached");
    let m = map_error(
        e,
        "HEAD",
        "http://x",
        super::limit_for("HEAD", whole, io),
        0,
        false,
    );
    assert_eq!(m.kind(), ErrorKind::Timeout, "{m}");
    assert!(m.to_string().contains("within 30.0 s"), "{m}");
}

/// `AWS_CA_BUNDLE` is parsed once per file version, not once per backend (a sharded
/// checkpoint opens one per shard); a changed file is parsed again.
#[test]
fn ca_bundle_is_parsed_once_per_file_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.pem");
    let pem = |name: &str| crate::tls::tests::ca(name).1;
    std::fs::write(&path, pem("bundle one")).unwrap();
    let bundle = path.display().to_string();
    let cfg = S3Config::resolve(&OpenOptions::default(), &|name| {
        (name == "AWS_CA_BUNDLE").then(|| bundle.clone())
    })
    .unwrap();
    let first = super::ca_bundle(&cfg).unwrap();
    for _ in 0..5 {
        assert_eq!(super::ca_bundle(&cfg).unwrap(), first);
    }
    assert_eq!(super::bundles::parses(&path), 1);
    // Another version of the file (another size): parsed again, its certificates used.
    std::fs::write(&path, pem("bundle number two") + &pem("and a third")).unwrap();
    let second = super::ca_bundle(&cfg).unwrap();
    assert_eq!(second.len(), 2);
    assert_eq!(super::bundles::parses(&path), 2);
    // A file that no longer parses is an error, not the kept version.
    std::fs::write(
        &path,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(super::ca_bundle(&cfg).is_err());
}

/// A 400's S3 error Code and Message are shown as such (not OpenDAL's `S3Error { … }` Debug
/// text), and a region mismatch, or a bare 400 to a HEAD (no body, as AWS answers a HEAD signed
/// for another region), gets a hint on the region. Before: "HEAD failed at …: HTTP 400".
#[test]
fn a_400_shows_the_s3_error_and_hints_at_the_region() {
    let t = Duration::from_secs(3);
    let response = |headers: &str| {
        format!("Parts {{ status: 400, version: HTTP/1.1, headers: {{{headers}}} }}")
    };
    let map = |e: opendal::Error, what: &str| map_error(e, what, "http://e:1", t, 0, false);
    // AWS, GET signed for us-east-1 of a bucket in eu-west-1.
    let body = r#"S3Error { code: "AuthorizationHeaderMalformed", message: "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'", resource: "", request_id: "C43BE7872B207E9E" }"#;
    let aws = || {
        opendal::Error::new(opendal::ErrorKind::Unexpected, body).with_context(
            "response",
            response(r#""content-type": "application/xml", "x-amz-bucket-region": "eu-west-1""#),
        )
    };
    let m = map(aws(), "GET").to_string();
    assert!(
        m.contains(
            "GET failed at http://e:1: AuthorizationHeaderMalformed: The authorization header \
             is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'; the bucket \
             is in region eu-west-1 (x-amz-bucket-region): set --s3-region or AWS_REGION"
        ),
        "{m}"
    );
    assert!(!m.contains("S3Error"), "{m}");
    // The same without the header: the code alone points at the region.
    let e = opendal::Error::new(opendal::ErrorKind::Unexpected, body)
        .with_context("response", response(""));
    let m = map(e, "GET").to_string();
    assert!(
        m.contains("expecting 'eu-west-1'; the request was signed for another region"),
        "{m}"
    );
    // A HEAD: no body, only the header.
    let e = opendal::Error::new(opendal::ErrorKind::Unexpected, "").with_context(
        "response",
        response(r#""x-amz-bucket-region": "eu-west-1""#),
    );
    let m = map(e, "HEAD").to_string();
    assert!(
        m.contains("HTTP 400; the bucket is in region eu-west-1"),
        "{m}"
    );
    // A bare 400 to a HEAD (s3s-fs's answer to a bad bucket name, say).
    let e = opendal::Error::new(opendal::ErrorKind::Unexpected, "")
        .with_context("response", response(r#""content-type": "application/xml""#));
    let m = map(e, "HEAD").to_string();
    assert!(
        m.contains("HTTP 400 (Bad Request; the answer to a HEAD carries no reason)")
            && m.contains("--s3-region")
            && m.contains("bucket name"),
        "{m}"
    );
    // s3s-fs's answer to a request it finds bad: the code and message, no region hint.
    let e = opendal::Error::new(
        opendal::ErrorKind::Unexpected,
        r#"S3Error { code: "InvalidRequest", message: "invalid header: authorization", resource: "", request_id: "" }"#,
    )
    .with_context("response", response(r#""content-type": "application/xml""#));
    let m = map(e, "GET").to_string();
    assert!(
        m.ends_with("GET failed at http://e:1: InvalidRequest: invalid header: authorization"),
        "{m}"
    );
    // Other statuses get no region hint.
    let e = opendal::Error::new(opendal::ErrorKind::Unexpected, "").with_context(
        "response",
        "Parts { status: 503, version: HTTP/1.1, headers: {} }",
    );
    let m = map(e, "HEAD").to_string();
    assert!(m.ends_with("HTTP 503"), "{m}");
}

#[test]
fn s3_error_debug_text_is_read_back() {
    use super::{bucket_region, s3_error};
    assert_eq!(
        s3_error(r#"S3Error { code: "A", message: "\u{e9} \\ \"q\" \'", resource: "" }"#),
        Some(("A".into(), "\u{e9} \\ \"q\" '".into()))
    );
    // Control characters stay escaped: the message stays one line, without terminal codes.
    assert_eq!(
        s3_error(r#"S3Error { code: "A", message: "a\nb \u{1b}[31m", resource: "" }"#),
        Some(("A".into(), r"a\nb \u{1b}[31m".into()))
    );
    assert_eq!(s3_error(r#"S3Error { code: "", message: "x" }"#), None);
    assert_eq!(s3_error("<html>proxy error</html>"), None);
    // Cut short (a truncated message): no closing quote, no code.
    assert_eq!(s3_error(r#"S3Error { code: "Abc"#), None);
    assert_eq!(
        bucket_region(r#"headers: {"x-amz-bucket-region": "ap-south-1"}"#),
        Some("ap-south-1")
    );
    assert_eq!(
        bucket_region(r#"headers: {"x-amz-bucket-region": "<script>"}"#),
        None
    );
}

/// The host the unusable-proxy check matches NO_PROXY against is the one OpenDAL sends the
/// requests to.
#[test]
fn the_proxy_check_matches_no_proxy_against_the_requests_host() {
    let loc = S3Location::parse("s3://bkt/a/b.safetensors").unwrap();
    let host = |endpoint: Option<&str>, virtual_host: bool| {
        let mut cfg = S3Config::resolve(&OpenOptions::default(), &|name| match name {
            "AWS_REGION" => Some("eu-west-3".to_string()),
            _ => None,
        })
        .unwrap();
        cfg.endpoint = endpoint.map(str::to_string);
        cfg.virtual_host_style = virtual_host;
        super::request_host(&loc, &cfg)
    };
    assert_eq!(host(None, false), "s3.eu-west-3.amazonaws.com");
    assert_eq!(host(None, true), "bkt.s3.eu-west-3.amazonaws.com");
    assert_eq!(
        host(Some("https://s3.amazonaws.com"), false),
        "s3.eu-west-3.amazonaws.com"
    );
    assert_eq!(host(Some("http://127.0.0.1:9000"), false), "127.0.0.1");
    assert_eq!(host(Some("http://[::1]:9000/"), false), "[::1]");
    assert_eq!(host(Some("minio.lan:9000"), true), "bkt.minio.lan");
    assert_eq!(
        host(Some("https://bkt.store.example"), false),
        "store.example"
    );
}
