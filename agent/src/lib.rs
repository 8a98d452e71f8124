//! # basalt-agent: the node agent (the control plane)
//!
//! One agent runs on each host. It registers the host (its node), decides
//! where a new volume's replicas live, starts and supervises the per-volume
//! services assigned to its host (replicas and controllers, as processes or
//! containers), and serves the REST API that the `basalt` CLI, the Docker
//! volume plugin and the CSI driver call.
//!
//! The arrows point one way: the agent starts `basalt replica` and `basalt
//! controller` and talks to a controller over its management API; the data
//! path (`basalt-engine`, `basalt-replica`, `basalt-target`) knows nothing of
//! the agent.
//!
//! Where things are:
//! * [`model`]: the records kept in the store (nodes, volumes, placements)
//!   and the keys they live under;
//! * [`store`]: the one small interface every cluster store implements (get,
//!   compare-and-put with a revision, delete, list by prefix, watch, leases)
//!   and the embedded store of a one-host cluster;
//! * [`config`]: the agent's YAML file;
//! * [`placement`]: where a volume's replicas go (a pure function);
//! * [`failover`]: who takes over a controller, when a replica is replaced
//!   (pure functions);
//! * [`runtime`]: starting and stopping the services of one host;
//! * [`host`]: attaching a volume on this host (a block device, a filesystem, mounts);
//! * [`reconcile`]: making this host's services match the store;
//! * [`api`] and [`client`]: the REST API and its client ([`body`]: bounded request bodies);
//! * [`docker`]: the Docker volume plugin (an endpoint over the API and [`host`]).
//! * [`csi`]: the CSI driver's services, over the API's functions;
//! * [`redirect`]: where this host's initiators log in, so they follow a controller that moves.

pub mod api;
pub mod body;
pub mod client;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod docker;
pub mod failover;
pub mod host;
pub mod locks;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod reconcile;
pub mod redirect;
pub mod runtime;
pub mod store;
