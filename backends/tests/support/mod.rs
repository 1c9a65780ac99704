//! Real servers and fault injection for the backends' integration tests. One module per helper;
//! each test file includes this with `mod support;` and uses what it needs (so what one test
//! file leaves unused is not dead code).
#![allow(dead_code)]

pub mod blackhole;
pub mod ganesha;
pub mod nginx;
pub mod proxy;
#[cfg(feature = "s3")]
pub mod s3s;
