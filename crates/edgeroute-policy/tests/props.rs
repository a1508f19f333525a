//! Properties over generated policies, fleets and requests.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use edgeroute_policy::*;
use proptest::prelude::*;
use proptest::sample::subsequence;

const REGIONS: [&str; 5] = ["fra", "ams", "nyc", "sfo", "tok"];
const JURS: [&str; 2] = ["eu", "us"];
const MODELS: [&str; 3] = ["m0", "m1", "m2"];
const VERSIONS: [&str; 2] = ["v1", "v2"];
const TENANTS: [&str; 3] = ["t0", "t1", "t2"];

/// The policy's map, repeated here so the tests check against their own reading of it.
fn jur_of(region: &str) -> Option<&'static str> {
    match region {
        "fra" | "ams" => Some("eu"),
        "nyc" | "sfo" => Some("us"),
        _ => None,
    }
}

fn list(xs: &[&str]) -> String {
    let q: Vec<String> = xs.iter().map(|x| format!("\"{x}\"")).collect();
    format!("[{}]", q.join(", "))
}

#[derive(Debug, Clone)]
struct GenRule {
    models: Vec<&'static str>,
    tenants: Vec<&'static str>,
    batch: Option<bool>,
    regions: Vec<&'static str>,
    jurs: Vec<&'static str>,
    ttft_below: Option<u32>,
    tiers: Vec<usize>, // 0 = edge, 1.. = pool i-1
    split: Option<(u32, u32)>,
    cascade: Vec<&'static str>,
    strategy: usize,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    tenants: Vec<(&'static str, Option<Vec<&'static str>>)>,
    pools: Vec<(&'static str, &'static str, &'static str)>, // region, model, version
    rules: Vec<GenRule>,
}

const STRATEGIES: [&str; 6] = [
    "latency_first",
    "availability_first",
    "cost_optimized",
    "round_robin",
    "least_connections",
    "weighted",
];

impl GenPolicy {
    fn text(&self) -> String {
        let mut t = String::from(
            "version = \"p\"\n[jurisdictions]\neu = [\"fra\", \"ams\"]\nus = [\"nyc\", \"sfo\"]\n",
        );
        for m in MODELS {
            writeln!(t, "[[models]]\nname = \"{m}\"\n[[models.versions]]\nid = \"v1\"\n[[models.versions]]\nid = \"v2\"").unwrap();
        }
        for (sub, j) in &self.tenants {
            writeln!(t, "[[tenants]]\nsub = \"{sub}\"").unwrap();
            if let Some(j) = j {
                writeln!(t, "jurisdictions = {}", list(j)).unwrap();
            }
        }
        for (i, (region, m, v)) in self.pools.iter().enumerate() {
            writeln!(
                t,
                "[[pools]]\nname = \"cloud{i}\"\ntier = \"cloud\"\nendpoint = \"https://c{i}\"\nregion = \"{region}\"\nserves = {{ {m} = \"{v}\" }}\nprice_in_per_1k = 0.1\nprice_out_per_1k = 0.2"
            )
            .unwrap();
        }
        for (i, r) in self.rules.iter().enumerate() {
            writeln!(t, "[[rules]]\nid = \"r{i}\"\nstrategy = \"{}\"", STRATEGIES[r.strategy])
                .unwrap();
            if r.strategy == 5 {
                writeln!(t, "weights = {{ fra = 2, nyc = 1 }}").unwrap();
            }
            if !r.tiers.is_empty() {
                let names: Vec<String> = r
                    .tiers
                    .iter()
                    .map(|&x| if x == 0 { "edge".to_owned() } else { format!("cloud{}", x - 1) })
                    .collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                writeln!(t, "tiers = {}", list(&names)).unwrap();
            }
            if !r.cascade.is_empty() {
                writeln!(t, "cascade = {}", list(&r.cascade)).unwrap();
            }
            if let (Some((a, b)), [_]) = (r.split, &r.models[..]) {
                writeln!(t, "versions = {{ v1 = {a}, v2 = {b} }}").unwrap();
            }
            writeln!(
                t,
                "[rules.match]\nmodels = {}\ntenants = {}",
                list(&r.models),
                list(&r.tenants)
            )
            .unwrap();
            if let Some(b) = r.batch {
                writeln!(t, "class = \"{}\"", if b { "batch" } else { "interactive" }).unwrap();
            }
            writeln!(
                t,
                "[rules.constraints]\nregions = {}\njurisdictions = {}",
                list(&r.regions),
                list(&r.jurs)
            )
            .unwrap();
            if let Some(ms) = r.ttft_below {
                writeln!(t, "below = {{ ttft_p99_ms = {ms} }}").unwrap();
            }
        }
        t
    }
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    (
        subsequence(MODELS.to_vec(), 0..=2),
        subsequence(TENANTS.to_vec(), 0..=2),
        proptest::option::of(any::<bool>()),
        subsequence(REGIONS.to_vec(), 0..=3),
        subsequence(JURS.to_vec(), 0..=1),
        proptest::option::of(10u32..200),
        proptest::collection::vec(0usize..3, 0..=2),
        proptest::option::of((0u32..10, 1u32..10)),
        subsequence(MODELS.to_vec(), 0..=2),
        0usize..6,
    )
        .prop_map(
            |(
                models,
                tenants,
                batch,
                regions,
                jurs,
                ttft_below,
                mut tiers,
                split,
                cascade,
                strategy,
            )| {
                tiers.dedup();
                let mut seen = BTreeSet::new();
                tiers.retain(|t| seen.insert(*t));
                GenRule {
                    models,
                    tenants,
                    batch,
                    regions,
                    jurs,
                    ttft_below,
                    tiers,
                    split,
                    cascade,
                    strategy,
                }
            },
        )
}

fn gen_policy() -> impl Strategy<Value = GenPolicy> {
    (
        proptest::collection::btree_map(
            proptest::sample::select(TENANTS.to_vec()),
            proptest::option::of(subsequence(JURS.to_vec(), 0..=2)),
            0..3,
        ),
        proptest::collection::vec(
            (
                proptest::sample::select(REGIONS.to_vec()),
                proptest::sample::select(MODELS.to_vec()),
                proptest::sample::select(VERSIONS.to_vec()),
            ),
            0..=2,
        ),
        proptest::collection::vec(gen_rule(), 0..6),
    )
        .prop_map(|(tenants, pools, rules)| GenPolicy {
            tenants: tenants.into_iter().collect(),
            pools,
            rules,
        })
        .prop_map(|mut p| {
            // Tier names must exist: drop references to missing pools.
            let n = p.pools.len();
            for r in &mut p.rules {
                r.tiers.retain(|&t| t == 0 || t - 1 < n);
            }
            p
        })
}

fn gen_node() -> impl Strategy<Value = NodeFacts> {
    (
        proptest::sample::select(REGIONS.to_vec()),
        proptest::option::of(proptest::sample::select(vec!["eu", "us", "xx"])),
        any::<bool>(),
        subsequence(
            vec![("m0", "v1"), ("m0", "v2"), ("m1", "v1"), ("m1", "v2"), ("m2", "v1")],
            0..=3,
        ),
        (0.0f64..200.0, 0u32..10, 0u32..10, 0.0f64..1.0),
        proptest::option::of(0.0f64..1.0),
    )
        .prop_map(|(region, jur, down, models, (ttft, queue, in_flight, gpu), price)| {
            let mut n = NodeFacts::new("", region);
            n.jurisdiction = jur.map(str::to_owned);
            n.available = !down;
            n.models = models.into_iter().map(|(m, v)| Served::new(m, v)).collect();
            n.ttft_p50_ms = ttft / 2.0;
            n.ttft_p99_ms = ttft;
            n.queue = queue;
            n.in_flight = in_flight;
            n.capacity = 8;
            n.gpu_util = gpu;
            n.price = price.map(|p| Price { input_per_1k: p, output_per_1k: p });
            n
        })
}

fn gen_fleet() -> impl Strategy<Value = Vec<NodeFacts>> {
    proptest::collection::vec(gen_node(), 0..25).prop_map(|mut v| {
        for (i, n) in v.iter_mut().enumerate() {
            n.id = format!("n{i:02}");
        }
        v
    })
}

fn gen_sample() -> impl Strategy<Value = Sample> {
    (
        proptest::sample::select(vec!["t0", "t1", "t2", "t3"]),
        proptest::option::of(subsequence(vec!["eu", "us", "xx"], 0..=2)),
        proptest::option::of(subsequence(REGIONS.to_vec(), 0..=3)),
        proptest::sample::select(vec!["m0", "m1", "m2", "nope"]),
        proptest::option::of(proptest::sample::select(vec!["v1", "v2", "v9"])),
        any::<bool>(),
        subsequence(REGIONS.to_vec(), 0..=2),
        0u32..1000,
        0usize..3,
    )
        .prop_map(|(sub, jurs, regions, model, version, batch, asked, session, k)| Sample {
            claims: Claims {
                sub: sub.into(),
                jurisdictions: jurs.map(|j| j.into_iter().map(str::to_owned).collect()),
                regions: regions.map(|r| r.into_iter().map(str::to_owned).collect()),
                attrs: Default::default(),
            },
            model: model.into(),
            version: version.map(str::to_owned),
            class: if batch { Class::Batch } else { Class::Interactive },
            streamed: !batch,
            regions: asked.into_iter().map(str::to_owned).collect(),
            session: Some(format!("s{session}")),
            k,
            ..Sample::default()
        })
}

/// The test's own reading of residency.
fn allowed(gp: &GenPolicy, s: &Sample, region: &str, jur: Option<&str>) -> bool {
    let within = |js: &[String]| jur.is_some_and(|j| js.iter().any(|x| x == j));
    s.claims.jurisdictions.as_ref().is_none_or(|js| within(js))
        && s.claims.regions.as_ref().is_none_or(|rs| rs.iter().any(|r| r == region))
        && gp
            .tenants
            .iter()
            .filter(|(sub, _)| *sub == s.claims.sub)
            .all(|(_, j)| j.as_ref().is_none_or(|js| jur.is_some_and(|x| js.contains(&x))))
        && (s.regions.is_empty() || s.regions.iter().any(|r| r == region))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the policy, the fleet or the request says, no decision lists a node (or a
    /// pool) outside the tenant's residency.
    #[test]
    fn residency_is_never_violated(gp in gen_policy(), nodes in gen_fleet(), samples in proptest::collection::vec(gen_sample(), 1..8)) {
        let Ok(p) = Policy::parse(&gp.text()) else { return Ok(()) };
        let fleet = Fleet::new(&p, nodes);
        let mut st = p.new_state();
        for s in &samples {
            let d = p.decide(&s.as_request(), &fleet, &mut st, false);
            for pick in &d.nodes {
                let n = fleet.node(pick.node).unwrap();
                let jur = n.jurisdiction.as_deref().or(jur_of(&n.region));
                prop_assert!(allowed(&gp, s, &n.region, jur), "{} ({:?}) for {:?}", n.id, jur, s);
            }
            if let Some(pool) = &d.pool {
                let jur = jur_of(&pool.region);
                prop_assert!(allowed(&gp, s, &pool.region, jur), "{} for {:?}", pool.name, s);
            }
        }
    }

    /// Every candidate of every attempt is dropped exactly once or chosen; explain changes
    /// nothing in the answer; attempts are bounded whatever the fleet.
    #[test]
    fn explain_accounts_for_every_candidate(gp in gen_policy(), nodes in gen_fleet(), s in gen_sample()) {
        let Ok(p) = Policy::parse(&gp.text()) else { return Ok(()) };
        let fleet = Fleet::new(&p, nodes);
        let plain = p.decide(&s.as_request(), &fleet, &mut p.new_state(), false);
        let d = p.decide(&s.as_request(), &fleet, &mut p.new_state(), true);
        prop_assert_eq!(&plain.nodes, &d.nodes);
        prop_assert_eq!(&plain.version, &d.version);
        prop_assert_eq!(&plain.tier, &d.tier);
        let ex = d.explain.as_ref().unwrap();
        prop_assert_eq!(ex.attempts.len(), usize::from(d.attempts));
        let bound = (1 + MAX_CASCADE) * MAX_TIERS * MAX_VERSIONS;
        prop_assert!(ex.attempts.len() <= bound);
        for (a, att) in ex.attempts.iter().enumerate() {
            let mut seen: BTreeMap<Candidate, usize> = BTreeMap::new();
            for x in ex.drops.iter().filter(|x| usize::from(x.attempt) == a) {
                prop_assert!(att.filters.contains(&x.filter));
                *seen.entry(x.candidate).or_default() += 1;
            }
            let last = a + 1 == ex.attempts.len();
            if last && d.outcome == Outcome::Routed {
                for pick in &d.nodes {
                    *seen.entry(Candidate::Node(pick.node)).or_default() += 1;
                }
                if d.pool.is_some() {
                    prop_assert_eq!(seen.len(), 0);
                    continue;
                }
            }
            prop_assert_eq!(seen.len(), att.candidates as usize, "attempt {} {:?}", a, att);
            prop_assert!(seen.values().all(|&c| c == 1), "{:?}", seen);
        }
    }

    /// Parse refuses a cascade graph with a cycle, accepts one without; decide terminates.
    #[test]
    fn cascades_never_loop(edges in proptest::collection::vec((0usize..4, 0usize..4), 0..6), nodes in gen_fleet()) {
        let names = ["m0", "m1", "m2", "m3"];
        let mut t = String::from("version = \"c\"\n");
        for m in names {
            writeln!(t, "[[models]]\nname = \"{m}\"\n[[models.versions]]\nid = \"v1\"").unwrap();
        }
        let mut graph: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (from, to)) in edges.iter().enumerate() {
            writeln!(t, "[[rules]]\nid = \"r{i}\"\nmatch.models = [\"{}\"]\ncascade = [\"{}\"]", names[*from], names[*to]).unwrap();
            graph.entry(*from).or_default().push(*to);
        }
        // Independent cycle check: can any node reach itself?
        let reach = |start: usize| {
            let mut stack = graph.get(&start).cloned().unwrap_or_default();
            let mut seen = BTreeSet::new();
            while let Some(x) = stack.pop() {
                if x == start { return true; }
                if seen.insert(x) { stack.extend(graph.get(&x).cloned().unwrap_or_default()); }
            }
            false
        };
        let cyclic = (0..4).any(reach);
        let parsed = Policy::parse(&t);
        prop_assert_eq!(parsed.is_err(), cyclic, "{}", t);
        if let Ok(p) = parsed {
            let fleet = Fleet::new(&p, nodes);
            let c = Claims::default();
            for m in names {
                let d = p.decide(&Request::new(&c, m), &fleet, &mut p.new_state(), false);
                prop_assert!(usize::from(d.attempts) <= 1 + MAX_CASCADE);
            }
        }
    }

    /// A split of a:b lands within ±2 points over 10,000 sessions, and a session always
    /// lands on the same version, in any state.
    #[test]
    fn canary_shares_and_stickiness(a in 1u32..100, b in 1u32..100, salt in "[a-z]{1,8}") {
        let t = format!(
            "version = \"c\"\n[[models]]\nname = \"m\"\n[[models.versions]]\nid = \"v1\"\n[[models.versions]]\nid = \"v2\"\n[[rules]]\nid = \"{salt}\"\nmatch.models = [\"m\"]\nversions = {{ v1 = {a}, v2 = {b} }}\n"
        );
        let p = Policy::parse(&t).unwrap();
        let mut n1 = NodeFacts::new("a", "fra");
        n1.models.push(Served::new("m", "v1"));
        let mut n2 = NodeFacts::new("b", "fra");
        n2.models.push(Served::new("m", "v2"));
        let fleet = Fleet::new(&p, vec![n1, n2]);
        let c = Claims::default();
        let mut st = p.new_state();
        let mut v2 = 0u32;
        for i in 0..10_000 {
            let s = format!("session-{i}");
            let mut r = Request::new(&c, "m");
            r.session = Some(&s);
            let d = p.decide(&r, &fleet, &mut st, false);
            let again = p.decide(&r, &fleet, &mut p.new_state(), false);
            prop_assert_eq!(&d.version, &again.version);
            if d.version.as_deref() == Some("v2") { v2 += 1; }
        }
        let expected = f64::from(b) / f64::from(a + b);
        let got = f64::from(v2) / 10_000.0;
        prop_assert!((got - expected).abs() <= 0.02, "{got} vs {expected}");
    }

    /// Parsing never panics, and a valid document with any unknown key added is refused.
    #[test]
    fn refused_texts_yield_no_policy(junk in ".{0,200}", key in "[a-z_]{1,12}", at in 0usize..64) {
        let _ = Policy::parse(&junk);
        let base = GenPolicy { tenants: vec![("t0", Some(vec!["eu"]))], pools: vec![("fra", "m0", "v1")], rules: vec![GenRule {
            models: vec!["m0"], tenants: vec![], batch: None, regions: vec![], jurs: vec!["eu"], ttft_below: Some(50),
            tiers: vec![0, 1], split: Some((9, 1)), cascade: vec!["m1"], strategy: 0,
        }] }.text();
        prop_assert!(Policy::parse(&base).is_ok());
        // Insert `key = 1` after a table header chosen by `at`.
        let lines: Vec<&str> = base.lines().collect();
        let headers: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with('[')).map(|(i, _)| i).collect();
        let h = headers[at % headers.len()];
        let known = [
            "version", "jurisdictions", "models", "tenants", "pools", "rules", "name", "default_version", "regions",
            "hardware", "versions", "id", "revision", "quant", "sub", "tier", "endpoint", "region", "jurisdiction",
            "serves", "price_in_per_1k", "price_out_per_1k", "match", "constraints", "sticky", "cascade", "tiers",
            "strategy", "score", "weights", "k", "claims", "class", "streamed", "client_regions", "below", "expr",
            "eu", "us",
        ];
        prop_assume!(!known.contains(&key.as_str()));
        let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        out.insert(h + 1, format!("{key} = 1"));
        let text = out.join("\n");
        prop_assert!(Policy::parse(&text).is_err(), "accepted:\n{}", text);
    }
}
