//! Any bytes as a segment file: an error or a valid segment, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kv_store::Segment::from_bytes(std::path::Path::new("fuzz"), data.to_vec());
});
