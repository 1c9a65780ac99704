//! Command-line interface: argument parsing, subcommands, output.

mod demo;
mod interrupt;
mod output;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tensorstream::{Device, Error, IoMode, Loader, OpenOptions};

#[derive(Parser, Debug)]
#[command(
    name = "tensorstream",
    version,
    about = "Stream model weights from storage into host or GPU memory, fast",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List a file's tensors (reads only the metadata; with --verify, also reads every tensor and
    /// checks its CRC32 / SHA-256, keeping none in memory; with a key or password, decrypts the
    /// smallest tensor to check the key). For a sharded checkpoint, every shard's table is
    /// printed.
    Inspect {
        /// Path or URI of a safetensors / tensorizer file, or of a sharded checkpoint (its
        /// *.safetensors.index.json, or a local directory).
        uri: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Load tensors into memory and report throughput.
    Load {
        /// Path or URI of a safetensors / tensorizer file, or of a sharded checkpoint (its
        /// *.safetensors.index.json, or a local directory).
        uri: String,
        /// Target device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", value_parser = check_device)]
        device: String,
        /// Load only tensors whose name matches this glob (repeatable; any may match).
        #[arg(long = "filter", value_name = "GLOB")]
        filters: Vec<String>,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
        /// Compute the SHA-256 of every loaded tensor's bytes.
        #[arg(long)]
        digests: bool,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Write a model-shaped safetensors file, load it, verify it, and compare with std::fs::read.
    Demo {
        /// Size of the generated model (e.g. 1GiB, 512MiB, 2G).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Directory for the temporary file (default: $TMPDIR or /tmp). Removed afterwards,
        /// unless --keep.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Keep the generated file (once it is completely written, even if the run stops later)
        /// and print its path.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Convert between safetensors and tensorizer (output format by extension: .tensors or
    /// .safetensors), tensor by tensor.
    Convert {
        /// Input: path or URI of a safetensors / tensorizer file, or of a sharded checkpoint
        /// (its *.safetensors.index.json, or a local directory): its shards are joined.
        input: String,
        /// Output file (.tensors or .safetensors): a local path (or a file:// URI).
        output: String,
        /// Encrypt the .tensors output with this key file (32 raw bytes or 64 hex characters).
        #[arg(long, value_name = "FILE")]
        encrypt_key_file: Option<std::path::PathBuf>,
        /// Encrypt the .tensors output with the password in this file (Argon2id).
        #[arg(long, value_name = "FILE", conflicts_with = "encrypt_key_file")]
        encrypt_password_file: Option<std::path::PathBuf>,
        /// Write tensors whose input records no tensorizer type (safetensors) as module
        /// parameters, so that tensorizer's load_into_module (vLLM's loader) accepts the
        /// .tensors output [default: state-dict entries, as write_state_dict writes them].
        #[arg(long)]
        as_parameters: bool,
        /// Replace the output if it exists (only once the conversion is complete) [default: an
        /// existing output is an error, and so is one that appears while converting].
        #[arg(long, short = 'f')]
        force: bool,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Time loads of one file (or checkpoint): tensorstream vs std::fs::read (and, cold, an
    /// O_DIRECT read), one JSON line per run: {name, bytes, secs, gbps, cold}.
    Bench {
        /// Path or URI of a safetensors / tensorizer file or sharded checkpoint (baselines, over
        /// every shard, only for local files).
        uri: String,
        /// Where the loads go: cpu, cuda or cuda:N (a GPU bench times each load from after the
        /// device is open, which happens once, to the last tensor on it, and frees it after).
        #[arg(long, default_value = "cpu", value_parser = check_device)]
        device: String,
        /// Run cold loads: drop the page cache before each (local files; needs root).
        #[arg(long)]
        cold: bool,
        /// Run warm loads (page cache populated). The default when neither --cold nor --warm is
        /// given; give both for both.
        #[arg(long)]
        warm: bool,
        /// Runs of each kind (at least 1).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        #[command(flatten)]
        io: IoArgs,
    },
}

/// I/O knobs shared by every command.
#[derive(Args, Debug, Clone)]
struct IoArgs {
    /// Reads in flight (local queue depth / remote concurrent requests; at most 1024) [default:
    /// the backend's: local 16 (64 on a kernel NFS mount), NFS 32, HTTP 32, S3 16; GPU loads of
    /// local files: one per pinned slot (--slots), up to 32]. Alias: --queue-depth.
    #[arg(long, alias = "queue-depth", value_name = "N")]
    concurrency: Option<usize>,
    /// Size of one read, e.g. 8MiB (K/M/G = KiB/MiB/GiB; at least 4 KiB) [default: the
    /// backend's: local 8MiB, S3 16MiB …].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    chunk_size: Option<u64>,
    /// Staging memory budget for reads that cannot land in place (at least 1MiB) [default:
    /// 256MiB].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    ring_budget: Option<u64>,
    /// Local I/O engine: io_uring, pread or auto (pread threads for a file already in the page
    /// cache, else io_uring, falling back to pread) [default: $TENSORSTREAM_IO, else auto; the
    /// option overrides the variable].
    #[arg(long, value_name = "ENGINE", value_parser = one_of(&["io_uring", "uring", "io-uring", "pread", "auto"]), ignore_case = true)]
    io: Option<String>,
    /// Extra HTTP header "Name: value" (repeatable).
    #[arg(long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 region (default: $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// S3: send requests unsigned, for public buckets (no credentials are looked up or sent)
    /// [default: $AWS_NO_SIGN_REQUEST, else signed].
    #[arg(long)]
    s3_no_sign_request: bool,
    /// Per-request timeout for remote backends, in seconds [default: 30; S3: 30 for HEAD, 10
    /// for each step of a GET body; this option sets both].
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Never show progress bars.
    #[arg(long)]
    quiet: bool,
    /// GPU loads: CUDA streams the copies are spread over.
    #[arg(long, value_name = "N", default_value_t = 2)]
    streams: usize,
    /// GPU loads: pinned staging slots (allocated once, reused).
    #[arg(long, value_name = "N", default_value_t = 40)]
    slots: usize,
    /// GPU loads: size of one pinned staging slot (reads are at most this long).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "4MiB")]
    slot_size: u64,
    /// GPU loads of local files already in the page cache: `auto` maps the file and lets the
    /// copy engine read the cached pages (host-registered read-only) when ≥ 90 % of it is
    /// resident, `force` always does, `off` always reads through the staging ring (the default:
    /// it measured faster, 38-40 GB/s against 14-23 on an H200 machine).
    #[arg(
        long = "gpu-warm",
        id = "gpu_warm",
        value_name = "MODE",
        default_value = "off",
        value_parser = one_of(&["off", "auto", "force"]), ignore_case = true
    )]
    gpu_warm: String,
    /// GPU loads: put the pinned staging ring on transparent huge pages where the kernel gives
    /// them (`on`) or on small pages (`off`, the default until measured on a GPU).
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = one_of(&["on", "off"]), ignore_case = true)]
    gpu_huge_pages: String,
    /// GPU loads through the mapped page-cache path (`--gpu-warm`): threads registering pieces
    /// (0: none, the copying threads of --gpu-warm-pread-threads take every piece).
    #[arg(long, value_name = "N", default_value_t = 4)]
    gpu_warm_threads: usize,
    /// GPU loads through the mapped page-cache path: threads that copy pieces through the
    /// pinned slots beside the registering ones (two slots each), with `pread` or as
    /// --gpu-warm-copy says.
    #[arg(long, value_name = "N", default_value_t = 0)]
    gpu_warm_pread_threads: usize,
    /// GPU loads through the mapped page-cache path: how the copying threads fill their slots:
    /// `pread`, or `map` (copies out of the file mapping with non-temporal stores; a file that
    /// shrinks meanwhile fails the load cleanly).
    #[arg(long, value_name = "pread|map", default_value = "pread", value_parser = one_of(&["pread", "map"]), ignore_case = true)]
    gpu_warm_copy: String,
    /// GPU loads through the mapped page-cache path: size of one registered piece (each thread
    /// holds at most two registered, and their pages count in the resident memory).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "16MiB")]
    gpu_warm_piece: u64,
    /// Verify every tensor's CRC32 / SHA-256 (tensorizer files) while loading.
    #[arg(long)]
    verify: bool,
    /// Key of an encrypted tensorizer file: 32 raw bytes or 64 hex characters.
    #[arg(long, value_name = "FILE")]
    key_file: Option<std::path::PathBuf>,
    /// Password of an encrypted tensorizer file (default: $TENSORSTREAM_PASSWORD when the file
    /// is encrypted).
    #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
    password_file: Option<std::path::PathBuf>,
    /// Set by `run`: name the flags this command ignores (for a load to a GPU, or not) once its
    /// options have been checked (a bad value is an error, and then no warning is worth adding).
    #[arg(skip)]
    warn_unused_for: std::cell::Cell<Option<bool>>,
}

