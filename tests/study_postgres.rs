//! Studies on PostgreSQL (issue 14), against the throwaway server scripts/test.sh starts
//! (HPO_GPU_POSTGRES_URL; HPO_GPU_REQUIRE_POSTGRES=1 makes its absence a failure, not a skip).
//! Each test gets a database of its own; they run one at a time.

mod common;
mod common_study;
mod fake_trainer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use hpo_gpu::study::storage::{StartOutcome, Storage};
use hpo_gpu::trial::{StudyDirection, TrialState};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A fresh, empty database on the test server: its URL, or None (printed) without a server.
fn fresh_database(name: &str) -> Option<String> {
    let Ok(base) = std::env::var("HPO_GPU_POSTGRES_URL") else {
        assert!(
            std::env::var_os("HPO_GPU_REQUIRE_POSTGRES").is_none(),
            "HPO_GPU_REQUIRE_POSTGRES is set but HPO_GPU_POSTGRES_URL is not"
        );
        eprintln!("SKIPPED: HPO_GPU_POSTGRES_URL is not set (scripts/test.sh starts a server and sets it)");
        return None;
    };
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).expect("connect to the test server");
    let db = format!("{name}_{}", std::process::id());
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    Some(format!("{server}/{db}"))
}

/// The same URL as Optuna's SQLAlchemy wants it.
fn sqlalchemy(url: &str) -> String {
    url.replacen("postgresql://", "postgresql+psycopg2://", 1)
}

fn spawn_piped(cmd: &mut Command) -> std::process::Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// The tiny model and data folders (`common::tiny_model`, `common::tiny_data`) in `dir`.
fn tiny_workload(dir: &Path) -> (PathBuf, PathBuf) {
    (common::tiny_model(dir), common::tiny_data(dir))
}

/// A running `hpo-gpu search` worker of study `study` at `url` on a tiny workload, `epochs`
/// epochs of sequences up to `max_length`, heartbeats every second, and the `extra` flags.
fn search_worker(
    (model, data): &(PathBuf, PathBuf),
    url: &str,
    study: &str,
    epochs: &str,
    max_length: &str,
    extra: &[&str],
) -> std::process::Child {
    spawn_piped(
        Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
            .args(["search", "--model"])
            .arg(model)
            .args(["--random-init", "--dataset"])
            .arg(data)
            .args([
                "--train-samples",
                "0",
                "--eval-samples",
                "0",
                "--epochs",
                epochs,
                "--max-length",
                max_length,
            ])
            .args(["--device", "cpu", "--threads", "1", "--pruner", "none", "--heartbeat-interval", "1"])
            .args(["--storage", url, "--study-name", study])
            .args(extra),
    )
}

