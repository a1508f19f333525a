//! The compiled policy: the registry, tenants, cloud pools and rules, parsed, validated and
//! indexed once so a decision only follows indices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::doc::{RawPolicy, RawRule};
use crate::expr::{Expression, ExpressionEngine};
use crate::hash::stable_hash;
use crate::types::{Claims, Class, Hardware, Price, Sticky, StrategyKind};

/// The most fallback models a rule's cascade may name.
pub const MAX_CASCADE: usize = 8;
/// The most tiers a rule may name.
pub const MAX_TIERS: usize = 8;
/// The most versions a model may have.
pub const MAX_VERSIONS: usize = 64;
/// The most candidates a rule may ask for.
pub const MAX_K: usize = 64;
/// The most rules a policy may hold.
pub const MAX_RULES: usize = 4096;

/// Why a policy text was refused. Nothing of a refused text is ever applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML, a field of the wrong type, a missing field or an unknown one.
    #[error("line {line}, column {column}: {message}")]
    Syntax { line: usize, column: usize, message: String },
    /// Well-formed but inconsistent: `field` is a path (`rules[2].cascade`), `rule` the rule's id
    /// when the field is in a rule.
    #[error("{}{field}: {message}", rule.as_ref().map(|r| format!("rule `{r}`, ")).unwrap_or_default())]
    Invalid { rule: Option<String>, field: String, message: String },
}

/// Why a model version may not be loaded on a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("model `{0}` is not in the registry")]
    UnknownModel(String),
    #[error("model `{model}` has no version `{version}`")]
    UnknownVersion { model: String, version: String },
    #[error("`{model}` may not be placed in region `{region}`")]
    Region { model: String, region: String },
    #[error("`{model}` may not be placed in jurisdiction `{}`", jurisdiction.as_deref().unwrap_or("(none)"))]
    Jurisdiction { model: String, jurisdiction: Option<String> },
    #[error("`{model}` may not run on `{}` hardware", hardware.name())]
    Hardware { model: String, hardware: Hardware },
}

/// A version of a logical model.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionDef {
    pub id: Arc<str>,
    /// The hub revision the version is built from.
    pub revision: Option<String>,
    pub quant: Option<String>,
    /// Where this version may be placed (empty: wherever the model may).
    pub regions: Vec<String>,
    pub jurisdictions: Vec<String>,
    pub hardware: Vec<Hardware>,
}

/// A logical model: a name clients ask for, and its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDef {
    pub name: Arc<str>,
    /// Index into `versions` of the version served when no rule splits or pins one.
    pub default_version: usize,
    pub regions: Vec<String>,
    pub jurisdictions: Vec<String>,
    pub hardware: Vec<Hardware>,
    pub versions: Vec<VersionDef>,
}

impl ModelDef {
    pub fn version_index(&self, id: &str) -> Option<usize> {
        self.versions.iter().position(|v| &*v.id == id)
    }
}

/// The model registry: logical names, versions, placement constraints.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    models: Vec<ModelDef>,
    by_name: HashMap<Arc<str>, u32>,
}

impl Registry {
    pub fn models(&self) -> &[ModelDef] {
        &self.models
    }

    pub fn model(&self, name: &str) -> Option<&ModelDef> {
        self.index(name).map(|i| &self.models[i as usize])
    }

