#!/usr/bin/env python3
"""ocigc benchmark: one synthetic registry per layout, measured in one run on identical data.

For each layout (oci, serverless-registry, distribution) a seeded generator fills a fresh moto
bucket with repositories x tags x layers (layers shared from a common pool, a given fraction of
garbage images), and knows exactly which keys are garbage. Then, on the same moto server:

- ocigc gc (grace 0, delay 0) must delete exactly the generator's garbage; its requests are
  compared with the theoretical minimum (LIST pages + manifest GETs + delete batches) and, with
  its wall time, with the raw floor (examples/floor.rs: a bare LIST of the bucket plus one GET
  per manifest, same S3 client and concurrency);
- distribution only: the same data generated into a second bucket is collected by Debian's
  `docker-registry garbage-collect` (distribution 2.8): wall time, store requests (counted from
  moto's request log, for both tools), and the two deletion sets compared; then the same with
  untagged manifests (`-m` vs `--delete-untagged`), where the classic GC's known over-deletion
  of index children is counted and reported;
- oci only: the GETs of two observations of the same bucket (`--delay 1h`, directory store),
  where the second run's referrer scan skips what the pending state knows is no referrer;
- peak RSS of ocigc per million blobs, on the directory store.

moto spends ~5 ms of CPU per request and scans the whole bucket on every LIST, so absolute
times are moto's; the ratios, taken on the same server in the same run, are the result.

Usage: bench.py [--smoke] [--objects N] [--rss-keys N] [--out FILE] [--bin DIR]
Needs moto_server, docker-registry and the ocigc binaries (cargo build --release --bin ocigc
--example floor). Prints a table of ratios and a closing 'N passed, M failed'.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
V2 = "docker/registry/v2"

checks = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    checks["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {what}{'' if ok else ': ' + str(detail)[:2000]}", flush=True)


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def child_env(**extra):
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# The synthetic registry.

class Registry:
    """Repositories x tags x layers. Per repository: `tags` tagged images, a fraction of garbage
    images (blobs uploaded, never tagged), and, when `extras` is set, one tagged multi-arch index
    whose children are untagged manifests and one untagged manifest (for --delete-untagged)."""

    def __init__(self, repos, tags, layers, shared, garbage, extras):
        self.repos = [f"bench/app-{r}" if r % 5 else f"bench/app-{r - 1 if r else 0}/tools-{r}"
                      for r in range(repos)]
        self.tags, self.layers, self.shared, self.garbage, self.extras = tags, layers, shared, garbage, extras

    def blob(self, kind, *parts):
        data = f"{kind}:{':'.join(map(str, parts))}".ljust(96, ".").encode()
        return data, sha(data)

    def image(self, repo, name):
        """(manifest bytes, digest, [(blob bytes, digest)]) of one image."""
        blobs = []
        for i in range(self.layers):
            if i < self.shared:
                pool = int(hashlib.sha256(f"{repo}{name}{i}".encode()).hexdigest(), 16) % 50
                blobs.append(self.blob("base", pool))
            else:
                blobs.append(self.blob("layer", repo, name, i))
        config = self.blob("config", repo, name)
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config[1], "size": len(config[0])},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for b, d in blobs],
        }
        m = json.dumps(manifest, sort_keys=True).encode()
        return m, sha(m), [config] + blobs

    def index(self, children):
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": len(m),
             "platform": {"architecture": arch, "os": "linux"}} for arch, (m, d, _) in children]}
        data = json.dumps(doc, sort_keys=True).encode()
        return data, sha(data)

    def content(self, repo):
        """Tagged roots as (tag, manifest bytes, digest, blobs, children), untagged manifests as
        (manifest bytes, digest, blobs), garbage images' blobs."""
        n_garbage = int(round(self.tags * self.garbage / max(1e-9, 1 - self.garbage)))
        tagged = [(f"v{t}",) + self.image(repo, f"v{t}") + ([],) for t in range(self.tags)]
        garbage = [self.image(repo, f"garbage{g}") for g in range(n_garbage)]
        untagged = []
        if self.extras:
            kids = [(arch, self.image(repo, f"multi-{arch}")) for arch in ("amd64", "arm64")]
            idx, idx_digest = self.index(kids)
            tagged.append(("multi", idx, idx_digest, [], [k for _, k in kids]))
            untagged.append(self.image(repo, "untagged"))
        return tagged, untagged, garbage


