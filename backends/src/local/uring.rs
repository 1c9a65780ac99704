//! The io_uring reader: the only module of this crate with `unsafe`.
//!
//! Ownership rules (tokio-uring / io-uring model):
//! * A submitted read owns its [`IoBuf`] (kept in `slots`) until its completion has been reaped;
//!   the buffer is handed back in a [`ReadDone`] only then.
//! * Registered buffers: the reader keeps a strong reference to every registered region until it
//!   is dropped, so registered memory stays valid as long as the kernel may use it, and a
//!   `ReadFixed` is only issued for a buffer inside a region that was registered (checked by
//!   region identity and address range).
//! * `Drop` waits for every read the kernel still holds before the buffers go away. If waiting
//!   fails (it cannot in practice), the buffers of unfinished reads are leaked rather than freed.
//!
//! Short reads are resubmitted for the remainder, `EINTR`/`EAGAIN` completions are retried, an
//! `EINVAL` from an O_DIRECT read resubmits it buffered (and switches the file to buffered).
//! Submissions are batched: `submit` only queues the SQE; `wait` flushes the queue and waits in
//! one `io_uring_enter` (`submit_and_wait`).

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, squeue, types, IoUring};
use tensorstream_engine::{
    Error, ErrorKind, IoBuf, MemRegion, RangeReader, ReadDone, ReadRequest, Result,
};

use super::reader::{ChangeGuard, MAX_RETRIES};
use super::Files;

/// Largest single read op (the kernel's `len` is 32 bits; bigger requests are split).
const MAX_OP: usize = 1 << 30;
/// Largest single registered buffer the kernel accepts.
const MAX_REG_BUF: usize = 1 << 30;
/// Registered (pinned) memory per reader. Registration pins and faults in every page up front, on
/// one thread, before the first read: worth it for the staging ring, not for a multi-GiB arena
/// that the reads themselves would fault in, overlapped with the I/O.
pub(crate) const REGISTER_BUDGET: usize = 256 << 20;
/// Most registered buffers per ring (`IORING_MAX_REG_BUFFERS`).
const MAX_REG_COUNT: usize = 1 << 14;
/// Times a dropped reader retries a busy ring (1 ms apart) before it leaks what the kernel may
/// still write into rather than spin for ever.
const DROP_BUSY_TRIES: u32 = 10_000;

/// Whether io_uring can be used in this process (probed once: a tiny ring, and the kernel's
/// list of supported operations: plain `READ` came with Linux 5.6, after io_uring itself, and a
/// ring without it would fail every unregistered read with `EINVAL`).
pub(crate) fn available() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let ring = IoUring::new(2).map_err(|e| format!("io_uring_setup failed: {e}"))?;
            let mut probe = io_uring::Probe::new();
            ring.submitter()
                .register_probe(&mut probe)
                .map_err(|e| format!("io_uring cannot list its operations (kernel < 5.6): {e}"))?;
            for (code, name) in [
                (opcode::Read::CODE, "READ"),
                (opcode::ReadFixed::CODE, "READ_FIXED"),
            ] {
                if !probe.is_supported(code) {
                    return Err(format!("this kernel's io_uring has no {name} operation"));
                }
            }
            Ok(())
        })
        .clone()
}

/// Says once per process that reads fall back to the pread pool.
pub(crate) fn note_unavailable(why: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        log::warn!("io_uring unavailable ({why}); using the pread thread pool");
    }
}

fn note_registration_failed(bytes: usize, err: &std::io::Error) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
        let limit = match limit.current {
            Some(n) => format!("{} KiB", n / 1024),
            None => "unlimited".to_string(),
        };
        log::warn!(
            "io_uring buffer registration of {} MiB failed ({err}; locked-memory \
             limit `ulimit -l` is {limit}); using unregistered reads, which work as well but \
             pin pages per read",
            bytes >> 20
        );
    }
}

