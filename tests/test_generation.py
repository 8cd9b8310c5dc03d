"""Generation: prefill and decode plans over KV caches, for both model families, through the
interpreter. Greedy tokens equal transformers' generate (the published model) or a plain
step-by-step loop of full reference forwards (the seed's); every decode step's logits equal
a full forward over the same prefix."""

import json

import pytest
import torch

import hf_checkpoints as hf
import meganeura
from configs import CONFIGS
from meganeura.errors import InputError
from meganeura.models import build
from meganeura.models.kv import Generation
from meganeura.runtime.reference import run_reference
from numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def _prompt(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _generate_with_logits(model, prompt, n, **kw):
    steps = []
    out = model.generator.generate(prompt, n, meganeura.inference.generation.SamplingParams(**kw),
                                   stop=[], on_logits=lambda x: steps.append(x.clone()))
    return out, steps


@pytest.mark.parametrize("name", ["every_feature", "dense", "moe"])
def test_published_greedy_equals_transformers(name, tmp_path, kernels):
    model = hf.text_model(name, seed=11)
    hf.save(model, tmp_path)
    ours = meganeura.from_pretrained(tmp_path, device="cpu", cache_dir=kernels)
    vocab = hf.CONFIGS[name]["vocab_size"]
    prompt = _prompt(vocab, 8, 2)  # longer than both sliding windows (5, 4)
    out, steps = _generate_with_logits(ours, prompt, 3)
    with torch.no_grad():
        ref = model.generate(prompt[None], max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0]
    assert out.tolist() == ref.tolist()
    # each step's logits: a full forward over the same prefix (transformers'), last row
    full = hf.logits(model, out[:-1])
    for k, logits in enumerate(steps):
        assert_close(logits, full[prompt.numel() - 1 + k], "fp32")


def test_seed_greedy_equals_a_step_by_step_reference_loop(kernels):
    c = CONFIGS["gqa2"]  # window 5, GQA 4/2, a sliding and a global layer
    ours = meganeura.from_config(c, device="cpu", seed=7, cache_dir=kernels)
    prompt = _prompt(c.vocab_size, 7, 3)
    out, steps = _generate_with_logits(ours, prompt, 5)
    ids = prompt.clone()
    for k in range(5):  # the plain loop: a full reference forward per token
        (logits,) = run_reference(build(c, ids.numel()), ours.weights, {"token_ids": ids})
        assert_close(steps[k], logits[-1], "fp32")
        ids = torch.cat([ids, logits[-1].argmax().reshape(1)])
    assert out.tolist() == ids.tolist()


def test_sampling_repeats_for_a_seed_and_respects_top_k(kernels):
    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=1, cache_dir=kernels)
    prompt = _prompt(c.vocab_size, 4, 5)
    kw = dict(max_new_tokens=3, temperature=1.3, top_k=7, top_p=0.9)
    a = ours.generate(prompt, seed=123, **kw)
    b = ours.generate(prompt, seed=123, **kw)
    c_ = ours.generate(prompt, seed=124, **kw)
    assert a.tolist() == b.tolist() and a[:4].tolist() == prompt.tolist() and len(a) == 7
    assert a.tolist() != c_.tolist()  # another seed, other draws
    seen = []
    out = ours.generate(prompt, max_new_tokens=2, seed=9, temperature=5.0, top_k=1,
                        on_token=seen.append)
    greedy = ours.generate(prompt, max_new_tokens=2)
    assert out.tolist() == greedy.tolist() and seen == out[4:].tolist()  # top_k 1 is greedy


def test_first_token_and_decode_times_count_what_they_name(kernels, monkeypatch):
    # a clock that advances one unit per reading: each id's time is when it reached the host
    # (on the CPU, when its step ran), so n new tokens take n - 1 decode steps after the
    # first; the first token comes one reading (the prefill's id) after the plans are ready
    import meganeura.inference.generation as generation

    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=1, cache_dir=kernels)
    ticks = iter(range(10 ** 6))  # (the plans are built in the call: timed apart)

    class Clock:
        @staticmethod
        def perf_counter():
            return float(next(ticks))

    monkeypatch.setattr(generation, "time", Clock)
    ours.generate(_prompt(c.vocab_size, 4, 5), max_new_tokens=3)
    st = ours.generator.last_stats
    assert (st["new_tokens"], st["time_to_first_token_s"], st["decode_s"]) == (3, 1.0, 2.0)


