//! Pure decision logic shared by the node, discovery and the client SDK.
//!
//! Architecture invariant: nothing in this crate performs I/O, reads a clock, spawns a task or
//! draws OS randomness. Time comes in as a `Duration` since an origin the caller chooses, so
//! every function here is deterministic and testable without sockets or sleeps. The one
//! exception is [`clock`], the wall-clock seam the other crates are handed (no decision here
//! calls it).

pub mod capacity;
pub mod clock;
pub mod health;
pub mod score;
pub mod steer;
pub mod window;

pub use window::{LatencyWindow, OutcomeWindow, WindowConfig};
