//! Response heads from backends: `h1::parse_response`, its framing and transfer codings.
#![no_main]

use agentlb::proxy::h1;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(h)) = h1::parse_response(&mut buf, 64 * 1024) {
        let _ = h1::response_framing(&h);
        let _ = h1::inner_codings(&h);
        let _ = h.keep_alive();
        let _ = h.reason();
        for (kind, name, _, _) in h.fields() {
            let _ = h.is_hop_by_hop(kind, name);
        }
        assert!(h.status >= 100 && h.status <= 999, "status {}", h.status);
    }
});
