"""The Grafana dashboard (deploy/grafana/correu-dashboard.json), and the
list of metrics it and the chart's alert rules read (run from
test_chart.py, which renders the rules; alone it renders them itself).

1. It has the variables `datasource` (Prometheus), `namespace`, `job` and
   `pod` (query variables, several values and All, All matching series
   without the label too), and every panel and query reads `${datasource}`.
2. Every query is scoped by `$namespace`, `$job` and `$pod`, on every
   series it reads; histogram quantiles ask for exemplars.
3. Its panels sit in rows, one per role, in order: Ingress (SMTP), Queue,
   Delivery, Storage, Webhook, Process; the panels every release had are
   still there.
4. Every query parses as PromQL (promtool, through a recording rule each).
5. helm/tests/metrics_used.txt is the sorted set of metric names the
   dashboard and the alert rules read, histograms by their base name
   (no _bucket, _sum, _count), without Prometheus's `up` and kube-state
   series. The test writes it, and fails when the committed file was not
   current; a Rust test checks each name is in a role's /metrics.

    .venv/bin/python helm/tests/test_dashboard.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "correu-dashboard.json")
METRICS_USED = os.path.join(ROOT, "helm", "tests", "metrics_used.txt")

ROWS = ["Ingress (SMTP)", "Queue", "Delivery", "Storage", "Webhook", "Process"]
SCOPE = {"namespace": "$namespace", "job": "$job", "pod": "$pod"}
# Panels the dashboard had before rows; each stays, in its role's row.
KEPT = {
    "SMTP connections open": "Ingress (SMTP)",
    "Connections accepted and refused /s": "Ingress (SMTP)",
    "Messages received /s, by result": "Ingress (SMTP)",
    "Message size (p50, p99)": "Ingress (SMTP)",
    "TLS handshakes /s": "Ingress (SMTP)",
    "Publish confirm latency (p50, p99)": "Queue",
    "Queue depth": "Queue",
    "Errors /s": "Queue",
    "Delivery attempts /s, by outcome": "Delivery",
    "Time from accept to delivered (p50, p99)": "Delivery",
    "Retries and reports /s": "Delivery",
}
# Metrics each row must chart (the new ones among them).
REQUIRED = {
    "Delivery": ["correu_delivery_destination_attempts_total"],
    "Storage": ["correu_storage_deliveries_total", "correu_storage_deliver_duration_seconds_bucket",
                "correu_storage_written_bytes_total", "correu_storage_mailboxes"],
    "Webhook": ["correu_webhook_posts_total", "correu_webhook_duration_seconds_bucket"],
    "Process": ["process_cpu_time_seconds_total", "process_memory_usage_bytes",
                "process_open_file_descriptor_count", "correu_runtime_tasks"],
}

# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def strip_promql(expr):
    """`expr` without strings, label matchers, ranges and grouping clauses:
    what is left names functions, keywords, numbers and metrics."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    return e


def metric_names(expr):
    """The series names `expr` reads, as written (…_bucket included)."""
    out = set()
    e = strip_promql(expr)
    for m in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        out.add(name)
    return out


def selectors(expr):
    """(metric, {label: value}) of every series selector in `expr`."""
    out = []
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    for m in re.finditer(r"(?<![\w:$.\"])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{([^}]*)\})?(?!\s*\()", e):
        name = m.group(1)
        if name.lower() in KEYWORDS or name not in metric_names(expr):
            continue
        labels = {}
        for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(3) or ""):
            labels[lm.group(1)] = (lm.group(2), lm.group(3))
        out.append((name, labels))
    return out


def base_names(names):
    """Histograms by their base name: x_bucket, and x_sum and x_count
    when x_bucket is read too (process_open_file_descriptor_count is a gauge)."""
    out = set()
    histograms = {n[: -len("_bucket")] for n in names if n.endswith("_bucket")}
    for n in names:
        for suffix in ("_bucket", "_sum", "_count"):
            if n.endswith(suffix) and n[: -len(suffix)] in histograms:
                n = n[: -len(suffix)]
                break
        out.add(n)
    return {n for n in out if n != "up" and not n.startswith("kube_")}


def load():
    with open(DASHBOARD) as f:
        return json.load(f)


def check_variables(d, check):
    v = {x["name"]: x for x in d.get("templating", {}).get("list", [])}
    for name in ("datasource", "namespace", "job", "pod"):
        check(name in v, f"dashboard: no `{name}` variable")
    if "datasource" in v:
        check(v["datasource"]["type"] == "datasource" and v["datasource"].get("query") == "prometheus",
              f"dashboard: `datasource` is not a Prometheus data source variable: {v['datasource']}")
    for name in ("namespace", "job", "pod"):
        x = v.get(name)
        if not x:
            continue
        q = x.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        ident = f"dashboard: variable `{name}`"
        check(x["type"] == "query", f"{ident} is not a query variable")
        check(x.get("datasource", {}).get("uid") == "${datasource}", f"{ident} does not read ${{datasource}}")
        check(bool(re.fullmatch(rf"label_values\((correu_[a-z0-9_]+)(\{{[^}}]*\}})?,\s*{name}\)", q or "")),
              f"{ident}: query {q!r} is not label_values(correu_…, {name})")
        check(x.get("multi") is True and x.get("includeAll") is True, f"{ident} is not multi-value with All")
        # All as .* also matches series without the label (the collector's).
        check(x.get("allValue") == ".*", f"{ident}: All is not .*")
    order = [x["name"] for x in d["templating"]["list"]]
    check(order[:4] == ["datasource", "namespace", "job", "pod"], f"dashboard: variables in order {order}")


