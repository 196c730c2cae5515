//! The results of a run: one [`Row`] per scenario and server, the ratios to the peers, the
//! issue's goals checked against them, and their rendering as a Markdown table and JSON.

use serde::Serialize;

use super::stats::ratio;

/// Which server a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// pixiu-metadata.
    Ours,
    /// etcd 3.4 through etcd-client.
    Etcd,
    /// The bare tonic echo: unary `Get` from memory, and an ADS fan-out with no logic.
    Echo,
    /// The same ADS fan-out over `h2` directly, one task per connection: the HTTP/2 floor.
    H2Ads,
}

impl Server {
    /// What it serves ADS as: ours, or a bare ADS of the transport's.
    pub fn ads_label(self) -> &'static str {
        match self {
            Server::Ours => "pixiu-metadata",
            Server::Etcd => "etcd watch",
            Server::Echo => "bare tonic ADS",
            Server::H2Ads => "bare h2 ADS",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Server::Ours => "pixiu-metadata",
            Server::Etcd => "etcd",
            Server::Echo => "tonic echo",
            Server::H2Ads => "bare h2 ADS",
        }
    }
}

/// What one server did in one scenario. Absent figures do not apply.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Operations (or updates) per second (unary: of the median round).
    pub throughput: Option<f64>,
    /// Unary: every round's throughput, in the order the rounds ran.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub throughput_rounds: Vec<f64>,
    /// Median latency in microseconds (fan-out: publish start to a stream's receipt).
    pub p50_us: Option<f64>,
    /// 99th percentile latency in microseconds.
    pub p99_us: Option<f64>,
    /// Largest latency in microseconds.
    pub max_us: Option<f64>,
    /// Server CPU microseconds per operation (fan-out: per update).
    pub server_cpu_us_per_op: Option<f64>,
    /// Load generator CPU microseconds per operation (fan-out: per update).
    pub generator_cpu_us_per_op: Option<f64>,
    /// Server resident memory in bytes at the end.
    pub rss_bytes: Option<u64>,
    /// Resident memory the streams added, per stream, in bytes.
    pub rss_per_stream_bytes: Option<f64>,
    /// Milliseconds from spawning the server until it was ready.
    pub ready_ms: Option<f64>,
    /// Ours: how often its store's followers (the push layer, the lease sweeper) fell behind
    /// the store's changes and started over from the whole state while the server ran, from
    /// its `/metrics`; read when the server stops, so every case it served shares the figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_watch_resets: Option<u64>,
    /// Fan-out: the slowest acknowledgement of an update's publish (ours: durable), in
    /// microseconds from its start. Every delivery waits for the publish to commit, so an
    /// update whose deliveries all came late because its commit did shows here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_max_us: Option<f64>,
    /// Failed operations, or streams that missed an update.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// One scenario on one server.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario group: `get`, `publish-new`, `publish-refresh`, `fanout`, `streams`,
    /// `startup`.
    pub scenario: String,
    /// The variant inside the group, e.g. `hot`, `sotw-10000x100`.
    pub case: String,
    /// The server measured.
    pub server: Server,
    /// Streams (fan-out, streams) or workers (unary).
    pub concurrency: usize,
    /// Connections the load used.
    pub connections: usize,
    /// What was measured.
    pub figures: Figures,
}

/// `ours / peer` for one figure of one case.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Scenario group.
    pub scenario: String,
    /// Case.
    pub case: String,
    /// The peer.
    pub peer: Server,
    /// The figure compared.
    pub figure: &'static str,
    /// Whether a higher ratio is better for us.
    pub higher_is_better: bool,
    /// ours / peer.
    pub ratio: f64,
}

/// One goal of the issue, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// The goal as the issue states it.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Whether it is met; `None` when this run did not measure it.
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine and the run's settings.
    pub environment: serde_json::Value,
    /// Scenario groups that ran (every one unless `--scenarios` chose).
    pub scenarios: Vec<String>,
    /// Every measurement.
    pub rows: Vec<Row>,
    /// Ratios to the peers.
    pub ratios: Vec<Ratio>,
    /// The goals.
    pub goals: Vec<Goal>,
}

