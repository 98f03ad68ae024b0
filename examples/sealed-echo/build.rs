//! Generates the Echo gRPC code from `proto/sealed_echo.proto` with protox (no system `protoc`).

fn main() {
    const FILES: &[&str] = &["proto/sealed_echo.proto"];
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
