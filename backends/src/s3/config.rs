//! `s3://bucket/key` parsing and the S3 settings, resolved from the standard AWS environment and
//! overridden by [`OpenOptions`]. Pure: the environment comes in as a lookup function, so every
//! rule is unit-tested without touching the process environment.

use std::time::Duration;

use tensorstream_engine::{Error, Result};

use crate::OpenOptions;

/// Requests in flight when [`OpenOptions::concurrency`] is not set.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Bytes per ranged GET when [`OpenOptions::chunk_size`] is not set (object stores like 8–16 MiB).
pub const DEFAULT_CHUNK: usize = 16 << 20;
/// Region used when neither the options nor `AWS_REGION` / `AWS_DEFAULT_REGION` name one (what
/// the AWS CLI does for S3-compatible endpoints, which mostly ignore the region).
pub const DEFAULT_REGION: &str = "us-east-1";
/// Deadline of a control request (HEAD) when [`OpenOptions::timeout`] is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of each I/O step of a GET (opening it, each body chunk) when
/// [`OpenOptions::timeout`] is not set: a stalled body fails (and is retried) after this long.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest accepted chunk size (a single GET of more than this is never useful).
pub const MAX_CHUNK: usize = 1 << 30;
/// Largest accepted concurrency.
pub const MAX_CONCURRENCY: usize = 1024;

/// Where the object lives: `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Object key (no leading slash).
    pub key: String,
}

