//! Webhooks for async jobs, after the Standard Webhooks specification: [`signing`] (sign and
//! verify `webhook-id`, `webhook-timestamp`, `webhook-signature`), [`schedule`] (when to try
//! a delivery again: exponential backoff with jitter from an injected RNG, a cap on attempts,
//! dedupe by id) and [`target`] (which URLs a tenant may point a webhook at: no SSRF into the
//! fleet). All pure; the router does the HTTP.

pub mod schedule;
pub mod signing;
pub mod target;
