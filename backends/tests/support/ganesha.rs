//! NFS-Ganesha (NFSv4 over TCP on 127.0.0.1, FSAL VFS) for the NFS backend's tests: a private
//! config in a temp dir, a free port, a bounded wait until it serves, killed by PID on drop.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Message when the server binary is missing: the test fails, it never passes silently.
pub const NOT_INSTALLED: &str =
    "nfs-ganesha not installed: run the README's test command (scripts/test.sh)";

/// A running ganesha.nfsd serving one temp directory as `/export`.
pub struct Ganesha {
    /// TCP port of the NFS service.
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    /// "NFS SERVER INITIALIZED" lines in the log from earlier starts (the log is appended to).
    inits: usize,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("ganesha.nfsd"))
        .find(|p| p.is_file())
}

impl Ganesha {
    /// Starts a server exporting a fresh temp dir read-write (`Access_Type = RW`).
    pub fn start() -> Ganesha {
        Self::start_with("RW")
    }

    /// Starts a server with the given `Access_Type` (`RW` or `RO`).
    pub fn start_with(access: &str) -> Ganesha {
        let bin = find_binary().unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        let mut last_log = String::new();
        for _ in 0..3 {
            match Self::try_start(&bin, access) {
                Ok(g) => return g,
                Err(log) => last_log = log,
            }
        }
        panic!(
            "ganesha.nfsd did not start (is the `nfs-ganesha-vfs` package installed?):\n{last_log}"
        );
    }

    fn try_start(bin: &Path, access: &str) -> Result<Ganesha, String> {
        let dir = tempfile::Builder::new()
            .prefix("ts-ganesha-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let export = dir.path().join("export");
        let recovery = dir.path().join("recovery");
        std::fs::create_dir(&export).map_err(|e| e.to_string())?;
        std::fs::create_dir(&recovery).map_err(|e| e.to_string())?;
        let port = free_port();
        // Attr_Expiration_Time = 0: GETATTR always sees the file as it is now, so a change made
        // underneath the server is visible to the client's version check at once.
        let conf = format!(
            "NFS_CORE_PARAM {{ Bind_addr = 127.0.0.1; NFS_Port = {port}; Protocols = 4; \
             Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }}\n\
             NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {rec}; }}\n\
             EXPORT {{ Export_Id = 1; Path = {exp}; Pseudo = /export; Access_Type = {access}; \
             Squash = No_Root_Squash; Protocols = 4; Attr_Expiration_Time = 0; \
             FSAL {{ Name = VFS; }} }}\n",
            rec = recovery.display(),
            exp = export.display(),
        );
        let conf_path = dir.path().join("ganesha.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let child = Self::spawn(bin, dir.path())?;
        let mut g = Ganesha {
            port,
            child,
            dir,
            inits: 0,
        };
        g.wait_serving()?;
        Ok(g)
    }

    /// Starts `ganesha.nfsd` with the config in `dir`, logging to `dir/ganesha.log`.
    fn spawn(bin: &Path, dir: &Path) -> Result<Child, String> {
        Command::new(bin)
            .arg("-F")
            .arg("-f")
            .arg(dir.join("ganesha.conf"))
            .arg("-L")
            .arg(dir.join("ganesha.log"))
            .arg("-p")
            .arg(dir.join("ganesha.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))
    }

    /// Waits (at most 30 s) until the server has initialised and accepts connections.
    fn wait_serving(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("ganesha.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("ganesha.nfsd exited ({status}); log:\n{log_text}"));
            }
            let inits = log_text.matches("NFS SERVER INITIALIZED").count();
            if inits > self.inits && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.inits = inits;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ganesha.nfsd not serving after 30 s; log:\n{log_text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exported directory on the local filesystem.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    /// Local path of exported file `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// `nfs://` URI of exported file `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nfs://127.0.0.1:{}/export/{name}", self.port)
    }

    /// Writes `data` to exported file `name` and returns its URI.
    pub fn put(&self, name: &str, data: &[u8]) -> String {
        std::fs::write(self.path(name), data).expect("write export file");
        self.uri(name)
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ganesha.log")).unwrap_or_default()
    }

    /// Starts the stopped server again: same port, config and export (what a server restart
    /// looks like to a client). Panics if it does not serve within 30 s.
    pub fn restart(&mut self) {
        let bin = find_binary().unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        self.stop();
        self.child = Self::spawn(&bin, self.dir.path()).unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = self.wait_serving() {
            panic!("ganesha.nfsd did not come back: {e}");
        }
    }

    /// Freezes the server (SIGSTOP by PID): its connections stay open and it answers nothing,
    /// as a hung server does. [`Ganesha::thaw`] lets it go on; [`Ganesha::stop`] also works
    /// on a frozen server.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} {} failed", self.child.id());
    }

    /// Stops the server now (kill by PID, then reap it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.stop();
    }
}
