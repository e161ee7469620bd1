//! Any bytes as a manifest: an error or a valid manifest, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kv_store::Manifest::decode(std::path::Path::new("fuzz"), data);
});