/// Six `hpo-gpu search` workers (two running the trial array, `--slots 3`) and two Optuna workers
/// (10 trials each) run one 120-trial study: every trial number unique and gap-free, the hpo-gpu
/// workers stopping exactly at 120, every trial run by one worker, every value and report
/// stored; then Optuna reads the study and adds a trial that hpo-gpu sees.
#[test]
fn hpo_gpu_and_optuna_workers_share_one_study() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database("shared") else { return };
    let Some(python) = common_study::python() else { return };
    const TARGET: u64 = 120;
    const OPTUNA_EACH: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let workload = tiny_workload(dir.path());
    // The study exists before anyone joins (Optuna's workers load it).
    let mut storage = Storage::open(&url).unwrap();
    storage.create_study("shared", StudyDirection::Maximize, false).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/pg_optuna_worker.py");
    let optuna: Vec<_> = (0..2)
        .map(|_| {
            spawn_piped(
                Command::new(&python)
                    .arg(script)
                    .arg(sqlalchemy(&url))
                    .arg("shared")
                    .arg(OPTUNA_EACH.to_string()),
            )
        })
        .collect();
    // Optuna's workers go first (they start slower): their trials, running with heartbeats or
    // finished, count towards the target the hpo-gpu workers stop at, so the study ends at exactly
    // TARGET finished trials while all eight share it.
    let study = storage.load_study("shared").unwrap();
    let started = std::time::Instant::now();
    while storage.trials(study.study_id, None).unwrap().is_empty() {
        assert!(started.elapsed().as_secs() < 60, "no Optuna trial within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let target = TARGET.to_string();
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let slots = if w < 2 { "3" } else { "1" };
            search_worker(
                &workload,
                &url,
                "shared",
                "1",
                "16",
                &["--n-trials", &target, "--slots", slots, "--grace-period", "30"],
            )
        })
        .collect();
    let mut owner: HashMap<u64, String> = HashMap::new();
    for (w, child) in optuna.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "Optuna worker failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ran: Vec<u64> = stdout
            .lines()
            .find_map(|l| l.strip_prefix("OPTUNA_RAN="))
            .unwrap_or_else(|| panic!("no summary from the Optuna worker:\n{stdout}"))
            .split(',')
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(ran.len() as u64, OPTUNA_EACH);
        for n in ran {
            assert!(owner.insert(n, format!("optuna {w}")).is_none(), "trial {n} run twice");
        }
    }
    for (w, child) in workers.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "worker {w} failed:\n{stderr}");
        for n in stderr
            .lines()
            .filter_map(|l| l.strip_prefix("trial ")?.split_once(" started")?.0.parse::<u64>().ok())
        {
            assert!(owner.insert(n, format!("hpo-gpu {w}")).is_none(), "trial {n} run by two workers");
        }
    }
    let trials = storage.trials(study.study_id, None).unwrap();
    let numbers: Vec<u64> = trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..trials.len() as u64).collect::<Vec<_>>(), "unique, gap-free trial numbers");
    let counts = storage.trial_counts(study.study_id).unwrap();
    // hpo-gpu's workers stop exactly at the target: none of them started trial number TARGET or
    // later (a trial's number is the count of trials before it, all finished or alive here). An
    // Optuna worker runs its n_trials regardless, as Optuna does, and may go past it.
    let beyond = |who: &str| owner.iter().filter(|(n, o)| **n >= TARGET && o.starts_with(who)).count() as u64;
    assert_eq!(beyond("hpo-gpu"), 0, "an hpo-gpu worker went past the target: {owner:?}");
    assert_eq!(counts.finished_ok(), TARGET + beyond("optuna"), "{counts:?}");
    assert_eq!((counts.running, counts.waiting, counts.fail), (0, 0, 0), "{counts:?}");
    assert_eq!(owner.len(), trials.len(), "every trial was run by exactly one worker");
    for t in &trials {
        assert!(t.value().is_some_and(f64::is_finite), "trial {} lost its value", t.number);
        if owner[&t.number].starts_with("hpo-gpu") {
            assert_eq!(t.intermediate_values.len(), 1, "trial {} lost its report", t.number);
        }
    }
    // Optuna reads what everyone wrote and adds one more; hpo-gpu sees it.
    let check = format!(
        "import optuna; s = optuna.load_study(study_name='shared', storage='{}'); \
         assert len(s.trials) == {}, len(s.trials); t = s.ask(); s.tell(t, 0.75); print(t.number)",
        sqlalchemy(&url),
        trials.len()
    );
    let out = Command::new(&python).args(["-c", &check]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(added, trials.len() as u64);
    let again = storage.trials(study.study_id, None).unwrap();
    assert_eq!(
        again.last().map(|t| (t.number, t.state, t.value())),
        Some((added, TrialState::Complete, Some(0.75)))
    );
}

