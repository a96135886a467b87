//! Running `ip`, `bridge` and `nft` in a network namespace.
//!
//! Batches go through one process (`ip -batch -`, `nft -f -`), so that
//! programming a host with a thousand interfaces costs a handful of
//! processes, not thousands. Listings use `ip -json`.

use super::NetError;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A network namespace by name (`/run/netns/<name>`); `None` is the agent's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ns(pub Option<String>);

impl Ns {
    pub fn named(name: &str) -> Ns {
        Ns(Some(name.to_string()))
    }

    pub fn own() -> Ns {
        Ns(None)
    }

    fn args(&self) -> Vec<String> {
        match &self.0 {
            Some(n) => vec!["-n".into(), n.clone()],
            None => vec![],
        }
    }

    /// Runs `tool` (ip or bridge) with `args` in this namespace; its stdout.
    pub async fn run(&self, tool: &'static str, args: &[&str]) -> Result<String, NetError> {
        let mut cmd = Command::new(tool);
        cmd.args(self.args()).args(args);
        output(tool, cmd, None).await
    }

    /// `ip -batch -` (or `bridge -batch -`) with one command per line; all or
    /// the first error (later lines are not run).
    pub async fn batch(&self, tool: &'static str, lines: &[String]) -> Result<(), NetError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new(tool);
        cmd.args(self.args()).args(["-batch", "-"]);
        output(tool, cmd, Some(lines.join("\n") + "\n")).await.map(|_| ())
    }

    /// Loads an nft script in this namespace (one transaction: all or nothing).
    pub async fn nft(&self, script: &str) -> Result<(), NetError> {
        let mut cmd = match &self.0 {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, "nft", "-f", "-"]);
                c
            }
            None => {
                let mut c = Command::new("nft");
                c.args(["-f", "-"]);
                c
            }
        };
        cmd.kill_on_drop(true);
        output("nft", cmd, Some(script.to_string())).await.map(|_| ())
    }

    /// Sets a sysctl in this namespace (`net.ipv4.ip_forward=1`): written to
    /// /proc/sys by a process inside the namespace.
    /// Several sysctls of this namespace in one command (`sysctl -w`).
    pub async fn sysctls(&self, settings: &[(&str, &str)]) -> Result<(), NetError> {
        let mut cmd = match &self.0 {
            None => Command::new("sysctl"),
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, "sysctl"]);
                c
            }
        };
        cmd.args(["-q", "-w"]).args(settings.iter().map(|(k, v)| format!("{k}={v}"))).stdout(Stdio::null());
        output("sysctl", cmd, None).await.map(|_| ())
    }

    pub async fn sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        match &self.0 {
            None => tokio::fs::write(&path, value).await.map_err(|e| NetError::Io { what: path, source: e }),
            Some(n) => {
                let mut cmd = Command::new("ip");
                // `tee` is coreutils; no shell is involved.
                cmd.args(["netns", "exec", n, "tee", &path]).stdout(Stdio::null());
                output("tee", cmd, Some(value.to_string())).await.map(|_| ())
            }
        }
    }

    /// `ip -json <args>` parsed.
    pub async fn json(&self, tool: &'static str, args: &[&str]) -> Result<serde_json::Value, NetError> {
        let mut all = vec!["-json"];
        all.extend_from_slice(args);
        let out = self.run(tool, &all).await?;
        if out.trim().is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        serde_json::from_str(&out).map_err(|e| NetError::Parse(format!("{tool} {}: {e}", args.join(" "))))
    }
}

async fn output(tool: &'static str, mut cmd: Command, stdin: Option<String>) -> Result<String, NetError> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| NetError::Io { what: format!("run {tool}"), source: e })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(|e| NetError::Io { what: format!("write to {tool}"), source: e })?;
    }
    let out = child.wait_with_output().await.map_err(|e| NetError::Io { what: format!("wait for {tool}"), source: e })?;
    if !out.status.success() {
        return Err(NetError::Command { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
