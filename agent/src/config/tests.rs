//! The configuration file as a specification: defaults, a full file, and
//! one test per kind of mistake, each naming its key and line.

use std::io::Write;

use proptest::prelude::*;

use super::*;

fn host() -> Host {
    Host {
        name: Ok("host-1".to_string()),
        current_dir: PathBuf::from("/srv/agent"),
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_on(text, "agent.yaml", &host())
}

/// The error `text` gives, as (key, line, message).
fn error(text: &str) -> (String, usize, String) {
    match parse(text) {
        Err(ConfigError::Invalid {
            file,
            line,
            column,
            key,
            message,
        }) => {
            assert_eq!(file, "agent.yaml");
            assert!(column >= 1, "a column for {text:?}");
            (key, line, message)
        }
        other => panic!("expected a located error for {text:?}, got {other:?}"),
    }
}

/// Asserts that `text` is refused at `key`, on `line`, with a message
/// holding every one of `parts`.
fn refused(text: &str, key: &str, line: usize, parts: &[&str]) {
    let (got_key, got_line, message) = error(text);
    assert_eq!((got_key.as_str(), got_line), (key, line), "{text:?}: {message}");
    for part in parts {
        assert!(
            message.contains(part),
            "{part:?} missing from {message:?} for {text:?}"
        );
    }
}

fn temp_file(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(name);
    let mut file = std::fs::File::create(&path).expect("create a test file");
    file.write_all(b"secret\n").expect("write a test file");
    path.display().to_string()
}

#[test]
fn no_file_means_every_default() {
    let config = parse("").expect("the empty file is valid");
    assert_eq!(config.node.name.as_str(), "host-1");
    assert_eq!(config.node.address, DEFAULT_ADDRESS);
    assert!(config.node.labels.is_empty());
    assert_eq!(
        config.node.ports,
        PortRange {
            first: 7100,
            last: 7999
        }
    );
    assert_eq!(config.data_dir, PathBuf::from("/srv/agent/basalt-data/_agent"));
    assert_eq!(
        config.pools,
        [PoolConfig {
            name: "default".to_string(),
            kind: PoolKindConfig::Directory(PathBuf::from("/srv/agent/basalt-data/_agent/pools/default")),
            capacity_bytes: None,
        }]
    );
    assert_eq!(config.cluster, ClusterConfig::Embedded);
    assert_eq!(
        config.endpoints,
        EndpointsConfig {
            api: Some(ApiEndpoint {
                listen: "127.0.0.1:9700".parse().expect("address"),
                token_file: None,
                tls_cert_file: None,
                tls_key_file: None,
            }),
            docker: None,
            csi: None,
            csi_controller: None,
            csi_node: None,
            iscsi_redirector: None,
        }
    );
    assert_eq!(config.runtime, RuntimeConfig::Process { binary: None });
    assert_eq!(config.failover.replica_grace, Duration::from_secs(300));
    assert_eq!(parse("# only a comment\n").expect("comments only"), config);
}

#[test]
fn the_printed_defaults_read_back_as_the_defaults() {
    let printed = Config::default_yaml();
    assert_eq!(
        parse(&printed).expect("the printed defaults parse"),
        parse("").expect("defaults")
    );
    assert!(printed.contains("replica_grace: 5m"), "{printed}");
    assert!(printed.contains("# name:"), "the host's name stays commented out");
}

#[test]
fn load_without_a_file_gives_the_defaults_and_a_missing_file_is_named() {
    let defaults = Config::load(None).expect("defaults load on this host");
    assert_eq!(defaults.node.ports, DEFAULT_PORTS);
    let err = Config::load(Some(Path::new("/nonexistent/agent.yaml"))).expect_err("no such file");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/agent.yaml") && message.contains("--config"),
        "{message}"
    );
}

