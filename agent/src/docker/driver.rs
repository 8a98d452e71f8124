//! The VolumeDriver calls, one function each, over the agent's volume API (the same checks and
//! revision-checked writes as `basalt volume ...`) and this host's attachments.
//!
//! * `Create` records the volume through [`api::volumes::create`] (options: [`super::options`]) and the
//!   filesystem it gets under `/basalt/docker/volumes/NAME`; a second `Create` of the same name is
//!   accepted when it asks for the same volume, refused when it asks for another size or replica count.
//! * `Mount` is reference-counted by the caller's ID ([`super::refs`], on disk). The first one marks
//!   the volume attached to this node in the store (so the cluster knows, and a delete is refused), waits
//!   until its controller serves, attaches the LUN, makes a filesystem if the volume is blank, mounts it,
//!   and only then answers: a mount made after the answer would not be seen inside the container.
//! * `Unmount` drops one reference; the last one unmounts (which flushes the filesystem), detaches
//!   (flushing the device) and marks the volume detached.
//! * `Remove` is refused while a container holds the volume here or it is attached elsewhere.
//! * `Get`, `List` answer from the store; `Capabilities` says `global` on a shared cluster store.
//! * Online expansion: Docker has no call for it, so [`Driver::follow_growth`] watches the volumes
//!   mounted here and grows the device and filesystem under the running containers once a volume grew
//!   (`basalt volume expand`).
//!
//! Calls for one volume are serialized (a lock per name); calls for different volumes run in parallel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_engine::name::VolumeName;
use basalt_engine::units::format_size;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::options;
use super::refs::MountRefs;
use crate::api::views::{AttachVolume, VolumeView};
use crate::api::{volumes, ApiContext, ApiError};
use crate::host::{mount, AttachRequest, Filesystem, Host, IscsiTarget};
use crate::locks::Held;
use crate::model::{keys, VolumePhase};
use crate::store::{self, Expect};

/// Who the host module records as the holder of the Docker plugin's attachments.
pub const HOLDER: &str = "docker";
/// How long a `Mount` waits for a volume's controller to serve (a volume just created starts its
/// replicas and controller first). Within Docker's own two-minute limit on Mount, leaving time to
/// attach and format.
const SERVE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `Create` waits for the new volume to serve before answering anyway: a volume that is
/// ready when `docker volume create` returns makes the first `docker run` quick; one that is not yet is
/// waited for by `Mount`.
const CREATE_WAIT: Duration = Duration::from_secs(60);
/// How often the plugin looks for mounted volumes that grew.
const GROW_POLL: Duration = Duration::from_secs(2);
/// A growth that keeps failing this long is logged as a warning (before, it is the LUN not showing its
/// new size yet: the volume's controller grows it a moment after the record changes).
const GROW_PATIENCE: Duration = Duration::from_secs(30);

/// Whether a volume is the same on every host (a shared cluster store) or only this one's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Local,
    Global,
}

/// What the plugin keeps about a volume beside its record: the filesystem it gets at first mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerVolume {
    pub fs: Filesystem,
}

/// `/basalt/docker/volumes/NAME`.
pub fn docker_key(name: &VolumeName) -> String {
    format!("{}docker/volumes/{name}", keys::ROOT)
}

/// A mounted volume whose growth failed: since when, and whether that was logged.
struct GrowFailure {
    since: Instant,
    warned: bool,
}

/// A call's body: the fields the protocol's requests carry (absent ones default).
#[derive(Debug, Default, Deserialize)]
struct Call {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
    #[serde(rename = "ID", default)]
    id: String,
}

pub struct Driver {
    api: ApiContext,
    host: Arc<Host>,
    /// `DATA_DIR/docker/mounts`: volume `NAME` is mounted at `NAME` here.
    mount_root: PathBuf,
    scope: Scope,
    refs: tokio::sync::Mutex<MountRefs>,
    locks: crate::locks::VolumeLocks,
}

fn message(e: ApiError) -> String {
    e.message
}

