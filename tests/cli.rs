//! The CLI end to end: fixtures' digests, bad input, demo.

use std::path::PathBuf;
use std::process::Command;

#[path = "support/checkpoint.rs"]
mod checkpoint;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tensorstream"))
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

fn manifest() -> serde_json::Value {
    let s = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tensorstream {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "tensorstream {args:?} should fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "errors exit with 1, not a panic"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line error expected: {err}"
    );
    err
}

/// A child process that is killed and reaped if the test fails before it waits for it (a
/// demo would go on writing gigabytes, a conversion would wait for its request timeout).
struct Reap(Option<std::process::Child>);

impl Reap {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child already waited for")
    }
    fn wait_with_output(mut self) -> std::process::Output {
        self.0
            .take()
            .expect("child already waited for")
            .wait_with_output()
            .unwrap()
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A usage error: clap's message naming the flag and the bad value, status 2.
fn run_usage_err(args: &[&str], flag: &str) -> String {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains("invalid value") && err.contains(flag),
        "{args:?}: {err}"
    );
    err
}

#[test]
fn mixed_safetensors_digests_match_manifest_in_both_io_modes() {
    let m = manifest();
    let want = m["files"]["mixed.safetensors"]["tensors"]
        .as_array()
        .unwrap();
    let path = fixtures().join("mixed.safetensors");
    for io in ["io_uring", "pread"] {
        let out = run_ok(&[
            "load",
            path.to_str().unwrap(),
            "--device",
            "cpu",
            "--digests",
            "--json",
            "--io",
            io,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["route"], "host");
        assert!(
            v["device_open_seconds"].is_null() && v["device_alloc_seconds"].is_null(),
            "no device opened for cpu"
        );
        let (io_s, s) = (
            v["io_seconds"].as_f64().unwrap(),
            v["seconds"].as_f64().unwrap(),
        );
        assert!(io_s > 0.0 && io_s <= s, "io {io_s} of {s} s");
        let got = v["tensors"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for w in want {
            let g = got
                .iter()
                .find(|g| g["name"] == w["name"])
                .unwrap_or_else(|| panic!("tensor {} missing", w["name"]));
            assert_eq!(g["sha256"], w["sha256"], "{} ({io})", w["name"]);
            assert_eq!(g["shape"], w["shape"], "{}", w["name"]);
            assert_eq!(g["nbytes"], w["nbytes"], "{}", w["name"]);
        }
        assert_eq!(
            v["bytes"].as_u64().unwrap(),
            want.iter()
                .map(|w| w["nbytes"].as_u64().unwrap())
                .sum::<u64>()
        );
        assert!(v["seconds"].as_f64().unwrap() > 0.0);
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn an_explicit_io_option_wins_over_the_environment() {
    let path = fixtures().join("mixed.safetensors");
    let path = path.to_str().unwrap();
    let run = |io: Option<&str>| {
        let mut c = bin();
        c.env("TENSORSTREAM_IO", "bogus")
            .args(["load", path, "--device", "cpu", "--quiet"]);
        if let Some(io) = io {
            c.args(["--io", io]);
        }
        c.output().unwrap()
    };
    // Without the option the variable decides, and a bad one is an error naming it …
    let out = run(None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TENSORSTREAM_IO"));
    // … with it (`auto` included) the variable is not consulted.
    for io in ["auto", "pread", "io_uring"] {
        let out = run(Some(io));
        assert!(
            out.status.success(),
            "--io {io}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `tensorstream` with the kernel refusing io_uring to it (tests/support/no_io_uring.py: a
/// seccomp filter, as container runtimes install): `(exit code, stdout, stderr)`.
fn run_without_io_uring(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String, String) {
    let launcher = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/no_io_uring.py");
    let out = Command::new("python3")
        .arg(launcher)
        .arg(env!("CARGO_BIN_EXE_tensorstream"))
        .args(args)
        .env_remove("TENSORSTREAM_IO")
        .env_remove("TENSORSTREAM_DIRECT")
        .envs(env.iter().copied())
        .output()
        .expect("python3 runs the io_uring-refusing launcher");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(
        out.status.code(),
        Some(97),
        "the seccomp filter could not be installed: {err}"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

#[test]
fn a_kernel_refusing_io_uring_gets_pread_or_a_hint_at_what_asked_for_it() {
    let path = fixtures().join("mixed.safetensors");
    let path = path.to_str().unwrap();
    // Asked for by the option: the hint is the option (it overrides the variable, so setting
    // TENSORSTREAM_IO would change nothing). This also shows the filter refuses io_uring.
    let (code, _, err) = run_without_io_uring(&[], &["load", path, "--io", "io_uring"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("io_uring_setup failed"), "{err}");
    assert!(err.contains("--io pread"), "{err}");
    assert!(!err.contains("TENSORSTREAM_IO"), "{err}");
    // Asked for by the variable: the hint is the variable.
    let (code, _, err) = run_without_io_uring(&[("TENSORSTREAM_IO", "io_uring")], &["load", path]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("TENSORSTREAM_IO=pread"), "{err}");
    // Not asked for: io_uring would be used (O_DIRECT wanted, no page-cache probe), the kernel
    // refuses it, and the pread pool loads the same bytes, with one warning.
    let (code, out, err) = run_without_io_uring(
        &[("TENSORSTREAM_DIRECT", "always")],
        &["load", path, "--digests", "--json"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err.matches("io_uring unavailable").count(),
        1,
        "one warning: {err}"
    );
    assert!(err.contains("using the pread thread pool"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = manifest();
    let want = m["files"]["mixed.safetensors"]["tensors"]
        .as_array()
        .unwrap();
    let got = v["tensors"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for w in want {
        let g = got.iter().find(|g| g["name"] == w["name"]).unwrap();
        assert_eq!(g["sha256"], w["sha256"], "{}", w["name"]);
    }
}

#[test]
fn dtype_names_are_lower_case_safetensors_names() {
    let out = run_ok(&[
        "inspect",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dt: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["dtype"].as_str().unwrap())
        .collect();
    for d in ["bf16", "f32", "i64", "bool", "f8_e4m3", "u8"] {
        assert!(dt.contains(&d), "{d} not in {dt:?}");
    }
    assert_eq!(v["metadata"]["format"], "pt");
}

#[test]
fn filter_selects_by_glob() {
    let out = run_ok(&[
        "load",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        "--filter",
        "a.*",
        "--filter",
        "g.u8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a.bf16", "g.u8"]);
}

#[test]
fn bad_input_gives_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing.safetensors");
    let e = run_err(&["load", missing.to_str().unwrap()]);
    assert!(
        e.contains("missing.safetensors") && e.contains("No such file"),
        "{e}"
    );

    let e = run_err(&["load", d.to_str().unwrap()]);
    assert!(e.contains("directory"), "{e}");

    let empty = d.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    let e = run_err(&["inspect", empty.to_str().unwrap()]);
    assert!(
        e.contains("empty.safetensors: the object's size is 0 bytes: an empty file")
            && e.contains("as those in /proc do"),
        "{e}"
    );

    let src = std::fs::read(fixtures().join("mixed.safetensors")).unwrap();
    let trunc = d.join("trunc.safetensors");
    std::fs::write(&trunc, &src[..src.len() - 100]).unwrap();
    let e = run_err(&["load", trunc.to_str().unwrap()]);
    assert!(
        e.contains("trunc.safetensors") && e.contains("past the end"),
        "{e}"
    );

    let hostile = d.join("hostile.safetensors");
    let mut h = u64::MAX.to_le_bytes().to_vec();
    h.extend_from_slice(b"{}");
    std::fs::write(&hostile, &h).unwrap();
    let e = run_err(&["load", hostile.to_str().unwrap()]);
    assert!(e.contains("header length"), "{e}");

    let e = run_err(&[
        "load",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        "--filter",
        "nothing.*",
    ]);
    assert!(e.contains("matches none"), "{e}");

    // Choices are checked with the arguments: a usage error (status 2) listing what is
    // accepted; any case is accepted.
    let mixed = fixtures().join("mixed.safetensors");
    let mixed = mixed.to_str().unwrap();
    let e = run_usage_err(&["load", mixed, "--device", "tpu"], "--device");
    assert!(e.contains("bad device"), "{e}");
    let e = run_usage_err(&["load", mixed, "--io", "bogus"], "--io");
    assert!(e.contains("io_uring") && e.contains("pread"), "{e}");
    run_usage_err(
        &["load", mixed, "--gpu-huge-pages", "maybe"],
        "--gpu-huge-pages",
    );
    run_ok(&["load", mixed, "--io", "PREAD", "--gpu-huge-pages", "Off"]);

    // GPU options are checked on every device.
    let e = run_err(&[
        "load",
        fixtures().join("mixed.safetensors").to_str().unwrap(),
        "--slots",
        "0",
    ]);
    assert!(e.contains("--slots"), "{e}");

    for t in ["1e20", "0", "nan", "inf"] {
        let e = run_err(&["load", mixed, "--timeout", t]);
        assert!(e.contains("--timeout"), "{t}: {e}");
        // (Infinity is positive: the message must not say it is not.)
        if t != "1e20" {
            assert!(e.contains("positive, finite number of seconds"), "{t}: {e}");
        }
    }
}

#[test]
#[cfg(feature = "s3")]
fn s3_credentials_in_the_uri_are_refused_not_sent_as_the_bucket_name() {
    // A closed port: before, the request went out with "AKIA:topsecret@bucket" as the bucket.
    for uri in [
        "s3://AKIA:topsecret@bucket/m.safetensors",
        "s3://AKIA:top/secret@bucket/m.safetensors",
    ] {
        let out = bin()
            .args(["inspect", uri, "--s3-endpoint", "http://127.0.0.1:9"])
            .env("AWS_ACCESS_KEY_ID", "a")
            .env("AWS_SECRET_ACCESS_KEY", "b")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("user:password@") && err.contains("AWS_ACCESS_KEY_ID"),
            "{uri}: {err}"
        );
        assert!(
            !err.contains("topsecret") && !err.contains("secret@"),
            "{err}"
        );
        assert!(!err.contains("attempts"), "a request was made: {err}");
    }
}

#[test]
#[cfg(feature = "s3")]
fn s3_without_credentials_says_which_variables_to_set() {
    let home = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "inspect",
            "s3://bucket/m.safetensors",
            "--s3-endpoint",
            "http://127.0.0.1:9",
        ])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_NO_SIGN_REQUEST")
        // Nor any other source of OpenDAL's credential chain (CI runners may have them).
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .env_remove("AWS_ROLE_ARN")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no S3 credentials")
            && err.contains("AWS_ACCESS_KEY_ID")
            && err.contains("AWS_NO_SIGN_REQUEST=true"),
        "{err}"
    );
}

#[test]
fn convert_refuses_remote_outputs_and_names_bad_key_files() {
    let src = fixtures().join("mixed.safetensors");
    let src = src.to_str().unwrap();
    let e = run_err(&["convert", src, "s3://bucket/out.tensors"]);
    assert!(e.contains("local files only"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("short.key");
    std::fs::write(&key, b"0123").unwrap();
    let out = dir.path().join("o.tensors");
    let e = run_err(&[
        "convert",
        src,
        out.to_str().unwrap(),
        "--encrypt-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(e.contains("short.key") && e.contains("32 raw bytes"), "{e}");
    assert!(e.contains("--encrypt-key-file"), "{e}");
    assert!(!out.exists());
    // A key or password file is read only so far: `/dev/zero` is refused, not read until
    // memory runs out.
    for flag in ["--encrypt-key-file", "--encrypt-password-file"] {
        let e = run_err(&["convert", src, out.to_str().unwrap(), flag, "/dev/zero"]);
        assert!(
            e.contains("/dev/zero") && e.contains("larger than 64 KiB"),
            "{e}"
        );
    }
    let e = run_err(&["load", src, "--key-file", "/dev/zero"]);
    assert!(
        e.contains("/dev/zero") && e.contains("larger than 64 KiB"),
        "{e}"
    );
    assert!(!out.exists());
    // file:// outputs are local paths.
    let url = format!("file://{}", out.display());
    run_ok(&["convert", src, &url]);
    assert!(out.exists());
}

#[test]
fn permission_denied_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = dir.path().join("secret.safetensors");
    std::fs::copy(fixtures().join("mixed.safetensors"), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads any file regardless of mode bits: as root (CI), run the command as the
    // unprivileged user `nobody` instead.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let as_user = || {
        if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_tensorstream"));
            c
        } else {
            bin()
        }
    };
    // The same user reads a readable file beside it: the denial below is the file's own mode,
    // not a directory on the way (a temporary directory `nobody` cannot enter, say).
    let public = dir.path().join("public.safetensors");
    std::fs::copy(fixtures().join("mixed.safetensors"), &public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |mut c: Command, file: &std::path::Path| c.arg("inspect").arg(file).output();
    let sane = match run(as_user(), &public) {
        Ok(out) => out,
        Err(e) if root => {
            eprintln!("skipped: running as root and setpriv is not available: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    if !sane.status.success() {
        eprintln!(
            "skipped: the test user cannot read a 0644 file in {} ({})",
            dir.path().display(),
            String::from_utf8_lossy(&sane.stderr).trim()
        );
        return;
    }
    let out = run(as_user(), &p).unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("ermission denied") && e.contains("secret.safetensors"),
        "{e}"
    );
}

#[test]
fn demo_verifies_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(&[
        "demo",
        "--size",
        "32MiB",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.contains("every byte matches"), "{out}");
    assert!(out.contains("std::fs::read"), "{out}");
    // The size asked for is the size written (whole layers: a little less, never more). Small
    // sizes used to give the 150 MiB minimum shape.
    let wrote: u64 = out
        .split("tensors, ")
        .nth(1)
        .and_then(|r| r.split(" bytes").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {out}"));
    assert!(
        (24 << 20..=32 << 20).contains(&wrote),
        "--size 32MiB wrote {wrote} bytes"
    );
    // The temporary file is removed afterwards.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `demo --keep | head -1`: standard output closes after the first line, the next line ends
/// the run (status 141), and the model written is still kept (it was removed); without --keep nothing is
/// left.
#[test]
fn demo_keep_keeps_the_model_when_standard_output_closes_early() {
    use std::io::BufRead as _;
    for keep in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = bin();
        cmd.args(["demo", "--size", "16MiB", "--quiet", "--dir"])
            .arg(dir.path());
        if keep {
            cmd.arg("--keep");
        }
        let mut child = Reap(Some(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let mut first = String::new();
        std::io::BufReader::new(child.get().stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // (The reader is dropped here: the pipe's read end is closed, as `head -1` does.)
        assert!(first.contains("writing a"), "{first}");
        let o = child.wait_with_output();
        let stderr = String::from_utf8_lossy(&o.stderr);
        // Quietly, with the status of a death by SIGPIPE, as other tools.
        assert_eq!(o.status.code(), Some(141), "{stderr}");
        let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        if !keep {
            assert!(left.is_empty(), "left behind {left:?}");
            continue;
        }
        assert_eq!(left.len(), 1, "{left:?}");
        let model = left[0].join("model.safetensors");
        let v: serde_json::Value =
            serde_json::from_str(&run_ok(&["load", model.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(v["format"], "safetensors", "{v}");
        // The whole model (whole layers of a 16 MiB budget; at least 12 MiB).
        assert!(v["bytes"].as_u64().unwrap() >= 12 << 20, "{v}");
        assert!(!v["tensors"].as_array().unwrap().is_empty());
    }
}

#[test]
fn an_error_naming_a_path_with_a_newline_stays_one_line() {
    // A hostile file name must not split the error into a second line that could pass for the
    // tool's own ("tensorstream: loaded …").
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join("x\ntensorstream: loaded 7 tensors.safetensors");
    let e = run_err(&["inspect", path.to_str().unwrap()]);
    assert!(
        e.contains("x\\ntensorstream: loaded 7 tensors.safetensors: cannot open"),
        "{e}"
    );
}

#[test]
fn a_missing_output_directory_is_named_without_temporary_file_names() {
    // `tempfile` appends ` at path "…/.o.tensors.partial-XXXXXX"` (a Debug-quoted name of a
    // file never created) to its OS errors: the message names the directory instead.
    let src = fixtures().join("mixed.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nodir");
    let out = missing.join("o.tensors");
    let e = run_err(&["convert", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "the directory {} does not exist",
            missing.display()
        )),
        "{e}"
    );
    assert!(
        !e.contains("partial-") && !e.contains("at path"),
        "names a temporary file: {e}"
    );
    let e = run_err(&[
        "demo",
        "--size",
        "16MiB",
        "--dir",
        missing.to_str().unwrap(),
    ]);
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("No such file or directory"),
        "{e}"
    );
    assert!(
        !e.contains("tensorstream-demo-") && !e.contains("at path"),
        "names a temporary directory: {e}"
    );
    assert!(!missing.exists());
}

#[test]
fn demo_refuses_sizes_it_cannot_write_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = run_err(&["demo", "--size", "5TiB", "--dir", d]);
    assert!(e.contains("more than the demo writes"), "{e}");
    // A size over the directory's free space.
    let st = rustix::fs::statvfs(dir.path()).unwrap();
    let free = st.f_bavail * st.f_frsize;
    if free + (1 << 30) <= 4 << 40 {
        let size = format!("{}", free + (1 << 30));
        let e = run_err(&["demo", "--size", &size, "--dir", d]);
        assert!(e.contains("does not fit") && e.contains(d), "{e}");
    } else {
        eprintln!("free-space case not checked: {free} bytes free is more than the largest --size");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn cuda_device_without_driver_is_a_clear_error() {
    let path = fixtures().join("mixed.safetensors");
    if tensorstream_cuda::driver_present() && tensorstream_cuda::device_count().is_ok_and(|n| n > 0)
    {
        // A GPU is here: the same command must load and digest from the device.
        let out = run_ok(&[
            "load",
            path.to_str().unwrap(),
            "--device",
            "cuda:0",
            "--digests",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["device"], "cuda:0");
        assert_eq!(v["route"], "ring");
        assert!(v["device_open_seconds"].as_f64().unwrap() > 0.0);
        let want = &manifest()["files"]["mixed.safetensors"]["tensors"];
        for w in want.as_array().unwrap() {
            let g = v["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["name"] == w["name"]);
            assert_eq!(
                g.unwrap()["sha256"],
                w["sha256"],
                "{} on the device",
                w["name"]
            );
        }
        return;
    }
    eprintln!("skipped GPU load: no CUDA device; checking the error instead");
    // load and bench take the device alike.
    for (cmd, bad) in [("load", "cuda:x"), ("bench", "gpu")] {
        let e = run_err(&[cmd, path.to_str().unwrap(), "--device", "cuda:0"]);
        assert!(
            e.contains("no CUDA driver found") || e.contains("not present"),
            "{e}"
        );
        let e = run_usage_err(&[cmd, path.to_str().unwrap(), "--device", bad], "--device");
        assert!(e.contains("bad device"), "{e}");
    }
}

#[test]
fn gpu_flags_reach_the_device_options() {
    // The options are checked before the driver is touched, so this runs with or without a GPU.
    let path = fixtures().join("mixed.safetensors");
    let p = path.to_str().unwrap();
    let e = run_err(&["load", p, "--device", "cuda:0", "--slots", "1"]);
    assert!(e.contains("(--slots) = 1") && e.contains("2..=4096"), "{e}");
    let e = run_err(&["load", p, "--device", "cuda:0", "--streams", "0"]);
    assert!(e.contains("(--streams) = 0"), "{e}");
    let e = run_err(&[
        "load",
        p,
        "--device",
        "cuda:0",
        "--slots",
        "4096",
        "--slot-size",
        "1GiB",
    ]);
    assert!(e.contains("exceeds 64 GiB"), "{e}");
    let e = run_usage_err(
        &["load", p, "--device", "cuda:0", "--gpu-warm", "sometimes"],
        "--gpu-warm",
    );
    assert!(e.contains("force"), "{e}");
    let e = run_err(&["load", p, "--device", "cuda:0", "--gpu-warm-threads", "0"]);
    assert!(e.contains("bad --gpu-warm-threads 0"), "{e}");
    let e = run_err(&["load", p, "--device", "cuda:0", "--gpu-warm-piece", "4KiB"]);
    assert!(e.contains("--gpu-warm-piece must be at least 1MiB"), "{e}");
    let e = run_err(&[
        "load",
        p,
        "--device",
        "cuda:0",
        "--gpu-warm-pread-threads",
        "65",
    ]);
    assert!(e.contains("bad --gpu-warm-pread-threads 65"), "{e}");
    let e = run_usage_err(
        &[
            "load",
            p,
            "--device",
            "cuda:0",
            "--gpu-warm-copy",
            "sideways",
        ],
        "--gpu-warm-copy",
    );
    assert!(e.contains("sideways") && e.contains("map"), "{e}");
    // No registering thread is fine when copying threads take the pieces: the options pass
    // (the load then fails only where the machine has no device).
    let out = bin()
        .args([
            "load",
            p,
            "--device",
            "cuda:0",
            "--gpu-warm",
            "force",
            "--gpu-warm-threads",
            "0",
            "--gpu-warm-pread-threads",
            "4",
            "--gpu-warm-copy",
            "map",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("bad --") && !e.contains("panicked"), "{e}");
    if !tensorstream_cuda::driver_present() || tensorstream_cuda::device_count().unwrap_or(0) == 0 {
        // The options passed; only the missing device stops the load.
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(
            e.contains("no CUDA driver found") || e.contains("not present"),
            "{e}"
        );
    } else {
        assert!(out.status.success(), "{e}");
    }
}

#[test]
fn bench_runs_and_prints_json_lines() {
    // `bench` shares the I/O options with `load`; a clash of flag names broke it once.
    let path = fixtures().join("mixed.safetensors");
    let out = run_ok(&["bench", path.to_str().unwrap(), "--warm", "--repeat", "1"]);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 2, "a baseline and a tensorstream row: {out}");
    for r in &rows {
        assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["cold"], false, "{r}");
    }
    assert!(
        rows.iter()
            .any(|r| r["name"].as_str().unwrap().contains("tensorstream")),
        "{out}"
    );
}

/// `tensorstream inspect big | head -1`: the closed pipe ends the command quietly with the
/// status a SIGPIPE death gives (141), not a panic.
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = tensorstream_engine::testkit::u8_model(&[4; 5000], 3);
    let p = dir.path().join("many.safetensors");
    std::fs::write(&p, file).unwrap();
    for args in [vec!["inspect"], vec!["load", "--digests"]] {
        let mut child = bin()
            .args(&args)
            .arg(&p)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty(), "{args:?}: no output");
        // The reader is dropped here: the pipe is closed with most of the output unwritten.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
    }
}

#[test]
fn a_closed_stderr_pipe_is_not_a_panic() {
    // Standard error is a pipe whose reader is already gone: every write to it fails (EPIPE).
    // The error message cannot be shown, but the status must still be the error's (1), not
    // a panic's (101).
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = bin()
        .args(["load", missing.to_str().unwrap()])
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn names_and_metadata_from_a_file_cannot_drive_the_terminal() {
    // A tensor name and metadata holding escape sequences (window title, clear screen) and a
    // newline that would forge a line of the table.
    // A right-to-left override (the rest of the line would read backwards) and a zero-width
    // space too.
    let name = "w\u{1b}]0;pwned\u{7}\u{1b}[2J\nforged 0 0\u{202e}x\u{200b}";
    let header = serde_json::json!({
        "__metadata__": {"k\u{1b}[31m": "v\u{7}"},
        name: {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    });
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&[1, 2, 3, 4]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    std::fs::write(&p, file).unwrap();
    let p = p.to_str().unwrap();
    for args in [vec!["inspect", p], vec!["load", p, "--digests", "--quiet"]] {
        let out = run_ok(&args);
        assert!(
            !out.contains(['\u{1b}', '\u{7}', '\u{202e}', '\u{200b}']),
            "{args:?}: raw control or invisible characters in {out:?}"
        );
        assert!(out.contains("\\u{202e}x\\u{200b}"), "{args:?}: {out:?}");
        assert!(
            !out.lines().any(|l| l.starts_with("forged")),
            "{args:?}: a name forged a line: {out:?}"
        );
        assert!(out.contains("\\u{1b}]0;pwned"), "{args:?}: {out:?}");
    }
    // JSON keeps the exact name (escaped by the encoding).
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["inspect", p, "--json"])).unwrap();
    assert_eq!(v["tensors"][0]["name"], name);
}

/// The `inspect` table lines up by terminal columns: names in CJK characters (two columns
/// each), accented letters and escaped characters alike.
#[test]
fn the_inspect_table_lines_up_whatever_the_names() {
    let names = [
        "w",
        "模型.层.权重",
        "café.w",
        "x\u{202e}y",
        "plain.name.longer",
    ];
    let mut header = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        header.insert(
            n.to_string(),
            serde_json::json!({"dtype": "U8", "shape": [4], "data_offsets": [4 * i, 4 * i + 4]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&[7; 20]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    std::fs::write(&p, file).unwrap();
    let out = run_ok(&["inspect", p.to_str().unwrap()]);
    // Display columns: CJK ideographs take two, everything else here one.
    let cols = |s: &str| -> usize {
        s.chars()
            .map(|c| {
                if ('\u{4e00}'..='\u{9fff}').contains(&c) {
                    2
                } else {
                    1
                }
            })
            .sum()
    };
    let at: Vec<usize> = out
        .lines()
        .filter(|l| l.contains("  u8  ") || l.contains("  dtype  "))
        .map(|l| cols(&l[..l.find("  u8  ").or_else(|| l.find("  dtype  ")).unwrap()]))
        .collect();
    assert_eq!(at.len(), names.len() + 1, "{out}");
    assert!(at.iter().all(|&c| c == at[0]), "columns {at:?}:\n{out}");
}

/// A shard holding a tensor the index does not list: the warning says "warning:" (as the
/// CLI's own do) and comes once per shard, not once per load of `bench`.
#[test]
fn a_library_warning_is_marked_and_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = checkpoint::write(dir.path(), &[&[4096, 10], &[5000]], 3);
    // The index forgets one tensor of shard 1.
    want.retain(|w| w.name != "layers.0.w1");
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &want);
    let out = bin()
        .args(["bench", dir.path().to_str().unwrap(), "--repeat", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("does not place in this shard"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("tensorstream: warning: "), "{err}");
}

/// `bench --cold` refuses a file on a memory file system, whose pages dropping the cache
/// cannot evict (it printed "cold" rows read from memory).
#[test]
fn bench_cold_refuses_a_file_in_memory() {
    let shm = std::path::Path::new("/dev/shm");
    let tmpfs = rustix::fs::statfs(shm).is_ok_and(|st| st.f_type as u64 == 0x0102_1994);
    if !tmpfs || !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs a tmpfs /dev/shm and root (--cold drops the page cache)");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let p = dir.path().join("m.safetensors");
    std::fs::copy(fixtures().join("mixed.safetensors"), &p).unwrap();
    let e = run_err(&["bench", p.to_str().unwrap(), "--cold", "--repeat", "1"]);
    assert!(e.contains("memory file system"), "{e}");
}

/// An empty TMPDIR counts as unset (the demo wrote its model into the current directory).
#[test]
fn demo_with_an_empty_tmpdir_writes_to_tmp() {
    let cwd = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["demo", "--size", "16MiB", "--quiet"])
        .env("TMPDIR", "")
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains(" to /tmp/tensorstream-demo-"), "{text}");
}

/// Ctrl-C / SIGTERM while `demo` writes its model: the process stops with 128 + the signal and
/// leaves no temporary directory behind (with the default action it left a whole model file).
#[test]
fn interrupted_demo_removes_its_files() {
    use std::io::BufRead;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    // A model that takes seconds to write (4 GiB), or what fits: the demo refuses a size over
    // the free space.
    let st = rustix::fs::statvfs(dir.path()).unwrap();
    let size = (4u64 << 30).min((st.f_bavail * st.f_frsize).saturating_sub(1 << 30));
    if size < 256 << 20 {
        eprintln!(
            "skipped: {} has too little free space for the demo",
            dir.path().display()
        );
        return;
    }
    let size = size.to_string();
    for (sig, code) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let mut child = Reap(Some(
            bin()
                .args(["demo", "--size", &size, "--quiet", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        // The first line says it is writing: the temporary directory exists now.
        let mut line = String::new();
        std::io::BufReader::new(child.get().stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("writing"), "{line}");
        let killed = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.get().id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let out = child.wait_with_output();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {stderr}");
        assert!(stderr.contains("interrupted"), "SIG{sig}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "SIG{sig}: left behind {left:?}");
    }
}

#[test]
fn a_proxy_variable_the_client_cannot_use_is_refused_not_bypassed() {
    // reqwest skips a proxy URL it cannot parse and connects directly: a mistyped HTTP_PROXY
    // would silently bypass the proxy. A server that serves the file proves the bypass.
    let port = whole_answer_server("application/octet-stream");
    let url = format!("http://127.0.0.1:{port}/m.safetensors");
    let out = bin()
        .args(["inspect", &url])
        .env("HTTP_PROXY", "http://user:pr0xysecret@bad host:3128")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("HTTP_PROXY is set but is not a proxy URL"),
        "{err}"
    );
    assert!(
        !err.contains("pr0xysecret") && !err.contains("bad host"),
        "{err}"
    );
}

#[test]
fn https_to_a_plain_http_port_says_so_and_is_not_retried() {
    use std::io::{Read as _, Write as _};
    // A plain HTTP server: it answers whatever it is sent (a TLS ClientHello) with an HTTP
    // error, which rustls reports as "received corrupt message of type InvalidContentType".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let url = format!("https://127.0.0.1:{port}/model.safetensors");
    let out = bin()
        .args(["inspect", &url])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not answer in TLS") && err.contains("http:// URL"),
        "{err}"
    );
    // A plain HTTP server will not speak TLS on a second try.
    assert!(!err.contains("attempts"), "retried: {err}");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "{err}"
    );
}

/// A server that answers every request with 200, `content_type` and a small body, ranges or
/// not (as a directory listing, or a server without range support, does). Returns its port.
fn whole_answer_server(content_type: &'static str) -> u16 {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body =
                "<html><body><a href=\"model.safetensors\">model.safetensors</a></body></html>";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A server that answers every request with `answer`, a whole raw HTTP response. Returns its
/// port.
fn fixed_answer_server(answer: String) -> u16 {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    port
}

#[test]
fn an_error_status_after_a_redirect_names_where_the_redirect_led() {
    let missing = fixed_answer_server(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    );
    let redirect = fixed_answer_server(format!(
        "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{missing}/blobs/x?sig=s3cret\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    ));
    let e = run_err(&[
        "inspect",
        &format!("http://127.0.0.1:{redirect}/model.safetensors"),
    ]);
    assert!(
        e.contains(&format!(
            "HTTP 404 Not Found from http://127.0.0.1:{missing}/blobs/x?…, where a redirect led"
        )),
        "{e}"
    );
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn an_html_page_is_not_blamed_on_the_servers_range_support() {
    // A directory listing (or a page about the file) comes back 200 to a Range request: the
    // URL is wrong, not the server.
    let port = whole_answer_server("text/html; charset=utf-8");
    let e = run_err(&["inspect", &format!("http://127.0.0.1:{port}/models/")]);
    assert!(
        e.contains("web page (Content-Type: text/html)") && e.contains("directory listing"),
        "{e}"
    );
    assert!(!e.contains("byte-range"), "{e}");
    // A server that sends a file whole is still told apart.
    let port = whole_answer_server("application/octet-stream");
    let e = run_err(&["inspect", &format!("http://127.0.0.1:{port}/m.safetensors")]);
    assert!(e.contains("does not support byte-range requests"), "{e}");
}

#[test]
fn an_nfs_uri_to_an_http_port_says_the_server_speaks_text() {
    let port = whole_answer_server("text/plain");
    let e = run_err(&[
        "inspect",
        &format!("nfs://127.0.0.1:{port}/export/m.safetensors"),
    ]);
    assert!(
        e.contains("answered with text (\"HTTP\")") && e.contains("NFS server"),
        "{e}"
    );
    assert!(!e.contains("exceeds the limit"), "{e}");
}

/// A tiny HTTP server for one safetensors file: HEAD and GETs within the header are answered,
/// a GET of tensor data hangs (a stalled server). Returns its port, and a channel told of each
/// data GET that hangs.
#[cfg(feature = "http")]
fn stalling_http_server(data: Vec<u8>) -> (u16, std::sync::mpsc::Receiver<()>) {
    stalling_http_server_until(data, None)
}

/// [`stalling_http_server`] whose stalled GETs, once `release` is set, go on and are answered.
#[cfg(feature = "http")]
fn stalling_http_server_until(
    data: Vec<u8>,
    release: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> (u16, std::sync::mpsc::Receiver<()>) {
    let (stalled_tx, stalled) = std::sync::mpsc::channel::<()>();
    let data_start = 8 + u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let data = data.clone();
            let stalled_tx = stalled_tx.clone();
            let release = release.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let head = line.starts_with("HEAD");
                    let mut range = (0usize, data.len() - 1);
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.trim().split_once('-').unwrap();
                            let a: usize = a.parse().unwrap();
                            let b = b
                                .parse()
                                .map_or(data.len() - 1, |b: usize| b.min(data.len() - 1));
                            range = (a, b);
                        }
                    }
                    let reply = if head {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\n\r\n",
                            data.len()
                        )
                        .into_bytes()
                    } else {
                        let (a, b) = range;
                        if a >= data_start {
                            // Says that a data read is now stuck here.
                            let _ = stalled_tx.send(());
                            let Some(go) = &release else {
                                std::thread::sleep(std::time::Duration::from_secs(120));
                                return;
                            };
                            let t0 = std::time::Instant::now();
                            while !go.load(std::sync::atomic::Ordering::SeqCst) {
                                if t0.elapsed().as_secs() > 120 {
                                    return;
                                }
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                        }
                        let mut v = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n",
                            data.len(),
                            b + 1 - a
                        )
                        .into_bytes();
                        v.extend_from_slice(&data[a..=b]);
                        v
                    };
                    if w.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, stalled)
}

/// Ctrl-C while the object is still being opened (a server that accepts the connection and
/// never answers) stops the command at once, not after the 10 s grace period (it waited for the
/// request timeout until then, and the grace period cut that short).
#[test]
#[cfg(feature = "http")]
fn ctrl_c_while_opening_a_remote_object_stops_at_once() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming().flatten() {
            let _ = seen_tx.send(());
            held.push(conn); // never answered
        }
    });
    for cmd in ["load", "inspect"] {
        let mut child = Reap(Some(
            bin()
                .args([cmd, &format!("http://127.0.0.1:{port}/m.safetensors")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        seen.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the command never connected");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t = std::time::Instant::now();
        let ok = Command::new("kill")
            .arg("-INT")
            .arg(child.get().id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let out = child.wait_with_output();
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{cmd}: {stderr}");
        assert!(!stderr.contains("did not stop"), "{cmd}: {stderr}");
        assert!(
            took < std::time::Duration::from_secs(5),
            "{cmd}: {took:?}: {stderr}"
        );
    }
}

/// A conversion stuck in a read from a stalled server stops at the first Ctrl-C (the read in
/// flight is abandoned, not waited out for the 100 s request timeout) and removes its partial
/// output.
#[test]
#[cfg(feature = "http")]
fn ctrl_c_stops_a_conversion_stuck_on_a_stalled_server() {
    let data = std::fs::read(fixtures().join("mixed.safetensors")).unwrap();
    let (port, stalled) = stalling_http_server(data);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.tensors");
    let mut child = Reap(Some(
        bin()
            .args(["convert", &format!("http://127.0.0.1:{port}/m.safetensors")])
            .arg(&out)
            .args(["--quiet", "--timeout", "100"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let pid = child.get().id();
    // Wait for the partial file (the conversion is then stuck in a read).
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(dir.path()).unwrap().count() == 0 {
        assert!(t0.elapsed().as_secs() < 30, "no partial output appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    // The conversion is inside the stalled read once the server has received it.
    stalled
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("no data read reached the stalling server");
    let sent = std::time::Instant::now();
    kill("INT");
    let o = child.wait_with_output();
    let took = sent.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Not the 10 s grace period's forced exit, nor the request timeout: the cancel itself.
    assert!(
        !stderr.contains("did not stop"),
        "stopped only by the forced exit after {took:?}: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind {left:?}: {stderr}");
}

/// Partial files that killed conversions left beside the output (`.NAME.partial-XXXXXX`) are
/// named in a warning, with their sizes, and left alone; files of other outputs and names
/// that only look alike are not named.
#[test]
fn convert_warns_of_partial_files_that_killed_conversions_left() {
    let dir = tempfile::tempdir().unwrap();
    let leftover = dir.path().join(".o.tensors.partial-Ab3x9Q");
    std::fs::write(&leftover, vec![7u8; 3000]).unwrap();
    // (tempfile's six random characters are ASCII letters and digits: the last two names are
    // no conversion's.)
    for other in [
        ".p.tensors.partial-abcdef",
        ".o.tensors.partial-toolong7",
        ".o.tensors.partial-\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}1",
        ".o.tensors.partial-a-b~c.",
    ] {
        std::fs::write(dir.path().join(other), b"x").unwrap();
    }
    let out = dir.path().join("o.tensors");
    let src = fixtures().join("mixed.safetensors");
    let o = bin()
        .args(["convert", src.to_str().unwrap(), out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("1 partial file left by earlier conversions to o.tensors")
            && stderr.contains(".o.tensors.partial-Ab3x9Q (2.9 KiB)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("abcdef")
            && !stderr.contains("toolong7")
            && !stderr.contains("\u{e9}")
            && !stderr.contains("a-b~c."),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&leftover).unwrap(), vec![7u8; 3000]);
    // Nothing to say when nothing is left.
    std::fs::remove_file(&leftover).unwrap();
    let o = bin()
        .args([
            "convert",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            "-f",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !stderr.contains("partial file"),
        "{stderr}"
    );
}

/// An output that appears while the conversion runs (after the up-front "exists" check) is
/// kept as it is without `--force`, the conversion failing and leaving no temporary file; with
/// `--force` it is replaced. (It was replaced in both cases: the final rename overwrote it.)
#[test]
#[cfg(feature = "http")]
fn an_output_that_appears_during_a_conversion_is_replaced_only_with_force() {
    let data = std::fs::read(fixtures().join("mixed.safetensors")).unwrap();
    for force in [false, true] {
        let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (port, stalled) = stalling_http_server_until(data.clone(), Some(release.clone()));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.tensors");
        let mut cmd = bin();
        cmd.args(["convert", &format!("http://127.0.0.1:{port}/m.safetensors")])
            .arg(&out)
            .args(["--quiet", "--timeout", "100"]);
        if force {
            cmd.arg("--force");
        }
        let child = Reap(Some(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        stalled
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("no data read reached the stalling server");
        std::fs::write(&out, b"theirs").unwrap();
        release.store(true, std::sync::atomic::Ordering::SeqCst);
        let o = child.wait_with_output();
        let stderr = String::from_utf8_lossy(&o.stderr);
        let now = std::fs::read(&out).unwrap();
        if force {
            assert!(o.status.success(), "{stderr}");
            assert_ne!(now, b"theirs", "--force did not replace it");
            let v: serde_json::Value = serde_json::from_str(&run_ok(&[
                "load",
                out.to_str().unwrap(),
                "--verify",
                "--json",
            ]))
            .unwrap();
            assert_eq!(v["format"], "tensorizer", "{v}");
        } else {
            assert_eq!(o.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains("appeared while the conversion ran"),
                "{stderr}"
            );
            // The CLI user is told of --force, not of the library's switch.
            assert!(
                stderr.contains("give --force to replace it") && !stderr.contains("Loader::"),
                "{stderr}"
            );
            assert_eq!(now, b"theirs", "replaced without --force");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["o.tensors"], "force {force}: {stderr}");
    }
}

/// A sharded checkpoint (a directory with `model.safetensors.index.json`): `inspect`, `load
/// --digests` and `bench` cover every shard, and the JSON says which shard held each tensor.
#[test]
fn sharded_checkpoints_inspect_load_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let want = checkpoint::write(dir.path(), &[&[4096, 10], &[5 << 20], &[3, 1 << 20]], 9);
    let d = dir.path().to_str().unwrap();
    let total: usize = want.iter().map(|t| t.bytes.len()).sum();

    let v: serde_json::Value = serde_json::from_str(&run_ok(&["inspect", d, "--json"])).unwrap();
    assert_eq!(v["shards"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["total_bytes"], total, "{v}");
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), want.len());
    for (t, w) in tensors.iter().zip(&want) {
        assert_eq!(t["name"], w.name.as_str());
        assert!(t["shard"].as_str().unwrap().ends_with(&w.file), "{t}");
    }
    let text = run_ok(&["inspect", d]);
    assert!(
        text.contains("sharded checkpoint, 3 shards, 5 tensors"),
        "{text}"
    );

    let index = dir.path().join("model.safetensors.index.json");
    let v: serde_json::Value = serde_json::from_str(&run_ok(&[
        "load",
        index.to_str().unwrap(),
        "--json",
        "--digests",
    ]))
    .unwrap();
    assert_eq!(v["bytes"], total, "{v}");
    assert_eq!(v["shards"].as_array().unwrap().len(), 3, "{v}");
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), want.len());
    for (t, w) in tensors.iter().zip(&want) {
        assert_eq!(t["name"], w.name.as_str());
        assert_eq!(t["sha256"], w.sha256.as_str(), "{}", w.name);
        assert!(t["shard"].as_str().unwrap().ends_with(&w.file), "{t}");
    }
    let text = run_ok(&["load", d, "--filter", "layers.2.*"]);
    assert!(text.contains("loaded 2 tensors from 1 shard to"), "{text}");

    // The baselines read every shard.
    let files: u64 = (1..=3)
        .map(|k| {
            std::fs::metadata(dir.path().join(checkpoint::shard_name(k, 3)))
                .unwrap()
                .len()
        })
        .sum();
    let out = run_ok(&["bench", d, "--repeat", "1"]);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap().clone();
    assert_eq!(row("tensorstream")["bytes"], total, "{out}");
    assert_eq!(row("std_fs_read")["bytes"], files, "{out}");

    // convert joins the shards into one file (tensorizer here), which loads to the same bytes.
    let out = dir.path().join("joined.tensors");
    let msg = run_ok(&["convert", d, out.to_str().unwrap()]);
    assert!(msg.contains("converted 5 tensors"), "{msg}");
    let v: serde_json::Value = serde_json::from_str(&run_ok(&[
        "load",
        out.to_str().unwrap(),
        "--json",
        "--digests",
        "--verify",
    ]))
    .unwrap();
    assert_eq!(v["format"], "tensorizer", "{v}");
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), want.len());
    for (t, w) in tensors.iter().zip(&want) {
        assert_eq!(t["name"], w.name.as_str());
        assert_eq!(t["sha256"], w.sha256.as_str(), "{}", w.name);
    }
}

#[test]
fn environment_switches_work_and_bad_values_are_named() {
    // On the build disk (O_DIRECT is refused on tmpfs).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::copy(fixtures().join("mixed.safetensors"), &path).unwrap();
    let p = path.to_str().unwrap();
    let load = |vars: &[(&str, &str)]| {
        let mut c = bin();
        c.args(["load", p, "--json", "--digests"]);
        for (k, v) in vars {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    for var in [
        "TENSORSTREAM_DIRECT",
        "TENSORSTREAM_PREFAULT",
        "TENSORSTREAM_HUGEPAGES",
        "TENSORSTREAM_IO",
    ] {
        let out = load(&[(var, "bogus")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}: {err}");
        assert!(err.contains(var) && err.contains("bogus"), "{var}: {err}");
    }
    let json = |vars: &[(&str, &str)]| -> serde_json::Value {
        let out = load(vars);
        assert!(
            out.status.success(),
            "{vars:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let digests = |v: &serde_json::Value| -> Vec<String> {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["sha256"].as_str().unwrap().to_string())
            .collect()
    };
    let want = digests(&json(&[]));
    assert_eq!(
        json(&[("TENSORSTREAM_DIRECT", "never")])["direct_io"],
        false
    );
    let always = json(&[("TENSORSTREAM_DIRECT", "always")]);
    assert_eq!(digests(&always), want);
    // `always` means O_DIRECT where the filesystem takes it: check where it does.
    use std::os::unix::fs::OpenOptionsExt;
    let direct_here = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_ok();
    if direct_here {
        assert_eq!(always["direct_io"], true);
    } else {
        eprintln!("O_DIRECT refused in {}: not checked", dir.path().display());
    }
    for var in ["TENSORSTREAM_PREFAULT", "TENSORSTREAM_HUGEPAGES"] {
        for v in ["0", "1"] {
            assert_eq!(digests(&json(&[(var, v)])), want, "{var}={v}");
        }
    }
}

#[test]
fn a_shard_holding_tensors_its_index_does_not_list_is_loaded_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = checkpoint::write(dir.path(), &[&[10, 20], &[30]], 5);
    let unlisted = all.remove(1);
    checkpoint::write_index(dir.path(), "model.safetensors.index.json", &all);
    let out = bin()
        .args(["load", dir.path().to_str().unwrap(), "--json", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("1 tensor(s) that the checkpoint index")
            && err.contains("does not place in this shard are skipped")
            && err.contains(&format!("{:?}", unlisted.name))
            && err.contains(&unlisted.file),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), all.len());
    assert!(!names.contains(&unlisted.name.as_str()), "{names:?}");
}

/// Flags a command accepts but does not use are named on stderr (the command still runs):
/// GPU flags on a load to host memory or on `inspect`, backend flags that do not concern the
/// URI's backend. Defaults, and flags that apply, say nothing; stdout is untouched.
#[test]
fn flags_a_command_ignores_are_named() {
    let f = fixtures().join("mixed.safetensors");
    let f = f.to_str().unwrap();
    let stderr_of = |args: &[&str]| {
        let out = bin().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not the JSON alone: {e}"));
        assert!(json.is_object());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = stderr_of(&[
        "load",
        f,
        "--json",
        "--quiet",
        "--slots",
        "8",
        "--gpu-warm",
        "force",
    ]);
    assert!(
        e.contains("warning: --slots, --gpu-warm ignored") && e.contains("--device cuda"),
        "{e}"
    );
    let e = stderr_of(&[
        "inspect",
        f,
        "--json",
        "--streams",
        "4",
        "--header",
        "X: y",
        "--timeout",
        "5",
        "--s3-no-sign-request",
    ]);
    assert!(e.contains("--streams ignored"), "{e}");
    assert!(
        e.contains("--header, --s3-no-sign-request, --timeout ignored")
            && e.contains("local files"),
        "{e}"
    );
    // Defaults and flags that apply: nothing said.
    let e = stderr_of(&[
        "load", f, "--json", "--quiet", "--slots", "40", "--io", "pread",
    ]);
    assert!(!e.contains("warning"), "{e}");
}

/// `convert` never writes over its own input (by any path: a link, a shard of the checkpoint
/// it reads), replaces an existing output only with `--force`, refuses a directory before
/// converting anything, and takes any output name a file system allows (its temporary file's
/// name is cut to fit).
#[test]
fn convert_never_replaces_its_input_and_replaces_an_output_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.safetensors");
    std::fs::copy(fixtures().join("mixed.safetensors"), &src).unwrap();
    let original = std::fs::read(&src).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let s = src.to_str().unwrap();

    let e = run_err(&["convert", s, s]);
    assert!(e.contains("exists: give --force to replace it"), "{e}");
    for out in [&src, &link] {
        let e = run_err(&["convert", s, out.to_str().unwrap(), "--force"]);
        assert!(e.contains("is the input") && e.contains("itself"), "{e}");
    }
    assert_eq!(
        std::fs::read(&src).unwrap(),
        original,
        "the input was touched"
    );
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());

    let out = dir.path().join("out.tensors");
    let o = out.to_str().unwrap();
    run_ok(&["convert", s, o]);
    let first = std::fs::read(&out).unwrap();
    let e = run_err(&["convert", s, o]);
    assert!(e.contains("exists: give --force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), first);
    let msg = run_ok(&["convert", s, o, "-f", "--as-parameters"]);
    assert!(msg.contains("converted"), "{msg}");
    assert_ne!(
        std::fs::read(&out).unwrap(),
        first,
        "--force did not replace it"
    );

    // A path that names a directory is not the file without its slash.
    for bad in ["new.tensors/", "new.tensors/."] {
        let p = format!("{}/{bad}", dir.path().display());
        let e = run_err(&["convert", s, &p]);
        assert!(e.contains("names a directory"), "{bad}: {e}");
    }
    assert!(!dir.path().join("new.tensors").exists());

    let d = dir.path().join("d.tensors");
    std::fs::create_dir(&d).unwrap();
    let e = run_err(&["convert", s, d.to_str().unwrap(), "--force"]);
    assert!(e.contains("is a directory"), "{e}");
    // Without --force too (it suggested --force, which cannot help).
    let e = run_err(&["convert", s, d.to_str().unwrap()]);
    assert!(
        e.contains("is a directory") && !e.contains("--force"),
        "{e}"
    );

    // 254 bytes: the longest name most file systems take (with its 16 bytes the temporary
    // file's name would be 270).
    let long = dir.path().join(format!("{}.tensors", "é".repeat(123)));
    assert_eq!(long.file_name().unwrap().len(), 254);
    run_ok(&["convert", s, long.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&run_ok(&[
        "load",
        long.to_str().unwrap(),
        "--verify",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["format"], "tensorizer", "{v}");

    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // A sharded checkpoint's shard is an input too.
    let ck = tempfile::tempdir().unwrap();
    let written = checkpoint::write(ck.path(), &[&[10], &[20]], 3);
    let shard = ck.path().join(&written[1].file);
    let before = std::fs::read(&shard).unwrap();
    let e = run_err(&[
        "convert",
        ck.path().to_str().unwrap(),
        shard.to_str().unwrap(),
        "--force",
    ]);
    assert!(e.contains("itself"), "{e}");
    assert_eq!(std::fs::read(&shard).unwrap(), before);
}

/// Several `--filter`s: each must match a tensor (a typo in one is not hidden by another that
/// matches), for a file and for a sharded checkpoint.
#[test]
fn every_filter_must_match_something() {
    let f = fixtures().join("mixed.safetensors");
    let e = run_err(&[
        "load",
        f.to_str().unwrap(),
        "--filter",
        "a.*",
        "--filter",
        "nomatch*",
    ]);
    assert!(e.contains("filter \"nomatch*\" matches none"), "{e}");
    let ck = tempfile::tempdir().unwrap();
    checkpoint::write(ck.path(), &[&[10], &[20]], 3);
    let d = ck.path().to_str().unwrap();
    let e = run_err(&["load", d, "--filter", "*", "--filter", "typo"]);
    assert!(e.contains("filter \"typo\" matches none"), "{e}");
}

/// What README.md says about the CLI matches the CLI itself: every subcommand it runs exists
/// (and every subcommand is shown), every `--flag` it gives a subcommand (in a command line, or
/// an inline `load --flag` / `--flag` span) is one the subcommand (or some subcommand) accepts,
/// the options table names only flags every command accepts, and a default the `--help` text
/// states for a flag of that table appears in the flag's row; and every option `--help` lists
/// is mentioned, the shared ones in the options table.
#[test]
fn readme_cli_claims_match_the_cli() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // Each subcommand's options as `--help` lists them: flag (and alias) → `[default: …]`.
    let subs = ["inspect", "load", "demo", "convert", "bench"];
    let help = |sub: &str| {
        let out = run_ok(&[sub, "--help"]);
        let mut opts = std::collections::BTreeMap::<String, Option<String>>::new();
        for line in out.lines().filter(|l| l.trim_start().starts_with('-')) {
            let default = line
                .split("[default: ")
                .nth(1)
                .map(|d| d.split([']', ';']).next().unwrap().trim().to_string());
            for w in flags_in(line.split("  ").find(|s| !s.trim().is_empty()).unwrap()) {
                opts.insert(w, default.clone());
            }
            if let Some(alias) = line.split("Alias: ").nth(1) {
                opts.extend(flags_in(alias).into_iter().map(|a| (a, None)));
            }
        }
        opts
    };
    let helps: std::collections::BTreeMap<&str, _> = subs.iter().map(|&s| (s, help(s))).collect();
    let top = run_ok(&["--help"]);
    for s in &subs {
        assert!(
            top.contains(&format!("  {s} ")),
            "subcommand {s} missing from --help: {top}"
        );
        assert!(
            readme.contains(&format!("tensorstream {s} ")),
            "README.md shows no `tensorstream {s} …` command line"
        );
    }
    let mut problems = Vec::new();
    // And the other way: every option is documented, the shared ones in the options table.
    let readme_flags: std::collections::BTreeSet<String> = flags_in(&readme).into_iter().collect();
    let table_flags: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `--")?.split(" | ").next())
        .flat_map(|names| flags_in(&format!("`--{names}")))
        .collect();
    for (s, opts) in &helps {
        for f in opts.keys().filter(|f| *f != "--help") {
            let shared = helps.values().all(|h| h.contains_key(f));
            if shared && s != &"load" {
                continue; // (checked once)
            }
            if shared && !table_flags.contains(f) {
                problems.push(format!(
                    "{f} (every command's) has no row in the options table"
                ));
            } else if !readme_flags.contains(f) {
                problems.push(format!("{f} (of `{s}`) is not mentioned in README.md"));
            }
        }
    }
    let check =
        |problems: &mut Vec<String>, sub: Option<&str>, flags: Vec<String>, context: &str| {
            for f in flags {
                let known = match sub {
                    Some(s) => helps[s].contains_key(&f),
                    None => helps.values().any(|h| h.contains_key(&f)),
                };
                if !known {
                    let whose = sub.map_or("any subcommand".to_string(), |s| format!("`{s}`"));
                    problems.push(format!("{f} is not an option of {whose}: {context}"));
                }
            }
        };
    // The fenced block a line is in: its language (`sh`, `rust`, …), or None outside one.
    let mut block: Option<&str> = None;
    for line in readme.lines() {
        if let Some(lang) = line.strip_prefix("```") {
            block = if block.is_some() { None } else { Some(lang) };
            continue;
        }
        if let Some(lang) = block {
            if lang != "sh" {
                continue;
            }
            // A command line running the tool (also behind `scripts/fakecuda.sh run`): its
            // subcommand must exist and take every flag on the line, comments included.
            if let Some(rest) = line
                .split("tensorstream ")
                .nth(1)
                .filter(|_| line.starts_with("tensorstream ") || line.contains("/tensorstream "))
            {
                let sub = rest.split_whitespace().next().unwrap_or("");
                if !subs.contains(&sub) {
                    problems.push(format!("unknown subcommand {sub:?}: {line}"));
                    continue;
                }
                check(&mut problems, Some(sub), flags_in(rest), line);
            }
            continue;
        }
        // Inline code spans: `load --flag …` (a subcommand's) or `--flag …` (some subcommand's).
        for span in line.split('`').skip(1).step_by(2) {
            let first = span.split_whitespace().next().unwrap_or("");
            let span = span.strip_prefix("tensorstream ").unwrap_or(span);
            let sub = span.split_whitespace().next().unwrap_or("");
            if subs.contains(&sub) && span.contains(" --") {
                check(&mut problems, Some(sub), flags_in(span), span);
            } else if first.starts_with("--") {
                check(&mut problems, None, flags_in(span), span);
            }
        }
        // The options table: its flags are shared by every subcommand, and a default `--help`
        // states (a plain value) is stated in the row too.
        if let Some(row) = line.strip_prefix("| `--") {
            let (names, meaning) = row.split_once(" | ").unwrap();
            let names = flags_in(&format!("`--{names}"));
            for s in &subs {
                check(&mut problems, Some(s), names.clone(), line);
            }
            let squeezed = meaning.replace(" MiB", "MiB").replace(" KiB", "KiB");
            let has = |text: &str, d: &str| {
                text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                    .any(|w| w.trim_end_matches('.') == d)
            };
            // Plain defaults (not "the backend's: …"), in the order of the row's flags.
            let defaults: Vec<(&String, &String)> = names
                .iter()
                .filter_map(|f| Some((f, helps["load"].get(f)?.as_ref()?)))
                .filter(|(_, d)| d.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
                .collect();
            // A row of several flags gives their defaults in parentheses, in order.
            let groups: Vec<&str> = squeezed.split('(').skip(1).collect();
            for (k, (f, d)) in defaults.iter().enumerate() {
                let stated = if defaults.len() > 1 {
                    groups
                        .get(k)
                        .is_some_and(|g| has(g.split(')').next().unwrap(), d))
                } else {
                    has(&squeezed, d)
                };
                if !stated {
                    problems.push(format!(
                        "{f}: --help's default {d} is not in its row: {line}"
                    ));
                }
            }
        }
    }
    problems.dedup();
    assert!(
        problems.is_empty(),
        "README.md vs the CLI:\n{}",
        problems.join("\n")
    );
}

/// The `--long-flag` names in `text`.
fn flags_in(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| {
            w.starts_with("--")
                && w.len() > 2
                && w.as_bytes()[2].is_ascii_alphabetic()
                && !w.ends_with('-')
        })
        .map(str::to_string)
        .collect()
}

/// `--help` says what README.md says: the kernel-NFS-mount queue depth among the defaults of
/// `--concurrency`, that `demo --keep` keeps the file `--dir` would see removed, and a count
/// placeholder `<N>` for `bench --repeat` as for every other count.
#[test]
fn help_texts_agree_with_the_readme() {
    let line = |sub: &str, flag: &str| {
        run_ok(&[sub, "--help"])
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{sub} --help lists no {flag}"))
            .to_string()
    };
    let c = line("load", "--concurrency");
    assert!(c.contains("kernel NFS mount"), "{c}");
    let d = line("demo", "--dir");
    assert!(d.contains("--keep"), "{d}");
    let r = line("bench", "--repeat");
    assert!(r.starts_with("      --repeat <N> "), "{r}");
}
