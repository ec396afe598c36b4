//! The wire, one folder per HTTP version: its codec and both its drivers, `downstream`
//! (the client's connection, which gatehouse serves) and `upstream` (the app's connection,
//! which gatehouse sends on). Nothing here knows the chain, the proxy or the pools: a
//! driver is handed its connection and told what to do through a small trait.

pub mod h1;
pub mod h2;
