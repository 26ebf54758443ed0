#!/usr/bin/env python3
"""Real tools on the `oci` layout: images built with umoci (a multi-arch index among them),
copied into per-repository OCI layouts with skopeo (shared base layers, nested and
prefix-colliding repository names), some tags removed with umoci so garbage exists, each
layout uploaded with rclone as a build pipeline would, then `ocigc gc` on the bucket, then every
repository downloaded back with rclone and every remaining tag inspected and copied with skopeo
(which verifies each blob's digest). Done on moto, on SeaweedFS and on the directory store (the
bucket path itself); all three must delete exactly the same keys.

Usage: oci_tools_e2e.py OCIGC_BINARY
(needs OCIGC_TEST_S3_ENDPOINT and OCIGC_TEST_SEAWEED_ENDPOINT, as scripts/test.sh sets)
Prints one line per check and a closing 'N passed, M failed'.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

OCIGC = sys.argv[1]
ENDPOINTS = {
    "moto": os.environ["OCIGC_TEST_S3_ENDPOINT"],
    "seaweed": os.environ["OCIGC_TEST_SEAWEED_ENDPOINT"],
}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF = "org.opencontainers.image.ref.name"

passed, failed = 0, 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}", flush=True)
    else:
        failed += 1
        print(f"FAIL {what}: {detail}", flush=True)


def child_env(work):
    """Children talk to loopback only: no CA bundle meant for other traffic (rclone refuses
    to start with AWS_CA_BUNDLE set), no metadata probes, and one rclone S3 remote per server,
    configured entirely from the environment."""
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["RCLONE_CONFIG"] = os.path.join(work, "rclone.conf")
    for name, endpoint in ENDPOINTS.items():
        p = f"RCLONE_CONFIG_{name.upper()}_"
        env.update({
            p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENDPOINT": endpoint,
            p + "ACCESS_KEY_ID": "testing", p + "SECRET_ACCESS_KEY": "testing",
            p + "REGION": "us-east-1", p + "FORCE_PATH_STYLE": "true",
        })
    return env


ENV = {}


def run(*args, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd)


def must(*args, cwd=None):
    r = run(*args, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {r.stderr.strip()[-800:]}")
    return r.stdout


def skopeo(*args):
    return run("skopeo", "--insecure-policy", *args)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def blob_path(layout, digest):
    return os.path.join(layout, "blobs", *digest.split(":", 1))


def tags_of(layout):
    return {m["annotations"][REF]: m for m in read_json(os.path.join(layout, "index.json"))["manifests"] or []
            if REF in m.get("annotations", {})}


def reachable(layout):
    """Digests reachable from a layout's index.json, walked here independently of ocigc."""
    stack = list(read_json(os.path.join(layout, "index.json"))["manifests"] or [])
    seen = set()
    while stack:
        d = stack.pop()
        if d["digest"] in seen:
            continue
        seen.add(d["digest"])
        if d["mediaType"] in (OCI_INDEX, OCI_MANIFEST):
            doc = read_json(blob_path(layout, d["digest"]))
            stack.extend(doc.get("manifests") or [])
            stack.extend(doc.get("layers") or [])
            if "config" in doc:
                stack.append(doc["config"])
    return seen


