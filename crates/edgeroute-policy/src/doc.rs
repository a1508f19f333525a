//! The policy document as TOML spells it. Every table refuses unknown fields: a misspelt
//! `jurisdictons` must not silently drop a residency constraint.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Class, Hardware, Sticky, StrategyKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub version: String,
    /// Jurisdiction → the regions in it.
    #[serde(default)]
    pub jurisdictions: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub name: String,
    #[serde(default)]
    pub default_version: Option<String>,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    #[serde(default)]
    pub hardware: Vec<Hardware>,
    #[serde(default)]
    pub versions: Vec<RawVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVersion {
    pub id: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub quant: Option<String>,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    #[serde(default)]
    pub hardware: Vec<Hardware>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub sub: String,
    #[serde(default)]
    pub jurisdictions: Option<Vec<String>>,
    #[serde(default)]
    pub regions: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub name: String,
    pub tier: String,
    pub endpoint: String,
    pub region: String,
    #[serde(default)]
    pub jurisdiction: Option<String>,
    /// Logical model → the version the pool serves.
    pub serves: BTreeMap<String, String>,
    #[serde(default)]
    pub price_in_per_1k: f64,
    #[serde(default)]
    pub price_out_per_1k: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub id: String,
    #[serde(default, rename = "match")]
    pub matcher: RawMatch,
    #[serde(default)]
    pub constraints: RawConstraints,
    /// Version → weight (canary).
    #[serde(default)]
    pub versions: BTreeMap<String, u32>,
    #[serde(default)]
    pub sticky: Option<Sticky>,
    #[serde(default)]
    pub cascade: Vec<String>,
    #[serde(default)]
    pub tiers: Option<Vec<String>>,
    #[serde(default)]
    pub strategy: Option<StrategyKind>,
    #[serde(default)]
    pub score: Option<RawScore>,
    /// Node id or region → weight, for `strategy = "weighted"`.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    #[serde(default)]
    pub k: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub class: Option<Class>,
    #[serde(default)]
    pub streamed: Option<bool>,
    #[serde(default)]
    pub client_regions: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConstraints {
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub jurisdictions: Vec<String>,
    #[serde(default)]
    pub hardware: Vec<Hardware>,
    #[serde(default)]
    pub below: crate::policy::Below,
    #[serde(default)]
    pub expr: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScore {
    pub ttft: Option<f64>,
    pub queue: Option<f64>,
    pub rtt: Option<f64>,
    pub error_ms: Option<f64>,
    pub load_ms: Option<f64>,
    pub cost_ms: Option<f64>,
}
