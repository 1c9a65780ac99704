//! A sharded checkpoint's `*.index.json` from arbitrary bytes: never panics, a parsed index
//! lists every tensor once, and every shard it names resolves beside the index (never into
//! another directory, host or scheme).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream::fuzzing::{parse_index, sibling};

const INDEXES: [&str; 5] = [
    "/models/m/model.safetensors.index.json",
    "model.safetensors.index.json",
    "https://user:pw@host:8443/m/model.safetensors.index.json?sig=x",
    "s3://bucket/deep/key/model.safetensors.index.json",
    "nfs://server/export/m/model.safetensors.index.json?nconnect=4",
];

fuzz_target!(|input: (u8, &[u8])| {
    let (which, bytes) = input;
    let index = INDEXES[usize::from(which) % INDEXES.len()];
    let Ok(map) = parse_index(index, bytes) else {
        return;
    };
    let listed: usize = map.shards.iter().map(|s| s.names.len()).sum();
    assert_eq!(listed, map.tensors);
    let dir = index.rfind('/').map_or("", |i| &index[..=i]);
    for s in &map.shards {
        let uri = sibling(index, &s.file);
        assert!(
            uri.starts_with(dir) && !uri[dir.len()..].contains('/'),
            "{index} + {:?} -> {uri}",
            s.file
        );
    }
});
