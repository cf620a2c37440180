//! The pod executor: each command runs in a short-lived Pod of its own in the cluster,
//! as `az aks command invoke` does, away from the gateway and whatever it holds.
//!
//! For a command `ID` it creates, in the cluster's command namespace:
//! - Pod `kinvoke-ID` (`restartPolicy: Never`, no service account token, non-root,
//!   read-only root file system, every capability dropped, seccomp `RuntimeDefault`,
//!   `activeDeadlineSeconds` = the command's timeout, labelled with the command id only).
//!   An init container copies the attached files (modes kept) into the writable work
//!   directory and the kubeconfig into `$HOME/.kube/config`; the `command` container then
//!   runs the command there.
//! - Secret `kinvoke-ID`, owned by the Pod (deleting the Pod deletes it), holding the
//!   attached files and the command's kubeconfig (the relay's advertised URL, its CA,
//!   the command's token).
//!
//! The command's state follows the Pod: `Pending` until it runs, then `Running`; the
//! container's log is streamed into the command's output while it runs; the exit code and
//! reason come from the container status. Cancel deletes the Pod. The Pod and Secret are
//! deleted once the outcome is known, and [`PodExecutor::remove_leftovers`] deletes those
//! a killed gateway left behind.
//!
//! RBAC the gateway needs, in the command namespace only: `pods` (create, get, list,
//! watch, delete), `pods/log` (get), `secrets` (create, patch, list, delete).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use futures::{AsyncReadExt as _, TryStreamExt as _};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, LocalObjectReference, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::watcher;

use super::{Executor, Job, Outcome};
use crate::command::{Attachment, CommandId, CommandState};
use crate::store::Store;

/// Default `pod.namespace`.
pub const DEFAULT_NAMESPACE: &str = "kinvoke-command";
/// Default `pod.image`: the image AKS runs `az aks command invoke` in (bash, kubectl,
/// helm, jq). Pin your own by digest in production.
pub const DEFAULT_IMAGE: &str = "mcr.microsoft.com/aks/command/runtime:master";
/// Default `pod.startup_timeout`.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default `pod.run_as_user`: the conventional "nonroot" user of distroless images.
pub const DEFAULT_RUN_AS_USER: i64 = 65_532;
/// Default `pod.scratch_size_limit`: each of the work, home and tmp `emptyDir`s.
pub const DEFAULT_SCRATCH_SIZE: &str = "1Gi";

/// Label every object of the pod executor carries (`app.kubernetes.io/managed-by`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "kinvoke";
/// Label holding the command id (the only per-command label: no personal data).
pub const LABEL_COMMAND_ID: &str = "kinvoke.io/command-id";
/// Annotation holding when the command must have ended (RFC 3339, UTC); a gateway that
/// finds the Pod later deletes it even when the command is not in its store.
pub const ANNOTATION_DEADLINE: &str = "kinvoke.io/deadline";

/// Most bytes of attached files (all together) a command on a pod-executor cluster may
/// carry: Kubernetes caps a Secret at 1 MiB (etcd's object limit), and room is kept for
/// the kubeconfig.
pub const MAX_SECRET_FILE_BYTES: usize = 1024 * 1024 - 64 * 1024;

/// Name of the container that runs the command.
pub const COMMAND_CONTAINER: &str = "command";
/// Name of the init container that places the files.
pub const FILES_CONTAINER: &str = "files";

const WORK_DIR: &str = "/kinvoke/work";
const HOME_DIR: &str = "/kinvoke/home";
const TMP_DIR: &str = "/tmp";
const SECRET_DIR: &str = "/kinvoke/secret";

