//! URI helpers shared by every crate: a URI's scheme, and a URI with its secrets left out (for
//! messages; [`crate::Error::with_location`] applies it to every location).

/// The scheme of `uri` in lower case (`s3` of `s3://b/k`); `None` for a plain path (a path may
/// contain `://` after a `/`, which is not a scheme).
pub fn scheme_of(uri: &str) -> Option<String> {
    let (s, _) = uri.split_once("://")?;
    let valid = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then(|| s.to_ascii_lowercase())
}

/// `uri` for messages: user information and (except for `nfs://`, whose query holds options)
/// the query and the fragment are left out, since they may hold credentials or signatures
/// (shown as `?…`, or `#…` where the fragment comes first).
/// Works on any string (a URI that does not parse is redacted all the same).
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme) = scheme_of(uri) else {
        return uri.to_string();
    };
    let (head, rest) = uri.split_at(uri.find("://").map_or(0, |i| i + 3));
    // What one pass leaves can read as user information again (`s3://@x./@h`, or a password
    // holding both '@' and '/': `s3://us@er:pa/ss@h`, whose first pass kept `er:pa/ss@h`):
    // strip until nothing more goes, so that a redacted URI is its own redaction and no part
    // of such a password survives. Each pass removes at least one '@'.
    let mut rest = rest;
    loop {
        let next = strip_user_info(rest);
        if next.len() == rest.len() {
            break;
        }
        rest = next;
    }
    if scheme == "file" {
        // A path: its '?' and '#' belong to file names.
        return format!("{head}{rest}");
    }
    let (path, query) = match rest.find(['?', '#']) {
        Some(q) => rest.split_at(q),
        None => (rest, ""),
    };
    // What is left out keeps its mark: a fragment (`#` before any `?`) is shown as `#…`, not as
    // a query the user never wrote.
    let query = if query.is_empty() || scheme == "nfs" {
        query
    } else if query.starts_with('#') {
        "#…"
    } else {
        "?…"
    };
    format!("{head}{path}{query}")
}

/// One pass of user-information removal over `rest` (a URI after its `scheme://`): what follows
/// the user information, or `rest` itself when there is none.
fn strip_user_info(rest: &str) -> &str {
    // User information first, over the whole authority as far as the first '/': a password
    // holding '?' or '#' (a URL that does not parse) must not survive as the "query".
    let host_end = rest.find('/').unwrap_or(rest.len());
    // Where the authority ends for a URL that parses: the first '/', '?' or '#'.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        // No '@' before the first '/', and the authority is no `host[:port]` (`user:pa` of
        // `user:pa/ss@host`): a password holding '/' (AWS secret keys and base64 tokens do)
        // cut it short, and the URL does not parse. Everything up to the last '@' before the
        // query goes (the last '@' at all when the password holds '?' or '#' too).
        None if !plain_authority(&rest[..auth_end]) => {
            let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
            match rest[..query_at].rfind('@').or_else(|| rest.rfind('@')) {
                Some(at) => &rest[at + 1..],
                None => rest,
            }
        }
        None => rest,
    }
}

