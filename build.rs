//! Compiles `proto/pubsub_api.proto` into Rust with protox (a pure-Rust protobuf compiler), so
//! a build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/pubsub_api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Event payloads as `Bytes`: a stored event is served, and a received one decoded,
        // without copying its payload.
        .bytes(".eventbus.v1.ProducerEvent.payload")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
