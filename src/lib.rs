#![forbid(unsafe_code)]

pub mod proxy;
