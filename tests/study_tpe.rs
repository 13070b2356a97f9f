//! TPE's pipeline against Optuna 5.0 on one fixed history, everything but the random draws: the
//! intersection search space, the below/above split (complete, pruned, failed and RUNNING
//! trials, constant liar) and the two fitted Parzen estimators' densities.
//! Expected numbers: tests/interop/tpe_reference.py.

mod common_study;
mod fake_trainer;

use hpo_gpu::distributions::ParamValue;
use hpo_gpu::search::sampler::parzen::ParzenEstimator;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::sampler::{StudyView, TpeSampler, intersection_search_space};
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::storage::{NewTrial, StartOutcome, Storage};
use hpo_gpu::trial::{StudyDirection, TrialState};
use rand::SeedableRng;

fn frac(x: f64) -> f64 {
    x - x.floor()
}

fn params(i: u64) -> [ParamValue; 3] {
    [
        ParamValue::Float(10f64.powf(-6.0 + 2.0 * frac(0.618034 * i as f64))),
        ParamValue::Int([16, 32, 64, 128][(i % 4) as usize]),
        ParamValue::Float(0.3 * frac(0.414214 * i as f64)),
    ]
}

fn v(i: u64) -> f64 {
    let [lr, bs, wd] = params(i).map(|p| p.as_f64().unwrap());
    0.5 + 0.45
        * (1.0
            - ((lr.log10() + 4.5).powi(2) + (bs.log2() - 5.0).powi(2) / 4.0 + (wd - 0.1).powi(2) * 25.0)
                / 3.0)
            .max(0.0)
}

#[test]
fn split_and_estimators_match_optuna() {
    let space = SearchSpace::recipe_default();
    let mut storage = Storage::open("sqlite:///:memory:").unwrap();
    let study = storage.create_study("tpe", StudyDirection::Maximize, false).unwrap();
    for i in 0..34u64 {
        let state = if i == 32 || i == 33 {
            TrialState::Running
        } else if i % 7 == 3 {
            TrialState::Pruned
        } else if i % 11 == 5 {
            TrialState::Fail
        } else {
            TrialState::Complete
        };
        let mut t = NewTrial::new(state);
        for ((name, dist), value) in space.iter().zip(params(i)) {
            t.params.push((name.to_string(), dist.to_internal(&value).unwrap(), dist.clone()));
        }
        match state {
            TrialState::Pruned => {
                t.values = Some(vec![0.8 * v(i)]);
                t.intermediate_values = vec![(1, 0.5 * v(i)), (2, 0.8 * v(i))];
            }
            TrialState::Complete => t.values = Some(vec![v(i)]),
            _ => {}
        }
        storage.create_trial(study.study_id, &t).unwrap();
    }
    let StartOutcome::Started(current) = storage.start_trial(study.study_id, None, false).unwrap() else {
        panic!()
    };
    let trials = storage.trials(study.study_id, None).unwrap();
    let rel = intersection_search_space(&trials);
    let names: Vec<&str> = rel.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["learning_rate", "per_device_train_batch_size", "weight_decay"]);

    let sampler = TpeSampler::new(TpeOptions::default());
    let view = StudyView { study_name: "tpe", direction: StudyDirection::Maximize, trials: &trials };
    let fit = sampler.fit(&view, &current, &rel).unwrap();
    assert_eq!(fit.below, vec![1, 6, 29]);
    assert_eq!(
        fit.above,
        vec![
            0, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 28, 30, 31,
            32, 33
        ]
    );
    let points = vec![vec![1e-6, 3e-5, 7e-5, 1e-4], vec![0.0, 1.0, 2.0, 3.0], vec![0.0, 0.1, 0.2, 0.3]];
    let want_l = [-3.255274274831733, -0.3811303611282957, -1.2684749824487616, -3.0196961830500406];
    let want_g = [-0.9566597149839203, -4.263215715368057, -3.450362086415411, -5.191680468503316];
    for (got, want, what) in
        [(fit.l.log_pdf(&points), want_l, "log l"), (fit.g.log_pdf(&points), want_g, "log g")]
    {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-11 * w.abs(), "{what}: {g} vs Optuna {w}");
        }
    }
}

