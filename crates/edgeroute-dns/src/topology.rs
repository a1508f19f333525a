//! The topology bus as one more input: which regions have nodes that serve.
//!
//! A region whose nodes the bus shows, none of them up with a model ready, is *demoted*: its
//! clients are sent to the nearest region that serves first ([`crate::View::demote`]). The
//! bus never withdraws a region on its own evidence — only the health probes do — so a
//! partitioned or dead bus can reorder answers at worst, never empty them; with the bus
//! disconnected nothing is demoted.

use std::time::Duration;

use edgeroute_bus::{Bus, BusConfig};
use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::{NodeLiveness, NodeSnapshot};
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// For each of `regions` (in order), whether it is demoted by what `nodes` say: the bus knows
/// at least one node there and none is up with a model ready. A region the bus knows no node
/// of is not demoted (no evidence), nor is any region when none serves anywhere (demoting
/// all of them would change nothing).
pub fn demoted<'a>(regions: &[&str], nodes: impl Iterator<Item = &'a NodeSnapshot>) -> Vec<bool> {
    let mut known = vec![false; regions.len()];
    let mut serving = vec![false; regions.len()];
    for n in nodes {
        let Some(r) = regions.iter().position(|r| r.eq_ignore_ascii_case(&n.region)) else {
            continue;
        };
        known[r] = true;
        if n.liveness == NodeLiveness::Up && n.models.iter().any(|m| m.state == ModelState::Ready) {
            serving[r] = true;
        }
    }
    if !serving.iter().any(|s| *s) {
        return vec![false; regions.len()];
    }
    known.iter().zip(&serving).map(|(k, s)| *k && !*s).collect()
}

/// Follows the bus for ever, sending each new demotion vector on `tx` (all `false` while
/// the bus is disconnected or not yet synced). Ends when `tx` is closed.
pub async fn follow(cfg: BusConfig, regions: Vec<String>, tx: mpsc::Sender<Vec<bool>>) {
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let none = vec![false; regions.len()];
    let mut delay = Duration::from_millis(100);
    let bus = loop {
        match Bus::connect(&cfg).await {
            Ok(b) => break b,
            Err(e) => {
                tracing::warn!(error = %e, "dns: topology bus: connect failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut sub = loop {
        match bus.subscribe().await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "dns: topology bus: subscribe failed; retrying");
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut last = none.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            update = sub.next() => {
                if update.is_none() {
                    tracing::warn!("dns: topology bus: subscription ended");
                    let _ = tx.send(none).await;
                    return;
                }
            }
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        let now = if bus.is_connected() && sub.is_synced() {
            demoted(&names, sub.view().nodes())
        } else {
            none.clone()
        };
        if now != last {
            tracing::info!(demoted = ?names.iter().zip(&now).filter(|(_, d)| **d).map(|(n, _)| *n).collect::<Vec<_>>(), "dns: topology bus: regions demoted");
            if tx.send(now.clone()).await.is_err() {
                return;
            }
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use edgeroute_proto::topology::ModelPlacement;

    fn node(
        id: &str,
        region: &str,
        liveness: NodeLiveness,
        state: Option<ModelState>,
    ) -> NodeSnapshot {
        let mut n = NodeSnapshot::new(id, region, format!("https://{id}"), 1);
        n.liveness = liveness;
        if let Some(state) = state {
            n.models.push(ModelPlacement {
                model: "m".into(),
                gpu: None,
                state,
                reason: None,
                version: None,
            });
        }
        n
    }

    const REGIONS: [&str; 3] = ["tor", "mtl", "van"];

    #[test]
    fn a_region_whose_known_nodes_serve_nothing_is_demoted() {
        let nodes = [
            node("a", "tor", NodeLiveness::Up, Some(ModelState::Loading)),
            node("b", "tor", NodeLiveness::Draining, Some(ModelState::Ready)),
            node("c", "mtl", NodeLiveness::Up, Some(ModelState::Ready)),
            node("d", "sea", NodeLiveness::Up, Some(ModelState::Ready)),
        ];
        // tor: known, nothing serving → demoted; mtl serves; van: no evidence.
        assert_eq!(demoted(&REGIONS, nodes.iter()), [true, false, false]);
        let nodes = [
            node("a", "TOR", NodeLiveness::Up, Some(ModelState::Ready)),
            node("v", "van", NodeLiveness::Down, Some(ModelState::Ready)),
        ];
        assert_eq!(demoted(&REGIONS, nodes.iter()), [false, false, true]);
    }

    #[test]
    fn nothing_is_demoted_when_nothing_serves_or_nothing_is_known() {
        assert_eq!(demoted(&REGIONS, [].iter()), [false, false, false]);
        let nodes = [
            node("a", "tor", NodeLiveness::Down, None),
            node("c", "mtl", NodeLiveness::Up, Some(ModelState::Failed)),
        ];
        assert_eq!(demoted(&REGIONS, nodes.iter()), [false, false, false]);
    }
}
