//! The library API (`Loader`) on the CPU: filters, convert, reported settings.

use std::sync::Arc;

use tensorstream::Loader;
use tensorstream_engine::MemoryBackend;

/// A safetensors model of `n` u8 tensors named t000… (4 bytes each) behind a memory backend.
fn model(n: usize) -> Arc<MemoryBackend> {
    let sizes = vec![4u64; n];
    let (file, _) = tensorstream_engine::testkit::u8_model(&sizes, 5);
    Arc::new(MemoryBackend::new("mem://m.safetensors", file))
}

fn names(l: Loader) -> Vec<String> {
    let m = l.load().unwrap();
    let mut v: Vec<String> = m.tensors().map(|t| t.name.to_string()).collect();
    v.sort();
    v
}

#[test]
fn filters_accumulate() {
    let be = model(6);
    // Two closures: both must accept.
    let l = Loader::from_backend(be.clone())
        .filter(|t| t.name.as_str() >= "t002")
        .filter(|t| t.name.as_str() <= "t003");
    assert_eq!(names(l), ["t002", "t003"]);
    // Several globs: any may match; with a closure: both must accept.
    let l = Loader::from_backend(be)
        .filter_glob("t00[01]")
        .unwrap()
        .filter_glob("t005")
        .unwrap()
        .filter(|t| t.name != "t001");
    assert_eq!(names(l), ["t000", "t005"]);
}

#[test]
fn convert_writes_only_the_selected_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let be = model(5);
    for out in ["sel.safetensors", "sel.tensors"] {
        let path = dir.path().join(out);
        let stats = Loader::from_backend(be.clone())
            .filter_glob("t00[13]")
            .unwrap()
            .convert(&path, None)
            .unwrap();
        assert_eq!(stats.tensors, 2, "{out}");
        let back = names(Loader::new(path.to_str().unwrap()));
        assert_eq!(back, ["t001", "t003"], "{out}");
        // Same bytes as loading the same tensors from the source.
        let src = Loader::from_backend(be.clone()).load().unwrap();
        let conv = Loader::new(path.to_str().unwrap()).load().unwrap();
        for t in conv.tensors() {
            assert_eq!(t.data, src.get(t.name).unwrap().data, "{out}/{}", t.name);
        }
    }
}

#[test]
fn reported_settings_are_the_ones_used() {
    let be = model(3);
    let m = Loader::from_backend(be)
        .queue_depth(100_000)
        .chunk_size(6000)
        .load()
        .unwrap();
    let s = m.stats();
    assert_eq!(
        s.queue_depth,
        tensorstream_engine::pipeline::MAX_QUEUE_DEPTH
    );
    // A memory backend needs no alignment: the chunk is the one asked for.
    assert_eq!(s.chunk_size, 6000);
}

#[test]
fn progress_total_is_what_the_selected_load_reads() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let be = model(64);
    let size = {
        use tensorstream_engine::Backend;
        be.stat().unwrap().size
    };
    let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let m = Loader::from_backend(be)
        .filter_glob("t01?")
        .unwrap()
        .progress(done.clone())
        .progress_total(total.clone())
        .load()
        .unwrap();
    assert_eq!(m.len(), 10);
    let t = total.load(Ordering::Relaxed);
    assert!(
        t >= 40 && t < size,
        "total {t} for 40 selected bytes of {size}"
    );
    assert_eq!(done.load(Ordering::Relaxed), t);
}

/// Conversions read small tensors of a backend that is not the kernel's several at once (a read
/// of under 1 MiB is widened over the tensors that follow): tensors of this size take one read
/// each, so that a conversion makes a known number of reads.
const ONE_READ_EACH: u64 = 1 << 20;

/// What [`AfterReads`] does once `after` reads were made.
#[derive(Debug)]
enum Then {
    /// Sets the flag (the reads themselves succeed).
    Cancel(Arc<std::sync::atomic::AtomicBool>),
    /// Fails every further read with this kind.
    Fail(tensorstream_engine::ErrorKind),
    /// Every further read takes this long.
    Slow(std::time::Duration),
    /// Sets the flag, and every further read takes this long.
    CancelSlow(Arc<std::sync::atomic::AtomicBool>, std::time::Duration),
}

