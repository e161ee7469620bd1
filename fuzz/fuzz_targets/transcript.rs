//! Any bytes as an agent transcript: turns or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = agent_pool::testing::parse_transcript(data);
});
