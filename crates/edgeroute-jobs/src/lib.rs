//! Durable jobs for the regional router (issue 16): OpenAI's Batch API and single async
//! requests rest on this crate.
//!
//! - [`lifecycle`] and [`batch`] — the batch lifecycle as pure rules and an in-memory machine
//!   (no I/O, `now` passed in): statuses and legal transitions, item states with leases and
//!   fencing tokens, request counts, cancel, expiry, finalizing.
//! - [`input`] — batch input JSONL checked against explicit limits; output and error lines.
//! - [`store`] — the [`JobStore`] trait and its two implementations: [`SqliteStore`] (one
//!   file, WAL, the embedded default) and [`PostgresStore`] (several router replicas in a
//!   region; claims with `FOR UPDATE SKIP LOCKED`).
//! - [`webhook`] — Standard Webhooks signing and verification, the delivery schedule
//!   (backoff with jitter from an injected RNG, dedupe by id) and the target allow-list.
//!
//! What it does not do: HTTP (the router serves `/v1/files` and `/v1/batches`), talk to NATS
//! (wake-ups and cancel fan-out are the router's; the store is the truth), or read a clock.
//!
//! Architecture invariants, and the tests that hold them (`tests/conformance.rs` runs each on
//! SQLite and PostgreSQL):
//! - **Every item ends exactly once**, in the output or the error file, keyed by `custom_id`;
//!   `request_counts` add up at every step (`batch::tests::every_item_ends_exactly_once_and_counts_add_up`,
//!   `the_store_follows_the_reference_machine`).
//! - **A stale fencing token never completes an item**: every claim raises the item's token,
//!   and the completing write checks it under the item's lock
//!   (`an_expired_lease_is_reclaimed_with_a_higher_fence_and_the_old_holder_is_refused`);
//!   concurrent claimers never share an item
//!   (`two_workers_claiming_concurrently_never_get_the_same_item`).
//! - **A cancel is persisted before anything is aborted**: `cancel` writes `cancelling` and
//!   returns the in-flight items; nothing is claimed after it, and the batch ends `cancelled`
//!   with the cancelled items in the error file
//!   (`cancel_while_items_are_leased_aborts_them_and_ends_cancelled`,
//!   `a_cancel_racing_claims_and_completions_leaves_no_lease_unaborted`).
//! - **Nothing accepted is lost**: a job is durable when `create_job` returns; an item whose
//!   worker vanished is claimed again when its lease lapses
//!   (`reopening_after_a_crash_loses_nothing`,
//!   `crash.rs::a_sigkilled_writer_loses_no_acknowledged_job`).

pub mod batch;
pub mod input;
pub mod lifecycle;
pub mod store;
pub mod webhook;

pub use lifecycle::{BatchStatus, ItemEnd, ItemError, Outcome, RequestCounts, UnixMs};
pub use store::postgres::{PostgresConfig, PostgresStore};
pub use store::sqlite::{SqliteConfig, SqliteStore};
pub use store::{
    Abort, CancelReport, Completion, Created, FileMeta, Job, JobKind, JobStore, Lease, Limits,
    NewFile, NewItem, NewJob, NewWebhook, StoreError, TickReport, WebhookDelivery, WebhookState,
};
