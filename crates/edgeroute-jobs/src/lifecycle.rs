//! The batch lifecycle as pure rules: statuses and their legal transitions, item states,
//! request counts, and what happens to items on completion, abort, lease expiry, cancel and
//! expiry. No I/O and no clock: every rule that depends on time takes `now` (Unix ms).
//!
//! Both stores (SQLite, PostgreSQL) and the in-memory reference machine ([`crate::batch`])
//! decide with these functions, so the rules live in one place and the property tests that
//! exercise the machine exercise the stores' decisions too.
//!
//! Invariants:
//! - a status only moves along [`BatchStatus::can_become`]; anything else is
//!   [`IllegalTransition`], never a silent overwrite;
//! - `completed + failed + pending == total` at every step ([`RequestCounts`]), and a batch
//!   reaches a terminal status only with `pending == 0`;
//! - an item ends exactly once ([`ItemEnd`]), in the output file (succeeded) or the error file
//!   (failed, cancelled, expired).

use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch, always passed in by the caller.
pub type UnixMs = u64;

/// OpenAI's batch statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BatchStatus {
    /// The input is being checked; no item may be claimed yet.
    Validating,
    /// Items are claimable.
    InProgress,
    /// Every item has ended; the output and error files are being written.
    Finalizing,
    /// Terminal: every item ended and the files are written.
    Completed,
    /// Terminal: the batch itself failed (invalid input, files could not be written).
    Failed,
    /// Terminal: the completion window passed; unfinished items ended `expired`.
    Expired,
    /// A cancel is persisted; in-flight items are being aborted, nothing new is claimed.
    Cancelling,
    /// Terminal: cancelled; items that had not ended are in the error file as cancelled.
    Cancelled,
}

impl BatchStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Failed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    /// The wire and column spelling (OpenAI's).
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Completed
                | BatchStatus::Failed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    /// Only an in-progress batch hands out items.
    pub fn accepts_claims(self) -> bool {
        self == BatchStatus::InProgress
    }

    /// The legal transitions:
    /// validating → in_progress | failed | cancelling | expired;
    /// in_progress → finalizing | cancelling | expired;
    /// finalizing → completed | failed; cancelling → cancelled.
    pub fn can_become(self, next: BatchStatus) -> bool {
        use BatchStatus::*;
        matches!(
            (self, next),
            (Validating, InProgress | Failed | Cancelling | Expired)
                | (InProgress, Finalizing | Cancelling | Expired)
                | (Finalizing, Completed | Failed)
                | (Cancelling, Cancelled)
        )
    }

    /// `next` if the transition is legal.
    pub fn become_(self, next: BatchStatus) -> Result<BatchStatus, IllegalTransition> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(IllegalTransition { from: self, to: next })
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BatchStatus {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BatchStatus::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A transition the lifecycle does not allow (cancelling a completed batch, finalizing a
/// cancelled one...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a batch cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// The status the batch is in.
    pub from: BatchStatus,
    /// The status that was asked for.
    pub to: BatchStatus,
}

/// A status or item state read back from storage that this version does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?} in the store (written by a newer version?)")]
pub struct UnknownState(pub String);

/// How an item ended. Each item ends exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ItemEnd {
    /// The request was answered; the answer goes to the output file.
    Succeeded,
    /// The request failed (the worker said so, or its leases ran out); error file.
    Failed,
    /// The batch was cancelled before the item ended; error file.
    Cancelled,
    /// The completion window passed before the item ended; error file.
    Expired,
}

impl ItemEnd {
    /// The column spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemEnd::Succeeded => "succeeded",
            ItemEnd::Failed => "failed",
            ItemEnd::Cancelled => "cancelled",
            ItemEnd::Expired => "expired",
        }
    }

    /// Which file the item's line goes to.
    pub fn file(self) -> FileKind {
        match self {
            ItemEnd::Succeeded => FileKind::Output,
            _ => FileKind::Error,
        }
    }

    /// The error code written for ends the worker did not report itself.
    pub fn default_error_code(self) -> Option<&'static str> {
        match self {
            ItemEnd::Succeeded | ItemEnd::Failed => None,
            ItemEnd::Cancelled => Some("batch_cancelled"),
            ItemEnd::Expired => Some("batch_expired"),
        }
    }
}

/// The two result files of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Succeeded items' responses.
    Output,
    /// Failed, cancelled and expired items.
    Error,
}

/// An item's state, as stored (`state` column) plus its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemState {
    /// Waiting for a worker.
    Queued,
    /// Held by a worker until `expires_at`; only the holder of `fence` may end it.
    Leased(LeaseInfo),
    /// Ended.
    Ended(ItemEnd),
}

