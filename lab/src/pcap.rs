//! Classic pcap files (the libpcap format Wireshark and tshark open), linktype 1 (Ethernet).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// libpcap magic for microsecond timestamps, written in our native byte order (readers detect it).
const PCAP_MAGIC_USEC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;
/// Snap length: the largest frame we record in full (jumbo frames fit).
pub const SNAPLEN: u32 = 65_535;

/// Appends Ethernet frames to a pcap file.
pub struct PcapWriter {
    out: BufWriter<File>,
}

impl PcapWriter {
    /// Create (truncate) `path` and write the global header.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&PCAP_MAGIC_USEC.to_ne_bytes())?;
        out.write_all(&2u16.to_ne_bytes())?; // version major
        out.write_all(&4u16.to_ne_bytes())?; // version minor
        out.write_all(&0i32.to_ne_bytes())?; // thiszone
        out.write_all(&0u32.to_ne_bytes())?; // sigfigs
        out.write_all(&SNAPLEN.to_ne_bytes())?;
        out.write_all(&LINKTYPE_ETHERNET.to_ne_bytes())?;
        out.flush()?;
        Ok(PcapWriter { out })
    }

    /// Record one frame seen at wall-clock time `at`.
    pub fn write_frame(&mut self, at: SystemTime, frame: &[u8]) -> io::Result<()> {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let orig_len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let keep = frame.len().min(SNAPLEN as usize);
        let secs = u32::try_from(since.as_secs()).unwrap_or(u32::MAX);
        self.out.write_all(&secs.to_ne_bytes())?;
        self.out.write_all(&since.subsec_micros().to_ne_bytes())?;
        self.out.write_all(&(keep as u32).to_ne_bytes())?;
        self.out.write_all(&orig_len.to_ne_bytes())?;
        self.out.write_all(frame.get(..keep).unwrap_or(frame))?;
        Ok(())
    }

    /// Push buffered frames to the file (so a live reader or a crash keeps them).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_record_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pcap");
        let mut w = PcapWriter::create(&path).unwrap();
        let frame = [0xffu8; 60];
        w.write_frame(
            UNIX_EPOCH + std::time::Duration::from_micros(1_500_000),
            &frame,
        )
        .unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 24 + 16 + 60);
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()),
            PCAP_MAGIC_USEC
        );
        assert_eq!(u32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(bytes[28..32].try_into().unwrap()),
            500_000
        );
        assert_eq!(u32::from_ne_bytes(bytes[32..36].try_into().unwrap()), 60);
    }
}
