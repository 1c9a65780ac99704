//! Unit tests: URI parsing, XDR/RPC encoding and decoding, record marking, hostile lengths.

use std::time::Duration;

use tensorstream_engine::ErrorKind;

use super::config::{self, DEFAULT_PORT};
use super::conn::wire_for_tests;
use super::proto::{self, Attrs};
use super::rpc::{self, AuthSys};
use super::xdr::{pad, Enc, SliceSource, Source, XdrError};
use crate::OpenOptions;

fn be32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

// ---------------------------------------------------------------- config

#[test]
fn parses_host_port_path_and_options() {
    let c = config::parse(
        "nfs://srv.example:2050/export/a%20b/m.safetensors",
        &OpenOptions::default(),
    )
    .unwrap();
    assert_eq!(c.host, "srv.example");
    assert_eq!(c.port, 2050);
    assert_eq!(c.components, ["export", "a b", "m.safetensors"]);
    assert_eq!(c.nconnect, 4);
    assert_eq!(c.rsize, 1 << 20);
    assert_eq!(c.peer(), "srv.example:2050");

    let c = config::parse(
        "NFS://[::1]/e/f?nconnect=8&rsize=65536&uid=5&gid=6&retries=0",
        &OpenOptions::default(),
    )
    .unwrap();
    assert_eq!((c.host.as_str(), c.port), ("::1", DEFAULT_PORT));
    assert_eq!(
        (c.nconnect, c.rsize, c.uid, c.gid, c.retries),
        (8, 65536, 5, 6, 0)
    );
    assert_eq!(c.peer(), "[::1]:2049");
    assert_eq!(c.retry_for, config::DEFAULT_RETRY_FOR);

    let c = config::parse("nfs://h/x?retry_for=2.5", &OpenOptions::default()).unwrap();
    assert_eq!(c.retry_for, Duration::from_millis(2500));
    assert_eq!(c.retries, config::DEFAULT_RETRIES);
    let c = config::parse("nfs://h/x?retry_for=0", &OpenOptions::default()).unwrap();
    assert_eq!(c.retry_for, Duration::ZERO);

    // libnfs-style URL options.
    let c = config::parse(
        "nfs://127.0.0.1/export/f?version=4&nfsport=20491",
        &OpenOptions::default(),
    )
    .unwrap();
    assert_eq!(c.port, 20491);

    let o = OpenOptions {
        concurrency: Some(3),
        chunk_size: Some(1 << 16),
        timeout: Some(Duration::from_secs(2)),
        ..OpenOptions::default()
    };
    let c = config::parse("nfs://h//x//y/", &o).unwrap();
    assert_eq!(c.components, ["x", "y"]);
    assert_eq!(
        (c.concurrency, c.chunk, c.timeout),
        (3, 1 << 16, Duration::from_secs(2))
    );
}

#[test]
fn rejects_bad_uris() {
    for (uri, kind) in [
        ("http://h/x", ErrorKind::InvalidInput),
        ("nfs://", ErrorKind::InvalidInput),
        ("nfs:///export/x", ErrorKind::InvalidInput),
        ("nfs://h", ErrorKind::InvalidInput),
        ("nfs://h/", ErrorKind::InvalidInput),
        ("nfs://h:99999/x", ErrorKind::InvalidInput),
        ("nfs://h:abc/x", ErrorKind::InvalidInput),
        ("nfs://u@h/x", ErrorKind::InvalidInput),
        ("nfs://[::1/x", ErrorKind::InvalidInput),
        ("nfs://h/a/../b", ErrorKind::InvalidInput),
        ("nfs://h/a/%2Fb", ErrorKind::InvalidInput),
        ("nfs://h/a/%zz", ErrorKind::InvalidInput),
        ("nfs://h/a/%ff", ErrorKind::InvalidInput),
        ("nfs://h/x?nconnect=0", ErrorKind::InvalidInput),
        ("nfs://h/x?nconnect=65", ErrorKind::InvalidInput),
        ("nfs://h/x?rsize=100", ErrorKind::InvalidInput),
        ("nfs://h/x?retries=10001", ErrorKind::InvalidInput),
        ("nfs://h/x?retry_for=-1", ErrorKind::InvalidInput),
        ("nfs://h/x?retry_for=NaN", ErrorKind::InvalidInput),
        ("nfs://h/x?retry_for=inf", ErrorKind::InvalidInput),
        ("nfs://h/x?retry_for=3601", ErrorKind::InvalidInput),
        ("nfs://h/x?retry_for=", ErrorKind::InvalidInput),
        ("nfs://h/x?bogus=1", ErrorKind::InvalidInput),
        ("nfs://h/x?version=3", ErrorKind::Unsupported),
    ] {
        let e = config::parse(uri, &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), kind, "{uri}: {e}");
        assert_eq!(e.backend(), Some("nfs"), "{uri}");
    }
    let long = format!("nfs://h/{}", "a".repeat(256));
    assert!(config::parse(&long, &OpenOptions::default()).is_err());
    let o = OpenOptions {
        timeout: Some(Duration::ZERO),
        ..OpenOptions::default()
    };
    assert!(config::parse("nfs://h/x", &o).is_err());
}

