//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`): the `k8s\0` magic, a
//! `runtime.Unknown` envelope naming apiVersion/kind, and the object's own message. Decoded
//! with the `k8s-pb` types and turned into the same JSON the object would have had, so the
//! store keeps only JSON.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

/// The four bytes that open every Kubernetes protobuf body.
pub(crate) const MAGIC: &[u8; 4] = b"k8s\0";

/// The media type clients send protobuf bodies with.
pub(crate) const PROTOBUF_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Why a protobuf body could not be turned into an object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtoError {
    /// The body does not start with `k8s\0`.
    #[error("protobuf body does not start with the k8s magic prefix")]
    MissingMagic,
    /// The `runtime.Unknown` envelope is not valid protobuf.
    #[error("protobuf envelope cannot be decoded: {0}")]
    Envelope(#[source] prost::DecodeError),
    /// The envelope names no kind.
    #[error("protobuf envelope names no kind")]
    NoKind,
    /// A kind whose protobuf form this simulation does not decode.
    #[error(
        "protobuf bodies of kind {kind:?} are not supported by the simulated cluster; send JSON"
    )]
    UnsupportedKind {
        /// the kind named in the envelope
        kind: String,
    },
    /// The object inside the envelope is not valid protobuf for its kind.
    #[error("protobuf {kind} cannot be decoded: {source}")]
    Object {
        /// the kind named in the envelope
        kind: String,
        /// the decoder's complaint
        #[source]
        source: prost::DecodeError,
    },
}

/// The envelope's type information and raw object bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub api_version: String,
    pub kind: String,
    pub raw: Vec<u8>,
}

/// Strips the magic and decodes the `runtime.Unknown` envelope.
pub(crate) fn decode_envelope(body: &[u8]) -> Result<Envelope, ProtoError> {
    let rest = body.strip_prefix(MAGIC).ok_or(ProtoError::MissingMagic)?;
    let unknown = Unknown::decode(rest).map_err(ProtoError::Envelope)?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    Ok(Envelope {
        api_version: type_meta.api_version.unwrap_or_default(),
        kind: type_meta.kind.unwrap_or_default(),
        raw: unknown.raw.unwrap_or_default(),
    })
}

/// Decodes a protobuf body into the object's JSON form (with `apiVersion` and `kind`).
pub(crate) fn decode_object(body: &[u8]) -> Result<Value, ProtoError> {
    let env = decode_envelope(body)?;
    if env.kind.is_empty() {
        return Err(ProtoError::NoKind);
    }
    let kind = env.kind.clone();
    let bad = |source| ProtoError::Object {
        kind: kind.clone(),
        source,
    };
    let raw = env.raw.as_slice();
    let mut object = match env.kind.as_str() {
        "Secret" => secret_json(k8s_pb::api::core::v1::Secret::decode(raw).map_err(bad)?),
        "ConfigMap" => config_map_json(k8s_pb::api::core::v1::ConfigMap::decode(raw).map_err(bad)?),
        "Namespace" => namespace_json(k8s_pb::api::core::v1::Namespace::decode(raw).map_err(bad)?),
        "Service" => service_json(k8s_pb::api::core::v1::Service::decode(raw).map_err(bad)?),
        "ServiceAccount" => {
            service_account_json(k8s_pb::api::core::v1::ServiceAccount::decode(raw).map_err(bad)?)
        }
        "SelfSubjectReview" => {
            let review =
                k8s_pb::api::authentication::v1::SelfSubjectReview::decode(raw).map_err(bad)?;
            with_metadata(Map::new(), review.metadata)
        }
        "SelfSubjectAccessReview" => ssar_json(
            k8s_pb::api::authorization::v1::SelfSubjectAccessReview::decode(raw).map_err(bad)?,
        ),
        "SelfSubjectRulesReview" => {
            let review =
                k8s_pb::api::authorization::v1::SelfSubjectRulesReview::decode(raw).map_err(bad)?;
            let mut map = Map::new();
            let namespace = review.spec.and_then(|s| s.namespace).unwrap_or_default();
            map.insert("spec".into(), json!({"namespace": namespace}));
            with_metadata(map, review.metadata)
        }
        "DeleteOptions" => {
            // a DELETE's options: nothing the simulation acts on
            Map::new()
        }
        other => {
            return Err(ProtoError::UnsupportedKind {
                kind: other.to_string(),
            });
        }
    };
    object.insert("apiVersion".into(), Value::String(env.api_version));
    object.insert("kind".into(), Value::String(env.kind));
    Ok(Value::Object(object))
}

