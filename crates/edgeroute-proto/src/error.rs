//! OpenAI's error JSON shape (`{"error":{"message","type","param","code"}}`) and the one
//! classification of an error every edge uses ([`Fault`]: which side failed, may it be retried).

use serde::{Deserialize, Serialize};

/// The body of every error response edgeroute sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(
        message: impl Into<String>,
        kind: impl Into<String>,
        param: Option<String>,
        code: Option<&str>,
    ) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param,
                code: code.map(str::to_owned),
            },
        }
    }
}

/// The response header in which an edgeroute server classifies its error:
/// `x-edgeroute-error: side=backend; retry=yes`.
pub const ERROR_HEADER: &str = "x-edgeroute-error";

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The request itself (a 4xx, an invalid body): retrying it unchanged cannot help.
    Caller,
    /// The server that answered (a node's gateway, a replica, a proxy): a 5xx it produced, or
    /// "full / leaving" (429, 503).
    Node,
    /// The inference backend behind a node: a malformed answer, an error event, a 502/504.
    Backend,
    /// The path to the server: refused, reset, timed out, silent.
    Network,
    /// The fleet as a whole: no node serves the model, every candidate failed, the retry
    /// budget is spent, discovery is unreachable.
    Fleet,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Caller => "caller",
            Side::Node => "node",
            Side::Backend => "backend",
            Side::Network => "network",
            Side::Fleet => "fleet",
        }
    }

    fn parse(s: &str) -> Option<Side> {
        [Side::Caller, Side::Node, Side::Backend, Side::Network, Side::Fleet]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One classified error (pingora's model): which side failed, and whether another attempt
/// (on another node, or later) may succeed. Servers say it in [`ERROR_HEADER`]; a peer that
/// does not (a third-party upstream) is classified by its status alone ([`Fault::of_status`]),
/// here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    pub side: Side,
    pub retry: bool,
}

impl Fault {
    pub const fn new(side: Side, retry: bool) -> Fault {
        Fault { side, retry }
    }

    /// What a status alone says: 429 and 503 are the server being full or leaving (another
    /// node may answer); 502 and 504 are the backend behind it; any other 4xx is the request;
    /// any other 5xx is the server.
    pub fn of_status(status: u16) -> Fault {
        match status {
            408 => Fault::new(Side::Network, true),
            429 | 503 => Fault::new(Side::Node, true),
            400..=499 => Fault::new(Side::Caller, false),
            502 | 504 => Fault::new(Side::Backend, true),
            500..=599 => Fault::new(Side::Node, true),
            _ => Fault::new(Side::Node, false),
        }
    }

    /// The value of [`ERROR_HEADER`]; `None` when it is not one this version understands.
    pub fn parse(value: &str) -> Option<Fault> {
        let (mut side, mut retry) = (None, None);
        for field in value.split(';') {
            let (k, v) = field.split_once('=')?;
            match (k.trim(), v.trim()) {
                ("side", v) => side = Some(Side::parse(v)?),
                ("retry", "yes") => retry = Some(true),
                ("retry", "no") => retry = Some(false),
                _ => {} // fields from later versions
            }
        }
        Some(Fault { side: side?, retry: retry? })
    }

    /// The classification of an answer: the server's own word when it gave it, else its
    /// status's.
    pub fn of_answer(status: u16, header: Option<&str>) -> Fault {
        header.and_then(Fault::parse).unwrap_or_else(|| Fault::of_status(status))
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "side={}; retry={}", self.side, if self.retry { "yes" } else { "no" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_survives_its_header_and_a_bad_header_falls_back_to_the_status() {
        for side in [Side::Caller, Side::Node, Side::Backend, Side::Network, Side::Fleet] {
            for retry in [true, false] {
                let f = Fault::new(side, retry);
                assert_eq!(Fault::parse(&f.to_string()), Some(f));
            }
        }
        assert_eq!(
            Fault::parse("side=backend; retry=yes; later=1"),
            Some(Fault::new(Side::Backend, true))
        );
        for bad in
            ["", "side=moon; retry=yes", "side=node", "retry=yes", "side=node; retry=maybe", "x"]
        {
            assert_eq!(Fault::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Fault::of_answer(502, Some("side=node; retry=no")),
            Fault::new(Side::Node, false)
        );
        assert_eq!(Fault::of_answer(502, Some("garbage")), Fault::new(Side::Backend, true));
    }

    #[test]
    fn statuses_alone_say_who_failed() {
        let f = |s| Fault::of_status(s);
        assert_eq!(f(400), Fault::new(Side::Caller, false));
        assert_eq!(f(404), Fault::new(Side::Caller, false));
        assert_eq!(f(429), Fault::new(Side::Node, true));
        assert_eq!(f(503), Fault::new(Side::Node, true));
        assert_eq!(f(500), Fault::new(Side::Node, true));
        assert_eq!(f(502), Fault::new(Side::Backend, true));
        assert_eq!(f(504), Fault::new(Side::Backend, true));
        assert_eq!(f(408), Fault::new(Side::Network, true));
    }
}