// ---------------------------------------------------------------- XDR

#[test]
fn xdr_round_trip_and_padding() {
    let mut e = Enc::new();
    e.u32(7)
        .u64(0x0102_0304_0506_0708)
        .opaque(b"abcde")
        .fixed(b"xy")
        .u32(1);
    assert_eq!(e.buf.len(), 4 + 8 + (4 + 8) + 4 + 4);
    let mut s = SliceSource::new(&e.buf);
    assert_eq!(s.u32("a").unwrap(), 7);
    assert_eq!(s.u64("b").unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(s.opaque("c", 5).unwrap(), b"abcde");
    s.skip(4, "d").unwrap();
    assert!(s.bool("e").unwrap());
    assert_eq!(s.remaining(), 0);
    assert!(matches!(s.u32("f"), Err(XdrError::Truncated("f"))));
    assert_eq!((pad(0), pad(1), pad(2), pad(3), pad(4)), (0, 3, 2, 1, 0));
}

#[test]
fn xdr_rejects_hostile_lengths_before_allocating() {
    // An opaque claiming 4 GiB - 1 with 4 bytes behind it.
    let d = be32(&[u32::MAX, 0]);
    match SliceSource::new(&d).opaque("blob", 1024) {
        Err(XdrError::TooLong { len, max, .. }) => assert_eq!((len, max), (u32::MAX as u64, 1024)),
        other => panic!("{other:?}"),
    }
    // Within the bound but longer than the data: truncated, not a panic.
    let d = be32(&[100, 1]);
    assert!(matches!(
        SliceSource::new(&d).opaque("blob", 1024),
        Err(XdrError::Truncated(_))
    ));
    assert!(matches!(
        SliceSource::new(&be32(&[2])).bool("flag"),
        Err(XdrError::Bad(_))
    ));
    assert!(SliceSource::new(&d).skip(u64::MAX, "x").is_err());
}

// ---------------------------------------------------------------- RPC

#[test]
fn call_encoding_matches_rfc5531() {
    let auth = AuthSys::new("host", 1000, 100);
    let mut out = vec![9u8]; // existing bytes are kept
    rpc::encode_call(&mut out, 0x1234_5678, &auth, rpc::PROC_COMPOUND, |e| {
        e.u32(0xdead_beef);
    });
    assert_eq!(out[0], 9);
    let rec = &out[1..];
    let mark = u32::from_be_bytes(rec[..4].try_into().unwrap());
    assert_eq!(mark & rpc::LAST_FRAGMENT, rpc::LAST_FRAGMENT);
    assert_eq!((mark & !rpc::LAST_FRAGMENT) as usize, rec.len() - 4);
    let mut s = SliceSource::new(&rec[4..]);
    let head: Vec<u32> = (0..6).map(|_| s.u32("h").unwrap()).collect();
    assert_eq!(head, [0x1234_5678, 0, 2, 100003, 4, 1]);
    assert_eq!(s.u32("flavor").unwrap(), 1); // AUTH_SYS
    let body = s.opaque("cred", 400).unwrap();
    let mut b = SliceSource::new(&body);
    assert_eq!(b.u32("stamp").unwrap(), 0);
    assert_eq!(b.opaque("machine", 255).unwrap(), b"host");
    assert_eq!(b.u32("uid").unwrap(), 1000);
    assert_eq!(b.u32("gid").unwrap(), 100);
    assert_eq!(b.u32("ngids").unwrap(), 1);
    assert_eq!(b.u32("gid").unwrap(), 100);
    assert_eq!(b.remaining(), 0);
    assert_eq!((s.u32("verf").unwrap(), s.u32("verf len").unwrap()), (0, 0));
    assert_eq!(s.u32("arg").unwrap(), 0xdead_beef);
    assert_eq!(s.remaining(), 0);
    // Over-long machine names are truncated to the RFC's 255 bytes.
    let auth = AuthSys::new(&"m".repeat(300), 0, 0);
    let mut out = Vec::new();
    rpc::encode_call(&mut out, 1, &auth, 1, |_| {});
    assert!(out.len() < 400);
}

#[test]
fn reply_headers_decode_to_the_right_failure() {
    let ok = be32(&[1, 0, 0, 0, 0]);
    assert_eq!(
        rpc::decode_reply_header(&mut SliceSource::new(&ok)).unwrap(),
        Ok(())
    );
    let mismatch = be32(&[1, 0, 0, 0, 2, 2, 3]);
    let f = rpc::decode_reply_header(&mut SliceSource::new(&mismatch))
        .unwrap()
        .unwrap_err();
    assert_eq!(f.kind, ErrorKind::Unsupported);
    assert!(f.msg.contains("2..=3"), "{}", f.msg);
    let auth = be32(&[1, 1, 1, 5]);
    let f = rpc::decode_reply_header(&mut SliceSource::new(&auth))
        .unwrap()
        .unwrap_err();
    assert_eq!(f.kind, ErrorKind::PermissionDenied);
    let sys = be32(&[1, 0, 0, 0, 5]);
    assert!(
        rpc::decode_reply_header(&mut SliceSource::new(&sys))
            .unwrap()
            .unwrap_err()
            .retryable
    );
    // A verifier body over RFC 5531's 400 bytes is a protocol error.
    let verf = be32(&[1, 0, 0, 401]);
    assert!(matches!(
        rpc::decode_reply_header(&mut SliceSource::new(&verf)),
        Err(XdrError::TooLong { .. })
    ));
    assert!(rpc::decode_reply_header(&mut SliceSource::new(&be32(&[0]))).is_err());
    assert!(rpc::decode_reply_header(&mut SliceSource::new(&be32(&[1, 7]))).is_err());
}

// ---------------------------------------------------------------- record marking

#[test]
fn record_marking_spans_fragments() {
    // One record split over three fragments: [1,2] [3] [4 5 6 7 8 9 10 11 12 | last].
    let mut d = Vec::new();
    d.extend_from_slice(&2u32.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&[0]);
    d.extend_from_slice(&(0x8000_0000u32 | 9).to_be_bytes());
    d.extend_from_slice(&[42, 0, 0, 0, 7, 1, 2, 3, 4]);
    // A second record.
    d.extend_from_slice(&(0x8000_0000u32 | 4).to_be_bytes());
    d.extend_from_slice(&[0, 0, 0, 9]);
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert_eq!(w.u32("a").unwrap(), 42);
    assert_eq!(w.u32("b").unwrap(), 7);
    w.finish().unwrap(); // skips the rest of the last fragment
    w.start_record().unwrap();
    assert_eq!(w.u32("c").unwrap(), 9);
    assert!(matches!(
        w.u32("past the record"),
        Err(XdrError::Truncated(_))
    ));
}

#[test]
fn record_rest_is_bounded() {
    let mut d = Vec::new();
    d.extend_from_slice(&(0x8000_0000u32 | 0x7fff_ffff).to_be_bytes());
    d.extend_from_slice(&[0; 16]);
    let mut w = wire_for_tests(&d);
    // A 2 GiB record is refused at its header (records are capped at the largest READ reply).
    assert!(matches!(w.start_record(), Err(XdrError::TooLong { .. })));
    // One within the record cap but over what the caller takes is refused by `rest`.
    let mut d = Vec::new();
    d.extend_from_slice(&(0x8000_0000u32 | (2 << 20)).to_be_bytes());
    d.extend_from_slice(&[0; 16]);
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert!(matches!(w.rest(1 << 20), Err(XdrError::TooLong { .. })));
    // Fragments that never end the record add up to the cap, however small each is.
    let mut d = Vec::new();
    for _ in 0..40 {
        d.extend_from_slice(&(2u32 << 20).to_be_bytes()); // no last-fragment bit
        d.resize(d.len() + (2 << 20), 0);
    }
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert!(matches!(w.finish(), Err(XdrError::TooLong { .. })));
    // Empty fragments too: each header counts, so endless "0 bytes, more to come" headers
    // end at the cap rather than keeping a reply (and the READ waiting on it) open for ever.
    let d: Vec<u8> = std::iter::repeat_n(0u8, 4 * (17 << 20)).collect();
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert!(matches!(w.finish(), Err(XdrError::TooLong { .. })));
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert!(matches!(w.rest(1 << 20), Err(XdrError::TooLong { .. })));
    // A truncated stream is an error, not a hang or a panic.
    let mut d = Vec::new();
    d.extend_from_slice(&(0x8000_0000u32 | 100).to_be_bytes());
    d.extend_from_slice(&[0; 10]);
    let mut w = wire_for_tests(&d);
    w.start_record().unwrap();
    assert!(w.rest(1 << 20).is_err());
}

// ---------------------------------------------------------------- NFSv4

fn fattr(bits: [u32; 2], vals: &[u8]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(2).u32(bits[0]).u32(bits[1]).opaque(vals);
    e.buf
}

#[test]
fn compounds_encode_as_expected() {
    let mut e = Enc::new();
    proto::encode_read(&mut e, b"fh-123", 1 << 40, 65536);
    let mut s = SliceSource::new(&e.buf);
    assert_eq!(s.opaque("tag", 0).unwrap(), b"");
    assert_eq!(s.u32("minor").unwrap(), 0);
    assert_eq!(s.u32("nops").unwrap(), 3);
    assert_eq!(s.u32("op").unwrap(), proto::OP_PUTFH);
    assert_eq!(s.opaque("fh", 128).unwrap(), b"fh-123");
    assert_eq!(s.u32("op").unwrap(), proto::OP_READ);
    assert_eq!(s.u32("seqid").unwrap(), 0);
    let mut other = [1u8; 12];
    s.take(&mut other, "other").unwrap();
    assert_eq!(other, [0u8; 12], "anonymous stateid");
    assert_eq!(s.u64("offset").unwrap(), 1 << 40);
    assert_eq!(s.u32("count").unwrap(), 65536);
    assert_eq!(s.u32("op").unwrap(), proto::OP_GETATTR);
    assert_eq!(s.u32("words").unwrap(), 2);
    assert_eq!(s.u32("w0").unwrap(), (1 << 3) | (1 << 4)); // change, size
    assert_eq!(s.u32("w1").unwrap(), 0);
    assert_eq!(s.remaining(), 0);

    let mut e = Enc::new();
    proto::encode_resolve(&mut e, &["export".into(), "m".into()]);
    let mut s = SliceSource::new(&e.buf);
    s.skip(8, "tag+minor").unwrap();
    assert_eq!(s.u32("nops").unwrap(), 5);
    assert_eq!(s.u32("op").unwrap(), proto::OP_PUTROOTFH);
    assert_eq!(s.u32("op").unwrap(), proto::OP_LOOKUP);
    assert_eq!(s.opaque("name", 255).unwrap(), b"export");
    assert_eq!(s.u32("op").unwrap(), proto::OP_LOOKUP);
    assert_eq!(s.opaque("name", 255).unwrap(), b"m");
    assert_eq!(s.u32("op").unwrap(), proto::OP_GETFH);
    assert_eq!(s.u32("op").unwrap(), proto::OP_GETATTR);
    let words = s.u32("words").unwrap();
    assert_eq!(words, 2);
    assert_eq!(
        s.u32("w0").unwrap(),
        (1 << 1) | (1 << 3) | (1 << 4) | (1 << 30)
    );
    assert_eq!(s.u32("w1").unwrap(), 1 << 21); // time_modify = 53
}

#[test]
fn fattr_decodes_known_attributes_and_rejects_others() {
    let mut v = Enc::new();
    v.u32(1)
        .u64(0xabc)
        .u64(12345)
        .u64(1 << 20)
        .u64(1_700_000_000)
        .u32(999);
    let d = fattr(proto::stat_bitmap(), &v.buf);
    let a = proto::decode_fattr(&mut SliceSource::new(&d)).unwrap();
    assert_eq!(
        a,
        Attrs {
            ftype: Some(1),
            change: Some(0xabc),
            size: Some(12345),
            maxread: Some(1 << 20),
            mtime: Some((1_700_000_000, 999)),
        }
    );
    // An attribute we did not ask for (and cannot skip): error.
    let d = fattr([1 << 5, 0], &be32(&[1]));
    assert!(matches!(
        proto::decode_fattr(&mut SliceSource::new(&d)),
        Err(XdrError::Bad(_))
    ));
    // Values shorter than the bitmap promises, or with trailing junk.
    let d = fattr(proto::pin_bitmap(), &[0; 8]);
    assert!(proto::decode_fattr(&mut SliceSource::new(&d)).is_err());
    let d = fattr(proto::pin_bitmap(), &[0; 20]);
    assert!(proto::decode_fattr(&mut SliceSource::new(&d)).is_err());
    // Hostile bitmap length and value length.
    assert!(proto::decode_fattr(&mut SliceSource::new(&be32(&[1_000_000]))).is_err());
    assert!(proto::decode_fattr(&mut SliceSource::new(&be32(&[0, 0x7fff_ffff]))).is_err());
}

fn read_reply(count: u32, data: &[u8], eof: bool, change: u64, size: u64) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(0).opaque(b"").u32(3);
    e.u32(proto::OP_PUTFH).u32(0);
    e.u32(proto::OP_READ)
        .u32(0)
        .u32(eof as u32)
        .u32(count)
        .fixed(data);
    e.u32(proto::OP_GETATTR).u32(0);
    let mut v = Enc::new();
    v.u64(change).u64(size);
    e.buf.extend(fattr(proto::pin_bitmap(), &v.buf));
    e.buf
}

