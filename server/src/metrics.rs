//! Prometheus metrics (`/metrics` on the admin listener, see `crate::admin`), kept with the
//! `prometheus-client` crate and encoded in the OpenMetrics text format.
//!
//! Every label set is bounded: cluster names come from the config, states, actions,
//! methods, verbs and reasons from fixed lists. Never a principal, a source address, a
//! command id or an error's free text: those belong in the audit log.
//!
//! One registry per process ([`metrics`]): gateways embedded in one test process share it,
//! which only ever adds.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels: a cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Its configured name.
    pub cluster: String,
}

/// Labels: a cluster and a command's final state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    /// Its configured name.
    pub cluster: String,
    /// `Succeeded`, `Failed`, `Canceled` or `TimedOut`.
    pub state: String,
}

/// Labels: an authentication failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnLabels {
    /// `mtls`, `token`, `tls` (the handshake) or `none`.
    pub method: String,
    /// A fixed reason name, e.g. `unknown_static_token`.
    pub reason: String,
}

/// Labels: an action (`runcommand/action`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The action's name.
    pub action: String,
}

/// Labels: a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Its configured name.
    pub listener: String,
}

/// Labels: a relayed request's verb and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// The Kubernetes verb (`get`, `list`, `watch`, `create`, ...).
    pub verb: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub status: String,
}

/// Labels: a relayed request's verb.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// The Kubernetes verb.
    pub verb: String,
}

/// Labels: a result-store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `put`, `get`, `list`, `grants`, ...
    pub op: String,
}

/// Seconds, from 1 ms to about 17 minutes (×4 steps).
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 11))
}