class Sink:
    def __init__(self, put, keys_written):
        self.put = put
        self.keys = keys_written


def generate(reg, layout, put):
    """Writes the registry in `layout` through `put(key, bytes)`. Returns (all keys, garbage
    keys by default, garbage keys with --delete-untagged, manifest keys a GC must read)."""
    objects, garbage, manifests = {}, set(), set()

    def w(key, data):
        objects[key] = data

    if layout == "distribution":
        data_key = lambda d: f"{V2}/blobs/sha256/{d[7:9]}/{d[7:]}/data"
        link = lambda repo, path, d: f"{V2}/repositories/{repo}/{path}/sha256/{d[7:]}/link"
        reachable, untagged_only, all_blobs = set(), set(), set()
        for repo in reg.repos:
            tagged, untagged, junk = reg.content(repo)

            def upload(data, d):
                w(data_key(d), data)
                w(link(repo, "_layers", d), d.encode())
                all_blobs.add(d)

            def push(m, d, blobs, tag=None):
                for b, bd in blobs:
                    upload(b, bd)
                w(data_key(d), m)
                all_blobs.add(d)
                w(link(repo, "_manifests/revisions", d), d.encode())
                manifests.add(data_key(d))
                if tag:
                    w(f"{V2}/repositories/{repo}/_manifests/tags/{tag}/current/link", d.encode())
                    w(link(repo, f"_manifests/tags/{tag}/index", d), d.encode())

            for tag, m, d, blobs, kids in tagged:
                for km, kd, kb in kids:
                    push(km, kd, kb)
                    reachable.update([kd] + [x for _, x in kb])
                push(m, d, blobs, tag)
                reachable.update([d] + [x for _, x in blobs])
            for m, d, blobs in untagged:
                push(m, d, blobs)
                untagged_only.update([d] + [x for _, x in blobs])
            for m, d, blobs in junk:
                # Pushed, then deleted through the registry API: blobs and links stay.
                for b, bd in blobs:
                    upload(b, bd)
                w(data_key(d), m)
                all_blobs.add(d)
        garbage = {data_key(d) for d in all_blobs - reachable - untagged_only}
        garbage_untagged = garbage | {data_key(d) for d in untagged_only - reachable}
        garbage_untagged |= {link(r, "_manifests/revisions", m[1]) for r in reg.repos
                             for m in reg.content(r)[1]}
    elif layout == "oci":
        for repo in reg.repos:
            tagged, untagged, junk = reg.content(repo)
            w(f"{repo}/oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            entries = []
            bk = lambda d: f"{repo}/blobs/sha256/{d[7:]}"
            for tag, m, d, blobs, kids in tagged:
                for km, kd, kb in kids:
                    w(bk(kd), km)
                    manifests.add(bk(kd))
                    for b, bd in kb:
                        w(bk(bd), b)
                w(bk(d), m)
                manifests.add(bk(d))
                for b, bd in blobs:
                    w(bk(bd), b)
                entries.append({"mediaType": OCI_INDEX if kids else OCI_MANIFEST, "digest": d, "size": len(m),
                                "annotations": {"org.opencontainers.image.ref.name": tag}})
            for m, d, blobs in untagged:
                w(bk(d), m)
                manifests.add(bk(d))
                for b, bd in blobs:
                    w(bk(bd), b)
                entries.append({"mediaType": OCI_MANIFEST, "digest": d, "size": len(m)})
            kept = {k for k in objects if k.startswith(repo + "/")}
            for m, d, blobs in junk:
                for b, bd in [(m, d)] + blobs:
                    if bk(bd) not in kept:
                        garbage.add(bk(bd))
                    w(bk(bd), b)
            w(f"{repo}/index.json", json.dumps({"schemaVersion": 2, "manifests": entries}).encode())
        garbage_untagged = garbage
    else:  # serverless-registry
        for repo in reg.repos:
            tagged, untagged, junk = reg.content(repo)
            bk = lambda d: f"{repo}/blobs/{d}"
            mk = lambda r: f"{repo}/manifests/{r}"
            for tag, m, d, blobs, kids in tagged:
                for km, kd, kb in kids:
                    w(mk(kd), km)
                    manifests.add(mk(kd))
                    for b, bd in kb:
                        w(bk(bd), b)
                for b, bd in blobs:
                    w(bk(bd), b)
                w(mk(d), m)
                w(mk(tag), m)
                manifests.add(mk(tag))
            for m, d, blobs in untagged:
                w(mk(d), m)
                manifests.add(mk(d))
                for b, bd in blobs:
                    w(bk(bd), b)
            kept = {k for k in objects if k.startswith(repo + "/")}
            for m, d, blobs in junk:
                # Blobs uploaded, manifest never pushed.
                for b, bd in blobs:
                    if bk(bd) not in kept:
                        garbage.add(bk(bd))
                    w(bk(bd), b)
        garbage_untagged = None
    put(objects)
    return set(objects), garbage, garbage_untagged, manifests


# ---------------------------------------------------------------------------------------------
# Stores, tools and counting.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto server of the benchmark's own, whose request log is the request count."""

    def __init__(self, work):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(work, "moto.log")
        self.log = open(self.log_path, "w")
        beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
        moto = beside if os.path.exists(beside) else shutil.which("moto_server")
        self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit("moto did not start")
                time.sleep(0.1)
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, objects):
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: self.s3.put_object(Bucket=name, Key=kv[0], Body=kv[1]), objects.items()))
        return name

    def keys(self, bucket):
        out = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out

    def sync(self):
        """Waits until every request answered so far is in the log: moto logs a request after
        answering it, so a marker request is sent and waited for."""
        marker = f"sync-{uuid.uuid4().hex}"
        try:
            urllib.request.urlopen(f"{self.endpoint}/{marker}", timeout=5)
        except Exception:
            pass
        deadline = time.time() + 10
        while time.time() < deadline:
            with open(self.log_path, "rb") as f:
                data = f.read()
            at = data.find(marker.encode())
            if at >= 0:
                return data[:at]
            time.sleep(0.05)
        raise SystemExit("moto's request log did not catch up")

    def mark(self):
        return len(self.sync())

    def requests_since(self, offset, bucket):
        """Requests to `bucket` logged since `offset`, by operation."""
        lines = self.sync()[offset:].decode(errors="replace").splitlines()
        counts = {"list": 0, "get": 0, "head": 0, "put": 0, "delete": 0}
        pat = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (/[^ ]*) HTTP')
        # The server colours the lines of some statuses (206, 404) with terminal escapes.
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        for line in lines:
            m = pat.search(ansi.sub("", line))
            if not m or not m.group(2).startswith(f"/{bucket}"):
                continue
            method, path = m.groups()
            rest = path[len(bucket) + 1:]
            is_bucket = rest in ("", "/") or rest.startswith("?") or rest.startswith("/?")
            if method == "GET" and is_bucket:
                counts["list"] += 1
            elif method == "POST" and "delete" in rest:
                counts["delete"] += 1
            else:
                counts[{"GET": "get", "HEAD": "head", "PUT": "put", "DELETE": "delete", "POST": "put"}[method]] += 1
        return counts

    def stop(self):
        # A moto holding many buckets can take a while to exit on SIGTERM; nothing it holds is
        # needed any more.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def total(c):
    return sum(c.values())


