//! Compiles `protos/**/*.proto` with protox (pure Rust), so a fresh machine
//! needs no `protoc` to build Basalt.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["protos/basalt/replica.proto", "protos/basalt/controller.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["protos"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
