//! `kinvoke-gateway`: parse arguments, set up logging, load the config, bind, serve.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kinvoke_gateway::config::Config;
use kinvoke_gateway::{dev, ingress};

/// Runs kubectl/helm commands next to private clusters for authorized callers.
#[derive(Debug, Parser)]
#[command(name = "kinvoke-gateway", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "KINVOKE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Check the hash chain of one audit file, or of rotated files given oldest first
    /// (each must continue the previous one). Exit 0 with the count and head hash, or 1
    /// with the first broken, missing or reordered line.
    Verify {
        /// Audit files, oldest first (e.g. audit.120.jsonl audit.jsonl).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head recorded elsewhere, as SEQ:SHA256 (from a `kinvoke::audit::head` log
        /// line or the head logged at a clean stop): the chain must pass through it, so
        /// removed last lines or a file replaced by another chain are found.
        #[arg(long, value_name = "SEQ:SHA256")]
        head: Option<kinvoke_gateway::audit::chain::Head>,
        /// Accept files that do not start at seq 1 (older rotated files were deleted on
        /// purpose): the first line then anchors the chain.
        #[arg(long)]
        partial: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve with a config file.
    Serve {
        /// Gateway config (TOML).
        #[arg(long, env = "KINVOKE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print a summary (exit 0 when valid, 1 otherwise).
    CheckConfig {
        /// Gateway config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the config value (`sha256:<hex>`) for a static token read from stdin, so the
    /// token never appears in the process list or shell history.
    HashToken {
        /// Generate a new random token (printed on stderr) instead of reading one.
        #[arg(long)]
        generate: bool,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Start a local development gateway: generated certificates, a shell cluster `local` and a simulated Kubernetes cluster `sandbox`.
    Dev {
        /// Where certificates, configs and results are kept.
        #[arg(long, default_value = ".kinvoke-dev")]
        state_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Also merge the profile `dev` into the `kinvoke` client's default config file
        /// (~/.config/kinvoke/config.toml), so the client needs no --config; it becomes
        /// the default profile when the file has none.
        #[arg(long)]
        merge_client_config: bool,
    },
}

fn main() -> ExitCode {
    // the command sandbox's launcher stages are this executable too; they must run
    // before anything else (a user namespace can only be entered single-threaded)
    if let Some(code) = kinvoke_gateway::sandbox::stage::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // exactly one crypto provider (ring) for every rustls user in the process
    let _ = rustls::crypto::ring::default_provider().install_default();
    match real_main(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kinvoke-gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                let report = runtime()?.block_on(kinvoke_gateway::check::check(&cfg));
                for line in &report.lines {
                    println!("{line}");
                }
                for warning in &report.warnings {
                    println!("warning: {warning}");
                }
                if report.problems.is_empty() {
                    println!("config OK: {}", config.display());
                    Ok(ExitCode::SUCCESS)
                } else {
                    for p in &report.problems {
                        eprintln!("error: {p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
            Err(err) => {
                eprintln!("error: {err}");
                Ok(ExitCode::FAILURE)
            }
        },
        Cmd::Audit {
            command:
                AuditCmd::Verify {
                    files,
                    head,
                    partial,
                },
        } => {
            use kinvoke_gateway::audit::chain;
            match chain::verify_files_from(&files, head.as_ref(), partial) {
                Ok((total, last)) => {
                    let anchored = head
                        .map(|h| format!(", through the recorded head seq {}", h.seq))
                        .unwrap_or_default();
                    println!(
                        "ok: {total} events{anchored}, head seq {} sha256 {}",
                        last.seq, last.hash
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(err) => {
                    println!("{err}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::HashToken { generate } => {
            let token = if generate {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
                let token = kinvoke_gateway::hex::encode(&bytes);
                eprintln!("token (give it to the caller; it is not stored): {token}");
                token
            } else {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the token from stdin")?;
                let token = line.trim().to_owned();
                if token.is_empty() {
                    anyhow::bail!(
                        "no token on stdin; pipe it in: `printf %s \"$TOKEN\" | kinvoke-gateway hash-token`"
                    );
                }
                token
            };
            println!(
                "{}",
                kinvoke_gateway::authn::static_token::hash_token(&token)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve { config } => {
            let cfg = Config::load(&config)?;
            runtime()?.block_on(serve(cfg, None))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dev {
            state_dir,
            listen,
            merge_client_config,
        } => {
            let files = dev::prepare(&state_dir, listen)
                .with_context(|| format!("cannot prepare {}", state_dir.display()))?;
            let cfg = Config::load(&files.gateway_config)?;
            let merge = if merge_client_config {
                Some(dev::default_client_config().ok_or_else(|| {
                    anyhow::anyhow!("--merge-client-config: this system has no config directory (HOME is not set)")
                })?)
            } else {
                None
            };
            runtime()?.block_on(serve(cfg, Some((files, merge))))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads each cluster's API server settings and asks it for its version.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Serves `cfg`; for `dev`, also its files, and where to merge its client profile.
async fn serve(cfg: Config, dev: Option<(dev::DevFiles, Option<PathBuf>)>) -> anyhow::Result<()> {
    let (dev, merge_into) = match dev {
        Some((files, merge)) => (Some(files), merge),
        None => (None, None),
    };
    // signal handlers first: a SIGTERM right after the ready line must stop cleanly
    let shutdown = shutdown_signal()?;
    let listeners = ingress::bind(&cfg.listeners).await.with_context(|| {
        if dev.is_some() {
            "is another gateway running? pick a free address with --listen 127.0.0.1:PORT"
                .to_owned()
        } else {
            "cannot start the listeners".to_owned()
        }
    })?;
    // the simulated cluster must answer before the gateway connects to it
    let _sandbox = match &dev {
        Some(files) => Some(dev::start_sandbox(files, &cfg.sandbox).await?),
        None => None,
    };
    // state before the ready line: a bad store or audit path fails before anyone connects
    let mut gateway = kinvoke_gateway::Gateway::open(cfg).await?;
    let admin = gateway.bind_admin().await?;
    let mut stdout = std::io::stdout().lock();
    let mut merged = None;
    if let Some(addr) = admin {
        // before the listeners' lines: whoever waits for those may scrape at once
        writeln!(
            stdout,
            "kinvoke-gateway: admin listener serving on http://{addr} (/metrics, /healthz, /readyz)"
        )?;
    }
    for l in &listeners {
        let addr = l.local_addr().context("cannot read the bound address")?;
        // the client config first: whoever reads the ready line may use it at once
        if let Some(files) = &dev {
            dev::write_client_config(files, addr)?;
            if let Some(path) = &merge_into {
                let default = dev::merge_client_config(files, addr, path)?;
                merged = Some((path.clone(), default));
            }
        }
        // one stable line per listener on stdout: scripts and tests wait for it
        writeln!(
            stdout,
            "kinvoke-gateway: listener \"{}\" serving on https://{addr}",
            l.name()
        )?;
    }
    if let Some(files) = &dev {
        // with the profile merged into the client's own file (and the default there),
        // the client needs no --config
        let config = match &merged {
            Some((path, default)) => {
                writeln!(
                    stdout,
                    "\nMerged profile \"{}\" into {} (default profile: {default}).",
                    dev::DEV_PROFILE,
                    path.display()
                )?;
                if default == dev::DEV_PROFILE {
                    String::new()
                } else {
                    format!("--profile {} ", dev::DEV_PROFILE)
                }
            }
            None => format!("--config {} ", files.client_config.display()),
        };
        writeln!(
            stdout,
            "\nDevelopment gateway ready (state in {dir}). In another terminal, try:\n\n  \
             kinvoke {config}invoke --cluster local --command \"echo hello | tr a-z A-Z\"\n  \
             kinvoke {config}invoke --cluster sandbox --command \"kubectl get pods -A; kubectl auth whoami\"\n  \
             kinvoke {config}invoke --cluster sandbox-pods --command \"kubectl get pods -n kinvoke-command\"\n  \
             kinvoke {config}list\n  \
             curl -s http://{admin}/metrics   # the admin listener: metrics, /healthz, /readyz\n\n\
             (sandbox is a simulated Kubernetes API server, not a real cluster; sandbox-pods runs each\n\
             command in a Pod of its own on it, as az aks command invoke does.) Press Ctrl-C to stop.",
            dir = files.dir.display(),
            admin = admin.map(|a| a.to_string()).unwrap_or_default(),
        )?;
        if merged.is_none() {
            writeln!(
                stdout,
                "Start with --merge-client-config to add this profile to kinvoke's default config file."
            )?;
        }
    }
    stdout.flush()?;
    drop(stdout);
    gateway.serve(listeners, shutdown).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
