//! RabbitMQ: a vhost of the test's own on the shared broker ([`Vhost`]), and a private node ([`PrivateRabbit`]) a test may stop and start.

use super::*;

/// A RabbitMQ vhost of the test's own, deleted when dropped.
pub struct Vhost {
    pub name: String,
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: is RabbitMQ running on 127.0.0.1:5672?\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Vhost {
    pub fn create(tag: &str) -> Vhost {
        let name = format!("correu-test-{tag}-{}", std::process::id());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost { name }
    }

    /// The AMQP URL of this vhost through `addr` (RabbitMQ itself or a proxy).
    pub fn url(&self, addr: SocketAddr) -> String {
        format!("amqp://guest:guest@{addr}/{}", self.name)
    }

    /// Waits up to `within` for `queue` to hold `want` messages (the
    /// broker's counts lag a little behind publishes); returns the last count.
    pub fn wait_queue_len(&self, queue: &str, want: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let n = self.queue_len(queue);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Messages waiting in a queue of this vhost.
    pub fn queue_len(&self, queue: &str) -> usize {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-p",
                &self.name,
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == queue).then(|| it.next()?.parse().ok())?
            })
            .next()
            .unwrap_or(0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _deleted = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

pub const RABBITMQ: &str = "127.0.0.1:5672";

/// The CLI itself: Debian's /usr/sbin wrapper switches to the rabbitmq
/// user, whose Erlang cookie is not the private node's.
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A RabbitMQ node of the test's own (own node name, ports, data and
/// cookie), so a test can stop and start the broker under load without
/// touching the shared one. Shut down when dropped.
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    home: PathBuf,
    server: Proc,
}

impl PrivateRabbit {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home.to_string_lossy().into_owned()),
            ("RABBITMQ_NODENAME".into(), self.node.clone()),
        ]
    }

    pub fn start(dir: &Path) -> PrivateRabbit {
        let port = free_port();
        let dist = free_port();
        let node = format!("correu-test-{}-{port}@localhost", std::process::id());
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\ndisk_free_limit.absolute = 50MB\nlog.console = false\nlog.file.level = warning\n"),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let env: Vec<(String, String)> = vec![
            ("HOME".into(), d("")),
            ("RABBITMQ_NODENAME".into(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
            ("RABBITMQ_CONFIG_FILE".into(), d("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), d("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE".into(), d("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), d("log")),
            ("RABBITMQ_PID_FILE".into(), d("rabbit.pid")),
        ];
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = Proc::spawn(
            "rabbitmq",
            dir,
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            &[],
            &env_ref,
        );
        let rabbit = PrivateRabbit {
            node,
            port,
            home: dir.to_path_buf(),
            server,
        };
        // The node registers with epmd only after a while: until then the
        // CLI cannot even reach it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !rabbit.try_ctl(&["await_startup", "--timeout", "10"]) {
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ did not start\n{}",
                rabbit.server.output()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        rabbit
    }

    fn try_ctl(&self, args: &[&str]) -> bool {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        Command::new(RABBITMQCTL)
            .args(&all)
            .envs(self.env())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs rabbitmqctl against this node.
    pub fn ctl(&self, args: &[&str]) {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        let out = Command::new(RABBITMQCTL)
            .args(&all)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl {all:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server.output()
        );
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the broker application (the node stays, clients are cut off).
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.ctl(&["await_startup", "--timeout", "120"]);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _stopped = Command::new(RABBITMQCTL)
            .args(["-n", &self.node, "shutdown"])
            .envs(self.env())
            .output();
    }
}
