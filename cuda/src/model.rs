//! [`DeviceModel`]: tensors loaded into one device arena.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tensorstream_engine::index::NameOrder;
use tensorstream_engine::{DType, Error, Plan, Result, TensorIndex};

use crate::device::CudaDevice;
use crate::raw::driver::DeviceArena;
use crate::tracker::ReadyTensor;

/// Timing of a device load as the watcher observed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadTimes {
    /// From the start of the load until the first tensor was on the device.
    pub first_tensor: Option<Duration>,
    /// From the start of the load until the last tensor was on the device.
    pub last_tensor: Option<Duration>,
    /// How long allocating the load's device memory took (zero when it was given a window of
    /// an allocation made beforehand: [`Target::arena`]). On the ring route the allocation
    /// runs while the first reads fill the staging slots, so it is not all added to the load.
    pub alloc: Duration,
}

/// Where a device load puts its tensors, and whom it tells as each lands.
#[derive(Debug, Default)]
pub struct Target {
    /// Device memory to load into: at least the plan's `arena_len` bytes, aligned as the plan
    /// asks, in the device's context — e.g. a [`DeviceArena::window`] of one allocation shared
    /// by the shards of a checkpoint. `None`: the load allocates its own.
    pub arena: Option<Arc<DeviceArena>>,
    /// Receives each tensor as soon as its bytes are on the device.
    pub subscriber: Option<Sender<ReadyTensor>>,
    /// Given a share of the load's device memory as soon as it exists (a streaming load's
    /// [`crate::Keeper`]: keeps streamed tensors' pointers valid if the load fails).
    pub keep: Option<crate::Keeper>,
}

/// One tensor on the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTensor<'a> {
    /// Name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [u64],
    /// Offset of the data in the object it came from.
    pub offset: u64,
    /// Device address of the first data byte (aligned as the plan asked, ≥ 256 B for GPU plans).
    pub ptr: u64,
    /// Data bytes.
    pub len: u64,
    arena_off: u64,
}

/// Tensors loaded into GPU memory: one arena, per-tensor device pointers.
pub struct DeviceModel {
    dev: Arc<CudaDevice>,
    arena: Option<Arc<DeviceArena>>,
    index: TensorIndex,
    /// (tensor index, arena offset, len), sorted by tensor index.
    entries: Vec<(usize, u64, u64)>,
    /// `entries` positions by tensor name (for `get`).
    by_name: NameOrder,
    times: LoadTimes,
}

impl std::fmt::Debug for DeviceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("device", &self.dev.ordinal())
            .field("tensors", &self.entries.len())
            .field("arena_len", &self.arena_len())
            .finish()
    }
}

impl DeviceModel {
    pub(crate) fn new(
        dev: Arc<CudaDevice>,
        arena: Arc<DeviceArena>,
        index: TensorIndex,
        plan: &Plan,
        times: LoadTimes,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(plan.placements.len());
        for p in &plan.placements {
            if p.dest.checked_add(p.len).is_none_or(|e| e > arena.len()) {
                return Err(Error::invalid("tensor lies outside the device arena"));
            }
            if index.tensors.get(p.tensor).is_none() {
                return Err(Error::invalid("plan names a tensor the index lacks"));
            }
            entries.push((p.tensor, p.dest, p.len));
        }
        entries.sort_by_key(|e| e.0);
        let by_name = NameOrder::new(entries.len(), |k| &index.tensors[entries[k].0].name);
        Ok(DeviceModel {
            dev,
            arena: Some(arena),
            index,
            entries,
            by_name,
            times,
        })
    }

