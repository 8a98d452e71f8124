//! The agent's REST API against the real embedded store: volumes created, listed, inspected, attached,
//! expanded and deleted; every bad request refused with a clear JSON error and nothing changed in the
//! store; the CLI as its client; schemathesis fuzzing the committed OpenAPI document.
//!
//! The API runs in-process (`api::serve` on 127.0.0.1:0) over an `EmbeddedStore` in a temporary
//! directory. The nodes are NodeRecords written into the store as their agents would register them: no
//! agent, replica or controller runs in these tests (the services' life cycle is tests/agent_*.rs of the
//! daemon). So the controller-backed routes (snapshots, QoS) can only be checked here for their answer
//! when the controller is not serving: a real connection to a port where nothing listens, 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use basalt_agent::api::views::CreateVolume;
use basalt_agent::api::{self, ApiContext, GrpcConnector};
use basalt_agent::client::{AgentClient, ClientError};
use basalt_agent::model::{
    keys, NodeAlive, NodeName, NodeRecord, PoolKind, PoolRecord, PortRange, VolumePhase,
};
use basalt_agent::store::embedded::EmbeddedStore;
use basalt_agent::store::{self, Expect, Store};
use basalt_engine::api_auth::ApiToken;
use basalt_tests::basalt_binary;
use hyper::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "agent-api-test-token-0123456789abcdef";
const GIB: u64 = 1 << 30;
/// Each fake node's one pool.
const POOL_CAPACITY: u64 = 100 * GIB;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An API over a fresh store holding `nodes` registered nodes (zones a, b, c, ...), all up.
struct Api {
    store: Arc<dyn Store>,
    addr: SocketAddr,
    cancel: CancellationToken,
    dir: tempfile::TempDir,
    _server: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start(nodes: usize) -> Result<Api, Box<dyn std::error::Error>> {
        Api::start_with(nodes, api::Transport::Plain).await
    }

