//! The config file's shape, 1:1: serde structs with every key optional where the file
//! may leave it out and unknown keys refused. Validation into typed settings is in the
//! parent module and its section files.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{ExecMode, Exposure};
use crate::sandbox::SandboxMode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) state_dir: PathBuf,
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_grace: Option<Duration>,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default, rename = "listener")]
    pub(super) listeners: Vec<RawListener>,
    #[serde(default, rename = "cluster")]
    pub(super) clusters: Vec<RawCluster>,
    #[serde(default)]
    pub(super) authn: super::access_control::RawAuthn,
    #[serde(default, rename = "role")]
    pub(super) roles: Vec<super::access_control::RawRole>,
    #[serde(default, rename = "assignment")]
    pub(super) assignments: Vec<super::access_control::RawAssignment>,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) break_glass: RawBreakGlass,
    #[serde(default)]
    pub(super) relay: RawRelay,
    #[serde(default)]
    pub(super) sandbox: RawSandbox,
    pub(super) admin: Option<RawAdmin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSandbox {
    pub(super) read_only_paths: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub(super) extra_read_only_paths: Vec<PathBuf>,
    #[serde(default)]
    pub(super) writable_paths: Vec<PathBuf>,
    pub(super) run_as_uids: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreakGlass {
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_ca_cert: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) path: Option<PathBuf>,
    pub(super) fsync: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) fsync_interval: Option<Duration>,
    pub(super) max_file_bytes: Option<ByteSize>,
    pub(super) tracing: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) backend: Option<String>,
    pub(super) path: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) max_connections: Option<usize>,
    pub(super) replica_id: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retention: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_command_bytes: Option<ByteSize>,
    pub(super) max_files: Option<usize>,
    pub(super) max_total_file_bytes: Option<ByteSize>,
    pub(super) max_file_path_bytes: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) default_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_timeout: Option<Duration>,
    pub(super) max_concurrent_commands: Option<usize>,
    pub(super) max_commands_per_principal: Option<usize>,
    pub(super) requests_per_second_per_principal: Option<u32>,
    pub(super) request_burst_per_principal: Option<u32>,
    pub(super) max_in_flight_requests: Option<usize>,
    pub(super) max_connections_per_source: Option<usize>,
    pub(super) max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) request_read_timeout: Option<Duration>,
    pub(super) max_output_bytes: Option<ByteSize>,
    pub(super) output_head_percent: Option<u8>,
    #[serde(default, with = "humantime_serde")]
    pub(super) kill_grace: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<String>,
    pub(super) address: String,
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) exposure: Exposure,
    #[serde(default)]
    pub(super) authorized_ip_ranges: Vec<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) authentication: Option<Vec<String>>,
    pub(super) require_client_cert: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: String,
    #[serde(default = "default_executor")]
    pub(super) executor: String,
    #[serde(default = "default_mode")]
    pub(super) mode: ExecMode,
    pub(super) allowed_programs: Option<Vec<String>>,
    pub(super) path: Option<String>,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) context: Option<String>,
    #[serde(default)]
    pub(super) in_cluster: bool,
    pub(super) identity: Option<RawIdentity>,
    #[serde(default)]
    pub(super) description: String,
    pub(super) shell: Option<PathBuf>,
    #[serde(default)]
    pub(super) disable_run_command: bool,
    #[serde(default)]
    pub(super) authorized_ip_ranges: Vec<String>,
    #[serde(default)]
    pub(super) sandbox: SandboxMode,
    pub(super) pod: Option<RawPod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPod {
    pub(super) namespace: Option<String>,
    pub(super) image: Option<String>,
    pub(super) image_pull_policy: Option<String>,
    #[serde(default)]
    pub(super) image_pull_secrets: Vec<String>,
    #[serde(default)]
    pub(super) resources: RawPodResources,
    pub(super) node_selector: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) tolerations: Vec<RawToleration>,
    pub(super) priority_class_name: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) startup_timeout: Option<Duration>,
    pub(super) run_as_user: Option<i64>,
    pub(super) scratch_size_limit: Option<String>,
    #[serde(default)]
    pub(super) loopback_relay: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPodResources {
    #[serde(default)]
    pub(super) requests: RawCpuMemory,
    #[serde(default)]
    pub(super) limits: RawCpuMemory,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCpuMemory {
    pub(super) cpu: Option<String>,
    pub(super) memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToleration {
    pub(super) key: Option<String>,
    pub(super) operator: Option<String>,
    pub(super) value: Option<String>,
    pub(super) effect: Option<String>,
    pub(super) toleration_seconds: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) user: Option<String>,
    pub(super) include_groups: Option<bool>,
    #[serde(default)]
    pub(super) group_prefix: String,
    #[serde(default)]
    pub(super) extra_groups: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    pub(super) address: Option<String>,
    pub(super) advertise_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) response_timeout: Option<Duration>,
    pub(super) max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
}

pub(super) fn default_executor() -> String {
    "local".to_owned()
}

pub(super) fn default_mode() -> ExecMode {
    ExecMode::Shell
}