def test_stop_ids_end_generation(kernels):
    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=1, cache_dir=kernels)
    prompt = _prompt(c.vocab_size, 4, 5)
    greedy = ours.generate(prompt, max_new_tokens=4)
    third = int(greedy[6])
    first_at = greedy[4:].tolist().index(third)
    stopped = ours.generate(prompt, max_new_tokens=4, stop=[third])
    assert stopped.tolist() == greedy[:4 + first_at + 1].tolist()


@pytest.mark.parametrize("kw, message", [
    (dict(token_ids=torch.tensor([], dtype=torch.long)), "non-empty 1-D"),
    (dict(token_ids=torch.tensor([1, 99])), r"token id 99 is outside the vocabulary \[0, 64\)"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(temperature=-0.5), "temperature must be a number >= 0"),
    (dict(top_k=0), r"top_k must be an integer in \[1, 64\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(stop=["x"]), "stop ids must be integers"),
    (dict(seed=-1), "seed must be an integer"),
])
def test_bad_requests_fail_before_anything_is_allocated(kw, message):
    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=1)
    args = dict(token_ids=torch.tensor([1, 2, 3]), max_new_tokens=2) | kw
    with pytest.raises(InputError, match=message):
        ours.generate(args.pop("token_ids"), **args)
    assert ours.generator.sessions == []


def test_capacity_beyond_the_model_is_refused(tmp_path):
    model = hf.text_model("dense", seed=1)
    model.config.max_position_embeddings = 40
    hf.save(model, tmp_path)
    ours = meganeura.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(InputError, match="need 41 positions, the model has 40"):
        ours.generate(torch.tensor([1, 2, 3]), max_new_tokens=38)
    assert ours.generator.sessions == []


def test_prefill_and_decode_are_planned_apart(tmp_path):
    from meganeura.compiler.cost import H200, CostModel
    from meganeura.models.gemma4_text import from_dict
    from meganeura.pipeline import optimize_graph as optimize

    c = from_dict(hf.CONFIGS["every_feature"])
    prefill, prep = optimize(build(c, 300, Generation(512, False)), CostModel(H200, "bf16"))
    decode, drep = optimize(build(c, 1, Generation(512, True)), CostModel(H200, "bf16"))
    # the prefill keeps its last row only, and the e-graph moved the slice before the norm
    assert prep.rules_fired()["row slice before rms_norm"] >= 1
    final = prefill.graph[prefill.graph.outputs[0]]
    assert final.shape == (1, c.vocab_size)
    assert any(n.op == "slice_rows" for n in prefill.graph.nodes)
    # both write the caches; the decode step attends over them, its k and v rows normalized
    # straight into their slots (the cache is their only reader)
    counts, pcounts = decode.kernel_counts(), prefill.kernel_counts()
    assert counts["rows[head_rms_norm, rope, cache_write]"] == 4
    assert counts["rows[unit_rms_norm, cache_write]"] == 4
    assert "cache_write" not in counts and "unit_rms_norm" not in counts
    # the prefill's attention reads the rotated k rows anyway: their cache write stays a copy
    assert pcounts["cache_write"] == 4 and "rows[head_rms_norm, rope, cache_write]" not in pcounts
    assert counts["cache_attention"] == 7
    # the post-norms (+ residual, + layer scalar) could end the products that feed them; on
    # the H200 that costs more than the row kernels (measured), where launches are dear (the
    # interpreter) it pays: the extractor decides by the profile. A forward's tiled products
    # never take it.
    assert counts["rows[rms_norm, add]"] == 2 * 7 and "product[rms_norm, add]" not in counts
    from meganeura.compiler.cost import CPU_INTERPRETER
    cpu, _ = optimize(build(c, 1, Generation(512, True)), CostModel(CPU_INTERPRETER, "fp32"))
    ccounts = cpu.kernel_counts()
    assert ccounts["product[rms_norm, add]"] == 2 * 7
    assert ccounts["product[rms_norm, add, scale_by]"] == 7
    assert "rows[rms_norm, add]" not in ccounts and "rows[rms_norm, add, scale_by]" not in ccounts
    assert pcounts["rows[rms_norm, add]"] == 2 * 7 and "product[rms_norm, add]" not in pcounts
    assert pcounts != counts


