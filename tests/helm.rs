//! The Helm chart `charts/basalt-volume`, checked offline: lint, schema validation and rendering with default
//! and non-default values, then assertions on the rendered Kubernetes objects.
//!
//! There is no `helm` binary and no cluster here. `charts/helm_check.py` drives the Helm SDK through the PyPI
//! package helm-python-sdk (installed by tests/setup.sh) and hands the rendered objects back as JSON, parsed
//! strictly (a duplicated YAML key is an error, as in the API server). A missing Python module is a test
//! failure that says to run ./tests/setup.sh, never a skip.

use basalt_tests::helm::{assert_lints_clean, helm, strings, workspace};
use serde_json::{json, Value};

fn chart_dir() -> String {
    workspace().join("charts/basalt-volume").display().to_string()
}

/// The rendered objects of a release `name` in namespace `ns` with `values`; fails the test on any error.
fn render_as(mut values: Value, name: &str, ns: &str) -> Rendered {
    with_auth(&mut values);
    let answer =
        helm(json!({"op": "render", "chart": chart_dir(), "values": values, "name": name, "namespace": ns}));
    assert_eq!(answer["ok"], true, "rendering failed: {}", answer["error"]);
    let objects = answer["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| o["object"].clone())
        .collect();
    Rendered {
        objects,
        notes: answer["notes"].as_str().unwrap_or_default().to_string(),
    }
}

fn render(values: Value) -> Rendered {
    render_as(values, "vol1", "storage")
}

/// `values` with the (required) auth Secret named, unless the test names its own.
fn with_auth(values: &mut Value) {
    if let Some(map) = values.as_object_mut() {
        map.entry("auth")
            .or_insert_with(|| json!({"existingSecret": "vol1-auth"}));
    }
}

/// The schema's verdict on `values`: Ok, or the error text.
fn validate(values: Value) -> Result<(), String> {
    let answer = helm(json!({"op": "validate", "chart": chart_dir(), "values": values}));
    if answer["ok"] == true {
        Ok(())
    } else {
        Err(answer["error"].as_str().unwrap_or_default().to_string())
    }
}

struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name_suffix: &str) -> &Value {
        let found: Vec<_> = self
            .all(kind)
            .into_iter()
            .filter(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with(name_suffix)
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {kind} named *{name_suffix}, found {}",
            found.len()
        );
        found[0]
    }

    fn controller(&self) -> &Value {
        self.one("Deployment", "-controller")
    }

    fn replicas(&self) -> &Value {
        self.one("StatefulSet", "-replica")
    }

    fn controller_args(&self) -> Vec<String> {
        strings(&container(self.controller())["args"])
    }

    fn replica_args(&self) -> Vec<String> {
        strings(&container(self.replicas())["args"])
    }
}

fn container(workload: &Value) -> &Value {
    let containers = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

/// Whether every `selector` label is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector map");
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

fn pod_labels(workload: &Value) -> &Value {
    &workload["spec"]["template"]["metadata"]["labels"]
}

fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().filter_map(|a| a.strip_prefix(&prefix)).collect()
}

#[test]
fn chart_lints_clean_with_default_and_custom_values() {
    for mut values in [
        json!({}),
        json!({"replicas": {"count": 5, "zoneSpread": {"enabled": true}, "storage": {"type": "hostPath"}},
               "metrics": {"serviceMonitor": {"enabled": true}},
               "chap": {"enabled": true, "user": "alice", "existingSecret": "vol1-chap"}}),
        json!({"replicas": {"storage": {"type": "blockDevice"}}}),
        json!({"replicas": {"storage": {"type": "blockDevice",
               "blockDevice": {"source": "hostPath", "path": "/dev/sdb", "format": true}}}}),
    ] {
        with_auth(&mut values);
        assert_lints_clean(&chart_dir(), &values, "storage");
    }
}