impl Driver {
    /// The driver of this agent; its state under `data_dir/docker`.
    pub fn new(api: ApiContext, host: Arc<Host>, data_dir: &Path, scope: Scope) -> anyhow::Result<Driver> {
        let dir = std::path::absolute(data_dir.join("docker"))?;
        let refs = MountRefs::load(&dir.join("mounts.json"))?;
        Ok(Driver {
            api,
            host,
            mount_root: dir.join("mounts"),
            scope,
            refs: tokio::sync::Mutex::new(refs),
            locks: Default::default(),
        })
    }

    pub fn mountpoint(&self, name: &VolumeName) -> PathBuf {
        self.mount_root.join(name.as_str())
    }

    /// At start: volumes this plugin attached that no container holds any more (an unmount the
    /// previous agent did not finish) are unmounted and detached, so no stale mount waits for the next
    /// container. Volumes still held stay mounted: their containers keep working.
    pub async fn recover(&self) -> anyhow::Result<()> {
        let host = self.host.clone();
        let records = tokio::task::spawn_blocking(move || host.attachments()).await??;
        for record in records.into_iter().filter(|r| r.holder == HOLDER) {
            let held = self.refs.lock().await.holders(record.volume.as_str());
            if held == 0 {
                tracing::info!(volume = %record.volume, "no container holds this volume any more: unmounting and detaching it");
                let locked = self.lock(&record.volume).await;
                self.release(&locked, &record.volume)
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
        }
        let refs = self.refs.lock().await;
        for volume in refs.volumes() {
            if let Ok(name) = VolumeName::new(volume) {
                if !mount::is_mounted(&self.mountpoint(&name)) {
                    tracing::warn!(
                        volume,
                        "containers hold this volume but it is not mounted here any more: \
                        their I/O fails until they are restarted"
                    );
                }
            }
        }
        Ok(())
    }

    /// One protocol call: its answer, or the message of `{"Err": ...}`.
    pub async fn call(&self, path: &str, body: &[u8]) -> Result<Value, String> {
        // dockerd sends `null` for calls without arguments (List, Capabilities), or nothing at all.
        let call: Call = if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
            Call::default()
        } else {
            serde_json::from_slice(body).map_err(|e| format!("{path}: the request is not valid JSON: {e}"))?
        };
        match path {
            "/Plugin.Activate" => Ok(json!({ "Implements": ["VolumeDriver"] })),
            "/VolumeDriver.Capabilities" => Ok(json!({ "Capabilities": { "Scope": match self.scope {
                Scope::Global => "global",
                Scope::Local => "local",
            } } })),
            "/VolumeDriver.List" => self.list().await,
            "/VolumeDriver.Create" => self.create(&call).await,
            "/VolumeDriver.Remove" => self.remove(&call).await,
            "/VolumeDriver.Get" => self.get(&call).await,
            "/VolumeDriver.Path" => self.path(&call).await,
            "/VolumeDriver.Mount" => self.mount(&call).await,
            "/VolumeDriver.Unmount" => self.unmount(&call).await,
            other => Err(format!(
                "{other} is not a call of the volume plugin protocol (Plugin.Activate, VolumeDriver.Create, Remove, \
                 Mount, Unmount, Path, Get, List, Capabilities)"
            )),
        }
    }

    fn name(call: &Call) -> Result<VolumeName, String> {
        VolumeName::new(&call.name)
            .map_err(|e| format!("{e} (Basalt volume names: a-z, 0-9, - and ., 1 to 63)"))
    }

    async fn lock(&self, name: &VolumeName) -> Held {
        self.locks.lock(name).await
    }

