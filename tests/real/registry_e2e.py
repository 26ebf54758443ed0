#!/usr/bin/env python3
"""Real images through a real registry: Debian's docker-registry (distribution 2.8) on a moto
S3 bucket, images built locally as OCI layouts and pushed with skopeo, then ocigc's
`distribution` layout run against the bucket, then every remaining tag pulled back with skopeo
(which verifies every blob's digest). The same for whole-repository deletion, and for
retention: tags removed by the rules no longer pull, kept and restored tags pull intact, and
the trash keeps a removed image whole until its TTL.

Usage: registry_e2e.py OCIGC_BINARY   (needs OCIGC_TEST_S3_ENDPOINT, as scripts/test.sh sets)
Prints one line per check and a closing 'N passed, M failed'.
"""

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid

import boto3

ENDPOINT = os.environ["OCIGC_TEST_S3_ENDPOINT"]
OCIGC = sys.argv[1]
V2 = "docker/registry/v2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

passed, failed = 0, 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}", flush=True)
    else:
        failed += 1
        print(f"FAIL {what}: {detail}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout on disk, written by hand: deterministic bytes, so that identical
    layers in different images are identical blobs."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.index = []

    def blob(self, data, media_type):
        d = digest(data)
        with open(os.path.join(self.path, "blobs", "sha256", d.split(":")[1]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def layer(self, name, content):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
        tar_bytes = raw.getvalue()
        gz = gzip.compress(tar_bytes, mtime=0)
        desc = self.blob(gz, "application/vnd.oci.image.layer.v1.tar+gzip")
        desc["diff_id"] = digest(tar_bytes)
        return desc

    def image(self, layers, arch="amd64"):
        config = {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
        }
        cfg = self.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg,
            "layers": [{k: l[k] for k in ("mediaType", "digest", "size")} for l in layers],
        }
        m = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        m["layers"] = [l["digest"] for l in layers] + [cfg["digest"]]
        return m

    def multi(self, images):
        entries = []
        for arch, img in images:
            e = {k: img[k] for k in ("mediaType", "digest", "size")}
            e["platform"] = {"architecture": arch, "os": "linux"}
            entries.append(e)
        idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.blob(json.dumps(idx).encode(), OCI_INDEX)

    def tag(self, tag, desc):
        e = {k: desc[k] for k in ("mediaType", "digest", "size")}
        e["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index.append(e)
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.index}, f)


def child_env(**extra):
    """The environment for child processes: a CA bundle meant for other traffic breaks both
    the registry's S3 client and ocigc's against the plain-HTTP moto endpoint."""
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    env.update(extra)
    return env


def run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=child_env())


class Registry:
    def __init__(self, bucket, workdir):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = os.path.join(workdir, "registry.yml")
        with open(config, "w") as f:
            f.write(
                f"""version: 0.1
log:
  level: warn
storage:
  s3:
    accesskey: testing
    secretkey: testing
    region: us-east-1
    regionendpoint: {ENDPOINT}
    bucket: {bucket}
    secure: false
    v4auth: true
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.host}
"""
            )
        self.log = open(os.path.join(workdir, "registry.log"), "w")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", config], stdout=self.log, stderr=subprocess.STDOUT,
            env=child_env(),
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"docker-registry did not start (see {self.log.name})")
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def push(self, layout, tag, repo, all_images=False):
        args = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false"]
        if all_images:
            args.append("--all")
        r = run(args + [f"oci:{layout.path}:{tag}", f"docker://{self.host}/{repo}:{tag}"])
        if r.returncode != 0:
            raise SystemExit(f"skopeo push {repo}:{tag} failed: {r.stderr}")

    def pull(self, repo, tag, dest):
        r = run(
            ["skopeo", "--insecure-policy", "copy", "--all", "--src-tls-verify=false",
             f"docker://{self.host}/{repo}:{tag}", f"oci:{dest}:{tag}"]
        )
        return r.returncode == 0, r.stderr.strip()

    def delete_manifest(self, repo, tag):
        url = f"http://{self.host}/v2/{repo}/manifests/{tag}"
        req = urllib.request.Request(url, method="HEAD", headers={"Accept": OCI_MANIFEST})
        d = urllib.request.urlopen(req, timeout=10).headers["Docker-Content-Digest"]
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{d}", method="DELETE")
        urllib.request.urlopen(req, timeout=10)
        return d


