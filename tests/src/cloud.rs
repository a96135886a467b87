//! [`Cloud`]: a control plane on its own database, its agents, and the
//! calls tests make to it.

use crate::*;
use anyhow::{bail, Context};
use nimbus_control_plane::{Config, PlacementPolicy, Service};
use nimbus_host_agent::{Agent, AgentConfig, HypervisorChoice};
use nimbus_proto::api::{Image, ImageFile, RegisterImageRequest};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};

pub struct CloudOptions {
    pub placement: PlacementPolicy,
    pub max_count: u32,
    pub db_connections: u32,
    /// Seconds without a heartbeat before a host takes no new instances.
    pub host_timeout_secs: u64,
    /// Default per-account limits (instances, vCPUs).
    pub default_limits: (u32, u32),
    /// RSA key generation per account: (burst, seconds per further key).
    pub rsa_keys: (u32, u64),
    /// The operator's public address pool (`--public-pool`).
    pub public_pool: Option<&'static str>,
    /// Default per-account Elastic IP limit.
    pub max_elastic_ips: u32,
    /// Default per-account image limits (images, bytes in the image store).
    pub image_limits: (u32, u64),
    /// Run the control plane's outbox relay (tests of the relay drive it by hand).
    pub outbox_relay: bool,
    /// Serve the agent protocol on a TLS listener only (mutual TLS);
    /// agents connect there.
    pub agent_tls: bool,
}

impl Default for CloudOptions {
    fn default() -> Self {
        CloudOptions {
            placement: PlacementPolicy::Spread,
            max_count: 100,
            db_connections: 20,
            host_timeout_secs: 30,
            default_limits: (256, 1024),
            rsa_keys: (5, 60),
            public_pool: None,
            max_elastic_ips: 5,
            image_limits: (100, 500 << 30),
            outbox_relay: true,
            agent_tls: false,
        }
    }
}

/// A running control plane with its own database.
pub struct Cloud {
    pub url: String,
    pub admin_token: String,
    /// REST token (`<access key id>:<secret>`) of the account "tester", which
    /// [`Cloud::call`] uses for everything but operator calls.
    pub user_token: String,
    pub join_token: String,
    pub service: Service,
    pub http: reqwest::Client,
    pub dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    /// The API server's task (awaited when the control plane is stopped).
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The TLS listener's task, with [`CloudOptions::agent_tls`].
    tls_server: Option<tokio::task::JoinHandle<()>>,
    /// The control plane's CA certificate (what agents trust).
    pub ca_file: PathBuf,
    /// The control plane's configuration (a restart reuses it: same port,
    /// same store node id and directory).
    config: Config,
    _test_conn: Option<Arc<virt::connect::Connect>>,
    /// Each agent's state directory, by the name it registers with (where
    /// its key is: documents are sealed for it).
    agent_dirs: std::sync::Mutex<std::collections::HashMap<String, PathBuf>>,
    /// Last: dropped after the server was told to stop.
    _database: TestDatabase,
}

impl Cloud {
    pub async fn start() -> anyhow::Result<Cloud> {
        Self::start_with(CloudOptions::default()).await
    }

