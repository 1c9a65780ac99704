//! Local files (minimal buffered version; io_uring arrives next).

use std::fs::File;
use std::os::unix::fs::FileExt;

use tensorstream_engine::{Backend, Capabilities, Error, ErrorKind, ObjectMeta, Result};

use crate::OpenOptions;

/// A local file.
#[derive(Debug)]
pub struct LocalBackend {
    path: String,
    file: File,
}

impl LocalBackend {
    /// Opens `path` for reading.
    pub fn open(path: &str, _opts: &OpenOptions) -> Result<Self> {
        let md = std::fs::metadata(path)
            .map_err(|e| Error::from_io(e, "cannot open").with_location(path))?;
        if md.is_dir() {
            return Err(
                Error::new(ErrorKind::InvalidInput, "is a directory, not a file")
                    .with_location(path),
            );
        }
        let file =
            File::open(path).map_err(|e| Error::from_io(e, "cannot open").with_location(path))?;
        Ok(LocalBackend {
            path: path.to_string(),
            file,
        })
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> &str {
        &self.path
    }
    fn stat(&self) -> Result<ObjectMeta> {
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::from_io(e, "stat").with_location(&self.path))?;
        Ok(ObjectMeta {
            size: md.len(),
            version: None,
        })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kind: "local",
            max_concurrency: 16,
            ..Capabilities::default()
        }
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from_io(e, "read").with_location(&self.path)),
            }
        }
        Ok(done)
    }
}