def run_ocigc(bin_dir, bucket_args, env, layout, *extra, rss_file=None, delay="0s"):
    cmd = [os.path.join(bin_dir, "ocigc"), "gc", *bucket_args, "--layout", layout, "--grace", "0s",
           "--delay", delay, "--concurrency", "16", "--report", "-", *extra]
    if rss_file:
        # GNU time's %M: the peak resident set of this one process, in KiB.
        cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"ocigc failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout), seconds


def deleted_keys(report):
    return {d["key"] for r in report["repositories"] for d in r["deleted"]}


def run_floor(bin_dir, bucket_args, env, manifests, work):
    path = os.path.join(work, f"manifests-{uuid.uuid4().hex[:6]}.txt")
    with open(path, "w") as f:
        f.write("\n".join(sorted(manifests)))
    bucket = bucket_args[1]
    extra = ["--s3-path-style"] if "--s3-path-style" in bucket_args else []
    r = subprocess.run([os.path.join(bin_dir, "examples", "floor"), bucket, path, "16", *extra],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"floor failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def classic_gc(moto, bucket, work, delete_untagged):
    config = os.path.join(work, f"registry-{bucket}.yml")
    with open(config, "w") as f:
        f.write(f"""version: 0.1
log:
  level: error
storage:
  s3:
    accesskey: testing
    secretkey: testing
    region: us-east-1
    regionendpoint: {moto.endpoint}
    bucket: {bucket}
    secure: false
    v4auth: true
  delete:
    enabled: true
  redirect:
    disable: true
""")
    cmd = ["docker-registry", "garbage-collect"] + (["--delete-untagged"] if delete_untagged else []) + [config]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=3600)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"docker-registry garbage-collect failed: {r.stderr[-2000:]}")
    return seconds


