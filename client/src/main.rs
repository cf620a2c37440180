//! `kinvoke`: run kubectl/helm on a private cluster through a kinvoke gateway, like
//! `az aks command invoke`. The exit status is the remote command's exit code whenever
//! the command ran; other outcomes have their own documented codes (see [`exit`]).

mod attach;
mod conn;
mod profiles;
mod render;
mod retry;
mod token;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kinvoke_proto::v1 as pb;
use kinvoke_proto::v1::CommandState;
use tokio_stream::StreamExt;
use tonic::Code;

use conn::{ConnArgs, LocalError, Unreachable, error_chain};
use render::Format;

/// Exit codes other than the remote command's own.
mod exit {
    /// Bad flags, unreadable files, bad client config.
    pub const USAGE: u8 = 2;
    /// The gateway refused the request (invalid, not found, over a limit).
    pub const REJECTED: u8 = 65;
    /// The gateway failed internally.
    pub const GATEWAY_ERROR: u8 = 70;
    /// The gateway cannot be reached, or is unavailable.
    pub const UNAVAILABLE: u8 = 69;
    /// Not authenticated, or not allowed.
    pub const DENIED: u8 = 77;
    /// The command ran past its timeout.
    pub const TIMED_OUT: u8 = 124;
    /// The command could not run, or was interrupted.
    pub const FAILED: u8 = 125;
    /// The command was canceled.
    pub const CANCELED: u8 = 130;
}

/// Run kubectl/helm commands on private clusters through a kinvoke gateway.
#[derive(Debug, Parser)]
#[command(name = "kinvoke", version, after_help = EXIT_HELP)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Default)]
    output: Format,
    /// JMESPath query over the -o json/yaml object (az's --query), e.g.
    /// `--query provisioningState` or `--query "[?provisioningState=='Failed'].id"`;
    /// implies -o json unless -o yaml is given.
    #[arg(long, global = true)]
    query: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

const EXIT_HELP: &str = "Exit status: the remote command's exit code when it ran; 124 timed out, \
125 failed to run or interrupted, 130 canceled; 2 usage or local error, 65 request rejected by the \
gateway, 69 gateway unreachable or unavailable, 70 gateway error, 77 not authenticated or not allowed.";

#[derive(Debug, Args)]
struct Target {
    /// Cluster name as configured on the gateway.
    #[arg(short = 'n', long, visible_alias = "name")]
    cluster: String,
    /// Command id, as printed by `invoke`.
    #[arg(short = 'i', long)]
    command_id: String,
}