    /// One model over the models of several files loaded into windows of one allocation
    /// (`whole`): the shards of a checkpoint. `parts` gives each file's model and when its load
    /// started, counted from the start of the whole load; `index` names every tensor of every
    /// part (the checkpoint's combined index); `alloc` is the time `whole` took to allocate.
    pub fn combine(
        whole: Arc<DeviceArena>,
        index: TensorIndex,
        parts: Vec<(DeviceModel, Duration)>,
        alloc: Duration,
    ) -> Result<DeviceModel> {
        let position = index.positions();
        let mut entries = Vec::new();
        let mut times = LoadTimes {
            alloc,
            ..LoadTimes::default()
        };
        let mut dev = None;
        for (part, started) in &parts {
            let arena = part.arena()?;
            let base = arena
                .base()
                .checked_sub(whole.base())
                .filter(|b| b.checked_add(arena.len()).is_some_and(|e| e <= whole.len()))
                .ok_or_else(|| {
                    Error::invalid("a part's device memory lies outside the shared allocation")
                })?;
            for &(tensor, off, len) in &part.entries {
                let name = &part.index.tensors[tensor].name;
                let &at = position.get(name.as_str()).ok_or_else(|| {
                    Error::invalid(format!("tensor {name:?} is not in the combined index"))
                })?;
                entries.push((at, base + off, len));
            }
            let t = part.times();
            let shift = |d: Option<Duration>| d.map(|d| *started + d);
            times.first_tensor = match (times.first_tensor, shift(t.first_tensor)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            times.last_tensor = times.last_tensor.max(shift(t.last_tensor));
            dev.get_or_insert_with(|| part.dev.clone());
        }
        let dev = dev.ok_or_else(|| Error::invalid("no part to combine"))?;
        // The parts' memory must not overlap (each its own window of `whole`).
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(parts.len());
        for (part, _) in &parts {
            let a = part.arena()?;
            spans.push((a.base(), a.base() + a.len()));
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(Error::invalid(
                "the parts being combined share device memory",
            ));
        }
        entries.sort_by_key(|e| e.0);
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Error::invalid(
                "a tensor was loaded by two of the parts being combined",
            ));
        }
        drop(parts); // their windows let go of `whole`, which the model now holds
        let by_name = NameOrder::new(entries.len(), |k| &index.tensors[entries[k].0].name);
        Ok(DeviceModel {
            dev,
            arena: Some(whole),
            index,
            entries,
            by_name,
            times,
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when no tensor was loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The index of the whole file.
    pub fn index(&self) -> &TensorIndex {
        &self.index
    }
    /// The device the model is on (its streams, pinned staging ring and options).
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }
    /// Timing of the load (time to first tensor).
    pub fn times(&self) -> LoadTimes {
        self.times
    }
    /// Device address of the arena (0 after release).
    pub fn arena_ptr(&self) -> u64 {
        self.arena.as_ref().map_or(0, |a| a.base())
    }
    /// Bytes of the arena (0 after release).
    pub fn arena_len(&self) -> u64 {
        self.arena.as_ref().map_or(0, |a| a.len())
    }
    /// Bytes of tensor data held.
    pub fn nbytes(&self) -> u64 {
        self.entries.iter().map(|e| e.2).sum()
    }

    fn view(&self, e: &(usize, u64, u64)) -> DeviceTensor<'_> {
        let t = &self.index.tensors[e.0];
        DeviceTensor {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            offset: t.range.start,
            ptr: self.arena_ptr().wrapping_add(e.1),
            len: e.2,
            arena_off: e.1,
        }
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> impl Iterator<Item = DeviceTensor<'_>> {
        self.entries.iter().map(|e| self.view(e))
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<DeviceTensor<'_>> {
        self.by_name
            .find(name, |k| &self.index.tensors[self.entries[k].0].name)
            .map(|k| self.view(&self.entries[k]))
    }

    fn arena(&self) -> Result<&Arc<DeviceArena>> {
        self.arena
            .as_ref()
            .ok_or_else(|| Error::invalid("device model was released"))
    }

    /// Streams a tensor's device bytes back to the host in chunks of at most `chunk` bytes
    /// (bounded host memory, e.g. for hashing).
    pub fn read_chunks(
        &self,
        t: &DeviceTensor<'_>,
        chunk: usize,
        mut f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        let arena = self.arena()?;
        let chunk = chunk.clamp(1, 1 << 30);
        let mut buf = vec![0u8; chunk.min(usize::try_from(t.len).unwrap_or(chunk))];
        let mut off = 0u64;
        while off < t.len {
            let n = (t.len - off).min(buf.len() as u64) as usize;
            arena.read(t.arena_off + off, &mut buf[..n])?;
            f(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// A tensor's device bytes, copied back to a host vector.
    pub fn to_host(&self, t: &DeviceTensor<'_>) -> Result<Vec<u8>> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        let n = usize::try_from(t.len).map_err(|_| Error::invalid("tensor too large"))?;
        let mut v = vec![0u8; n];
        self.arena()?.read(t.arena_off, &mut v)?;
        Ok(v)
    }

    /// Frees the device memory now (synchronizing the device's context first), reporting any
    /// CUDA error. If something else still holds the allocation (the copy handle of a streaming
    /// load that was dropped without `wait`, or another shard's model in the same allocation:
    /// [`DeviceArena::window`]), it is freed when the last of them lets go, and this returns
    /// `Ok` at once.
    pub fn release(mut self) -> Result<()> {
        let _keep = crate::raw::driver::KeepCurrent::now();
        match self.arena.take() {
            Some(a) => match Arc::into_inner(a) {
                Some(a) => a.free(),
                // Still referenced by a pending copy handle: freed when that goes away.
                None => Ok(()),
            },
            None => Ok(()),
        }
    }
}
