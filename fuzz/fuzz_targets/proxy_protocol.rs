//! The PROXY protocol reader on arbitrary bytes from a trusted proxy: an address, none,
//! or an error; never a panic, and never more than the header's bytes read.
#![no_main]

use kinvoke_gateway::access::proxy_protocol::read_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut input = data;
        let _ = read_header(&mut input).await;
        // v1 is at most 107 bytes, v2 at most 16 + 4096
        assert!(data.len() - input.len() <= 16 + 4096);
    });
});
