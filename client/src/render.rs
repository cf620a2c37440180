//! How results are printed: az's default text, or the result object as JSON, YAML, a
//! table, TSV, or nothing.

use std::io::{self, Write};

use base64::Engine;
use kinvoke_proto::v1::{
    ClusterAccess, CommandResult, CommandState, Grant, GrantState, WhoAmIResponse,
};
use serde::Serialize;

/// `-o/--output` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Like az: a status line, then the command's output.
    Default,
    /// The result object as JSON.
    Json,
    /// The result object as YAML.
    Yaml,
    /// Aligned columns with a header.
    Table,
    /// Tab-separated values: id, state, exit code, started, finished, reason.
    Tsv,
    /// Nothing (the exit code still tells).
    None,
}

/// The result object printed by -o json/yaml, named like az's.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultView {
    id: String,
    cluster: String,
    provisioning_state: &'static str,
    exit_code: Option<i32>,
    started_at: Option<String>,
    finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logs: Option<String>,
    /// How `logs` holds the output: `utf-8` (as written), or `utf-8-lossy` when the
    /// output is not UTF-8 and bytes were replaced with U+FFFD in `logs`; then
    /// `logsBase64` holds the raw bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    logs_encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logs_base64: Option<String>,
    reason: String,
    output_truncated: bool,
    output_size: u64,
    command: String,
    principal: String,
    files: Vec<FileView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    break_glass: Option<BreakGlassView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BreakGlassView {
    grant_id: String,
    justification: String,
}

#[derive(Debug, Serialize)]
struct FileView {
    path: String,
    size: u64,
    sha256: String,
}

/// The state's name as shown to people.
pub fn state_name(state: i32) -> &'static str {
    match CommandState::try_from(state) {
        Ok(CommandState::Pending) => "Pending",
        Ok(CommandState::Running) => "Running",
        Ok(CommandState::Succeeded) => "Succeeded",
        Ok(CommandState::Failed) => "Failed",
        Ok(CommandState::Canceled) => "Canceled",
        Ok(CommandState::TimedOut) => "TimedOut",
        _ => "Unknown",
    }
}

fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Option<String> {
    let ts = ts.as_ref()?;
    let t = jiff::Timestamp::new(ts.seconds, ts.nanos).ok()?;
    Some(t.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string())
}

/// az's time format: `2023-10-04 12:54:50+00:00`.
fn az_time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|ts| jiff::Timestamp::new(ts.seconds, ts.nanos).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S+00:00").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

