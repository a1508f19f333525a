//! The routing policy over the bus (issue 15): an admin puts a text once, replicas watching the
//! key get the current text at once (even when they start late) and every update after, and
//! acknowledge it on their status subject. On the shipped server configuration only the admin
//! user may put it; a discovery user may watch and acknowledge but not put; a node may do
//! neither.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{NatsServer, nats_config};
use edgeroute_bus::credentials::{self, Role, UserKey};
use edgeroute_bus::{Bus, BusConfig, PolicyResult, PolicyStatus, PolicyUpdate, PolicyWatch};

const WITHIN: Duration = Duration::from_secs(10);

async fn connected(cfg: &BusConfig) -> Bus {
    let bus = Bus::connect(cfg).await.unwrap();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !bus.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "never connected as {cfg:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bus
}

async fn next(w: &mut PolicyWatch) -> PolicyUpdate {
    tokio::time::timeout(WITHIN, w.next()).await.expect("no policy in time").expect("watch ended")
}

/// Watches as soon as the bucket exists (a replica retries until the first push creates it).
async fn watch(bus: &Bus) -> PolicyWatch {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        match bus.watch_policy().await {
            Ok(w) => return w,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "cannot watch: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ack(replica: &str, revision: u64) -> PolicyStatus {
    PolicyStatus {
        replica: replica.into(),
        revision,
        version: "p1".into(),
        result: PolicyResult::Applied,
        reason: None,
    }
}

/// What every transport must do: a late watcher gets the current text first, then updates in
/// order; oversized texts never reach the bus; acknowledgements reach the pusher.
async fn propagates(pusher: &Bus, replica: &Bus, late: &Bus) {
    let mut acks = pusher.policy_statuses().await.unwrap();
    let r1 = pusher.put_policy("version = \"p1\"").await.unwrap();
    let mut w = watch(replica).await;
    assert_eq!(
        next(&mut w).await,
        PolicyUpdate { revision: r1, text: Ok("version = \"p1\"".into()) }
    );
    let r2 = pusher.put_policy("version = \"p2\"").await.unwrap();
    assert!(r2 > r1);
    assert_eq!(next(&mut w).await.revision, r2);
    // A replica that starts after both pushes gets the current one at once, and only it.
    let mut l = watch(late).await;
    assert_eq!(
        next(&mut l).await,
        PolicyUpdate { revision: r2, text: Ok("version = \"p2\"".into()) }
    );
    // Over the limit: refused before it reaches the bus, the current text unchanged.
    let max = pusher.config().max_policy_bytes;
    let err = pusher.put_policy(&"#".repeat(max + 1)).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let r3 = pusher.put_policy("version = \"p3\"").await.unwrap();
    assert_eq!(next(&mut l).await.revision, r3);
    replica.publish_policy_status(&ack("disc-1", r3)).await.unwrap();
    let got = tokio::time::timeout(WITHIN, acks.next()).await.unwrap().unwrap();
    assert_eq!(got, ack("disc-1", r3));
}

#[tokio::test]
async fn the_embedded_bus_carries_the_policy_and_its_acknowledgements() {
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    propagates(&bus, &bus.clone(), &bus.clone()).await;
}

#[tokio::test]
async fn nats_carries_the_policy_to_late_replicas_and_a_1_mib_text_fits() {
    let server = NatsServer::start().await;
    let cfg = nats_config(&server.url());
    let (pusher, replica, late) =
        (connected(&cfg).await, connected(&cfg).await, connected(&cfg).await);
    propagates(&pusher, &replica, &late).await;
    // The largest text allowed goes through whole.
    let mut w = watch(&replica).await;
    let _current = next(&mut w).await;
    let big = format!("version = \"big\"\n{}", "#".repeat(cfg.max_policy_bytes - 16));
    assert_eq!(big.len(), cfg.max_policy_bytes);
    let r = pusher.put_policy(&big).await.unwrap();
    assert_eq!(next(&mut w).await, PolicyUpdate { revision: r, text: Ok(big) });
}

/// Users for `roles` (label, role): the server's `users.conf` and each user's seed file.
fn users(dir: &Path, roles: &[(&str, Role)]) -> String {
    let cfg = BusConfig::default();
    let mut blocks = Vec::new();
    for (label, role) in roles {
        let key = UserKey::generate().unwrap();
        std::fs::write(dir.join(format!("{label}.nk")), key.seed()).unwrap();
        let perms = credentials::permissions(&cfg, role).unwrap();
        blocks.push(credentials::user_block(label, &key.public_key, &perms));
    }
    credentials::users_file(&blocks)
}

fn as_user(server: &NatsServer, keys: &Path, label: &str) -> BusConfig {
    BusConfig {
        nkey_seed_file: Some(keys.join(format!("{label}.nk"))),
        ..nats_config(&server.url())
    }
}

fn refused(server: &NatsServer, subject: &str) -> bool {
    let needle = format!("Subject \"{subject}\"");
    server.log().lines().any(|l| l.contains("Violation") && l.contains(&needle))
}

#[tokio::test]
async fn on_the_shipped_server_only_the_admin_puts_the_policy() {
    let keys = tempfile::tempdir().unwrap();
    let node = Role::Node { node_id: "n1".into(), region: "us_east".into() };
    let users =
        users(keys.path(), &[("ops", Role::Admin), ("disc", Role::Discovery), ("n1", node)]);
    let server = NatsServer::start_shipped(&users).await;
    let admin = connected(&as_user(&server, keys.path(), "ops")).await;
    let disc = connected(&as_user(&server, keys.path(), "disc")).await;
    let node = connected(&as_user(&server, keys.path(), "n1")).await;

    // The admin's push, watched and acknowledged by the discovery user, end to end.
    propagates(&admin, &disc, &disc.clone()).await;
    let mut w = watch(&disc).await;
    let _ = next(&mut w).await;
    // The largest text allowed fits the shipped server's max_payload and the bucket's limit.
    let max = admin.config().max_policy_bytes;
    let big = format!("version = \"big\"\n{}", "#".repeat(max - 16));
    let r = admin.put_policy(&big).await.unwrap();
    let current = next(&mut w).await;
    assert_eq!((current.revision, current.text.as_ref().map(String::len)), (r, Ok(max)));

    // A discovery user cannot put a policy (nor create the bucket), nor a node.
    assert!(disc.put_policy("version = \"evil\"").await.is_err());
    assert!(refused(&server, "$KV.edgeroute_policy.current"), "{}", server.log());
    assert!(node.put_policy("version = \"evil\"").await.is_err());
    // A node cannot read it either.
    assert!(node.watch_policy().await.is_err());
    assert!(refused(&server, "$JS.API.STREAM.INFO.KV_edgeroute_policy"), "{}", server.log());
    // Nothing forged reached the watcher: the next text it sees is the admin's.
    let r = admin.put_policy("version = \"p9\"").await.unwrap();
    assert_eq!(
        next(&mut w).await,
        PolicyUpdate { revision: r, text: Ok("version = \"p9\"".into()) }
    );
    assert!(r > current.revision);
    // The admin reads no topology.
    let raw = match admin.transport() {
        edgeroute_bus::Transport::Nats(n) => n.client().clone(),
        edgeroute_bus::Transport::InProcess(_) => unreachable!(),
    };
    let _sub = raw.subscribe("edgeroute.topology.>").await.unwrap();
    let _ = raw.flush().await;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !refused(&server, "edgeroute.topology.>") {
        assert!(tokio::time::Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rollout states (issue 18): the admin creates, reads and compare-and-sets them on the shipped
/// server; a stale writer loses; a discovery user or a node can neither read nor write them.
#[tokio::test]
async fn only_the_admin_keeps_rollout_state_and_writes_are_compare_and_set() {
    let keys = tempfile::tempdir().unwrap();
    let node = Role::Node { node_id: "n1".into(), region: "us_east".into() };
    let users =
        users(keys.path(), &[("ops", Role::Admin), ("disc", Role::Discovery), ("n1", node)]);
    let server = NatsServer::start_shipped(&users).await;
    let admin = connected(&as_user(&server, keys.path(), "ops")).await;
    let other = connected(&as_user(&server, keys.path(), "ops")).await;
    let disc = connected(&as_user(&server, keys.path(), "disc")).await;
    let node = connected(&as_user(&server, keys.path(), "n1")).await;

    assert_eq!(admin.rollout_get("llama").await.unwrap(), None);
    let r1 = admin.rollout_put("llama", b"{\"wave\":0}", None).await.unwrap();
    // A second driver starting the same rollout loses the race to create it.
    assert!(matches!(
        other.rollout_put("llama", b"{}", None).await,
        Err(edgeroute_bus::BusError::Conflict { .. })
    ));
    let r2 = admin.rollout_put("llama", b"{\"wave\":1}", Some(r1)).await.unwrap();
    assert!(matches!(
        other.rollout_put("llama", b"{\"wave\":9}", Some(r1)).await,
        Err(edgeroute_bus::BusError::Conflict { .. })
    ));
    assert_eq!(other.rollout_get("llama").await.unwrap(), Some((r2, b"{\"wave\":1}".to_vec())));
    // The largest state allowed fits the shipped server's max_payload.
    let big = vec![b'x'; edgeroute_bus::rollout::MAX_ROLLOUT_BYTES];
    admin.rollout_put("big", &big, None).await.unwrap();

    for (who, bus) in [("discovery", &disc), ("node", &node)] {
        assert!(bus.rollout_get("llama").await.is_err(), "{who} read a rollout");
        assert!(bus.rollout_put("llama", b"{}", Some(r2)).await.is_err(), "{who} wrote one");
    }
    assert!(refused(&server, "$JS.API.STREAM.INFO.KV_edgeroute_rollouts"), "{}", server.log());
    assert_eq!(admin.rollout_get("llama").await.unwrap(), Some((r2, b"{\"wave\":1}".to_vec())));
}
