"""The Helm chart, proved without a cluster (run by scripts/test).

1. It lints (strict) and renders with the real Helm library
   (helm-python-sdk) for every values file in helm/correu/ci/, and every
   rendered object validates, strictly, against the Kubernetes schemas of
   two versions (kubernetes-validate); the CRDs it may render (KEDA,
   Prometheus Operator) are checked for their required fields.
2. Every pod follows the rules: non-root, read-only root filesystem, all
   capabilities dropped, requests and limits, probes on the health port,
   a grace period longer than the drain.
3. A values file with a wrong type fails with a message naming the value.
4. What must be given is asked for by name at install time: RabbitMQ,
   a shared volume for several storage pods, accounts for Dovecot; a
   misspelt Correu setting under `config` is refused.
5. The rendered ConfigMap passes `correu check-config` for every role.

The pods themselves run in test_pods.py, as a kubelet runs them.

    .venv/bin/python helm/tests/test_chart.py      (CHART_TEST_CORREU: the binary)
"""

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request

import helm_python
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "correu")
CI = os.path.join(CHART, "ci")
KUBE_VERSIONS = ["1.27.0", "1.33.0"]
BIN = os.environ.get("CHART_TEST_CORREU", os.path.join(ROOT, "target", "debug", "correu"))

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", file=sys.stderr)


def values_files():
    return sorted(f for f in os.listdir(CI) if f.endswith("-values.yaml"))


def load_values(name):
    with open(os.path.join(CI, name)) as f:
        return yaml.safe_load(f) or {}


def render(values):
    cfg = helm_python.Config(namespace="mail", storage_driver="memory")
    rel = cfg.install(CHART, "correu", values, dry_run="client")
    docs = [d for d in yaml.safe_load_all(rel["manifest"]) if d]
    return docs, rel.get("notes", "")


# CRDs the chart renders when asked, with the fields they must have.
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): [["spec", "scaleTargetRef", "name"], ["spec", "triggers"]],
    ("keda.sh/v1alpha1", "TriggerAuthentication"): [["spec", "secretTargetRef"]],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): [["spec", "selector"], ["spec", "endpoints"]],
}


def dig(doc, path):
    for p in path:
        if not isinstance(doc, dict) or p not in doc:
            return None
        doc = doc[p]
    return doc


def validate(docs, name):
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        ident = f"{name}: {d['kind']}/{d['metadata']['name']}"
        if key in CRDS:
            for path in CRDS[key]:
                check(dig(d, path), f"{ident} lacks {'.'.join(path)}")
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                check(False, f"{ident} is invalid for Kubernetes {v}: {str(e).splitlines()[0]}")
            except kubernetes_validate.SchemaNotFoundError:
                check(False, f"{ident}: no schema for {key} in Kubernetes {v}")


def pods(docs):
    for d in docs:
        if d["kind"] == "Deployment":
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def d_by_name(docs, name):
    return next(d for d in docs if d["metadata"]["name"] == name and d["kind"] in ("Deployment", "StatefulSet"))


