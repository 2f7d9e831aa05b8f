//! Any line: the command and reply parsers answer, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _command = correu_smtp::command::parse_command(data);
    let _reply = correu_smtp::reply::parse_reply(data);
});
