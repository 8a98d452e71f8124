//! The platform chart `charts/basalt-platform` (the agents as a DaemonSet with the CSI node plugin, the CSI
//! controller with its sidecars, CSIDriver, RBAC, StorageClasses, VolumeSnapshotClass, etcd, monitoring),
//! checked offline like the per-volume chart: lint, schema validation, rendering, then assertions on the
//! objects. The node's topology init script runs here too, against a stand-in `kubectl` (there is no
//! cluster), and the config it writes is read by the agent's own config parser.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use basalt_tests::helm::{assert_lints_clean, helm, strings, workspace};
use serde_json::{json, Value};

fn chart_dir() -> String {
    workspace().join("charts/basalt-platform").display().to_string()
}

/// The values every render needs (the API token Secret), merged under `values`.
fn with_required(mut values: Value) -> Value {
    let map = values.as_object_mut().expect("values are an object");
    let agent = map.entry("agent").or_insert_with(|| json!({}));
    agent
        .as_object_mut()
        .expect("agent is an object")
        .entry("apiTokenSecret")
        .or_insert_with(|| json!("basalt-api-token"));
    values
}

fn render(values: Value) -> Vec<Value> {
    let answer = helm(
        json!({"op": "render", "chart": chart_dir(), "values": with_required(values),
                             "name": "bp", "namespace": "basalt"}),
    );
    assert_eq!(answer["ok"], true, "rendering failed: {}", answer["error"]);
    answer["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| o["object"].clone())
        .collect()
}

fn render_error(values: Value) -> String {
    let answer = helm(json!({"op": "render", "chart": chart_dir(), "values": values,
                             "name": "bp", "namespace": "basalt"}));
    assert_eq!(answer["ok"], false, "rendering should have failed");
    answer["error"].as_str().unwrap_or_default().to_string()
}

fn one<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn all<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The pod volume a container mounts at `path`.
fn volume_at<'a>(workload: &'a Value, container_name: &str, path: &str) -> &'a Value {
    let c = container(workload, container_name);
    let mount = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("{container_name} mounts nothing at {path}"));
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no pod volume {}", mount["name"]))
}

#[test]
fn chart_lints_clean_with_default_and_custom_values() {
    for values in [
        json!({}),
        json!({"etcd": {"enabled": false},
               "externalEtcd": {"endpoints": ["https://etcd-0.example:2379"], "tlsSecret": "etcd-tls"},
               "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
               "storageClasses": [{"name": "fast", "replicas": 2, "parameters": {"selector": "disk=ssd", "writeIops": 500}}]}),
    ] {
        assert_lints_clean(&chart_dir(), &with_required(values), "basalt");
    }
}

#[test]
fn the_schema_and_the_templates_refuse_bad_values_by_name() {
    for (values, want) in [
        (json!({"agent": {"apiTokenSecret": "t", "colour": 1}}), "colour"),
        (
            json!({"agent": {"apiTokenSecret": "t", "pools": [{"name": "p"}]}}),
            "pools",
        ),
        (
            json!({"agent": {"apiTokenSecret": "t"}, "storageClasses": [{"name": "x", "replicas": 0}]}),
            "replicas",
        ),
        (
            json!({"agent": {"apiTokenSecret": "t"}, "storageClasses": [{"name": "x", "replicas": 1, "parameters": {"replica": "3"}}]}),
            "replica",
        ),
        (
            json!({"agent": {"apiTokenSecret": "t"}, "etcd": {"enabled": true, "replicas": 2}}),
            "replicas",
        ),
        (
            json!({"agent": {"apiTokenSecret": "t"}, "storageClasses": [{"name": "x", "replicas": 1, "fsType": "btrfs"}]}),
            "fsType",
        ),
        (json!({}), "apiTokenSecret"),
        (
            json!({"agent": {"apiTokenSecret": "t"}, "etcd": {"enabled": false}}),
            "externalEtcd.endpoints",
        ),
    ] {
        let e = render_error(values.clone());
        assert!(e.contains(want), "{values}: {want:?} not in {e:?}");
    }
}

