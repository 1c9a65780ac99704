//! Ctrl-C, SIGTERM and SIGHUP: stop cleanly and leave no temporary files behind.
//!
//! The first signal sets the cancel flag that every load and conversion of this process checks
//! between reads ([`tensorstream::Loader::cancel_flag`]): the command stops, releases what it
//! holds, removes its temporary files (a conversion's partial output, the demo's model) and
//! the process exits with 128 + the signal number. If it has not stopped 10 s later, or a
//! second signal comes, the registered temporary paths (and a conversion's partial output, found
//! among the files this process holds open) are removed here and the process exits at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::errln;
use signal_hook::iterator::Signals;

/// How long the command gets to stop on its own after the first signal.
const GRACE: Duration = Duration::from_secs(10);

static SIGNAL: AtomicI32 = AtomicI32::new(0);

fn paths() -> &'static Mutex<Vec<PathBuf>> {
    static P: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Vec::new()))
}

/// Temporary files that the library creates under names this module cannot know in advance
/// (a conversion's `.NAME.partial-XXXX`): (canonical directory, file-name prefix). On a forced
/// exit, the files this process holds open (`/proc/self/fd`) that match are removed.
fn partials() -> &'static Mutex<Vec<(PathBuf, String)>> {
    static P: OnceLock<Mutex<Vec<(PathBuf, String)>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Vec::new()))
}

/// Registers the temporary files `convert` writes next to `output` (`.NAME.partial-…`) for
/// removal on a forced exit; unregistered when the guard drops.
pub struct PartialOutput(Option<(PathBuf, String)>);

impl PartialOutput {
    pub fn new(output: &Path) -> PartialOutput {
        let dir = tensorstream::engine::format::convert::output_dir(output);
        let (Ok(dir), Some(name)) = (std::fs::canonicalize(dir), output.file_name()) else {
            // No such directory: the conversion fails before it creates anything.
            return PartialOutput(None);
        };
        let prefix = tensorstream::engine::format::convert::partial_prefix(&name.to_string_lossy());
        let entry = (dir, prefix);
        partials()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry.clone());
        PartialOutput(Some(entry))
    }
}

impl Drop for PartialOutput {
    fn drop(&mut self) {
        if let Some(entry) = self.0.take() {
            let mut list = partials().lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = list.iter().position(|p| *p == entry) {
                list.swap_remove(i);
            }
        }
    }
}

/// The registered partial outputs this process has open.
fn open_partials() -> Vec<PathBuf> {
    let list = partials().lock().unwrap_or_else(|e| e.into_inner()).clone();
    if list.is_empty() {
        return Vec::new();
    }
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| {
            list.iter().any(|(dir, prefix)| {
                target.parent() == Some(dir.as_path())
                    && target
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix.as_str()))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The process-wide cancel flag, set by the first signal.
pub fn flag() -> Arc<AtomicBool> {
    static F: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    F.get_or_init(|| Arc::new(AtomicBool::new(false))).clone()
}

/// The signal that cancelled the command, if one did.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Starts the signal thread. Failing to install it is not fatal: the default action (exit at
/// once) stays, as before.
pub fn install() {
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            errln!("tensorstream: cannot handle signals ({e}); Ctrl-C may leave temporary files");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if SIGNAL
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    // A second signal: quit now.
                    remove_registered();
                    std::process::exit(128 + sig);
                }
                flag().store(true, Ordering::SeqCst);
                errln!(
                    "\ntensorstream: {} received: stopping and cleaning up (again to quit at once)",
                    name(sig)
                );
                // The command normally stops within the grace period and the process exits
                // from `main`; if it does not, quit from here.
                let _ = std::thread::Builder::new()
                    .name("signal-grace".into())
                    .spawn(move || {
                        std::thread::sleep(GRACE);
                        errln!(
                            "tensorstream: did not stop within {} s; quitting",
                            GRACE.as_secs()
                        );
                        remove_registered();
                        std::process::exit(128 + sig);
                    });
            }
        });
    if let Err(e) = spawned {
        errln!(
            "tensorstream: cannot start the signal thread ({e}); Ctrl-C may leave temporary files"
        );
    }
}

/// Removes every registered path (files and directories), reporting what it could not remove.
fn remove_registered() {
    let mut list = std::mem::take(&mut *paths().lock().unwrap_or_else(|p| p.into_inner()));
    list.extend(open_partials());
    for p in list {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => errln!("tensorstream: removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errln!("tensorstream: could not remove {}: {e}", p.display()),
        }
    }
}

/// A temporary file or directory (e.g. a [`tempfile::TempDir`]) that the signal thread removes
/// if the process is interrupted and does not stop in time. Dropping it drops (removes) the
/// temporary first and only then unregisters it, so there is no moment where an interrupt
/// would leave it behind.
pub struct Guarded<T: AsRef<Path>> {
    inner: Option<T>,
    path: PathBuf,
}

impl<T: AsRef<Path>> Guarded<T> {
    /// Registers `inner`'s path.
    pub fn new(inner: T) -> Self {
        let path = inner.as_ref().to_path_buf();
        paths()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Guarded {
            inner: Some(inner),
            path,
        }
    }

    /// The temporary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unregisters and hands the temporary back (e.g. to keep it).
    pub fn into_inner(mut self) -> T {
        let inner = self.inner.take();
        unregister(&self.path);
        match inner {
            Some(t) => t,
            // `inner` is `Some` until this method or `drop` takes it, and both consume `self`.
            None => unreachable!("Guarded emptied twice"),
        }
    }
}

fn unregister(path: &Path) {
    let mut list = paths().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = list.iter().position(|p| p == path) {
        list.swap_remove(i);
    }
}

impl<T: AsRef<Path>> Drop for Guarded<T> {
    fn drop(&mut self) {
        if let Some(t) = self.inner.take() {
            drop(t);
            unregister(&self.path);
        }
    }
}
