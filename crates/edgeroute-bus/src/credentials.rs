//! Bus identities: NKey users and the NATS permissions each role gets.
//!
//! Every node connects as its own NATS user (an NKey: the server holds the public key, the node
//! the seed) whose permissions allow publishing only its own event subject
//! (`<prefix>.<region>.<node_id>`) and its own KV key (`$KV.<bucket>.<node_id>`), plus the few
//! JetStream API requests a publisher makes. A discovery replica's user may read the topology
//! (subscribe to every event, read the bucket) and publish nothing on it. The server, not the
//! subscriber, enforces this: a node holding its own credentials cannot speak for another.
//!
//! The routing policy ([`crate::policy`]): only an [`Role::Admin`] user may put it (and create
//! its bucket); a discovery replica may read and watch it and publish acknowledgements under
//! the status prefix (any replica's subject: a replica could speak for another's
//! acknowledgement, which informs the pusher only; each replica's `/health` is the record); a
//! node may do neither.
//!
//! A regional router ([`Role::Router`]) shares ejections with the other replicas on
//! [`ROUTER_SHARE_SUBJECT`] and wakes them (new work, cancels) under [`JOBS_SUBJECT_PREFIX`]:
//! it may publish and subscribe there and nowhere else — nothing of the topology or the policy.
//!
//! [`permissions`] is the one place those subject lists are written; `deploy/nats/` ships the
//! server configuration they are pasted into and `edgeroute bus credentials` prints them.
//! The sets were found against nats-server 2.9 (the tests in `tests/auth.rs` start one): each
//! entry is needed by a call the bus makes, and nothing else is allowed.

use crate::BusError;
use crate::config::BusConfig;
use crate::wire::{self, check_token};

/// Where regional router replicas announce the ejections and recoveries they decide.
pub const ROUTER_SHARE_SUBJECT: &str = "edgeroute.router.ejections";
/// Under this prefix router replicas wake each other for new job items and fan out cancels
/// (`<prefix>.<store schema>.wake|abort`).
pub const JOBS_SUBJECT_PREFIX: &str = "edgeroute.jobs";

/// Who a bus user is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// One edge node: publishes its own events and snapshot only.
    Node { node_id: String, region: String },
    /// A regional router replica: shares ejections and job wake-ups with the other replicas;
    /// reads and publishes nothing of the topology or the policy.
    Router,
    /// A discovery replica (or any observer): reads the topology, publishes none of it; reads
    /// and watches the routing policy, publishes its acknowledgements.
    Discovery,
    /// An operator pushing the routing policy (`edgeroute policy push`): puts the policy
    /// text (creating its bucket) and reads the replicas' acknowledgements; nothing of the
    /// topology.
    Admin,
}

