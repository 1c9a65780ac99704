//! The only modules of this crate that hold `unsafe`: raw CUDA driver calls ([`driver`]),
//! pinned staging memory ([`pinned`]) and the read-only file mapping of the warm path
//! ([`mapped`]). Each exposes a safe API whose checks make the raw calls sound; every `unsafe`
//! block carries a `// SAFETY:` comment.

pub mod driver;
pub mod mapped;
pub mod pinned;
