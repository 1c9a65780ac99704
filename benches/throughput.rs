//! File → host throughput, warm page cache, with baselines in the same group:
//! `std::fs::read` (the fair baseline: like a load, it fills fresh memory every time) and a
//! 16 MiB `pread` loop into one reused buffer (a copy ceiling, not a load: no fresh memory), and
//! tensorstream loads (io_uring and pread engines, buffered reads forced so that the group stays
//! warm). Each tensorstream configuration is checked once against the file's bytes before it is
//! timed. Throughput is in decimal units (GB/s = 10⁹ B/s, like the CLI and the scripts).
//!
//! `cargo bench --bench throughput` (size: `TS_BENCH_SIZE` in MiB, e.g. `512` or `512MiB`,
//! default 256; file in target/).
//! Cold-cache, end-to-end numbers come from `tensorstream bench FILE --cold` (JSON lines) and
//! `scripts/measure-local.sh`, since criterion cannot drop the page cache between iterations.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorstream::engine::format::safetensors::write_header;
use tensorstream::{DType, IoMode, Loader, OpenOptions};

fn bench_file() -> (PathBuf, u64) {
    let size: u64 = match std::env::var("TS_BENCH_SIZE") {
        Err(_) => 256 << 20,
        Ok(s) => match s.trim().trim_end_matches("MiB").parse::<u64>() {
            Ok(m) if m > 0 => m << 20,
            _ => panic!("TS_BENCH_SIZE={s:?}: expected a number of MiB, e.g. 512 or 512MiB"),
        },
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // (`-v2`: each tensor has bytes of its own since then; a file of the first kind, every
    // tensor alike, is not reused.)
    let path = dir.join(format!("bench-{}-v2.safetensors", size >> 20));
    let per = 4u64 << 20;
    let n = (size / per).max(1);
    if let Ok(m) = std::fs::metadata(&path) {
        if m.len() > size {
            return (path, m.len());
        }
    }
    let tensors: Vec<(String, DType, Vec<u64>, u64)> = (0..n)
        .map(|i| (format!("layer.{i}.weight"), DType::BF16, vec![per / 2], per))
        .collect();
    let header = write_header(&tensors, &BTreeMap::new()).expect("header");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create bench file"));
    f.write_all(&header).expect("write");
    // Each tensor's bytes differ from every other's (the tensor's number mixed into each 8-byte
    // word), so that the check before the timing catches swapped, repeated or shifted tensors.
    let mut chunk = vec![0u8; per as usize];
    for t in 0..n {
        for (w, word) in chunk.chunks_exact_mut(8).enumerate() {
            let x = (t << 40 ^ w as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(29);
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).expect("write");
    }
    f.flush().expect("flush");
    let len = std::fs::metadata(&path).expect("stat").len();
    (path, len)
}

fn throughput(c: &mut Criterion) {
    let (path, len) = bench_file();
    let p = path.to_str().expect("utf-8 path").to_string();
    let mut g = c.benchmark_group("file_to_host_warm");
    g.throughput(Throughput::BytesDecimal(len));
    g.sample_size(10);
    g.bench_function("baseline_std_fs_read", |b| {
        b.iter(|| std::fs::read(&path).expect("read").len())
    });
    g.bench_function("ceiling_pread_loop_16m_reused_buffer", |b| {
        let f = std::fs::File::open(&path).expect("open");
        let mut buf = vec![0u8; 16 << 20];
        b.iter(|| {
            let mut off = 0u64;
            loop {
                let n = f.read_at(&mut buf, off).expect("pread");
                if n == 0 {
                    break off;
                }
                off += n as u64;
            }
        })
    });
    for (name, mode) in [
        ("tensorstream_io_uring", IoMode::Uring),
        ("tensorstream_pread", IoMode::Pread),
    ] {
        let loader = Loader::new(&p).open_options(OpenOptions {
            io_mode: Some(mode),
            // Buffered: the automatic choice switches to O_DIRECT when the file is not mostly
            // cached, which would time the disk in a warm-cache group.
            direct_io: Some(false),
            ..OpenOptions::default()
        });
        // A broken loader must not look fast: check one load's bytes first.
        let m = loader.load().expect("load");
        assert!(
            !m.stats().direct_io,
            "{name}: the warm group must read buffered"
        );
        let file = std::fs::read(&path).expect("read");
        for t in m.tensors() {
            let at = t.offset as usize;
            assert!(
                file.get(at..at + t.data.len()) == Some(t.data),
                "{name}: tensor {} differs from the file",
                t.name
            );
        }
        drop((m, file));
        g.bench_function(name, |b| {
            b.iter(|| loader.load().expect("load").stats().tensor_bytes)
        });
    }
    g.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
