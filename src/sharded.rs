//! Sharded checkpoints: a `*.safetensors.index.json` (Hugging Face layout: `{"metadata": {…},
//! "weight_map": {"tensor name": "shard file name", …}}`) and the shard files it names, which
//! live beside it (same directory, bucket prefix or URL path).
//!
//! The index is untrusted input like any file header: it is size-capped before it is read, and
//! every shard name must be a plain file name (no path separators, no `..`, no characters that
//! would change a URL's meaning), so a hostile index cannot point a load at another directory,
//! host or query.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tensorstream_backends::OpenOptions;
use tensorstream_engine::{BackendExt, Error, ErrorKind, Result};

/// Largest index file read (real ones are kilobytes to a few MiB: about 9 MB for a model of
/// 90,000 tensors); a larger one is refused.
pub const MAX_INDEX_BYTES: u64 = 32 << 20;

/// The file `Loader::new(dir)` looks for in a local directory (after `model.safetensors`).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Longest name or file name quoted in full in a message.
const QUOTE_MAX: usize = 200;

/// One shard: its file name and the tensors the index places in it.
#[derive(Debug, Clone)]
pub struct Shard {
    /// File name as written in the index (the URI is built from it when needed).
    pub file: String,
    /// Names of the tensors the index places in this shard.
    pub names: Arc<HashSet<String>>,
}

/// A parsed index: its URI and its shards, in file-name order. (`Debug` shows the URI without
/// its secrets, as messages do.)
#[derive(Clone)]
pub struct ShardMap {
    /// The index file's URI.
    pub index_uri: String,
    /// Shards, sorted by file name (`model-00001-of-00004…` first).
    pub shards: Vec<Shard>,
    /// Tensors the index lists.
    pub tensors: usize,
}

impl std::fmt::Debug for ShardMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMap")
            .field("index_uri", &redact(&self.index_uri))
            .field("shards", &self.shards)
            .field("tensors", &self.tensors)
            .finish()
    }
}

impl ShardMap {
    /// Where `shard` is read from.
    pub fn uri_of(&self, shard: &Shard) -> String {
        sibling(&self.index_uri, &shard.file)
    }
}

/// What a URI names: one file, or a sharded checkpoint.
#[derive(Debug)]
pub enum Source {
    /// One model file (possibly found in a directory given as the URI).
    File(String),
    /// A sharded checkpoint.
    Sharded(ShardMap),
}

/// Part of a URI before its query, for the schemes where `?` starts one (a local path may
/// contain `?` in a file name).
fn split_query(uri: &str) -> (&str, &str) {
    match tensorstream_backends::scheme_of(uri).as_deref() {
        None | Some("file") => (uri, ""),
        Some(_) => match uri.find('?') {
            Some(q) => (&uri[..q], &uri[q..]),
            None => (uri, ""),
        },
    }
}

/// True when `uri` names an index file: `….index.json`, or a variant such as
/// `model.safetensors.index.fp16.json`.
pub fn is_index_uri(uri: &str) -> bool {
    let path = split_query(uri).0;
    let name = path.rsplit('/').next().unwrap_or(path);
    name.ends_with(".index.json")
        || (name.contains(".safetensors.index.") && name.ends_with(".json"))
}

/// The URI of `file` beside `index_uri` (same directory). An `nfs://` URI keeps its query (it
/// holds the backend's options, such as `nconnect`); other URIs do not (an HTTP or S3 query is
/// usually one object's signature).
pub fn sibling(index_uri: &str, file: &str) -> String {
    let scheme = tensorstream_backends::scheme_of(index_uri);
    let (path, query) = split_query(index_uri);
    let query = match scheme.as_deref() {
        Some("nfs") => query,
        _ => "",
    };
    // For URIs the directory part never reaches into `scheme://`; a plain path is all path
    // (a `://` in it belongs to a directory name).
    let floor = match scheme {
        Some(_) => path.find("://").map_or(0, |i| i + 3),
        None => 0,
    };
    match path[floor..].rfind('/') {
        Some(i) => format!("{}{file}{query}", &path[..floor + i + 1]),
        None if floor > 0 => format!("{path}/{file}{query}"),
        None => format!("{file}{query}"),
    }
}

/// A URI for messages: user information and (except for `nfs://`, whose query holds options)
/// the query are left out, since they may hold credentials or signatures.
pub fn redact(uri: &str) -> String {
    tensorstream_backends::redact_uri(uri)
}

