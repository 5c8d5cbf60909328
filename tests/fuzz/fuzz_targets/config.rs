//! The configuration file: TOML of any content, parsed and validated.
#![no_main]

use agentlb::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(raw) = config::parse_str(text)
    {
        let _ = config::validate(&raw);
    }
});
