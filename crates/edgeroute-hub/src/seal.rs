//! Seals: a model directory's signed, hash-pinned list of its own files.
//!
//! Whoever can write to a shared model volume must not be able to get a model loaded on the
//! GPU side. The node's installer (or an operator's pipeline, `edgeroute model seal`) writes
//! [`SEAL_FILE`] into the directory it produced: a compact JWS (EdDSA, with a `kid`) whose
//! claims list EVERY regular file of the directory with its size and SHA-256. The watcher
//! (`edgeroute watch`) installs a directory only if its seal verifies under a trusted public
//! key and the directory holds exactly the files listed, byte for byte: a file added, removed,
//! or changed after sealing (even at the same size), a symlink, a FIFO, or a seal signed by an
//! unknown key is refused, each with a [`SealError`] that names the path and the reason.
//!
//! The seal also names the model (`model`): a sealed directory copied under another name is
//! refused by the watcher, so a signed `tts-small` cannot be replayed as `tts-large`.
//!
//! Everything here is synchronous file I/O and pure checks; callers run it on a blocking
//! thread.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::RepoPath;

/// The seal's file name, at the top of the model directory. Not listed in itself.
pub const SEAL_FILE: &str = ".edgeroute-seal";
/// The one claims version this code writes and reads.
pub const SEAL_VERSION: u32 = 1;
/// Largest seal read: 10,000 entries of a long path and a hash fit well below it, and a
/// hostile writer cannot make the verifier read (and base64-decode) an unbounded file.
pub const MAX_SEAL_BYTES: u64 = 1024 * 1024;
/// Most files a seal may list (and a sealed directory may hold). A model is a handful of
/// files; a directory of millions would make every verification a disk scan.
pub const MAX_SEALED_FILES: usize = 10_000;
/// Longest `kid` and `iss` (they end up in logs).
const MAX_LABEL: usize = 128;
/// Longest `model` (Triton's own limit on model names).
const MAX_MODEL: usize = 128;
/// Temporary name while a seal is written; renamed over [`SEAL_FILE`].
const SEAL_TMP: &str = ".edgeroute-seal.tmp";

/// Why a directory could not be sealed, or its seal does not hold.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{dir}: no seal ({SEAL_FILE}); only sealed model directories are installed")]
    NoSeal { dir: PathBuf },
    #[error("seal signed with key `{kid}`, which is not trusted")]
    UnknownKey { kid: String },
    #[error("seal signature does not verify under trusted key `{kid}`")]
    BadSignature { kid: String },
    #[error("malformed seal: {reason}")]
    Malformed { reason: String },
    #[error("`{path}` is not listed in the seal (added after sealing)")]
    Unlisted { path: String },
    #[error("`{path}` is listed in the seal but missing")]
    Missing { path: String },
    #[error("`{path}` changed after sealing: {reason}")]
    Modified { path: String, reason: String },
    #[error("`{path}` is not a regular file or directory (symlinks and special files are refused)")]
    NotARegularFile { path: String },
    #[error("`{path}`: unsafe path: {reason}")]
    UnsafePath { path: String, reason: String },
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: String, limit: u64 },
    #[error("bad key: {0}")]
    Key(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SealError {
    let path = path.to_owned();
    move |source| SealError::Io { op, path, source }
}

/// One file of a sealed directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedFile {
    /// Relative to the directory, `/`-separated, validated like a hub path ([`RepoPath`]).
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// A seal's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// [`SEAL_VERSION`].
    pub v: u32,
    /// The backend model name the directory is sealed for.
    pub model: String,
    /// Every regular file, sorted by path, the seal itself excepted.
    pub files: Vec<SealedFile>,
    /// When it was sealed, seconds since the Unix epoch (the newest of several wins).
    pub iat: u64,
    /// Who sealed it (a node id, a pipeline name).
    pub iss: String,
}