def test_cli_generate_streams_text_and_reports(tmp_path):
    from test_cli import cli

    model = hf.text_model("dense", seed=5)
    hf.save(model, tmp_path)
    hf.save_tokenizer(tmp_path, hf.CONFIGS["dense"]["vocab_size"])
    prompt = "w5 w9 w13 w40 w2 w17 w8"
    rc, out, err = cli("generate", "--weights", str(tmp_path), "--prompt", prompt,
                       "--max-new-tokens", "4", "--stop", "0")
    assert rc == 0, err
    ids = torch.tensor([int(w[1:]) for w in prompt.split()])
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=4, do_sample=False, eos_token_id=0,
                             pad_token_id=0)[0, ids.numel():].tolist()
    text = " ".join(f"w{t}" for t in ref)
    lines = out.splitlines()
    assert text in lines, out  # the greedy continuation, streamed as text
    last = lines[-1]
    assert last.startswith("prompt 7 tokens, 4 new tokens") and "time to first token" in last
    assert last.endswith("tokens/s")


def test_cli_generates_after_several_prompts_together(tmp_path):
    from test_cli import cli

    model = hf.text_model("dense", seed=5)
    hf.save(model, tmp_path)
    hf.save_tokenizer(tmp_path, hf.CONFIGS["dense"]["vocab_size"])
    prompts = ["w5 w9 w13", "w40 w2", "w17 w8 w1 w30 w22"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompts[1]}) + "\n\n" +
                                      json.dumps({"text": prompts[2]}) + "\n")
    rc, out, err = cli("generate", "--weights", str(tmp_path), "--prompt", prompts[0],
                       "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "3",
                       "--stop", "0")
    assert rc == 0, err
    for i, p in enumerate(prompts):  # each prompt's greedy continuation, as transformers'
        ids = torch.tensor([int(w[1:]) for w in p.split()])
        with torch.no_grad():
            ref = model.generate(ids[None], max_new_tokens=3, do_sample=False, eos_token_id=0,
                                 pad_token_id=0)[0, ids.numel():].tolist()
        assert f"[{i}] " + " ".join(f"w{t}" for t in ref) in out.splitlines(), out
    assert "over 3 sequences" in out.splitlines()[-1]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    rc, out, err = cli("generate", "--weights", str(tmp_path), "--prompts-file",
                       str(tmp_path / "bad.jsonl"))
    assert rc == 2 and "bad.jsonl:1: a JSON object with a \"prompt\" or \"text\" string" in err
    rc, out, err = cli("generate", "--weights", str(tmp_path), "--prompt", "w1", "--tokens", "1")
    assert rc == 2 and "give the prompt as --prompt / --prompts-file, or as --tokens" in err


