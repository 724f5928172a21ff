//! `config::load_str` on arbitrary text. Properties: nothing panics; a config that loads
//! prints (`to_toml`, what `check-config` shows) as a document that loads back to the same
//! print.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_warden::config::load_str;

fuzz_target!(|text: &str| {
    let Ok(config) = load_str(text) else {
        return;
    };
    let shown = config.to_toml();
    match load_str(&shown) {
        Ok(again) => assert_eq!(again.to_toml(), shown, "the print does not round-trip"),
        Err(e) => panic!("the print of an accepted config is refused: {e}\n{shown}"),
    }
});
