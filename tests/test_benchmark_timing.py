"""The benchmarks' interleaved timing: every model is called once per round, in a rotating order."""

from benchmarks.common import interleaved_medians


def test_rounds_rotate_the_order_and_cap_slow_models():
    calls: list[str] = []
    models = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    medians = interleaved_medians(models, rounds=3, max_rounds={"c": 1})
    assert calls[:3] == ["a", "b", "c"]  # the warm-up call of each
    assert calls[3:] == ["a", "b", "c", "b", "a", "a", "b"]  # rotated; c sits out after its one round
    assert set(medians) == {"a", "b", "c"} and all(v >= 0 for v in medians.values())
