//! Unit tests of the pure parts (configuration, header parsing, version pins, backoff).
//! The protocol itself is tested against nginx (and a fault-injecting proxy) in
//! `backends/tests/http.rs`.

use std::time::{Duration, SystemTime};

use tensorstream_engine::ErrorKind;

use super::config::*;
use crate::OpenOptions;

type ContentRange = Option<(u64, u64, Option<u64>)>;

#[test]
fn content_range_parses_and_rejects() {
    let table: &[(&str, ContentRange)] = &[
        ("bytes 0-0/1", Some((0, 0, Some(1)))),
        ("bytes 100-199/1000", Some((100, 199, Some(1000)))),
        ("bytes  5-9/*", Some((5, 9, None))),
        ("bytes 5-9/9", None),   // end past total
        ("bytes 9-5/100", None), // reversed
        ("bytes */100", None),
        ("items 0-1/2", None),
        ("bytes 0-/10", None),
        ("bytes -1-2/10", None),
        ("bytes 0-18446744073709551616/1", None), // overflow
        ("", None),
    ];
    for (v, want) in table {
        assert_eq!(parse_content_range(v), *want, "{v:?}");
    }
    assert_eq!(parse_unsatisfied_total("bytes */1234"), Some(1234));
    assert_eq!(parse_unsatisfied_total("bytes 0-1/2"), None);
}

#[test]
fn retry_after_seconds_and_dates_are_capped() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let cap = Duration::from_secs(30);
    assert_eq!(
        parse_retry_after("1", now, cap),
        Some(Duration::from_secs(1))
    );
    assert_eq!(parse_retry_after(" 120 ", now, cap), Some(cap));
    let in_5s = httpdate::fmt_http_date(now + Duration::from_secs(5));
    assert_eq!(
        parse_retry_after(&in_5s, now, cap),
        Some(Duration::from_secs(5))
    );
    let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
    assert_eq!(parse_retry_after(&past, now, cap), Some(Duration::ZERO));
    let far = httpdate::fmt_http_date(now + Duration::from_secs(3600));
    assert_eq!(parse_retry_after(&far, now, cap), Some(cap));
    assert_eq!(parse_retry_after("soon", now, cap), None);
    assert_eq!(parse_retry_after("-1", now, cap), None);
}

#[test]
fn backoff_grows_is_capped_and_jittered() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(5);
    // rand just below 1 gives (almost) the ceiling.
    let top = |a| backoff_delay(a, base, max, 0.999_999);
    assert!(top(1) <= base && top(1) > Duration::from_millis(99));
    assert!(top(2) > Duration::from_millis(199) && top(2) <= Duration::from_millis(200));
    assert!(top(4) > Duration::from_millis(799));
    assert_eq!(top(20), max.mul_f64(0.999_999));
    assert_eq!(top(u32::MAX), max.mul_f64(0.999_999));
    // rand 0 still waits a little; jitter spreads values.
    assert_eq!(backoff_delay(3, base, max, 0.0), Duration::from_millis(1));
    let samples: Vec<f64> = (0..100).map(|_| jitter_sample()).collect();
    assert!(samples.iter().all(|s| (0.0..1.0).contains(s)));
    let distinct = samples
        .iter()
        .map(|s| (s * 1000.0) as u32)
        .collect::<std::collections::BTreeSet<_>>();
    assert!(distinct.len() > 50, "jitter looks constant: {distinct:?}");
}