impl ItemState {
    /// The column spelling (`queued`, `leased`, or the end's).
    pub fn as_str(&self) -> &'static str {
        match self {
            ItemState::Queued => "queued",
            ItemState::Leased(_) => "leased",
            ItemState::Ended(end) => end.as_str(),
        }
    }

    /// Reads back an ended state from its column spelling.
    pub fn parse_end(s: &str) -> Result<Option<ItemEnd>, UnknownState> {
        Ok(Some(match s {
            // `aborting`: the stores' spelling of an item leased when its batch's cancel was
            // persisted (the machine's `Leased` in a cancelling batch).
            "queued" | "leased" | "aborting" => return Ok(None),
            "succeeded" => ItemEnd::Succeeded,
            "failed" => ItemEnd::Failed,
            "cancelled" => ItemEnd::Cancelled,
            "expired" => ItemEnd::Expired,
            other => return Err(UnknownState(other.to_owned())),
        }))
    }
}

/// Who holds an item and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The worker that claimed it.
    pub worker: String,
    /// The item's fencing token: raised by every claim, checked by every completion.
    pub fence: u64,
    /// When the lease lapses (Unix ms); after it another worker may claim the item.
    pub expires_at: UnixMs,
}

/// OpenAI's `request_counts`. `failed` counts every item in the error file (failed,
/// cancelled, expired), so at the end `completed + failed == total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestCounts {
    /// Items in the batch.
    pub total: u64,
    /// Items that succeeded.
    pub completed: u64,
    /// Items that failed, were cancelled or expired.
    pub failed: u64,
}

impl RequestCounts {
    /// A batch of `total` items, none ended.
    pub fn new(total: u64) -> Self {
        RequestCounts { total, completed: 0, failed: 0 }
    }

    /// Items not ended yet.
    pub fn pending(&self) -> u64 {
        self.total.saturating_sub(self.completed + self.failed)
    }

    /// Counts one more ended item.
    pub fn record(&mut self, end: ItemEnd) {
        match end.file() {
            FileKind::Output => self.completed += 1,
            FileKind::Error => self.failed += 1,
        }
    }

    /// The invariant: no item counted twice, none beyond the total.
    pub fn adds_up(&self) -> bool {
        self.completed + self.failed <= self.total
    }
}

/// What a worker reports for its leased item.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The upstream answered; `body` is its JSON answer.
    Succeeded {
        /// The upstream's HTTP status.
        status_code: u16,
        /// The answer body (JSON).
        body: serde_json::Value,
    },
    /// The request failed and will not be retried.
    Failed(ItemError),
    /// The worker stopped the request (it was told to abort, or it is shutting down).
    Aborted,
}

/// The `error` object of an error-file line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemError {
    /// A stable code (`batch_cancelled`, `batch_expired`, `lease_attempts_exhausted`, or the
    /// worker's).
    pub code: String,
    /// For people.
    pub message: String,
}

/// What an outcome does to the item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// The item ends so.
    End(ItemEnd),
    /// The item goes back to the queue (an abort while the batch is still running: the
    /// worker is leaving, the request was not answered).
    Requeue,
}

/// What a worker's outcome does, given the batch's status. An abort in a cancelling batch
/// ends the item cancelled; outside a cancel it gives the item back. A real answer that
/// arrives during a cancel is kept: the work was done and is reported once.
pub fn settle(status: BatchStatus, outcome: &Outcome) -> Settle {
    match outcome {
        Outcome::Succeeded { .. } => Settle::End(ItemEnd::Succeeded),
        Outcome::Failed(_) => Settle::End(ItemEnd::Failed),
        Outcome::Aborted if status == BatchStatus::Cancelling => Settle::End(ItemEnd::Cancelled),
        Outcome::Aborted => Settle::Requeue,
    }
}

/// What a lapsed lease does to its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    /// Another worker may claim it (with a higher fencing token).
    Reclaimable,
    /// The item ends so.
    End(ItemEnd),
}

/// A lapsed lease: in a cancelling batch the item ends cancelled (nobody may start it
/// again); otherwise it is claimable again unless its attempts are spent, in which case it
/// fails (a poison request must not take the whole batch's time).
pub fn lapse(status: BatchStatus, attempts: u32, max_attempts: u32) -> Lapse {
    if status == BatchStatus::Cancelling {
        Lapse::End(ItemEnd::Cancelled)
    } else if attempts >= max_attempts {
        Lapse::End(ItemEnd::Failed)
    } else {
        Lapse::Reclaimable
    }
}

/// The error written for an item whose leases all lapsed.
pub fn attempts_exhausted(attempts: u32) -> ItemError {
    ItemError {
        code: "lease_attempts_exhausted".into(),
        message: format!("no worker finished this request in {attempts} attempts"),
    }
}

/// The error written for an item that ended by cancel or expiry.
pub fn end_error(end: ItemEnd) -> Option<ItemError> {
    let code = end.default_error_code()?;
    let message = match end {
        ItemEnd::Cancelled => "the batch was cancelled before this request finished",
        _ => "the batch's completion window passed before this request finished",
    };
    Some(ItemError { code: code.into(), message: message.into() })
}

/// The status after an item ended, when it changes: the last item of an in-progress batch
/// moves it to finalizing. A cancelling batch stays cancelling until finalized.
pub fn after_item_end(status: BatchStatus, counts: &RequestCounts) -> Option<BatchStatus> {
    (status == BatchStatus::InProgress && counts.pending() == 0).then_some(BatchStatus::Finalizing)
}

