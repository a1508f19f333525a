//! One description of a fleet ([`FleetSpec`]): its nodes, their regions, speeds and models,
//! and how they trust callers. It builds typed configs ([`NodeConfig`], [`DiscoveryConfig`]),
//! never config text, for the demo, the routing comparison, the benches and the tests.
//!
//! Where the fleet runs (loopback, relays, the in-memory network) is the caller's business:
//! it passes each node's public URL in and gets each node's config out.

use std::path::{Path, PathBuf};

use edgeroute_discovery::DiscoveryConfig;
use edgeroute_discovery::config::StaticNode;
use edgeroute_node::NodeConfig;
use edgeroute_node::config::{BackendConfig, OpenAiConfig, PipelineSpec, UpstreamModel};
use edgeroute_sim::{GpuConfig, SimConfig, SimModel};

/// The LLM every simulated node serves, and the speech models some do.
pub const LLM: &str = "sim-llama";
pub const STT: &str = "sim-whisper";
pub const TTS: &str = "sim-tts";

/// One node: id (also its host name on an in-memory network), region, the simulator's base
/// time to first token, and its models (one GPU each; none listed = the simulator's default,
/// [`LLM`] on `gpu0`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub id: String,
    pub region: String,
    pub ttft_ms: u64,
    pub models: Vec<String>,
    /// Declares the voice pipeline STT → LLM → TTS (its models must be in `models`).
    pub pipeline: bool,
}

impl NodeSpec {
    pub fn new(id: &str, region: &str, ttft_ms: u64) -> NodeSpec {
        NodeSpec { id: id.into(), region: region.into(), ttft_ms, models: vec![], pipeline: false }
    }
}

/// How the fleet's nodes and replicas verify callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetAuth {
    /// Every caller is tenant `anonymous` (loopback labs only).
    Open,
    /// HS256 tokens signed with the secret in this file.
    Hs256File(PathBuf),
}

/// What every node serves with.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetBackend {
    /// The built-in simulator: each node's models on their own GPUs, at the node's speed.
    Sim {
        tokens_per_s: f64,
        /// Per prompt token, added to the first token (the simulator's default is 200).
        prefill_us_per_token: u64,
        /// A spare GPU per node, for a model loaded at run time.
        spare_gpu: bool,
    },
    /// A real OpenAI-compatible upstream behind every node, serving `model`.
    OpenAi { upstream: String, model: String },
}

/// A fleet: its nodes, the regions its clients and discovery replicas are in, and the
/// settings every node shares.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub nodes: Vec<NodeSpec>,
    pub regions: Vec<String>,
    pub auth: FleetAuth,
    pub backend: FleetBackend,
    /// The simulator's seed: every node answers alike (a continuation elsewhere is seamless)
    /// unless `seed_per_node`, when node `i` has `seed + i`.
    pub seed: u64,
    pub seed_per_node: bool,
    /// Per-tenant rate limit of every node (labs load one tenant far past the default).
    pub rate_limit_per_s: u32,
    /// Discovery's probe interval and timeout, ms.
    pub probe_ms: (u64, u64),
}

/// A node of the reference fleet as a constant, for tables sized at compile time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeDef {
    pub id: &'static str,
    pub region: &'static str,
    pub ttft_ms: u64,
    pub models: &'static [&'static str],
    pub pipeline: bool,
}

/// The fleet of the demo and the routing comparison: six simulator nodes, two in each of
/// Vancouver, Toronto and Montreal, the fastest in Toronto. Every node serves the LLM;
/// speech-to-text and text-to-speech sit on some; `van-1` holds the voice pipeline.
pub const CANADA: [NodeDef; 6] = [
    NodeDef {
        id: "van-1",
        region: "vancouver",
        ttft_ms: 45,
        models: &[STT, LLM, TTS],
        pipeline: true,
    },
    NodeDef { id: "van-2", region: "vancouver", ttft_ms: 60, models: &[LLM], pipeline: false },
    NodeDef { id: "tor-1", region: "toronto", ttft_ms: 15, models: &[LLM], pipeline: false },
    NodeDef { id: "tor-2", region: "toronto", ttft_ms: 30, models: &[LLM, STT], pipeline: false },
    NodeDef { id: "mtl-1", region: "montreal", ttft_ms: 25, models: &[LLM, TTS], pipeline: false },
    NodeDef {
        id: "mtl-2",
        region: "montreal",
        ttft_ms: 40,
        models: &[LLM, STT, TTS],
        pipeline: false,
    },
];

/// [`CANADA`]'s regions, west to east.
pub const CANADA_REGIONS: [&str; 3] = ["vancouver", "toronto", "montreal"];