    pub async fn start_with(opts: CloudOptions) -> anyhow::Result<Cloud> {
        init_tracing();
        let database = TestDatabase::create().await?;
        let database_url = database.url.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let dir = TempDir::new("cloud");
        let config = Config {
            image_store_dir: dir.0.join("image-store"),
            max_image_bytes: 64 << 30,
            listen: addr,
            database_url,
            admin_token: format!("admin-{}", random_suffix()),
            join_token: format!("join-{}", random_suffix()),
            placement: opts.placement,
            host_timeout_secs: opts.host_timeout_secs,
            max_count: opts.max_count,
            db_connections: opts.db_connections,
            master_key: Some(nimbus_control_plane::auth::secrets::MasterKey::generate().to_hex()),
            region: "nimbus-1".into(),
            rsa_key_burst: opts.rsa_keys.0,
            rsa_key_interval_secs: opts.rsa_keys.1,
            default_max_instances: opts.default_limits.0,
            default_max_vcpus: opts.default_limits.1,
            public_pool: opts.public_pool.map(|p| nimbus_proto::network::Cidr::parse(p).context("public_pool")).transpose()?,
            default_max_elastic_ips: opts.max_elastic_ips,
            default_max_images: opts.image_limits.0,
            default_max_image_bytes: opts.image_limits.1,
            store_listen: "127.0.0.1:0".parse()?,
            store_dir: dir.path().join("cp-store"),
            store_seeds: Vec::new(),
            tls_names: Vec::new(),
            ca_cert_out: None,
            outbox_relay: opts.outbox_relay,
            terminated_retention_secs: 86_400,
            agent_listen: None,
            insecure_agent_plaintext: false,
        };
        let (admin_token, join_token) = (config.admin_token.clone(), config.join_token.clone());
        let mut config = config;
        let tls_listener = match opts.agent_tls {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            false => None,
        };
        if let Some(l) = &tls_listener {
            config.agent_listen = Some(l.local_addr()?);
        }
        let service = nimbus_control_plane::build(config.clone()).await?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, service.store.ca.cert_pem())?;
        let tls_server = tls_listener.map(|l| spawn_tls(service.clone(), l));
        // A restart keeps the store node's address (its id in the ring).
        config.store_listen = service.store.address.parse()?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(nimbus_control_plane::serve(service.clone(), listener, async move {
            let _ = rx.await;
        }));
        // Keep the test driver's state alive across agent restarts.
        let test_conn = tokio::task::spawn_blocking(|| {
            virt::error::clear_error_callback();
            virt::connect::Connect::open(Some("test:///default"))
        })
        .await??;
        let tester = service.create_account("tester").await?;
        let user_token = format!("{}:{}", tester.access_key_id, tester.secret_access_key);
        Ok(Cloud {
            url: format!("http://{addr}"),
            admin_token,
            user_token,
            join_token,
            service,
            http: reqwest::Client::new(),
            dir,
            shutdown: Some(tx),
            server: Some(server),
            tls_server,
            ca_file,
            config,
            _test_conn: Some(Arc::new(test_conn)),
            agent_dirs: Default::default(),
            _database: database,
        })
    }

    pub fn db(&self) -> &sqlx::PgPool {
        &self.service.db
    }

    /// Sends a request as the account "tester", or with the admin token for
    /// operator calls (hosts, image registration, accounts); returns the
    /// status and JSON body.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Value)> {
        let operator =
            path.starts_with("/v1/hosts") || path.starts_with("/v1/admin/") || (path.starts_with("/v1/images") && method == Method::POST);
        let token = if operator { &self.admin_token } else { &self.user_token };
        self.call_as(Some(token), method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let json = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok((status, json))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.call(Method::GET, path, None).await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Creates an account; returns its REST bearer token `<access key id>:<secret>`.
    pub async fn create_account(&self, name: &str) -> anyhow::Result<String> {
        let a = self.post("/v1/admin/accounts", serde_json::json!({ "name": name })).await?;
        Ok(format!(
            "{}:{}",
            a["access_key_id"].as_str().context("no access key id")?,
            a["secret_access_key"].as_str().context("no secret")?
        ))
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (status, resp) = self.call(Method::POST, path, Some(body)).await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {resp}");
        }
        Ok(resp)
    }

    /// Starts an agent on the test driver offering the given capacity.
    pub async fn add_agent(&self, name: &str, zone: &str, vcpus: u32, memory_mib: u64, disk_gib: u64) -> anyhow::Result<AgentHandle> {
        self.add_agent_with(name, zone, vcpus, memory_mib, disk_gib, HypervisorChoice::Test).await
    }

    /// Starts an agent with the given hypervisor choice (`Auto` boots real guests).
    pub async fn add_agent_with(
        &self,
        name: &str,
        zone: &str,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
        hypervisor: HypervisorChoice,
    ) -> anyhow::Result<AgentHandle> {
        self.add_agent_configured(name, zone, (vcpus, memory_mib, disk_gib), hypervisor, |_| {}).await
    }

    /// Starts an agent that runs the VPC data plane of simulated host `host`
    /// of a [`Topology`](nimbus_host_agent::network::testing::Topology).
    pub async fn add_vpc_agent(
        &self,
        name: &str,
        zone: &str,
        capacity: (u32, u64, u64),
        hypervisor: HypervisorChoice,
        host: &nimbus_host_agent::network::testing::SimHost,
    ) -> anyhow::Result<AgentHandle> {
        self.add_agent_configured(name, zone, capacity, hypervisor, |c| {
            c.network = nimbus_host_agent::NetworkChoice::Vpc;
            c.underlay_address = Some(host.underlay_ip);
            c.network_namespace = Some(host.ns.name.clone());
            c.uplink = Some(nimbus_host_agent::network::testing::UPLINK.into());
            c.netns_prefix = host.prefix.clone();
        })
        .await
    }

    pub async fn add_agent_configured(
        &self,
        name: &str,
        zone: &str,
        (vcpus, memory_mib, disk_gib): (u32, u64, u64),
        hypervisor: HypervisorChoice,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> anyhow::Result<AgentHandle> {
        let state_dir = self.dir.path().join(name);
        let config = AgentConfig {
            control_plane: self.agent_url(),
            control_plane_ca: self.config.agent_listen.map(|_| self.ca_file.clone()),
            join_token: self.join_token.clone(),
            name: format!("{name}-{}", &random_suffix()[..8]),
            availability_zone: zone.to_string(),
            hypervisor,
            libvirt_uri: None,
            state_dir: state_dir.clone(),
            // Short (a socket's path must fit in 107 bytes), QEMU may pass through /tmp.
            run_dir: std::env::temp_dir().join(format!("nimbus-run-{}", &random_suffix()[..8])),
            vcpus: Some(vcpus),
            memory_mib: Some(memory_mib),
            disk_gib: Some(disk_gib),
            cpu_allocation_ratio: 1.0,
            reserved_memory_mib: 0,
            poll_ms: 2000,
            stop_timeout_secs: 30,
            qemu_user: "libvirt-qemu".into(),
            network: nimbus_host_agent::NetworkChoice::User,
            underlay_address: None,
            network_namespace: None,
            uplink: None,
            netns_prefix: "nimbus".into(),
            image_cache_ttl_secs: 86400,
            underlay_mtu: 1500,
            guest_deny: Vec::new(),
            outside_allow: Vec::new(),
            store_listen: None,
            cert_renew_secs: 30 * 86_400,
        };
        let mut config = config;
        tweak(&mut config);
        self.agent_dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(config.name.clone(), state_dir.clone());
        let mut handle = AgentHandle {
            name: config.name.clone(),
            host_id: None,
            state_dir,
            events: broadcast::channel(1).1,
            config,
            shutdown: None,
            task: None,
        };
        self.start_agent(&mut handle).await?;
        handle.host_id = Some(self.wait_for_host(&handle.name).await?);
        Ok(handle)
    }

    /// (Re)starts a stopped agent with its old configuration and state directory.
    pub async fn start_agent(&self, handle: &mut AgentHandle) -> anyhow::Result<()> {
        handle.stop().await;
        let agent = Agent::new(handle.config.clone()).await?;
        handle.events = agent.events();
        let (tx, rx) = oneshot::channel::<()>();
        let name = handle.name.clone();
        handle.task = Some(tokio::spawn(async move {
            if let Err(e) = agent
                .run(async move {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(agent = %name, error = %e, "agent failed");
            }
        }));
        handle.shutdown = Some(tx);
        Ok(())
    }

    /// Waits until the agent `name` registered; returns its host id.
    async fn wait_for_host(&self, name: &str) -> anyhow::Result<String> {
        let host_id = std::sync::Mutex::new(None);
        self.wait_until(Duration::from_secs(30), || async {
            let hosts = self.get("/v1/hosts").await?;
            let found = hosts["hosts"].as_array().and_then(|hs| hs.iter().find(|h| h["name"] == name)).and_then(|h| h["host_id"].as_str());
            *host_id.lock().unwrap_or_else(|p| p.into_inner()) = found.map(str::to_string);
            Ok(found.is_some())
        })
        .await
        .with_context(|| format!("agent {name} did not register"))?;
        host_id.into_inner().unwrap_or_else(|p| p.into_inner()).context("no host id")
    }

    /// Polls `cond` until it holds or `timeout` passes.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, mut cond: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("condition not met within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every instance (of the account "tester") is in `state`; returns their JSON.
    pub async fn wait_for_state(&self, ids: &[String], state: &str, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        self.wait_for_state_as(&self.user_token, ids, state, timeout).await
    }

    /// [`Cloud::wait_for_state`] for the instances of the account whose REST token is `token`.
    pub async fn wait_for_state_as(&self, token: &str, ids: &[String], state: &str, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let path = format!("/v1/instances?instance_id={}", ids.join(","));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, list) = self.call_as(Some(token), Method::GET, &path, None).await?;
            if !status.is_success() {
                bail!("GET {path}: {status}: {list}");
            }
            let instances = list["instances"].as_array().cloned().unwrap_or_default();
            if instances.len() == ids.len() && instances.iter().all(|i| i["state"]["name"] == state) {
                return Ok(instances);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("instances did not reach {state} within {timeout:?}: {instances:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers a small image whose files are real (a qcow2 base made with
    /// qemu-img) but boot nothing: enough for the test driver.
    pub async fn register_test_image(&self) -> anyhow::Result<Image> {
        let dir = self.dir.path().join("image");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("vmlinuz"), format!("kernel {}", random_suffix()))?;
        std::fs::write(dir.join("initrd.img"), format!("initrd {}", random_suffix()))?;
        let out =
            std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(dir.join("root.qcow2")).arg("16M").output()?;
        if !out.status.success() {
            bail!("qemu-img: {}", String::from_utf8_lossy(&out.stderr));
        }
        let file = |name: &str| -> anyhow::Result<ImageFile> {
            Ok(ImageFile { name: name.into(), sha256: hex::encode(Sha256::digest(std::fs::read(dir.join(name))?)) })
        };
        let req = RegisterImageRequest {
            name: "test-image".into(),
            description: None,
            source_url: Some(format!("file://{}", dir.display())),
            kernel: Some(file("vmlinuz")?),
            initrd: Some(file("initrd.img")?),
            root_disk: Some(file("root.qcow2")?),
            cmdline: "console=ttyS0".into(),
            default: true,
            ..Default::default()
        };
        Ok(serde_json::from_value(self.post("/v1/images", serde_json::to_value(req)?).await?)?)
    }

    /// Registers the image a recipe built in `dir` (its `manifest.json`).
    pub async fn register_image_dir(&self, dir: &Path, default: bool) -> anyhow::Result<Image> {
        let manifest: nimbus_proto::image::ImageManifest = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json")).with_context(|| format!("read {}/manifest.json", dir.display()))?,
        )?;
        let req = manifest.register_request(format!("file://{}", dir.canonicalize()?.display()), None, default)?;
        Ok(serde_json::from_value(self.post("/v1/images", serde_json::to_value(req)?).await?)?)
    }

    /// POSTs `form` to the EC2 front door, signed with SigV4 by the
    /// `aws-sigv4` crate (the AWS SDK's own signer) for `region` and
    /// `service` at time `at`; returns (status, body). Every answer of that
    /// door is XML, errors included: checked here.
    pub async fn ec2_signed(
        &self,
        akid: &str,
        secret: &str,
        form: &str,
        at: std::time::SystemTime,
        region: &str,
        service: &str,
    ) -> anyhow::Result<(u16, String)> {
        use aws_credential_types::Credentials;
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        use aws_sigv4::sign::v4;
        use aws_smithy_runtime_api::client::identity::Identity;
        let url = format!("{}/", self.url);
        let host = self.url.trim_start_matches("http://").to_string();
        let identity: Identity = Credentials::new(akid, secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(at)
            .settings(SigningSettings::default())
            .build()?
            .into();
        let headers = [("host", host.as_str()), ("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
        let signable = SignableRequest::new("POST", &url, headers.iter().copied(), SignableBody::Bytes(form.as_bytes()))?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let mut req = http::Request::builder().method("POST").uri(&url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let mut req = req.body(form.as_bytes().to_vec())?;
        instructions.apply_to_request_http1x(&mut req);
        let mut out = self.http.post(&url).body(form.to_string());
        for (k, v) in req.headers() {
            out = out.header(k.as_str(), v.to_str()?);
        }
        let resp = out.send().await?;
        let status = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if !content_type.starts_with("text/xml") {
            bail!("the EC2 front door answered {content_type:?}, not XML");
        }
        Ok((status, resp.text().await?))
    }

    /// The host an instance was placed on (tenants do not see it: from PostgreSQL).
    pub async fn host_of(&self, instance_id: &str) -> anyhow::Result<String> {
        let (h,): (String,) = sqlx::query_as("SELECT host_id FROM instances WHERE id = $1").bind(instance_id).fetch_one(self.db()).await?;
        Ok(h)
    }

    /// Everything a call of another account could change, straight from
    /// PostgreSQL: the instances (state, desired state, reboots asked for,
    /// generation, capacity), tags, key pairs, reservations and limits of
    /// every account, and the hosts' generations and used capacity. Equal before
    /// and after a call: the call changed nothing.
    pub async fn everything(&self) -> anyhow::Result<Value> {
        let (v,): (Value,) = sqlx::query_as(
            "SELECT jsonb_build_object( \
               'instances', (SELECT coalesce(jsonb_agg(jsonb_build_array(id, account_id, state, desired_state, reboots, \
                    changed_generation, capacity_held, key_name) ORDER BY id), '[]') FROM instances), \
               'tags', (SELECT coalesce(jsonb_agg(jsonb_build_array(account_id, resource_id, key, value) \
                    ORDER BY account_id, resource_id, key), '[]') FROM tags), \
               'key_pairs', (SELECT coalesce(jsonb_agg(jsonb_build_array(account_id, name, fingerprint) ORDER BY account_id, name), '[]') \
                    FROM key_pairs), \
               'reservations', (SELECT coalesce(jsonb_agg(jsonb_build_array(id, account_id, client_token) ORDER BY id), '[]') \
                    FROM reservations), \
               'accounts', (SELECT coalesce(jsonb_agg(jsonb_build_array(id, max_instances, max_vcpus) ORDER BY id), '[]') \
                    FROM accounts), \
               'hosts', (SELECT coalesce(jsonb_agg(jsonb_build_array(id, generation, used_vcpus, used_memory_mib) ORDER BY id), '[]') \
                    FROM hosts))",
        )
        .fetch_one(self.db())
        .await?;
        Ok(v)
    }

    /// Capacity bookkeeping straight from PostgreSQL: per host, (total vCPUs,
    /// used counter, sum of vCPUs of instances holding capacity).
    pub async fn vcpu_accounting(&self) -> anyhow::Result<Vec<(String, i64, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT h.name, h.total_vcpus::bigint, h.used_vcpus::bigint, \
                    coalesce((SELECT sum(vcpus) FROM instances i WHERE i.host_id = h.id AND i.capacity_held), 0)::bigint \
             FROM hosts h ORDER BY h.name",
        )
        .fetch_all(self.db())
        .await?)
    }
}

impl Cloud {
    /// The document of `id` as the store has it (a quorum read through the
    /// control plane's node), opened as its host opens it: the newest
    /// genuine version sealed for that host, and how many siblings the
    /// key holds.
    pub async fn stored_document(&self, id: &str) -> anyhow::Result<(Option<nimbus_proto::metadata::InstanceDocument>, usize)> {
        use nimbus_state_store::KvClient;
        let got = self.service.store.client().get(nimbus_proto::metadata::document_key(id).as_bytes()).await?;
        let (host_id, name): (String, String) =
            sqlx::query_as("SELECT h.id, h.name FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.id = $1")
                .bind(id)
                .fetch_one(self.db())
                .await?;
        let dir = self.agent_dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned().context("no such agent here")?;
        let key =
            nimbus_records::KeyPair::from_pem(&std::fs::read_to_string(dir.join("tls/key.pem"))?).map_err(|e| anyhow::anyhow!("{e}"))?;
        let trusted = self.service.store.trusted_keys();
        let doc = nimbus_records::newest_sealed(&got.values, &trusted, id)
            .map(|s| s.open(&trusted, id, &host_id, &key))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((doc, got.values.len()))
    }

    /// Waits until the network relay delivered every recorded network
    /// change (their hosts are bumped), so that host generations stand still.
    pub async fn network_settled(&self) -> anyhow::Result<()> {
        self.wait_until(Duration::from_secs(30), || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM network_changes").fetch_one(self.db()).await?;
            Ok(n == 0)
        })
        .await
    }

    /// The accounts' usage counters against what they hold, straight from
    /// PostgreSQL: per account with a mismatch, (account, counted instances,
    /// counted vCPUs, held instances, held vCPUs). Empty when all agree.
    pub async fn account_usage_mismatches(&self) -> anyhow::Result<Vec<(String, i64, i64, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT * FROM (SELECT u.account_id, u.instances::bigint AS ci, u.vcpus::bigint AS cv, \
                    (SELECT count(*) FROM instances i WHERE i.account_id = u.account_id AND i.capacity_held) AS hi, \
                    (SELECT coalesce(sum(vcpus), 0) FROM instances i WHERE i.account_id = u.account_id AND i.capacity_held)::bigint AS hv \
                 FROM account_usage u) x WHERE ci <> hi OR cv <> hv",
        )
        .fetch_all(self.db())
        .await?)
    }

    /// An outage of the control plane and of its database: the API server
    /// stops (gracefully: agents' long polls end, keep-alive connections
    /// close), the outbox relay and the control plane's store node stop,
    /// and this test's database refuses connections (its sessions are
    /// terminated, `ALLOW_CONNECTIONS false`): nothing of the control plane
    /// answers. The shared PostgreSQL server itself keeps running.
    pub async fn outage(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server).await.context("the API server did not stop")???;
        }
        if let Some(t) = self.tls_server.take() {
            t.abort();
        }
        self.service.store.stop();
        self.service.db.close().await;
        self._database.allow_connections(false).await
    }

    /// Ends [`Cloud::outage`]: the database takes connections again and a
    /// new control plane starts with the same configuration (port, store
    /// node id, CA from the database). Its store node starts on an empty
    /// directory, as a node whose disk was wiped (the stopped one, still in
    /// this process, keeps the old directory open) and refills from the
    /// ring: a restarted process would reopen its directory instead.
    pub async fn recover(&mut self) -> anyhow::Result<()> {
        self._database.allow_connections(true).await?;
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        self.config.store_dir = self.dir.path().join(format!("cp-store-{n}"));
        let listener = tokio::net::TcpListener::bind(self.config.listen).await?;
        self.service = nimbus_control_plane::build(self.config.clone()).await.context("restart the control plane")?;
        if let Some(addr) = self.config.agent_listen {
            self.tls_server = Some(spawn_tls(self.service.clone(), tokio::net::TcpListener::bind(addr).await?));
        }
        let (tx, rx) = oneshot::channel::<()>();
        self.server = Some(tokio::spawn(nimbus_control_plane::serve(self.service.clone(), listener, async move {
            let _ = rx.await;
        })));
        self.shutdown = Some(tx);
        Ok(())
    }
}

