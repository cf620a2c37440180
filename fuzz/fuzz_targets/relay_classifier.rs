//! The relay's classification of a command's Kubernetes API request: a verb among the
//! Kubernetes verbs (or `other`) and a namespace (a path segment, when there is one) for any method,
//! path and query; never a panic.
#![no_main]

use kinvoke_gateway::relay::{namespace_of, verb_of};
use libfuzzer_sys::fuzz_target;

const VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "other",
];

fuzz_target!(|input: (u8, String, Option<String>)| {
    let (method, path, query) = input;
    let method = match method % 7 {
        0 => http::Method::GET,
        1 => http::Method::POST,
        2 => http::Method::PUT,
        3 => http::Method::PATCH,
        4 => http::Method::DELETE,
        5 => http::Method::HEAD,
        _ => http::Method::OPTIONS,
    };
    let verb = verb_of(&method, &path, query.as_deref());
    assert!(VERBS.contains(&verb), "{method} {path} -> {verb}");
    if let Some(namespace) = namespace_of(&path) {
        assert!(!namespace.contains('/'), "{path} -> {namespace}");
        assert!(path.contains(&namespace));
    }
});
