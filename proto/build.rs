//! Generates the es.v1 gRPC code. protoc comes from `protoc-bin-vendored` unless `PROTOC` is set,
//! so no system package is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("es_descriptor.bin"))
        .compile_protos(&["es/v1/es.proto"], &["."])?;
    println!("cargo:rerun-if-changed=es/v1/es.proto");
    Ok(())
}