/// A memory backend that changes behaviour after `after` reads.
#[derive(Debug)]
struct AfterReads {
    inner: Arc<MemoryBackend>,
    reads: std::sync::atomic::AtomicUsize,
    after: usize,
    then: Then,
}

impl tensorstream_engine::Backend for AfterReads {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> tensorstream_engine::Result<tensorstream_engine::ObjectMeta> {
        self.inner.stat()
    }
    fn capabilities(&self) -> tensorstream_engine::Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> tensorstream_engine::Result<usize> {
        use std::sync::atomic::Ordering;
        let done = self.reads.fetch_add(1, Ordering::SeqCst);
        match &self.then {
            Then::Cancel(flag) if done + 1 >= self.after => flag.store(true, Ordering::SeqCst),
            Then::Fail(kind) if done >= self.after => {
                return Err(tensorstream_engine::Error::new(*kind, "replaced under us"))
            }
            Then::Slow(d) if done >= self.after => std::thread::sleep(*d),
            Then::CancelSlow(flag, d) if done + 1 >= self.after => {
                flag.store(true, Ordering::SeqCst);
                std::thread::sleep(*d);
            }
            _ => {}
        }
        self.inner.read_at(offset, buf)
    }
}

#[test]
fn a_cancel_flag_stops_loads_and_conversions_cleanly() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use tensorstream_engine::ErrorKind;
    let cancelling = |after: usize, sizes: &[u64]| {
        let flag = Arc::new(AtomicBool::new(false));
        let (file, _) = tensorstream_engine::testkit::u8_model(sizes, 7);
        let be = Arc::new(AfterReads {
            inner: Arc::new(MemoryBackend::new("mem://big.safetensors", file)),
            reads: AtomicUsize::new(0),
            after,
            then: Then::Cancel(flag.clone()),
        });
        (be, flag)
    };
    // A load: 200 tensors of 4 KiB, 4 KiB chunks and one read in flight, so the flag is seen
    // long before the end.
    let (be, flag) = cancelling(5, &[4096; 200]);
    let Err(e) = Loader::from_backend(be.clone())
        .chunk_size(4096)
        .queue_depth(1)
        .cancel_flag(flag)
        .load()
    else {
        panic!("the load ran to the end despite the cancel flag");
    };
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    let reads = be.reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(reads < 20, "{reads} reads after the cancel at read 5");

    // A conversion: fails as cancelled and leaves neither the output nor a temporary file.
    let dir = tempfile::tempdir().unwrap();
    for out in ["c.safetensors", "c.tensors"] {
        let (be, flag) = cancelling(30, &[ONE_READ_EACH; 40]);
        let path = dir.path().join(out);
        let e = Loader::from_backend(be)
            .cancel_flag(flag)
            .convert(&path, None)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{out}: {e}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{out}: left behind {left:?}");
    }

    // An unset flag changes nothing.
    let flag = Arc::new(AtomicBool::new(false));
    let m = Loader::from_backend(model(20))
        .cancel_flag(flag)
        .load()
        .unwrap();
    assert_eq!(m.len(), 20);
}

