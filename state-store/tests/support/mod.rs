//! Helpers for tests that run `store-node` processes on loopback with
//! mutual TLS: a throwaway CA whose files live in the test's temporary
//! directory, process guards, and polling of a condition.
#![allow(dead_code)]

use nimbus_state_store::tls::dev::{DevCa, Issued};
use nimbus_state_store::TlsConfig;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    nimbus_state_store::local::free_port().expect("free port")
}

pub fn free_addr() -> String {
    nimbus_state_store::local::free_addr().expect("free port")
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves no node behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and its certificate files in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: DevCa,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let ca = DevCa::new("nimbus test CA").expect("CA");
        std::fs::write(dir.join("ca.pem"), ca.ca_pem()).expect("write ca.pem");
        Pki { dir: dir.to_path_buf(), ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Write `issued` as `<name>.crt` and `<name>.key`; returns their paths.
    pub fn write(&self, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, &issued.cert_pem).expect("write cert");
        std::fs::write(&k, &issued.key_pem).expect("write key");
        (c, k)
    }

    /// Issue and write a certificate for `sans`.
    pub fn issue(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let issued = self.ca.issue(sans).expect("issue");
        self.write(name, &issued)
    }

    /// The three TLS flags of a process holding certificate `name`.
    pub fn flags(&self, name: &str) -> Vec<String> {
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        vec![
            "--tls-ca".into(),
            self.ca_path().display().to_string(),
            "--tls-cert".into(),
            c.display().to_string(),
            "--tls-key".into(),
            k.display().to_string(),
        ]
    }

    /// A client configuration with a fresh certificate from this CA.
    pub fn client(&self) -> TlsConfig {
        self.ca.tls_config(&["nimbus-test-client"]).expect("client config")
    }
}

/// The command of a TLS `store-node` listening on `addr` (its certificate
/// names 127.0.0.1), with `extra` arguments.
pub fn tls_node_command(pki: &Pki, addr: &str, data_dir: &Path, seeds: &[String], extra: &[&str]) -> Command {
    let name = format!("node-{}", addr.replace([':', '.'], "-"));
    if !pki.dir.join(format!("{name}.crt")).exists() {
        pki.issue(&name, &["127.0.0.1"]);
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_store-node"));
    cmd.args(["--listen", addr, "--data-dir"])
        .arg(data_dir)
        .args(["--seeds", &seeds.join(",")])
        .args(pki.flags(&name))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    cmd
}

/// Start a TLS `store-node` (see [`tls_node_command`]).
pub fn spawn_tls_node(pki: &Pki, addr: &str, data_dir: &Path, seeds: &[String], extra: &[&str]) -> Proc {
    Proc(tls_node_command(pki, addr, data_dir, seeds, extra).spawn().expect("spawn store-node"))
}

/// Wait (bounded) for `p` to exit; its status and standard error.
pub async fn exit_of(p: &mut Proc, limit: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = p.0.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = p.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status, err);
        }
        assert!(start.elapsed() < limit, "the process did not exit");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Poll `f` until it returns true, at most `limit`; panics with `what`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A "node" on loopback that accepts connections and never answers: its
/// address, and the task to abort.
pub async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (addr, task)
}