impl ResultView {
    /// The view of a result; `with_logs` includes the output.
    pub fn of(r: &CommandResult, with_logs: bool) -> Self {
        Self {
            id: r.id.clone(),
            cluster: r.cluster.clone(),
            provisioning_state: state_name(r.state),
            exit_code: r.exit_code,
            started_at: rfc3339(&r.started_at),
            finished_at: rfc3339(&r.finished_at),
            logs: with_logs.then(|| String::from_utf8_lossy(&r.output).into_owned()),
            logs_encoding: with_logs.then(|| {
                if std::str::from_utf8(&r.output).is_ok() {
                    "utf-8"
                } else {
                    "utf-8-lossy"
                }
            }),
            logs_base64: (with_logs && std::str::from_utf8(&r.output).is_err())
                .then(|| base64::engine::general_purpose::STANDARD.encode(&r.output)),
            reason: r.reason.clone(),
            output_truncated: r.output_truncated,
            output_size: r.output_size,
            command: r.command.clone(),
            principal: r.principal.clone(),
            files: r
                .files
                .iter()
                .map(|f| FileView {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            break_glass: r.break_glass.as_ref().map(|b| BreakGlassView {
                grant_id: b.grant_id.clone(),
                justification: b.justification.clone(),
            }),
        }
    }
}

fn tsv_row(r: &CommandResult) -> String {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    [
        r.id.clone(),
        state_name(r.state).to_owned(),
        r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        rfc3339(&r.started_at).unwrap_or_default(),
        rfc3339(&r.finished_at).unwrap_or_default(),
        clean(&r.reason),
    ]
    .join("\t")
}

fn table(rows: &[&CommandResult]) -> String {
    let header = [
        "ID",
        "CLUSTER",
        "STATE",
        "EXIT",
        "STARTED",
        "PRINCIPAL",
        "BREAK-GLASS",
        "COMMAND",
    ];
    let mut cells: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let mut command = r.command.replace(['\t', '\n'], " ");
        if command.chars().count() > 48 {
            command = command.chars().take(47).collect::<String>() + "…";
        }
        cells.push(vec![
            r.id.clone(),
            r.cluster.clone(),
            state_name(r.state).to_owned(),
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            az_time(&r.started_at),
            r.principal.clone(),
            // the grant id, so anyone reading the list sees emergency access at once
            r.break_glass
                .as_ref()
                .map(|b| format!("yes ({})", b.grant_id))
                .unwrap_or_else(|| "-".to_owned()),
            command,
        ]);
    }
    columns(&header, cells)
}

/// Left-aligned columns under a header.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    cells.extend(rows);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The `--query` expression (az's JMESPath filter), set once at start-up.
static QUERY: std::sync::OnceLock<jmespath::Expression<'static>> = std::sync::OnceLock::new();

/// Compiles `--query` and applies it to every `-o json`/`-o yaml` object printed from
/// now on; a bad expression is an error naming it.
pub fn set_query(text: &str) -> Result<(), crate::conn::LocalError> {
    let expression = jmespath::compile(text)
        .map_err(|e| crate::conn::LocalError(format!("--query {text:?}: {e}")))?;
    let _ = QUERY.set(expression);
    Ok(())
}

fn serialize<T: Serialize>(format: Format, value: &T) -> io::Result<String> {
    if let Some(query) = QUERY.get() {
        // a query that fails on this object is the caller's to fix (exit 2), not the
        // gateway's
        let local = |e: jmespath::JmespathError| {
            io::Error::other(crate::conn::LocalError(format!("--query: {e}")))
        };
        let data = jmespath::Variable::from_serializable(value).map_err(local)?;
        let found = query.search(data).map_err(local)?;
        return serialize_plain(format, &*found);
    }
    serialize_plain(format, value)
}

fn serialize_plain<T: Serialize>(format: Format, value: &T) -> io::Result<String> {
    match format {
        Format::Yaml => serde_saphyr::to_string(value).map_err(io::Error::other),
        _ => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(io::Error::other),
    }
}

/// Writes a result's kept output and, when the gateway cut it, says so on stderr with
/// the total size: every way of reading a result does (`invoke`, `result`, `logs`).
pub fn output(out: &mut impl Write, r: &CommandResult) -> io::Result<()> {
    out.write_all(&r.output)?;
    out.flush()?;
    if r.output_truncated {
        eprintln!("kinvoke: {}", truncation_notice(r));
    }
    Ok(())
}

/// What to tell a reader of a result whose output was cut.
pub fn truncation_notice(r: &CommandResult) -> String {
    format!(
        "output was cut: {} bytes were written and {} kept (the gateway's \
         limits.max_output_bytes; a marked line stands where bytes were left out); \
         follow it live with `kinvoke logs --follow` to see all of it",
        r.output_size,
        r.output.len()
    )
}

/// Prints one result in the chosen format.
pub fn result(out: &mut impl Write, format: Format, r: &CommandResult) -> io::Result<()> {
    match format {
        Format::Default => {
            match CommandState::try_from(r.state) {
                Ok(CommandState::Running) => writeln!(out, "command is in Running state")?,
                Ok(CommandState::Pending) => writeln!(out, "command is in Pending state")?,
                Ok(CommandState::Succeeded) => writeln!(
                    out,
                    "command started at {}, finished at {} with exitcode={}",
                    az_time(&r.started_at),
                    az_time(&r.finished_at),
                    r.exit_code.unwrap_or_default()
                )?,
                Ok(CommandState::TimedOut) => {
                    writeln!(out, "command timed out with reason: {}", r.reason)?
                }
                Ok(CommandState::Canceled) => {
                    writeln!(out, "command canceled with reason: {}", r.reason)?
                }
                _ => writeln!(out, "command failed with reason: {}", r.reason)?,
            }
            output(out, r)
        }
        Format::Json | Format::Yaml => {
            out.write_all(serialize(format, &ResultView::of(r, true))?.as_bytes())
        }
        Format::Table => out.write_all(table(&[r]).as_bytes()),
        Format::Tsv => writeln!(out, "{}", tsv_row(r)),
        Format::None => Ok(()),
    }
}

/// Prints a list of results (without output).
pub fn list(out: &mut impl Write, format: Format, rows: &[CommandResult]) -> io::Result<()> {
    match format {
        Format::Default | Format::Table => {
            out.write_all(table(&rows.iter().collect::<Vec<_>>()).as_bytes())
        }
        Format::Json | Format::Yaml => {
            let views: Vec<ResultView> = rows.iter().map(|r| ResultView::of(r, false)).collect();
            out.write_all(serialize(format, &views)?.as_bytes())
        }
        Format::Tsv => {
            for r in rows {
                writeln!(out, "{}", tsv_row(r))?;
            }
            Ok(())
        }
        Format::None => Ok(()),
    }
}

/// The whoami object printed by -o json/yaml.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WhoAmIView<'a> {
    principal: &'a str,
    groups: &'a [String],
    auth_method: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    issuer: &'a str,
    source_address: &'a str,
    listener: &'a str,
    clusters: Vec<ClusterView<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterView<'a> {
    cluster: &'a str,
    actions: &'a [String],
    run_command_enabled: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    restriction: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    grant_ids: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

fn cluster_views(clusters: &[ClusterAccess]) -> Vec<ClusterView<'_>> {
    clusters
        .iter()
        .map(|c| ClusterView {
            cluster: &c.cluster,
            actions: &c.actions,
            run_command_enabled: c.run_command_enabled,
            restriction: &c.restriction,
            grant_ids: &c.grant_ids,
            description: &c.description,
        })
        .collect()
}

