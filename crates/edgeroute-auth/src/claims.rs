//! The claims a verified token carries, and their strict decoding.
//!
//! Decoding is deliberately strict: every registered claim we use must have exactly the JSON type
//! the RFC gives it, so a malformed `exp` (a string, a float, a negative number, `null`) is an
//! error rather than an absent claim that silently skips the expiry check. Claims we do not use
//! are ignored. Time and audience rules are applied by the verifier, not here.

use serde::Deserialize;
use serde_json::Value;

use crate::error::AuthError;
use crate::scope::{Scope, Scopes};

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The subject: the tenant the request is billed and limited as. Never empty.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not-before, seconds since the Unix epoch.
    pub nbf: Option<u64>,
    /// Issued-at, seconds since the Unix epoch (informational; not checked).
    pub iat: Option<u64>,
    /// Audiences; a single-string `aud` becomes one element, an absent one an empty list.
    pub aud: Vec<String>,
    /// Issuer.
    pub iss: Option<String>,
    /// Known scopes from `scope` and `scp`, merged.
    pub scope: Scopes,
    /// Data residency: the jurisdictions (`jurisdictions`, e.g. `["eu"]`) the tenant's
    /// requests may be processed in. `None`: the token does not restrict; `Some(empty)`
    /// allows nothing. A node outside them refuses the request, whatever the client asked.
    pub jurisdictions: Option<Vec<String>>,
    /// Data residency by region (`regions`), as above.
    pub regions: Option<Vec<String>>,
    /// The other claims with a scalar value (a string, a boolean, an integer), as strings:
    /// what a routing policy's rules match on (`match.claims`, e.g. `plan = "premium"`). At
    /// most [`MAX_ATTRS`], each key at most [`MAX_ATTR_KEY`] bytes and value at most
    /// [`MAX_ATTR_VALUE`]; claims beyond those bounds, and arrays or objects, are left out
    /// (a rule then does not match), never an error.
    pub attrs: std::collections::BTreeMap<String, String>,
}

/// Most entries a residency claim may list.
pub const MAX_RESIDENCY_ENTRIES: usize = 64;
/// Most other claims kept in [`Claims::attrs`].
pub const MAX_ATTRS: usize = 32;
/// Longest claim name kept in [`Claims::attrs`], bytes.
pub const MAX_ATTR_KEY: usize = 64;
/// Longest claim value kept in [`Claims::attrs`], bytes.
pub const MAX_ATTR_VALUE: usize = 256;

/// The claims `Claims` reads for itself: never attributes.
const NAMED: &[&str] =
    &["sub", "exp", "nbf", "iat", "aud", "iss", "scope", "scp", "jurisdictions", "regions", "jti"];

impl Claims {
    /// The tenant this token authenticates (the `sub` claim).
    pub fn tenant(&self) -> &str {
        &self.sub
    }

    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scope.contains(scope)
    }

    /// `Ok` if the token grants `scope`, else [`AuthError::InsufficientScope`].
    pub fn require_scope(&self, scope: Scope) -> Result<(), AuthError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(AuthError::InsufficientScope { required: scope })
        }
    }

    /// Decodes a JWT payload (already base64url-decoded JSON).
    pub(crate) fn from_json(payload: &[u8]) -> Result<Claims, AuthError> {
        // Only the claims we use are named; serde rejects a duplicate of any of them, so an
        // issuer-side parser and ours cannot disagree about which `exp` counts.
        let raw: RawClaims = serde_json::from_slice(payload)
            .map_err(|_| AuthError::Malformed("claims are not a valid JSON object"))?;

        let sub = match raw.sub {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(AuthError::InvalidClaim("sub")),
        };
        let exp = match raw.exp {
            Some(v) => numeric_date(&v).ok_or(AuthError::InvalidClaim("exp"))?,
            None => return Err(AuthError::InvalidClaim("exp")),
        };
        let nbf = optional_numeric_date(raw.nbf, "nbf")?;
        let iat = optional_numeric_date(raw.iat, "iat")?;
        let aud = match raw.aud {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(AuthError::InvalidClaim("aud")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(AuthError::InvalidClaim("aud")),
        };
        let iss = match raw.iss {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(AuthError::InvalidClaim("iss")),
        };
        let mut scope = match raw.scope {
            None => Scopes::EMPTY,
            Some(Value::String(s)) => Scopes::parse(&s),
            Some(_) => return Err(AuthError::InvalidClaim("scope")),
        };
        match raw.scp {
            None => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let Value::String(name) = item else {
                        return Err(AuthError::InvalidClaim("scp"));
                    };
                    if let Some(s) = Scope::from_name(&name) {
                        scope.insert(s);
                    }
                }
            }
            // Some issuers emit `scp` as a single space-separated string.
            Some(Value::String(s)) => {
                for s in Scopes::parse(&s).iter() {
                    scope.insert(s);
                }
            }
            Some(_) => return Err(AuthError::InvalidClaim("scp")),
        }

        let jurisdictions = string_list(raw.jurisdictions, "jurisdictions")?;
        let regions = string_list(raw.regions, "regions")?;
        let attrs = attrs(payload)?;
        Ok(Claims { sub, exp, nbf, iat, aud, iss, scope, jurisdictions, regions, attrs })
    }
}

