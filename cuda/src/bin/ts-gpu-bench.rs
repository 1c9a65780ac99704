//! GPU-machine helper for `scripts/gpu-check.sh` (feature `bench`). Prints JSON lines.
//!
//! ```text
//! ts-gpu-bench gen FILE --gb 6.5            model-shaped bf16 safetensors file (pseudo-random)
//! ts-gpu-bench digests FILE                 per-tensor SHA-256 computed on the CPU from the file
//! ts-gpu-bench raw-read FILE [--threads 8] [--chunk-mib 16]
//!                                           O_DIRECT read of the whole file (N threads)
//! ts-gpu-bench h2d [--mib 4096] [--chunk-mib 64] [--slots 4]
//!                                           pinned host->device ceiling through this crate,
//!                                           copies of --chunk-mib from a ring of --slots
//! ts-gpu-bench ring-read FILE [--slots 32] [--slot-size 4] [--depth N]
//!                                           the GPU ring's read side alone (no GPU needed): the
//!                                           engine reads the file into reused staging slots,
//!                                           which a discarding sink hands straight back
//! ts-gpu-bench copy-rate FILE [--threads 16] [--chunk-mib 4] [--slots 40] [--mode pread|map]
//!                                           the CPU side of the warm path alone (no GPU needed):
//!                                           N threads copy the file (in the page cache) into a
//!                                           ring of slots (each thread its share, in turn), with
//!                                           pread or non-temporal copies out of the mapped file
//! ts-gpu-bench load FILE [--device cuda:0] [--streams N] [--slots N] [--slot-size MiB]
//!                        [--depth N] [--warm off|register|pread] [--digests] [--name NAME]
//! ```
//! `load` prints the same JSON keys as `tensorstream load --json` (seconds, gbps, bytes,
//! peak_rss_bytes, first_tensor_seconds, tensors[{name, sha256}]).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};
use tensorstream_cuda::raw::driver::{copy_to_device, DeviceArena, HostSource};
use tensorstream_cuda::*;
use tensorstream_engine::format::safetensors::write_header;
use tensorstream_engine::*;

fn main() {
    tensorstream_engine::log_warnings_to_stderr();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("ts-gpu-bench: error: {e}");
        std::process::exit(1);
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match flag(args, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Error::invalid(format!("{name} {v:?}: not a number"))),
    }
}

fn run(args: &[String]) -> Result<()> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let file = || {
        args.get(1)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("{cmd}: FILE missing")))
    };
    match cmd {
        "gen" => gen(&file()?, num(args, "--gb", 6.5f64)?),
        "digests" => digests(&file()?),
        "raw-read" => raw_read(
            &file()?,
            num(args, "--threads", 8usize)?,
            num(args, "--chunk-mib", 16u64)?,
        ),
        "h2d" => h2d(
            num(args, "--mib", 4096usize)?,
            num(args, "--chunk-mib", 64usize)?.clamp(1, 1024),
            num(args, "--slots", 4usize)?.clamp(2, 256),
        ),
        "ring-read" => ring_read(&file()?, args),
        "copy-rate" => copy_rate(&file()?, args),
        "load" => load_cmd(&file()?, args),
        _ => Err(Error::invalid(
            "usage: ts-gpu-bench gen|digests|raw-read|h2d|ring-read|copy-rate|load … (see the source \
             header)",
        )),
    }
}