impl From<&NodeDef> for NodeSpec {
    fn from(d: &NodeDef) -> NodeSpec {
        NodeSpec {
            id: d.id.into(),
            region: d.region.into(),
            ttft_ms: d.ttft_ms,
            models: d.models.iter().map(|m| (*m).to_owned()).collect(),
            pipeline: d.pipeline,
        }
    }
}

impl FleetSpec {
    /// [`CANADA`], open, on the simulator at 400 tokens/s.
    pub fn canada() -> FleetSpec {
        FleetSpec {
            nodes: CANADA.iter().map(NodeSpec::from).collect(),
            regions: CANADA_REGIONS.iter().map(|r| (*r).to_owned()).collect(),
            ..FleetSpec::open()
        }
    }

    /// The same nodes serving only the simulator's default model ([`LLM`] on one GPU).
    pub fn llm_only(mut self) -> FleetSpec {
        for n in &mut self.nodes {
            n.models.clear();
            n.pipeline = false;
        }
        self
    }

    /// Three simulator nodes serving [`LLM`] with no delay at all (the overhead reference):
    /// `tor-1`, `mtl-1`, `van-1`.
    pub fn zero_latency_trio() -> FleetSpec {
        FleetSpec {
            nodes: vec![
                NodeSpec::new("tor-1", "toronto", 0),
                NodeSpec::new("mtl-1", "montreal", 0),
                NodeSpec::new("van-1", "vancouver", 0),
            ],
            regions: vec!["toronto".into(), "montreal".into(), "vancouver".into()],
            backend: FleetBackend::Sim {
                tokens_per_s: 0.0,
                prefill_us_per_token: 0,
                spare_gpu: false,
            },
            ..FleetSpec::open()
        }
    }

    /// No nodes yet; open auth, the simulator at 400 tokens/s with no prefill cost, limits
    /// out of the way, probes every 250 ms.
    pub fn open() -> FleetSpec {
        FleetSpec {
            nodes: vec![],
            regions: vec![],
            auth: FleetAuth::Open,
            backend: FleetBackend::Sim {
                tokens_per_s: 400.0,
                prefill_us_per_token: 0,
                spare_gpu: false,
            },
            seed: 0,
            seed_per_node: false,
            rate_limit_per_s: 1_000_000,
            probe_ms: (250, 200),
        }
    }

    /// One node, `id` in region `local`, trusting HS256 tokens signed with the secret in
    /// `secret_file`, serving with `backend`: the fleet of a single-node benchmark.
    pub fn single(id: &str, ttft_ms: u64, secret_file: &Path, backend: FleetBackend) -> FleetSpec {
        FleetSpec {
            nodes: vec![NodeSpec::new(id, "local", ttft_ms)],
            regions: vec!["local".into()],
            auth: FleetAuth::Hs256File(secret_file.to_owned()),
            backend,
            ..FleetSpec::open()
        }
    }