def build(work):
    """Images built with umoci in one build layout. Every image derives from `base`, so its
    layer is shared; each image's last layer is its own."""
    build = os.path.join(work, "build")
    src = os.path.join(work, "src")
    os.makedirs(src)
    must("umoci", "init", "--layout", build)
    must("umoci", "new", "--image", f"{build}:scratch")

    def insert(image, tag, name, content):
        path = os.path.join(src, name)
        with open(path, "w") as f:
            f.write(content)
        must("umoci", "insert", "--rootless", "--image", f"{build}:{image}", "--tag", tag,
             path, f"/{name}")

    insert("scratch", "base", "base.txt", "shared base layer\n" * 2000)
    for tag in ["app-v1", "app-v2", "app-old", "app-rc", "tools", "tools-tmp", "edge", "bin-amd64",
                "bin-arm64"]:
        insert("base", tag, f"{tag}.txt", f"content of {tag}\n")
    for tag in ["solo", "solo-old"]:
        insert("scratch", tag, f"{tag}.txt", f"content of {tag}\n")
    must("umoci", "config", "--image", f"{build}:bin-arm64", "--architecture", "arm64",
         "--config.cmd", "/bin-arm64.txt")
    must("umoci", "config", "--image", f"{build}:bin-amd64", "--architecture", "amd64",
         "--config.cmd", "/bin-amd64.txt")
    # umoci has no index command: the multi-arch index over its two per-arch manifests is
    # written by hand and tagged in the build layout's index.json.
    tags = tags_of(build)
    entries = []
    for arch in ["amd64", "arm64"]:
        e = {k: tags[f"bin-{arch}"][k] for k in ("mediaType", "digest", "size")}
        e["platform"] = {"architecture": arch, "os": "linux"}
        entries.append(e)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    with open(blob_path(build, digest), "wb") as f:
        f.write(body)
    index = read_json(os.path.join(build, "index.json"))
    index["manifests"].append({"mediaType": OCI_INDEX, "digest": digest, "size": len(body),
                               "annotations": {REF: "multi"}})
    with open(os.path.join(build, "index.json"), "w") as f:
        json.dump(index, f)
    return build


def own_layer(build, tag):
    """The layer an image added on top of its parent: its last one."""
    m = read_json(blob_path(build, tags_of(build)[tag]["digest"]))
    return m["layers"][-1]["digest"]


def image_digests(build, tag):
    """Manifest, config and every layer of one image of the build layout."""
    d = tags_of(build)[tag]["digest"]
    m = read_json(blob_path(build, d))
    return {d, m["config"]["digest"], *(l["digest"] for l in m["layers"])}


# Repository -> [(tag in the repository, tag in the build layout)], copied in this order.
PUSHES = {
    "team/app": [("v1", "app-v1"), ("v2", "app-v2"), ("old", "app-old"), ("stable", "app-rc"),
                 ("stable", "app-v2"), ("multi", "multi")],
    "team/app/tools": [("tools", "tools"), ("tmp", "tools-tmp")],
    "team/app-edge": [("edge", "edge")],
    "other/solo": [("solo", "solo"), ("old", "solo-old")],
}
# Removed with umoci after the copies: their images become garbage. (When `stable` moves from
# app-rc to app-v2, skopeo keeps app-rc's descriptor in index.json without a name: a root still.)
UNTAG = [("team/app", "old"), ("team/app/tools", "tmp"), ("other/solo", "old")]


def stage(work, build):
    """One OCI layout per repository, as skopeo writes them; nested names nest on disk."""
    stage = os.path.join(work, "stage")
    for repo, copies in PUSHES.items():
        os.makedirs(os.path.join(stage, repo), exist_ok=True)
        for tag, src in copies:
            extra = ["--all"] if src == "multi" else []
            must("skopeo", "--insecure-policy", "copy", *extra, f"oci:{build}:{src}",
                 f"oci:{os.path.join(stage, repo)}:{tag}")
    index = read_json(os.path.join(stage, "team/app", "index.json"))["manifests"]
    stable = [m["digest"] for m in index if m.get("annotations", {}).get(REF) == "stable"]
    unnamed = [m["digest"] for m in index if REF not in m.get("annotations", {})]
    check(stable == [tags_of(build)["app-v2"]["digest"]] and unnamed == [tags_of(build)["app-rc"]["digest"]],
          "skopeo moved the stable tag and left app-rc's descriptor unnamed", index)
    for repo, tag in UNTAG:
        must("umoci", "rm", "--image", f"{os.path.join(stage, repo)}:{tag}")
    return stage


def expected_garbage(stage):
    """Every blob file of each staged repository that its index.json does not reach."""
    out = set()
    for repo in PUSHES:
        layout = os.path.join(stage, repo)
        keep = reachable(layout)
        for name in os.listdir(os.path.join(layout, "blobs", "sha256")):
            if f"sha256:{name}" not in keep:
                out.add(f"{repo}/blobs/sha256/{name}")
    return out