fn check_label(what: &str, s: &str) -> Result<(), SealError> {
    if s.is_empty() || s.len() > MAX_LABEL || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SealError::Key(format!(
            "{what} must be 1 to {MAX_LABEL} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

/// Signs seals with an Ed25519 private key.
pub struct SealSigner {
    key: EncodingKey,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for SealSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SealSigner").field("kid", &self.kid).field("issuer", &self.issuer).finish()
    }
}

impl SealSigner {
    /// `pem`: a PKCS#8 Ed25519 private key (`openssl genpkey -algorithm ed25519`), as used by
    /// `edgeroute token mint --key-file`. Refused at once if it cannot sign EdDSA, so a bad
    /// key fails at start-up, not at the first install.
    pub fn from_pem(pem: &str, kid: &str, issuer: &str) -> Result<Self, SealError> {
        check_label("kid", kid)?;
        check_label("issuer", issuer)?;
        let key = EncodingKey::from_ed_pem(pem.as_bytes())
            .map_err(|_| SealError::Key("not an Ed25519 private key PEM".into()))?;
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &serde_json::json!({}), &key)
            .map_err(|_| SealError::Key("not an Ed25519 private key PEM".into()))?;
        Ok(SealSigner { key, kid: kid.to_owned(), issuer: issuer.to_owned() })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signed compact JWS for `seal`.
    pub fn sign(&self, seal: &Seal) -> Result<String, SealError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, seal, &self.key)
            .map_err(|e| SealError::Key(format!("signing: {e}")))
    }

    /// Signs other claims with the same key, typed `typ` in the header (a load order for the
    /// sidecar, say), so a verifier expecting one kind of token never accepts another.
    pub fn sign_typed<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, SealError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|e| SealError::Key(format!("signing: {e}")))
    }
}

/// The public keys seals are trusted under, by `kid` (several, so keys can be rotated).
#[derive(Clone)]
pub struct SealVerifier {
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for SealVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("SealVerifier").field("kids", &kids).finish()
    }
}

impl SealVerifier {
    /// `(kid, SPKI public key PEM)` pairs. A private key PEM is refused (a verifier's
    /// configuration should never hold one), as is a duplicate `kid` or an empty list.
    pub fn from_public_pems(keys: &[(String, String)]) -> Result<Self, SealError> {
        if keys.is_empty() {
            return Err(SealError::Key("no trusted seal key".into()));
        }
        let mut out = HashMap::new();
        for (kid, pem) in keys {
            check_label("kid", kid)?;
            if !pem.contains("-----BEGIN PUBLIC KEY-----") {
                return Err(SealError::Key(format!("`{kid}`: expected a PUBLIC KEY PEM")));
            }
            let key = DecodingKey::from_ed_pem(pem.as_bytes())
                .map_err(|_| SealError::Key(format!("`{kid}`: not an Ed25519 public key")))?;
            if !ed25519_key_is_valid(&key) {
                return Err(SealError::Key(format!("`{kid}`: not a valid Ed25519 public key")));
            }
            if out.insert(kid.clone(), key).is_some() {
                return Err(SealError::Key(format!("`{kid}` is listed twice")));
            }
        }
        Ok(SealVerifier { keys: out })
    }

    /// Checks the signature and the claims' shape (not the directory): the seal's claims.
    /// A token typed as anything but a plain JWT (a load order) is not a seal.
    pub fn verify_token(&self, token: &str) -> Result<Seal, SealError> {
        let seal: Seal = self.verify(None, token)?;
        check_claims(&seal)?;
        Ok(seal)
    }

    /// Checks a token signed by [`SealSigner::sign_typed`] with `typ` and returns its claims
    /// (their own checks are the caller's).
    pub fn verify_typed<T: serde::de::DeserializeOwned>(
        &self,
        typ: &str,
        token: &str,
    ) -> Result<T, SealError> {
        self.verify(Some(typ), token)
    }

    fn verify<T: serde::de::DeserializeOwned>(
        &self,
        typ: Option<&str>,
        token: &str,
    ) -> Result<T, SealError> {
        let malformed = |reason: String| SealError::Malformed { reason };
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| malformed(format!("header: {e}")))?;
        if header.alg != Algorithm::EdDSA {
            return Err(malformed(format!("algorithm {:?}, expected EdDSA", header.alg)));
        }
        let typ_ok = match (typ, header.typ.as_deref()) {
            (None, None | Some("JWT")) => true,
            (Some(want), Some(got)) => want == got,
            _ => false,
        };
        if !typ_ok {
            return Err(malformed(format!(
                "token type {:?}, expected {:?}",
                header.typ,
                typ.unwrap_or("JWT")
            )));
        }
        let kid = header.kid.ok_or_else(|| malformed("no `kid` in the header".into()))?;
        let key = self.keys.get(&kid).ok_or_else(|| SealError::UnknownKey { kid: kid.clone() })?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        // A seal pins content, not a session: it does not expire.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<T>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => SealError::BadSignature { kid: kid.clone() },
                _ => malformed(e.to_string()),
            }
        })?;
        Ok(data.claims)
    }
}

