//! A hostile NFS server's replies: RPC records (fragments and all) decoded by the same reader
//! and decoders a connection uses, as the replies to a LOOKUP (of a path, or of the export's
//! root) or a READ. Never
//! panics, never reads past a record, never allocates more than a bound, and a READ never
//! writes more than it asked for (`fuzz_replies` asserts those).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream_backends::fuzzing::nfs_replies;

fuzz_target!(|input: (u8, u16, &[u8])| {
    let (mode, read_len, data) = input;
    nfs_replies(data, mode, read_len);
});
