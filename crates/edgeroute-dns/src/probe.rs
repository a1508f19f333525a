//! Health probes: each target's `/health` asked every `interval_ms` (phase-spread), a probe
//! that is not a 200 within `timeout_ms` failed; verdicts through [`Health`], and the view
//! rebuilt (and swapped in) whenever a target changes state or its changing window ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use tokio::time::Instant;

use crate::config::DnsConfig;
use crate::health::Health;
use crate::serve::Shared;

type ProbeClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One probe: whether `url` answered 200 within `timeout`.
async fn probe(client: &ProbeClient, url: &str, timeout: Duration) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    let Ok(req) = http::Request::get(uri).body(Empty::new()) else { return false };
    matches!(
        tokio::time::timeout(timeout, client.request(req)).await,
        Ok(Ok(res)) if res.status() == http::StatusCode::OK
    )
}

/// What changes the view: one probe's result, or the topology bus's demotions.
enum Input {
    Probe(usize, bool),
    Demoted(Vec<bool>),
}

/// Probes every target of `cfg` for ever (and follows the topology bus when `cfg.bus` is
/// set), keeping `shared.view` current. Spawn it beside the listeners. Fails only when
/// `health.ca_file` cannot be read.
pub async fn run(cfg: Arc<DnsConfig>, shared: Arc<Shared>) -> Result<(), String> {
    let rules = cfg.health_rules();
    let interval = Duration::from_millis(cfg.health.interval_ms);
    let timeout = Duration::from_millis(cfg.health.timeout_ms);
    let start = Instant::now();
    let tls = edgeroute_http::client::tls_config(cfg.health.ca_file.as_deref())?;
    let opts =
        edgeroute_http::client::ClientOptions { connect_timeout: timeout, ..Default::default() };
    let client: ProbeClient = edgeroute_http::client::https_client(&opts, tls);
    let targets: Vec<(String, String)> = cfg
        .regions
        .iter()
        .flat_map(|r| r.discovery.iter().chain(&r.api))
        .map(|t| (t.id.clone(), t.health.clone()))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(1024);
    let mut followers = Vec::new();
    if let Some(bus) = cfg.bus.clone() {
        let regions = cfg.regions.iter().map(|r| r.name.clone()).collect();
        let (dtx, mut drx) = tokio::sync::mpsc::channel(8);
        followers.push(tokio::spawn(crate::topology::follow(bus, regions, dtx)));
        let tx = tx.clone();
        followers.push(tokio::spawn(async move {
            while let Some(d) = drx.recv().await {
                if tx.send(Input::Demoted(d)).await.is_err() {
                    return;
                }
            }
        }));
    }
    // The followers and probers end with this task (it owns their handles or their channel).
    let _followers = AbortOnDrop(followers);
    for (i, (_, url)) in targets.iter().enumerate() {
        let (tx, client, url) = (tx.clone(), client.clone(), url.clone());
        // Phase-spread: the targets' probes do not all leave at once.
        let phase = interval.mul_f64(i as f64 / targets.len().max(1) as f64);
        tokio::spawn(async move {
            tokio::time::sleep(phase).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ok = probe(&client, &url, timeout).await;
                if tx.send(Input::Probe(i, ok)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut health: Vec<Health> = vec![Health::new(); targets.len()];
    let mut changing_before: HashMap<usize, bool> = HashMap::new();
    let mut demoted: Vec<bool> = Vec::new();
    while let Some(input) = rx.recv().await {
        let now = start.elapsed().as_millis() as u64;
        let (i, changed, window_moved) = match input {
            Input::Probe(i, ok) => {
                let changed = health[i].on_probe(ok, now, &rules);
                // A target whose changing window just ended also needs a rebuild (back to the
                // calm TTL).
                let changing = health[i].changing(now, &rules);
                (Some(i), changed, changing_before.insert(i, changing) != Some(changing))
            }
            Input::Demoted(d) => {
                demoted = d;
                (None, false, true)
            }
        };
        if changed || window_moved {
            let by_id: HashMap<&str, (bool, bool)> = targets
                .iter()
                .enumerate()
                .map(|(j, (id, _))| {
                    (id.as_str(), (health[j].is_up(), health[j].changing(now, &rules)))
                })
                .collect();
            let mut view = cfg.view(|id| by_id.get(id).copied().unwrap_or((true, false)));
            view.demote(&demoted);
            shared.view.store(Arc::new(view));
            if let (Some(i), true) = (i, changed) {
                tracing::info!(target = %targets[i].0, up = health[i].is_up(), "dns: target changed state");
            }
        }
    }
    Ok(())
}