fn cluster_rows(clusters: &[ClusterAccess]) -> String {
    let rows = clusters
        .iter()
        .map(|c| {
            vec![
                c.cluster.clone(),
                if c.run_command_enabled {
                    "enabled"
                } else {
                    "disabled"
                }
                .to_owned(),
                if c.actions.is_empty() {
                    "-".to_owned()
                } else {
                    c.actions.join(", ")
                },
                [
                    c.description.clone(),
                    c.restriction.clone(),
                    if c.grant_ids.is_empty() {
                        String::new()
                    } else {
                        format!("break-glass grant {}", c.grant_ids.join(", "))
                    },
                ]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
            ]
        })
        .collect();
    columns(&["CLUSTER", "RUN COMMAND", "ACTIONS", "NOTE"], rows)
}

/// Prints the caller's identity and permissions.
pub fn whoami(out: &mut impl Write, format: Format, me: &WhoAmIResponse) -> io::Result<()> {
    let view = WhoAmIView {
        principal: &me.principal,
        groups: &me.groups,
        auth_method: &me.auth_method,
        issuer: &me.issuer,
        source_address: &me.source_address,
        listener: &me.listener,
        clusters: cluster_views(&me.clusters),
    };
    match format {
        Format::Json | Format::Yaml => out.write_all(serialize(format, &view)?.as_bytes()),
        Format::Tsv => writeln!(
            out,
            "{}\t{}\t{}\t{}",
            me.principal,
            me.auth_method,
            me.source_address,
            me.groups.join(",")
        ),
        Format::None => Ok(()),
        Format::Default | Format::Table => {
            let method = if me.issuer.is_empty() {
                me.auth_method.clone()
            } else {
                format!("{} (issuer {})", me.auth_method, me.issuer)
            };
            let groups = if me.groups.is_empty() {
                "-".to_owned()
            } else {
                me.groups.join(", ")
            };
            writeln!(out, "principal:  {}", me.principal)?;
            writeln!(out, "groups:     {groups}")?;
            writeln!(out, "auth:       {method}")?;
            writeln!(
                out,
                "source:     {} (listener {})",
                me.source_address, me.listener
            )?;
            if me.clusters.is_empty() {
                writeln!(out, "clusters:   none (no assignment gives you access)")
            } else {
                writeln!(out)?;
                out.write_all(cluster_rows(&me.clusters).as_bytes())
            }
        }
    }
}

