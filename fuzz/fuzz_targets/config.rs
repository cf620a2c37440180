//! The gateway's config parser on arbitrary text: it returns a config or an error
//! naming the problem, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kinvoke_gateway::config::Config::parse(text, std::path::Path::new("/nonexistent"));
    }
});
