//! The CLI on tensorizer files: every fixture's digests match the manifest (plain, --verify,
//! decrypted by key file, password file or TENSORSTREAM_PASSWORD), `convert` round trips, and
//! hostile input gives one-line errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensorstream"));
    c.env_remove("TENSORSTREAM_PASSWORD");
    c
}

fn fixtures() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures"));
    assert!(
        p.join("manifest.json").exists(),
        "fixtures not found at {} (shared/ must sit beside the checkout)",
        p.display()
    );
    p
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
        .unwrap()
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn ok(cmd: &mut Command) -> String {
    let (s, o, e) = run(cmd);
    assert!(s, "{cmd:?} failed: {e}");
    o
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail with 1");
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line error expected: {e}");
    e
}

fn display_name(n: &str) -> String {
    if n.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(n).unwrap();
        v.iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| c.to_string())
            })
            .collect::<Vec<_>>()
            .join(".")
    } else {
        n.to_string()
    }
}

/// Key / password arguments for a manifest entry, written into `dir`.
fn secret_args(entry: &Value, dir: &Path) -> Vec<String> {
    let enc = &entry["encryption"];
    if let Some(h) = enc["key_hex"].as_str() {
        let p = dir.join("key.hex");
        std::fs::write(&p, format!("{h}\n")).unwrap();
        return vec!["--key-file".into(), p.to_str().unwrap().into()];
    }
    if let Some(pw) = enc["password"].as_str() {
        let p = dir.join("password.txt");
        std::fs::write(&p, format!("{pw}\n")).unwrap();
        return vec!["--password-file".into(), p.to_str().unwrap().into()];
    }
    vec![]
}

