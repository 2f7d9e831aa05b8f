"""A pod runner: the chart's rendered workloads, each pod started as a
kubelet and a container runtime start it, on this machine, without a
cluster.

What a pod gets, and nothing more:
- its own network namespace and address on a bridge; Services get cluster
  addresses served by a small kube-proxy (in this process) that sends each
  connection to a *ready* endpoint, and names are answered by a cluster DNS
  (dnsmasq) through the resolv.conf a kubelet writes (search domains,
  ndots:5);
- for each container: the image's file system (an overlay, read-only when
  `readOnlyRootFilesystem`), the volumes it mounts (ConfigMap and Secret
  items as files with their modes, emptyDirs, claims shared between the
  pods that mount them, subPaths), the pod's user, group and fsGroup, no
  capabilities, and exactly its environment: the image's, the kubelet's
  (HOSTNAME, KUBERNETES_SERVICE_*, every Service's link variables unless
  `enableServiceLinks: false`), then the container's own with downward-API
  and Secret references resolved;
- its startup, readiness and liveness probes, polled on their periods.

A container that exits (it would crash-loop), never starts or becomes
ready, fails a liveness probe, or writes where it has no volume (the root
is read-only: its log says so) is a failure the runner reports with the
end of its log.

Images: the Correu image is made as deploy/Dockerfile makes it (the binary,
the libraries it links, CA certificates, the distroless users; ENTRYPOINT,
USER and ENV read from the Dockerfile); a Dovecot image is this machine's
root file system, which has Debian's Dovecot. Anything else is refused.
"""

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INIT = os.path.join(HERE, "container_init.py")
DOMAIN = "cluster.local"


class RunnerError(AssertionError):
    pass


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RunnerError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- images


class Image:
    def __init__(self, ref, lower, entrypoint, cmd, env, user, workdir="/"):
        self.ref, self.lower = ref, lower
        self.entrypoint, self.cmd, self.env = entrypoint, cmd, env
        self.user, self.workdir = user, workdir


def dockerfile_final_stage(path):
    """ENTRYPOINT, CMD, USER and ENV of the Dockerfile's default target."""
    with open(path) as f:
        text = f.read()
    stages, current = {}, None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            current = dict(stages.get(base, {"env": {}}))
            current["env"] = dict(current.get("env", {}))
            if name:
                stages[name] = current
            stages["__last__"] = current
        elif word in ("ENTRYPOINT", "CMD"):
            current[word.lower()] = json.loads(rest)
        elif word == "USER":
            current["user"] = rest.strip()
        elif word == "ENV":
            k, _, v = rest.partition("=")
            current["env"][k.strip()] = v.strip()
    return stages["__last__"]


def build_correu_image(workdir, binary):
    """deploy/Dockerfile's image, made from the binary built here."""
    final = dockerfile_final_stage(os.path.join(ROOT, "deploy", "Dockerfile"))
    lower = os.path.join(workdir, "image-correu")
    if os.path.isdir(lower):
        shutil.rmtree(lower)
    for d in ("usr/local/bin", "etc/ssl/certs", "tmp", "home/nonroot", "var/lib/correu"):
        os.makedirs(os.path.join(lower, d), exist_ok=True)
    os.chmod(os.path.join(lower, "tmp"), 0o1777)
    os.chown(os.path.join(lower, "var/lib/correu"), 65532, 65532)
    os.chown(os.path.join(lower, "home/nonroot"), 65532, 65532)
    for name in ("correu", "correu-ingress", "correu-delivery", "correu-storage"):
        src = os.path.join(os.path.dirname(binary), name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(lower, "usr/local/bin", name))
    # The libraries it links (distroless/cc has glibc and libgcc).
    for line in sh("ldd", binary).stdout.splitlines():
        m = re.search(r"(/\S+)", line)
        if m and os.path.exists(m.group(1)):
            lib = m.group(1)
            dst = os.path.join(lower, lib.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dst)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", os.path.join(lower, "etc/ssl/certs/ca-certificates.crt"))
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
                      "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        "etc/group": "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n",
        "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }
    for p, text in files.items():
        with open(os.path.join(lower, p), "w") as f:
            f.write(text)
    user = final.get("user", "0").split(":")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **final.get("env", {})}
    return Image("correu", lower, final.get("entrypoint", []), final.get("cmd", []), env,
                 (int(user[0]), int(user[1]) if len(user) > 1 else int(user[0])))


