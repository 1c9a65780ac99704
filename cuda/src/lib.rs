//! tensorstream-cuda: the only crate of tensorstream that calls CUDA.
//!
//! * [`CudaDevice`]: an opened device — primary context, ≥ 2 copy streams, a pinned staging
//!   region allocated once and lent to every load as engine [`IoBuf`](tensorstream_engine::IoBuf)
//!   slots (anonymous memory page-locked with `cuMemHostRegister`, flags 0: O_DIRECT and io_uring
//!   fixed buffers accept it, the CPU reads it at full speed).
//! * [`CudaSink`]: the engine [`Sink`](tensorstream_engine::Sink) for GPU loads — async
//!   host→device copies from the slots straight into one device arena, round-robin over the
//!   streams, an event per copy telling when the slot may be refilled.
//! * [`DeviceModel`]: per-tensor device pointers, readback, explicit release; [`load()`] and
//!   [`load_streaming`] (tensors yielded as soon as their bytes are on the device).
//! * [`HostUpload`]: fills the arena from host memory, for loads whose bytes need host work
//!   first (tensorizer verification and decryption).
//! * [`warm`]: the mapped page-cache path (off by default: slower than the staging ring where
//!   measured, on an H200 machine).
//!
//! The driver is loaded at run time: without `libcuda.so` every entry point returns an
//! [`ErrorKind::Device`](tensorstream_engine::ErrorKind::Device) error ("no CUDA driver found"),
//! never a panic. `unsafe` lives only in [`raw`].

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[forbid(unsafe_code)]
pub mod copy;
#[forbid(unsafe_code)]
pub mod device;
#[forbid(unsafe_code)]
pub mod load;
#[forbid(unsafe_code)]
pub mod model;
pub mod raw;
#[forbid(unsafe_code)]
pub mod sink;
#[forbid(unsafe_code)]
pub mod tracker;
#[forbid(unsafe_code)]
pub mod upload;
#[forbid(unsafe_code)]
pub mod warm;

pub use device::{
    device_count, driver_present, parse_device, Acting, Claim, CudaDevice, CudaOptions,
    Reservation, WarmCopy, WarmMode,
};
pub use load::{load, load_streaming, load_to, Keeper, StreamingLoad};
pub use model::{DeviceModel, DeviceTensor, LoadTimes, Target};
pub use raw::driver::DeviceArena;
pub use sink::CudaSink;
pub use tracker::ReadyTensor;
pub use upload::HostUpload;
pub use warm::{load_mapped, residency, use_mapped, SameFile, WarmStats, WarmStrategy};

/// Alignment of every tensor in the device arena (use `Layout::Packed { align: TENSOR_ALIGN }`).
pub const TENSOR_ALIGN: u64 = 256;
