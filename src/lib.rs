//! tensorstream facade
