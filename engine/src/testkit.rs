//! Conformance suite for [`crate::Backend`] implementations, third-party ones included.
//!
//! ```text
//! struct MyFixture { /* a server, a temp dir … */ }
//! impl tensorstream_engine::testkit::Fixture for MyFixture {
//!     fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>> { … }
//!     fn missing(&self, name: &str) -> Result<Arc<dyn Backend>> { … }
//! }
//! #[test] fn conformance() { tensorstream_engine::testkit::run_all(&MyFixture::new()); }
//! ```
//!
//! [`run_all`] runs every check; each check is also public so a backend can run one on its own.
//! A failed check panics with a message `testkit check '<check>' failed for <kind> backend
//! <location>: …`.
//!
//! What the suite demands beyond the [`Backend`] contract text:
//! * [`Capabilities`]: `alignment` a power of two, `preferred_chunk > 0`, `max_concurrency > 0`.
//! * `read_at` at or past the end returns `Ok(0)` or [`ErrorKind::RangeNotSatisfiable`], never
//!   bytes; a read that straddles the end returns exactly the bytes up to the end.
//! * Reader sessions ([`Backend::open_reader`]) with queue depth 1 and 32, reads submitted in
//!   random order with buffers aligned to `capabilities().alignment`: every completion carries
//!   its id and offset, the right bytes, the right count (short only at the end), writes nothing
//!   past the requested length, and every buffer comes back.
//! * A missing object reports [`ErrorKind::NotFound`] from the fixture, `stat` or `read_at`.
//! * A safetensors file loads end to end (`read_index` → `plan` → `execute` → [`HostSink`]) in
//!   both layouts. Note that [`crate::format::read_index`] reads the metadata through `read_at`
//!   with plain (unaligned) `Vec` buffers, so `read_at` must accept any buffer even when reader
//!   sessions need alignment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::format::safetensors::write_header;
use crate::mem::{staging_slots, IoBuf};
use crate::plan::{plan, Layout, PlanOptions};
use crate::{
    execute, Backend, Capabilities, DType, EngineOptions, ErrorKind, HostModel, HostSink,
    ReadRequest, ReaderOptions, Result,
};

/// How the suite makes objects for the backend under test.
pub trait Fixture {
    /// Stores `data` as a new object called `name` and returns a backend reading it.
    fn create(&self, name: &str, data: &[u8]) -> Result<Arc<dyn Backend>>;
    /// A backend for an object that does not exist. May fail itself (with `NotFound`), or
    /// succeed and then fail `stat`/`read_at` with `NotFound`.
    fn missing(&self, name: &str) -> Result<Arc<dyn Backend>>;
}

/// Runs every check; panics with a message naming the failed check.
pub fn run_all(fixture: &dyn Fixture) {
    check_capabilities(fixture);
    check_stat(fixture);
    check_read_at(fixture);
    check_reader(fixture, 1);
    check_reader(fixture, 32);
    check_missing(fixture);
    check_end_to_end(fixture, Layout::Mirror);
    check_end_to_end(fixture, Layout::Packed { align: 256 });
}

/// Size of the odd-sized object most checks use (3 MiB + 77).
pub const ODD_SIZE: usize = (3 << 20) + 77;

/// A safetensors file of one-dimensional U8 tensors `t000`, `t001`, … of the given sizes with
/// [`pattern`] contents (seeded `seed + i`), and each tensor's bytes — the model every backend test
/// loads.
pub fn u8_model(sizes: &[u64], seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let tensors: Vec<(String, crate::DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("t{i:03}"), crate::DType::U8, vec![n], n))
        .collect();
    let mut file = match crate::format::safetensors::write_header(&tensors, &Default::default()) {
        Ok(h) => h,
        Err(e) => panic!("testkit: cannot build a safetensors header: {e}"),
    };
    let mut datas = Vec::with_capacity(sizes.len());
    for (i, &n) in sizes.iter().enumerate() {
        let d = pattern(n as usize, seed.wrapping_add(i as u64));
        file.extend_from_slice(&d);
        datas.push(d);
    }
    (file, datas)
}

/// Deterministic pseudo-random bytes (different `seed`s give different contents).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Names the check and the backend in every failure message.
struct Ctx {
    check: &'static str,
    who: String,
}