/// The subjects a user may publish to and subscribe to (NATS wildcards allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The permissions of `role` on the bus `cfg` describes (its `subject_prefix` and `bucket`).
pub fn permissions(cfg: &BusConfig, role: &Role) -> Result<Permissions, BusError> {
    check_token("bucket", &cfg.bucket)?;
    let bucket = &cfg.bucket;
    // Every JetStream request answers on the requester's inbox.
    let inbox = "_INBOX.>".to_owned();
    // Opening the bucket (`get_key_value`) reads its stream's info; a node's first start creates
    // the stream if missing (an identical stream already there makes this a no-op, a different
    // one an error, so a node cannot reconfigure the bucket once it exists).
    let stream_info = format!("$JS.API.STREAM.INFO.KV_{bucket}");
    check_token("policy_bucket", &cfg.policy_bucket)?;
    let policy = &cfg.policy_bucket;
    let policy_info = format!("$JS.API.STREAM.INFO.KV_{policy}");
    let statuses = &cfg.policy_status_prefix;
    check_token("rollout_bucket", &cfg.rollout_bucket)?;
    let rollouts = &cfg.rollout_bucket;
    Ok(match role {
        Role::Node { node_id, region } => {
            wire::check_node(node_id, region)?;
            Permissions {
                publish: vec![
                    wire::event_subject(&cfg.subject_prefix, region, node_id),
                    format!("$KV.{bucket}.{node_id}"),
                    stream_info,
                    format!("$JS.API.STREAM.CREATE.KV_{bucket}"),
                ],
                subscribe: vec![inbox],
            }
        }
        Role::Discovery => Permissions {
            publish: vec![
                stream_info,
                // One key's latest entry (the bucket allows direct gets).
                format!("$JS.API.DIRECT.GET.KV_{bucket}.>"),
                // Listing the keys: an ephemeral ordered consumer, its flow control, its end.
                format!("$JS.API.CONSUMER.CREATE.KV_{bucket}"),
                format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.>"),
                format!("$JS.API.CONSUMER.DELETE.KV_{bucket}.>"),
                format!("$JS.API.CONSUMER.INFO.KV_{bucket}.>"),
                format!("$JS.FC.KV_{bucket}.>"),
                // The policy: its bucket's info and a watch of its one key (an ordered
                // consumer, as above), and acknowledgements under the status prefix.
                policy_info,
                format!("$JS.API.CONSUMER.CREATE.KV_{policy}"),
                format!("$JS.API.CONSUMER.CREATE.KV_{policy}.>"),
                format!("$JS.API.CONSUMER.DELETE.KV_{policy}.>"),
                format!("$JS.API.CONSUMER.INFO.KV_{policy}.>"),
                format!("$JS.FC.KV_{policy}.>"),
                format!("{statuses}.*"),
            ],
            subscribe: vec![wire::all_events_subject(&cfg.subject_prefix), inbox],
        },
        Role::Router => {
            let share = ROUTER_SHARE_SUBJECT.to_owned();
            let jobs = format!("{JOBS_SUBJECT_PREFIX}.>");
            Permissions {
                publish: vec![share.clone(), jobs.clone()],
                subscribe: vec![share, jobs, inbox],
            }
        }
        Role::Admin => Permissions {
            publish: vec![
                format!("$KV.{policy}.{}", crate::policy::POLICY_KEY),
                policy_info,
                format!("$JS.API.STREAM.CREATE.KV_{policy}"),
                // Rollout states (`crate::rollout`): open or create the bucket, read a key's
                // latest value, compare-and-set it.
                format!("$KV.{rollouts}.>"),
                format!("$JS.API.STREAM.INFO.KV_{rollouts}"),
                format!("$JS.API.STREAM.CREATE.KV_{rollouts}"),
                format!("$JS.API.DIRECT.GET.KV_{rollouts}.>"),
            ],
            subscribe: vec![format!("{statuses}.*"), inbox],
        },
    })
}

/// A new NKey user: its public key (`U…`, for the server) and seed (`SU…`, the secret).
pub struct UserKey {
    pub public_key: String,
    seed: String,
}

impl UserKey {
    /// A fresh random user key pair.
    pub fn generate() -> Result<UserKey, BusError> {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().map_err(|e| BusError::Config(format!("nkey seed: {e}")))?;
        Ok(UserKey { public_key: pair.public_key(), seed })
    }

    /// The seed: the secret to write to the user's `nkey_seed_file` (and nowhere else).
    pub fn seed(&self) -> &str {
        &self.seed
    }
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("public_key", &self.public_key)
            .field("seed", &"<redacted>")
            .finish()
    }
}

/// Checks that `seed` is an NKey user seed (so a mistyped file fails at start-up, by name).
pub fn check_user_seed(seed: &str) -> Result<(), BusError> {
    match nkeys::KeyPair::from_seed(seed) {
        Ok(pair) if pair.key_pair_type() == nkeys::KeyPairType::User => Ok(()),
        Ok(_) => Err(BusError::Config("the nkey seed is not a user seed (SU…)".to_owned())),
        Err(_) => Err(BusError::Config("the nkey seed file does not hold a valid seed".to_owned())),
    }
}

