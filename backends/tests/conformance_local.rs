//! The engine's conformance suite against the local backend, in io_uring and pread mode, on
//! files on disk (under the target dir, so O_DIRECT is exercised) and on /dev/shm (tmpfs: the
//! buffered path). Plus an end-to-end safetensors load through `open` + plan + execute +
//! HostSink with both modes and both layouts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tensorstream_backends::local::{FsKind, LocalBackend};
use tensorstream_backends::{IoMode, OpenOptions};
use tensorstream_engine::format::safetensors::write_header;
use tensorstream_engine::testkit::{self, Fixture};
use tensorstream_engine::*;

struct LocalFixture {
    dir: tempfile::TempDir,
    mode: IoMode,
}

impl LocalFixture {
    fn in_dir(parent: &std::path::Path, mode: IoMode) -> Self {
        std::fs::create_dir_all(parent).unwrap();
        LocalFixture {
            dir: tempfile::Builder::new()
                .prefix("ts-conformance-")
                .tempdir_in(parent)
                .unwrap(),
            mode,
        }
    }
    /// A directory on the disk the build runs on (not tmpfs), so O_DIRECT is used.
    fn on_disk(mode: IoMode) -> Self {
        Self::in_dir(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")), mode)
    }
    fn opts(&self) -> OpenOptions {
        OpenOptions {
            io_mode: Some(self.mode),
            // Files written by the suite sit in the page cache, which would make the automatic
            // policy read them buffered: force O_DIRECT so that path is what gets tested.
            direct_io: Some(true),
            ..OpenOptions::default()
        }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
    fn open(&self, name: &str) -> Result<LocalBackend> {
        let be = LocalBackend::open(&self.path(name), &self.opts())?;
        assert_eq!(be.io_mode(), self.mode, "the requested I/O mode is used");
        Ok(be)
    }
}

impl Fixture for LocalFixture {
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> {
        std::fs::write(self.path(name), data)
            .map_err(|e| Error::from_io(e, "writing fixture file"))?;
        Ok(Arc::new(self.open(name)?))
    }
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(self.open(name)?))
    }
    fn overwrite(&self, name: &str, data: &[u8]) -> Result<()> {
        overwrite_in_place(std::path::Path::new(&self.path(name)), data)
    }
}

/// Rewrites a file in place (same inode) and moves its mtime one second past the old one, so
/// the change shows even within the filesystem's timestamp granularity.
fn overwrite_in_place(path: &std::path::Path, data: &[u8]) -> Result<()> {
    let io = |e| Error::from_io(e, "overwriting fixture file");
    let before = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(io)?;
    std::fs::write(path, data).map_err(io)?;
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(before + std::time::Duration::from_secs(1)))
        .map_err(io)
}

/// Whether the directory is on a filesystem where O_DIRECT is expected to work.
fn expect_direct(fx: &LocalFixture) -> bool {
    let be = fx.create("probe.bin", &[1u8; 4096]).unwrap();
    let caps = be.capabilities();
    if caps.direct_io {
        assert!(caps.alignment >= 512 && caps.alignment.is_power_of_two());
    }
    caps.direct_io
}

#[test]
fn conformance_io_uring_on_disk() {
    let fx = LocalFixture::on_disk(IoMode::Uring);
    let direct = expect_direct(&fx);
    eprintln!("io_uring on disk: O_DIRECT = {direct}");
    testkit::run_all(&fx);
}

#[test]
fn conformance_pread_on_disk() {
    let fx = LocalFixture::on_disk(IoMode::Pread);
    let direct = expect_direct(&fx);
    eprintln!("pread on disk: O_DIRECT = {direct}");
    testkit::run_all(&fx);
}

