//! `edgeroute token`: mint a JWT from a key file, or print a JWKS entry for a public key.
//! Signing and JWK encoding are `edgeroute-auth`'s; this reads the files and the clock.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};

use crate::cli::read;

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // Parsed once per process.
pub enum TokenCommand {
    /// Print a signed JWT on stdout.
    Mint {
        /// HS256 shared secret file (as configured in the node's `auth.hs256_secret_file`).
        #[arg(long, conflicts_with = "key_file")]
        secret_file: Option<PathBuf>,
        /// PKCS#8 PEM private key for RS256 or EdDSA.
        #[arg(long, requires = "kid")]
        key_file: Option<PathBuf>,
        /// Algorithm of `--key-file`.
        #[arg(long, value_parser = ["rs256", "eddsa"], default_value = "eddsa")]
        alg: String,
        /// Key id, as in the node's JWKS file.
        #[arg(long)]
        kid: Option<String>,
        /// Tenant.
        #[arg(long)]
        sub: String,
        /// Space-separated scopes: `inference`, `admin`.
        #[arg(long, default_value = "inference")]
        scope: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Audience (`aud`). For an admin token, prefer --node, --region or --fleet.
        #[arg(long, conflicts_with_all = ["node", "region", "fleet"])]
        aud: Option<String>,
        /// Admin token valid on this node only (`aud` = `edgeroute:node:ID`).
        #[arg(long, value_name = "ID", conflicts_with_all = ["region", "fleet"])]
        node: Option<String>,
        /// Admin token valid on every node of this region (`aud` = `edgeroute:region:R`).
        #[arg(long, value_name = "R", conflicts_with = "fleet")]
        region: Option<String>,
        /// Admin token valid on every node (`aud` = `edgeroute:fleet`).
        #[arg(long)]
        fleet: bool,
        #[arg(long)]
        iss: Option<String>,
        /// Data residency: the jurisdictions this tenant's requests may be processed in
        /// (`jurisdictions` claim; nodes of any other jurisdiction refuse them), comma-separated.
        #[arg(long, value_name = "J,...", value_delimiter = ',')]
        jurisdictions: Option<Vec<String>>,
        /// Data residency by region (`regions` claim), comma-separated.
        #[arg(long = "allowed-regions", value_name = "R,...", value_delimiter = ',')]
        allowed_regions: Option<Vec<String>>,
        /// Another claim, which routing rules may match on (`match.claims`), e.g.
        /// `--claim plan=premium`; repeatable.
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
    /// Print a JWKS entry for a public key PEM.
    Jwk {
        #[arg(long)]
        public_key: PathBuf,
        #[arg(long)]
        kid: String,
    },
}

pub fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Mint {
            secret_file,
            key_file,
            alg,
            kid,
            sub,
            scope,
            ttl,
            aud,
            node,
            region,
            fleet,
            iss,
            jurisdictions,
            allowed_regions,
            claims,
        } => {
            let key = match (secret_file, key_file) {
                (Some(f), None) => {
                    let mut secret =
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                    // Same trimming as the verifier: one trailing newline.
                    if secret.ends_with(b"\n") {
                        secret.pop();
                        if secret.ends_with(b"\r") {
                            secret.pop();
                        }
                    }
                    SigningKey::Hs256(secret)
                }
                (None, Some(f)) if alg == "rs256" => SigningKey::Rs256 { pem: read(&f)? },
                (None, Some(f)) => SigningKey::EdDsa { pem: read(&f)? },
                _ => bail!("give --secret-file (HS256) or --key-file with --kid (RS256/EdDSA)"),
            };
            let mut scopes = Scopes::default();
            for s in scope.split_whitespace() {
                scopes.insert(
                    Scope::from_name(s).with_context(|| {
                        format!("unknown scope `{s}` (known: inference, admin)")
                    })?,
                );
            }
            let aud = admin_audience(scopes, aud, node, region, fleet)?;
            let now = edgeroute_core::clock::unix_ms() / 1000;
            let residency = (jurisdictions.is_some() || allowed_regions.is_some())
                .then_some(edgeroute_auth::Residency { jurisdictions, regions: allowed_regions });
            let options = MintOptions {
                sub,
                scopes,
                aud,
                iss,
                ttl_s: ttl,
                now_unix_s: now,
                kid,
                nbf: None,
                residency,
                claims: claims.into_iter().collect(),
            };
            println!("{}", edgeroute_auth::mint(&key, &options)?);
        }
        TokenCommand::Jwk { public_key, kid } => {
            let jwk = edgeroute_auth::jwk_from_public_pem(&read(&public_key)?, &kid)?;
            println!("{}", serde_json::to_string_pretty(&jwk)?);
        }
    }
    Ok(())
}

