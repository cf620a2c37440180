//! Proto ↔ domain: the one place the generated `kinvoke.v1` types meet the gateway's
//! own. Requests become domain values here (a field that cannot is `InvalidRequest`
//! naming it); results become wire messages here.

use std::time::{Duration, SystemTime};

use kinvoke_proto::v1 as pb;

use crate::access::grant::{Grant, GrantState};
use crate::command::{CommandRequest, CommandState, InvalidRequest, RequestedFile};
use crate::store::CommandRecord;

/// An `InvokeCommandRequest` as a domain request, not yet validated against the limits.
pub fn command_request(req: pb::InvokeCommandRequest) -> Result<CommandRequest, InvalidRequest> {
    let timeout = req
        .timeout
        .map(|d| {
            Duration::try_from(d).map_err(|_| InvalidRequest::Malformed {
                field: "timeout",
                message: "must be a positive duration".to_owned(),
            })
        })
        .transpose()?;
    Ok(CommandRequest {
        cluster: req.cluster,
        command: req.command,
        files: req
            .files
            .into_iter()
            .map(|f| RequestedFile {
                path: f.path,
                content: f.content,
                mode: f.mode,
            })
            .collect(),
        timeout,
    })
}

/// The wire form of a command's state.
pub fn state(state: CommandState) -> pb::CommandState {
    match state {
        CommandState::Pending => pb::CommandState::Pending,
        CommandState::Running => pb::CommandState::Running,
        CommandState::Succeeded => pb::CommandState::Succeeded,
        CommandState::Failed => pb::CommandState::Failed,
        CommandState::Canceled => pb::CommandState::Canceled,
        CommandState::TimedOut => pb::CommandState::TimedOut,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// The wire form of a record; `output` only when asked.
pub fn command_result(record: CommandRecord, with_output: bool) -> pb::CommandResult {
    let truncated = record.output_truncated;
    pb::CommandResult {
        id: record.id.to_string(),
        cluster: record.cluster,
        state: state(record.state).into(),
        exit_code: record.exit_code,
        started_at: Some(timestamp(record.started_at)),
        finished_at: record.finished_at.map(timestamp),
        reason: record.reason,
        output: if with_output {
            record.output
        } else {
            Vec::new()
        },
        output_truncated: truncated,
        output_size: record.output_size,
        command: record.command,
        principal: record.principal,
        files: record
            .files
            .into_iter()
            .map(|f| pb::FileInfo {
                path: f.path,
                size: f.size,
                sha256: f.sha256,
            })
            .collect(),
        timeout: prost_types::Duration::try_from(record.timeout).ok(),
        break_glass: record.break_glass.map(|g| pb::BreakGlassUse {
            grant_id: g.id,
            justification: g.justification,
        }),
    }
}

/// The wire form of a break-glass grant, in its state now.
pub fn grant(g: Grant) -> pb::Grant {
    let ts = |t: std::time::SystemTime| prost_types::Timestamp::from(t);
    let state = match g.state_at(std::time::SystemTime::now()) {
        GrantState::Pending => pb::GrantState::Pending,
        GrantState::Active => pb::GrantState::Active,
        GrantState::Expired => pb::GrantState::Expired,
        GrantState::Revoked => pb::GrantState::Revoked,
    };
    pb::Grant {
        id: g.id,
        cluster: g.cluster,
        role: g.role,
        principal: g.principal,
        justification: g.justification,
        state: state.into(),
        requested_at: Some(ts(g.requested_at)),
        starts_at: g.starts_at.map(ts),
        expires_at: g.expires_at.map(ts),
        duration: prost_types::Duration::try_from(g.duration).ok(),
        assignment: g.assignment,
        approved_by: g.approved_by.unwrap_or_default(),
        revoked_by: g.revoked_by.unwrap_or_default(),
        approval_from: g.approval_from.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_timeout_is_refused_naming_the_field() {
        let err = command_request(pb::InvokeCommandRequest {
            timeout: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "timeout: must be a positive duration");
    }

    #[test]
    fn files_and_timeout_arrive_as_sent() {
        let req = command_request(pb::InvokeCommandRequest {
            cluster: "c".into(),
            command: "ls".into(),
            files: vec![pb::AttachedFile {
                path: "a".into(),
                content: b"x".to_vec(),
                mode: 0o755,
            }],
            timeout: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            no_wait: true,
        })
        .unwrap();
        assert_eq!(req.timeout, Some(Duration::from_secs(90)));
        assert_eq!(req.files[0].mode, 0o755);
        assert_eq!(req.cluster, "c");
    }
}
