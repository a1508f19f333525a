//! One batch as an in-memory state machine over [`crate::lifecycle`]'s rules: claims with
//! leases and fencing tokens, completions, lapses, cancel, expiry and finalizing. It is the
//! executable specification the stores follow (the conformance suite compares them with it)
//! and what the property tests drive through arbitrary interleavings.
//!
//! Invariants (property-tested in `batch/tests.rs`):
//! - every item ends exactly once, in the output file or the error file, keyed by its index;
//! - request counts always add up, and equal what the items say;
//! - a completion whose fencing token is not the item's current one never changes anything;
//! - a batch reaches a terminal status only when every item has ended; a batch whose cancel
//!   was persisted ends `cancelled`, whatever raced with it.

use crate::lifecycle::{
    self, BatchStatus, IllegalTransition, ItemEnd, ItemState, Lapse, LeaseInfo, Outcome,
    RequestCounts, Settle, UnixMs,
};

/// A claimed item: what the worker must present to end it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The item's index in the batch.
    pub item: usize,
    /// The fencing token of this lease.
    pub fence: u64,
    /// When the lease lapses.
    pub expires_at: UnixMs,
}

/// An in-flight item to abort (the batch is cancelling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// The item's index.
    pub item: usize,
    /// The worker holding it.
    pub worker: String,
    /// Its current fencing token.
    pub fence: u64,
}

/// Why a completion was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    /// The item is not leased under this token any more: another worker claimed it after the
    /// lease lapsed, or it ended (cancel, expiry, an earlier completion).
    #[error("stale lease on item {item}: fencing token {presented} is not the current one")]
    StaleLease {
        /// The item.
        item: usize,
        /// The token the worker presented.
        presented: u64,
    },
    /// No such item.
    #[error("no item {0} in this batch")]
    NoSuchItem(usize),
}

/// What a completion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// How the item settled.
    pub settle: Settle,
    /// Whether the batch now waits for [`Batch::finalize`].
    pub ready_to_finalize: bool,
}

/// One item of the machine.
#[derive(Clone, Debug)]
pub struct Item {
    /// Where it stands.
    pub state: ItemState,
    /// The last fencing token handed out for it (0: never claimed).
    pub fence: u64,
    /// Claims so far.
    pub attempts: u32,
}

/// The result files, as item indices in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files {
    /// Items in the output file.
    pub output: Vec<usize>,
    /// Items in the error file, with how they ended.
    pub error: Vec<(usize, ItemEnd)>,
}

/// A batch in memory.
#[derive(Clone, Debug)]
pub struct Batch {
    status: BatchStatus,
    created_at: UnixMs,
    completion_window_ms: u64,
    max_attempts: u32,
    items: Vec<Item>,
    counts: RequestCounts,
    files: Option<Files>,
}

impl Batch {
    /// A validated batch of `n` items, in progress.
    pub fn new(n: usize, created_at: UnixMs, completion_window_ms: u64, max_attempts: u32) -> Self {
        let items = (0..n).map(|_| Item { state: ItemState::Queued, fence: 0, attempts: 0 });
        Batch {
            status: BatchStatus::InProgress,
            created_at,
            completion_window_ms,
            max_attempts: max_attempts.max(1),
            items: items.collect(),
            counts: RequestCounts::new(n as u64),
            files: None,
        }
    }

    /// Its status.
    pub fn status(&self) -> BatchStatus {
        self.status
    }

    /// Its request counts.
    pub fn counts(&self) -> RequestCounts {
        self.counts
    }

    /// Its items.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The files, once finalized.
    pub fn files(&self) -> Option<&Files> {
        self.files.as_ref()
    }

    /// Hands the first claimable item (queued, or leased with a lapsed lease) to `worker`
    /// with a new fencing token. Lapsed leases are applied first (see [`Batch::tick`]).
    pub fn claim(&mut self, now: UnixMs, worker: &str, lease_ms: u64) -> Option<Claim> {
        if !self.status.accepts_claims() {
            return None;
        }
        self.lapse_leases(now);
        if !self.status.accepts_claims() {
            return None;
        }
        let (index, item) = self.items.iter_mut().enumerate().find(|(_, it)| {
            matches!(it.state, ItemState::Queued)
                || matches!(&it.state, ItemState::Leased(l) if l.expires_at <= now)
        })?;
        item.fence += 1;
        item.attempts += 1;
        let expires_at = now.saturating_add(lease_ms);
        item.state = ItemState::Leased(LeaseInfo {
            worker: worker.to_owned(),
            fence: item.fence,
            expires_at,
        });
        Some(Claim { item: index, fence: item.fence, expires_at })
    }

