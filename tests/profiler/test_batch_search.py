"""The trial search with a fake launcher: every rule of profiler/batch_search.py, no processes."""

import pytest

from dpplan.profiler.batch_search import MAX_BATCH_SIZE, Trial, judge, next_batch_size, search_batch_size

LIMIT = 1000
PER_SAMPLE = 100  # the fake job's peak: 100 bytes per sample, so batch 10 is the largest under LIMIT


class FakeJobs:
    """Runs 'jobs' whose peak is PER_SAMPLE x batch; batches >= oom_from run out of memory, and
    ``missing`` batches lose a rank's result (a failed run, as profile_one reports it)."""

    def __init__(self, oom_from=None, missing=()):
        self.oom_from, self.missing, self.tried = oom_from, set(missing), []

    def __call__(self, batch):
        self.tried.append(batch)
        if batch in self.missing:
            return judge(batch, "failed", None, LIMIT, error="rank 1 wrote no result (launcher exit 1)")
        if self.oom_from is not None and batch >= self.oom_from:
            return judge(batch, "oom", None, LIMIT, error="out of memory")
        return judge(batch, "ok", PER_SAMPLE * batch, LIMIT, samples_per_s=float(batch))


def exact_prediction(trial):
    """A perfectly calibrated estimate: the peak is linear, so the edge is known from any measurement."""
    return None if trial.peak_bytes is None else LIMIT * trial.batch_size // trial.peak_bytes


def no_prediction(trial):
    return None


def test_an_accurate_first_guess_is_confirmed_in_two_trials():
    jobs = FakeJobs()
    result = search_batch_size(first=10, run_trial=jobs, predict=exact_prediction, max_trials=4)
    assert jobs.tried == [10, 11]  # 10 fits; the calibrated edge is 10, so 11 proves it
    assert (result.batch_size, result.smallest_rejected, result.converged) == (10, 11, True)
    assert [t.status for t in result.trials] == ["ok", "over_limit"]
    assert result.stop_reason == "batch 10 fits and 11 does not"


def test_headroom_rejects_a_run_that_finished_but_peaked_over_the_limit():
    trial = judge(12, "ok", 1200, LIMIT)
    assert trial.status == "over_limit" and not trial.accepted
    assert judge(10, "ok", 1000, LIMIT).accepted  # at the limit is within it
    assert not judge(3, "ok", None, LIMIT).accepted  # nothing measured: not confirmed


def test_too_high_a_guess_bisects_down():
    jobs = FakeJobs(oom_from=13)
    result = search_batch_size(first=16, run_trial=jobs, predict=no_prediction, max_trials=8, known_good=2)
    # 16 oom -> bisect (2, 16) = 9 ok -> (9, 16) = 12 over limit -> (9, 12) = 10 ok -> (10, 12) = 11 over.
    assert jobs.tried == [16, 9, 12, 10, 11]
    assert (result.batch_size, result.smallest_rejected, result.converged) == (10, 11, True)


def test_a_missing_rank_result_is_a_failed_trial():
    jobs = FakeJobs(missing={8})
    result = search_batch_size(first=8, run_trial=jobs, predict=exact_prediction, max_trials=3, known_good=1)
    assert result.trials[0].status == "failed" and not result.trials[0].accepted
    assert "wrote no result" in result.trials[0].error
    assert jobs.tried[1] < 8  # shrinks below the failed batch
    assert result.batch_size is not None and result.batch_size < 8


def test_max_trials_stops_the_search_and_says_so():
    jobs = FakeJobs()
    result = search_batch_size(first=2, run_trial=jobs, predict=no_prediction, max_trials=3)
    # No prediction: grow by 1.25 (at least +1) from each accepted batch.
    assert jobs.tried == [2, 3, 4]
    assert result.batch_size == 4 and not result.converged
    assert result.stop_reason == "stopped after 3 trials (next would be 5)"


def test_nothing_fits():
    jobs = FakeJobs(oom_from=1)
    result = search_batch_size(first=4, run_trial=jobs, predict=no_prediction, max_trials=4)
    assert jobs.tried == [4, 2, 1]
    assert result.batch_size is None and result.converged and result.stop_reason == "batch 1 was rejected"


def test_known_results_of_the_profile_run_are_used_not_repeated():
    jobs = FakeJobs()
    result = search_batch_size(first=10, run_trial=jobs, predict=exact_prediction, max_trials=4, known_good=10)
    assert jobs.tried == [11]  # the profile run at 10 already fits
    assert result.batch_size == 10 and result.converged
    jobs = FakeJobs()
    result = search_batch_size(first=20, run_trial=jobs, predict=exact_prediction, max_trials=4, known_bad=12)
    assert jobs.tried[0] < 12  # a prediction at or above a batch that failed is not tried


def test_the_cap():
    jobs = FakeJobs()
    result = search_batch_size(first=5, run_trial=jobs, predict=lambda t: 10**9, max_trials=4, max_batch_size=6)
    assert jobs.tried == [5, 6]
    assert result.batch_size == 6 and not result.converged and result.stop_reason == "reached the 6 cap"
    assert next_batch_size(None, None, 10**9, max_batch_size=MAX_BATCH_SIZE) == MAX_BATCH_SIZE


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_trials"):
        search_batch_size(first=1, run_trial=FakeJobs(), predict=no_prediction, max_trials=0)
    with pytest.raises(ValueError, match="status must be one of"):
        Trial(batch_size=1, status="fine", peak_bytes=1, limit_bytes=1)
