//! Hostile attachments in-process: each is refused with a clear error naming what is
//! wrong (or, where harmless, written as a plain file inside the command's own work
//! directory), the refusal is audited, nothing is written outside the work directory,
//! and the gateway keeps serving.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic with the status is the failure report"
)]

mod support;

use kinvoke_proto::v1 as pb;
use prost::Message;
use support::{ADMIN, RawCodec, TestGateway, invoke, run, still_serves};
use tonic::Code;

fn file(path: &str, content: &[u8], mode: u32) -> pb::AttachedFile {
    pb::AttachedFile {
        path: path.into(),
        content: content.to_vec(),
        mode,
    }
}

/// A command line that would leave a trace outside its work directory if any of the
/// refused files had been written: it lists the state directory into the output.
fn with_files(files: Vec<pb::AttachedFile>) -> pb::InvokeCommandRequest {
    let mut request = invoke("local", "ls -A", false);
    request.files = files;
    request
}

#[tokio::test]
async fn hostile_file_names_are_refused_naming_the_problem_and_audited() {
    let gw = TestGateway::start("", "").await;
    let before: Vec<_> = std::fs::read_dir(gw.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let cases: Vec<(&str, Vec<pb::AttachedFile>, Code, &str)> = vec![
        (
            "newline",
            vec![file("values\nforged.yaml", b"x", 0)],
            Code::InvalidArgument,
            "contains a control, invisible or text-direction character",
        ),
        (
            "terminal escape",
            vec![file("a\u{1b}[2Jb", b"x", 0)],
            Code::InvalidArgument,
            "contains a control, invisible or text-direction character",
        ),
        (
            "a right-to-left override",
            vec![file("invoice\u{202E}txt.sh", b"x", 0)],
            Code::InvalidArgument,
            "text-direction character",
        ),
        (
            "traversal",
            vec![file("../../escaped", b"x", 0)],
            Code::InvalidArgument,
            "contains \"..\"",
        ),
        (
            "absolute",
            vec![file("/tmp/escaped", b"x", 0)],
            Code::InvalidArgument,
            "is absolute",
        ),
        (
            "duplicate through a/./b",
            vec![file("a/b", b"1", 0), file("a/./b", b"2", 0)],
            Code::InvalidArgument,
            "is attached twice",
        ),
        (
            "a file that is also a directory",
            vec![file("a", b"1", 0), file("a/b", b"2", 0)],
            Code::InvalidArgument,
            "also the directory",
        ),
        (
            "10,000 tiny files",
            (0..10_000)
                .map(|n| file(&format!("f{n}"), b"", 0))
                .collect(),
            Code::ResourceExhausted,
            "limits.max_files = 1000",
        ),
    ];
    let mut client = gw.commands_as(ADMIN).await;
    for (name, files, code, message) in &cases {
        let status = client
            .invoke_command(with_files(files.clone()))
            .await
            .expect_err(name);
        assert_eq!(status.code(), *code, "{name}: {status:?}");
        assert!(status.message().contains(message), "{name}: {status:?}");
        // the name is shown escaped, never raw
        assert!(!status.message().contains('\n'), "{name}: {status:?}");
        assert!(!status.message().contains('\u{1b}'), "{name}: {status:?}");
        assert!(!status.message().contains('\u{202E}'), "{name}: {status:?}");
    }
    let events = gw
        .audit_until("a refusal per case", |events| {
            events
                .iter()
                .filter(|e| e["event"] == "command_refused")
                .count()
                == cases.len()
        })
        .await;
    assert!(
        events
            .iter()
            .all(|e| e["event"] != "command_accepted" && e["event"] != "command_started"),
        "a refused request ran"
    );
    let after: Vec<_> = std::fs::read_dir(gw.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "something was written next to the state");
    assert!(!std::path::Path::new("/tmp/escaped").exists());
    still_serves(&gw).await;
}

#[tokio::test]
async fn ten_thousand_tiny_files_within_the_limits_are_all_written() {
    let gw = TestGateway::start("max_files = 10000", "").await;
    let files = (0..10_000)
        .map(|n| file(&format!("d{}/f{n}", n % 100), b"", 0))
        .collect();
    let mut request = with_files(files);
    request.command = "find . -type f | wc -l".into();
    let result = run(&gw, request).await;
    assert_eq!(String::from_utf8_lossy(&result.output).trim(), "10000");
}

#[tokio::test]
async fn a_symlink_mode_is_not_a_symlink() {
    let gw = TestGateway::start("", "").await;
    // S_IFLNK with a "target": only the permission bits of a mode count
    let mut request = with_files(vec![file("link", b"/etc/shadow", 0o120_777)]);
    request.command = "test -L link && echo symlink; test -f link && cat link".into();
    let result = run(&gw, request).await;
    assert_eq!(result.output, b"/etc/shadow");
}

#[tokio::test]
async fn a_file_name_that_is_not_utf8_is_refused_with_what_to_send_and_audited() {
    let gw = TestGateway::start("", "").await;
    let mut bytes = with_files(vec![file("NAME", b"x", 0)]).encode_to_vec();
    let at = bytes
        .windows(4)
        .position(|w| w == b"NAME")
        .expect("the name in the encoding");
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, b'/', 0x80]);

    let mut grpc = tonic::client::Grpc::new(gw.channel_as(ADMIN).await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(bytes),
            http::uri::PathAndQuery::from_static("/kinvoke.v1.CommandService/InvokeCommand"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("the request is not a valid kinvoke.v1 message (")
            && status.message().contains("must be UTF-8"),
        "{status:?}"
    );
    gw.audit_until("the refusal", |events| {
        events.iter().any(|e| {
            e["event"] == "request_refused"
                && e["method"] == "/kinvoke.v1.CommandService/InvokeCommand"
                && e["code"] == "Internal"
        })
    })
    .await;
    still_serves(&gw).await;
}
