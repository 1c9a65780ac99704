//! End-to-end through the engine with the in-memory backend: safetensors → plan → execute → host.

use std::sync::Arc;

use tensorstream_engine::*;

fn model_file(sizes: &[u64]) -> (Vec<u8>, Vec<Vec<u8>>) {
    tensorstream_engine::testkit::u8_model(sizes, 0)
}

fn load(file: Vec<u8>, opts: PlanOptions, select: Option<Vec<usize>>) -> (HostModel, EngineStats) {
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new("mem", file));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let sel = select.unwrap_or_else(|| (0..index.tensors.len()).collect());
    let plan = Arc::new(plan(&index, &sel, &opts).unwrap());
    let eopts = EngineOptions {
        queue_depth: 4,
        ring_budget: 1 << 20,
        progress: None,
        cancel: None,
    };
    let (sink, stats) = execute(be, &meta, plan.clone(), HostSink::new(), &eopts).unwrap();
    let (arena, _) = sink.into_parts().unwrap();
    (HostModel::new(arena, index, &plan).unwrap(), stats)
}

#[test]
fn mirror_and_packed_layouts_load_the_same_bytes() {
    let sizes = [1000u64, 0, 7, 65536, 3, 200_000, 1];
    let (file, datas) = model_file(&sizes);
    for layout in [Layout::Mirror, Layout::Packed { align: 256 }] {
        for (align, chunk) in [(1u64, 4096u64), (512, 8192), (4096, 1 << 20)] {
            let mut o = PlanOptions::new(file.len() as u64);
            o.alignment = align;
            o.chunk_size = chunk;
            o.layout = layout;
            let (m, stats) = load(file.clone(), o, None);
            assert_eq!(m.len(), sizes.len());
            for (i, t) in m.tensors().enumerate() {
                assert_eq!(t.name, format!("t{i:03}"));
                assert_eq!(t.data, &datas[i][..], "{layout:?} align {align} tensor {i}");
                if let Layout::Packed { align } = layout {
                    if !t.data.is_empty() {
                        assert_eq!(t.data.as_ptr() as u64 % align, 0);
                    }
                }
            }
            assert!(stats.reads > 0);
        }
    }
}

#[test]
fn filter_reads_only_selected() {
    let sizes = [1 << 20, 1 << 20, 1 << 20];
    let (file, datas) = model_file(&sizes);
    let mut o = PlanOptions::new(file.len() as u64);
    o.max_gap = 0;
    let (m, stats) = load(file, o, Some(vec![1]));
    assert_eq!(m.len(), 1);
    assert_eq!(m.get("t001").unwrap().data, &datas[1][..]);
    assert!(m.get("t000").is_none());
    assert!(stats.bytes_read < 2 << 20);
}

/// A backend whose reader fails its first completion and holds every other read until the
/// engine calls `abandon` (as an NFS reader holds reads in retry backoff).
#[derive(Debug)]
struct Holding(MemoryBackend, Arc<std::sync::atomic::AtomicBool>);

struct HoldingReader {
    pending: Vec<ReadRequest>,
    failed_one: bool,
    abandoned: bool,
    /// Set when the engine waited on a held read before abandoning it.
    waited_too_early: Arc<std::sync::atomic::AtomicBool>,
}

impl RangeReader for HoldingReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        self.pending.push(req);
        Ok(())
    }
    fn wait(&mut self) -> Result<ReadDone> {
        let Some(req) = self.pending.pop() else {
            return Err(Error::invalid("wait() with no read in flight"));
        };
        let result = if !self.failed_one {
            self.failed_one = true;
            Err(Error::new(ErrorKind::Io, "disk on fire"))
        } else if self.abandoned {
            Err(Error::new(ErrorKind::Cancelled, "retry abandoned"))
        } else {
            // Before `abandon`, these reads would sit in backoff for a minute.
            self.waited_too_early
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Err(Error::new(
                ErrorKind::Io,
                "held read given up after its backoff",
            ))
        };
        Ok(ReadDone {
            id: req.id,
            offset: req.offset,
            buf: req.buf,
            result: result.map(|_: usize| 0),
        })
    }
    fn in_flight(&self) -> usize {
        self.pending.len()
    }
    fn abandon(&mut self) {
        self.abandoned = true;
    }
}

impl Backend for Holding {
    fn location(&self) -> &str {
        self.0.location()
    }
    fn stat(&self) -> Result<ObjectMeta> {
        self.0.stat()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.0.read_at(offset, buf)
    }
    fn open_reader(
        self: Arc<Self>,
        _meta: &ObjectMeta,
        _opts: &ReaderOptions,
    ) -> Result<Box<dyn RangeReader>> {
        Ok(Box::new(HoldingReader {
            pending: Vec::new(),
            failed_one: false,
            abandoned: false,
            waited_too_early: self.1.clone(),
        }))
    }
}

#[test]
fn a_failed_read_makes_the_engine_abandon_the_reads_still_in_flight() {
    let (file, _) = model_file(&[64 << 10; 8]);
    let early = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let be = Arc::new(Holding(MemoryBackend::new("mem", file), early.clone()));
    let meta = be.stat().unwrap();
    let index = format::read_index(be.as_ref(), &meta).unwrap();
    let sel: Vec<usize> = (0..index.tensors.len()).collect();
    let mut po = PlanOptions::new(meta.size);
    po.chunk_size = 16 << 10;
    let plan = Arc::new(plan(&index, &sel, &po).unwrap());
    let eopts = EngineOptions {
        queue_depth: 8,
        ring_budget: 1 << 20,
        progress: None,
        cancel: None,
    };
    let Err(e) = execute(be, &meta, plan, HostSink::new(), &eopts) else {
        panic!("a load with a failed read succeeded");
    };
    // The first failure is what the load reports, not a complaint from the held reads.
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("disk on fire"), "{e}");
    assert!(
        !early.load(std::sync::atomic::Ordering::SeqCst),
        "the engine waited out reads in flight before abandoning them"
    );
}