/// Whether `Claims` reads claim `name` for itself (it is never an attribute).
pub(crate) fn is_named(name: &str) -> bool {
    NAMED.contains(&name)
}

/// The payload's other scalar claims (see [`Claims::attrs`]). A claim named twice makes the
/// token malformed: a rule must not match on a value another parser would not have read.
fn attrs(payload: &[u8]) -> Result<std::collections::BTreeMap<String, String>, AuthError> {
    struct Pairs(Vec<(String, Value)>);
    impl<'de> Deserialize<'de> for Pairs {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Pairs;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Pairs, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, Value>()? {
                        out.push((k, v));
                    }
                    Ok(Pairs(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Pairs(mut pairs) = serde_json::from_slice(payload)
        .map_err(|_| AuthError::Malformed("claims are not a valid JSON object"))?;
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(AuthError::Malformed("a claim appears twice"));
    }
    Ok(pairs
        .into_iter()
        .filter(|(k, _)| !NAMED.contains(&k.as_str()) && !k.is_empty() && k.len() <= MAX_ATTR_KEY)
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                _ => return None,
            };
            (v.len() <= MAX_ATTR_VALUE).then_some((k, v))
        })
        .take(MAX_ATTRS)
        .collect())
}

/// The claims we read, each kept as raw JSON so that type errors can name the claim. `null`
/// deserializes to `None`, which is "absent": fine for optional claims, an error for `exp`/`sub`.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    aud: Option<Value>,
    iss: Option<Value>,
    scope: Option<Value>,
    scp: Option<Value>,
    jurisdictions: Option<Value>,
    regions: Option<Value>,
}