/// The figures compared with a peer in each scenario, and whether higher is better.
fn compared(scenario: &str) -> &'static [(&'static str, bool)] {
    match scenario {
        "get" | "publish-new" | "publish-refresh" => &[
            ("throughput", true),
            ("p99_us", false),
            ("server_cpu_us_per_op", false),
        ],
        "fanout" => &[
            ("server_cpu_us_per_op", false),
            ("p99_us", false),
            ("max_us", false),
        ],
        "streams" => &[("rss_per_stream_bytes", false)],
        "startup" => &[("ready_ms", false)],
        _ => &[],
    }
}

fn figure(figures: &Figures, name: &str) -> Option<f64> {
    match name {
        "throughput" => figures.throughput,
        "p50_us" => figures.p50_us,
        "p99_us" => figures.p99_us,
        "max_us" => figures.max_us,
        "server_cpu_us_per_op" => figures.server_cpu_us_per_op,
        "rss_per_stream_bytes" => figures.rss_per_stream_bytes,
        "ready_ms" => figures.ready_ms,
        _ => None,
    }
}

/// The peer row `ours` is compared with: same scenario and case, else (publish-refresh
/// against etcd) etcd's `publish-new` put at the same shape.
fn peer_row<'a>(rows: &'a [Row], ours: &Row, peer: Server) -> Option<&'a Row> {
    let same = |r: &&Row| {
        r.server == peer
            && r.case == ours.case
            && r.connections == ours.connections
            && r.concurrency == ours.concurrency
    };
    rows.iter()
        .filter(|r| r.scenario == ours.scenario)
        .find(same)
        .or_else(|| {
            (ours.scenario == "publish-refresh" && peer == Server::Etcd)
                .then(|| {
                    rows.iter()
                        .filter(|r| r.scenario == "publish-new")
                        .find(|r| {
                            r.server == peer
                                && r.connections == ours.connections
                                && r.concurrency == ours.concurrency
                        })
                })
                .flatten()
        })
}

/// Every ratio of our rows to the peers' rows.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for ours in rows.iter().filter(|r| r.server == Server::Ours) {
        for peer in [Server::Echo, Server::H2Ads, Server::Etcd] {
            let Some(theirs) = peer_row(rows, ours, peer) else {
                continue;
            };
            for &(name, higher_is_better) in compared(&ours.scenario) {
                if let Some(value) =
                    ratio(figure(&ours.figures, name), figure(&theirs.figures, name))
                {
                    out.push(Ratio {
                        scenario: ours.scenario.clone(),
                        case: ours.case.clone(),
                        peer,
                        figure: name,
                        higher_is_better,
                        ratio: value,
                    });
                }
            }
        }
    }
    out
}

fn find_ratio<'a>(
    ratios: &'a [Ratio],
    scenario: &str,
    case: Option<&str>,
    peer: Server,
    figure: &str,
) -> Option<&'a Ratio> {
    ratios.iter().find(|r| {
        r.scenario == scenario
            && case.is_none_or(|c| r.case == c)
            && r.peer == peer
            && r.figure == figure
    })
}

fn ours<'a>(rows: &'a [Row], scenario: &str, case_prefix: &str) -> Option<&'a Row> {
    rows.iter()
        .filter(|r| {
            r.server == Server::Ours && r.scenario == scenario && r.case.starts_with(case_prefix)
        })
        .max_by_key(|r| r.concurrency)
}

/// A bare ADS fan-out's (`floor`'s) server CPU per update over etcd's, at the same shape as
/// `ours`: the part of the fan-out goal the transport alone takes.
fn transport_floor(rows: &[Row], ours: Option<&Row>, floor: Server) -> Option<f64> {
    let ours = ours?;
    let cpu = |peer| peer_row(rows, ours, peer).and_then(|r| r.figures.server_cpu_us_per_op);
    ratio(cpu(floor), cpu(Server::Etcd))
}

