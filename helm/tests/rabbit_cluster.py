"""Three RabbitMQ nodes of a test's own, joined in one cluster, as
production runs RabbitMQ: own node names, data and log directories and
Erlang cookie, each listening for AMQP on an address of its own (the way a
headless Service's pods each have an IP), so a node can be killed with
SIGKILL without touching the machine's shared RabbitMQ.
"""

import os
import shutil
import signal
import subprocess
import time

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
# Debian's /usr/sbin wrapper switches to the rabbitmq user, whose cookie is
# not ours.
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class Node:
    def __init__(self, cluster, index, ip):
        self.cluster = cluster
        self.index = index
        self.ip = ip
        self.name = f"correu-r{index}-{os.getpid()}@localhost"
        self.dir = os.path.join(cluster.dir, f"r{index}")
        self.proc = None
        self.log = os.path.join(self.dir, "server.out")

    def env(self):
        d = self.dir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": self.cluster.dir,
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": self.ip,
            "RABBITMQ_NODE_PORT": "5672",
            "RABBITMQ_DIST_PORT": str(self.cluster.dist_base + self.index),
            "ERL_EPMD_PORT": str(self.cluster.epmd_port),
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
            "RABBITMQ_PID_FILE": os.path.join(d, "rabbit.pid"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(d, "rabbitmq-env.conf"),
        }

    def start(self):
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            # Clients come from pod addresses, not loopback.
            f.write("loopback_users = none\n"
                    "disk_free_limit.absolute = 50MB\n"
                    "log.console = false\nlog.file.level = warning\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(self.dir, "rabbitmq-env.conf"), "w") as f:
            f.write("")
        self.proc = subprocess.Popen([SERVER], env=self.env(), cwd=self.dir,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def ctl(self, *args, check=True, timeout=120):
        r = subprocess.run([CTL, "-n", self.name, *args], env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {r.stdout}{r.stderr}\n"
                                 f"{self.output()}")
        return r

    def wait_started(self, within=120):
        deadline = time.time() + within
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
            if self.ctl("await_startup", "--timeout", "10", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.name} did not start within {within} s:\n{self.output()}")

    def output(self):
        try:
            with open(self.log) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def beam_pids(self):
        """The Erlang VM of this node (the server script execs it, but be sure)."""
        out = subprocess.run(["pgrep", "-f", f"-sname {self.name}|-name {self.name}|{self.name}"],
                             capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if int(p) != os.getpid()]

    def kill9(self):
        """A node failure: SIGKILL to the whole node, no goodbye to its peers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.beam_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def client_connections(self):
        """How many AMQP client connections this node holds now (the
        listing is the whole cluster's: each row says its node)."""
        r = self.ctl("list_connections", "pid", "--quiet", "--no-table-headers", check=False,
                     timeout=30)
        if r.returncode != 0:
            return 0
        # An Erlang pid names its node: <NODE.1.2.3>.
        return sum(1 for line in r.stdout.splitlines() if f"<{self.name}." in line)


class Cluster:
    """Three nodes, r1 first, r2 and r3 joined to it."""

    def __init__(self, workdir, ips):
        self.dir = os.path.join(workdir, "rabbitmq-cluster")
        os.makedirs(self.dir, exist_ok=True)
        cookie = os.path.join(self.dir, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(f"CORREUCLUSTERTEST{os.getpid()}")
        os.chmod(cookie, 0o400)
        base = 21000 + (os.getpid() % 500) * 8
        self.epmd_port = base
        self.dist_base = base + 1
        self.nodes = [Node(self, i + 1, ip) for i, ip in enumerate(ips)]

    def start(self):
        started = time.time()
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_started()
        first = self.nodes[0]
        for n in self.nodes[1:]:
            n.ctl("stop_app")
            n.ctl("join_cluster", first.name)
            n.ctl("start_app")
            n.ctl("await_startup", "--timeout", "120")
        status = first.ctl("cluster_status", "--formatter", "json").stdout
        for n in self.nodes:
            if n.name not in status:
                raise AssertionError(f"{n.name} is not in the cluster: {status}")
        return time.time() - started

    def stop(self):
        for n in self.nodes:
            if n.proc and n.proc.poll() is None:
                n.ctl("shutdown", check=False, timeout=60)
        for n in self.nodes:
            if n.proc and n.proc.poll() is None:
                try:
                    os.killpg(n.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # The cluster's own epmd (the nodes started it as a daemon).
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True,
                       env={"PATH": "/usr/bin:/bin", "ERL_EPMD_PORT": str(self.epmd_port)})
        shutil.rmtree(self.dir, ignore_errors=True)
