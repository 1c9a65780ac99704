//! Reads a whole local file through the local backend and prints the throughput.
//!
//! `cargo run --release -p tensorstream-backends --example local_read -- FILE [uring|pread]
//! [chunk_MiB] [queue_depth] [reader|load]`
//!
//! `reader`: reads into a ring of `queue_depth` registered buffers (raw reader throughput).
//! `load`: a full Mirror-layout load into one host arena through plan + execute + HostSink (the
//! file is treated as one opaque tensor, so it need not be safetensors).

use std::sync::Arc;
use std::time::Instant;

use tensorstream_backends::{IoMode, OpenOptions};
use tensorstream_engine::index::{Format, TensorIndex, TensorInfo, TensorSource};
use tensorstream_engine::mem::staging_slots;
use tensorstream_engine::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or_else(|| {
        Error::invalid("usage: local_read FILE [uring|pread] [chunk_MiB] [qd] [reader|load]")
    })?;
    let mode = match args.get(2).map(String::as_str) {
        Some("pread") => IoMode::Pread,
        _ => IoMode::Uring,
    };
    let chunk_mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let qd: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(16);
    let what = args.get(5).map(String::as_str).unwrap_or("reader");
    let opts = OpenOptions {
        io_mode: Some(mode),
        concurrency: Some(qd),
        chunk_size: Some(chunk_mib << 20),
        ..OpenOptions::default()
    };
    let be = tensorstream_backends::open(path, &opts)?;
    let caps = be.capabilities();
    let meta = be.stat()?;
    let chunk = chunk_mib << 20;
    let t0 = Instant::now();
    let bytes = if what == "load" {
        let index = TensorIndex {
            format: Format::Safetensors,
            tensors: vec![TensorInfo {
                name: "all".into(),
                dtype: DType::U8,
                shape: vec![meta.size],
                range: 0..meta.size,
                source: TensorSource::Stored,
                path: None,
                prefix: None,
                role: None,
            }],
            metadata: Default::default(),
            object_size: meta.size,
            header_len: 0,
            version: 0,
        };
        let mut po = PlanOptions::new(meta.size);
        po.alignment = caps.alignment as u64;
        po.chunk_size = chunk as u64;
        let p = Arc::new(plan(&index, &[0], &po)?);
        let eo = EngineOptions {
            queue_depth: qd,
            ..EngineOptions::default()
        };
        let (_sink, stats) = execute(
            be.clone(),
            &meta,
            p,
            HostSink::new().with_prefault(true),
            &eo,
        )?;
        stats.bytes_read
    } else {
        let mut reader = be.clone().open_reader(&meta, &ReaderOptions::new(qd))?;
        let mut free = staging_slots(qd, chunk, caps.alignment.max(4096))?;
        {
            let r: Vec<&IoBuf> = free.iter().collect();
            reader.register_buffers(&r)?;
        }
        let mut off = 0u64;
        let mut total = 0u64;
        let mut id = 0u64;
        while off < meta.size || reader.in_flight() > 0 {
            while off < meta.size {
                let Some(buf) = free.pop() else { break };
                reader.submit(ReadRequest {
                    id,
                    offset: off,
                    buf,
                })?;
                id += 1;
                off += chunk as u64;
            }
            let d = reader.wait()?;
            total += d.result? as u64;
            free.push(d.buf);
        }
        total
    };
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"name\":\"local_{what}_{mode:?}\",\"bytes\":{bytes},\"secs\":{secs:.3},\"gib_s\":{:.3},\"direct_io\":{},\"alignment\":{},\"chunk_mib\":{chunk_mib},\"qd\":{qd}}}",
        bytes as f64 / secs / (1u64 << 30) as f64,
        caps.direct_io,
        caps.alignment
    );
    Ok(())
}