    pub(crate) fn index(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Whether `model`'s `version` may be placed on a node of this region, jurisdiction and
    /// hardware: the node's load API refuses the load otherwise. The model's lists and the
    /// version's must both allow it (an empty list allows anything).
    pub fn check_placement(
        &self,
        model: &str,
        version: &str,
        node_region: &str,
        node_jurisdiction: Option<&str>,
        hardware: Hardware,
    ) -> Result<(), PlacementError> {
        let m = self.model(model).ok_or_else(|| PlacementError::UnknownModel(model.into()))?;
        let v = m.version_index(version).map(|i| &m.versions[i]).ok_or_else(|| {
            PlacementError::UnknownVersion { model: model.into(), version: version.into() }
        })?;
        for (regions, jurisdictions, hw) in [
            (&m.regions, &m.jurisdictions, &m.hardware),
            (&v.regions, &v.jurisdictions, &v.hardware),
        ] {
            if !regions.is_empty() && !regions.iter().any(|r| r == node_region) {
                return Err(PlacementError::Region {
                    model: model.into(),
                    region: node_region.into(),
                });
            }
            if !jurisdictions.is_empty()
                && !node_jurisdiction.is_some_and(|j| jurisdictions.iter().any(|x| x == j))
            {
                return Err(PlacementError::Jurisdiction {
                    model: model.into(),
                    jurisdiction: node_jurisdiction.map(str::to_owned),
                });
            }
            if !hw.is_empty() && !hw.contains(&hardware) {
                return Err(PlacementError::Hardware { model: model.into(), hardware });
            }
        }
        Ok(())
    }

    /// The flat index of a model's version (nodes carry these, not strings).
    pub(crate) fn vid(&self, model: u32, version: usize) -> u32 {
        // Models hold at most MAX_VERSIONS versions.
        model * MAX_VERSIONS as u32 + version as u32
    }
}

/// A regional cloud pool: an OpenAI-compatible endpoint registered as `tier = "cloud"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: Arc<str>,
    pub endpoint: String,
    pub region: String,
    /// The pool's jurisdiction (given, or mapped from its region).
    pub jurisdiction: Option<String>,
    /// Logical model → version served.
    pub serves: BTreeMap<String, String>,
    pub price: Price,
}

/// Where a rule's tier sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TierRef {
    Edge,
    Pool(u16),
}

/// The weights of the score strategies (all in ms of predicted first token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWeights {
    /// Multiplies the node's TTFT p50.
    pub ttft: f64,
    /// Multiplies the queue wait (queue × p50 / capacity).
    pub queue: f64,
    /// Multiplies the client's RTT to the node's region.
    pub rtt: f64,
    /// Added per unit of error rate.
    pub error_ms: f64,
    /// Added per unit of load (in-flight / capacity).
    pub load_ms: f64,
    /// Added per unit of blended price per 1k tokens.
    pub cost_ms: f64,
}

impl ScoreWeights {
    pub fn for_strategy(s: StrategyKind) -> ScoreWeights {
        let base = ScoreWeights {
            ttft: 1.0,
            queue: 1.0,
            rtt: 1.0,
            error_ms: 2000.0,
            load_ms: 0.0,
            cost_ms: 0.0,
        };
        match s {
            StrategyKind::AvailabilityFirst => ScoreWeights { load_ms: 300.0, ..base },
            StrategyKind::CostOptimized => ScoreWeights { cost_ms: 100.0, ..base },
            _ => base,
        }
    }
}

/// Strict upper bounds on node figures: a node passes when its figure is below the bound. As
/// written in a rule's `below` table, then checked (finite, non-negative) by `compile_below`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Below {
    pub ttft_p99_ms: Option<f64>,
    pub queue: Option<u32>,
    pub gpu_util: Option<f64>,
    pub error_rate: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub price_per_1k: Option<f64>,
    pub request_price: Option<f64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub id: Arc<str>,
    // match
    pub tenants: Vec<String>,
    pub claims: Vec<(String, String)>,
    pub models: Vec<u32>,
    pub class: Option<Class>,
    pub streamed: Option<bool>,
    pub client_regions: Vec<String>,
    // constraints
    pub regions: Vec<String>,
    pub jurisdictions: Vec<String>,
    pub hardware: Vec<Hardware>,
    pub below: Below,
    pub expr: Option<Arc<dyn Expression>>,
    // targets
    /// (version index, weight), weight > 0, for the rule's one model.
    pub versions: Vec<(usize, u32)>,
    pub total_weight: u64,
    pub sticky: Sticky,
    pub cascade: Vec<u32>,
    pub tiers: Vec<TierRef>,
    pub strategy: StrategyKind,
    pub score: ScoreWeights,
    pub weights: Vec<(String, u32)>,
    pub k: Option<usize>,
}

