//! Names that travel everywhere. A node id or a region appears in URLs, headers (load reports,
//! migrate hints), NATS subjects (where `.`, `*`, `>` and whitespace mean something), metric
//! labels and logs, so one rule decides them for the node, discovery and the bus alike.

/// The longest node id or region.
pub const MAX_NAME: usize = 64;

/// What a name may hold, for messages: "1-64 characters of [A-Za-z0-9_-]".
pub const NAME_RULE: &str = "1-64 characters of [A-Za-z0-9_-]";

/// A token safe in a NATS subject: non-empty, `[A-Za-z0-9_-]` only.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A node id or a region: a token of at most [`MAX_NAME`] bytes.
pub fn is_name(s: &str) -> bool {
    s.len() <= MAX_NAME && is_token(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_ids_and_regions() {
        for ok in ["tor-1", "us_east", "A9"] {
            assert!(is_name(ok), "{ok}");
        }
        for bad in ["", "a.b", "a:b", "a b", "a*", "a>", "é", &"x".repeat(65)] {
            assert!(!is_name(bad), "{bad:?}");
        }
        assert!(is_token(&"x".repeat(200)), "tokens are not length-bound");
    }
}
