//! Loads a safetensors file through a backend (e.g. `nfs://…`) into host memory with the engine
//! and prints one JSON line `{name, secs, gbps, bytes}`. `--concurrency N` and `--chunk BYTES`
//! set the open options. With `--verify LOCAL_PATH` it then
//! compares every tensor with the same file read locally (outside the timed part).
//!
//! ```text
//! cargo run --release -p tensorstream-backends --features nfs --example nfs_load -- \
//!     nfs://127.0.0.1:PORT/export/big.safetensors [--verify /path/big.safetensors]
//! ```

use std::sync::Arc;
use std::time::Instant;

use tensorstream_backends::{open, OpenOptions};
use tensorstream_engine::*;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let uri = args
        .first()
        .ok_or("usage: nfs_load URI [--concurrency N] [--chunk BYTES] [--verify LOCAL_PATH]")?;
    let verify = args
        .iter()
        .position(|a| a == "--verify")
        .and_then(|i| args.get(i + 1));
    let flag = |name: &str| -> Option<usize> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1)?.parse().ok()
    };
    let opts = OpenOptions {
        concurrency: flag("--concurrency"),
        chunk_size: flag("--chunk"),
        ..OpenOptions::default()
    };
    let start = Instant::now();
    let be = open(uri, &opts)?;
    let meta = be.stat()?;
    let index = format::read_index(be.as_ref(), &meta)?;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let caps = be.capabilities();
    let mut po = PlanOptions::new(meta.size);
    po.chunk_size = caps.preferred_chunk as u64;
    let plan = Arc::new(plan(&index, &sel, &po)?);
    let eo = EngineOptions {
        queue_depth: caps.max_concurrency,
        ..EngineOptions::default()
    };
    let (sink, stats) = execute(be, &meta, plan.clone(), HostSink::new(), &eo)?;
    let (arena, _) = sink.into_parts()?;
    let model = HostModel::new(arena, index, &plan)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"name\":\"nfs_load\",\"secs\":{secs:.3},\"gbps\":{:.3},\"bytes\":{},\"reads\":{}}}",
        meta.size as f64 / secs / 1e9,
        meta.size,
        stats.reads
    );
    if let Some(path) = verify {
        let local = std::fs::read(path)?;
        for t in model.tensors() {
            let at = t.offset as usize;
            if local.get(at..at + t.data.len()) != Some(t.data) {
                return Err(format!("tensor {} differs from {path}", t.name).into());
            }
        }
        eprintln!("verified {} tensors against {path}", model.len());
    }
    Ok(())
}
