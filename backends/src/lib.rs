//! Storage backends for tensorstream.
