//! Discovery answers kept per query, honouring `ttl` and `stale_ok`, and persisted to a file so
//! a client that starts while discovery is down still knows where to go. Pure apart from
//! [`ListCache::load`] and [`ListCache::save`]; time is Unix milliseconds passed in.

use std::collections::BTreeMap;
use std::path::Path;

use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use serde::{Deserialize, Serialize};

/// How usable a cached answer is at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within `ttl`: use it without asking discovery.
    Fresh,
    /// Just past `ttl` (within the client's revalidation window): use it, and ask discovery
    /// in the background for the next caller (HTTP's `stale-while-revalidate`).
    Revalidate,
    /// Past `ttl` but within `stale_ok`: use it only if discovery cannot be reached.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// When the client received the answer, Unix ms (the client's clock).
    fetched_at_ms: u64,
    answer: DiscoverResponse,
    /// Known to be out of date: a fallback only, never fresh.
    #[serde(default)]
    expired: bool,
}

/// Answers by query key (model, pipeline, regions), and what `dns:` discovery entries last
/// resolved to (by entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListCache {
    entries: BTreeMap<String, Entry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    resolved: BTreeMap<String, crate::dns::Resolution>,
}

/// The cache key of a query.
pub fn key(model: &str, pipeline: Option<&str>, regions: &[String]) -> String {
    let mut r = regions.to_vec();
    r.sort();
    format!("{model}|{}|{}", pipeline.unwrap_or(""), r.join(","))
}

impl ListCache {
    /// What the `dns:` entry `entry` last resolved to.
    pub fn resolution(&self, entry: &str) -> Option<&crate::dns::Resolution> {
        self.resolved.get(entry)
    }

    pub fn put_resolution(&mut self, entry: &str, r: crate::dns::Resolution) {
        self.resolved.insert(entry.to_owned(), r);
    }

    /// Every held resolution.
    pub fn resolutions(&self) -> impl Iterator<Item = &crate::dns::Resolution> {
        self.resolved.values()
    }

    /// Applies `f` to every cached answer's candidates (to drop some); an answer left with
    /// none is forgotten.
    pub fn retain_candidates(&mut self, mut f: impl FnMut(&mut Vec<Candidate>)) {
        for e in self.entries.values_mut() {
            f(&mut e.answer.candidates);
        }
        self.entries.retain(|_, e| !e.answer.candidates.is_empty());
    }

    pub fn put(&mut self, key: String, answer: DiscoverResponse, now_ms: u64) {
        self.entries.insert(key, Entry { fetched_at_ms: now_ms, answer, expired: false });
    }

