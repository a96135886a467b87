//! The attacks of the security review (issue 13), kept as tests so that they
//! stay fixed. Each test names the finding it covers; each failed before its
//! fix.

use nimbus_tests::{instance_ids, Cloud};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{:?}", resp.1);
    assert_eq!(resp.1["code"], code, "{:?}", resp.1);
}

/// Finding 1: the control plane's database role was a superuser with the
/// password `nimbus`, open to every local user on loopback. Now it owns only
/// its database, and its password is random (scripts/pg.sh; scripts/test.sh
/// exports the control plane's URL as NIMBUS_APP_DATABASE_URL).
#[tokio::test]
async fn the_control_planes_database_role_is_no_superuser_and_has_no_known_password() {
    let url = std::env::var("NIMBUS_APP_DATABASE_URL")
        .expect("NIMBUS_APP_DATABASE_URL (the control plane's database URL, `scripts/pg.sh url`) must be set: run scripts/test.sh");
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let (superuser, createdb, createrole, bypassrls): (bool, bool, bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((superuser, createdb, createrole, bypassrls), (false, false, false, false));
    let (owner,): (String,) =
        sqlx::query_as("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()").fetch_one(&db).await.unwrap();
    let (me,): (String,) = sqlx::query_as("SELECT current_user::text").fetch_one(&db).await.unwrap();
    assert_eq!(owner, me, "the control plane's role owns its database");
    // Nothing else may read a control-plane table (e.g. user-data), nor write one.
    let e = sqlx::query("SELECT * FROM pg_read_file('/etc/passwd')").execute(&db).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    db.close().await;

    // The well-known password opens nothing any more.
    let parsed = reqwest::Url::parse(&url).unwrap();
    assert!(parsed.password().is_some_and(|p| p.len() >= 32 && p != "nimbus"), "a random password");
    let mut guessed = parsed.clone();
    guessed.set_password(Some("nimbus")).unwrap();
    let e = sqlx::PgPool::connect(guessed.as_str()).await.unwrap_err();
    assert!(e.to_string().contains("password authentication failed"), "{e}");
}

/// Finding 4 (and 10, 11): local users could read tenants' data on an agent
/// host (credential 0644, overlays 0644 in a 0755 tree, metadata on loopback
/// ports anyone could connect to, or take over after an agent restart), and
/// cached kernels were relabelled to the QEMU user. Now: the state directory
/// is closed, the metadata service is a unix socket only root and QEMU's
/// group reach, and libvirt relabels nothing.
#[tokio::test]
async fn an_agent_hosts_files_and_metadata_are_closed_to_local_users() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": "c2VjcmV0"})).await.unwrap();
    let id = instance_ids(&r).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let qemu = nimbus_host_agent::access::QemuUser::lookup("libvirt-qemu").unwrap();
    let dir = &agent.state_dir;
    let guest = dir.join("instances").join(&id);
    for d in [dir.clone(), dir.join("images"), dir.join("instances"), guest.clone()] {
        assert_eq!(owner_mode(&d), (0, qemu.gid, 0o710), "{}", d.display());
    }
    assert_eq!(owner_mode(&dir.join("credential.json")), (0, 0, 0o600));
    assert_eq!(owner_mode(&guest.join("root.qcow2")), (qemu.uid, qemu.gid, 0o600));
    assert_eq!(owner_mode(&guest.join("seed.iso")), (0, qemu.gid, 0o640));
    for cached in std::fs::read_dir(dir.join("images")).unwrap() {
        assert_eq!(owner_mode(&cached.unwrap().path()), (0, qemu.gid, 0o640));
    }
    let socket = agent.metadata_socket(&id);
    assert_eq!(owner_mode(&socket), (0, qemu.gid, 0o660));
    assert_eq!(owner_mode(socket.parent().unwrap()), (0, qemu.gid, 0o710));
    // The socket answers (what the guest's QEMU forwards to is checked by
    // domain.rs's tests: the test driver drops qemu:commandline).
    let (status, body) = nimbus_host_agent::metadata::request(&socket, "GET", "/latest/user-data", &[]).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, b"secret".as_slice()));
    let name = nimbus_host_agent::domain::domain_name(&id);
    let xml = tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        conn.lookup_domain_by_name(&name).unwrap().xml_desc(0).unwrap()
    })
    .await
    .unwrap();
    // libvirt is told to relabel nothing.
    assert!(xml.contains("<seclabel type='static' model='dac' relabel='no'>"), "{xml}");
}
