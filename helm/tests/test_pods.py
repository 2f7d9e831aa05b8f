"""The chart's pods, run as the kubelet runs them (helm/tests/kubelet.py),
with the real RabbitMQ and Redis of this machine standing in for the
cluster's, and the real binaries in the image deploy/Dockerfile makes.

For each release name (`correu`, `mail`) and each values set
(defaults plus the one required value; the README's own install line,
secrets and all; production values: TLS, accounts, DKIM, KEDA, three
ingress replicas, PROXY protocol, an OTLP endpoint, Dovecot, two storage
replicas on a shared volume):
- every pod starts, passes its startup probe and becomes ready;
- a message sent to the ingress Service (and through the load balancer
  when the PROXY protocol is on) lands in the storage volume;
- `helm test`'s pod exits 0;
- with Dovecot, IMAP through its Service logs in and reads the message;
- with the webhook (production values), the webhook pod posts the
  message's `delivered` event to an HTTP receiver through a Service,
  signed with the Secret's key;
- SIGTERM stops every container with exit code 0 within its grace period.

Then what the chart promises under failure:
- storage away: every ingress pod stays ready and answers RCPT `451
  4.3.0`, and mail flows again when storage is back;
- a draining ingress turns not ready at once and keeps answering
  `421 4.3.2` through its drain delay;
- storage on a volume it cannot write is not ready, and says why;
- the kubelet's service-link variables (as if the chart had not turned
  them off) do not stop any pod;
- the runner itself sees a crash-looping pod and a pod that writes
  outside its volumes;
- a three-node RabbitMQ cluster loses the node Correu's connections use
  (SIGKILL) under load: every message that got a 250 is stored exactly
  once, and ingress and delivery are back within seconds.

    .venv/bin/python helm/tests/test_pods.py       (CHART_TEST_CORREU: the binary)
"""

import base64
import imaplib
import json
import os
import re
import shlex
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import helm_python
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kubelet  # noqa: E402
import rabbit_cluster  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "correu")
BIN = os.environ.get("CHART_TEST_CORREU", os.path.join(ROOT, "target", "debug", "correu"))
NAMESPACE = "mail"
REDIS_DB = 13
PASSWORD = "bon-dia-2026"

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", file=sys.stderr, flush=True)
    return cond


def say(what):
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


