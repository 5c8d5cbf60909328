//! KV events from the backends' publishers: msgpack batches and sequence frames.
#![no_main]

use agentlb::kv::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::seq(data);
    if let Ok(b) = wire::batch(data) {
        let _ = b.events.len();
    }
});