/// `copy-rate`: how fast `--threads` threads move a file in the page cache into a ring of
/// `--slots` buffers of `--chunk-mib` (as large as the staging ring, so that it does not stay
/// in the CPU's caches; each thread uses its share of the slots in turn): with `pread` (the
/// staging ring's reads) or with `MappedFile::copy_into` (non-temporal stores out of the
/// mapping, `--mode map`). Checks the bytes against a `pread` of the same chunk once per 64.
fn copy_rate(path: &str, args: &[String]) -> Result<()> {
    use std::sync::atomic::AtomicUsize;
    let threads = num(args, "--threads", 16usize)?.clamp(1, 256);
    let chunk = num(args, "--chunk-mib", 4usize)?.clamp(1, 1024) << 20;
    let slots = num(args, "--slots", 40usize)?.clamp(threads, 4096);
    let mode = flag(args, "--mode").unwrap_or_else(|| "pread".into());
    if mode != "pread" && mode != "map" {
        return Err(Error::invalid(format!(
            "--mode {mode:?}: expected pread or map"
        )));
    }
    let map = raw::mapped::MappedFile::open(Path::new(path))?;
    let len = map.len();
    let pieces = len.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    // The clock starts when the first thread passes the barrier (all buffers touched): not
    // on the main thread, which may not run again before the copies end.
    let ready = std::sync::Barrier::new(threads);
    let started = std::sync::OnceLock::new();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (next, map, mode, ready, started) = (&next, &map, &mode, &ready, &started);
                s.spawn(move || -> Result<()> {
                    let mine = (t..slots).step_by(threads).count();
                    let mut bufs = (0..mine)
                        .map(|_| IoBuf::aligned(chunk, 4096))
                        .collect::<Result<Vec<_>>>()?;
                    // Touched before the clock starts, as the pinned ring is.
                    for b in &mut bufs {
                        b.as_mut_slice().fill(1);
                    }
                    ready.wait();
                    started.get_or_init(Instant::now);
                    let mut turn = 0usize;
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= pieces {
                            return Ok(());
                        }
                        let off = k * chunk;
                        let n = chunk.min(len - off);
                        let buf = &mut bufs[turn % mine].as_mut_slice()[..n];
                        turn += 1;
                        if mode.as_str() == "map" {
                            map.copy_into(off as u64, buf)?;
                        } else {
                            map.file()
                                .read_exact_at(buf, off as u64)
                                .map_err(|e| Error::from_io(e, "pread"))?;
                        }
                        if k % 64 == 0 {
                            let mut want = vec![0u8; n];
                            map.file()
                                .read_exact_at(&mut want, off as u64)
                                .map_err(|e| Error::from_io(e, "pread"))?;
                            if want[..] != buf[..] {
                                return Err(Error::corrupt(format!(
                                    "copy-rate: bytes at {off} differ from the file"
                                )));
                            }
                        }
                    }
                })
            })
            .collect();
        join_all(handles, "copy")
    });
    results?;
    let secs = started
        .get()
        .ok_or_else(|| Error::invalid("copy-rate: no thread started"))?
        .elapsed()
        .as_secs_f64();
    println!(
        "{}",
        json!({"name": format!("copy-rate {mode} {threads} thr {slots} x {}MiB", chunk >> 20),
               "bytes": len, "secs": secs, "gbps": len as f64 / secs / 1e9,
               "peak_rss_bytes": peak_rss()})
    );
    Ok(())
}

/// Joins scoped worker threads; the first error (or panic) among them.
fn join_all(hs: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>, what: &str) -> Result<()> {
    let mut first = Ok(());
    for h in hs {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(Error::invalid(format!("{what} thread panicked"))));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        .checked_mul(1024)
}