/// Issue 15: the split and both estimators' densities on a mixed space (log float, int, 4-way
/// categorical, stepped float), a log-scaled one (log floats, a log int, a stepped int) and one of
/// log floats over 4 decades each, on
/// histories and points that tests/interop/tpe_spaces.py draws and evaluates with Optuna.
#[test]
fn estimators_match_optuna_on_mixed_and_log_scaled_spaces() {
    use hpo_gpu::distributions::Distribution;
    let Some(python) = common_study::python() else { return };
    let out = common_study::run_python(&python, "tpe_spaces.py", &[]);
    let cases: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 3);
    let mut compared = 0;
    for (case, c) in cases {
        let space: Vec<(String, Distribution)> = c["distributions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (d[0].as_str().unwrap().to_string(), Distribution::from_json(d[1].as_str().unwrap()).unwrap())
            })
            .collect();
        let mut storage = Storage::open("sqlite:///:memory:").unwrap();
        let study = storage.create_study(case, StudyDirection::Minimize, false).unwrap();
        for t in c["trials"].as_array().unwrap() {
            let state = match t["state"].as_str().unwrap() {
                "COMPLETE" => TrialState::Complete,
                "PRUNED" => TrialState::Pruned,
                "RUNNING" => TrialState::Running,
                "FAIL" => TrialState::Fail,
                s => panic!("state {s}"),
            };
            let mut new = NewTrial::new(state);
            for (name, dist) in &space {
                let value = ParamValue::from_json_value(&t["params"][name]).unwrap();
                new.params.push((name.clone(), dist.to_internal(&value).unwrap(), dist.clone()));
            }
            new.values = t["value"].as_f64().map(|v| vec![v]);
            new.intermediate_values = t["intermediate_values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|kv| (kv[0].as_i64().unwrap(), kv[1].as_f64().unwrap()))
                .collect();
            storage.create_trial(study.study_id, &new).unwrap();
        }
        let StartOutcome::Started(current) = storage.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        let trials = storage.trials(study.study_id, None).unwrap();
        let rel: Vec<_> =
            intersection_search_space(&trials).into_iter().filter(|(_, d)| !d.single()).collect();
        let names: Vec<&str> = rel.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<&str> =
            c["relative_space"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(names, want, "{case}: the relative search space, in Optuna's order");

        let sampler = TpeSampler::new(TpeOptions::default());
        let view = StudyView { study_name: case, direction: StudyDirection::Minimize, trials: &trials };
        let fit = sampler.fit(&view, &current, &rel).unwrap();
        let numbers = |key: &str| -> Vec<u64> {
            c[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
        };
        assert_eq!(fit.below, numbers("below"), "{case}: below");
        assert_eq!(fit.above, numbers("above"), "{case}: above");
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        };
        let close = |got: &[f64], want: &[f64], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                // 1e-6: Optuna's and our log Gaussian mass differ in the last digits far in the
                // tails (log densities below -15), which no proposal can notice.
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{case} {what}[{i}]: {g} vs Optuna {w}");
            }
        };
        let points: Vec<Vec<f64>> = rel.iter().map(|(name, _)| floats(&c["points"][name])).collect();
        let internal = |numbers: &[u64], name: &str| -> Vec<f64> {
            numbers.iter().map(|&n| trials[n as usize].param(name).unwrap().internal).collect()
        };
        // numpy's argsort (SIMD, unstable) decides which of two tied observations gets the wider
        // kernel; we break ties by trial number. That changes a density where kernels differ in
        // more than their bandwidth: in a product of kernels (jointly), and alone once the
        // weights ramp (25 observations or more). Those cases are left out, and said so.
        let tied = |xs: &[f64], d: &Distribution| {
            let mut xs = xs.to_vec();
            xs.sort_by(f64::total_cmp);
            !matches!(d, Distribution::Categorical(_)) && xs.windows(2).any(|w| w[0] == w[1])
        };
        let options = TpeOptions::default();
        for (j, (name, dist)) in rel.iter().enumerate() {
            let one = [(name.clone(), dist.clone())];
            for (set, key) in [(&fit.below, "log_l"), (&fit.above, "log_g")] {
                let xs = internal(set, name);
                if xs.len() >= 25 && tied(&xs, dist) {
                    eprintln!(
                        "{case} {key} of {name} alone: tied observations under ramped weights, not compared"
                    );
                    continue;
                }
                compared += 1;
                let estimator = ParzenEstimator::new(&[xs], &one, &options.parzen, None).unwrap();
                let want = floats(&c["marginals"][name][key]);
                close(&estimator.log_pdf(&[points[j].clone()]), &want, &format!("{key} of {name} alone"));
            }
        }
        // Candidates: 20,000 draws from each estimator fall below Optuna's quantiles as often as
        // Optuna's own draws do (within 5 standard errors; a discrete atom counts on either side).
        let probs = floats(&c["sample_probs"]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (estimator, key) in [(&fit.l, "l"), (&fit.g, "g")] {
            let draws = estimator.sample(&mut rng, 20_000);
            for (j, (name, _)) in rel.iter().enumerate() {
                let quantiles = floats(&c["sample_quantiles"][key][name]);
                for (&p, &q) in probs.iter().zip(&quantiles) {
                    let n = draws[j].len() as f64;
                    let below = draws[j].iter().filter(|&&x| x < q).count() as f64 / n;
                    let at_or_below = draws[j].iter().filter(|&&x| x <= q).count() as f64 / n;
                    let tol = 5.0 * (p * (1.0 - p) / n).sqrt();
                    assert!(
                        below - tol <= p && p <= at_or_below + tol,
                        "{case} {key}: {name}'s candidates: {below:.4}..{at_or_below:.4} fall below Optuna's {p} quantile {q}"
                    );
                }
            }
            compared += 1;
        }
        for (set, estimator, key) in [(&fit.below, &fit.l, "log_l"), (&fit.above, &fit.g, "log_g")] {
            if rel.iter().any(|(name, d)| tied(&internal(set, name), d)) {
                eprintln!("{case} {key}: tied observations, joint density not compared");
                continue;
            }
            compared += 1;
            close(&estimator.log_pdf(&points), &floats(&c[key]), key);
        }
    }
    assert!(compared >= 28, "only {compared} comparisons made");
}
