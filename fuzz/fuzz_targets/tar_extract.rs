#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::tar_extract(data));
