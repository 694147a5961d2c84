//! DHCP wire layer: decode arbitrary bytes; whatever decodes must re-encode and decode to the
//! same packet (up to the documented normalisations), and every codec that reads a decoded
//! packet (PXE option 43, iPXE option 175, options 60/77/93/94/97, dhcproto's typed view) must
//! not panic. The raw input is also fed to the option 43/175 codecs directly, which round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pxed::dhcp::pxe_options::{
    IpxeOptions, PxeVendorOptions, client_facts, parse_client_arch, parse_client_ndi,
    parse_client_uuid, parse_user_class, parse_vendor_class,
};
use pxed::dhcp::wire::{DhcpOptions, DhcpPacket, FILE_LEN, MAX_PACKET_LEN, SNAME_LEN, code};

fn sorted(o: &DhcpOptions) -> Vec<(u8, Vec<u8>)> {
    let mut v: Vec<(u8, Vec<u8>)> = o
        .iter()
        .filter(|(c, _)| *c != code::OVERLOAD)
        .map(|(c, b)| (c, b.to_vec()))
        .collect();
    v.sort();
    v
}

fn codecs(bytes: &[u8]) {
    // Option 43: what decodes and encodes must decode to the same value.
    if let Ok(pxe) = PxeVendorOptions::decode(bytes)
        && let Ok(enc) = pxe.encode()
    {
        let again = PxeVendorOptions::decode(&enc).expect("our own option 43 decodes");
        assert_eq!(again, pxe, "option 43 round trip");
    }
    // Option 175.
    if let Ok(ipxe) = IpxeOptions::decode(bytes) {
        let _ = (ipxe.features(), ipxe.version(), ipxe.bus_id());
        if let Ok(enc) = ipxe.encode() {
            let again = IpxeOptions::decode(&enc).expect("our own option 175 decodes");
            assert_eq!(again, ipxe, "option 175 round trip");
        }
    }
    let _ = parse_vendor_class(bytes);
    let _ = parse_client_arch(bytes);
    let _ = parse_client_ndi(bytes);
    let _ = parse_client_uuid(bytes);
    let _ = parse_user_class(bytes);
}

fuzz_target!(|data: &[u8]| {
    codecs(data);
    let Ok(p) = DhcpPacket::decode(data) else {
        return;
    };
    let _ = client_facts(&p);
    let _ = p.to_dhcproto();
    let _ = (
        p.mac(),
        p.message_type(),
        p.broadcast_flag(),
        p.reply_skeleton(),
    );
    for c in [code::VENDOR_SPECIFIC, code::IPXE_ENCAP] {
        if let Some(v) = p.options.get(c) {
            codecs(v);
        }
    }

    let prl = p.options.parameter_request_list().to_vec();
    let enc = p.encode(&prl);
    let limited = p.encode_within(&prl, p.max_reply_len());
    if let Ok(l) = &limited {
        assert_eq!(l, &enc, "encode_within encodes like encode");
        assert!(l.len() <= p.max_reply_len());
    }
    // Options moved out of an overloaded file/sname field can make the message longer than
    // decode accepts; anything shorter must decode.
    if enc.len() > MAX_PACKET_LEN {
        return;
    }
    let q = DhcpPacket::decode(&enc).expect("our own encoding decodes");
    assert_eq!(sorted(&q.options), sorted(&p.options), "options round trip");
    // Header fields come back as they were; sname/file are cut to leave room for a NUL.
    let cut = |v: &[u8], n: usize| v.get(..n.min(v.len())).unwrap_or(v).to_vec();
    assert_eq!(q.sname, cut(&p.sname, SNAME_LEN - 1));
    assert_eq!(q.file, cut(&p.file, FILE_LEN - 1));
    let mut q2 = q.clone();
    q2.options = p.options.clone();
    q2.sname = p.sname.clone();
    q2.file = p.file.clone();
    assert_eq!(q2, p, "header round trip");
    // Encoding is a fixed point after one round.
    assert_eq!(q.encode(&prl), enc, "second encode differs");
});
