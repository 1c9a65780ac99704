//! `inspect`, `load` and `bench`.

use std::io::Read;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};
use tensorstream::backends::redact_uri;
use tensorstream::{Device, Error, LoadedModel, TensorIndex};

use super::{out, parse_device, IoArgs, Progress};

fn shape_str(shape: &[u64]) -> String {
    let v: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", v.join(", "))
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

pub fn inspect(uri: &str, as_json: bool, io: &IoArgs) -> Result<(), Error> {
    let loader = io.loader(uri)?;
    let files = loader.inspect_files()?;
    let sharded = files.iter().any(|f| f.shard.is_some());
    if io.verify {
        // Verification needs the data: read and check every tensor, a group at a time, keeping
        // none (bounded host memory whatever the model's size).
        loader.check_data()?;
    }
    let idx = tensorstream::combined_index(files.iter().map(|f| &f.index))?;
    if as_json {
        let mut tensors = Vec::with_capacity(idx.tensors.len());
        for f in &files {
            for t in &f.index.tensors {
                let mut o = json!({
                    "name": t.name,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "offset": t.range.start,
                    "nbytes": t.nbytes(),
                });
                if let Some(p) = &t.path {
                    o["path"] = json!(p);
                }
                if t.source == tensorstream::engine::TensorSource::Zeros {
                    // A tensorizer "meta" tensor: no stored bytes, loaded as zeros.
                    o["zeros"] = json!(true);
                }
                if let Some(r) = t.role {
                    o["role"] = json!(r.name());
                }
                if let Some(file) = &f.shard {
                    o["shard"] = json!(file);
                }
                tensors.push(o);
            }
        }
        let mut v = json!({
            "verified": io.verify,
            "uri": redact_uri(uri),
            "format": idx.format.name(),
            "version": idx.version,
            "object_size": idx.object_size,
            "header_len": idx.header_len,
            "total_bytes": idx.total_bytes(),
            "metadata": idx.metadata,
            "tensors": tensors,
        });
        if sharded {
            v["shards"] = json!(files
                .iter()
                .filter_map(|f| f.shard.as_ref())
                .collect::<Vec<_>>());
        }
        out!("{v}")?;
        return Ok(());
    }
    if sharded {
        out!(
            "{}: sharded checkpoint, {}, {}, {} of tensor data",
            field(&redact_uri(uri)),
            counted(files.len(), "shard"),
            counted(idx.tensors.len(), "tensor"),
            human(idx.total_bytes())
        )?;
        for f in &files {
            out!()?;
            print_index(&f.uri, &f.index)?;
        }
    } else {
        print_index(&files[0].uri, &idx)?;
    }
    if io.verify {
        out!("every tensor's hashes verified")?;
    }
    Ok(())
}

/// The local path `convert` writes to: a path, or a `file://` URI; other URIs are refused.
pub fn output_path(output: &str) -> Result<std::path::PathBuf, Error> {
    match tensorstream::backends::scheme_of(output).as_deref() {
        None | Some("file") => Ok(tensorstream::backends::local_path(output)?.into()),
        Some(scheme) => Err(Error::invalid(format!(
            "convert writes local files only: {:?} is a {scheme}:// URI (write to a local path, \
             then upload it)",
            tensorstream::backends::redact_uri(output)
        ))),
    }
}

pub fn convert(
    input: &str,
    output: &std::path::Path,
    encrypt_key_file: Option<&std::path::Path>,
    encrypt_password_file: Option<&std::path::Path>,
    as_parameters: bool,
    force: bool,
    io: &IoArgs,
) -> Result<(), Error> {
    use tensorstream::KeySource;
    if output.is_dir() {
        return Err(Error::invalid(format!(
            "the output {} is a directory",
            field(&output.display().to_string())
        )));
    }
    // (A link, even a dangling one, is there too: the output would replace it.)
    if !force && output.symlink_metadata().is_ok() {
        return Err(Error::invalid(format!(
            "{} exists: give --force to replace it",
            field(&output.display().to_string())
        )));
    }
    warn_leftover_partials(output);
    let encrypt = match (encrypt_key_file, encrypt_password_file) {
        (Some(k), _) => {
            Some(KeySource::from_key_path(k).map_err(|e| e.context("--encrypt-key-file"))?)
        }
        (None, Some(p)) => Some(
            KeySource::from_password_path(p).map_err(|e| e.context("--encrypt-password-file"))?,
        ),
        (None, None) => None,
    };
    let started = std::time::Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut loader = io
        .loader(input)?
        .progress(counter.clone())
        .progress_total(total.clone())
        // Without --force, neither an output there now nor one that appears while we convert.
        .replace_output(force);
    if as_parameters {
        if output.extension().is_none_or(|e| e != "tensors") {
            return Err(Error::invalid(
                "--as-parameters applies to .tensors outputs (safetensors has no tensor types)",
            ));
        }
        loader = loader.convert_untyped_as(tensorstream::TensorRole::Parameter);
    }
    let st = {
        let _bar = Progress::start_dynamic("converting", total, counter, io.quiet);
        // Removed on a forced exit too (Ctrl-C twice, or a conversion stuck past the grace).
        let _partial = super::interrupt::PartialOutput::new(output);
        // The library's error for an output that exists names the library's switch: a CLI user
        // is told of --force.
        loader.convert(output, encrypt).map_err(|e| {
            match tensorstream::engine::format::convert::output_taken(&e) {
                Some(what) if !force => {
                    Error::invalid(format!("{what}: give --force to replace it"))
                }
                _ => e,
            }
        })?
    };
    out!(
        "converted {} ({}) to {} in {:.3} s",
        counted(st.tensors, "tensor"),
        human(st.bytes),
        field(&output.display().to_string()),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// Warns of temporary files that earlier conversions to `output` left beside it
/// (`.NAME.partial-XXXXXX`: a conversion killed with SIGKILL, or by a crash, cannot remove its
/// own), naming them and their sizes. They are not removed: another conversion to the same
/// output may be writing one right now.
fn warn_leftover_partials(output: &std::path::Path) {
    let Some(name) = output.file_name() else {
        return;
    };
    let prefix = tensorstream::engine::format::convert::partial_prefix(&name.to_string_lossy());
    let dir = tensorstream::engine::format::convert::output_dir(output);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            // The prefix and tempfile's six random characters.
            let rest = n.strip_prefix(prefix.as_str())?;
            // (ASCII letters and digits only: a name with others is no conversion's.)
            if rest.len() != 6 || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            let m = e.metadata().ok()?;
            m.is_file().then_some((n, m.len()))
        })
        .collect();
    if found.is_empty() {
        return;
    }
    found.sort();
    let total = found.iter().fold(0u64, |a, (_, l)| a.saturating_add(*l));
    let names: Vec<String> = found
        .iter()
        .take(5)
        .map(|(n, l)| format!("{} ({})", field(n), human(*l)))
        .collect();
    super::errln!(
        "tensorstream: warning: {} holds {} left by earlier conversions to {} that did not finish \
         ({} in all): {}{}; remove {} unless another conversion to that output is running",
        field(&dir.display().to_string()),
        counted(found.len(), "partial file"),
        field(&name.to_string_lossy()),
        human(total),
        names.join(", "),
        if found.len() > 5 { ", …" } else { "" },
        if found.len() == 1 { "it" } else { "them" },
    );
}

/// `n` and `word`, in the plural unless `n` is 1 ("1 tensor", "2 tensors").
pub(crate) fn counted(n: impl std::fmt::Display, word: &str) -> String {
    match n.to_string() {
        n if n == "1" => format!("1 {word}"),
        n => format!("{n} {word}s"),
    }
}

/// `s` for one field of a line of text output: every control character (newlines and tabs
/// too) and invisible format character (bidirectional overrides, zero-width spaces) escaped, so that names and metadata taken from a file can neither drive the terminal
/// (escape sequences) nor forge lines. JSON output needs none of this (serde escapes them).
pub(crate) fn field(s: &str) -> std::borrow::Cow<'_, str> {
    use tensorstream::engine::error::is_invisible_format;
    let escaped = |c: char| c.is_control() || is_invisible_format(c);
    // Printable ASCII (nearly every tensor name) needs no look at each character's class.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(s);
    }
    s.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// The terminal columns `s` takes: one per character of printable ASCII (nearly every name,
