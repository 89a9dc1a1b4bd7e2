//! Health probes, run from the balancer host to each backend (the rise/fall
//! bookkeeping is the model's: `model::Tracker`).

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::model::settings::{HealthCheck, Probe};

/// Runs one probe; `Err` says why it failed.
pub async fn probe(addr: SocketAddr, hc: &HealthCheck) -> Result<(), String> {
    match timeout(hc.timeout.0, probe_inner(addr, hc)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(hc.timeout.0))),
    }
}

async fn probe_inner(addr: SocketAddr, hc: &HealthCheck) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let Probe::Http { path } = &hc.probe else { return Ok(()) };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.map_err(|e| format!("sending request: {e}"))?;
    // The status line is all we need; read until it is complete.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading response: {e}"))?;
        if n == 0 || buf.len() > 4096 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let code = parse_status_line(&buf).ok_or_else(|| "malformed HTTP status line".to_string())?;
    if (hc.status.0..=hc.status.1).contains(&code) { Ok(()) } else { Err(format!("HTTP status {code} outside {}-{}", hc.status.0, hc.status.1)) }
}

/// `HTTP/1.x NNN ...` → NNN.
pub fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK\r\n"), None);
    }
}
