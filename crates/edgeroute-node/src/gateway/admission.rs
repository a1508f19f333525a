//! What a request must get before the node spends memory or a backend slot on it: a share of
//! the node's concurrency per tenant, room in the node's budget for request bodies, a body
//! that arrives in time, and a request inside the configured ceilings. Every refusal is an
//! OpenAI-shaped error with its status and is counted in `/metrics` by reason.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use edgeroute_http::ApiError;
use edgeroute_proto::{ChatCompletionRequest, Content};
use http::{HeaderMap, StatusCode, header};

use crate::config::Limits;

/// Per-tenant tables: tenants are authenticated names, and each table holds only those with
/// something in flight (so it is bounded by `max_concurrency`). A seeded foldhash is a fifth of
/// SipHash's cost on these short keys, paid on every request's way in and out.
type ByTenant<V> = std::collections::HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// In-flight requests per tenant, each capped at the same share of the node.
#[derive(Debug)]
pub struct TenantSlots {
    cap: u32,
    held: Mutex<ByTenant<u32>>,
}

/// One of a tenant's slots, given back on drop (with the answer's end, for a stream).
#[derive(Debug)]
pub struct TenantSlot {
    slots: Arc<TenantSlots>,
    tenant: Arc<str>,
}

impl TenantSlots {
    pub fn new(cap: u32) -> Arc<TenantSlots> {
        Arc::new(TenantSlots { cap: cap.max(1), held: Mutex::default() })
    }

    /// A slot for `tenant`, unless it already holds its share.
    pub fn try_acquire(self: &Arc<Self>, tenant: &Arc<str>) -> Option<TenantSlot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(tenant.clone()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(TenantSlot { slots: self.clone(), tenant: tenant.clone() })
    }

    /// Slots `tenant` holds now.
    pub fn held(&self, tenant: &str) -> u32 {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.tenant) {
            *n -= 1;
            // Only tenants with requests in flight stay in the table: it is bounded by
            // `max_concurrency`, whatever the number of tenants seen.
            if *n == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

/// The node's budget for request bodies being received or held, in KiB, of which one tenant
/// may hold at most its share: a tenant trickling large bodies cannot take the room every
/// other tenant's bodies need. Room is taken at once or not at all (never awaited), so one
/// ledger under one lock keeps both the node's total and each tenant's part.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    kib: usize,
    tenant_cap_kib: usize,
    ledger: Arc<Mutex<Ledger>>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// KiB reserved node-wide.
    used: usize,
    /// KiB reserved per tenant; only tenants holding some.
    held: ByTenant<usize>,
}

/// Room reserved for one body; given back on drop.
#[derive(Debug)]
pub struct BodyRoom {
    kib: usize,
    tenant: Arc<str>,
    ledger: Arc<Mutex<Ledger>>,
}

impl BodyBudget {
    /// `bytes` node-wide, `share` of it per tenant.
    pub fn new(bytes: usize, share: f64) -> BodyBudget {
        let kib = bytes.div_ceil(1024);
        let tenant_cap_kib = ((kib as f64 * share).ceil() as usize).clamp(1, kib.max(1));
        BodyBudget { kib, tenant_cap_kib, ledger: Arc::default() }
    }

    /// Reserves room for `tenant`'s body of `bytes`, at once or not at all.
    pub fn try_reserve(&self, tenant: &Arc<str>, bytes: usize) -> Option<BodyRoom> {
        let kib = bytes.div_ceil(1024).max(1);
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        if ledger.used + kib > self.kib {
            return None;
        }
        let mine = ledger.held.get(tenant).copied().unwrap_or(0);
        if mine + kib > self.tenant_cap_kib {
            return None;
        }
        ledger.used += kib;
        ledger.held.insert(tenant.clone(), mine + kib);
        Some(BodyRoom { kib, tenant: tenant.clone(), ledger: self.ledger.clone() })
    }
}

impl Drop for BodyRoom {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.used = ledger.used.saturating_sub(self.kib);
        if let Some(n) = ledger.held.get_mut(&self.tenant) {
            *n = n.saturating_sub(self.kib);
            if *n == 0 {
                ledger.held.remove(&self.tenant);
            }
        }
    }
}

/// The bytes a request's body may take: its `Content-Length` when it declares one within the
/// limit (a larger one is refused before a byte is read), else the limit.
pub fn declared_body(headers: &HeaderMap, limit: usize) -> Result<usize, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(ApiError::payload_too_large(limit)),
        Some(n) => Ok(n as usize),
        None => Ok(limit),
    }
}

/// Reads the body within `limit` bytes and `deadline` (total): 413 beyond the size, 408
/// beyond the time.
pub async fn read_body(
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<bytes::Bytes, ApiError> {
    match tokio::time::timeout(deadline, edgeroute_http::json::read_body(body, limit)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            format!(
                "The request body did not arrive within {} ms; send it faster or smaller.",
                deadline.as_millis()
            ),
        )),
    }
}

/// Checks the request against the node's ceilings (each a precise 400 naming the field).
pub fn check_ceilings(req: &ChatCompletionRequest, l: &Limits) -> Result<(), ApiError> {
    let over = |param: &str, what: String| Err(ApiError::invalid_request(Some(param), what));
    if let Some(n) = req.n
        && n > l.max_n
    {
        return over("n", format!("'n' is {n}; this node allows at most {}.", l.max_n));
    }
    for (param, v) in
        [("max_tokens", req.max_tokens), ("max_completion_tokens", req.max_completion_tokens)]
    {
        if let Some(v) = v
            && v > l.max_output_tokens
        {
            return over(
                param,
                format!("'{param}' is {v}; this node allows at most {}.", l.max_output_tokens),
            );
        }
    }
    if req.messages.len() > l.max_messages {
        return over(
            "messages",
            format!(
                "{} messages; this node allows at most {} per request.",
                req.messages.len(),
                l.max_messages
            ),
        );
    }
    let prompt: usize = req.messages.iter().map(|m| text_len(m.content.as_ref())).sum();
    if prompt > l.max_prompt_bytes {
        return over(
            "messages",
            format!(
                "The prompt is {prompt} bytes of text; this node allows at most {}.",
                l.max_prompt_bytes
            ),
        );
    }
    Ok(())
}

