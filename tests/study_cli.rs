//! `ask`, `tell`, `trials` and `best` as library functions writing to a buffer.

use clap::Parser;
use hpo_gpu::cli::study::{
    AskArgs, BestArgs, DirectionArg, SamplerKind, StudyArgs, StudySelect, TellArgs, TellState, TrialsArgs,
    run_ask, run_best, run_tell, run_trials,
};
use hpo_gpu::study::storage::Storage;
use hpo_gpu::trial::{StudyDirection, TrialState};
use serde_json::Value;

const SPACE: &str = r#"{"x": {"name": "FloatDistribution", "attributes": {"low": 0, "high": 1}},
                        "opt": {"name": "CategoricalDistribution", "attributes": {"choices": ["adam", "sgd"]}}}"#;

fn study_args(url: &str) -> StudyArgs {
    StudyArgs { storage: url.to_string(), study_name: "cli".into() }
}

fn select(url: &str) -> StudySelect {
    StudySelect { storage: url.to_string(), study_name: Some("cli".into()) }
}

fn ask(url: &str, direction: Option<DirectionArg>, n: usize) -> anyhow::Result<Vec<Value>> {
    let args = AskArgs {
        study: study_args(url),
        search_space: SPACE.into(),
        sampler: SamplerKind::Tpe,
        seed: Some(1),
        direction,
        n,
    };
    let mut out = Vec::new();
    run_ask(&args, &mut out)?;
    Ok(String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

fn tell(url: &str, number: u64, values: &[f64], state: Option<TellState>) -> anyhow::Result<String> {
    let args = TellArgs {
        study: study_args(url),
        trial_number: number,
        values: values.to_vec(),
        state,
        skip_if_finished: false,
    };
    let mut out = Vec::new();
    run_tell(&args, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

fn url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("cli.db").display());
    (dir, url)
}

#[test]
fn ask_tell_round_trip() {
    let (_dir, url) = url();
    let err = ask(&url, None, 1).unwrap_err();
    assert!(format!("{err:#}").contains("pass --direction"), "{err:#}");
    let asked = ask(&url, Some(DirectionArg::Minimize), 3).unwrap();
    assert_eq!(asked.len(), 3);
    for (i, a) in asked.iter().enumerate() {
        assert_eq!(a["number"].as_u64(), Some(i as u64));
        let x = a["params"]["x"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&x));
        assert!(["adam", "sgd"].contains(&a["params"]["opt"].as_str().unwrap()));
    }
    // Key order as Optuna prints it: number, then params in the space's order.
    let mut raw = Vec::new();
    let args = AskArgs {
        study: study_args(&url),
        search_space: SPACE.into(),
        sampler: SamplerKind::Random,
        seed: None,
        direction: None,
        n: 1,
    };
    run_ask(&args, &mut raw).unwrap();
    let line = String::from_utf8(raw).unwrap();
    assert!(line.starts_with("{\"number\": 3, \"params\": {\"x\": "), "{line}");
    assert!(line.contains(", \"opt\": \""), "{line}");

    assert_eq!(tell(&url, 0, &[0.25], None).unwrap(), "told trial 0 COMPLETE with value 0.25\n");
    assert!(tell(&url, 1, &[], Some(TellState::Pruned)).unwrap().contains("PRUNED"));
    assert!(tell(&url, 2, &[f64::NAN], None).unwrap().contains("FAIL"));
    assert!(tell(&url, 3, &[], Some(TellState::Fail)).unwrap().contains("FAIL"));

    let errors = [
        (tell(&url, 0, &[0.1], None), "already COMPLETE"),
        (tell(&url, 9, &[0.1], None), "no trial number 9"),
        (tell(&url, 4, &[0.1], None), "no trial number 4"),
    ];
    for (r, want) in errors {
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains(want), "{e}");
    }
    let asked = ask(&url, None, 1).unwrap();
    let n = asked[0]["number"].as_u64().unwrap();
    for (values, state, want) in [
        (&[0.1][..], Some(TellState::Pruned), "must be omitted"),
        (&[][..], None, "--values is required"),
        (&[1.0, 2.0][..], None, "one objective"),
    ] {
        let e = format!("{:#}", tell(&url, n, values, state).unwrap_err());
        assert!(e.contains(want), "{e}");
    }
    let skip = TellArgs {
        study: study_args(&url),
        trial_number: 0,
        values: vec![1.0],
        state: None,
        skip_if_finished: true,
    };
    let mut out = Vec::new();
    run_tell(&skip, &mut out).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("skipped"));

    let mut storage = Storage::open(&url).unwrap();
    let study = storage.load_study("cli").unwrap();
    assert_eq!(study.directions, vec![StudyDirection::Minimize]);
    let trials = storage.trials(study.study_id, None).unwrap();
    assert_eq!(trials[0].value(), Some(0.25));
    assert_eq!(trials[1].state, TrialState::Pruned);
    assert!(trials[2].system_attrs["fail_reason"].as_str().unwrap().contains("NaN"));
}

