//! The Responses API: which backend a request must reach.
//!
//! `POST /v1/responses` is proxied like a chat completion; when it continues a stored
//! response (`previous_response_id`), and for `GET /v1/responses/{id}`,
//! `POST /v1/responses/{id}/cancel` and `DELETE /v1/responses/{id}`, the request must reach
//! the backend that stored that response (vLLM keeps them in the memory of the instance
//! that made them). The owner comes from [`ResponseOwners`](crate::controller::responses)
//! (learned from relayed responses); a replica that does not know the id asks every
//! routable backend once, in parallel, and caches the answer. A follow-up inherits the
//! chain's workflow, so a `previous_response_id` chain is a workflow.
//!
//! Errors, never a silent wrong answer: an id no backend has → 404; its owner removed
//! from the configuration → 404 `response_owner_gone`; its owner unhealthy → 503
//! `response_owner_unavailable` (retry later: the response lives only there).

use std::time::Duration;

use http::StatusCode;

use super::{ApiError, Proxy};
use crate::controller::{health, responses::Owner};

/// A request on a stored response, from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOp {
    /// The response id.
    pub id: String,
}

/// `GET|DELETE /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`: the id, when the
/// path and method are one of those.
pub fn stored_op(path: &[u8], method: &[u8]) -> Option<StoredOp> {
    let rest = path.strip_prefix(b"/v1/responses/")?;
    let (id, op) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, &b""[..]),
    };
    let ok = matches!(
        (op, method),
        (b"", b"GET" | b"DELETE") | (b"/cancel", b"POST")
    );
    if !ok || id.is_empty() || id.len() > 256 {
        return None;
    }
    let id = std::str::from_utf8(id).ok()?;
    id.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .then(|| StoredOp { id: id.to_owned() })
}

fn not_found(id: &str) -> ApiError {
    let mut e = ApiError::invalid_request(
        format!("Response with id '{id}' not found on any backend."),
        "response_not_found",
    );
    e.status = StatusCode::NOT_FOUND;
    e
}

impl Proxy {
    /// The backend that stored response `id`, and the workflow of its chain.
    pub async fn response_owner(&self, id: &str, timeout: Duration) -> Result<Owner, ApiError> {
        let owners = &self.controller.responses;
        let owner = match owners.get(id) {
            Some(o) => o,
            None => {
                let found = self.ask_backends(id, timeout).await;
                self.metrics.response_owner_lookup(found.is_some());
                let found = found.ok_or_else(|| not_found(id))?;
                owners.record(id, found, None);
                Owner {
                    backend: found,
                    workflow: None,
                }
            }
        };
        match self.controller.backend(owner.backend) {
            None => {
                let mut e = ApiError::invalid_request(
                    format!(
                        "Response with id '{id}' was stored by a backend that is no longer configured; vLLM keeps stored responses only in the memory of the instance that made them."
                    ),
                    "response_owner_gone",
                );
                e.status = StatusCode::NOT_FOUND;
                Err(e)
            }
            Some(b) if !b.routable() => {
                let mut e = ApiError::unavailable(format!(
                    "Response with id '{id}' is stored only on backend {}, which is unavailable now; retry later.",
                    b.name
                ));
                e.code = "response_owner_unavailable";
                Err(e)
            }
            Some(_) => Ok(owner),
        }
    }

    /// Asks every routable backend for `GET /v1/responses/{id}` at once; the first that
    /// has it is the owner.
    async fn ask_backends(&self, id: &str, timeout: Duration) -> Option<u32> {
        let path = format!("/v1/responses/{id}");
        let backends = self.controller.backends();
        let asks = backends.iter().filter(|b| b.routable()).map(|b| {
            let path = path.clone();
            let b = b.clone();
            let client = self.probe.clone();
            Box::pin(async move {
                match health::get(&client, &b, &path, timeout).await {
                    Some((200, _)) => Some(b.id),
                    _ => None,
                }
            })
        });
        let mut pending: Vec<_> = asks.collect();
        while !pending.is_empty() {
            let (r, _, rest) = futures_util::future::select_all(pending).await;
            if r.is_some() {
                return r;
            }
            pending = rest;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_ops_are_recognised() {
        assert_eq!(
            stored_op(b"/v1/responses/resp_1", b"GET"),
            Some(StoredOp {
                id: "resp_1".into()
            })
        );
        assert!(stored_op(b"/v1/responses/resp_1", b"DELETE").is_some());
        assert!(stored_op(b"/v1/responses/resp_1/cancel", b"POST").is_some());
        assert!(stored_op(b"/v1/responses/resp_1/cancel", b"GET").is_none());
        assert!(stored_op(b"/v1/responses/resp_1", b"POST").is_none());
        assert!(stored_op(b"/v1/responses/", b"GET").is_none());
        assert!(stored_op(b"/v1/responses/a%2Fb", b"GET").is_none());
        assert!(stored_op(b"/v1/responses/resp_1/input_items", b"GET").is_none());
    }
}