    /// Ends (or gives back) a leased item, if `fence` is still its token.
    pub fn complete(
        &mut self,
        item: usize,
        fence: u64,
        outcome: &Outcome,
    ) -> Result<Completed, CompleteError> {
        let status = self.status;
        let it = self.items.get_mut(item).ok_or(CompleteError::NoSuchItem(item))?;
        match &it.state {
            ItemState::Leased(l) if l.fence == fence => {}
            _ => return Err(CompleteError::StaleLease { item, presented: fence }),
        }
        let settle = lifecycle::settle(status, outcome);
        match settle {
            Settle::Requeue => it.state = ItemState::Queued,
            Settle::End(end) => self.end(item, end),
        }
        Ok(Completed { settle, ready_to_finalize: self.ready_to_finalize() })
    }

    /// Persists a cancel: queued items end cancelled at once; the leased ones are returned to
    /// be aborted and end cancelled when their worker reports the abort or their lease lapses.
    /// Cancelling twice returns the in-flight items again (an abort message may have been
    /// lost).
    pub fn cancel(&mut self) -> Result<Vec<Abort>, IllegalTransition> {
        let (next, _new) = lifecycle::cancel(self.status)?;
        self.status = next;
        for i in 0..self.items.len() {
            if matches!(self.items[i].state, ItemState::Queued) {
                self.end(i, ItemEnd::Cancelled);
            }
        }
        Ok(self.in_flight())
    }

    /// Applies time: lapsed leases (cancelled in a cancelling batch, failed when attempts are
    /// spent, else claimable again) and expiry (every unfinished item ends expired and the
    /// batch is finalized as expired). Returns the in-flight items to abort on expiry.
    pub fn tick(&mut self, now: UnixMs) -> Vec<Abort> {
        self.lapse_leases(now);
        if lifecycle::is_expired(self.status, self.created_at, self.completion_window_ms, now) {
            let aborts = self.in_flight();
            // Expiry is decided and written in one step: in_progress → expired, then every
            // unfinished item ends expired (the status is already terminal, so none of them
            // moves it to finalizing), then the files.
            if let Ok(s) = self.status.become_(BatchStatus::Expired) {
                self.status = s;
                for i in 0..self.items.len() {
                    if !matches!(self.items[i].state, ItemState::Ended(_)) {
                        self.end(i, ItemEnd::Expired);
                    }
                }
                self.files = Some(self.render());
            }
            return aborts;
        }
        Vec::new()
    }

    /// Whether every item has ended and the files are due.
    pub fn ready_to_finalize(&self) -> bool {
        lifecycle::ready_to_finalize(self.status, &self.counts)
    }

    /// Writes the files and takes the terminal status (completed, or cancelled after a
    /// cancel).
    pub fn finalize(&mut self) -> Result<&Files, IllegalTransition> {
        if !self.ready_to_finalize() {
            return Err(IllegalTransition { from: self.status, to: BatchStatus::Completed });
        }
        self.status = lifecycle::final_status(self.status)?;
        Ok(self.files.insert(self.render()))
    }

    fn render(&self) -> Files {
        let mut files = Files { output: Vec::new(), error: Vec::new() };
        for (i, it) in self.items.iter().enumerate() {
            if let ItemState::Ended(end) = it.state {
                match end {
                    ItemEnd::Succeeded => files.output.push(i),
                    other => files.error.push((i, other)),
                }
            }
        }
        files
    }

    fn in_flight(&self) -> Vec<Abort> {
        let leased = self.items.iter().enumerate().filter_map(|(i, it)| match &it.state {
            ItemState::Leased(l) => {
                Some(Abort { item: i, worker: l.worker.clone(), fence: l.fence })
            }
            _ => None,
        });
        leased.collect()
    }

    fn lapse_leases(&mut self, now: UnixMs) {
        for i in 0..self.items.len() {
            let it = &self.items[i];
            let ItemState::Leased(l) = &it.state else { continue };
            if l.expires_at > now {
                continue;
            }
            match lifecycle::lapse(self.status, it.attempts, self.max_attempts) {
                Lapse::Reclaimable => {}
                Lapse::End(end) => self.end(i, end),
            }
        }
    }

    fn end(&mut self, item: usize, end: ItemEnd) {
        self.items[item].state = ItemState::Ended(end);
        self.counts.record(end);
        if let Some(next) = lifecycle::after_item_end(self.status, &self.counts) {
            self.status = next;
        }
    }
}

#[cfg(test)]
mod tests;
