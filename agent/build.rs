//! Compiles, with protox (pure Rust) and tonic, so that a fresh machine needs
//! no `protoc` to build the agent:
//! * the subset of etcd's v3 gRPC API the etcd store uses (`proto/etcd/*.proto`;
//!   see `src/store/etcd.rs` for why gRPC rather than etcd's JSON gateway);
//!   client side only;
//! * the CSI protocol (`proto/csi/csi.proto`, package `csi.v1`), which the agent
//!   serves (and the tests call).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let etcd = ["proto/etcd/rpc.proto", "proto/etcd/kv.proto"];
    let csi = "proto/csi/csi.proto";
    for f in etcd.iter().chain([&csi]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(["rpc.proto", "kv.proto"], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    let fds = protox::compile(["csi.proto"], ["proto/csi"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