impl IoArgs {
    fn loader(&self, uri: &str) -> Result<Loader, Error> {
        let mut open = OpenOptions::default();
        for h in &self.headers {
            let (k, v) = h.split_once(':').ok_or_else(|| {
                // Only the first word: the rest is likely a credential ("Authorization Bearer …").
                let name = h.split_whitespace().next().unwrap_or("");
                Error::invalid(format!(
                    "bad --header starting {name:?}: no ':' (expected \"Name: value\"; the \
                     value is not shown)"
                ))
            })?;
            open.headers
                .push((k.trim().to_string(), v.trim().to_string()));
        }
        open.s3_endpoint = self.s3_endpoint.clone();
        open.s3_region = self.s3_region.clone();
        if self.s3_no_sign_request {
            open.s3_no_sign_request = Some(true);
        }
        if let Some(t) = self.timeout {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Error::invalid(format!(
                    "bad --timeout {t}: must be a positive, finite number of seconds"
                )));
            }
            open.timeout =
                Some(Duration::try_from_secs_f64(t).map_err(|_| {
                    Error::invalid(format!("bad --timeout {t}: too large (seconds)"))
                })?);
        }
        open.io_mode = match self.io.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("auto") => Some(IoMode::Auto),
            Some("io_uring") | Some("uring") | Some("io-uring") => Some(IoMode::Uring),
            Some("pread") => Some(IoMode::Pread),
            Some(o) => {
                return Err(Error::invalid(format!(
                    "bad --io {o:?}: expected io_uring, pread or auto"
                )))
            }
        };
        let cuda = tensorstream_cuda::CudaOptions {
            streams: self.streams,
            slots: self.slots,
            slot_size: usize::try_from(self.slot_size)
                .map_err(|_| Error::invalid("--slot-size too large"))?,
            warm: match self.gpu_warm.to_ascii_lowercase().as_str() {
                "off" => tensorstream_cuda::WarmMode::Off,
                "auto" => tensorstream_cuda::WarmMode::Auto(0.9),
                "force" => tensorstream_cuda::WarmMode::Force,
                o => {
                    return Err(Error::invalid(format!(
                        "bad --gpu-warm {o:?}: expected off, auto or force"
                    )))
                }
            },
            warm_threads: match (self.gpu_warm_threads, self.gpu_warm_pread_threads) {
                (n @ 1..=64, _) => n,
                (0, 1..) => 0,
                (n, _) => {
                    return Err(Error::invalid(format!(
                        "bad --gpu-warm-threads {n}: expected 1..=64 (0 only with \
                         --gpu-warm-pread-threads)"
                    )))
                }
            },
            warm_pread_threads: match self.gpu_warm_pread_threads {
                n @ 0..=64 => n,
                n => {
                    return Err(Error::invalid(format!(
                        "bad --gpu-warm-pread-threads {n}: expected 0..=64"
                    )))
                }
            },
            warm_copy: match self.gpu_warm_copy.to_ascii_lowercase().as_str() {
                "pread" => tensorstream_cuda::WarmCopy::Pread,
                "map" => tensorstream_cuda::WarmCopy::Map,
                o => {
                    return Err(Error::invalid(format!(
                        "bad --gpu-warm-copy {o:?}: expected pread or map"
                    )))
                }
            },
            warm_piece: usize::try_from(self.gpu_warm_piece)
                .ok()
                .filter(|&p| p >= 1 << 20)
                .ok_or_else(|| Error::invalid("--gpu-warm-piece must be at least 1MiB"))?,
            huge_pages: match self.gpu_huge_pages.to_ascii_lowercase().as_str() {
                "on" => true,
                "off" => false,
                o => {
                    return Err(Error::invalid(format!(
                        "bad --gpu-huge-pages {o:?}: expected on or off"
                    )))
                }
            },
        };
        // Checked whatever the device: a bad value is a mistake even when this load would not
        // use it (the same command with --device cuda would fail later, after the reads).
        cuda.validated().map_err(|e| e.context("GPU options"))?;
        let mut l = Loader::new(uri)
            .open_options(open)
            .cuda_options(cuda)
            .verify_hashes(self.verify)
            .cancel_flag(interrupt::flag());
        if let Some(k) = &self.key_file {
            l = l.key_file(k)?;
        }
        if let Some(p) = &self.password_file {
            l = l.password_file(p)?;
        }
        if let Some(pw) = std::env::var_os("TENSORSTREAM_PASSWORD") {
            use std::os::unix::ffi::OsStrExt;
            if !pw.is_empty() {
                l = l.password_if_encrypted(pw.as_bytes())?;
            }
        }
        if let Some(n) = self.concurrency {
            if n == 0 {
                return Err(Error::invalid("--concurrency must be at least 1"));
            }
            l = l.queue_depth(n);
        }
        if let Some(c) = self.chunk_size {
            l = l.chunk_size(
                usize::try_from(c).map_err(|_| Error::invalid("--chunk-size too large"))?,
            );
        }
        if let Some(r) = self.ring_budget {
            l = l.ring_budget(
                usize::try_from(r).map_err(|_| Error::invalid("--ring-budget too large"))?,
            );
        }
        if let Some(gpu) = self.warn_unused_for.take() {
            self.warn_unused(uri, gpu);
        }
        Ok(l)
    }
}

