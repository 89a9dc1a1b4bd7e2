//! `xlb top`: a live view of services and backends over the control API,
//! refreshed every second: state, weight, active flows, new flows/s,
//! bits/s in and out, resets. `q` or Ctrl-C quits.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ratatui::{
    crossterm::{
        event::{self, Event, KeyCode, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};

use crate::api::{Request, Status};

/// One row's counters at the previous refresh.
#[derive(Clone, Copy, Default)]
struct Prev {
    new_flows: u64,
    bytes_in: u64,
    bytes_out: u64,
}

pub fn run(socket: &Path) -> anyhow::Result<()> {
    enable_raw_mode().context("putting the terminal in raw mode (is this a terminal?)")?;
    let mut out = std::io::stdout();
    execute!(out, EnterAlternateScreen).context("entering the alternate screen")?;
    let mut term = ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(out))?;
    let res = event_loop(&mut term, socket);
    let _ = disable_raw_mode();
    let _ = execute!(term.backend_mut(), LeaveAlternateScreen);
    let _ = term.show_cursor();
    res
}

fn event_loop<B: ratatui::backend::Backend>(term: &mut ratatui::Terminal<B>, socket: &Path) -> anyhow::Result<()> {
    let mut prev: HashMap<(String, String), Prev> = HashMap::new();
    let mut last = Instant::now();
    loop {
        let status = crate::cli::client::call(socket, &Request::Status).and_then(|r| {
            r.data
                .ok_or_else(|| anyhow::anyhow!(r.error.map(|e| e.message).unwrap_or_default()))
                .and_then(|d| serde_json::from_value::<Status>(d).map_err(Into::into))
        });
        let dt = last.elapsed().as_secs_f64().max(0.001);
        last = Instant::now();
        let frame_status = match status {
            Ok(s) => Ok(rows(&s, &mut prev, dt)),
            Err(e) => Err(format!("{e:#}")),
        };
        term.draw(|f| draw(f, socket, &frame_status))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(k) = event::read()? {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.code == KeyCode::Char('q') || k.code == KeyCode::Esc || ctrl_c {
                    return Ok(());
                }
            }
        }
    }
}

struct View {
    header: String,
    rows: Vec<[String; 9]>,
}

fn rate(cur: u64, old: u64, dt: f64) -> f64 {
    cur.saturating_sub(old) as f64 / dt
}

fn bits(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.1}G", b / 1e9),
        b if b >= 1e6 => format!("{:.1}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}

fn rows(s: &Status, prev: &mut HashMap<(String, String), Prev>, dt: f64) -> View {
    let mut rows = Vec::new();
    for svc in &s.services {
        let sname = format!("{}/{}", svc.service, svc.proto);
        let r = &svc.resets;
        rows.push([
            sname.clone(),
            format!("{} backends", svc.backends.len()),
            svc.scheduler.clone(),
            String::new(),
            svc.active_flows.to_string(),
            String::new(),
            String::new(),
            String::new(),
            (r.removed + r.unhealthy + r.drain_deadline + r.idle).to_string(),
        ]);
        for b in &svc.backends {
            let key = (sname.clone(), b.backend.to_string());
            let p = prev.get(&key).copied().unwrap_or(Prev { new_flows: b.traffic.new_flows, bytes_in: b.traffic.bytes_in, bytes_out: b.traffic.bytes_out });
            rows.push([
                String::new(),
                b.backend.to_string(),
                b.state.clone(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                format!("{:.1}", rate(b.traffic.new_flows, p.new_flows, dt)),
                bits(rate(b.traffic.bytes_in, p.bytes_in, dt) * 8.0),
                bits(rate(b.traffic.bytes_out, p.bytes_out, dt) * 8.0),
                String::new(),
            ]);
            prev.insert(key, Prev { new_flows: b.traffic.new_flows, bytes_in: b.traffic.bytes_in, bytes_out: b.traffic.bytes_out });
        }
    }
    let ifs: Vec<String> = s.interfaces.iter().map(|a| format!("{} ({})", a.iface, a.mode)).collect();
    let c = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    let header = format!(
        "interfaces: {} | table {} entries / {} flows, half-open {} | rx {} | rst reactive {} miss {} | q quits",
        ifs.join(", "),
        s.table.entries,
        s.table.capacity_flows,
        s.table.half_open_entries,
        c("rx"),
        c("rst_reactive"),
        c("rst_miss")
    );
    View { header, rows }
}

fn draw(f: &mut ratatui::Frame, socket: &Path, view: &Result<View, String>) {
    let [top, body] = Layout::vertical([Constraint::Length(3), Constraint::Min(3)]).areas(f.area());
    let title = format!(" xlb top — {} ", socket.display());
    match view {
        Err(e) => {
            f.render_widget(Paragraph::new(Line::from(format!("cannot read the daemon: {e}"))).block(Block::default().borders(Borders::ALL).title(title)), top);
        }
        Ok(v) => {
            f.render_widget(Paragraph::new(Line::from(v.header.clone())).block(Block::default().borders(Borders::ALL).title(title)), top);
            let head = Row::new(["SERVICE", "BACKEND", "STATE", "WEIGHT", "ACTIVE", "NEW/S", "IN b/s", "OUT b/s", "RESETS"].map(Cell::from))
                .style(Style::default().add_modifier(Modifier::BOLD));
            let rows = v.rows.iter().map(|r| {
                let style = match r[2].as_str() {
                    "down" | "removed" => Style::default().fg(Color::Red),
                    "draining" => Style::default().fg(Color::Yellow),
                    _ => Style::default(),
                };
                Row::new(r.clone().map(Cell::from)).style(style)
            });
            let widths = [
                Constraint::Length(22),
                Constraint::Length(22),
                Constraint::Length(10),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(7),
            ];
            f.render_widget(Table::new(rows, widths).header(head).block(Block::default().borders(Borders::ALL)), body);
        }
    }
}
