#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently), starts a moto S3 server on
# a free loopback port, then runs formatting, lint and every test. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-test
MOTO_VERSION=5.2.1

# moto's server from PyPI, in a project-local venv so nothing global is touched.
if ! "$VENV/bin/python" -c "import moto, boto3; assert moto.__version__ == '$MOTO_VERSION'" 2>/dev/null; then
  echo "== installing moto $MOTO_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" boto3
fi

# Real Prometheus components for the end-to-end metrics test, from Debian.
if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then
  echo "== installing Debian's prometheus and prometheus-pushgateway"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends prometheus prometheus-pushgateway
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
# cargo test's own summary lines are the record; add one plain closing line for CI readers.
passed=$(grep -Eo '[0-9]+ passed' target/test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test.log | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