#[test]
fn target_dir_on_ext4_or_xfs_uses_o_direct() {
    // The development/CI machine builds on ext4; there O_DIRECT must be in use, otherwise the
    // conformance runs above would not have exercised it.
    let fx = LocalFixture::on_disk(IoMode::Uring);
    let be = fx.create("probe.bin", &[1u8; 4096]).unwrap();
    let f = std::fs::File::open(fx.path("probe.bin")).unwrap();
    let magic = rustix::fs::fstatfs(&f).unwrap().f_type as u64;
    use tensorstream_backends::local::config::{EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC};
    if magic == EXT4_SUPER_MAGIC || magic == XFS_SUPER_MAGIC {
        assert!(
            be.capabilities().direct_io,
            "ext4/xfs file not opened O_DIRECT"
        );
    } else {
        eprintln!("target dir is on fs magic {magic:#x}: O_DIRECT not asserted");
    }
}

#[test]
fn conformance_on_dev_shm_is_buffered() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: /dev/shm does not exist here");
        return;
    }
    for mode in [IoMode::Uring, IoMode::Pread] {
        let fx = LocalFixture::in_dir(shm, mode);
        let be = fx.open_probe();
        assert_eq!(be.fs_kind(), FsKind::Memory);
        let caps = be.capabilities();
        assert!(!caps.direct_io, "tmpfs must be read buffered");
        assert_eq!(caps.alignment, 1);
        testkit::run_all(&fx);
    }
}

impl LocalFixture {
    fn open_probe(&self) -> LocalBackend {
        std::fs::write(self.path("probe.bin"), [1u8; 100]).unwrap();
        self.open("probe.bin").unwrap()
    }
}

/// A ~40 MiB safetensors file with tensors of awkward sizes, loaded with the backend's own
/// capabilities (preferred chunk, alignment) as the CLI would.
#[test]
fn end_to_end_safetensors_from_a_local_file() {
    let fx = LocalFixture::on_disk(IoMode::Uring);
    let sizes: Vec<u64> = vec![
        (8 << 20) + 1,
        3,
        0,
        (16 << 20) - 7,
        4096,
        12_345,
        (9 << 20) + 511,
        1,
        (5 << 20) + 4097,
    ];
    let specs: Vec<(String, DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("model.layers.{i}.w"), DType::U8, vec![n], n))
        .collect();
    let mut file = write_header(&specs, &BTreeMap::new()).unwrap();
    let mut expected = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let d = testkit::pattern(n as usize, 1000 + i as u64);
        file.extend_from_slice(&d);
        expected.push(d);
    }
    let path = fx.path("model.safetensors");
    std::fs::write(&path, &file).unwrap();

    for mode in [IoMode::Uring, IoMode::Pread] {
        let opts = OpenOptions {
            io_mode: Some(mode),
            direct_io: Some(true),
            ..OpenOptions::default()
        };
        let be = tensorstream_backends::open(&path, &opts).unwrap();
        let caps = be.capabilities();
        let meta = be.stat().unwrap();
        assert_eq!(meta.size, file.len() as u64);
        let index = format::read_index(be.as_ref(), &meta).unwrap();
        for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
            let mut po = PlanOptions::new(meta.size);
            po.alignment = caps.alignment as u64;
            po.chunk_size = caps.preferred_chunk as u64;
            po.layout = layout;
            let sel: Vec<usize> = (0..index.tensors.len()).collect();
            let plan = Arc::new(plan(&index, &sel, &po).unwrap());
            let eo = EngineOptions {
                queue_depth: caps.max_concurrency,
                ring_budget: 64 << 20,
                progress: None,
                cancel: None,
            };
            let (sink, stats) =
                execute(be.clone(), &meta, plan.clone(), HostSink::new(), &eo).unwrap();
            assert!(stats.bytes_read >= plan.useful_bytes);
            let (arena, _) = sink.into_parts().unwrap();
            let model = HostModel::new(arena, index.clone(), &plan).unwrap();
            assert_eq!(model.len(), sizes.len());
            for (i, d) in expected.iter().enumerate() {
                let t = model.get(&format!("model.layers.{i}.w")).unwrap();
                assert!(t.data == &d[..], "{mode:?} {layout:?}: tensor {i} differs");
            }
        }
    }
}