fn check_digests(file: &str, entry: &Value, out: &str) {
    let v: Value = serde_json::from_str(out).unwrap();
    assert_eq!(v["format"], entry["format"], "{file}");
    let got = v["tensors"].as_array().unwrap();
    let want = entry["tensors"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{file}");
    for w in want {
        let name = display_name(w["name"].as_str().unwrap());
        let g = got
            .iter()
            .find(|g| g["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{file}: tensor {name} missing"));
        assert_eq!(g["sha256"], w["sha256"], "{file}/{name}");
        assert_eq!(g["shape"], w["shape"], "{file}/{name}");
        assert_eq!(g["nbytes"], w["nbytes"], "{file}/{name}");
    }
}

fn entries(format: Option<&str>) -> Vec<(String, Value)> {
    manifest()["files"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| format.is_none_or(|f| v["format"] == f))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn every_tensorizer_fixture_loads_with_manifest_digests() {
    let dir = tempfile::tempdir().unwrap();
    let all = entries(Some("tensorizer"));
    assert!(all.len() >= 6);
    for (file, entry) in all {
        let path = fixtures().join(&file);
        for verify in [false, true] {
            let mut c = bin();
            c.args(["load", path.to_str().unwrap(), "--digests", "--json"]);
            c.args(secret_args(&entry, dir.path()));
            if verify {
                c.arg("--verify");
            }
            check_digests(&file, &entry, &ok(&mut c));
        }
    }
}

#[test]
fn password_from_the_environment_and_inspect_verify() {
    let path = fixtures().join("v3_encrypted_password.tensors");
    let entry = manifest()["files"]["v3_encrypted_password.tensors"].clone();
    let pw = entry["encryption"]["password"].as_str().unwrap();
    let out = ok(bin()
        .args([
            "load",
            path.to_str().unwrap(),
            "--digests",
            "--json",
            "--verify",
        ])
        .env("TENSORSTREAM_PASSWORD", pw));
    check_digests("v3_encrypted_password.tensors", &entry, &out);
    // The variable does not get in the way of unencrypted files.
    ok(bin()
        .args([
            "load",
            fixtures().join("v1_numpy_dtypes.tensors").to_str().unwrap(),
        ])
        .env("TENSORSTREAM_PASSWORD", pw));
    // inspect --verify loads and checks everything, then lists the tensors.
    let out = ok(bin().args([
        "inspect",
        fixtures()
            .join("v2_opaque_dtypes.tensors")
            .to_str()
            .unwrap(),
        "--json",
        "--verify",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["version"], 2);
    let dts: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["dtype"].as_str().unwrap())
        .collect();
    assert_eq!(dts, vec!["bf16", "f8_e4m3", "f8_e5m2", "f16"]);
}

#[test]
fn convert_round_trips_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    for (file, entry) in entries(None) {
        for ext in ["tensors", "safetensors"] {
            let out = dir.path().join(format!("{file}.{ext}"));
            let mut c = bin();
            c.args([
                "convert",
                fixtures().join(&file).to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            c.args(secret_args(&entry, dir.path()));
            let msg = ok(&mut c);
            assert!(msg.contains("converted"), "{msg}");
            let mut l = bin();
            l.args(["load", out.to_str().unwrap(), "--digests", "--json"]);
            if ext == "tensors" {
                l.arg("--verify");
            }
            let mut e = entry.clone();
            e["format"] = Value::from(if ext == "tensors" {
                "tensorizer"
            } else {
                "safetensors"
            });
            check_digests(&file, &e, &ok(&mut l));
        }
    }
    // An encrypted output needs its key to load.
    let key = dir.path().join("out.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let enc = dir.path().join("enc.tensors");
    ok(bin().args([
        "convert",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        enc.to_str().unwrap(),
        "--encrypt-key-file",
        key.to_str().unwrap(),
    ]));
    let e = fails(bin().args(["load", enc.to_str().unwrap()]));
    assert!(e.contains("encrypted"), "{e}");
    let entry = manifest()["files"]["mixed.safetensors"].clone();
    let mut e2 = entry.clone();
    e2["format"] = Value::from("tensorizer");
    let out = ok(bin().args([
        "load",
        enc.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--verify",
        "--digests",
        "--json",
    ]));
    check_digests("enc.tensors", &e2, &out);
    let e = fails(bin().args([
        "convert",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        dir.path().join("x.bin").to_str().unwrap(),
    ]));
    assert!(e.contains(".tensors or .safetensors"), "{e}");
    // Tensor types: safetensors tensors become state-dict entries, or parameters on request.
    for (flag, want) in [(None, "state_dict"), (Some("--as-parameters"), "parameter")] {
        let out = dir.path().join(format!("{want}.tensors"));
        let mut c = bin();
        c.args([
            "convert",
            fixtures().join("mixed.safetensors").to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        c.args(flag);
        ok(&mut c);
        let v: Value = serde_json::from_str(&ok(bin().args([
            "inspect",
            out.to_str().unwrap(),
            "--json",
        ])))
        .unwrap();
        let roles: Vec<&str> = v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["role"].as_str().unwrap())
            .collect();
        assert!(
            !roles.is_empty() && roles.iter().all(|r| *r == want),
            "{roles:?}"
        );
    }
}

#[test]
fn hostile_tensorizer_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = std::fs::read(fixtures().join("v1_numpy_dtypes.tensors")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // Truncated index (file ends inside the 256 KiB index).
    let p = write("trunc_index.tensors", &src[..1000]);
    let e = fails(bin().args(["inspect", p.to_str().unwrap()]));
    assert!(
        e.contains("trunc_index.tensors") && e.contains("past the end"),
        "{e}"
    );
    // Offsets past EOF (data cut off).
    let p = write("trunc_data.tensors", &src[..src.len() - 200]);
    let e = fails(bin().args(["load", p.to_str().unwrap()]));
    assert!(e.contains("past the end of the file"), "{e}");
    // Index length past EOF.
    let mut b = src.clone();
    b[65..73].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let p = write("idxlen.tensors", &b);
    let e = fails(bin().args(["inspect", p.to_str().unwrap()]));
    assert!(e.contains("index length"), "{e}");
    // Wrong magic; unknown version.
    let mut b = src.clone();
    b[1] = b'X';
    let p = write("magic.tensors", &b);
    let e = fails(bin().args(["inspect", p.to_str().unwrap()]));
    assert!(e.contains("magic"), "{e}");
    let mut b = src.clone();
    b[5..9].copy_from_slice(&9u32.to_le_bytes());
    let p = write("version.tensors", &b);
    let e = fails(bin().args(["inspect", p.to_str().unwrap()]));
    assert!(e.contains("data version 9"), "{e}");
    // A key for a file that takes none: refused by inspect as by load.
    let key = write("key.bin", &[7u8; 32]);
    for f in ["v1_numpy_dtypes.tensors", "mixed.safetensors"] {
        let path = fixtures().join(f);
        for cmd in ["inspect", "load"] {
            let e = fails(
                bin()
                    .args([cmd, path.to_str().unwrap(), "--key-file"])
                    .arg(&key),
            );
            assert!(
                e.contains("not encrypted") || e.contains("never encrypted"),
                "{cmd} {f}: {e}"
            );
        }
    }
    // Per-tensor header size that disagrees with the index (caught when headers are read).
    let v: Value = serde_json::from_str(&ok(bin().args([
        "inspect",
        fixtures().join("v1_numpy_dtypes.tensors").to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let first = v["tensors"][0]["offset"].as_u64().unwrap() as usize; // data offset of tensor 0
    let hdr_at = 262_217usize; // first per-tensor header (after the 256 KiB index)
    assert!(first > hdr_at);
    let mut b = src.clone();
    b[hdr_at..hdr_at + 8].copy_from_slice(&12345u64.to_le_bytes());
    let p = write("hdrsize.tensors", &b);
    let e = fails(bin().args(["load", p.to_str().unwrap(), "--verify"]));
    assert!(e.contains("says it is 12345 bytes"), "{e}");
    // One flipped data byte under --verify.
    let mut b = src.clone();
    b[first + 7] ^= 1;
    let p = write("flip.tensors", &b);
    ok(bin().args(["load", p.to_str().unwrap()]));
    let e = fails(bin().args(["load", p.to_str().unwrap(), "--verify"]));
    assert!(e.contains("embed.weight") && e.contains("mismatch"), "{e}");
    // inspect --verify reads and checks the data too (without keeping it).
    ok(bin().args(["inspect", p.to_str().unwrap()]));
    let e = fails(bin().args(["inspect", p.to_str().unwrap(), "--verify"]));
    assert!(e.contains("embed.weight") && e.contains("mismatch"), "{e}");
    // Wrong key and wrong password.
    let key = d.join("wrong.key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    // inspect reads only metadata, but checks a given key on the smallest tensor.
    let enc = fixtures().join("v3_encrypted_key.tensors");
    for cmd in ["load", "inspect"] {
        let e = fails(bin().args([
            cmd,
            enc.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ]));
        assert!(e.contains("wrong key or password"), "{cmd}: {e}");
        if cmd == "inspect" {
            assert!(e.contains("checking the key"), "{e}");
        }
    }
    let pw = d.join("wrong.pw");
    std::fs::write(&pw, "not it").unwrap();
    let e = fails(
        bin().args([
            "load",
            fixtures()
                .join("v3_encrypted_password.tensors")
                .to_str()
                .unwrap(),
            "--password-file",
            pw.to_str().unwrap(),
        ]),
    );
    assert!(e.contains("wrong key or password"), "{e}");
    // A key for a file encrypted with a password: the message says which secret it needs
    // (before: "wrong key or password, or corrupted data").
    let e = fails(
        bin().args([
            "load",
            fixtures()
                .join("v3_encrypted_password.tensors")
                .to_str()
                .unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ]),
    );
    assert!(
        e.contains("encrypted with a password") && e.contains("a raw key was given"),
        "{e}"
    );
    // A wrong password from the environment is caught by inspect too (it checks the key a
    // load would use), while an unencrypted file ignores the variable.
    let e = fails(
        bin()
            .args([
                "inspect",
                fixtures()
                    .join("v3_encrypted_password.tensors")
                    .to_str()
                    .unwrap(),
            ])
            .env("TENSORSTREAM_PASSWORD", "not it"),
    );
    assert!(e.contains("wrong key or password"), "{e}");
    ok(bin()
        .args([
            "inspect",
            fixtures().join("v1_numpy_dtypes.tensors").to_str().unwrap(),
        ])
        .env("TENSORSTREAM_PASSWORD", "not it"));
    // --verify on safetensors is refused (no checksums there).
    let e = fails(bin().args([
        "load",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        "--verify",
    ]));
    assert!(e.contains("no checksums"), "{e}");
}

#[test]
fn inspect_marks_the_manifests_meta_tensors_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut metas = 0;
    for (file, entry) in entries(Some("tensorizer")) {
        let path = fixtures().join(&file);
        let mut c = bin();
        c.args(["inspect", path.to_str().unwrap(), "--json"]);
        c.args(secret_args(&entry, dir.path()));
        let v: Value = serde_json::from_str(&ok(&mut c)).unwrap();
        for w in entry["tensors"].as_array().unwrap() {
            let name = display_name(w["name"].as_str().unwrap());
            let g = v["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["name"] == name.as_str())
                .unwrap_or_else(|| panic!("{file}: no tensor {name}"));
            let meta = w["meta"].as_bool().unwrap();
            metas += usize::from(meta);
            assert_eq!(g["zeros"].as_bool().unwrap_or(false), meta, "{file}/{name}");
        }
    }
    assert!(metas >= 1, "the fixtures have a meta tensor");
}

/// The table's footnote counts the meta tensors in words that fit the count.
#[test]
fn inspect_footnote_counts_one_meta_tensor_in_the_singular() {
    let path = fixtures().join("v4_module_with_meta.tensors");
    let out = ok(bin().args(["inspect", path.to_str().unwrap()]));
    let note = out
        .lines()
        .find(|l| l.starts_with("(zeros):"))
        .unwrap_or_else(|| panic!("no (zeros) footnote: {out}"));
    assert!(
        note.starts_with("(zeros): 1 tensorizer meta tensor stores no bytes"),
        "{note}"
    );
}

/// `convert` checks a tensorizer input's hashes even without `--verify`: a corrupted tensor
/// would otherwise come out of a tensorizer-to-tensorizer conversion with fresh hashes of its
/// corrupted bytes, and pass every later `--verify`.
#[test]
fn convert_checks_the_inputs_hashes_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("v4_module_with_meta.tensors");
    let v: Value = serde_json::from_str(&ok(bin().args([
        "inspect",
        src.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    // The last stored tensor's first byte.
    let t = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|t| t["nbytes"].as_u64().unwrap() > 0 && t["zeros"] != true)
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[t["offset"].as_u64().unwrap() as usize] ^= 0xff;
    let bad = dir.path().join("bad.tensors");
    std::fs::write(&bad, &bytes).unwrap();
    // A load without --verify does not look (that is what --verify is for) ...
    ok(bin().args(["load", bad.to_str().unwrap()]));
    // ... but a conversion does, to either format, and leaves nothing behind.
    for out in ["out.tensors", "out.safetensors"] {
        let o = dir.path().join(out);
        let e = fails(bin().args(["convert", bad.to_str().unwrap(), o.to_str().unwrap()]));
        assert!(
            e.contains("failed verification") && e.contains(t["name"].as_str().unwrap()),
            "{e}"
        );
        assert!(!o.exists());
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
