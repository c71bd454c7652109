"""benchmarks.profile's attribution of profiler events to the parts of a training step."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.profile import category, split_events


def test_an_op_is_attributed_by_its_phase_and_the_innermost_op_that_says_what_it_is():
    assert category(None, ["aten::add"]) == "other"  # outside every phase label: the trainer's loop
    assert category("data", ["aten::cat"]) == "data"
    assert category("forward", ["aten::view", "fbgemm::split_embedding_codegen_lookup_adagrad_function"]) == "emb_fwd"
    assert category("forward", ["aten::mul", "aten::addmm"]) == "linear_fwd"
    assert category("forward", ["aten::pow", "aten::sum"]) == "dense_fwd"
    assert category("backward", ["aten::mm", "autograd::engine::evaluate_function: AddmmBackward0"]) == "linear_bwd"
    assert category("backward", ["c10d::allreduce_", "aten::mm"]) == "comm_bwd"


def test_self_time_goes_to_the_nearest_enclosing_phase_on_the_main_thread():
    def ev(name, us, parent=None, thread=1):
        return SimpleNamespace(name=name, self_cpu_time_total=us, cpu_parent=parent, thread=thread)

    fwd = ev("## forward 3 ##", 5)
    bwd = ev("## backward 3 ##", 1)
    events = [fwd, ev("aten::addmm", 40, fwd), ev("fbgemm::lookup", 10, fwd), bwd,
              ev("autograd::engine::evaluate_function: AddmmBackward0", 70, bwd), ev("aten::add", 2),
              ev("aten::mm", 3, None, thread=2)]  # another thread's (a gloo worker's) time is not rank 0's step
    assert split_events(events) == {"dense_fwd": 5, "linear_fwd": 40, "emb_fwd": 10, "dense_bwd": 1,
                                    "linear_bwd": 70, "other": 2}
