//! Any bytes as an agent.json: an agent or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = agent_pool::testing::parse_agent_file(data, "fuzz");
});