/// Prints the clusters the caller may use.
pub fn clusters(
    out: &mut impl Write,
    format: Format,
    clusters: &[ClusterAccess],
) -> io::Result<()> {
    match format {
        Format::Json | Format::Yaml => {
            out.write_all(serialize(format, &cluster_views(clusters))?.as_bytes())
        }
        Format::Tsv => {
            for c in clusters {
                writeln!(
                    out,
                    "{}\t{}\t{}",
                    c.cluster,
                    c.run_command_enabled,
                    c.actions.join(",")
                )?;
            }
            Ok(())
        }
        Format::None => Ok(()),
        Format::Default | Format::Table => out.write_all(cluster_rows(clusters).as_bytes()),
    }
}

/// A grant as printed by -o json/yaml.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GrantView<'a> {
    id: &'a str,
    cluster: &'a str,
    role: &'a str,
    principal: &'a str,
    state: &'static str,
    justification: &'a str,
    assignment: &'a str,
    requested_at: Option<String>,
    starts_at: Option<String>,
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    approval_from: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    approved_by: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    revoked_by: &'a str,
}

fn grant_state(state: i32) -> &'static str {
    match GrantState::try_from(state) {
        Ok(GrantState::Pending) => "Pending",
        Ok(GrantState::Active) => "Active",
        Ok(GrantState::Expired) => "Expired",
        Ok(GrantState::Revoked) => "Revoked",
        _ => "Unknown",
    }
}

fn grant_view(g: &Grant) -> GrantView<'_> {
    GrantView {
        id: &g.id,
        cluster: &g.cluster,
        role: &g.role,
        principal: &g.principal,
        state: grant_state(g.state),
        justification: &g.justification,
        assignment: &g.assignment,
        requested_at: rfc3339(&g.requested_at),
        starts_at: rfc3339(&g.starts_at),
        expires_at: rfc3339(&g.expires_at),
        approval_from: &g.approval_from,
        approved_by: &g.approved_by,
        revoked_by: &g.revoked_by,
    }
}

fn grant_rows(grants: &[Grant]) -> String {
    let rows = grants
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.cluster.clone(),
                g.role.clone(),
                g.principal.clone(),
                grant_state(g.state).to_owned(),
                if g.expires_at.is_some() {
                    az_time(&g.expires_at)
                } else {
                    "-".to_owned()
                },
                g.justification.replace(['\t', '\n'], " "),
            ]
        })
        .collect();
    columns(
        &[
            "ID",
            "CLUSTER",
            "ROLE",
            "PRINCIPAL",
            "STATE",
            "EXPIRES",
            "JUSTIFICATION",
        ],
        rows,
    )
}

/// Prints one grant.
pub fn grant(out: &mut impl Write, format: Format, g: &Grant) -> io::Result<()> {
    match format {
        Format::Json | Format::Yaml => out.write_all(serialize(format, &grant_view(g))?.as_bytes()),
        Format::Tsv => writeln!(
            out,
            "{}\t{}\t{}\t{}",
            g.id,
            grant_state(g.state),
            g.cluster,
            g.role
        ),
        Format::None => Ok(()),
        Format::Table => out.write_all(grant_rows(std::slice::from_ref(g)).as_bytes()),
        Format::Default => match GrantState::try_from(g.state) {
            Ok(GrantState::Pending) => writeln!(
                out,
                "grant {} is pending approval from {}: {} on {} for {} ({})\nan approver runs: kinvoke break-glass approve {}",
                g.id,
                if g.approval_from.is_empty() {
                    "an approver"
                } else {
                    &g.approval_from
                },
                g.role,
                g.cluster,
                g.principal,
                g.justification,
                g.id
            ),
            _ => writeln!(
                out,
                "grant {} is {}: {} on {} for {} until {} ({})",
                g.id,
                grant_state(g.state),
                g.role,
                g.cluster,
                g.principal,
                az_time(&g.expires_at),
                g.justification
            ),
        },
    }
}

