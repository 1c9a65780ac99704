//! A TCP relay in front of the real NFS-Ganesha that passes every byte through unchanged and
//! notes the NFSv4 calls it carries, by the file they name: a COMPOUND that walks a path
//! (PUTROOTFH, LOOKUP…: an opening, or the client's `stat`) by its last component, and one
//! that starts with PUTFH (a READ, or a GETATTR by handle) by the name whose LOOKUP's GETFH
//! answered with that handle. A hook sees each READ before it is passed on (to change the file
//! on the server at that moment).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One call, by the file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `[PUTROOTFH, LOOKUP…, GETFH, GETATTR]`: the path walked, to its last component.
    Lookup(String),
    /// `[PUTFH, GETATTR]`: the attributes of the file asked for by its handle.
    Getattr(String),
    /// `[PUTFH, READ, GETATTR]`: a READ of the file at this offset.
    Read(String, u64),
}

/// Called with the file's name and the offset of each READ, before the READ is passed on.
pub type OnRead = Arc<dyn Fn(&str, u64) + Send + Sync>;

#[derive(Default)]
struct Shared {
    calls: Mutex<Vec<Call>>,
    /// File handle → the last component of the path that gave it.
    names: Mutex<HashMap<Vec<u8>, String>>,
    on_read: Mutex<Option<OnRead>>,
}

pub struct Relay {
    port: u16,
    shared: Arc<Shared>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                // Calls of this connection walking a path, by xid: their replies give handles.
                let walks: Arc<Mutex<HashMap<u32, String>>> = Arc::default();
                let (c2, s2, sh, w) = (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    s.clone(),
                    walks.clone(),
                );
                std::thread::spawn(move || {
                    pump(c2, s2, |rec| note_call(&sh, &w, rec));
                });
                let sh = s.clone();
                std::thread::spawn(move || {
                    pump(server, client, |rec| note_reply(&sh, &walks, rec));
                });
            }
        });
        Relay { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_on_read(&self, f: OnRead) {
        *self.shared.on_read.lock().unwrap() = Some(f);
    }

    /// The calls so far, in the order they were passed on.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }
}

/// Passes RPC records (record marking: a 4-byte header per fragment) from `from` to `to`,
/// showing each whole record to `see` before its last fragment is passed on.
fn pump(mut from: TcpStream, mut to: TcpStream, mut see: impl FnMut(&[u8])) {
    let mut record = Vec::new();
    loop {
        let mut head = [0u8; 4];
        if from.read_exact(&mut head).is_err() {
            break;
        }
        let h = u32::from_be_bytes(head);
        let mut frag = vec![0u8; (h & 0x7fff_ffff) as usize];
        if from.read_exact(&mut frag).is_err() {
            break;
        }
        record.extend_from_slice(&frag);
        if h & 0x8000_0000 != 0 {
            see(&record);
            record.clear();
        }
        if to
            .write_all(&head)
            .and_then(|_| to.write_all(&frag))
            .is_err()
        {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (v, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*v))
    }
    fn u64(&mut self) -> Option<u64> {
        Some((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.0 = self.0.get(n..)?;
        Some(())
    }
    fn opaque(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let v = self.0.get(..n)?;
        self.skip(n.next_multiple_of(4))?;
        Some(v)
    }
}

const GETATTR: u32 = 9;
const GETFH: u32 = 10;
const LOOKUP: u32 = 15;
const PUTFH: u32 = 22;
const PUTROOTFH: u32 = 24;
const READ: u32 = 25;

fn note_call(sh: &Shared, walks: &Mutex<HashMap<u32, String>>, rec: &[u8]) {
    let Some((xid, call)) = parse_call(sh, rec) else {
        return;
    };
    if let Call::Lookup(name) = &call {
        walks.lock().unwrap().insert(xid, name.clone());
    }
    if let Call::Read(name, offset) = &call {
        let hook = sh.on_read.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(name, *offset);
        }
    }
    sh.calls.lock().unwrap().push(call);
}

fn parse_call(sh: &Shared, rec: &[u8]) -> Option<(u32, Call)> {
    let mut c = Cursor(rec);
    let xid = c.u32()?;
    let (_mtype, _rpcvers, _prog, _vers, proc) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?, c.u32()?);
    if proc != 1 {
        return None;
    }
    for _ in 0..2 {
        c.u32()?;
        c.opaque()?; // credential, verifier
    }
    c.opaque()?; // tag
    c.u32()?; // minor version
    let nops = c.u32()?;
    let (mut walked, mut last, mut fh, mut read, mut getattr) = (false, None, None, None, false);
    for _ in 0..nops {
        match c.u32()? {
            PUTROOTFH => walked = true,
            LOOKUP => last = Some(String::from_utf8_lossy(c.opaque()?).into_owned()),
            GETFH => {}
            PUTFH => fh = Some(c.opaque()?.to_vec()),
            GETATTR => {
                let words = c.u32()? as usize;
                c.skip(words * 4)?;
                getattr = true;
            }
            READ => {
                c.skip(16)?; // stateid
                read = Some(c.u64()?);
                c.u32()?;
            }
            _ => return None,
        }
    }
    if walked {
        return Some((xid, Call::Lookup(last.unwrap_or_default())));
    }
    let name = fh
        .and_then(|fh| sh.names.lock().unwrap().get(&fh).cloned())
        .unwrap_or_else(|| "(unknown handle)".into());
    match (read, getattr) {
        (Some(offset), _) => Some((xid, Call::Read(name, offset))),
        (None, true) => Some((xid, Call::Getattr(name))),
        _ => None,
    }
}

fn note_reply(sh: &Shared, walks: &Mutex<HashMap<u32, String>>, rec: &[u8]) {
    let mut c = Cursor(rec);
    let Some(xid) = c.u32() else { return };
    let Some(name) = walks.lock().unwrap().remove(&xid) else {
        return;
    };
    let fh = (|| {
        let (_mtype, _accepted) = (c.u32()?, c.u32()?);
        c.u32()?;
        c.opaque()?; // verifier
        c.u32()?; // accept status
        c.u32()?; // COMPOUND status
        c.opaque()?; // tag
        for _ in 0..c.u32()? {
            let (op, status) = (c.u32()?, c.u32()?);
            match (op, status) {
                (GETFH, 0) => return Some(c.opaque()?.to_vec()),
                (PUTROOTFH | LOOKUP, 0) => {}
                _ => return None,
            }
        }
        None
    })();
    if let Some(fh) = fh {
        sh.names.lock().unwrap().insert(fh, name);
    }
}