#[test]
fn a_full_file_sets_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = temp_file(&dir, "token");
    let cert = temp_file(&dir, "cert.pem");
    let key = temp_file(&dir, "key.pem");
    let pool_dir = dir.path().join("pools/fast");
    let text = format!(
        r#"
node:
  name: node-7
  address: 10.0.0.7
  labels: {{zone: eu-1a, rack: "12"}}
  ports: 8000-8099
data_dir: state
pools:
  - name: fast
    path: {pool}
    capacity: 500G
cluster:
  store: etcd
  etcd:
    endpoints: [https://10.0.0.1:2379, 10.0.0.2:2379]
    ca_file: {cert}
    cert_file: {cert}
    key_file: {key}
    lease_ttl: 15s
endpoints:
  api:
    listen: 0.0.0.0:9701
    token_file: {token}
    tls_cert_file: {cert}
    tls_key_file: {key}
  docker: /run/docker/plugins/basalt.sock
  csi: csi.sock
  csi_controller: /run/basalt/csi-controller.sock
  csi_node: csi-node.sock
  iscsi_redirector: 10.0.0.1:3260
runtime:
  kind: docker
  docker_socket: /run/docker.sock
  image: basalt:dev
failover:
  replica_grace: 10m
"#,
        pool = pool_dir.display(),
    );
    let config = parse(&text).expect("a valid file");
    assert_eq!(config.node.name.as_str(), "node-7");
    assert_eq!(config.node.address.to_string(), "10.0.0.7");
    assert_eq!(config.node.labels.get("rack").map(String::as_str), Some("12"));
    assert_eq!(
        config.node.ports,
        PortRange {
            first: 8000,
            last: 8099
        }
    );
    assert_eq!(config.data_dir, PathBuf::from("/srv/agent/state"));
    assert_eq!(config.pools[0].kind, PoolKindConfig::Directory(pool_dir));
    assert_eq!(config.pools[0].capacity_bytes, Some(500 << 30));
    let ClusterConfig::Etcd(etcd) = &config.cluster else {
        panic!("etcd expected: {:?}", config.cluster)
    };
    assert_eq!(etcd.endpoints, ["https://10.0.0.1:2379", "10.0.0.2:2379"]);
    assert_eq!(etcd.lease_ttl, Duration::from_secs(15));
    assert_eq!(etcd.key_file.as_deref(), Some(Path::new(&key)));
    let api = config.endpoints.api.as_ref().expect("api");
    assert_eq!(api.listen.to_string(), "0.0.0.0:9701");
    assert_eq!(api.token_file.as_deref(), Some(Path::new(&token)));
    assert_eq!(config.endpoints.csi, Some(PathBuf::from("/srv/agent/csi.sock")));
    assert_eq!(
        config.endpoints.csi_controller,
        Some(PathBuf::from("/run/basalt/csi-controller.sock"))
    );
    assert_eq!(
        config.endpoints.csi_node,
        Some(PathBuf::from("/srv/agent/csi-node.sock"))
    );
    assert_eq!(
        config.endpoints.iscsi_redirector,
        Some("10.0.0.1:3260".parse().unwrap())
    );
    assert_eq!(
        config.runtime,
        RuntimeConfig::Docker {
            socket: PathBuf::from("/run/docker.sock"),
            image: "basalt:dev".to_string(),
        }
    );
    assert_eq!(config.failover.replica_grace, Duration::from_secs(600));
}

#[test]
fn relative_paths_are_taken_from_the_current_directory() {
    let here = parse("data_dir: .\n").expect("valid");
    assert_eq!(here.data_dir, PathBuf::from("/srv/agent"));
    let nested = parse("data_dir: ./a/./b\nendpoints:\n  docker: plugin.sock\n").expect("valid");
    assert_eq!(nested.data_dir, PathBuf::from("/srv/agent/a/b"));
    assert_eq!(
        nested.endpoints.docker,
        Some(PathBuf::from("/srv/agent/plugin.sock"))
    );
}

