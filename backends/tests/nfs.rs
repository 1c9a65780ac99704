//! The NFS backend against a real NFS-Ganesha server on 127.0.0.1.

#[allow(dead_code)]
#[path = "support/ganesha.rs"]
mod ganesha;

use std::sync::Arc;

use ganesha::Ganesha;
use tensorstream_backends::{open, OpenOptions};
use tensorstream_engine::*;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn smoke_read_whole_file() {
    let g = Ganesha::start();
    let data = pattern(3_000_001, 1);
    let uri = g.put("f.bin", &data);
    let be = open(&uri, &OpenOptions::default()).unwrap();
    let meta = be.stat().unwrap();
    assert_eq!(meta.size, data.len() as u64);
    let got = be.read_exact_at(0, data.len()).unwrap();
    assert!(got == data);
}
