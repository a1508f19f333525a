//! Property tests of the batch machine: arbitrary interleavings of claims, completions (some
//! with stale fencing tokens), lease lapses, cancels, expiry and worker crashes.

use super::*;
use crate::lifecycle::ItemError;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Claim {
        worker: usize,
    },
    /// The worker ends one of the leases it remembers (index modulo how many it holds).
    Complete {
        worker: usize,
        lease: usize,
        outcome: u8,
    },
    /// Someone presents an old token for an item.
    Stale {
        item: usize,
        behind: u64,
    },
    Advance {
        ms: u64,
    },
    Tick,
    Cancel,
    /// The worker loses everything it held (its leases stay until they lapse).
    Crash {
        worker: usize,
    },
    Finalize,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize).prop_map(|worker| Op::Claim { worker }),
        4 => (0..3usize, 0..8usize, 0..3u8)
            .prop_map(|(worker, lease, outcome)| Op::Complete { worker, lease, outcome }),
        1 => (0..8usize, 1..3u64).prop_map(|(item, behind)| Op::Stale { item, behind }),
        2 => (1..400u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Tick),
        1 => Just(Op::Cancel),
        1 => (0..3usize).prop_map(|worker| Op::Crash { worker }),
        1 => Just(Op::Finalize),
    ]
}

fn outcome(kind: u8) -> Outcome {
    match kind {
        0 => Outcome::Succeeded { status_code: 200, body: serde_json::json!({"ok": true}) },
        1 => Outcome::Failed(ItemError { code: "upstream".into(), message: "no".into() }),
        _ => Outcome::Aborted,
    }
}

const LEASE_MS: u64 = 300;

struct World {
    batch: Batch,
    now: UnixMs,
    held: [Vec<Claim>; 3],
    /// The last token handed out per item, seen from outside the machine.
    issued: Vec<u64>,
    /// Ends observed per item (by completion or by the machine's own rules).
    cancel_accepted: bool,
}

impl World {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Claim { worker } => {
                if let Some(c) = self.batch.claim(self.now, &format!("w{worker}"), LEASE_MS) {
                    assert!(c.fence > self.issued[c.item], "fencing tokens only rise");
                    self.issued[c.item] = c.fence;
                    self.held[*worker].push(c);
                }
            }
            Op::Complete { worker, lease, outcome: kind } => {
                let held = &mut self.held[*worker];
                if held.is_empty() {
                    return;
                }
                let c = held.remove(lease % held.len());
                let before = self.batch.items()[c.item].clone();
                let still_current = self.issued[c.item] == c.fence
                    && matches!(before.state, ItemState::Leased(ref l) if l.fence == c.fence);
                let counts = self.batch.counts();
                match self.batch.complete(c.item, c.fence, &outcome(*kind)) {
                    Ok(_) => assert!(still_current, "a superseded token completed {c:?}"),
                    Err(e) => {
                        assert!(!still_current, "a current token was refused: {e}");
                        assert_eq!(self.batch.items()[c.item].state, before.state);
                        assert_eq!(self.batch.counts(), counts);
                    }
                }
            }
            Op::Stale { item, behind } => {
                if *item >= self.batch.items().len() {
                    return;
                }
                let fence = self.issued[*item].saturating_sub(*behind);
                let before = self.batch.items()[*item].state.clone();
                let r = self.batch.complete(*item, fence, &outcome(0));
                assert!(r.is_err(), "token {fence} behind {} completed", self.issued[*item]);
                assert_eq!(self.batch.items()[*item].state, before);
            }
            Op::Advance { ms } => self.now += ms,
            Op::Tick => {
                self.batch.tick(self.now);
            }
            Op::Cancel => {
                if self.batch.cancel().is_ok() {
                    self.cancel_accepted = true;
                }
            }
            Op::Crash { worker } => self.held[*worker].clear(),
            Op::Finalize => {
                let _ = self.batch.finalize();
            }
        }
        let c = self.batch.counts();
        assert!(c.adds_up(), "{c:?}");
        let ended = self.batch.items().iter().filter(|i| matches!(i.state, ItemState::Ended(_)));
        assert_eq!(ended.count() as u64, c.completed + c.failed, "counts follow the items");
    }

    /// Runs the batch to a terminal status: the surviving worker finishes what it can, time
    /// passes until leases lapse.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.batch.status().is_terminal() {
                return;
            }
            self.batch.tick(self.now);
            if self.batch.ready_to_finalize() {
                self.batch.finalize().expect("ready batch finalizes");
                continue;
            }
            match self.batch.claim(self.now, "drainer", LEASE_MS) {
                Some(c) => {
                    self.batch.complete(c.item, c.fence, &outcome(0)).expect("fresh lease");
                }
                None => self.now += LEASE_MS,
            }
        }
        panic!("the batch never ended: {:?}", self.batch.status());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_item_ends_exactly_once_and_counts_add_up(
        n in 1..8usize,
        max_attempts in 1..4u32,
        window in prop_oneof![Just(u64::MAX / 4), 500..5_000u64],
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut w = World {
            batch: Batch::new(n, 0, window, max_attempts),
            now: 0,
            held: [Vec::new(), Vec::new(), Vec::new()],
            issued: vec![0; n],
            cancel_accepted: false,
        };
        for op in &ops {
            w.apply(op);
        }
        w.drain();
        let files = w.batch.files().expect("a terminal batch has its files").clone();
        let mut seen = vec![0u32; n];
        for &i in &files.output {
            seen[i] += 1;
        }
        for &(i, end) in &files.error {
            seen[i] += 1;
            prop_assert_ne!(end, ItemEnd::Succeeded);
        }
        prop_assert!(seen.iter().all(|&k| k == 1), "each item once: {:?}", seen);
        let c = w.batch.counts();
        prop_assert_eq!(c.completed as usize, files.output.len());
        prop_assert_eq!(c.failed as usize, files.error.len());
        prop_assert_eq!(c.completed + c.failed, c.total);
        if w.cancel_accepted {
            prop_assert_eq!(w.batch.status(), BatchStatus::Cancelled);
        } else {
            prop_assert!(
                matches!(w.batch.status(), BatchStatus::Completed | BatchStatus::Expired),
                "{:?}", w.batch.status()
            );
        }
        if w.batch.status() == BatchStatus::Cancelled {
            prop_assert!(!files.error.iter().any(|(_, e)| *e == ItemEnd::Expired));
        }
    }
}