def check_panels(d, check):
    """Rows, scoping, exemplars; returns every query's expression."""
    exprs = []
    row = None
    rows_seen = []
    charted = {}
    for p in d["panels"]:
        if p["type"] == "row":
            row = p["title"]
            rows_seen.append(row)
            check(not p.get("collapsed") and not p.get("panels"), f"dashboard: row {row} is collapsed")
            continue
        ident = f"dashboard: panel {p['title']!r}"
        check(row is not None, f"{ident} is outside every row")
        check(p.get("datasource", {}).get("uid") == "${datasource}", f"{ident} does not read ${{datasource}}")
        if p["title"] in KEPT:
            check(KEPT[p["title"]] == row, f"{ident} is in row {row}, not {KEPT[p['title']]}")
        targets = p.get("targets") or []
        check(targets, f"{ident} has no query")
        for t in targets:
            expr = t.get("expr", "")
            tid = f"{ident} {t.get('refId')}"
            exprs.append(expr)
            check(t.get("datasource", {}).get("uid") in (None, "${datasource}"), f"{tid}: another data source")
            for var in ("$namespace", "$job", "$pod"):
                check(var in expr, f"{tid} does not use {var}: {expr}")
            sels = selectors(expr)
            check(sels, f"{tid} reads no series: {expr}")
            for name, labels in sels:
                for label, var in SCOPE.items():
                    check(labels.get(label) == ("=~", var),
                          f"{tid}: {name} is not filtered by {label}=~\"{var}\": {expr}")
            if "histogram_quantile" in expr:
                check(t.get("exemplar") is True, f"{tid}: a histogram without exemplars")
            charted.setdefault(row, set()).update(metric_names(expr))
    check(rows_seen == ROWS, f"dashboard: rows {rows_seen}, not {ROWS}")
    titles = {p["title"] for p in d["panels"]}
    for t in KEPT:
        check(t in titles, f"dashboard: the panel {t!r} is gone")
    for row, names in REQUIRED.items():
        for n in names:
            check(n in charted.get(row, set()), f"dashboard: row {row} does not chart {n}")
    ids = [p["id"] for p in d["panels"]]
    check(len(ids) == len(set(ids)), f"dashboard: panel ids repeat: {ids}")
    return exprs


def promql_parses(exprs, check):
    """Each expression, variables replaced, as a recording rule promtool parses."""
    promtool = shutil.which("promtool")
    if not promtool:
        check(False, "promtool is missing (Debian: apt-get install prometheus; scripts/test installs it)")
        return
    rules = [{"record": f"dashboard:query{i}",
              "expr": expr.replace("$namespace", ".*").replace("$job", ".*").replace("$pod", ".*")}
             for i, expr in enumerate(exprs)]
    work = tempfile.mkdtemp(prefix="correu-dashboard-")
    try:
        path = os.path.join(work, "dashboard.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        st = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
        check(st.returncode == 0, f"dashboard: a query is not PromQL: {st.stdout}{st.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def metrics_used(dashboard_exprs, rule_exprs, check):
    names = set()
    for e in list(dashboard_exprs) + list(rule_exprs):
        names |= metric_names(e)
    used = sorted(base_names(names))
    text = "".join(n + "\n" for n in used)
    try:
        with open(METRICS_USED) as f:
            before = f.read()
    except FileNotFoundError:
        before = None
    if before != text:
        with open(METRICS_USED, "w") as f:
            f.write(text)
    check(before == text, f"{os.path.relpath(METRICS_USED, ROOT)} was not current; it is rewritten "
                          f"(check it in): {before!r} -> {text!r}")
    return used


def run(check, rule_exprs):
    """Every check above; `rule_exprs`: the rendered alert rules' expressions."""
    d = load()
    check_variables(d, check)
    exprs = check_panels(d, check)
    variable_exprs = []
    for x in d["templating"]["list"]:
        q = x.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q or "")
        if m:
            variable_exprs.append(m.group(1))
    promql_parses(exprs, check)
    used = metrics_used(exprs + variable_exprs, rule_exprs, check)
    check(not [e for e in rule_exprs if not metric_names(e)], "an alert rule reads no metric")
    print(f"ok: the dashboard: {len(exprs)} queries in {len(ROWS)} rows, scoped by namespace, job and pod; "
          f"{len(used)} metrics used (helm/tests/metrics_used.txt)")
    return used


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_chart

    run(test_chart.check, test_chart.rule_exprs())
    if test_chart.failures:
        sys.exit(1)
