//! Unit tests of the local backend: pure decisions (config), errors, change detection, and the
//! io_uring reader's paths (O_DIRECT, registered buffers, buffered fallback, Drop with reads in
//! flight).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tensorstream_engine::mem::staging_slots;
use tensorstream_engine::testkit::pattern;
use tensorstream_engine::{Backend, ErrorKind, IoBuf, RangeReader, ReadRequest, ReaderOptions};

use super::config::*;
use super::reader::{ChangeGuard, PreadReader};
use super::uring::{UringReader, REGISTER_BUDGET};
use super::{Files, LocalBackend};
use crate::{IoMode, OpenOptions};

/// A temp dir next to the test binary: on the build disk (not tmpfs), so O_DIRECT applies.
fn disk_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("test binary path");
    let parent = exe.parent().expect("test binary dir").to_path_buf();
    tempfile::Builder::new()
        .prefix("ts-local-unit-")
        .tempdir_in(parent)
        .expect("temp dir")
}

fn opts(mode: IoMode) -> OpenOptions {
    OpenOptions {
        io_mode: Some(mode),
        ..OpenOptions::default()
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.to_str().unwrap().to_string()
}

// ---- config: pure decisions ----

#[test]
fn fs_magic_selects_profile() {
    assert_eq!(fs_kind(NFS_SUPER_MAGIC), FsKind::Nfs);
    assert_eq!(fs_kind(TMPFS_MAGIC), FsKind::Memory);
    assert_eq!(fs_kind(RAMFS_MAGIC), FsKind::Memory);
    assert_eq!(fs_kind(EXT4_SUPER_MAGIC), FsKind::Disk);
    assert_eq!(fs_kind(XFS_SUPER_MAGIC), FsKind::Disk);
    assert_eq!(fs_kind(0), FsKind::Disk);

    let d = OpenOptions::default();
    let disk = io_profile(FsKind::Disk, &d);
    assert!(disk.direct);
    assert_eq!(
        (disk.queue_depth, disk.chunk),
        (DISK_QUEUE_DEPTH, DISK_CHUNK)
    );
    assert!(disk.queue_depth >= 16);
    let nfs = io_profile(FsKind::Nfs, &d);
    assert!(!nfs.direct, "NFS reads buffered");
    assert!(
        nfs.queue_depth > disk.queue_depth,
        "NFS keeps more reads in flight"
    );
    assert!(nfs.chunk >= 16 << 20, "NFS reads in large chunks");
    assert!(!io_profile(FsKind::Memory, &d).direct);

    let o = OpenOptions {
        concurrency: Some(7),
        chunk_size: Some(1 << 20),
        ..OpenOptions::default()
    };
    let p = io_profile(FsKind::Nfs, &o);
    assert_eq!((p.queue_depth, p.chunk, p.direct), (7, 1 << 20, false));
    let zero = OpenOptions {
        concurrency: Some(0),
        chunk_size: Some(0),
        ..OpenOptions::default()
    };
    assert_eq!(
        io_profile(FsKind::Disk, &zero),
        disk,
        "zero overrides are ignored"
    );
}

#[test]
fn a_refused_io_uring_request_says_to_change_what_made_it() {
    // The option overrides TENSORSTREAM_IO: its hint must not be to set the variable.
    let by_option = uring_refused(true, "io_uring_setup failed: EPERM");
    assert!(by_option.contains("--io pread"), "{by_option}");
    assert!(!by_option.contains("TENSORSTREAM_IO"), "{by_option}");
    assert!(
        by_option.contains("io_uring_setup failed: EPERM"),
        "{by_option}"
    );
    let by_env = uring_refused(false, "io_uring_setup failed: EPERM");
    assert!(by_env.contains("TENSORSTREAM_IO=pread"), "{by_env}");
    assert!(by_env.contains("io_uring_setup failed: EPERM"), "{by_env}");
}

#[test]
fn option_beats_environment() {
    assert_eq!(
        requested_mode(Some(IoMode::Pread), Some(IoMode::Uring)),
        Some(IoMode::Pread)
    );
    assert_eq!(
        requested_mode(None, Some(IoMode::Uring)),
        Some(IoMode::Uring)
    );
    assert_eq!(requested_mode(None, None), None);
    // An explicit `Auto` is automatic whatever the environment asks for.
    assert_eq!(
        requested_mode(Some(IoMode::Auto), Some(IoMode::Pread)),
        None
    );
    assert_eq!(requested_mode(None, Some(IoMode::Auto)), None);
}

#[test]
fn block_size_parsing() {
    assert_eq!(parse_block_size("512\n"), Some(512));
    assert_eq!(parse_block_size("4096"), Some(4096));
    for bad in ["", "0", "511", "1000", "abc", "131072", "-512"] {
        assert_eq!(parse_block_size(bad), None, "{bad:?}");
    }
    assert_eq!(direct_alignment(None), 4096);
    assert_eq!(direct_alignment(Some(512)), 512);
}

#[test]
fn block_size_from_fake_sysfs_walks_to_the_parent_disk() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Disk 8:0 at devices/.../block/sda with a queue; partition 8:1 below it without one.
    let disk = r.join("devices/pci0/block/sda");
    std::fs::create_dir_all(disk.join("queue")).unwrap();
    std::fs::write(disk.join("queue/logical_block_size"), "4096\n").unwrap();
    std::fs::create_dir_all(disk.join("sda1")).unwrap();
    std::fs::write(disk.join("sda1/partition"), "1\n").unwrap();
    std::fs::create_dir_all(r.join("dev/block")).unwrap();
    std::os::unix::fs::symlink(&disk, r.join("dev/block/8:0")).unwrap();
    std::os::unix::fs::symlink(disk.join("sda1"), r.join("dev/block/8:1")).unwrap();
    // A device without queue that is not a partition: unknown.
    let odd = r.join("devices/virtual/odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::os::unix::fs::symlink(&odd, r.join("dev/block/9:0")).unwrap();

    assert_eq!(logical_block_size(r, 8, 0), Some(4096));
    assert_eq!(logical_block_size(r, 8, 1), Some(4096));
    assert_eq!(logical_block_size(r, 9, 0), None);
    assert_eq!(logical_block_size(r, 7, 7), None, "no such device");
    assert_eq!(logical_block_size(r, 0, 42), None, "anonymous device");
}

#[test]
fn block_size_of_this_machines_disk() {
    let dir = disk_dir();
    let md = std::fs::metadata(dir.path()).unwrap();
    use std::os::unix::fs::MetadataExt;
    let (maj, min) = (rustix::fs::major(md.dev()), rustix::fs::minor(md.dev()));
    match logical_block_size(Path::new("/sys"), maj, min) {
        Some(n) => assert!(n.is_power_of_two() && n >= 512),
        None => eprintln!("no sysfs block size for {maj}:{min} (anonymous or virtual device)"),
    }
}

#[test]
fn version_string_changes_with_each_field() {
    let v = version_string(1, 2, 3, 4, 5);
    assert_ne!(v, version_string(9, 2, 3, 4, 5));
    assert_ne!(v, version_string(1, 9, 3, 4, 5));
    assert_ne!(v, version_string(1, 2, 9, 4, 5));
    assert_ne!(v, version_string(1, 2, 3, 9, 5));
    assert_ne!(v, version_string(1, 2, 3, 4, 9));
    assert_eq!(v, version_string(1, 2, 3, 4, 5));
}

#[test]
fn statfs_on_a_regular_file_is_not_nfs() {
    let dir = disk_dir();
    let path = write(dir.path(), "f.bin", &[0u8; 100]);
    let f = std::fs::File::open(&path).unwrap();
    let magic = rustix::fs::fstatfs(&f).unwrap().f_type as u64;
    assert_ne!(magic, 0);
    assert_ne!(fs_kind(magic), FsKind::Nfs);
    let be = LocalBackend::open(&path, &opts(IoMode::Uring)).unwrap();
    assert_eq!(be.fs_kind(), fs_kind(magic));
    let caps = be.capabilities();
    assert_eq!(caps.kind, "local");
    assert_eq!(caps.preferred_chunk, DISK_CHUNK);
    assert_eq!(caps.max_concurrency, DISK_QUEUE_DEPTH);
}

// ---- errors ----

#[test]
fn missing_file_is_not_found_and_names_the_path() {
    let dir = disk_dir();
    let p = dir.path().join("nope.safetensors");
    let p = p.to_str().unwrap();
    for mode in [IoMode::Uring, IoMode::Pread] {
        let e = LocalBackend::open(p, &opts(mode)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains(p), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}

#[test]
fn directory_and_special_files_are_refused() {
    let dir = disk_dir();
    let d = dir.path().to_str().unwrap();
    let e = LocalBackend::open(d, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(
        e.to_string().contains(d) && e.to_string().contains("directory"),
        "{e}"
    );
    let e = LocalBackend::open("/dev/null", &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(
        e.to_string().contains("/dev/null") && e.to_string().contains("device"),
        "{e}"
    );
    let e = LocalBackend::open("", &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn permission_denied_names_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = disk_dir();
    let path = write(dir.path(), "secret.bin", &[1u8; 10]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&path).is_ok() {
        eprintln!(
            "SKIPPED permission_denied_names_the_path: running as root (or with \
             CAP_DAC_OVERRIDE), mode 000 does not block reads"
        );
        return;
    }
    let e = LocalBackend::open(&path, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains(&path), "{e}");
}

// ---- change detection ----

fn read_one(
    reader: &mut Box<dyn RangeReader>,
    offset: u64,
    len: usize,
) -> tensorstream_engine::Result<usize> {
    let buf = IoBuf::aligned(len, 4096).unwrap();
    reader.submit(ReadRequest { id: 1, offset, buf }).unwrap();
    let d = reader.wait().unwrap();
    assert_eq!(d.id, 1);
    d.result
}

/// A same-size rewrite between `stat` and the session (and, with `restore_mtime`, its
/// modification time put back, as `touch -r` or `cp -p` do) makes the session fail as
/// `ObjectChanged`: the version holds the mtime, and the status change time, which no program
/// can set.
fn rewrite_before_the_session_is_object_changed(restore_mtime: bool) {
    let dir = disk_dir();
    let path = write(dir.path(), "m.bin", &pattern(1 << 20, 1));
    for mode in [IoMode::Uring, IoMode::Pread] {
        std::fs::write(&path, pattern(1 << 20, 1)).unwrap();
        let be = Arc::new(LocalBackend::open(&path, &opts(mode)).unwrap());
        let meta = be.stat().unwrap();
        assert!(meta.version.is_some());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, pattern(1 << 20, 2)).unwrap();
        if restore_mtime {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_modified(mtime).unwrap();
            drop(f);
            assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        }
        let r = be.clone().open_reader(&meta, &ReaderOptions::new(4));
        let e = r.err().expect("reader opened on a rewritten file");
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{mode:?}: {e}");
    }
}

#[test]
fn file_changed_before_the_session_is_object_changed() {
    rewrite_before_the_session_is_object_changed(false);
}

#[test]
fn a_rewrite_with_its_mtime_restored_is_object_changed() {
    rewrite_before_the_session_is_object_changed(true);
}

/// Opens `path`, starts a session and reads its first MiB through it.
fn open_and_read_first_mib(
    path: &str,
    mode: IoMode,
) -> (
    Arc<LocalBackend>,
    tensorstream_engine::ObjectMeta,
    Box<dyn RangeReader>,
) {
    let be = Arc::new(LocalBackend::open(path, &opts(mode)).unwrap());
    let meta = be.stat().unwrap();
    let mut r = be
        .clone()
        .open_reader(&meta, &ReaderOptions::new(4))
        .unwrap();
    assert_eq!(read_one(&mut r, 0, 1 << 20).unwrap(), 1 << 20);
    (be, meta, r)
}

#[test]
fn file_truncated_during_the_session_is_object_changed() {
    let dir = disk_dir();
    for mode in [IoMode::Uring, IoMode::Pread] {
        let path = write(dir.path(), &format!("t-{mode:?}.bin"), &pattern(4 << 20, 3));
        let (_be, _meta, mut r) = open_and_read_first_mib(&path, mode);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let e = read_one(&mut r, 3 << 20, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{mode:?}: {e}");
        assert!(e.to_string().contains(&path));
    }
}

// ---- the io_uring reader ----

/// The descriptors of `path`, with O_DIRECT asked for (a freshly written file sits in the page
/// cache, and the default policy would read it buffered, leaving the direct path untested).
fn files_for(path: &str) -> Arc<Files> {
    let o = OpenOptions {
        direct_io: Some(true),
        ..opts(IoMode::Uring)
    };
    let be = LocalBackend::open(path, &o).unwrap();
    be.files.clone()
}

fn guard(files: &Arc<Files>) -> ChangeGuard {
    ChangeGuard::new(files.clone(), files.meta().unwrap())
}

fn uring(files: &Arc<Files>, depth: usize) -> UringReader {
    UringReader::new(files.clone(), depth, guard(files))
        .map_err(|b| b.0)
        .unwrap()
}

/// Reads `reqs` (offset, len, buffer) through `r` and checks every byte against `data`.
fn run_reads(r: &mut dyn RangeReader, data: &[u8], reqs: Vec<(u64, IoBuf)>) -> Vec<IoBuf> {
    let n = reqs.len();
    for (i, (offset, buf)) in reqs.into_iter().enumerate() {
        r.submit(ReadRequest {
            id: i as u64,
            offset,
            buf,
        })
        .unwrap();
    }
    let mut back = Vec::new();
    for _ in 0..n {
        let d = r.wait().unwrap();
        let got = d.result.unwrap();
        let off = d.offset as usize;
        let want = d.buf.len().min(data.len().saturating_sub(off));
        assert_eq!(got, want, "read at {off}");
        assert!(
            got == 0 || d.buf.as_slice()[..got] == data[off..off + got],
            "bytes at {off}"
        );
        back.push(d.buf);
    }
    assert_eq!(r.in_flight(), 0);
    back
}

#[test]
fn uring_uses_o_direct_and_registered_buffers_for_aligned_reads() {
    let dir = disk_dir();
    let data = pattern((8 << 20) + 333, 5);
    let path = write(dir.path(), "d.bin", &data);
    let files = files_for(&path);
    let mut r = uring(&files, 8);
    let a = files.alignment;
    let slots = staging_slots(8, 1 << 20, a.max(4096)).unwrap();
    let refs: Vec<&IoBuf> = slots.iter().collect();
    r.register_buffers(&refs).unwrap();
    let reqs: Vec<(u64, IoBuf)> = slots
        .into_iter()
        .enumerate()
        .map(|(i, b)| ((i as u64) * (1 << 20) + 4096 * 3, b))
        .collect();
    let back = run_reads(&mut r, &data, reqs);
    assert_eq!(back.len(), 8);
    // Whether this filesystem takes O_DIRECT is probed here, not taken from the code under
    // test (which could have failed to open the direct descriptor where it should have).
    use std::os::unix::fs::OpenOptionsExt;
    let direct_works = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_ok();
    // (Memory and NFS filesystems read buffered by design, whatever they accept.)
    let disk = rustix::fs::statfs(path.as_str())
        .map(|s| super::config::fs_kind(s.f_type as u64) == super::FsKind::Disk)
        .unwrap_or(false);
    if disk {
        assert_eq!(files.direct.is_some(), direct_works, "O_DIRECT descriptor");
    }
    let direct_works = direct_works && files.direct.is_some();
    if direct_works {
        assert_eq!(r.counts.direct, 8, "{:?}", r.counts);
        assert_eq!(r.counts.fixed, 8, "{:?}", r.counts);
    } else {
        eprintln!("no O_DIRECT on this filesystem; direct path not asserted");
    }
}

#[test]
fn uring_reads_unaligned_requests_buffered() {
    let dir = disk_dir();
    let data = pattern(1 << 20, 6);
    let path = write(dir.path(), "u.bin", &data);
    let files = files_for(&path);
    let mut r = uring(&files, 4);
    // Unaligned offset, length and address (a window starting 3 bytes into a region).
    let mut whole = IoBuf::aligned(8192, 4096).unwrap();
    let _head = whole.split_to(3).unwrap();
    whole.set_len(1001);
    let back = run_reads(&mut r, &data, vec![(12_345, whole)]);
    assert_eq!(back[0].len(), 1001);
    assert_eq!(r.counts.buffered, 1);
    assert_eq!(r.counts.direct, 0);
}

#[test]
fn uring_over_budget_regions_are_read_unregistered() {
    let dir = disk_dir();
    let data = pattern(1 << 20, 7);
    let path = write(dir.path(), "b.bin", &data);
    let files = files_for(&path);
    let mut r = uring(&files, 4);
    // A region larger than the registration budget (zero pages: costs no memory until written).
    let mut big = IoBuf::aligned(REGISTER_BUDGET + 4096, 4096).unwrap();
    r.register_buffers(&[&big]).unwrap();
    let w = big.split_to(1 << 20).unwrap();
    run_reads(&mut r, &data, vec![(0, w)]);
    assert_eq!(r.counts.fixed, 0);
}

#[test]
fn refused_direct_read_falls_back_to_buffered() {
    let dir = disk_dir();
    let data = pattern(1 << 20, 8);
    let path = write(dir.path(), "e.bin", &data);
    let real = files_for(&path);
    if real.direct.is_none() {
        eprintln!("no O_DIRECT on this filesystem; EINVAL fallback not exercised");
        return;
    }
    // Lie about the alignment (1) so an unaligned read is sent to the O_DIRECT descriptor: the
    // kernel answers EINVAL, and the reader must redo it buffered and stop using O_DIRECT.
    let lying = |real: &Files| {
        Arc::new(Files {
            path: real.path.clone(),
            buffered: real.buffered.try_clone().unwrap(),
            direct: real.direct.as_ref().map(|f| f.try_clone().unwrap()),
            direct_ok: AtomicBool::new(true),
            alignment: 1,
        })
    };
    let mk = || {
        let mut b = IoBuf::aligned(8192, 4096).unwrap();
        let _h = b.split_to(1).unwrap();
        b.set_len(777);
        b
    };
    let f1 = lying(&real);
    let mut r = uring(&f1, 2);
    run_reads(&mut r, &data, vec![(101, mk())]);
    assert!(r.counts.resubmitted >= 1, "{:?}", r.counts);
    assert!(!f1.direct_ok.load(std::sync::atomic::Ordering::Relaxed));
    // Several refused direct reads in the kernel at once: each is redone buffered, not only the
    // first one (which is the one that switches O_DIRECT off).
    let f3 = lying(&real);
    let mut r = uring(&f3, 8);
    let reqs = (0..6).map(|i| (101 + i * 5000, mk())).collect();
    let back = run_reads(&mut r, &data, reqs);
    assert_eq!(back.len(), 6);
    assert!(r.counts.direct >= 2, "{:?}", r.counts);
    assert_eq!(r.counts.resubmitted, r.counts.direct, "{:?}", r.counts);

    let f2 = lying(&real);
    let mut p = PreadReader::new(f2.clone(), 2, guard(&f2)).unwrap();
    run_reads(&mut p, &data, vec![(101, mk())]);
    assert!(!f2.direct_ok.load(std::sync::atomic::Ordering::Relaxed));
}

#[test]
fn dropping_a_reader_with_reads_in_flight_waits_for_them() {
    let dir = disk_dir();
    let data = pattern(16 << 20, 9);
    let path = write(dir.path(), "drop.bin", &data);
    let files = files_for(&path);
    for round in 0..4 {
        let mut r = uring(&files, 32);
        let slots = staging_slots(32, 512 << 10, 4096).unwrap();
        let refs: Vec<&IoBuf> = slots.iter().collect();
        r.register_buffers(&refs).unwrap();
        for (i, b) in slots.into_iter().enumerate() {
            r.submit(ReadRequest {
                id: i as u64,
                offset: (i as u64) * (512 << 10),
                buf: b,
            })
            .unwrap();
        }
        if round % 2 == 1 {
            // Some completions reaped, the rest still in the kernel.
            let _ = r.wait().unwrap();
        }
        assert!(r.in_flight() > 0);
        drop(r); // must block until the kernel is done with every buffer, then free them
    }
    // The process is still sane: a fresh reader reads correct bytes.
    let mut r = uring(&files, 4);
    run_reads(
        &mut r,
        &data,
        vec![(0, IoBuf::aligned(1 << 20, 4096).unwrap())],
    );
}

#[test]
fn empty_and_past_end_requests() {
    let dir = disk_dir();
    let data = pattern(10_000, 10);
    let path = write(dir.path(), "s.bin", &data);
    let files = files_for(&path);
    let mut r = uring(&files, 4);
    let empty = IoBuf::aligned(0, 4096).unwrap();
    let past = IoBuf::aligned(4096, 4096).unwrap();
    let tail = IoBuf::aligned(4096, 4096).unwrap();
    let back = run_reads(
        &mut r,
        &data,
        vec![(0, empty), (1 << 20, past), (8192, tail)],
    );
    assert_eq!(back.len(), 3);
}

#[test]
fn cache_policy_parsing_and_residency_decision() {
    use super::config::{prefer_buffered, CachePolicy};
    assert_eq!(CachePolicy::parse("").unwrap(), CachePolicy::Auto);
    assert_eq!(CachePolicy::parse("always").unwrap(), CachePolicy::Direct);
    assert_eq!(CachePolicy::parse("NEVER").unwrap(), CachePolicy::Buffered);
    assert!(CachePolicy::parse("sometimes").is_err());
    assert!(!prefer_buffered(None));
    assert!(!prefer_buffered(Some(0.0)));
    assert!(!prefer_buffered(Some(0.5)));
    assert!(prefer_buffered(Some(0.75)));
    assert!(prefer_buffered(Some(1.0)));
}

#[test]
fn residency_probe_sees_a_freshly_written_file_as_cached() {
    // A file just written (and read back) is in the page cache; the probe must say so, and the
    // backend then reads it buffered. Where preadv2(RWF_NOWAIT) is unsupported the probe returns
    // None and O_DIRECT stays on.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("warm.bin");
    std::fs::write(&p, vec![7u8; 8 << 20]).unwrap();
    let _ = std::fs::read(&p).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    assert!(super::cached_fraction_of(&dir.path().join("missing.bin")).is_none());
    match super::cached_fraction(&f, 8 << 20) {
        Some(frac) => {
            assert!(frac >= 0.75, "freshly written file only {frac} cached");
            let by_path = super::cached_fraction_of(&p).expect("same probe by path");
            assert!(by_path >= 0.75, "by path: {by_path}");
            let b =
                LocalBackend::open(p.to_str().unwrap(), &crate::OpenOptions::default()).unwrap();
            assert!(
                !b.capabilities().direct_io,
                "warm file should be read buffered"
            );
        }
        None => eprintln!("SKIPPED: preadv2(RWF_NOWAIT) unsupported here"),
    }
}

/// A probe must not warm what the next probe samples: a cold file probed twice (a sharded
/// checkpoint is checked, then loaded; a GPU load probes again to pick its route) stays cold,
/// and a second open still reads it with O_DIRECT. Before, the first probe's non-blocking reads
/// pulled in the very pages the second one sampled, which then said "all cached".
#[test]
fn probing_a_cold_file_twice_does_not_make_it_look_warm() {
    let dir = disk_dir();
    let p = dir.path().join("cold.bin");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&pattern(64 << 20, 9)).unwrap();
        f.sync_all().unwrap();
    }
    let f = std::fs::File::open(&p).unwrap();
    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    let Some(first) = super::cached_fraction(&f, 64 << 20) else {
        eprintln!("SKIPPED: preadv2(RWF_NOWAIT) unsupported here");
        return;
    };
    if first > 0.25 {
        eprintln!("SKIPPED: the page cache could not be dropped for this file ({first} cached)");
        return;
    }
    std::thread::sleep(std::time::Duration::from_millis(200)); // let readahead land
    let second = super::cached_fraction(&f, 64 << 20).unwrap();
    assert!(second < 0.5, "second probe says {second} cached");
    let by_path = super::cached_fraction_of(&p).unwrap();
    assert!(by_path < 0.5, "third probe says {by_path} cached");
    // Two opens of the backend (each probes): both choose O_DIRECT where it is available.
    let a = LocalBackend::open(p.to_str().unwrap(), &OpenOptions::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let b = LocalBackend::open(p.to_str().unwrap(), &OpenOptions::default()).unwrap();
    assert_eq!(
        a.capabilities().direct_io,
        b.capabilities().direct_io,
        "the second open saw the first one's probe"
    );
}

/// The file is rewritten in place (same size) between two reads of a load that reads neither
/// the end of the file nor a whole GiB: the reads do not notice, the engine's last look at the
/// object (`unchanged_since`, run by `execute` after every read landed) does.
#[test]
fn file_rewritten_in_place_during_a_load_is_object_changed() {
    let dir = disk_dir();
    for mode in [IoMode::Uring, IoMode::Pread] {
        let path = write(
            dir.path(),
            &format!("rw-{mode:?}.bin"),
            &pattern(4 << 20, 4),
        );
        let (be, meta, mut r) = open_and_read_first_mib(&path, mode);
        std::thread::sleep(std::time::Duration::from_millis(20)); // a new mtime
        std::fs::write(&path, pattern(4 << 20, 5)).unwrap();
        assert_eq!(read_one(&mut r, 1 << 20, 1 << 20).unwrap(), 1 << 20);
        let e = tensorstream_engine::unchanged_since(be.as_ref(), &meta).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ObjectChanged, "{mode:?}: {e}");
    }
}

#[test]
fn opening_never_blocks_on_a_fifo_and_leaves_regular_files_blocking() {
    use std::os::unix::fs::FileTypeExt;
    let dir = disk_dir();
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let p = fifo.to_str().unwrap().to_string();
    // A plain open of a FIFO waits for a writer; this one must return (on a thread, so that a
    // regression fails the test instead of hanging it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(super::open_nonblocking(&p, 0).map(|f| f.metadata().unwrap()));
    });
    let md = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("opening a FIFO blocked")
        .unwrap();
    assert!(md.file_type().is_fifo());
    // And the backend refuses it, naming it.
    let e = LocalBackend::open(fifo.to_str().unwrap(), &opts(IoMode::Pread)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    // A regular file's descriptor keeps no O_NONBLOCK (io_uring would return EAGAIN).
    let f = dir.path().join("f");
    std::fs::write(&f, [1u8; 10]).unwrap();
    let file = super::open_nonblocking(f.to_str().unwrap(), 0).unwrap();
    let fl = rustix::fs::fcntl_getfl(&file).unwrap();
    assert!(!fl.contains(rustix::fs::OFlags::NONBLOCK), "{fl:?}");
}
