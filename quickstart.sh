#!/usr/bin/env bash
# kinvoke quickstart: builds kinvoke, starts a development gateway on its embedded
# defaults (generated CA and certificates; cluster "local" running commands in a shell
# next to the gateway; cluster "sandbox", a simulated Kubernetes API server behind the
# relay), runs commands through it with the real client, then keeps the gateway serving
# until Ctrl-C.
#
#   KINVOKE_DEV_DIR     state directory (default .kinvoke-dev)
#   KINVOKE_DEV_LISTEN  listen address  (default 127.0.0.1:8443)
set -euo pipefail
cd "$(dirname "$0")"

state=${KINVOKE_DEV_DIR:-.kinvoke-dev}
listen=${KINVOKE_DEV_LISTEN:-127.0.0.1:8443}

echo "==> building kinvoke-gateway and kinvoke (first build takes a few minutes)"
cargo build --locked --quiet -p kinvoke-gateway -p kinvoke
bin=$PWD/target/debug
mkdir -p "$state"
out=$state/gateway.stdout
log=$state/gateway.log

echo "==> starting the development gateway on $listen (state in $state)"
"$bin/kinvoke-gateway" dev --state-dir "$state" --listen "$listen" >"$out" 2>"$log" &
gateway=$!
trap 'kill -TERM "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

# wait for the ready line (the gateway prints it once its listener is bound)
for _ in $(seq 1 300); do
    grep -q 'serving on https://' "$out" 2>/dev/null && break
    kill -0 "$gateway" 2>/dev/null || { echo "the gateway exited; its log:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
done
grep -q 'serving on https://' "$out" || { echo "the gateway did not become ready; its log:" >&2; cat "$log" >&2; exit 1; }
cat "$out"
echo "(the gateway's log, audit events included, goes to $log; the audit file is $state/audit.jsonl)"

client="$bin/kinvoke --config $state/client.toml"
demo='echo "hello from $(hostname)" | tr a-z A-Z; ls -l; exit 3'
echo
echo "==> a shell command with an attached file, on cluster local:"
echo "    kinvoke --config $state/client.toml invoke --cluster local --command '$demo' --file README.md"
echo
status=0
$client invoke --cluster local --command "$demo" --file README.md || status=$?
echo "==> the client exited with $status: the remote command's exit code"

kube='kubectl get pods -A; kubectl auth whoami'
echo
echo "==> kubectl through the relay, on the simulated cluster sandbox (the API server sees"
echo "    the caller, dev-user, impersonated; the command never holds the gateway's credentials):"
echo "    kinvoke --config $state/client.toml invoke --cluster sandbox --command '$kube'"
echo
status=0
$client invoke --cluster sandbox --command "$kube" || status=$?
echo "==> the client exited with $status"

pods='echo "in $PWD of Pod kinvoke-$KINVOKE_COMMAND_ID"; kubectl get pods -n kinvoke-command'
echo
echo "==> the same cluster with the pod executor, as az aks command invoke: the command runs in a"
echo "    short-lived Pod of its own (the simulated kubelet runs it in the sandbox):"
echo "    kinvoke --config $state/client.toml invoke --cluster sandbox-pods --command '$pods'"
echo
status=0
$client invoke --cluster sandbox-pods --command "$pods" || status=$?
echo "==> the client exited with $status"
echo
echo "==> the gateway keeps serving; try the commands above from another terminal. Ctrl-C stops it."
wait "$gateway"
