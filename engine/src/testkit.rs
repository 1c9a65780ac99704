//! Conformance suite for [`Backend`](crate::Backend) implementations (placeholder, filled in by
//! the local-backend work).