# ---------------------------------------------------------------------------------------------

def measure_layout(args, moto, work, layout, reg, rows, classic_rows):
    objects = {}
    keys, garbage, garbage_untagged, manifests = generate(reg, layout, objects.update)
    bucket = moto.bucket(objects)
    bucket_args = ["--bucket", f"s3://{bucket}", "--s3-path-style"]
    env = child_env(AWS_ENDPOINT_URL=moto.endpoint)
    floor = run_floor(args.bin, bucket_args, env, manifests, work)
    off = moto.mark()
    report, seconds = run_ocigc(args.bin, bucket_args, env, layout)
    logged = moto.requests_since(off, bucket)
    gone = deleted_keys(report)
    check(gone == garbage, f"{layout}: ocigc deleted exactly the generator's garbage",
          f"extra {sorted(gone - garbage)[:5]}, missing {sorted(garbage - gone)[:5]}")
    check(keys - moto.keys(bucket) == garbage, f"{layout}: the bucket lost exactly that")
    own = report["requests"]
    # The server's log and ocigc's own accounting must agree, or the log is not to be trusted.
    check(abs(total(own) - total(logged)) <= max(2, total(own) // 100),
          f"{layout}: moto's request log agrees with ocigc's own count", f"{own} vs {logged}")
    minimum = math.ceil(len(keys) / 1000) + len(manifests) + math.ceil(len(garbage) / 1000)
    rows.append({
        "layout": layout, "objects": len(keys), "manifests": len(manifests), "deleted": len(gone),
        "requests": total(logged), "own_count": total(own), "minimum": minimum,
        "floor_requests": floor["list"] + floor["get"], "seconds": seconds, "floor_seconds": floor["seconds"],
        "detail": logged,
    })
    if layout != "distribution":
        return
    for untagged in (False, True):
        objects = {}
        generate(reg, layout, objects.update)
        a = moto.bucket(objects)
        b = moto.bucket(objects)
        extra = ["--delete-untagged"] if untagged else []
        off = moto.mark()
        rep, o_seconds = run_ocigc(args.bin, ["--bucket", f"s3://{a}", "--s3-path-style"], env, layout, *extra)
        o_req = moto.requests_since(off, a)
        off = moto.mark()
        c_seconds = classic_gc(moto, b, work, untagged)
        c_req = moto.requests_since(off, b)
        o_gone = keys - moto.keys(a)
        c_gone = keys - moto.keys(b)
        # The classic GC deletes blobs; compare data keys (it also drops revision links with -m).
        o_data = {k for k in o_gone if k.startswith(f"{V2}/blobs/")}
        c_data = {k for k in c_gone if k.startswith(f"{V2}/blobs/")}
        expected = garbage_untagged if untagged else garbage
        check(o_gone == expected, f"distribution{' -m' if untagged else ''}: ocigc deleted exactly the garbage",
              f"extra {sorted(o_gone - expected)[:5]} missing {sorted(expected - o_gone)[:5]}")
        over = c_data - o_data
        under = o_data - c_data
        if untagged:
            check(not under, "classic -m deleted everything ocigc deleted", sorted(under)[:5])
        else:
            check(c_data == o_data, "classic GC and ocigc deleted the same blobs",
                  f"classic only {sorted(over)[:5]}, ocigc only {sorted(under)[:5]}")
        classic_rows.append({
            "mode": "--delete-untagged / -m" if untagged else "default", "objects": len(keys),
            "ocigc_seconds": o_seconds, "classic_seconds": c_seconds,
            "ocigc_requests": total(o_req), "classic_requests": total(c_req),
            "ocigc_detail": o_req, "classic_detail": c_req,
            "deleted": len(o_data), "classic_deleted": len(c_data), "over_deleted": len(over),
        })


def measure_rss(args, work, keys_target):
    """Peak RSS of ocigc on an oci bucket in the directory store with about `keys_target` keys."""
    per_image = 2 + 4  # manifest, config, 4 layers (none shared: every key a distinct blob)
    repos = max(1, keys_target // (per_image * 100))
    reg = Registry(repos=repos, tags=90, layers=4, shared=0, garbage=0.1, extras=False)
    root = os.path.join(work, "rss-bucket")
    keys, garbage, _, _ = generate(reg, "oci", write_dir(root))
    blobs = sum(1 for k in keys if "/blobs/" in k)
    rss_file = os.path.join(work, "rss.txt")
    report, seconds = run_ocigc(args.bin, ["--bucket", root], child_env(), "oci", "--dry-run",
                                rss_file=rss_file)
    with open(rss_file) as f:
        peak_kib = int(f.read().split()[-1])
    check(deleted_keys(report) == garbage, "rss run: dry run plans exactly the garbage")
    shutil.rmtree(root, ignore_errors=True)
    return {"keys": len(keys), "blobs": blobs, "peak_mib": peak_kib / 1024,
            "per_million": peak_kib / 1024 / (blobs / 1e6), "seconds": seconds}


def write_dir(root):
    def put(objects):
        for k, v in objects.items():
            p = os.path.join(root, k)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(v)
    return put


def measure_observations(args, work):
    """GETs of two observations of the same oci bucket (--delay 1h, directory store): the second
    run's referrer scan skips the garbage the pending state says is no referrer."""
    root = os.path.join(work, "observations-bucket")
    reg = Registry(repos=max(2, args.objects // 105), tags=10, layers=5, shared=2, garbage=0.25,
                   extras=True)
    keys, garbage, _, _ = generate(reg, "oci", write_dir(root))
    runs = [run_ocigc(args.bin, ["--bucket", root], child_env(), "oci", delay="1h")[0]
            for _ in range(2)]
    shutil.rmtree(root, ignore_errors=True)
    first, second = (r["requests"]["get"] for r in runs)
    pending = [sum(x["pending"]["blobs"] for x in r["repositories"]) for r in runs]
    check(all(not deleted_keys(r) for r in runs), "observations: nothing deleted before the delay")
    check(pending == [len(garbage)] * 2, "observations: every garbage blob pending, twice",
          f"{pending} vs {len(garbage)}")
    check(second < first, "observations: the second run reads less", f"{first} vs {second}")
    return {"keys": len(keys), "garbage": len(garbage), "first_gets": first, "second_gets": second,
            "repos": len(reg.repos)}


def table(rows, classic_rows, rss, cmdline, obs=None):
    out = [f"Command: `{cmdline}`", ""]
    out += ["### Requests and time vs the minimum and the raw floor (moto)", "",
            "| layout | objects | manifests | deleted | ocigc requests | minimum | ocigc / minimum "
            "| raw floor requests | ocigc time | floor time | ocigc / floor time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['objects']} | {r['manifests']} | {r['deleted']} | {r['requests']} "
                   f"| {r['minimum']} | {r['requests'] / r['minimum']:.2f} | {r['floor_requests']} "
                   f"| {r['seconds']:.1f} s | {r['floor_seconds']:.1f} s | {r['seconds'] / r['floor_seconds']:.2f} |")
    out += ["", "Requests by operation (moto's log): " + "; ".join(
        f"{r['layout']}: " + ", ".join(f"{k} {v}" for k, v in r["detail"].items()) for r in rows), ""]
    if classic_rows:
        out += ["### ocigc vs `docker-registry garbage-collect` (distribution 2.8, same data, moto)", "",
                "| mode | objects | ocigc time | classic time | classic / ocigc time | ocigc requests "
                "| classic requests | classic / ocigc requests | blobs deleted (ocigc / classic) | classic over-deletion |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in classic_rows:
            out.append(f"| {c['mode']} | {c['objects']} | {c['ocigc_seconds']:.1f} s | {c['classic_seconds']:.1f} s "
                       f"| {c['classic_seconds'] / c['ocigc_seconds']:.2f} | {c['ocigc_requests']} "
                       f"| {c['classic_requests']} | {c['classic_requests'] / c['ocigc_requests']:.2f} "
                       f"| {c['deleted']} / {c['classic_deleted']} | {c['over_deleted']} |")
        out += ["", "Requests by operation: " + "; ".join(
            f"{c['mode']}: ocigc " + ", ".join(f"{k} {v}" for k, v in c["ocigc_detail"].items())
            + " — classic " + ", ".join(f"{k} {v}" for k, v in c["classic_detail"].items())
            for c in classic_rows), ""]
    if obs:
        out += ["### A later observation (directory store, oci layout, `--delay 1h`, two runs)", "",
                "| keys | repositories | garbage blobs | GETs, first run | GETs, second run | second / first |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {obs['keys']} | {obs['repos']} | {obs['garbage']} | {obs['first_gets']} | {obs['second_gets']} "
                f"| {obs['second_gets'] / obs['first_gets']:.2f} |", ""]
    if rss:
        out += ["### Peak RSS (directory store, oci layout, dry run)", "",
                "| keys | blobs | peak RSS | per 1M blobs | time |", "|---:|---:|---:|---:|---:|",
                f"| {rss['keys']} | {rss['blobs']} | {rss['peak_mib']:.0f} MiB | {rss['per_million']:.0f} MiB "
                f"| {rss['seconds']:.1f} s |", ""]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--objects", type=int, default=20000, help="about this many objects per moto bucket")
    p.add_argument("--rss-keys", type=int, default=1_000_000, help="directory-store keys for the RSS run (0: skip)")
    p.add_argument("--layouts", default="oci,serverless-registry,distribution")
    p.add_argument("--bin", default="target/release", help="directory with ocigc and examples/floor")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    if args.smoke:
        args.objects, args.rss_keys = 600, 20_000
    # Repositories of 10 tagged images with 5 layers (2 from a shared pool), 25% garbage.
    # Keys per repository, measured: distribution also stores a link per blob and per tag.
    per_repo = {"distribution": 213, "oci": 105, "serverless-registry": 111}
    work = tempfile.mkdtemp(prefix="ocigc-bench-")
    moto = Moto(work)
    rows, classic_rows = [], []
    try:
        for layout in args.layouts.split(","):
            repos = max(2, args.objects // per_repo[layout])
            reg = Registry(repos=repos, tags=10, layers=5, shared=2, garbage=0.25, extras=True)
            t0 = time.monotonic()
            measure_layout(args, moto, work, layout, reg, rows, classic_rows)
            # Each result as soon as it is measured: a long run that fails later keeps them.
            print(f"-- {layout}: {time.monotonic() - t0:.0f} s", json.dumps(rows[-1]), flush=True)
            for c in classic_rows:
                print("-- classic:", json.dumps(c), flush=True)
    finally:
        moto.stop()
    try:
        obs = measure_observations(args, work) if "oci" in args.layouts.split(",") else None
        if obs:
            print("-- observations:", json.dumps(obs), flush=True)
        rss = measure_rss(args, work, args.rss_keys) if args.rss_keys else None
        if rss:
            print("-- rss:", json.dumps(rss), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(rows, classic_rows, rss, "python3 bench/bench.py " + " ".join(sys.argv[1:]), obs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            check(False, "benchmark run", e.code)
    print(f"{checks['passed']} passed, {checks['failed']} failed")
    sys.exit(1 if checks["failed"] else 0)