#[test]
fn a_deadline_stops_loads_and_conversions_with_a_timeout() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tensorstream_engine::ErrorKind;
    // Loads: 200 tensors of 4 KiB read one 4 KiB read at a time, 20 ms each: about 4 s in all.
    // Conversions: 30 reads of 1 MiB, 20 ms each.
    let slow = |sizes: &[u64]| {
        let (file, _) = tensorstream_engine::testkit::u8_model(sizes, 8);
        Arc::new(AfterReads {
            inner: Arc::new(MemoryBackend::new("mem://slow.safetensors", file)),
            reads: AtomicUsize::new(0),
            after: 2,
            then: Then::Slow(Duration::from_millis(20)),
        })
    };
    let be = slow(&[4096; 200]);
    let e = Loader::from_backend(be.clone())
        .chunk_size(4096)
        .queue_depth(1)
        .deadline(Duration::from_millis(300))
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("deadline of 300ms"), "{e}");
    assert_eq!(e.location(), Some("mem://slow.safetensors"), "{e}");
    let reads = be.reads.load(Ordering::SeqCst);
    assert!(
        reads < 150,
        "{reads} reads: the load went on past its deadline"
    );

    // A conversion: a timeout too, and nothing left behind.
    let dir = tempfile::tempdir().unwrap();
    let e = Loader::from_backend(slow(&[ONE_READ_EACH; 30]))
        .deadline(Duration::from_millis(300))
        .convert(&dir.path().join("d.safetensors"), None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind {left:?}");

    // The caller's cancel flag still works under a deadline (seen within 50 ms), and is
    // reported as a cancel.
    let flag = Arc::new(AtomicBool::new(false));
    let (file, _) = tensorstream_engine::testkit::u8_model(&[4096; 200], 7);
    let be = Arc::new(AfterReads {
        inner: Arc::new(MemoryBackend::new("mem://c.safetensors", file)),
        reads: AtomicUsize::new(0),
        after: 5,
        then: Then::CancelSlow(flag.clone(), Duration::from_millis(20)),
    });
    let e = Loader::from_backend(be)
        .chunk_size(4096)
        .queue_depth(1)
        .cancel_flag(flag)
        .deadline(Duration::from_secs(600))
        .load()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");

    // A load that finishes in time is not affected.
    let m = Loader::from_backend(model(20))
        .deadline(Duration::from_secs(600))
        .load()
        .unwrap();
    assert_eq!(m.len(), 20);

    // Streaming GPU loads return at once: a deadline there is refused, not ignored.
    let e = Loader::from_backend(model(2))
        .device(tensorstream::Device::Cuda(0))
        .deadline(Duration::from_secs(1))
        .load_cuda_streaming()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

#[test]
fn conversion_errors_keep_the_source_errors_kind() {
    let (file, _) = tensorstream_engine::testkit::u8_model(&[ONE_READ_EACH; 30], 9);
    let dir = tempfile::tempdir().unwrap();
    for out in ["k.safetensors", "k.tensors"] {
        let be = Arc::new(AfterReads {
            inner: Arc::new(MemoryBackend::new("mem://k.safetensors", file.clone())),
            reads: std::sync::atomic::AtomicUsize::new(0),
            after: 20,
            then: Then::Fail(tensorstream_engine::ErrorKind::ObjectChanged),
        });
        let e = Loader::from_backend(be)
            .convert(&dir.path().join(out), None)
            .unwrap_err();
        // It used to come out as a plain I/O error through the tensorizer writer.
        assert_eq!(
            e.kind(),
            tensorstream_engine::ErrorKind::ObjectChanged,
            "{out}: {e}"
        );
    }
}

#[test]
fn conversion_progress_reaches_its_total_with_meta_tensors() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/v4_module_with_meta.tensors"
    );
    let dir = tempfile::tempdir().unwrap();
    for out in ["p.safetensors", "p.tensors"] {
        let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        Loader::new(src)
            .progress(done.clone())
            .progress_total(total.clone())
            .convert(&dir.path().join(out), None)
            .unwrap();
        let (d, t) = (done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
        assert!(t > 0, "{out}: no total");
        assert_eq!(d, t, "{out}: progress {d} of {t}");
    }
}

