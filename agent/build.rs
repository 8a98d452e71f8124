//! Compiles the CSI protocol (`protos/csi.proto`, package `csi.v1`) with protox (pure Rust), so a
//! fresh machine needs no `protoc` to build the agent.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "protos/csi.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["protos"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
