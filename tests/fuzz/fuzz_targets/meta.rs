//! Request metadata: headers (workflow/agent/parent ids, cookies, session) and JSON
//! bodies of any shape (`agentic_context` as object or string, `workflow_metadata`,
//! messages and prompts), then the multipart form of the audio routes.
#![no_main]

use agentlb::proxy::{h1, meta};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Header fields, an empty line, then the body.
    let split = data.windows(4).position(|w| w == b"\r\n\r\n");
    let (fields, body) = match split {
        Some(i) => (&data[..i + 2], &data[i + 4..]),
        None => (&b""[..], data),
    };
    let mut raw = BytesMut::from(&b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"[..]);
    raw.extend_from_slice(fields);
    raw.extend_from_slice(b"\r\n");
    let Ok(Some(head)) = h1::parse_request(&mut raw, 64 * 1024) else {
        return;
    };
    let limits = meta::MetaLimits {
        prefix_block: 64,
        ..meta::MetaLimits::default()
    };
    if let Ok(m) = meta::extract(&head, Some(body), "r".into(), &limits) {
        let _ = m.prompt_tokens_estimate();
    }
    let _ = meta::extract(&head, None, "r".into(), &limits);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let body = Bytes::copy_from_slice(body);
    let _ = rt.block_on(meta::form_model(
        b"multipart/form-data; boundary=XyZ",
        &body,
        &limits,
    ));
});
