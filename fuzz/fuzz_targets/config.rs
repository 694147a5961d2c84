//! Config parsing: arbitrary text through `Config::parse` (TOML, unknown keys, policy checks,
//! line lookup for errors). Errors must render; a config that is accepted must give a policy
//! whose every profile renders to an iPXE script for a few kinds of client without panicking,
//! and whose DHCP plan is one of the three shapes.
#![no_main]

use std::net::Ipv4Addr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pxed::config::Config;
use pxed::http::ipxe::render_script;
use pxed::mac::MacAddr;
use pxed::policy::{ClientFacts, ServerAddrs, plan};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = config.dhcp.validate();
    let server = ServerAddrs {
        ip: Ipv4Addr::new(10, 0, 0, 1),
        http_port: 8080,
    };
    for (mac, arch, ipxe) in [
        ([0x52, 0x54, 0, 0x12, 0x34, 0x56], Some(0u16), true),
        ([0x52, 0x54, 0, 0, 0, 1], Some(7), false),
        ([0, 0, 0, 0, 0, 0], None, true),
        ([0xff; 6], Some(16), true),
    ] {
        let facts = ClientFacts {
            mac: MacAddr(mac),
            arch_code: arch,
            is_ipxe: ipxe,
            user_class: if ipxe {
                vec!["iPXE".into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let p = plan(&config.policy, &facts, &server);
        let script = render_script(&p, &facts, &server.http_base());
        assert!(script.starts_with("#!ipxe"));
    }
});