#[test]
fn the_controller_runs_the_standard_sidecars_on_one_shared_socket() {
    let objects = render(json!({}));
    let d = one(&objects, "Deployment", "bp-basalt-csi-controller");
    let names: Vec<&str> = containers(d).iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "csi-controller",
            "csi-provisioner",
            "csi-attacher",
            "csi-snapshotter",
            "csi-resizer",
            "liveness-probe"
        ]
    );
    let plugin = strings(&container(d, "csi-controller")["args"]);
    assert!(
        plugin.contains(&"--csi-controller-only".to_string()),
        "{plugin:?}"
    );
    // Every container shares the plugin's socket directory, an emptyDir of this pod only.
    for name in &names {
        let v = volume_at(d, name, "/csi");
        assert!(v["emptyDir"].is_object(), "{name}: {v}");
        if *name != "csi-controller" {
            let args = strings(&container(d, name)["args"]);
            assert!(
                args.contains(&"--csi-address=/csi/csi.sock".to_string()),
                "{name}: {args:?}"
            );
        }
    }
    for name in [
        "csi-provisioner",
        "csi-attacher",
        "csi-snapshotter",
        "csi-resizer",
    ] {
        let args = strings(&container(d, name)["args"]);
        assert!(
            args.contains(&"--leader-election".to_string()),
            "{name}: {args:?}"
        );
    }
    let provisioner = strings(&container(d, "csi-provisioner")["args"]);
    for want in [
        "--feature-gates=Topology=true",
        "--extra-create-metadata",
        "--enable-capacity",
    ] {
        assert!(
            provisioner.contains(&want.to_string()),
            "{want} not in {provisioner:?}"
        );
    }
    // The plugin's own config serves the controller on that socket, and nothing else.
    let cm = one(&objects, "ConfigMap", "bp-basalt-config");
    let config = cm["data"]["controller.yaml"].as_str().unwrap();
    assert!(
        config.contains("csi_controller: /csi/csi.sock") && config.contains("api: off"),
        "{config}"
    );
    // The standby controller on another node.
    let anti = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["serviceAccountName"],
        "bp-basalt-csi-controller"
    );
}

