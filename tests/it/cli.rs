//! The command line: `init`, `check`, config errors, `--help`, `--version`, a taken broker port,
//! the man page and shell completions.

use std::process::Command;

use crate::support::{BIN, check, free_port};

#[test]
fn the_example_config_passes_check() {
    let out = Command::new(BIN)
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_writes_the_example_config_that_check_accepts_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new.toml");
    let out = Command::new(BIN)
        .arg("init")
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(&path).expect("written");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .expect("config.toml");
    assert_eq!(written, example);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second init refuses, and the file stays as it was.
    std::fs::write(&path, "# mine\n").expect("write");
    let out = Command::new(BIN)
        .arg("init")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not overwriting"));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "# mine\n");
}

#[test]
fn every_config_problem_is_printed_with_key_and_line_and_a_nonzero_exit() {
    let (code, text) = check(
        "[mqtt]\nqos = 3\nurl = \"tcp://x\"\n\n[storage]\nbatchsize = 10\nretention = \"soon\"\n\n[topics]\ntelemetry = \"devices/telemetry\"\n[extra]\n",
    );
    assert_eq!(code, 2, "{text}");
    for expected in [
        "line 3: mqtt.url",
        "line 6: storage.batchsize: unknown key",
        "line 7: storage.retention",
        "line 10: topics.telemetry",
        "line 11: extra: unknown section",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn a_bad_value_names_its_key_and_line() {
    let (code, text) = check("[mqtt]\nqos = 3\n");
    assert_eq!(code, 2);
    assert!(text.contains("line 2: mqtt.qos"), "{text}");
    let (code, text) = check("[http]\nlisten = \"0.0.0.0:8080\"\n");
    assert_eq!(code, 2);
    assert!(
        text.contains("line 2: http.listen") && text.contains("loopback"),
        "{text}"
    );
    let (code, text) = check("[broker]\nmode = \"sometimes\"\n");
    assert_eq!(code, 2);
    assert!(text.contains("line 2: broker.mode"), "{text}");
    let (code, text) = check("[topics]\nstatus = \"devices/{device}/telemetry\"\n");
    assert_eq!(code, 2);
    assert!(
        text.contains("topics.status") && text.contains("same topics"),
        "{text}"
    );
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    let (code, text) = check("[mqtt]\n\nqos = = 1\n");
    assert_eq!(code, 2);
    assert!(text.contains("line 3"), "{text}");
}

#[test]
fn an_unreadable_config_file_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/telebridge.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config file /nonexistent/telebridge.toml"),
        "{err}"
    );
}

#[test]
fn help_and_version_work() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "simulate"] {
        assert!(help.contains(cmd), "{help}");
    }
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_taken_embedded_broker_port_is_a_clear_error_with_the_remedy() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[storage]\npath = \"{}\"\n",
            free_port(),
            dir.path().join("t.db").display()
        ),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains("mode = \"external\""),
        "{err}"
    );
}

#[test]
fn the_systemd_units_score_an_exposure_of_2_or_less() {
    // The single unit, and the template for several instances as its slot 1 (systemd
    // analyses an instance, not a template).
    let dir = tempfile::tempdir().expect("tempdir");
    let slot = dir.path().join("telebridge@1.service");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/telebridge@.service"),
        &slot,
    )
    .expect("copy the template");
    let single = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/telebridge.service"
    ));
    for (unit, config) in [
        (single, "/etc/telebridge/config.toml"),
        (slot, "/etc/telebridge/%i.toml"),
    ] {
        // The threshold is on systemd's 0-100 scale: 20 is the "2.0" that it prints.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze (from Debian's systemd package) must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: exposure above 2.0:\n{text}",
            unit.display()
        );
        let score = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .expect("a score");
        assert!(score.contains("OK"), "{score}");
        let unit_text = std::fs::read_to_string(&unit).expect("unit");
        for key in [
            "Type=notify",
            "WatchdogSec=",
            "DynamicUser=yes",
            "StateDirectory=telebridge",
            config,
        ] {
            assert!(unit_text.contains(key), "{} lacks {key}", unit.display());
        }
    }
}

#[test]
fn sd_notify_readiness_is_sent_once_the_daemon_is_up() {
    // A fake NOTIFY_SOCKET: the datagram systemd would receive.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let port = free_port();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n",
            dir.path().join("t.db").display()
        ),
    )
    .expect("write");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().expect("wait");
    let msg = String::from_utf8_lossy(&buf[..n.expect("a notification within 20 s")]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(status.success());
}

#[tokio::test]
async fn logs_to_a_file_carry_no_colour_codes_unless_asked() {
    let broker = crate::support::Mosquitto::start().await;
    let plain = crate::support::Daemon::start(&broker.url(), "").await;
    let coloured =
        crate::support::Daemon::start(&broker.url(), "[log]\ncolor = \"always\"\n").await;
    let (plain, coloured) = (plain.log_text(), coloured.log_text());
    assert!(plain.contains("telebridge running"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "ANSI codes in a log file: {plain}"
    );
    assert!(coloured.contains('\u{1b}'), "color = \"always\" gave none");
}

#[test]
fn man_prints_a_man_page_and_completions_know_every_subcommand() {
    // Act
    let man = Command::new(BIN).arg("man").output().expect("run");
    let bash = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .expect("run");
    let bad = Command::new(BIN)
        .args(["completions", "cmd.exe"])
        .output()
        .expect("run");

    // Assert
    assert!(man.status.success());
    let page = String::from_utf8(man.stdout).expect("UTF-8");
    assert!(page.contains(".TH telebridge 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    assert!(bash.status.success());
    let script = String::from_utf8(bash.stdout).expect("UTF-8");
    for sub in [
        "run",
        "init",
        "check",
        "token",
        "simulate",
        "man",
        "completions",
    ] {
        assert!(
            script.contains(&format!("telebridge__subcmd__{sub}\"")),
            "bash completion lacks {sub}"
        );
    }
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
}
