//! `edgeroute token`: mint a JWT from a key file, or print a JWKS entry for a public key.
//! Signing and JWK encoding are `edgeroute-auth`'s; this reads the files and the clock.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};

use crate::cli::read;

#[derive(Subcommand, Debug)]
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
        #[arg(long)]
        aud: Option<String>,
        #[arg(long)]
        iss: Option<String>,
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
        TokenCommand::Mint { secret_file, key_file, alg, kid, sub, scope, ttl, aud, iss } => {
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
            let now = edgeroute_core::clock::unix_ms() / 1000;
            let options =
                MintOptions { sub, scopes, aud, iss, ttl_s: ttl, now_unix_s: now, kid, nbf: None };
            println!("{}", edgeroute_auth::mint(&key, &options)?);
        }
        TokenCommand::Jwk { public_key, kid } => {
            let jwk = edgeroute_auth::jwk_from_public_pem(&read(&public_key)?, &kid)?;
            println!("{}", serde_json::to_string_pretty(&jwk)?);
        }
    }
    Ok(())
}
