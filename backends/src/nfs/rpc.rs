//! ONC RPC v2 (RFC 5531) over TCP: call messages with AUTH_SYS credentials, record marking, and
//! the accepted/denied reply header.

use tensorstream_engine::ErrorKind;

use super::xdr::{Enc, Source, XdrError};
use super::Failure;

/// NFS program number.
pub(crate) const NFS_PROGRAM: u32 = 100003;
/// NFS version 4.
pub(crate) const NFS_V4: u32 = 4;
/// Procedure COMPOUND.
pub(crate) const PROC_COMPOUND: u32 = 1;

const MSG_CALL: u32 = 0;
const MSG_REPLY: u32 = 1;
const RPC_VERSION: u32 = 2;
const AUTH_NONE: u32 = 0;
const AUTH_SYS: u32 = 1;
/// Last-fragment bit of a record-marking header.
pub(crate) const LAST_FRAGMENT: u32 = 0x8000_0000;
/// Largest verifier body allowed by RFC 5531.
const MAX_AUTH_BODY: usize = 400;

/// AUTH_SYS credentials, encoded once per connection.
#[derive(Debug, Clone)]
pub(crate) struct AuthSys {
    cred: Vec<u8>,
}

impl AuthSys {
    /// Credentials for `uid`/`gid` from machine `machine` (truncated to 255 bytes).
    pub(crate) fn new(machine: &str, uid: u32, gid: u32) -> Self {
        let mut name = machine.as_bytes();
        if name.len() > 255 {
            name = &name[..255];
        }
        let mut body = Enc::new();
        body.u32(0) // stamp
            .opaque(name)
            .u32(uid)
            .u32(gid)
            .u32(1) // one supplementary group: the primary one
            .u32(gid);
        let mut cred = Enc::new();
        cred.u32(AUTH_SYS).opaque(&body.buf);
        AuthSys { cred: cred.buf }
    }
}

/// Appends one complete call record (record mark + RPC header + `args`) for `xid` to `out`.
/// `args` writes the procedure's arguments.
pub(crate) fn encode_call(
    out: &mut Vec<u8>,
    xid: u32,
    auth: &AuthSys,
    procedure: u32,
    args: impl FnOnce(&mut Enc),
) {
    let mut e = Enc {
        buf: std::mem::take(out),
    };
    let mark_at = e.buf.len();
    e.u32(0); // record mark, patched below
    e.u32(xid)
        .u32(MSG_CALL)
        .u32(RPC_VERSION)
        .u32(NFS_PROGRAM)
        .u32(NFS_V4)
        .u32(procedure);
    e.buf.extend_from_slice(&auth.cred);
    e.u32(AUTH_NONE).u32(0); // verifier
    args(&mut e);
    let len = (e.buf.len() - mark_at - 4) as u32; // calls are a few hundred bytes
    e.buf[mark_at..mark_at + 4].copy_from_slice(&(LAST_FRAGMENT | len).to_be_bytes());
    *out = e.buf;
}

/// Decodes the reply header after the xid. `Ok(Ok(()))`: accepted and successful, the
/// procedure's results follow. `Ok(Err(f))`: the server refused the call (the rest of the record
/// may hold details and must be skipped by the caller).
pub(crate) fn decode_reply_header(src: &mut impl Source) -> Result<Result<(), Failure>, XdrError> {
    let mtype = src.u32("RPC message type")?;
    if mtype != MSG_REPLY {
        return Err(XdrError::Bad(format!(
            "expected an RPC reply, got message type {mtype}"
        )));
    }
    match src.u32("RPC reply status")? {
        0 => {
            let _flavor = src.u32("verifier flavor")?;
            src.skip_opaque("verifier", MAX_AUTH_BODY)?;
            let stat = src.u32("RPC accept status")?;
            let f = |kind, msg: &str| Ok(Err(Failure::new(kind, msg.to_string(), false)));
            match stat {
                0 => Ok(Ok(())),
                1 => f(
                    ErrorKind::Unsupported,
                    "server does not serve NFS (PROG_UNAVAIL)",
                ),
                2 => {
                    let low = src.u32("low version")?;
                    let high = src.u32("high version")?;
                    f(
                        ErrorKind::Unsupported,
                        &format!(
                            "server does not speak NFSv4 (it offers versions {low}..={high}); \
                             enable NFSv4 on the server"
                        ),
                    )
                }
                3 => f(
                    ErrorKind::Unsupported,
                    "server lacks the COMPOUND procedure",
                ),
                4 => f(
                    ErrorKind::Io,
                    "server could not decode the call (GARBAGE_ARGS)",
                ),
                5 => Ok(Err(Failure::new(
                    ErrorKind::Io,
                    "server system error (SYSTEM_ERR)".into(),
                    true,
                ))),
                other => f(ErrorKind::Io, &format!("unknown RPC accept status {other}")),
            }
        }
        1 => match src.u32("RPC reject status")? {
            0 => Ok(Err(Failure::new(
                ErrorKind::Unsupported,
                "server rejected RPC version 2 (RPC_MISMATCH)".into(),
                false,
            ))),
            1 => {
                let why = src.u32("auth status")?;
                let what = match why {
                    1 => "bad credentials",
                    2 => "credentials rejected, start a new session",
                    3 => "bad verifier",
                    4 => "verifier rejected",
                    5 => "AUTH_SYS rejected as too weak (the export may require Kerberos)",
                    _ => "authentication failed",
                };
                Ok(Err(Failure::new(
                    ErrorKind::PermissionDenied,
                    format!("RPC authentication error {why}: {what}"),
                    false,
                )))
            }
            other => Err(XdrError::Bad(format!("unknown RPC reject status {other}"))),
        },
        other => Err(XdrError::Bad(format!("unknown RPC reply status {other}"))),
    }
}
