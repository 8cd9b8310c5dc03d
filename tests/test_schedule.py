"""The persistent kernel's static schedule (compiler/schedule.py): dependencies from the
memory launches touch, tasks on P programs, deadlock freedom checked and simulated."""

import pytest
import torch

import meganeura
from configs import SMALL
from meganeura.compiler.schedule import Work, build, check, dependencies, simulate, works_of


@pytest.fixture(scope="module")
def decode_works(tmp_path_factory):
    # the small model's decode step, its caches sized for 40 positions
    model = meganeura.from_config(SMALL, device="cpu", seed=3,
                                  cache_dir=tmp_path_factory.mktemp("k"))
    gen = model.generator
    step = gen.decode_plan(gen.session(40))
    return step, works_of(step)


def _work(name, programs, seconds, reads=(), writes=()):
    return Work(name, programs, seconds, tuple(reads), tuple(writes))


def test_dependencies_follow_the_memory_launches_touch():
    a = _work("a", 4, 1e-6, writes=[(0, 100)])
    b = _work("b", 4, 1e-6, reads=[(0, 50)], writes=[(200, 300)])  # reads a's output
    c = _work("c", 4, 1e-6, reads=[(1000, 1100)], writes=[(400, 500)])  # independent
    d = _work("d", 4, 1e-6, writes=[(40, 60)])  # overwrites what b read (a reused buffer)
    e = _work("e", 4, 1e-6, reads=[(200, 300), (0, 10)], writes=[(600, 700)])
    # e reads b's output and a's (a already implied through b)
    assert dependencies([a, b, c, d, e]) == [(), (0,), (), (1,), (1,)]


@pytest.mark.parametrize("programs", [1, 3, 132])
def test_the_decode_steps_schedule_is_deadlock_free(decode_works, programs):
    step, works = decode_works
    assert len(works) >= len(step.launches) > 10  # a chained kernel is a launch of its own
    s = build(works, programs)
    check(s)
    assert all(simulate(s, seed) for seed in range(20))
    # every launch's programs run once, in at most `programs` tasks
    for j, w in enumerate(works):
        mine = [t for t in s.tasks if t.launch == j]
        assert sum(t.count for t in mine) == w.programs and len(mine) <= programs
    # one program runs the launches' estimated time back to back; more never take longer
    assert s.makespan <= s.serial * (1 + 1e-9)
    if programs == 1:
        assert s.makespan == pytest.approx(s.serial)


def test_a_decode_launch_waits_for_the_launch_that_wrote_its_input(decode_works):
    step, works = decode_works
    g = step.plan.graph
    deps = dependencies(works)
    names = [w.name for w in works]
    # each product of the step waits (directly or through another) for an earlier launch,
    # and the first launch (the embedding's) for none
    assert deps[0] == () and all(deps[j] for j in range(1, len(works)))
    # the logits' product is last and waits for the launch before it (the final norm's
    # rows or the last layer's residual)
    assert names[-1] == g.label(step.launches[-1].node) and deps[-1]


def test_independent_launches_overlap_on_several_programs():
    works = [_work("a", 8, 8e-6, writes=[(0, 100)]), _work("b", 8, 8e-6, writes=[(200, 300)])]
    assert build(works, 1).makespan == pytest.approx(16e-6)
    assert build(works, 16).makespan == pytest.approx(1e-6)  # each program one of 16 tasks
    chained = [works[0], _work("b", 8, 8e-6, reads=[(0, 100)], writes=[(200, 300)])]
    assert build(chained, 16).makespan == pytest.approx(2e-6)  # b starts when a ends


def test_a_schedule_that_breaks_the_order_deadlocks_and_is_refused():
    works = [_work("a", 2, 1e-6, writes=[(0, 100)]),
             _work("b", 2, 1e-6, reads=[(0, 100)], writes=[(200, 300)])]
    s = build(works, 2)
    check(s)
    # each program runs b's task first: each waits on a task the other has not reached
    s.lists = [[s.lists[0][1], s.lists[0][0]], [s.lists[1][1], s.lists[1][0]]]
    with pytest.raises(ValueError, match="out of their global order"):
        check(s)
    assert not simulate(s)
    with pytest.raises(ValueError, match=">= 1"):
        build(works, 0)


def test_the_scratch_buffers_are_the_runs(decode_works):
    step, _ = decode_works
    # the schedule reads the same scratch buffers the launches were given
    keys = {x for launch in step.launches for spec in launch.spec.chain()
            for kind, x in spec.args if kind == "scratch"}
    for key in keys:
        assert step.scratch(*key) is step.scratch(*key)
        assert isinstance(step.scratch(*key), torch.Tensor)