fn text_len(c: Option<&Content>) -> usize {
    match c {
        None => 0,
        Some(Content::Text(t)) => t.len(),
        Some(Content::Parts(parts)) => {
            parts.iter().filter_map(|p| p.text.as_ref()).map(String::len).sum()
        }
    }
}

/// Top-level request fields beyond the typed ones that OpenAI's chat API defines, plus
/// `add_generation_prompt`, which the SDK sends with `continue_final_message` when it continues
/// a cut answer (vLLM and SGLang read it): forwarded to OpenAI-compatible backends. Anything
/// else is dropped unless the backend's config lists it (`backend.extra_fields`), so a caller
/// cannot reach backend knobs the operator did not open.
pub const OPENAI_CHAT_FIELDS: &[&str] = &[
    "add_generation_prompt",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "metadata",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "service_tier",
    "store",
    "tool_choice",
    "tools",
    "top_logprobs",
    "user",
    "verbosity",
    "web_search_options",
];

/// Removes the fields neither OpenAI's API nor `extra` allows; returns how many were dropped.
pub fn drop_unknown_fields(req: &mut ChatCompletionRequest, extra: &[String]) -> usize {
    let before = req.extra.len();
    req.extra
        .retain(|k, _| OPENAI_CHAT_FIELDS.contains(&k.as_str()) || extra.iter().any(|e| e == k));
    before - req.extra.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use edgeroute_proto::{ChatMessage, Role};

    use super::*;

    #[test]
    fn a_tenant_holds_at_most_its_share_and_forgets_on_release() {
        let slots = TenantSlots::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a1 = slots.try_acquire(&a).unwrap();
        let _a2 = slots.try_acquire(&a).unwrap();
        assert!(slots.try_acquire(&a).is_none(), "a is at its share");
        assert!(slots.try_acquire(&b).is_some(), "b is not held back by a");
        drop(a1);
        assert_eq!(slots.held("a"), 1);
        assert!(slots.try_acquire(&a).is_some());
        assert_eq!(slots.held("b"), 0, "released tenants leave the table");
    }

    #[test]
    fn the_body_budget_is_shared_each_tenant_holds_its_share_and_room_is_given_back() {
        let budget = BodyBudget::new(8 * 1024, 0.5);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let p = budget.try_reserve(&a, 3 * 1024).unwrap();
        assert!(budget.try_reserve(&a, 2 * 1024).is_none(), "a is at its share");
        let q = budget.try_reserve(&b, 4 * 1024).unwrap();
        assert!(budget.try_reserve(&c, 2 * 1024).is_none(), "the node's budget is spent");
        drop(p);
        drop(q);
        let r = budget.try_reserve(&c, 4 * 1024).unwrap();
        assert!(budget.ledger.lock().unwrap().held.len() <= 1, "released tenants leave the table");
        let s = budget.try_reserve(&a, 4 * 1024).expect("a's share is back");
        assert!(budget.try_reserve(&b, 1).is_none(), "the node's budget is spent again");
        drop((r, s));
        assert_eq!(budget.ledger.lock().unwrap().used, 0, "every KiB is given back");
        let mut h = HeaderMap::new();
        assert_eq!(declared_body(&h, 100).unwrap(), 100, "chunked: the limit");
        h.insert(header::CONTENT_LENGTH, "40".parse().unwrap());
        assert_eq!(declared_body(&h, 100).unwrap(), 40);
        h.insert(header::CONTENT_LENGTH, "400".parse().unwrap());
        assert_eq!(declared_body(&h, 100).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn ceilings_name_the_field() {
        let l = Limits {
            max_n: 2,
            max_output_tokens: 100,
            max_messages: 2,
            max_prompt_bytes: 10,
            ..Limits::default()
        };
        let ok = ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "hi")]);
        assert!(check_ceilings(&ok, &l).is_ok());
        let param = |r: &ChatCompletionRequest| {
            check_ceilings(r, &l).unwrap_err().body.error.param.unwrap()
        };
        assert_eq!(param(&ChatCompletionRequest { n: Some(3), ..ok.clone() }), "n");
        assert_eq!(
            param(&ChatCompletionRequest { max_tokens: Some(101), ..ok.clone() }),
            "max_tokens"
        );
        assert_eq!(
            param(&ChatCompletionRequest { max_completion_tokens: Some(101), ..ok.clone() }),
            "max_completion_tokens"
        );
        let many = vec![ChatMessage::new(Role::User, "a"); 3];
        assert_eq!(param(&ChatCompletionRequest { messages: many, ..ok.clone() }), "messages");
        let long = vec![ChatMessage::new(Role::User, "0123456789a")];
        assert_eq!(param(&ChatCompletionRequest { messages: long, ..ok.clone() }), "messages");
    }

    #[test]
    fn only_openai_fields_and_the_operators_extras_reach_the_backend() {
        let mut r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[],"user":"u","top_k":5,"guided_json":{},"chat_template":"{{evil}}"}"#,
        )
        .unwrap();
        assert_eq!(drop_unknown_fields(&mut r, &["top_k".into()]), 2);
        let mut keys: Vec<&str> = r.extra.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["tools", "top_k", "user"]);
    }
}