impl Ctx {
    fn new(check: &'static str) -> Self {
        Ctx {
            check,
            who: "(no backend yet)".into(),
        }
    }
    fn on(&mut self, be: &dyn Backend) {
        self.who = format!("{} backend {}", be.capabilities().kind, be.location());
    }
    #[track_caller]
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "testkit check '{}' failed for {}: {msg}",
            self.check, self.who
        )
    }
    #[track_caller]
    fn ensure(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg())
        }
    }
    #[track_caller]
    fn ok<T>(&self, r: Result<T>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(format_args!("{what}: {e} (kind {:?})", e.kind())),
        }
    }
    #[track_caller]
    fn create(&mut self, fx: &dyn Fixture, name: &str, data: &[u8]) -> Arc<dyn Backend> {
        let be = self.ok(fx.create(name, data), &format!("fixture.create({name:?})"));
        self.on(be.as_ref());
        be
    }
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// A buffer of `len` bytes, aligned to the backend's alignment (at least 64).
fn aligned_buf(ctx: &Ctx, len: usize, caps: &Capabilities) -> IoBuf {
    ctx.ok(
        IoBuf::aligned(len, caps.alignment.max(64)),
        "allocating a buffer",
    )
}

/// Capabilities are sane: alignment a power of two, chunk and concurrency positive, a kind name.
pub fn check_capabilities(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("capabilities");
    let be = ctx.create(fx, "caps.bin", &pattern(4096, 1));
    let c = be.capabilities();
    ctx.ensure(c.alignment.is_power_of_two(), || {
        format!("alignment {} is not a power of two", c.alignment)
    });
    ctx.ensure(c.preferred_chunk > 0, || "preferred_chunk is 0".into());
    ctx.ensure(c.max_concurrency > 0, || "max_concurrency is 0".into());
    ctx.ensure(!c.kind.is_empty(), || "kind is empty".into());
    ctx.ensure(c.direct_io || c.alignment <= 4096 || c.ranged_reads, || {
        "implausible capabilities".into()
    });
    ctx.ensure(c == be.capabilities(), || {
        "capabilities change between calls".into()
    });
}

/// `stat` reports the size of empty, 1-byte and odd-sized objects, and a stable version.
pub fn check_stat(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("stat");
    for (name, len) in [
        ("stat-empty.bin", 0usize),
        ("stat-one.bin", 1),
        ("stat-odd.bin", ODD_SIZE),
    ] {
        let data = pattern(len, len as u64);
        let be = ctx.create(fx, name, &data);
        let m1 = ctx.ok(be.stat(), "stat");
        ctx.ensure(m1.size == len as u64, || {
            format!("stat size {} for an object of {len} bytes", m1.size)
        });
        let m2 = ctx.ok(be.stat(), "second stat");
        ctx.ensure(m1 == m2, || {
            format!("two stats of an unchanged object differ: {m1:?} vs {m2:?}")
        });
        if len == 0 {
            let mut b = [0xA5u8; 16];
            match be.read_at(0, &mut b) {
                Ok(0) => {}
                Ok(n) => ctx.fail(format_args!(
                    "read_at(0) of an empty object returned {n} bytes"
                )),
                Err(e) if e.kind() == ErrorKind::RangeNotSatisfiable => {}
                Err(e) => ctx.fail(format_args!("read_at(0) of an empty object failed: {e}")),
            }
        }
    }
}

/// Reads `len` bytes at `off` with `read_at` into a buffer suited to the backend's alignment.
fn read_at_buf(
    ctx: &Ctx,
    be: &dyn Backend,
    caps: &Capabilities,
    off: u64,
    len: usize,
) -> (usize, Vec<u8>) {
    let res = if caps.alignment > 1 {
        let mut b = aligned_buf(ctx, len, caps);
        b.as_mut_slice().fill(0xA5);
        be.read_at(off, b.as_mut_slice())
            .map(|n| (n, b.as_slice().to_vec()))
    } else {
        let mut v = vec![0xA5u8; len];
        be.read_at(off, &mut v).map(|n| (n, v))
    };
    ctx.ok(res, &format!("read_at({off}, {len} bytes)"))
}

