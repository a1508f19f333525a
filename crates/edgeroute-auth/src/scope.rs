//! Scopes: what a token lets its holder do at the gateway.
//!
//! Tokens carry OAuth-style scopes, either as a space-separated `scope` string
//! (`"inference admin"`, RFC 8693 §4.2) or as a `scp` array of strings. Only the scopes the
//! gateway knows are kept; unknown ones are ignored so issuers can add scopes for other services
//! without breaking us. Scopes are independent: `admin` does not imply `inference`.

use std::fmt;

/// A permission the gateway checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Chat completions and the models list.
    Inference,
    /// Model loading (`/v1/models/load`) and `/admin/*`.
    Admin,
}

impl Scope {
    /// Every scope, in a stable order.
    pub const ALL: [Scope; 2] = [Scope::Inference, Scope::Admin];

    /// The wire name of the scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
        }
    }

    /// Parses a wire name; `None` for scopes the gateway does not know.
    pub fn from_name(name: &str) -> Option<Scope> {
        match name {
            "inference" => Some(Scope::Inference),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Inference => 1,
            Scope::Admin => 2,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of known scopes. Cheap to copy and to test on the hot path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// The empty set.
    pub const EMPTY: Scopes = Scopes(0);

    /// Parses an OAuth scope string (scope names separated by whitespace). Unknown names are
    /// ignored.
    pub fn parse(scope: &str) -> Scopes {
        scope.split_ascii_whitespace().filter_map(Scope::from_name).collect()
    }

    /// Adds a scope.
    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// Whether the set holds `scope`.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes in the set, in the order of [`Scope::ALL`].
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut set = Scopes::EMPTY;
        for scope in iter {
            set.insert(scope);
        }
        set
    }
}

impl From<Scope> for Scopes {
    fn from(scope: Scope) -> Self {
        Scopes(scope.bit())
    }
}

/// The OAuth wire form: names separated by single spaces, in a stable order.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for scope in self.iter() {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(scope.as_str())?;
            first = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_space_separated_and_ignores_unknown() {
        let s = Scopes::parse("  inference\tbilling  admin ");
        assert!(s.contains(Scope::Inference));
        assert!(s.contains(Scope::Admin));
        assert_eq!(s.to_string(), "inference admin");
        assert!(Scopes::parse("").is_empty());
        assert!(Scopes::parse("Admin inference:read").is_empty(), "names are case-sensitive");
    }

    #[test]
    fn admin_does_not_imply_inference() {
        let s = Scopes::parse("admin");
        assert!(s.contains(Scope::Admin));
        assert!(!s.contains(Scope::Inference));
    }
}