    async fn create(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        let opts = options::parse(name.as_str(), &call.opts.clone().unwrap_or_default())?;
        let _held = self.lock(&name).await;
        let store = &*self.api.store;
        if let Some(existing) = store::get_json::<crate::model::VolumeRecord>(store, &keys::volume(&name))
            .await
            .map_err(|e| message(e.into()))?
        {
            return self.same_volume(&existing.value, &opts).map(|()| json!({}));
        }
        let key = docker_key(&name);
        let expect = match store::get_json::<DockerVolume>(store, &key)
            .await
            .map_err(|e| message(e.into()))?
        {
            Some(left) => Expect::Revision(left.revision),
            None => Expect::Absent,
        };
        store::put_json(store, &key, &DockerVolume { fs: opts.fs }, expect, None)
            .await
            .map_err(|e| message(e.into()))?;
        match volumes::create(&self.api, opts.request.clone()).await {
            Ok(_) => {}
            Err(e) if e.status == StatusCode::CONFLICT => {
                let existing = volumes::load_volume(store, &name).await.map_err(message)?;
                self.same_volume(&existing.value, &opts)?;
            }
            Err(e) => return Err(options::in_option_words(&e.message)),
        }
        tracing::info!(volume = %name, "docker: volume created");
        // Ready before the answer where it can be: the first `docker run` then only attaches.
        let _ = self.wait_serving(&name, CREATE_WAIT).await;
        Ok(json!({}))
    }

    /// A second `Create` of an existing volume is fine when it asks for what exists.
    fn same_volume(
        &self,
        existing: &crate::model::VolumeRecord,
        opts: &options::CreateOptions,
    ) -> Result<(), String> {
        let spec = &existing.spec;
        let name = spec.name.as_str();
        if let Some(size) = opts.request.size_bytes.filter(|s| *s != spec.size_bytes) {
            return Err(format!(
                "volume {name} already exists with size {} ({} bytes), not {} asked: pick another name, or expand it \
                 with `basalt volume expand {name} --size ...`",
                format_size(spec.size_bytes),
                spec.size_bytes,
                format_size(size)
            ));
        }
        if let Some(r) = opts.request.replicas.filter(|r| *r != spec.replicas) {
            return Err(format!(
                "volume {name} already exists with {} replicas, not {r} asked: pick another name",
                spec.replicas
            ));
        }
        if existing.phase == VolumePhase::Deleting {
            return Err(format!(
                "volume {name} is being deleted; wait for it to go, or pick another name"
            ));
        }
        Ok(())
    }