/// `read_at` at the start, in the middle, at and past the end, and (when the backend needs no
/// alignment) with buffers and offsets of odd sizes.
pub fn check_read_at(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("read_at");
    let data = pattern(ODD_SIZE, 7);
    let be = ctx.create(fx, "read-at.bin", &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let size = data.len();
    let size_up = align_up(size, a);

    let mut cases: Vec<(usize, usize)> = vec![
        (0, a.max(4096)),
        (0, align_up(size, a)), // whole object, aligned length runs past the end
        (align_up(size / 2, a), 64 * a), // middle
        (size_up - a, a),       // last block (short unless size is aligned)
        (size_up - 2 * a, 4 * a), // straddles the end
    ];
    if a == 1 {
        cases.extend([
            (1, 1),
            (3, 3),
            (4095, 4097),
            (size / 3 + 1, 65537),
            (size - 1, 1),
            (size - 10, 100),
            (12_345, 1_000_003),
        ]);
    }
    for (off, len) in cases {
        let (n, got) = read_at_buf(&ctx, be.as_ref(), &caps, off as u64, len);
        let want = len.min(size - off);
        ctx.ensure(n == want, || {
            format!("read_at({off}, {len} bytes) returned {n} bytes, expected {want}")
        });
        ctx.ensure(got[..n] == data[off..off + n], || {
            format!("read_at({off}, {len} bytes) returned wrong bytes")
        });
        ctx.ensure(got[n..].iter().all(|&b| b == 0xA5), || {
            format!("read_at({off}, {len} bytes) wrote past the {n} bytes it returned")
        });
    }
    // At the exact end and past it: no bytes.
    for off in [size_up, size_up + a, size_up + 1024 * a] {
        let off = off as u64;
        let r = if a > 1 {
            let mut b = aligned_buf(&ctx, a, &caps);
            b.as_mut_slice().fill(0xA5);
            be.read_at(off, b.as_mut_slice())
        } else {
            let mut v = vec![0xA5u8; 16];
            be.read_at(off, &mut v)
        };
        match r {
            Ok(0) => {}
            Ok(n) => ctx.fail(format_args!(
                "read_at({off}) at/past the end ({size} bytes) returned {n} bytes"
            )),
            Err(e) if e.kind() == ErrorKind::RangeNotSatisfiable => {}
            Err(e) => ctx.fail(format_args!(
                "read_at({off}) at/past the end returned {e} (kind {:?}), expected Ok(0) or RangeNotSatisfiable",
                e.kind()
            )),
        }
    }
    if a == 1 {
        // Exactly at the (unaligned) end.
        let mut v = [0xA5u8; 7];
        match be.read_at(size as u64, &mut v) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::RangeNotSatisfiable => {}
            other => ctx.fail(format_args!("read_at at the exact end returned {other:?}")),
        }
    }
}