/// Serves the control plane's TLS listener until aborted.
fn spawn_tls(service: Service, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = nimbus_control_plane::api::tls::serve(service, listener, std::future::pending()).await {
            tracing::error!(error = %e, "TLS listener failed");
        }
    })
}

impl Cloud {
    /// The URL agents use: the TLS listener's with [`CloudOptions::agent_tls`].
    pub fn agent_url(&self) -> String {
        match self.config.agent_listen {
            Some(a) => format!("https://{a}"),
            None => self.url.clone(),
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.tls_server.take() {
            t.abort();
        }
        // Closing the pool also ends the control plane's notification listener.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let db = self.service.db.clone();
            rt.spawn(async move { db.close().await });
        }
    }
}

impl Cloud {
    /// Restarts an agent after `tweak` changed its configuration (e.g. a
    /// shorter stop timeout); its state directory and guests are kept.
    pub async fn restart_agent_with(&self, handle: &mut AgentHandle, tweak: impl FnOnce(&mut AgentConfig)) -> anyhow::Result<()> {
        handle.stop().await;
        tweak(&mut handle.config);
        self.start_agent(handle).await
    }
}

/// An account's EC2 credentials.
#[derive(Debug, Clone)]
pub struct Ec2Keys {
    pub account_id: String,
    pub akid: String,
    pub secret: String,
}

impl Cloud {
    /// Creates an account; returns its EC2 credentials.
    pub async fn ec2_account(&self, name: &str) -> anyhow::Result<Ec2Keys> {
        let a = self.post("/v1/admin/accounts", serde_json::json!({ "name": name })).await?;
        Ok(Ec2Keys {
            account_id: a["account_id"].as_str().context("no account id")?.into(),
            akid: a["access_key_id"].as_str().context("no access key id")?.into(),
            secret: a["secret_access_key"].as_str().context("no secret")?.into(),
        })
    }

    /// One signed EC2 call (`Version` added): (status, XML body).
    pub async fn ec2(&self, keys: &Ec2Keys, form: &str) -> anyhow::Result<(u16, String)> {
        let form = format!("{form}&Version=2016-11-15");
        self.ec2_signed(&keys.akid, &keys.secret, &form, std::time::SystemTime::now(), "nimbus-1", "ec2").await
    }
}
