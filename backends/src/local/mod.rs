//! Local files: io_uring with O_DIRECT and registered buffers, or a `pread` thread pool.
//!
//! # How a file is read
//! * At [`LocalBackend::open`] the file is opened twice: buffered (for `stat`, `read_at` and
//!   unaligned reads) and, on block-device filesystems, with `O_DIRECT` (bulk reads bypass the
//!   page cache). If the filesystem refuses `O_DIRECT` (`EINVAL`) the backend reads
//!   buffered. On tmpfs/ramfs and kernel NFS ([`config::fs_kind`] on the `fstatfs` magic) it reads
//!   buffered from the start; NFS also gets larger chunks and more reads in flight.
//! * With `O_DIRECT`, [`Capabilities::alignment`] is the device's logical block size from sysfs
//!   (4096 when unknown), and reader sessions send every read whose offset, length and buffer are
//!   aligned to it through the direct descriptor; anything else goes through the buffered one, and
//!   an `EINVAL` from a direct read switches the backend to buffered reads (a warning is logged
//!   once). [`Backend::read_at`] always reads buffered and accepts any buffer (the format reader
//!   reads metadata through it with plain `Vec`s).
//! * Reader sessions ([`Backend::open_reader`]) use io_uring ([`IoMode::Uring`], the module
//!   `uring`, the only one with `unsafe` in this crate) or a pool of `pread` threads
//!   ([`IoMode::Pread`]). The pread pool uses the same descriptors and alignment rules, so both
//!   modes accept the same (O_DIRECT-aligned) plans and read the same bytes. The mode comes from
//!   [`OpenOptions::io_mode`], else `TENSORSTREAM_IO`, else io_uring when the kernel allows it
//!   (probed once per process; disabled by sysctl or seccomp → pread, reported once).
//! * The version of the file is `dev:inode:size:mtime_ns:ctime_ns`. A reader session checks it with
//!   `fstat` when it opens, whenever a read comes back short or reaches the end of the object, and
//!   after every GiB read; a change fails that read with [`ErrorKind::ObjectChanged`].

#![deny(unsafe_code)]

#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
mod reader;
#[cfg(test)]
#[forbid(unsafe_code)]
mod tests;
mod uring;

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tensorstream_engine::{
    Backend, Capabilities, Error, ErrorKind, ObjectMeta, RangeReader, ReaderOptions, Result,
};

use crate::{IoMode, OpenOptions};
pub use config::FsKind;

/// The version tag [`LocalBackend`] reports for a file with this `fstat` (device, inode, size,
/// mtime, ctime): compare it with [`ObjectMeta::version`] to tell whether another descriptor of the
/// path still shows the same file, unchanged.
pub fn file_version(md: &std::fs::Metadata) -> String {
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    config::version_string(
        md.dev(),
        md.ino(),
        md.len(),
        ns(md.mtime(), md.mtime_nsec()),
        ns(md.ctime(), md.ctime_nsec()),
    )
}

/// The descriptors of one open file, shared by the backend and its reader sessions.
#[derive(Debug)]
pub(crate) struct Files {
    /// The path as the user gave it (for messages).
    pub path: String,
    /// Buffered descriptor: `stat`, `read_at`, unaligned reads.
    pub buffered: File,
    /// `O_DIRECT` descriptor, when the filesystem accepted it.
    pub direct: Option<File>,
    /// Cleared when a direct read failed with `EINVAL`: everything goes buffered from then on.
    pub direct_ok: AtomicBool,
    /// Alignment of offset, length and address that direct reads need.
    pub alignment: usize,
}

impl Files {
    /// Size and version of the open file, from `fstat`.
    pub fn meta(&self) -> Result<ObjectMeta> {
        let md = self
            .buffered
            .metadata()
            .map_err(|e| Error::from_io(e, "fstat").with_location(&self.path))?;
        Ok(ObjectMeta {
            size: md.len(),
            version: Some(file_version(&md)),
        })
    }

    /// True when a read at `offset` of `len` bytes into `addr` may use the direct descriptor.
    pub fn direct_fits(&self, offset: u64, addr: usize, len: usize) -> bool {
        let a = self.alignment;
        self.direct.is_some()
            && self.direct_ok.load(std::sync::atomic::Ordering::Relaxed)
            && offset.is_multiple_of(a as u64)
            && addr.is_multiple_of(a)
            && len.is_multiple_of(a)
    }

    /// Switches to buffered reads after the kernel refused a direct read; says so once.
    pub fn disable_direct(&self, why: &str) {
        if self
            .direct_ok
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            log::warn!(
                "{}: O_DIRECT read refused ({why}); reading buffered from now on",
                self.path
            );
        }
    }
}