impl S3Location {
    /// Parses `s3://bucket/key`. The key may contain `/`; it must not be empty, end with `/`
    /// (that names a "directory") or contain empty segments (`a//b`) or `.` and `..` segments,
    /// which the client would silently normalise to another key (`a/../b` is `b`, even in
    /// another bucket). Messages show the URI without its query (it may hold a signature).
    pub fn parse(uri: &str) -> Result<S3Location> {
        let shown = crate::redact_uri(uri);
        let bad = |why: &str| Error::invalid(format!("{shown}: {why} (expected s3://bucket/key)"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("not a URI"))?;
        if !scheme.eq_ignore_ascii_case("s3") {
            return Err(bad(&format!("scheme {scheme:?} is not s3")));
        }
        if rest.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        let (bucket, key) = match rest.split_once('/') {
            Some((b, k)) => (b, k),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(bad("missing bucket name"));
        }
        // `s3://KEY:SECRET@bucket/key` (or `s3://host:9000/…`) would otherwise send
        // "KEY:SECRET@bucket" as the bucket name, to the server and with virtual-hosted
        // addressing into the host name. No bucket name holds ':' or '@'.
        if bucket.contains([':', '@']) {
            return Err(bad(
                "the bucket name holds ':' or '@': an s3:// URI names no host, port or \
                 user:password@ (the endpoint comes from --s3-endpoint, \
                 OpenOptions::s3_endpoint or AWS_ENDPOINT_URL, credentials from \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            ));
        }
        if bucket.len() > 255 || bucket.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(&format!("invalid bucket name {bucket:?}")));
        }
        if key.is_empty() {
            return Err(bad("missing object key"));
        }
        if key.ends_with('/') {
            return Err(bad(
                "the key ends with '/', which names a prefix, not an object",
            ));
        }
        if key.starts_with('/') || key.contains("//") {
            return Err(bad("empty path segment in the key ('//')"));
        }
        if key.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(bad(
                "a '.' or '..' segment in the key (the client would read another key)",
            ));
        }
        if key.len() > 1024 || key.chars().any(|c| c.is_control()) {
            return Err(bad("invalid object key"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// `s3://bucket/key`, for messages.
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// Everything needed to talk to one S3 endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Endpoint URL (`http(s)://host[:port]`); `None`: AWS for the region.
    pub endpoint: Option<String>,
    /// Signing region.
    pub region: String,
    /// Static access key id, if configured (else OpenDAL's provider chain: profile, IMDS …).
    pub access_key_id: Option<String>,
    /// Static secret key (set exactly when `access_key_id` is).
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Unsigned requests (public buckets): no credentials are looked up or sent.
    pub no_sign_request: bool,
    /// Virtual-hosted-style addressing (`bucket.host`) instead of path style (`host/bucket`).
    pub virtual_host_style: bool,
    /// Ranged GETs in flight at most.
    pub concurrency: usize,
    /// Bytes per ranged GET.
    pub chunk_size: usize,
    /// Deadline of control requests (HEAD).
    pub timeout: Duration,
    /// Deadline of each I/O step of a GET.
    pub io_timeout: Duration,
    /// A PEM bundle of extra trusted root certificates (`AWS_CA_BUNDLE`), for an endpoint
    /// whose certificate a private CA signed. (`SSL_CERT_FILE` / `SSL_CERT_DIR` replace the
    /// system's roots instead.)
    pub ca_bundle: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("no_sign_request", &self.no_sign_request)
            .field("virtual_host_style", &self.virtual_host_style)
            .field("concurrency", &self.concurrency)
            .field("chunk_size", &self.chunk_size)
            .field("timeout", &self.timeout)
            .field("io_timeout", &self.io_timeout)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::invalid(format!(
            "{name}={v:?}: expected true or false"
        ))),
    }
}

fn check_endpoint(what: &str, e: &str) -> Result<String> {
    let e = e.trim().trim_end_matches('/');
    // Messages show the endpoint without user information or query (they could hold secrets).
    let shown = crate::redact_uri(e);
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what} {shown:?}: the S3 endpoint must start with http:// or https://"
            ))
        })?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(Error::invalid(format!(
            "{what} {shown:?}: not a valid endpoint URL"
        )));
    }
    if rest.contains(['?', '#']) {
        return Err(Error::invalid(format!(
            "{what} {shown:?}: an S3 endpoint URL has no query or fragment"
        )));
    }
    // Anywhere, not only before the first '/': a secret key holding '/' cuts the authority.
    if rest.contains('@') {
        return Err(Error::invalid(format!(
            "{what} {shown:?}: the S3 endpoint must not hold user information (user:password@); \
             credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )));
    }
    Ok(e.to_string())
}

impl S3Config {
    /// Resolves the settings: [`OpenOptions`] first, then the environment (looked up through
    /// `env`; empty values count as unset), then defaults.
    ///
    /// * endpoint: `opts.s3_endpoint`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`;
    /// * region: `opts.s3_region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, [`DEFAULT_REGION`];
    /// * credentials: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`),
    ///   none (unsigned requests, for public buckets) with `opts.s3_no_sign_request` or
    ///   `AWS_NO_SIGN_REQUEST=true` (the variable GDAL reads);
    /// * addressing: path style unless `AWS_S3_FORCE_PATH_STYLE=false` or
    ///   `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`;
    /// * extra trusted root certificates: `AWS_CA_BUNDLE` (a PEM file, read when the backend
    ///   is built).
    pub fn resolve(opts: &OpenOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<S3Config> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());

        let endpoint = if let Some(e) = opts.s3_endpoint.as_deref() {
            Some(check_endpoint(
                "--s3-endpoint (OpenOptions::s3_endpoint)",
                e,
            )?)
        } else if let Some(e) = var("AWS_ENDPOINT_URL_S3") {
            Some(check_endpoint("AWS_ENDPOINT_URL_S3", &e)?)
        } else if let Some(e) = var("AWS_ENDPOINT_URL") {
            Some(check_endpoint("AWS_ENDPOINT_URL", &e)?)
        } else {
            None
        };

        let region = match opts.s3_region.as_deref() {
            Some(r) if r.trim().is_empty() => {
                return Err(Error::invalid(
                    "--s3-region (OpenOptions::s3_region) is empty",
                ));
            }
            Some(r) => r.trim().to_string(),
            None => var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .map(|r| r.trim().to_string())
                .unwrap_or_else(|| DEFAULT_REGION.to_string()),
        };

        let no_sign_request = match opts.s3_no_sign_request {
            Some(v) => v,
            None => match var("AWS_NO_SIGN_REQUEST") {
                Some(v) => parse_bool("AWS_NO_SIGN_REQUEST", &v)?,
                None => false,
            },
        };
        // Unsigned requests send no credentials, so none are read (or checked).
        let credential = |name: &str| if no_sign_request { None } else { var(name) };
        let access_key_id = credential("AWS_ACCESS_KEY_ID");
        let secret_access_key = credential("AWS_SECRET_ACCESS_KEY");
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(Error::invalid(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not",
                ))
            }
            _ => {}
        }
        let session_token = if access_key_id.is_some() {
            var("AWS_SESSION_TOKEN")
        } else {
            None
        };

        let mut virtual_host_style = false;
        if let Some(v) = var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST") {
            virtual_host_style = parse_bool("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", &v)?;
        }
        if let Some(v) = var("AWS_S3_FORCE_PATH_STYLE") {
            virtual_host_style = !parse_bool("AWS_S3_FORCE_PATH_STYLE", &v)?;
        }

        let concurrency = match opts.concurrency {
            None => DEFAULT_CONCURRENCY,
            Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => n,
            Some(n) => {
                return Err(Error::invalid(format!(
                    "concurrency {n}: must be between 1 and {MAX_CONCURRENCY}"
                )))
            }
        };
        let chunk_size = match opts.chunk_size {
            None => DEFAULT_CHUNK,
            Some(n) if (1..=MAX_CHUNK).contains(&n) => n,
            Some(n) => {
                return Err(Error::invalid(format!(
                    "chunk size {n}: must be between 1 byte and {MAX_CHUNK} bytes"
                )))
            }
        };
        let (timeout, io_timeout) = match opts.timeout {
            Some(t) if t.is_zero() => return Err(Error::invalid("timeout must be positive")),
            Some(t) => (t, t),
            None => (DEFAULT_TIMEOUT, DEFAULT_IO_TIMEOUT),
        };

        let ca_bundle = var("AWS_CA_BUNDLE").map(std::path::PathBuf::from);

        Ok(S3Config {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            no_sign_request,
            virtual_host_style,
            concurrency,
            chunk_size,
            timeout,
            io_timeout,
            ca_bundle,
        })
    }

    /// Resolves against the process environment.
    pub fn from_env(opts: &OpenOptions) -> Result<S3Config> {
        Self::resolve(opts, &|name| std::env::var(name).ok())
    }

    /// The endpoint for messages (`AWS default for <region>` when none is set).
    pub fn endpoint_display(&self) -> String {
        match &self.endpoint {
            Some(e) => crate::redact_uri(e),
            None => format!("AWS S3 ({})", self.region),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tensorstream_engine::ErrorKind;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn uri_parsing() {
        let ok = [
            ("s3://b/k", "b", "k"),
            (
                "S3://bucket/a/b/c.safetensors",
                "bucket",
                "a/b/c.safetensors",
            ),
            ("s3://my.bucket-1/dir/x", "my.bucket-1", "dir/x"),
            ("s3://b/a..b/.hidden/...", "b", "a..b/.hidden/..."),
        ];
        for (uri, b, k) in ok {
            let l = S3Location::parse(uri).unwrap();
            assert_eq!((l.bucket.as_str(), l.key.as_str()), (b, k), "{uri}");
        }
        assert_eq!(S3Location::parse("s3://b/a/k").unwrap().uri(), "s3://b/a/k");

        let bad = [
            ("s3://", "missing bucket"),
            ("s3:///key", "missing bucket"),
            ("s3://bucket", "missing object key"),
            ("s3://bucket/", "missing object key"),
            ("s3://bucket/dir/", "ends with '/'"),
            ("s3://bucket//k", "empty path segment"),
            ("s3://bucket/a//k", "empty path segment"),
            ("s3://bucket/k?versionId=1", "query"),
            ("http://bucket/k", "is not s3"),
            ("bucket/k", "not a URI"),
            ("s3://bu cket/k", "invalid bucket"),
            ("s3://b/x/../k", "'..' segment"),
            ("s3://b/../other/k", "'..' segment"),
            ("s3://b/./k", "'.' or '..' segment"),
            ("s3://b/k/..", "'..' segment"),
            ("s3://b/k?X-Amz-Signature=s3cret", "query"),
            ("s3://AKIA:s3cret@b/k", "user:password@"),
            ("s3://AKIA:s3/cret@b/k", "user:password@"),
            ("s3://minio:9000/b/k", "holds ':' or '@'"),
        ];
        for (uri, msg) in bad {
            let e = S3Location::parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{uri}");
            assert!(e.to_string().contains(msg), "{uri}: {e}");
            assert!(
                e.to_string().contains(&crate::redact_uri(uri)),
                "{uri}: {e}"
            );
            assert!(!e.to_string().contains("s3cret"), "{uri}: {e}");
        }
    }

    #[test]
    fn defaults_without_environment() {
        let c = S3Config::resolve(&OpenOptions::default(), &env(&[])).unwrap();
        assert_eq!(c.endpoint, None);
        assert_eq!(c.region, DEFAULT_REGION);
        assert_eq!(c.access_key_id, None);
        assert_eq!(c.secret_access_key, None);
        assert!(!c.virtual_host_style);
        assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(c.chunk_size, DEFAULT_CHUNK);
        assert_eq!(
            (c.timeout, c.io_timeout),
            (DEFAULT_TIMEOUT, DEFAULT_IO_TIMEOUT)
        );
    }

    #[test]
    fn environment_is_read() {
        let e = env(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/"),
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_SESSION_TOKEN", "TOK"),
            ("AWS_DEFAULT_REGION", "eu-west-3"),
        ]);
        let c = S3Config::resolve(&OpenOptions::default(), &e).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.access_key_id.as_deref(), Some("AK"));
        assert_eq!(c.secret_access_key.as_deref(), Some("SK"));
        assert_eq!(c.session_token.as_deref(), Some("TOK"));
        // The secret never shows in Debug output.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("SK\"") && !dbg.contains("TOK"), "{dbg}");
    }

    #[test]
    fn precedence() {
        let e = env(&[
            ("AWS_ENDPOINT_URL", "http://generic:1"),
            ("AWS_ENDPOINT_URL_S3", "https://s3specific:2"),
            ("AWS_REGION", "r1"),
            ("AWS_DEFAULT_REGION", "r2"),
        ]);
        let c = S3Config::resolve(&OpenOptions::default(), &e).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("https://s3specific:2"));
        assert_eq!(c.region, "r1");

        let opts = OpenOptions {
            s3_endpoint: Some("http://flag:3".into()),
            s3_region: Some("flag-region".into()),
            ..OpenOptions::default()
        };
        let c = S3Config::resolve(&opts, &e).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://flag:3"));
        assert_eq!(c.region, "flag-region");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let e = env(&[
            ("AWS_ENDPOINT_URL_S3", ""),
            ("AWS_ENDPOINT_URL", "http://x:1"),
            ("AWS_REGION", " "),
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
        ]);
        let c = S3Config::resolve(&OpenOptions::default(), &e).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://x:1"));
        assert_eq!(c.region, DEFAULT_REGION);
        assert_eq!(c.access_key_id, None);
        assert_eq!(c.ca_bundle, None);
    }

    #[test]
    fn ca_bundle_from_the_environment() {
        let c = S3Config::resolve(
            &OpenOptions::default(),
            &env(&[("AWS_CA_BUNDLE", "/etc/ssl/private-ca.pem")]),
        )
        .unwrap();
        assert_eq!(
            c.ca_bundle.as_deref(),
            Some(std::path::Path::new("/etc/ssl/private-ca.pem"))
        );
        let c =
            S3Config::resolve(&OpenOptions::default(), &env(&[("AWS_CA_BUNDLE", " ")])).unwrap();
        assert_eq!(c.ca_bundle, None);
    }

    #[test]
    fn addressing_style() {
        let c = |pairs: &[(&str, &str)]| S3Config::resolve(&OpenOptions::default(), &env(pairs));
        assert!(!c(&[]).unwrap().virtual_host_style);
        assert!(
            c(&[("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")])
                .unwrap()
                .virtual_host_style
        );
        assert!(
            c(&[("AWS_S3_FORCE_PATH_STYLE", "false")])
                .unwrap()
                .virtual_host_style
        );
        assert!(
            !c(&[
                ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true"),
                ("AWS_S3_FORCE_PATH_STYLE", "1")
            ])
            .unwrap()
            .virtual_host_style
        );
        let e = c(&[("AWS_S3_FORCE_PATH_STYLE", "maybe")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("AWS_S3_FORCE_PATH_STYLE"));
    }

    #[test]
    fn unsigned_requests() {
        let c = |opts: &OpenOptions, pairs: &[(&str, &str)]| S3Config::resolve(opts, &env(pairs));
        let keys = [
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_SESSION_TOKEN", "TOK"),
        ];
        let signed = c(&OpenOptions::default(), &keys).unwrap();
        assert!(!signed.no_sign_request);
        assert_eq!(signed.access_key_id.as_deref(), Some("AK"));
        // The variable (GDAL's spelling too), and no credentials kept when it is on.
        for on in ["true", "YES", "1"] {
            let mut pairs = keys.to_vec();
            pairs.push(("AWS_NO_SIGN_REQUEST", on));
            let u = c(&OpenOptions::default(), &pairs).unwrap();
            assert!(u.no_sign_request, "{on}");
            assert_eq!(
                (u.access_key_id, u.secret_access_key, u.session_token),
                (None, None, None),
                "{on}"
            );
        }
        assert!(
            !c(&OpenOptions::default(), &[("AWS_NO_SIGN_REQUEST", "no")])
                .unwrap()
                .no_sign_request
        );
        // The option wins over the variable, either way.
        let yes = OpenOptions {
            s3_no_sign_request: Some(true),
            ..Default::default()
        };
        let no = OpenOptions {
            s3_no_sign_request: Some(false),
            ..Default::default()
        };
        assert!(
            c(&yes, &[("AWS_NO_SIGN_REQUEST", "false")])
                .unwrap()
                .no_sign_request
        );
        let mut pairs = keys.to_vec();
        pairs.push(("AWS_NO_SIGN_REQUEST", "true"));
        let s = c(&no, &pairs).unwrap();
        assert!(!s.no_sign_request);
        assert_eq!(s.access_key_id.as_deref(), Some("AK"));
        // Half-set credentials do not matter when none are sent.
        assert!(c(&yes, &[("AWS_ACCESS_KEY_ID", "AK")]).is_ok());
        assert!(c(&OpenOptions::default(), &[("AWS_ACCESS_KEY_ID", "AK")]).is_err());
        let e = c(&OpenOptions::default(), &[("AWS_NO_SIGN_REQUEST", "maybe")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("AWS_NO_SIGN_REQUEST"), "{e}");
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let only_key = env(&[("AWS_ACCESS_KEY_ID", "AK")]);
        let e = S3Config::resolve(&OpenOptions::default(), &only_key).unwrap_err();
        assert!(
            e.to_string().contains("AWS_SECRET_ACCESS_KEY is not"),
            "{e}"
        );
        let only_secret = env(&[("AWS_SECRET_ACCESS_KEY", "SK")]);
        let e = S3Config::resolve(&OpenOptions::default(), &only_secret).unwrap_err();
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID is not"), "{e}");

        let e = S3Config::resolve(
            &OpenOptions::default(),
            &env(&[("AWS_ENDPOINT_URL", "localhost:9000")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
        assert!(e.to_string().contains("AWS_ENDPOINT_URL"), "{e}");
        // User information in the endpoint is refused, and never shown (nor a query).
        for bad in [
            "https://user:s3cret@h:9000",
            "ftp://user:s3cret@h?sig=s3cret",
            "http://h:9000?sig=s3cret",
            "http://h:9000/#s3cret",
            // A secret key holding '/' (the authority ends early).
            "http://minio:wJalr/s3cret/K7MDENG@127.0.0.1:18900",
        ] {
            let e = S3Config::resolve(
                &OpenOptions {
                    s3_endpoint: Some(bad.into()),
                    ..Default::default()
                },
                &env(&[]),
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
            assert!(e.to_string().contains("--s3-endpoint"), "{e}");
            // A library caller set the option, not the flag: both are named.
            assert!(e.to_string().contains("OpenOptions::s3_endpoint"), "{e}");
        }

        let cases: [(OpenOptions, &str); 5] = [
            (
                OpenOptions {
                    concurrency: Some(0),
                    ..Default::default()
                },
                "concurrency",
            ),
            (
                OpenOptions {
                    chunk_size: Some(0),
                    ..Default::default()
                },
                "chunk size",
            ),
            (
                OpenOptions {
                    chunk_size: Some(MAX_CHUNK + 1),
                    ..Default::default()
                },
                "chunk size",
            ),
            (
                OpenOptions {
                    timeout: Some(Duration::ZERO),
                    ..Default::default()
                },
                "timeout",
            ),
            (
                OpenOptions {
                    s3_region: Some(String::new()),
                    ..Default::default()
                },
                "--s3-region (OpenOptions::s3_region)",
            ),
        ];
        for (o, msg) in cases {
            let e = S3Config::resolve(&o, &env(&[])).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(msg), "{e}");
        }
    }

    #[test]
    fn options_override_sizes_and_timeouts() {
        let o = OpenOptions {
            concurrency: Some(64),
            chunk_size: Some(8 << 20),
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let c = S3Config::resolve(&o, &env(&[])).unwrap();
        assert_eq!(c.concurrency, 64);
        assert_eq!(c.chunk_size, 8 << 20);
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.io_timeout, Duration::from_secs(3));
    }
}
