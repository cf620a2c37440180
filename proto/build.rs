//! Generates the kinvoke.v1 gRPC code with a vendored protoc, so a fresh machine needs no
//! protoc install; `$PROTOC` overrides it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["kinvoke/v1/command.proto", "kinvoke/v1/access.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kinvoke_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
