//! Generates the Galumph gRPC code from `proto/galumph.proto` with protox (no system `protoc`).

fn main() {
    const FILES: &[&str] = &["proto/galumph.proto"];
    for f in FILES {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = match protox::compile(FILES, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("compiling .proto files: {e:?}"),
    };
    if let Err(e) = tonic_prost_build::configure().compile_fds(fds) {
        panic!("generating gRPC code: {e}");
    }
}