/// One registered buffer: a piece of a region.
struct Reg {
    start: usize,
    end: usize,
    /// Identity of the region (its `Arc` data address; kept alive by `UringReader::regions`).
    region: usize,
}

/// A read the kernel holds (or will, once the queue is flushed).
struct Op {
    id: u64,
    offset: u64,
    buf: IoBuf,
    /// Bytes already read (short reads are resubmitted for the rest).
    done: usize,
    /// Transient failures so far.
    retries: u32,
    /// Whether the read now in the kernel went to the O_DIRECT descriptor.
    direct: bool,
}

/// Reads through io_uring: O_DIRECT where aligned, registered buffers, batched submission.
pub(crate) struct UringReader {
    // Field order matters for Drop: `drop` waits for the kernel first; then the ring closes
    // before `regions` (registered memory) and `slots` (buffers) are released.
    ring: IoUring,
    files: Arc<Files>,
    /// Fixed-file indices of (direct, buffered), when `register_files` worked.
    fixed_files: bool,
    slots: Vec<Option<Op>>,
    free: Vec<u32>,
    ready: VecDeque<ReadDone>,
    /// Reads whose completion has not been reaped (queued or in the kernel).
    kernel: usize,
    /// Requests accepted by `submit` and not yet returned by `wait`.
    in_flight: usize,
    regs: Vec<Reg>,
    regions: Vec<Arc<dyn MemRegion>>,
    cqes: Vec<(u64, i32)>,
    guard: ChangeGuard,
    /// What was submitted, for tests and debugging.
    pub(crate) counts: OpCounts,
}

/// Submitted read ops by kind (resubmissions included).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OpCounts {
    /// Ops on the O_DIRECT descriptor.
    pub direct: u64,
    /// Ops on the buffered descriptor.
    pub buffered: u64,
    /// Ops into registered buffers (`ReadFixed`).
    pub fixed: u64,
    /// Resubmissions after a short read, `EINTR`/`EAGAIN` or a refused O_DIRECT read.
    pub resubmitted: u64,
}

fn ring_error(e: std::io::Error, what: &str) -> Error {
    Error::from_io(e, what).with_backend("local")
}

impl UringReader {
    /// A ring for `depth` reads in flight. On failure the guard comes back with the error, so
    /// the caller can fall back to another reader.
    pub fn new(
        files: Arc<Files>,
        depth: usize,
        guard: ChangeGuard,
    ) -> std::result::Result<Self, Box<(Error, ChangeGuard)>> {
        let entries = depth.clamp(2, 4096).next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_submit_all()
            .setup_coop_taskrun()
            .setup_clamp()
            .build(entries)
            .or_else(|_| IoUring::new(entries));
        let ring = match ring {
            Ok(r) => r,
            Err(e) => return Err(Box::new((ring_error(e, "io_uring_setup"), guard))),
        };
        let direct_fd = files.direct.as_ref().map(|f| f.as_raw_fd());
        let buffered_fd = files.buffered.as_raw_fd();
        // Index 0: direct (or the buffered fd again when there is none), 1: buffered.
        let fixed_files = ring
            .submitter()
            .register_files(&[direct_fd.unwrap_or(buffered_fd), buffered_fd])
            .is_ok();
        let cap = ring.params().cq_entries() as usize;
        Ok(UringReader {
            ring,
            files,
            fixed_files,
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            ready: VecDeque::with_capacity(cap),
            kernel: 0,
            in_flight: 0,
            regs: Vec::new(),
            regions: Vec::new(),
            cqes: Vec::with_capacity(cap),
            guard,
            counts: OpCounts::default(),
        })
    }