@pytest.mark.parametrize("args, message", [
    (("--model", "gemma4-small-test", "--prompt", "hi"), "--prompt needs a tokenizer"),
    (("--model", "gemma4-small-test", "--tokens", "1,64"), r"token id 64 is outside"),
    (("--model", "gemma4-small-test", "--tokens", ","), "the prompt is empty"),
    (("--model", "gemma4-small-test", "--tokens", "1", "--temperature", "-1"),
     "--temperature: expected a number in"),
    (("--model", "gemma4-e4b", "--tokens", "1", "--max-new-tokens", "131072"),
     "need 131073 positions, the model has 131072"),
    (("--model", "gemma4-small-test", "--tokens", "1", "--seed", str(2 ** 64)), "--seed"),
])
def test_cli_generate_refuses_bad_requests_before_loading(args, message):
    from test_cli import cli

    rc, out, err = cli("generate", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1, (rc, err)
    assert "weights" not in out  # nothing was loaded
    import re
    assert re.search(message, err), err


def _greedy_loop(c, weights, prompt, n):
    """Greedy ids after prompt by a plain loop of full reference forwards."""
    ids = prompt.clone()
    for _ in range(n):
        (logits,) = run_reference(build(c, ids.numel()), weights, {"token_ids": ids})
        ids = torch.cat([ids, logits[-1].argmax().reshape(1)])
    return ids


def test_prompts_of_any_length_are_prefilled_in_chunks_of_a_few_plans(kernels):
    # chunks of 4 and 8 rows over a window of 5 (its ring: 5 + 8 - 1 slots) and a global
    # layer; the prompts run one to several chunks, the last one padded; every prefill's
    # logits and every step's equal full reference forwards, and a few plans serve them all
    c = CONFIGS["gqa2"]
    ours = meganeura.from_config(c, device="cpu", seed=7, cache_dir=kernels)
    ours.generator.chunks = (4, 8)
    for n in (1, 7, 13, 21):
        prompt = _prompt(c.vocab_size, n, n)
        out, steps = _generate_with_logits(ours, prompt, 2)
        assert out.tolist() == _greedy_loop(c, ours.weights, prompt, 2).tolist()
        (full,) = run_reference(build(c, out.numel() - 1), ours.weights,
                                {"token_ids": out[:-1]})
        for k, logits in enumerate(steps):
            assert_close(logits, full[n - 1 + k], "fp32")
    s = ours.generator.last_session
    assert sorted(s.plans) == [("chunk", 4), ("chunk", 8), ("step",)]
    assert ours.generator.schedule(s, 21) == [(0, 8), (8, 8), (16, 8)]


def test_the_plan_count_stays_bounded_across_prompt_lengths(kernels):
    from meganeura.models import Gemma4Config

    c = Gemma4Config(64, 32, 1, 2, 2, 64, head_dim=16, sliding_window_size=8)  # one layer
    ours = meganeura.from_config(c, device="cpu", seed=1, cache_dir=kernels)
    ours.generator.chunks = (16, 32)  # (a chunk or two a prompt: the interpreter is slow)
    bound = ours.generator.max_sessions * (len(ours.generator.chunks) + 1)
    counts = []
    for n in range(1, 31):  # 30 lengths, each new
        ours.generate(_prompt(c.vocab_size, n, n), max_new_tokens=1)
        counts.append(ours.generator.plan_count())
    assert max(counts) <= bound and counts[-1] <= 3  # (at most the chunk sizes and the step)
    # made as a length first needs them, then only reused
    assert counts == sorted(counts) and counts[20:] == [counts[-1]] * 10


def test_several_prompts_decode_together_as_each_alone(kernels):
    # greedy: each prompt's ids equal its own generation; sampled: prompt i of a batch
    # draws as it does alone with seed + i; a stop ends one sequence, the others go on
    c = CONFIGS["gqa2"]
    ours = meganeura.from_config(c, device="cpu", seed=7, cache_dir=kernels)
    ours.generator.chunks = (4, 8)
    prompts = [_prompt(c.vocab_size, n, 20 + n) for n in (9, 2, 6)]
    alone = [ours.generate(p, max_new_tokens=3, stop=[]) for p in prompts]
    together = ours.generate(prompts, max_new_tokens=3, stop=[])
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]
    st = ours.generator.last_stats
    assert (st["sequences"], st["new_tokens"], st["steps"]) == (3, 9, 3)
    assert ours.generator.last_session.sequences == 4  # three rows and an idle one
    kw = dict(max_new_tokens=2, temperature=1.5, top_k=20)
    drawn = ours.generate(prompts[:2], seed=5, **kw)
    assert [d.tolist() for d in drawn] == [ours.generate(p, seed=5 + i, **kw).tolist()
                                           for i, p in enumerate(prompts[:2])]
    stop = alone[1][prompts[1].numel() + 1].item()  # the second sequence's second new id
    seen = []
    out = ours.generate(prompts, max_new_tokens=3, stop=[stop],
                        on_token=lambda i, t: seen.append((i, t)))
    for i, (o, a) in enumerate(zip(out, alone)):
        new = a[prompts[i].numel():].tolist()
        end = new.index(stop) + 1 if stop in new else len(new)
        assert o.tolist() == a[:prompts[i].numel() + end].tolist()
        assert [t for j, t in seen if j == i] == new[:end]


def test_a_conversation_keeps_its_earlier_turns_in_the_caches(kernels):
    # the next turn extends what the caches hold (prompt + reply): only the new ids are
    # prefilled, from their positions on, and the reply equals a fresh generation's
    c = CONFIGS["gqa2"]
    ours = meganeura.from_config(c, device="cpu", seed=7, cache_dir=kernels)
    ours.generator.chunks = (4, 8)
    gen, params = ours.generator, meganeura.inference.generation.SamplingParams()
    first = gen.generate(_prompt(c.vocab_size, 11, 1), 4, params, stop=[], reuse=True)
    turn = torch.cat([first, _prompt(c.vocab_size, 3, 2)])
    second = gen.generate(turn, 4, params, stop=[], reuse=True)
    assert gen.last_stats["reused_tokens"] == 14  # 11 + the 3 replies fed back (not the last)
    assert second.tolist() == _greedy_loop(c, ours.weights, turn, 4).tolist()
    # a turn whose generation stopped half-way (its on_token raised) keeps nothing: the
    # steps it ran may have overwritten what the caches held
    def stop_at_5(t, seen=[]):
        seen.append(t)
        if len(seen) == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        gen.generate(second, 9, params, stop=[], on_token=stop_at_5, reuse=True)
    after = torch.cat([second, _prompt(c.vocab_size, 2, 4)])
    assert gen.generate(after, 2, params, stop=[], reuse=True).tolist() == \
        _greedy_loop(c, ours.weights, after, 2).tolist()
    assert gen.last_stats["reused_tokens"] == 0
    # a turn that departs from what the caches hold starts over
    other = torch.cat([first[:5], _prompt(c.vocab_size, 6, 3)])
    third = gen.generate(other, 2, params, stop=[], reuse=True)
    assert gen.last_stats["reused_tokens"] == 0
    assert third.tolist() == _greedy_loop(c, ours.weights, other, 2).tolist()