/// counted without a look at each character's class), else as Unicode says.
fn columns(s: &str) -> usize {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        s.len()
    } else {
        unicode_width::UnicodeWidthStr::width(s)
    }
}

/// `s` followed by spaces up to `w` terminal columns (`{:<w$}` counts characters: a name in
/// CJK characters, two columns each, would push its row's other fields out of line).
fn pad(s: &str, w: usize) -> String {
    let cols = columns(s);
    format!("{s}{}", " ".repeat(w.saturating_sub(cols)))
}

fn print_index(uri: &str, idx: &TensorIndex) -> Result<(), Error> {
    // Columns of the name as printed (escapes included).
    let w = idx
        .tensors
        .iter()
        .map(|t| columns(&field(&t.name)))
        .max()
        .unwrap_or(4)
        .clamp(4, 80);
    out!(
        "{}: {} (version {}), {}, {} of tensor data, {} header",
        field(&redact_uri(uri)),
        idx.format.name(),
        idx.version,
        counted(idx.tensors.len(), "tensor"),
        human(idx.total_bytes()),
        human(idx.header_len)
    )?;
    for (k, v) in &idx.metadata {
        out!("  metadata {} = {}", field(k), field(v))?;
    }
    out!(
        "{}  {:<8}  {:<20}  {:>14}  {:>12}",
        pad("name", w),
        "dtype",
        "shape",
        "offset",
        "nbytes"
    )?;
    let mut zeros = 0;
    for t in &idx.tensors {
        let meta = t.source == tensorstream::engine::TensorSource::Zeros;
        zeros += usize::from(meta);
        out!(
            "{}  {:<8}  {:<20}  {:>14}  {:>12}{}",
            pad(&field(&t.name), w),
            t.dtype.name(),
            shape_str(&t.shape),
            t.range.start,
            t.nbytes(),
            if meta { "  (zeros)" } else { "" }
        )?;
    }
    out!("total {} bytes", idx.total_bytes())?;
    if zeros > 0 {
        let (tensors, store) = if zeros == 1 {
            ("tensor", "stores")
        } else {
            ("tensors", "store")
        };
        out!(
            "(zeros): {zeros} tensorizer meta {tensors} {store} no bytes and load as zeros (a \
             conversion to safetensors writes the zeros)"
        )?;
    }
    Ok(())
}

