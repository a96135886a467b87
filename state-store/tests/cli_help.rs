//! `store-node --help` documents every flag and the fixed intervals; logs
//! written to a file carry no colour codes.

mod support;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{eventually, free_addr, Proc};

#[test]
fn help_documents_every_flag_and_the_fixed_intervals() {
    let out = Command::new(env!("CARGO_BIN_EXE_store-node")).arg("--help").output().expect("store-node --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = help.lines().collect();
    let mut flags = 0;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if t.starts_with("--") && !t.starts_with("--help") {
            flags += 1;
            let next = lines.get(i + 1).map(|n| n.trim()).unwrap_or("");
            assert!(!next.is_empty() && !next.starts_with('-'), "{t} has no help text:\n{help}");
        }
    }
    assert!(flags >= 17, "{flags} flags in:\n{help}");
    for flag in ["--data-dir", "--n ", "--r ", "--w ", "--partitions", "--tls-ca", "--insecure-plaintext"] {
        assert!(help.contains(flag), "{flag}");
    }
    for fixed in ["gossip", "every 500 ms", "after 3000 ms without a newer heartbeat", "hint delivery: every 1000 ms", "24 h"] {
        assert!(help.contains(fixed), "{fixed} missing from:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("node.log");
    let file = std::fs::File::create(&log).expect("log file");
    let addr = free_addr();
    let _node = Proc(
        Command::new(env!("CARGO_BIN_EXE_store-node"))
            .args(["--insecure-plaintext", "--listen", &addr, "--data-dir"])
            .arg(dir.path().join("n0"))
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::from(file))
            .spawn()
            .expect("spawn"),
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the node logs and listens", Duration::from_secs(30), || async { read().contains("listening on") }).await;
    let text = read();
    assert!(text.contains("node started") && text.contains("INFO"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a log file:\n{text:?}");
}