def test_chunk_schedules_are_the_cheapest_runs():
    from itertools import product

    from meganeura.inference.generation import chunk_schedule

    sizes, costs = [4, 8, 32], {4: 1.0, 8: 1.5, 32: 4.0}
    for n, start, cap in [(1, 0, 64), (13, 0, 64), (37, 0, 64), (61, 0, 64), (30, 14, 64),
                          (63, 0, 64), (40, 0, 40)]:
        got = chunk_schedule(n, sizes, costs, cap, start)
        # consecutive from start, covering n, within the capacity
        assert got[0][0] == start and all(a + r == b for (a, r), (b, _) in zip(got, got[1:]))
        assert got[-1][0] < n <= got[-1][0] + got[-1][1] <= cap
        best = min(sum(costs[r] for r in run) for k in range(1, 9)
                   for run in product(sizes, repeat=k)
                   if start + sum(run[:-1]) < n <= start + sum(run) <= cap)
        assert sum(costs[r] for _, r in got) == best
    with pytest.raises(InputError, match="do not fit"):
        chunk_schedule(65, sizes, costs, 64)
    # near the capacity (unaligned starts, a capacity of no size's multiple): the last chunk
    # starts earlier instead of running past it, and still covers the prompt's end
    for n, start, cap in [(63, 61, 64), (35, 0, 40), (40, 33, 40), (5, 0, 6)]:
        got = chunk_schedule(n, sizes, costs, cap, start)
        assert got[0][0] <= start and all(a + r <= cap for a, r in got)
        assert got[-1][0] + got[-1][1] >= n and all(a < n for a, _ in got)
        covered = set()
        for a, r in got:
            covered |= set(range(a, a + r))
        assert set(range(start, n)) <= covered


def test_measured_chunk_times_price_the_schedule(kernels, monkeypatch):
    # chunk plans timed as they are made (as on CUDA): their times price the runs; the timing
    # runs leave nothing behind that generation would trust (its ids equal the reference's);
    # a plan made before timing was asked for is not timed later (mid-prompt, its runs would
    # overwrite the prompt's first positions)
    from meganeura.inference import generation

    monkeypatch.setattr(generation, "MEASURE_RUNS", 1)
    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=3, cache_dir=kernels)
    gen = ours.generator
    gen.chunks = (4, 8)
    s = gen.session(40)
    gen.chunk_plan(s, 4)
    gen.measure_chunks = True
    prompt = _prompt(c.vocab_size, 11, 4)
    assert gen.generate(prompt, 2, generation.SamplingParams(),
                        stop=[]).tolist() == _greedy_loop(c, ours.weights, prompt, 2).tolist()
    assert gen.last_session is s and list(s.measured) == [8] and s.measured[8] > 0
    assert gen.chunk_cost(s, 8) == s.measured[8]
    # a size without a time: the cost model's estimate scaled by the timed sizes' ratio
    ratio = s.measured[8] / gen._unplanned(s, 8)
    assert gen.chunk_cost(s, 4) == pytest.approx(gen._unplanned(s, 4) * ratio)
    s.measured.update({4: 1.0, 8: 3.0})  # two 4-row chunks cheaper than one of 8
    assert gen.schedule(s, 8) == [(0, 4), (4, 4)]
    s.measured.update({4: 1.0, 8: 1.5})
    assert gen.schedule(s, 8) == [(0, 8)] and gen.schedule(s, 16) == [(0, 8), (8, 8)]
    gen.forget_plans()
    assert not s.measured


def test_warmup_makes_every_plan_before_the_first_request(kernels):
    c = CONFIGS["small_test"]
    ours = meganeura.from_config(c, device="cpu", seed=1, cache_dir=kernels)
    ours.generator.chunks = (4, 8)
    ours.warmup(40)
    assert ours.generator.plan_count() == 3
    ours.generate(_prompt(c.vocab_size, 13, 1), max_new_tokens=3)
    assert ours.generator.last_stats["plans_s"] < 0.05 and ours.generator.plan_count() == 3
    with pytest.raises(InputError, match="max_tokens must be an integer >= 1"):
        ours.warmup(0)