/// Go's zero `time.Time` (0001-01-01T00:00:00Z), which protobuf bodies carry for unset times.
const GO_ZERO_TIME_SECONDS: i64 = -62_135_596_800;

fn time_json(t: &meta::Time) -> Option<Value> {
    let seconds = t.seconds.filter(|s| *s != GO_ZERO_TIME_SECONDS)?;
    jiff::Timestamp::from_second(seconds)
        .ok()
        .map(|ts| Value::String(crate::store::format_time(ts)))
}

fn string_map(map: BTreeMap<String, String>) -> Value {
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
}

fn bytes_map(map: BTreeMap<String, Vec<u8>>) -> Value {
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, Value::String(BASE64.encode(v))))
            .collect(),
    )
}

/// Inserts `value` unless it is absent or the zero value of a string or number: Go's
/// protobuf encoding writes zero values that its JSON form omits (`omitempty`), so keeping
/// them would make e.g. a Service port read `80:0/TCP`. Booleans are kept, because several
/// are pointers in Go where `false` is meaningful.
fn insert_some(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    let is_zero = |v: &Value| match v {
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_i64() == Some(0),
        _ => false,
    };
    if let Some(v) = value.filter(|v| !is_zero(v)) {
        map.insert(key.to_string(), v);
    }
}

/// `ObjectMeta` as JSON, keeping only the fields that are set.
pub(crate) fn object_meta_json(m: meta::ObjectMeta) -> Value {
    let mut out = Map::new();
    insert_some(&mut out, "name", m.name.map(Value::String));
    insert_some(&mut out, "generateName", m.generate_name.map(Value::String));
    insert_some(&mut out, "namespace", m.namespace.map(Value::String));
    insert_some(&mut out, "uid", m.uid.map(Value::String));
    insert_some(
        &mut out,
        "resourceVersion",
        m.resource_version.map(Value::String),
    );
    insert_some(&mut out, "generation", m.generation.map(|g| json!(g)));
    insert_some(
        &mut out,
        "creationTimestamp",
        m.creation_timestamp.as_ref().and_then(time_json),
    );
    insert_some(
        &mut out,
        "deletionTimestamp",
        m.deletion_timestamp.as_ref().and_then(time_json),
    );
    if !m.labels.is_empty() {
        out.insert("labels".into(), string_map(m.labels));
    }
    if !m.annotations.is_empty() {
        out.insert("annotations".into(), string_map(m.annotations));
    }
    if !m.owner_references.is_empty() {
        let refs: Vec<Value> = m
            .owner_references
            .into_iter()
            .map(|r| {
                let mut o = Map::new();
                insert_some(&mut o, "apiVersion", r.api_version.map(Value::String));
                insert_some(&mut o, "kind", r.kind.map(Value::String));
                insert_some(&mut o, "name", r.name.map(Value::String));
                insert_some(&mut o, "uid", r.uid.map(Value::String));
                insert_some(&mut o, "controller", r.controller.map(Value::Bool));
                insert_some(
                    &mut o,
                    "blockOwnerDeletion",
                    r.block_owner_deletion.map(Value::Bool),
                );
                Value::Object(o)
            })
            .collect();
        out.insert("ownerReferences".into(), Value::Array(refs));
    }
    if !m.finalizers.is_empty() {
        out.insert("finalizers".into(), json!(m.finalizers));
    }
    Value::Object(out)
}

