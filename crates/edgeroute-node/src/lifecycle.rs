//! Serving, draining, shutting down: which requests a node admits, and the migrate hint it
//! attaches.
//!
//! The decision is a pure function of the phase, the clock and the request's session, so
//! every branch is unit-tested without a server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use edgeroute_proto::MigrateHint;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Refusing new sessions; known sessions are served until `until`.
    Draining {
        reason: String,
        to: Option<String>,
        until: Duration,
    },
    /// Stopping: nothing new is admitted.
    ShuttingDown {
        until: Duration,
    },
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Serve it; attach the hint (if any) so the client moves between turns.
    Admit(Option<MigrateHint>),
    /// Refuse with 503 and the hint.
    Refuse { code: &'static str, hint: MigrateHint },
}

impl Phase {
    /// The hint every response carries in this phase.
    pub fn hint(&self, now: Duration) -> Option<MigrateHint> {
        match self {
            Phase::Serving => None,
            Phase::Draining { reason, to, until } => Some(hint(reason, to.clone(), *until, now)),
            Phase::ShuttingDown { until } => Some(hint("shutdown", None, *until, now)),
        }
    }

    pub fn admit(&self, now: Duration, known_session: bool) -> Admission {
        match self {
            Phase::Serving => Admission::Admit(None),
            Phase::Draining { reason, to, until } => {
                let hint = hint(reason, to.clone(), *until, now);
                if known_session && now < *until {
                    Admission::Admit(Some(hint))
                } else {
                    Admission::Refuse { code: "node_draining", hint }
                }
            }
            Phase::ShuttingDown { until } => Admission::Refuse {
                code: "node_shutting_down",
                hint: hint("shutdown", None, *until, now),
            },
        }
    }
}

fn hint(reason: &str, to: Option<String>, until: Duration, now: Duration) -> MigrateHint {
    MigrateHint {
        reason: reason.to_owned(),
        deadline_ms: until.saturating_sub(now).as_millis() as u64,
        to,
        model: None,
    }
}

/// Sessions the node has served recently, so a drain refuses new sessions but lets known
/// ones finish their turn. Bounded: when full and nothing has expired, new sessions are not
/// remembered (they would then be refused during a drain, which is the safe side).
#[derive(Debug)]
pub struct Sessions {
    seen: Mutex<HashMap<String, Duration>>,
    max: usize,
    ttl: Duration,
}

impl Sessions {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Sessions { seen: Mutex::new(HashMap::new()), max, ttl }
    }

    pub fn is_known(&self, id: &str, now: Duration) -> bool {
        self.seen.lock().is_ok_and(|m| m.get(id).is_some_and(|&t| now.saturating_sub(t) < self.ttl))
    }

    pub fn touch(&self, id: &str, now: Duration) {
        let Ok(mut m) = self.seen.lock() else { return };
        if let Some(t) = m.get_mut(id) {
            *t = now;
            return;
        }
        if m.len() >= self.max {
            let ttl = self.ttl;
            m.retain(|_, t| now.saturating_sub(*t) < ttl);
            if m.len() >= self.max {
                return;
            }
        }
        m.insert(id.to_owned(), now);
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn serving_admits_without_hint() {
        assert_eq!(Phase::Serving.admit(S(1), false), Admission::Admit(None));
    }

    #[test]
    fn draining_serves_known_sessions_until_deadline_only() {
        let p = Phase::Draining { reason: "drain".into(), to: Some("tor-2".into()), until: S(30) };
        let Admission::Admit(Some(h)) = p.admit(S(10), true) else {
            panic!("known session refused")
        };
        assert_eq!(
            h,
            MigrateHint {
                reason: "drain".into(),
                deadline_ms: 20_000,
                to: Some("tor-2".into()),
                model: None
            }
        );
        assert!(matches!(p.admit(S(10), false), Admission::Refuse { code: "node_draining", .. }));
        let Admission::Refuse { hint, .. } = p.admit(S(31), true) else {
            panic!("served past deadline")
        };
        assert_eq!(hint.deadline_ms, 0);
    }

    #[test]
    fn shutting_down_refuses_everything() {
        let p = Phase::ShuttingDown { until: S(5) };
        assert!(matches!(
            p.admit(S(1), true),
            Admission::Refuse { code: "node_shutting_down", .. }
        ));
        assert_eq!(p.hint(S(1)).unwrap().reason, "shutdown");
    }

    #[test]
    fn sessions_expire_and_stay_bounded() {
        let s = Sessions::new(2, S(10));
        s.touch("a", S(0));
        s.touch("b", S(1));
        s.touch("c", S(2)); // full, nothing expired: not remembered
        assert!(s.is_known("a", S(5)) && s.is_known("b", S(5)) && !s.is_known("c", S(5)));
        assert!(!s.is_known("a", S(10)));
        s.touch("c", S(11)); // a and b are expired and purged to make room
        assert!(s.is_known("c", S(11)));
        assert_eq!(s.len(), 1);
    }
}