    async fn start_with(nodes: usize, transport: api::Transport) -> Result<Api, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("store"))?;
        for i in 0..nodes {
            register(&*store, i, dir.path()).await?;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let ctx = ApiContext {
            store: store.clone(),
            node: NodeName::new("node-0")?,
            controllers: Arc::new(GrpcConnector),
            token: ApiToken::new(TOKEN)?,
            agent_metrics: None,
        };
        let cancel = CancellationToken::new();
        let server = tokio::spawn(api::serve(listener, ctx, transport, cancel.clone()));
        Ok(Api {
            store,
            addr,
            cancel,
            dir,
            _server: server,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(&self.url(), ApiToken::new(TOKEN).ok()).expect("the test URL is valid")
    }

    fn client_with(&self, token: Option<&str>) -> AgentClient {
        AgentClient::new(
            &self.url(),
            token.map(|t| ApiToken::new(t).expect("a valid token")),
        )
        .expect("the test URL is valid")
    }

    /// Every key and value under /basalt/, to compare before and after a refused request.
    async fn snapshot(&self) -> Result<BTreeMap<String, Vec<u8>>, Box<dyn std::error::Error>> {
        let (kvs, _) = self.store.list(keys::ROOT).await?;
        Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Register node `i` as its agent would: its record, and its liveness key.
async fn register(store: &dyn Store, i: usize, dir: &Path) -> TestResult {
    let name = NodeName::new(&format!("node-{i}"))?;
    let zone = char::from(b'a' + i as u8).to_string();
    let record = NodeRecord {
        name: name.clone(),
        address: "127.0.0.1".parse()?,
        api_url: "http://127.0.0.1:9700".into(),
        labels: [("zone".to_string(), zone)].into(),
        pools: vec![PoolRecord {
            name: "default".into(),
            kind: PoolKind::Directory(dir.join(format!("pool-{i}"))),
            capacity_bytes: POOL_CAPACITY,
            free_bytes: POOL_CAPACITY,
        }],
        // Distinct ranges: every node is 127.0.0.1 here.
        ports: PortRange {
            first: 21000 + 100 * i as u16,
            last: 21099 + 100 * i as u16,
        },
        cordoned: false,
        draining: false,
        initiator: None,
    };
    store::put_json(store, &keys::node(&name), &record, Expect::Any, None).await?;
    store::put_json(
        store,
        &keys::node_alive(&name),
        &NodeAlive { since_unix: 0 },
        Expect::Any,
        None,
    )
    .await?;
    Ok(())
}

fn volume(name: &str, size: u64, replicas: u8) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        size_bytes: Some(size),
        replicas: Some(replicas),
        ..CreateVolume::default()
    }
}

/// The API's refusal: status, code and message.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (StatusCode, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_is_created_listed_inspected_attached_expanded_and_deleted() -> TestResult {
    let api = Api::start(3).await?;
    let c = api.client();

    let v = c.create_volume(&volume("vol-a", 10 * GIB, 3)).await?;
    assert_eq!(v.phase, VolumePhase::Creating);
    assert_eq!(v.size_bytes, 10 * GIB);
    let nodes: std::collections::BTreeSet<_> = v.placement.replicas.iter().map(|r| r.node.clone()).collect();
    assert_eq!(nodes.len(), 3, "three replicas on three nodes: {:?}", v.placement);
    assert!(!v.shared_failure_domain && v.warnings.is_empty());
    let controller = v.placement.controller.clone().ok_or("no controller placed")?;
    assert_eq!(
        v.iscsi_url.as_deref(),
        Some(
            format!(
                "iscsi://127.0.0.1:{}/iqn.2026-11.io.basalt:vol-a/0",
                controller.iscsi_port
            )
            .as_str()
        )
    );
    // The secrets are in the store, and nowhere in the answer.
    let secrets = api.store.get(&keys::volume_secrets(&"vol-a".parse()?)).await?;
    assert!(secrets.is_some(), "the volume's secrets were written");

    let list = c.list_volumes(&[]).await?;
    assert_eq!(list.volumes.len(), 1);
    assert_eq!(c.list_volumes(&[("phase", "creating")]).await?.volumes.len(), 1);
    assert_eq!(c.list_volumes(&[("phase", "ready")]).await?.volumes.len(), 0);
    assert_eq!(c.list_volumes(&[("node", "node-1")]).await?.volumes.len(), 1);
    assert_eq!(c.inspect_volume("vol-a").await?.placement, v.placement);

    // The nodes show what was given out.
    let node = c.inspect_node(controller.node.as_str()).await?;
    assert_eq!(node.controllers, vec!["vol-a".to_string()]);
    let total_used: u64 = c
        .list_nodes()
        .await?
        .nodes
        .iter()
        .flat_map(|n| n.pools.iter().map(|p| p.used_bytes))
        .sum();
    assert_eq!(total_used, 30 * GIB);

    // Expand: the same size is a no-op, a larger one is recorded (202), a smaller one refused.
    let (status, body) = c
        .raw(
            Method::POST,
            "/v1/volumes/vol-a/expand",
            Some(br#"{"size_bytes": 21474836480}"#.to_vec()),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
    assert_eq!(c.inspect_volume("vol-a").await?.size_bytes, 20 * GIB);
    let before = api.snapshot().await?;
    let (status, _, message) = refusal(c.expand_volume("vol-a", 10 * GIB).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("cannot shrink"), "{message}");
    assert_eq!(
        api.snapshot().await?,
        before,
        "a refused shrink changed the store"
    );

    // Attached: delete refused, nothing changed; detached: deleted (phase deleting, 202).
    c.attach_volume("vol-a", "node-2").await?;
    let before = api.snapshot().await?;
    let (status, code, message) = refusal(c.delete_volume("vol-a").await);
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "conflict"));
    assert!(
        message.contains("attached to node node-2") && message.contains("detach"),
        "{message}"
    );
    assert_eq!(
        api.snapshot().await?,
        before,
        "a refused delete changed the store"
    );
    let (status, _, _) = refusal(c.attach_volume("vol-a", "node-1").await);
    assert_eq!(status, StatusCode::CONFLICT, "attached elsewhere");
    assert_eq!(c.detach_volume("vol-a").await?.attached_to, None);
    let (status, body) = c.raw(Method::DELETE, "/v1/volumes/vol-a", None).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
    let deleting = c.inspect_volume("vol-a").await?;
    assert_eq!(deleting.phase, VolumePhase::Deleting);
    // No agent runs here: every node holding a part is still to clean up, and says so.
    let holders: std::collections::BTreeSet<_> = v
        .placement
        .replicas
        .iter()
        .map(|r| r.node.clone())
        .chain(std::iter::once(controller.node.clone()))
        .collect();
    assert_eq!(deleting.cleanup_pending, holders.into_iter().collect::<Vec<_>>());
    assert!(
        deleting
            .warnings
            .iter()
            .any(|w| w.contains("waiting for node(s)")),
        "{:?}",
        deleting.warnings
    );
    Ok(())
}

