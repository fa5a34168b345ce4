//! Our learning-rate schedules against the rates transformers' Trainer uses, step by step
//! (`tests/fixtures/schedules.json`, made by `scripts/hf/make_schedule_fixture.py`).

use peft_train::{LrSchedule, SchedulerKind, Warmup};
use serde_json::Value;

#[test]
fn every_scheduler_follows_transformers() {
    let text = include_str!("fixtures/schedules.json");
    let fixture: Value = serde_json::from_str(text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 19);
    for case in cases {
        let kind: SchedulerKind = serde_json::from_value(case["scheduler"].clone()).unwrap();
        let warmup = Warmup::from_warmup_steps(case["warmup_steps"].as_f64().unwrap()).unwrap();
        let total = case["total_steps"].as_u64().unwrap() as usize;
        let lr = case["lr"].as_f64().unwrap();
        let kwargs = case["kwargs"].as_object().unwrap();
        let schedule = LrSchedule::new(kind, lr, warmup, total, kwargs).unwrap();
        let expected = case["rates"].as_array().unwrap();
        assert_eq!(expected.len(), total);
        for (step, want) in expected.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr(step);
            assert!(
                (got - want).abs() <= 1e-12 * lr,
                "{kind:?} {kwargs:?}, warmup {warmup:?}: step {step} has lr {got}, transformers {want}"
            );
        }
    }
}