/// The backend decompresses the point when it builds a verifier and fails on an invalid one; a
/// probe with a dummy signature finds that out when the key is loaded.
fn ed25519_key_is_valid(key: &DecodingKey) -> bool {
    use jsonwebtoken::DecodingKeyKind;
    let DecodingKeyKind::SecretOrDer(x) = key.kind() else { return false };
    if x.len() != 32 {
        return false;
    }
    let dummy = "A".repeat(86); // 64 zero bytes, base64url without padding
    jsonwebtoken::crypto::verify(&dummy, b"probe", key, Algorithm::EdDSA).is_ok()
}

/// What serde cannot check: the version, the limits, the paths (valid, sorted, unique) and
/// the hashes' form.
pub fn check_claims(seal: &Seal) -> Result<(), SealError> {
    let malformed = |reason: String| SealError::Malformed { reason };
    if seal.v != SEAL_VERSION {
        return Err(malformed(format!("version {}, expected {SEAL_VERSION}", seal.v)));
    }
    if seal.model.is_empty() || seal.model.len() > MAX_MODEL {
        return Err(malformed(format!("`model` must be 1 to {MAX_MODEL} bytes")));
    }
    if seal.files.len() > MAX_SEALED_FILES {
        return Err(SealError::TooLarge {
            what: format!("{} files listed", seal.files.len()),
            limit: MAX_SEALED_FILES as u64,
        });
    }
    let mut previous: Option<&str> = None;
    for f in &seal.files {
        check_path(&f.path)?;
        if f.path == SEAL_FILE {
            return Err(malformed("the seal lists itself".into()));
        }
        if previous.is_some_and(|p| p >= f.path.as_str()) {
            return Err(malformed(format!("`{}`: paths not sorted or listed twice", f.path)));
        }
        previous = Some(&f.path);
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(malformed(format!("`{}`: sha256 is not 64 lowercase hex digits", f.path)));
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SealError> {
    RepoPath::check(path).map(drop).map_err(|p| SealError::UnsafePath {
        path: path.escape_debug().to_string(),
        reason: p.reason.into(),
    })
}

/// Every regular file under `dir` (the top-level seal and its temporary file excepted), by
/// relative path, with its length. Refuses symlinks, special files, unsafe names, more than
/// [`MAX_SEALED_FILES`] files, and directories nested deeper than hub paths may be.
fn walk(dir: &Path) -> Result<BTreeMap<String, u64>, SealError> {
    fn go(dir: &Path, prefix: &str, out: &mut BTreeMap<String, u64>) -> Result<(), SealError> {
        for entry in std::fs::read_dir(dir).map_err(io("listing", dir))? {
            let entry = entry.map_err(io("listing", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(SealError::UnsafePath {
                    path: format!("{prefix}{}", name.to_string_lossy()),
                    reason: "not UTF-8".into(),
                });
            };
            let rel = format!("{prefix}{name}");
            if prefix.is_empty() && (name == SEAL_FILE || name == SEAL_TMP) {
                continue;
            }
            // Validated before descending: this bounds the recursion depth too.
            check_path(&rel)?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io("checking", &path))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                go(&path, &format!("{rel}/"), out)?;
            } else if kind.is_file() {
                if out.len() >= MAX_SEALED_FILES {
                    return Err(SealError::TooLarge {
                        what: "files in the directory".into(),
                        limit: MAX_SEALED_FILES as u64,
                    });
                }
                out.insert(rel, meta.len());
            } else {
                return Err(SealError::NotARegularFile { path: rel });
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    go(dir, "", &mut out)?;
    Ok(out)
}

/// SHA-256 (lowercase hex) of the first `limit + 1` bytes of `path` at most, and how many
/// bytes were read: a file that grows while hashed shows up as a size mismatch, and is never
/// read without bound.
fn hash_file(path: &Path, limit: u64) -> Result<(String, u64), SealError> {
    let file = std::fs::File::open(path).map_err(io("reading", path))?;
    let mut reader = file.take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, total))
}

/// Seals `dir` for the backend model `model`: hashes every regular file, signs the list, and
/// writes [`SEAL_FILE`] (a temporary file, synced, renamed into place, so a reader never sees
/// half a seal). Refuses a directory a verifier would refuse (symlinks, special files, unsafe
/// names, too many files). `now_s`: seconds since the Unix epoch.
pub fn seal_dir(
    dir: &Path,
    model: &str,
    signer: &SealSigner,
    now_s: u64,
) -> Result<Seal, SealError> {
    let listing = walk(dir)?;
    let mut files = Vec::with_capacity(listing.len());
    for (rel, len) in listing {
        let (sha256, bytes) = hash_file(&dir.join(&rel), len)?;
        if bytes != len {
            return Err(SealError::Modified { path: rel, reason: "changed while sealing".into() });
        }
        files.push(SealedFile { path: rel, bytes, sha256 });
    }
    let seal = Seal {
        v: SEAL_VERSION,
        model: model.to_owned(),
        files,
        iat: now_s,
        iss: signer.issuer.clone(),
    };
    check_claims(&seal)?;
    let token = signer.sign(&seal)?;
    if token.len() as u64 > MAX_SEAL_BYTES {
        return Err(SealError::TooLarge { what: "the seal".into(), limit: MAX_SEAL_BYTES });
    }
    let tmp = dir.join(SEAL_TMP);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.write_all(token.as_bytes()).and_then(|()| f.sync_all()).map_err(io("writing", &tmp))?;
    drop(f);
    let dest = dir.join(SEAL_FILE);
    std::fs::rename(&tmp, &dest).map_err(io("renaming", &dest))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))?;
    Ok(seal)
}

