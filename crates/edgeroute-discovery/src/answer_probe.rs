//! Correctness probes on the wire (issue 16): the network seam ([`AnswerProbe`]), the HTTP
//! probe, and the schedule. What an answer means is decided in [`crate::correctness`].
//!
//! A probe is `POST <node>/v1/chat/completions` with `correctness.prompt` as the one user
//! message, `temperature: 0`, `max_tokens: correctness.max_tokens`, not streamed, carrying
//! `x-edgeroute-probe: correctness` (so a node can tell it from tenant traffic) and, when
//! `correctness.token_file` names one, the fleet's inference token — sent only over `https://`
//! or to a loopback address, as the SDK does. Its outcome:
//! - 200 with a completion: the fingerprint of `choices[0].message.content`;
//! - a timeout, a 5xx other than 503, another 4xx than those below, a body that is no
//!   completion: an error (a bad answer);
//! - a refused connection, 429 or 503 (shed), 401/403 (the token), 404 (the model left):
//!   unavailable, never judged.
//!
//! Schedule: every node the snapshot shows verified (not unhealthy or draining) is asked
//! about each of its ready models once per `correctness.interval_ms`, at a phase derived from
//! its id (the first round one interval after the node is first seen, so a replica's start
//! is not a burst), one node's models in sequence and never two rounds of a node at once; all
//! probes share one budget (`correctness.max_probes_per_s`): a probe over it is skipped.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Shared;
use crate::correctness::{Outcome, fingerprint};
use crate::probe::{HttpProbe, ProbeBudget};

/// One correctness probe to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerTarget {
    pub node_id: String,
    /// The node's base URL.
    pub url: String,
    /// Known only from the bus (an `https://` node's certificate must name it).
    pub announced: bool,
    pub model: String,
}

pub type AnswerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Asks one node the probe prompt for one model. The seam between the schedule and the
/// network: tests provide their own.
pub trait AnswerProbe: Send + Sync + std::fmt::Debug + 'static {
    fn ask(&self, target: &AnswerTarget) -> AnswerFuture;
}

/// What the HTTP probe asks, and with which token.
#[derive(Clone)]
pub struct AnswerSpec {
    pub prompt: String,
    pub max_tokens: u32,
    pub timeout: Duration,
    /// The fleet's inference token (`correctness.token_file`).
    pub token: Option<String>,
}

impl std::fmt::Debug for AnswerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerSpec")
            .field("max_tokens", &self.max_tokens)
            .field("timeout", &self.timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// `<base>/v1/chat/completions` for a node's base URL.
pub fn chat_uri(base: &str) -> Option<http::Uri> {
    let health = crate::probe::health_uri(base)?;
    let s = health.to_string();
    let stem = s.strip_suffix("/health")?;
    format!("{stem}/v1/chat/completions").parse().ok()
}

/// Whether a bearer token may go to `uri`: over `https://`, or to a loopback host.
pub fn may_carry_token(uri: &http::Uri) -> bool {
    if uri.scheme_str() == Some("https") {
        return true;
    }
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// The probe's request body.
pub fn request_body(model: &str, spec: &AnswerSpec) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": spec.prompt}],
            "temperature": 0,
            "max_tokens": spec.max_tokens,
            "stream": false,
        })
        .to_string(),
    )
}

/// What an HTTP answer is: see the module's doc.
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    match status {
        200 => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => match v.pointer("/choices/0/message") {
                Some(m) => {
                    let content = m.get("content").and_then(|c| c.as_str()).unwrap_or_default();
                    Outcome::Answer(fingerprint(content))
                }
                None => Outcome::Error("a 200 answer without choices[0].message".into()),
            },
            Err(e) => Outcome::Error(format!("not a completion: {e}")),
        },
        401 | 403 => Outcome::Unavailable(format!("HTTP {status}: the probe's token refused")),
        404 => Outcome::Unavailable("HTTP 404: the model is not there (placement moved)".into()),
        429 | 503 => Outcome::Unavailable(format!("HTTP {status}: shed")),
        s => Outcome::Error(format!("HTTP {s}")),
    }
}

