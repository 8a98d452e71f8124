//! Compiles the subset of etcd's v3 gRPC API the etcd store uses
//! (`proto/etcd/*.proto`) with protox (pure Rust) and tonic: a fresh machine
//! needs no `protoc` to build the agent (see `src/store/etcd.rs` for why
//! gRPC rather than etcd's JSON gateway).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/etcd/rpc.proto", "proto/etcd/kv.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(["rpc.proto", "kv.proto"], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
