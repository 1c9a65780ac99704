//! Pure decisions of the local backend: filesystem → I/O profile, sysfs block size, I/O mode,
//! version string. No I/O except [`logical_block_size`] (which reads sysfs under a given root).

use std::path::Path;

use crate::{IoMode, OpenOptions};
use tensorstream_engine::{Error, Result};

/// `f_type` of a kernel NFS mount (`NFS_SUPER_MAGIC`).
pub const NFS_SUPER_MAGIC: u64 = 0x6969;
/// `f_type` of tmpfs (`TMPFS_MAGIC`).
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `f_type` of ramfs (`RAMFS_MAGIC`).
pub const RAMFS_MAGIC: u64 = 0x8584_58f6;
/// `f_type` of ext2/3/4 (`EXT4_SUPER_MAGIC`).
pub const EXT4_SUPER_MAGIC: u64 = 0xEF53;
/// `f_type` of XFS (`XFS_SUPER_MAGIC`).
pub const XFS_SUPER_MAGIC: u64 = 0x5846_5342;

/// Default read size on a block device.
pub const DISK_CHUNK: usize = 8 << 20;
/// Default reads in flight on a block device.
pub const DISK_QUEUE_DEPTH: usize = 16;
/// Default read size on NFS (large reads amortise the RPC round trips).
pub const NFS_CHUNK: usize = 16 << 20;
/// Default reads in flight on NFS (latency-bound: keep more requests outstanding).
pub const NFS_QUEUE_DEPTH: usize = 64;
/// Alignment used when the logical block size cannot be determined (always safe).
pub const FALLBACK_ALIGNMENT: usize = 4096;

/// What kind of filesystem a file lives on, as far as I/O strategy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsKind {
    /// A block-device filesystem (ext4, xfs, btrfs, …): O_DIRECT pays off.
    Disk,
    /// Kernel NFS client: buffered reads (the client's readahead and page cache), more in flight,
    /// larger chunks.
    Nfs,
    /// Memory-backed (tmpfs, ramfs): O_DIRECT is useless or unsupported.
    Memory,
}

/// Classifies a filesystem by its `statfs` `f_type` magic.
pub fn fs_kind(magic: u64) -> FsKind {
    match magic {
        NFS_SUPER_MAGIC => FsKind::Nfs,
        TMPFS_MAGIC | RAMFS_MAGIC => FsKind::Memory,
        _ => FsKind::Disk,
    }
}

/// How the local backend reads a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoProfile {
    /// Try O_DIRECT (falls back to buffered when the filesystem refuses it).
    pub direct: bool,
    /// Reads in flight (the backend's `max_concurrency`).
    pub queue_depth: usize,
    /// Preferred read size in bytes.
    pub chunk: usize,
}

/// The profile for a filesystem kind, with the user's overrides applied (zero overrides are
/// ignored).
pub fn io_profile(kind: FsKind, opts: &OpenOptions) -> IoProfile {
    let base = match kind {
        FsKind::Disk => IoProfile {
            direct: true,
            queue_depth: DISK_QUEUE_DEPTH,
            chunk: DISK_CHUNK,
        },
        FsKind::Nfs => IoProfile {
            direct: false,
            queue_depth: NFS_QUEUE_DEPTH,
            chunk: NFS_CHUNK,
        },
        FsKind::Memory => IoProfile {
            direct: false,
            queue_depth: DISK_QUEUE_DEPTH,
            chunk: DISK_CHUNK,
        },
    };
    IoProfile {
        direct: base.direct,
        queue_depth: opts
            .concurrency
            .filter(|&n| n > 0)
            .unwrap_or(base.queue_depth)
            .min(4096),
        chunk: opts.chunk_size.filter(|&n| n > 0).unwrap_or(base.chunk),
    }
}

/// The I/O mode to use: the option wins over the environment; `None` means automatic
/// (io_uring when the kernel allows it, else pread).
pub fn requested_mode(option: Option<IoMode>, env: Option<IoMode>) -> Option<IoMode> {
    match option.or(env) {
        Some(IoMode::Auto) | None => None,
        Some(m) => Some(m),
    }
}