    pub fn node(&self, id: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Node `i`'s config, announcing `public_url` (where clients reach it).
    pub fn node_config(&self, i: usize, public_url: Option<String>) -> NodeConfig {
        let spec = &self.nodes[i];
        let mut cfg = NodeConfig::new(&spec.id, &spec.region);
        cfg.node.public_url = public_url;
        match &self.auth {
            FleetAuth::Open => cfg.node.allow_unauthenticated = true,
            FleetAuth::Hs256File(path) => {
                cfg.auth = Some(edgeroute_auth::AuthConfig {
                    hs256_secret_file: Some(path.clone()),
                    ..Default::default()
                });
            }
        }
        cfg.limits.rate_limit_per_s = self.rate_limit_per_s;
        cfg.limits.rate_limit_burst = self.rate_limit_per_s;
        cfg.backend = match &self.backend {
            FleetBackend::Sim { tokens_per_s, prefill_us_per_token, spare_gpu } => {
                let mut sim = SimConfig {
                    seed: if self.seed_per_node {
                        self.seed.wrapping_add(i as u64)
                    } else {
                        self.seed
                    },
                    ttft_base_ms: spec.ttft_ms,
                    prefill_us_per_token: *prefill_us_per_token,
                    tokens_per_s: *tokens_per_s,
                    ..SimConfig::default()
                };
                if !spec.models.is_empty() {
                    sim.gpus =
                        (0..spec.models.len()).map(|g| GpuConfig::new(format!("gpu{g}"))).collect();
                    sim.models = spec
                        .models
                        .iter()
                        .enumerate()
                        .map(|(g, m)| SimModel::new(m.clone(), format!("gpu{g}")))
                        .collect();
                }
                if *spare_gpu {
                    sim.gpus.push(GpuConfig::new(format!("gpu{}", sim.gpus.len())));
                }
                BackendConfig::Sim { sim }
            }
            FleetBackend::OpenAi { upstream, model } => BackendConfig::Openai(OpenAiConfig {
                models: vec![UpstreamModel::new(model)],
                ..OpenAiConfig::new(upstream)
            }),
        };
        if spec.pipeline && matches!(self.backend, FleetBackend::Sim { .. }) {
            cfg.pipelines = vec![PipelineSpec {
                id: "voice".into(),
                models: vec![STT.into(), LLM.into(), TTS.into()],
            }];
        }
        cfg
    }

    /// The discovery replica of `region`, named `disc-<first three letters>`.
    pub fn discovery_config(&self, region: &str) -> DiscoveryConfig {
        let mut cfg = DiscoveryConfig::default();
        cfg.discovery.id = discovery_id(region);
        cfg.discovery.region = region.into();
        cfg.discovery.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        match &self.auth {
            FleetAuth::Open => cfg.discovery.allow_unauthenticated = true,
            FleetAuth::Hs256File(path) => {
                cfg.auth = Some(edgeroute_auth::AuthConfig {
                    hs256_secret_file: Some(path.clone()),
                    ..Default::default()
                });
            }
        }
        // The lab's nodes announce `http://` URLs on loopback or the in-memory network: an
        // explicit opt-in, as a real fleet's `https://` nodes under a fleet CA need none.
        cfg.announced.allow_plaintext = true;
        (cfg.probe.interval_ms, cfg.probe.timeout_ms) = self.probe_ms;
        cfg
    }

    /// A replica that knows the nodes from configuration (no bus), at `urls[i]`.
    pub fn static_discovery_config(&self, region: &str, urls: &[String]) -> DiscoveryConfig {
        let mut cfg = self.discovery_config(region);
        cfg.nodes = self
            .nodes
            .iter()
            .zip(urls)
            .map(|(n, url)| StaticNode {
                id: n.id.clone(),
                url: url.clone(),
                region: n.region.clone(),
                cost_per_1k: None,
                jurisdiction: None,
            })
            .collect();
        cfg
    }
}

/// A discovery replica's id (and host name) in `region`.
pub fn discovery_id(region: &str) -> String {
    format!("disc-{}", region.get(..3).unwrap_or(region))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[test]
    fn every_node_and_replica_of_the_canada_fleet_validates() {
        let mut fleet = FleetSpec::canada();
        fleet.auth = FleetAuth::Hs256File("/tmp/secret".into());
        for i in 0..fleet.nodes.len() {
            let cfg = fleet.node_config(i, Some(format!("http://{}", fleet.nodes[i].id)));
            cfg.validate().unwrap();
            let BackendConfig::Sim { sim } = &cfg.backend else { panic!("sim backend") };
            sim.validate().unwrap();
            assert_eq!(sim.models.len(), fleet.nodes[i].models.len());
            assert_eq!(sim.seed, 0, "alike unless asked");
        }
        assert_eq!(fleet.node_config(0, None).pipelines.len(), 1);
        assert!(fleet.node_config(1, None).pipelines.is_empty());
        for r in &fleet.regions {
            let d = fleet.discovery_config(r);
            d.validate().unwrap();
            assert!(d.auth.is_some() && !d.discovery.allow_unauthenticated);
            assert!(d.announced.allow_plaintext, "the lab's nodes announce http:// URLs");
        }
        let open = FleetSpec::canada().discovery_config("toronto");
        assert!(open.auth.is_none() && open.discovery.allow_unauthenticated);
        open.validate().unwrap();
        assert_eq!(discovery_id("toronto"), "disc-tor");
    }

    #[test]
    fn a_spare_gpu_leaves_room_for_a_load_and_an_upstream_fleet_has_no_pipeline() {
        let mut fleet = FleetSpec::canada();
        fleet.backend =
            FleetBackend::Sim { tokens_per_s: 400.0, prefill_us_per_token: 0, spare_gpu: true };
        let BackendConfig::Sim { sim } = fleet.node_config(2, None).backend else { panic!() };
        assert_eq!(sim.gpus.len(), 2);
        fleet.backend =
            FleetBackend::OpenAi { upstream: "http://127.0.0.1:9".into(), model: "m".into() };
        let cfg = fleet.node_config(0, None);
        assert!(cfg.pipelines.is_empty());
        let BackendConfig::Openai(o) = cfg.backend else { panic!() };
        assert_eq!(o.models[0].id, "m");
    }

    #[test]
    fn a_static_replica_lists_every_node_at_its_url() {
        let fleet = FleetSpec::zero_latency_trio();
        let urls: Vec<String> = (0..3).map(|i| format!("http://127.0.0.1:{}", 9000 + i)).collect();
        let d = fleet.static_discovery_config("toronto", &urls);
        d.validate().unwrap();
        assert_eq!(
            d.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["tor-1", "mtl-1", "van-1"]
        );
        assert_eq!(d.nodes[2].url, "http://127.0.0.1:9002");
    }
}
