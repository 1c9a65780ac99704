//! Unit tests of the tensorizer reader and writer.
