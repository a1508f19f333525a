//! `KeyStore`: the live key set, swapped atomically when key files change.
//!
//! Requests read the current [`KeySet`] through an `ArcSwap`, which costs a few atomic
//! operations and never blocks, so a reload never stalls the hot path. Start-up and reload run
//! the same code (read material, build a `KeySet`), so the reload path is exercised on every
//! start. A reload that fails keeps the last good set: a half-written or broken JWKS must not
//! lock every tenant out.
//!
//! Operators should still replace key files atomically (write a temporary file, then rename);
//! a torn read is only tolerated, and is picked up correctly on the next poll.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::cache::{TokenCache, Verified};
use crate::claims::Claims;
use crate::config::AuthConfig;
use crate::error::{AuthError, KeyLoadError};
use crate::keys::KeySet;
use crate::verify::Policy;

/// Verifies tokens against the current keys and reloads them when their files change.
pub struct KeyStore {
    policy: Policy,
    sources: Sources,
    current: ArcSwap<Loaded>,
    generation: AtomicU64,
    reload_failures: AtomicU64,
    verified: TokenCache,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("policy", &self.policy)
            .field("keys", &self.current.load().keys)
            .field("generation", &self.generation())
            .field("reload_failures", &self.reload_failures())
            .finish()
    }
}

/// A key set together with a digest of the material it was built from, so an unchanged file
/// is recognised without rebuilding keys.
struct Loaded {
    keys: Arc<KeySet>,
    digest: [u8; 32],
}

/// Where key material comes from.
struct Sources {
    secret: SecretSource,
    jwks_file: Option<PathBuf>,
    min_secret_bytes: usize,
}

enum SecretSource {
    None,
    File(PathBuf),
    /// Captured once (from the environment or from a caller); never changes.
    Fixed(Vec<u8>),
}

struct Material {
    secret: Option<Vec<u8>>,
    jwks: Option<Vec<u8>>,
}

impl KeyStore {
    /// Builds a store from configuration: validates it, reads the secret (file or environment
    /// variable) and the JWKS file, and loads the keys. Any failure is fatal here, unlike in
    /// [`KeyStore::reload`], because there is no previous key set to fall back on.
    pub fn from_config(config: &AuthConfig) -> Result<KeyStore, AuthError> {
        config.validate()?;
        let secret = match (&config.hs256_secret_file, &config.hs256_secret_env) {
            (Some(path), _) => SecretSource::File(path.clone()),
            (None, Some(var)) => {
                let value = config
                    .hs256_secret_from_env
                    .get()
                    .ok_or_else(|| KeyLoadError::Env { var: var.clone() })?;
                SecretSource::Fixed(value.as_bytes().to_vec())
            }
            (None, None) => SecretSource::None,
        };
        let sources = Sources {
            secret,
            jwks_file: config.jwks_file.clone(),
            min_secret_bytes: config.min_secret_bytes,
        };
        let material = sources.read()?;
        let keys = material.build(sources.min_secret_bytes)?;
        Ok(KeyStore {
            policy: config.policy(),
            current: ArcSwap::from_pointee(Loaded {
                keys: Arc::new(keys),
                digest: material.digest(),
            }),
            sources,
            generation: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            verified: TokenCache::new(config.verified_cache_entries),
        })
    }

    /// Builds a store around keys already in memory (tests, embedders). It has no files, so
    /// [`KeyStore::reload`] always reports "unchanged".
    pub fn from_key_set(policy: Policy, keys: KeySet) -> KeyStore {
        let sources = Sources { secret: SecretSource::None, jwks_file: None, min_secret_bytes: 0 };
        KeyStore {
            policy,
            current: ArcSwap::from_pointee(Loaded { keys: Arc::new(keys), digest: [0; 32] }),
            sources,
            generation: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            verified: TokenCache::new(crate::config::DEFAULT_VERIFIED_CACHE_ENTRIES),
        }
    }

