//! Compiles `expertmesh/v1/*.proto` with protox (a pure-Rust protobuf compiler), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "expertmesh/v1/tensor.proto",
        "expertmesh/v1/expert.proto",
        "expertmesh/v1/coordinator.proto",
        "expertmesh/v1/attention.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .bytes(".expertmesh.v1.Tensor.data")
        .bytes(".expertmesh.v1.WeightChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