/// Many reads through a reader session with `queue_depth` in flight: shuffled order, aligned
/// buffers from one registered region, every byte and every buffer checked.
pub fn check_reader(fx: &dyn Fixture, queue_depth: usize) {
    let mut ctx = Ctx::new(if queue_depth <= 1 {
        "reader qd1"
    } else {
        "reader deep queue"
    });
    let qd = queue_depth.max(1);
    let data = pattern(ODD_SIZE, 11 + qd as u64);
    let be = ctx.create(fx, &format!("reader-qd{qd}.bin"), &data);
    let caps = be.capabilities();
    let a = caps.alignment.max(1);
    let size = data.len();
    let end = align_up(size, a);
    let mut rng = 0x5EED ^ qd as u64;

    // Cover the object with reads of varied (aligned) lengths; the last runs past the end.
    let mut reads: Vec<(u64, usize)> = Vec::new();
    let mut off = 0usize;
    while off < end {
        let len = if a == 1 {
            1 + (splitmix(&mut rng) % 40_000) as usize
        } else {
            a * (1 + (splitmix(&mut rng) % 16) as usize)
        };
        let len = len.min(end - off);
        reads.push((off as u64, len));
        off += len;
    }
    // Large reads too (overlapping the ones above; each is checked on its own): the whole
    // object in one read, and one from an aligned middle offset to the end. A reader that
    // truncates big reads (e.g. to its own chunk size) must fail here, not only end to end.
    reads.push((0, end));
    let mid = align_up(size / 3, a);
    reads.push((mid as u64, end - mid));
    // One read entirely past the end.
    reads.push((end as u64 + (a as u64) * 8, a.max(512)));
    // Shuffle (Fisher–Yates).
    for i in (1..reads.len()).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        reads.swap(i, j);
    }
    let max_len = reads.iter().map(|r| r.1).max().unwrap_or(1);
    let slot = align_up(max_len, a.max(64));

    let meta = ctx.ok(be.stat(), "stat");
    let mut reader = ctx.ok(
        be.clone()
            .open_reader(&meta, &ReaderOptions { queue_depth: qd }),
        "open_reader",
    );
    let mut pool = ctx.ok(
        staging_slots(qd, slot, a.max(4096)),
        "allocating reader buffers",
    );
    let pool_ptrs: HashSet<usize> = pool.iter().map(|b| b.as_ptr() as usize).collect();
    {
        let regs: Vec<&IoBuf> = pool.iter().collect();
        ctx.ok(reader.register_buffers(&regs), "register_buffers");
    }
    // id → (offset, len); ids are not indices, to catch readers that invent them.
    let mut pending: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut completed = 0usize;
    while completed < reads.len() {
        while next < reads.len() && pending.len() < qd {
            let Some(mut buf) = pool.pop() else { break };
            let (off, len) = reads[next];
            buf.as_mut_slice().fill(0xA5);
            ctx.ensure(buf.set_len(len), || "slot too small".into());
            let id = (next as u64) * 7919 + 13;
            pending.insert(id, (off, len));
            ctx.ok(
                reader.submit(ReadRequest {
                    id,
                    offset: off,
                    buf,
                }),
                "submit",
            );
            next += 1;
            ctx.ensure(reader.in_flight() == pending.len(), || {
                format!(
                    "in_flight() is {} with {} reads submitted and not returned",
                    reader.in_flight(),
                    pending.len()
                )
            });
        }
        let done = ctx.ok(reader.wait(), "wait");
        let Some((off, len)) = pending.remove(&done.id) else {
            ctx.fail(format_args!(
                "completion with unknown or repeated id {}",
                done.id
            ))
        };
        ctx.ensure(done.offset == off, || {
            format!(
                "completion id {} carries offset {}, submitted {off}",
                done.id, done.offset
            )
        });
        ctx.ensure(reader.in_flight() == pending.len(), || {
            "in_flight() not decremented by wait()".into()
        });
        let mut buf = done.buf;
        ctx.ensure(pool_ptrs.contains(&(buf.as_ptr() as usize)), || {
            "a completion returned a buffer that was not submitted".into()
        });
        ctx.ensure(buf.len() == len, || {
            format!(
                "buffer came back with length {}, submitted {len}",
                buf.len()
            )
        });
        let start = off as usize;
        match done.result {
            Ok(n) => {
                let want = if start >= size {
                    0
                } else {
                    len.min(size - start)
                };
                ctx.ensure(n == want, || {
                    format!("read at {off} of {len} bytes returned {n} bytes, expected {want} (object {size} bytes)")
                });
                ctx.ensure(
                    n == 0 || buf.as_slice()[..n] == data[start..start + n],
                    || format!("read at {off} of {len} bytes returned wrong bytes"),
                );
            }
            Err(e) if start >= size && e.kind() == ErrorKind::RangeNotSatisfiable => {}
            Err(e) => ctx.fail(format_args!(
                "read at {off} of {len} bytes failed: {e} (kind {:?})",
                e.kind()
            )),
        }
        let cap = buf.capacity();
        ctx.ensure(buf.set_len(cap), || "buffer capacity shrank".into());
        ctx.ensure(buf.as_slice()[len..].iter().all(|&b| b == 0xA5), || {
            format!("read at {off} of {len} bytes wrote past the requested length")
        });
        pool.push(buf);
        completed += 1;
    }
    ctx.ensure(reader.in_flight() == 0, || {
        format!(
            "in_flight() is {} after all completions",
            reader.in_flight()
        )
    });
    drop(reader);
    ctx.ensure(pool.len() == qd, || {
        format!("{} of {qd} buffers came back", pool.len())
    });
    let back: HashSet<usize> = pool.iter().map(|b| b.as_ptr() as usize).collect();
    ctx.ensure(back == pool_ptrs, || {
        "the buffers that came back are not the ones submitted".into()
    });
}