def host_image(ref, entrypoint):
    """An image that is this machine's root file system (Debian's packages)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    return Image(ref, "/", entrypoint, [], env, (0, 0))


# --------------------------------------------------------------- network


class Network:
    """A bridge for the pods; pod i gets 10.X.0.i, Services 10.X.1.i.

    Each network of a run has names and a subnet of its own: a scenario's
    namespaces may outlive its close() by a moment (a process still inside
    one), and reusing their names or addresses in the next scenario gave
    it a pod whose address answered from the old one."""

    made = 0

    def __init__(self):
        Network.made += 1
        tag = f"{os.getpid() % 1000}{Network.made % 100:02d}"
        self.x = 100 + (os.getpid() + Network.made) % 100
        self.bridge = f"kt{tag}"
        self.tag = tag
        self.gateway = f"10.{self.x}.0.1"
        self.next_pod = 2
        self.next_service = 1
        self.namespaces = []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def pod_address(self):
        ip = f"10.{self.x}.0.{self.next_pod}"
        self.next_pod += 1
        if self.next_pod > 199:
            raise RunnerError("more than 198 pods")
        return ip

    def host_address(self, ip):
        """An address of this host on the bridge (a Service, a node, a load balancer)."""
        sh("ip", "addr", "add", f"{ip}/32", "dev", self.bridge)
        return ip

    def service_address(self):
        ip = f"10.{self.x}.1.{self.next_service}"
        self.next_service += 1
        return self.host_address(ip)

    def make_netns(self, ip):
        n = len(self.namespaces)
        ns = f"kt{self.tag}-{n}"
        host, peer = f"kt{self.tag}h{n}", f"kt{self.tag}p{n}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "link", "set", host, "master", self.bridge)
        sh("ip", "link", "set", host, "up")
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "set", peer, "name", "eth0"],
                    ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"],
                    ["ip", "route", "add", "default", "via", self.gateway]):
            sh("ip", "netns", "exec", ns, *cmd)
        return ns

    def close(self):
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


class Dns:
    """The cluster's DNS: dnsmasq answering from a hosts file we rewrite."""

    def __init__(self, net, workdir):
        self.hosts = os.path.join(workdir, "cluster-hosts")
        with open(self.hosts, "w"):
            pass
        self.log = os.path.join(workdir, "dnsmasq.log")
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
             f"--listen-address={net.gateway}", "--port=53", f"--addn-hosts={self.hosts}",
             f"--local=/{DOMAIN}/", "--user=root", "--no-negcache", "--log-facility=-"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.server = net.gateway
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RunnerError(f"dnsmasq did not start: {tail(self.log)}")

    def set(self, records):
        with open(self.hosts + ".new", "w") as f:
            for name, ips in sorted(records.items()):
                for ip in ips:
                    f.write(f"{ip} {name}\n")
        os.replace(self.hosts + ".new", self.hosts)
        self.proc.send_signal(signal.SIGHUP)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Proxy:
    """kube-proxy in user space: each Service address and port sends every
    connection to one ready endpoint, or refuses it when there is none.
    A load balancer's address may add a PROXY v1 header, from an address of
    its own, as cloud load balancers do when told to."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def serve(self, ip, port, pick, proxy_from=None):
        async def handle(reader, writer):
            target = pick()
            if target is None:
                writer.transport.abort()
                return
            try:
                if proxy_from:
                    r2, w2 = await asyncio.open_connection(target[0], target[1], local_addr=(proxy_from, 0))
                    peer, here = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
                    w2.write(f"PROXY TCP4 {peer[0]} {here[0]} {peer[1]} {here[1]}\r\n".encode())
                else:
                    r2, w2 = await asyncio.open_connection(target[0], target[1])
            except OSError:
                writer.transport.abort()
                return

            async def pipe(a, b):
                try:
                    while True:
                        data = await a.read(65536)
                        if not data:
                            break
                        b.write(data)
                        await b.drain()
                except (OSError, asyncio.CancelledError):
                    pass
                finally:
                    try:
                        b.close()
                    except OSError:
                        pass

            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

        async def start():
            return await asyncio.start_server(handle, ip, port, reuse_address=True)

        self.servers.append(asyncio.run_coroutine_threadsafe(start(), self.loop).result(10))

    def close(self):
        for s in self.servers:
            self.loop.call_soon_threadsafe(s.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ------------------------------------------------------------------ pods


PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1,
                  "successThreshold": 1, "failureThreshold": 3}


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


class Container:
    def __init__(self, pod, spec, image):
        self.pod, self.spec, self.image = pod, spec, image
        self.name = spec["name"]
        self.log = os.path.join(pod.dir, f"{self.name}.log")
        self.proc = None
        self.started = False
        self.ready = False
        self.exit_code = None
        self.last_probe = {}
        self.counts = {}
        self.next_probe = {}
        self.expected_exit = False

    def security(self):
        pod_sc = self.pod.spec.get("securityContext") or {}
        sc = self.spec.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", self.image.user[0]))
        image_gid = self.image.user[1] if uid == self.image.user[0] else 0
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", image_gid))
        if uid == 0:
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                raise RunnerError(f"{self.pod.name}/{self.name}: runAsNonRoot, but it would run as root: "
                                  "the kubelet refuses to start it")
            raise RunnerError(f"{self.pod.name}/{self.name}: would run as root; the runner runs only non-root containers")
        groups = sorted({gid, *pod_sc.get("supplementalGroups", []),
                         *([pod_sc["fsGroup"]] if "fsGroup" in pod_sc else [])})
        return {
            "uid": uid, "gid": gid, "groups": groups,
            "readonly_root": bool(sc.get("readOnlyRootFilesystem")),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
        }

    def environment(self):
        env = dict(self.image.env)
        env["HOSTNAME"] = self.pod.name
        cluster = self.pod.cluster
        env.update(cluster.kubernetes_env())
        if self.pod.spec.get("enableServiceLinks", True) or self.pod.force_service_links:
            env.update(cluster.service_links())
        for e in self.spec.get("envFrom") or []:
            src = e.get("secretRef") or e.get("configMapRef")
            data = cluster.lookup_data("secret" if "secretRef" in e else "configmap", src["name"])
            for k, v in data.items():
                env[e.get("prefix", "") + k] = v
        for e in self.spec.get("env") or []:
            name = e["name"]
            if "value" in e:
                env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                   lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
                continue
            vf = e.get("valueFrom") or {}
            if "fieldRef" in vf:
                env[name] = self.pod.field(vf["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind = "secret" if "secretKeyRef" in vf else "configmap"
                ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
                data = cluster.lookup_data(kind, ref["name"], optional=ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise RunnerError(f"{self.pod.name}/{self.name}: {kind} {ref['name']} has no key "
                                      f"{ref['key']} (CreateContainerConfigError)")
                env[name] = data[ref["key"]]
            elif "resourceFieldRef" in vf:
                env[name] = str((self.spec.get("resources") or {}).get("limits", {}).get(
                    vf["resourceFieldRef"]["resource"].split(".")[-1], "0"))
            else:
                raise RunnerError(f"{self.pod.name}/{self.name}: env {name}: unsupported {vf}")
        return env

    def argv(self):
        cmd = self.spec.get("command")
        args = self.spec.get("args")
        if cmd is not None:
            return list(cmd) + list(args or [])
        return list(self.image.entrypoint) + list(args if args is not None else self.image.cmd)

    def start(self):
        sec = self.security()
        env = self.environment()
        env = {k: str(v) for k, v in env.items()}
        base = os.path.join(self.pod.dir, f"rootfs-{self.name}")
        for d in ("upper", "work", "merged"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        mounts = []
        for m in self.spec.get("volumeMounts") or []:
            src = self.pod.volumes.get(m["name"])
            if src is None:
                raise RunnerError(f"{self.pod.name}/{self.name}: mounts volume {m['name']}, which the pod lacks")
            if m.get("subPath"):
                src = os.path.join(src, m["subPath"])
                if not os.path.exists(src):
                    os.makedirs(src)
            mounts.append({"source": src, "path": m["mountPath"], "readonly": bool(m.get("readOnly")),
                           "file": os.path.isfile(src)})
        for path, src in self.pod.kubelet_files().items():
            mounts.append({"source": src, "path": path, "readonly": path != "/dev/termination-log",
                           "file": True})
        spec = {"lower": self.image.lower, "upper": os.path.join(base, "upper"),
                "work": os.path.join(base, "work"), "merged": os.path.join(base, "merged"),
                "mounts": mounts, "env": env, "argv": self.argv(),
                "cwd": self.spec.get("workingDir") or self.image.workdir, **sec}
        spec_path = os.path.join(self.pod.dir, f"{self.name}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.pod.netns}", "--",
             "unshare", "--mount", "--propagation", "private", "--",
             sys.executable, INIT, spec_path],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            start_new_session=True)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = self.spec.get(kind)
            if p:
                self.next_probe[kind] = time.time() + p.get("initialDelaySeconds", 0)
        if "startupProbe" not in self.spec:
            self.started = True
        if "readinessProbe" not in self.spec:
            self.ready = True

    def port(self, ref):
        if isinstance(ref, int) or str(ref).isdigit():
            return int(ref)
        for p in self.spec.get("ports") or []:
            if p.get("name") == ref:
                return p["containerPort"]
        raise RunnerError(f"{self.pod.name}/{self.name}: probe names port {ref!r}, which the container lacks")

    def run_probe(self, probe):
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            h = probe["httpGet"]
            url = f"http://{self.pod.ip}:{self.port(h['port'])}{h.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400, f"GET {url}: {r.status}"
            except urllib.error.HTTPError as e:
                return False, f"GET {url}: {e.code} {e.read().decode(errors='replace').strip()}"
            except Exception as e:
                return False, f"GET {url}: {e}"
        if "tcpSocket" in probe:
            port = self.port(probe["tcpSocket"]["port"])
            try:
                with socket.create_connection((self.pod.ip, port), timeout=timeout):
                    return True, f"tcp {self.pod.ip}:{port} open"
            except OSError as e:
                return False, f"tcp {self.pod.ip}:{port}: {e}"
        if "exec" in probe:
            sec = self.security()
            r = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "-n", "-r", "-w",
                                "-S", str(sec["uid"]), "-G", str(sec["gid"]), "--", *probe["exec"]["command"]],
                               capture_output=True, text=True, timeout=timeout + 5)
            return r.returncode == 0, f"exec {probe['exec']['command']}: {r.returncode} {r.stdout}{r.stderr}"
        raise RunnerError(f"{self.pod.name}/{self.name}: unsupported probe {probe}")

    def tick(self):
        """One round of the kubelet's probing; returns failures."""
        if self.proc is None:
            return []
        code = self.proc.poll()
        if code is not None:
            if self.exit_code is None:
                self.exit_code = code
                self.ready = False
                if not self.expected_exit and self.pod.restart_policy != "Never":
                    return [f"{self.pod.name}/{self.name} exited with code {code} (it would crash-loop):\n"
                            f"{tail(self.log)}"]
            return []
        now = time.time()
        failures = []
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = self.spec.get(kind)
            if not probe or now < self.next_probe.get(kind, 0):
                continue
            if kind != "startupProbe" and not self.started:
                continue
            if kind == "startupProbe" and self.started:
                continue
            p = {**PROBE_DEFAULTS, **probe}
            self.next_probe[kind] = now + p["periodSeconds"]
            ok, what = self.run_probe(p)
            self.last_probe[kind] = what
            ok_n, fail_n = self.counts.get(kind, (0, 0))
            ok_n, fail_n = (ok_n + 1, 0) if ok else (0, fail_n + 1)
            self.counts[kind] = (ok_n, fail_n)
            if kind == "startupProbe":
                if ok:
                    self.started = True
                    for k in ("readinessProbe", "livenessProbe"):
                        self.next_probe[k] = now
                elif fail_n >= p["failureThreshold"]:
                    failures.append(f"{self.pod.name}/{self.name} never started: its startup probe failed "
                                    f"{fail_n} times ({what}):\n{tail(self.log)}")
                    self.stop(0)
            elif kind == "livenessProbe":
                if not ok and fail_n >= p["failureThreshold"]:
                    failures.append(f"{self.pod.name}/{self.name} would be restarted by its liveness probe "
                                    f"({what}):\n{tail(self.log)}")
                    self.stop(0)
            else:
                was = self.ready
                if ok and ok_n >= p["successThreshold"]:
                    self.ready = True
                elif not ok and fail_n >= p["failureThreshold"]:
                    self.ready = False
                if was != self.ready:
                    self.pod.cluster.endpoints_changed()
        return failures

    def stop(self, grace):
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return "killed after its grace period"


