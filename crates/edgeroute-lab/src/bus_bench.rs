//! `edgeroute-lab bench bus`: how long a topology change takes to reach a subscriber.
//!
//! One publisher and one subscriber on the given bus; each change (a model becoming ready) is
//! published through the real [`Publisher`] path (queue, background sender, bus) and timed
//! until the subscriber's stream yields it. Changes go one at a time (closed loop), so the
//! figures are per-change latency, not throughput. Publisher, subscriber and (for NATS) the
//! server share this machine's cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgeroute_proto::topology::EventKind;
use futures_util::StreamExt;
use tokio::time::Instant;

use edgeroute_bus::{
    Bus, BusConfig, BusError, FleetUpdate, NodeIdentity, Publisher, PublisherOptions, Subscription,
    system_clock,
};

/// How long one change may take before it counts as lost.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the subscriber may take to see the benchmark node at all.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Latency from publish to delivery, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PropagationReport {
    /// Changes measured (delivered).
    pub n: usize,
    /// Changes not delivered within 2 s.
    pub lost: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl std::fmt::Display for PropagationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} lost={} p50={}us p99={}us max={}us",
            self.n, self.lost, self.p50_us, self.p99_us, self.max_us
        )
    }
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Waits until `sub` yields an update of `node` at `seq` or later.
async fn delivered(sub: &mut Subscription, node: &str, seq: u64) -> bool {
    while let Some(update) = sub.next().await {
        let reached = match &update {
            FleetUpdate::Event(ev) => ev.node_id == node && ev.seq >= seq,
            FleetUpdate::Snapshot(snap) => snap.node_id == node && snap.seq >= seq,
            FleetUpdate::Expired(_) => false,
        };
        if reached {
            return true;
        }
    }
    false
}

/// Publishes `changes` model-ready changes on `bus` and times each until a subscriber sees it.
pub async fn propagation(bus: &Bus, changes: usize) -> Result<PropagationReport, BusError> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let mut sub = bus.subscribe().await?;
    let clock = system_clock();
    let node = NodeIdentity {
        node_id: format!("bench-{}-{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed)),
        region: "bench".to_owned(),
        url: "http://bench.invalid".to_owned(),
        epoch: clock(),
    };
    let node_id = node.node_id.clone();
    let publisher =
        Publisher::spawn(bus.clone(), node, PublisherOptions::from_config(bus.config()), clock)?;
    if !tokio::time::timeout(WARMUP_TIMEOUT, delivered(&mut sub, &node_id, 1))
        .await
        .unwrap_or(false)
    {
        return Err(BusError::Timeout { op: "benchmark warm-up", after: WARMUP_TIMEOUT });
    }
    let mut samples = Vec::with_capacity(changes);
    let mut lost = 0;
    for i in 0..changes {
        let started = Instant::now();
        // A node holds a bounded set of models: cycle 16 names, alternating ready and unloaded,
        // so the node's snapshot stays the size of a real node's (it must fit the KV value
        // limit) however many changes are timed.
        let model = format!("bench-{}", i % 16);
        let kind = if (i / 16) % 2 == 0 {
            EventKind::ModelReady { model, gpu: None }
        } else {
            EventKind::ModelUnloaded { model, gpu: None }
        };
        let ev = publisher.publish(kind);
        match tokio::time::timeout(CHANGE_TIMEOUT, delivered(&mut sub, &node_id, ev.seq)).await {
            Ok(true) => {
                samples.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
            }
            _ => lost += 1,
        }
    }
    publisher.shutdown(Duration::from_secs(1)).await;
    samples.sort_unstable();
    Ok(PropagationReport {
        n: samples.len(),
        lost,
        p50_us: percentile(&samples, 50.0),
        p99_us: percentile(&samples, 99.0),
        max_us: samples.last().copied().unwrap_or(0),
    })
}

/// The bus a benchmark's `--bus` (`embedded` or `nats`) and `--nats-url` name.
pub fn config(bus: &str, nats_url: &str) -> anyhow::Result<BusConfig> {
    Ok(match bus {
        "embedded" => BusConfig::embedded(),
        "nats" => BusConfig::nats(nats_url.to_owned()),
        other => anyhow::bail!("--bus: `{other}` is not embedded or nats"),
    })
}

/// The benchmark's line for BENCHMARKS.md: `changes` changes timed over the embedded bus
/// (`bus = "embedded"`) or the NATS server at `nats_url` (`bus = "nats"`).
pub async fn run(bus: &str, nats_url: &str, changes: usize) -> anyhow::Result<String> {
    let r = propagation(&Bus::connect(&config(bus, nats_url)?).await?, changes).await?;
    let via = if bus == "nats" { format!(" ({nats_url})") } else { String::new() };
    Ok(format!(
        "topology propagation over {bus}{via}: {} changes delivered, {} lost, p50 {} µs, p99 {} µs, max {} µs",
        r.n, r.lost, r.p50_us, r.p99_us, r.max_us
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0)),
            (50, 99, 100)
        );
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