#[test]
fn default_release_is_one_controller_a_replica_set_services_and_a_budget() {
    let r = render(json!({}));
    let kinds: Vec<_> = r
        .objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(r.all("Deployment").len(), 1, "{kinds:?}");
    assert_eq!(r.all("StatefulSet").len(), 1, "{kinds:?}");
    assert_eq!(r.all("Service").len(), 2, "{kinds:?}");
    assert_eq!(r.all("PodDisruptionBudget").len(), 1, "{kinds:?}");
    assert!(
        r.all("ServiceMonitor").is_empty(),
        "the ServiceMonitor is opt-in: {kinds:?}"
    );
    // Helm convention: the namespace comes from the release, never from the templates.
    for o in &r.objects {
        assert!(
            o["metadata"]["namespace"].is_null(),
            "hard-coded namespace in {}",
            o["metadata"]["name"]
        );
    }
    let d = r.controller();
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(
        d["spec"]["strategy"]["type"], "Recreate",
        "two controllers of one volume must never overlap"
    );
    assert_eq!(r.replicas()["spec"]["replicas"], 3);
}

#[test]
fn replicas_never_share_a_node() {
    let r = render(json!({}));
    let sts = r.replicas();
    let terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .expect("required pod anti-affinity");
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0]["topologyKey"], "kubernetes.io/hostname");
    assert!(
        selects(&terms[0]["labelSelector"]["matchLabels"], pod_labels(sts)),
        "the anti-affinity must select the replica pods themselves"
    );
    assert!(
        !selects(
            &terms[0]["labelSelector"]["matchLabels"],
            pod_labels(r.controller())
        ),
        "the anti-affinity must not repel the controller"
    );
    assert!(
        sts["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null(),
        "zone spread is opt-in"
    );

    let spread =
        render(json!({"replicas": {"zoneSpread": {"enabled": true, "whenUnsatisfiable": "DoNotSchedule"}}}));
    let c = &spread.replicas()["spec"]["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(c["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(c["whenUnsatisfiable"], "DoNotSchedule");
    assert!(selects(
        &c["labelSelector"]["matchLabels"],
        pod_labels(spread.replicas())
    ));
}

#[test]
fn replica_count_is_honoured_by_the_set_and_the_controller_flags() {
    let r = render(json!({"replicas": {"count": 5}, "volume": {"minHealthy": 3}}));
    assert_eq!(r.replicas()["spec"]["replicas"], 5);
    let args = r.controller_args();
    let replicas = flag(&args, "replica");
    assert_eq!(replicas.len(), 5, "{args:?}");
    // Stable DNS names through the headless Service: <pod>.<service>.<namespace>.svc:<port>.
    let headless = r.one("Service", "-replicas");
    let svc = headless["metadata"]["name"].as_str().unwrap();
    let sts = r.replicas()["metadata"]["name"].as_str().unwrap();
    assert_eq!(r.replicas()["spec"]["serviceName"], svc);
    for (i, addr) in replicas.iter().enumerate() {
        assert_eq!(*addr, format!("{sts}-{i}.{svc}.storage.svc:9700"));
    }
    assert_eq!(flag(&args, "min-healthy"), ["3"]);
    // Default: no --min-healthy, the controller takes a majority.
    assert!(flag(&render(json!({})).controller_args(), "min-healthy").is_empty());
}

#[test]
fn services_select_their_own_pods_on_named_ports() {
    let r = render(json!({}));
    let front = r.one("Service", "vol1-basalt-volume");
    assert!(selects(&front["spec"]["selector"], pod_labels(r.controller())));
    assert!(
        !selects(&front["spec"]["selector"], pod_labels(r.replicas())),
        "iSCSI must reach only the controller"
    );
    let ports = front["spec"]["ports"].as_array().unwrap();
    let iscsi = ports
        .iter()
        .find(|p| p["name"] == "iscsi")
        .expect("an iscsi port");
    assert_eq!(iscsi["port"], 3260);
    assert!(ports.iter().any(|p| p["name"] == "api" && p["port"] == 9600));

    let headless = r.one("Service", "-replicas");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert!(selects(&headless["spec"]["selector"], pod_labels(r.replicas())));
    assert!(!selects(
        &headless["spec"]["selector"],
        pod_labels(r.controller())
    ));

    // Every targetPort names a port the selected container declares.
    for (svc, workload) in [(front, r.controller()), (headless, r.replicas())] {
        let declared: Vec<_> = container(workload)["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().expect("named targetPort");
            assert!(
                declared.iter().any(|d| d == target),
                "{target} not in {declared:?}"
            );
        }
    }
}

#[test]
fn probes_are_the_binary_speaking_each_role_protocol() {
    let r = render(json!({}));
    let c = container(r.controller());
    let live = strings(&c["livenessProbe"]["exec"]["command"]);
    let ready = strings(&c["readinessProbe"]["exec"]["command"]);
    assert_eq!(
        live,
        ["/usr/local/bin/basalt", "health", "--api", "127.0.0.1:9600"]
    );
    assert!(
        ready.contains(&"--ready".to_string()),
        "readiness waits for a serving volume: {ready:?}"
    );
    assert!(
        !live.contains(&"--ready".to_string()),
        "a controller without replicas is alive, not restarted"
    );
    assert!(c["startupProbe"].is_object());

    let rc = container(r.replicas());
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            strings(&rc[probe]["exec"]["command"]),
            ["/usr/local/bin/basalt", "health", "--replica", "127.0.0.1:9700"],
            "{probe}"
        );
    }
    // The listen port in the args is the port the probes use.
    assert_eq!(flag(&r.replica_args(), "listen"), ["0.0.0.0:9700"]);
    assert_eq!(flag(&r.controller_args(), "api"), ["0.0.0.0:9600"]);
}