/// A residency claim: an array of 0–64 non-empty strings. Anything else (a bare string, a
/// number, a nested array) is an error, never "no restriction": a token meant to confine a
/// tenant must not be read as freeing it.
fn string_list(v: Option<Value>, name: &'static str) -> Result<Option<Vec<String>>, AuthError> {
    let Some(v) = v else { return Ok(None) };
    let Value::Array(items) = v else { return Err(AuthError::InvalidClaim(name)) };
    if items.len() > MAX_RESIDENCY_ENTRIES {
        return Err(AuthError::InvalidClaim(name));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s) if !s.is_empty() => Ok(s),
            _ => Err(AuthError::InvalidClaim(name)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A NumericDate restricted to non-negative integers. RFC 7519 allows fractions, but no issuer
/// we care about sends them, and accepting floats invites rounding games at the boundary.
fn numeric_date(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn optional_numeric_date(v: Option<Value>, name: &'static str) -> Result<Option<u64>, AuthError> {
    match v {
        None => Ok(None),
        Some(v) => numeric_date(&v).map(Some).ok_or(AuthError::InvalidClaim(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Claims, AuthError> {
        Claims::from_json(json.as_bytes())
    }

    #[test]
    fn accepts_full_claims() {
        let c = parse(
            r#"{"sub":"t1","exp":10,"nbf":1,"iat":1,"aud":["a","b"],"iss":"i",
                "scope":"inference","scp":["admin","other"],"jti":"x"}"#,
        )
        .unwrap();
        assert_eq!(c.sub, "t1");
        assert_eq!(c.exp, 10);
        assert_eq!(c.nbf, Some(1));
        assert_eq!(c.aud, vec!["a".to_owned(), "b".to_owned()]);
        assert!(c.has_scope(Scope::Inference) && c.has_scope(Scope::Admin));
    }

    #[test]
    fn other_scalar_claims_are_kept_for_routing_rules_within_bounds() {
        let long = "x".repeat(MAX_ATTR_VALUE + 1);
        let c = parse(&format!(
            r#"{{"sub":"t","exp":1,"plan":"premium","beta":true,"seats":12,"ratio":0.5,
                "groups":["a"],"org":{{"id":1}},"big":"{long}","iss":"i","jti":"j"}}"#
        ))
        .unwrap();
        let kept: Vec<(&str, &str)> = c.attrs.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(kept, [("beta", "true"), ("plan", "premium"), ("seats", "12")]);
        // A claim named twice is refused, whichever parser would have won.
        let dup = r#"{"sub":"t","exp":1,"plan":"basic","plan":"premium"}"#;
        assert!(matches!(parse(dup), Err(AuthError::Malformed(_))));
        let many: Vec<String> = (0..40).map(|i| format!(r#""c{i:02}":"v""#)).collect();
        let c = parse(&format!(r#"{{"sub":"t","exp":1,{}}}"#, many.join(","))).unwrap();
        assert_eq!(c.attrs.len(), MAX_ATTRS);
    }

    #[test]
    fn residency_claims_are_string_arrays_or_an_error() {
        let c = parse(r#"{"sub":"t","exp":1,"jurisdictions":["eu"],"regions":[]}"#).unwrap();
        assert_eq!(c.jurisdictions, Some(vec!["eu".to_owned()]));
        assert_eq!(c.regions, Some(vec![]), "an empty list allows nothing; it is kept");
        assert_eq!(parse(r#"{"sub":"t","exp":1}"#).unwrap().jurisdictions, None);
        for bad in [r#""eu""#, "null", "[1]", r#"[""]"#, r#"[["eu"]]"#, "{}"] {
            let json = format!(r#"{{"sub":"t","exp":1,"jurisdictions":{bad}}}"#);
            // `null` is absent for serde: no restriction, like a token without the claim.
            if bad == "null" {
                assert_eq!(parse(&json).unwrap().jurisdictions, None);
                continue;
            }
            assert!(matches!(parse(&json), Err(AuthError::InvalidClaim("jurisdictions"))), "{bad}");
        }
        let many = format!(r#"{{"sub":"t","exp":1,"regions":[{}]}}"#, vec![r#""r""#; 65].join(","));
        assert!(matches!(parse(&many), Err(AuthError::InvalidClaim("regions"))));
    }

    #[test]
    fn exp_must_be_a_non_negative_integer() {
        for exp in [r#""10""#, "10.0", "1.5", "-1", "null", "true", "[10]", "1e3"] {
            let err = parse(&format!(r#"{{"sub":"t","exp":{exp}}}"#)).unwrap_err();
            assert!(matches!(err, AuthError::InvalidClaim("exp")), "exp={exp}: {err:?}");
        }
        assert!(matches!(parse(r#"{"sub":"t"}"#), Err(AuthError::InvalidClaim("exp"))));
    }

    #[test]
    fn nbf_and_iat_are_strict_when_present() {
        assert!(matches!(
            parse(r#"{"sub":"t","exp":1,"nbf":"5"}"#),
            Err(AuthError::InvalidClaim("nbf"))
        ));
        assert!(matches!(
            parse(r#"{"sub":"t","exp":1,"iat":-5}"#),
            Err(AuthError::InvalidClaim("iat"))
        ));
    }

    #[test]
    fn sub_is_required_and_non_empty() {
        assert!(matches!(parse(r#"{"exp":1}"#), Err(AuthError::InvalidClaim("sub"))));
        assert!(matches!(parse(r#"{"sub":"","exp":1}"#), Err(AuthError::InvalidClaim("sub"))));
        assert!(matches!(parse(r#"{"sub":7,"exp":1}"#), Err(AuthError::InvalidClaim("sub"))));
    }

    #[test]
    fn duplicate_claims_are_rejected() {
        assert!(matches!(
            parse(r#"{"sub":"t","exp":1,"exp":99999999999}"#),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn aud_and_scope_shapes() {
        assert_eq!(parse(r#"{"sub":"t","exp":1,"aud":"x"}"#).unwrap().aud, vec!["x".to_owned()]);
        assert!(matches!(
            parse(r#"{"sub":"t","exp":1,"aud":[1]}"#),
            Err(AuthError::InvalidClaim("aud"))
        ));
        assert!(matches!(
            parse(r#"{"sub":"t","exp":1,"scope":["admin"]}"#),
            Err(AuthError::InvalidClaim("scope"))
        ));
        let c = parse(r#"{"sub":"t","exp":1,"scp":"admin inference"}"#).unwrap();
        assert_eq!(c.scope.to_string(), "inference admin");
        assert!(matches!(parse("[1,2]"), Err(AuthError::Malformed(_))));
    }
}
