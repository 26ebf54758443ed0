#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently), starts a moto S3 server on
# a free loopback port, then runs formatting, lint and every test. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-test
MOTO_VERSION=5.2.1
KV_VERSION=1.37.0

# moto's server and the manifest validator from PyPI, in a project-local venv so nothing
# global is touched.
if ! "$VENV/bin/python" -c "
import moto, boto3, yaml, kubernetes_validate
from importlib.metadata import version
assert moto.__version__ == '$MOTO_VERSION' and version('kubernetes-validate') == '$KV_VERSION'
" 2>/dev/null; then
  echo "== installing moto $MOTO_VERSION and kubernetes-validate $KV_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "moto[server]==$MOTO_VERSION" boto3 "kubernetes-validate==$KV_VERSION" pyyaml
fi

# Real Prometheus components for the end-to-end metrics test and promtool for the alert
# rules, from Debian; kubectl (for kustomize) only if the machine has none.
packages=""
command -v prometheus >/dev/null || packages="$packages prometheus"
command -v prometheus-pushgateway >/dev/null || packages="$packages prometheus-pushgateway"
command -v kubectl >/dev/null || packages="$packages kubernetes-client"
# The classic registry and skopeo, for real images through a real registry on moto.
command -v docker-registry >/dev/null || packages="$packages docker-registry"
command -v skopeo >/dev/null || packages="$packages skopeo"
# GNU time measures the benchmark's peak RSS of one process.
[ -x /usr/bin/time ] || packages="$packages time"
if [ -n "$packages" ]; then
  echo "== installing Debian packages:$packages"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -q --no-install-recommends $packages
fi

# Child processes must not inherit a CA bundle meant for other traffic, and must never probe
# cloud metadata endpoints: everything here talks to 127.0.0.1 only.
unset AWS_CA_BUNDLE
export AWS_EC2_METADATA_DISABLED=true
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1

mkdir -p target
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >target/moto.log 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
# Readiness: bounded to 30 s, polling the server itself rather than sleeping a fixed time.
"$VENV/bin/python" - "$PORT" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("moto server did not come up within 30 s (see target/moto.log)")
        time.sleep(0.1)
PY
export OCIGC_TEST_S3_ENDPOINT="http://127.0.0.1:$PORT"
echo "== moto S3 server on $OCIGC_TEST_S3_ENDPOINT"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== example bucket is what examples/make-bucket.py writes"
python3 examples/make-bucket.py --check
echo "== cargo test"
cargo test --all-targets 2>&1 | tee target/test.log
echo "== real images: docker-registry on moto, skopeo push and pull, ocigc in between"
"$VENV/bin/python" tests/real/registry_e2e.py target/debug/ocigc | tee target/real.log
echo "== benchmark smoke: every layout on moto, the raw floor, docker-registry garbage-collect"
cargo build --quiet --example floor
"$VENV/bin/python" bench/bench.py --smoke --bin target/debug | tee target/bench.log
echo "== deploy/: render, validate, promtool, container args"
"$VENV/bin/python" deploy/test/validate.py | tee target/deploy.log
# The runners' own summary lines are the record; add one plain closing line for CI readers.
passed=$(cat target/test.log target/real.log target/bench.log target/deploy.log | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(cat target/test.log target/real.log target/bench.log target/deploy.log | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