/// Whether a batch is waiting for its files to be written.
pub fn ready_to_finalize(status: BatchStatus, counts: &RequestCounts) -> bool {
    counts.pending() == 0 && matches!(status, BatchStatus::Finalizing | BatchStatus::Cancelling)
}

/// The terminal status a ready batch takes once its files are written.
pub fn final_status(status: BatchStatus) -> Result<BatchStatus, IllegalTransition> {
    match status {
        BatchStatus::Cancelling => status.become_(BatchStatus::Cancelled),
        other => other.become_(BatchStatus::Completed),
    }
}

/// Whether the completion window has passed for a batch in this status. Only batches still
/// running expire; a cancel already persisted wins over expiry.
pub fn is_expired(
    status: BatchStatus,
    created_at: UnixMs,
    completion_window_ms: u64,
    now: UnixMs,
) -> bool {
    matches!(status, BatchStatus::Validating | BatchStatus::InProgress)
        && now >= created_at.saturating_add(completion_window_ms)
}

/// Cancelling: the status to persist (idempotent for a batch already cancelling) and whether
/// the cancel is new. Anything terminal or finalizing cannot be cancelled.
pub fn cancel(status: BatchStatus) -> Result<(BatchStatus, bool), IllegalTransition> {
    if status == BatchStatus::Cancelling {
        return Ok((status, false));
    }
    status.become_(BatchStatus::Cancelling).map(|s| (s, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_legal() {
        let legal: Vec<(BatchStatus, BatchStatus)> = BatchStatus::ALL
            .into_iter()
            .flat_map(|a| BatchStatus::ALL.into_iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(legal.len(), 10, "{legal:?}");
        for t in BatchStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for n in BatchStatus::ALL {
                assert_eq!(
                    t.become_(n),
                    Err(IllegalTransition { from: t, to: n }),
                    "terminal {t} left for {n}"
                );
            }
        }
        assert!(BatchStatus::InProgress.become_(BatchStatus::Completed).is_err());
        assert!(BatchStatus::Cancelling.become_(BatchStatus::Completed).is_err());
    }

    #[test]
    fn statuses_round_trip_through_their_spelling() {
        for s in BatchStatus::ALL {
            assert_eq!(s.as_str().parse::<BatchStatus>(), Ok(s));
        }
        assert_eq!("done".parse::<BatchStatus>(), Err(UnknownState("done".into())));
    }

    #[test]
    fn an_abort_requeues_unless_the_batch_is_cancelling() {
        assert_eq!(settle(BatchStatus::InProgress, &Outcome::Aborted), Settle::Requeue);
        assert_eq!(
            settle(BatchStatus::Cancelling, &Outcome::Aborted),
            Settle::End(ItemEnd::Cancelled)
        );
        let ok = Outcome::Succeeded { status_code: 200, body: serde_json::json!({}) };
        assert_eq!(settle(BatchStatus::Cancelling, &ok), Settle::End(ItemEnd::Succeeded));
    }

    #[test]
    fn a_lapsed_lease_is_reclaimable_until_attempts_run_out_or_the_batch_cancels() {
        assert_eq!(lapse(BatchStatus::InProgress, 1, 3), Lapse::Reclaimable);
        assert_eq!(lapse(BatchStatus::InProgress, 3, 3), Lapse::End(ItemEnd::Failed));
        assert_eq!(lapse(BatchStatus::Cancelling, 1, 3), Lapse::End(ItemEnd::Cancelled));
    }

    #[test]
    fn cancel_is_idempotent_while_cancelling_and_refused_once_finalizing() {
        assert_eq!(cancel(BatchStatus::InProgress), Ok((BatchStatus::Cancelling, true)));
        assert_eq!(cancel(BatchStatus::Cancelling), Ok((BatchStatus::Cancelling, false)));
        assert!(cancel(BatchStatus::Finalizing).is_err());
        assert!(cancel(BatchStatus::Completed).is_err());
    }

    #[test]
    fn expiry_needs_the_window_to_pass_and_spares_a_cancel() {
        assert!(!is_expired(BatchStatus::InProgress, 1_000, 500, 1_499));
        assert!(is_expired(BatchStatus::InProgress, 1_000, 500, 1_500));
        assert!(!is_expired(BatchStatus::Cancelling, 1_000, 500, 9_000));
        assert!(!is_expired(BatchStatus::Finalizing, 1_000, 500, 9_000));
    }

    #[test]
    fn counts_record_ends_into_the_openai_buckets() {
        let mut c = RequestCounts::new(4);
        for e in [ItemEnd::Succeeded, ItemEnd::Failed, ItemEnd::Cancelled, ItemEnd::Expired] {
            c.record(e);
        }
        assert_eq!((c.completed, c.failed, c.pending()), (1, 3, 0));
        assert_eq!(final_status(BatchStatus::Finalizing), Ok(BatchStatus::Completed));
        assert_eq!(final_status(BatchStatus::Cancelling), Ok(BatchStatus::Cancelled));
        assert!(final_status(BatchStatus::InProgress).is_err());
    }
}
