//! A 3-node Garage cluster on loopback ports for tests written in another language (the
//! openai client test): starts it under the directory given, prints one JSON line with each
//! node's S3 endpoint, the bucket, the region and the key, and keeps the cluster up until its
//! standard input closes.
//!
//! `cargo run -p kv-remote --features testing --example garage_cluster -- DIR`
//! (Garage from AGENTKV_GARAGE or cargo's bin directory).

use std::io::Read;
use std::path::PathBuf;

use kv_remote::testing::{Garage, garage_binary};

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: garage_cluster DIR");
        std::process::exit(2);
    };
    let Some(binary) = garage_binary() else {
        std::process::exit(1);
    };
    let garage = Garage::start(&binary, &dir, 3);
    let endpoints: Vec<String> = (0..3).map(|i| garage.endpoint(i)).collect();
    let line = serde_json::json!({
        "endpoints": endpoints,
        "bucket": kv_remote::testing::BUCKET,
        "region": "garage",
        "key_id": garage.key_id,
        "secret": garage.secret,
    });
    println!("{line}");
    // Until whoever started us is done with the cluster.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(garage);
}