/// `s` quoted for a message, cut to [`QUOTE_MAX`] characters.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// Checks a shard file name taken from an index: a plain file name of safe characters, of a
/// format this crate reads.
fn check_file_name(index_uri: &str, tensor: &str, file: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::corrupt(format!(
            "the index places tensor {} in {}, which {why} (shards must be plain file names \
             beside the index)",
            quote(tensor),
            quote(file)
        ))
        .with_location(redact(index_uri))
    };
    if file.is_empty() {
        return Err(bad("is empty"));
    }
    if file.len() > 255 {
        return Err(bad("is longer than 255 bytes"));
    }
    if file == "." || file == ".." {
        return Err(bad("is not a file name"));
    }
    if let Some(c) = file
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-_.+=@,".contains(c)))
    {
        return Err(bad(&format!(
            "contains {c:?} (allowed: letters, digits and - _ . + = @ ,)"
        )));
    }
    if !(file.ends_with(".safetensors") || file.ends_with(".tensors")) {
        let hint = if file.ends_with(".bin") {
            " (PyTorch .bin shards are not: convert them to safetensors)"
        } else {
            ""
        };
        return Err(Error::unsupported(format!(
            "the index places tensor {} in {}: only safetensors (and tensorizer) shards are \
             read{hint}",
            quote(tensor),
            quote(file)
        ))
        .with_location(redact(index_uri)));
    }
    Ok(())
}

/// The index file's shape: only `weight_map` is read (`metadata` and anything else ignored).
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: StrictMap,
}

/// A JSON object of strings whose keys appear once (a key given twice is an error, not "the
/// last one wins").
struct StrictMap(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for StrictMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrictMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StrictMap, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor {} is listed twice",
                            quote(&k)
                        )));
                    }
                    let v: String = map.next_value().map_err(|e| {
                        serde::de::Error::custom(format!("entry {}: {e}", quote(&k)))
                    })?;
                    out.push((k, v));
                }
                Ok(StrictMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses an index file's bytes.
pub fn parse_index(index_uri: &str, bytes: &[u8]) -> Result<ShardMap> {
    // (serde's own words for another JSON value name its internal struct.)
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(Error::corrupt(
            "not a sharded-checkpoint index: a JSON object with a \"weight_map\" was expected",
        )
        .with_location(redact(index_uri)));
    }
    let parsed: IndexFile = serde_json::from_slice(bytes).map_err(|e| {
        Error::corrupt(format!(
            "not a sharded-checkpoint index (\"weight_map\"): {e}"
        ))
        .with_location(redact(index_uri))
    })?;
    let map = parsed.weight_map.0;
    if map.is_empty() {
        return Err(
            Error::corrupt("\"weight_map\" lists no tensors").with_location(redact(index_uri))
        );
    }
    let tensors = map.len();
    let mut by_file: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for (name, file) in map {
        check_file_name(index_uri, &name, &file)?;
        by_file.entry(file).or_default().insert(name);
    }
    let shards = by_file
        .into_iter()
        .map(|(file, names)| Shard {
            file,
            names: Arc::new(names),
        })
        .collect();
    Ok(ShardMap {
        index_uri: index_uri.to_string(),
        shards,
        tensors,
    })
}

/// Reads and parses the index at `uri` through its backend.
pub fn read_index(uri: &str, open: &OpenOptions) -> Result<ShardMap> {
    let (be, meta) = tensorstream_backends::open_stat(uri, open)?;
    if meta.size > MAX_INDEX_BYTES {
        return Err(Error::corrupt(format!(
            "the sharded-checkpoint index is {} bytes; larger than {MAX_INDEX_BYTES} is refused",
            meta.size
        ))
        .with_location(redact(uri)));
    }
    // Fits: at most 64 MiB.
    let bytes = be.read_exact_at(0, meta.size as usize)?;
    parse_index(uri, &bytes)
}

