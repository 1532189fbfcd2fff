//! Compiles the control-plane API with `protox` (a pure-Rust protobuf compiler), so a
//! fresh machine builds without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/wary/discovery/v1/discovery.proto",
        "proto/wary/identity/v1/identity.proto",
    ];
    for file in [
        "proto/wary/discovery/v1/discovery.proto",
        "proto/wary/discovery/v1/resources.proto",
        "proto/wary/identity/v1/identity.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // BTreeMap keeps encoding deterministic, so a resource's version (a hash of its
        // bytes) depends on its content only.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