/// Reads `dir`'s seal, checks its signature under `verifier`, and checks that the directory
/// holds exactly the files listed, with their sizes and SHA-256 — in that order, so an
/// unsigned or untrusted seal costs no hashing. Returns the seal's claims.
pub fn verify_dir(dir: &Path, verifier: &SealVerifier) -> Result<Seal, SealError> {
    let seal_path = dir.join(SEAL_FILE);
    let meta = match std::fs::symlink_metadata(&seal_path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SealError::NoSeal { dir: dir.to_owned() });
        }
        Err(e) => return Err(io("checking", &seal_path)(e)),
    };
    if !meta.is_file() {
        return Err(SealError::NotARegularFile { path: SEAL_FILE.into() });
    }
    let mut token = String::new();
    std::fs::File::open(&seal_path)
        .and_then(|f| f.take(MAX_SEAL_BYTES + 1).read_to_string(&mut token))
        .map_err(io("reading", &seal_path))?;
    if token.len() as u64 > MAX_SEAL_BYTES {
        return Err(SealError::TooLarge { what: "the seal".into(), limit: MAX_SEAL_BYTES });
    }
    let seal = verifier.verify_token(token.trim())?;
    let on_disk = walk(dir)?;
    let listed: BTreeMap<&str, &SealedFile> =
        seal.files.iter().map(|f| (f.path.as_str(), f)).collect();
    if let Some(path) = on_disk.keys().find(|p| !listed.contains_key(p.as_str())) {
        return Err(SealError::Unlisted { path: path.clone() });
    }
    for f in &seal.files {
        let Some(&len) = on_disk.get(&f.path) else {
            return Err(SealError::Missing { path: f.path.clone() });
        };
        if len != f.bytes {
            return Err(SealError::Modified {
                path: f.path.clone(),
                reason: format!("{len} bytes, sealed with {}", f.bytes),
            });
        }
        let (sha256, read) = hash_file(&dir.join(&f.path), f.bytes)?;
        if read != f.bytes || sha256 != f.sha256 {
            return Err(SealError::Modified {
                path: f.path.clone(),
                reason: "SHA-256 differs from the sealed one".into(),
            });
        }
    }
    Ok(seal)
}
