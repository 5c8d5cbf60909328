//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`
//! with the right status and the request id header.

use http::{HeaderValue, Response, StatusCode, header};

use super::ProxyBody;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// Machine-readable `code`.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Seconds for `Retry-After` (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: malformed request.
    pub fn invalid_request(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// 500: agentlb itself failed (e.g. a kernel map update).
    pub fn internal(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            code,
            message,
        )
    }

    /// 404: unknown route or model.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// 404 for a model no backend serves.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{model}` does not exist or is not served by any backend"),
        )
    }

    /// 405.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            message,
        )
    }

    /// 408: the client was too slow sending its request.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            message,
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 431.
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            "headers_too_large",
            format!("request headers exceed the limit of {limit} bytes"),
        )
    }

    /// 429 with `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "overloaded",
            message,
        );
        e.retry_after = Some(1);
        e
    }

    /// 502: the backend failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "bad_gateway",
            message,
        )
    }

    /// 503: no backend can take the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no_backend",
            message,
        );
        e.retry_after = Some(1);
        e
    }

    /// 504: the backend did not answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "gateway_timeout",
            message,
        )
    }

    /// 401 for a missing/wrong admin token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_token",
            "missing or invalid bearer token",
        )
    }

    /// The JSON value.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.code,
            }
        })
    }

    /// The full response, tagged with `request_id` when known.
    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let mut resp = super::json(self.status, &self.json());
        let h = resp.headers_mut();
        if let Some(id) = request_id {
            h.insert(crate::model::H_REQUEST_ID, id.clone());
        }
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
