//! [`HostUpload`]: fills a device arena from bytes that are already in host memory.
//!
//! For loads whose bytes need work on the host before they may reach the device (tensorizer
//! hash verification, decryption): the caller loads a bounded group of tensors into host
//! memory, processes them there, and hands each tensor's bytes to [`HostUpload::write`], which
//! copies them into the device's pinned staging slots and queues async host→device copies
//! (round-robin over the streams). [`HostUpload::settle`] waits for what was queued and announces
//! the tensors now complete on the device (streaming); [`HostUpload::finish`] returns the
//! [`DeviceModel`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tensorstream_engine::{Error, IoBuf, Plan, Result, TensorIndex};

use crate::copy::{CopyOp, RoundRobin};
use crate::device::CudaDevice;
use crate::model::{DeviceModel, LoadTimes, Target};
use crate::raw::driver::{copy_to_device, HostSource, InFlight};
use crate::raw::driver::{mark, DeviceArena};
use crate::tracker::ReadyTensor;

/// Per-placement progress of a [`HostUpload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing queued yet.
    Empty,
    /// Copies queued, not yet confirmed complete.
    Queued,
    /// On the device (confirmed by an event, or zero-filled).
    Landed,
}

/// Copies host bytes into one device arena laid out by a `Layout::Packed` plan.
pub struct HostUpload {
    dev: Arc<CudaDevice>,
    plan: Arc<Plan>,
    arena: Arc<DeviceArena>,
    free: Vec<IoBuf>,
    inflight: VecDeque<InFlight>,
    rr: RoundRobin,
    /// Bytes per pinned slot (the smallest slot's capacity).
    slot_size: usize,
    state: Vec<State>,
    start: Instant,
    first: Option<Duration>,
    last: Option<Duration>,
    alloc: Duration,
    subscriber: Option<Sender<ReadyTensor>>,
}

impl HostUpload {
    /// Allocates the arena for `plan` on `dev`, takes the pinned slots and zero-fills the tensors
    /// that are not read (meta tensors).
    pub fn new(dev: &Arc<CudaDevice>, plan: Arc<Plan>) -> Result<Self> {
        Self::with_target(dev, plan, Target::default())
    }