/// Why an explicit request for io_uring fails, and what to ask for instead: the option when it
/// was given (it overrides `TENSORSTREAM_IO`, so changing the variable would not help), else
/// the variable.
pub fn uring_refused(by_option: bool, why: &str) -> String {
    if by_option {
        format!(
            "io_uring was requested (io mode io_uring, `--io io_uring` in the CLI) but is not \
             available ({why}); ask for pread or auto instead (`--io pread`)"
        )
    } else {
        format!(
            "io_uring was requested by TENSORSTREAM_IO but is not available ({why}); set \
             TENSORSTREAM_IO=pread or auto instead"
        )
    }
}

/// Parses a sysfs `logical_block_size` file's content: a power of two between 512 and 64 KiB.
pub fn parse_block_size(text: &str) -> Option<usize> {
    let n: usize = text.trim().parse().ok()?;
    (n.is_power_of_two() && (512..=65536).contains(&n)).then_some(n)
}

/// The logical block size of block device `major:minor`, read from
/// `<sysfs>/dev/block/MAJ:MIN/queue/logical_block_size`; for a partition (which has no `queue/`)
/// from its parent disk. `None` when unknown (no such device, e.g. btrfs/overlay anonymous
/// devices with major 0, or unreadable sysfs).
pub fn logical_block_size(sysfs: &Path, major: u32, minor: u32) -> Option<usize> {
    if major == 0 {
        return None;
    }
    let dev = sysfs.join(format!("dev/block/{major}:{minor}"));
    let read = |p: &Path| {
        std::fs::read_to_string(p.join("queue/logical_block_size"))
            .ok()
            .and_then(|t| parse_block_size(&t))
    };
    if let Some(n) = read(&dev) {
        return Some(n);
    }
    // A partition: /sys/dev/block/M:m → …/block/vda/vda1; the queue lives in the parent.
    let real = std::fs::canonicalize(&dev).ok()?;
    if !real.join("partition").exists() {
        return None;
    }
    read(real.parent()?)
}

/// The alignment for O_DIRECT on a device: its logical block size, or the always-safe fallback.
pub fn direct_alignment(block_size: Option<usize>) -> usize {
    block_size.unwrap_or(FALLBACK_ALIGNMENT)
}

/// The version tag of a file: changes whenever the file is replaced (dev, inode), resized or
/// written (mtime, nanoseconds) — and with its status change time (ctime, nanoseconds), which
/// no program can set back: a rewrite whose mtime was restored (`touch -r`, `cp -p`) still
/// shows. (So does a change of its metadata alone — chmod, chown, a new hard link —: a load
/// that sees one fails with `ObjectChanged`, as for a rewrite.)
pub fn version_string(dev: u64, ino: u64, size: u64, mtime_ns: i128, ctime_ns: i128) -> String {
    format!("{dev:x}:{ino:x}:{size:x}:{mtime_ns:x}:{ctime_ns:x}")
}

/// Whether loads may bypass the page cache (`TENSORSTREAM_DIRECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CachePolicy {
    /// O_DIRECT unless the file is already (mostly) in the page cache. The default.
    Auto,
    /// Always O_DIRECT where the filesystem allows it.
    Direct,
    /// Never O_DIRECT.
    Buffered,
}

impl CachePolicy {
    /// Reads `TENSORSTREAM_DIRECT` (`auto`, `always`/`direct`, `never`/`buffered`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("TENSORSTREAM_DIRECT") {
            Err(_) => Ok(CachePolicy::Auto),
            Ok(v) => Self::parse(&v),
        }
    }
    /// Parses a policy name.
    pub fn parse(v: &str) -> Result<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(CachePolicy::Auto),
            "always" | "direct" | "1" => Ok(CachePolicy::Direct),
            "never" | "buffered" | "0" => Ok(CachePolicy::Buffered),
            o => Err(Error::invalid(format!(
                "TENSORSTREAM_DIRECT={o:?}: expected auto, always or never"
            ))),
        }
    }
}

/// Decision from a page-cache residency probe: read buffered when at least 3/4 of the sampled
/// pages are cached (a warm file), O_DIRECT otherwise or when the probe could not run.
pub fn prefer_buffered(resident_fraction: Option<f64>) -> bool {
    resident_fraction.is_some_and(|f| f >= 0.75)
}
