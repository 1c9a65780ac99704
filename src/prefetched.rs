//! A small shard of a sharded checkpoint served from the bytes its check read (see
//! `SMALL_OBJECTS_KEPT` in `lib.rs`).
//!
//! The check read the shard whole with its header: one answer of the store, of the version its
//! `stat` saw (reads are pinned to it). The shard's load opens the object again and compares its
//! size and version with the check's (`Loader::read_index`); only when they match does it read
//! through this backend, which serves those bytes: the load then holds exactly the version the
//! store still has at its opening, and makes no further request.

use std::sync::Arc;

use tensorstream_engine::{Backend, Capabilities, Error, ErrorKind, ObjectMeta, Result};

/// The kept bytes of one object, described as the backend they came from describes it.
#[derive(Debug)]
pub(crate) struct Prefetched {
    location: String,
    caps: Capabilities,
    meta: ObjectMeta,
    bytes: Arc<Vec<u8>>,
}

impl Prefetched {
    /// `bytes`: the whole object behind `origin`, of the size and version `meta` gives.
    pub(crate) fn new(origin: &dyn Backend, meta: ObjectMeta, bytes: Arc<Vec<u8>>) -> Self {
        let mut caps = origin.capabilities();
        // Memory: no kernel reads, no alignment to keep; the rest (kind, chunk, depth) as the
        // origin's, so that the load reports the backend it came from.
        caps.kernel_reads = false;
        caps.direct_io = false;
        caps.alignment = 1;
        Prefetched {
            location: origin.location().to_string(),
            caps,
            meta,
            bytes,
        }
    }
}

impl Backend for Prefetched {
    fn location(&self) -> &str {
        &self.location
    }

    /// The size and version the opening found (and the kept bytes are of).
    fn stat(&self) -> Result<ObjectMeta> {
        Ok(self.meta.clone())
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.bytes.len();
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s <= size)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::RangeNotSatisfiable,
                    format!("offset {offset} is past the end of the object ({size} bytes)"),
                )
                .with_location(&self.location)
            })?;
        let n = buf.len().min(size - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorstream_engine::{BackendExt, MemoryBackend};

    /// Serves the kept bytes (short at the end, an error past it), reports the origin's
    /// location, kind and version, and never reads the origin.
    #[test]
    fn serves_the_kept_bytes_as_the_origin() {
        let data: Vec<u8> = (0..100u8).collect();
        let origin = MemoryBackend::new("s3://b/model-00001-of-00002.safetensors", vec![7; 100]);
        let meta = ObjectMeta {
            size: 100,
            version: Some("\"etag\"".into()),
        };
        let p = Prefetched::new(&origin, meta.clone(), Arc::new(data.clone()));
        assert_eq!(p.location(), origin.location());
        assert_eq!(p.stat().unwrap(), meta);
        assert_eq!(p.capabilities().kind, origin.capabilities().kind);
        assert!(!p.capabilities().kernel_reads && !p.capabilities().direct_io);
        assert_eq!(p.read_exact_at(10, 20).unwrap(), data[10..30]);
        let mut buf = [0u8; 16];
        assert_eq!(p.read_at(90, &mut buf).unwrap(), 10);
        assert_eq!(buf[..10], data[90..]);
        assert_eq!(p.read_at(100, &mut buf).unwrap(), 0);
        let e = p.read_at(101, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RangeNotSatisfiable, "{e}");
        let e = p.read_at(u64::MAX, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RangeNotSatisfiable, "{e}");
    }
}