/// `KEY=VALUE` of `--claim`.
fn parse_claim(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}`: give KEY=VALUE")),
    }
}

/// The `aud` of a minted token. An admin token must name where it is valid (`--node`,
/// `--region`, `--fleet`, or an `edgeroute:` audience given with `--aud`): nodes refuse any
/// other. Those flags are for admin tokens only.
fn admin_audience(
    scopes: Scopes,
    aud: Option<String>,
    node: Option<String>,
    region: Option<String>,
    fleet: bool,
) -> Result<Option<String>> {
    use edgeroute_auth::admin;
    let place = match (node, region, fleet) {
        (Some(n), _, _) => Some(admin::node_audience(&n)),
        (_, Some(r), _) => Some(admin::region_audience(&r)),
        (_, _, true) => Some(admin::FLEET_AUDIENCE.to_owned()),
        _ => None,
    };
    let admin_scope = scopes.contains(Scope::Admin);
    match (place, aud) {
        (Some(_), _) if !admin_scope => {
            bail!("--node, --region and --fleet scope admin tokens: add `admin` to --scope")
        }
        (Some(p), _) => Ok(Some(p)),
        (None, Some(a)) if admin_scope && !admin::is_admin_audience(&a) => bail!(
            "an admin token must name where it is valid: --node ID, --region R or --fleet \
             (`{a}` is not an edgeroute:node|region|fleet audience)"
        ),
        (None, a) if admin_scope && a.is_none() => {
            bail!("an admin token must name where it is valid: --node ID, --region R or --fleet")
        }
        (None, a) => Ok(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_key_equals_value() {
        assert_eq!(parse_claim("plan=premium").unwrap(), ("plan".into(), "premium".into()));
        assert_eq!(parse_claim("note=a=b").unwrap(), ("note".into(), "a=b".into()));
        assert!(parse_claim("=x").is_err() && parse_claim("plan").is_err());
    }

    #[test]
    fn admin_tokens_name_where_they_are_valid() {
        let admin = Scopes::from(Scope::Admin);
        let inference = Scopes::from(Scope::Inference);
        let aud = |s, a: Option<&str>, n: Option<&str>, r: Option<&str>, f| {
            admin_audience(s, a.map(Into::into), n.map(Into::into), r.map(Into::into), f)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            aud(admin, None, Some("tor-1"), None, false).unwrap().unwrap(),
            "edgeroute:node:tor-1"
        );
        assert_eq!(
            aud(admin, None, None, Some("toronto"), false).unwrap().unwrap(),
            "edgeroute:region:toronto"
        );
        assert_eq!(aud(admin, None, None, None, true).unwrap().unwrap(), "edgeroute:fleet");
        assert_eq!(
            aud(admin, Some("edgeroute:fleet"), None, None, false).unwrap().unwrap(),
            "edgeroute:fleet"
        );
        assert!(aud(admin, None, None, None, false).unwrap_err().contains("--fleet"));
        assert!(aud(admin, Some("api"), None, None, false).is_err());
        assert!(aud(inference, None, None, None, true).unwrap_err().contains("admin"));
        assert_eq!(aud(inference, Some("api"), None, None, false).unwrap().as_deref(), Some("api"));
        assert_eq!(aud(inference, None, None, None, false).unwrap(), None);
    }
}
