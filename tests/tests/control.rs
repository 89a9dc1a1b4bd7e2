//! The control plane under bad input and through its lifecycle: CLI exit
//! codes and messages, garbage on the socket, the config file, SIGTERM.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use testbed::{Daemon, Topology, TopologyOptions, daemon::xlb_bin};

fn require_root() {
    assert!(testbed::have_privileges(), "these tests need root (netns, XDP): run them with `cargo xtask test`");
}

fn topo(backends: usize) -> Topology {
    require_root();
    Topology::new(TopologyOptions { backends, ..Default::default() }).expect("topology")
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The part of `status` that configuration changes (not counters).
fn config_view(d: &Daemon) -> Value {
    let s = d.json(&["status"]).expect("status");
    let services: Vec<Value> = s["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|svc| {
            let backends: Vec<Value> =
                svc["backends"].as_array().expect("backends").iter().map(|b| serde_json::json!([b["backend"], b["weight"], b["state"]])).collect();
            serde_json::json!([svc["service"], svc["proto"], backends])
        })
        .collect();
    Value::Array(services)
}

#[test]
fn malformed_arguments_exit_2_with_a_message_naming_the_value() {
    let t = topo(0);
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    d.ok(&["service", "add", "10.99.0.1:80"]).expect("service");
    let before = config_view(&d);
    let cases: &[(&[&str], &str)] = &[
        (&["service", "add", "10.0.0.999:80"], "10.0.0.999:80"),
        (&["service", "add", "10.99.0.1"], "10.99.0.1"),
        (&["backend", "add", "10.99.0.1:80", "10.1.1.2:99999"], "10.1.1.2:99999"),
        (&["backend", "add", "10.99.0.1:80", "10.1.1.2:80", "--weight", "-3"], "-3"),
        (&["backend", "add", "10.99.0.1:80", "10.1.1.2:80", "--weight", "0"], "weight 0"),
        (&["service", "add", "10.99.0.2:80", "--proto", "sctp"], "sctp"),
        (&["service", "add", "0.0.0.0:80"], "0.0.0.0:80"),
        (&["service", "add", "10.99.0.3:0"], "port"),
        (&["frobnicate"], "frobnicate"),
        (&["service", "set", "10.99.0.1:80", "--on-remove", "nuke"], "reset, keep or drain"),
        (&["service", "set", "10.99.0.1:80", "--on-unhealthy", "drain:soon"], "invalid duration"),
        (&["service", "set", "10.99.0.1:80", "--health", "ping"], "tcp or http:/PATH"),
        (&["service", "set", "10.99.0.1:80", "--rise", "3"], "no health check"),
        (&["service", "set", "10.99.0.1:80", "--health", "tcp", "--health-interval", "1s", "--health-timeout", "2s"], "timeout"),
        (&["service", "set", "10.99.0.1:80", "--reset-spread", "2h"], "maximum"),
        (&["service", "set", "10.99.0.1:80", "--health", "http:/", "--health-status", "600"], "status range"),
    ];
    for (args, needle) in cases {
        let out = d.cli(args).expect("run");
        assert_eq!(code(&out), 2, "xlb {args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "xlb {args:?}: message {:?} lacks {needle:?}", stderr(&out));
    }
    assert_eq!(config_view(&d), before, "a refused request changed the configuration");
}

#[test]
fn refused_requests_exit_1_name_the_problem_and_change_nothing() {
    let t = topo(0);
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    d.ok(&["service", "add", "10.99.0.1:80"]).expect("service");
    d.ok(&["backend", "add", "10.99.0.1:80", "10.1.1.2:80"]).expect("backend");
    d.ok(&["service", "add", "10.99.0.1:53", "--proto", "udp"]).expect("udp service");
    d.ok(&["service", "add", "10.99.0.1:53", "--proto", "tcp"]).expect("tcp service on the same port");
    let before = config_view(&d);
    let cases: &[(&[&str], &str)] = &[
        (&["backend", "add", "10.99.0.7:80", "10.1.1.2:80"], "service 10.99.0.7:80 does not exist"),
        (&["backend", "add", "10.99.0.1:80", "10.1.1.2:80"], "backend 10.1.1.2:80 is already registered on 10.99.0.1:80/tcp"),
        (&["backend", "remove", "10.99.0.1:80", "10.0.0.9:80"], "backend 10.0.0.9:80 is not registered on 10.99.0.1:80/tcp"),
        (&["service", "add", "10.99.0.1:80"], "service 10.99.0.1:80/tcp already exists"),
        (&["service", "remove", "10.99.0.5:80"], "service 10.99.0.5:80 does not exist"),
        (&["backend", "add", "10.99.0.1:53", "10.1.1.3:53"], "say which with --proto"),
        (&["flows", "--service", "10.99.0.9:80"], "does not exist"),
        (&["service", "set", "10.99.0.9:80", "--on-remove", "keep"], "service 10.99.0.9:80 does not exist"),
    ];
    for (args, needle) in cases {
        let out = d.cli(args).expect("run");
        assert_eq!(code(&out), 1, "xlb {args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "xlb {args:?}: {:?} lacks {needle:?}", stderr(&out));
    }
    // The same refusals in JSON carry a stable error code.
    let out = d.cli(&["backend", "add", "10.99.0.7:80", "10.1.1.2:80", "--json"]).expect("run");
    assert_eq!(code(&out), 1);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "not_found");
    assert_eq!(config_view(&d), before, "a refused request changed the configuration");
}

#[test]
fn garbage_on_the_socket_gets_a_clear_error_and_the_daemon_keeps_serving() {
    let t = topo(0);
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    d.ok(&["service", "add", "10.99.0.1:80"]).expect("service");
    let before = config_view(&d);
    let mode = std::fs::metadata(&d.socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    let ask = |payload: &[u8]| -> Value {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(payload).expect("write");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("response {line:?} is not JSON: {e}"))
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"garbage\n".to_vec(), "invalid request"),
        (b"{\"op\":\"nope\"}\n".to_vec(), "unknown variant"),
        (b"{\"op\":\"service_add\",\"service\":\"1.2.3.4\",\"proto\":\"tcp\"}\n".to_vec(), "invalid"),
        (b"{\"op\":\"service_add\",\"service\":\"10.9.9.9:80\",\"proto\":\"tcp\",\"extra\":1}\n".to_vec(), "unknown field"),
        (b"{\"op\":\"backend_add\",\"service\":\"10.99.0.1:80\",\"backend\":\"10.1.1.2:80\",\"weight\":-1}\n".to_vec(), "invalid"),
        (b"[1,2,3]\n".to_vec(), "invalid request"),
        (vec![0xff, 0xfe, b'\n'], "UTF-8"),
        ([vec![b'x'; xlb::api::MAX_REQUEST_BYTES + 1024], b"\n".to_vec()].concat(), "longer than"),
    ];
    for (payload, needle) in cases {
        let v = ask(&payload);
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    }
    assert_eq!(config_view(&d), before, "garbage changed the configuration");
}