/// SHA-256 of every loaded tensor, computed on all cores, in file order.
fn digests(model: &LoadedModel) -> Vec<String> {
    let views: Vec<&[u8]> = model.tensors().map(|t| t.data).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(views.len().max(1));
    let mut out = vec![String::new(); views.len()];
    let per = views.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (vs, os) in views.chunks(per).zip(out.chunks_mut(per)) {
            s.spawn(move || {
                for (v, o) in vs.iter().zip(os.iter_mut()) {
                    *o = hex(&Sha256::digest(v));
                }
            });
        }
    });
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn load(
    uri: &str,
    device: &str,
    filters: &[String],
    as_json: bool,
    with_digests: bool,
    io: &IoArgs,
) -> Result<(), Error> {
    let device: Device = parse_device(device)?;
    let counter = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut loader = io
        .loader(uri)?
        .device(device)
        .progress(counter.clone())
        .progress_total(total.clone());
    for f in filters {
        loader = loader.filter_glob(f)?;
    }
    let quiet = io.quiet || as_json;
    // GPU, JSON: bytes of the pinned staging ring on transparent huge pages.
    let mut staging_huge = None;
    let (rows, st, first_tensor, index, shards) = if let Device::Cuda(_) = device {
        let cm = {
            let _bar = Progress::start_dynamic("loading", total, counter, quiet);
            loader.load_cuda()?
        };
        let mut rows = Vec::with_capacity(cm.len());
        for f in cm.files() {
            let m = f.model();
            for t in m.tensors() {
                let sha = if with_digests {
                    // Read back what is on the device and hash it, in bounded host memory.
                    let mut h = Sha256::new();
                    m.read_chunks(&t, 64 << 20, |b| {
                        h.update(b);
                        Ok(())
                    })?;
                    Some(hex(&h.finalize()))
                } else {
                    None
                };
                rows.push(Row {
                    name: t.name.to_string(),
                    dtype: t.dtype.name(),
                    shape: t.shape.to_vec(),
                    offset: t.offset,
                    nbytes: t.len,
                    sha,
                    shard: f.shard().map(str::to_string),
                });
            }
        }
        let st = cm.stats().clone();
        if as_json {
            staging_huge = cm.device().staging_huge_bytes();
        }
        let ft = st.first_tensor.map(|d| d.as_secs_f64());
        let index = cm.index().clone();
        let shards = cm.is_sharded().then(|| {
            cm.files()
                .filter_map(|f| f.shard().map(str::to_string))
                .collect::<Vec<_>>()
        });
        (rows, st, ft, index, shards)
    } else {
        let model = {
            let _bar = Progress::start_dynamic("loading", total, counter, quiet);
            loader.load()?
        };
        let sums = if with_digests {
            Some(digests(&model))
        } else {
            None
        };
        let sharded = model.is_sharded();
        let rows = model
            .files()
            .flat_map(|f| f.tensors().map(move |t| (f.shard(), t)))
            .enumerate()
            .map(|(i, (file, t))| Row {
                name: t.name.to_string(),
                dtype: t.dtype.name(),
                shape: t.shape.to_vec(),
                offset: t.offset,
                nbytes: t.data.len() as u64,
                sha: sums.as_ref().map(|s| s[i].clone()),
                shard: file.map(str::to_string),
            })
            .collect();
        let files: Vec<String> = model
            .files()
            .filter_map(|f| f.shard().map(str::to_string))
            .collect();
        (
            rows,
            model.stats().clone(),
            None,
            model.index().clone(),
            sharded.then_some(files),
        )
    };
    let peak = tensorstream::peak_rss_bytes();
    if as_json {
        let position = index.positions();
        let tensors: Vec<_> = rows
            .iter()
            .map(|r| {
                let mut o = json!({
                    "name": r.name,
                    "dtype": r.dtype,
                    "shape": r.shape,
                    "offset": r.offset,
                    "nbytes": r.nbytes,
                });
                let info = position.get(r.name.as_str()).map(|&i| &index.tensors[i]);
                if let Some(p) = info.and_then(|i| i.path.as_ref()) {
                    o["path"] = json!(p);
                }
                if let Some(s) = &r.sha {
                    o["sha256"] = json!(s);
                }
                if let Some(s) = &r.shard {
                    o["shard"] = json!(s);
                }
                o
            })
            .collect();
        let mut v = json!({
            "uri": redact_uri(uri),
            "device": device.to_string(),
            "format": index.format.name(),
            "tensors": tensors,
            "bytes": st.tensor_bytes,
            "bytes_read": st.bytes_read,
            "reads": st.reads,
            "seconds": st.elapsed.as_secs_f64(),
            "gbps": st.gbps(),
            "peak_rss_bytes": peak,
            "first_tensor_seconds": first_tensor,
            "device_open_seconds": if let Device::Cuda(_) = device { Some(st.device_open.as_secs_f64()) } else { None },
            "device_context_seconds": if let Device::Cuda(_) = device { Some(st.device_context.as_secs_f64()) } else { None },
            "device_alloc_seconds": if let Device::Cuda(_) = device { Some(st.device_alloc.as_secs_f64()) } else { None },
            "io_seconds": st.io_elapsed.as_secs_f64(),
            "staging_page_locked": st.staging_page_locked,
            "staging_huge_page_bytes": staging_huge,
            "route": st.route,
            "backend": st.backend,
            "direct_io": st.direct_io,
            "queue_depth": st.queue_depth,
            "chunk_size": st.chunk_size,
        });
        if let Some((registered, pread)) = st.mapped_pieces {
            v["mapped_pieces_registered"] = json!(registered);
            v["mapped_pieces_pread"] = json!(pread);
        }
        if let Some(files) = &shards {
            v["shards"] = json!(files);
        }
        out!("{v}")?;
        return Ok(());
    }
    out!(
        "loaded {}{} to {device}, {} in {:.3} s: {:.2} GB/s ({} backend{}, {} of up to {}, queue depth {})",
        counted(rows.len(), "tensor"),
        shards
            .as_ref()
            .map(|f| format!(" from {}", counted(f.len(), "shard")))
            .unwrap_or_default(),
        human(st.tensor_bytes),
        st.elapsed.as_secs_f64(),
        st.gbps(),
        st.backend,
        if st.direct_io { ", O_DIRECT" } else { "" },
        counted(st.reads, "read"),
        human(st.chunk_size),
        st.queue_depth
    )?;
    if let Some(f) = first_tensor {
        out!(
            "first tensor on the device after {:.3} s (opening the device took {:.3} s before that)",
            f,
            st.device_open.as_secs_f64()
        )?;
    }
    if let Some(p) = peak {
        let beyond = if let Device::Cuda(_) = device {
            p
        } else {
            p.saturating_sub(st.tensor_bytes)
        };
        out!(
            "peak RSS {} ({} beyond the tensors' host bytes)",
            human(p),
            human(beyond)
        )?;
    }
    for r in &rows {
        if let Some(d) = &r.sha {
            out!("{d}  {}", field(&r.name))?;
        }
    }
    Ok(())
}

