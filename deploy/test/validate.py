#!/usr/bin/env python3
"""Validates deploy/ offline; run by scripts/test.sh with the test venv's Python.

- renders the Kustomize base and every overlay with `kubectl kustomize`;
- validates every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: unknown fields are errors); the two prometheus-operator CRDs are checked for their
  required structure instead, and the PrometheusRule's rules go through promtool;
- runs `promtool check rules` and `promtool test rules` (deploy/test/alerts_test.yaml);
- runs the CronJob's exact container args through the ocigc binary (a dry run on an empty
  bucket), and checks the Deployment's `serve` args parse;
- checks the dashboard ConfigMap carries the Grafana sidecar label and valid panel JSON;
- checks every metric the dashboard and the alerts query is in `NAMES` of src/metrics.rs.
Prints one line per check and "N passed, M failed" at the end; exits non-zero on any failure.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
OCIGC = os.path.join(ROOT, "target", "debug", "ocigc")
K8S_VERSION = "1.30.0"
TARGETS = ["base", "overlays/sharded", "overlays/r2"]
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail and not ok else ''}")


def render(target):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(DEPLOY, target)],
                         capture_output=True, text=True)
    check(f"{target}: kustomize renders", out.returncode == 0, out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else []


def validate_crd(target, doc):
    kind = doc["kind"]
    ok = doc.get("apiVersion") == "monitoring.coreos.com/v1" and isinstance(doc.get("spec"), dict)
    if kind == "ServiceMonitor":
        ok = ok and doc["spec"].get("selector", {}).get("matchLabels") and doc["spec"].get("endpoints")
    if kind == "PrometheusRule":
        ok = ok and all(g.get("name") and g.get("rules") for g in doc["spec"].get("groups", []))
    check(f"{target}: {kind}/{doc['metadata']['name']} structure", bool(ok))


def promtool(rule_doc):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "rules.yaml"), "w") as f:
            yaml.safe_dump({"groups": rule_doc["spec"]["groups"]}, f)
        shutil.copy(os.path.join(DEPLOY, "test", "alerts_test.yaml"), tmp)
        for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts_test.yaml"]):
            out = subprocess.run(["promtool", *args], cwd=tmp, capture_output=True, text=True)
            check(f"promtool {' '.join(args[:2])}", out.returncode == 0, out.stdout + out.stderr)


def container(doc):
    spec = doc["spec"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"] if doc["kind"] == "CronJob" else spec["template"]["spec"]
    return pod["containers"][0]


def cronjob_args(target, doc):
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container(doc)["args"]]
    protect = [a for a in args if a.startswith("--protect-file=")]
    check(f"{target}: CronJob protects running images (--protect-file from the init container)",
          len(protect) == 1 and any(c["name"] == "running-images" for c in
                                    doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]))
    with tempfile.TemporaryDirectory() as bucket:
        # The file the init container writes, as `kubectl … jsonpath` lists images.
        sample = os.path.join(bucket, "protect.txt")
        with open(sample, "w") as f:
            f.write("ghcr.io/example/app:1.2\ndocker.io/library/nginx@sha256:" + "0" * 64 + "\n")
        args = [f"--protect-file={sample}" if a.startswith("--protect-file=") else a for a in args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCIGC_")}
        env.update({"OCIGC_BUCKET": bucket, "OCIGC_LOG": "warn"})
        out = subprocess.run([OCIGC, *args, "--dry-run"], env=env, capture_output=True, text=True)
    check(f"{target}: CronJob args accepted by ocigc {' '.join(args)}", out.returncode == 0, out.stderr)


def overlay_effect(target, doc):
    job = doc["spec"]["jobTemplate"]["spec"]
    env = {e["name"]: e.get("value") for e in container(doc)["env"]}
    if target == "overlays/sharded":
        ok = (job.get("completionMode") == "Indexed" and job.get("completions") == 4
              and "--shard=$(JOB_COMPLETION_INDEX)/4" in container(doc)["args"])
        check(f"{target}: CronJob runs 4 indexed shards", ok)
    if target == "overlays/r2":
        check(f"{target}: region is auto", env.get("AWS_REGION") == "auto", str(env))
    if target == "base":
        spec = doc["spec"]
        sc = container(doc)["securityContext"]
        ok = (spec["concurrencyPolicy"] == "Forbid" and "startingDeadlineSeconds" in spec
              and job["activeDeadlineSeconds"] > 5 * 3600 and "--timeout-run=5h" in container(doc)["args"]
              and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"])
        check(f"{target}: CronJob policy, deadlines above --timeout-run, hardened container", ok)


def deployment_args(target, doc):
    args = container(doc)["args"]
    with tempfile.TemporaryDirectory() as bucket:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCIGC_")}
        env.update({"OCIGC_BUCKET": bucket, "OCIGC_LOG": "warn"})
        out = subprocess.run([OCIGC, *args], env=env, capture_output=True, text=True, timeout=60)
    # Parsing succeeded when the only complaint is the token file, absent outside the cluster.
    ok = out.returncode == 2 and "token file" in out.stderr
    check(f"{target}: Deployment args parse", ok, out.stderr)


def metric_names():
    """The `NAMES` list of src/metrics.rs: every metric ocigc exposes."""
    with open(os.path.join(ROOT, "src", "metrics.rs")) as f:
        text = f.read()
    block = re.search(r"pub const NAMES: \[&str; \d+\] = \[(.*?)\];", text, re.S)
    return set(re.findall(r'"(ocigc_[a-z_]+)"', block.group(1))) if block else set()


def known_metrics(what, exprs):
    names = metric_names()
    used = {re.sub(r"_(bucket|sum|count)$", "", m) if m not in names else m
            for e in exprs for m in re.findall(r"ocigc_[a-z_]+", e)}
    unknown = sorted(used - names)
    check(f"{what}: every queried metric is one ocigc exposes", bool(names) and not unknown,
          f"unknown: {unknown}")


def dashboard(target, doc):
    labels = doc["metadata"].get("labels", {})
    check(f"{target}: dashboard ConfigMap has grafana_dashboard=1", labels.get("grafana_dashboard") == "1")
    dash = json.loads(doc["data"]["ocigc-dashboard.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    check(f"{target}: dashboard has {len(dash['panels'])} panels with queries",
          bool(exprs) and all(p["targets"] for p in dash["panels"]))
    known_metrics(f"{target}: dashboard", exprs)


def main():
    for target in TARGETS:
        for doc in render(target):
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind in ("ServiceMonitor", "PrometheusRule"):
                validate_crd(target, doc)
                if kind == "PrometheusRule" and target == "base":
                    promtool(doc)
                    known_metrics(f"{target}: alerts", [r["expr"] for g in doc["spec"]["groups"]
                                                         for r in g["rules"]])
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                check(f"{target}: {kind}/{name} valid for Kubernetes {K8S_VERSION}", True)
            except Exception as e:  # noqa: BLE001 - report any validation failure
                check(f"{target}: {kind}/{name} valid for Kubernetes {K8S_VERSION}", False, str(e)[:500])
            if kind == "CronJob":
                cronjob_args(target, doc)
                overlay_effect(target, doc)
            if kind == "Deployment" and target == "base":
                deployment_args(target, doc)
            if kind == "ConfigMap" and name == "ocigc-dashboard" and target == "base":
                dashboard(target, doc)
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
