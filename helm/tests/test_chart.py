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
6. The PrometheusRule parses (`promtool check rules`) and its alerts fire
   on broken series and stay quiet on healthy ones (`promtool test rules`
   with helm/tests/alerts_test.yaml); `telemetry.metrics` sends metrics
   one way or both (OTEL_METRICS_EXPORTER, the ServiceMonitor).
7. The Grafana dashboard and helm/tests/metrics_used.txt (test_dashboard.py).

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_dashboard  # noqa: E402

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
    ("monitoring.coreos.com/v1", "PrometheusRule"): [["spec", "groups"]],
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
        ({"telemetry": {"metrics": "push"}}, "metrics"),
        ({"telemetry": {"prometheusRule": {"enabled": "yes"}}}, "enabled"),
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


ALERTS = {"CorreuMessagesWaitLong", "CorreuRetryBacklog", "CorreuDeliveryFailureRatio", "CorreuBounceRate",
          "CorreuNoReadyIngress", "CorreuStorageErrors", "CorreuBrokerUnreachable"}
RULE_VALUES = {"rabbitmq": {"url": "amqp://u:p@rabbitmq:5672/%2f"},
               "telemetry": {"serviceMonitor": {"enabled": True},
                             "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}}}


def with_telemetry(**telemetry):
    values = json.loads(json.dumps(RULE_VALUES))
    values["telemetry"].update(telemetry)
    return values


def prometheus_rule(docs):
    return [d for d in docs if d["kind"] == "PrometheusRule"]


def rule_exprs():
    """The alert rules' expressions, as the chart renders them."""
    docs, _ = render(RULE_VALUES)
    return [r["expr"] for d in prometheus_rule(docs) for g in d["spec"]["groups"] for r in g["rules"]]


def promtool():
    path = shutil.which("promtool")
    check(path is not None, "promtool is missing: apt-get install prometheus (scripts/test installs it)")
    return path


def rule_shape(rule, name, alerts):
    """What kubernetes-validate cannot check (it has no CRDs)."""
    check(rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule",
          f"{name}: {rule['apiVersion']} {rule['kind']}")
    meta = rule["metadata"]
    check(meta.get("name") == "correu", f"{name}: PrometheusRule metadata {meta}")
    labels = meta.get("labels", {})
    check(labels.get("release") == "prometheus" and labels.get("app.kubernetes.io/instance") == "correu",
          f"{name}: PrometheusRule labels {labels}")
    seen = set()
    for g in rule["spec"]["groups"]:
        check(g.get("name") and g.get("rules"), f"{name}: a rule group without name or rules: {g}")
        for r in g["rules"]:
            a = r.get("alert", "?")
            seen.add(a)
            check(set(r) <= {"alert", "expr", "for", "labels", "annotations"}, f"{name}: {a} has {sorted(r)}")
            check(isinstance(r.get("expr"), str) and r["expr"].strip(), f"{name}: {a} has no expr")
            check(re.fullmatch(r"[0-9]+[smh]", str(r.get("for", ""))), f"{name}: {a} has no `for`")
            check((r.get("labels") or {}).get("severity") in ("warning", "critical"), f"{name}: {a}: severity")
            notes = r.get("annotations") or {}
            check(notes.get("summary") and len(notes.get("description", "")) > 80,
                  f"{name}: {a} lacks a summary or a description of what to look at")
    check(seen == alerts, f"{name}: alerts {sorted(seen)}, not {sorted(alerts)}")


def promtool_checks(spec, name, unit_tests=False):
    """`promtool check rules` on the groups, then (unit_tests) the alerts
    test on them, descriptions left out (alerts_test.yaml compares summaries)."""
    tool = promtool()
    if not tool:
        return
    work = tempfile.mkdtemp(prefix="correu-rules-")
    try:
        path = os.path.join(work, "correu-rules.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        st = subprocess.run([tool, "check", "rules", path], capture_output=True, text=True)
        check(st.returncode == 0, f"{name}: promtool check rules: {st.stdout}{st.stderr}")
        if not unit_tests:
            return
        short = json.loads(json.dumps(spec))
        for g in short["groups"]:
            for r in g["rules"]:
                r["annotations"].pop("description", None)
        with open(path, "w") as f:
            yaml.safe_dump(short, f, sort_keys=False)
        shutil.copy(os.path.join(ROOT, "helm", "tests", "alerts_test.yaml"), work)
        st = subprocess.run([tool, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True, cwd=work)
        check(st.returncode == 0 and "SUCCESS" in st.stdout,
              f"{name}: promtool test rules helm/tests/alerts_test.yaml: {st.stdout}{st.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def alert_rules():
    """The PrometheusRule: off by default; on, it validates, parses and
    its alerts fire when they should; scoped to this release's scrape jobs."""
    docs, _ = render({"rabbitmq": RULE_VALUES["rabbitmq"]})
    check(not prometheus_rule(docs), "no PrometheusRule unless telemetry.prometheusRule.enabled")

    docs, _ = render(RULE_VALUES)
    rules = prometheus_rule(docs)
    check(len(rules) == 1, f"one PrometheusRule: {kinds(docs)}")
    if not rules:
        return
    validate(docs, "prometheusRule")
    rule_shape(rules[0], "prometheusRule", ALERTS)
    exprs = {r["alert"]: r["expr"] for g in rules[0]["spec"]["groups"] for r in g["rules"]}
    for a, e in exprs.items():
        if a != "CorreuNoReadyIngress":
            check('namespace="mail", job=~"correu-(ingress|delivery|storage|webhook)-metrics"' in e,
                  f"{a} reads this release's scrape jobs only: {e}")
    check('absent(up{namespace="mail", job="correu-ingress-metrics"} == 1)' in exprs["CorreuNoReadyIngress"],
          f"CorreuNoReadyIngress reads the ingress metrics Service: {exprs['CorreuNoReadyIngress']}")
    promtool_checks(rules[0]["spec"], "prometheusRule", unit_tests=True)
    print(f"ok: the PrometheusRule: {len(exprs)} alerts parse, fire on broken series and not on healthy ones")

    # The collector's series only: no scrape job to scope by, no `up`.
    docs, _ = render(with_telemetry(metrics="otlp", otlpEndpoint="http://otel-collector.monitoring:4317"))
    rules = prometheus_rule(docs)
    if rules:
        rule_shape(rules[0], "prometheusRule (otlp)", ALERTS - {"CorreuNoReadyIngress"})
        text = json.dumps(rules[0]["spec"])
        check("job=~" not in text and "up{" not in text, f"prometheusRule (otlp): scrape jobs in {text}")
        promtool_checks(rules[0]["spec"], "prometheusRule (otlp)")
    # Or what telemetry.prometheusRule.selector says.
    sel = 'cluster="eu-1", service_name=~"correu-.*"'
    docs, _ = render(with_telemetry(prometheusRule={"enabled": True, "selector": sel}))
    rules = prometheus_rule(docs)
    if rules:
        for g in rules[0]["spec"]["groups"]:
            for r in g["rules"]:
                if r["alert"] != "CorreuNoReadyIngress":
                    check(sel in r["expr"] and "job=~" not in r["expr"], f"selector not in {r['alert']}: {r['expr']}")
        promtool_checks(rules[0]["spec"], "prometheusRule (selector)")
    check(install_error(with_telemetry(prometheusRule={"enabled": True, "selector": "not a matcher"})) is not None,
          "a prometheusRule.selector that is no label matcher is refused")


def metrics_source():
    """telemetry.metrics: each Correu container pushes metrics over OTLP
    only when asked, and the ServiceMonitor scrapes only when asked."""
    endpoint = "http://otel-collector.monitoring:4317"
    base = {"rabbitmq": RULE_VALUES["rabbitmq"], "webhook": {"enabled": True, "urls": ["http://hooks:8080/"]}}
    for metrics, otlp, exporter, monitor in [
        (None, False, "none", True),
        ("scrape", True, "none", True),
        ("otlp", True, "otlp", False),
        ("both", True, "otlp", True),
    ]:
        telemetry = {"serviceMonitor": {"enabled": True}}
        if metrics:
            telemetry["metrics"] = metrics
        if otlp:
            telemetry["otlpEndpoint"] = endpoint
        name = f"telemetry.metrics={metrics or '(default)'}"
        docs, notes = render({**base, "telemetry": telemetry})
        validate(docs, name)
        roles = set()
        for dep, spec in pods(docs):
            for c in spec["containers"]:
                if c["name"] not in ("ingress", "delivery", "storage", "webhook"):
                    continue
                roles.add(c["name"])
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                check(env.get("OTEL_METRICS_EXPORTER") == exporter,
                      f"{name}: {dep}/{c['name']} has OTEL_METRICS_EXPORTER={env.get('OTEL_METRICS_EXPORTER')}, "
                      f"not {exporter}")
                check(env.get("OTEL_LOGS_EXPORTER") == "none",
                      f"{name}: {dep}/{c['name']}: logs stay on standard error by default, "
                      f"OTEL_LOGS_EXPORTER={env.get('OTEL_LOGS_EXPORTER')}")
                check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == (endpoint if otlp else None),
                      f"{name}: {dep}/{c['name']}: OTLP endpoint {env.get('OTEL_EXPORTER_OTLP_ENDPOINT')}")
        check(roles == {"ingress", "delivery", "storage", "webhook"}, f"{name}: containers of {sorted(roles)}")
        k = kinds(docs)
        check(("ServiceMonitor" in k) == monitor, f"{name}: ServiceMonitor {'missing' if monitor else 'rendered'}")
        metrics_services = [n for n in k.get("Service", []) if n.endswith("-metrics")]
        check(len(metrics_services) == (4 if monitor else 0), f"{name}: metrics Services {metrics_services}")
        print(f"ok: {name}: OTEL_METRICS_EXPORTER={exporter} in every role, "
              f"ServiceMonitor {'rendered' if monitor else 'not rendered'}")
    docs, _ = render({**base, "telemetry": {"otlpEndpoint": endpoint, "logs": "otlp"}})
    for dep, spec in pods(docs):
        for c in spec["containers"]:
            if c["name"] in ("ingress", "delivery", "storage", "webhook"):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                check(env.get("OTEL_LOGS_EXPORTER") == "otlp",
                      f"telemetry.logs=otlp: {dep}/{c['name']} has OTEL_LOGS_EXPORTER={env.get('OTEL_LOGS_EXPORTER')}")
    print("ok: telemetry.logs=otlp sends log records over OTLP in every role")
    for metrics in ("otlp", "both"):
        message = install_error({**base, "telemetry": {"metrics": metrics}})
        check(message is not None and "telemetry.otlpEndpoint" in message and f"telemetry.metrics={metrics}" in message,
              f"telemetry.metrics={metrics} without an endpoint is refused naming telemetry.otlpEndpoint: {message}")
        print(f"ok: telemetry.metrics={metrics} without an endpoint refused: {(message or '')[:140]}")


if __name__ == "__main__":
    lint_and_render()
    wrong_types()
    alert_rules()
    metrics_source()
    test_dashboard.run(check, rule_exprs())
    compose_and_dockerfile()
    required_values()
    checksums()
    schema_current()
    if failures:
        print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("chart: all checks passed")