#[test]
fn read_results_land_in_the_destination() {
    let d = read_reply(5, b"hello", true, 7, 5);
    let mut dst = [0u8; 8];
    let o = proto::decode_read(&mut SliceSource::new(&d), &mut dst)
        .unwrap()
        .unwrap();
    assert_eq!((o.count, o.eof), (5, true));
    assert_eq!((o.after.change, o.after.size), (Some(7), Some(5)));
    assert_eq!(&dst[..5], b"hello");

    // More data than asked for: rejected before a byte is copied.
    let d = read_reply(5, b"hello", false, 7, 5);
    let mut dst = [0u8; 4];
    assert!(matches!(
        proto::decode_read(&mut SliceSource::new(&d), &mut dst),
        Err(XdrError::TooLong { .. })
    ));
    assert_eq!(dst, [0; 4]);

    // A failed READ (NFS4ERR_ACCESS) ends the results.
    let mut e = Enc::new();
    e.u32(13)
        .opaque(b"")
        .u32(2)
        .u32(proto::OP_PUTFH)
        .u32(0)
        .u32(proto::OP_READ)
        .u32(13);
    let f = proto::decode_read(&mut SliceSource::new(&e.buf), &mut [0u8; 4])
        .unwrap()
        .unwrap_err();
    assert_eq!(f.kind, ErrorKind::PermissionDenied);
    assert!(
        f.msg.contains("READ") && f.msg.contains("NFS4ERR_ACCESS"),
        "{}",
        f.msg
    );

    // Results for operations we did not send.
    let mut e = Enc::new();
    e.u32(0).opaque(b"").u32(1).u32(proto::OP_READ).u32(0);
    assert!(proto::decode_read(&mut SliceSource::new(&e.buf), &mut [0u8; 4]).is_err());
}