def run(*args, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


# ------------------------------------------------- what the README says


def readme_install():
    """The README's Kubernetes commands, as written: the secrets it creates
    (name, type, keys) and the values its `helm install` line sets."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    secrets, values, release = {}, None, None
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith(("kubectl", "helm install")) else []
        if words[:1] == ["kubectl"] and "secret" in words:
            i = words.index("secret")
            kind, name = words[i + 1], words[i + 2]
            keys = []
            for w in words[i + 3:]:
                if w.startswith("--from-literal="):
                    keys.append(w.split("=", 2)[1])
                elif w.startswith("--from-file="):
                    spec = w.split("=", 1)[1]
                    keys.append(spec.split("=", 1)[0] if "=" in spec else os.path.basename(spec))
            if kind == "tls":
                keys = ["tls.crt", "tls.key"]
            secrets[name] = (kind, keys)
        elif words[:2] == ["helm", "install"]:
            release = words[2]
            values = {}
            it = iter(words[3:])
            for w in it:
                if w == "--set":
                    merge(values, helm_python.parse_set_string(next(it)))
                elif w.startswith("--set="):
                    merge(values, helm_python.parse_set_string(w[6:]))
                elif w in ("-n", "--namespace"):
                    check(next(it) == NAMESPACE, "the README installs into namespace mail")
    if values is None:
        raise AssertionError("README.md has no helm install line")
    return release, values, secrets


# ---------------------------------------------------------- the secrets


class Material:
    """What the secrets hold: made here as an operator would make them."""

    def __init__(self, work):
        self.dir = os.path.join(work, "material")
        os.makedirs(self.dir)
        d = self.dir
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mx1.example.org",
            "-addext", "subjectAltName=DNS:mx1.example.org", "-keyout", f"{d}/tls.key", "-out", f"{d}/tls.crt")
        accounts = f"{d}/accounts"
        env = dict(os.environ, CORREU_STORAGE_ACCOUNTS_FILE=accounts, CORREU_DOMAINS="example.org,example.net",
                   CORREU_LOG="warn")
        for who in ("pere@example.org", "postmaster@example.org"):
            subprocess.run([BIN, "account", "add", who], input=PASSWORD + "\n", env=env, text=True,
                           check=True, capture_output=True)
        with open(f"{d}/aliases", "w") as f:
            f.write("postmaster@example.net: pere@example.org\nhostmaster@example.org: postmaster@example.org\n")
        run(BIN, "dkim", "keygen", "--domain", "example.org", "--selector", "s2026", "--out", f"{d}/example.org.pem")
        run(BIN, "dkim", "keygen", "--domain", "example.net", "--selector", "s2026", "--algorithm",
            "ed25519-sha256", "--out", f"{d}/example.net.pem")

    def read(self, name):
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    def secret(self, name, keys, urls):
        """The content of a secret named `name` with `keys`."""
        data = {}
        for k in keys:
            if k in ("tls.crt", "tls.key", "accounts", "aliases"):
                data[k] = self.read(k)
            elif k.endswith(".pem"):
                data[k] = self.read(k)
            elif k == "secret":
                data[k] = base64.b64encode(os.urandom(32))
            elif k in ("url", "host"):
                data[k] = urls["redis" if "redis" in name else "rabbitmq"]
            else:
                raise AssertionError(f"secret {name}: no content for key {k}")
        return data


# -------------------------------------------------------------- helpers


def render(values, release):
    """Every object the chart makes, hooks (helm test's pod) included, as
    `helm template` prints them (`lookup` finds nothing)."""
    chart = helm_python.Chart.load(CHART)
    try:
        out = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def rabbitmqctl(*args):
    run("rabbitmqctl", *args)


def send(address, rcpt, subject, sender="jo@remote.example", proxy=None):
    """One message; the queue id of its 250."""
    host, port = address
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.remote.example")
        s.mail(sender)
        code, msg = s.rcpt(rcpt)
        if code != 250:
            raise AssertionError(f"RCPT {rcpt}: {code} {msg.decode()}")
        code, msg = s.data(f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nHola des del pod.\r\n")
        if code != 250:
            raise AssertionError(f"DATA: {code} {msg.decode()}")
        return msg.decode().split("queued as ")[-1].strip()


def stored(claim, domain, user, needle, within=30):
    """The file in the mailbox whose name or text holds `needle`."""
    box = os.path.join(claim, domain, user, "new")
    deadline = time.time() + within
    while time.time() < deadline:
        if os.path.isdir(box):
            for n in os.listdir(box):
                path = os.path.join(box, n)
                if needle in n:
                    return path
                try:
                    with open(path, errors="replace") as f:
                        if needle in f.read():
                            return path
                except OSError:
                    pass
        time.sleep(0.2)
    return None


def http_get(ip, port, path):
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def rcpt_reply(address, rcpt):
    host, port = address
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.remote.example")
        s.mail("jo@remote.example")
        code, msg = s.rcpt(rcpt)
        return code, msg.decode()


def greeting(ip, port):
    with socket.create_connection((ip, port), timeout=5) as s:
        s.settimeout(5)
        return s.recv(512).decode(errors="replace")


# ------------------------------------------------------------ scenarios


class World:
    """What every scenario shares: the image, the secrets' material, a
    RabbitMQ vhost and a Redis database of the test's own."""

    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="correu-pods-")
        os.chmod(self.work, 0o755)
        self.image = kubelet.build_correu_image(self.work, BIN)
        self.material = Material(self.work)
        self.vhosts = []
        self.n = 0

    def vhost(self):
        self.n += 1
        v = f"correu-pods-{os.getpid()}-{self.n}"
        rabbitmqctl("add_vhost", v)
        rabbitmqctl("set_permissions", "-p", v, "guest", ".*", ".*", ".*")
        self.vhosts.append(v)
        return v

    def close(self):
        for v in self.vhosts:
            subprocess.run(["rabbitmqctl", "delete_vhost", v], capture_output=True)
        keys = subprocess.run(["redis-cli", "-n", str(REDIS_DB), "--scan", "--pattern", "correu:*"],
                              capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-n", str(REDIS_DB), "del", *keys[i:i + 500]], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


def new_cluster(world, label, lb_source=None, force_links=False, rabbit=("127.0.0.1", 5672)):
    cluster = kubelet.Cluster(NAMESPACE, os.path.join(world.work, label), world.image,
                              force_service_links=force_links, lb_source=lb_source)
    if rabbit:
        cluster.external_service("rabbitmq", 5672, rabbit)
    cluster.external_service("redis", 6379, ("127.0.0.1", 6379))
    return cluster


def urls(vhost):
    return {"rabbitmq": f"amqp://guest:guest@rabbitmq:5672/{vhost}",
            "redis": f"redis://redis:6379/{REDIS_DB}"}


def stop_all(cluster, label):
    """Every pod deleted at once, as `helm uninstall` does: each container
    must exit 0 within its grace period."""
    threads, results = [], {}

    def one(pod):
        results[pod.name] = pod.stop()
    for p in [p for p in cluster.pods if not p.stopped]:
        t = threading.Thread(target=one, args=(p,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    for pod, codes in results.items():
        for c, code in codes.items():
            check(code == 0, f"{label}: {pod}/{c} ended with {code} after SIGTERM")


class HookReceiver:
    """An HTTP server on this machine, behind the Service `hooks`, that
    records what the webhook pod posts."""

    def __init__(self):
        import http.server
        self.posts = []
        self.secret = None
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                # Header names are case-insensitive (hyper sends them in lower case).
                posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def webhook_check(hooks, label, qid, within=30):
    """The message's `delivered` event came, with a signature made with
    the Secret's key."""
    import hashlib
    import hmac
    deadline = time.time() + within
    while time.time() < deadline:
        for headers, body in list(hooks.posts):
            event = json.loads(body)
            if event.get("queue_id") != qid or event.get("event") != "delivered":
                continue
            sig = dict(p.split("=", 1) for p in headers.get("correu-signature", "").split(",") if "=" in p)
            want = hmac.new(hooks.secret, sig.get("t", "").encode() + b"." + body, hashlib.sha256).hexdigest()
            check(hmac.compare_digest(want, sig.get("v1", "")), f"{label}: the webhook's signature verifies: {headers}")
            check(headers.get("correu-event-id") == event["id"], f"{label}: Correu-Event-Id names the event")
            check(event.get("recipient") == "pere@example.org", f"{label}: the event's recipient: {event}")
            say(f"{label}: the webhook posted {qid}'s delivered event, signed")
            return
        time.sleep(0.5)
    check(False, f"{label}: no delivered event for {qid} reached the webhook receiver: {hooks.posts[:5]}")


def scenario(world, release, label, values, secrets, extra=()):
    say(f"{label}: release {release}")
    vhost = world.vhost()
    u = urls(vhost)
    if "url" in (values.get("rabbitmq") or {}):
        values = merge(json.loads(json.dumps(values)), {"rabbitmq": {"url": u["rabbitmq"]}})
    hooks = None
    if (values.get("webhook") or {}).get("enabled"):
        hooks = HookReceiver()
        values = merge(json.loads(json.dumps(values)), {"webhook": {"urls": ["http://hooks:8080/correu"]}})
    proxy = (values.get("ingress") or {}).get("proxyProtocol") or {}
    docs = render(values, release)
    lb_source = None
    if proxy.get("enabled"):
        lb_source = kubelet.ipv4_in(proxy["networks"][0], [])
    cluster = new_cluster(world, f"{release}-{label}", lb_source=lb_source, force_links="links" in extra)
    if lb_source:
        cluster.net.host_address(lb_source)
    if hooks:
        cluster.external_service("hooks", 8080, ("127.0.0.1", hooks.port))
    try:
        for name, keys in secrets.items():
            data = world.material.secret(name, keys, u)
            if hooks and name == values["webhook"].get("existingSecret"):
                hooks.secret = data["secret"]
            cluster.add_secret(name, data)
        cluster.apply(docs)
        full = next(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
                    and d["metadata"]["name"].endswith("-ingress")).removesuffix("-ingress")
        started = time.time()
        cluster.start_workloads()
        cluster.wait_ready(90)
        counts = {c: len(cluster.pods_of(c)) for c in ("ingress", "delivery", "storage", "webhook")}
        say(f"{label}: {sum(counts.values())} pods ready in {time.time() - started:.1f} s: {counts}")
        claim = next(iter(cluster.claims.values()))
        smtp = cluster.address(f"{full}-ingress", "smtp")
        token = f"{label}-{release}-{os.getpid()}"
        qid = send(smtp, "pere@example.org", f"through the Service {token}")
        check(stored(claim, "example.org", "pere", qid),
              f"{label}: the message sent to the ingress Service ({qid}) reached the storage volume")
        if hooks:
            webhook_check(hooks, label, qid)
        if lb_source:
            lb = cluster.lb_address(f"{full}-ingress", "smtp")
            qid2 = send(lb, "pere@example.org", f"through the load balancer {token}")
            path = stored(claim, "example.org", "pere", qid2)
            if check(path, f"{label}: the message through the load balancer (PROXY) was stored"):
                with open(path, errors="replace") as f:
                    head = f.read().split("\n\n")[0]
                # Received: names the client the PROXY header gave, not the balancer.
                check(f"[{lb_source}]" not in head, f"{label}: Received: names the balancer, not the client:\n{head}")
        for t in cluster.tests:
            code, log = cluster.run_to_completion(t, within=90)
            check(code == 0, f"{label}: helm test pod {t['metadata']['name']} exited {code}:\n{log}")
        check(cluster.tests, f"{label}: the chart has a helm test pod")
        if (values.get("storage") or {}).get("dovecot", {}).get("enabled"):
            imap_check(cluster, full, label, token)
        if "storage-away" in extra:
            storage_away(cluster, full, label, claim)
        if "drain" in extra:
            drain(cluster, label)
        if "unwritable" in extra:
            unwritable(cluster, label, claim)
        cluster.raise_failures()
        stop_all(cluster, label)
        cluster.raise_failures()
        say(f"{label}: ok")
    except AssertionError as e:
        check(False, f"{label} (release {release}): {e}")
    finally:
        cluster.close()
        if hooks:
            hooks.close()


def imap_check(cluster, full, label, token):
    host, port = cluster.address(f"{full}-imap", "imap")
    with imaplib.IMAP4(host, port, timeout=20) as m:
        if "STARTTLS" in m.capabilities:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            m.starttls(ssl_context=ctx)
        m.login("pere@example.org", PASSWORD)
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", f'"{token}"')
        ids = data[0].split()
        if check(ids, f"{label}: IMAP through the Dovecot sidecar finds the message"):
            typ, msg = m.fetch(ids[0], "(RFC822)")
            check(b"Hola des del pod" in msg[0][1], f"{label}: IMAP reads the message's text")
    say(f"{label}: Dovecot served it over IMAP")


def storage_away(cluster, full, label, claim):
    """No single point of failure: storage restarting must not take the
    ingress pods out of the load balancer."""
    smtp = cluster.address(f"{full}-ingress", "smtp")
    template = None
    for p in cluster.pods_of("storage"):
        template = {"metadata": {"labels": p.labels, "annotations": p.annotations}, "spec": p.spec}
        cluster.stop_pod(p)
    time.sleep(12)  # readiness: periodSeconds 5, failureThreshold 2
    for p in cluster.pods_of("ingress"):
        check(p.ready(), f"{label}: ingress {p.name} stayed ready while storage was away")
        code, body = http_get(p.ip, 9725, "/readyz")
        check(code == 200 and "storage (not counted)" in body,
              f"{label}: /readyz is 200 and says storage is away: {code} {body}")
    code, msg = rcpt_reply(smtp, "pere@example.org")
    check(code == 451 and "4.3.0" in msg, f"{label}: RCPT while storage is away: {code} {msg}")
    pod = cluster.start_pod(template, f"{full}-storage")
    cluster.wait_ready(60, pods=[pod])
    qid = send(smtp, "pere@example.org", f"after storage came back {label}")
    check(stored(claim, "example.org", "pere", qid), f"{label}: mail flows again once storage is back")
    say(f"{label}: storage away: ingress stayed ready, RCPT 451 4.3.0, mail flows again")


def drain(cluster, label):
    """A deleted ingress pod: not ready at once, then 421 4.3.2 on its
    port through the drain delay, then exit 0."""
    pod = cluster.pods_of("ingress")[0]
    results = {}
    t0 = time.time()
    stopper = threading.Thread(target=lambda: results.update(pod.stop()))
    stopper.start()
    time.sleep(1)
    code, body = http_get(pod.ip, 9725, "/readyz")
    check(code == 503, f"{label}: a draining ingress is not ready: {code} {body}")
    first = greeting(pod.ip, 2525)
    check(first.startswith("421 4.3.2"), f"{label}: a draining ingress answers 421 4.3.2: {first!r}")
    time.sleep(10)
    later = greeting(pod.ip, 2525)
    check(later.startswith("421 4.3.2"), f"{label}: 11 s into the drain it still answers 421 4.3.2: {later!r}")
    stopper.join()
    took = time.time() - t0
    check(results.get("ingress") == 0, f"{label}: the drained ingress exited {results}")
    check(took >= 14, f"{label}: the ingress kept its port through the drain delay ({took:.1f} s)")
    say(f"{label}: drain: not ready at once, 421 4.3.2 for {took:.0f} s, exit 0")


def unwritable(cluster, label, claim):
    """Storage on a volume it cannot write is not ready, and says why."""
    st = os.stat(claim)
    os.chown(claim, 0, 0)
    os.chmod(claim, 0o555)
    try:
        deadline = time.time() + 20
        pods = cluster.pods_of("storage")
        while time.time() < deadline and any(p.ready() for p in pods):
            time.sleep(0.5)
        check(not any(p.ready() for p in pods), f"{label}: storage on an unwritable volume turned not ready")
        code, body = http_get(pods[0].ip, 9725, "/readyz")
        check(code == 503 and "cannot create a file" in body, f"{label}: /readyz says why: {code} {body}")
    finally:
        os.chown(claim, st.st_uid, st.st_gid)
        os.chmod(claim, st.st_mode & 0o7777)
    cluster.wait_ready(30)
    say(f"{label}: storage on an unwritable volume was not ready until it could write again")


def runner_sees_failures(world):
    """The runner itself: a pod that would crash-loop, and one that writes
    outside its volumes, are failures it reports."""
    say("runner: a crash-looping pod and one writing outside its volumes")
    vhost = world.vhost()
    docs = render({"rabbitmq": {"url": urls(vhost)["rabbitmq"]}}, "broken")
    cluster = new_cluster(world, "broken")
    try:
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            c = d["spec"]["template"]["spec"]["containers"][0]
            if d["metadata"]["name"].endswith("-ingress"):
                c["env"].append({"name": "CORREU_SMTP_LISTNE", "value": "0.0.0.0:25"})
            if d["metadata"]["name"].endswith("-storage"):
                c["env"].append({"name": "CORREU_STORAGE_ROOT", "value": "/var/lib/correu/elsewhere"})
        cluster.apply([d for d in docs if not d["metadata"]["name"].endswith("-delivery")])
        cluster.start_workloads()
        deadline = time.time() + 30
        while time.time() < deadline:
            text = "\n".join(cluster.failures)
            if "would crash-loop" in text and "wrote outside its volumes" in text:
                break
            time.sleep(0.5)
        text = "\n".join(cluster.failures)
        check("would crash-loop" in text and "smtp.listne" in text,
              f"the runner reports a crash-looping ingress with its log: {text[:2000]}")
        check("storage" in text and "wrote outside its volumes" in text and "elsewhere" in text,
              f"the runner reports storage writing outside its volumes: {text[:2000]}")
    finally:
        cluster.close()


# ---------------------------------------------------- the broker cluster


def broker_cluster(world):
    """Production RabbitMQ is a cluster: kill -9 the node Correu's
    connections use, under load."""
    say("broker cluster: three RabbitMQ nodes")
    cluster = new_cluster(world, "broker", rabbit=None)
    nodes = None
    try:
        ips = [cluster.net.host_address(f"10.{cluster.net.x}.0.{201 + i}") for i in range(3)]
        nodes = rabbit_cluster.Cluster(world.work, ips)
        took = nodes.start()
        say(f"broker cluster: formed in {took:.0f} s")
        # A headless Service: the name resolves to every node.
        cluster.external_service("rabbitmq", 5672, None, headless_ips=ips)
        # All the load comes from one client address (the runner's proxy):
        # no per-client limits, which are not what this measures.
        docs = render({"rabbitmq": {"url": "amqp://guest:guest@rabbitmq:5672/%2f"},
                       "config": {"smtp": {"connection_rate": 0, "message_rate": 0}}}, "correu")
        cluster.apply(docs)
        cluster.start_workloads()
        cluster.wait_ready(90)
        claim = next(iter(cluster.claims.values()))
        smtp = cluster.address("correu-ingress", "smtp")
        accepted, refused, errors = {}, [], []
        stop = threading.Event()
        lock = threading.Lock()
        kill_at = {}

        def client(n):
            i = 0
            while not stop.is_set():
                i += 1
                token = f"cluster-{n}-{i}"
                try:
                    qid = send(smtp, "pere@example.org", token)
                    with lock:
                        accepted[qid] = (token, time.time())
                except (AssertionError, smtplib.SMTPException, OSError) as e:
                    with lock:
                        refused.append((token, time.time(), str(e)[:200]))
                    time.sleep(0.2)
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in clients:
            t.start()
        time.sleep(8)
        held = {n.name: n.client_connections() for n in nodes.nodes}
        busiest = max(nodes.nodes, key=lambda n: held[n.name])
        check(held[busiest.name] > 0, f"broker cluster: Correu's connections are on some node: {held}")
        say(f"broker cluster: {len(accepted)} accepted; connections per node {held}; kill -9 {busiest.name}")
        kill_at["t"] = time.time()
        busiest.kill9()
        # The Erlang VM outlives the server script for a moment.
        gone = False
        for _ in range(50):
            try:
                socket.create_connection((busiest.ip, 5672), timeout=1).close()
                time.sleep(0.1)
            except OSError:
                gone = True
                break
        check(gone, f"broker cluster: {busiest.name} still answers 5 s after SIGKILL")
        time.sleep(15)
        stop.set()
        stopped = time.time()
        for t in clients:
            t.join()
        k = kill_at["t"]
        after = sorted(t for _, t in accepted.values() if t > k)
        if not check(after, "broker cluster: ingress accepted mail again after the node died"):
            print("refused after the kill:", [r for r in refused if r[1] > k][:5], file=sys.stderr)
            for p in cluster.pods_of("ingress") + cluster.pods_of("delivery"):
                with open(p.containers[0].log, errors="replace") as f:
                    bad = [line for line in f if '"level":"WARN"' in line or '"level":"ERROR"' in line]
                print(f"--- {p.name}\n{''.join(bad[-15:])}", file=sys.stderr)
        # What clients saw: the longest time without a 250 around the kill.
        # From the kill to the moment the clients stopped, silence counts.
        times = [k] + [t for t in after if t < stopped] + [stopped]
        gap = max(b - a for a, b in zip(times, times[1:]))
        say(f"broker cluster: longest pause between 250s after the kill: {gap:.2f} s")
        check(gap < 15, f"broker cluster: ingress back within 15 s (paused {gap:.1f} s)")
        # Refusals are the moment of the failover, not a state it stays in
        # (a channel whose quorum queue lost its leader nacked for good).
        late = [r for r in refused if r[1] > k + 5]
        check(not late, f"broker cluster: {len(late)} attempts refused more than 5 s after the kill: "
              f"{late[:3]}")
        # Every 250, stored exactly once.
        deadline = time.time() + 120
        box = os.path.join(claim, "example.org", "pere", "new")
        while time.time() < deadline:
            names = os.listdir(box) if os.path.isdir(box) else []
            if all(any(q in n for n in names) for q in accepted):
                break
            time.sleep(1)
        names = os.listdir(box) if os.path.isdir(box) else []
        missing = [q for q in accepted if not any(q in n for n in names)]
        twice = [q for q in accepted if sum(q in n for n in names) > 1]
        check(not missing, f"broker cluster: {len(missing)} of {len(accepted)} accepted messages never stored: "
              f"{missing[:5]}")
        check(not twice, f"broker cluster: stored twice: {twice[:5]}")
        # What delivery did: the longest time without a new file after the kill.
        mtimes = sorted(os.stat(os.path.join(box, n)).st_mtime for n in names)
        mtimes = [t for t in mtimes if k - 1 < t < k + 15]
        stalled = max((b - a for a, b in zip([k] + mtimes, mtimes)), default=15.0)
        say(f"broker cluster: longest pause between stored messages after the kill: {stalled:.2f} s")
        check(stalled < 15, f"broker cluster: delivery back within 15 s (paused {stalled:.1f} s)")
        tokens = {}
        for q, (token, _) in accepted.items():
            tokens.setdefault(token, []).append(q)
        check(all(len(v) == 1 for v in tokens.values()), "broker cluster: one queue id per message sent")
        say(f"broker cluster: {len(accepted)} accepted and stored once each; {len(refused)} attempts "
            f"refused (the clients tried those again)")
        why = {}
        for _, _, e in refused:
            why[e[:90]] = why.get(e[:90], 0) + 1
        for e, n in sorted(why.items(), key=lambda x: -x[1])[:3]:
            say(f"broker cluster:   {n} × {e}")
        cluster.raise_failures()
        stop_all(cluster, "broker cluster")
    except AssertionError as e:
        check(False, f"broker cluster: {e}")
    finally:
        cluster.close()
        if nodes:
            nodes.stop()


def main():
    world = World()
    try:
        release, readme_values, readme_secrets = readme_install()
        check(release == "correu", f"the README installs release correu, not {release}")
        readme_secret_names = {k: v[1] for k, v in readme_secrets.items()}
        for key in ("rabbitmq", "redis", "tls", "accounts"):
            name = readme_values.get(key, {}).get("existingSecret")
            check(name in readme_secret_names, f"the README creates the Secret its install line names for {key}: {name}")
        with open(os.path.join(CHART, "ci", "production-values.yaml")) as f:
            production = yaml.safe_load(f)
        production_secrets = {
            production["rabbitmq"]["existingSecret"]: ["url"],
            production["redis"]["existingSecret"]: ["url"],
            production["tls"]["existingSecret"]: ["tls.crt", "tls.key"],
            production["accounts"]["existingSecret"]: ["accounts", "aliases"],
            production["dkim"]["existingSecret"]: ["example.org.pem", "example.net.pem"],
            production["srs"]["existingSecret"]: ["secret"],
            production["webhook"]["existingSecret"]: ["secret"],
        }
        sets = [
            ("defaults", {"rabbitmq": {"url": "amqp://placeholder"}}, {}),
            ("readme", readme_values, readme_secret_names),
            ("production", production, production_secrets),
        ]
        extras = {
            ("correu", "defaults"): ("storage-away", "links"),
            ("mail", "defaults"): ("drain",),
            ("mail", "production"): ("unwritable",),
        }
        only = sys.argv[1:]
        for rel in ("correu", "mail"):
            for label, values, secrets in sets:
                if not only or label in only:
                    scenario(world, rel, label, values, secrets, extras.get((rel, label), ()))
        if not only or "runner" in only:
            runner_sees_failures(world)
        if not only or "broker" in only:
            broker_cluster(world)
    finally:
        world.close()
    if failures:
        print(f"\n{len(failures)} pod check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("pods: all checks passed")


if __name__ == "__main__":
    main()
