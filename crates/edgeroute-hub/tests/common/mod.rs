//! The fake hub and the loopback server helper, from the shared test-support crate.

pub use edgeroute_test_util::fake_hub;
pub use edgeroute_test_util::{ServerGuard, spawn_router};