class Pod:
    def __init__(self, cluster, name, template, owner, restart_policy="Always"):
        self.cluster = cluster
        self.name = name
        self.labels = dict((template.get("metadata") or {}).get("labels") or {})
        self.annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        self.spec = template["spec"]
        self.owner = owner
        self.restart_policy = self.spec.get("restartPolicy", restart_policy)
        self.dir = os.path.join(cluster.workdir, "pods", name)
        os.makedirs(self.dir, exist_ok=True)
        self.ip = cluster.net.pod_address()
        self.netns = None
        self.volumes = {}
        self.force_service_links = cluster.force_service_links
        self.containers = []
        self.stopped = False

    def field(self, path):
        values = {"metadata.name": self.name, "metadata.namespace": self.cluster.namespace,
                  "spec.nodeName": "node-1", "status.podIP": self.ip, "status.hostIP": self.cluster.net.gateway,
                  "metadata.uid": hashlib.sha1(self.name.encode()).hexdigest(),
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", "default")}
        m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (self.labels if m.group(1) == "labels" else self.annotations).get(m.group(2), "")
        if path not in values:
            raise RunnerError(f"{self.name}: unsupported fieldRef {path}")
        return values[path]

    def kubelet_files(self):
        d = os.path.join(self.dir, "kubelet")
        if not os.path.isdir(d):
            os.makedirs(d)
            ns = self.cluster.namespace
            with open(os.path.join(d, "hosts"), "w") as f:
                f.write(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{self.ip}\t{self.name}\n")
            with open(os.path.join(d, "resolv.conf"), "w") as f:
                f.write(f"search {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\nnameserver {self.cluster.dns.server}\n"
                        "options ndots:5\n")
            with open(os.path.join(d, "hostname"), "w") as f:
                f.write(self.name + "\n")
            open(os.path.join(d, "termination-log"), "w").close()
            os.chmod(os.path.join(d, "termination-log"), 0o666)
        return {"/etc/hosts": os.path.join(d, "hosts"), "/etc/resolv.conf": os.path.join(d, "resolv.conf"),
                "/etc/hostname": os.path.join(d, "hostname"),
                "/dev/termination-log": os.path.join(d, "termination-log")}

    def make_volumes(self):
        sc = self.spec.get("securityContext") or {}
        fs_group = sc.get("fsGroup")
        for v in self.spec.get("volumes") or []:
            name = v["name"]
            path = os.path.join(self.dir, "volumes", name)
            if "emptyDir" in v:
                os.makedirs(path)
                os.chmod(path, 0o777)
            elif "configMap" in v or "secret" in v:
                kind = "configmap" if "configMap" in v else "secret"
                src = v.get("configMap") or v.get("secret")
                ref = src.get("name") or src.get("secretName")
                data = self.cluster.lookup_data(kind, ref, optional=src.get("optional", False), raw=True)
                mode = src.get("defaultMode", 0o644)
                os.makedirs(path)
                os.chmod(path, 0o755)
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise RunnerError(f"{self.name}: {kind} {ref} has no key {item['key']}")
                    target = os.path.join(path, item["path"])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(data[item["key"]])
                    os.chmod(target, item.get("mode", mode))
                    if fs_group is not None:
                        os.chown(target, 0, fs_group)
                if fs_group is not None:
                    os.chown(path, 0, fs_group)
            elif "persistentVolumeClaim" in v:
                path = self.cluster.claim(v["persistentVolumeClaim"]["claimName"], fs_group)
            else:
                raise RunnerError(f"{self.name}: unsupported volume {v}")
            self.volumes[name] = path

    def start(self):
        self.netns = self.cluster.net.make_netns(self.ip)
        self.make_volumes()
        for c in self.spec["containers"]:
            image = self.cluster.image(c["image"])
            container = Container(self, c, image)
            self.containers.append(container)
        for c in self.containers:
            c.start()

    def ready(self):
        return not self.stopped and all(c.ready for c in self.containers)

    def port(self, ref):
        for c in self.containers:
            for p in c.spec.get("ports") or []:
                if ref == p.get("name") or ref == p["containerPort"]:
                    return p["containerPort"]
        if isinstance(ref, int):
            return ref
        return None

    def tick(self):
        out = []
        for c in self.containers:
            out += c.tick()
        return out

    def stop(self):
        """Deletion: SIGTERM to every container, SIGKILL after the pod's grace."""
        self.stopped = True
        self.cluster.endpoints_changed()
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        results = {}
        threads = []

        def one(c):
            results[c.name] = c.stop(grace)
        for c in self.containers:
            t = threading.Thread(target=one, args=(c,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        return results

    def logs(self, container=None):
        c = self.containers[0] if container is None else next(x for x in self.containers if x.name == container)
        with open(c.log, errors="replace") as f:
            return f.read()


# --------------------------------------------------------------- cluster


class Cluster:
    """One namespace of a cluster, on this machine."""

    def __init__(self, namespace, workdir, correu_image, force_service_links=False, lb_source=None):
        self.namespace = namespace
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.force_service_links = force_service_links
        self.secrets = {}
        self.configmaps = {}
        self.services = {}
        self.workloads = []
        self.scalers = {}
        self.tests = []
        self.pods = []
        self.claims = {}
        self.failures = []
        self.lock = threading.RLock()
        self.correu = correu_image
        # Where a load balancer that speaks the PROXY protocol connects from.
        self.lb_source = lb_source
        self.net = Network()
        self.dns = Dns(self.net, workdir)
        self.proxy = Proxy()
        self.external = {}
        self.stop_probing = threading.Event()
        self.prober = threading.Thread(target=self.probe_loop, daemon=True)
        self.prober.start()

    # Objects.
    def add_secret(self, name, data, type_="Opaque"):
        self.secrets[name] = {k: (v.encode() if isinstance(v, str) else v) for k, v in data.items()}

    def lookup_data(self, kind, name, optional=False, raw=False):
        store = self.secrets if kind == "secret" else self.configmaps
        if name not in store:
            if optional:
                return {}
            raise RunnerError(f"{kind} {name} does not exist in namespace {self.namespace}: "
                              "the pod would wait in ContainerCreating")
        data = store[name]
        return data if raw else {k: v.decode() for k, v in data.items()}

    def image(self, ref):
        repo = ref.rsplit(":", 1)[0]
        if repo.endswith("/correu") or repo == "correu":
            return self.correu
        if "dovecot" in repo:
            if not os.path.exists("/usr/sbin/dovecot"):
                raise RunnerError("no Dovecot on this machine (Debian's dovecot-imapd)")
            return host_image(ref, ["/usr/sbin/dovecot", "-F"])
        raise RunnerError(f"the runner cannot run the image {ref}")

    def claim(self, name, fs_group):
        if name not in self.claims:
            path = os.path.join(self.workdir, "claims", name)
            os.makedirs(path)
            # A new volume's root is root's; the kubelet gives it to fsGroup.
            os.chown(path, 0, fs_group if fs_group is not None else 0)
            os.chmod(path, 0o2775 if fs_group is not None else 0o755)
            self.claims[name] = path
        return self.claims[name]

    def apply(self, docs):
        for d in docs:
            kind, meta = d["kind"], d["metadata"]
            if kind == "ConfigMap":
                self.configmaps[meta["name"]] = {k: v.encode() for k, v in (d.get("data") or {}).items()}
            elif kind == "Secret":
                data = {k: base64.b64decode(v) for k, v in (d.get("data") or {}).items()}
                data.update({k: v.encode() for k, v in (d.get("stringData") or {}).items()})
                self.secrets[meta["name"]] = data
            elif kind == "Service":
                self.add_service(d)
            elif kind in ("Deployment", "StatefulSet"):
                self.workloads.append(d)
            elif kind == "HorizontalPodAutoscaler":
                self.scalers[d["spec"]["scaleTargetRef"]["name"]] = d["spec"].get("minReplicas", 1)
            elif kind == "ScaledObject":
                self.scalers[d["spec"]["scaleTargetRef"]["name"]] = d["spec"].get("minReplicaCount", 0)
            elif kind == "Pod" and (meta.get("annotations") or {}).get("helm.sh/hook") == "test":
                self.tests.append(d)

    def add_service(self, d, endpoints=None):
        """A Service; `endpoints` (ip, port) for one without a selector."""
        name = d["metadata"]["name"]
        spec = d["spec"]
        headless = spec.get("clusterIP") == "None"
        svc = {"doc": d, "name": name, "ip": None if headless else self.net.service_address(),
               "endpoints": endpoints, "next": 0, "lb": None}
        self.services[name] = svc
        if not headless:
            for p in spec["ports"]:
                self.proxy.serve(svc["ip"], p["port"], lambda p=p, svc=svc: self.pick(svc, p))
            if spec.get("type") == "LoadBalancer":
                # The cloud's load balancer: an address of its own, and a
                # PROXY header when an annotation asks for one.
                svc["lb"] = self.net.service_address()
                annotations = d["metadata"].get("annotations") or {}
                proxied = any("proxy-protocol" in k for k in annotations)
                if proxied and not self.lb_source:
                    raise RunnerError(f"Service {name} asks for the PROXY protocol: give the runner lb_source")
                for p in spec["ports"]:
                    self.proxy.serve(svc["lb"], p["port"], lambda p=p, svc=svc: self.pick(svc, p),
                                     proxy_from=self.lb_source if proxied else None)
        self.endpoints_changed()
        return svc

    def external_service(self, name, port, target, headless_ips=None):
        """A Service of the cluster that is not the chart's (the RabbitMQ and
        Redis the README says to install first)."""
        doc = {"metadata": {"name": name}, "spec": {"ports": [{"name": "main", "port": port}]}}
        if headless_ips:
            doc["spec"]["clusterIP"] = "None"
            self.external[name] = headless_ips
        return self.add_service(doc, endpoints=[target] if target else None)

    def pick(self, svc, port):
        with self.lock:
            if svc["endpoints"] is not None:
                eps = svc["endpoints"]
            else:
                eps = []
                for pod in self.pods:
                    if pod.ready() and labels_match(svc["doc"]["spec"].get("selector"), pod.labels):
                        target = pod.port(port.get("targetPort", port["port"]))
                        if target:
                            eps.append((pod.ip, target))
            if not eps:
                return None
            svc["next"] += 1
            return eps[svc["next"] % len(eps)]

    def endpoints_changed(self):
        with self.lock:
            records = {}
            for name, svc in self.services.items():
                fqdn = f"{name}.{self.namespace}.svc.{DOMAIN}"
                if svc["ip"]:
                    records[fqdn] = [svc["ip"]]
                elif name in self.external:
                    records[fqdn] = self.external[name]
                else:
                    records[fqdn] = [p.ip for p in self.pods
                                     if p.ready() and labels_match(svc["doc"]["spec"].get("selector"), p.labels)]
            for name, ips in getattr(self, "extra_records", {}).items():
                records[name] = ips
            self.dns.set(records)

    def add_record(self, fqdn, ips):
        if not hasattr(self, "extra_records"):
            self.extra_records = {}
        self.extra_records[fqdn] = ips
        self.endpoints_changed()

    def kubernetes_env(self):
        return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
                "KUBERNETES_SERVICE_PORT_HTTPS": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
                "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443", "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                "KUBERNETES_PORT_443_TCP_PORT": "443", "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1"}

    def service_links(self):
        """The variables the kubelet gives for every Service with a cluster address."""
        env = {}
        for name, svc in self.services.items():
            if not svc["ip"]:
                continue
            n = name.upper().replace("-", "_")
            ports = svc["doc"]["spec"]["ports"]
            env[f"{n}_SERVICE_HOST"] = svc["ip"]
            env[f"{n}_SERVICE_PORT"] = str(ports[0]["port"])
            for p in ports:
                proto = p.get("protocol", "TCP")
                if p.get("name"):
                    env[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                url = f"{proto.lower()}://{svc['ip']}:{p['port']}"
                env[f"{n}_PORT_{p['port']}_{proto}"] = url
                env[f"{n}_PORT_{p['port']}_{proto}_PROTO"] = proto.lower()
                env[f"{n}_PORT_{p['port']}_{proto}_PORT"] = str(p["port"])
                env[f"{n}_PORT_{p['port']}_{proto}_ADDR"] = svc["ip"]
            env[f"{n}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{svc['ip']}:{ports[0]['port']}"
        return env

    # Pods.
    def replicas(self, w):
        name = w["metadata"]["name"]
        if name in self.scalers:
            return max(self.scalers[name], 0)
        return w["spec"].get("replicas", 1)

    def pod_name(self, owner):
        h = hashlib.sha1(owner.encode()).hexdigest()[:10]
        s = "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        return f"{owner}-{h}-{s}"

    def start_pod(self, template, owner, restart_policy="Always"):
        pod = Pod(self, self.pod_name(owner), template, owner, restart_policy)
        with self.lock:
            self.pods.append(pod)
        try:
            pod.start()
        except RunnerError as e:
            self.failures.append(str(e))
            raise
        return pod

    def start_workloads(self):
        for w in self.workloads:
            for _ in range(self.replicas(w)):
                self.start_pod(w["spec"]["template"], w["metadata"]["name"])

    def probe_loop(self):
        while not self.stop_probing.wait(0.25):
            with self.lock:
                pods = list(self.pods)
            for p in pods:
                if p.stopped:
                    continue
                try:
                    self.failures.extend(p.tick())
                except RunnerError as e:
                    self.failures.append(str(e))
                for c in p.containers:
                    self.check_log(c)

    def check_log(self, c):
        """A read-only root filesystem tells when a container writes where it
        has no volume."""
        seen = getattr(c, "log_seen", 0)
        try:
            with open(c.log, errors="replace") as f:
                f.seek(seen)
                text = f.read()
                c.log_seen = f.tell()
        except OSError:
            return
        for line in text.splitlines():
            if "Read-only file system" in line or "os error 30" in line:
                self.failures.append(f"{c.pod.name}/{c.name} wrote outside its volumes: {line.strip()}")

    def wait_ready(self, within=90, pods=None):
        deadline = time.time() + within
        while time.time() < deadline:
            self.raise_failures()
            targets = pods if pods is not None else [p for p in self.pods if not p.stopped and p.restart_policy != "Never"]
            if all(p.ready() for p in targets):
                return
            time.sleep(0.25)
        not_ready = [p for p in (pods or self.pods) if not p.ready()]
        detail = "\n".join(f"{p.name}: " + "; ".join(f"{c.name}: {c.last_probe}" for c in p.containers)
                           + "\n" + "".join(tail(c.log, 15) for c in p.containers) for p in not_ready)
        raise RunnerError(f"never ready within {within} s:\n{detail}")

    def raise_failures(self):
        if self.failures:
            raise RunnerError("\n".join(self.failures))

    def pods_of(self, component):
        return [p for p in self.pods if p.labels.get("app.kubernetes.io/component") == component and not p.stopped]

    def address(self, service, port):
        """The cluster address of a Service's port (by name or number)."""
        svc = self.services[service]
        for p in svc["doc"]["spec"]["ports"]:
            if port in (p.get("name"), p["port"]):
                return svc["ip"], p["port"]
        raise RunnerError(f"Service {service} has no port {port}")

    def lb_address(self, service, port):
        svc = self.services[service]
        for p in svc["doc"]["spec"]["ports"]:
            if port in (p.get("name"), p["port"]):
                return svc["lb"], p["port"]
        raise RunnerError(f"Service {service} has no port {port}")

    def run_to_completion(self, pod_doc, within=120):
        """A pod that runs once (helm test): its exit code and log."""
        pod = self.start_pod({"metadata": pod_doc["metadata"], "spec": pod_doc["spec"]},
                             pod_doc["metadata"]["name"], restart_policy="Never")
        c = pod.containers[0]
        try:
            code = c.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            pod.stop()
            code = "still running after %d s" % within
        pod.stopped = True
        return code, pod.logs()

    def stop_pod(self, pod):
        return pod.stop()

    def close(self):
        self.stop_probing.set()
        for p in self.pods:
            for c in p.containers:
                if c.proc and c.proc.poll() is None:
                    try:
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    c.proc.wait()
        self.proxy.close()
        self.dns.close()
        self.net.close()


def ipv4_in(network, avoid):
    """A host address inside `network` that is not in `avoid`."""
    net = ipaddress.ip_network(network, strict=False)
    for ip in net.hosts():
        if not any(ip in ipaddress.ip_network(a) for a in avoid):
            return str(ip)
    raise RunnerError(f"no address in {network}")