fn threshold(
    goal: &str,
    measured: Option<f64>,
    render: impl Fn(f64) -> String,
    ok: impl Fn(f64) -> bool,
) -> Goal {
    Goal {
        goal: goal.into(),
        measured: measured.map_or_else(|| "not measured".into(), &render),
        met: measured.map(ok),
    }
}

/// The goals, checked against `rows` and `ratios`.
pub fn goals(rows: &[Row], ratios: &[Ratio]) -> Vec<Goal> {
    let r = |scenario, case, peer, figure| {
        find_ratio(ratios, scenario, case, peer, figure).map(|r| r.ratio)
    };
    let times = |x: f64| format!("{x:.2}x");
    let mut goals = Vec::new();
    for case in ["hot", "random"] {
        goals.push(threshold(
            &format!("get ({case}) throughput >= 0.9x the bare tonic echo"),
            r("get", Some(case), Server::Echo, "throughput"),
            times,
            |x| x >= 0.9,
        ));
    }
    goals.push(threshold(
        "publish-new throughput >= 2x etcd put",
        r("publish-new", None, Server::Etcd, "throughput"),
        times,
        |x| x >= 2.0,
    ));
    goals.push(threshold(
        "publish-new p99 <= etcd put's",
        r("publish-new", None, Server::Etcd, "p99_us"),
        times,
        |x| x <= 1.0,
    ));
    goals.push(threshold(
        "publish-refresh throughput >= 4x etcd put",
        r("publish-refresh", None, Server::Etcd, "throughput"),
        times,
        |x| x >= 4.0,
    ));
    let fanout = ours(rows, "fanout", "sotw");
    let fanout_case = fanout.map(|row| row.case.as_str());
    goals.push(threshold(
        &format!(
            "fan-out to {} streams: server CPU per update <= 0.2x etcd's watch fan-out",
            fanout.map_or(0, |row| row.concurrency)
        ),
        r("fanout", fanout_case, Server::Etcd, "server_cpu_us_per_op"),
        |x| {
            let floors: Vec<String> = [Server::Echo, Server::H2Ads]
                .into_iter()
                .filter_map(|floor| {
                    let share = transport_floor(rows, fanout, floor)?;
                    Some(format!("the {}: {share:.2}x", floor.ads_label()))
                })
                .collect();
            if floors.is_empty() {
                times(x)
            } else {
                format!("{x:.2}x ({})", floors.join(", "))
            }
        },
        |x| x <= 0.2,
    ));
    goals.push(threshold(
        "fan-out delivery p99 <= 100 ms",
        fanout.and_then(|row| row.figures.p99_us),
        |us| format!("{:.1} ms", us / 1000.0),
        |us| us <= 100_000.0,
    ));
    let streams = rows.iter().find(|row| {
        row.server == Server::Ours && row.scenario == "streams" && row.case == "10000x100"
    });
    goals.push(threshold(
        "<= 8 KiB per idle ADS stream at 10,000 streams over 100 connections",
        streams.and_then(|row| row.figures.rss_per_stream_bytes),
        |b| format!("{:.2} KiB", b / 1024.0),
        |b| b <= 8192.0,
    ));
    let big = rows.iter().find(|row| {
        row.server == Server::Ours && row.scenario == "streams" && row.case == "50000x10000"
    });
    goals.push(threshold(
        "50,000 streams over 10,000 connections in <= 1 GiB",
        big.and_then(|row| row.figures.rss_bytes.map(|b| b as f64)),
        |b| format!("{:.0} MiB", b / 1048576.0),
        |b| b <= 1073741824.0,
    ));
    goals.push(threshold(
        "ready <= 2 s with 100,000 records",
        rows.iter()
            .find(|row| {
                row.server == Server::Ours && row.scenario == "startup" && row.case == "100000"
            })
            .and_then(|row| row.figures.ready_ms),
        |ms| format!("{:.0} ms", ms),
        |ms| ms <= 2000.0,
    ));
    goals
}