    /// Queues the (rest of the) read in `slot`. Flushes the submission queue when it is full.
    fn push(&mut self, slot: u32) -> Result<()> {
        let files = &self.files;
        let Some(op) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Err(Error::new(ErrorKind::Io, "io_uring slot lost its read"));
        };
        let len = (op.buf.len() - op.done).min(MAX_OP);
        let off = op.offset + op.done as u64;
        let ptr = op.buf.as_mut_ptr().wrapping_add(op.done);
        let direct = files.direct_fits(off, ptr as usize, len);
        op.direct = direct;
        let fixed = fixed_index(&self.regs, &op.buf, ptr as usize, len);
        let entry = if self.fixed_files {
            // Fixed file 0 is the O_DIRECT descriptor, 1 the buffered one.
            let fd = types::Fixed(u32::from(!direct));
            match fixed {
                Some(i) => opcode::ReadFixed::new(fd, ptr, len as u32, i)
                    .offset(off)
                    .build(),
                None => opcode::Read::new(fd, ptr, len as u32).offset(off).build(),
            }
        } else {
            let fd = match (&files.direct, direct) {
                (Some(f), true) => types::Fd(f.as_raw_fd()),
                _ => types::Fd(files.buffered.as_raw_fd()),
            };
            match fixed {
                Some(i) => opcode::ReadFixed::new(fd, ptr, len as u32, i)
                    .offset(off)
                    .build(),
                None => opcode::Read::new(fd, ptr, len as u32).offset(off).build(),
            }
        };
        let entry = entry.user_data(u64::from(slot));
        if direct {
            self.counts.direct += 1;
        } else {
            self.counts.buffered += 1;
        }
        if fixed.is_some() {
            self.counts.fixed += 1;
        }
        // Keep the completion queue from overflowing: never more reads in the kernel than it has
        // room for.
        while self.kernel >= self.ring.params().cq_entries() as usize {
            self.enter(1)?;
            self.reap()?;
        }
        self.push_entry(&entry)?;
        self.kernel += 1;
        Ok(())
    }

    fn push_entry(&mut self, entry: &squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: the entry points into the IoBuf owned by `self.slots[slot]`, which stays
            // there (not moved, not dropped, not handed back) until the completion carrying this
            // user_data is reaped in `reap`, and Drop waits for every outstanding completion.
            // The fd / fixed-file index refer to descriptors in `self.files`, kept alive by the
            // Arc for the life of the ring. A ReadFixed index refers to a registered buffer whose
            // region `self.regions` keeps alive and which contains the whole target range
            // (`fixed_index`).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            self.enter(0)?;
        }
    }

    /// Flushes the submission queue and waits for `want` completions, retrying `EINTR`.
    fn enter(&mut self, want: usize) -> Result<()> {
        let mut busy = 0u32;
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
                        && busy < MAX_RETRIES =>
                {
                    // Completion queue backed up or out of resources: reap, then retry.
                    busy += 1;
                    if self.ring.completion().is_empty() {
                        std::thread::yield_now();
                    }
                    self.reap()?;
                    if want > 0 && !self.ready.is_empty() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(ring_error(e, "io_uring_enter")),
            }
        }
    }

    /// The next completed read, waiting for the kernel as needed; `None` once `until` has
    /// passed (never without a time limit, or on kernels without IORING_FEAT_EXT_ARG (before
    /// 5.11), where a wait cannot time out).
    fn next_done(&mut self, until: Option<std::time::Instant>) -> Result<Option<ReadDone>> {
        if self.in_flight == 0 {
            return Err(Error::invalid("wait() with no read in flight"));
        }
        let until = until.filter(|_| self.ring.params().is_feature_ext_arg());
        loop {
            if let Some(d) = self.ready.pop_front() {
                self.in_flight -= 1;
                return Ok(Some(d));
            }
            if self.kernel == 0 {
                return Err(Error::new(
                    ErrorKind::Io,
                    "io_uring reader lost track of its reads",
                ));
            }
            if self.ring.completion().is_empty() {
                match until {
                    None => self.enter(1)?,
                    Some(until) => {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            return Ok(None);
                        }
                        let ts = types::Timespec::from(left);
                        let args = types::SubmitArgs::new().timespec(&ts);
                        match self.ring.submitter().submit_with_args(1, &args) {
                            Ok(_) => {}
                            // Timed out, interrupted, or busy: look again (the loop ends at
                            // `until`).
                            Err(e)
                                if matches!(
                                    e.raw_os_error(),
                                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                                ) => {}
                            Err(e) => return Err(ring_error(e, "io_uring_enter")),
                        }
                    }
                }
            } else if !self.ring.submission().is_empty() {
                self.enter(0)?;
            }
            self.reap()?;
        }
    }

    /// Handles every completion in the queue.
    fn reap(&mut self) -> Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut out = Ok(());
        // Every reaped completion leaves the kernel now, before any is handled: if handling one
        // panicked, `Drop` must not wait for completions that already arrived.
        self.kernel -= cqes.len();
        for &(ud, res) in &cqes {
            if let Err(e) = self.complete(ud as u32, res) {
                out = Err(e);
            }
        }
        self.cqes = cqes;
        out
    }

    /// The read in `slot`, which nothing in the kernel holds (its submission failed): its
    /// buffer comes back as a failed read.
    fn fail_unqueued(&mut self, slot: u32, e: Error) {
        if let Some(op) = self.slots[slot as usize].take() {
            self.free.push(slot);
            self.ready.push_back(ReadDone {
                id: op.id,
                offset: op.offset,
                buf: op.buf,
                result: Err(e),
            });
        }
    }

    /// One completion of the read in `slot`: finish it, or resubmit the rest.
    fn complete(&mut self, slot: u32, res: i32) -> Result<()> {
        let Some(op) = self.slots.get_mut(slot as usize).and_then(|s| s.as_mut()) else {
            return Err(Error::new(
                ErrorKind::Io,
                format!("io_uring completion for unknown slot {slot}"),
            ));
        };
        let len = op.buf.len();
        let result: Option<Result<usize>> = if res < 0 {
            let errno = -res;
            if (errno == libc::EINTR || errno == libc::EAGAIN) && op.retries < MAX_RETRIES {
                op.retries += 1;
                None
            } else if errno == libc::EINVAL && op.direct {
                // An O_DIRECT read the filesystem refused: resubmit buffered (every direct read
                // already in the kernel gets here too, each on its own).
                self.files.disable_direct("EINVAL from io_uring");
                None
            } else {
                let off = op.offset + op.done as u64;
                Some(Err(Error::from_io(
                    std::io::Error::from_raw_os_error(errno),
                    "read",
                )
                .with_location(&self.files.path)
                .with_backend("local")
                .with_range(off..op.offset + len as u64)))
            }
        } else if res == 0 {
            Some(Ok(op.done)) // end of file
        } else {
            op.done += res as usize;
            let pos = op.offset + op.done as u64;
            if op.done >= len || pos >= self.guard.size() {
                Some(Ok(op.done.min(len)))
            } else {
                None // short read inside the object: read the rest
            }
        };
        match result {
            None => {
                self.counts.resubmitted += 1;
                if let Err(e) = self.push(slot) {
                    // Nothing is queued for it any more: not left stranded in its slot.
                    self.fail_unqueued(slot, e);
                }
                Ok(())
            }
            Some(r) => {
                let Some(op) = self.slots[slot as usize].take() else {
                    return Ok(());
                };
                self.free.push(slot);
                let r = self.guard.on_done(op.offset, op.buf.len(), r);
                self.ready.push_back(ReadDone {
                    id: op.id,
                    offset: op.offset,
                    buf: op.buf,
                    result: r,
                });
                Ok(())
            }
        }
    }
}

