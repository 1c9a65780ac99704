use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tensorstream_engine::plan::{Placement, Plan};
use tensorstream_engine::{Error, Result};

use super::*;

fn plan_of(lens: &[(u64, bool)]) -> Plan {
    // (len, stored?) — stored tensors need `len` bytes; others are synthesized.
    let mut placements = Vec::new();
    let mut dest = 0;
    for (i, &(len, stored)) in lens.iter().enumerate() {
        placements.push(Placement {
            tensor: i,
            dest,
            len,
            needed: if stored {
                1000 * i as u64..1000 * i as u64 + len
            } else {
                0..0
            },
            needed_dest: dest,
        });
        dest += len.div_ceil(256) * 256;
    }
    Plan {
        placements,
        reads: Vec::new(),
        arena_len: dest,
        arena_align: 256,
        useful_bytes: 0,
        read_bytes: 0,
    }
}

#[test]
fn readiness_announces_each_tensor_once_when_complete() {
    let plan = plan_of(&[(100, true), (0, true), (50, false), (300, true)]);
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut r = Readiness::new(&plan, 0x1000, Instant::now(), Some(tx));
    // The empty tensor is ready at once.
    let first: Vec<ReadyTensor> = rx.try_iter().collect();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].placement, 1);
    assert_eq!(r.pending(), 3);
    assert!(r.first().is_none(), "an empty tensor is not a landing");
    assert!(r.complete(&[(0, 60)]).unwrap().is_empty());
    assert_eq!(r.complete(&[(0, 40), (3, 100)]).unwrap(), vec![0]);
    assert!(r.first().is_some());
    let t: Vec<ReadyTensor> = rx.try_iter().collect();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].tensor, t[0].ptr, t[0].len), (0, 0x1000, 100));
    assert!(r.check_complete().is_err());
    // Too many bytes is an error, unknown placement too.
    assert!(r.complete(&[(3, 201)]).is_err());
    assert!(r.complete(&[(9, 1)]).is_err());
    assert_eq!(r.complete(&[(3, 200), (2, 50)]).unwrap(), vec![3, 2]);
    r.check_complete().unwrap();
    let t: Vec<usize> = rx.try_iter().map(|t| t.placement).collect();
    assert_eq!(t, vec![3, 2]);
    assert_eq!(rx.try_iter().count(), 0);
    r.close();
    assert!(rx.recv().is_err(), "channel closes");
}

#[test]
fn slot_ledger_waits_only_when_it_holds_every_slot() {
    let mut l = SlotLedger::default();
    assert!(!l.must_wait(0), "nothing lent: never wait");
    l.lend(3);
    l.queued();
    l.queued();
    assert!(!l.must_wait(0), "one slot still with the engine");
    l.queued();
    assert!(l.must_wait(0));
    assert!(!l.must_wait(1), "a slot came back in this call");
    l.returned();
    assert_eq!(l.held(), 2);
    assert!(!l.must_wait(0));
}

/// A fake queued copy: completes when the test sends on its gate.
struct Gate {
    id: usize,
    gate: Receiver<bool>,
}

impl Pending for Gate {
    type Done = usize;
    fn wait(self) -> Result<usize> {
        match self.gate.recv() {
            Ok(true) => Ok(self.id),
            _ => Err(Error::invalid(format!("copy {} failed", self.id))),
        }
    }
}

fn gate(id: usize) -> (Gate, Sender<bool>) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    (Gate { id, gate: rx }, tx)
}

#[test]
fn watcher_reports_in_order_and_marks_tensors_after_the_copy() {
    let plan = plan_of(&[(100, true), (100, true)]);
    let (ttx, trx) = crossbeam_channel::unbounded();
    let ready = Arc::new(Mutex::new(Readiness::new(
        &plan,
        0,
        Instant::now(),
        Some(ttx),
    )));
    let (jobs, reports, h) = spawn_watcher::<Gate>(ready.clone()).unwrap();
    let (g0, o0) = gate(0);
    let (g1, o1) = gate(1);
    let (g2, o2) = gate(2);
    jobs.send(Job {
        pending: g0,
        landed: vec![(0, 100), (1, 50)],
    })
    .unwrap();
    jobs.send(Job {
        pending: g1,
        landed: vec![(1, 50)],
    })
    .unwrap();
    jobs.send(Job {
        pending: g2,
        landed: vec![],
    })
    .unwrap();
    // Nothing reported or landed before the first copy completes.
    assert!(reports.try_recv().is_err());
    assert!(trx.try_recv().is_err());
    o1.send(true).unwrap(); // completes out of order: still reported after job 0
    o0.send(true).unwrap();
    match reports.recv().unwrap() {
        Report::Done(id) => assert_eq!(id, 0),
        Report::Failed(e) => panic!("{e}"),
    }
    assert_eq!(trx.recv().unwrap().placement, 0);
    match reports.recv().unwrap() {
        Report::Done(id) => assert_eq!(id, 1),
        Report::Failed(e) => panic!("{e}"),
    }
    assert_eq!(trx.recv().unwrap().placement, 1);
    o2.send(false).unwrap();
    assert!(matches!(reports.recv().unwrap(), Report::Failed(_)));
    drop(jobs);
    h.join().unwrap();
    assert!(reports.recv().is_err(), "watcher exits when the jobs end");
    ready.lock().unwrap().check_complete().unwrap();
}