def rules(docs, values, name):
    drain = (values.get("ingress") or {}).get("drainSeconds", 60)
    for dep, spec in pods(docs):
        ident = f"{name}: {dep}"
        sc = spec.get("securityContext", {})
        check(sc.get("runAsNonRoot") is True, f"{ident}: pod not runAsNonRoot")
        check(spec.get("automountServiceAccountToken") is False, f"{ident}: token mounted")
        check(spec.get("enableServiceLinks") is False, f"{ident}: service links on")
        notes = (d_by_name(docs, dep)["spec"]["template"]["metadata"].get("annotations") or {})
        if dep.endswith(("-ingress", "-delivery", "-storage", "-webhook")):
            for sum_ in ("checksum/config", "checksum/secrets"):
                check(sum_ in notes, f"{ident}: no {sum_} annotation")
        for c in spec["containers"]:
            cid = f"{ident}/{c['name']}"
            csc = c.get("securityContext", {})
            check(csc.get("allowPrivilegeEscalation") is False, f"{cid}: privilege escalation")
            check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{cid}: capabilities not all dropped")
            if c["name"] in ("ingress", "delivery", "storage", "webhook"):
                check(csc.get("readOnlyRootFilesystem") is True, f"{cid}: root filesystem writable")
                res = c.get("resources", {})
                check(res.get("requests") and res.get("limits"), f"{cid}: requests and limits")
                for probe in ("livenessProbe", "readinessProbe"):
                    p = c.get(probe, {}).get("httpGet", {})
                    check(p.get("port") == "health", f"{cid}: {probe} not on the health port")
                check(c["args"][0] == c["name"], f"{cid}: runs {c['args']}")
        if dep.endswith("-ingress"):
            check(spec["terminationGracePeriodSeconds"] > drain,
                  f"{ident}: grace {spec['terminationGracePeriodSeconds']} not above the drain {drain}")
        if dep.endswith("-delivery"):
            check(spec["terminationGracePeriodSeconds"] > 30, f"{ident}: grace not above delivery's 30 s drain")


