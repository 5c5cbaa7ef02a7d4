from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from sweeps.trainables import GroupedASHA

ASHA = dict(time_attr="training_iteration", metric="test_acc", mode="max", max_t=9, grace_period=1,
            reduction_factor=3)


def trial(i, layers):
    return SimpleNamespace(trial_id=f"t{i}", config={"layers": layers})


def run(scheduler, trials, accs):
    """Report one rung-1 result per trial, in order; return the decisions."""
    decisions = {}
    for t in trials:
        scheduler.on_trial_add(None, t)
    for t, acc in zip(trials, accs):
        decisions[t.trial_id] = scheduler.on_trial_result(None, t, {"training_iteration": 1, "test_acc": acc})
    return decisions


def test_deep_trials_are_not_judged_against_shallow_ones():
    shallow = [trial(i, 2) for i in range(3)]
    deep = [trial(3, 20)]
    accs = [80.0, 85.0, 90.0, 40.0]  # the deep net starts slowly
    plain = run(AsyncHyperBandScheduler(**ASHA), shallow + deep, accs)
    grouped = run(GroupedASHA(**ASHA), shallow + deep, accs)
    assert plain["t3"] == TrialScheduler.STOP  # one shared bracket stops the slow starter
    assert grouped["t3"] == TrialScheduler.CONTINUE  # alone in its depth: kept


def test_grouped_asha_still_prunes_within_a_depth():
    trials = [trial(i, 20) for i in range(4)]
    decisions = run(GroupedASHA(**ASHA), trials, [80.0, 85.0, 90.0, 40.0])
    assert decisions["t3"] == TrialScheduler.STOP


def test_diverged_results_stop_the_trial():
    s = GroupedASHA(**ASHA)
    t = trial(0, 5)
    s.on_trial_add(None, t)
    assert s.on_trial_result(None, t, {"training_iteration": 1, "test_acc": 0.0, "diverged": True}) == \
        TrialScheduler.STOP