#[test]
fn a_lapsed_lease_is_reclaimed_with_a_higher_token_and_the_old_holder_is_refused() {
    let mut b = Batch::new(1, 0, 10_000, 3);
    let first = b.claim(0, "a", 100).unwrap();
    assert_eq!(b.claim(50, "b", 100), None, "the lease holds");
    let second = b.claim(100, "b", 100).unwrap();
    assert!(second.fence > first.fence);
    let ok = outcome(0);
    assert_eq!(
        b.complete(0, first.fence, &ok),
        Err(CompleteError::StaleLease { item: 0, presented: first.fence })
    );
    assert!(b.complete(0, second.fence, &ok).unwrap().ready_to_finalize);
    assert_eq!(b.finalize().unwrap().output, vec![0]);
    assert_eq!(b.status(), BatchStatus::Completed);
}

#[test]
fn cancel_ends_queued_items_at_once_and_leased_ones_on_abort() {
    let mut b = Batch::new(3, 0, 10_000, 3);
    let c = b.claim(0, "a", 100).unwrap();
    let aborts = b.cancel().unwrap();
    assert_eq!(aborts, vec![Abort { item: c.item, worker: "a".into(), fence: c.fence }]);
    assert_eq!(b.status(), BatchStatus::Cancelling);
    assert_eq!(b.counts().failed, 2);
    assert_eq!(b.claim(0, "b", 100), None, "nothing is claimed while cancelling");
    assert!(b.complete(c.item, c.fence, &Outcome::Aborted).unwrap().ready_to_finalize);
    let files = b.finalize().unwrap().clone();
    assert_eq!(files.error.len(), 3);
    assert!(files.error.iter().all(|(_, e)| *e == ItemEnd::Cancelled));
    assert_eq!(b.status(), BatchStatus::Cancelled);
}

#[test]
fn expiry_ends_unfinished_items_expired_and_keeps_the_answers() {
    let mut b = Batch::new(3, 0, 1_000, 3);
    let c = b.claim(0, "a", 100).unwrap();
    b.complete(c.item, c.fence, &outcome(0)).unwrap();
    let held = b.claim(0, "a", 5_000).unwrap();
    assert!(b.tick(999).is_empty());
    let aborts = b.tick(1_000);
    assert_eq!(aborts.len(), 1);
    assert_eq!(b.status(), BatchStatus::Expired);
    assert!(b.complete(held.item, held.fence, &outcome(0)).is_err());
    let files = b.files().unwrap();
    assert_eq!(files.output, vec![0]);
    assert_eq!(files.error, vec![(1, ItemEnd::Expired), (2, ItemEnd::Expired)]);
}
