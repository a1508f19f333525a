//! Webhook delivery: the outbox's due messages, signed per Standard Webhooks at each attempt
//! (the signature covers the attempt's timestamp), posted to targets that were checked at
//! submit ([`check_url`]) and are checked again at every connection: the name is resolved here
//! and **every** address must pass the allow-list ([`check_ip`]) before one is dialled, so a
//! name that later resolves inside the fleet (DNS rebinding) is refused.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use edgeroute_jobs::JobStore;
use edgeroute_jobs::webhook::schedule::{Attempt, RetryPolicy};
use edgeroute_jobs::webhook::signing::sign;
use edgeroute_jobs::webhook::target::{TargetPolicy, check_ip, check_url};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;

use super::{Jobs, now_ms};

/// Resolves a name and refuses it unless every address it has passes the allow-list.
#[derive(Clone)]
pub struct CheckedResolver {
    policy: Arc<TargetPolicy>,
}

impl tower_service::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(std::io::Error::other(format!("{host}: no address")));
            }
            for a in &addrs {
                check_ip(&policy, &host, a.ip()).map_err(std::io::Error::other)?;
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The webhook HTTP client.
pub struct Sender {
    client: Client<HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>,
    timeout: Duration,
    policy: Arc<TargetPolicy>,
}

impl Sender {
    pub fn new(policy: TargetPolicy, timeout: Duration) -> Result<Sender, String> {
        let policy = Arc::new(policy);
        let mut tcp = HttpConnector::new_with_resolver(CheckedResolver { policy: policy.clone() });
        tcp.set_connect_timeout(Some(timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let tls = edgeroute_http::client::tls_config(None)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let opts = edgeroute_http::client::ClientOptions::default();
        Ok(Sender { client: edgeroute_http::client::builder(&opts).build(https), timeout, policy })
    }

    /// One attempt: the receiver's status (`None`: no answer, or the target is refused) and
    /// its `Retry-After`, ms.
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> (Option<u16>, Option<u64>) {
        // Checked again: the allow-list may have changed since the submit.
        if let Err(e) = check_url(&self.policy, url) {
            tracing::warn!(url, error = %e, "webhook target refused");
            return (None, None);
        }
        let mut req =
            http::Request::post(url).header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let Ok(req) = req.body(Full::new(Bytes::from(body))) else { return (None, None) };
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(res)) => {
                let retry_after = res
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| s.saturating_mul(1000));
                (Some(res.status().as_u16()), retry_after)
            }
            Ok(Err(e)) => {
                tracing::debug!(url, error = %e, "webhook attempt failed");
                (None, None)
            }
            Err(_) => (None, None),
        }
    }
}

/// Delivers due webhooks until `stop`.
pub async fn deliver_loop(jobs: Arc<Jobs>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let policy = RetryPolicy {
        first_delay_ms: jobs.cfg.webhook_first_delay_ms,
        max_attempts: jobs.cfg.webhook_max_attempts,
        ..RetryPolicy::default()
    };
    let lease_ms = jobs.cfg.webhook_timeout_ms.saturating_mul(3);
    let poll = Duration::from_millis(jobs.cfg.tick_ms);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    loop {
        let due = match jobs.store.due_webhooks(16, lease_ms, now_ms()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "webhook outbox unreachable");
                Vec::new()
            }
        };
        if due.is_empty() {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = jobs.hook_wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        let sends = due.into_iter().map(|d| {
            let jobs = jobs.clone();
            async move {
                let signed = sign(&jobs.secrets, &d.id, now_ms() / 1000, d.body.as_bytes());
                let (status, retry_after) =
                    jobs.hooks.post(&d.url, &signed.pairs(), d.body.clone()).await;
                (d, Attempt::from_status(status, retry_after))
            }
        });
        for (d, attempt) in futures_util::future::join_all(sends).await {
            if attempt == Attempt::Delivered {
                jobs.counters.webhooks_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                jobs.counters.webhooks_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let next = policy.next(d.attempt, attempt, now_ms(), &mut rng);
            if let Err(e) = jobs.store.record_webhook(&d, next, now_ms()).await {
                tracing::warn!(id = %d.id, error = %e, "webhook attempt not recorded");
            }
        }
    }
}

use rand::SeedableRng as _;
