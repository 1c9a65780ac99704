//! Real servers and fault injection for the backends' integration tests. One module per helper;
//! each test file includes this with `mod support;` and uses what it needs.

pub mod nginx;
pub mod proxy;