/// Llama-like layer shapes (hidden 4096, MLP 11008, vocab 32000) in bf16, as many layers as
/// needed to reach `gb` GB.
fn gen(path: &str, gb: f64) -> Result<()> {
    let (h, m, v) = (4096u64, 11008u64, 32000u64);
    let mut t: Vec<(String, DType, Vec<u64>, u64)> = Vec::new();
    let mut push = |name: String, shape: Vec<u64>| {
        let n = shape.iter().product::<u64>() * 2;
        t.push((name, DType::BF16, shape, n));
    };
    push("model.embed_tokens.weight".into(), vec![v, h]);
    let target = (gb * 1e9) as u64;
    let layer = 4 * h * h * 2 + 3 * h * m * 2 + 2 * h * 2;
    let layers = target.saturating_sub(2 * v * h * 2).div_ceil(layer).max(1);
    for l in 0..layers {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            push(format!("model.layers.{l}.self_attn.{p}.weight"), vec![h, h]);
        }
        push(format!("model.layers.{l}.mlp.gate_proj.weight"), vec![m, h]);
        push(format!("model.layers.{l}.mlp.up_proj.weight"), vec![m, h]);
        push(format!("model.layers.{l}.mlp.down_proj.weight"), vec![h, m]);
        push(format!("model.layers.{l}.input_layernorm.weight"), vec![h]);
        push(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![h],
        );
    }
    push("model.norm.weight".into(), vec![h]);
    push("lm_head.weight".into(), vec![v, h]);
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let header = write_header(&t, &meta)?;
    let total: u64 = t.iter().map(|x| x.3).sum();
    let start = Instant::now();
    let f = std::fs::File::create(path).map_err(|e| Error::from_io(e, path))?;
    let mut w = std::io::BufWriter::with_capacity(16 << 20, f);
    w.write_all(&header).map_err(|e| Error::from_io(e, path))?;
    // xorshift64* words; bf16 values stay finite-ish (top exponent bits cleared).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 8 << 20];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for c in buf[..n].chunks_mut(8) {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let x = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) & 0x3FFF_3FFF_3FFF_3FFF).to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        w.write_all(&buf[..n])
            .map_err(|e| Error::from_io(e, path))?;
        left -= n as u64;
    }
    let f = w
        .into_inner()
        .map_err(|e| Error::from_io(e.into_error(), path))?;
    f.sync_all().map_err(|e| Error::from_io(e, path))?;
    let bytes = header.len() as u64 + total;
    println!(
        "{}",
        json!({"name": "gen", "file": path, "bytes": bytes, "tensors": t.len(), "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn index_of(path: &str) -> Result<(Arc<dyn Backend>, ObjectMeta, TensorIndex)> {
    let be = tensorstream_backends::open(path, &tensorstream_backends::OpenOptions::default())?;
    let meta = be.stat()?;
    let index = format::read_index(be.as_ref(), &meta)?;
    Ok((be, meta, index))
}

/// A file opened for a device load: backend, metadata, index, plan.
type Planned = (Arc<dyn Backend>, ObjectMeta, TensorIndex, Arc<Plan>);

/// The file's index and a device-shaped plan of all its tensors (`Packed`, 256 B aligned, reads
/// of at most one slot, O_DIRECT alignment when the backend reads direct).
fn device_plan(path: &str, slot_size: usize) -> Result<Planned> {
    let (be, meta, index) = index_of(path)?;
    let mut po = PlanOptions::new(meta.size);
    po.layout = Layout::Packed {
        align: TENSOR_ALIGN,
    };
    po.alignment = be.capabilities().alignment.max(1) as u64;
    po.chunk_size = slot_size as u64;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let plan = Arc::new(plan(&index, &sel, &po)?);
    Ok((be, meta, index, plan))
}

fn digests(path: &str) -> Result<()> {
    let (_, _, index) = index_of(path)?;
    let f = std::fs::File::open(path).map_err(|e| Error::from_io(e, path))?;
    let start = Instant::now();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let next = AtomicU64::new(0);
    let mut out = vec![String::new(); index.tensors.len()];
    let slots: Vec<std::sync::Mutex<&mut String>> =
        out.iter_mut().map(std::sync::Mutex::new).collect();
    let res = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; 8 << 20];
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                        let Some(t) = index.tensors.get(i) else {
                            return Ok(());
                        };
                        let mut h = Sha256::new();
                        if t.source == TensorSource::Stored {
                            let mut off = t.range.start;
                            while off < t.range.end {
                                let n = (t.range.end - off).min(buf.len() as u64) as usize;
                                f.read_exact_at(&mut buf[..n], off)
                                    .map_err(|e| Error::from_io(e, "reading tensor bytes"))?;
                                h.update(&buf[..n]);
                                off += n as u64;
                            }
                        }
                        if let Ok(mut g) = slots[i].lock() {
                            **g = hex(&h.finalize());
                        }
                    }
                })
            })
            .collect();
        join_all(hs, "hash")
    });
    res?;
    drop(slots);
    let tensors: Vec<_> = index
        .tensors
        .iter()
        .zip(&out)
        .map(|(t, d)| json!({"name": t.name, "sha256": d}))
        .collect();
    println!(
        "{}",
        json!({"name": "cpu digests", "secs": start.elapsed().as_secs_f64(), "tensors": tensors})
    );
    Ok(())
}

/// A sink that takes every read and hands its slot straight back: the engine's read side alone.
struct Discard {
    bytes: u64,
}

