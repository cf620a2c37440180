//! `[[cluster]].identity`, `[audit]` and `[limits]`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;

use super::raw::{RawAudit, RawIdentity, RawLimits};
use super::{ConfigError, IdentityMapping, Limits, invalid};

pub(super) fn parse_identity(
    key: &str,
    raw: Option<RawIdentity>,
) -> Result<IdentityMapping, ConfigError> {
    let Some(raw) = raw else {
        return Ok(IdentityMapping::default());
    };
    let user = raw.user.unwrap_or_else(|| "{id}".to_owned());
    // only known placeholders: a typo must not become a literal user name
    let mut rest = user.as_str();
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| invalid(format!("{key}.identity.user"), "has an unclosed '{'"))?;
        let placeholder = &rest[start + 1..start + end];
        let known = placeholder == "id"
            || placeholder
                .strip_prefix("claim:")
                .is_some_and(|c| !c.is_empty());
        if !known {
            return Err(invalid(
                format!("{key}.identity.user"),
                format!("unknown placeholder {{{placeholder}}}; use {{id}} or {{claim:NAME}}"),
            ));
        }
        rest = &rest[start + end + 1..];
    }
    if user.trim().is_empty() {
        return Err(invalid(format!("{key}.identity.user"), "must not be empty"));
    }
    Ok(IdentityMapping {
        user,
        include_groups: raw.include_groups.unwrap_or(true),
        group_prefix: raw.group_prefix,
        extra_groups: raw.extra_groups,
    })
}

pub(super) fn parse_audit(
    raw: RawAudit,
    state_dir: &Path,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<crate::audit::AuditConfig, ConfigError> {
    use crate::audit::FsyncPolicy;
    let interval = raw.fsync_interval.unwrap_or(Duration::from_millis(5));
    if interval > Duration::from_secs(1) {
        return Err(invalid(
            "audit.fsync_interval",
            "must be at most 1s: commands wait for it before they start",
        ));
    }
    let fsync = match raw.fsync.as_deref() {
        None | Some("batch") => FsyncPolicy::Batch(interval),
        Some("always") => FsyncPolicy::Always,
        Some(other) => {
            return Err(invalid(
                "audit.fsync",
                format!("\"{other}\" is not a policy; use \"always\" or \"batch\""),
            ));
        }
    };
    let max_file_bytes = raw
        .max_file_bytes
        .map(|b| b.as_u64())
        .unwrap_or(100 * 1024 * 1024);
    if max_file_bytes < 4096 {
        return Err(invalid("audit.max_file_bytes", "must be at least 4KiB"));
    }
    Ok(crate::audit::AuditConfig {
        path: raw
            .path
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| state_dir.join("audit.jsonl")),
        fsync,
        max_file_bytes,
        tracing: raw.tracing.unwrap_or(true),
        replica: None,
    })
}

pub(super) fn parse_limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let size = |key: &str, v: Option<ByteSize>, default: u64| -> Result<u64, ConfigError> {
        match v {
            Some(v) if v.as_u64() == 0 => Err(invalid(
                format!("limits.{key}"),
                "must be larger than 0 bytes",
            )),
            Some(v) => Ok(v.as_u64()),
            None => Ok(default),
        }
    };
    let usize_of = |key: &str, v: u64| -> Result<usize, ConfigError> {
        usize::try_from(v).map_err(|_| invalid(format!("limits.{key}"), "is too large"))
    };
    let limits = Limits {
        max_command_bytes: usize_of(
            "max_command_bytes",
            size(
                "max_command_bytes",
                raw.max_command_bytes,
                d.max_command_bytes as u64,
            )?,
        )?,
        max_files: raw.max_files.unwrap_or(d.max_files),
        max_total_file_bytes: size(
            "max_total_file_bytes",
            raw.max_total_file_bytes,
            d.max_total_file_bytes,
        )?,
        max_file_path_bytes: usize_of(
            "max_file_path_bytes",
            size(
                "max_file_path_bytes",
                raw.max_file_path_bytes,
                d.max_file_path_bytes as u64,
            )?,
        )?,
        default_timeout: raw.default_timeout.unwrap_or(d.default_timeout),
        max_timeout: raw.max_timeout.unwrap_or(d.max_timeout),
        max_concurrent_commands: raw
            .max_concurrent_commands
            .unwrap_or(d.max_concurrent_commands),
        max_commands_per_principal: raw
            .max_commands_per_principal
            .unwrap_or(d.max_commands_per_principal),
        requests_per_second_per_principal: raw
            .requests_per_second_per_principal
            .unwrap_or(d.requests_per_second_per_principal),
        request_burst_per_principal: raw
            .request_burst_per_principal
            .unwrap_or(d.request_burst_per_principal),
        max_in_flight_requests: raw
            .max_in_flight_requests
            .unwrap_or(d.max_in_flight_requests),
        max_connections_per_source: raw
            .max_connections_per_source
            .unwrap_or(d.max_connections_per_source),
        max_connections: raw.max_connections.unwrap_or(d.max_connections),
        handshake_timeout: raw.handshake_timeout.unwrap_or(d.handshake_timeout),
        request_read_timeout: raw.request_read_timeout.unwrap_or(d.request_read_timeout),
        max_output_bytes: usize_of(
            "max_output_bytes",
            size(
                "max_output_bytes",
                raw.max_output_bytes,
                d.max_output_bytes as u64,
            )?,
        )?,
        output_head_percent: raw.output_head_percent.unwrap_or(d.output_head_percent),
        kill_grace: raw.kill_grace.unwrap_or(d.kill_grace),
    };
    if limits.output_head_percent > 100 {
        return Err(invalid(
            "limits.output_head_percent",
            format!(
                "{} is over 100; it is the share of max_output_bytes that keeps the output's head",
                limits.output_head_percent
            ),
        ));
    }
    if limits.request_read_timeout.is_zero() {
        return Err(invalid(
            "limits.request_read_timeout",
            "must be longer than 0s",
        ));
    }
    if limits.handshake_timeout.is_zero() {
        return Err(invalid(
            "limits.handshake_timeout",
            "must be longer than 0s",
        ));
    }
    if limits.default_timeout.is_zero() {
        return Err(invalid("limits.default_timeout", "must be longer than 0s"));
    }
    if limits.max_timeout < limits.default_timeout {
        return Err(invalid(
            "limits.max_timeout",
            format!(
                "{} is shorter than limits.default_timeout ({}); raise it or lower the default",
                humantime::format_duration(limits.max_timeout),
                humantime::format_duration(limits.default_timeout)
            ),
        ));
    }
    for (key, value) in [
        ("max_concurrent_commands", limits.max_concurrent_commands),
        (
            "max_commands_per_principal",
            limits.max_commands_per_principal,
        ),
        (
            "requests_per_second_per_principal",
            limits.requests_per_second_per_principal as usize,
        ),
        (
            "request_burst_per_principal",
            limits.request_burst_per_principal as usize,
        ),
        ("max_in_flight_requests", limits.max_in_flight_requests),
        (
            "max_connections_per_source",
            limits.max_connections_per_source,
        ),
        ("max_connections", limits.max_connections),
    ] {
        if value == 0 {
            return Err(invalid(format!("limits.{key}"), "must be at least 1"));
        }
    }
    Ok(limits)
}