#[test]
fn the_api_can_be_turned_off_and_docker_takes_its_defaults() {
    let config = parse("endpoints:\n  api: off\nruntime:\n  kind: docker\n").expect("valid");
    assert_eq!(config.endpoints.api, None);
    assert_eq!(
        config.runtime,
        RuntimeConfig::Docker {
            socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            image: DEFAULT_IMAGE.to_string(),
        }
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_the_key_meant() {
    refused(
        "node:\n  nmae: a\n",
        "node.nmae",
        2,
        &["unknown field `nmae`", "did you mean `name`?"],
    );
    refused(
        "endpoints:\n  api:\n    tokn_file: /x\n",
        "endpoints.api.tokn_file",
        3,
        &["did you mean `token_file`?"],
    );
    refused("colour: blue\n", "colour", 1, &["unknown field `colour`"]);
    let (_, _, message) = error("node:\n  wholly_different: 1\n");
    assert!(!message.contains("did you mean"), "{message}");
}

#[test]
fn an_unknown_choice_is_named_with_the_choice_meant() {
    refused(
        "runtime:\n  kind: dokcer\n",
        "runtime.kind",
        2,
        &["unknown variant `dokcer`", "did you mean `docker`?"],
    );
    refused(
        "cluster:\n  store: zookeeper\n",
        "cluster.store",
        2,
        &["`embedded`", "`etcd`"],
    );
}

#[test]
fn a_bad_value_says_what_to_write() {
    refused(
        "pools:\n  - name: a\n    path: /tmp/basalt-pool-a\n    capacity: 10X\n",
        "pools[0].capacity",
        4,
        &["not a size unit"],
    );
    refused(
        "node:\n  ports: 8000-7000\n",
        "node.ports",
        2,
        &["write the lower port first"],
    );
    refused("node:\n  ports: 7100\n", "node.ports", 2, &["FIRST-LAST"]);
    refused(
        "node:\n  address: ten.0.0.1\n",
        "node.address",
        2,
        &["not an IP address"],
    );
    refused(
        "node:\n  address: 0.0.0.0\n",
        "node",
        2,
        &["give this host's own address"],
    );
    refused(
        "node:\n  name: Host_1\n",
        "node.name",
        2,
        &["not allowed", "a-z, 0-9"],
    );
    refused(
        "failover:\n  replica_grace: 5d\n",
        "failover.replica_grace",
        2,
        &["not a duration unit"],
    );
    refused(
        "failover:\n  replica_grace: 0s\n",
        "failover.replica_grace",
        2,
        &["at least 1s"],
    );
    refused(
        "endpoints:\n  api:\n    listen: localhost\n",
        "endpoints.api.listen",
        3,
        &["127.0.0.1:9700"],
    );
    refused(
        "cluster:\n  store: etcd\n  etcd:\n    endpoints: [\"http://x/\"]\n",
        "cluster.etcd.endpoints[0]",
        4,
        &["not an etcd endpoint"],
    );
}

#[test]
fn a_bad_type_says_what_was_expected() {
    refused(
        "node:\n  ports: [1, 2]\n",
        "node.ports",
        2,
        &["expected a port range like 7100-7999"],
    );
    refused("pools: fast\n", "pools", 1, &["expected a list of pools"]);
    refused("node: 3\n", "node", 1, &["expected a section of keys"]);
    refused(
        "failover:\n  replica_grace: true\n",
        "failover.replica_grace",
        2,
        &["a duration like 5m"],
    );
}

#[test]
fn pools_must_be_distinct_absolute_and_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = temp_file(&dir, "not-a-dir");
    let a = dir.path().join("a");
    let twice = format!(
        "pools:\n  - name: a\n    path: {p}\n  - name: a\n    path: {p}/2\n",
        p = a.display()
    );
    refused(&twice, "pools", 2, &["pools[0] and pools[1] are both named `a`"]);
    let same_place = format!(
        "pools:\n  - name: a\n    path: {p}\n  - name: b\n    path: {p}\n",
        p = a.display()
    );
    refused(&same_place, "pools", 2, &["uses", "again"]);
    refused(
        "pools:\n  - name: a\n    path: data/a\n",
        "pools[0].path",
        3,
        &["not an absolute path"],
    );
    refused(
        &format!("pools:\n  - name: a\n    path: {file}\n"),
        "pools[0]",
        2,
        &["exists and is not a directory"],
    );
    refused(
        &format!("pools:\n  - name: a\n    path: {file}/sub\n"),
        "pools[0]",
        2,
        &["cannot be created", "is not a directory"],
    );
    refused(
        "pools:\n  - name: a\n    device: /dev/null\n",
        "pools[0]",
        2,
        &["is not a block device"],
    );
    refused(
        "pools:\n  - name: a\n    device: /dev/basalt-no-such-disk\n",
        "pools[0]",
        2,
        &["cannot be opened"],
    );
    refused(
        "pools:\n  - name: a\n",
        "pools[0]",
        2,
        &["neither `path`", "nor `device`"],
    );
    refused(
        &format!(
            "pools:\n  - name: a\n    path: {p}\n    device: /dev/null\n",
            p = a.display()
        ),
        "pools[0]",
        2,
        &["both `path` and `device`"],
    );
    refused("pools: []\n", "pools", 1, &["the pool list is empty"]);
    refused(
        "pools:\n  - path: /tmp\n",
        "pools[0]",
        2,
        &["missing field `name`"],
    );
}

#[test]
fn rules_between_keys_name_their_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = temp_file(&dir, "cert.pem");
    refused(
        &format!("endpoints:\n  api:\n    tls_cert_file: {cert}\n"),
        "endpoints.api",
        3,
        &["tls_cert_file is given without tls_key_file"],
    );
    refused(
        "endpoints:\n  api:\n    token_file: /nonexistent/token\n",
        "endpoints.api.token_file",
        3,
        &["cannot be read", "/nonexistent/token"],
    );
    refused("cluster:\n  store: etcd\n", "cluster", 2, &["no `etcd` section"]);
    refused(
        "cluster:\n  store: etcd\n  etcd:\n    lease_ttl: 5s\n",
        "cluster.etcd",
        4,
        &["etcd has no endpoints"],
    );
    refused(
        "cluster:\n  etcd:\n    endpoints: [a:1]\n",
        "cluster",
        2,
        &["store is embedded"],
    );
    refused(
        &format!("runtime:\n  kind: docker\n  binary: {cert}\n"),
        "runtime",
        2,
        &["binary applies to `kind: process`"],
    );
    refused(
        "runtime:\n  image: basalt:dev\n",
        "runtime",
        2,
        &["apply to `kind: docker`"],
    );
}

