//! The response-body scan: the `usage` found in the tail of a JSON or SSE body, and a
//! Responses API id at its start, with the body arriving in pieces.
#![no_main]

use std::time::Instant;

use agentlb::proxy::stream::{Outcome, Tracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut t = Tracker::new(
        Instant::now(),
        true,
        |_ttfb: f64| {},
        |_o: Outcome, usage: Option<agentlb::controller::workflows::Usage>, _at: Instant| {
            let _ = usage;
        },
        (),
    );
    t.capture_response_id(Box::new(|id: String| assert!(!id.is_empty())));
    for piece in data.chunks(step) {
        t.data(piece);
    }
    t.end(Outcome::Complete, Instant::now());
});
