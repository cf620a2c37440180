//! Attached file paths: whatever a caller sends, a path that validates is relative,
//! holds only normal components (no `..`, no root, no control characters) and so stays
//! inside the command's working directory.
#![no_main]

use std::path::Component;

use kinvoke_gateway::command::{CommandRequest, CommandSpec, Limits, RequestedFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|paths: Vec<String>| {
    let request = CommandRequest {
        cluster: "c".into(),
        command: "true".into(),
        files: paths
            .iter()
            .map(|p| RequestedFile {
                path: p.clone(),
                content: Vec::new(),
                mode: 0,
            })
            .collect(),
        timeout: None,
    };
    if let Ok(spec) = CommandSpec::validate(request, &Limits::default()) {
        for file in &spec.files {
            assert!(!file.path.as_os_str().is_empty());
            for component in file.path.components() {
                let Component::Normal(part) = component else {
                    panic!("{:?} escapes the work dir", file.path);
                };
                let part = part.to_str().expect("UTF-8 in, UTF-8 out");
                assert!(!part.chars().any(char::is_control), "{part:?}");
            }
        }
    }
});