#[derive(Debug, Subcommand)]
enum BreakGlassCmd {
    /// Activate an eligible assignment for a while, with a reason.
    Activate {
        /// Cluster name as configured on the gateway.
        #[arg(short = 'n', long, visible_alias = "name")]
        cluster: String,
        /// Role of the eligible assignment, e.g. "Cluster Admin".
        #[arg(long)]
        role: String,
        /// Why (the gateway may require a ticket id such as INC-1234).
        #[arg(long, visible_alias = "justification")]
        reason: String,
        /// How long, e.g. 30m (at most the assignment's max_duration).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Approve someone else's pending grant.
    Approve {
        /// Grant id.
        grant: String,
    },
    /// List grants you requested, may approve, or may audit.
    List {
        /// Only this cluster.
        #[arg(short = 'n', long, visible_alias = "name")]
        cluster: Option<String>,
        /// Include expired and revoked grants.
        #[arg(long)]
        all: bool,
    },
    /// End a grant now.
    Revoke {
        /// Grant id.
        grant: String,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command on a cluster and print its result.
    Invoke {
        /// Cluster name as configured on the gateway.
        #[arg(short = 'n', long, visible_alias = "name")]
        cluster: String,
        /// The command, e.g. "kubectl get pods -A".
        #[arg(short = 'c', long)]
        command: String,
        /// File or directory to attach (repeatable); `.` attaches the current directory.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// Return once the command has started; fetch the result with `kinvoke result`.
        #[arg(long)]
        no_wait: bool,
        /// How long the command may run, e.g. 90s, 5m (default: the gateway's).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Print the result of a command.
    Result {
        #[command(flatten)]
        target: Target,
        /// Wait until the command has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Print the output of a command; with --follow, live until it ends.
    Logs {
        #[command(flatten)]
        target: Target,
        /// Stream output as it is produced until the command ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Cancel a running command.
    Cancel {
        #[command(flatten)]
        target: Target,
    },
    /// Show who the gateway thinks you are and what you may do on each cluster.
    Whoami,
    /// List the clusters you hold any permission on.
    Clusters,
    /// Time-bound, audited break-glass access: activate an eligible role, approve, list, revoke.
    #[command(subcommand, name = "break-glass")]
    BreakGlass(BreakGlassCmd),
    /// List commands, newest first.
    List {
        /// Only this cluster.
        #[arg(short = 'n', long, visible_alias = "name")]
        cluster: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show the client config file, and add, remove or switch its profiles.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a shell completion script (e.g. `kinvoke completion bash > /etc/bash_completion.d/kinvoke`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `kinvoke man > kinvoke.1`.
    Man,
    /// Print the client's version and, when it can reach the gateway, the gateway's.
    Version,
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the config file's path, its profiles and the default one.
    View,
    /// Add a profile, or change it, from the connection flags given with this command
    /// (--endpoint, --ca-cert, --client-cert, --client-key, --token-file, --token-source,
    /// --audience, or their KINVOKE_* variables); the first profile becomes the default.
    SetProfile {
        /// Profile name.
        name: String,
    },
    /// Make a profile the default one (like `kubectl config use-context`).
    UseProfile {
        /// Profile name.
        name: String,
    },
    /// Remove a profile.
    DeleteProfile {
        /// Profile name.
        name: String,
    },
}

/// `kinvoke config ...`: no gateway involved.
fn config(conn: &ConnArgs, cmd: &ConfigCmd) -> anyhow::Result<u8> {
    let path = profiles::path_to_edit(conn.config.as_deref())?;
    let mut file = profiles::ConfigFile::open(&path)?;
    match cmd {
        ConfigCmd::View => {
            println!("# {}", file.path().display());
            let default = file.default_profile().unwrap_or_default();
            for name in file.profiles() {
                let mark = if name == default { "*" } else { " " };
                println!("# {mark} {name}");
            }
            print!("{}", file.text());
            return Ok(0);
        }
        ConfigCmd::SetProfile { name } => {
            // what a profile does not store is refused, not dropped
            if conn.token.is_some() {
                return Err(LocalError(
                    "a profile does not store a token (--token/KINVOKE_TOKEN); name where it \
                     comes from instead: --token-file FILE or --token-source SOURCE"
                        .to_owned(),
                )
                .into());
            }
            if conn.source_address.is_some() {
                return Err(LocalError(
                    "a profile does not store --source-address; pass it with each command"
                        .to_owned(),
                )
                .into());
            }
            let settings = profiles::ProfileSettings {
                endpoint: conn.endpoint.clone(),
                ca_cert: conn.ca_cert.as_deref().map(profiles::absolute),
                client_cert: conn.client_cert.as_deref().map(profiles::absolute),
                client_key: conn.client_key.as_deref().map(profiles::absolute),
                token_file: conn.token_file.as_deref().map(profiles::absolute),
                // a file source's path made absolute too, like the other paths
                token_source: conn.token_source.as_ref().map(|source| match source {
                    token::TokenSource::File(path) => {
                        token::TokenSource::File(profiles::absolute(path)).to_string()
                    }
                    other => other.to_string(),
                }),
                audience: conn.audience.clone(),
            };
            file.set_profile(name, &settings)?;
        }
        ConfigCmd::UseProfile { name } => file.use_profile(name)?,
        ConfigCmd::DeleteProfile { name } => file.delete_profile(name)?,
    }
    file.save()?;
    eprintln!(
        "kinvoke: {} (default profile: {})",
        file.path().display(),
        file.default_profile().unwrap_or_else(|| "none".to_owned())
    );
    Ok(0)
}

/// `kinvoke version`: the client's, and the gateway's when it answers.
async fn version(conn: &ConnArgs) -> u8 {
    println!("kinvoke {}", env!("CARGO_PKG_VERSION"));
    let gateway = async {
        let settings = conn.resolve().ok()?;
        let mut access = settings.connect().await.ok()?.access;
        let me = access.who_am_i(pb::WhoAmIRequest {}).await.ok()?;
        Some(me.into_inner().gateway_version)
    };
    match tokio::time::timeout(Duration::from_secs(10), gateway).await {
        Ok(Some(v)) if !v.is_empty() => println!("gateway {v}"),
        _ => println!("gateway unknown (not reachable with the current settings)"),
    }
    0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kinvoke: cannot start the async runtime: {err}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let (code, message) = describe(&err);
            eprintln!("kinvoke: {message}");
            ExitCode::from(code)
        }
    }
}

/// Maps an error to an exit code and one line for a person.
fn describe(err: &anyhow::Error) -> (u8, String) {
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        let code = match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::AlreadyExists => exit::REJECTED,
            Code::Unauthenticated | Code::PermissionDenied => exit::DENIED,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                exit::UNAVAILABLE
            }
            _ => exit::GATEWAY_ERROR,
        };
        let mut message = format!("{}: {}", code_name(status.code()), status.message());
        if let Some(source) = std::error::Error::source(status) {
            let chain = error_chain(source);
            message = format!("the connection to the gateway failed: {chain}");
            if let Some(hint) = tls_hint(&chain) {
                message.push_str("; ");
                message.push_str(hint);
            }
            return (exit::UNAVAILABLE, message);
        }
        if status.message().contains("message length too large") {
            message.push_str(
                "; the request is larger than the gateway accepts: attach fewer or smaller files (limits.max_total_file_bytes)",
            );
        }
        return (code, message);
    }
    if err.downcast_ref::<LocalError>().is_some() {
        return (exit::USAGE, err.to_string());
    }
    // a local problem met while writing output (a --query that fails on the object)
    if let Some(local) = err
        .downcast_ref::<std::io::Error>()
        .and_then(|e| e.get_ref())
        .and_then(|e| e.downcast_ref::<LocalError>())
    {
        return (exit::USAGE, local.to_string());
    }
    if err.downcast_ref::<Unreachable>().is_some() {
        return (exit::UNAVAILABLE, err.to_string());
    }
    (exit::GATEWAY_ERROR, format!("{err:#}"))
}

/// What to do about a TLS alert the gateway sent.
fn tls_hint(chain: &str) -> Option<&'static str> {
    if chain.contains("CertificateRequired") {
        Some("this listener requires a client certificate: pass --client-cert and --client-key")
    } else if chain.contains("UnknownCA") || chain.contains("BadCertificate") {
        Some(
            "the gateway does not accept this client certificate: it must be signed by the gateway's client CA",
        )
    } else if chain.contains("UnknownIssuer") || chain.contains("invalid peer certificate") {
        Some(
            "the gateway's certificate is not trusted: check --ca-cert and the endpoint's host name",
        )
    } else {
        None
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Cancelled => "CANCELLED",
        Code::Internal => "INTERNAL",
        Code::Unknown => "UNKNOWN",
        _ => "ERROR",
    }
}

/// The exit code a finished (or running) result stands for.
fn exit_code_of(r: &pb::CommandResult) -> u8 {
    match CommandState::try_from(r.state) {
        Ok(CommandState::Succeeded) => {
            // exit codes are 0-255 on Unix; keep the low byte as a shell would
            (r.exit_code.unwrap_or_default() & 0xff) as u8
        }
        Ok(CommandState::TimedOut) => exit::TIMED_OUT,
        Ok(CommandState::Canceled) => exit::CANCELED,
        Ok(CommandState::Running | CommandState::Pending) => 0,
        _ => exit::FAILED,
    }
}

/// A spinner with elapsed time on stderr, only when stderr is a terminal.
fn spinner(message: String) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match &cli.command {
        Cmd::Config(cmd) => return config(&cli.conn, cmd),
        Cmd::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "kinvoke", &mut std::io::stdout());
            return Ok(0);
        }
        Cmd::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Version => return Ok(version(&cli.conn).await),
        _ => {}
    }
    let settings = cli.conn.resolve()?;
    let format = match (&cli.query, cli.output) {
        (None, format) => format,
        (Some(query), format) => {
            render::set_query(query)?;
            match format {
                Format::Default | Format::Json => Format::Json,
                Format::Yaml => Format::Yaml,
                other => {
                    return Err(LocalError(format!(
                        "--query works with -o json or -o yaml, not {other:?}"
                    ))
                    .into());
                }
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        // answered above, without a gateway
        Cmd::Config(_) | Cmd::Completion { .. } | Cmd::Man | Cmd::Version => Ok(0),
        Cmd::Invoke {
            cluster,
            command,
            files,
            no_wait,
            timeout,
        } => {
            let files = attach::collect(&files)?;
            let mut client = settings.connect().await?.commands;
            let request = pb::InvokeCommandRequest {
                cluster,
                command,
                files,
                timeout: timeout
                    .map(prost_types::Duration::try_from)
                    .transpose()
                    .map_err(|e| LocalError(format!("--timeout: {e}")))?,
                no_wait,
            };
            let bar = (!no_wait)
                .then(|| spinner("waiting for the command".to_owned()))
                .flatten();
            let response = client.invoke_command(request).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let result = response?
                .into_inner()
                .result
                .ok_or_else(|| anyhow::anyhow!("the gateway sent no result"))?;
            if no_wait {
                render::started(&mut stdout, format, &result)?;
                stdout.flush()?;
                return Ok(0);
            }
            render::result(&mut stdout, format, &result)?;
            stdout.flush()?;
            Ok(exit_code_of(&result))
        }
        Cmd::Result { target, wait } => {
            let client = settings.connect().await?.commands;
            let bar = wait
                .then(|| spinner("waiting for the command".to_owned()))
                .flatten();
            let request = pb::GetCommandResultRequest {
                cluster: target.cluster,
                command_id: target.command_id,
                wait,
            };
            let response = retry::read(&client, &request, |mut c, r| async move {
                c.get_command_result(r).await
            })
            .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let result = response?.into_inner();
            render::result(&mut stdout, format, &result)?;
            stdout.flush()?;
            Ok(exit_code_of(&result))
        }
        Cmd::Logs { target, follow } => {
            let mut client = settings.connect().await?.commands;
            if !follow {
                let request = pb::GetCommandResultRequest {
                    cluster: target.cluster,
                    command_id: target.command_id,
                    wait: false,
                };
                let result = retry::read(&client, &request, |mut c, r| async move {
                    c.get_command_result(r).await
                })
                .await?
                .into_inner();
                render::output(&mut stdout, &result)?;
                return Ok(0);
            }
            let mut stream = client
                .stream_command_output(pb::StreamCommandOutputRequest {
                    cluster: target.cluster,
                    command_id: target.command_id,
                })
                .await?
                .into_inner();
            while let Some(event) = stream.next().await {
                match event?.event {
                    Some(pb::output_event::Event::Chunk(chunk)) => {
                        stdout.write_all(&chunk.data)?;
                        stdout.flush()?;
                    }
                    Some(pb::output_event::Event::Gap(gap)) => {
                        eprintln!(
                            "kinvoke: [{} bytes of output not shown: past the gateway's output limit or sent while this reader lagged]",
                            gap.length
                        );
                    }
                    Some(pb::output_event::Event::Finished(result)) => {
                        if format != Format::Default {
                            render::result(&mut stdout, format, &result)?;
                        }
                        stdout.flush()?;
                        return Ok(exit_code_of(&result));
                    }
                    None => {}
                }
            }
            Err(Unreachable(
                "the gateway closed the output stream before the command ended".to_owned(),
            )
            .into())
        }
        Cmd::Cancel { target } => {
            let mut client = settings.connect().await?.commands;
            let result = client
                .cancel_command(pb::CancelCommandRequest {
                    cluster: target.cluster,
                    command_id: target.command_id,
                })
                .await?
                .into_inner();
            render::result(&mut stdout, format, &result)?;
            stdout.flush()?;
            Ok(0)
        }
        Cmd::Whoami => {
            let access = settings.connect().await?.access;
            let me = retry::read(&access, &pb::WhoAmIRequest {}, |mut c, r| async move {
                c.who_am_i(r).await
            })
            .await?
            .into_inner();
            render::whoami(&mut stdout, format, &me)?;
            stdout.flush()?;
            Ok(0)
        }
        Cmd::Clusters => {
            let access = settings.connect().await?.access;
            let clusters = retry::read(
                &access,
                &pb::ListClustersRequest {},
                |mut c, r| async move { c.list_clusters(r).await },
            )
            .await?
            .into_inner()
            .clusters;
            render::clusters(&mut stdout, format, &clusters)?;
            stdout.flush()?;
            Ok(0)
        }
        Cmd::BreakGlass(cmd) => {
            let mut access = settings.connect().await?.access;
            match cmd {
                BreakGlassCmd::Activate {
                    cluster,
                    role,
                    reason,
                    duration,
                } => {
                    let grant = access
                        .activate_break_glass(pb::ActivateBreakGlassRequest {
                            cluster,
                            role,
                            justification: reason,
                            duration: Some(
                                prost_types::Duration::try_from(duration)
                                    .map_err(|e| LocalError(format!("--duration: {e}")))?,
                            ),
                        })
                        .await?
                        .into_inner();
                    render::grant(&mut stdout, format, &grant)?;
                }
                BreakGlassCmd::Approve { grant } => {
                    let grant = access
                        .approve_break_glass(pb::ApproveBreakGlassRequest { grant_id: grant })
                        .await?
                        .into_inner();
                    render::grant(&mut stdout, format, &grant)?;
                }
                BreakGlassCmd::Revoke { grant } => {
                    let grant = access
                        .revoke_grant(pb::RevokeGrantRequest { grant_id: grant })
                        .await?
                        .into_inner();
                    render::grant(&mut stdout, format, &grant)?;
                }
                BreakGlassCmd::List { cluster, all } => {
                    let request = pb::ListGrantsRequest {
                        cluster: cluster.unwrap_or_default(),
                        include_inactive: all,
                    };
                    let grants = retry::read(&access, &request, |mut c, r| async move {
                        c.list_grants(r).await
                    })
                    .await?
                    .into_inner()
                    .grants;
                    render::grants(&mut stdout, format, &grants)?;
                }
            }
            stdout.flush()?;
            Ok(0)
        }
        Cmd::List { cluster, limit } => {
            let client = settings.connect().await?.commands;
            let mut rows = Vec::new();
            let mut page_token = String::new();
            while rows.len() < limit {
                let request = pb::ListCommandsRequest {
                    cluster: cluster.clone().unwrap_or_default(),
                    page_size: u32::try_from(limit - rows.len()).unwrap_or(u32::MAX),
                    page_token: page_token.clone(),
                };
                let page = retry::read(&client, &request, |mut c, r| async move {
                    c.list_commands(r).await
                })
                .await?
                .into_inner();
                rows.extend(page.commands);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            rows.truncate(limit);
            render::list(&mut stdout, format, &rows)?;
            stdout.flush()?;
            Ok(0)
        }
    }
}