/// Parses sizes like `4096`, `8MiB`, `1.5GiB`, `2G`, `512k` (K/M/G/T = powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 4096, 8MiB, 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("bad size {s:?}: unknown unit {u:?}")),
    };
    let v = n * mult as f64;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) {
        return Err(format!("bad size {s:?}: out of range"));
    }
    Ok(v as u64)
}

/// A progress bar on stderr while `counter` grows towards `total`, when stderr is a terminal.
pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// A bar over `total` bytes (known up front).
    pub fn start(label: &str, total: u64, counter: Arc<AtomicU64>, quiet: bool) -> Progress {
        Self::start_dynamic(label, Arc::new(AtomicU64::new(total)), counter, quiet)
    }

    /// A bar whose total appears once the load is planned (`Loader::progress_total`); nothing is
    /// drawn before.
    pub fn start_dynamic(
        label: &str,
        total: Arc<AtomicU64>,
        counter: Arc<AtomicU64>,
        quiet: bool,
    ) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { stop, handle: None };
        }
        let label = label.to_string();
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut bar: Option<indicatif::ProgressBar> = None;
            while !s2.load(Ordering::Relaxed) {
                let t = total.load(Ordering::Relaxed);
                if bar.is_none() && t > 0 {
                    let b = indicatif::ProgressBar::new(t);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_message(label.clone());
                    bar = Some(b);
                }
                if let Some(b) = &bar {
                    b.set_position(counter.load(Ordering::Relaxed).min(t));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        });
        Progress {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `println!` that returns the write error instead of panicking (a closed pipe: `| head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| tensorstream_engine::Error::from_io(e, "writing to standard output"))
    }};
}
pub(crate) use out;

/// `eprintln!` that ignores a failed write instead of panicking (standard error closed, or a
/// pipe whose reader went away: `2>&1 | head`). The exit status still tells what happened.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use errln;

/// True when `e` is a write to a closed pipe (the reader, e.g. `head`, has had enough).
fn is_broken_pipe(e: &Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

impl IoArgs {
    /// The GPU flags given a value other than their default.
    fn gpu_flags_set(&self) -> Vec<&'static str> {
        let d = (2usize, 40usize, 4u64 << 20, 4usize, 0usize, 16u64 << 20);
        [
            ("--streams", self.streams != d.0),
            ("--slots", self.slots != d.1),
            ("--slot-size", self.slot_size != d.2),
            ("--gpu-warm", !self.gpu_warm.eq_ignore_ascii_case("off")),
            (
                "--gpu-huge-pages",
                !self.gpu_huge_pages.eq_ignore_ascii_case("off"),
            ),
            ("--gpu-warm-threads", self.gpu_warm_threads != d.3),
            (
                "--gpu-warm-pread-threads",
                self.gpu_warm_pread_threads != d.4,
            ),
            (
                "--gpu-warm-copy",
                !self.gpu_warm_copy.eq_ignore_ascii_case("pread"),
            ),
            ("--gpu-warm-piece", self.gpu_warm_piece != d.5),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// Says on stderr which of the given flags this command ignores: GPU flags when it loads
    /// nothing to a GPU (`gpu` false), and backend flags that do not concern `uri`'s backend.
    /// A flag given its default value is not noticed.
    fn warn_unused(&self, uri: &str, gpu: bool) {
        let say = |flags: &[&str], why: &str| {
            if !flags.is_empty() {
                let it = if flags.len() == 1 {
                    "it applies"
                } else {
                    "they apply"
                };
                errln!(
                    "tensorstream: warning: {} ignored: {it} {why}",
                    flags.join(", ")
                );
            }
        };
        if !gpu {
            say(
                &self.gpu_flags_set(),
                "to loads to a GPU (load or bench --device cuda:N)",
            );
        }
        let scheme = tensorstream::backends::scheme_of(uri);
        let scheme = scheme.as_deref().unwrap_or("file");
        let backend_flags = [
            (
                "--header",
                !self.headers.is_empty(),
                matches!(scheme, "http" | "https"),
            ),
            ("--s3-endpoint", self.s3_endpoint.is_some(), scheme == "s3"),
            ("--s3-region", self.s3_region.is_some(), scheme == "s3"),
            (
                "--s3-no-sign-request",
                self.s3_no_sign_request,
                scheme == "s3",
            ),
            ("--timeout", self.timeout.is_some(), scheme != "file"),
            ("--io", self.io.is_some(), scheme == "file"),
        ];
        let unused: Vec<&str> = backend_flags
            .into_iter()
            .filter(|&(_, set, applies)| set && !applies)
            .map(|(name, _, _)| name)
            .collect();
        let here = if scheme == "file" {
            "local files".to_string()
        } else {
            format!("{scheme}:// URIs")
        };
        say(&unused, &format!("to other backends than {here}"));
    }
}

/// Runs the CLI; returns the process exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    tensorstream::engine::log_warnings_to_stderr();
    interrupt::install();
    // Flags a command accepts but will not use are named, not silently dropped (once its
    // options are checked: see `IoArgs::loader`).
    match &cli.cmd {
        Cmd::Inspect { io, .. } | Cmd::Convert { io, .. } => io.warn_unused_for.set(Some(false)),
        Cmd::Load { device, io, .. } | Cmd::Bench { device, io, .. } => io.warn_unused_for.set(
            Some(parse_device(device).map_or(true, |d| d != Device::Cpu)),
        ),
        // (The demo uses the GPU when there is one: only backend flags can be unused.)
        Cmd::Demo { io, .. } => io.warn_unused_for.set(Some(true)),
    }
    let res = match cli.cmd {
        Cmd::Inspect { uri, json, io } => output::inspect(&uri, json, &io),
        Cmd::Load {
            uri,
            device,
            filters,
            json,
            digests,
            io,
        } => output::load(&uri, &device, &filters, json, digests, &io),
        Cmd::Demo {
            size,
            dir,
            keep,
            io,
        } => demo::run(size, dir, keep, &io),
        Cmd::Convert {
            input,
            output,
            encrypt_key_file,
            encrypt_password_file,
            as_parameters,
            force,
            io,
        } => output::output_path(&output).and_then(|output| {
            output::convert(
                &input,
                &output,
                encrypt_key_file.as_deref(),
                encrypt_password_file.as_deref(),
                as_parameters,
                force,
                &io,
            )
        }),
        Cmd::Bench {
            uri,
            device,
            cold,
            warm,
            repeat,
            io,
        } => output::bench(&uri, &device, cold, warm, repeat as usize, &io),
    };
    if let Some(sig) = interrupt::signal() {
        match &res {
            // The command finished (its output is complete) before the signal stopped anything.
            Ok(()) => {
                errln!("tensorstream: the command finished despite the signal");
                return 0;
            }
            // Stopped by the signal: exit as the signal asked (128 + its number).
            Err(e) => {
                if e.kind() != tensorstream::ErrorKind::Cancelled {
                    errln!("tensorstream: error: {}", error_line(e));
                }
                errln!("tensorstream: interrupted");
                return 128 + sig;
            }
        }
    }
    match res {
        Ok(()) => 0,
        // Quietly, with the status a SIGPIPE death would give (128 + 13), like other tools.
        Err(e) if is_broken_pipe(&e) => 141,
        Err(e) => {
            errln!("tensorstream: error: {}", error_line(&e));
            1
        }
    }
}

/// An error as the one line the CLI prints: error texts may carry a server's words or a file
/// name, so no raw control characters go to the terminal, and no newline either (a name holding
/// one would split the error, and could print a line of its own that looks like the tool's).
fn error_line(e: &tensorstream::Error) -> String {
    tensorstream::engine::terminal_safe(&e.to_string()).replace('\n', "\\n")
}

/// A value parser accepting only `values` (in any case), so that a mistyped choice is a usage
/// error (status 2, with the accepted values) like any other bad argument.
fn one_of(values: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(values.iter().copied()).map(|v| v.to_ascii_lowercase())
}

/// Checks a device name while the arguments are parsed (a bad one is a usage error).
fn check_device(s: &str) -> Result<String, String> {
    parse_device(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Parses a device name.
fn parse_device(s: &str) -> Result<Device, Error> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments are consistent (unique ids, valid defaults); clap checks this
    /// only lazily, when that subcommand is parsed.
    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