    /// [`HostUpload::new`] into `target`: device memory given beforehand (a window of a shared
    /// allocation) instead of a new allocation, and a subscriber told of each tensor as
    /// [`HostUpload::settle`] finds it on the device.
    pub fn with_target(dev: &Arc<CudaDevice>, plan: Arc<Plan>, target: Target) -> Result<Self> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        // Like CudaSink: the device allocation counts.
        let start = Instant::now();
        // The slots before the device memory: a load refused because another one holds the
        // device must not allocate memory the running load may need.
        let free = dev.take_slots()?;
        let (arena, alloc) = crate::sink::arena_for(dev, &plan, target.arena)?;
        if let Some(k) = &target.keep {
            k.hold(arena.clone());
        }
        if free.is_empty() {
            return Err(Error::invalid("the device has no pinned staging slots"));
        }
        let slot_size = free.iter().map(IoBuf::capacity).min().unwrap_or(0);
        if slot_size == 0 {
            return Err(Error::invalid(
                "the device's pinned staging slots are empty",
            ));
        }
        let mut state = vec![State::Empty; plan.placements.len()];
        let s0 = dev.stream(0).clone();
        let mut zeroed = false;
        for (i, p) in plan.placements.iter().enumerate() {
            if p.needed.is_empty() {
                if p.len > 0 {
                    arena.memset_async(p.dest, p.len, &s0)?;
                    zeroed = true;
                }
                state[i] = State::Queued;
            }
        }
        let mut up = HostUpload {
            dev: dev.clone(),
            plan,
            arena,
            free,
            inflight: VecDeque::new(),
            rr: RoundRobin::new(dev.stream_count()),
            slot_size,
            state,
            start,
            first: None,
            last: None,
            alloc,
            subscriber: target.subscriber,
        };
        if zeroed {
            let ev = up.dev.event()?;
            let pending = mark(&up.arena, &s0, ev)?;
            up.inflight.push_back(pending);
        }
        Ok(up)
    }

    /// The plan the arena follows.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Queues the copy of `bytes`, the whole data of placement `placement`, to its place in the
    /// arena. The bytes are copied into pinned slots before this returns, so the caller may free
    /// them at once.
    pub fn write(&mut self, placement: usize, bytes: &[u8]) -> Result<()> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        let p =
            self.plan.placements.get(placement).ok_or_else(|| {
                Error::invalid(format!("placement #{placement} is not in the plan"))
            })?;
        let (dest, len) = (p.dest, p.len);
        if bytes.len() as u64 != len {
            return Err(Error::invalid(format!(
                "placement #{placement} holds {len} bytes, got {}",
                bytes.len()
            )));
        }
        if self.state[placement] != State::Empty {
            return Err(Error::invalid(format!(
                "placement #{placement} was already written"
            )));
        }
        let mut off = 0u64;
        for chunk in bytes.chunks(self.slot_size) {
            // Everything that can fail before the copy is queued comes before the slot is taken,
            // so that a failure never loses a slot.
            let dst = dest
                .checked_add(off)
                .ok_or_else(|| Error::invalid("device offset overflows"))?;
            let copy = CopyOp {
                src: 0,
                dst,
                len: chunk.len() as u64,
            };
            let stream = self.dev.stream(self.rr.next_index()).clone();
            let ev = self.dev.event()?;
            let mut slot = self.slot()?;
            if !slot.set_len(chunk.len()) {
                self.free.push(slot);
                self.dev.recycle_event(ev);
                return Err(Error::invalid(format!(
                    "a {}-byte piece does not fit a pinned slot",
                    chunk.len()
                )));
            }
            slot.as_mut_slice().copy_from_slice(chunk);
            match copy_to_device(&self.arena, HostSource::Slot(slot), &[copy], &stream, ev) {
                Ok(f) => self.inflight.push_back(f),
                Err(e) => {
                    if let Some(HostSource::Slot(b)) = e.source {
                        self.free.push(b);
                    }
                    return Err(e.error);
                }
            }
            off += chunk.len() as u64;
        }
        self.state[placement] = State::Queued;
        Ok(())
    }

    /// A free pinned slot, waiting for the oldest copy if none is free.
    fn slot(&mut self) -> Result<IoBuf> {
        loop {
            if let Some(mut b) = self.free.pop() {
                let cap = b.capacity();
                b.set_len(cap);
                return Ok(b);
            }
            self.wait_oldest()?;
        }
    }

    fn wait_oldest(&mut self) -> Result<()> {
        let f = self
            .inflight
            .pop_front()
            .ok_or_else(|| Error::invalid("no free pinned slot and no copy in flight"))?;
        let (src, ev) = f.wait()?;
        self.dev.recycle_event(ev);
        if let Some(HostSource::Slot(b)) = src {
            self.free.push(b);
        }
        Ok(())
    }

    /// Waits for every queued copy, then announces the placements now on the device.
    pub fn settle(&mut self) -> Result<()> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        while !self.inflight.is_empty() {
            self.wait_oldest()?;
        }
        let at = self.start.elapsed();
        for (i, s) in self.state.iter_mut().enumerate() {
            if *s != State::Queued {
                continue;
            }
            *s = State::Landed;
            self.first.get_or_insert(at);
            self.last = Some(at);
            let p = &self.plan.placements[i];
            if let Some(tx) = &self.subscriber {
                let _ = tx.send(ReadyTensor {
                    placement: i,
                    tensor: p.tensor,
                    ptr: self.arena.base() + p.dest,
                    len: p.len,
                    at,
                });
            }
        }
        Ok(())
    }

    /// Waits for everything, checks every placement was written and returns the model.
    pub fn finish(mut self, index: TensorIndex) -> Result<DeviceModel> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        self.settle()?;
        self.dev.synchronize()?;
        if let Some(i) = self.state.iter().position(|s| *s != State::Landed) {
            let name = self
                .plan
                .placements
                .get(i)
                .and_then(|p| index.tensors.get(p.tensor))
                .map(|t| t.name.clone())
                .unwrap_or_default();
            return Err(Error::invalid(format!(
                "tensor {name:?} (placement #{i}) was never written to the device"
            )));
        }
        self.free.clear(); // the slots go back to the device for the next load
        self.subscriber = None;
        DeviceModel::new(
            self.dev.clone(),
            self.arena.clone(),
            index,
            &self.plan,
            LoadTimes {
                first_tensor: self.first,
                last_tensor: self.last,
                alloc: self.alloc,
            },
        )
    }
}

impl Drop for HostUpload {
    fn drop(&mut self) {
        let _keep = crate::raw::driver::KeepCurrent::now();
        // InFlight waits for its own event before giving its slot back.
        self.inflight.clear();
    }
}
