//! `inspect` of a sharded checkpoint of password-encrypted tensorizer shards: each shard's key
//! is derived (Argon2id, up to 4 GiB of memory each) to check the password, and the shards'
//! headers are read several at a time. The derivations must not all run at once: the peak
//! memory of an inspect is one derivation's, not eight. Alone in its test binary, since the
//! peak RSS is process-wide.

#[path = "support/checkpoint.rs"]
mod checkpoint;

use tensorstream::engine::format::convert::{convert, ConvertOptions};
use tensorstream::engine::Backend;
use tensorstream::{KeySource, Loader};

#[test]
fn inspect_derives_one_shard_key_at_a_time() {
    const SHARDS: usize = 8;
    const MEMLIMIT: u64 = 48 << 20;
    let dir = tempfile::tempdir().unwrap();
    let sizes: Vec<&[usize]> = vec![&[4096, 100]; SHARDS];
    let mut want = checkpoint::write(dir.path(), &sizes, 31);
    let password = KeySource::password(b"correct horse").unwrap();
    for k in 1..=SHARDS {
        let st = dir.path().join(checkpoint::shard_name(k, SHARDS));
        let tz = dir.path().join(format!("part-{k}.tensors"));
        let be = tensorstream::backends::open(
            &st.display().to_string(),
            &tensorstream::OpenOptions::default(),
        )
        .unwrap();
        let opts = ConvertOptions {
            encrypt: Some(password.clone()),
            pwhash_limits: (1, MEMLIMIT),
            ..ConvertOptions::default()
        };
        convert(be.as_ref() as &dyn Backend, &tz, &opts).unwrap();
        std::fs::remove_file(&st).unwrap();
        let old = checkpoint::shard_name(k, SHARDS);
        for w in want.iter_mut().filter(|w| w.file == old) {
            w.file = format!("part-{k}.tensors");
        }
    }
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want);
    let uri = dir.path().display().to_string();
    // Warm up (thread stacks, the allocator's arenas), then measure.
    Loader::new(&uri).key(password.clone()).inspect().unwrap();
    assert!(tensorstream::reset_peak_rss(), "clear_refs refused");
    let before = tensorstream::peak_rss_bytes().unwrap();
    let index = Loader::new(&uri).key(password).inspect().unwrap();
    assert_eq!(index.tensors.len(), want.len());
    let grew = tensorstream::peak_rss_bytes()
        .unwrap()
        .saturating_sub(before);
    // One derivation at a time: about MEMLIMIT (the allocator may keep one block around);
    // all at once: SHARDS × MEMLIMIT.
    assert!(
        grew < 3 * MEMLIMIT,
        "peak grew by {} MiB: {} key derivations of {} MiB ran at once",
        grew >> 20,
        grew / MEMLIMIT,
        MEMLIMIT >> 20
    );
}