fn with_metadata(
    mut map: Map<String, Value>,
    metadata: Option<meta::ObjectMeta>,
) -> Map<String, Value> {
    map.insert(
        "metadata".into(),
        object_meta_json(metadata.unwrap_or_default()),
    );
    map
}

fn secret_json(s: k8s_pb::api::core::v1::Secret) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), s.metadata);
    if !s.data.is_empty() {
        map.insert("data".into(), bytes_map(s.data));
    }
    if !s.string_data.is_empty() {
        map.insert("stringData".into(), string_map(s.string_data));
    }
    insert_some(&mut map, "type", s.r#type.map(Value::String));
    insert_some(&mut map, "immutable", s.immutable.map(Value::Bool));
    map
}

fn config_map_json(c: k8s_pb::api::core::v1::ConfigMap) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), c.metadata);
    if !c.data.is_empty() {
        map.insert("data".into(), string_map(c.data));
    }
    if !c.binary_data.is_empty() {
        map.insert("binaryData".into(), bytes_map(c.binary_data));
    }
    insert_some(&mut map, "immutable", c.immutable.map(Value::Bool));
    map
}

fn namespace_json(n: k8s_pb::api::core::v1::Namespace) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), n.metadata);
    if let Some(spec) = n.spec
        && !spec.finalizers.is_empty()
    {
        map.insert("spec".into(), json!({"finalizers": spec.finalizers}));
    }
    map
}

fn strings(v: Vec<String>) -> Option<Value> {
    (!v.is_empty()).then(|| json!(v))
}

fn service_json(svc: k8s_pb::api::core::v1::Service) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), svc.metadata);
    let Some(spec) = svc.spec else {
        return map;
    };
    let mut o = Map::new();
    let ports: Vec<Value> = spec
        .ports
        .into_iter()
        .map(|p| {
            let mut port = Map::new();
            insert_some(&mut port, "name", p.name.map(Value::String));
            insert_some(&mut port, "protocol", p.protocol.map(Value::String));
            insert_some(&mut port, "appProtocol", p.app_protocol.map(Value::String));
            insert_some(&mut port, "port", p.port.map(|v| json!(v)));
            insert_some(
                &mut port,
                "targetPort",
                p.target_port.map(|t| match (t.r#type, t.str_val) {
                    (Some(1), Some(s)) => Value::String(s),
                    _ => json!(t.int_val.unwrap_or_default()),
                }),
            );
            insert_some(&mut port, "nodePort", p.node_port.map(|v| json!(v)));
            Value::Object(port)
        })
        .collect();
    if !ports.is_empty() {
        o.insert("ports".into(), Value::Array(ports));
    }
    if !spec.selector.is_empty() {
        o.insert("selector".into(), string_map(spec.selector));
    }
    insert_some(&mut o, "clusterIP", spec.cluster_ip.map(Value::String));
    insert_some(&mut o, "clusterIPs", strings(spec.cluster_ips));
    insert_some(&mut o, "type", spec.r#type.map(Value::String));
    insert_some(&mut o, "externalIPs", strings(spec.external_ips));
    insert_some(
        &mut o,
        "sessionAffinity",
        spec.session_affinity.map(Value::String),
    );
    insert_some(
        &mut o,
        "loadBalancerIP",
        spec.load_balancer_ip.map(Value::String),
    );
    insert_some(
        &mut o,
        "loadBalancerSourceRanges",
        strings(spec.load_balancer_source_ranges),
    );
    insert_some(
        &mut o,
        "externalName",
        spec.external_name.map(Value::String),
    );
    insert_some(
        &mut o,
        "externalTrafficPolicy",
        spec.external_traffic_policy.map(Value::String),
    );
    insert_some(
        &mut o,
        "healthCheckNodePort",
        spec.health_check_node_port.map(|v| json!(v)),
    );
    insert_some(
        &mut o,
        "publishNotReadyAddresses",
        spec.publish_not_ready_addresses.map(Value::Bool),
    );
    insert_some(
        &mut o,
        "sessionAffinityConfig",
        spec.session_affinity_config.map(|c| {
            let timeout = c.client_ip.and_then(|ip| ip.timeout_seconds);
            json!({"clientIP": {"timeoutSeconds": timeout}})
        }),
    );
    insert_some(&mut o, "ipFamilies", strings(spec.ip_families));
    insert_some(
        &mut o,
        "ipFamilyPolicy",
        spec.ip_family_policy.map(Value::String),
    );
    insert_some(
        &mut o,
        "allocateLoadBalancerNodePorts",
        spec.allocate_load_balancer_node_ports.map(Value::Bool),
    );
    insert_some(
        &mut o,
        "loadBalancerClass",
        spec.load_balancer_class.map(Value::String),
    );
    insert_some(
        &mut o,
        "internalTrafficPolicy",
        spec.internal_traffic_policy.map(Value::String),
    );
    insert_some(
        &mut o,
        "trafficDistribution",
        spec.traffic_distribution.map(Value::String),
    );
    map.insert("spec".into(), Value::Object(o));
    map
}