/// Resolves what `uri` names. An index URI (`….index.json`, any backend) is a sharded
/// checkpoint. A local directory is resolved as `transformers` does: its `model.safetensors`,
/// else its `model.safetensors.index.json`, else its only `*.safetensors.index*.json` (or
/// `*.tensors.index*.json`; other indexes, such as `pytorch_model.bin.index.json`, are not
/// counted), else its only model file (`*.safetensors` or `*.tensors`); anything else is one
/// file, opened as is.
pub fn resolve(uri: &str, open: &OpenOptions) -> Result<Source> {
    if is_index_uri(uri) {
        return read_index(uri, open).map(Source::Sharded);
    }
    let local = match tensorstream_backends::scheme_of(uri).as_deref() {
        None | Some("file") => tensorstream_backends::local_path(uri)?,
        _ => return Ok(Source::File(uri.to_string())),
    };
    let dir = std::path::Path::new(local);
    if !dir.is_dir() {
        return Ok(Source::File(uri.to_string()));
    }
    let listing_error = |e: std::io::Error| {
        Error::from_io(e, "listing the directory").with_location(dir.display().to_string())
    };
    let mut indexes = Vec::new();
    let mut models = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(listing_error)? {
        let entry = entry.map_err(listing_error)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only indexes of safetensors / tensorizer shards: a `pytorch_model.bin.index.json`
        // beside them is another copy of the weights in a format this crate does not read.
        if is_index_uri(&name)
            && (name.contains(".safetensors.index.") || name.contains(".tensors.index."))
        {
            indexes.push(name);
        } else if name.ends_with(".safetensors") || name.ends_with(".tensors") {
            models.push(name);
        }
    }
    indexes.sort();
    models.sort();
    let path_of = |name: &str| dir.join(name).display().to_string();
    if models.iter().any(|n| n == "model.safetensors") {
        return Ok(Source::File(path_of("model.safetensors")));
    }
    if indexes.iter().any(|n| n == INDEX_FILE) {
        return read_index(&path_of(INDEX_FILE), open).map(Source::Sharded);
    }
    match (indexes.as_slice(), models.as_slice()) {
        ([one], _) => read_index(&path_of(one), open).map(Source::Sharded),
        ([], [one]) => Ok(Source::File(path_of(one))),
        ([], []) => Err(Error::new(
            ErrorKind::NotFound,
            "the directory holds no model: no *.safetensors.index.json, *.safetensors or \
             *.tensors file",
        )
        .with_location(dir.display().to_string())),
        ([], many) => Err(Error::invalid(format!(
            "the directory holds {} model files ({}) and no {INDEX_FILE}: name the file to load",
            many.len(),
            abbreviate(many)
        ))
        .with_location(dir.display().to_string())),
        (many, _) => Err(Error::invalid(format!(
            "the directory holds {} index files ({}) and no {INDEX_FILE}: name the index to load",
            many.len(),
            abbreviate(many)
        ))
        .with_location(dir.display().to_string())),
    }
}

