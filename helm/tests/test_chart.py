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
4. The entry points: the rendered ConfigMap, container arguments and
   environment start the real binaries (storage, delivery, ingress against
   the machine's RabbitMQ in a vhost of this test's own), which become
   ready and carry a message to a mailbox.

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


def rules(docs, values, name):
    drain = (values.get("ingress") or {}).get("drainSeconds", 60)
    for dep, spec in pods(docs):
        ident = f"{name}: {dep}"
        sc = spec.get("securityContext", {})
        check(sc.get("runAsNonRoot") is True, f"{ident}: pod not runAsNonRoot")
        check(spec.get("automountServiceAccountToken") is False, f"{ident}: token mounted")
        for c in spec["containers"]:
            cid = f"{ident}/{c['name']}"
            csc = c.get("securityContext", {})
            check(csc.get("allowPrivilegeEscalation") is False, f"{cid}: privilege escalation")
            check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{cid}: capabilities not all dropped")
            if c["name"] in ("ingress", "delivery", "storage"):
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
        check(len(k.get("NetworkPolicy", [])) == 3, f"{name}: three NetworkPolicies")
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
        check('proxy_networks = ["10.0.0.0/8"]' in config, f"{name}: PROXY networks in the config:\n{config}")
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
        per_file_expectations(name, docs, notes)
        print(f"ok: {name}: {len(docs)} objects, lint and schemas at {', '.join(KUBE_VERSIONS)}")


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


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True)


def wait_log(path, pattern, within=30):
    deadline = time.time() + within
    while time.time() < deadline:
        with open(path) as f:
            for line in f:
                m = re.search(pattern, line)
                if m:
                    return m
        time.sleep(0.1)
    with open(path) as f:
        raise AssertionError(f"{path} never said {pattern!r}:\n{f.read()}")


def entrypoints():
    vhost = f"correu-helm-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    work = tempfile.mkdtemp(prefix="correu-helm-")
    procs = []
    try:
        values = load_values("default-values.yaml")
        values["rabbitmq"] = {"url": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"}
        docs, _ = render(values)
        config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["correu.toml"]
        path = os.path.join(work, "correu.toml")
        with open(path, "w") as f:
            f.write(config)
        st = subprocess.run([BIN, "check-config", path], capture_output=True, text=True)
        check(st.returncode == 0, f"the rendered correu.toml is valid: {st.stdout}{st.stderr}")
        deps = {d["metadata"]["name"].removeprefix("correu-"): d for d in docs if d["kind"] == "Deployment"}
        storage_port = free_port()
        # The cluster's addresses and paths, made local; nothing else.
        local = {
            "CORREU_SMTP_LISTEN": "127.0.0.1:0",
            "CORREU_TELEMETRY_LISTEN": "127.0.0.1:0",
            "CORREU_STORAGE_LISTEN": f"127.0.0.1:{storage_port}",
            "CORREU_STORAGE_ENDPOINT": f"http://127.0.0.1:{storage_port}",
            "CORREU_STORAGE_ROOT": os.path.join(work, "mail"),
        }
        health = {}
        smtp = None
        for component in ["storage", "delivery", "ingress"]:
            c = deps[component]["spec"]["template"]["spec"]["containers"][0]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CORREU_", "OTEL_"))}
            for e in c["env"]:
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "fieldRef" in e.get("valueFrom", {}):
                    env[e["name"]] = f"{component}-pod"
            env.update(local)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            check("/etc/correu/correu.toml" in mounts, f"{component}: the config is mounted where args say")
            args = [path if a == "/etc/correu/correu.toml" else a for a in c["args"]]
            log = os.path.join(work, f"{component}.log")
            procs.append(subprocess.Popen([BIN, *args], env=env, stdout=open(log, "w"),
                                          stderr=subprocess.STDOUT, cwd=work))
            m = wait_log(log, r'"message":"telemetry listening","addr":"([0-9.:]+)"')
            health[component] = m.group(1)
            if component == "ingress":
                smtp = wait_log(log, r'"message":"SMTP listening","addr":"([0-9.:]+)"').group(1)
        for component, addr in health.items():
            deadline = time.time() + 20
            status = 0
            while time.time() < deadline:
                try:
                    status = urllib.request.urlopen(f"http://{addr}/readyz", timeout=5).status
                    break
                except Exception:
                    time.sleep(0.2)
            check(status == 200, f"{component} started as the chart says becomes ready")
        host, port = smtp.rsplit(":", 1)
        with smtplib.SMTP(host, int(port), timeout=30) as s:
            s.sendmail("jo@example.com", ["pere@example.org"], b"Subject: from the chart\r\n\r\nhola\r\n")
        box = os.path.join(work, "mail", "example.org", "pere", "new")
        deadline = time.time() + 30
        while time.time() < deadline and not (os.path.isdir(box) and os.listdir(box)):
            time.sleep(0.1)
        check(os.path.isdir(box) and len(os.listdir(box)) == 1, "a message through the chart's configuration is stored")
        print("ok: the chart's entry points, environment and config run the services")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        rabbitmqctl("delete_vhost", vhost)
        shutil.rmtree(work, ignore_errors=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    lint_and_render()
    wrong_types()
    compose_and_dockerfile()
    entrypoints()
    if failures:
        print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("chart: all checks passed")
