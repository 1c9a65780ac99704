//! `tensorstream demo`: the embedded main job.
//!
//! Writes a model-shaped safetensors file (bf16, a few hundred tensors laid out like a decoder
//! transformer), loads it through the engine, verifies every tensor byte for byte, and prints the
//! throughput next to `std::fs::read` of the same file measured in the same run.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use tensorstream::engine::format::safetensors::write_header;
use tensorstream::{DType, Error, ErrorKind};

use super::{out, IoArgs, Progress};

/// Tensors (name, shape) of a decoder model whose bf16 weights total about `target` bytes (a
/// little less: whole layers). Small targets get a smaller hidden size and vocabulary, so that the
/// embeddings take at most half of the target.
pub fn model_shape(target: u64) -> Vec<(String, Vec<u64>)> {
    let dims = [
        (2048u64, 32000u64),
        (1024, 32000),
        (512, 16000),
        (256, 8000),
    ];
    let (hidden, vocab) = dims
        .iter()
        .copied()
        .filter(|&(h, _)| h < 2048 || target >= 4 << 30)
        .find(|&(h, v)| 2 * (2 * v * h) <= target / 2)
        .unwrap_or((256, 8000));
    let inter = hidden * 11 / 4;
    let per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden);
    let embed = 2 * vocab * hidden;
    let layers = (target.saturating_sub(2 * embed) / per_layer).max(1);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{p}.self_attn.{n}.weight"), vec![hidden, hidden]));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
        t.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
    }
    t.push(("model.norm.weight".to_string(), vec![hidden]));
    t.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    t
}

/// Deterministic pseudo-random content of tensor `seed`, starting at byte `offset`
/// (`offset` and `buf.len()` multiples of 8 except possibly the last piece).
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (word, chunk) in (offset / 8..).zip(buf.chunks_mut(8)) {
        // splitmix64 of (seed, word index): position-addressable, so verification can regenerate
        // any piece independently.
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(word.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Writes the demo model to `path`; returns (tensor count, data bytes).
pub fn write_model(
    path: &std::path::Path,
    target: u64,
    quiet: bool,
) -> Result<(usize, u64), Error> {
    let shape = model_shape(target);
    let tensors: Vec<(String, DType, Vec<u64>, u64)> = shape
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                DType::BF16,
                s.clone(),
                2 * s.iter().product::<u64>(),
            )
        })
        .collect();
    let total: u64 = tensors.iter().map(|t| t.3).sum();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("generator".to_string(), "tensorstream demo".to_string());
    let header = write_header(&tensors, &meta)?;
    let f = std::fs::File::create(path)
        .map_err(|e| Error::from_io(e, "create").with_location(path.display().to_string()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
    let io_err = |e| Error::from_io(e, "write").with_location(path.display().to_string());
    w.write_all(&header).map_err(io_err)?;
    let counter = Arc::new(AtomicU64::new(0));
    let _bar = Progress::start("writing", total, counter.clone(), quiet);
    let mut buf = vec![0u8; 4 << 20];
    let cancel = super::interrupt::flag();
    for (i, t) in tensors.iter().enumerate() {
        let mut off = 0u64;
        while off < t.3 {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    "demo cancelled while writing",
                ));
            }
            let n = ((t.3 - off) as usize).min(buf.len());
            fill(i as u64, off, &mut buf[..n]);
            w.write_all(&buf[..n]).map_err(io_err)?;
            off += n as u64;
            counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let f = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    f.sync_all().map_err(io_err)?;
    // A signal during the flush or the sync (seconds, for a large model) still stops the
    // write: the model is not complete until this returns (and `demo --keep` keeps it only then).
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::new(
            ErrorKind::Cancelled,
            "demo cancelled while writing",
        ));
    }
    Ok((tensors.len(), total))
}

/// Checks a piece of a loaded tensor that starts at byte `offset` (a multiple of 8) against the
/// generator; returns the first differing byte within the piece.
pub fn verify_at(seed: u64, offset: u64, data: &[u8]) -> Option<usize> {
    let mut buf = vec![0u8; data.len().min(1 << 20)];
    let mut off = 0usize;
    while off < data.len() {
        let n = (data.len() - off).min(buf.len());
        fill(seed, offset + off as u64, &mut buf[..n]);
        if buf[..n] != data[off..off + n] {
            let k = buf[..n]
                .iter()
                .zip(&data[off..off + n])
                .position(|(a, b)| a != b);
            return Some(off + k.unwrap_or(0));
        }
        off += n;
    }
    None
}

/// Checks one loaded tensor against the generator; returns the first differing byte.
pub fn verify(seed: u64, data: &[u8]) -> Option<usize> {
    verify_at(seed, 0, data)
}

/// Largest `--size`: the model's tensor list is built in memory before it is written.
const MAX_SIZE: u64 = 4 << 40;

