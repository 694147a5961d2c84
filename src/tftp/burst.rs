//! Sending the DATA blocks of a window (RFC 7440) with as few system calls as the kernel allows.
//!
//! A window is a run of datagrams of the same size to the same peer, which is what Linux UDP
//! generic segmentation (`UDP_SEGMENT`, Linux 4.18) takes in one `sendmsg`: the kernel cuts the
//! buffer into datagrams of `gso_size` bytes (the last one may be shorter), in the NIC when it
//! can, otherwise just before the driver. Every datagram on the wire is an ordinary DATA packet,
//! so clients see no difference; the server makes one system call and one route lookup per
//! window instead of one per block. Header and payload of each block go in as separate iovecs,
//! so the payload is copied once, by the kernel, straight from the read-ahead buffer.
//!
//! The kernel refuses a segmented send when a segment would not fit the route's MTU (a blksize
//! above MTU - 32, whose blocks travel as IP fragments), on devices without checksum offload and
//! through IPsec. The first refusal turns segmentation off for the transfer, and its windows go
//! block by block, as they would on a kernel without it.

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::io::AsRawFd;

use socket2::{SockAddr, SockRef};

use super::wire;

/// Most segments Linux accepts in one segmented send (`UDP_MAX_SEGMENTS`: 64 before Linux 6.9).
const MAX_SEGMENTS: usize = 64;
/// Most UDP payload bytes in one send: an IPv4 datagram's 65535 bytes less its IP (20) and UDP
/// (8) headers. IPv6 allows slightly more; one bound for both keeps it simple.
const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;
/// TFTP DATA header: opcode and block number.
const DATA_HEADER_BYTES: usize = 4;

/// One DATA block to send.
#[derive(Clone, Copy, Debug)]
pub(super) struct Block<'a> {
    /// Block number on the wire.
    pub number: u16,
    /// The block's content bytes.
    pub payload: &'a [u8],
}

/// Sends runs of blocks to one peer, segmented while the path allows it.
#[derive(Debug)]
pub(super) struct BurstSender {
    /// Cleared by the first send the kernel refuses to segment.
    segmentation: bool,
    /// Datagrams sent, and system calls made for them (for tests and the debug log).
    pub datagrams: u64,
    pub calls: u64,
}

impl BurstSender {
    pub fn new() -> BurstSender {
        BurstSender {
            segmentation: true,
            datagrams: 0,
            calls: 0,
        }
    }

    /// Whether segmented sends are still tried.
    #[cfg(test)]
    pub fn segmenting(&self) -> bool {
        self.segmentation
    }