#[test]
fn trials_and_best_tables_and_json() {
    let (_dir, url) = url();
    ask(&url, Some(DirectionArg::Maximize), 3).unwrap();
    tell(&url, 0, &[0.5], None).unwrap();
    tell(&url, 1, &[0.75], None).unwrap();
    let mut out = Vec::new();
    run_trials(&TrialsArgs { study: select(&url), json: false }, &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("number  state     value     duration_s  x"), "{table}");
    assert!(lines[0].ends_with("opt"));
    assert!(lines[2].starts_with("0       COMPLETE  0.500000"), "{table}");
    assert!(lines[4].starts_with("2       RUNNING"), "{table}");

    let mut out = Vec::new();
    run_trials(&TrialsArgs { study: select(&url), json: true }, &mut out).unwrap();
    let all: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 3);
    assert_eq!(all[1]["value"], 0.75);
    assert_eq!(all[2]["state"], "RUNNING");

    let mut out = Vec::new();
    run_best(&BestArgs { study: select(&url), json: true }, &mut out).unwrap();
    let best: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!((best["number"].as_u64(), best["value"].as_f64()), (Some(1), Some(0.75)));
    let mut out = Vec::new();
    run_best(&BestArgs { study: select(&url), json: false }, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(rows.contains(&vec!["study", "cli", "(MAXIMIZE)"]), "{text}");
    assert!(rows.contains(&vec!["number", "1"]) && rows.contains(&vec!["value", "0.750000"]), "{text}");
    assert!(rows.iter().any(|r| r[0] == "params.opt"), "{text}");

    let err = run_best(
        &BestArgs {
            study: StudySelect { storage: url.clone(), study_name: Some("nope".into()) },
            json: false,
        },
        &mut Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no study named \"nope\"") && err.contains("studies: cli"), "{err}");
}

#[test]
fn bad_flags_give_clear_errors() {
    let (_dir, url) = url();
    let bad_space = AskArgs {
        study: study_args(&url),
        search_space: r#"{"x": {"name": "FloatDistribution", "attributes": {"low": 1, "high": 0}}}"#.into(),
        sampler: SamplerKind::Tpe,
        seed: None,
        direction: Some(DirectionArg::Maximize),
        n: 1,
    };
    let e = format!("{:#}", run_ask(&bad_space, &mut Vec::new()).unwrap_err());
    assert!(e.contains("--search-space: parameter \"x\"") && e.contains("`low <= high`"), "{e}");
    let bad_storage = TrialsArgs {
        study: StudySelect { storage: "mysql://x".into(), study_name: Some("s".into()) },
        json: false,
    };
    let e = run_trials(&bad_storage, &mut Vec::new()).unwrap_err().to_string();
    assert!(e.contains("unsupported database \"mysql\""), "{e}");
}

#[test]
fn search_study_flags_prepare_the_recipe_study() {
    use hpo_gpu::cli::study::{PrunerKind, SearchStudyArgs};
    #[derive(Parser)]
    struct Search {
        #[command(flatten)]
        study: SearchStudyArgs,
    }
    let (_dir, url) = url();
    let args = Search::try_parse_from(["search", "--storage", &url]).unwrap().study;
    assert_eq!(
        (args.study_name.as_str(), args.n_trials, args.pruner),
        ("transformers_optuna_study", 5, PrunerKind::Median)
    );
    let p = args.prepare().unwrap();
    assert_eq!(p.study.directions, vec![StudyDirection::Maximize]);
    assert_eq!(p.space, hpo_gpu::search::space::SearchSpace::recipe_default());
    assert_eq!((p.sampler.name(), p.pruner.name(), p.options.n_trials), ("TPESampler", "MedianPruner", 5));
    // Loading again works (load_if_exists); a different direction does not.
    assert!(args.prepare().is_ok());
    let min = Search::try_parse_from(["search", "--storage", &url, "--direction", "minimize"]).unwrap().study;
    assert!(min.prepare().err().unwrap().to_string().contains("has direction MAXIMIZE"));
    let bad = Search::try_parse_from(["search", "--storage", &url, "--timeout=-3"]).unwrap().study;
    assert!(bad.prepare().err().unwrap().to_string().contains("--timeout"));
    let bad = Search::try_parse_from(["search", "--storage", &url, "--space", "/nonexistent/space.toml"])
        .unwrap()
        .study;
    assert!(bad.prepare().err().unwrap().to_string().contains("/nonexistent/space.toml: cannot read"));
    let bad = Search::try_parse_from([
        "search",
        "--pruner",
        "percentile",
        "--pruner-percentile",
        "150",
        "--storage",
        &url,
    ])
    .unwrap()
    .study;
    assert!(format!("{:#}", bad.prepare().err().unwrap()).contains("between 0 and 100"));
}

/// The Args structs parse as subcommands the way main.rs will mount them.
#[test]
fn args_parse_like_the_cli() {
    #[derive(Parser)]
    enum Cmd {
        Ask(AskArgs),
        Tell(TellArgs),
    }
    let Cmd::Ask(a) = Cmd::try_parse_from([
        "hpo-gpu",
        "ask",
        "--study-name",
        "s",
        "--search-space",
        "{}",
        "--sampler",
        "random",
        "--direction",
        "maximize",
    ])
    .unwrap() else {
        panic!()
    };
    assert_eq!(
        (a.study.storage.as_str(), a.sampler, a.n),
        ("sqlite:///optuna_trials.db", SamplerKind::Random, 1)
    );
    let Cmd::Tell(t) = Cmd::try_parse_from([
        "hpo-gpu",
        "tell",
        "--study-name",
        "s",
        "--trial-number",
        "3",
        "--values",
        "0.5",
        "--state",
        "complete",
    ])
    .unwrap() else {
        panic!()
    };
    assert_eq!((t.trial_number, t.values.as_slice(), t.state), (3, &[0.5][..], Some(TellState::Complete)));
}