pub fn run(
    size: u64,
    dir: Option<std::path::PathBuf>,
    keep: bool,
    io: &IoArgs,
) -> Result<(), Error> {
    if size < (16 << 20) {
        return Err(Error::invalid("--size must be at least 16MiB"));
    }
    if io.verify || io.key_file.is_some() || io.password_file.is_some() {
        return Err(Error::invalid(
            "demo writes an unencrypted safetensors file: --verify, --key-file and \
             --password-file apply to tensorizer files only",
        ));
    }
    if size > MAX_SIZE {
        return Err(Error::invalid(format!(
            "--size {} is more than the demo writes (at most {})",
            super::output::human(size),
            super::output::human(MAX_SIZE)
        )));
    }
    // (An empty TMPDIR counts as unset, as for mktemp: `temp_dir()` would give "", the current
    // directory.)
    let dir = dir.unwrap_or_else(|| match std::env::var_os("TMPDIR") {
        Some(t) if !t.is_empty() => std::path::PathBuf::from(t),
        _ => std::path::PathBuf::from("/tmp"),
    });
    // A model that cannot fit is refused before anything is written (not after filling the
    // disk). The free space is what an unprivileged writer may use.
    if let Ok(st) = rustix::fs::statvfs(&dir) {
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if size > free {
            return Err(Error::invalid(format!(
                "--size {} does not fit: {} has {} free (choose another --dir or a smaller --size)",
                super::output::human(size),
                dir.display(),
                super::output::human(free)
            )));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("tensorstream-demo-")
        .tempdir_in(&dir)
        .map_err(|e| {
            // (Without tempfile's quoted name of a directory never created.)
            let e = tensorstream::engine::format::convert::without_temp_path(e);
            Error::from_io(e, "cannot create a temporary directory in it")
                .with_location(dir.display().to_string())
        })?;
    // Removed on Ctrl-C too.
    let tmp = super::interrupt::Guarded::new(tmp);
    let path = tmp.path().join("model.safetensors");
    let pstr = path.display().to_string();
    // Options are checked (key files read) before minutes of writing, not after.
    let loader = io.loader(&pstr)?;
    // The timing rounds after the checked load: the same options, no progress bar.
    let timing = loader.clone();
    // The shape rounds the size to whole layers (at least the embeddings and one layer).
    let planned: u64 = model_shape(size)
        .iter()
        .map(|(_, shape)| 2 * shape.iter().product::<u64>())
        .sum();
    out!(
        "tensorstream demo: writing a {} bf16 model to {}",
        super::output::human(planned),
        super::output::field(&pstr)
    )?;
    let t = Instant::now();
    let (count, total) = write_model(&path, size, io.quiet)?;
    // With --keep, the model is kept from here on, whatever stops the run later (a failed write
    // to standard output, as with `demo --keep | head -1`, a failed load, Ctrl-C).
    let (kept, _tmp) = if keep {
        (Some(tmp.into_inner().keep()), None)
    } else {
        (None, Some(tmp))
    };
    out!(
        "  wrote {count} tensors, {total} bytes in {:.2} s",
        t.elapsed().as_secs_f64()
    )?;

    // Baseline: std::fs::read of the same file, in the same run (page cache as the write left it).
    let t = Instant::now();
    let whole = std::fs::read(&path).map_err(|e| Error::from_io(e, "read").with_location(&pstr))?;
    let base_secs = t.elapsed().as_secs_f64();
    let file_len = whole.len() as u64;
    drop(whole);
    // The peak RSS reported is the load's, not the baseline's whole-file buffer.
    let rss_of_load = tensorstream::reset_peak_rss();

    let counter = Arc::new(AtomicU64::new(0));
    let to_read = Arc::new(AtomicU64::new(0));
    let loader = loader
        .progress(counter.clone())
        .progress_total(to_read.clone());
    // The best device available: the first CUDA GPU when a driver and a device are present.
    let gpu = tensorstream_cuda::driver_present()
        && tensorstream_cuda::device_count().is_ok_and(|n| n > 0);
    let mut bad = Vec::new();
    let (st, device_label) = if gpu {
        let cm = {
            let _bar = Progress::start_dynamic("loading", to_read, counter, io.quiet);
            loader.device(tensorstream::Device::Cuda(0)).load_cuda()?
        };
        // Verify every tensor by reading it back from the device.
        let m = cm.model()?;
        for (i, t) in m.tensors().enumerate() {
            let mut off = 0usize;
            let mut first_bad = None;
            m.read_chunks(&t, 64 << 20, |b| {
                if first_bad.is_none() {
                    if let Some(at) = verify_at(i as u64, off as u64, b) {
                        first_bad = Some(off + at);
                    }
                }
                off += b.len();
                Ok(())
            })?;
            if let Some(at) = first_bad {
                bad.push(format!("{} (first bad byte at {at})", t.name));
            }
        }
        if m.len() != count {
            bad.push(format!("loaded {} tensors, expected {count}", m.len()));
        }
        // The device's name too: which GPU ran the demo (or that a stand-in driver did).
        let name = m
            .device()
            .name()
            .map(|n| format!(", {}", crate::cli::output::field(&n)))
            .unwrap_or_default();
        (
            cm.stats().clone(),
            format!("cuda:0{name} (read back and checked)"),
        )
    } else {
        let model = {
            let _bar = Progress::start_dynamic("loading", to_read, counter, io.quiet);
            loader.load()?
        };
        // Verify every tensor against the generator.
        for (i, t) in model.tensors().enumerate() {
            if let Some(at) = verify(i as u64, t.data) {
                bad.push(format!("{} (first bad byte at {at})", t.name));
            }
        }
        if model.len() != count {
            bad.push(format!("loaded {} tensors, expected {count}", model.len()));
        }
        (
            model.stats().clone(),
            "cpu (host memory; no CUDA device found)".to_string(),
        )
    };
    // The load's peak (the rounds below read the whole file into memory for the baseline).
    let peak = tensorstream::peak_rss_bytes();
    // One sample each is noise on a busy machine: two more rounds of the baseline and the load,
    // interleaved, and the medians (each load's own time, device opening excluded).
    let mut base_runs = vec![base_secs];
    let mut ts_runs = vec![st.elapsed.as_secs_f64()];
    for _ in 0..EXTRA_ROUNDS {
        if super::interrupt::signal().is_some() {
            break;
        }
        let t = Instant::now();
        let whole =
            std::fs::read(&path).map_err(|e| Error::from_io(e, "read").with_location(&pstr))?;
        base_runs.push(t.elapsed().as_secs_f64());
        drop(whole);
        let secs = if gpu {
            let cm = timing
                .clone()
                .device(tensorstream::Device::Cuda(0))
                .load_cuda()?;
            cm.stats().elapsed.as_secs_f64()
        } else {
            timing.clone().load()?.stats().elapsed.as_secs_f64()
        };
        ts_runs.push(secs);
    }
    let rounds = ts_runs.len();
    let ratios: Vec<f64> = ts_runs
        .iter()
        .zip(&base_runs)
        .map(|(t, b)| (st.tensor_bytes as f64 / t.max(1e-9)) / (file_len as f64 / b.max(1e-9)))
        .collect();
    let (ts_secs, base_secs) = (median(&ts_runs), median(&base_runs));
    let ts_gbps = st.tensor_bytes as f64 / ts_secs.max(1e-9) / 1e9;
    let base_gbps = file_len as f64 / base_secs / 1e9;
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        format!("{lo:.2}-{hi:.2}")
    };
    out!("  device: {device_label}")?;
    out!(
        "  tensorstream load  {:>8.3} s  {:>6.2} GB/s  ({} backend{}, queue depth {}, {})",
        ts_secs,
        ts_gbps,
        st.backend,
        if st.direct_io {
            ", O_DIRECT"
        } else {
            ", buffered"
        },
        st.queue_depth,
        super::output::counted(st.reads, "read")
    )?;
    if st.route != "host" {
        out!(
            "  on the GPU         route {}, first tensor after {:.3} s; opening the device took {:.3} s (not in the load time)",
            st.route,
            st.first_tensor.map_or(f64::NAN, |d| d.as_secs_f64()),
            st.device_open.as_secs_f64()
        )?;
    }
    out!(
        "  std::fs::read      {:>8.3} s  {:>6.2} GB/s  (same file, same run)",
        base_secs,
        base_gbps
    )?;
    out!(
        "  ratio              {:>8.2}x  (times: medians of {rounds} interleaved rounds; per round \
         {}x)",
        ts_gbps / base_gbps.max(1e-9),
        spread(&ratios)
    )?;
    if let Some(p) = peak {
        out!(
            "  peak RSS           {:.1} MiB  ({})",
            p as f64 / (1u64 << 20) as f64,
            if rss_of_load {
                "during the load and its check"
            } else {
                "of the whole run, the std::fs::read baseline's buffer included"
            }
        )?;
    }
    if let Some(kept) = kept {
        let kept = kept.join("model.safetensors").display().to_string();
        out!("  kept {}", super::output::field(&kept))?;
    }
    if !bad.is_empty() {
        return Err(Error::new(
            ErrorKind::IntegrityMismatch,
            format!(
                "{} tensors differ from what was written: {}",
                bad.len(),
                bad.join("; ")
            ),
        ));
    }
    out!("  verified {count} tensors ({total} bytes): every byte matches")?;
    Ok(())
}

/// Rounds of the baseline and the load the demo times after its checked load.
const EXTRA_ROUNDS: usize = 2;

/// The median of `v` (not empty).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}