#[test]
fn a_conversion_that_cannot_fit_is_refused_before_writing() {
    use tensorstream_engine::format::tensorizer::{Serializer, SerializerOptions, TensorSpec};
    use tensorstream_engine::DType;
    // A few hundred bytes declaring 1 PiB of zeros (a meta tensor): as safetensors, the zeros
    // would be written out; as tensorizer, they stay a meta tensor.
    let spec = |name: &str, shape: u64, meta: bool| TensorSpec {
        name: name.into(),
        path: None,
        dtype: DType::U8,
        shape: vec![shape],
        meta,
        role: None,
    };
    let mut s = Serializer::new(
        std::io::Cursor::new(Vec::new()),
        &[spec("a", 4, false), spec("zeros", 1 << 50, true)],
        &SerializerOptions::default(),
    )
    .unwrap();
    s.write_tensor(&[1, 2, 3, 4]).unwrap();
    s.write_tensor(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.tensors");
    std::fs::write(&src, s.finish().unwrap().into_inner()).unwrap();
    let out = dir.path().join("out.safetensors");
    let e = Loader::new(src.to_str().unwrap())
        .convert(&out, None)
        .unwrap_err();
    assert!(e.to_string().contains("bytes free"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input: {left:?}");
    // The tensorizer output keeps the meta tensor and fits.
    Loader::new(src.to_str().unwrap())
        .convert(&dir.path().join("out.tensors"), None)
        .unwrap();
}

#[test]
fn conversions_keep_tensorizer_types_and_can_mark_safetensors_tensors_as_parameters() {
    use tensorstream::TensorRole;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");
    let roles = |uri: &str| -> Vec<(String, Option<TensorRole>)> {
        Loader::new(uri)
            .inspect()
            .unwrap()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.role))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    // A module written by tensorizer's write_module: parameters and buffers, kept as they are.
    let src = format!("{fixtures}/v4_module_with_meta.tensors");
    let want = roles(&src);
    assert!(want.iter().any(|(_, r)| *r == Some(TensorRole::Parameter)));
    assert!(want.iter().any(|(_, r)| *r == Some(TensorRole::Buffer)));
    let out = dir.path().join("module.tensors");
    Loader::new(&src).convert(&out, None).unwrap();
    assert_eq!(roles(out.to_str().unwrap()), want);
    // Safetensors tensors have no type: state-dict entries by default, parameters on request.
    let st = format!("{fixtures}/mixed.safetensors");
    assert!(roles(&st).iter().all(|(_, r)| r.is_none()));
    for (role, want) in [
        (None, TensorRole::StateDictEntry),
        (Some(TensorRole::Parameter), TensorRole::Parameter),
    ] {
        let out = dir.path().join(format!("{want:?}.tensors"));
        let mut l = Loader::new(&st);
        if let Some(r) = role {
            l = l.convert_untyped_as(r);
        }
        l.convert(&out, None).unwrap();
        let got = roles(out.to_str().unwrap());
        assert!(!got.is_empty());
        assert!(got.iter().all(|(_, r)| *r == Some(want)), "{got:?}");
        // The file verifies (the type byte is covered by the hashes).
        Loader::new(out.to_str().unwrap())
            .verify_hashes(true)
            .check_data()
            .unwrap();
    }
}

/// A backend whose `stat` fails with an error that names no location (as a third-party
/// backend's may).
#[derive(Debug)]
struct StatFails;

impl tensorstream_engine::Backend for StatFails {
    fn location(&self) -> &str {
        "custom://bucket/model.safetensors"
    }
    fn stat(&self) -> tensorstream_engine::Result<tensorstream_engine::ObjectMeta> {
        Err(tensorstream_engine::Error::new(
            tensorstream_engine::ErrorKind::Io,
            "connection reset by peer",
        ))
    }
    fn capabilities(&self) -> tensorstream_engine::Capabilities {
        tensorstream_engine::Capabilities::default()
    }
    fn read_at(&self, _: u64, _: &mut [u8]) -> tensorstream_engine::Result<usize> {
        unreachable!("nothing is read before stat")
    }
}

/// A `stat` failure names the backend's location, whichever entry point met it.
#[test]
fn a_stat_failure_names_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let be = || Loader::from_backend(Arc::new(StatFails));
    let errors = [
        ("load", be().load().err()),
        ("inspect", be().inspect().err()),
        ("check_data", be().check_data().err()),
        ("convert", be().convert(&out, None).err()),
    ];
    for (what, e) in errors {
        let e = e.unwrap_or_else(|| panic!("{what} succeeded without a stat"));
        assert_eq!(
            e.location(),
            Some("custom://bucket/model.safetensors"),
            "{what}: {e}"
        );
        assert!(
            e.to_string().contains("connection reset by peer"),
            "{what}: {e}"
        );
    }
}

/// A backend that cannot read ranges (`Capabilities::ranged_reads: false`) is refused with a
/// clear error before anything is read, not read by ranges anyway.
#[test]
fn a_backend_without_ranged_reads_is_refused() {
    #[derive(Debug)]
    struct WholeOnly(Arc<MemoryBackend>);
    impl tensorstream_engine::Backend for WholeOnly {
        fn location(&self) -> &str {
            self.0.location()
        }
        fn stat(&self) -> tensorstream_engine::Result<tensorstream_engine::ObjectMeta> {
            self.0.stat()
        }
        fn capabilities(&self) -> tensorstream_engine::Capabilities {
            tensorstream_engine::Capabilities {
                ranged_reads: false,
                ..self.0.capabilities()
            }
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> tensorstream_engine::Result<usize> {
            panic!("read by ranges although it said it cannot be")
        }
    }
    let e = Loader::from_backend(Arc::new(WholeOnly(model(3))))
        .load()
        .expect_err("refused");
    assert_eq!(e.kind(), tensorstream_engine::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("ranged_reads"), "{e}");
    assert_eq!(e.location(), Some("mem://m.safetensors"), "{e}");
}

/// A glob that matches beside a closure that rejects everything: the error names both (it
/// blamed the glob alone, which does match).
#[test]
fn nothing_selected_by_a_glob_and_a_closure_names_both() {
    let e = Loader::from_backend(model(4))
        .filter_glob("t00*")
        .unwrap()
        .filter(|t| t.name == "no such tensor")
        .load()
        .expect_err("nothing selected");
    assert!(
        e.to_string()
            .contains("filter \"t00*\" with the filter closure matches none of the 4 tensors"),
        "{e}"
    );
}

/// A backend whose `stat` takes `hold` (a server that does not answer while the object is
/// being opened).
#[derive(Debug)]
struct SlowStat {
    inner: Arc<MemoryBackend>,
    hold: std::time::Duration,
}

impl tensorstream_engine::Backend for SlowStat {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn stat(&self) -> tensorstream_engine::Result<tensorstream_engine::ObjectMeta> {
        std::thread::sleep(self.hold);
        self.inner.stat()
    }
    fn capabilities(&self) -> tensorstream_engine::Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> tensorstream_engine::Result<usize> {
        self.inner.read_at(offset, buf)
    }
}

/// A cancel flag or a deadline stops a call that is still opening the object (a `stat` that
/// takes 20 s here) at once, for loads, conversions, inspections and data checks alike: the
/// opening is left to finish on its own thread. (They waited for the opening's own timeouts.)
#[test]
fn cancel_and_deadline_stop_a_call_still_opening_the_object() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    use tensorstream_engine::ErrorKind;
    let be = || {
        Arc::new(SlowStat {
            inner: model(3),
            hold: Duration::from_secs(20),
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    type Call = fn(&Loader, &std::path::Path) -> Option<tensorstream::Error>;
    let calls: [(&str, Call); 4] = [
        ("load", |l, _| l.load().err()),
        ("inspect", |l, _| l.inspect().err()),
        ("check_data", |l, _| l.check_data().err()),
        ("convert", |l, out| l.convert(out, None).err()),
    ];
    for (what, call) in calls {
        // A flag set 200 ms into the opening.
        let flag = Arc::new(AtomicBool::new(false));
        let l = Loader::from_backend(be()).cancel_flag(flag.clone());
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                flag.store(true, Ordering::SeqCst);
            })
        };
        let t = Instant::now();
        let e = call(&l, &out).unwrap_or_else(|| panic!("{what}: finished despite the cancel"));
        setter.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{what}: {e}");
        assert!(e.to_string().contains("while opening"), "{what}: {e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            t.elapsed()
        );
        // A deadline of 200 ms.
        let l = Loader::from_backend(be()).deadline(Duration::from_millis(200));
        let t = Instant::now();
        let e = call(&l, &out).unwrap_or_else(|| panic!("{what}: finished past the deadline"));
        assert_eq!(e.kind(), ErrorKind::Timeout, "{what}: {e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            t.elapsed()
        );
        assert!(!out.exists(), "{what}");
    }
    // Without a flag or a deadline the opening is waited for (and the call succeeds).
    let quick = Arc::new(SlowStat {
        inner: model(3),
        hold: Duration::from_millis(300),
    });
    assert_eq!(Loader::from_backend(quick).load().unwrap().len(), 3);
}

#[cfg(feature = "http")]
#[path = "../backends/tests/support/blackhole.rs"]
mod blackhole;

/// A deadline (or cancel) at a server that never answers: the call returns at the limit, and
/// the opening it leaves behind stops too (the backend sees the load's flag), closing its
/// connections, instead of running the request timeout and its retries (about 3 minutes, with
/// their threads and connections).
#[test]
#[cfg(feature = "http")]
fn an_abandoned_remote_opening_stops_within_moments() {
    use std::time::{Duration, Instant};
    use tensorstream_engine::ErrorKind;
    let hole = blackhole::Blackhole::start();
    let url = format!("{}/m.safetensors", hole.endpoint());
    let t = Instant::now();
    // (1 s: time for the opening to reach the server even on a busy machine, where 300 ms
    // once was not.)
    let e = Loader::new(&url)
        .deadline(Duration::from_secs(1))
        .load()
        .expect_err("nothing answers");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        hole.accepted() > 0,
        "the HEAD never reached the server within the deadline"
    );
    assert!(
        hole.all_closed_within(Duration::from_secs(3)),
        "{} connection(s) still open after the deadline",
        hole.open()
    );

    // A cancel flag the caller clears as soon as the call returns (to reuse the loader): the
    // abandoned openings stop all the same (they followed the caller's flag, and missed it).
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = Arc::new(AtomicBool::new(false));
    let l = Loader::new(&url).cancel_flag(flag.clone());
    for round in 0..5 {
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                flag.store(true, Ordering::SeqCst);
            })
        };
        let e = l.load().expect_err("nothing answers");
        flag.store(false, Ordering::SeqCst);
        setter.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "round {round}: {e}");
    }
    assert!(
        hole.all_closed_within(Duration::from_secs(3)),
        "{} connection(s) still open 3 s after the cancels",
        hole.open()
    );
}

/// Reads stuck in the backend (every data read takes 30 s: a hung server, a hard NFS mount)
/// keep neither a cancel nor a deadline waiting: the load returns within the 2 s grace, and
/// the stuck reads are left to end on a thread of their own. (It waited for them.)
#[test]
fn cancel_and_deadline_are_not_held_by_reads_stuck_in_the_backend() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::{Duration, Instant};
    use tensorstream_engine::ErrorKind;
    let stuck = || {
        let (file, _) = tensorstream_engine::testkit::u8_model(&[4096; 16], 9);
        Arc::new(AfterReads {
            inner: Arc::new(MemoryBackend::new("mem://stuck.safetensors", file)),
            reads: AtomicUsize::new(0),
            after: 1, // the metadata read is quick
            then: Then::Slow(Duration::from_secs(30)),
        })
    };
    let flag = Arc::new(AtomicBool::new(false));
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let t = Instant::now();
    let e = Loader::from_backend(stuck())
        .chunk_size(4096)
        .cancel_flag(flag)
        .load()
        .expect_err("cancelled");
    setter.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    let t = Instant::now();
    let e = Loader::from_backend(stuck())
        .chunk_size(4096)
        .deadline(Duration::from_millis(300))
        .load()
        .expect_err("past the deadline");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