#[test]
fn resolve_failures_name_the_path() {
    let comps = vec!["export".to_string(), "dir".to_string(), "f".to_string()];
    let mut e = Enc::new();
    e.u32(2).opaque(b"").u32(3);
    e.u32(proto::OP_PUTROOTFH).u32(0);
    e.u32(proto::OP_LOOKUP).u32(0);
    e.u32(proto::OP_LOOKUP).u32(2);
    let f = proto::decode_resolve(&mut SliceSource::new(&e.buf), &comps)
        .unwrap()
        .unwrap_err();
    assert_eq!(f.kind, ErrorKind::NotFound);
    assert!(f.msg.contains("LOOKUP /export/dir"), "{}", f.msg);
}

#[test]
fn nfs_status_codes_map_to_error_kinds() {
    for (st, kind, retry) in [
        (2, ErrorKind::NotFound, false),
        (1, ErrorKind::PermissionDenied, false),
        (13, ErrorKind::PermissionDenied, false),
        (10016, ErrorKind::PermissionDenied, false),
        (70, ErrorKind::ObjectChanged, false),
        (10014, ErrorKind::ObjectChanged, false),
        (10008, ErrorKind::Io, true),
        (10013, ErrorKind::Io, true),
        (21, ErrorKind::InvalidInput, false),
        (10021, ErrorKind::Unsupported, false),
        (5, ErrorKind::Io, false),
        (99999, ErrorKind::Io, false),
    ] {
        let f = proto::nfs_failure(st, "OP");
        assert_eq!((f.kind, f.retryable), (kind, retry), "status {st}");
    }
    let e = proto::nfs_failure(2, "LOOKUP /x").into_error("nfs://h/x");
    assert_eq!(e.backend(), Some("nfs"));
    assert_eq!(e.location(), Some("nfs://h/x"));
    assert!(e
        .to_string()
        .starts_with("nfs://h/x: nfs: LOOKUP /x failed: NFS4ERR_NOENT"));
}