/// The URL problems a user meets, each one line naming the server and the reason, exit 1, and
/// nothing created: a port nobody listens on, a wrong password, a database that does not exist,
/// a database holding another Optuna schema version.
#[test]
fn connection_problems_are_one_clear_line() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database("errors") else { return };
    let (server, db) = url.rsplit_once('/').unwrap();
    let (credentials, host) = server.trim_start_matches("postgresql://").split_once('@').unwrap();
    let user = credentials.split(':').next().unwrap();
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let password = credentials.split_once(":").unwrap().1;
    let closed = format!("postgresql://{credentials}@127.0.0.1:{closed_port}/{db}");
    let out = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .args(["trials", "--storage", &closed, "--study-name", "s"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{closed}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{closed}: one line:\n{stderr}");
    assert!(stderr.contains("cannot connect to PostgreSQL") && !stderr.contains(":hpo@"), "{stderr}");
    // The rows of docs/cli-errors.md, exactly.
    let fill = |text: &str| {
        text.replace("<user>", user)
            .replace("<password>", password)
            .replace("<host>", host)
            .replace("<db>", db)
    };
    for case in common::postgres_errors::POSTGRES_CASES {
        if case.id == "storage-postgres-old-schema" {
            // As Optuna 3.0 left it.
            Storage::open(&url).unwrap();
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            admin.batch_execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'").unwrap();
        }
        let args: Vec<String> =
            common::postgres_errors::postgres_case_args(case).iter().map(|a| fill(a)).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
            .args(&args)
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", case.id);
        assert_eq!(stderr.trim_end(), fill(case.stderr), "{}", case.id);
    }
}

/// PGPASSWORD supplies the password a URL leaves out, as for libpq and psycopg2.
#[test]
fn the_password_may_come_from_pgpassword() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database("pgpassword") else { return };
    let (credentials, rest) = url.trim_start_matches("postgresql://").split_once('@').unwrap();
    let (user, password) = credentials.split_once(':').unwrap();
    let bare = format!("postgresql+psycopg2://{user}@{rest}");
    let space = r#"{"x": {"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 1.0}}}"#;
    let out = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .args([
            "ask",
            "--storage",
            &bare,
            "--study-name",
            "p",
            "--direction",
            "minimize",
            "--search-space",
            space,
        ])
        .env("PGPASSWORD", password)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("{\"number\": 0"));
    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study("p").unwrap();
    assert_eq!(storage.trials(study.study_id, None).unwrap().len(), 1);
}

/// Heartbeats follow the server's clock, as Optuna's do (`now()` into a TIMESTAMP column: the
/// server's local time). On databases whose time zone is 14 h ahead of and 11 h behind UTC, a
/// heartbeat an Optuna worker just wrote is fresh for hpo-gpu, one two minutes old is stale, and
/// hpo-gpu's own heartbeats are in the server's time.
#[test]
fn heartbeats_follow_the_servers_clock_like_optunas() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database("heartbeat_clock") else { return };
    let db = url.rsplit_once('/').unwrap().1.to_string();
    for (i, zone) in ["Pacific/Kiritimati", "Pacific/Pago_Pago"].iter().enumerate() {
        let mut raw = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        raw.batch_execute(&format!("ALTER DATABASE {db} SET timezone = '{zone}'")).unwrap();
        let mut raw = postgres::Client::connect(&url, postgres::NoTls).unwrap(); // sees the new zone
        let mut storage = Storage::open(&url).unwrap();
        let study = storage.create_study(&format!("clock_{i}"), StudyDirection::Maximize, false).unwrap();
        let StartOutcome::Started(ours) = storage.start_trial(study.study_id, None, true).unwrap() else {
            panic!("no trial")
        };
        let StartOutcome::Started(theirs) = storage.start_trial(study.study_id, None, false).unwrap() else {
            panic!("no trial")
        };
        let their_id = i32::try_from(theirs.trial_id).unwrap();
        raw.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES ($1, now())", &[&their_id])
            .unwrap();
        let skew: f64 = raw
            .query_one(
                "SELECT CAST(abs(extract(epoch FROM heartbeat - LOCALTIMESTAMP)) AS float8) \
                 FROM trial_heartbeats WHERE trial_id = $1",
                &[&i32::try_from(ours.trial_id).unwrap()],
            )
            .unwrap()
            .get(0);
        assert!(skew < 30.0, "{zone}: our heartbeat is {skew} s away from the server's clock");
        let failed =
            storage.fail_stale_trials(study.study_id, std::time::Duration::from_secs(60), Some(0)).unwrap();
        assert!(failed.is_empty(), "{zone}: fresh heartbeats judged stale: trials {failed:?}");
        raw.execute(
            "UPDATE trial_heartbeats SET heartbeat = now() - interval '2 minutes' WHERE trial_id = $1",
            &[&their_id],
        )
        .unwrap();
        let failed =
            storage.fail_stale_trials(study.study_id, std::time::Duration::from_secs(60), Some(0)).unwrap();
        assert_eq!(failed, vec![theirs.number], "{zone}: the two-minute-old heartbeat");
    }
}