/// Index of the registered buffer holding all of `addr..addr+len` of `buf`'s region, if any.
fn fixed_index(regs: &[Reg], buf: &IoBuf, addr: usize, len: usize) -> Option<u16> {
    if regs.is_empty() {
        return None;
    }
    let region = Arc::as_ptr(buf.region()) as *const u8 as usize;
    let end = addr.checked_add(len)?;
    regs.iter()
        .position(|r| r.region == region && r.start <= addr && end <= r.end)
        .and_then(|i| u16::try_from(i).ok())
}

impl RangeReader for UringReader {
    fn submit(&mut self, req: ReadRequest) -> Result<()> {
        if req.buf.is_empty() {
            self.ready.push_back(ReadDone {
                id: req.id,
                offset: req.offset,
                buf: req.buf,
                result: Ok(0),
            });
            self.in_flight += 1;
            return Ok(());
        }
        if req.offset.checked_add(req.buf.len() as u64).is_none() {
            self.ready.push_back(ReadDone {
                id: req.id,
                offset: req.offset,
                buf: req.buf,
                result: Err(Error::new(
                    ErrorKind::RangeNotSatisfiable,
                    "read range overflows",
                )),
            });
            self.in_flight += 1;
            return Ok(());
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize] = Some(Op {
            id: req.id,
            offset: req.offset,
            buf: req.buf,
            done: 0,
            retries: 0,
            direct: false,
        });
        if let Err(e) = self.push(slot) {
            self.fail_unqueued(slot, e);
        }
        self.in_flight += 1;
        Ok(())
    }

