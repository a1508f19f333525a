//! Prometheus metrics, named `edgeroute_node_*`. Recording is lock-free atomics on the hot
//! path; gauges that mirror state (queue depth, in-flight) are refreshed when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// `requests{route="chat",status="200"}`, held: the answer nearly every request gets counts
    /// without a label-set lookup (a hash and a read lock) in `requests`.
    chat_ok: Counter,
    pub rejected: Family<ReasonLabels, Counter>,
    pub backend_errors: Family<ReasonLabels, Counter>,
    pub ttft: Histogram,
    /// Time to the first byte of the answer on the endpoints beside chat (first audio for
    /// speech), by route.
    pub first_byte: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub duration: Histogram,
    pub stream_chunks: Counter,
    pub streams_cancelled: Counter,
    pub fields_dropped: Counter,
    pub in_flight: Gauge,
    pub queue_depth: Gauge,
    pub auth_reload_failures: Gauge,
    /// The transport's refusals already added to `rejected`, per reason of
    /// [`edgeroute_http::EdgeCounters::snapshot`].
    edge_shown: [std::sync::atomic::AtomicU64; 4],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
        10.0, 30.0, 60.0,
    ]
    .into_iter()
}

fn first_byte_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgeroute_node");
        let requests = Family::<RequestLabels, Counter>::default();
        let chat_ok = requests.get_or_create(&RequestLabels { route: "chat", status: 200 }).clone();
        let m = Metrics {
            requests,
            chat_ok,
            rejected: Family::default(),
            backend_errors: Family::default(),
            ttft: Histogram::new(latency_buckets()),
            first_byte: Family::new_with_constructor(first_byte_histogram),
            duration: Histogram::new(latency_buckets()),
            stream_chunks: Counter::default(),
            streams_cancelled: Counter::default(),
            fields_dropped: Counter::default(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            auth_reload_failures: Gauge::default(),
            edge_shown: Default::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests answered, by route and status", m.requests.clone());
        registry.register(
            "rejected",
            "Requests refused before reaching the backend, by reason",
            m.rejected.clone(),
        );
        registry.register("backend_errors", "Backend failures, by kind", m.backend_errors.clone());
        registry.register(
            "ttft_seconds",
            "Time to first token of chat completions",
            m.ttft.clone(),
        );
        registry.register(
            "first_byte_seconds",
            "Time to the first byte of transcriptions, speech (first audio) and embeddings, by route",
            m.first_byte.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the end of chat completions",
            m.duration.clone(),
        );
        registry.register(
            "stream_chunks",
            "SSE chunks forwarded to clients",
            m.stream_chunks.clone(),
        );
        registry.register(
            "streams_cancelled",
            "Streams ended by the client going away",
            m.streams_cancelled.clone(),
        );
        registry.register(
            "request_fields_dropped",
            "Request fields neither OpenAI's chat API nor backend.extra_fields allows, dropped before the backend",
            m.fields_dropped.clone(),
        );
        registry.register("in_flight", "Requests admitted and not finished", m.in_flight.clone());
        registry.register(
            "queue_depth",
            "Requests waiting for a backend slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "auth_key_reload_failures",
            "Failed reloads of JWT key files (last good keys kept)",
            m.auth_reload_failures.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn first_byte(&self, route: &'static str, seconds: f64) {
        self.first_byte.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    pub fn request(&self, route: &'static str, status: u16) {
        if status == 200 && route == "chat" {
            self.chat_ok.inc();
            return;
        }
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    /// Brings the transport's refusals into `rejected`, by reason. Each count is raised by
    /// the one caller that moves its high-water mark, so concurrent scrapes never count twice.
    pub fn sync_edge(&self, snapshot: &[(&'static str, u64); 4]) {
        for ((reason, n), shown) in snapshot.iter().zip(&self.edge_shown) {
            let before = shown.fetch_max(*n, std::sync::atomic::Ordering::Relaxed);
            if *n > before {
                self.rejected.get_or_create(&ReasonLabels { reason }).inc_by(*n - before);
            }
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn backend_error(&self, kind: &'static str) {
        self.backend_errors.get_or_create(&ReasonLabels { reason: kind }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_chat_counter_is_the_familys_own_series() {
        let m = Metrics::default();
        m.request("chat", 200);
        m.request("chat", 200);
        m.request("chat", 500);
        m.request("models", 200);
        let text = m.render();
        for line in [
            r#"edgeroute_node_requests_total{route="chat",status="200"} 2"#,
            r#"edgeroute_node_requests_total{route="chat",status="500"} 1"#,
            r#"edgeroute_node_requests_total{route="models",status="200"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