    /// The cached answer for `key` and how fresh it is at `now_ms`; `None` when absent or past
    /// `stale_ok`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<(&DiscoverResponse, Freshness)> {
        self.get_revalidating(key, now_ms, 0)
    }

    /// As [`ListCache::get`], with answers up to `revalidate_ms` past their `ttl` (and within
    /// `stale_ok`) as [`Freshness::Revalidate`].
    pub fn get_revalidating(
        &self,
        key: &str,
        now_ms: u64,
        revalidate_ms: u64,
    ) -> Option<(&DiscoverResponse, Freshness)> {
        let e = self.entries.get(key)?;
        let age = now_ms.saturating_sub(e.fetched_at_ms);
        if e.expired {
            return (age < e.answer.stale_ok_ms).then_some((&e.answer, Freshness::Stale));
        }
        if age < e.answer.ttl_ms {
            Some((&e.answer, Freshness::Fresh))
        } else if age < e.answer.ttl_ms.saturating_add(revalidate_ms) && age < e.answer.stale_ok_ms
        {
            Some((&e.answer, Freshness::Revalidate))
        } else if age < e.answer.stale_ok_ms {
            Some((&e.answer, Freshness::Stale))
        } else {
            None
        }
    }

    /// When the answer for `key` was received (Unix ms), if there is one.
    pub fn fetched_at(&self, key: &str) -> Option<u64> {
        self.entries.get(key).map(|e| e.fetched_at_ms)
    }

    /// The answer for `key` is no longer fresh (a node listed in it no longer had the model,
    /// or every node in it failed): the next look-up asks discovery, and the answer stays
    /// usable only as a stale fallback while discovery is unreachable.
    pub fn expire(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.expired = true;
        }
    }

    /// Expires every answer not decided under routing policy `version` (decided under
    /// another, or under none); returns how many were fresh and now are not.
    pub fn expire_unless_policy(&mut self, version: &str) -> usize {
        let mut n = 0;
        for e in self.entries.values_mut() {
            if !e.expired && e.answer.policy.as_ref().is_none_or(|p| p.version != version) {
                e.expired = true;
                n += 1;
            }
        }
        n
    }

    /// Drops answers past `stale_ok`.
    pub fn prune(&mut self, now_ms: u64) {
        self.entries.retain(|_, e| now_ms.saturating_sub(e.fetched_at_ms) < e.answer.stale_ok_ms);
    }

    /// Reads a cache file; a missing or unreadable file is an empty cache (it is only a cache).
    pub fn load(path: &Path) -> ListCache {
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Writes the cache atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ttl: u64, stale: u64) -> DiscoverResponse {
        DiscoverResponse {
            model: "llm".into(),
            pipeline: None,
            strategy: "latency_first".into(),
            regions: vec![],
            ttl_ms: ttl,
            stale_ok_ms: stale,
            generation: 1,
            generated_at_ms: 0,
            replica: "d".into(),
            candidates: vec![],
            reason: None,
            policy: None,
        }
    }

    #[test]
    fn a_new_policy_version_expires_the_lists_decided_under_another() {
        let mut c = ListCache::default();
        let under = |v: Option<&str>| DiscoverResponse {
            policy: v.map(|v| edgeroute_proto::discovery::PolicyDecision {
                version: v.into(),
                ..Default::default()
            }),
            ..answer(5000, 60_000)
        };
        c.put("old".into(), under(Some("p1")), 1000);
        c.put("new".into(), under(Some("p2")), 1000);
        c.put("none".into(), under(None), 1000);
        assert_eq!(c.expire_unless_policy("p2"), 2);
        assert_eq!(c.get("old", 2000).unwrap().1, Freshness::Stale);
        assert_eq!(c.get("none", 2000).unwrap().1, Freshness::Stale);
        assert_eq!(c.get("new", 2000).unwrap().1, Freshness::Fresh);
        assert_eq!(c.expire_unless_policy("p2"), 0, "already marked: counted once");
    }

    #[test]
    fn ttl_then_stale_then_gone() {
        let mut c = ListCache::default();
        let k = key("llm", None, &["tor".into(), "mtl".into()]);
        assert_eq!(
            k,
            key("llm", None, &["mtl".into(), "tor".into()]),
            "region order is irrelevant"
        );
        c.put(k.clone(), answer(5000, 60_000), 1000);
        assert_eq!(c.get(&k, 5999).unwrap().1, Freshness::Fresh);
        assert_eq!(c.get(&k, 6000).unwrap().1, Freshness::Stale);
        assert!(c.get(&k, 61_000).is_none());
        c.put(k.clone(), answer(5000, 60_000), 1000);
        c.expire(&k);
        assert_eq!(c.get(&k, 2000).unwrap().1, Freshness::Stale, "expired: a fallback only");
        assert_eq!(c.fetched_at(&k), Some(1000));
        c.put(k.clone(), answer(5000, 60_000), 1000);
        c.prune(61_000);
        assert_eq!(c, ListCache::default());
    }

    #[test]
    fn persists_atomically_and_tolerates_garbage() {
        let dir = std::env::temp_dir().join(format!("edgeroute-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lists.json");
        let mut c = ListCache::default();
        c.put("k".into(), answer(1, 2), 3);
        c.save(&path).unwrap();
        assert_eq!(ListCache::load(&path), c);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(ListCache::load(&path), ListCache::default());
        std::fs::remove_dir_all(dir).ok();
    }
}
