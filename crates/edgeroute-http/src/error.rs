//! The one error every edgeroute HTTP server returns: OpenAI's
//! `{"error":{"message","type","param","code"}}` with a precise status, classified
//! ([`Fault`]: which side failed, whether another attempt may succeed) in the
//! `x-edgeroute-error` header, so clients, proxies and the lab read the server's own word
//! instead of re-deriving it from the status.

use axum::response::{IntoResponse, Response};
use edgeroute_proto::{ERROR_HEADER, ErrorBody, Fault, Side};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// An error ready to become a response. Constructors name the OpenAI error type and code so
/// every call site produces the same shape for the same failure.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub headers: HeaderMap,
    /// Which side failed and whether to retry: the status's reading unless a constructor or
    /// [`ApiError::fault`] says otherwise.
    pub fault: Fault,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &str,
        code: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody::new(message, kind, None, code),
            headers: HeaderMap::new(),
            fault: Fault::of_status(status.as_u16()),
        }
    }

    /// An error body as received from elsewhere (a backend's own refusal), passed on.
    pub fn from_body(status: StatusCode, body: ErrorBody, fault: Fault) -> Self {
        ApiError { status, body, headers: HeaderMap::new(), fault }
    }

    /// Reclassifies: `side` failed, and another attempt `retry`-ably may succeed.
    pub fn fault(mut self, side: Side, retry: bool) -> Self {
        self.fault = Fault::new(side, retry);
        self
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.body.error.code = Some(code.to_owned());
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.body.error.param = Some(param.into());
        self
    }

    /// Adds a header; a value that is not a valid header value is dropped (it is only ever
    /// built from our own formatting).
    pub fn with_header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.insert(name, v);
        }
        self
    }

    pub fn invalid_request(param: Option<&str>, message: impl Into<String>) -> Self {
        let e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message);
        match param {
            Some(p) => e.with_param(p),
            None => e,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or is not loaded on this node."),
        )
        .with_param("model")
        // The caller asked the wrong node: another may have the model.
        .fault(Side::Caller, true)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body exceeds the limit of {limit} bytes."),
        )
    }

    pub fn not_found(path: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("unknown_url"),
            format!("Unknown request URL: {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            "Method not allowed for this URL.",
        )
    }

    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", Some(code), message)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "permission_error", Some(code), message)
    }

    /// 503 that tells the client to go elsewhere and when to come back.
    pub fn unavailable(code: &str, message: impl Into<String>, retry_after_s: u64) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", Some(code), message)
            .with_header(header::RETRY_AFTER, retry_after_s.to_string())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            message,
        )
    }

    /// Serialised body, for streams that must report an error as an SSE event.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.body.error.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body_json();
        let mut res =
            (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        res.headers_mut().extend(self.headers);
        if let Ok(v) = HeaderValue::from_str(&self.fault.to_string()) {
            res.headers_mut().insert(HeaderName::from_static(ERROR_HEADER), v);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    fn header(e: ApiError) -> String {
        let res = e.into_response();
        res.headers()[ERROR_HEADER].to_str().unwrap().to_owned()
    }

    #[test]
    fn every_answer_says_which_side_failed_and_whether_another_node_may_succeed() {
        assert_eq!(header(ApiError::invalid_request(None, "x")), "side=caller; retry=no");
        assert_eq!(header(ApiError::model_not_found("m")), "side=caller; retry=yes");
        assert_eq!(header(ApiError::unavailable("draining", "x", 1)), "side=node; retry=yes");
        assert_eq!(header(ApiError::internal("x")), "side=node; retry=yes");
        let bad_gateway = ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", None, "x");
        assert_eq!(header(bad_gateway.clone()), "side=backend; retry=yes");
        assert_eq!(header(bad_gateway.fault(Side::Fleet, false)), "side=fleet; retry=no");
    }
}