#[test]
fn retries_stop_at_the_count_or_the_time_budget() {
    use super::retry_delay;
    let now = std::time::Instant::now();
    let minute = Duration::from_secs(60);
    // Within both limits: the backoff for the next attempt.
    let d = retry_delay(0, now, 3, minute).unwrap();
    assert!(
        d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
        "{d:?}"
    );
    // The count is spent.
    assert_eq!(retry_delay(3, now, 3, minute), None);
    assert_eq!(retry_delay(0, now, 0, minute), None);
    // The time is spent (or was zero): no retry, however many attempts are left.
    assert_eq!(retry_delay(0, now, 1000, Duration::ZERO), None);
    let long_ago = now - Duration::from_secs(61);
    assert_eq!(retry_delay(5, long_ago, 1000, minute), None);
    // Little time left (400 ms, as of a fixed `now`): the delay is cut so that the retry still
    // has MIN_ATTEMPT.
    let almost = now - Duration::from_millis(59_600);
    let d = super::retry_delay_at(10, almost, 1000, minute, now).expect("400 ms of 60 s left");
    assert!(
        d > Duration::ZERO && d <= Duration::from_millis(150),
        "{d:?}"
    );
    // Less than MIN_ATTEMPT left: no retry.
    let nearly = now - Duration::from_millis(59_800);
    assert_eq!(super::retry_delay_at(10, nearly, 1000, minute, now), None);
}