impl Sink for Discard {
    fn prepare(&mut self, plan: &Arc<Plan>) -> Result<Vec<Option<IoBuf>>> {
        Ok(plan.reads.iter().map(|_| None).collect())
    }
    fn accept(&mut self, _read: usize, buf: IoBuf) -> Result<Vec<IoBuf>> {
        self.bytes += buf.len() as u64;
        Ok(vec![buf])
    }
    fn finish(&mut self) -> Result<Vec<IoBuf>> {
        Ok(Vec::new())
    }
}

fn ring_read(path: &str, args: &[String]) -> Result<()> {
    let d = CudaOptions::default();
    let slots: usize = num(args, "--slots", d.slots)?;
    let slot_size: usize = num(args, "--slot-size", d.slot_size >> 20)? << 20;
    let start = Instant::now();
    let (be, meta, _, plan) = device_plan(path, slot_size)?;
    let caps = be.capabilities();
    let eo = EngineOptions {
        queue_depth: num(args, "--depth", slots)?,
        ring_budget: slots * slot_size,
        progress: None,
        cancel: None,
    };
    let (sink, st) = execute(be, &meta, plan, Discard { bytes: 0 }, &eo)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"name": format!("ring read {slots} x {} MiB, depth {}", slot_size >> 20, eo.queue_depth),
               "secs": secs, "gbps": sink.bytes as f64 / secs / 1e9, "bytes": sink.bytes,
               "reads": st.reads, "direct_io": caps.direct_io, "peak_rss_bytes": peak_rss()})
    );
    Ok(())
}

fn raw_read(path: &str, threads: usize, chunk_mib: u64) -> Result<()> {
    if !(1..=256).contains(&chunk_mib) {
        return Err(Error::invalid("--chunk-mib must be between 1 and 256"));
    }
    let start = Instant::now();
    let n = tensorstream_backends::local::raw_direct_read(
        Path::new(path),
        threads,
        (chunk_mib << 20) as usize,
    )?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"name": format!("raw O_DIRECT read ({threads} threads x {chunk_mib} MiB)"), "secs": secs, "gbps": n as f64 / secs / 1e9, "bytes": n, "cold": true})
    );
    Ok(())
}

fn h2d(mib: usize, chunk_mib: usize, slots: usize) -> Result<()> {
    let opts = CudaOptions {
        slots,
        slot_size: chunk_mib << 20,
        ..Default::default()
    };
    let dev = CudaDevice::open(0, &opts)?;
    let bytes = (mib as u64) << 20;
    let arena = Arc::new(DeviceArena::alloc(
        &device_context(&dev)?,
        (chunk_mib as u64) << 20,
    )?);
    // A first untimed round (512 MiB) pays the first-use costs, so the 1-stream figure is not
    // penalised against the 2-stream one.
    for (streams, timed) in [(1usize, false), (1, true), (2, true)] {
        let bytes = if timed { bytes } else { bytes.min(512 << 20) };
        let mut slots = dev.take_slots()?;
        let mut q = std::collections::VecDeque::new();
        // Events come back with their copies and are reused, as the sink's pool does (with
        // 1 MiB copies, creating one per copy would weigh on the figure).
        let mut events = Vec::new();
        let start = Instant::now();
        let mut sent = 0u64;
        let mut k = 0usize;
        while sent < bytes {
            let slot = match slots.pop() {
                Some(s) => s,
                None => {
                    let f: tensorstream_cuda::raw::driver::InFlight = q
                        .pop_front()
                        .ok_or_else(|| Error::invalid("no copy in flight"))?;
                    let (src, ev) = f.wait()?;
                    events.push(ev);
                    match src {
                        Some(HostSource::Slot(s)) => s,
                        _ => return Err(Error::invalid("copy lost its slot")),
                    }
                }
            };
            let n = slot.len() as u64;
            let ops = [tensorstream_cuda::copy::CopyOp {
                src: 0,
                dst: 0,
                len: n,
            }];
            let stream = stream_of(&dev, k % streams)?;
            let ev = match events.pop() {
                Some(ev) => ev,
                None => tensorstream_cuda::raw::driver::new_event(&device_context(&dev)?)?,
            };
            q.push_back(
                copy_to_device(&arena, HostSource::Slot(slot), &ops, &stream, ev)
                    .map_err(|e| e.error)?,
            );
            sent += n;
            k += 1;
        }
        while let Some(f) = q.pop_front() {
            f.wait()?;
        }
        let secs = start.elapsed().as_secs_f64();
        if !timed {
            continue;
        }
        let kind = if dev.staging_page_locked() {
            "pinned"
        } else {
            "pageable (registration refused)"
        };
        println!(
            "{}",
            json!({"name": format!("{kind} h2d {chunk_mib} MiB copies, {streams} stream(s)"), "secs": secs, "gbps": sent as f64 / secs / 1e9, "bytes": sent})
        );
    }
    Ok(())
}