/// The init container's script: copies file `file-I` of the Secret to the path given as
/// the I-th (mode, path) argument pair, then the kubeconfig to `$HOME/.kube/config`.
const PLACE_FILES: &str = r#"set -eu
i=0
while [ "$#" -gt 0 ]; do
  mode=$1; path=$2; shift 2
  case "$path" in */*) mkdir -p -- "/kinvoke/work/${path%/*}" ;; esac
  cp -- "/kinvoke/secret/file-$i" "/kinvoke/work/$path"
  chmod -- "$mode" "/kinvoke/work/$path"
  i=$((i + 1))
done
mkdir -p /kinvoke/home/.kube
if [ -f /kinvoke/secret/kubeconfig ]; then
  cp /kinvoke/secret/kubeconfig /kinvoke/home/.kube/config
  chmod 600 /kinvoke/home/.kube/config
fi
"#;

/// CPU and memory of the Pod's containers, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodResources {
    /// `requests.cpu` (default `200m`, as AKS).
    pub requests_cpu: String,
    /// `requests.memory` (default `512Mi`).
    pub requests_memory: String,
    /// `limits.cpu` (default `500m`).
    pub limits_cpu: String,
    /// `limits.memory` (default `1Gi`).
    pub limits_memory: String,
}

impl Default for PodResources {
    fn default() -> Self {
        Self {
            requests_cpu: "200m".to_owned(),
            requests_memory: "512Mi".to_owned(),
            limits_cpu: "500m".to_owned(),
            limits_memory: "1Gi".to_owned(),
        }
    }
}

/// A cluster's pod executor settings (`[cluster.pod]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// Namespace the command Pods run in.
    pub namespace: String,
    /// Toolbox image with bash, kubectl, helm and jq.
    pub image: String,
    /// `imagePullPolicy`: `Always`, `IfNotPresent` or `Never`; `None` = Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Names of Secrets in the namespace to pull the image with.
    pub image_pull_secrets: Vec<String>,
    /// Requests and limits.
    pub resources: PodResources,
    /// `nodeSelector` (default `kubernetes.io/os: linux`).
    pub node_selector: BTreeMap<String, String>,
    /// `tolerations` (AKS cannot set them; a tainted system pool needs them).
    pub tolerations: Vec<Toleration>,
    /// `priorityClassName`.
    pub priority_class_name: Option<String>,
    /// Longest wait for the Pod to run; past it the command fails with what the
    /// scheduler or kubelet last reported.
    pub startup_timeout: Duration,
    /// User (and group) the containers run as; never 0.
    pub run_as_user: i64,
    /// `sizeLimit` of each `emptyDir` (work, home, tmp).
    pub scratch_size_limit: String,
    /// The Pods share the gateway's loopback (the simulated cluster's kubelet runs them
    /// as local processes), so a relay on loopback is reachable from them.
    pub loopback_relay: bool,
}

impl Default for PodSettings {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            resources: PodResources::default(),
            // a mixed cluster (AKS with Windows pools) must not place it on Windows
            node_selector: [("kubernetes.io/os".to_owned(), "linux".to_owned())].into(),
            tolerations: Vec::new(),
            priority_class_name: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            run_as_user: DEFAULT_RUN_AS_USER,
            scratch_size_limit: DEFAULT_SCRATCH_SIZE.to_owned(),
            loopback_relay: false,
        }
    }
}

/// Name of the Pod and of the Secret of a command.
pub fn object_name(id: &CommandId) -> String {
    format!("kinvoke-{id}")
}

fn labels(id: &CommandId) -> BTreeMap<String, String> {
    [
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_COMMAND_ID.to_owned(), id.to_string()),
    ]
    .into()
}

/// Seconds, rounded up, at least 1 (`activeDeadlineSeconds` must be positive).
fn whole_seconds(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// What a Pod needs besides its settings.
#[derive(Debug, Clone)]
pub struct PodCommand<'a> {
    /// The command's id.
    pub id: &'a CommandId,
    /// Program and arguments, already checked against the cluster's policy.
    pub argv: &'a [String],
    /// `PATH` for the command.
    pub path: &'a str,
    /// The command's timeout (`activeDeadlineSeconds`).
    pub timeout: Duration,
    /// The attached files.
    pub files: &'a [Attachment],
    /// Whether a kubeconfig is placed.
    pub kubeconfig: bool,
    /// `terminationGracePeriodSeconds`.
    pub kill_grace: Duration,
    /// When the command must have ended, for the leftover sweep.
    pub deadline: SystemTime,
}

/// The Pod that runs a command.
pub fn pod_spec(settings: &PodSettings, command: &PodCommand<'_>) -> Pod {
    let quantity = |q: &str| Quantity(q.to_owned());
    let resources = ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), quantity(&settings.resources.requests_cpu)),
                (
                    "memory".to_owned(),
                    quantity(&settings.resources.requests_memory),
                ),
            ]
            .into(),
        ),
        limits: Some(
            [
                ("cpu".to_owned(), quantity(&settings.resources.limits_cpu)),
                (
                    "memory".to_owned(),
                    quantity(&settings.resources.limits_memory),
                ),
            ]
            .into(),
        ),
        ..ResourceRequirements::default()
    };
    let security = SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let env = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    };
    let mut command_env = vec![
        env("PATH", command.path),
        env("HOME", HOME_DIR),
        env("TMPDIR", TMP_DIR),
        env("KINVOKE_COMMAND_ID", command.id.as_str()),
        env("LANG", "C.UTF-8"),
        // no terminal: programs must not wait for one
        env("TERM", "dumb"),
        // kubectl runs no plugin in place of one of its own subcommands
        env("KUBECTL_ENABLE_CMD_SHADOW", "false"),
    ];
    if command.kubeconfig {
        command_env.push(env("KUBECONFIG", &format!("{HOME_DIR}/.kube/config")));
    }
    let mut place_args = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        PLACE_FILES.to_owned(),
        "kinvoke-files".to_owned(),
    ];
    for file in command.files {
        place_args.push(format!("{:o}", file.mode));
        place_args.push(file.path.to_string_lossy().into_owned());
    }
    let container = |name: &str| Container {
        name: name.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        resources: Some(resources.clone()),
        security_context: Some(security.clone()),
        ..Container::default()
    };
    let files = Container {
        command: Some(place_args),
        env: Some(vec![env("PATH", command.path)]),
        volume_mounts: Some(vec![
            mount("work", WORK_DIR, false),
            mount("home", HOME_DIR, false),
            mount("secret", SECRET_DIR, true),
        ]),
        ..container(FILES_CONTAINER)
    };
    let run = Container {
        command: Some(command.argv.to_vec()),
        working_dir: Some(WORK_DIR.to_owned()),
        env: Some(command_env),
        volume_mounts: Some(vec![
            mount("work", WORK_DIR, false),
            mount("home", HOME_DIR, false),
            mount("tmp", TMP_DIR, false),
        ]),
        ..container(COMMAND_CONTAINER)
    };
    let scratch = |name: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(quantity(&settings.scratch_size_limit)),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    // each file keeps its mode in the Secret volume too, plus read for owner and group:
    // Kubernetes makes the files root's with the Pod's fsGroup, and the command's user
    // reads them through that group (the init container then sets the exact mode)
    let mut items: Vec<KeyToPath> = command
        .files
        .iter()
        .enumerate()
        .map(|(i, file)| KeyToPath {
            key: format!("file-{i}"),
            path: format!("file-{i}"),
            mode: i32::try_from((file.mode & 0o777) | 0o440).ok(),
            ..KeyToPath::default()
        })
        .collect();
    if command.kubeconfig {
        items.push(KeyToPath {
            key: "kubeconfig".to_owned(),
            path: "kubeconfig".to_owned(),
            mode: Some(0o440),
            ..KeyToPath::default()
        });
    }
    let name = object_name(command.id);
    let deadline = jiff::Timestamp::try_from(command.deadline)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels(command.id)),
            annotations: Some([(ANNOTATION_DEADLINE.to_owned(), deadline)].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            active_deadline_seconds: Some(whole_seconds(command.timeout)),
            termination_grace_period_seconds: Some(whole_seconds(command.kill_grace)),
            priority_class_name: settings.priority_class_name.clone(),
            node_selector: (!settings.node_selector.is_empty())
                .then(|| settings.node_selector.clone()),
            tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone()),
            image_pull_secrets: (!settings.image_pull_secrets.is_empty()).then(|| {
                settings
                    .image_pull_secrets
                    .iter()
                    .map(|s| LocalObjectReference { name: s.clone() })
                    .collect()
            }),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(settings.run_as_user),
                run_as_group: Some(settings.run_as_user),
                fs_group: Some(settings.run_as_user),
                seccomp_profile: Some(runtime_default()),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(vec![files]),
            containers: vec![run],
            volumes: Some(vec![
                scratch("work"),
                scratch("home"),
                scratch("tmp"),
                Volume {
                    name: "secret".to_owned(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name),
                        // readable by the Pod's group (fsGroup) only
                        default_mode: Some(0o440),
                        items: Some(items),
                        optional: Some(false),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The Secret with a command's files and kubeconfig; the executor makes the command's
/// Pod its owner once the Pod exists (see [`json_patch_owner`]).
pub fn secret_spec(
    settings: &PodSettings,
    id: &CommandId,
    files: &[Attachment],
    kubeconfig: Option<&str>,
) -> Secret {
    let mut data: BTreeMap<String, ByteString> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("file-{i}"), ByteString(f.content.clone())))
        .collect();
    if let Some(text) = kubeconfig {
        data.insert(
            "kubeconfig".to_owned(),
            ByteString(text.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(object_name(id)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels(id)),
            annotations: None,
            ..ObjectMeta::default()
        },
        data: Some(data),
        immutable: Some(true),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// Where a Pod is, as far as the command is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodProgress {
    /// Not running yet; what the scheduler or kubelet last said, if anything, and
    /// whether it cannot get better by waiting (an invalid image name).
    Pending {
        /// `REASON: message`, e.g. `Unschedulable: 0/3 nodes are available: ...`.
        reason: Option<String>,
        /// Waiting longer cannot help.
        hopeless: bool,
    },
    /// The command container runs.
    Running,
    /// The Pod has ended.
    Ended(Outcome),
}

/// Waiting reasons that no amount of waiting fixes.
const HOPELESS: &[&str] = &[
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// Reads a Pod's status: pending (and why), running, or ended (and how).
pub fn progress_of(pod: &Pod, timeout: Duration, memory_limit: &str) -> PodProgress {
    let Some(status) = pod.status.as_ref() else {
        return PodProgress::Pending {
            reason: None,
            hopeless: false,
        };
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let command = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == COMMAND_CONTAINER);
    let state = command.and_then(|c| c.state.as_ref());
    let terminated = state.and_then(|s| s.terminated.as_ref());
    let started = terminated.is_some() || state.is_some_and(|s| s.running.is_some());
    let init_failed = status
        .init_container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0);
    let pod_reason = status.reason.as_deref().unwrap_or_default();
    let pod_message = status.message.as_deref().unwrap_or_default();
    let ended = matches!(phase, "Succeeded" | "Failed");
    if pod_reason == "DeadlineExceeded" {
        return PodProgress::Ended(if started {
            Outcome {
                state: CommandState::TimedOut,
                exit_code: terminated.map(|t| t.exit_code),
                reason: format!(
                    "command timed out after {} (the Pod's activeDeadlineSeconds)",
                    humantime::format_duration(timeout)
                ),
            }
        } else {
            // the deadline counts from the Pod's start, image pull included: say what
            // held the command up rather than blaming the command
            let why = match pending_reason(status) {
                Some((reason, _)) => format!("; last reported: {reason}"),
                None => String::new(),
            };
            failed(format!(
                "the command's Pod reached its deadline ({}) before the command started{why}",
                humantime::format_duration(timeout)
            ))
        });
    }
    if ended && !pod_reason.is_empty() {
        // the node took the Pod away (Evicted, NodeShutdown, preemption): whatever the
        // container's exit code, the command did not run to its end
        return PodProgress::Ended(Outcome {
            state: CommandState::Failed,
            exit_code: terminated.map(|t| t.exit_code),
            reason: join_reason(pod_reason, pod_message),
        });
    }
    // the command container's end is the command's, even while an injected sidecar
    // keeps the Pod running
    if let Some(t) = terminated {
        let reason = t.reason.as_deref().unwrap_or_default();
        let message = t.message.as_deref().unwrap_or_default();
        return PodProgress::Ended(match reason {
            "Completed" | "Error" | "" => Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(t.exit_code),
                reason: String::new(),
            },
            "OOMKilled" => Outcome {
                state: CommandState::Failed,
                exit_code: Some(t.exit_code),
                reason: format!(
                    "OOMKilled: the command's container passed its memory limit ({memory_limit}, pod.resources.limits.memory) and was killed"
                ),
            },
            other => Outcome {
                state: CommandState::Failed,
                exit_code: Some(t.exit_code),
                reason: join_reason(other, message),
            },
        });
    }
    if let Some(t) = init_failed {
        return PodProgress::Ended(failed(format!(
            "the attached files could not be placed in the Pod (init container \"{FILES_CONTAINER}\" exited {}{}); does the image have /bin/sh, cp and chmod?",
            t.exit_code,
            t.reason
                .as_deref()
                .map(|r| format!(", {r}"))
                .unwrap_or_default()
        )));
    }
    if ended {
        return PodProgress::Ended(failed(format!(
            "the command's Pod ended {phase} without running the command"
        )));
    }
    if started {
        return PodProgress::Running;
    }
    match pending_reason(status) {
        Some((reason, hopeless)) => PodProgress::Pending {
            reason: Some(reason),
            hopeless,
        },
        None => PodProgress::Pending {
            reason: None,
            hopeless: false,
        },
    }
}

/// What the scheduler or kubelet last said about a Pod that has not started, and
/// whether waiting cannot help.
fn pending_reason(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<(String, bool)> {
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            join_reason(
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or_default(),
            )
        });
    if let Some(reason) = unscheduled {
        return Some((reason, false));
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .filter_map(|w| {
            let reason = w.reason.as_deref()?;
            (!matches!(reason, "ContainerCreating" | "PodInitializing")).then(|| {
                (
                    join_reason(reason, w.message.as_deref().unwrap_or_default()),
                    HOPELESS.contains(&reason),
                )
            })
        })
        .next()
}

fn join_reason(reason: &str, message: &str) -> String {
    if message.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason}: {message}")
    }
}

/// Runs commands in Pods of one cluster.
#[derive(Clone)]
pub struct PodExecutor {
    client: kube::Client,
    settings: PodSettings,
    kill_grace: Duration,
}

impl std::fmt::Debug for PodExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodExecutor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PodExecutor {
    /// An executor creating Pods with `client` (the gateway's own credentials) under
    /// `settings`; a canceled Pod gets `kill_grace` to stop.
    pub fn new(client: kube::Client, settings: PodSettings, kill_grace: Duration) -> Self {
        Self {
            client,
            settings,
            kill_grace,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    async fn run_job(&self, job: Job) -> Outcome {
        // the start-up clock runs from the first request: an API server that does not
        // answer counts against it too
        let started = Instant::now();
        let name = object_name(&job.id);
        let ns = &self.settings.namespace;
        let deadline =
            SystemTime::now() + self.settings.startup_timeout + job.spec.timeout + self.kill_grace;
        // the Secret first: a Pod whose Secret is missing waits in the kubelet's mount
        // retry back-off; it is labelled, so a gateway killed before the Pod exists
        // leaves nothing the start-up sweep does not find
        let secret = secret_spec(
            &self.settings,
            &job.id,
            &job.spec.files,
            job.kubeconfig.as_ref().map(|k| k.0.as_str()),
        );
        let created = self
            .request(
                &job,
                started,
                self.secrets().create(&PostParams::default(), &secret),
            )
            .await;
        if let Err(stop) = created {
            self.remove(&name).await;
            return stop.outcome(
                &job,
                &format!("creating the command's Secret {name} in namespace \"{ns}\""),
            );
        }
        let pod = pod_spec(
            &self.settings,
            &PodCommand {
                id: &job.id,
                argv: &job.argv,
                path: &job.exec.path,
                timeout: job.spec.timeout,
                files: &job.spec.files,
                kubeconfig: job.kubeconfig.is_some(),
                kill_grace: self.kill_grace,
                deadline,
            },
        );
        let outcome = match self
            .request(
                &job,
                started,
                self.pods().create(&PostParams::default(), &pod),
            )
            .await
        {
            Ok(created) => {
                // the Pod owns the Secret from now on: deleting it deletes both
                let uid = created.metadata.uid.unwrap_or_default();
                let owner = json_patch_owner(&name, &uid);
                if let Err(err) = self
                    .secrets()
                    .patch(&name, &PatchParams::default(), &Patch::Merge(owner))
                    .await
                {
                    tracing::warn!(command_id = %job.id, err = %api_error(&err), "could not make the command's Pod own its Secret; it is deleted on its own");
                }
                self.follow(&job, &name, started).await
            }
            Err(stop) => stop.outcome(
                &job,
                &format!("creating the command's Pod {name} in namespace \"{ns}\""),
            ),
        };
        self.remove(&name).await;
        outcome
    }

    /// Awaits one API request, bounded by the start-up timeout (counted from `started`)
    /// and the command's cancel.
    async fn request<T>(
        &self,
        job: &Job,
        started: Instant,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Halt> {
        let left = self
            .settings
            .startup_timeout
            .saturating_sub(started.elapsed());
        tokio::select! {
            result = call => result.map_err(|e| Halt::Api(api_error(&e))),
            () = tokio::time::sleep(left) => Err(Halt::Timeout(self.settings.startup_timeout)),
            () = job.cancel.cancelled() => Err(Halt::Cancel),
        }
    }

    /// Follows the Pod until it ends, is canceled or times out; streams its log into
    /// the command's output.
    async fn follow(&self, job: &Job, name: &str, created: Instant) -> Outcome {
        let stream = watcher(
            self.pods(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        );
        let mut stream = std::pin::pin!(stream);
        let mut last_reason: Option<String> = None;
        let mut running_since: Option<Instant> = None;
        let mut logs = LogTask(None);
        // whether a (re-)list since the last `Init` found the Pod
        let mut listed = false;
        let stop = loop {
            let startup_left = (running_since.is_none()).then(|| {
                self.settings
                    .startup_timeout
                    .saturating_sub(created.elapsed())
            });
            let run_left = running_since
                .map(|since| (job.spec.timeout + self.kill_grace).saturating_sub(since.elapsed()));
            let event = tokio::select! {
                event = stream.try_next() => event,
                () = sleep_opt(startup_left) => {
                    return failed(format!(
                        "the command's Pod did not start within {} (pod.startup_timeout){}",
                        humantime::format_duration(self.settings.startup_timeout),
                        last_reason.map(|r| format!("; last reported: {r}")).unwrap_or_else(|| "; nothing was reported".to_owned())
                    ));
                }
                () = sleep_opt(run_left) => break Halt::Timeout(job.spec.timeout),
                () = job.cancel.cancelled() => break Halt::Cancel,
            };
            let (pod, deleted) = match event {
                Ok(Some(watcher::Event::Apply(pod))) => (pod, false),
                Ok(Some(watcher::Event::InitApply(pod))) => {
                    listed = true;
                    (pod, false)
                }
                Ok(Some(watcher::Event::Delete(pod))) => (pod, true),
                Ok(Some(watcher::Event::Init)) => {
                    listed = false;
                    continue;
                }
                Ok(Some(watcher::Event::InitDone)) => {
                    if listed {
                        continue;
                    }
                    // a re-list without the Pod: it went while the watch was down
                    return failed(
                        "the command's Pod was deleted by someone else before it ended".to_owned(),
                    );
                }
                Ok(None) => {
                    return failed("the watch on the command's Pod ended".to_owned());
                }
                Err(err) => {
                    // the watcher starts over by itself; say why the wait is longer
                    tracing::warn!(command_id = %job.id, %err, "watching the command's Pod failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = job.cancel.cancelled() => break Halt::Cancel,
                    }
                }
            };
            match progress_of(
                &pod,
                job.spec.timeout,
                &self.settings.resources.limits_memory,
            ) {
                PodProgress::Ended(outcome) => {
                    job.progress.running();
                    let ran = command_started(&pod);
                    self.finish_logs(job, name, logs.take(), ran).await;
                    return outcome;
                }
                _ if deleted => {
                    return failed(
                        "the command's Pod was deleted by someone else before it ended".to_owned(),
                    );
                }
                PodProgress::Pending { reason, hopeless } => {
                    if let Some(reason) = reason {
                        if hopeless {
                            return failed(format!("the command's Pod cannot start: {reason}"));
                        }
                        last_reason = Some(reason);
                    }
                }
                PodProgress::Running => {
                    job.progress.running();
                    running_since.get_or_insert_with(Instant::now);
                    if logs.0.is_none() {
                        logs.0 = Some(self.stream_logs(job, name));
                    }
                }
            }
        };
        // cancel or timeout: the Pod goes; what it printed until then is kept
        self.delete_pod(name).await;
        if let Some(task) = logs.take() {
            let _ = tokio::time::timeout(self.kill_grace, task).await;
        }
        match stop {
            Halt::Cancel => Outcome {
                state: CommandState::Canceled,
                exit_code: None,
                reason: "command was canceled".to_owned(),
            },
            Halt::Timeout(_) | Halt::Api(_) => Outcome {
                state: CommandState::TimedOut,
                exit_code: None,
                reason: format!(
                    "command timed out after {}",
                    humantime::format_duration(job.spec.timeout)
                ),
            },
        }
    }

    /// Streams the command container's log (`follow=true`) into the output.
    fn stream_logs(&self, job: &Job, name: &str) -> tokio::task::JoinHandle<LogEnd> {
        let pods = self.pods();
        let name = name.to_owned();
        let output = job.output.clone();
        tokio::spawn(async move {
            let mut received = 0u64;
            let end = copy_log(&pods, &name, true, |bytes| {
                output.append(bytes);
                received += bytes.len() as u64;
            })
            .await;
            match end {
                Ok(()) => LogEnd::Closed,
                Err(why) => LogEnd::Cut { received, why },
            }
        })
    }

    /// Once the Pod has ended: waits for the log stream to deliver the rest, and when it
    /// was cut short (or never started: a command that ended before it was seen
    /// running), reads the log once more and keeps what the stream missed. Nothing is
    /// read for a command container that never started.
    async fn finish_logs(
        &self,
        job: &Job,
        name: &str,
        logs: Option<tokio::task::JoinHandle<LogEnd>>,
        ran: bool,
    ) {
        let received = match logs {
            None => 0,
            Some(mut task) => {
                match tokio::time::timeout(self.kill_grace + Duration::from_secs(5), &mut task)
                    .await
                {
                    Ok(Ok(LogEnd::Closed)) => return,
                    Ok(Ok(LogEnd::Cut { received, why })) => {
                        tracing::debug!(command_id = %job.id, %why, "the Pod's log stream was cut; reading the rest");
                        received
                    }
                    Ok(Err(_)) | Err(_) => {
                        task.abort();
                        tracing::warn!(command_id = %job.id, "the Pod's log stream did not end with the Pod; its output may be incomplete");
                        return;
                    }
                }
            }
        };
        if !ran {
            return;
        }
        let mut skip = received;
        let read = tokio::time::timeout(
            self.kill_grace + Duration::from_secs(30),
            copy_log(&self.pods(), name, false, |bytes| {
                let skipped = usize::try_from(skip).unwrap_or(usize::MAX).min(bytes.len());
                skip -= skipped as u64;
                job.output.append(&bytes[skipped..]);
            }),
        )
        .await;
        let problem = match read {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(_) => "the API server did not send it in time".to_owned(),
        };
        let note = format!(
            "\n[kinvoke: the rest of the command's output could not be read from its Pod: {problem}]\n"
        );
        job.output.append(note.as_bytes());
    }

    async fn delete_pod(&self, name: &str) {
        let params = DeleteParams {
            grace_period_seconds: u32::try_from(self.kill_grace.as_secs()).ok(),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let pods = self.pods();
        retry_delete("Pod", name, || pods.delete(name, &params)).await;
    }

    /// Deletes a command's Pod and Secret (the Secret would also go with the Pod).
    async fn remove(&self, name: &str) {
        self.delete_pod(name).await;
        let (secrets, params) = (self.secrets(), DeleteParams::default());
        retry_delete("Secret", name, || secrets.delete(name, &params)).await;
    }

    /// Deletes the Pods and Secrets a killed gateway left behind: every labelled one
    /// whose command this gateway's store has as ended (a restart marks the ones it was
    /// running as failed), and any whose deadline has passed whoever started it. Call at
    /// start-up, after the store's recovery. Returns how many Pods were deleted.
    pub async fn remove_leftovers(&self, store: &Store) -> Result<usize, String> {
        let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
        let list = ListParams::default().labels(&selector);
        let pods = self.pods().list(&list).await.map_err(|e| {
            format!(
                "listing Pods in namespace \"{}\": {}",
                self.settings.namespace,
                api_error(&e)
            )
        })?;
        let secrets = self.secrets().list_metadata(&list).await.map_err(|e| {
            format!(
                "listing Secrets in namespace \"{}\": {}",
                self.settings.namespace,
                api_error(&e)
            )
        })?;
        let now = jiff::Timestamp::now();
        let mut removed = 0;
        let objects = pods
            .items
            .iter()
            .map(|p| (&p.metadata, true))
            .chain(secrets.items.iter().map(|s| (&s.metadata, false)));
        for (meta, is_pod) in objects {
            let Some(name) = meta.name.as_deref() else {
                continue;
            };
            let id = meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_COMMAND_ID))
                .and_then(|id| CommandId::parse(id));
            let ended = match &id {
                Some(id) => store
                    .get(id)
                    .await
                    .map_err(|e| format!("reading the store: {e}"))?
                    .is_some_and(|r| r.state.is_final()),
                None => false,
            };
            let past_deadline = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_DEADLINE))
                .and_then(|d| d.parse::<jiff::Timestamp>().ok())
                .is_some_and(|d| d < now);
            // a Secret without its Pod's deadline goes once its command has ended
            if !(ended || past_deadline) {
                continue;
            }
            if is_pod {
                self.remove(name).await;
                removed += 1;
            } else if let Err(err) = self.secrets().delete(name, &DeleteParams::default()).await
                && !is_not_found(&err)
            {
                tracing::warn!(secret = name, err = %api_error(&err), "could not delete a leftover Secret");
            }
        }
        Ok(removed)
    }
}

impl Executor for PodExecutor {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        Box::pin(self.run_job(job))
    }
}

/// Why waiting on the cluster stopped before the Pod ended.
enum Halt {
    /// The command was canceled.
    Cancel,
    /// A timeout passed (the start-up one, or the command's).
    Timeout(Duration),
    /// The API server refused a request.
    Api(String),
}

impl Halt {
    /// The outcome of a command halted while `doing` something before its Pod existed.
    fn outcome(self, job: &Job, doing: &str) -> Outcome {
        match self {
            Self::Cancel => Outcome {
                state: CommandState::Canceled,
                exit_code: None,
                reason: "command was canceled".to_owned(),
            },
            Self::Timeout(t) => failed(format!(
                "{doing}: the API server did not answer within {} (pod.startup_timeout)",
                humantime::format_duration(t)
            )),
            Self::Api(why) => {
                tracing::warn!(command_id = %job.id, %why, "{doing} failed");
                failed(format!("{doing} failed: {why}"))
            }
        }
    }
}

/// A log-streaming task, aborted when dropped: no task outlives the command and appends
/// to an output already closed and digested.
struct LogTask(Option<tokio::task::JoinHandle<LogEnd>>);

impl LogTask {
    fn take(&mut self) -> Option<tokio::task::JoinHandle<LogEnd>> {
        self.0.take()
    }
}

impl Drop for LogTask {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// True once the command container has run (it runs or has ended).
fn command_started(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == COMMAND_CONTAINER))
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

/// Reads the command container's log as bytes (never as text: a command may print
/// anything), handing each chunk to `sink`; with `follow`, until the container ends.
async fn copy_log(
    pods: &Api<Pod>,
    name: &str,
    follow: bool,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), String> {
    let params = LogParams {
        container: Some(COMMAND_CONTAINER.to_owned()),
        follow,
        ..LogParams::default()
    };
    let reader = pods
        .log_stream(name, &params)
        .await
        .map_err(|e| api_error(&e))?;
    let mut reader = std::pin::pin!(reader);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => sink(&buf[..n]),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Deletes an object, trying again a few times (1 s, 2 s, 4 s apart) when the API
/// server fails; one already gone is fine.
async fn retry_delete<T, F>(what: &str, name: &str, delete: impl Fn() -> F)
where
    F: Future<Output = Result<T, kube::Error>>,
{
    let mut pause = Duration::from_secs(1);
    for attempt in 1..=4 {
        match delete().await {
            Ok(_) => return,
            Err(err) if is_not_found(&err) => return,
            Err(err) if attempt == 4 => {
                tracing::warn!(object = name, err = %api_error(&err), "could not delete a command's {what}; the start-up sweep of the next gateway start deletes it");
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}

/// A merge patch making Pod `name` (`uid`) the Secret's owner.
pub fn json_patch_owner(name: &str, uid: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "controller": true,
    }]}})
}

/// How a log stream ended.
enum LogEnd {
    /// The API server ended it (the container ended).
    Closed,
    /// It broke, or never started.
    Cut { received: u64, why: String },
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn failed(reason: String) -> Outcome {
    Outcome {
        state: CommandState::Failed,
        exit_code: None,
        reason,
    }
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

/// The API server's own message where there is one.
fn api_error(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, PodCondition, PodStatus,
    };
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::command::{ClusterName, CommandSpec};
    use crate::exec::output::OutputLog;
    use crate::exec::{ExecSettings, Progress, SecretText};

    fn id() -> CommandId {
        CommandId::parse("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn file(path: &str, mode: u32) -> Attachment {
        Attachment {
            path: path.into(),
            content: b"data".to_vec(),
            mode,
        }
    }

    fn spec_of(settings: &PodSettings, files: &[Attachment]) -> Pod {
        let argv = [
            "bash".to_owned(),
            "-c".to_owned(),
            "kubectl get pods".to_owned(),
        ];
        pod_spec(
            settings,
            &PodCommand {
                id: &id(),
                argv: &argv,
                path: "/usr/bin:/bin",
                timeout: Duration::from_millis(90_500),
                files,
                kubeconfig: true,
                kill_grace: Duration::from_secs(5),
                deadline: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            },
        )
    }

    #[test]
    fn the_pod_is_locked_down_and_bounded_by_the_commands_timeout() {
        let pod = serde_json::to_value(spec_of(&PodSettings::default(), &[])).unwrap();
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["enableServiceLinks"], false);
        // rounded up: a command never gets less than its timeout
        assert_eq!(spec["activeDeadlineSeconds"], 91);
        assert_eq!(spec["terminationGracePeriodSeconds"], 5);
        let pod_security = &spec["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true);
        assert_eq!(pod_security["runAsUser"], DEFAULT_RUN_AS_USER);
        assert_eq!(pod_security["fsGroup"], DEFAULT_RUN_AS_USER);
        assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
        let containers: Vec<&Value> = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["containers"].as_array().unwrap())
            .collect();
        assert_eq!(containers.len(), 2);
        for c in containers {
            let security = &c["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{c}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{c}");
            assert_eq!(security["runAsNonRoot"], true, "{c}");
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{c}");
            assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault", "{c}");
            assert_eq!(c["image"], DEFAULT_IMAGE);
            assert_eq!(
                c["resources"]["requests"],
                json!({"cpu": "200m", "memory": "512Mi"})
            );
            assert_eq!(
                c["resources"]["limits"],
                json!({"cpu": "500m", "memory": "1Gi"})
            );
        }
        let command = &spec["containers"][0];
        assert_eq!(command["name"], COMMAND_CONTAINER);
        assert_eq!(
            command["command"],
            json!(["bash", "-c", "kubectl get pods"])
        );
        assert_eq!(command["workingDir"], WORK_DIR);
        // only the command's own data: no personal data in labels or annotations
        assert_eq!(
            pod["metadata"]["labels"],
            json!({LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMMAND_ID: id().as_str()})
        );
        assert_eq!(
            pod["metadata"]["annotations"],
            json!({ANNOTATION_DEADLINE: "2027-01-15T08:00:00Z"})
        );
        assert_eq!(pod["metadata"]["name"], format!("kinvoke-{}", id()));
        assert_eq!(pod["metadata"]["namespace"], DEFAULT_NAMESPACE);
    }

    #[test]
    fn work_home_and_tmp_are_writable_scratch_and_the_secret_is_read_only() {
        let pod =
            serde_json::to_value(spec_of(&PodSettings::default(), &[file("a", 0o644)])).unwrap();
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        for name in ["work", "home", "tmp"] {
            let v = volumes.iter().find(|v| v["name"] == name).unwrap();
            assert_eq!(v["emptyDir"]["sizeLimit"], "1Gi", "{v}");
        }
        let secret = volumes.iter().find(|v| v["name"] == "secret").unwrap();
        assert_eq!(secret["secret"]["secretName"], format!("kinvoke-{}", id()));
        assert_eq!(secret["secret"]["defaultMode"], 0o440);
        assert_eq!(
            secret["secret"]["items"],
            json!([{"key": "file-0", "mode": 0o644, "path": "file-0"}, {"key": "kubeconfig", "mode": 0o440, "path": "kubeconfig"}])
        );
        let mounts = |c: &Value| -> Vec<(String, String, bool)> {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_owned(),
                        m["mountPath"].as_str().unwrap().to_owned(),
                        m["readOnly"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        };
        let init = &pod["spec"]["initContainers"][0];
        assert!(mounts(init).contains(&("secret".into(), SECRET_DIR.into(), true)));
        let command = &pod["spec"]["containers"][0];
        assert!(
            mounts(command).iter().all(|(name, _, _)| name != "secret"),
            "the command reads its files from the work dir, not the Secret"
        );
        assert!(mounts(command).contains(&("tmp".into(), TMP_DIR.into(), false)));
    }

    #[test]
    fn files_are_placed_with_their_modes_and_paths_as_arguments_never_as_shell_text() {
        let files = [
            file("values.yaml", 0o600),
            file("bin/run.sh", 0o755),
            file("$(reboot)", 0o644),
        ];
        let pod = serde_json::to_value(spec_of(&PodSettings::default(), &files)).unwrap();
        let init = &pod["spec"]["initContainers"][0]["command"];
        assert_eq!(init[0], "/bin/sh");
        assert_eq!(init[2], PLACE_FILES);
        assert_eq!(
            init.as_array().unwrap()[3..],
            json!([
                "kinvoke-files",
                "600",
                "values.yaml",
                "755",
                "bin/run.sh",
                "644",
                "$(reboot)"
            ])
            .as_array()
            .unwrap()[..]
        );
        // the Secret volume keeps each mode too, readable through the Pod's group
        let items = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "secret")
            .unwrap()["secret"]["items"]
            .clone();
        let modes: Vec<u64> = items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["mode"].as_u64().unwrap())
            .collect();
        assert_eq!(modes, [0o640, 0o755, 0o644, 0o440]);
    }

    #[test]
    fn the_secret_holds_the_files_and_kubeconfig_and_belongs_to_the_pod() {
        let secret = secret_spec(
            &PodSettings::default(),
            &id(),
            &[file("a", 0o644)],
            Some("kubeconfig text"),
        );
        let v = serde_json::to_value(&secret).unwrap();
        assert_eq!(v["data"]["file-0"], "ZGF0YQ==");
        assert_eq!(v["data"]["kubeconfig"], "a3ViZWNvbmZpZyB0ZXh0");
        assert_eq!(v["immutable"], true);
        let patch = json_patch_owner(&format!("kinvoke-{}", id()), "pod-uid-1");
        let owner = &patch["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Pod");
        assert_eq!(owner["uid"], "pod-uid-1");
        assert_eq!(owner["name"], format!("kinvoke-{}", id()));
        assert_eq!(v["metadata"]["labels"][LABEL_COMMAND_ID], id().as_str());
    }

    #[test]
    fn settings_reach_the_pod() {
        let settings = PodSettings {
            namespace: "ops".into(),
            image: "registry.example/toolbox:1".into(),
            image_pull_policy: Some("Always".into()),
            image_pull_secrets: vec!["regcred".into()],
            node_selector: [("pool".to_owned(), "ops".to_owned())].into(),
            tolerations: vec![Toleration {
                key: Some("CriticalAddonsOnly".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }],
            priority_class_name: Some("ops-high".into()),
            run_as_user: 1000,
            ..PodSettings::default()
        };
        let pod = serde_json::to_value(spec_of(&settings, &[])).unwrap();
        let spec = &pod["spec"];
        assert_eq!(pod["metadata"]["namespace"], "ops");
        assert_eq!(spec["nodeSelector"], json!({"pool": "ops"}));
        assert_eq!(
            spec["tolerations"],
            json!([{"key": "CriticalAddonsOnly", "operator": "Exists"}])
        );
        assert_eq!(spec["priorityClassName"], "ops-high");
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(spec["securityContext"]["runAsUser"], 1000);
        assert_eq!(spec["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(spec["containers"][0]["image"], "registry.example/toolbox:1");
    }

    fn status(phase: &str) -> PodStatus {
        PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        }
    }

    fn with_status(status: PodStatus) -> Pod {
        Pod {
            status: Some(status),
            ..Pod::default()
        }
    }

    fn container(name: &str, state: ContainerState) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(state),
            ..ContainerStatus::default()
        }
    }

    fn terminated(code: i32, reason: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }
    }

    fn waiting(reason: &str, message: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            ..ContainerState::default()
        }
    }

    fn progress(pod: &Pod) -> PodProgress {
        progress_of(pod, Duration::from_secs(60), "1Gi")
    }

    #[test]
    fn the_commands_state_follows_the_pod() {
        assert_eq!(
            progress(&Pod::default()),
            PodProgress::Pending {
                reason: None,
                hopeless: false
            }
        );
        let unschedulable = PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient cpu.".into()),
                ..PodCondition::default()
            }]),
            ..status("Pending")
        };
        assert_eq!(
            progress(&with_status(unschedulable)),
            PodProgress::Pending {
                reason: Some("Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.".into()),
                hopeless: false
            }
        );
        let pulling = PodStatus {
            container_statuses: Some(vec![container(
                COMMAND_CONTAINER,
                waiting("ImagePullBackOff", "Back-off pulling image \"x\""),
            )]),
            ..status("Pending")
        };
        assert_eq!(
            progress(&with_status(pulling)),
            PodProgress::Pending {
                reason: Some("ImagePullBackOff: Back-off pulling image \"x\"".into()),
                hopeless: false
            }
        );
        let invalid = PodStatus {
            container_statuses: Some(vec![container(
                COMMAND_CONTAINER,
                waiting("InvalidImageName", "bad"),
            )]),
            ..status("Pending")
        };
        assert!(matches!(
            progress(&with_status(invalid)),
            PodProgress::Pending { hopeless: true, .. }
        ));
        let running = PodStatus {
            container_statuses: Some(vec![container(
                COMMAND_CONTAINER,
                ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                },
            )]),
            ..status("Running")
        };
        assert_eq!(progress(&with_status(running)), PodProgress::Running);
    }

    #[test]
    fn exit_codes_and_reasons_come_from_the_container_status() {
        let ended = |phase: &str, state: ContainerState| {
            progress(&with_status(PodStatus {
                container_statuses: Some(vec![container(COMMAND_CONTAINER, state)]),
                ..status(phase)
            }))
        };
        assert_eq!(
            ended("Failed", terminated(3, "Error")),
            PodProgress::Ended(Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(3),
                reason: String::new()
            })
        );
        assert_eq!(
            ended("Succeeded", terminated(0, "Completed")),
            PodProgress::Ended(Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(0),
                reason: String::new()
            })
        );
        let PodProgress::Ended(oom) = ended("Failed", terminated(137, "OOMKilled")) else {
            panic!("not ended")
        };
        assert_eq!(
            (oom.state, oom.exit_code),
            (CommandState::Failed, Some(137))
        );
        assert!(
            oom.reason.starts_with("OOMKilled") && oom.reason.contains("1Gi"),
            "{}",
            oom.reason
        );
        let deadline = |containers| {
            progress(&with_status(PodStatus {
                reason: Some("DeadlineExceeded".into()),
                message: Some(
                    "Pod was active on the node longer than the specified deadline".into(),
                ),
                container_statuses: containers,
                ..status("Failed")
            }))
        };
        let PodProgress::Ended(ran) = deadline(Some(vec![container(
            COMMAND_CONTAINER,
            terminated(137, "Error"),
        )])) else {
            panic!("not ended")
        };
        assert_eq!(
            (ran.state, ran.exit_code),
            (CommandState::TimedOut, Some(137))
        );
        // a deadline that passed while the image was still being pulled is not the
        // command's timeout: say what held it up
        let PodProgress::Ended(never) = deadline(Some(vec![container(
            COMMAND_CONTAINER,
            waiting("ImagePullBackOff", "Back-off pulling image \"x\""),
        )])) else {
            panic!("not ended")
        };
        assert_eq!(never.state, CommandState::Failed);
        assert!(
            never.reason.contains("before the command started")
                && never.reason.contains("ImagePullBackOff"),
            "{}",
            never.reason
        );
        let sidecar = progress(&with_status(PodStatus {
            container_statuses: Some(vec![
                container(COMMAND_CONTAINER, terminated(0, "Completed")),
                container(
                    "istio-proxy",
                    ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..ContainerState::default()
                    },
                ),
            ]),
            ..status("Running")
        }));
        assert_eq!(
            sidecar,
            PodProgress::Ended(Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(0),
                reason: String::new()
            }),
            "an injected sidecar that keeps running does not keep the command running"
        );
        let evicted = progress(&with_status(PodStatus {
            reason: Some("Evicted".into()),
            message: Some("The node was low on resource: memory.".into()),
            ..status("Failed")
        }));
        assert_eq!(
            evicted,
            PodProgress::Ended(failed(
                "Evicted: The node was low on resource: memory.".into()
            ))
        );
        let init = progress(&with_status(PodStatus {
            init_container_statuses: Some(vec![container(FILES_CONTAINER, terminated(1, "Error"))]),
            ..status("Failed")
        }));
        let PodProgress::Ended(init) = init else {
            panic!("not ended")
        };
        assert!(
            init.reason.contains("attached files could not be placed"),
            "{}",
            init.reason
        );
    }

    /// A scripted API server behind kube-rs's tower-test mock: answers by method and
    /// path, and records what it was asked.
    struct FakeApi {
        seen: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeApi {
        /// `pod_states` are the Pod's statuses in order: the first in the list, the rest
        /// as watch events; `log` is the command's output.
        fn start(pod_states: Vec<Value>, log: &'static str) -> (kube::Client, Self) {
            Self::start_with(pod_states, log, Faults::default())
        }

        fn start_with(
            pod_states: Vec<Value>,
            log: &'static str,
            faults: Faults,
        ) -> (kube::Client, Self) {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = seen.clone();
            let task = tokio::spawn(async move {
                let mut held = Vec::new();
                let mut failed_deletes = 0;
                while let Some((request, send)) = handle.next_request().await {
                    let (method, path) = (
                        request.method().to_string(),
                        request.uri().path().to_owned(),
                    );
                    let query = request.uri().query().unwrap_or_default().to_owned();
                    record.lock().unwrap().push(format!("{method} {path}"));
                    let pod = |status: &Value| {
                        json!({
                            "apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": format!("kinvoke-{}", id()), "namespace": DEFAULT_NAMESPACE, "uid": "uid-1", "resourceVersion": "5"},
                            "status": status,
                        })
                    };
                    let body = match (method.as_str(), path.as_str()) {
                        ("POST", _) if faults.stall_creates => {
                            // an API server that takes the request and never answers
                            held.push(send);
                            continue;
                        }
                        ("DELETE", _) if failed_deletes < faults.failed_deletes => {
                            failed_deletes += 1;
                            let status = json!({"kind": "Status", "code": 500, "status": "Failure", "reason": "InternalError", "message": "etcd is busy"});
                            send.send_response(
                                Response::builder()
                                    .status(500)
                                    .body(Body::from(status.to_string().into_bytes()))
                                    .unwrap(),
                            );
                            continue;
                        }
                        ("POST", p) if p.ends_with("/pods") => pod(&json!({})).to_string(),
                        ("POST", p) if p.ends_with("/secrets") => json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}).to_string(),
                        ("PATCH", p) if p.contains("/secrets/") => json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}).to_string(),
                        ("GET", p) if p.ends_with("/log") => log.to_owned(),
                        ("GET", p) if p.ends_with("/pods") && !query.contains("watch=") => json!({
                            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "5"},
                            "items": [pod(&pod_states[0])],
                        }).to_string(),
                        ("GET", p) if p.ends_with("/pods") => {
                            if held.is_empty() && pod_states.len() > 1 {
                                pod_states[1..].iter().map(|s| format!("{}\n", json!({"type": "MODIFIED", "object": pod(s)}))).collect()
                            } else {
                                // a watch with nothing more to say stays open
                                held.push(send);
                                continue;
                            }
                        }
                        ("DELETE", _) => json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}).to_string(),
                        _ => json!({"kind": "Status", "code": 404, "status": "Failure", "reason": "NotFound", "message": "no"}).to_string(),
                    };
                    send.send_response(
                        Response::builder()
                            .body(Body::from(body.into_bytes()))
                            .unwrap(),
                    );
                }
            });
            (
                kube::Client::new(service, DEFAULT_NAMESPACE),
                Self { seen, task },
            )
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// What the scripted API server does wrong.
    #[derive(Default)]
    struct Faults {
        /// Every create is taken and never answered.
        stall_creates: bool,
        /// The first this many deletes are answered 500.
        failed_deletes: usize,
    }

    impl Drop for FakeApi {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn job(cancel: CancellationToken) -> (Job, Arc<OutputLog>, Progress) {
        let output = Arc::new(OutputLog::new(1024));
        let progress = Progress::new(CommandState::Pending);
        let job = Job {
            id: id(),
            argv: vec!["bash".into(), "-c".into(), "echo hello".into()],
            spec: CommandSpec {
                cluster: "c".into(),
                command: "echo hello".into(),
                files: vec![file("a", 0o600)],
                timeout: Duration::from_secs(60),
            },
            cluster: ClusterName::parse("c").unwrap(),
            exec: ExecSettings::default(),
            output: output.clone(),
            cancel,
            kubeconfig: Some(SecretText("kubeconfig".into())),
            progress: progress.clone(),
        };
        (job, output, progress)
    }

    fn running_status() -> Value {
        json!({"phase": "Running", "containerStatuses": [{"name": COMMAND_CONTAINER, "image": "i", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}]})
    }

    #[tokio::test]
    async fn a_pod_that_runs_and_exits_3_is_followed_to_its_end_and_removed() {
        let ended = json!({"phase": "Failed", "containerStatuses": [{"name": COMMAND_CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]});
        let (client, api) = FakeApi::start(
            vec![json!({"phase": "Pending"}), running_status(), ended],
            "hello\n",
        );
        let executor = PodExecutor::new(client, PodSettings::default(), Duration::from_secs(1));
        let (job, output, progress) = job(CancellationToken::new());
        let outcome = executor.run(job).await;
        assert_eq!(
            outcome,
            Outcome {
                state: CommandState::Succeeded,
                exit_code: Some(3),
                reason: String::new()
            }
        );
        assert_eq!(progress.state(), CommandState::Running);
        assert_eq!(output.close().data, b"hello\n");
        let seen = api.seen();
        let name = format!("kinvoke-{}", id());
        let base = format!("/api/v1/namespaces/{DEFAULT_NAMESPACE}");
        assert_eq!(seen[0], format!("POST {base}/secrets"), "{seen:?}");
        assert_eq!(seen[1], format!("POST {base}/pods"), "{seen:?}");
        assert_eq!(seen[2], format!("PATCH {base}/secrets/{name}"), "{seen:?}");
        assert!(
            seen.contains(&format!("DELETE {base}/pods/{name}")),
            "{seen:?}"
        );
        assert!(
            seen.contains(&format!("DELETE {base}/secrets/{name}")),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_pod_that_never_starts_fails_with_what_the_scheduler_said() {
        let pending = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 node(s) had untolerated taint {CriticalAddonsOnly: true}."}]});
        let (client, api) = FakeApi::start(vec![pending], "");
        let settings = PodSettings {
            startup_timeout: Duration::from_millis(200),
            ..PodSettings::default()
        };
        let executor = PodExecutor::new(client, settings, Duration::from_secs(1));
        let (job, _, progress) = job(CancellationToken::new());
        let outcome = executor.run(job).await;
        assert_eq!(outcome.state, CommandState::Failed);
        assert!(
            outcome.reason.contains("did not start within 200ms")
                && outcome
                    .reason
                    .contains("Unschedulable: 0/3 nodes are available"),
            "{}",
            outcome.reason
        );
        assert_eq!(progress.state(), CommandState::Pending);
        assert!(
            api.seen()
                .iter()
                .any(|s| s.starts_with("DELETE") && s.contains("/pods/"))
        );
    }

    #[tokio::test]
    async fn cancel_deletes_the_pod_even_while_it_is_pending() {
        let (client, api) = FakeApi::start(vec![json!({"phase": "Pending"})], "");
        let executor = PodExecutor::new(client, PodSettings::default(), Duration::from_secs(1));
        let cancel = CancellationToken::new();
        let (job, _, _) = job(cancel.clone());
        let running = tokio::spawn(async move { executor.run(job).await });
        // canceled once the watch is open
        while api
            .seen()
            .iter()
            .filter(|s| s.starts_with("GET") && s.ends_with("/pods"))
            .count()
            < 2
        {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        let outcome = running.await.unwrap();
        assert_eq!(outcome.state, CommandState::Canceled);
        let name = format!("kinvoke-{}", id());
        assert!(api.seen().iter().any(|s| s == &format!("DELETE /api/v1/namespaces/{DEFAULT_NAMESPACE}/pods/{name}")));
    }

    #[tokio::test]
    async fn an_api_server_that_never_answers_a_create_fails_the_command_within_the_startup_timeout()
     {
        let (client, _api) = FakeApi::start_with(
            vec![json!({"phase": "Pending"})],
            "",
            Faults {
                stall_creates: true,
                ..Faults::default()
            },
        );
        let settings = PodSettings {
            startup_timeout: Duration::from_millis(200),
            ..PodSettings::default()
        };
        let executor = PodExecutor::new(client, settings, Duration::from_secs(1));
        let (job, _, _) = job(CancellationToken::new());
        let outcome = executor.run(job).await;
        assert_eq!(outcome.state, CommandState::Failed);
        assert!(
            outcome.reason.contains("did not answer within 200ms"),
            "{}",
            outcome.reason
        );
    }

    #[tokio::test]
    async fn a_command_that_ends_before_it_is_seen_running_keeps_its_output_and_a_failed_delete_is_retried()
     {
        // Pending, then already ended: no live stream was started, the log is read once
        let ended = json!({"phase": "Succeeded", "containerStatuses": [{"name": COMMAND_CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]});
        let (client, api) = FakeApi::start_with(
            vec![json!({"phase": "Pending"}), ended],
            "quick\n",
            Faults {
                failed_deletes: 1,
                ..Faults::default()
            },
        );
        let executor = PodExecutor::new(client, PodSettings::default(), Duration::from_secs(1));
        let (job, output, _) = job(CancellationToken::new());
        let outcome = executor.run(job).await;
        assert_eq!(
            (outcome.state, outcome.exit_code),
            (CommandState::Succeeded, Some(0))
        );
        assert_eq!(output.close().data, b"quick\n");
        let pod_deletes = api
            .seen()
            .iter()
            .filter(|s| s.starts_with("DELETE") && s.contains("/pods/"))
            .count();
        assert_eq!(
            pod_deletes,
            2,
            "the delete answered 500 was tried again: {:?}",
            api.seen()
        );
    }
}