impl Rule {
    pub(crate) fn matches(&self, claims: &Claims, r: &crate::Request<'_>) -> bool {
        (self.tenants.is_empty() || self.tenants.contains(&claims.sub))
            && self.claims.iter().all(|(k, v)| claims.attrs.get(k) == Some(v))
            && self.class.is_none_or(|c| c == r.class)
            && self.streamed.is_none_or(|s| s == r.streamed)
            && (self.client_regions.is_empty()
                || r.client_region.is_some_and(|c| self.client_regions.iter().any(|x| x == c)))
    }

    /// Whether the rule's match needs nothing of the request beyond the model.
    pub(crate) fn matches_everything(&self) -> bool {
        self.tenants.is_empty()
            && self.claims.is_empty()
            && self.class.is_none()
            && self.streamed.is_none()
            && self.client_regions.is_empty()
    }
}

/// What the policy says of one tenant's residency.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct TenantResidency {
    pub jurisdictions: Option<Vec<String>>,
    pub regions: Option<Vec<String>>,
}

/// A parsed, validated, indexed policy document. Immutable: a reload builds a new one.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) version: Arc<str>,
    pub(crate) fingerprint: u64,
    pub(crate) region_jurisdiction: HashMap<String, String>,
    pub(crate) registry: Registry,
    pub(crate) tenants: HashMap<String, TenantResidency>,
    pub(crate) pools: Vec<Arc<Pool>>,
    pub(crate) rules: Vec<Rule>,
    /// Model index → the rules that may match it, in document order.
    pub(crate) by_model: Vec<Vec<u16>>,
    pub(crate) edge: Arc<str>,
}

fn invalid(
    rule: Option<&str>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> PolicyError {
    PolicyError::Invalid {
        rule: rule.map(str::to_owned),
        field: field.into(),
        message: message.into(),
    }
}

/// Whether a name may travel in the decision header (`v=..;rule=..;tier=..;ver=..`).
fn header_safe(s: &str) -> bool {
    !s.is_empty() && !s.contains([';', '=', ',', ' ']) && !s.chars().any(|c| c.is_control())
}

fn finite_nonneg(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn no_duplicates<'a>(
    items: impl IntoIterator<Item = &'a str>,
    rule: Option<&str>,
    field: &str,
) -> Result<(), PolicyError> {
    let mut seen = BTreeSet::new();
    for i in items {
        if !seen.insert(i) {
            return Err(invalid(rule, field, format!("`{i}` is listed twice")));
        }
    }
    Ok(())
}

impl Policy {
    /// Parses and validates a policy document, with the build's expression engine.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse_with(text, crate::expr::default_engine())
    }

    /// As [`Policy::parse`], with expressions compiled by `engine`.
    pub fn parse_with(text: &str, engine: &dyn ExpressionEngine) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            PolicyError::Syntax { line, column, message: e.message().to_owned() }
        })?;
        compile(raw, engine, stable_hash(&[text.as_bytes()]))
    }

    /// The document's `version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    pub fn rule_ids(&self) -> impl ExactSizeIterator<Item = &str> {
        self.rules.iter().map(|r| &*r.id)
    }

    /// The jurisdiction the policy maps `region` to.
    pub fn jurisdiction_of(&self, region: &str) -> Option<&str> {
        self.region_jurisdiction.get(region).map(String::as_str)
    }

    /// [`Registry::check_placement`], the node's jurisdiction mapped from its region when it
    /// reports none.
    pub fn check_placement(
        &self,
        model: &str,
        version: &str,
        node_region: &str,
        node_jurisdiction: Option<&str>,
        hardware: Hardware,
    ) -> Result<(), PlacementError> {
        let j = node_jurisdiction.or_else(|| self.jurisdiction_of(node_region));
        self.registry.check_placement(model, version, node_region, j, hardware)
    }

    /// Whether a tenant's data may be processed on a node of this region and jurisdiction:
    /// its token's claims and the policy's `[[tenants]]` entry both have to allow it.
    pub fn residency_allows(
        &self,
        claims: &Claims,
        node_region: &str,
        node_jurisdiction: Option<&str>,
    ) -> bool {
        let j = node_jurisdiction.or_else(|| self.jurisdiction_of(node_region));
        crate::residency::residency_allows(claims, node_region, j)
            && self.tenants.get(&claims.sub).is_none_or(|t| {
                crate::residency::lists_allow(
                    t.jurisdictions.as_deref(),
                    t.regions.as_deref(),
                    node_region,
                    j,
                )
            })
    }

    pub(crate) fn rule_for(&self, model: u32, r: &crate::Request<'_>) -> Option<u16> {
        self.by_model
            .get(model as usize)?
            .iter()
            .copied()
            .find(|&i| self.rules[usize::from(i)].matches(r.claims, r))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
    (line, column)
}