class Target:
    """A bucket on one of the S3 servers through rclone, or a directory used as the bucket."""

    def __init__(self, kind, work, name):
        self.kind = kind
        if kind == "dir":
            self.remote = os.path.join(work, f"dir-bucket-{name}")
            self.args = ["--bucket", self.remote]
            self.env = {}
        else:
            bucket = f"oci-e2e-{uuid.uuid4().hex[:12]}"
            self.remote = f"{kind}:{bucket}"
            self.args = ["--bucket", f"s3://{bucket}", "--s3-path-style"]
            self.env = {"AWS_ENDPOINT_URL": ENDPOINTS[kind], "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}

    def upload(self, stage):
        must("rclone", "mkdir", self.remote)
        must("rclone", "copy", stage, self.remote)

    def keys(self):
        # The directory store keeps its lock and metadata in `.ocigc-tmp/` and `.ocigc-meta/`,
        # which are no objects of the bucket; the incremental cache a real run writes under
        # `_ocigc/cache/` is ocigc's own state, not the registry's.
        listed = must("rclone", "lsf", "-R", "--files-only", self.remote).split()
        return {k for k in listed
                if not k.startswith((".ocigc-tmp/", ".ocigc-meta/", "_ocigc/cache/"))}

    def download(self, repo, dest):
        must("rclone", "copy", f"{self.remote}/{repo}", dest)

    def gc(self, *extra):
        cmd = [OCIGC, "gc", *self.args, "--grace", "0s", "--delay", "0s", "--report", "-", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, **self.env})
        try:
            report = json.loads(r.stdout)
        except ValueError:
            report = None
        return r.returncode, report, r.stderr


def deleted_keys(report):
    return {d["key"] for r in report["repositories"] for d in r["deleted"]} if report else set()


def scenario(kind, work, build, stage, garbage):
    t = Target(kind, work, "main")
    t.upload(stage)
    before = t.keys()
    check(garbage <= before and len(before) > len(garbage), f"{kind}: uploaded layouts with garbage",
          f"{len(before)} keys")

    dry_code, dry, err = t.gc("--dry-run")
    check(dry_code == 0 and t.keys() == before, f"{kind}: dry run exit 0, bucket untouched",
          f"{dry_code}: {err[-500:]}")
    code, report, err = t.gc()
    check(code == 0 and report is not None, f"{kind}: gc exit 0", f"{code}: {err[-500:]}")
    gone = deleted_keys(report)
    check(gone == garbage, f"{kind}: gc deleted exactly the unreachable blobs",
          f"extra {sorted(gone - garbage)}, missed {sorted(garbage - gone)}")
    check(deleted_keys(dry) == gone, f"{kind}: dry run planned the same keys")
    after = t.keys()
    check(before - after == gone and after <= before, f"{kind}: bucket lost exactly those keys",
          sorted(before - after ^ gone))

    untagged = {("team/app", "app-old"), ("team/app/tools", "tools-tmp"), ("other/solo", "solo-old")}
    for repo, tag in sorted(untagged):
        key = f"{repo}/blobs/{own_layer(build, tag).replace(':', '/')}"
        check(key not in after, f"{kind}: {repo}: own layer of untagged {tag} deleted")
    rc = {f"team/app/blobs/{d.replace(':', '/')}" for d in image_digests(build, "app-rc")}
    check(rc <= after, f"{kind}: team/app: app-rc, unnamed in index.json, kept whole")
    base = own_layer(build, "base").replace(":", "/")
    for repo in ["team/app", "team/app/tools", "team/app-edge"]:
        check(f"{repo}/blobs/{base}" in after, f"{kind}: {repo}: shared base layer kept")

    code, again, err = t.gc()
    check(code == 0 and not deleted_keys(again), f"{kind}: second gc deletes nothing",
          f"{code}: {sorted(deleted_keys(again))} {err[-300:]}")

    for repo in PUSHES:
        dest = os.path.join(work, f"{kind}-down", repo)
        t.download(repo, dest)
        for tag, entry in sorted(tags_of(os.path.join(stage, repo)).items()):
            r = skopeo("inspect", "--raw", f"oci:{dest}:{tag}")
            got = "sha256:" + hashlib.sha256(r.stdout.encode()).hexdigest()
            check(r.returncode == 0 and got == entry["digest"], f"{kind}: inspect {repo}:{tag}",
                  r.stderr.strip()[-300:])
            extra = ["--all"] if entry["mediaType"] == OCI_INDEX else []
            out = os.path.join(work, f"copy-{uuid.uuid4().hex[:8]}")
            r = skopeo("copy", *extra, f"oci:{dest}:{tag}", f"dir:{out}")
            check(r.returncode == 0, f"{kind}: copy {repo}:{tag} (digests verified)",
                  r.stderr.strip()[-300:])
    arm = skopeo("--override-arch", "arm64", "inspect",
                 f"oci:{os.path.join(work, f'{kind}-down', 'team/app')}:multi")
    check(arm.returncode == 0 and json.loads(arm.stdout or "{}").get("Architecture") == "arm64",
          f"{kind}: multi resolves to its arm64 image", arm.stderr.strip()[-300:])
    return gone


