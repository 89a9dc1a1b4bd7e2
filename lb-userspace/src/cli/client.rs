//! The CLI's side of the control API.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, anyhow};

use crate::api::{Request, Response};

/// Sends one request and returns the daemon's response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!("cannot reach the xlb daemon at {}: is `xlb daemon` running? (choose the socket with --socket or XLB_SOCKET)", socket.display())
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(120))).context("setting socket timeout")?;
    let mut line = serde_json::to_string(req).context("encoding request")?;
    line.push('\n');
    stream.write_all(line.as_bytes()).context("sending request to the daemon")?;
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp).context("reading the daemon's response")?;
    if resp.is_empty() {
        return Err(anyhow!("the daemon closed the connection without answering"));
    }
    serde_json::from_str(&resp).with_context(|| format!("the daemon's response is not valid: {resp}"))
}
