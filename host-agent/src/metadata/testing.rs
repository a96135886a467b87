//! What the metadata service's unit tests share: a made-up instance, servers
//! in a temporary directory, requests as a guest makes them.

use super::{request, ConnectionLimits, MetadataServers};
use nimbus_proto::agent::InstanceMetadata;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) const HOUR: Duration = Duration::from_secs(3600);

/// Metadata of a made-up instance, for tests.
pub(crate) fn sample_metadata(id: &str) -> InstanceMetadata {
    InstanceMetadata {
        version: 0,
        instance_id: id.into(),
        reservation_id: "r-0123456789abcdef0".into(),
        instance_type: "t3.nano".into(),
        image_id: "ami-0123456789abcdef0".into(),
        availability_zone: "az1".into(),
        ami_launch_index: 0,
        owner_id: "000000000000".into(),
        public_keys: Vec::new(),
        options: Default::default(),
        tags: Vec::new(),
    }
}

/// Servers whose sockets live in a temporary directory; every server
/// stops when the test ends, passed or failed.
pub(super) struct Fixture {
    pub(super) servers: MetadataServers,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// With this process's connection limits.
    pub(super) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture { servers: MetadataServers::new(crate::access::QemuUser::root(), dir.path().join("run")), _dir: dir }
    }

    pub(super) fn with_limits(limits: ConnectionLimits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture { servers: MetadataServers::with_limits(crate::access::QemuUser::root(), dir.path().join("run"), limits), _dir: dir }
    }

    /// Serves `m` on its unix socket; the socket's path.
    pub(super) async fn serve(&self, m: &InstanceMetadata, user_data: Option<&str>) -> PathBuf {
        self.servers.ensure(m, user_data).await.unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.servers.stop_all();
    }
}

/// A request as a guest makes it: `(status, body)`.
pub(super) async fn call(socket: &Path, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, body) = request(socket, method, path, headers).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

pub(super) async fn get(socket: &Path, path: &str) -> (u16, String) {
    call(socket, "GET", path, &[]).await
}

/// Waits (at most `bound`) for `cond`; whether it came.
pub(super) async fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