#[test]
fn url_secrets_are_redacted() {
    let u = reqwest::Url::parse("https://user:pw@example.com:8443/m/x.safetensors?X-Sig=abc#f")
        .unwrap();
    let r = redact_url(&u);
    assert_eq!(r, "https://example.com:8443/m/x.safetensors?…");
    assert!(!r.contains("pw") && !r.contains("abc") && !r.contains("user"));
    let u = reqwest::Url::parse("http://127.0.0.1:8080/a").unwrap();
    assert_eq!(redact_url(&u), "http://127.0.0.1:8080/a");
    // A URL that does not parse is named without its secrets too.
    let e = crate::http::HttpBackend::open(
        "https://user:pw@example.com:99999/m?X-Amz-Signature=abc#f",
        &crate::OpenOptions::default(),
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("invalid http URL") && m.contains("example.com:99999/m?…"),
        "{m}"
    );
    // A password holding '/': not shown, and the message says how to write it.
    let e = crate::http::HttpBackend::open(
        "http://user:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@127.0.0.1:18081/m.safetensors",
        &crate::OpenOptions::default(),
    )
    .unwrap_err();
    let m2 = e.to_string();
    assert!(!m2.contains("K7MDENG") && !m2.contains("wJalr"), "{m2}");
    assert!(m2.contains("percent-encoded") && m2.contains("%2F"), "{m2}");
    assert!(
        !m.contains("pw") && !m.contains("abc") && !m.contains("user"),
        "{m}"
    );
    // Nor does `Debug` show the URL's secrets or any header the user added.
    let cfg = HttpConfig::from_options(&OpenOptions {
        headers: vec![("X-Api-Key".into(), "k3y".into())],
        ..Default::default()
    })
    .unwrap();
    let url = reqwest::Url::parse("https://user:pw@example.com/m?X-Sig=abc").unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ctx = super::retry::Ctx {
        client: reqwest::Client::new(),
        display: redact_url(&url),
        url,
        cfg,
    };
    let d = format!("{ctx:?}");
    assert!(d.contains("example.com/m?…"), "{d}");
    for secret in ["pw", "abc", "k3y"] {
        assert!(!d.contains(secret), "{secret} in {d}");
    }
}