/// A COMPLETE trial's value and intermediate values.
type CompleteTrial = (Option<f64>, Vec<(i64, f64)>);

/// Faults on PostgreSQL: three workers, each killed (SIGKILL) at a random moment and started
/// again, six kills in all, and the server restarted in the middle of the search. Every COMPLETE
/// trial stays as it was after each fault, the workers say they reconnected and go on, a killed
/// worker's trials are failed and queued again by the others, and the study ends with exactly its
/// 60 finished trials, numbered without gaps.
#[test]
fn killed_workers_and_a_restarted_server_lose_nothing() {
    use std::os::unix::process::ExitStatusExt;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database("faults") else { return };
    let Some(server_dir) = std::env::var_os("HPO_GPU_POSTGRES_DIR") else {
        assert!(std::env::var_os("HPO_GPU_REQUIRE_POSTGRES").is_none(), "HPO_GPU_POSTGRES_DIR is not set");
        eprintln!("SKIPPED: HPO_GPU_POSTGRES_DIR is not set (the server to restart)");
        return;
    };
    const TARGET: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let workload = tiny_workload(dir.path());
    let target = TARGET.to_string();
    let start = |w: usize| {
        let slots = if w == 0 { "3" } else { "1" };
        let retry = ["--grace-period", "3", "--failed-trial-max-retry", "100"];
        search_worker(
            &workload,
            &url,
            "faults",
            "3",
            "32",
            &[&["--n-trials", &target, "--slots", slots][..], &retry].concat(),
        )
    };
    let mut storage = Storage::open(&url).unwrap();
    storage.create_study("faults", StudyDirection::Maximize, false).unwrap();
    let study = storage.load_study("faults").unwrap();
    let complete = |storage: &mut Storage| -> HashMap<u64, CompleteTrial> {
        storage
            .trials(study.study_id, None)
            .unwrap()
            .into_iter()
            .filter(|t| t.state == TrialState::Complete)
            .map(|t| (t.number, (t.value(), t.intermediate_values.into_iter().collect())))
            .collect()
    };
    let mut workers: Vec<_> = (0..3).map(start).collect();
    let mut seen = HashMap::new();
    let mut stderr_all = String::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut killed = 0;
    for fault in 0..7 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(std::time::Duration::from_millis(300 + rng % 900));
        if fault == 2 {
            let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh"))
                .arg("restart")
                .arg(&server_dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "restart: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            let w = (rng % 3) as usize;
            if workers[w].try_wait().unwrap().is_none() {
                workers[w].kill().unwrap();
                killed += 1;
            }
            let out = std::mem::replace(&mut workers[w], start(w)).wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() || out.status.signal() == Some(9), "worker {w}: {stderr}");
            stderr_all.push_str(&stderr);
        }
        let now = complete(&mut storage);
        for (n, before) in &seen {
            assert_eq!(now.get(n), Some(before), "COMPLETE trial {n} changed after fault {fault}");
        }
        seen = now;
    }
    for (w, child) in workers.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "worker {w} failed:\n{stderr}");
        stderr_all.push_str(&stderr);
    }
    assert!(killed >= 4, "only {killed} workers were killed while running");
    assert!(
        stderr_all.contains("lost the connection to PostgreSQL"),
        "no worker saw the restart:\n{stderr_all}"
    );
    assert!(stderr_all.contains("reconnected to PostgreSQL"), "{stderr_all}");
    let trials = storage.trials(study.study_id, None).unwrap();
    let numbers: Vec<u64> = trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..trials.len() as u64).collect::<Vec<_>>(), "unique, gap-free trial numbers");
    let counts = storage.trial_counts(study.study_id).unwrap();
    assert_eq!(counts.finished_ok(), TARGET, "{counts:?}");
    assert_eq!((counts.running, counts.waiting), (0, 0), "{counts:?}");
    for (n, before) in &seen {
        assert_eq!(complete(&mut storage).get(n), Some(before), "COMPLETE trial {n} changed at the end");
    }
    for t in trials.iter().filter(|t| t.state == TrialState::Complete) {
        assert_eq!(t.intermediate_values.len(), 3, "trial {} lost a report", t.number);
    }
}
