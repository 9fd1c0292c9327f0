//! The controller binary exits on one SIGTERM within a few seconds, whatever its watches or
//! its lease are doing (here: retrying an API server that is not there).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The controller process, killed when dropped (a failed test leaves no process behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Start the controller against an API server that refuses connections; returns it and
/// its log lines.
fn start(leader_election: bool) -> (Running, mpsc::Receiver<String>, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let kubeconfig = dir.path.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        r#"apiVersion: v1
kind: Config
clusters: [{name: gone, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: gone, context: {cluster: gone, user: u}}]
current-context: gone
"#,
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .env("KUBECONFIG", &kubeconfig)
        .env("SLUICE_LOG", "debug,kube=debug,hyper=warn,tower=warn")
        .env("SLUICE_LOG_FORMAT", "text")
        .env("SLUICE_CONTROLLER_METRICS_ADDR", "127.0.0.1:0")
        .env("SLUICE_LEADER_ELECTION", leader_election.to_string())
        .env("POD_NAMESPACE", "default")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Running(child), rx, dir)
}

/// Wait for a log line containing `want`.
fn wait_for(rx: &mpsc::Receiver<String>, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(want) => return,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no log line with {want:?} within {timeout:?}");
}

/// Send SIGTERM once and return how long the process took to exit.
fn terminate(Running(child): &mut Running) -> Duration {
    let sent = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let took = sent.elapsed();
            assert!(status.success(), "exit status {status}");
            return took;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("still running 10s after one SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_sigterm_stops_the_controller_while_its_watch_keeps_failing() {
    let (mut child, rx, _dir) = start(false);
    // The watch fails (connection refused) and retries.
    wait_for(&rx, "reconcile loop", Duration::from_secs(20));
    let took = terminate(&mut child);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    println!("exited {took:?} after one SIGTERM");
}

#[test]
fn one_sigterm_stops_the_controller_while_it_waits_for_the_lease() {
    let (mut child, rx, _dir) = start(true);
    wait_for(&rx, "cannot reach the API server", Duration::from_secs(20));
    let took = terminate(&mut child);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// A temporary directory removed on drop (no dependency for one directory).
mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "sluice-shutdown-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