fn device_context(dev: &CudaDevice) -> Result<Arc<cudarc::driver::CudaContext>> {
    Ok(dev.cuda_context().clone())
}

fn stream_of(dev: &CudaDevice, i: usize) -> Result<Arc<cudarc::driver::CudaStream>> {
    Ok(dev.cuda_stream(i).clone())
}

fn load_cmd(path: &str, args: &[String]) -> Result<()> {
    let opening = Instant::now();
    let ordinal = parse_device(&flag(args, "--device").unwrap_or_else(|| "cuda:0".into()))?;
    let d = CudaOptions::default();
    let opts = CudaOptions {
        streams: num(args, "--streams", d.streams)?,
        slots: num(args, "--slots", d.slots)?,
        slot_size: num(args, "--slot-size", d.slot_size >> 20)? << 20,
        warm_threads: num(args, "--warm-threads", d.warm_threads)?,
        warm_pread_threads: num(args, "--warm-pread-threads", d.warm_pread_threads)?,
        warm_copy: match flag(args, "--warm-copy").as_deref() {
            None | Some("pread") => WarmCopy::Pread,
            Some("map") => WarmCopy::Map,
            Some(o) => {
                return Err(Error::invalid(format!(
                    "--warm-copy {o:?}: expected pread or map"
                )))
            }
        },
        warm_piece: num(args, "--warm-piece", d.warm_piece >> 20)? << 20,
        ..d
    };
    let warm = flag(args, "--warm").unwrap_or_else(|| "off".into());
    let dev = CudaDevice::open(ordinal, &opts)?;
    // Timed like `tensorstream load`: from after the device is open (a server opens it once).
    let t_open = opening.elapsed().as_secs_f64();
    let start = Instant::now();
    let (be, meta, index, plan) = device_plan(path, dev.options().slot_size)?;
    let t_load = start.elapsed().as_secs_f64();
    let (model, mode) = match warm.as_str() {
        "off" => {
            let eo = EngineOptions {
                queue_depth: num(args, "--depth", dev.options().slots)?,
                ring_budget: dev.options().slots * dev.options().slot_size,
                progress: None,
                cancel: None,
            };
            (
                load(&dev, be, &meta, index, plan, &eo)?.0,
                "ring".to_string(),
            )
        }
        "register" | "pread" => {
            let s = if warm == "register" {
                WarmStrategy::Register
            } else {
                WarmStrategy::Pread
            };
            let (m, st) = load_mapped(
                &dev,
                Path::new(path),
                index,
                &plan,
                s,
                Default::default(),
                None,
                None,
            )?;
            (m, format!("mapped {s:?} {st:?}"))
        }
        other => {
            return Err(Error::invalid(format!(
                "--warm {other:?}: off|register|pread"
            )))
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let bytes = model.nbytes();
    let rss = peak_rss();
    let mut tensors = Vec::new();
    if args.iter().any(|a| a == "--digests") {
        for t in model.tensors() {
            let mut h = Sha256::new();
            model.read_chunks(&t, 64 << 20, |c| {
                h.update(c);
                Ok(())
            })?;
            tensors.push(json!({"name": t.name, "sha256": hex(&h.finalize())}));
        }
    }
    // From the start of the load (index read included, device open not), like `seconds`.
    let first = model.times().first_tensor.map(|d| t_load + d.as_secs_f64());
    let name = flag(args, "--name").unwrap_or_else(|| format!("ts-gpu-bench load ({mode})"));
    println!(
        "{}",
        json!({"name": name, "seconds": secs, "gbps": bytes as f64 / secs / 1e9, "bytes": bytes,
               "peak_rss_bytes": rss, "first_tensor_seconds": first, "device_open_seconds": t_open,
               "staging_page_locked": dev.staging_page_locked(), "tensors": tensors, "mode": mode})
    );
    model.release()
}