#[test]
fn pods_run_unprivileged_with_read_only_roots_and_resources() {
    let r = render(json!({}));
    for w in [r.controller(), r.replicas()] {
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        let c = container(w);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert!(
            c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string()
        );
        let ann = &w["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true");
        let port = ann["prometheus.io/port"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!(c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == port));
    }
    // Port 3260 as non-root: the safe sysctl, not a capability.
    let sysctls = &r.controller()["spec"]["template"]["spec"]["securityContext"]["sysctls"];
    assert_eq!(sysctls[0]["name"], "net.ipv4.ip_unprivileged_port_start");
    // The PVC is made writable for the replica's group.
    assert_eq!(
        r.replicas()["spec"]["template"]["spec"]["securityContext"]["fsGroup"],
        65532
    );
}

#[test]
fn storage_is_a_claim_per_replica_or_a_host_directory() {
    let r = render(json!({"replicas": {"storage": {"type": "pvc",
        "pvc": {"storageClassName": "pd-ssd", "size": "50Gi"}}}}));
    let claims = r.replicas()["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("claim templates");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["spec"]["storageClassName"], "pd-ssd");
    assert_eq!(claims[0]["spec"]["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(claims[0]["metadata"]["name"], "data");
    let mounts = &container(r.replicas())["volumeMounts"];
    assert_eq!(mounts[0]["name"], "data");
    assert_eq!(mounts[0]["mountPath"], "/data");
    assert_eq!(flag(&r.replica_args(), "dir"), ["/data"]);
    // No storageClassName at all by default: the cluster's default class.
    let default = render(json!({}));
    assert!(default.replicas()["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"].is_null());

    let h =
        render(json!({"replicas": {"storage": {"type": "hostPath", "hostPath": {"path": "/srv/basalt/"}}}}));
    let sts = h.replicas();
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    let vol = &sts["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(vol["hostPath"]["path"], "/srv/basalt/storage/vol1");
    assert_eq!(
        container(sts)["volumeMounts"][0]["subPathExpr"],
        "$(POD_NAME)",
        "one directory per replica"
    );
    assert_eq!(sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 0);
}

#[test]
fn block_storage_is_a_raw_block_claim_or_a_host_device_node() {
    let r = render(json!({"replicas": {"storage": {"type": "blockDevice",
        "blockDevice": {"storageClassName": "local-block", "size": "20Gi"}}}}));
    let sts = r.replicas();
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["volumeMode"], "Block");
    assert_eq!(claim["spec"]["storageClassName"], "local-block");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "20Gi");
    let c = container(sts);
    assert_eq!(
        c["volumeDevices"],
        json!([{"name": "data", "devicePath": "/dev/basalt-data"}])
    );
    assert!(c["volumeMounts"].is_null(), "a raw device, no filesystem mount");
    assert_eq!(flag(&r.replica_args(), "device"), ["/dev/basalt-data"]);
    assert!(flag(&r.replica_args(), "dir").is_empty());
    assert!(
        !r.replica_args().contains(&"--format".to_string()),
        "never wipe by default"
    );
    // Non-root: the raw block PVC's device node is given to the pod's fsGroup.
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(c["securityContext"]["privileged"].is_null());

    let h = render(json!({"replicas": {"storage": {"type": "blockDevice",
        "blockDevice": {"source": "hostPath", "path": "/dev/disk/by-id/nvme-disk1", "format": true}}}}));
    let sts = h.replicas();
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    let vol = &sts["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(vol["hostPath"]["path"], "/dev/disk/by-id/nvme-disk1");
    assert_eq!(vol["hostPath"]["type"], "BlockDevice");
    let c = container(sts);
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/dev/basalt-data");
    assert_eq!(
        c["securityContext"]["privileged"], true,
        "the device cgroup needs it"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 0);
    assert_eq!(flag(&h.replica_args(), "device"), ["/dev/basalt-data"]);
    assert!(h.replica_args().contains(&"--format".to_string()));
}

#[test]
fn volume_identity_is_stable_per_release_and_distinct_between_releases() {
    let id = |r: &Rendered| flag(&r.controller_args(), "volume-id")[0].to_string();
    let a = render_as(json!({}), "vol1", "storage");
    let again = render_as(json!({"replicas": {"count": 5}}), "vol1", "storage");
    let other = render_as(json!({}), "vol2", "storage");
    let elsewhere = render_as(json!({}), "vol1", "team-b");
    assert_eq!(id(&a), id(&again), "an upgrade must keep the volume id");
    assert_ne!(id(&a), id(&other));
    assert_ne!(id(&a), id(&elsewhere));
    assert_eq!(
        flag(&a.replica_args(), "volume-id"),
        [id(&a).as_str()],
        "controller and replicas agree"
    );
    let uuid = id(&a);
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert_eq!(uuid.matches('-').count(), 4, "{uuid}");

    let fixed = render(
        json!({"volume": {"id": "0b9f6a8e-2c1d-4e3f-8a7b-6c5d4e3f2a1b", "name": "db", "size": "64G"}}),
    );
    assert_eq!(
        flag(&fixed.controller_args(), "volume-id"),
        ["0b9f6a8e-2c1d-4e3f-8a7b-6c5d4e3f2a1b"]
    );
    assert_eq!(flag(&fixed.controller_args(), "name"), ["db"]);
    assert_eq!(flag(&fixed.controller_args(), "size"), ["64G"]);
    assert_eq!(flag(&fixed.replica_args(), "size"), ["64G"]);
}

#[test]
fn chap_secret_comes_from_a_secret_never_the_command_line() {
    let r = render(
        json!({"chap": {"enabled": true, "user": "alice", "existingSecret": "vol1-chap",
        "targetUser": "target", "targetSecretKey": "mutual"}}),
    );
    let c = container(r.controller());
    let args = r.controller_args();
    assert_eq!(flag(&args, "chap-user"), ["alice"]);
    assert_eq!(flag(&args, "chap-target-user"), ["target"]);
    let env = c["env"].as_array().expect("env");
    let from = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))["valueFrom"]["secretKeyRef"]
            .clone()
    };
    assert_eq!(
        from("BASALT_CHAP_SECRET"),
        json!({"name": "vol1-chap", "key": "secret"})
    );
    assert_eq!(
        from("BASALT_CHAP_TARGET_SECRET"),
        json!({"name": "vol1-chap", "key": "mutual"})
    );
    assert!(render(json!({}))
        .controller_args()
        .iter()
        .all(|a| !a.contains("chap")));
}

