//! Generates the gRPC code from `proto/**/*.proto` with protox (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed). Only with the `grpc` feature.

fn main() {
    #[cfg(feature = "grpc")]
    grpc();
}

#[cfg(feature = "grpc")]
fn grpc() {
    const FILES: &[&str] = &[
        "proto/crux/steward/v1/steward.proto",
        "proto/crux/reeve/v1/reeve.proto",
        "proto/crux/pastiche/v1/pastiche.proto",
        "proto/crux/store/v1/store.proto",
        "proto/crux/plugin/v1/plugin.proto",
        "proto/crux/proctor/v1/proctor.proto",
        "proto/crux/kv/v1/kv.proto",
        "proto/crux/catalyst/v1/catalyst.proto",
        "proto/crux/fuse/v1/fuse.proto",
    ];
    for f in FILES {
        println!("cargo:rerun-if-changed={f}");
    }
    // The directory too (Cargo then watches every file in it), so that a new file is picked up
    // by every build configuration, and this script itself.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = match protox::compile(FILES, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("compiling .proto files: {e:?}"),
    };
    // The same descriptors, encoded, for gRPC server reflection on the local socket.
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let encoded = prost::Message::encode_to_vec(&fds);
    if let Err(e) = std::fs::write(out.join("crux_descriptor.bin"), encoded) {
        panic!("writing the file descriptor set: {e}");
    }
    if let Err(e) = tonic_prost_build::configure().compile_fds(fds) {
        panic!("generating gRPC code: {e}");
    }
}
