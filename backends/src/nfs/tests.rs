//! Unit tests: URI parsing, XDR/RPC encoding and decoding, hostile lengths.