impl AnswerProbe for HttpProbe {
    fn ask(&self, target: &AnswerTarget) -> AnswerFuture {
        let Some(spec) = self.answers.clone() else {
            return Box::pin(async { Outcome::Unavailable("no probe prompt configured".into()) });
        };
        let Some(uri) = chat_uri(&target.url) else {
            return Box::pin(async { Outcome::Unavailable("not an http(s):// URL".into()) });
        };
        let client = match self.client_for(&target.node_id, target.announced, &uri) {
            Ok(c) => c,
            Err(e) => return Box::pin(async move { Outcome::Unavailable(e.to_string()) }),
        };
        let max_body = self.max_body();
        let body = request_body(&target.model, &spec);
        Box::pin(async move {
            let timeout_ms = spec.timeout.as_millis() as u64;
            let work = async {
                let mut req = http::Request::post(uri.clone())
                    .header(http::header::USER_AGENT, "edgeroute-discovery")
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("x-edgeroute-probe", "correctness");
                if let Some(t) = spec.token.as_deref().filter(|_| may_carry_token(&uri)) {
                    req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                let req = match req.body(Full::new(body)) {
                    Ok(r) => r,
                    Err(e) => return Outcome::Unavailable(e.to_string()),
                };
                let resp = match client.request(req).await {
                    Ok(r) => r,
                    Err(e) => {
                        return Outcome::Unavailable(format!(
                            "connect: {}",
                            crate::probe::source(&e)
                        ));
                    }
                };
                let status = resp.status().as_u16();
                match Limited::new(resp.into_body(), max_body).collect().await {
                    Ok(b) => classify(status, &b.to_bytes()),
                    Err(e) if status == 200 => Outcome::Error(format!("body: {e}")),
                    Err(_) => classify(status, b""),
                }
            };
            tokio::time::timeout(spec.timeout, work)
                .await
                .unwrap_or_else(|_| Outcome::Error(format!("no answer within {timeout_ms} ms")))
        })
    }
}

/// Records one probe's outcome: the machine decides, the registry shows it, metrics count it.
pub(crate) fn record(
    sh: &Shared,
    target: &AnswerTarget,
    version: &str,
    outcome: Outcome,
    latency: Duration,
) {
    let now = sh.now();
    let answered = matches!(outcome, Outcome::Answer(_));
    let Ok(mut machine) = sh.correctness.lock() else { return };
    let obs = machine.observe(&target.node_id, &target.model, version, outcome, latency, now);
    let mut touched: Vec<String> = vec![target.node_id.clone()];
    for (n, m) in &obs.changed {
        if machine.is_ejected(n, m) {
            let why = machine.status(n, m, now).and_then(|s| s.reason).unwrap_or_default();
            tracing::warn!(node = %n, model = %m, reason = %why, "correctness: ejected for the model");
        } else {
            tracing::info!(node = %n, model = %m, "correctness: rejoined after a verified run of correct answers");
        }
        if !touched.contains(n) {
            touched.push(n.clone());
        }
    }
    if let Some(fp) = obs.learnt {
        tracing::info!(model = %target.model, version = %version, fingerprint = %fp, "correctness: probe answer learnt");
        // Every node's answers so far are judged now.
        for n in machine.nodes() {
            if !touched.iter().any(|t| t == n) {
                touched.push(n.to_owned());
            }
        }
    }
    let updates: Vec<(String, _)> =
        touched.into_iter().map(|n| (n.clone(), machine.statuses(&n, now))).collect();
    let ejected = machine.ejected().count();
    drop(machine);
    sh.metrics
        .correctness_probes
        .get_or_create(&crate::metrics::OutcomeLabels { outcome: obs.judgement.label() })
        .inc();
    if answered {
        sh.metrics.correctness_seconds.observe(latency.as_secs_f64());
    }
    sh.metrics.correctness_ejected.set(ejected as i64);
    let changed = !obs.changed.is_empty();
    let mut any = crate::fleet::Change::None;
    if let Ok(mut fleet) = sh.fleet.lock() {
        for (n, st) in updates {
            if fleet.set_correctness(&n, st) {
                any = crate::fleet::Change::Telemetry;
            }
        }
    }
    sh.apply(if changed { crate::fleet::Change::Changed } else { any });
}

/// The correctness schedule (see the module's doc) until `stop`.
pub(crate) async fn run(
    sh: Arc<Shared>,
    probe: Arc<dyn AnswerProbe>,
    mut stop: watch::Receiver<bool>,
) {
    let c = &sh.cfg.correctness;
    let every = crate::config::ms(c.interval_ms);
    let tick = (every / 10).clamp(Duration::from_millis(5), Duration::from_millis(500));
    let mut budget = ProbeBudget::new(c.max_probes_per_s);
    let mut due: HashMap<String, Instant> = HashMap::new();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        let snap = sh.snapshot.load_full();
        let now = Instant::now();
        let mut present = HashSet::new();
        for e in snap.nodes() {
            let info = &e.info;
            present.insert(info.id.clone());
            if matches!(info.health, "unhealthy" | "draining") {
                continue;
            }
            let next = due
                .entry(info.id.clone())
                .or_insert_with(|| now + every + crate::probe::phase(&info.id, every));
            if now < *next {
                continue;
            }
            if busy.lock().map(|b| b.contains(&info.id)).unwrap_or(true) {
                continue;
            }
            *next = now + every;
            let mut asks = Vec::new();
            for (model, state) in &info.detail.model_states {
                if *state != edgeroute_proto::models::ModelState::Ready {
                    continue;
                }
                if !budget.try_take(sh.now()) {
                    sh.metrics.correctness_skipped.inc();
                    continue;
                }
                let version = info.detail.model_versions.get(model).cloned().unwrap_or_default();
                let target = AnswerTarget {
                    node_id: info.id.clone(),
                    url: info.url.clone(),
                    announced: !info.detail.configured,
                    model: model.clone(),
                };
                asks.push((target, version));
            }
            if asks.is_empty() {
                continue;
            }
            if let Ok(mut b) = busy.lock() {
                b.insert(info.id.clone());
            }
            let (sh2, probe2, busy2, id) =
                (sh.clone(), probe.clone(), busy.clone(), info.id.clone());
            tokio::spawn(async move {
                for (target, version) in asks {
                    let t0 = Instant::now();
                    let outcome = probe2.ask(&target).await;
                    record(&sh2, &target, &version, outcome, t0.elapsed());
                }
                if let Ok(mut b) = busy2.lock() {
                    b.remove(&id);
                }
            });
        }
        // Nodes the fleet forgot, and models a node no longer serves, are forgotten here too.
        due.retain(|id, _| present.contains(id));
        if let Ok(mut m) = sh.correctness.lock() {
            for e in snap.nodes() {
                for model in m.models_of(&e.info.id) {
                    if !e.info.detail.model_states.contains_key(&model) {
                        m.forget(&e.info.id, Some(&model));
                    }
                }
            }
            let gone: Vec<String> =
                m.nodes().filter(|n| !present.contains(*n)).map(str::to_owned).collect();
            for n in gone {
                m.forget(&n, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        let ok =
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello  there"}}]}"#;
        assert_eq!(classify(200, ok), Outcome::Answer(fingerprint("hello there")));
        assert!(matches!(classify(200, b"<html>"), Outcome::Error(_)));
        assert!(matches!(classify(200, b"{}"), Outcome::Error(_)));
        assert!(matches!(classify(500, b""), Outcome::Error(_)));
        assert!(matches!(classify(400, b""), Outcome::Error(_)));
        for s in [401, 403, 404, 429, 503] {
            assert!(matches!(classify(s, b""), Outcome::Unavailable(_)), "{s}");
        }
    }

    #[test]
    fn chat_uris_and_where_a_token_may_go() {
        let u = |s: &str| chat_uri(s).map(|u| u.to_string());
        assert_eq!(u("http://h:1/").as_deref(), Some("http://h:1/v1/chat/completions"));
        assert_eq!(u("https://h/edge").as_deref(), Some("https://h/edge/v1/chat/completions"));
        assert_eq!(u("ftp://h"), None);
        let may = |s: &str| may_carry_token(&s.parse().unwrap());
        assert!(may("https://node.example/v1/chat/completions"));
        assert!(may("http://127.0.0.1:9/x") && may("http://[::1]:9/x") && may("http://localhost/"));
        assert!(!may("http://10.0.0.5:8080/v1/chat/completions"));
    }

    #[test]
    fn the_request_is_temperature_zero_and_short() {
        let spec = AnswerSpec {
            prompt: "Say ok.".into(),
            max_tokens: 8,
            timeout: Duration::from_secs(1),
            token: Some("secret".into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&request_body("m", &spec)).unwrap();
        assert_eq!(v["temperature"], 0);
        assert_eq!(v["max_tokens"], 8);
        assert_eq!(v["stream"], false);
        assert_eq!(v["messages"][0]["content"], "Say ok.");
        assert!(!format!("{spec:?}").contains("secret"));
    }
}