#[test]
fn options_are_validated() {
    let c = HttpConfig::from_options(&OpenOptions::default()).unwrap();
    assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
    assert_eq!(c.chunk_size, DEFAULT_CHUNK);
    assert_eq!(c.timeout, DEFAULT_TIMEOUT);

    let o = OpenOptions {
        concurrency: Some(4),
        chunk_size: Some(1 << 20),
        timeout: Some(Duration::from_secs(2)),
        headers: vec![("Authorization".into(), "Bearer t0k".into())],
        ..Default::default()
    };
    let c = HttpConfig::from_options(&o).unwrap();
    assert_eq!(
        (c.concurrency, c.chunk_size, c.timeout),
        (4, 1 << 20, Duration::from_secs(2))
    );
    assert!(c.connect_timeout <= Duration::from_secs(2));
    let auth = c.headers.get("authorization").unwrap();
    assert!(auth.is_sensitive());
    assert_eq!(auth.to_str().unwrap(), "Bearer t0k");

    for bad in [
        OpenOptions {
            concurrency: Some(0),
            ..Default::default()
        },
        OpenOptions {
            concurrency: Some(MAX_CONCURRENCY + 1),
            ..Default::default()
        },
        OpenOptions {
            chunk_size: Some(0),
            ..Default::default()
        },
        OpenOptions {
            timeout: Some(Duration::ZERO),
            ..Default::default()
        },
        OpenOptions {
            headers: vec![("Bad Name".into(), "x".into())],
            ..Default::default()
        },
        OpenOptions {
            headers: vec![("X-A".into(), "line\nbreak".into())],
            ..Default::default()
        },
        OpenOptions {
            headers: vec![("Range".into(), "bytes=0-1".into())],
            ..Default::default()
        },
        OpenOptions {
            headers: vec![("if-match".into(), "\"x\"".into())],
            ..Default::default()
        },
    ] {
        let e = HttpConfig::from_options(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
}

#[test]
fn pins_round_trip_and_choose_preconditions() {
    let strong = Pin {
        size: 10,
        etag: Some("\"abc\"".into()),
        last_modified: Some("Mon, 01 Jan 2024 00:00:00 GMT".into()),
    };
    assert_eq!(strong.precondition(), Some(("if-match", "\"abc\"")));
    assert_eq!(
        Pin::from_meta(10, strong.version().as_deref()).precondition(),
        strong.precondition()
    );

    let weak = Pin {
        size: 10,
        etag: Some("W/\"abc\"".into()),
        last_modified: Some("Mon, 01 Jan 2024 00:00:00 GMT".into()),
    };
    assert_eq!(
        weak.precondition(),
        Some(("if-unmodified-since", "Mon, 01 Jan 2024 00:00:00 GMT"))
    );
    assert!(!weak.etag_differs(Some("\"abc\"")));
    assert!(weak.etag_differs(Some("\"abd\"")));
    assert!(!weak.etag_differs(None));

    let lm_only = Pin {
        size: 3,
        etag: None,
        last_modified: Some("Tue, 02 Jan 2024 00:00:00 GMT".into()),
    };
    let v = lm_only.version().unwrap();
    assert_eq!(Pin::from_meta(3, Some(&v)), lm_only);
    assert_eq!(
        lm_only.precondition(),
        Some(("if-unmodified-since", "Tue, 02 Jan 2024 00:00:00 GMT"))
    );

    let none = Pin {
        size: 3,
        etag: None,
        last_modified: None,
    };
    assert_eq!(none.version(), None);
    assert_eq!(none.precondition(), None);
    assert_eq!(Pin::from_meta(3, None), none);
}

#[test]
fn statuses_are_classified() {
    use StatusClass::*;
    let table = [
        (206, Partial),
        (200, Whole),
        (412, Changed),
        (404, NotFound),
        (410, NotFound),
        (401, Denied),
        (403, Denied),
        (416, Unsatisfiable),
        (429, Retry),
        (408, Retry),
        (500, Retry),
        (502, Retry),
        (503, Retry),
        (504, Retry),
        (501, Fatal),
        (505, Fatal),
        (400, Fatal),
        (302, Fatal),
    ];
    for (s, want) in table {
        assert_eq!(classify(s), want, "{s}");
    }
}

#[test]
fn bad_urls_are_invalid_input() {
    for u in ["http://", "not a url", "ftp://host/x"] {
        let e = super::HttpBackend::open(u, &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{u}: {e}");
        assert_eq!(e.backend(), Some("http"), "{u}");
    }
}

#[test]
fn open_dispatches_http_schemes() {
    // Nothing listens on port 1: the http backend must be the one answering (connection refused).
    let o = OpenOptions {
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let e = crate::open("http://127.0.0.1:1/x", &o).unwrap_err();
    assert_eq!(e.backend(), Some("http"), "{e}");
    assert_ne!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn redirects_are_checked_hop_by_hop() {
    let u = |s: &str| reqwest::Url::parse(s).unwrap();
    let from = u("https://a.example/models/m.safetensors?sig=1");
    // Relative and absolute locations; another https host is fine.
    assert_eq!(
        next_hop(&from, 302, Some("/other/m.bin"), 0).unwrap(),
        u("https://a.example/other/m.bin")
    );
    assert_eq!(
        next_hop(&from, 307, Some(" https://cdn.example/x?t=2 "), 4).unwrap(),
        u("https://cdn.example/x?t=2")
    );
    // http → https is an upgrade: fine.
    assert!(next_hop(
        &u("http://a.example/x"),
        301,
        Some("https://a.example/x"),
        0
    )
    .is_ok());
    // Refused: no Location, https → http, another scheme, too many hops.
    let refused = [
        (next_hop(&from, 302, None, 0), "without a Location"),
        (
            next_hop(&from, 302, Some("http://cdn.example/x?sig=secret"), 0),
            "from https to plain http",
        ),
        (
            next_hop(&from, 308, Some("file:///etc/passwd"), 0),
            "file: URL",
        ),
        (
            next_hop(&from, 302, Some("/again"), MAX_REDIRECTS),
            "more than 5 redirects",
        ),
    ];
    for (r, want) in refused {
        let why = r.unwrap_err();
        assert!(why.contains(want), "{why:?} lacks {want:?}");
        assert!(
            !why.contains("secret"),
            "a query string in a message: {why}"
        );
    }
}

#[test]
fn only_chunked_framing_is_accepted() {
    for ok in ["chunked", " Chunked ", "identity", "chunked, identity"] {
        assert!(only_chunked(ok), "{ok:?}");
    }
    for bad in ["gzip, chunked", "deflate", "compress,chunked", "x-custom"] {
        assert!(!only_chunked(bad), "{bad:?}");
    }
}
