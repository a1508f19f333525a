//! Wire types shared by every edgeroute component.
//!
//! This crate holds what crosses a process boundary and nothing else: the OpenAI-compatible
//! chat schemas, the node's `/health` report, and the compact headers a node attaches to every
//! response (load report, migrate hint). Types here derive serde and carry no behaviour beyond
//! encoding, decoding and shape validation; decisions live in `edgeroute-core`.

pub mod audio;
pub mod chat;
pub mod discovery;
pub mod error;
pub mod headers;
pub mod health;
pub mod models;
pub mod names;
pub mod realtime;
pub mod sse;
pub mod topology;

pub use chat::*;
pub use error::{ERROR_HEADER, ErrorBody, ErrorDetail, Fault, Side};
pub use headers::{LoadReport, MigrateHint, ParseHeaderError};