fn service_account_json(sa: k8s_pb::api::core::v1::ServiceAccount) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), sa.metadata);
    if !sa.secrets.is_empty() {
        let refs: Vec<Value> = sa
            .secrets
            .into_iter()
            .map(|r| {
                let mut o = Map::new();
                insert_some(&mut o, "kind", r.kind.map(Value::String));
                insert_some(&mut o, "namespace", r.namespace.map(Value::String));
                insert_some(&mut o, "name", r.name.map(Value::String));
                insert_some(&mut o, "uid", r.uid.map(Value::String));
                insert_some(&mut o, "apiVersion", r.api_version.map(Value::String));
                Value::Object(o)
            })
            .collect();
        map.insert("secrets".into(), Value::Array(refs));
    }
    if !sa.image_pull_secrets.is_empty() {
        let refs: Vec<Value> = sa
            .image_pull_secrets
            .into_iter()
            .map(|r| json!({"name": r.name.unwrap_or_default()}))
            .collect();
        map.insert("imagePullSecrets".into(), Value::Array(refs));
    }
    insert_some(
        &mut map,
        "automountServiceAccountToken",
        sa.automount_service_account_token.map(Value::Bool),
    );
    map
}

fn ssar_json(r: k8s_pb::api::authorization::v1::SelfSubjectAccessReview) -> Map<String, Value> {
    let mut map = with_metadata(Map::new(), r.metadata);
    let mut spec = Map::new();
    if let Some(spec_pb) = r.spec {
        if let Some(ra) = spec_pb.resource_attributes {
            let mut o = Map::new();
            insert_some(&mut o, "namespace", ra.namespace.map(Value::String));
            insert_some(&mut o, "verb", ra.verb.map(Value::String));
            insert_some(&mut o, "group", ra.group.map(Value::String));
            insert_some(&mut o, "version", ra.version.map(Value::String));
            insert_some(&mut o, "resource", ra.resource.map(Value::String));
            insert_some(&mut o, "subresource", ra.subresource.map(Value::String));
            insert_some(&mut o, "name", ra.name.map(Value::String));
            spec.insert("resourceAttributes".into(), Value::Object(o));
        }
        if let Some(nra) = spec_pb.non_resource_attributes {
            let mut o = Map::new();
            insert_some(&mut o, "path", nra.path.map(Value::String));
            insert_some(&mut o, "verb", nra.verb.map(Value::String));
            spec.insert("nonResourceAttributes".into(), Value::Object(o));
        }
    }
    map.insert("spec".into(), Value::Object(spec));
    map
}