def emptied_by_umoci(kind, work, build):
    """`umoci rm` of a layout's last tag writes `"manifests": null`, which Go (and so every
    registry) reads as an empty list: the repository has no images. Losing all its blobs is
    more than the default blast-radius budget allows, so the first run refuses it (exit 3)
    while it collects the neighbour's garbage; a run with `--max-delete-fraction 1` collects
    all its blobs; the layout files stay."""
    stage = os.path.join(work, f"{kind}-emptied")
    for repo in ["empty/app", "ok/app"]:
        layout = os.path.join(stage, repo)
        os.makedirs(layout)
        must("skopeo", "--insecure-policy", "copy", f"oci:{build}:solo", f"oci:{layout}:solo")
        must("skopeo", "--insecure-policy", "copy", f"oci:{build}:solo-old", f"oci:{layout}:old")
        must("umoci", "rm", "--image", f"{layout}:old")
    must("umoci", "rm", "--image", f"{os.path.join(stage, 'empty/app')}:solo")
    check(read_json(os.path.join(stage, "empty/app/index.json"))["manifests"] is None,
          f"{kind}: umoci wrote a null manifests list")
    t = Target(kind, work, "emptied")
    t.upload(stage)
    before = t.keys()
    solo_old = {f"ok/app/blobs/{d.replace(':', '/')}" for d in image_digests(build, "solo-old")
                - image_digests(build, "solo")}
    emptied = {k for k in before if k.startswith("empty/app/blobs/")}
    code, refused, err = t.gc()
    status = {r["name"]: r["status"] for r in (refused or {}).get("repositories", [])}
    check(code == 3 and status.get("empty/app") == "budget_exceeded"
          and deleted_keys(refused) == solo_old and emptied <= t.keys(),
          f"{kind}: the default budget refuses to empty a repository, the neighbour is collected",
          f"{code}: {status} {sorted(deleted_keys(refused))} {err[-300:]}")
    code, report, err = t.gc("--max-delete-fraction", "1")
    gone = deleted_keys(refused) | deleted_keys(report)
    check(code == 0 and gone == solo_old | emptied,
          f"{kind}: the emptied repository's blobs and the neighbour's garbage are collected",
          f"{code}: {sorted(gone)} {err[-300:]}")
    check({"empty/app/index.json", "empty/app/oci-layout"} <= t.keys(),
          f"{kind}: the emptied repository's layout files stay")


def main():
    work = tempfile.mkdtemp(prefix="ocigc-oci-tools-")
    ENV.update(child_env(work))
    open(ENV["RCLONE_CONFIG"], "w").close()
    try:
        build_layout = build(work)
        staged = stage(work, build_layout)
        garbage = expected_garbage(staged)
        check(len(garbage) >= 9, "staged layouts hold garbage", sorted(garbage))
        deleted = {}
        for kind in ["dir", "moto", "seaweed"]:
            deleted[kind] = scenario(kind, work, build_layout, staged, garbage)
            emptied_by_umoci(kind, work, build_layout)
        check(deleted["dir"] == deleted["moto"] == deleted["seaweed"],
              "directory, moto and SeaweedFS deleted the same keys")
        # The check above is only as good as skopeo's verification: a flipped bit in a kept
        # layer must make the copy fail.
        victim = os.path.join(work, "dir-down", "team/app-edge")
        layer = own_layer(build_layout, "edge")
        with open(blob_path(victim, layer), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        r = skopeo("copy", f"oci:{victim}:edge", f"dir:{os.path.join(work, 'corrupt-copy')}")
        check(r.returncode != 0 and "digest" in r.stderr.lower(),
              "control: skopeo refuses a layer whose digest does not match", r.stderr[-300:])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"FAIL {e.code}")
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