#[test]
fn service_monitor_scrapes_both_roles_when_enabled() {
    let r = render(json!({"metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}}}));
    let sm = &r.all("ServiceMonitor")[0];
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    for svc in r.all("Service") {
        assert!(selects(
            &sm["spec"]["selector"]["matchLabels"],
            &svc["metadata"]["labels"]
        ));
        assert!(svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "metrics"));
    }
}

#[test]
fn notes_tell_the_portal_and_iqn() {
    let r = render(json!({"volume": {"name": "db"}}));
    assert!(
        r.notes
            .contains("iSCSI portal: vol1-basalt-volume.storage.svc:3260"),
        "{}",
        r.notes
    );
    assert!(r.notes.contains("iqn.2026-11.io.basalt:db"), "{}", r.notes);
    assert!(
        r.notes.contains("iscsi:") && r.notes.contains("lun: 0"),
        "how to mount it from a pod: {}",
        r.notes
    );
}

#[test]
fn schema_rejects_bad_values_and_says_where() {
    assert_eq!(validate(json!({"auth": {"existingSecret": "a"}})), Ok(()));
    // Without the auth Secret the chart refuses to install: no volume runs without a secret and a token.
    let err = validate(json!({})).expect_err("the auth Secret is required");
    assert!(err.contains("auth") && err.contains("existingSecret"), "{err}");
    for (mut values, path) in [
        (json!({"replicas": {"count": 0}}), "/replicas/count"),
        (json!({"replicas": {"count": "three"}}), "/replicas/count"),
        (json!({"volume": {"size": "10 gigs"}}), "/volume/size"),
        (json!({"volume": {"size": "10Gi"}}), "/volume/size"),
        (json!({"volume": {"name": "Not_An_IQN"}}), "/volume/name"),
        (json!({"volume": {"id": "not-a-uuid"}}), "/volume/id"),
        (
            json!({"replicas": {"storage": {"type": "nfs"}}}),
            "/replicas/storage/type",
        ),
        (
            json!({"controller": {"iscsiPort": 70000}}),
            "/controller/iscsiPort",
        ),
        (
            json!({"replicas": {"zoneSpread": {"whenUnsatisfiable": "Sometimes"}}}),
            "/replicas/zoneSpread",
        ),
        // A host device must be named, and be a device node.
        (
            json!({"replicas": {"storage": {"type": "blockDevice", "blockDevice": {"source": "hostPath"}}}}),
            "/replicas/storage/blockDevice/path",
        ),
        (
            json!({"replicas": {"storage": {"type": "blockDevice",
                "blockDevice": {"source": "hostPath", "path": "/var/lib/basalt"}}}}),
            "/replicas/storage/blockDevice/path",
        ),
        (
            json!({"replicas": {"storage": {"type": "blockDevice", "blockDevice": {"source": "iscsi"}}}}),
            "/replicas/storage/blockDevice/source",
        ),
        (json!({"replicaCount": 3}), "replicaCount"),
        (json!({"chap": {"enabled": true}}), "/chap"),
        (json!({"auth": {"existingSecret": ""}}), "/auth/existingSecret"),
    ] {
        with_auth(&mut values);
        let err = validate(values.clone()).expect_err(&format!("{values} must be rejected"));
        assert!(
            err.contains(path),
            "the error for {values} should name {path}: {err}"
        );
    }
    // And rendering refuses them too, as `helm install` would.
    let answer = helm(json!({"op": "render", "chart": chart_dir(), "values": {"replicas": {"count": 0}}}));
    assert_eq!(answer["ok"], false);
}

#[test]
fn the_volume_secret_and_api_token_come_from_a_secret_never_the_command_line() {
    let r =
        render(json!({"auth": {"existingSecret": "db-auth", "volumeSecretKey": "vs", "apiTokenKey": "tok"}}));
    let from = |workload: &Value, name: &str| {
        container(workload)["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))["valueFrom"]["secretKeyRef"]
            .clone()
    };
    assert_eq!(
        from(r.controller(), "BASALT_VOLUME_SECRET"),
        json!({"name": "db-auth", "key": "vs"})
    );
    assert_eq!(
        from(r.controller(), "BASALT_API_TOKEN"),
        json!({"name": "db-auth", "key": "tok"})
    );
    assert_eq!(
        from(r.replicas(), "BASALT_VOLUME_SECRET"),
        json!({"name": "db-auth", "key": "vs"})
    );
    for args in [r.controller_args(), r.replica_args()] {
        assert!(
            args.iter().all(|a| !a.contains("secret") && !a.contains("token")),
            "no secret on the command line: {args:?}"
        );
    }
    // The replicas' pods get no API token: they have no use for it.
    let replica_env = container(r.replicas())["env"].as_array().expect("env").clone();
    assert!(replica_env.iter().all(|e| e["name"] != "BASALT_API_TOKEN"));
}

#[test]
fn api_tls_mounts_the_secret_passes_the_flags_and_lets_the_probes_speak_tls() {
    let r = render(json!({"api": {"tls": {"existingSecret": "vol1-api-tls", "caKey": "ca.pem"}}}));
    let args = r.controller_args();
    assert_eq!(flag(&args, "api-tls-cert"), ["/etc/basalt/api-tls/tls.crt"]);
    assert_eq!(flag(&args, "api-tls-key"), ["/etc/basalt/api-tls/tls.key"]);
    let c = container(r.controller());
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts.iter().any(|m| m["name"] == "api-tls"
            && m["mountPath"] == "/etc/basalt/api-tls"
            && m["readOnly"] == true),
        "{mounts:?}"
    );
    let pod = &r.controller()["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "api-tls")
        .expect("the api-tls volume")
        .clone();
    assert_eq!(volume["secret"]["secretName"], "vol1-api-tls");
    let items: Vec<(String, String)> = volume["secret"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap_or_default().into(),
                i["path"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        items,
        [
            ("tls.crt", "tls.crt"),
            ("tls.key", "tls.key"),
            ("ca.pem", "ca.crt")
        ]
        .map(|(k, p)| (k.into(), p.into()))
    );
    // The key is readable by the controller's group only (the Secret volume's files are root-owned).
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    // The probes run in the container: the CA and the Service's name come from its environment.
    let env = c["env"].as_array().expect("env");
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))["value"]
            .clone()
    };
    assert_eq!(value("BASALT_API_CA"), "/etc/basalt/api-tls/ca.crt");
    let service = r
        .all("Service")
        .into_iter()
        .find(|s| {
            s["spec"]["ports"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "api"))
        })
        .expect("the controller's Service")["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    assert_eq!(value("BASALT_API_TLS_NAME"), format!("{service}.storage.svc"));
    let named = render(json!({"api": {"tls": {"existingSecret": "t", "serverName": "vol1.example"}}}));
    let env = container(named.controller())["env"].clone();
    assert!(env
        .as_array()
        .expect("env")
        .iter()
        .any(|e| e["name"] == "BASALT_API_TLS_NAME" && e["value"] == "vol1.example"));

    // Without the Secret: no flags, no mount, no CA.
    let plain = render(json!({}));
    assert!(plain.controller_args().iter().all(|a| !a.contains("tls")));
    let plain_c = container(plain.controller());
    assert!(plain_c["volumeMounts"].is_null());
    assert!(plain_c["env"]
        .as_array()
        .expect("env")
        .iter()
        .all(|e| e["name"] != "BASALT_API_CA"));
    assert!(
        validate(json!({"auth": {"existingSecret": "a"}, "api": {"tls": {"existingSecret": 5}}})).is_err()
    );
    assert!(validate(json!({"auth": {"existingSecret": "a"}, "api": {"tls": {"certKey": ""}}})).is_err());
}
