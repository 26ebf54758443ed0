#!/usr/bin/env python3
"""Writes examples/bucket: a small directory-as-bucket in the `oci` layout.

Deterministic (same bytes every time), so the committed copy can be checked against it.
Repositories: library/alpine (multi-arch index, a second tag, an unlisted signature referrer,
garbage), library/alpine-edge (prefix neighbour of library/alpine), team/app and the nested
team/app/tools (each with garbage), plus a README that is not a blob and is never deleted.
"""
import hashlib
import json
import os
import filecmp
import shutil
import sys
import tempfile

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bucket")
ROOT = HERE
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def put(repo, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(ROOT, repo, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def doc(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image(repo, name, arch="amd64", extra_layers=()):
    config = put(repo, doc({"architecture": arch, "os": "linux", "config": {"Cmd": [name]}}))
    layers = [put(repo, f"layer {name} {arch}".encode())] + [put(repo, l) for l in extra_layers]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config},
        "layers": [{"mediaType": OCI_LAYER, **l} for l in layers],
    }
    return {"mediaType": OCI_MANIFEST, **put(repo, doc(manifest)), "platform": {"architecture": arch, "os": "linux"}}


def layout(repo, tagged):
    base = os.path.join(ROOT, repo)
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "oci-layout"), "wb") as f:
        f.write(doc({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    for tag, desc in tagged:
        d = dict(desc)
        d.pop("platform", None)
        if tag:
            d["annotations"] = {"org.opencontainers.image.ref.name": tag}
        manifests.append(d)
    with open(os.path.join(base, "index.json"), "wb") as f:
        f.write(doc({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))


def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def check():
    """Exit non-zero if the committed bucket differs from what this script writes."""
    global ROOT
    with tempfile.TemporaryDirectory() as tmp:
        ROOT = tmp
        write()
        want, have = files(tmp), files(HERE)
        if want != have:
            sys.exit(f"examples/bucket differs: missing {sorted(set(want) - set(have))}, "
                     f"extra {sorted(set(have) - set(want))}")
        changed = [f for f in want if not filecmp.cmp(os.path.join(tmp, f), os.path.join(HERE, f), shallow=False)]
        if changed:
            sys.exit(f"examples/bucket differs in {changed}")
    print(f"examples/bucket matches ({len(want)} files)")
    return 0


def main():
    return check() if sys.argv[1:] == ["--check"] else write()


def write():
    shutil.rmtree(ROOT, ignore_errors=True)
    shared = b"shared base layer"

    # library/alpine: 3.19 is a multi-arch index, 3.18 a plain image.
    amd = image("library/alpine", "alpine-3.19", "amd64", [shared])
    arm = image("library/alpine", "alpine-3.19", "arm64", [shared])
    idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd, arm]}
    idx_desc = {"mediaType": OCI_INDEX, **put("library/alpine", doc(idx))}
    old = image("library/alpine", "alpine-3.18", "amd64", [shared])
    # A signature that refers to the 3.19 index and is stored only as a blob: kept.
    sig_layer = put("library/alpine", b"signature payload")
    put("library/alpine", doc({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", **put("library/alpine", b"{}")},
        "layers": [{"mediaType": "application/vnd.example.signature.v1", **sig_layer}],
        "subject": {"mediaType": OCI_INDEX, "digest": idx_desc["digest"], "size": idx_desc["size"]},
    }))
    # Garbage: an image nobody tags any more.
    image("library/alpine", "alpine-3.17", "amd64")
    layout("library/alpine", [("3.19", idx_desc), ("3.18", old)])

    # library/alpine-edge: a prefix neighbour with one garbage layer.
    edge = image("library/alpine-edge", "edge")
    put("library/alpine-edge", b"orphaned edge layer")
    layout("library/alpine-edge", [("latest", edge)])

    # team/app and the nested team/app/tools.
    app = image("team/app", "app")
    put("team/app", b"orphaned app layer")
    layout("team/app", [("latest", app)])
    with open(os.path.join(ROOT, "team/app/README"), "wb") as f:
        f.write(b"Not a blob: ocigc never deletes this file.\n")
    tools = image("team/app/tools", "tools")
    put("team/app/tools", b"orphaned tools layer")
    layout("team/app/tools", [("v1", tools), (None, image("team/app/tools", "untagged-but-rooted"))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
