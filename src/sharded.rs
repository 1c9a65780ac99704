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

/// Largest index file read (real ones are kilobytes to a few MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The file `Loader::new(dir)` looks for in a local directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One shard: the URI it is read from and the tensors the index places in it.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Where it is read from (beside the index).
    pub uri: String,
    /// Names of the tensors the index places in this shard.
    pub names: Arc<HashSet<String>>,
}

/// A parsed index: its URI and its shards, in file-name order.
#[derive(Debug, Clone)]
pub struct ShardMap {
    /// The index file's URI.
    pub index_uri: String,
    /// Shards, sorted by file name (`model-00001-of-00004…` first).
    pub shards: Vec<Shard>,
    /// Tensors the index lists.
    pub tensors: usize,
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

/// True when `uri` names an index file (`….index.json`).
pub fn is_index_uri(uri: &str) -> bool {
    split_query(uri).0.ends_with(".index.json")
}

/// The URI of `file` beside `index_uri` (same directory; a remote URI keeps its query, which
/// holds backend options such as NFS's `nconnect`).
pub fn sibling(index_uri: &str, file: &str) -> String {
    let (path, query) = split_query(index_uri);
    // For remote URIs the directory part never reaches into `scheme://`.
    let floor = path.find("://").map_or(0, |i| i + 3);
    match path[floor..].rfind('/') {
        Some(i) => format!("{}{file}{query}", &path[..floor + i + 1]),
        None if floor > 0 => format!("{path}/{file}{query}"),
        None => format!("{file}{query}"),
    }
}

/// Checks a shard file name taken from an index: a plain file name of safe characters.
fn check_file_name(index_uri: &str, tensor: &str, file: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::corrupt(format!(
            "the index places tensor {tensor:?} in {file:?}, which {why} (shards must be plain \
             file names beside the index)"
        ))
        .with_location(index_uri)
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
    Ok(())
}

/// Parses an index file's bytes.
pub fn parse_index(index_uri: &str, bytes: &[u8]) -> Result<ShardMap> {
    let corrupt = |m: String| Error::corrupt(m).with_location(index_uri);
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        corrupt(format!(
            "the sharded-checkpoint index is not valid JSON: {e}"
        ))
    })?;
    let map = v
        .as_object()
        .ok_or_else(|| corrupt("the sharded-checkpoint index is not a JSON object".into()))?
        .get("weight_map")
        .ok_or_else(|| {
            corrupt("the sharded-checkpoint index has no \"weight_map\" (tensor → file)".into())
        })?
        .as_object()
        .ok_or_else(|| corrupt("\"weight_map\" is not a JSON object".into()))?;
    if map.is_empty() {
        return Err(corrupt("\"weight_map\" lists no tensors".into()));
    }
    let mut by_file: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            corrupt(format!(
                "\"weight_map\" entry {name:?} is {file}, not a file name string"
            ))
        })?;
        check_file_name(index_uri, name, file)?;
        by_file.entry(file).or_default().insert(name.clone());
    }
    let shards = by_file
        .into_iter()
        .map(|(file, names)| Shard {
            uri: sibling(index_uri, file),
            names: Arc::new(names),
        })
        .collect();
    Ok(ShardMap {
        index_uri: index_uri.to_string(),
        shards,
        tensors: map.len(),
    })
}

/// Reads and parses the index at `uri` through its backend.
pub fn read_index(uri: &str, open: &OpenOptions) -> Result<ShardMap> {
    let be = tensorstream_backends::open(uri, open)?;
    let meta = be.stat()?;
    if meta.size > MAX_INDEX_BYTES {
        return Err(Error::corrupt(format!(
            "the sharded-checkpoint index is {} bytes; at most {MAX_INDEX_BYTES} are read",
            meta.size
        ))
        .with_location(uri));
    }
    // Fits: at most 64 MiB.
    let bytes = be.read_exact_at(0, meta.size as usize)?;
    parse_index(uri, &bytes)
}

/// Resolves what `uri` names. A `….index.json` URI (any backend) is a sharded checkpoint. A
/// local directory is resolved to the `model.safetensors.index.json` in it, else its only
/// `*.index.json`, else its only model file (`*.safetensors` or `*.tensors`); anything else is
/// one file, opened as is.
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
        if name.ends_with(".safetensors.index.json") {
            indexes.push(name);
        } else if name.ends_with(".safetensors") || name.ends_with(".tensors") {
            models.push(name);
        }
    }
    indexes.sort();
    models.sort();
    let path_of = |name: &str| dir.join(name).display().to_string();
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
            (
                "nfs://h/export/m/x.index.json?nconnect=8",
                "nfs://h/export/m/a.safetensors?nconnect=8",
            ),
            // A `/` inside the query is not the directory.
            (
                "http://h/d/x.index.json?p=a/b",
                "http://h/d/a.safetensors?p=a/b",
            ),
            // A local file name may contain `?`.
            ("/m/we?rd/x.index.json", "/m/we?rd/a.safetensors"),
        ];
        for (index, want) in cases {
            assert_eq!(sibling(index, "a.safetensors"), want, "{index}");
        }
        assert!(is_index_uri("http://h/x.safetensors.index.json?sig=1"));
        assert!(!is_index_uri("http://h/x.safetensors?f=.index.json"));
        assert!(is_index_uri("/m/x.index.json"));
    }

    #[test]
    fn parses_a_weight_map() {
        let j = br#"{"metadata": {"total_size": 12},
            "weight_map": {"b": "model-00002-of-00002.safetensors",
                           "a": "model-00001-of-00002.safetensors",
                           "c": "model-00001-of-00002.safetensors"}}"#;
        let m = parse_index("/m/model.safetensors.index.json", j).unwrap();
        assert_eq!(m.tensors, 3);
        let uris: Vec<_> = m.shards.iter().map(|s| s.uri.as_str()).collect();
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
        let cases: [(&[u8], &str); 11] = [
            (b"", "not valid JSON"),
            (b"[1]", "not a JSON object"),
            (b"{\"metadata\": {}}", "no \"weight_map\""),
            (b"{\"weight_map\": []}", "not a JSON object"),
            (b"{\"weight_map\": {}}", "lists no tensors"),
            (b"{\"weight_map\": {\"a\": 3}}", "not a file name string"),
            (
                b"{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
                "contains '/'",
            ),
            (
                b"{\"weight_map\": {\"a\": \"/etc/passwd\"}}",
                "contains '/'",
            ),
            (b"{\"weight_map\": {\"a\": \"..\"}}", "is not a file name"),
            (b"{\"weight_map\": {\"a\": \"x?y=1\"}}", "contains '?'"),
            (b"{\"weight_map\": {\"a\": \"\"}}", "is empty"),
        ];
        for (bytes, want) in cases {
            let e = parse_index("/m/i.index.json", bytes).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains(want), "{want:?} not in {e}");
            assert_eq!(e.location(), Some("/m/i.index.json"));
        }
        let long = format!("{{\"weight_map\": {{\"a\": \"{}\"}}}}", "x".repeat(256));
        let e = parse_index("/m/i.index.json", long.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("longer than 255"), "{e}");
    }
}
