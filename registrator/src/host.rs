//! Facts about this host: its name (the first part of service IDs) and the address published
//! ports are registered with when neither `-ip` nor a specific host binding says otherwise.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

/// This host's name, as `gethostname(2)` reports it (gliderlabs uses Go's `os.Hostname`).
pub fn hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The address other hosts reach this one on: the source address of the default route,
/// else the first non-loopback interface address, else `127.0.0.1` (with a warning from the
/// caller). Never a loopback address picked by accident from `/etc/hosts`.
pub fn primary_address() -> Option<IpAddr> {
    default_route_source().or_else(first_interface_address)
}

/// Connecting a UDP socket sends nothing but makes the kernel choose the source address it
/// would route through.
fn default_route_source() -> Option<IpAddr> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    // A documentation address (TEST-NET-3): only the routing decision matters.
    sock.connect((Ipv4Addr::new(203, 0, 113, 1), 9)).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    usable(ip).then_some(ip)
}

fn usable(ip: IpAddr) -> bool {
    !(ip.is_loopback() || ip.is_unspecified())
}

/// The first IPv4 address of an interface that is up and not loopback.
fn first_interface_address() -> Option<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and has not been freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
        if !up || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddr from getifaddrs; the family says which struct it is.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if family == libc::AF_INET {
            // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            if usable(ip) {
                found = Some(ip);
                break;
            }
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_not_empty() {
        assert!(!hostname().unwrap().is_empty());
    }

    #[test]
    fn primary_address_is_never_loopback() {
        if let Some(ip) = primary_address() {
            assert!(!ip.is_loopback(), "{ip}");
        }
    }
}