/// The first few names of a list, for a message.
fn abbreviate(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(4)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 4 {
        s.push_str(&format!(", … {} more", names.len() - 4));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siblings_stay_beside_the_index() {
        let cases = [
            ("/m/model.safetensors.index.json", "/m/a.safetensors"),
            ("m.index.json", "a.safetensors"),
            ("dir/m.index.json", "dir/a.safetensors"),
            ("file:///m/x.index.json", "file:///m/a.safetensors"),
            (
                "http://h:8080/r/main/x.index.json",
                "http://h:8080/r/main/a.safetensors",
            ),
            ("s3://bucket/x.index.json", "s3://bucket/a.safetensors"),
            // NFS options apply to every shard …
            (
                "nfs://h/export/m/x.index.json?nconnect=8",
                "nfs://h/export/m/a.safetensors?nconnect=8",
            ),
            // … an HTTP query (a signature, usually) belongs to the index alone; a `/` inside
            // it is not the directory.
            ("http://h/d/x.index.json?p=a/b", "http://h/d/a.safetensors"),
            (
                "s3://b/d/x.index.json?versionId=3",
                "s3://b/d/a.safetensors",
            ),
            // A local file name may contain `?`, and a directory name may end in `:`.
            ("/m/we?rd/x.index.json", "/m/we?rd/a.safetensors"),
            ("/m/a://x.index.json", "/m/a://a.safetensors"),
            ("a:/x.index.json", "a:/a.safetensors"),
        ];
        for (index, want) in cases {
            assert_eq!(sibling(index, "a.safetensors"), want, "{index}");
        }
        assert!(is_index_uri("http://h/x.safetensors.index.json?sig=1"));
        assert!(!is_index_uri("http://h/x.safetensors?f=.index.json"));
        assert!(is_index_uri("/m/x.index.json"));
        assert!(is_index_uri("/m/model.safetensors.index.fp16.json"));
        assert!(!is_index_uri("/m/config.json"));
        assert!(!is_index_uri("/m.safetensors.index.d/config.json"));
    }

    #[test]
    fn messages_leave_credentials_out() {
        let cases = [
            (
                "https://user:pw@h/d/x.index.json?X-Amz-Signature=abc",
                "https://h/d/x.index.json?…",
            ),
            ("http://h/a@b/x.json", "http://h/a@b/x.json"),
            (
                "nfs://h/e/x.index.json?uid=0",
                "nfs://h/e/x.index.json?uid=0",
            ),
            ("/local/we?rd.json", "/local/we?rd.json"),
            ("s3://b/k.index.json", "s3://b/k.index.json"),
        ];
        for (uri, want) in cases {
            assert_eq!(redact(uri), want, "{uri}");
        }
        let long = "n".repeat(1000);
        let q = quote(&long);
        assert!(q.len() < 260 && q.contains("(1000 bytes)"), "{q}");
    }

    #[test]
    fn parses_a_weight_map() {
        let j = br#"{"metadata": {"total_size": 12},
            "weight_map": {"b": "model-00002-of-00002.safetensors",
                           "a": "model-00001-of-00002.safetensors",
                           "c": "model-00001-of-00002.safetensors"}}"#;
        let m = parse_index("/m/model.safetensors.index.json", j).unwrap();
        assert_eq!(m.tensors, 3);
        let uris: Vec<_> = m.shards.iter().map(|s| m.uri_of(s)).collect();
        assert_eq!(
            uris,
            [
                "/m/model-00001-of-00002.safetensors",
                "/m/model-00002-of-00002.safetensors"
            ]
        );
        let mut first: Vec<_> = m.shards[0].names.iter().cloned().collect();
        first.sort();
        assert_eq!(first, ["a", "c"]);
        assert!(m.shards[1].names.contains("b"));
    }

    #[test]
    fn refuses_hostile_or_malformed_indexes() {
        let cases: [(&[u8], ErrorKind, &str); 14] = [
            (b"", ErrorKind::Corrupt, "EOF"),
            (b"[1]", ErrorKind::Corrupt, "not a sharded-checkpoint index"),
            (
                b"{\"metadata\": {}}",
                ErrorKind::Corrupt,
                "missing field `weight_map`",
            ),
            (
                b"{\"weight_map\": []}",
                ErrorKind::Corrupt,
                "an object mapping",
            ),
            (
                b"{\"weight_map\": {}}",
                ErrorKind::Corrupt,
                "lists no tensors",
            ),
            (
                b"{\"weight_map\": {\"a\": 3}}",
                ErrorKind::Corrupt,
                "entry \"a\"",
            ),
            (
                b"{\"weight_map\": {\"a\": \"x.safetensors\", \"a\": \"y.safetensors\"}}",
                ErrorKind::Corrupt,
                "tensor \"a\" is listed twice",
            ),
            (
                b"{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
                ErrorKind::Corrupt,
                "contains '/'",
            ),
            (
                b"{\"weight_map\": {\"a\": \"/etc/passwd\"}}",
                ErrorKind::Corrupt,
                "contains '/'",
            ),
            (
                b"{\"weight_map\": {\"a\": \"..\"}}",
                ErrorKind::Corrupt,
                "is not a file name",
            ),
            (
                b"{\"weight_map\": {\"a\": \"x?y=1\"}}",
                ErrorKind::Corrupt,
                "contains '?'",
            ),
            (
                b"{\"weight_map\": {\"a\": \"\"}}",
                ErrorKind::Corrupt,
                "is empty",
            ),
            (
                b"{\"weight_map\": {\"a\": \"pytorch_model-00001-of-00002.bin\"}}",
                ErrorKind::Unsupported,
                "PyTorch .bin shards are not",
            ),
            (
                b" []",
                ErrorKind::Corrupt,
                "a JSON object with a \"weight_map\"",
            ),
        ];
        for (bytes, kind, want) in cases {
            let e = parse_index("/m/i.index.json", bytes).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(want), "{want:?} not in {e}");
            assert_eq!(e.location(), Some("/m/i.index.json"));
        }
        // The hint about .bin shards only for a .bin shard.
        let e = parse_index(
            "/m/i.index.json",
            br#"{"weight_map": {"a": "model.safetensors.index.json"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("shards are read"), "{e}");
        let long = format!("{{\"weight_map\": {{\"a\": \"{}\"}}}}", "x".repeat(256));
        let e = parse_index("/m/i.index.json", long.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("longer than 255"), "{e}");
        // A huge value is not echoed into the message.
        let huge = format!("{{\"weight_map\": {{\"a\": [{}1]}}}}", "1,".repeat(100_000));
        let e = parse_index("/m/i.index.json", huge.as_bytes()).unwrap_err();
        assert!(e.to_string().len() < 500, "{} bytes", e.to_string().len());
    }
}