/// A missing object reports `NotFound` (from the fixture, `stat` or `read_at`), naming it.
pub fn check_missing(fx: &dyn Fixture) {
    let mut ctx = Ctx::new("missing object");
    let name = "does-not-exist.bin";
    let be = match fx.missing(name) {
        Err(e) => {
            ctx.who = format!("the fixture of a missing object {name:?}");
            ctx.ensure(e.kind() == ErrorKind::NotFound, || {
                format!(
                    "fixture.missing failed with kind {:?}, expected NotFound: {e}",
                    e.kind()
                )
            });
            ctx.ensure(e.to_string().contains(name), || {
                format!("the NotFound error does not name the object: {e}")
            });
            return;
        }
        Ok(be) => be,
    };
    ctx.on(be.as_ref());
    let loc = be.location().to_string();
    let err = match be.stat() {
        Err(e) => e,
        Ok(_) => {
            let mut b = vec![0u8; 4096];
            match be.read_at(0, &mut b) {
                Err(e) => e,
                Ok(n) => ctx.fail(format_args!(
                    "stat succeeded and read_at returned {n} bytes for a missing object"
                )),
            }
        }
    };
    ctx.ensure(err.kind() == ErrorKind::NotFound, || {
        format!(
            "missing object gave kind {:?}, expected NotFound: {err}",
            err.kind()
        )
    });
    ctx.ensure(
        err.to_string().contains(&loc) || err.to_string().contains(name),
        || format!("the NotFound error does not name the object: {err}"),
    );
}

/// A safetensors file built with `write_header` loads through `read_index`, `plan`, `execute`
/// and `HostSink` with `layout`, every tensor byte-identical.
pub fn check_end_to_end(fx: &dyn Fixture, layout: Layout) {
    let mut ctx = Ctx::new(match layout {
        Layout::Mirror => "end-to-end mirror",
        Layout::Packed { .. } => "end-to-end packed",
    });
    let sizes: [u64; 9] = [1000, 0, 7, 65536, 3, (1 << 20) + 5, 1, 300_001, 4096];
    let mut specs: Vec<(String, DType, Vec<u64>, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("layer.{i}.weight"), DType::U8, vec![n], n))
        .collect();
    specs.push(("f32.bias".into(), DType::F32, vec![3, 5], 60));
    let mut meta_kv = BTreeMap::new();
    meta_kv.insert("format".to_string(), "pt".to_string());
    let mut file = ctx.ok(write_header(&specs, &meta_kv), "write_header");
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    for (i, (name, _, _, n)) in specs.iter().enumerate() {
        let d = pattern(*n as usize, 100 + i as u64);
        file.extend_from_slice(&d);
        expected.insert(name.clone(), d);
    }
    let be = ctx.create(fx, "model.safetensors", &file);
    let caps = be.capabilities();
    let meta = ctx.ok(be.stat(), "stat");
    let index = ctx.ok(crate::format::read_index(be.as_ref(), &meta), "read_index");
    ctx.ensure(index.tensors.len() == specs.len(), || {
        format!(
            "index has {} tensors, wrote {}",
            index.tensors.len(),
            specs.len()
        )
    });
    let mut opts = PlanOptions::new(meta.size);
    opts.alignment = caps.alignment as u64;
    // Small chunks so the load needs many reads, whatever the preferred size.
    opts.chunk_size = (caps.preferred_chunk as u64).min(256 << 10);
    opts.layout = layout;
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let p = Arc::new(ctx.ok(plan(&index, &sel, &opts), "plan"));
    let eopts = EngineOptions {
        queue_depth: caps.max_concurrency.clamp(1, 32),
        ring_budget: 4 << 20,
        progress: None,
        cancel: None,
    };
    let (sink, stats) = ctx.ok(
        execute(be.clone(), &meta, p.clone(), HostSink::new(), &eopts),
        "execute",
    );
    ctx.ensure(stats.reads as usize == p.reads.len(), || {
        format!("{} reads done, plan has {}", stats.reads, p.reads.len())
    });
    let (arena, _) = ctx.ok(sink.into_parts(), "HostSink::into_parts");
    let model = ctx.ok(HostModel::new(arena, index, &p), "HostModel::new");
    ctx.ensure(model.len() == specs.len(), || {
        format!("model has {} tensors, wrote {}", model.len(), specs.len())
    });
    for t in model.tensors() {
        let want = &expected[t.name];
        ctx.ensure(t.data == &want[..], || {
            format!(
                "tensor {:?} ({} bytes) loaded with wrong bytes",
                t.name,
                want.len()
            )
        });
        if let Layout::Packed { align } = layout {
            ctx.ensure(
                t.data.is_empty() || (t.data.as_ptr() as u64).is_multiple_of(align),
                || {
                    format!(
                        "tensor {:?} is not aligned to {align} in a packed load",
                        t.name
                    )
                },
            );
        }
    }
}