fn compile(
    raw: RawPolicy,
    engine: &dyn ExpressionEngine,
    fingerprint: u64,
) -> Result<Policy, PolicyError> {
    if !header_safe(&raw.version) {
        return Err(invalid(
            None,
            "version",
            "non-empty, without `;`, `=`, `,`, spaces or control characters (it travels in a header)",
        ));
    }
    // Jurisdictions.
    let mut region_jurisdiction = HashMap::new();
    for (j, regions) in &raw.jurisdictions {
        for r in regions {
            if let Some(prev) = region_jurisdiction.insert(r.clone(), j.clone()) {
                return Err(invalid(
                    None,
                    format!("jurisdictions.{j}"),
                    format!("region `{r}` is already in jurisdiction `{prev}`"),
                ));
            }
        }
    }
    let known_jurisdiction = |j: &str| raw.jurisdictions.contains_key(j);

    // Registry.
    let mut registry = Registry::default();
    for (mi, m) in raw.models.iter().enumerate() {
        let at = |f: &str| format!("models[{mi}].{f}");
        if m.name.is_empty() {
            return Err(invalid(None, at("name"), "must not be empty"));
        }
        if registry.by_name.contains_key(m.name.as_str()) {
            return Err(invalid(None, at("name"), format!("model `{}` is declared twice", m.name)));
        }
        if m.versions.is_empty() {
            return Err(invalid(None, at("versions"), "a model needs at least one version"));
        }
        if m.versions.len() > MAX_VERSIONS {
            return Err(invalid(None, at("versions"), format!("at most {MAX_VERSIONS} versions")));
        }
        no_duplicates(m.versions.iter().map(|v| v.id.as_str()), None, &at("versions"))?;
        for j in m.jurisdictions.iter().chain(m.versions.iter().flat_map(|v| &v.jurisdictions)) {
            if !known_jurisdiction(j) {
                return Err(invalid(
                    None,
                    at("jurisdictions"),
                    format!("unknown jurisdiction `{j}`"),
                ));
            }
        }
        let versions: Vec<VersionDef> = m
            .versions
            .iter()
            .map(|v| VersionDef {
                id: v.id.as_str().into(),
                revision: v.revision.clone(),
                quant: v.quant.clone(),
                regions: v.regions.clone(),
                jurisdictions: v.jurisdictions.clone(),
                hardware: v.hardware.clone(),
            })
            .collect();
        if versions.iter().any(|v| !header_safe(&v.id)) {
            return Err(invalid(
                None,
                at("versions"),
                "a version id is non-empty, without `;`, `=`, `,`, spaces or control characters (it travels in a header)",
            ));
        }
        let default_version = match &m.default_version {
            None => 0,
            Some(d) => versions.iter().position(|v| &*v.id == d).ok_or_else(|| {
                invalid(
                    None,
                    at("default_version"),
                    format!("`{d}` is not one of the model's versions"),
                )
            })?,
        };
        let name: Arc<str> = m.name.as_str().into();
        registry.by_name.insert(name.clone(), mi as u32);
        registry.models.push(ModelDef {
            name,
            default_version,
            regions: m.regions.clone(),
            jurisdictions: m.jurisdictions.clone(),
            hardware: m.hardware.clone(),
            versions,
        });
    }

    // Tenants.
    let mut tenants = HashMap::new();
    for (ti, t) in raw.tenants.iter().enumerate() {
        for j in t.jurisdictions.iter().flatten() {
            if !known_jurisdiction(j) {
                return Err(invalid(
                    None,
                    format!("tenants[{ti}].jurisdictions"),
                    format!("unknown jurisdiction `{j}`"),
                ));
            }
        }
        let entry =
            TenantResidency { jurisdictions: t.jurisdictions.clone(), regions: t.regions.clone() };
        if tenants.insert(t.sub.clone(), entry).is_some() {
            return Err(invalid(
                None,
                format!("tenants[{ti}].sub"),
                format!("tenant `{}` is listed twice", t.sub),
            ));
        }
    }

    // Pools.
    let mut pools = Vec::new();
    for (pi, p) in raw.pools.iter().enumerate() {
        let at = |f: &str| format!("pools[{pi}].{f}");
        if !header_safe(&p.name) || p.name == "edge" {
            return Err(invalid(None, at("name"), "must be non-empty and not `edge`"));
        }
        if pools.iter().any(|q: &Arc<Pool>| *q.name == *p.name) {
            return Err(invalid(None, at("name"), format!("pool `{}` is declared twice", p.name)));
        }
        if p.tier != "cloud" {
            return Err(invalid(
                None,
                at("tier"),
                format!("`{}`: the only pool tier is `cloud`", p.tier),
            ));
        }
        if p.endpoint.is_empty() {
            return Err(invalid(None, at("endpoint"), "must not be empty"));
        }
        if !finite_nonneg(p.price_in_per_1k) || !finite_nonneg(p.price_out_per_1k) {
            return Err(invalid(None, at("price_in_per_1k"), "prices are finite and ≥ 0"));
        }
        for (model, version) in &p.serves {
            let m = registry.model(model).ok_or_else(|| {
                invalid(None, at("serves"), format!("model `{model}` is not in the registry"))
            })?;
            if m.version_index(version).is_none() {
                return Err(invalid(
                    None,
                    at("serves"),
                    format!("model `{model}` has no version `{version}`"),
                ));
            }
        }
        if let Some(j) = &p.jurisdiction
            && !known_jurisdiction(j)
        {
            return Err(invalid(None, at("jurisdiction"), format!("unknown jurisdiction `{j}`")));
        }
        let jurisdiction =
            p.jurisdiction.clone().or_else(|| region_jurisdiction.get(&p.region).cloned());
        pools.push(Arc::new(Pool {
            name: p.name.as_str().into(),
            endpoint: p.endpoint.clone(),
            region: p.region.clone(),
            jurisdiction,
            serves: p.serves.clone(),
            price: Price { input_per_1k: p.price_in_per_1k, output_per_1k: p.price_out_per_1k },
        }));
    }
    if pools.len() > usize::from(u16::MAX) {
        return Err(invalid(None, "pools", "too many pools"));
    }

    // Rules.
    if raw.rules.len() > MAX_RULES {
        return Err(invalid(None, "rules", format!("at most {MAX_RULES} rules")));
    }
    let mut rules = Vec::new();
    let mut ids = BTreeSet::new();
    for (ri, r) in raw.rules.iter().enumerate() {
        let rule = compile_rule(ri, r, &registry, &pools, &known_jurisdiction, engine)?;
        if !ids.insert(r.id.clone()) {
            return Err(invalid(Some(&r.id), format!("rules[{ri}].id"), "rule ids are unique"));
        }
        rules.push(rule);
    }

    // Cascades never loop: the graph model → fallback over every rule that may match the
    // model is acyclic.
    check_cascades(&registry, &rules)?;

    let mut by_model = vec![Vec::new(); registry.models.len()];
    for (i, r) in rules.iter().enumerate() {
        let i = i as u16;
        if r.models.is_empty() {
            by_model.iter_mut().for_each(|v| v.push(i));
        } else {
            for &m in &r.models {
                by_model[m as usize].push(i);
            }
        }
    }

    Ok(Policy {
        version: raw.version.as_str().into(),
        fingerprint,
        region_jurisdiction,
        registry,
        tenants,
        pools,
        rules,
        by_model,
        edge: "edge".into(),
    })
}