    /// Verifies `token` at time `now_unix_s` against the current keys. Lock-free, no I/O.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, AuthError> {
        self.current.load().keys.verify(token, &self.policy, now_unix_s)
    }

    /// Verifies `token` at `now_unix_s` as [`KeyStore::verify`] does, remembering the result:
    /// the same token again (under the same keys, still within its validity window) costs a
    /// hash and a comparison instead of a signature check. See [`crate::cache`].
    pub fn authenticate(&self, token: &str, now_unix_s: u64) -> Result<Arc<Verified>, AuthError> {
        // The generation is read before the keys: a reload in between files this result
        // under the older generation, where the next lookup misses.
        let generation = self.generation.load(Ordering::Acquire);
        // An entry out of its validity window falls through: the full check says precisely
        // why (expired, not yet valid).
        if let Some(v) = self.verified.get(token, generation)
            && v.valid_at(now_unix_s, self.policy.leeway_s)
        {
            return Ok(v);
        }
        let claims = self.verify(token, now_unix_s)?;
        let v = Arc::new(Verified::from(&claims));
        self.verified.put(token, generation, Arc::clone(&v));
        Ok(v)
    }

    /// The key set in force right now.
    pub fn keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.load().keys)
    }

    /// The claim rules applied by [`KeyStore::verify`].
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Re-reads the key files; swaps in a new key set if their content changed.
    ///
    /// Returns `Ok(true)` when new keys are in force, `Ok(false)` when nothing changed. On
    /// error the previous keys stay in force and [`KeyStore::reload_failures`] goes up by one.
    /// Does blocking file I/O: from async code, call it through `spawn_blocking` (as
    /// [`spawn_reloader`] does).
    pub fn reload(&self) -> Result<bool, AuthError> {
        match self.try_reload() {
            Ok(changed) => Ok(changed),
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    fn try_reload(&self) -> Result<bool, KeyLoadError> {
        // Keys given in memory (or only from the environment) have nothing to re-read; without
        // this a store built by `from_key_set` would "reload" to an empty set.
        if !self.sources.has_files() {
            return Ok(false);
        }
        let material = self.sources.read()?;
        let digest = material.digest();
        if digest == self.current.load().digest {
            return Ok(false);
        }
        let keys = material.build(self.sources.min_secret_bytes)?;
        self.current.store(Arc::new(Loaded { keys: Arc::new(keys), digest }));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(true)
    }

    /// How many reloads have swapped in new keys since start-up.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// How many reloads have failed since start-up (for the gateway's metrics).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }
}

impl Sources {
    fn has_files(&self) -> bool {
        matches!(self.secret, SecretSource::File(_)) || self.jwks_file.is_some()
    }

    fn read(&self) -> Result<Material, KeyLoadError> {
        let secret = match &self.secret {
            SecretSource::None => None,
            SecretSource::Fixed(bytes) => Some(bytes.clone()),
            SecretSource::File(path) => Some(trim_one_newline(read_file(path)?)),
        };
        let jwks = self.jwks_file.as_deref().map(read_file).transpose()?;
        Ok(Material { secret, jwks })
    }
}

impl Material {
    fn build(&self, min_secret_bytes: usize) -> Result<KeySet, KeyLoadError> {
        KeySet::from_material(self.secret.as_deref(), self.jwks.as_deref(), min_secret_bytes)
    }

    /// A digest of everything the key set is built from. Lengths are included so that two
    /// different splits of the same bytes cannot collide.
    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [&self.secret, &self.jwks] {
            match part {
                None => hasher.update([0u8]),
                Some(bytes) => {
                    hasher.update([1u8]);
                    hasher.update((bytes.len() as u64).to_be_bytes());
                    hasher.update(bytes);
                }
            }
        }
        hasher.finalize().into()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyLoadError> {
    std::fs::read(path).map_err(|source| KeyLoadError::Read { path: path.to_owned(), source })
}

/// Editors and `echo` add one trailing newline; it is not part of the secret.
fn trim_one_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

/// Polls the key files every `interval` and reloads them when they change, until `shutdown`
/// completes. A zero interval disables polling (the task ends at once).
///
/// Failures are logged once per distinct error (not once per poll) and counted by
/// [`KeyStore::reload_failures`] on every failed attempt. The file reads run on tokio's
/// blocking pool so they never stall the runtime's worker threads.
pub fn spawn_reloader<F>(store: Arc<KeyStore>, interval: Duration, shutdown: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        if interval.is_zero() {
            tracing::info!("auth key reloading disabled (interval is zero)");
            return;
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
            let task_store = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || task_store.reload()).await {
                Ok(Ok(changed)) => {
                    if changed {
                        tracing::info!(generation = store.generation(), "auth keys reloaded");
                    }
                    if last_error.take().is_some() && !changed {
                        tracing::info!("auth key files readable again; keys unchanged");
                    }
                }
                Ok(Err(e)) => {
                    let message = e.to_string();
                    if last_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(
                            error = %message,
                            failures = store.reload_failures(),
                            "auth key reload failed; keeping the last good keys"
                        );
                    }
                    last_error = Some(message);
                }
                Err(join_error) => {
                    tracing::error!(error = %join_error, "auth key reload task failed");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_exactly_one_newline() {
        assert_eq!(trim_one_newline(b"abc\n".to_vec()), b"abc");
        assert_eq!(trim_one_newline(b"abc\r\n".to_vec()), b"abc");
        assert_eq!(trim_one_newline(b"abc\n\n".to_vec()), b"abc\n");
        assert_eq!(trim_one_newline(b"abc".to_vec()), b"abc");
    }

    #[test]
    fn digest_separates_sources() {
        let a = Material { secret: Some(b"ab".to_vec()), jwks: Some(b"c".to_vec()) };
        let b = Material { secret: Some(b"a".to_vec()), jwks: Some(b"bc".to_vec()) };
        let c = Material { secret: None, jwks: Some(b"abc".to_vec()) };
        assert_ne!(a.digest(), b.digest());
        assert_ne!(b.digest(), c.digest());
    }
}