    /// Send `blocks` to `peer`, in order.
    pub fn send(
        &mut self,
        sock: &UdpSocket,
        peer: SocketAddr,
        blocks: &[Block<'_>],
    ) -> io::Result<()> {
        let to = SockAddr::from(peer);
        let mut rest = blocks;
        while !rest.is_empty() {
            let n = segment_run(rest);
            let (run, tail) = rest.split_at(n.clamp(1, rest.len()));
            rest = tail;
            if run.len() > 1 && self.segmentation {
                match send_segmented(sock, &to, run) {
                    Ok(()) => {
                        self.calls += 1;
                        self.datagrams += run.len() as u64;
                        continue;
                    }
                    Err(err) if refuses_segmentation(&err) => {
                        tracing::debug!(%peer, %err, "UDP segmentation refused; sending block by block");
                        self.segmentation = false;
                    }
                    Err(err) => return Err(err),
                }
            }
            for block in run {
                let header = wire::data_header(block.number);
                let parts = [IoSlice::new(&header), IoSlice::new(block.payload)];
                SockRef::from(sock).send_to_vectored(&parts, &to)?;
                self.calls += 1;
                self.datagrams += 1;
            }
        }
        Ok(())
    }
}

/// How many leading blocks of `blocks` can leave in one segmented send: blocks of the first
/// one's size, then at most one shorter block (the file's last), within the kernel's segment
/// and byte limits. At least 1 for a non-empty slice.
pub(super) fn segment_run(blocks: &[Block<'_>]) -> usize {
    let Some(first) = blocks.first() else {
        return 0;
    };
    let size = first.payload.len();
    let most = MAX_SEGMENTS
        .min(MAX_SEND_BYTES / (size + DATA_HEADER_BYTES))
        .max(1);
    let mut n = 1;
    for block in blocks.iter().skip(1).take(most - 1) {
        let len = block.payload.len();
        if len > size {
            break;
        }
        n += 1;
        if len < size {
            break;
        }
    }
    n
}

/// Errors with which the kernel says "not segmented on this path" rather than "cannot send":
/// EINVAL (segment above the MTU, too many segments), EIO (no checksum offload, IPsec),
/// ENOPROTOOPT/EOPNOTSUPP (a kernel without UDP_SEGMENT).
fn refuses_segmentation(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// One `sendmsg` of `run` with a `UDP_SEGMENT` control message: each block is one segment of
/// `DATA_HEADER_BYTES + payload` bytes (the last may be shorter, as [`segment_run`] ensures).
fn send_segmented(sock: &UdpSocket, to: &SockAddr, run: &[Block<'_>]) -> io::Result<()> {
    let segment = run
        .first()
        .map(|b| b.payload.len() + DATA_HEADER_BYTES)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let headers: Vec<[u8; DATA_HEADER_BYTES]> =
        run.iter().map(|b| wire::data_header(b.number)).collect();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(run.len() * 2);
    for (header, block) in headers.iter().zip(run) {
        iov.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        iov.push(libc::iovec {
            iov_base: block.payload.as_ptr() as *mut libc::c_void,
            iov_len: block.payload.len(),
        });
    }
    // u64 elements keep the control buffer aligned for cmsghdr; 4 of them hold a cmsghdr (16
    // bytes on 64-bit Linux) and the u16 with its padding.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as libc::c_uint) } as usize;
    if space > size_of::<[u64; 4]>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one cmsghdr and a
    // u16 (checked above), so CMSG_FIRSTHDR is non-null and its data in bounds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as libc::c_uint) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    // SAFETY: msg and everything it points at (address, iovecs, headers, payloads, control)
    // live until the call returns.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks numbered from 1 with the given payload sizes, cut from `data`.
    fn blocks<'a>(sizes: &[usize], data: &'a [u8]) -> Vec<Block<'a>> {
        sizes
            .iter()
            .zip(1u16..)
            .map(|(s, number)| Block {
                number,
                payload: &data[..*s],
            })
            .collect()
    }

    #[test]
    fn runs_stop_after_a_shorter_block_and_before_a_longer_one() {
        let data = vec![7u8; 9000];
        assert_eq!(segment_run(&blocks(&[512, 512, 512, 100, 512], &data)), 4);
        assert_eq!(segment_run(&blocks(&[512, 1024, 512], &data)), 1);
        assert_eq!(segment_run(&[]), 0);
    }

    #[test]
    fn runs_respect_the_segment_and_byte_limits() {
        let data = vec![7u8; 9000];
        assert_eq!(segment_run(&blocks(&[512; 100], &data)), MAX_SEGMENTS);
        // 1468 + 4 bytes per segment: 44 fit in 65507 bytes.
        assert_eq!(segment_run(&blocks(&[1468; 100], &data)), 44);
        assert_eq!(segment_run(&blocks(&[8192; 16], &data)), 7);
    }

    /// A window that wraps the block number and ends with a short block, cut from a patterned
    /// buffer.
    fn window(data: &[u8]) -> Vec<Block<'_>> {
        (0..21usize)
            .map(|i| Block {
                number: 65530u16.wrapping_add(i as u16),
                payload: &data[i * 512..i * 512 + if i == 20 { 77 } else { 512 }],
            })
            .collect()
    }

    /// Receive `expected` on `rx`, one datagram each, in order and byte for byte.
    fn receive_all(rx: &UdpSocket, expected: &[Block<'_>]) {
        let mut buf = [0u8; 2048];
        for (i, block) in expected.iter().enumerate() {
            let len = rx.recv(&mut buf).expect("datagram");
            assert_eq!(len, 4 + block.payload.len(), "datagram {i} length");
            assert_eq!(
                &buf[..4],
                &wire::data_header(block.number),
                "datagram {i} header"
            );
            assert_eq!(&buf[4..len], block.payload, "datagram {i} payload");
        }
    }

    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        (rx, tx)
    }

    /// Real sockets on loopback: a segmented window arrives as separate DATA datagrams, in
    /// order, with the right numbers and bytes, the shorter last block too.
    #[test]
    fn a_segmented_window_arrives_as_ordinary_datagrams() {
        let (rx, tx) = pair();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let b = window(&data);
        let mut sender = BurstSender::new();
        sender
            .send(&tx, rx.local_addr().expect("addr"), &b)
            .expect("send");
        assert!(sender.segmenting(), "loopback takes segmented sends");
        assert_eq!(
            (sender.datagrams, sender.calls),
            (21, 1),
            "one call for the window"
        );
        receive_all(&rx, &b);
    }

    /// A socket the kernel will not segment for (SO_NO_CHECK: no UDP checksum, so no
    /// segmentation, EINVAL): the window still arrives whole, block by block.
    #[test]
    fn a_refused_segmentation_falls_back_to_one_datagram_per_block() {
        let (rx, tx) = pair();
        let on: libc::c_int = 1;
        // SAFETY: tx is a live socket; the value is a c_int of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_NO_CHECK");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 241) as u8).collect();
        let b = window(&data);
        let mut sender = BurstSender::new();
        sender
            .send(&tx, rx.local_addr().expect("addr"), &b)
            .expect("send");
        assert!(
            !sender.segmenting(),
            "segmentation turned off after the refusal"
        );
        assert_eq!((sender.datagrams, sender.calls), (21, 21));
        receive_all(&rx, &b);
    }
}
