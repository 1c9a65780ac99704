//! Bookkeeping of a device load, independent of CUDA so it is testable without a GPU:
//! which tensors have landed ([`Readiness`], feeding the streaming API), and the watcher thread
//! that waits for each queued copy in submission order and reports it back ([`spawn_watcher`]).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tensorstream_engine::{Error, ErrorKind, Plan, Result};

/// A tensor whose bytes are all on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyTensor {
    /// Index into the plan's placements (a sharded checkpoint's: the shard's plan).
    pub placement: usize,
    /// Index into `TensorIndex::tensors` (the index of the load: a sharded checkpoint's
    /// combined one when a `Loader` streams it).
    pub tensor: usize,
    /// Device address of the tensor's first data byte.
    pub ptr: u64,
    /// Data bytes.
    pub len: u64,
    /// Time from the start of the load until the landing was observed.
    pub at: Duration,
}

/// Tracks the bytes still missing per placement and announces each tensor once complete.
#[derive(Debug)]
pub struct Readiness {
    remaining: Vec<u64>,
    tensor: Vec<usize>,
    ptr: Vec<u64>,
    len: Vec<u64>,
    pending: usize,
    start: Instant,
    first: Option<Duration>,
    last: Option<Duration>,
    tx: Option<Sender<ReadyTensor>>,
}

impl Readiness {
    /// Bookkeeping for `plan` landing in an arena at device address `base`. Placements with
    /// nothing to copy or zero are announced at once. `remaining` counts the needed object
    /// bytes, or for synthesized (zero) tensors their length, which a memset lands.
    pub fn new(plan: &Plan, base: u64, start: Instant, tx: Option<Sender<ReadyTensor>>) -> Self {
        let remaining: Vec<u64> = plan
            .placements
            .iter()
            .map(|p| {
                if p.needed.is_empty() {
                    p.len
                } else {
                    p.needed.end - p.needed.start
                }
            })
            .collect();
        let mut r = Readiness {
            pending: remaining.len(),
            tensor: plan.placements.iter().map(|p| p.tensor).collect(),
            ptr: plan
                .placements
                .iter()
                .map(|p| base.wrapping_add(p.dest))
                .collect(),
            len: plan.placements.iter().map(|p| p.len).collect(),
            remaining,
            start,
            first: None,
            last: None,
            tx,
        };
        for i in 0..r.remaining.len() {
            if r.remaining[i] == 0 {
                r.announce(i);
            }
        }
        r
    }

    fn announce(&mut self, i: usize) {
        let at = self.start.elapsed();
        // Empty tensors are "ready" at once; they do not count as the first tensor landing.
        if self.len[i] > 0 {
            self.first.get_or_insert(at);
            self.last = Some(at);
        }
        self.pending -= 1;
        if let Some(tx) = &self.tx {
            let t = ReadyTensor {
                placement: i,
                tensor: self.tensor[i],
                ptr: self.ptr[i],
                len: self.len[i],
                at,
            };
            if tx.send(t).is_err() {
                self.tx = None; // nobody listens any more
            }
        }
    }

    /// Records that `landed` (placement, bytes) reached the device; returns the placements
    /// that became complete.
    pub fn complete(&mut self, landed: &[(usize, u64)]) -> Result<Vec<usize>> {
        let mut done = Vec::new();
        for &(p, n) in landed {
            let r = self
                .remaining
                .get_mut(p)
                .ok_or_else(|| Error::invalid(format!("placement #{p} is not in the plan")))?;
            if n > *r {
                return Err(Error::invalid(format!(
                    "placement #{p} received {n} bytes but only {r} were missing"
                )));
            }
            if *r == 0 {
                continue;
            }
            *r -= n;
            if *r == 0 {
                done.push(p);
                self.announce(p);
            }
        }
        Ok(done)
    }

    /// Placements not yet complete.
    pub fn pending(&self) -> usize {
        self.pending
    }
    /// Time until the first non-empty tensor landed.
    pub fn first(&self) -> Option<Duration> {
        self.first
    }
    /// Time until the last non-empty tensor landed.
    pub fn last(&self) -> Option<Duration> {
        self.last
    }
    /// Stops announcing (closes the streaming channel).
    pub fn close(&mut self) {
        self.tx = None;
    }
    /// Fails unless every placement is complete.
    pub fn check_complete(&self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "{} of {} tensors never landed on the device",
                self.pending,
                self.remaining.len()
            ),
        ))
    }
}

/// Counts the staging slots the sink holds (copies queued, slot not yet free) against the slots
/// it lent the engine. The sink may block for a copy only when it holds every slot: then the
/// engine has nothing to read into, and nothing else can make progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotLedger {
    total: usize,
    held: usize,
}

impl SlotLedger {
    /// Slots lent to the engine.
    pub fn lend(&mut self, total: usize) {
        self.total = total;
        self.held = 0;
    }
    /// A slot was queued for the device.
    pub fn queued(&mut self) {
        self.held += 1;
    }
    /// A slot came back from the device.
    pub fn returned(&mut self) {
        self.held = self.held.saturating_sub(1);
    }
    /// Slots held by the sink.
    pub fn held(&self) -> usize {
        self.held
    }
    /// True when the sink holds every slot and got none back yet: it must wait for a copy.
    pub fn must_wait(&self, freed_now: usize) -> bool {
        freed_now == 0 && self.total > 0 && self.held >= self.total
    }
}

/// Work the watcher can wait for (a copy with its event; a fake in tests).
pub trait Pending: Send + 'static {
    /// What comes back once done (the host buffer and the event, for reuse).
    type Done: Send + 'static;
    /// Blocks until the work completed.
    fn wait(self) -> Result<Self::Done>;
}

/// One queued copy and the bytes it lands per placement.
pub struct Job<P> {
    /// The queued work.
    pub pending: P,
    /// (placement, bytes) it lands.
    pub landed: Vec<(usize, u64)>,
}

/// What the watcher reports for each job, in submission order.
pub enum Report<D> {
    /// The job completed; here is what it held.
    Done(D),
    /// The job failed.
    Failed(Error),
}

/// The watcher's job sender, report receiver and thread.
pub type Watcher<P> = (
    Sender<Job<P>>,
    Receiver<Report<<P as Pending>::Done>>,
    JoinHandle<()>,
);

/// Starts the thread that waits for each job in order, updates `readiness` (announcing
/// tensors as they land) and reports the job back. It exits when the job sender is dropped and
/// every job was reported.
pub fn spawn_watcher<P: Pending>(readiness: Arc<Mutex<Readiness>>) -> Result<Watcher<P>> {
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job<P>>();
    let (rep_tx, rep_rx) = crossbeam_channel::unbounded::<Report<P::Done>>();
    let h = std::thread::Builder::new()
        .name("ts-cuda-watch".into())
        .spawn(move || {
            for job in job_rx.iter() {
                let rep = match job.pending.wait() {
                    Ok(d) => {
                        let r = match readiness.lock() {
                            Ok(mut g) => g.complete(&job.landed).map(|_| ()),
                            Err(_) => Err(Error::invalid("readiness lock poisoned")),
                        };
                        match r {
                            Ok(()) => Report::Done(d),
                            Err(e) => {
                                // The buffer is free either way; report both.
                                let _ = rep_tx.send(Report::Done(d));
                                Report::Failed(e)
                            }
                        }
                    }
                    Err(e) => Report::Failed(e),
                };
                let _ = rep_tx.send(rep);
            }
        })
        .map_err(|e| Error::from_io(e, "spawning the CUDA watcher thread"))?;
    Ok((job_tx, rep_rx, h))
}

#[cfg(test)]
mod tests;
