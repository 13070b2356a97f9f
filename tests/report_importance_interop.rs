//! Parameter importances against Optuna 5.0 on the same SQLite file: a study whose value depends
//! strongly on learning_rate, weakly on the batch size and not at all on warmup_steps.
//!
//! PED-ANOVA is deterministic, so ours must equal Optuna's value for value. fANOVA fits a random
//! forest, so the ranking must agree and each importance must lie near the range Optuna gives over
//! three forest seeds. Python comes from `$HPO_GPU_PYTHON` or `<repo>/.venv/bin/python`; without
//! it (or optuna) the comparison prints SKIP; without scikit-learn only fANOVA is skipped. The
//! rankings themselves are always checked.

mod fake_trainer;
mod report_common;

use hpo_gpu::report::StudySnapshot;
use hpo_gpu::report::importance::{
    Evaluator, FanovaOptions, ParamImportance, PedAnovaOptions, param_importances,
};
use hpo_gpu::study::storage::Storage;
use report_common::{python, run_python, temp_db, write_importance_study};
use serde_json::Value;

const EXPECTED_ORDER: [&str; 3] = ["learning_rate", "per_device_train_batch_size", "warmup_steps"];

fn order(v: &[ParamImportance]) -> Vec<&str> {
    v.iter().map(|p| p.param.as_str()).collect()
}

fn get(v: &[ParamImportance], name: &str) -> f64 {
    v.iter().find(|p| p.param == name).map(|p| p.importance).unwrap_or(f64::NAN)
}

#[test]
fn importances_rank_like_optuna() {
    let (dir, url) = temp_db();
    let mut storage = Storage::open(&url).unwrap();
    write_importance_study(&mut storage, "importance", 200, 7);
    drop(storage);
    let snapshot = StudySnapshot::load(&url, "importance").unwrap();
    assert_eq!(snapshot.trials.len(), 200);

    let ped = param_importances(
        &snapshot.trials,
        snapshot.direction,
        &Evaluator::PedAnova(PedAnovaOptions::default()),
    )
    .unwrap();
    let fanova = param_importances(
        &snapshot.trials,
        snapshot.direction,
        &Evaluator::Fanova(FanovaOptions { seed: 3, ..FanovaOptions::default() }),
    )
    .unwrap();
    eprintln!("ours: PED-ANOVA {ped:?}\nours: fANOVA {fanova:?}");
    assert_eq!(order(&ped), EXPECTED_ORDER);
    assert_eq!(order(&fanova), EXPECTED_ORDER);
    for imps in [&ped, &fanova] {
        assert!((imps.iter().map(|p| p.importance).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(get(imps, "learning_rate") > 0.6, "{imps:?}");
        assert!(get(imps, "warmup_steps") < 0.06, "{imps:?}");
    }

    let Some(py) = python() else { return };
    let db = dir.path().join("study.db");
    let out = run_python(&py, "importance_reference.py", &[db.to_str().unwrap(), "importance"]);
    let theirs: Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("Optuna: {theirs}");

    let their_ped = theirs["ped_anova"].as_object().unwrap();
    assert_eq!(their_ped.keys().map(String::as_str).collect::<Vec<_>>().len(), 3);
    for p in &ped {
        let want = their_ped[&p.param].as_f64().unwrap();
        assert!(
            (p.importance - want).abs() < 1e-9,
            "PED-ANOVA {}: ours {} Optuna {want}",
            p.param,
            p.importance
        );
    }

    match theirs["fanova"].as_array() {
        None => eprintln!("SKIP fANOVA comparison: {}", theirs["fanova_skip"]),
        Some(seeds) => {
            for run in seeds {
                let run = run.as_object().unwrap();
                let mut names: Vec<(&String, f64)> =
                    run.iter().map(|(k, v)| (k, v.as_f64().unwrap())).collect();
                names.sort_by(|a, b| b.1.total_cmp(&a.1));
                assert_eq!(
                    names.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
                    EXPECTED_ORDER,
                    "Optuna: {run:?}"
                );
            }
            // Ours within the spread of Optuna's forests, widened by 0.05 for our forest's noise.
            for name in EXPECTED_ORDER {
                let theirs: Vec<f64> = seeds.iter().map(|r| r[name].as_f64().unwrap()).collect();
                let lo = theirs.iter().copied().fold(f64::INFINITY, f64::min) - 0.05;
                let hi = theirs.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.05;
                let ours = get(&fanova, name);
                assert!((lo..=hi).contains(&ours), "fANOVA {name}: ours {ours}, Optuna {theirs:?}");
            }
        }
    }
}