fn compile_rule(
    ri: usize,
    r: &RawRule,
    registry: &Registry,
    pools: &[Arc<Pool>],
    known_jurisdiction: &dyn Fn(&str) -> bool,
    engine: &dyn ExpressionEngine,
) -> Result<Rule, PolicyError> {
    let id = Some(r.id.as_str());
    let at = |f: &str| format!("rules[{ri}].{f}");
    if !header_safe(&r.id) {
        return Err(invalid(
            id,
            at("id"),
            "non-empty, without `;`, `=`, `,`, spaces or control characters (it travels in a header)",
        ));
    }
    let model_index = |name: &str, field: &str| {
        registry
            .index(name)
            .ok_or_else(|| invalid(id, at(field), format!("model `{name}` is not in the registry")))
    };
    no_duplicates(r.matcher.models.iter().map(String::as_str), id, &at("match.models"))?;
    let models = r
        .matcher
        .models
        .iter()
        .map(|m| model_index(m, "match.models"))
        .collect::<Result<Vec<_>, _>>()?;
    for j in &r.constraints.jurisdictions {
        if !known_jurisdiction(j) {
            return Err(invalid(
                id,
                at("constraints.jurisdictions"),
                format!("unknown jurisdiction `{j}`"),
            ));
        }
    }
    let below = compile_below(&r.constraints.below)
        .map_err(|f| invalid(id, at(&format!("constraints.below.{f}")), "a finite number ≥ 0"))?;
    let expr = match &r.constraints.expr {
        None => None,
        Some(src) => Some(engine.compile(src).map_err(|e| invalid(id, at("constraints.expr"), e))?),
    };
    // Versions (canary weights).
    let mut versions = Vec::new();
    let mut total_weight = 0u64;
    if !r.versions.is_empty() {
        let [m] = models[..] else {
            return Err(invalid(
                id,
                at("versions"),
                "a version split needs `match.models` to name exactly one model",
            ));
        };
        let def = &registry.models[m as usize];
        for (v, &w) in &r.versions {
            let vi = def.version_index(v).ok_or_else(|| {
                invalid(id, at("versions"), format!("model `{}` has no version `{v}`", def.name))
            })?;
            if w > 0 {
                versions.push((vi, w));
                total_weight += u64::from(w);
            }
        }
        if total_weight == 0 {
            return Err(invalid(id, at("versions"), "the weights sum to 0"));
        }
        // Declaration order of the registry, so the split is independent of TOML key order.
        versions.sort_by_key(|&(vi, _)| vi);
    }
    // Cascade.
    if r.cascade.len() > MAX_CASCADE {
        return Err(invalid(id, at("cascade"), format!("at most {MAX_CASCADE} fallback models")));
    }
    no_duplicates(r.cascade.iter().map(String::as_str), id, &at("cascade"))?;
    let cascade =
        r.cascade.iter().map(|m| model_index(m, "cascade")).collect::<Result<Vec<_>, _>>()?;
    // Tiers.
    let tiers = match &r.tiers {
        None => vec![TierRef::Edge],
        Some(t) if t.is_empty() => return Err(invalid(id, at("tiers"), "at least one tier")),
        Some(t) if t.len() > MAX_TIERS => {
            return Err(invalid(id, at("tiers"), format!("at most {MAX_TIERS} tiers")));
        }
        Some(t) => {
            no_duplicates(t.iter().map(String::as_str), id, &at("tiers"))?;
            t.iter()
                .map(|name| {
                    if name == "edge" {
                        return Ok(TierRef::Edge);
                    }
                    pools
                        .iter()
                        .position(|p| *p.name == **name)
                        .map(|i| TierRef::Pool(i as u16))
                        .ok_or_else(|| {
                            invalid(
                                id,
                                at("tiers"),
                                format!("`{name}` is neither `edge` nor a pool"),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let strategy = r.strategy.unwrap_or_default();
    let mut score = ScoreWeights::for_strategy(strategy);
    if let Some(s) = &r.score {
        for (name, slot, v) in [
            ("ttft", &mut score.ttft, s.ttft),
            ("queue", &mut score.queue, s.queue),
            ("rtt", &mut score.rtt, s.rtt),
            ("error_ms", &mut score.error_ms, s.error_ms),
            ("load_ms", &mut score.load_ms, s.load_ms),
            ("cost_ms", &mut score.cost_ms, s.cost_ms),
        ] {
            if let Some(v) = v {
                if !finite_nonneg(v) {
                    return Err(invalid(id, at(&format!("score.{name}")), "a finite number ≥ 0"));
                }
                *slot = v;
            }
        }
    }
    if strategy == StrategyKind::Weighted && r.weights.values().all(|&w| w == 0) {
        return Err(invalid(id, at("weights"), "`weighted` needs at least one weight > 0"));
    }
    if strategy != StrategyKind::Weighted && !r.weights.is_empty() {
        return Err(invalid(id, at("weights"), "`weights` are for `strategy = \"weighted\"`"));
    }
    if let Some(k) = r.k
        && !(1..=MAX_K).contains(&k)
    {
        return Err(invalid(id, at("k"), format!("1 to {MAX_K}")));
    }
    Ok(Rule {
        id: r.id.as_str().into(),
        tenants: r.matcher.tenants.clone(),
        claims: r.matcher.claims.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        models,
        class: r.matcher.class,
        streamed: r.matcher.streamed,
        client_regions: r.matcher.client_regions.clone(),
        regions: r.constraints.regions.clone(),
        jurisdictions: r.constraints.jurisdictions.clone(),
        hardware: r.constraints.hardware.clone(),
        below,
        expr,
        versions,
        total_weight,
        sticky: r.sticky.unwrap_or_default(),
        cascade,
        tiers,
        strategy,
        score,
        weights: r.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        k: r.k,
    })
}

fn compile_below(b: &Below) -> Result<Below, &'static str> {
    let figures = [
        ("ttft_p99_ms", b.ttft_p99_ms),
        ("gpu_util", b.gpu_util),
        ("error_rate", b.error_rate),
        ("rtt_ms", b.rtt_ms),
        ("price_per_1k", b.price_per_1k),
        ("request_price", b.request_price),
    ];
    match figures.into_iter().find(|(_, v)| v.is_some_and(|x| !finite_nonneg(x))) {
        Some((name, _)) => Err(name),
        None => Ok(*b),
    }
}

/// Refuses a policy whose cascades could loop: an edge `m → c` for every rule that may match
/// `m` (every model, for a rule without `match.models`) and every `c` of its cascade.
fn check_cascades(registry: &Registry, rules: &[Rule]) -> Result<(), PolicyError> {
    let n = registry.models.len();
    let mut edges: Vec<Vec<(u32, usize)>> = vec![Vec::new(); n];
    for (ri, r) in rules.iter().enumerate() {
        for &c in &r.cascade {
            if r.models.is_empty() {
                for (m, e) in edges.iter_mut().enumerate() {
                    e.push((c, ri));
                    let _ = m;
                }
            } else {
                for &m in &r.models {
                    edges[m as usize].push((c, ri));
                }
            }
        }
    }
    // Iterative DFS with colours.
    let mut colour = vec![0u8; n]; // 0 new, 1 on stack, 2 done
    for start in 0..n {
        if colour[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        colour[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(to, ri)) = edges[node].get(*next) {
                *next += 1;
                let to = to as usize;
                match colour[to] {
                    0 => {
                        colour[to] = 1;
                        stack.push((to, 0));
                    }
                    1 => {
                        let r = &rules[ri];
                        return Err(invalid(
                            Some(&r.id),
                            format!("rules[{ri}].cascade"),
                            format!(
                                "falling back from `{}` to `{}` can loop back to `{}`",
                                registry.models[node].name,
                                registry.models[to].name,
                                registry.models[to].name
                            ),
                        ));
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}