fn quoted(list: &[String]) -> String {
    list.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// One entry of the `users` list of `deploy/nats/nats-server.conf`'s account, for the user
/// `public_key` with `perms` (`label` becomes a comment line).
pub fn user_block(label: &str, public_key: &str, perms: &Permissions) -> String {
    format!(
        "  # {label}\n  {{ nkey: {public_key}, permissions: {{\n      publish: {{ allow: [{}] }},\n      subscribe: {{ allow: [{}] }} }} }}\n",
        quoted(&perms.publish),
        quoted(&perms.subscribe)
    )
}

/// A whole `users.conf` (the file `deploy/nats/nats-server.conf` includes) for `blocks`.
pub fn users_file(blocks: &[String]) -> String {
    format!("users: [\n{}]\n", blocks.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_may_publish_only_its_own_subject_and_key() {
        let role = Role::Node { node_id: "tor-1".into(), region: "ca_east".into() };
        let p = permissions(&BusConfig::default(), &role).unwrap();
        assert!(p.publish.contains(&"edgeroute.topology.ca_east.tor-1".to_owned()));
        assert!(p.publish.contains(&"$KV.edgeroute_nodes.tor-1".to_owned()));
        assert!(p.publish.iter().all(|s| !s.ends_with(".>") && !s.contains('*')), "{p:?}");
        assert_eq!(p.subscribe, ["_INBOX.>"]);
    }

    #[test]
    fn discovery_publishes_nothing_of_the_topology() {
        let p = permissions(&BusConfig::default(), &Role::Discovery).unwrap();
        // JetStream reads, and its policy acknowledgements: nothing under the topology.
        let status = "edgeroute.policy.status.*";
        assert!(p.publish.iter().all(|s| s.starts_with("$JS.") || s == status), "{p:?}");
        assert!(p.subscribe.contains(&"edgeroute.topology.>".to_owned()));
    }

    #[test]
    fn only_the_admin_may_put_the_policy_and_a_node_may_not_touch_it() {
        let cfg = BusConfig::default();
        let put = "$KV.edgeroute_policy.current".to_owned();
        let admin = permissions(&cfg, &Role::Admin).unwrap();
        assert!(admin.publish.contains(&put), "{admin:?}");
        assert!(admin.subscribe.contains(&"edgeroute.policy.status.*".to_owned()));
        assert!(admin.publish.iter().all(|s| !s.contains("topology") && !s.contains("nodes")));
        let disc = permissions(&cfg, &Role::Discovery).unwrap();
        assert!(!disc.publish.iter().any(|s| s.starts_with("$KV.")), "{disc:?}");
        assert!(disc.publish.contains(&"edgeroute.policy.status.*".to_owned()));
        assert!(!disc.publish.iter().any(|s| s.contains("STREAM.CREATE")));
        let node = Role::Node { node_id: "tor-1".into(), region: "ca_east".into() };
        let node = permissions(&cfg, &node).unwrap();
        assert!(node.publish.iter().chain(&node.subscribe).all(|s| !s.contains("policy")));
    }

    #[test]
    fn a_router_speaks_only_on_the_router_subjects() {
        let p = permissions(&BusConfig::default(), &Role::Router).unwrap();
        assert_eq!(p.publish, [ROUTER_SHARE_SUBJECT, "edgeroute.jobs.>"]);
        assert!(p.subscribe.iter().all(|s| !s.contains("topology") && !s.contains("policy")));
        assert!(p.publish.iter().all(|s| !s.starts_with('$')), "no JetStream, no KV: {p:?}");
    }

    #[test]
    fn names_that_would_widen_a_subject_are_refused() {
        for (node_id, region) in [("*", "r"), ("a.b", "r"), ("n", ">"), ("", "r")] {
            let role = Role::Node { node_id: node_id.into(), region: region.into() };
            assert!(permissions(&BusConfig::default(), &role).is_err(), "{node_id} {region}");
        }
    }

    #[test]
    fn keys_are_user_keys_and_the_seed_is_never_debug_printed() {
        let key = UserKey::generate().unwrap();
        assert!(key.public_key.starts_with('U'));
        assert!(key.seed().starts_with("SU"));
        check_user_seed(key.seed()).unwrap();
        assert!(check_user_seed("SUnot-a-seed").is_err());
        assert!(!format!("{key:?}").contains(key.seed()));
        let block = user_block(
            "node tor-1",
            &key.public_key,
            &Permissions { publish: vec!["a.b".into()], subscribe: vec![] },
        );
        assert!(block.contains(&key.public_key) && !block.contains(key.seed()), "{block}");
    }
}