/// Prints grants.
pub fn grants(out: &mut impl Write, format: Format, grants: &[Grant]) -> io::Result<()> {
    match format {
        Format::Json | Format::Yaml => {
            let views: Vec<GrantView<'_>> = grants.iter().map(grant_view).collect();
            out.write_all(serialize(format, &views)?.as_bytes())
        }
        Format::Tsv => {
            for g in grants {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    g.id,
                    grant_state(g.state),
                    g.cluster,
                    g.role
                )?;
            }
            Ok(())
        }
        Format::None => Ok(()),
        Format::Default | Format::Table => out.write_all(grant_rows(grants).as_bytes()),
    }
}

/// What `--no-wait` prints by default: the id and how to fetch the result.
pub fn started(out: &mut impl Write, format: Format, r: &CommandResult) -> io::Result<()> {
    if format != Format::Default {
        return result(out, format, r);
    }
    writeln!(
        out,
        "command id: {}\nstarted at {}, state {}\nfetch the result with:\n  kinvoke result --cluster {} --command-id {}",
        r.id,
        az_time(&r.started_at),
        state_name(r.state),
        r.cluster,
        r.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CommandResult {
        CommandResult {
            id: "0123456789abcdef0123456789abcdef".into(),
            cluster: "prod".into(),
            state: CommandState::Succeeded.into(),
            exit_code: Some(1),
            started_at: Some(prost_types::Timestamp {
                seconds: 1_696_424_090,
                nanos: 0,
            }),
            finished_at: Some(prost_types::Timestamp {
                seconds: 1_696_424_091,
                nanos: 5,
            }),
            output: b"hello\n".to_vec(),
            command: "kubectl get pods".into(),
            ..CommandResult::default()
        }
    }

    #[test]
    fn default_output_matches_az() {
        let mut out = Vec::new();
        result(&mut out, Format::Default, &sample()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "command started at 2023-10-04 12:54:50+00:00, finished at 2023-10-04 12:54:51+00:00 with exitcode=1\nhello\n"
        );
    }

    #[test]
    fn failed_commands_show_the_reason() {
        let r = CommandResult {
            state: CommandState::Failed.into(),
            reason: "gateway restarted before the command finished".into(),
            output: Vec::new(),
            ..sample()
        };
        let mut out = Vec::new();
        result(&mut out, Format::Default, &r).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "command failed with reason: gateway restarted before the command finished\n"
        );
    }

    #[test]
    fn json_uses_az_names() {
        let mut out = Vec::new();
        result(&mut out, Format::Json, &sample()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["provisioningState"], "Succeeded");
        assert_eq!(v["exitCode"], 1);
        assert_eq!(v["logs"], "hello\n");
        assert_eq!(v["startedAt"], "2023-10-04T12:54:50+00:00");
    }

    #[test]
    fn json_says_when_the_output_is_not_utf8_and_carries_its_raw_bytes() {
        let mut out = Vec::new();
        result(&mut out, Format::Json, &sample()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["logsEncoding"], "utf-8");
        assert!(v.get("logsBase64").is_none(), "{v}");

        let mut binary = sample();
        binary.output = b"ok \xff\xfe end\n".to_vec();
        let mut out = Vec::new();
        result(&mut out, Format::Json, &binary).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["logs"], "ok \u{fffd}\u{fffd} end\n");
        assert_eq!(v["logsEncoding"], "utf-8-lossy");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["logsBase64"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw, binary.output);
    }

    #[test]
    fn yaml_and_tsv_carry_the_same_fields() {
        let mut out = Vec::new();
        result(&mut out, Format::Yaml, &sample()).unwrap();
        let yaml = String::from_utf8(out).unwrap();
        assert!(yaml.contains("provisioningState: Succeeded"), "{yaml}");
        let mut out = Vec::new();
        result(&mut out, Format::Tsv, &sample()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0123456789abcdef0123456789abcdef\tSucceeded\t1\t2023-10-04T12:54:50+00:00\t2023-10-04T12:54:51+00:00\t\n"
        );
    }

    #[test]
    fn table_has_a_header_and_one_row_per_result() {
        let mut out = Vec::new();
        list(&mut out, Format::Table, &[sample(), sample()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with("ID "), "{text}");
    }
}