struct Row {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offset: u64,
    nbytes: u64,
    sha: Option<String>,
    /// The shard file it came from (sharded checkpoints).
    shard: Option<String>,
}

/// Drops the page cache (root only).
pub fn drop_caches() -> Result<(), Error> {
    // Flush dirty pages first so they can be dropped (the system call: no `sync` program
    // looked up in $PATH, which a root shell may not control).
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").map_err(|e| {
        Error::from_io(
            e,
            "cannot drop the page cache (writing /proc/sys/vm/drop_caches needs root)",
        )
    })
}

/// Plain buffered read of the whole file in 16 MiB pieces (constant memory, unlike fs::read).
fn buffered_read(path: &str) -> Result<u64, Error> {
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::from_io(e, "open").with_location(path))?;
    let mut buf = vec![0u8; 16 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::from_io(e, "read").with_location(path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

fn line(name: &str, bytes: u64, secs: f64, cold: bool) -> Result<(), Error> {
    line_on(name, bytes, secs, cold, None)
}

/// A bench line; `device` (a GPU load's) is added when given.
fn line_on(
    name: &str,
    bytes: u64,
    secs: f64,
    cold: bool,
    device: Option<&str>,
) -> Result<(), Error> {
    let gbps = if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    };
    let mut j = json!({"name": name, "secs": secs, "gbps": gbps, "bytes": bytes, "cold": cold});
    if let Some(d) = device {
        j["device"] = json!(d);
    }
    out!("{j}")
}

pub fn bench(
    uri: &str,
    device: &str,
    cold: bool,
    warm: bool,
    repeat: usize,
    io: &IoArgs,
) -> Result<(), Error> {
    let device: Device = parse_device(device)?;
    let (cold, warm) = if !cold && !warm {
        (false, true)
    } else {
        (cold, warm)
    };
    let loader = io.loader(uri)?;
    let is_file = matches!(
        tensorstream::backends::scheme_of(uri).as_deref(),
        None | Some("file")
    );
    if cold && !is_file {
        return Err(Error::invalid(format!(
            "--cold drops this machine's page cache, which does not make {} cold: use it with \
             local files",
            redact_uri(uri)
        )));
    }
    let repeat = repeat.max(1);
    // The files a load reads: one, or a sharded checkpoint's shards (the baselines read them
    // all, one after another).
    let files = loader.inspect_files()?;
    let paths: Vec<String> = if is_file {
        files
            .iter()
            .map(|f| tensorstream::backends::local_path(&f.uri).map(str::to_string))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    if cold {
        // Pages of a memory file system are the file itself: no cache to drop.
        for p in &paths {
            let memory = rustix::fs::statfs(p.as_str()).is_ok_and(|st| {
                tensorstream::backends::local::config::fs_kind(st.f_type as u64)
                    == tensorstream::backends::local::FsKind::Memory
            });
            if memory {
                return Err(Error::invalid(format!(
                    "--cold: {} is on a memory file system (tmpfs, ramfs), whose pages cannot \
                     be dropped: every run would read from memory",
                    field(p)
                )));
            }
        }
    }
    // A GPU bench's device handle, opened by its first load.
    let mut gpu: Option<Arc<tensorstream::cuda::CudaDevice>> = None;
    let mut modes = Vec::new();
    if cold {
        modes.push(true);
    }
    if warm {
        modes.push(false);
    }
    for &is_cold in &modes {
        if !is_cold {
            for path in &paths {
                buffered_read(path)?; // populate the page cache
            }
            // One untimed load first: the first load of a process runs slower (its threads,
            // the allocator's first mappings, the CPU's clock still rising), and a warm figure
            // is about the steady state.
            match device {
                Device::Cpu => drop(loader.load()?),
                _ => {
                    let l = match &gpu {
                        Some(dev) => loader.clone().on_device(Arc::clone(dev)),
                        None => loader.clone().device(device),
                    };
                    let cm = l.load_cuda()?;
                    gpu.get_or_insert_with(|| cm.device().clone());
                    cm.release()?;
                }
            }
        }
        for _ in 0..repeat {
            if is_cold {
                drop_caches()?;
            }
            match device {
                Device::Cpu => {
                    let t = Instant::now();
                    let m = loader.load()?;
                    let secs = t.elapsed().as_secs_f64();
                    line("tensorstream", m.stats().tensor_bytes, secs, is_cold)?;
                    drop(m);
                }
                _ => {
                    // The device is opened by the first load and reused (its opening — driver,
                    // context, pinned ring — is not in any timing, as in `load`'s seconds:
                    // from after the device is open to the last tensor on it).
                    let l = match &gpu {
                        Some(dev) => loader.clone().on_device(Arc::clone(dev)),
                        None => loader.clone().device(device),
                    };
                    let cm = l.load_cuda()?;
                    let st = cm.stats().clone();
                    gpu.get_or_insert_with(|| cm.device().clone());
                    cm.release()?;
                    let name = device.to_string();
                    let secs = st.elapsed.as_secs_f64();
                    line_on("tensorstream", st.tensor_bytes, secs, is_cold, Some(&name))?;
                }
            }
            if !is_file {
                continue;
            }
            if is_cold {
                // Raw reads of the disk: one at a time (like dd) and 16 in flight (tensorstream's
                // default queue depth).
                for (name, threads) in [("o_direct_read_16m", 1), ("o_direct_read_16m_x16", 16)] {
                    drop_caches()?;
                    let t = Instant::now();
                    let mut n = 0;
                    for path in &paths {
                        n += tensorstream::backends::local::raw_direct_read(
                            std::path::Path::new(path),
                            threads,
                            16 << 20,
                        )?;
                    }
                    line(name, n, t.elapsed().as_secs_f64(), true)?;
                }
                drop_caches()?;
            }
            let t = Instant::now();
            let mut read = Vec::with_capacity(paths.len());
            for path in &paths {
                read.push(
                    std::fs::read(path)
                        .map_err(|e| Error::from_io(e, "read").with_location(path))?,
                );
            }
            let secs = t.elapsed().as_secs_f64();
            let n = read.iter().map(|v| v.len() as u64).sum();
            line("std_fs_read", n, secs, is_cold)?;
            // Freed after the timing, as a caller of fs::read would keep the bytes.
            drop(read);
        }
    }
    Ok(())
}