    fn wait(&mut self) -> Result<ReadDone> {
        self.next_done(None)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                "io_uring reader returned no read without a time limit",
            )
        })
    }

    fn wait_timeout(&mut self, timeout: std::time::Duration) -> Result<Option<ReadDone>> {
        self.next_done(std::time::Instant::now().checked_add(timeout))
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn register_buffers(&mut self, bufs: &[&IoBuf]) -> Result<()> {
        if !self.regs.is_empty() || self.kernel > 0 {
            return Ok(()); // registered once, before the first read
        }
        // Distinct regions, in the order given (the staging ring comes first), within budget.
        let mut regions: Vec<Arc<dyn MemRegion>> = Vec::new();
        let mut total = 0usize;
        for b in bufs {
            let r = b.region();
            if r.is_empty() || regions.iter().any(|x| Arc::ptr_eq(x, r)) {
                continue;
            }
            if total + r.len() > REGISTER_BUDGET {
                continue;
            }
            total += r.len();
            regions.push(r.clone());
        }
        let mut regs = Vec::new();
        let mut iovecs = Vec::new();
        for r in &regions {
            let base = r.base() as usize;
            let mut off = 0usize;
            while off < r.len() {
                let n = (r.len() - off).min(MAX_REG_BUF);
                regs.push(Reg {
                    start: base + off,
                    end: base + off + n,
                    region: Arc::as_ptr(r) as *const u8 as usize,
                });
                iovecs.push(libc::iovec {
                    iov_base: (base + off) as *mut libc::c_void,
                    iov_len: n,
                });
                off += n;
            }
        }
        if iovecs.is_empty() || iovecs.len() > MAX_REG_COUNT {
            return Ok(());
        }
        // SAFETY: every iovec lies inside a live MemRegion (valid for reads and writes, never
        // moving). `self.regions` keeps a strong reference to each of them until the reader is
        // dropped, after every read the kernel held has completed (Drop waits, or leaks the
        // regions when it cannot). The ring's teardown is asynchronous, but the registration
        // pins its pages itself, so freeing a region after the ring is closed is sound.
        let res = unsafe { self.ring.submitter().register_buffers(&iovecs) };
        match res {
            Ok(()) => {
                self.regs = regs;
                self.regions = regions;
            }
            Err(e) => note_registration_failed(total, &e),
        }
        Ok(())
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        // Wait for every read the kernel still holds, so no buffer is freed under it.
        let mut busy = 0u32;
        while self.kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
                        && busy < DROP_BUSY_TRIES =>
                {
                    busy += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => {
                    // Cannot wait: leak the buffers and registered regions (the kernel may still
                    // write into them) rather than free memory the kernel owns.
                    for op in self.slots.drain(..).flatten() {
                        std::mem::forget(op.buf);
                    }
                    for r in self.regions.drain(..) {
                        std::mem::forget(r);
                    }
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.kernel = self.kernel.saturating_sub(n);
        }
    }
}
