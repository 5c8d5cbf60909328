//! Admin API input: a backend to add (`POST /admin/backends` `{url, name?, role?}`).
#![no_main]

use agentlb::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\0');
    let url = parts.next().unwrap_or("");
    let name = parts.next();
    let role = parts.next();
    if let Ok(b) = config::parse_backend(url, name, role) {
        assert!(b.url.to_string().starts_with("http://"), "{}", b.url);
        assert!(!b.host.is_empty());
    }
});
