//! TFTP packet parsing: arbitrary datagrams through `wire::parse` and the request-port
//! classifier. What parses must re-encode to bytes that parse to the same packet; refusals are
//! well-formed ERROR packets; a requested file name that `fs::sanitize` accepts can only name
//! something under the root (no `..`, no empty or `.` parts, no separators, no control chars).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pxed::tftp::engine::{RequestDecision, on_request_packet};
use pxed::tftp::fs::sanitize;
use pxed::tftp::wire::{self, MAX_OPTION_TEXT, MAX_OPTIONS, Packet};

fn check_name(name: &str) {
    if let Ok(parts) = sanitize(name) {
        assert!(!parts.is_empty());
        for p in &parts {
            assert!(!p.is_empty() && p != "." && p != "..", "unsafe part {p:?}");
            assert!(!p.contains(['/', '\\']), "separator in part {p:?}");
            assert!(!p.chars().any(char::is_control), "control char in {p:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match on_request_packet(data) {
        RequestDecision::Refuse { packet, .. } => {
            assert!(
                matches!(wire::parse(&packet), Ok(Packet::Error(..))),
                "refusal is not an ERROR packet"
            );
            // RFC 1350: one ERROR fits one 512-byte block with its header.
            assert!(packet.len() <= 516);
        }
        RequestDecision::Read(req) => assert!(!req.write),
        RequestDecision::Ignore(_) => {}
    }
    if let Ok(name) = std::str::from_utf8(data) {
        check_name(name);
    }
    let Ok(packet) = wire::parse(data) else {
        return;
    };
    let again = match &packet {
        Packet::Request(r) => {
            check_name(&r.filename);
            assert!(!r.filename.is_empty() && !r.filename.contains('\0'));
            assert!(r.options.len() <= MAX_OPTIONS);
            for (n, v) in &r.options {
                assert!(!n.is_empty() && n.len() <= MAX_OPTION_TEXT && v.len() <= MAX_OPTION_TEXT);
                assert_eq!(n, &n.to_ascii_lowercase());
            }
            let opts: Vec<(&str, &str)> = r
                .options
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            wire::encode_request(r.write, &r.filename, r.mode.as_str(), &opts)
        }
        Packet::Data(block, payload) => wire::encode_data(*block, payload),
        Packet::Ack(block) => wire::encode_ack(*block),
        Packet::Error(code, msg) => {
            // The encoder takes a table code; build the raw packet by hand for the others.
            let mut b = 5u16.to_be_bytes().to_vec();
            b.extend_from_slice(&code.to_be_bytes());
            b.extend_from_slice(msg.as_bytes());
            b.push(0);
            b
        }
        Packet::Oack(opts) => wire::encode_oack(opts),
    };
    let reparsed = wire::parse(&again).expect("re-encoded packet parses");
    match (&packet, &reparsed) {
        // A message with a NUL inside decodes up to the NUL; lossy UTF-8 can add U+FFFD.
        (Packet::Error(c1, m1), Packet::Error(c2, m2)) => {
            assert_eq!(c1, c2);
            assert_eq!(m1, m2);
        }
        (a, b) => assert_eq!(a, b, "round trip"),
    }
});
