//! Bearer-token authentication against locally stored keys: no network call on the hot path.
//!
//! Who may call what: inference routes need a token with the `inference` scope; admin routes
//! need the `admin` scope and an audience naming this node (`edgeroute:node:<id>`), its region
//! (`edgeroute:region:<region>`) or the fleet (`edgeroute:fleet`) — any other admin token is
//! refused with `403 admin_token_not_for_this_node` ([`edgeroute_auth::admin`]). Without
//! `[auth]` every caller is `anonymous`; the router then serves admin routes only on a
//! loopback admin listener (an admin listener off loopback needs mTLS and `[auth]`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use edgeroute_auth::{AuthError, Scope, parse_bearer};
use edgeroute_http::ApiError;
use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::{AppState, Tenant};

pub async fn require(
    State((st, scope)): State<(AppState, Scope)>,
    mut req: Request,
    next: Next,
) -> Response {
    match authenticate(&st, req.headers(), scope) {
        Ok(tenant) => {
            req.extensions_mut().insert(Tenant(tenant));
            next.run(req).await
        }
        Err(refusal) => refusal,
    }
}

/// The caller's tenant (the token's `sub`; `anonymous` when the config waives
/// authentication), or the refusal to send: a plain call, so the chat route's own service
/// authenticates without a middleware layer.
pub fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Arc<str>, Response> {
    let Some(store) = &st.auth else {
        return Ok(Arc::clone(&st.anonymous));
    };
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    // Remembered verifications: a session's repeated token costs a lookup, not a signature.
    let verified = parse_bearer(header)
        .and_then(|token| store.authenticate(token, edgeroute_core::clock::unix_s(&st.clock)))
        .and_then(|v| {
            if v.scope.contains(scope) {
                Ok(v)
            } else {
                Err(AuthError::InsufficientScope { required: scope })
            }
        });
    match verified {
        Ok(v)
            if scope == Scope::Admin
                && !edgeroute_auth::admin::admin_audience_covers(&v.aud, &st.id, &st.region) =>
        {
            st.metrics.reject("forbidden");
            tracing::warn!(node = %st.id, subject = %v.tenant, aud = ?v.aud, "admin token refused: not for this node");
            Err(ApiError::forbidden(
                "admin_token_not_for_this_node",
                format!(
                    "This admin token is not valid on node `{}`: its `aud` must name \
                     `edgeroute:node:{}`, `edgeroute:region:{}` or `edgeroute:fleet`.",
                    st.id, st.id, st.region
                ),
            )
            .into_response())
        }
        // Data residency, from the token alone (no central call): a tenant confined to other
        // jurisdictions or regions is refused here whatever route its request took.
        Ok(v)
            if scope == Scope::Inference
                && !v.may_process_in(&st.region, st.jurisdiction.as_deref()) =>
        {
            st.metrics.reject("residency");
            Err(ApiError::forbidden(
                "residency_violation",
                format!(
                    "This tenant's data may not be processed on node `{}` (region `{}`, \
                     jurisdiction `{}`): its token's residency claims exclude it. Route to a \
                     node its `jurisdictions`/`regions` claims name.",
                    st.id,
                    st.region,
                    st.jurisdiction.as_deref().unwrap_or("unset")
                ),
            )
            .into_response())
        }
        Ok(v) => Ok(Arc::clone(&v.tenant)),
        Err(e) => {
            st.metrics.reject(reject_reason(&e));
            Err(auth_error(&e).into_response())
        }
    }
}

fn reject_reason(e: &AuthError) -> &'static str {
    match e {
        AuthError::InsufficientScope { .. } => "forbidden",
        _ => "unauthenticated",
    }
}

fn auth_error(e: &AuthError) -> ApiError {
    let code = e.api_code();
    if e.http_status() == 403 {
        ApiError::forbidden(code, e.to_string())
    } else {
        ApiError::unauthorized(code, e.to_string())
    }
}