/// A request that must be refused: what it is, method, path, token, body, status, words of the message.
type Refused = (
    &'static str,
    Method,
    &'static str,
    Option<&'static str>,
    Option<Vec<u8>>,
    StatusCode,
    &'static str,
);

/// A client still sending an oversized body when the agent refuses it gets the 413, not a broken pipe:
/// the agent reads and discards what it is sent before answering (see `basalt_agent::body`). The body
/// goes out in slices with pauses, so the refusal always comes before the client has finished.
#[tokio::test]
async fn an_oversized_body_sent_slowly_still_gets_its_413() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = Api::start(1).await?;
    let mut stream = tokio::net::TcpStream::connect(api.addr).await?;
    let size = 2 * api::MAX_BODY_BYTES;
    stream
        .write_all(
            format!(
                "POST /v1/volumes HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let slice = vec![b' '; size / 16];
    for _ in 0..16 {
        stream.write_all(&slice).await?;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("over 1048576 bytes") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("over 1048576 bytes"), "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_requests_say_why_and_change_nothing() -> TestResult {
    let api = Api::start(3).await?;
    let c = api.client();
    c.create_volume(&volume("taken", GIB, 3)).await?;

    let cases: Vec<Refused> = vec![
        (
            "name taken",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "taken", "size_bytes": 4096}"#.to_vec()),
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            "larger than any pool",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(format!(r#"{{"name": "huge", "size_bytes": {}}}"#, 200 * GIB).into_bytes()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cannot be placed",
        ),
        (
            "more replicas than nodes",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "many", "size_bytes": 4096, "replicas": 4}"#.to_vec()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cannot be placed",
        ),
        (
            "no token",
            Method::GET,
            "/v1/volumes",
            None,
            None,
            StatusCode::UNAUTHORIZED,
            "requires a bearer token",
        ),
        (
            "wrong token",
            Method::POST,
            "/v1/volumes",
            Some("wrong-token-0123456789abcdef"),
            Some(br#"{"name": "x", "size_bytes": 4096}"#.to_vec()),
            StatusCode::UNAUTHORIZED,
            "token is wrong",
        ),
        (
            "bad JSON type",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "x", "size_bytes": "ten"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "size_bytes",
        ),
        (
            "not JSON",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(b"{name".to_vec()),
            StatusCode::BAD_REQUEST,
            "not valid",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "x", "size_bytes": 4096, "colour": "red"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            "bad name",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "Bad_Name", "size_bytes": 4096}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "volume name",
        ),
        (
            "unknown route",
            Method::GET,
            "/v1/volumez",
            Some(TOKEN),
            None,
            StatusCode::NOT_FOUND,
            "no such route",
        ),
        (
            "wrong method",
            Method::PATCH,
            "/v1/volumes/taken",
            Some(TOKEN),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "GET, DELETE",
        ),
        (
            "body too large",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(vec![b' '; (1 << 20) + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "over 1048576 bytes",
        ),
        (
            "unknown volume",
            Method::DELETE,
            "/v1/volumes/nope",
            Some(TOKEN),
            None,
            StatusCode::NOT_FOUND,
            "no volume named",
        ),
        (
            "unknown node",
            Method::POST,
            "/v1/nodes/nope/cordon",
            Some(TOKEN),
            None,
            StatusCode::NOT_FOUND,
            "no node named",
        ),
        (
            "unknown filter",
            Method::GET,
            "/v1/volumes?colour=red",
            Some(TOKEN),
            None,
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            "controller not serving",
            Method::POST,
            "/v1/volumes/taken/snapshots",
            Some(TOKEN),
            Some(br#"{"name": "s1"}"#.to_vec()),
            StatusCode::SERVICE_UNAVAILABLE,
            "is not serving",
        ),
        (
            "clone while the source's controller is not serving",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "clone-1", "from_snapshot": "taken/s1"}"#.to_vec()),
            StatusCode::SERVICE_UNAVAILABLE,
            "is not serving",
        ),
        (
            "clone of a volume that does not exist",
            Method::POST,
            "/v1/volumes",
            Some(TOKEN),
            Some(br#"{"name": "clone-2", "from_snapshot": "nope/s1"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "no volume named \"nope\" to clone from",
        ),
        (
            "QoS out of range",
            Method::PUT,
            "/v1/volumes/taken/qos",
            Some(TOKEN),
            Some(br#"{"read_iops": 0}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "qos.read_iops",
        ),
    ];
    for (what, method, path, token, body, want_status, want_text) in cases {
        let before = api.snapshot().await?;
        let (status, bytes) = api.client_with(token).raw(method, path, body).await?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{what}: the answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, want_status, "{what}: {json}");
        assert!(
            json["error"]["code"].is_string(),
            "{what}: no error code in {json}"
        );
        assert!(
            message.contains(want_text),
            "{what}: {want_text:?} not in {message:?}"
        );
        assert!(!message.contains(TOKEN), "{what}: the message shows the token");
        assert_eq!(api.snapshot().await?, before, "{what}: the store changed");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_document_metrics_nodes_and_instance_discovery() -> TestResult {
    let api = Api::start(2).await?;
    let anonymous = api.client_with(None);
    assert_eq!(
        anonymous.health().await?.status,
        "ok",
        "the health probe needs no token"
    );

    let c = api.client();
    let (status, doc) = c.raw(Method::GET, "/v1/openapi.json", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc.as_ref(), api::OPENAPI.as_bytes());

    c.create_volume(&volume("m1", GIB, 2)).await?;
    let (status, metrics) = c.raw(Method::GET, "/metrics", None).await?;
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8(metrics.to_vec())?;
    assert!(
        metrics.contains("basalt_agent_volumes{phase=\"creating\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("basalt_agent_api_request_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("route=\"/v1/volumes\""), "{metrics}");

    // Cordon, drain and uncordon are recorded in the node's record.
    let n = c.node_action("node-1", "cordon").await?;
    assert!(n.cordoned && !n.draining);
    let n = c.node_action("node-1", "drain").await?;
    assert!(n.cordoned && n.draining);
    let stored = store::get_json::<NodeRecord>(&*api.store, &keys::node(&NodeName::new("node-1")?))
        .await?
        .ok_or("node-1 vanished")?;
    assert!(stored.value.draining);
    let n = c.node_action("node-1", "uncordon").await?;
    assert!(!n.cordoned && !n.draining);
    assert!(c.list_nodes().await?.nodes.iter().all(|n| n.up));

    // Instance discovery: who answers, and which node the caller's address belongs to.
    let me = c.instance(None).await?;
    assert_eq!(me.node.as_str(), "node-0");
    assert_eq!(me.caller_address, "127.0.0.1");
    assert!(me.caller.is_some(), "127.0.0.1 is a registered node's address");
    let other = c.instance(Some("10.9.9.9".parse()?)).await?;
    assert_eq!(other.caller, None);
    Ok(())
}

fn cli(
    api: &Api,
    token_file: &Path,
    args: &[&str],
) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    let out = Command::new(basalt_binary()?)
        .args(args)
        .arg("--agent")
        .arg(api.url())
        .arg("--agent-token-file")
        .arg(token_file)
        .env_remove("BASALT_AGENT_TOKEN")
        .output()?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_is_a_client_of_the_api() -> TestResult {
    let api = Api::start(3).await?;
    let token_file = api.dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;

    let out = cli(
        &api,
        &token_file,
        &["volume", "create", "cli-vol", "--size", "2G", "--replicas", "3"],
    )?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&api, &token_file, &["volume", "inspect", "cli-vol", "--json"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["size_bytes"], 2 * GIB);
    assert!(
        v["iscsi_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("iqn.2026-11.io.basalt:cli-vol/0")),
        "{v}"
    );

    let out = cli(&api, &token_file, &["volume", "ls"])?;
    let table = String::from_utf8(out.stdout)?;
    assert!(
        table.starts_with("NAME") && table.contains("cli-vol") && table.contains("creating"),
        "{table}"
    );

    let out = cli(
        &api,
        &token_file,
        &["volume", "expand", "cli-vol", "--size", "4G"],
    )?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(api.client().inspect_volume("cli-vol").await?.size_bytes, 4 * GIB);

    let out = cli(&api, &token_file, &["node", "ls"])?;
    let table = String::from_utf8(out.stdout)?;
    assert!(table.contains("node-2") && table.contains("up"), "{table}");

    // A refusal is the API's message, and an error exit.
    let out = cli(
        &api,
        &token_file,
        &["volume", "create", "cli-vol", "--size", "1G"],
    )?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");

    // A wrong token: refused, and the token is not shown.
    let wrong = api.dir.path().join("wrong");
    std::fs::write(&wrong, "wrong-token-0123456789abcdef")?;
    let out = cli(&api, &wrong, &["volume", "rm", "cli-vol"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("token is wrong") && !stderr.contains("wrong-token-0123"),
        "{stderr}"
    );
    assert_eq!(
        api.client().inspect_volume("cli-vol").await?.phase,
        VolumePhase::Creating
    );

    let out = cli(&api, &token_file, &["volume", "rm", "cli-vol"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_host_cluster_places_replicas_together_and_says_so() -> TestResult {
    let api = Api::start(1).await?;
    let v = api.client().create_volume(&volume("alone", GIB, 3)).await?;
    assert_eq!(v.placement.replicas.len(), 3);
    assert!(v.placement.replicas.iter().all(|r| r.node.as_str() == "node-0"));
    assert!(v.shared_failure_domain, "{v:?}");
    let inspected = api.client().inspect_volume("alone").await?;
    assert!(
        inspected.warnings.iter().any(|w| w.contains("share a node")),
        "{:?}",
        inspected.warnings
    );
    Ok(())
}

/// The schemathesis command tests/setup.sh installs (in a venv, ~/.cache/basalt-schemathesis or
/// `BASALT_SCHEMATHESIS_VENV`).
fn schemathesis() -> Result<PathBuf, String> {
    let venv = match std::env::var_os("BASALT_SCHEMATHESIS_VENV") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set")?)
            .join(".cache/basalt-schemathesis"),
    };
    let path = venv.join("bin/schemathesis");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: run tests/setup.sh (it installs schemathesis from PyPI)",
            path.display()
        ))
    }
}

/// Schemathesis sends requests generated from agent/openapi.json (valid and invalid ones) and checks
/// that none gets a 5xx and that every answer matches the document. The snapshot and QoS routes are
/// left out: they call the volume's controller, none runs here, and their correct answer is then 503.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() -> TestResult {
    let api = Api::start(3).await?;
    let c = api.client();
    c.create_volume(&volume("fuzz-me", GIB, 3)).await?;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/openapi.json");
    let bin = schemathesis()?;
    let out = tokio::process::Command::new(&bin)
        .arg("run")
        .arg(&schema)
        .args(["--url", &api.url()])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--exclude-path-regex", "/snapshots|/qos$"])
        .args(["--max-examples", "30"])
        .args(["--seed", "1"])
        .args(["--generation-database", "none"])
        .arg("--no-color")
        .current_dir(api.dir.path())
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A run that generated nothing proves nothing: its summary line is "N generated, N passed".
    let generated = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" generated,")
                .map(|(n, _)| n.trim().parse::<u64>())
        })
        .ok_or("schemathesis printed no count of generated test cases")??;
    assert!(
        generated >= 100,
        "schemathesis generated only {generated} test cases:\n{stdout}"
    );
    Ok(())
}

/// Every route but the health probe, `/metrics` and the OpenAPI document included, answers a request
/// without a token or with a wrong one 401 with the JSON error, before anything else is looked at, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn every_route_but_health_refuses_a_missing_or_wrong_token() -> TestResult {
    let api = Api::start(3).await?;
    api.client().create_volume(&volume("held", GIB, 3)).await?;
    let mut checked = 0;
    for route in api::routes::routes() {
        let path = route
            .pattern
            .replace("{name}", "held")
            .replace("{snapshot}", "s1");
        let body = matches!(route.method, Method::POST | Method::PUT).then(|| b"{}".to_vec());
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let before = api.snapshot().await?;
            let (status, bytes) = api
                .client_with(token)
                .raw(route.method.clone(), &path, body.clone())
                .await?;
            if route.operation == api::routes::Operation::Health {
                assert_eq!(status, StatusCode::OK, "the health probe is open");
                continue;
            }
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} {path}: not JSON ({e})", route.method))?;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} {path} {token:?}: {json}",
                route.method
            );
            assert_eq!(json["error"]["code"], "unauthorized", "{json}");
            let message = json["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("--agent-token-file"), "{message}");
            assert!(
                !message.contains(TOKEN) && !message.contains("wrong-token"),
                "{message}"
            );
            assert_eq!(
                api.snapshot().await?,
                before,
                "{} {path}: the store changed",
                route.method
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * (api::routes::routes().len() - 1));
    Ok(())
}

/// The API over TLS, with certificates made by `openssl`: a client with the CA that signed the
/// agent's certificate works; without a CA, with another CA, or speaking TLS to a plaintext agent, it
/// is told what to pass instead.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_tls_to_a_client_with_its_ca_and_says_what_to_change_otherwise() -> TestResult {
    let dir = tempfile::tempdir()?;
    let files = basalt_tests::volume::make_ca_and_server_cert(&dir.path().join("tls"))?;
    let other = basalt_tests::volume::make_ca_and_server_cert(&dir.path().join("other"))?;
    let config = api::tls::server_config(&files.cert, &files.key)?;
    let api = Api::start_with(2, api::Transport::Tls(config)).await?;
    let https = format!("https://{}", api.addr);
    let ca = std::fs::read(&files.ca)?;
    let token = || ApiToken::new(TOKEN).ok();

    let c = AgentClient::new(&https, token())?.with_ca(&ca, "ca.pem")?;
    assert_eq!(c.health().await?.status, "ok");
    assert_eq!(c.list_nodes().await?.nodes.len(), 2);
    // A bare HOST:PORT with a CA is https.
    let bare = AgentClient::new(&api.addr.to_string(), token())?.with_ca(&ca, "ca.pem")?;
    assert!(bare.url().starts_with("https://"));
    assert_eq!(bare.list_volumes(&[]).await?.volumes.len(), 0);

    // Plain HTTP to the TLS port: the agent answers in plain HTTP what to do.
    let (status, _, message) = refusal(api.client().list_volumes(&[]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        message.contains("https://") && message.contains("--agent-ca"),
        "{message}"
    );
    // https without a CA.
    let e = AgentClient::new(&https, token())?
        .list_volumes(&[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--agent-ca"), "{e}");
    // Another CA.
    let wrong = AgentClient::new(&https, token())?.with_ca(&std::fs::read(&other.ca)?, "other.pem")?;
    let e = wrong.list_volumes(&[]).await.unwrap_err().to_string();
    assert!(e.contains("did not sign") && e.contains("--agent-ca"), "{e}");
    // A CA for an explicit http:// URL is a contradiction.
    let e = AgentClient::new(&format!("http://{}", api.addr), token())?
        .with_ca(&ca, "ca.pem")
        .unwrap_err();
    assert!(e.to_string().contains("https://"), "{e}");

    // TLS to a plaintext agent.
    let plain = Api::start(1).await?;
    let e = AgentClient::new(&format!("https://{}", plain.addr), token())?
        .with_ca(&ca, "ca.pem")?
        .list_volumes(&[])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not speak TLS") && e.contains("http://"), "{e}");

    // Unusable files stop the agent with the file named.
    let e = format!(
        "{:#}",
        api::tls::server_config(&files.cert, &other.key).unwrap_err()
    );
    assert!(e.contains("does not belong") && e.contains("tls_key_file"), "{e}");
    let e = format!(
        "{:#}",
        api::tls::server_config(&files.key, &files.key).unwrap_err()
    );
    assert!(e.contains("certificate file") && e.contains("server.key"), "{e}");
    Ok(())
}