#[test]
fn an_unreachable_daemon_is_a_runtime_failure_with_a_hint() {
    let out = Command::new(xlb_bin()).args(["--socket", "/nonexistent/xlb.sock", "status"]).output().expect("run");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("is `xlb daemon` running"), "{}", stderr(&out));
    let out = Command::new(xlb_bin()).args(["status", "--json"]).env("XLB_SOCKET", "/nonexistent/xlb.sock").output().expect("run");
    assert_eq!(code(&out), 1);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json error");
    assert_eq!(v["error"]["code"], "unreachable");
}

#[test]
fn the_config_file_is_applied_at_start_and_a_bad_one_leaves_nothing_behind() {
    let t = topo(0);
    let dir = std::env::temp_dir().join(format!("{}-cfg", t.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[service]]\nvip = \"10.99.0.1:80\"\n[service.settings]\non_remove = \"drain:5s\"\nhealth = \"tcp\"\n[[service.backend]]\naddr = \"10.1.1.2:8080\"\nweight = 3\n\
         [[service.backend]]\naddr = \"10.1.2.2:8080\"\n[[service]]\nvip = \"10.99.0.1:53\"\nproto = \"udp\"\n",
    )
    .expect("write");
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &["--config", good.to_str().expect("path")]).expect("daemon");
    let view = config_view(&d);
    assert_eq!(view, serde_json::json!([["10.99.0.1:53", "udp", []], ["10.99.0.1:80", "tcp", [["10.1.1.2:8080", 3, "up"], ["10.1.2.2:8080", 1, "up"]]]]));
    let st = &d.json(&["status"]).expect("status")["services"][1]["settings"];
    assert_eq!(st["on_remove"], "drain:5s");
    assert_eq!(st["health"]["probe"], "tcp");
    drop(d);

    let bad_cases = [
        ("policy.toml", "[[service]]\nvip = \"10.99.0.1:80\"\n[service.settings]\non_remove = \"nuke\"\n", "reset, keep or drain"),
        ("typo.toml", "[[service]]\nvip = \"10.99.0.1:80\"\nbackends = []\n", "unknown field `backends`"),
        ("addr.toml", "[[service]]\nvip = \"10.99.0.1:80\"\n[[service.backend]]\naddr = \"10.1.1.2\"\n", "addr"),
        (
            "dup.toml",
            "[[service]]\nvip = \"10.99.0.1:80\"\n[[service.backend]]\naddr = \"10.1.1.2:80\"\n[[service.backend]]\naddr = \"10.1.1.2:80\"\n",
            "services[0].backends[1].backend: 10.1.1.2:80 is listed twice",
        ),
    ];
    for (file, text, needle) in bad_cases {
        let path = dir.join(file);
        std::fs::write(&path, text).expect("write");
        let (status, log, d) = Daemon::run_expecting_exit(&t.lb, &t.lb_ifaces, &["--config", path.to_str().expect("path")]).expect("run");
        assert_eq!(status.code(), Some(1), "{file}: {log}");
        assert!(log.contains(needle), "{file}: log lacks {needle:?}:\n{log}");
        assert!(!d.socket.exists(), "{file}: socket left behind");
        assert!(!d.pin_dir.join("XLB_CONNS").exists(), "{file}: pins left behind");
        let link = t.lb.ip(&["link", "show", "l0"]).expect("link");
        assert!(!link.contains("xdp"), "{file}: XDP left attached: {link}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_detaches_and_removes_pins_and_socket() {
    let t = topo(1);
    let mut d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    for l in &t.lb_ifaces {
        let link = t.lb.ip(&["link", "show", l]).expect("link");
        assert!(link.contains("xdp"), "{l} has no XDP program while the daemon runs: {link}");
    }
    assert!(d.pin_dir.join("XLB_CONNS").exists(), "maps are pinned under the pin dir");
    let status = d.stop().expect("stop");
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    for l in &t.lb_ifaces {
        let link = t.lb.ip(&["link", "show", l]).expect("link");
        assert!(!link.contains("xdp"), "{l} still has XDP after SIGTERM: {link}");
    }
    assert!(!d.pin_dir.exists(), "pin directory left behind");
    assert!(!d.socket.exists(), "socket left behind");
}

#[test]
fn settings_change_at_run_time_and_show_in_status() {
    let t = topo(0);
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    d.ok(&["service", "add", "10.99.0.1:80", "--on-remove", "drain:30s", "--health", "http:/healthz"]).expect("add");
    let s = d.json(&["status"]).expect("status");
    let st = &s["services"][0]["settings"];
    assert_eq!(st["on_remove"], "drain:30s");
    assert_eq!(st["on_unhealthy"], "reset", "default");
    assert_eq!(st["health"]["probe"], "http:/healthz");
    assert_eq!(st["health"]["fall"], 3, "default");
    d.ok(&["service", "set", "10.99.0.1:80", "--on-remove", "keep", "--fall", "5", "--reset-spread", "2s", "--on-miss", "rehash"]).expect("set");
    let s = d.json(&["status"]).expect("status");
    let st = &s["services"][0]["settings"];
    assert_eq!(st["on_remove"], "keep");
    assert_eq!(st["health"]["fall"], 5);
    assert_eq!(st["health"]["probe"], "http:/healthz", "unchanged fields stay");
    assert_eq!(st["reset_spread"], "2s");
    assert_eq!(st["on_miss"], "rehash");
    d.ok(&["service", "set", "10.99.0.1:80", "--health", "none"]).expect("health off");
    assert_eq!(d.json(&["status"]).expect("status")["services"][0]["settings"]["health"], Value::Null);
    let text = d.ok(&["status"]).expect("text status");
    assert!(text.contains("on-remove keep") && text.contains("on-miss rehash"), "{text}");
}

/// A configuration of `services` × `per` backends (10.1.S.B:8080 behind
/// 10.99.0.1:(1000 + S)).
fn big_config(services: usize, per: usize) -> Value {
    let svcs: Vec<Value> = (0..services)
        .map(|s| {
            let backends: Vec<Value> = (0..per).map(|b| serde_json::json!({ "backend": format!("10.1.{}.{}:8080", s + 1, b + 2), "weight": 1 })).collect();
            serde_json::json!({ "service": format!("10.99.0.1:{}", 1000 + s), "proto": "tcp", "settings": { "scheduler": "wrr" }, "backends": backends })
        })
        .collect();
    serde_json::json!({ "services": svcs })
}

#[test]
fn an_export_of_thousands_of_backends_applies_back_and_ten_thousand_are_read_whole() {
    let t = topo(0);
    let d = Daemon::start(&t.lb, &t.lb_ifaces, &[]).expect("daemon");
    let dir = std::env::temp_dir().join(format!("{}-big", t.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let apply = |name: &str, v: &Value| {
        let path = dir.join(name);
        std::fs::write(&path, v.to_string()).expect("write");
        d.cli(&["apply", "-f", path.to_str().expect("path"), "--json"]).expect("apply")
    };
    // 4,000 backends: far past the old 64 KiB request limit (~1.5k).
    let out = apply("4k.json", &big_config(40, 100));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let export = d.ok(&["export"]).expect("export");
    assert!(export.len() > 256 * 1024, "the export is {} bytes", export.len());
    let exported: Value = serde_json::from_str(&export).expect("JSON");
    let n: usize = exported["services"].as_array().expect("services").iter().map(|s| s["backends"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(n, 4000);
    // Applied back: nothing to change.
    let out = apply("again.json", &exported);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["data"]["changes"], serde_json::json!([]), "{v}");
    // 10,000 backends are read and checked whole: refused for the data
    // plane's capacity (4,096 backend slots), not for their size, and
    // nothing changes.
    let out = apply("10k.json", &big_config(50, 200));
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stdout));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["error"]["code"], "capacity", "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("4096"), "{v}");
    assert_eq!(d.ok(&["export"]).expect("export"), export, "a refused apply changes nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