#[test]
fn broken_yaml_is_located() {
    let (_, line, message) = error("node:\n  name: [a\n");
    assert!(line >= 2, "{line}: {message}");
    let rendered = parse("node:\n  name: [a\n").expect_err("broken").to_string();
    assert!(rendered.starts_with(&format!("agent.yaml:{line}:")), "{rendered}");
    let rendered = parse("node:\n  labels: {a: b\n")
        .expect_err("unclosed")
        .to_string();
    assert!(
        rendered.starts_with("agent.yaml:3:1: key `node.labels`: ") && rendered.contains("flow mapping"),
        "{rendered}"
    );
}

#[test]
fn an_unusable_host_name_asks_for_node_name() {
    let odd_host = Host {
        name: Ok("my_host".to_string()),
        current_dir: PathBuf::from("/"),
    };
    let err = Config::parse_on("", "agent.yaml", &odd_host).expect_err("not a node name");
    let message = err.to_string();
    assert!(
        message.starts_with("agent.yaml: key `node.name`:") && message.contains("set node.name"),
        "{message}"
    );
    assert!(Config::parse_on("node:\n  name: fine\n", "agent.yaml", &odd_host).is_ok());
}

#[test]
fn the_error_line_reads_file_line_column_key() {
    let rendered = parse("node:\n  ports: 9-1\n").expect_err("inverted").to_string();
    assert!(
        rendered.starts_with("agent.yaml:2:10: key `node.ports`: `9-1` is empty"),
        "{rendered}"
    );
    assert!(
        !rendered.contains("at line"),
        "the position is said once: {rendered}"
    );
}

#[test]
fn typos_are_matched_to_close_names_only() {
    assert_eq!(edit_distance("nmae", "name"), 1);
    assert_eq!(edit_distance("token", "token_file"), 5);
    assert_eq!(
        did_you_mean("unknown field `lables`, expected one of `name`, `address`, `labels`, `ports`"),
        Some("labels".to_string())
    );
    assert_eq!(did_you_mean("unknown field `x`, expected `listen`"), None);
    assert_eq!(did_you_mean("invalid type: integer `1`, expected `a`"), None);
}

