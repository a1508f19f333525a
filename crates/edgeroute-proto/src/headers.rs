//! The compact headers a node attaches to every response.
//!
//! - `x-edgeroute-node: van-1` names the node that answered.
//! - `x-edgeroute-load: q=2;f=5;c=16;t=41` is the load report (queue depth, in-flight,
//!   capacity, recent TTFT p50 in ms), so clients learn load without probing (like gRPC ORCA).
//! - `x-edgeroute-migrate: reason=drain; deadline_ms=30000; to=tor-2` asks the client to move
//!   its session before the node stops serving it.
//! - `x-edgeroute-model-version: v2` names the registry version of the model that answered.

use std::fmt;

pub const NODE_HEADER: &str = "x-edgeroute-node";
pub const LOAD_HEADER: &str = "x-edgeroute-load";
pub const MIGRATE_HEADER: &str = "x-edgeroute-migrate";
/// The registry version of the model that answered, when the node's load named one.
pub const MODEL_VERSION_HEADER: &str = "x-edgeroute-model-version";
/// Optional request header naming the client's session; a draining node keeps serving known
/// sessions until its deadline while refusing new ones.
pub const SESSION_HEADER: &str = "x-edgeroute-session";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHeaderError {
    #[error("header field `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("header field `{0}` has an invalid number")]
    BadNumber(String),
    #[error("header misses required field `{0}`")]
    Missing(&'static str),
}

/// Load as the node sees it at the moment it answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests waiting for a backend slot.
    pub queue_depth: u32,
    /// Requests admitted and not finished.
    pub in_flight: u32,
    /// Concurrent requests the node admits before shedding.
    pub capacity: u32,
    /// Recent time-to-first-token p50, milliseconds.
    pub ttft_ms: u32,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "q={};f={};c={};t={}",
            self.queue_depth, self.in_flight, self.capacity, self.ttft_ms
        )
    }
}

fn fields(s: &str) -> impl Iterator<Item = Result<(&str, &str), ParseHeaderError>> {
    s.split(';').map(str::trim).filter(|f| !f.is_empty()).map(|f| {
        f.split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| ParseHeaderError::NotKeyValue(f.to_owned()))
    })
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, ParseHeaderError> {
    v.parse().map_err(|_| ParseHeaderError::BadNumber(k.to_owned()))
}

impl std::str::FromStr for LoadReport {
    type Err = ParseHeaderError;
    /// Unknown keys are ignored so the format can grow without breaking older clients.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut r = LoadReport::default();
        for kv in fields(s) {
            let (k, v) = kv?;
            match k {
                "q" => r.queue_depth = num(k, v)?,
                "f" => r.in_flight = num(k, v)?,
                "c" => r.capacity = num(k, v)?,
                "t" => r.ttft_ms = num(k, v)?,
                _ => {}
            }
        }
        Ok(r)
    }
}

/// Why a node asks clients to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateHint {
    /// `drain`, `overload`, `shutdown`, or an operator's word.
    pub reason: String,
    /// Milliseconds until the node stops serving the session.
    pub deadline_ms: u64,
    /// A node the operator suggests instead.
    pub to: Option<String>,
    /// The hint concerns this model only (`reason=unload`): the node keeps serving others.
    pub model: Option<String>,
}

impl fmt::Display for MigrateHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reason={}; deadline_ms={}", self.reason, self.deadline_ms)?;
        if let Some(to) = &self.to {
            write!(f, "; to={to}")?;
        }
        if let Some(model) = &self.model {
            write!(f, "; model={model}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for MigrateHint {
    type Err = ParseHeaderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut reason, mut deadline_ms, mut to, mut model) = (None, None, None, None);
        for kv in fields(s) {
            let (k, v) = kv?;
            match k {
                "reason" => reason = Some(v.to_owned()),
                "deadline_ms" => deadline_ms = Some(num(k, v)?),
                "to" => to = Some(v.to_owned()),
                "model" => model = Some(v.to_owned()),
                _ => {}
            }
        }
        Ok(MigrateHint {
            reason: reason.ok_or(ParseHeaderError::Missing("reason"))?,
            deadline_ms: deadline_ms.ok_or(ParseHeaderError::Missing("deadline_ms"))?,
            to,
            model,
        })
    }
}

/// True when `s` can be put in a hint field without breaking the `k=v; ...` grammar.
pub fn is_hint_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn migrate_hint_matches_the_brief() {
        let h: MigrateHint = "reason=drain; deadline_ms=30000; to=tor-2".parse().unwrap();
        assert_eq!(
            h,
            MigrateHint {
                reason: "drain".into(),
                deadline_ms: 30000,
                to: Some("tor-2".into()),
                model: None
            }
        );
        assert_eq!(h.to_string(), "reason=drain; deadline_ms=30000; to=tor-2");
        assert_eq!(
            "deadline_ms=1".parse::<MigrateHint>(),
            Err(ParseHeaderError::Missing("reason"))
        );
        assert!("reason=x; deadline_ms=-1".parse::<MigrateHint>().is_err());
    }

    #[test]
    fn load_report_ignores_unknown_keys_and_rejects_garbage() {
        let r: LoadReport = "q=1;f=2;c=3;t=4;z=9".parse().unwrap();
        assert_eq!(r, LoadReport { queue_depth: 1, in_flight: 2, capacity: 3, ttft_ms: 4 });
        assert!("q=x".parse::<LoadReport>().is_err());
        assert!("q".parse::<LoadReport>().is_err());
    }

    proptest! {
        #[test]
        fn load_report_round_trips(q: u32, f: u32, c: u32, t: u32) {
            let r = LoadReport { queue_depth: q, in_flight: f, capacity: c, ttft_ms: t };
            prop_assert_eq!(r.to_string().parse::<LoadReport>().unwrap(), r);
        }

        #[test]
        fn migrate_hint_round_trips(reason in "[a-z_]{1,12}", d: u64, to in proptest::option::of("[a-z0-9-]{1,12}"), model in proptest::option::of("[a-z0-9.:-]{1,16}")) {
            let h = MigrateHint { reason, deadline_ms: d, to, model };
            prop_assert_eq!(h.to_string().parse::<MigrateHint>().unwrap(), h);
        }

        #[test]
        fn parsers_never_panic(s in ".{0,64}") {
            let _ = s.parse::<LoadReport>();
            let _ = s.parse::<MigrateHint>();
        }
    }
}