    async fn remove(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        let _held = self.lock(&name).await;
        let held = self.refs.lock().await.holders(name.as_str());
        if held > 0 {
            return Err(format!(
                "volume {name} is in use by {held} container(s) on this host: stop and remove them first"
            ));
        }
        match volumes::delete(&self.api, &name).await {
            Ok(_) => {}
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e.message),
        }
        let store = &*self.api.store;
        let key = docker_key(&name);
        if let Some(record) = store::get_json::<DockerVolume>(store, &key)
            .await
            .map_err(|e| message(e.into()))?
        {
            store
                .delete(&key, Expect::Revision(record.revision))
                .await
                .map_err(|e| message(e.into()))?;
        }
        tracing::info!(volume = %name, "docker: volume removed");
        Ok(json!({}))
    }

    async fn view(&self, name: &VolumeName) -> Result<VolumeView, String> {
        let view = volumes::inspect(&self.api, name).await.map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                format!("no Basalt volume named {name}")
            } else {
                e.message
            }
        })?;
        if view.phase == VolumePhase::Deleting {
            return Err(format!("no Basalt volume named {name} (it is being deleted)"));
        }
        Ok(view)
    }

    /// Where the volume is mounted on this host, or `""` when it is not.
    fn mounted_at(&self, name: &VolumeName) -> String {
        let mp = self.mountpoint(name);
        if mount::is_mounted(&mp) {
            mp.display().to_string()
        } else {
            String::new()
        }
    }

    async fn get(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        let view = self.view(&name).await?;
        let fs = store::get_json::<DockerVolume>(&*self.api.store, &docker_key(&name))
            .await
            .map_err(|e| message(e.into()))?
            .map_or(Filesystem::Ext4, |v| v.value.fs);
        Ok(json!({ "Volume": {
            "Name": name.as_str(),
            "Mountpoint": self.mounted_at(&name),
            "Status": {
                "size": format_size(view.size_bytes),
                "replicas": view.replicas,
                "phase": view.phase,
                "fs": fs,
                "attached_to": view.attached_to,
                "iscsi_url": view.iscsi_url,
                "warnings": view.warnings,
            },
        } }))
    }

    async fn list(&self) -> Result<Value, String> {
        let list = volumes::list(&self.api, volumes::ListFilter::default())
            .await
            .map_err(message)?;
        let volumes: Vec<Value> = list
            .volumes
            .iter()
            .filter(|v| v.phase != VolumePhase::Deleting)
            .filter_map(|v| VolumeName::new(&v.name).ok())
            .map(|name| json!({ "Name": name.as_str(), "Mountpoint": self.mounted_at(&name) }))
            .collect();
        Ok(json!({ "Volumes": volumes }))
    }

    async fn path(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        self.view(&name).await?;
        Ok(json!({ "Mountpoint": self.mounted_at(&name) }))
    }

    async fn mount(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        if call.id.is_empty() {
            return Err("VolumeDriver.Mount needs the caller's ID".into());
        }
        let locked = self.lock(&name).await;
        let mountpoint = self.mountpoint(&name);
        let held = self.refs.lock().await.holders(name.as_str());
        if held == 0 || !mount::is_mounted(&mountpoint) {
            self.view(&name).await?;
            volumes::attach(
                &self.api,
                &name,
                AttachVolume {
                    node: self.api.node.to_string(),
                },
            )
            .await
            .map_err(|e| format!("volume {name} cannot be mounted on this host: {}", e.message))?;
            if let Err(e) = self.attach_and_mount(&locked, &name, &mountpoint).await {
                if held == 0 {
                    if let Err(undo) = self.release(&locked, &name).await {
                        tracing::warn!(volume = %name, error = %undo, "undoing a failed mount failed too");
                    }
                }
                return Err(e);
            }
            tracing::info!(volume = %name, mountpoint = %mountpoint.display(), "docker: volume mounted");
        }
        self.refs
            .lock()
            .await
            .add(name.as_str(), &call.id)
            .map_err(|e| format!("{e:#}"))?;
        Ok(json!({ "Mountpoint": mountpoint.display().to_string() }))
    }

    async fn attach_and_mount(
        &self,
        locked: &Held,
        name: &VolumeName,
        mountpoint: &Path,
    ) -> Result<(), String> {
        let (target, size_bytes) = self.wait_serving(name, SERVE_TIMEOUT).await?;
        let fs = store::get_json::<DockerVolume>(&*self.api.store, &docker_key(name))
            .await
            .map_err(|e| message(e.into()))?
            .map_or(Filesystem::Ext4, |v| v.value.fs);
        let host = self.host.clone();
        let req = AttachRequest {
            volume: name.clone(),
            target,
            size_bytes,
            holder: HOLDER.into(),
        };
        let mountpoint = mountpoint.to_path_buf();
        locked
            .blocking(move || {
                host.attach(&req)?;
                host.mount(&req.volume, &mountpoint, fs, &[], false)
            })
            .await
            .map_err(|e| format!("attaching failed: {e}"))?
            .map_err(|e| format!("volume {name}: {e}"))
    }

    /// Waits until the volume's controller serves (phase ready or degraded, its iSCSI portal accepting
    /// connections); answers its LUN and size.
    async fn wait_serving(&self, name: &VolumeName, timeout: Duration) -> Result<(IscsiTarget, u64), String> {
        let start = Instant::now();
        loop {
            let view = self.view(name).await?;
            let serving = matches!(view.phase, VolumePhase::Ready | VolumePhase::Degraded);
            if let (true, Some(url)) = (serving, &view.iscsi_url) {
                let target = IscsiTarget::parse_url(url)?;
                if tokio::net::TcpStream::connect(target.portal).await.is_ok() {
                    return Ok((self.host.login_portal(target), view.size_bytes));
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "volume {name} does not serve yet (phase {:?} after {}s); see `basalt volume inspect {name}`",
                    view.phase,
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn unmount(&self, call: &Call) -> Result<Value, String> {
        let name = Self::name(call)?;
        let locked = self.lock(&name).await;
        let left = self
            .refs
            .lock()
            .await
            .remove(name.as_str(), &call.id)
            .map_err(|e| format!("{e:#}"))?;
        if left == 0 {
            self.release(&locked, &name).await?;
            tracing::info!(volume = %name, "docker: volume unmounted and detached");
        }
        Ok(json!({}))
    }

    /// Until `cancel`: grows the device and filesystem of every volume this plugin has mounted whose
    /// size grew, while its containers keep using it (see [`Host::grow`]). The record grows first and
    /// the volume's controller a moment later, so a growth the LUN does not show yet is tried again on
    /// the next round; one still failing after [`GROW_PATIENCE`] is logged with its cause, once.
    pub async fn follow_growth(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut failing: BTreeMap<VolumeName, GrowFailure> = BTreeMap::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(GROW_POLL) => {}
            }
            let host = self.host.clone();
            let records = match tokio::task::spawn_blocking(move || host.attachments()).await {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "docker: reading this host's attachments failed");
                    continue;
                }
                Err(_) => continue,
            };
            for record in records.into_iter().filter(|r| r.holder == HOLDER) {
                // The store unreachable or the volume being deleted: nothing to grow now.
                let Ok(view) = self.view(&record.volume).await else {
                    continue;
                };
                if view.size_bytes <= record.size_bytes {
                    failing.remove(&record.volume);
                    continue;
                }
                match self.grow(&record.volume, view.size_bytes).await {
                    Ok(true) => {
                        failing.remove(&record.volume);
                        tracing::info!(
                            volume = %record.volume,
                            size = %format_size(view.size_bytes),
                            "docker: volume grown online (device and filesystem)"
                        );
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let f = failing.entry(record.volume.clone()).or_insert(GrowFailure {
                            since: Instant::now(),
                            warned: false,
                        });
                        // A device that grew under a filesystem that could not is final until
                        // the next mount: say so now (it is not tried again).
                        let device_grew = self.attached_size(&record.volume).await >= Some(view.size_bytes);
                        if !f.warned && (device_grew || f.since.elapsed() >= GROW_PATIENCE) {
                            f.warned = true;
                            tracing::warn!(
                                volume = %record.volume,
                                size = %format_size(view.size_bytes),
                                error = %e,
                                "docker: a mounted volume grew but its device or filesystem could not follow"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The size this host's attachment of `name` shows, if attached.
    async fn attached_size(&self, name: &VolumeName) -> Option<u64> {
        let host = self.host.clone();
        let volume = name.clone();
        tokio::task::spawn_blocking(move || host.attachment(&volume))
            .await
            .ok()?
            .ok()?
            .map(|r| r.size_bytes)
    }

    /// Grows `name`'s device and filesystem to `size_bytes` if it is still attached here and smaller;
    /// whether it grew.
    async fn grow(&self, name: &VolumeName, size_bytes: u64) -> Result<bool, String> {
        let locked = self.lock(name).await;
        let host = self.host.clone();
        let volume = name.clone();
        locked
            .blocking(move || match host.attachment(&volume)? {
                Some(r) if r.size_bytes < size_bytes => host.grow(&volume, size_bytes).map(|()| true),
                _ => Ok(false),
            })
            .await
            .map_err(|e| format!("growing failed: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// Unmount (flushing the filesystem), detach (flushing the device), and mark the volume detached in
    /// the store if it is attached to this node.
    async fn release(&self, locked: &Held, name: &VolumeName) -> Result<(), String> {
        let host = self.host.clone();
        let volume = name.clone();
        let mountpoint = self.mountpoint(name);
        locked
            .blocking(move || {
                host.unmount(&volume, &mountpoint)?;
                host.detach(&volume)
            })
            .await
            .map_err(|e| format!("detaching failed: {e}"))?
            .map_err(|e| format!("volume {name}: {e}"))?;
        match volumes::load_volume(&*self.api.store, name).await {
            Ok(v) if v.value.attached_to.as_ref() == Some(&self.api.node) => {
                volumes::detach(&self.api, name).await.map_err(message)?;
            }
            Ok(_) => {}
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e.message),
        }
        Ok(())
    }
}