proptest! {
    /// Whatever the file holds, reading it answers (a config or an error
    /// with a message): it never panics.
    #[test]
    fn any_text_is_read_or_refused_without_panicking(text in "[ -~\n]{0,200}") {
        match parse(&text) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Files made of valid keys in any mix parse, and each key read is the
    /// value written.
    #[test]
    fn written_values_read_back(
        first in 1..60000u16,
        span in 0..1000u16,
        grace_s in 1..86400u64,
        labels in prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{1,8}", 0..4),
        api_off in any::<bool>(),
    ) {
        let last = first.saturating_add(span);
        let labels_yaml: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        let text = format!(
            "node:\n  ports: {first}-{last}\n  labels: {{{}}}\nfailover:\n  replica_grace: {grace_s}s\n{}",
            labels_yaml.join(", "),
            if api_off { "endpoints:\n  api: off\n" } else { "" }
        );
        let config = parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(config.node.ports, PortRange { first, last });
        prop_assert_eq!(config.node.labels, labels);
        prop_assert_eq!(config.failover.replica_grace, Duration::from_secs(grace_s));
        prop_assert_eq!(config.endpoints.api.is_none(), api_off);
    }
}

#[test]
fn a_duration_without_a_unit_is_refused_and_hours_are_read() {
    refused(
        "failover:\n  replica_grace: 3600\n",
        "failover.replica_grace",
        2,
        &["`3600` has no unit", "like 5m"],
    );
    refused(
        "failover:\n  replica_grace: \"3600\"\n",
        "failover.replica_grace",
        2,
        &["has no unit"],
    );
    refused(
        "cluster:\n  store: etcd\n  etcd:\n    endpoints: [10.0.0.1:2379]\n    lease_ttl: 15\n",
        "cluster.etcd.lease_ttl",
        5,
        &["`15` has no unit", "like 10s"],
    );
    let hours = parse("failover:\n  replica_grace: 2h\n").expect("hours are a unit");
    assert_eq!(hours.failover.replica_grace, Duration::from_secs(7200));
}

#[test]
fn an_empty_api_section_means_the_defaults_and_off_turns_it_off() {
    let empty = parse("endpoints:\n  api:\n").expect("an empty api section");
    assert_eq!(empty.endpoints, parse("").expect("defaults").endpoints);
    // The printed file with its one key under `api:` commented out.
    let printed = Config::default_yaml().replace("    listen:", "    # listen:");
    let commented = parse(&printed).expect("the printed file, listen commented out");
    assert_eq!(
        commented.endpoints.api.map(|api| api.listen),
        Some(DEFAULT_API_LISTEN)
    );
    assert_eq!(
        parse("endpoints:\n  api: off\n").expect("off").endpoints.api,
        None
    );
    refused(
        "endpoints:\n  api: none\n",
        "endpoints.api",
        2,
        &["`none` is not a setting", "api: off"],
    );
}

#[test]
fn csi_sockets_are_endpoints_of_their_own() {
    let config = parse("endpoints:\n  csi_controller: /run/c.sock\n  csi_node: /run/n.sock\n")
        .expect("both CSI services on their own sockets");
    assert_eq!(config.endpoints.csi, None);
    assert_eq!(
        config.endpoints.csi_controller,
        Some(PathBuf::from("/run/c.sock"))
    );
    assert_eq!(config.endpoints.csi_node, Some(PathBuf::from("/run/n.sock")));
    refused(
        "endpoints:\n  csi: /run/c.sock\n  csi_node: /run/c.sock\n",
        "endpoints",
        2,
        &["csi and csi_node both use the socket /run/c.sock"],
    );
}

#[test]
fn the_iscsi_redirector_is_on_with_etcd_off_alone_and_never_on_a_service_port() {
    let etcd =
        "cluster:\n  store: etcd\n  etcd:\n    endpoints: [10.0.0.1:2379]\nnode:\n  address: 10.0.0.9\n";
    let on = parse(etcd).expect("valid");
    assert_eq!(
        on.endpoints.iscsi_redirector,
        Some("10.0.0.9:3260".parse().unwrap())
    );
    assert_eq!(parse("").expect("embedded").endpoints.iscsi_redirector, None);
    let off = parse(&format!("{etcd}endpoints:\n  iscsi_redirector: off\n")).expect("valid");
    assert_eq!(off.endpoints.iscsi_redirector, None);
    let set = parse("endpoints:\n  iscsi_redirector: 127.0.0.1:13260\n").expect("valid");
    assert_eq!(
        set.endpoints.iscsi_redirector,
        Some("127.0.0.1:13260".parse().unwrap())
    );
    refused(
        "endpoints:\n  iscsi_redirector: 3260\n",
        "endpoints.iscsi_redirector",
        2,
        &["not an address and port", "or `off`"],
    );
    for (text, part) in [
        (
            "endpoints:\n  iscsi_redirector: 127.0.0.1:7150\n",
            "is in node.ports 7100-7999",
        ),
        (
            "endpoints:\n  iscsi_redirector: 127.0.0.1:9700\n",
            "also endpoints.api.listen",
        ),
    ] {
        match parse(text) {
            Err(ConfigError::Rule { key, message, .. }) => {
                assert_eq!(key, "endpoints.iscsi_redirector");
                assert!(message.contains(part), "{message}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn etcd_needs_an_address_other_hosts_reach() {
    let etcd = "cluster:\n  store: etcd\n  etcd:\n    endpoints: [10.0.0.1:2379]\n";
    match parse(etcd) {
        Err(ConfigError::Default { key, message, .. }) => {
            assert_eq!(key, "node.address");
            assert!(
                message.contains("defaults to 127.0.0.1") && message.contains("set node.address"),
                "{message}"
            );
        }
        other => panic!("the default loopback address with etcd: {other:?}"),
    }
    match parse(&format!("node:\n  address: ::1\n{etcd}")) {
        Err(ConfigError::Rule { key, message, .. }) => {
            assert_eq!(key, "node.address");
            assert!(
                message.contains("::1 would make them dial themselves"),
                "{message}"
            );
        }
        other => panic!("a loopback address with etcd: {other:?}"),
    }
    let reachable = parse(&format!("node:\n  address: 10.0.0.9\n{etcd}")).expect("valid");
    assert_eq!(reachable.node.address.to_string(), "10.0.0.9");
    assert_eq!(parse("").expect("embedded").node.address, DEFAULT_ADDRESS);
}

#[test]
fn pools_on_one_filesystem_each_give_their_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let pools = |cap_a: &str, cap_b: &str| {
        format!(
            "pools:\n  - name: a\n    path: {}\n{cap_a}  - name: b\n    path: {}\n{cap_b}",
            a.display(),
            b.display()
        )
    };
    let cap = "    capacity: 10G\n";
    for text in [pools("", ""), pools(cap, ""), pools("", cap)] {
        let (key, _, message) = error(&text);
        assert_eq!(key, "pools", "{text}");
        assert!(
            message.contains("pools[0] (a) and pools[1] (b) are on the same filesystem")
                && message.contains("give each a `capacity`"),
            "{message}"
        );
    }
    let capped = parse(&pools(cap, cap)).expect("both capped");
    assert_eq!(capped.pools[1].capacity_bytes, Some(10 << 30));
}

#[test]
fn the_default_data_directory_is_no_volume_name() {
    let config = parse("").expect("defaults");
    let leaf = config
        .data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a name");
    assert!(
        basalt_engine::name::VolumeName::new(leaf).is_err(),
        "`basalt volume up --name {leaf}` would share {}",
        config.data_dir.display()
    );
}

#[test]
fn label_values_are_kept_as_written() {
    for number in ["1", "+1", "0x10", "0o10", "-3"] {
        let (key, _, message) = error(&format!("node:\n  labels: {{zone: {number}}}\n"));
        assert_eq!(key, "node.labels.zone");
        assert!(message.contains("quote it"), "{number}: {message}");
    }
    let quoted = parse("node:\n  labels: {zone: \"01\"}\n").expect("quoted");
    assert_eq!(quoted.node.labels.get("zone").map(String::as_str), Some("01"));
}