/// Whether `a` (the authority of a URL without user information) reads as `host[:port]`: a
/// host name (internationalized ones too), an IPv4 address or a bracketed IPv6 one (with a
/// zone), and a port of digits.
fn plain_authority(a: &str) -> bool {
    let (host, port) = match a.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, after))
                if !ip.is_empty()
                    && ip
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ":.%-_~".contains(c)) =>
            {
                match after {
                    "" => return true,
                    p => ("x", p.strip_prefix(':').unwrap_or("x")),
                }
            }
            _ => return false,
        },
        None => match a.split_once(':') {
            Some((h, p)) => (h, p),
            None => (a, "0"),
        },
    };
    host.chars()
        .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || "-._~%!$&'()*+,;=".contains(c))
        && port.chars().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_left_out_of_locations() {
        let cases = [
            (
                "https://user:pw@h:8443/d/m.safetensors?X-Amz-Signature=abc#frag",
                "https://h:8443/d/m.safetensors?…",
            ),
            ("http://h/a@b/x.json", "http://h/a@b/x.json"),
            (
                "nfs://h/e/m?uid=0&nconnect=8",
                "nfs://h/e/m?uid=0&nconnect=8",
            ),
            ("s3://b/k", "s3://b/k"),
            ("/local/we?rd@x.json", "/local/we?rd@x.json"),
            ("file:///a?b", "file:///a?b"),
            ("file://u:pw@host/a@b?c", "file://host/a@b?c"),
            ("file:///u:pw@host/x", "file:///u:pw@host/x"),
            ("cuda:0", "cuda:0"),
            // A password holding '?' or '#' (the URL does not parse): still left out.
            ("https://user:p#ss@h/m", "https://h/m"),
            ("https://user:p?ss@h:99999/m?sig=x", "https://h:99999/m?…"),
            // A password holding '/' (the URL does not parse either).
            (
                "http://user:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@127.0.0.1:18081/m.safetensors",
                "http://127.0.0.1:18081/m.safetensors",
            ),
            ("https://:tok/en@h/m?x", "https://h/m?…"),
            ("https://user:pa/ss@[::1]:9/m", "https://[::1]:9/m"),
            // '@' in the path of a URL whose authority is plain stays.
            ("http://[::1]:80/a@b", "http://[::1]:80/a@b"),
            ("http://h:8080/a@b", "http://h:8080/a@b"),
            // Legitimate URLs with an '@' later on keep their host.
            ("http://bücher.example/a@b/m", "http://bücher.example/a@b/m"),
            ("http://[fe80::1%25eth0]:80/a@b", "http://[fe80::1%25eth0]:80/a@b"),
            ("https://h?email=a/b@c.com", "https://h?…"),
            ("https://h#x/y@z", "https://h#…"),
            ("s3://b/k#v2", "s3://b/k#…"),
            ("https://h/m#a?sig=x", "https://h/m#…"),
            ("https://h/m?sig=x#a", "https://h/m?…"),
            // A password holding '/', and an '@' in the query: the host is the one after the
            // password, not the query's.
            ("https://user:pa/ss@h/m?sig=a@b", "https://h/m?…"),
            // ... holding '?' and '/' too.
            ("https://u:p?x/y@h/m", "https://h/m"),
        ];
        for (uri, want) in cases {
            assert_eq!(redact_uri(uri), want, "{uri}");
            assert_eq!(redact_uri(want), want, "not idempotent: {want}");
        }
        let e = crate::Error::invalid("x").with_location("http://u:secret@h/m?sig=s3cret");
        let shown = e.to_string();
        assert!(
            !shown.contains("secret") && shown.contains("http://h/m?…"),
            "{shown}"
        );
    }

    #[test]
    fn redaction_strips_what_one_pass_leaves_looking_like_user_info() {
        // Found by the remote_fields fuzz target: an empty user information before a host that
        // is no `host[:port]`, then an '@' in the path. One pass kept `\0372./@…`, which a
        // second pass cut to what follows its last '@': redaction was not idempotent.
        let cases = [
            ("s1://@\x00372./@\x18\x18\x18", "s1://\x18\x18\x18"),
            // A password holding '@' and '/': one pass kept "er:pa/ss@h/m", its end.
            ("s3://us@er:pa/ss@h/m", "s3://h/m"),
            ("https://us@er:pa/ss@h/m?sig=x", "https://h/m?…"),
            (
                "nfs://us@er:pa/ss@h/e/m?nconnect=4",
                "nfs://h/e/m?nconnect=4",
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(redact_uri(uri), want, "{uri:?}");
            assert_eq!(redact_uri(want), want, "not idempotent: {want:?}");
        }
    }
}
