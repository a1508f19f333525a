//! The SDK bootstraps from a name (`dns:discovery.edge.test`) against the fleet's own GeoDNS
//! (`edgeroute dns`, on loopback): three discovery replicas over TLS on 127.0.R.1 (one per
//! region), a simulator node, and a DNS server that places this client (its resolver address
//! is 127.0.0.1) in mtl.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeroute_client::{Client, ClientConfig};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_dns::DnsConfig;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_test_util::TestNode;

const REGIONS: [(&str, u8); 3] = [("tor", 1), ("mtl", 2), ("van", 3)];

struct World {
    dir: PathBuf,
    node: TestNode,
    replicas: Vec<(String, SocketAddr, edgeroute_discovery::Spawned)>,
    dns: Option<edgeroute_dns::Running>,
    dns_addr: SocketAddr,
}

impl World {
    async fn start(tag: &str, ttl_s: u32) -> World {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-dnsboot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // One certificate for every name DNS hands out (and the addresses the probes use).
        let mut sans: Vec<String> =
            vec!["discovery.edge.test".into(), "*.discovery.edge.test".into()];
        sans.extend(REGIONS.iter().map(|(_, r)| format!("127.0.{r}.1")));
        let cert = rcgen::generate_simple_self_signed(sans).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        let node =
            TestNode::start_as("node-1", "toronto", "[backend]\nkind = \"sim\"\n", None).await;
        let mut replicas = Vec::new();
        for (region, r) in REGIONS {
            let toml = format!(
                "[discovery]\nid = \"disc-{region}-1\"\nregion = \"{region}\"\nallow_unauthenticated = true\n\
                 [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
                 [probe]\ninterval_ms = 200\ntimeout_ms = 150\n\
                 [[nodes]]\nid = \"node-1\"\nurl = \"http://{}\"\nregion = \"toronto\"\n",
                dir.join("ca.pem").display(),
                dir.join("key.pem").display(),
                node.addr
            );
            let d = Discovery::build(DiscoveryConfig::from_toml(&toml, |_| None).unwrap()).unwrap();
            let spawned = d.spawn(SocketAddr::from(([127, 0, r, 1], 0))).await.unwrap();
            replicas.push((region.to_owned(), spawned.addr(), spawned));
        }
        let mut text = format!(
            "zone = \"edge.test\"\ndefault_region = \"tor\"\n\
             [ttl]\ncalm_s = {ttl_s}\nchanging_s = {ttl_s}\n\
             [health]\ninterval_ms = 100\ntimeout_ms = 200\nca_file = \"{}\"\n\
             [distance.mtl]\ntor = 6\nvan = 65\n[distance.tor]\nvan = 60\n",
            dir.join("ca.pem").display()
        );
        for (region, addr, _) in &replicas {
            // This test's resolver (127.0.0.1) is a client of mtl.
            let cidrs = if region == "mtl" { "[\"127.0.0.1/32\"]" } else { "[]" };
            text.push_str(&format!(
                "[[regions]]\nname = \"{region}\"\nclient_cidrs = {cidrs}\n\
                 discovery = [{{ id = \"disc-{region}-1\", addr = \"{}\", port = {}, health = \"https://{addr}/health\" }}]\n",
                addr.ip(),
                addr.port()
            ));
        }
        let cfg = DnsConfig::from_toml(&text).unwrap();
        let dns = edgeroute_dns::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let dns_addr = dns.addr;
        World { dir, node, replicas, dns: Some(dns), dns_addr }
    }

    fn config(&self, entry: &str, cache: Option<&Path>) -> ClientConfig {
        ClientConfig {
            discovery: vec![entry.to_owned()],
            dns_servers: vec![self.dns_addr],
            token: Some(self.node.token()),
            ca_file: Some(self.dir.join("ca.pem")),
            cache_file: cache.map(Path::to_path_buf),
            seed: Some(7),
            ..ClientConfig::default()
        }
    }

    fn url(&self, region: &str) -> String {
        let (_, addr, _) = self.replicas.iter().find(|(r, _, _)| r == region).unwrap();
        format!("https://disc-{region}-1.discovery.edge.test:{}", addr.port())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(text: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(8);
    r
}

/// A session and one turn, retried while discovery has not verified the node yet.
async fn one_turn(client: &Client) {
    let s = common::session_when_ready(client, "sim-llama").await;
    s.chat(&request("hello")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_bootstraps_from_a_name_to_the_nearest_replicas_in_srv_order() {
    let w = World::start("srv", 30).await;
    let client = Client::new(w.config("dns:discovery.edge.test", None)).unwrap();
    // mtl's replica first, then the nearest other regions', over https with their names.
    let urls = client.discovery_urls().await.unwrap();
    assert_eq!(urls, [w.url("mtl"), w.url("tor"), w.url("van")]);
    one_turn(&client).await;
    // A pinned name: only that region.
    let client = Client::new(w.config("dns:van.discovery.edge.test", None)).unwrap();
    assert_eq!(client.discovery_urls().await.unwrap(), [w.url("van")]);
    one_turn(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_without_srv_records_falls_back_to_its_addresses() {
    let w = World::start("a", 30).await;
    let (_, addr, _) = &w.replicas[0];
    // A target's own name has A records and no SRV: one endpoint on the entry's port.
    let entry = format!("dns:disc-tor-1.discovery.edge.test:{}", addr.port());
    let client = Client::new(w.config(&entry, None)).unwrap();
    assert_eq!(client.discovery_urls().await.unwrap(), [w.url("tor")]);
    one_turn(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dns_down_a_client_uses_the_persisted_resolution_and_a_stale_one_is_used_while_re_resolving()
 {
    let mut w = World::start("down", 1).await;
    let cache = w.dir.join("lists.json");
    let client = Client::new(w.config("dns:discovery.edge.test", Some(&cache))).unwrap();
    one_turn(&client).await;
    let persisted = std::fs::read_to_string(&cache).unwrap();
    assert!(persisted.contains("disc-mtl-1.discovery.edge.test"), "{persisted}");
    // DNS dies; its 1 s TTL runs out.
    w.dns = None;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A new client (a restarted app) with nothing but the name and the cache file: the held
    // resolution is stale, used at once, re-resolved in the background (which fails).
    let mut cfg = w.config("dns:discovery.edge.test", Some(&cache));
    cfg.dns_servers = vec![SocketAddr::from(([127, 0, 0, 1], 9))];
    let client = Client::new(cfg).unwrap();
    assert_eq!(client.discovery_urls().await.unwrap()[0], w.url("mtl"));
    one_turn(&client).await;
    // With nothing held and no DNS, the error names the entry and the reason.
    let mut cfg = w.config("dns:discovery.edge.test", None);
    cfg.dns_servers = vec![SocketAddr::from(([127, 0, 0, 1], 9))];
    cfg.discovery_timeout = Duration::from_millis(200);
    let client = Client::new(cfg).unwrap();
    let e = client.session("sim-llama").await.err().unwrap().to_string();
    assert!(e.contains("dns:discovery.edge.test") && e.contains("no answer"), "{e}");
}

#[test]
fn a_bad_dns_entry_is_refused_when_the_client_is_built() {
    let cfg = ClientConfig { discovery: vec!["dns:bad..name".into()], ..ClientConfig::default() };
    let e = Client::new(cfg).err().unwrap().to_string();
    assert!(e.contains("dns:bad..name"), "{e}");
}
