//! `kinvoke-gateway check-config`: everything `serve` would find wrong with a config,
//! before it serves. The config parsed already (every key valid); this checks what needs
//! the outside world: TLS files, JWKS, each cluster's API server, the sandbox.

use crate::config::{ApiServer, Config, ExecMode};

/// What `check-config` found: lines to print, warnings, and problems that would stop
/// the gateway (any problem = the config is not OK).
#[derive(Debug, Default)]
pub struct Report {
    /// The summary and what was probed, one line each.
    pub lines: Vec<String>,
    /// Legal but risky settings.
    pub warnings: Vec<String>,
    /// What `serve` would fail on.
    pub problems: Vec<String>,
}

/// Checks a parsed config against the world: listener TLS files, token issuers, each
/// cluster's API server (with [`crate::probe_cluster`]), and the sandbox's probe.
pub async fn check(config: &Config) -> Report {
    let mut report = Report {
        lines: summary(config).lines().map(str::to_owned).collect(),
        warnings: config.warnings.clone(),
        problems: Vec::new(),
    };
    for listener in &config.listeners {
        if let Err(err) = crate::ingress::tls_config(listener) {
            report.problems.push(err.to_string());
        }
    }
    for issuer in &config.authn.issuers {
        if let Err(err) = crate::authn::jwt::Issuer::new(issuer.clone()) {
            report.problems.push(err.to_string());
        }
    }
    clusters(config, &mut report).await;
    sandbox(config, &mut report).await;
    report
}

async fn clusters(config: &Config, report: &mut Report) {
    let clients = match crate::kube_clients(config).await {
        Ok(clients) => clients,
        Err(err) => {
            report.problems.push(err.to_string());
            return;
        }
    };
    let mut names: Vec<&String> = clients.keys().collect();
    names.sort();
    for name in names {
        let Some(client) = clients.get(name) else {
            continue;
        };
        match crate::probe_cluster(client).await {
            Ok(version) => report.lines.push(format!(
                "cluster \"{name}\": API server reachable, Kubernetes {version}"
            )),
            Err(problem) => report
                .problems
                .push(format!("cluster \"{name}\": {problem}")),
        }
    }
}

async fn sandbox(config: &Config, report: &mut Report) {
    match crate::probe_sandbox(config, None).await {
        Ok(None) => report
            .lines
            .push("sandbox: not used (every cluster has sandbox = \"off\")".to_owned()),
        Ok(Some((_, features))) => {
            report.lines.push(format!("sandbox: {features}"));
            report
                .warnings
                .extend(crate::sandbox_warnings(config, &features));
        }
        Err(err) => report.problems.push(err.to_string()),
    }
}

/// A short human summary of a config, one line per setting.
fn summary(config: &Config) -> String {
    let mut out = String::new();
    let l = &config.limits;
    out.push_str(&format!("state dir: {}\n", config.state_dir.display()));
    let where_kept = match &config.store.postgres {
        Some(pg) => format!(
            "PostgreSQL {} as replica {}",
            crate::store::redacted_url(&pg.url),
            pg.replica_id
        ),
        None => config.store.path.display().to_string(),
    };
    out.push_str(&format!(
        "store: {where_kept} (retention {})\n",
        humantime::format_duration(config.store.retention)
    ));
    for l in &config.listeners {
        let mut auth = Vec::new();
        if l.auth.mtls {
            auth.push("client certificates");
        }
        if l.auth.tokens {
            auth.push("bearer tokens");
        }
        let ranges = if l.authorized_ip_ranges.is_empty() {
            "any address".to_owned()
        } else {
            format!("{} range(s)", l.authorized_ip_ranges.ranges().len())
        };
        let proxies = if l.trusted_proxies.is_empty() {
            String::new()
        } else {
            format!(
                ", PROXY protocol from {} range(s)",
                l.trusted_proxies.ranges().len()
            )
        };
        out.push_str(&format!(
            "listener \"{}\": {} ({:?}, {ranges}{proxies}; accepts {})\n",
            l.name,
            l.address,
            l.exposure,
            auth.join(" or ")
        ));
    }
    out.push_str(&format!(
        "authentication: {} certificate rule(s), {} static token(s), {} OIDC issuer(s)\n",
        config.authn.mtls_rules.len(),
        config.authn.static_tokens.len(),
        config.authn.issuers.len()
    ));
    for c in &config.clusters {
        let mode = match c.exec.mode {
            ExecMode::Shell => "shell".to_owned(),
            ExecMode::Argv => format!(
                "argv, programs: {}",
                c.exec
                    .allowed_programs
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let gate = if c.disable_run_command {
            ", run command disabled"
        } else {
            ""
        };
        let api = match &c.api {
            Some(ApiServer::Kubeconfig { path, context }) => format!(
                ", API server from {}{}",
                path.display(),
                context
                    .as_ref()
                    .map(|c| format!(" (context {c})"))
                    .unwrap_or_default()
            ),
            Some(ApiServer::InCluster) => ", in-cluster API server".to_owned(),
            None => ", no API server (commands get no kubeconfig)".to_owned(),
        };
        out.push_str(&format!(
            "cluster \"{}\": local executor, {mode}{gate}{api}\n",
            c.name
        ));
    }
    out.push_str(&format!(
        "limits: command {} B, {} files / {} B, output {} B, timeout {} (max {}), {} concurrent ({} per principal), {} requests/s per principal (burst {}), {} requests in flight, {} connections ({} per source)\n",
        l.max_command_bytes,
        l.max_files,
        l.max_total_file_bytes,
        l.max_output_bytes,
        humantime::format_duration(l.default_timeout),
        humantime::format_duration(l.max_timeout),
        l.max_concurrent_commands,
        l.max_commands_per_principal,
        l.requests_per_second_per_principal,
        l.request_burst_per_principal,
        l.max_in_flight_requests,
        l.max_connections,
        l.max_connections_per_source,
    ));
    out
}