fn opt(value: Option<f64>, scale: f64, digits: usize) -> String {
    value.map_or_else(|| "".into(), |v| format!("{:.*}", digits, v / scale))
}

/// The throughput, and with several rounds their range: `median (min–max)`.
fn throughput_cell(f: &Figures) -> String {
    let median = opt(f.throughput, 1.0, 0);
    let lowest = f.throughput_rounds.iter().copied().reduce(f64::min);
    let highest = f.throughput_rounds.iter().copied().reduce(f64::max);
    match (lowest, highest) {
        (Some(lowest), Some(highest)) if f.throughput_rounds.len() > 1 => {
            format!("{median} ({lowest:.0}–{highest:.0})")
        }
        _ => median,
    }
}

/// The report as Markdown: the measurements, the ratios and the goals.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    if let Some(line) = settings_line(&report.environment) {
        out.push_str(&line);
        out.push_str("\n\n");
    }
    out.push_str(
        "| scenario | case | server | conc. | conns | ops/s | p50 ms | p99 ms | max ms | server CPU µs/op | generator CPU µs/op | RSS MiB | RSS/stream KiB | ready ms | errors |\n",
    );
    out.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for row in &report.rows {
        let f = &row.figures;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.scenario,
            row.case,
            row.server.label(),
            row.concurrency,
            row.connections,
            throughput_cell(f),
            opt(f.p50_us, 1000.0, 2),
            opt(f.p99_us, 1000.0, 2),
            opt(f.max_us, 1000.0, 2),
            opt(f.server_cpu_us_per_op, 1.0, 1),
            opt(f.generator_cpu_us_per_op, 1.0, 1),
            opt(f.rss_bytes.map(|b| b as f64), 1048576.0, 1),
            opt(f.rss_per_stream_bytes, 1024.0, 2),
            opt(f.ready_ms, 1.0, 0),
            f.errors,
        ));
    }
    let resets: Vec<String> = report
        .rows
        .iter()
        .filter(|row| row.figures.store_watch_resets.is_some_and(|n| n > 0))
        .map(|row| {
            let n = row.figures.store_watch_resets.unwrap_or_default();
            format!("{} {} ({n})", row.scenario, row.case)
        })
        .collect();
    if !resets.is_empty() {
        out.push_str(&format!(
            "\nThe store's followers fell behind and started over from the whole state in: {}. \
             Those figures include the cost of relisting.\n",
            resets.join(", ")
        ));
    }
    let publishes: Vec<String> = report
        .rows
        .iter()
        .filter_map(|row| {
            let max = row.figures.publish_max_us?;
            Some(format!(
                "{} {} {:.2} ms",
                row.case,
                row.server.label(),
                max / 1000.0
            ))
        })
        .collect();
    if !publishes.is_empty() {
        out.push_str(&format!(
            "\nThe slowest publish of a fan-out update, start to acknowledgement (the deliveries \
             of that update waited for it): {}.\n",
            publishes.join(", ")
        ));
    }
    out.push_str("\n| scenario | case | vs | figure | ours / peer | better when |\n|---|---|---|---|--:|---|\n");
    for r in &report.ratios {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {} |\n",
            r.scenario,
            r.case,
            r.peer.label(),
            r.figure,
            r.ratio,
            if r.higher_is_better {
                "higher"
            } else {
                "lower"
            }
        ));
    }
    out.push_str("\n| goal | measured | met |\n|---|---|---|\n");
    for g in &report.goals {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        out.push_str(&format!("| {} | {} | {} |\n", g.goal, g.measured, met));
    }
    out
}