/// Whether a request Content-Type is Kubernetes protobuf.
pub(crate) fn is_protobuf(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(PROTOBUF_CONTENT_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn secret_round_trips_into_json_with_base64_data() {
        let secret = k8s_pb::api::core::v1::Secret {
            metadata: Some(meta::ObjectMeta {
                name: Some("sh.helm.release.v1.demo.v1".into()),
                namespace: Some("demo".into()),
                labels: BTreeMap::from([("owner".into(), "helm".into())]),
                ..Default::default()
            }),
            data: BTreeMap::from([("release".into(), b"hello".to_vec())]),
            r#type: Some("helm.sh/release.v1".into()),
            ..Default::default()
        };
        let body = envelope("v1", "Secret", secret.encode_to_vec());
        let object = decode_object(&body).unwrap_or_default();
        assert_eq!(object["kind"], "Secret");
        assert_eq!(object["apiVersion"], "v1");
        assert_eq!(object["metadata"]["name"], "sh.helm.release.v1.demo.v1");
        assert_eq!(object["metadata"]["labels"]["owner"], "helm");
        assert_eq!(object["data"]["release"], "aGVsbG8=");
        assert_eq!(object["type"], "helm.sh/release.v1");
    }

    #[test]
    fn access_review_keeps_its_resource_attributes() {
        let review = k8s_pb::api::authorization::v1::SelfSubjectAccessReview {
            spec: Some(
                k8s_pb::api::authorization::v1::SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(k8s_pb::api::authorization::v1::ResourceAttributes {
                        namespace: Some("demo".into()),
                        verb: Some("list".into()),
                        resource: Some("pods".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        let body = envelope(
            "authorization.k8s.io/v1",
            "SelfSubjectAccessReview",
            review.encode_to_vec(),
        );
        let object = decode_object(&body).unwrap_or_default();
        assert_eq!(object["spec"]["resourceAttributes"]["verb"], "list");
        assert_eq!(object["spec"]["resourceAttributes"]["namespace"], "demo");
    }

    #[test]
    fn zero_values_go_encodes_are_dropped_like_omitempty() {
        let svc = k8s_pb::api::core::v1::Service {
            metadata: Some(meta::ObjectMeta {
                name: Some("web".into()),
                generate_name: Some(String::new()),
                generation: Some(0),
                ..Default::default()
            }),
            spec: Some(k8s_pb::api::core::v1::ServiceSpec {
                ports: vec![k8s_pb::api::core::v1::ServicePort {
                    port: Some(80),
                    node_port: Some(0),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }],
                external_name: Some(String::new()),
                r#type: Some("ClusterIP".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = envelope("v1", "Service", svc.encode_to_vec());
        let object = decode_object(&body).unwrap_or_default();
        assert_eq!(object["metadata"], json!({"name": "web"}));
        assert_eq!(
            object["spec"]["ports"][0],
            json!({"port": 80, "protocol": "TCP"})
        );
        assert_eq!(object["spec"]["type"], "ClusterIP");
        assert!(object["spec"].get("externalName").is_none());
    }

    #[test]
    fn body_without_magic_is_rejected() {
        assert!(matches!(
            decode_object(b"{\"kind\":\"Secret\"}"),
            Err(ProtoError::MissingMagic)
        ));
    }

    #[test]
    fn unknown_kind_is_named_in_the_error() {
        let body = envelope("v1", "Pod", Vec::new());
        match decode_object(&body) {
            Err(ProtoError::UnsupportedKind { kind }) => assert_eq!(kind, "Pod"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_envelope_is_an_error_not_a_panic() {
        let mut body = MAGIC.to_vec();
        body.extend([0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_object(&body), Err(ProtoError::Envelope(_))));
    }

    #[test]
    fn protobuf_content_type_is_recognised_with_parameters() {
        assert!(is_protobuf("application/vnd.kubernetes.protobuf"));
        assert!(is_protobuf(
            "application/vnd.kubernetes.protobuf; charset=utf-8"
        ));
        assert!(!is_protobuf("application/json"));
    }
}
