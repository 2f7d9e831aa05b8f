//! Child processes: [`Proc`] (killed when dropped, output in files), and running a command to completion.

use super::*;

/// A child process, killed when dropped; its output goes to files.
pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Started as the leader of its own process group, which is killed
    /// whole when dropped.
    group: bool,
}

impl Proc {
    pub fn spawn(
        name: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Self::spawn_inner(name, dir, program, args, env, true, false)
    }

    /// As [`Proc::spawn`], for a program that forks workers of its own
    /// (rspamd): it leads a process group, and dropping it kills the
    /// whole group, so no worker outlives the test.
    pub fn spawn_group(
        name: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Self::spawn_inner(name, dir, program, args, env, true, true)
    }

    /// As [`Proc::spawn`], but the service binds the telemetry port its
    /// configuration says (no `127.0.0.1:0` override).
    pub fn spawn_own_ports(
        name: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Self::spawn_inner(name, dir, program, args, env, false, false)
    }

    fn spawn_inner(
        name: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        any_telemetry_port: bool,
        group: bool,
    ) -> Proc {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let mut cmd = Command::new(program);
        // The caller's own CORREU_ settings must not leak into a test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CORREU_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .env("CORREU_LOG_FORMAT", "json")
            .env("CORREU_LOG", "info");
        if any_telemetry_port {
            cmd.env("CORREU_TELEMETRY_LISTEN", "127.0.0.1:0");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        if group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            name: name.into(),
            child,
            stdout,
            stderr,
            group,
        }
    }

    /// Starts `BINARY ARGS --config FILE` in `dir` (the `correu` binary
    /// from a test's `env!("CARGO_BIN_EXE_correu")`).
    pub fn correu(binary: &str, name: &str, dir: &Path, args: &[&str], config: &Path) -> Proc {
        let mut all: Vec<&str> = args.to_vec();
        let c = config.to_str().unwrap();
        all.extend(["--config", c]);
        Proc::spawn(name, dir, binary, &all, &[])
    }

    pub fn output(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            self.name,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until a line of stdout or stderr contains `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        self.wait_for_line(&[needle], within)
    }

    /// Waits for a line of output holding every one of `needles`.
    pub fn wait_for_line(&mut self, needles: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            for path in [&self.stdout, &self.stderr] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                    return line.to_string();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before saying {needles:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not say {needles:?} within {within:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address a service logged as listening (`"message":"<what>","addr":"…"`).
    pub fn listening(&mut self, what: &str) -> SocketAddr {
        let line = self.wait_for(&format!("\"message\":\"{what}\""), Duration::from_secs(30));
        let addr = line
            .split("\"addr\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no addr in {line}"));
        addr.parse().unwrap()
    }

    /// `correu serve`'s (or ingress's) first MX listener, from the
    /// structured log line it writes (`"message":"SMTP listening"`).
    pub fn serve_smtp_addr(&mut self) -> SocketAddr {
        self.serve_listeners()
            .into_iter()
            .find(|(_, role)| role == "mx")
            .unwrap_or_else(|| panic!("{} has no MX listener", self.name))
            .0
    }

    /// Every SMTP listener with its role (`mx`, `submission`,
    /// `submissions`), from the log lines ingress writes as it starts
    /// (all of them are written before the service answers).
    pub fn serve_listeners(&mut self) -> Vec<(SocketAddr, String)> {
        self.wait_for(
            "\"message\":\"telemetry listening\"",
            Duration::from_secs(30),
        );
        self.wait_for("\"message\":\"SMTP listening\"", Duration::from_secs(30));
        let text = format!(
            "{}\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        let field = |line: &str, name: &str| -> Option<String> {
            let rest = line.split(&format!("\"{name}\":\"")).nth(1)?;
            Some(rest.split('"').next()?.to_string())
        };
        text.lines()
            .filter(|l| l.contains("\"message\":\"SMTP listening\""))
            .filter_map(|l| Some((field(l, "addr")?.parse().ok()?, field(l, "role")?)))
            .collect()
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} still running after {within:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {} failed", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            let _killed = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _killed = self.child.kill();
        let _reaped = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// The Python with aiosmtpd that scripts/test prepares.
pub fn python() -> String {
    std::env::var("TESTKIT_PYTHON").unwrap_or_else(|_| {
        // scripts/test makes the venv at the workspace root.
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        if venv.exists() {
            venv.to_string_lossy().into_owned()
        } else {
            "python3".into()
        }
    })
}

/// Reads a whole file as text (lossy).
pub fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

/// Runs `program` with `input` on its standard input.
pub fn run_with_stdin(
    program: &str,
    args: &[&str],
    input: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    // A program that exits without reading its input closes the pipe:
    // that is its business, not the test's.
    let _unread = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command to completion, returning (status, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `BIN --config CFG ARGS…` with `stdin`, which must succeed; its stdout.
pub fn correu_cli(bin: &str, cfg: &Path, args: &[&str], stdin: &str) -> String {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let (st, out, err) = run_with_stdin(bin, &all, stdin);
    assert!(st.success(), "correu {args:?}: {out}{err}");
    out
}