#[test]
fn the_node_plugin_shares_its_socket_with_the_kubelet_and_the_registrar() {
    let objects = render(json!({}));
    let ds = one(&objects, "DaemonSet", "bp-basalt-node");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    let agent = container(ds, "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    let plugin_dir = "/var/lib/kubelet/plugins/basalt.csi.io";
    for name in ["agent", "node-driver-registrar", "liveness-probe"] {
        let v = volume_at(ds, name, "/csi");
        assert_eq!(v["hostPath"]["path"], plugin_dir, "{name}");
    }
    let registrar = strings(&container(ds, "node-driver-registrar")["args"]);
    assert!(
        registrar.contains(&"--csi-address=/csi/csi.sock".to_string()),
        "{registrar:?}"
    );
    assert!(
        registrar.contains(&format!("--kubelet-registration-path={plugin_dir}/csi.sock")),
        "{registrar:?}"
    );
    let reg = volume_at(ds, "node-driver-registrar", "/registration");
    assert_eq!(reg["hostPath"]["path"], "/var/lib/kubelet/plugins_registry");
    // Mounts the plugin makes for pods propagate back to the host.
    let kubelet_mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/kubelet")
        .expect("the kubelet's directory is mounted");
    assert_eq!(kubelet_mount["mountPropagation"], "Bidirectional");
    assert_eq!(volume_at(ds, "agent", "/dev")["hostPath"]["path"], "/dev");
    let cm = one(&objects, "ConfigMap", "bp-basalt-config");
    assert!(cm["data"]["agent.yaml"]
        .as_str()
        .unwrap()
        .contains("csi_node: /csi/csi.sock"));
    // The CSIDriver the kubelet looks the plugin up by.
    let driver = one(&objects, "CSIDriver", basalt_agent::csi::PLUGIN_NAME);
    assert_eq!(driver["spec"]["attachRequired"], true);
    assert_eq!(driver["spec"]["storageCapacity"], true);
}

/// The init container's script run here with a stand-in `kubectl` that answers node labels (there is no
/// cluster to ask), its paths moved into a temporary directory; the config it writes is read by the
/// agent's own parser, which must find the node's name, address and topology labels.
#[test]
fn the_nodes_labels_become_the_agents_topology() {
    let objects = render(
        json!({"agent": {"topologyLabels": {"zone": "topology.kubernetes.io/zone",
                                                              "rack": "example.com/rack",
                                                              "region": "topology.kubernetes.io/region"}}}),
    );
    let ds = one(&objects, "DaemonSet", "bp-basalt-node");
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    let script = strings(&init["args"]).join("\n");
    let cm = one(&objects, "ConfigMap", "bp-basalt-config");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("base")).unwrap();
    std::fs::create_dir_all(root.join("agent")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    // The pod's files (the API token Secret) under the same directory.
    std::fs::create_dir_all(root.join("api-token")).unwrap();
    std::fs::write(root.join("api-token/token"), "0123456789abcdef0123456789abcdef").unwrap();
    let moved = |text: &str| text.replace("/etc/basalt/", &format!("{}/", root.display()));
    std::fs::write(
        root.join("base/agent.yaml"),
        moved(cm["data"]["agent.yaml"].as_str().unwrap()),
    )
    .unwrap();
    // The stand-in: `kubectl get node NAME -o jsonpath='{.metadata.labels.KEY}'` for a node in zone
    // eu-1a, rack r7, and no region label.
    let kubectl = root.join("bin/kubectl");
    std::fs::write(
        &kubectl,
        "#!/bin/sh\ncase \"$*\" in\n  *topology\\\\.kubernetes\\\\.io/zone*) printf eu-1a ;;\n  *example\\\\.com/rack*) printf r7 ;;\n  *) ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = moved(&script);
    let out = Command::new("/bin/sh")
        .args(["-ec", &script])
        .env("PATH", format!("{}:/usr/bin:/bin", root.join("bin").display()))
        .env("NODE_NAME", "worker-3")
        .env("HOST_IP", "10.0.0.13")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(root.join("agent/agent.yaml")).unwrap();
    let config =
        basalt_agent::config::Config::parse(&text, "agent.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.node.name.as_str(), "worker-3");
    assert_eq!(config.node.address.to_string(), "10.0.0.13");
    assert_eq!(
        config.node.labels,
        [
            ("rack".to_string(), "r7".to_string()),
            ("zone".to_string(), "eu-1a".to_string())
        ]
        .into()
    );
    assert!(config.endpoints.csi_node.is_some());
    // The node's initiators log in through its agent's redirector, on the node's address.
    assert_eq!(
        config.endpoints.iscsi_redirector,
        Some("10.0.0.13:3260".parse().unwrap())
    );
    assert!(matches!(
        config.cluster,
        basalt_agent::config::ClusterConfig::Etcd(_)
    ));
}

#[test]
fn rbac_grants_what_the_sidecars_and_the_agents_need() {
    let objects = render(json!({}));
    let role = one(&objects, "ClusterRole", "bp-basalt-csi-controller");
    let allows = |resource: &str, verb: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            strings(&r["resources"]).iter().any(|x| x == resource)
                && strings(&r["verbs"]).iter().any(|x| x == verb)
        })
    };
    for (resource, verb) in [
        ("persistentvolumes", "create"),
        ("persistentvolumes", "delete"),
        ("persistentvolumeclaims/status", "patch"),
        ("volumeattachments/status", "patch"),
        ("csinodes", "get"),
        ("volumesnapshotcontents", "update"),
        ("volumesnapshotcontents/status", "update"),
        ("csistoragecapacities", "create"),
        ("events", "create"),
    ] {
        assert!(allows(resource, verb), "the controller may not {verb} {resource}");
    }
    let binding = one(&objects, "ClusterRoleBinding", "bp-basalt-csi-controller");
    assert_eq!(binding["subjects"][0]["name"], "bp-basalt-csi-controller");
    let leases = one(&objects, "Role", "bp-basalt-csi-controller");
    assert!(leases["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| strings(&r["resources"]) == ["leases"]));
    let node_role = one(&objects, "ClusterRole", "bp-basalt-node");
    assert_eq!(strings(&node_role["rules"][0]["resources"]), ["nodes"]);
    let ds = one(&objects, "DaemonSet", "bp-basalt-node");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "bp-basalt-node"
    );
}

#[test]
fn storage_classes_and_the_snapshot_class_name_the_driver() {
    let objects = render(json!({}));
    let classes = all(&objects, "StorageClass");
    assert_eq!(classes.len(), 2);
    let r3 = one(&objects, "StorageClass", "basalt-r3");
    let r1 = one(&objects, "StorageClass", "basalt-r1");
    for sc in [r1, r3] {
        assert_eq!(sc["provisioner"], "basalt.csi.io");
        assert_eq!(sc["allowVolumeExpansion"], true);
        assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");
        assert_eq!(sc["parameters"]["csi.storage.k8s.io/fstype"], "ext4");
    }
    assert_eq!(r3["parameters"]["replicas"], "3");
    assert_eq!(r1["parameters"]["replicas"], "1");
    assert_eq!(
        r3["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    assert!(r1["metadata"]["annotations"].is_null());
    // What the driver itself would make of each class's parameters.
    for sc in [r1, r3] {
        let params: std::collections::HashMap<String, String> = sc["parameters"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        basalt_agent::csi::params::parse(&params).unwrap();
    }
    let snap = one(&objects, "VolumeSnapshotClass", "basalt-snapshots");
    assert_eq!(snap["driver"], "basalt.csi.io");
    assert_eq!(snap["deletionPolicy"], "Delete");
}

#[test]
fn etcd_is_deployed_spread_or_named() {
    let objects = render(json!({}));
    let sts = one(&objects, "StatefulSet", "bp-basalt-etcd");
    assert_eq!(sts["spec"]["replicas"], 3);
    let anti = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    let cluster = strings(&sts["spec"]["template"]["spec"]["containers"][0]["command"])
        .into_iter()
        .find(|a| a.starts_with("--initial-cluster="))
        .unwrap();
    assert_eq!(cluster.matches("=http://").count(), 3, "{cluster}");
    let cm = one(&objects, "ConfigMap", "bp-basalt-config");
    let agent = cm["data"]["agent.yaml"].as_str().unwrap();
    assert!(
        agent.contains("http://bp-basalt-etcd-2.bp-basalt-etcd.basalt.svc:2379"),
        "{agent}"
    );

    let external = render(json!({"etcd": {"enabled": false},
                                 "externalEtcd": {"endpoints": ["https://10.1.0.5:2379"], "tlsSecret": "etcd-tls"}}));
    assert!(all(&external, "StatefulSet").is_empty());
    let cm = one(&external, "ConfigMap", "bp-basalt-config");
    let agent = cm["data"]["agent.yaml"].as_str().unwrap();
    assert!(
        agent.contains("https://10.1.0.5:2379") && agent.contains("ca_file: /etc/basalt/etcd-tls/ca.crt"),
        "{agent}"
    );
    let ds = one(&external, "DaemonSet", "bp-basalt-node");
    assert_eq!(
        volume_at(ds, "agent", "/etc/basalt/etcd-tls")["secret"]["secretName"],
        "etcd-tls"
    );
}

#[test]
fn the_service_monitor_scrapes_the_agents_with_their_token() {
    assert!(all(&render(json!({})), "ServiceMonitor").is_empty());
    let objects =
        render(json!({"metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}}}));
    let sm = one(&objects, "ServiceMonitor", "bp-basalt-agent");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], "api");
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(ep["authorization"]["credentials"]["name"], "basalt-api-token");
    let svc = one(&objects, "Service", "bp-basalt-agent-metrics");
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/component"], "node");
}