/// Seconds, from 0.1 ms to about 1.7 s (×4 steps): quick operations.
fn quick_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// Registers `metric` under `name` (with `unit`, a suffix of its name, when given).
fn add(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<prometheus_client::registry::Unit>,
    metric: impl prometheus_client::registry::Metric,
) {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric),
        None => registry.register(name, help, metric),
    }
}

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// Commands started, by cluster.
    pub commands_started: Family<ClusterLabels, Counter>,
    /// Commands finished, by cluster and final state.
    pub commands_finished: Family<FinishedLabels, Counter>,
    /// How long commands ran, by cluster.
    pub command_duration: Family<ClusterLabels, Histogram, fn() -> Histogram>,
    /// Commands running now.
    pub commands_in_flight: Gauge,
    /// Output bytes commands printed, by cluster.
    pub output_bytes: Family<ClusterLabels, Counter>,
    /// Authentication failures.
    pub authn_failures: Family<AuthnLabels, Counter>,
    /// Authorization denials, by action.
    pub authz_denials: Family<ActionLabels, Counter>,
    /// Connections refused by a listener's network gate (CIDR allowlist).
    pub network_refusals: Family<ListenerLabels, Counter>,
    /// Requests the relay answered, by verb and status class.
    pub relay_requests: Family<RelayLabels, Counter>,
    /// Time to the relay's response headers, by verb.
    pub relay_latency: Family<VerbLabels, Histogram, fn() -> Histogram>,
    /// Time to write (and sync, when due) one batch of audit lines.
    pub audit_write_seconds: Histogram,
    /// Audit batches that could not be written.
    pub audit_write_failures: Counter,
    /// Break-glass grants active now.
    pub breakglass_active_grants: Gauge,
    /// Result-store operation time, by operation.
    pub store_seconds: Family<StoreLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("kinvoke");
        let m = Self {
            registry: Registry::default(),
            commands_started: Family::default(),
            commands_finished: Family::default(),
            command_duration: Family::new_with_constructor(seconds_histogram),
            commands_in_flight: Gauge::default(),
            output_bytes: Family::default(),
            authn_failures: Family::default(),
            authz_denials: Family::default(),
            network_refusals: Family::default(),
            relay_requests: Family::default(),
            relay_latency: Family::new_with_constructor(seconds_histogram),
            audit_write_seconds: quick_histogram(),
            audit_write_failures: Counter::default(),
            breakglass_active_grants: Gauge::default(),
            store_seconds: Family::new_with_constructor(quick_histogram),
        };
        use prometheus_client::registry::Unit::{Bytes, Seconds};
        let r = &mut registry;
        add(
            r,
            "commands_started",
            "Commands started, by cluster",
            None,
            m.commands_started.clone(),
        );
        add(
            r,
            "commands_finished",
            "Commands finished, by cluster and final state",
            None,
            m.commands_finished.clone(),
        );
        add(
            r,
            "command_duration",
            "How long commands ran, by cluster",
            Some(Seconds),
            m.command_duration.clone(),
        );
        add(
            r,
            "commands_in_flight",
            "Commands running now",
            None,
            m.commands_in_flight.clone(),
        );
        add(
            r,
            "command_output",
            "Output commands printed, by cluster",
            Some(Bytes),
            m.output_bytes.clone(),
        );
        add(
            r,
            "authn_failures",
            "Authentication failures, by method and reason",
            None,
            m.authn_failures.clone(),
        );
        add(
            r,
            "authz_denials",
            "Authorization denials, by action",
            None,
            m.authz_denials.clone(),
        );
        add(
            r,
            "network_refusals",
            "Connections refused by a listener's address allowlist, by listener",
            None,
            m.network_refusals.clone(),
        );
        add(
            r,
            "relay_requests",
            "Requests the relay answered, by verb and status class",
            None,
            m.relay_requests.clone(),
        );
        add(
            r,
            "relay_latency",
            "Time to the relay's response headers, by verb",
            Some(Seconds),
            m.relay_latency.clone(),
        );
        add(
            r,
            "audit_write",
            "Time to write one batch of audit lines",
            Some(Seconds),
            m.audit_write_seconds.clone(),
        );
        add(
            r,
            "audit_write_failures",
            "Audit batches that could not be written",
            None,
            m.audit_write_failures.clone(),
        );
        add(
            r,
            "breakglass_active_grants",
            "Break-glass grants active now",
            None,
            m.breakglass_active_grants.clone(),
        );
        add(
            r,
            "store_operation",
            "Result-store operation time, by operation",
            Some(Seconds),
            m.store_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Records a command's start.
    pub fn command_started(&self, cluster: &str) {
        self.commands_started
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .inc();
        self.commands_in_flight.inc();
    }

    /// Records a command's end.
    pub fn command_finished(&self, cluster: &str, state: &str, ran: Duration, output: u64) {
        let labels = ClusterLabels {
            cluster: cluster.to_owned(),
        };
        self.commands_finished
            .get_or_create(&FinishedLabels {
                cluster: cluster.to_owned(),
                state: state.to_owned(),
            })
            .inc();
        self.command_duration
            .get_or_create(&labels)
            .observe(ran.as_secs_f64());
        self.output_bytes.get_or_create(&labels).inc_by(output);
        self.commands_in_flight.dec();
    }

    /// Records an authentication failure.
    pub fn authn_failed(&self, method: &str, reason: &str) {
        self.authn_failures
            .get_or_create(&AuthnLabels {
                method: method.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records an authorization denial.
    pub fn authz_denied(&self, action: &str) {
        self.authz_denials
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    /// Records a connection refused by a listener's allowlist.
    pub fn network_refused(&self, listener: &str) {
        self.network_refusals
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc();
    }

    /// Records a relayed request: its verb, HTTP status and time to response headers.
    pub fn relayed(&self, verb: &str, status: u16, took: Duration) {
        self.relay_requests
            .get_or_create(&RelayLabels {
                verb: verb.to_owned(),
                status: format!("{}xx", status / 100),
            })
            .inc();
        self.relay_latency
            .get_or_create(&VerbLabels {
                verb: verb.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one result-store operation.
    pub fn store_op(&self, op: &'static str, took: Duration) {
        self.store_seconds
            .get_or_create(&StoreLabels { op: op.to_owned() })
            .observe(took.as_secs_f64());
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_every_metric_with_the_prefix() {
        let m = Metrics::new();
        m.command_started("prod");
        m.command_finished("prod", "Succeeded", Duration::from_millis(20), 7);
        m.authn_failed("token", "unknown_static_token");
        m.relayed("list", 200, Duration::from_millis(3));
        let text = m.encode().unwrap();
        for line in [
            "kinvoke_commands_started_total{cluster=\"prod\"} 1",
            "kinvoke_commands_finished_total{cluster=\"prod\",state=\"Succeeded\"} 1",
            "kinvoke_command_output_bytes_total{cluster=\"prod\"} 7",
            "kinvoke_commands_in_flight 0",
            "kinvoke_authn_failures_total{method=\"token\",reason=\"unknown_static_token\"} 1",
            "kinvoke_relay_requests_total{verb=\"list\",status=\"2xx\"} 1",
            "kinvoke_command_duration_seconds_count{cluster=\"prod\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
