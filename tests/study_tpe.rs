//! TPE's pipeline against Optuna 5.0 on one fixed history, everything but the random draws: the
//! intersection search space, the below/above split (complete, pruned, failed and RUNNING
//! trials, constant liar) and the two fitted Parzen estimators' densities.
//! Expected numbers: tests/interop/tpe_reference.py.

use hpo_gpu::distributions::ParamValue;
use hpo_gpu::search::sampler::tpe::TpeOptions;
use hpo_gpu::search::sampler::{StudyView, TpeSampler, intersection_search_space};
use hpo_gpu::search::space::SearchSpace;
use hpo_gpu::study::storage::{NewTrial, StartOutcome, Storage};
use hpo_gpu::trial::{StudyDirection, TrialState};

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