/// How the run was made, in one line above the tables: what a table pasted elsewhere would
/// otherwise lose (the build, the unary client, the load's shape).
fn settings_line(environment: &serde_json::Value) -> Option<String> {
    let settings = environment.get("settings")?;
    let number = |key: &str| settings.get(key).and_then(serde_json::Value::as_u64);
    let seconds = settings
        .get("duration")
        .and_then(|d| Some(d.get("secs")?.as_f64()? + d.get("nanos")?.as_f64()? / 1e9))?;
    let rounds = match number("rounds")? {
        1 => "1 round".to_string(),
        n => format!("{n} rounds"),
    };
    Some(format!(
        "{} build; unary cases: {} calls in flight over {} connections through the {} client, \
         {rounds} of {seconds}s; fan-out: {} connections, {} updates per point, the servers in \
         turns",
        environment.get("build")?.as_str()?,
        number("concurrency")?,
        number("connections")?,
        settings.get("client")?.as_str()?,
        number("fanout_connections")?,
        number("fanout_updates")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &str, case: &str, server: Server, figures: Figures) -> Row {
        Row {
            scenario: scenario.into(),
            case: case.into(),
            server,
            concurrency: 8,
            connections: 2,
            figures,
        }
    }

    fn thr(throughput: f64, p99_us: f64) -> Figures {
        Figures {
            throughput: Some(throughput),
            p99_us: Some(p99_us),
            ..Default::default()
        }
    }

    #[test]
    fn ratios_pair_same_case_and_refresh_uses_etcd_put() {
        let rows = vec![
            row("get", "hot", Server::Ours, thr(900.0, 10.0)),
            row("get", "hot", Server::Echo, thr(1000.0, 5.0)),
            row("publish-new", "new", Server::Ours, thr(400.0, 10.0)),
            row("publish-new", "new", Server::Etcd, thr(100.0, 20.0)),
            row(
                "publish-refresh",
                "identical",
                Server::Ours,
                thr(800.0, 10.0),
            ),
        ];
        let ratios = ratios(&rows);
        let get = find_ratio(&ratios, "get", Some("hot"), Server::Echo, "throughput").unwrap();
        assert!((get.ratio - 0.9).abs() < 1e-9);
        let refresh =
            find_ratio(&ratios, "publish-refresh", None, Server::Etcd, "throughput").unwrap();
        assert!((refresh.ratio - 8.0).abs() < 1e-9);
        let goals = goals(&rows, &ratios);
        let met = |prefix: &str| {
            goals
                .iter()
                .find(|g| g.goal.starts_with(prefix))
                .unwrap()
                .met
        };
        assert_eq!(met("get (hot)"), Some(true));
        assert_eq!(met("get (random)"), None);
        assert_eq!(met("publish-new throughput"), Some(true));
        assert_eq!(met("publish-new p99"), Some(true));
        assert_eq!(met("publish-refresh"), Some(true));
        assert_eq!(met("ready"), None);
    }

    #[test]
    fn the_fanout_goal_shows_the_bare_transports_share_of_etcds_cpu() {
        let cpu = |us| Figures {
            server_cpu_us_per_op: Some(us),
            p99_us: Some(50_000.0),
            ..Default::default()
        };
        let case = "sotw-10000x100";
        let rows = vec![
            row("fanout", case, Server::Ours, cpu(180_000.0)),
            row("fanout", case, Server::Echo, cpu(120_000.0)),
            row("fanout", case, Server::H2Ads, cpu(45_000.0)),
            row("fanout", case, Server::Etcd, cpu(150_000.0)),
        ];
        let ratios = ratios(&rows);
        let floor = find_ratio(
            &ratios,
            "fanout",
            Some(case),
            Server::Echo,
            "server_cpu_us_per_op",
        )
        .unwrap();
        assert!((floor.ratio - 1.5).abs() < 1e-9);
        let goal = goals(&rows, &ratios)
            .into_iter()
            .find(|g| g.goal.contains("server CPU per update"))
            .unwrap();
        assert_eq!(
            goal.measured,
            "1.20x (the bare tonic ADS: 0.80x, the bare h2 ADS: 0.30x)"
        );
        assert_eq!(goal.met, Some(false));
    }

    #[test]
    fn different_connections_are_not_compared() {
        let mut echo = row("get", "hot", Server::Echo, thr(1000.0, 5.0));
        echo.connections = 3;
        let rows = vec![row("get", "hot", Server::Ours, thr(900.0, 10.0)), echo];
        assert!(ratios(&rows).is_empty());
    }

    /// A report of `rows` of one scenario, with their ratios and goals.
    fn report_of(scenario: &str, rows: Vec<Row>) -> Report {
        let ratios = ratios(&rows);
        Report {
            environment: serde_json::json!({}),
            scenarios: vec![scenario.into()],
            goals: goals(&rows, &ratios),
            rows,
            ratios,
        }
    }

    #[test]
    fn markdown_names_the_slowest_publish_of_each_fanout_run() {
        let fanout = Figures {
            publish_max_us: Some(695_700.0),
            ..Figures::default()
        };
        let rows = vec![
            row("fanout", "sotw-20x5", Server::Ours, fanout),
            row("fanout", "unrelated-20x5", Server::Ours, Figures::default()),
        ];
        let report = report_of("fanout", rows);
        let text = markdown(&report);
        assert!(
            text.contains("acknowledgement (the deliveries of that update waited for it): sotw-20x5 pixiu-metadata 695.70 ms."),
            "{text}"
        );
        // Without the figure, no line.
        let mut report = report;
        report.rows[0].figures.publish_max_us = None;
        assert!(!markdown(&report).contains("acknowledgement"));
        // The JSON has it only where it was measured.
        let json = serde_json::to_value(&report.rows[1]).unwrap();
        assert!(json["figures"].get("publish_max_us").is_none());
    }

    #[test]
    fn markdown_has_a_line_per_row_and_goal() {
        let report = report_of(
            "get",
            vec![row("get", "hot", Server::Ours, thr(900.0, 10.0))],
        );
        let text = markdown(&report);
        assert!(text.contains("| get | hot | pixiu-metadata | 8 | 2 | 900 |"));
        // Nothing to compare with: every goal is unmeasured, in both columns.
        assert_eq!(text.matches("not measured").count(), 2 * report.goals.len());
    }

    #[test]
    fn followers_that_started_over_are_named_below_the_rows() {
        let with_resets = |n| Figures {
            store_watch_resets: Some(n),
            ..thr(900.0, 10.0)
        };
        let report = |rows: Vec<Row>| Report {
            environment: serde_json::json!({}),
            scenarios: vec![],
            goals: vec![],
            ratios: vec![],
            rows,
        };
        let quiet = report(vec![row("get", "hot", Server::Ours, with_resets(0))]);
        assert!(!markdown(&quiet).contains("started over"));
        let lagged = report(vec![
            row("publish-new", "new", Server::Ours, with_resets(3)),
            row("get", "hot", Server::Ours, with_resets(0)),
        ]);
        assert!(
            markdown(&lagged)
                .contains("started over from the whole state in: publish-new new (3).")
        );
    }

    #[test]
    fn the_settings_head_the_tables() {
        let environment = serde_json::json!({
            "build": "release",
            "settings": {
                "concurrency": 64, "connections": 4, "client": "stock", "rounds": 3,
                "duration": {"secs": 10, "nanos": 0},
                "fanout_connections": 100, "fanout_updates": 5,
            },
        });
        let report = Report {
            environment,
            scenarios: vec![],
            rows: vec![],
            ratios: vec![],
            goals: vec![],
        };
        assert!(markdown(&report).starts_with(
            "release build; unary cases: 64 calls in flight over 4 connections through the \
             stock client, 3 rounds of 10s; fan-out: 100 connections, 5 updates per point, the \
             servers in turns\n\n|"
        ));
    }

    #[test]
    fn several_rounds_show_their_range_beside_the_median() {
        let mut figures = thr(900.0, 10.0);
        assert_eq!(throughput_cell(&figures), "900");
        figures.throughput_rounds = vec![950.4, 900.0, 870.6];
        assert_eq!(throughput_cell(&figures), "900 (871–950)");
    }
}
