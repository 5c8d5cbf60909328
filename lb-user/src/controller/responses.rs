//! Owners of stored Responses API responses.
//!
//! vLLM keeps the responses it stores in the memory of the instance that made them, so a
//! follow-up (`previous_response_id`, `GET /v1/responses/{id}`, cancel, delete) sent to any
//! other instance fails with 404. agentlb learns each response id's owner from the response
//! it relays (the `id` of a non-streaming body, or of the `response.created` event of a
//! stream: whichever comes first in the body) and sends follow-ups there. A replica that
//! has not seen an id asks every backend once, in parallel (see `proxy::responses`), and
//! caches the answer. The map is a bounded [`Table`] (`workflows.max_responses`, least
//! recently used evicted).

use super::table::{Class, Classify, Table};
use crate::model::BackendId;

/// Who stored a response, and the workflow of the chain it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The backend holding the response.
    pub backend: BackendId,
    /// The workflow id of the chain (`~<hex>` for an implicit one), when known.
    pub workflow: Option<String>,
}

#[derive(Debug)]
struct Stored {
    backend: BackendId,
    workflow: Option<Box<str>>,
}

impl Classify for Stored {
    fn class(&self) -> Class {
        Class::Idle
    }
}

/// Response id → owner.
#[derive(Debug)]
pub struct ResponseOwners {
    table: Table<Stored>,
}

fn key(id: &str) -> u64 {
    super::policies::workflow::stable_hash(id.as_bytes())
}

impl ResponseOwners {
    /// At most `max` ids.
    pub fn new(max: usize) -> Self {
        Self {
            table: Table::new(max),
        }
    }

    /// Records (or refreshes) an owner.
    pub fn record(&self, id: &str, backend: BackendId, workflow: Option<&str>) {
        self.table.upsert(
            key(id),
            || Stored {
                backend,
                workflow: workflow.map(Into::into),
            },
            |e, _| {
                if let Some(e) = e {
                    e.backend = backend;
                    if let Some(w) = workflow {
                        e.workflow = Some(w.into());
                    }
                }
            },
        );
    }

    /// The owner of a response id (touches it).
    pub fn get(&self, id: &str) -> Option<Owner> {
        self.table.update(key(id), |e| Owner {
            backend: e.backend,
            workflow: e.workflow.as_deref().map(str::to_owned),
        })
    }

    /// Forgets an id (deleted upstream).
    pub fn forget(&self, id: &str) {
        self.table.remove(key(id));
    }

    /// Ids known.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Finds the id of a Responses API object in the first bytes of a response body: the
/// first `"id"` whose string value starts with `resp` (a non-streaming body starts with
/// it; a stream's first event, `response.created`, carries the response object).
pub fn response_id_in(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok().or_else(|| {
        // The capture may end mid-character.
        (1..4).find_map(|i| {
            head.get(..head.len().checked_sub(i)?)
                .and_then(|t| std::str::from_utf8(t).ok())
        })
    })?;
    let mut rest = text;
    while let Some(at) = rest.find("\"id\"") {
        rest = &rest[at + 4..];
        let v = rest.trim_start_matches([' ', '\t', '\r', '\n']);
        let Some(v) = v.strip_prefix(':') else {
            continue;
        };
        let v = v.trim_start_matches([' ', '\t', '\r', '\n']);
        let Some(v) = v.strip_prefix('"') else {
            continue;
        };
        let end = v.find('"')?;
        let id = &v[..end];
        if id.starts_with("resp") && id.len() <= 256 && !id.contains('\\') {
            return Some(id.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_response_id_in_bodies_and_streams() {
        let body = br#"{"id":"resp_abc123","object":"response","output":[{"id":"msg_1"}]}"#;
        assert_eq!(response_id_in(body).as_deref(), Some("resp_abc123"));
        let sse = b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\": \"resp_x9\",\"status\":\"in_progress\"}}\n\n";
        assert_eq!(response_id_in(sse).as_deref(), Some("resp_x9"));
        assert_eq!(response_id_in(br#"{"id":"msg_1","x":"#), None);
        assert_eq!(
            response_id_in(br#"{"id":"resp_trunc"#),
            None,
            "an unfinished id is not an id"
        );
    }

    #[test]
    fn owners_are_recorded_refreshed_and_forgotten() {
        let o = ResponseOwners::new(10);
        o.record("resp_1", 2, Some("wf"));
        assert_eq!(
            o.get("resp_1"),
            Some(Owner {
                backend: 2,
                workflow: Some("wf".into())
            })
        );
        o.record("resp_1", 3, None);
        assert_eq!(
            o.get("resp_1").map(|x| (x.backend, x.workflow)),
            Some((3, Some("wf".into())))
        );
        o.forget("resp_1");
        assert!(o.get("resp_1").is_none());
        for i in 0..20 {
            o.record(&format!("resp_{i}"), 0, None);
        }
        assert_eq!(o.len(), 10, "bounded");
    }
}