def ocigc(bucket, *args):
    cmd = [OCIGC, *args, "--bucket", f"s3://{bucket}", "--s3-path-style",
           "--layout", "distribution", "--report", "-"]
    env = child_env(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID="testing",
                    AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        report = None
    return r.returncode, report, r.stderr


def keys(s3, bucket):
    out = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def data_key(d):
    hexd = d.split(":")[1]
    return f"{V2}/blobs/sha256/{hexd[:2]}/{hexd}/data"


def deleted_keys(report):
    return {d["key"] for r in report["repositories"] for d in r["deleted"]}


def main():
    s3 = boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"real-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    work = tempfile.mkdtemp(prefix="ocigc-real-")
    reg = Registry(bucket, work)
    try:
        scenario(s3, bucket, reg, work)
    finally:
        reg.stop()


def scenario(s3, bucket, reg, work):
    lay = Layout(os.path.join(work, "layout"))
    base = lay.layer("etc/base", b"shared base layer\n" * 100)
    imgs = {
        "app-v1": lay.image([base, lay.layer("app", b"app v1\n")]),
        "app-old": lay.image([base, lay.layer("app", b"app old\n")]),
        "app-new": lay.image([base, lay.layer("app", b"app new\n")]),
        "app-tmp": lay.image([base, lay.layer("app", b"app tmp\n")]),
        "amd": lay.image([base, lay.layer("bin", b"amd64 binary\n")], "amd64"),
        "arm": lay.image([base, lay.layer("bin", b"arm64 binary\n")], "arm64"),
        "tools": lay.image([base, lay.layer("tools", b"tools\n")]),
        "edge": lay.image([base, lay.layer("edge", b"edge\n")]),
        "solo": lay.image([lay.layer("solo", b"only in other/solo\n")]),
    }
    multi = lay.multi([("amd64", imgs["amd"]), ("arm64", imgs["arm"])])
    for tag in imgs:
        lay.tag(tag, imgs[tag])
    lay.tag("multi", multi)

    pushes = [
        ("team/app", "app-v1"), ("team/app", "app-tmp"),
        ("team/app/tools", "tools"), ("team/app-edge", "edge"), ("other/solo", "solo"),
    ]
    for repo, tag in pushes:
        reg.push(lay, tag, repo)
    reg.push(lay, "multi", "team/app", all_images=True)
    # `stable` first names the old image, then the new one: the old one is left untagged.
    lay.tag("stable", imgs["app-old"])
    reg.push(lay, "stable", "team/app")
    lay.index = [e for e in lay.index if e["annotations"]["org.opencontainers.image.ref.name"] != "stable"]
    lay.tag("stable", imgs["app-new"])
    reg.push(lay, "stable", "team/app")
    # Deleted through the registry API: its revision and tag go, its blobs stay behind.
    tmp_digest = reg.delete_manifest("team/app", "app-tmp")
    check(tmp_digest == imgs["app-tmp"]["digest"], "registry deleted the app-tmp manifest")
    tags = {
        "team/app": ["app-v1", "multi", "stable"],
        "team/app/tools": ["tools"],
        "team/app-edge": ["edge"],
        "other/solo": ["solo"],
    }
    before = keys(s3, bucket)
    check(all(data_key(d) in before for d in imgs["app-tmp"]["layers"]), "pushed blobs are in the bucket")

    # 1. Default: every revision is a root; only app-tmp's own blobs are garbage.
    dry_code, dry, _ = ocigc(bucket, "gc", "--grace", "0s", "--delay", "0s", "--dry-run")
    code, report, err = ocigc(bucket, "gc", "--grace", "0s", "--delay", "0s")
    check(code == 0 and report is not None, "gc exit 0", f"{code}: {err[-500:]}")
    after = keys(s3, bucket)
    tmp_own = {data_key(imgs["app-tmp"]["digest"]), data_key(imgs["app-tmp"]["layers"][1]),
               data_key(imgs["app-tmp"]["layers"][2])}
    check(deleted_keys(report) == tmp_own, "gc deleted exactly app-tmp's own blobs",
          sorted(deleted_keys(report)))
    check(dry_code == 0 and deleted_keys(dry) == deleted_keys(report), "dry run listed the same keys")
    check(before - after == tmp_own, "bucket lost exactly those keys")
    pull_all(reg, tags, work, "after gc")

    # 2. --delete-untagged: app-old (tag moved away) goes; the index's children stay.
    code, report, err = ocigc(bucket, "gc", "--grace", "0s", "--delay", "0s", "--delete-untagged")
    check(code == 0, "gc --delete-untagged exit 0", f"{code}: {err[-500:]}")
    gone = deleted_keys(report)
    old_rev = f"{V2}/repositories/team/app/_manifests/revisions/sha256/{imgs['app-old']['digest'].split(':')[1]}/link"
    check(old_rev in gone and data_key(imgs["app-old"]["digest"]) in gone
          and data_key(imgs["app-old"]["layers"][1]) in gone, "untagged app-old and its own layer deleted")
    kept = keys(s3, bucket)
    check(all(data_key(d) in kept for d in [imgs["amd"]["digest"], imgs["arm"]["digest"], multi["digest"]]),
          "multi-arch index children kept")
    check(data_key(base["digest"]) in kept, "shared base layer kept")
    pull_all(reg, tags, work, "after gc --delete-untagged")

    # 3. Whole-repository deletion, then the next gc reclaims what only it used.
    code, report, err = ocigc(bucket, "delete-repo", "other/solo")
    check(code == 0, "delete-repo exit 0", f"{code}: {err[-500:]}")
    left = [k for k in keys(s3, bucket) if k.startswith(f"{V2}/repositories/other/solo/")]
    check(not left, "repository tree removed")
    code, report, err = ocigc(bucket, "gc", "--grace", "0s", "--delay", "0s")
    check(code == 0, "gc after delete-repo exit 0", f"{code}: {err[-500:]}")
    solo_own = {data_key(imgs["solo"]["digest"])} | {data_key(d) for d in imgs["solo"]["layers"]}
    check(deleted_keys(report) == solo_own, "gc reclaimed exactly other/solo's blobs")
    ok, _ = reg.pull("other/solo", "solo", os.path.join(work, "pull-solo"))
    check(not ok, "deleted repository no longer pulls")
    del tags["other/solo"]
    pull_all(reg, tags, work, "after delete-repo")

    # 4. Retention: rules from a config file, a protect file with a registry host; removed
    # tags stop pulling, the trash keeps their images whole, restore brings one back.
    for name in ["pr-1", "pr-2", "v1.0.0", "v1.0.1"]:
        imgs[name] = lay.image([base, lay.layer("app", f"app {name}\n".encode())])
        lay.tag(name, imgs[name])
        reg.push(lay, name, "team/app")
    config = os.path.join(work, "retention.toml")
    with open(config, "w") as f:
        f.write('[[retention]]\nrepos = ["team/app"]\nkeep_tags = ["stable", "multi", "app-v1"]\n'
                'keep_semver = { per = "minor", last = 1 }\nolder_than = "1d"\n')
    protect = os.path.join(work, "protect.txt")
    with open(protect, "w") as f:
        f.write(f"{reg.host}/team/app:pr-2\n")
    args = ["gc", "--config", config, "--protect-file", protect, "--grace", "0s", "--delay", "0s",
            "--delete-untagged", "--clock-offset", "2d"]
    dry_code, dry, err = ocigc(bucket, *args, "--dry-run")
    check(dry_code == 0 and dry is not None, "retention dry run exit 0", f"{dry_code}: {err[-500:]}")
    code, report, err = ocigc(bucket, *args)
    check(code == 0 and report is not None, "retention gc exit 0", f"{code}: {err[-500:]}")

    def removed(r):
        repo = next(x for x in r["repositories"] if x["name"] == "team/app")
        return {t["tag"] for t in repo["retention"]["tags"] if t["decision"] == "remove"}

    check(removed(report) == {"pr-1", "v1.0.0"}, "retention removed exactly pr-1 and v1.0.0",
          sorted(removed(report)))
    check(removed(dry) == removed(report), "retention dry run listed the same tags")
    for t in ["pr-1", "v1.0.0"]:
        ok, _ = reg.pull("team/app", t, os.path.join(work, f"pull-gone-{t}"))
        check(not ok, f"removed tag team/app:{t} no longer pulls")
    kept = keys(s3, bucket)
    check(all(data_key(d) in kept for t in ["pr-1", "v1.0.0"] for d in [imgs[t]["digest"], *imgs[t]["layers"]]),
          "trashed images are whole in the bucket")
    tags["team/app"] += ["pr-2", "v1.0.1"]
    pull_all(reg, tags, work, "after retention")
    r = subprocess.run([OCIGC, "restore", "--bucket", f"s3://{bucket}", "--s3-path-style", "--layout",
                        "distribution", "team/app:pr-1"], capture_output=True, text=True, timeout=120,
                       env=child_env(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID="testing",
                                     AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"))
    check(r.returncode == 0, "restore team/app:pr-1 exit 0", r.stderr[-500:])
    tags["team/app"].append("pr-1")
    pull_all(reg, tags, work, "after restore")
    # Past the trash TTL (7d), without rules: v1.0.0's own blobs go, everything tagged stays.
    code, report, err = ocigc(bucket, "gc", "--grace", "0s", "--delay", "0s", "--delete-untagged",
                              "--clock-offset", "9d")
    check(code == 0, "gc after the trash TTL exit 0", f"{code}: {err[-500:]}")
    gone = deleted_keys(report)
    check(data_key(imgs["v1.0.0"]["digest"]) in gone and data_key(imgs["v1.0.0"]["layers"][1]) in gone,
          "expired v1.0.0 collected", sorted(gone))
    check(data_key(base["digest"]) in keys(s3, bucket), "shared base layer kept")
    pull_all(reg, tags, work, "after the trash TTL")


def pull_all(reg, tags, work, when):
    for repo, ts in tags.items():
        for t in ts:
            dest = os.path.join(work, f"pull-{uuid.uuid4().hex[:8]}")
            ok, err = reg.pull(repo, t, dest)
            check(ok, f"{when}: pull {repo}:{t}", err[-500:])


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"FAIL {e.code}")
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
