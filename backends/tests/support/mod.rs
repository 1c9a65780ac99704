//! Real servers and fault injection for the backends' integration tests. One module per helper;
//! each test file includes this with `mod support;` and uses what it needs.

// Each test file uses only some helpers.
#[allow(dead_code)]
pub mod ganesha;
pub mod proxy;
#[cfg(feature = "s3")]
pub mod s3s;
