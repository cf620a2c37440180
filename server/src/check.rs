//! `kinvoke-gateway check-config`: everything `serve` would find wrong with a config,
//! before it serves. The config parsed already (every key valid); this checks what needs
//! the outside world: TLS files, JWKS, each cluster's API server, the sandbox.

use crate::config::Config;
use crate::sandbox::SandboxMode;
use crate::sandbox::launch::Sandbox;

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
        lines: config.summary().lines().map(str::to_owned).collect(),
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
    if config
        .clusters
        .iter()
        .all(|c| c.sandbox == SandboxMode::Off)
    {
        report
            .lines
            .push("sandbox: not used (every cluster has sandbox = \"off\")".to_owned());
        return;
    }
    match Sandbox::new(config.sandbox.clone()).probe().await {
        Ok(features) => {
            report.lines.push(format!("sandbox: {features}"));
            report
                .warnings
                .extend(crate::sandbox_warnings(config, &features));
        }
        Err(reason) => report
            .problems
            .push(crate::GatewayError::Sandbox(reason).to_string()),
    }
}