/// A raw-read baseline for benchmarks (`bench --cold`, the GPU check): reads the whole file at
/// `path` with O_DIRECT in `piece`-byte reads (a multiple of 4096) on `threads` threads, each
/// into its own aligned buffer, continuing short reads; returns the bytes read. No engine, no
/// io_uring: what plain threads of `pread` get from the disk.
pub fn raw_direct_read(path: &std::path::Path, threads: usize, piece: usize) -> Result<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    if piece == 0 || !piece.is_multiple_of(4096) {
        return Err(Error::invalid(format!(
            "raw read piece of {piece} bytes is not a positive multiple of 4096"
        )));
    }
    let loc = path.display().to_string();
    // Non-blocking open: a FIFO given by mistake must not hang the open (it is refused below).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::from_io(e, "open O_DIRECT").with_location(&loc))?;
    let md = f
        .metadata()
        .map_err(|e| Error::from_io(e, "stat").with_location(&loc))?;
    if !md.is_file() {
        return Err(Error::invalid("not a regular file").with_location(&loc));
    }
    let len = md.len();
    let next = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, 1024))
            .map(|_| {
                std::thread::Builder::new().spawn_scoped(s, || -> Result<()> {
                    let mut buf = tensorstream_engine::IoBuf::aligned(piece, 4096)?;
                    loop {
                        let off = next.fetch_add(piece as u64, Ordering::Relaxed);
                        if off >= len {
                            return Ok(());
                        }
                        // The whole piece (or up to the end): a short read is continued. Short
                        // reads below the end come back in whole blocks, so the rest stays
                        // aligned for O_DIRECT.
                        let want = (piece as u64).min(len - off) as usize;
                        let mut got = 0usize;
                        while got < want {
                            let n = f
                                .read_at(&mut buf.as_mut_slice()[got..], off + got as u64)
                                .map_err(|e| {
                                    Error::from_io(e, "read O_DIRECT").with_location(&loc)
                                })?;
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                        // (A file that grew meanwhile counts only its size at the start.)
                        total.fetch_add(got.min(want) as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w {
                Ok(w) => w
                    .join()
                    .unwrap_or_else(|_| Err(Error::invalid("O_DIRECT read thread panicked"))),
                Err(e) => Err(Error::from_io(e, "starting an O_DIRECT read thread")),
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(total.load(Ordering::Relaxed))
}

/// A local file, read with io_uring (O_DIRECT, registered buffers) or a pread thread pool.
#[derive(Debug)]
pub struct LocalBackend {
    files: Arc<Files>,
    caps: Capabilities,
    mode: IoMode,
    /// The mode was asked for explicitly (option or environment): no silent fallback.
    strict_mode: bool,
    fs_kind: FsKind,
}

/// The fraction of `path`'s pages in the page cache, from 64 sampled pages read with
/// `preadv2(RWF_NOWAIT)` (which fails with `EAGAIN` instead of going to the disk); `None` where
/// the kernel cannot tell (or the file cannot be opened). Unlike `mincore` on a mapping, this
/// sees the real page cache also in sandboxes that pretend every mapped page is resident.
pub fn cached_fraction_of(path: &std::path::Path) -> Option<f64> {
    let f = open_nonblocking(path, 0).ok()?;
    let md = f.metadata().ok()?;
    if !md.is_file() {
        return None;
    }
    let size = md.len();
    cached_fraction(&f, size)
}

/// Fraction of 64 sampled 4 KiB pages of the file that are in the page cache (see
/// [`cached_fraction_of`]).
///
/// A non-blocking read of a page that is not cached still starts reading it in (and, by default,
/// a readahead window around it), so a probe at fixed offsets would find the previous probe's
/// pages and call a cold file warm — as a load does when it probes twice (a sharded
/// checkpoint's check and load, a GPU load's route choice after the open). So each probe picks
/// a random page in each of the 64 equal parts of the file, and reads with readahead turned off
/// on this descriptor (`POSIX_FADV_RANDOM`, reset to normal afterwards): a probe brings in at
/// most its own 64 pages. In a large file a later probe rarely samples one of them again (each
/// part holds thousands of pages); in a small one (under a few MiB, where a part is a handful
/// of pages) it may, so a small cold file can read as partly cached after being probed — it is
/// then read buffered, which for so few bytes costs little.
fn cached_fraction(file: &File, size: u64) -> Option<f64> {
    use std::hash::{BuildHasher, Hasher};
    const SAMPLES: u64 = 64;
    const PAGE: u64 = 4096;
    if size == 0 {
        return None;
    }
    // Random per probe (a fresh RandomState has fresh keys), no extra dependency.
    let seed = std::collections::hash_map::RandomState::new();
    let pages = size.div_ceil(PAGE);
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random);
    let mut page = [0u8; PAGE as usize];
    let mut hits = 0u64;
    let mut supported = true;
    for i in 0..SAMPLES {
        // Pages [first, end) are part i of the file.
        let first = pages * i / SAMPLES;
        let end = (pages * (i + 1) / SAMPLES).max(first + 1);
        let mut h = seed.build_hasher();
        h.write_u64(i);
        let off = (first + h.finish() % (end - first)) * PAGE;
        let mut bufs = [std::io::IoSliceMut::new(&mut page)];
        match rustix::io::preadv2(file, &mut bufs, off, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(_) => hits += 1,
            Err(rustix::io::Errno::AGAIN) => {}
            Err(_) => {
                supported = false;
                break;
            }
        }
    }
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Normal);
    supported.then(|| hits as f64 / SAMPLES as f64)
}

fn open_error(e: std::io::Error, path: &str) -> Error {
    // The OS's own words follow ("No such file or directory", "Permission denied").
    Error::from_io(e, "cannot open")
        .with_location(path)
        .with_backend("local")
}

fn check_type(md: &std::fs::Metadata, path: &str) -> Result<()> {
    let ft = md.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let what = if ft.is_dir() {
        "is a directory, not a file"
    } else if ft.is_block_device() || ft.is_char_device() {
        "is a device, not a regular file"
    } else if ft.is_fifo() {
        "is a FIFO, not a regular file"
    } else if ft.is_socket() {
        "is a socket, not a regular file"
    } else {
        "is not a regular file"
    };
    Err(Error::new(ErrorKind::InvalidInput, what)
        .with_location(path)
        .with_backend("local"))
}

/// Opens `path` read-only with `flags`, never blocking in the open itself (`O_NONBLOCK`, which
/// is then cleared: io_uring would hand back `EAGAIN` for reads of a non-blocking descriptor
/// instead of waiting for the disk).
pub(crate) fn open_nonblocking(
    path: impl AsRef<std::path::Path>,
    flags: i32,
) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NONBLOCK)
        .open(path)?;
    let fl = rustix::fs::fcntl_getfl(&f)?;
    rustix::fs::fcntl_setfl(&f, fl - rustix::fs::OFlags::NONBLOCK)?;
    Ok(f)
}

impl LocalBackend {
    /// Opens `path` for reading. Fails with `NotFound` / `PermissionDenied` naming the path, and
    /// refuses directories and special files (devices, FIFOs, sockets).
    pub fn open(path: &str, opts: &OpenOptions) -> Result<Self> {
        if path.is_empty() {
            return Err(Error::invalid("empty path"));
        }
        // Check the type before opening (for the error's words), and open without blocking:
        // a path replaced by a FIFO in between would otherwise block the open until a writer
        // came. The descriptor's own type is checked next.
        let md = std::fs::metadata(path).map_err(|e| open_error(e, path))?;
        check_type(&md, path)?;
        let buffered = open_nonblocking(path, 0).map_err(|e| open_error(e, path))?;
        let fmd = buffered.metadata().map_err(|e| open_error(e, path))?;
        check_type(&fmd, path)?;

        let magic = match rustix::fs::fstatfs(&buffered) {
            Ok(s) => s.f_type as u64,
            Err(_) => 0, // unknown: treat as a disk, O_DIRECT falls back by itself if refused
        };
        let fs_kind = config::fs_kind(magic);
        let profile = config::io_profile(fs_kind, opts);

        // A file that already sits in the page cache loads faster buffered (memory speed) than
        // with O_DIRECT (disk speed): probe residency with non-blocking reads and decide.
        let cache_policy = match opts.direct_io {
            Some(true) => config::CachePolicy::Direct,
            Some(false) => config::CachePolicy::Buffered,
            None => config::CachePolicy::from_env()?,
        };
        let resident = if profile.direct && cache_policy == config::CachePolicy::Auto {
            cached_fraction(&buffered, fmd.len())
        } else {
            None
        };
        let use_direct = profile.direct
            && match cache_policy {
                config::CachePolicy::Auto => !config::prefer_buffered(resident),
                config::CachePolicy::Direct => true,
                config::CachePolicy::Buffered => false,
            };
        let direct = if use_direct {
            open_nonblocking(path, libc::O_DIRECT).ok()
        } else {
            None
        };
        // The O_DIRECT descriptor is a second open of the path: if the file was replaced in
        // between (a rename over it), it would read another file than the one whose header and
        // version the load uses.
        if let Some(d) = &direct {
            let dmd = d
                .metadata()
                .map_err(|e| Error::from_io(e, "fstat").with_location(path))?;
            if (dmd.dev(), dmd.ino()) != (fmd.dev(), fmd.ino()) {
                return Err(Error::new(
                    ErrorKind::ObjectChanged,
                    "the file was replaced while it was being opened; try again",
                )
                .with_location(path)
                .with_backend("local"));
            }
        }
        let alignment = if direct.is_some() {
            let dev = fmd.dev();
            config::direct_alignment(config::logical_block_size(
                std::path::Path::new("/sys"),
                rustix::fs::major(dev),
                rustix::fs::minor(dev),
            ))
        } else {
            1
        };

        // The option wins over the variable, which is not even read when the option is given
        // (`Some(IoMode::Auto)` included).
        let env = match opts.io_mode {
            Some(_) => None,
            None => IoMode::from_env()?,
        };
        let requested = config::requested_mode(opts.io_mode, env);
        let mode = match requested {
            Some(IoMode::Pread) => IoMode::Pread,
            Some(IoMode::Uring) => {
                uring::available().map_err(|why| {
                    Error::unsupported(config::uring_refused(opts.io_mode.is_some(), &why))
                        .with_location(path)
                        .with_backend("local")
                })?;
                IoMode::Uring
            }
            // A file already in the page cache is a memcpy out of it: io_uring does those copies
            // inline on the submitting thread, a pool of pread threads on every core (criterion,
            // warm 256 MiB: 2.46 GiB/s pread vs 1.41 io_uring on 2 cores). Cold files go to
            // io_uring (O_DIRECT, deep queue).
            None | Some(IoMode::Auto) if config::prefer_buffered(resident) => IoMode::Pread,
            None | Some(IoMode::Auto) => match uring::available() {
                Ok(()) => IoMode::Uring,
                Err(why) => {
                    uring::note_unavailable(&why);
                    IoMode::Pread
                }
            },
        };

        let caps = Capabilities {
            ranged_reads: true,
            direct_io: direct.is_some(),
            alignment,
            preferred_chunk: profile.chunk,
            max_concurrency: profile.queue_depth,
            kind: "local",
            kernel_reads: true,
        };
        Ok(LocalBackend {
            files: Arc::new(Files {
                path: path.to_string(),
                buffered,
                direct,
                direct_ok: AtomicBool::new(true),
                alignment: alignment.max(1),
            }),
            caps,
            mode,
            strict_mode: requested.is_some(),
            fs_kind,
        })
    }

    /// The I/O engine reader sessions use.
    pub fn io_mode(&self) -> IoMode {
        self.mode
    }

    /// The filesystem class the file lives on (decides the profile).
    pub fn fs_kind(&self) -> FsKind {
        self.fs_kind
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> &str {
        &self.files.path
    }

    fn stat(&self) -> Result<ObjectMeta> {
        self.files.meta().map_err(|e| e.with_backend("local"))
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        reader::pread_full(&self.files.buffered, offset, buf)
            .map_err(|e| e.with_location(&self.files.path).with_backend("local"))
    }

    fn open_reader(
        self: Arc<Self>,
        meta: &ObjectMeta,
        opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        let mut guard = reader::ChangeGuard::new(self.files.clone(), meta.clone());
        guard.check()?;
        let depth = opts.queue_depth.clamp(1, 4096);
        match self.mode {
            IoMode::Uring => match uring::UringReader::new(self.files.clone(), depth, guard) {
                Ok(r) => Ok(Box::new(r)),
                Err(failed) => {
                    let (e, guard) = *failed;
                    // The ring itself could not be set up (e.g. locked-memory limit on old
                    // kernels): fall back to pread, loudly, unless uring was demanded.
                    if self.strict_mode {
                        return Err(e.with_location(&self.files.path));
                    }
                    uring::note_unavailable(&e.to_string());
                    Ok(Box::new(
                        reader::PreadReader::new(self.files.clone(), depth, guard)?
                            .cancelled_by(opts.cancel.clone()),
                    ))
                }
            },
            // (`Auto` is resolved at open and never stored: it is here only for the match.)
            IoMode::Pread | IoMode::Auto => Ok(Box::new(
                reader::PreadReader::new(self.files.clone(), depth, guard)?
                    .cancelled_by(opts.cancel.clone()),
            )),
        }
    }
}