#[test]
fn backoff_grows_and_is_capped() {
    assert!(super::backoff(1) <= Duration::from_millis(100));
    assert!(super::backoff(1) >= Duration::from_millis(50));
    for a in 0..40 {
        assert!(super::backoff(a) <= Duration::from_secs(2));
    }
}

#[test]
fn version_tags_hold_the_change_attribute_and_the_file_handle() {
    let v = proto::Version {
        change: 0x1f0a,
        size: 7,
    };
    let tag = v.tag(&[0, 0xab, 7]);
    assert_eq!(tag, "nfs4-change:1f0a;fh=00ab07");
    assert_eq!(proto::parse_tag(&tag), Some((0x1f0a, vec![0, 0xab, 7])));
    for other in [
        "nfs4-change:1f0a",
        "nfs4-change:1f0a;fh=",
        "nfs4-change:1f0a;fh=0ab",
        "nfs4-change:1F0A;fh=00ab07",
        "nfs4-change:01f0a;fh=00ab07",
        "nfs4-change:+1f0a;fh=00ab07",
        "nfs4-change:1f0a;fh=00AB07",
        "nfs4-change:1f0a;fh=+0ab07",
        "nfs4-change:1f0a;fh=00ab0aé",
        "\"etag\"",
    ] {
        assert_eq!(proto::parse_tag(other), None, "{other}");
    }
    let long = format!("nfs4-change:1;fh={}", "00".repeat(proto::MAX_FH + 1));
    assert_eq!(proto::parse_tag(&long), None);
}