def pdbs(docs, name):
    """No PodDisruptionBudget may block a node drain: one pod of each role
    may always go."""
    for d in docs:
        if d["kind"] != "PodDisruptionBudget":
            continue
        spec = d["spec"]
        target = next(w for w in docs if w["kind"] == "Deployment"
                      and w["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"])
        hpa = [h for h in docs if h["kind"] == "HorizontalPodAutoscaler"
               and h["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]]
        replicas = hpa[0]["spec"]["minReplicas"] if hpa else target["spec"].get("replicas", 1)
        if "minAvailable" in spec:
            check(isinstance(spec["minAvailable"], int) and spec["minAvailable"] < replicas
                  or str(spec["minAvailable"]).endswith("%"),
                  f"{name}: {d['metadata']['name']} minAvailable {spec['minAvailable']} blocks drains "
                  f"with {replicas} replicas")
        else:
            check(spec.get("maxUnavailable", 0) not in (0, "0%"), f"{name}: {d['metadata']['name']} blocks drains")


def kinds(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d["metadata"]["name"])
    return out


def per_file_expectations(name, docs, notes):
    k = kinds(docs)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["correu.toml"]
    check("\n" in config and "e+" not in config, f"{name}: config has float notation:\n{config}")
    if name == "production-values.yaml":
        check("ScaledObject" in k, f"{name}: KEDA ScaledObject")
        check(not any(n.endswith("-delivery") for n in k.get("HorizontalPodAutoscaler", [])),
              f"{name}: KEDA replaces delivery's HPA")
        check(len(k.get("NetworkPolicy", [])) == 4, f"{name}: four NetworkPolicies (with the webhook's)")
        webhook = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-webhook"))
        wspec = webhook["spec"]["template"]["spec"]
        check(wspec["containers"][0]["args"][:1] == ["webhook"], f"{name}: the webhook runs correu webhook")
        check(any(v.get("secret", {}).get("secretName") == "correu-webhook" for v in wspec["volumes"]),
              f"{name}: the webhook's signing Secret is mounted")
        check('secret_file = "/etc/correu/webhook/secret"' in config
              and "https://hooks.example.org/correu" in config, f"{name}: [webhook] in the config:\n{config}")
        check("ServiceMonitor" in k, f"{name}: ServiceMonitor")
        storage = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-storage"))
        check(storage["spec"]["strategy"].get("type") != "Recreate", f"{name}: RWX storage rolls")
        check(len(storage["spec"]["template"]["spec"]["containers"]) == 2, f"{name}: Dovecot beside storage")
        ingress = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-ingress"))
        env = {e["name"]: e for e in ingress["spec"]["template"]["spec"]["containers"][0]["env"]}
        check(env["CORREU_QUEUE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "correu-rabbitmq",
              f"{name}: queue URL from the Secret")
        check(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.monitoring:4317",
              f"{name}: OTLP endpoint")
        ports = [p["name"] for p in ingress["spec"]["template"]["spec"]["containers"][0]["ports"]]
        check(ports == ["smtp", "submission", "submissions", "health"], f"{name}: ports {ports}")
        check('proxy_networks = ["10.0.0.0/24"]' in config, f"{name}: PROXY networks in the config:\n{config}")
        check("max_message_size = 52428800" in config, f"{name}: integers stay integers:\n{config}")
        check('[delivery.dkim."example.net"]' in config or "[delivery.dkim.\"example.net\"]" in config
              or "example.net" in config, f"{name}: DKIM for example.net")
    if name == "minimal-values.yaml":
        check(len(k.get("Deployment", [])) == 5, f"{name}: three services and RabbitMQ and Redis: {k}")
        check("HorizontalPodAutoscaler" not in k, f"{name}: no HPA")
        check("WARNING" not in notes, f"{name}: notes warn: {notes}")
    if name == "default-values.yaml":
        check(set(k.get("HorizontalPodAutoscaler", [])) == {"correu-ingress", "correu-delivery"}, f"{name}: HPAs")
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "correu-ingress")
        check(svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local",
              f"{name}: a LoadBalancer keeping client addresses")


def lint_and_render():
    for name in values_files():
        values = load_values(name)
        for v in KUBE_VERSIONS:
            r = helm_python.lint(CHART, values, strict=True, kube_version=v)
            check(not r["errors"], f"{name}: lint at {v}: {r['errors']}")
        docs, notes = render(values)
        validate(docs, name)
        rules(docs, values, name)
        pdbs(docs, name)
        per_file_expectations(name, docs, notes)
        config_for_every_role(docs, name)
        print(f"ok: {name}: {len(docs)} objects, lint and schemas at {', '.join(KUBE_VERSIONS)}")


def config_for_every_role(docs, name):
    """The ConfigMap's correu.toml is what each role accepts (files the pod
    mounts are the pod runner's to check)."""
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"))
    work = tempfile.mkdtemp(prefix="correu-chart-")
    try:
        path = os.path.join(work, "correu.toml")
        with open(path, "w") as f:
            f.write(config["data"]["correu.toml"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORREU_")}
        env["CORREU_QUEUE_URL"] = "amqp://u:p@rabbitmq:5672/%2f"
        st = subprocess.run([BIN, "check-config", path, "--role", "admin"], capture_output=True, text=True, env=env)
        check(st.returncode == 0, f"{name}: the rendered correu.toml is valid: {st.stdout}{st.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_error(values):
    """What `helm install` says about `values` (None: it would install)."""
    try:
        cfg = helm_python.Config(namespace="mail", storage_driver="memory")
        cfg.install(CHART, "correu", values, dry_run="client")
        return None
    except helm_python.HelmError as e:
        return str(e)


def required_values():
    rabbit = {"rabbitmq": {"url": "amqp://u:p@rabbitmq:5672/%2f"}}
    for values, needles in [
        ({}, ["rabbitmq.existingSecret", "rabbitmq.url"]),
        ({**rabbit, "storage": {"replicas": 2}}, ["storage.replicas", "ReadWriteMany"]),
        ({**rabbit, "storage": {"dovecot": {"enabled": True}}}, ["accounts.existingSecret"]),
        ({**rabbit, "config": {"smtp": {"max_recipents": 5}}}, ["max_recipents"]),
        ({**rabbit, "config": {"smpt": {}}}, ["smpt"]),
        ({**rabbit, "webhook": {"enabled": True}}, ["webhook.urls"]),
    ]:
        message = install_error(values)
        check(message is not None and all(n in message for n in needles),
              f"helm install with {values} is refused naming {needles}: {message}")
        print(f"ok: {values} refused: {(message or '')[:140]}")
    check(install_error({**rabbit, "config": {"smtp": {"max_recipients": 5, "drain_delay": "5s"}}}) is None,
          "real Correu settings under config install")


def checksums():
    """A setting rolls the pods of the roles that read it, and no others."""
    base = {"rabbitmq": {"url": "amqp://u:p@rabbitmq:5672/%2f"}}

    def sums(values):
        docs, _ = render(values)
        return {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in docs if d["kind"] == "Deployment"}
    before = sums(base)
    for change, rolls in [
        ({"config": {"delivery": {"concurrency": 7}}}, {"delivery"}),
        ({"config": {"smtp": {"max_recipients": 7}}}, {"ingress"}),
        ({"config": {"storage": {"default_quota": "1G"}}}, {"storage"}),
        ({"config": {"smtp": {"max_message_size": 1000000}}}, {"ingress", "storage"}),
        ({"domains": ["example.net"]}, {"ingress", "delivery", "storage"}),
        # Delivery publishes events for the webhook it is given.
        ({"webhook": {"enabled": True, "urls": ["http://hooks:8080/"]}}, {"delivery", "webhook"}),
    ]:
        after = sums({**base, **change})
        changed = {k for k in after if before.get(k) != after[k]}
        check(changed == rolls, f"{change} rolls {sorted(changed)}, not {sorted(rolls)}")
    print("ok: each role's checksum follows the settings it reads")


def schema_current():
    st = subprocess.run([sys.executable, os.path.join(ROOT, "helm", "tools", "values_schema.py"), "--check"],
                        capture_output=True, text=True)
    check(st.returncode == 0, f"values.schema.json is what helm/tools/values_schema.py writes: {st.stderr}")


def wrong_types():
    for values, needle in [
        ({"ingress": {"replicas": "three"}}, "replicas"),
        ({"telemetry": {"otlpProtocol": "carrier-pigeon"}}, "otlpProtocol"),
        ({"ingress": {"replicaz": 2}}, "replicaz"),
    ]:
        try:
            r = helm_python.lint(CHART, values, strict=True)
            message = json.dumps(r["errors"])
            failed = bool(r["errors"])
        except helm_python.HelmError as e:
            message, failed = str(e), True
        check(failed and needle in message, f"a wrong value {values} is refused naming it: {message}")
        print(f"ok: {values} refused: {message[:160]}")


def compose_and_dockerfile():
    """The compose file and the image agree with the chart and the code."""
    with open(os.path.join(ROOT, "deploy", "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    for role in ["ingress", "delivery", "storage"]:
        cmd = compose["services"][role]["command"]
        check(cmd == [role, "--config", "/etc/correu/correu.toml"], f"compose {role} runs {cmd}")
    check(os.path.exists(os.path.join(ROOT, "deploy", compose["configs"]["otel"]["file"])),
          "compose's collector config exists")
    work = tempfile.mkdtemp(prefix="correu-compose-")
    try:
        path = os.path.join(work, "correu.toml")
        with open(path, "w") as f:
            f.write(compose["configs"]["correu"]["content"])
        st = subprocess.run([BIN, "check-config", path], capture_output=True, text=True)
        check(st.returncode == 0, f"compose's correu.toml is valid: {st.stdout}{st.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        docker = f.read()
    for binary in ["correu", "correu-ingress", "correu-delivery", "correu-storage"]:
        check(f"target/release/{binary} " in docker or f"target/release/{binary}\n" in docker,
              f"the image carries {binary}")
    check("USER 65532" in docker and "HEALTHCHECK" in docker, "the image runs as non-root, with a health check")
    # The health check's command exists in the binary.
    st = subprocess.run([BIN, "probe", "--help"], capture_output=True, text=True)
    check(st.returncode == 0, "correu probe exists")
    print("ok: compose.yaml and the Dockerfile agree with the chart and the binary")


if __name__ == "__main__":
    lint_and_render()
    wrong_types()
    compose_and_dockerfile()
    required_values()
    checksums()
    schema_current()
    if failures:
        print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("chart: all checks passed")
