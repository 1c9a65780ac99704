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
