"""`meganeura.Trainer` against transformers' own training, on tiny checkpoints transformers
wrote (fp32, CPU): the loss and every weight's gradient, AdamW steps, LoRA, saving."""

import pytest
import torch

import hf_checkpoints as hf
import meganeura
from meganeura.errors import ConfigError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _batch(vocab, shape, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_grads(model, ids, labels):
    """transformers' loss and gradients (fp32 autograd), keyed by checkpoint name."""
    model.zero_grad()
    out = model(ids if ids.dim() == 2 else ids[None],
                labels=labels if labels.dim() == 2 else labels[None])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def _checkpoint(kind, name, tmp_path, seed=1):
    model = (hf.text_model(name, seed) if kind == "gemma4" else hf.decoder_model(name, seed))
    hf.save(model, tmp_path / name)
    return model, meganeura.from_pretrained(tmp_path / name, device="cpu",
                                            cache_dir=tmp_path / "kernels")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# the generated kernels on the Llama checkpoint (and the seed's model, three steps below),
# the reference executor on the others (the IR's gradients alone; through the kernels,
# measured: every_feature 3.0e-5, dense 6.2e-6, qwen3 within 1e-4, in 6 to 30 s of
# interpreter each; e2b_like's ten layers on the kernels: 2.6e-4
# from transformers' fp32 gradients, 1.6e-4 from fp64 ones, where transformers' own fp32
# ones are 1.25e-4 away)
@pytest.mark.parametrize("kind, name, executor", [
    ("gemma4", "every_feature", "reference"), ("gemma4", "e2b_like", "reference"),
    ("gemma4", "dense", "reference"), ("decoder", "llama3_tied", "compiled"),
    ("decoder", "qwen3", "reference")])
def test_loss_and_every_gradient_equal_transformers(kind, name, executor, tmp_path):
    ref, model = _checkpoint(kind, name, tmp_path)
    vocab = model.config.vocab_size
    ids = _batch(vocab, (2, 9), seed=7)
    labels = ids.clone()
    labels[0, 3] = labels[1, 6] = -100  # masked positions
    trainer = meganeura.Trainer(model, executor=executor)
    loss, grads = trainer.gradients(ids, labels)
    ref_loss, ref_grads = _hf_grads(ref, ids, labels)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    trained = {n for n in ref_grads}
    assert set(grads) == trained, set(grads) ^ trained
    for n, g in grads.items():
        assert g.shape == ref_grads[n].shape, n
        assert _rel(g, ref_grads[n]) < 1e-4, f"{n}: relative error {_rel(g, ref_grads[n]):.2e}"


def test_three_steps_equal_torch_adamw_on_transformers(tmp_path):
    ref, model = _checkpoint("decoder", "llama3_tied", tmp_path)
    ids = _batch(model.config.vocab_size, (11,), seed=3)
    # eps well above the gradients' fp32 noise (~1e-7 here): Adam divides each gradient by
    # its own magnitude, so an element whose gradient is noise would step by +-lr either way
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1)
    trainer = meganeura.Trainer(model, grad_clip=0.5, **kw)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = torch.optim.AdamW([p for p in ref.parameters()], **kw)
    for _ in range(3):
        loss = trainer.step(ids)
        opt.zero_grad()
        out = ref(ids[None], labels=ids[None])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        assert abs(loss - out.loss.item()) <= 1e-5 * out.loss.item()
    mine = model.weights
    # the gradients agree to ~1e-5 in norm, but Adam divides each element by its own
    # magnitude: elements near zero carry their fp32 noise into the update (measured on a
    # Gemma-4 of every feature: 4e-4 in the worst tensor, 1e-4 in the next ones)
    worst = max(_rel(mine[n] - start[n], p.detach() - start[n]) for n, p in ref.named_parameters())
    assert worst < 1e-3, f"the updates differ by {worst:.2e} (relative)"
    # the model itself now computes with the trained weights
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = model(ids)
    assert _rel(got, want) < 1e-4


def test_a_subset_trains_and_the_rest_has_no_gradient(tmp_path):
    ref, model = _checkpoint("decoder", "llama3_tied", tmp_path)
    before = {n: w.clone() for n, w in model.weights.items()}
    trainer = meganeura.Trainer(model, lr=1e-2, trainable=lambda n: "mlp" in n)
    assert trainer.names and all("mlp" in n for n in trainer.names)
    _, grads = trainer.gradients(_batch(model.config.vocab_size, (7,), 1))
    assert set(grads) == set(trainer.names)
    trainer.step(_batch(model.config.vocab_size, (7,), 1))
    for n, w in model.weights.items():
        assert torch.equal(w, before[n]) == ("mlp" not in n), n


def test_lora_scales_the_rank_wide_side():
    # s (x A^T) B^T: the scaling, and its gradient's copy, are [tokens, rank] tensors
    from meganeura.models import PRESETS, build
    from meganeura.training.trainer import with_lora

    cfg = PRESETS["small_test"]
    lora = meganeura.LoRA(rank=3, alpha=5.0, targets=["q_proj", "down_proj"])
    g, shapes = with_lora(build(cfg, 11), lora)
    scales = [n for n in g.nodes if n.op == "scale" and n.attrs["factor"] == lora.scaling]
    assert len(scales) == len(shapes) // 2 and all(n.shape == (11, 3) for n in scales)


def test_lora_sums_are_held_in_the_plan_type_and_gradients_in_fp32():
    # a bf16 GPU plan of a LoRA step: each forward base + adapter sum in bf16 (as its two
    # products are), the residual stream and every backward sum of products in fp32
    from meganeura.compiler.cost import MEMORY_PRICE, PROFILES, CostModel
    from meganeura.compiler.plan import holds_fp32, product_sums
    from meganeura.models import build
    from meganeura.pipeline import optimize_graph
    from meganeura.training.trainer import training_graph, with_lora

    from meganeura.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    lora = meganeura.LoRA(rank=3, alpha=5.0, targets=["q_proj", "v_proj", "down_proj"])
    g, shapes = with_lora(build(cfg, 32), lora)
    plan, _ = optimize_graph(training_graph(g, list(shapes), cfg),
                             CostModel(PROFILES["h200"], "bf16", MEMORY_PRICE))
    pg = plan.graph
    sums = product_sums(pg) & set(plan.launches)
    # q's and v's in each layer (down's sum joins the residual add: the stream, fp32)
    assert len(sums) >= 2 * cfg.num_hidden_layers
    assert not any(holds_fp32(pg, i) for i in sums)
    seeded = {n.id for n in pg.inputs() if n.attrs.get("fp32")}
    later = {i: any(j in seeded for j in pg[i].inputs) for i in plan.launches}
    backward_adds = [i for i in plan.launches if pg[i].op == "add" and later[i]]
    forward_adds = [i for i in plan.launches if pg[i].op == "add" and i not in sums]
    assert backward_adds or forward_adds
    assert all(holds_fp32(pg, i) for i in backward_adds + forward_adds)


def test_lora_equals_peft_and_saves_merged(tmp_path):
    peft = pytest.importorskip("peft")
    ref, model = _checkpoint("decoder", "qwen3", tmp_path)
    lora = meganeura.LoRA(rank=3, alpha=5.0, targets=["q_proj", "v_proj", "down_proj"])
    trainer = meganeura.Trainer(model, lr=1e-2, lora=lora, executor="reference")
    # the same initial adapters in both, B nonzero so that every adapter has a gradient
    gen = torch.Generator().manual_seed(0)
    for n in trainer.names:
        model.weights[n].copy_(torch.randn(model.weights[n].shape, generator=gen) * 0.1)
    wrapped = peft.get_peft_model(ref, peft.LoraConfig(r=3, lora_alpha=5.0, lora_dropout=0.0,
                                                       target_modules=list(lora.targets)))
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in wrapped.named_parameters() if "lora_" in n}
    assert set(theirs) == set(trainer.names)
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(model.weights[n])
    ids = _batch(model.config.vocab_size, (2, 8), seed=5)
    loss, grads = trainer.gradients(ids)
    ref_loss, ref_grads = _hf_grads(wrapped, ids, ids)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    for n, g in grads.items():
        want = ref_grads["base_model.model." + n.replace(".weight", ".default.weight")]
        assert _rel(g, want) < 1e-4, n
    opt = torch.optim.AdamW(list(theirs.values()), lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        trainer.step(ids)
        opt.zero_grad()
        wrapped(ids, labels=ids).loss.backward()
        opt.step()
    with torch.no_grad():
        want = wrapped(ids[:1]).logits[0]
    assert _rel(model(ids[0]), want) < 1e-4  # the model runs with its adapters
    model.save_pretrained(tmp_path / "merged")
    back = type(ref).from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(back(ids[:1]).logits[0], want) < 1e-4
    # or the adapters alone, which peft loads onto the base checkpoint
    model.save_pretrained(tmp_path / "adapter", lora="adapter")
    base = type(ref).from_pretrained(tmp_path / "qwen3", dtype=torch.float32).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert _rel(loaded(ids[:1]).logits[0], want) < 1e-4


def test_bad_inputs_are_named_and_change_nothing(tmp_path):
    _, model = _checkpoint("decoder", "llama3_tied", tmp_path)
    vocab = model.config.vocab_size
    trainer = meganeura.Trainer(model, executor="reference")  # (kernels refuse NaN weights)
    before = {n: w.clone() for n, w in model.weights.items()}
    ids = _batch(vocab, (2, 6), 0)
    cases = [
        (dict(input_ids=ids, labels=ids[:, :5]), "labels must be an int64 tensor of input_ids'"),
        (dict(input_ids=ids, labels=ids.float()), "labels must be an int64 tensor"),
        (dict(input_ids=ids, labels=torch.full_like(ids, -100)), "every label is -100"),
        (dict(input_ids=ids.float()), "input_ids must be an int64 tensor"),
        (dict(input_ids=ids[:, :1]), "a sequence of one token predicts nothing"),
        (dict(input_ids=ids + vocab), "outside the vocabulary"),
    ]
    for kw, message in cases:
        with pytest.raises(InputError, match=message):
            trainer.step(**kw)
    model.weights["model.norm.weight"][0] = float("nan")  # a non-finite loss
    before["model.norm.weight"][0] = float("nan")
    with pytest.raises(InputError, match="the loss is nan"):
        trainer.step(ids)
    for n, w in model.weights.items():
        assert torch.equal(w.nan_to_num(), before[n].nan_to_num()), n
    assert trainer.optimizer.steps == 0
    with pytest.raises(InputError, match="accumulate"):
        meganeura.Trainer(model, accumulate=0)
    with pytest.raises(InputError, match="cuda_graph must be True or False"):
        meganeura.Trainer(model, cuda_graph="yes")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        model.save_pretrained(tmp_path / "full")


def test_a_step_beyond_the_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    from meganeura.errors import MeganeuraError
    from meganeura.runtime import compiled

    _, model = _checkpoint("decoder", "llama3_tied", tmp_path)
    trainer = meganeura.Trainer(model, recompute_products=False)
    need = trainer.memory_needed(40)
    assert need > trainer.memory_needed(8) > 0
    monkeypatch.setattr(compiled, "_host_available", lambda: need - 1)
    before = {n: w.clone() for n, w in model.weights.items()}
    ids = _batch(model.config.vocab_size, (40,), 0)
    with pytest.raises(MeganeuraError, match="a training step of 40 tokens a sequence needs"):
        trainer.step(ids)
    assert all(torch.equal(w, before[n]) for n, w in model.weights.items())
    monkeypatch.setattr(compiled, "_host_available", lambda: 1000)
    with pytest.raises(MeganeuraError, match="the optimizer's moments and the gradients need"):
        meganeura.Trainer(model)
    # once a length's plan is bound, its arena is held: the next step needs nothing more
    monkeypatch.undo()
    trainer.step(ids[:8])
    monkeypatch.setattr(compiled, "_host_available", lambda: 0)
    trainer.step(ids[:8])


def _text_ids(vocab: int, n: int) -> torch.Tensor:
    """A small real text (the project's README), its bytes as ids below vocab."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_bytes()[:n]
    return torch.tensor(list(text), dtype=torch.int64) % vocab


def test_thirty_steps_lower_the_loss_as_transformers_own_loop(tmp_path):
    ref, model = _checkpoint("decoder", "llama_untied", tmp_path)
    data = _text_ids(model.config.vocab_size, 4 * 24).view(4, 24)
    kw = dict(lr=1e-2, weight_decay=0.01, eps=1e-6)
    # the training loop's semantics (the kernels: the tests above)
    trainer = meganeura.Trainer(model, grad_clip=1.0, executor="reference", **kw)
    opt = torch.optim.AdamW(list(ref.parameters()), **kw)
    mine, theirs = [], []
    for step in range(30):
        batch = data[[step % 4, (step + 1) % 4]]
        mine.append(trainer.step(batch))
        opt.zero_grad()
        loss = ref(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        theirs.append(loss.item())
    gap = max(abs(a - b) for a, b in zip(mine, theirs))
    assert gap < 1e-3, f"the curves part by {gap:.2e}"
    assert mine[-1] < 0.7 * mine[0], mine  # it learns the text


def test_the_train_command_writes_the_checkpoint_and_its_curve(tmp_path, capsys):
    import csv

    from meganeura.cli import main

    ref, model = _checkpoint("decoder", "llama_untied", tmp_path)
    hf.save_tokenizer(tmp_path / "llama_untied", ref.config.vocab_size)
    words = " ".join(f"w{(7 * k) % 40 + 2}" for k in range(200))
    (tmp_path / "text.jsonl").write_text(
        "\n".join('{"text": "%s"}' % words[i:i + 300] for i in range(0, 900, 300)) + "\n")
    out = tmp_path / "trained"
    argv = ["train", "--weights", str(tmp_path / "llama_untied"), "--data",
            str(tmp_path / "text.jsonl"), "--steps", "4", "--seq-len", "12", "--batch", "2",
            "--lr", "1e-2", "--lora-rank", "2", "--out", str(out), "--device", "cpu",
            "--executor", "reference",
            "--cache-dir", str(tmp_path / "kernels")]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "step 4/4  loss" in shown and "LoRA rank 2" in shown, shown
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    back = type(ref).from_pretrained(out, dtype=torch.float32)  # transformers loads it
    assert (out / "tokenizer.json").is_file()
    assert back.config.vocab_size == ref.config.vocab_size
    assert main(argv) == 2  # --out now holds the checkpoint
    assert "not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize("name, executor", [("gqa2", "reference"), ("small_test", "compiled")])
def test_the_seed_family_equals_autograd_through_the_independent_forward(name, executor):
    # the seed's model has no transformers class: its independent forward
    # (tests/gemma4_forward.py) under torch autograd is the reference
    from configs import CONFIGS
    from gemma4_forward import forward

    c = CONFIGS[name]
    model = meganeura.from_config(c, device="cpu", seed=4)
    ids = _batch(c.vocab_size, (2, 13), seed=9)
    loss, grads = meganeura.Trainer(model, executor=executor).gradients(ids)
    w = {n: t.clone().requires_grad_(True) for n, t in model.weights.items()}
    losses = [torch.nn.functional.cross_entropy(forward(c, w, row)[:-1], row[1:],
                                                reduction="sum") for row in ids]
    ref = sum(losses) / (ids.numel() - ids.shape[0])
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * ref.item()
    assert set(grads) == set(w)
    for n, g in grads.items():
        assert _rel(g, w[n].grad) < 1e-4, f"{n}: relative error {_rel(g, w[n].grad):.2e}"


def test_the_multimodal_layout_names_gradients_as_its_checkpoint(tmp_path):
    ref = hf.multimodal_model("every_feature", seed=2)
    hf.save(ref, tmp_path / "mm")
    model = meganeura.from_pretrained(tmp_path / "mm", device="cpu", cache_dir=tmp_path / "k")
    ids = _batch(model.config.vocab_size, (10,), seed=4)
    trainer = meganeura.Trainer(model, trainable=lambda n: ".layers.1." in n,
                                executor="reference")
    loss, grads = trainer.gradients(ids)
    ref.zero_grad()
    out = ref(input_ids=ids[None], labels=ids[None])
    out.loss.backward()
    assert abs(loss - out.loss.item()) <= 1e-5 * out.loss.item()
    want = {n: p.grad for n, p in ref.named_parameters() if ".layers.1." in n
            and n.startswith("model.language_model.")}
    assert set(grads) == set(want) and want
    for n, g in grads.items():
        assert _rel(g, want[n]) < 1e-4, n


def test_recomputed_products_free_the_glus_inputs_and_keep_the_gradients(tmp_path):
    # Trainer(recompute_products=True): a GLU's gate and up (base product plus adapter) are
    # computed again in the backward from the held norm input; the gradients are the same
    # bits on the reference executor and within fp32's bound through the kernels; the GPU
    # plan's arena
    # is smaller (the recomputed products run just before the GLU's gradient reads them,
    # not at the backward's start)
    from meganeura.compiler.cost import MEMORY_PRICE, PROFILES, CostModel
    from meganeura.compiler.autodiff import SEED
    from meganeura.models import build
    from meganeura.models.llama import LlamaConfig
    from meganeura.pipeline import compile_graph, optimize_graph, setup
    from meganeura.runtime.buffers import plan_buffers
    from meganeura.runtime.reference import run_reference
    from meganeura.training.trainer import glu_products, lora_weights, training_graph, with_lora
    from numerics import assert_close

    cfg = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=136, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    lora = meganeura.LoRA(rank=3, alpha=5.0, targets=["q_proj", "gate_proj", "up_proj",
                                                      "down_proj"])
    seq = 13
    g, shapes = with_lora(build(cfg, seq), lora)
    assert len(glu_products(g)) == 3 * 6  # each layer: gate and up, base and adapter terms
    plain = training_graph(g, list(shapes), cfg)  # (adds the loss to g)
    again = training_graph(with_lora(build(cfg, seq), lora)[0], list(shapes), cfg,
                           recompute_products=True)
    def products(graph, backward):  # the GLU-wide products: their weight operands
        return {n.inputs[1] for n in graph.nodes if n.op == "matmul" and n.shape == (seq, 136)
                and n.block.endswith(".grad") == backward}

    forward = products(again, False)
    assert len(forward) == 3 * 4  # each layer: gate and up, base and adapter
    assert products(again, True) - products(plain, True) == forward  # each computed again

    from meganeura.models import family
    gen = torch.Generator().manual_seed(5)
    specs = family(cfg).weight_specs(cfg)
    weights = {n: torch.randn(*s.shape, generator=gen) * (0.2 if len(s.shape) > 1 else 1.0)
               + (1.0 if len(s.shape) == 1 else 0.0) for n, s in specs.items()}
    adapters = lora_weights(shapes, lora, torch.float32, "cpu", seed=3)
    weights.update({n: w + 0.1 * torch.randn(w.shape, generator=gen)
                    for n, w in adapters.items()})
    inputs = {"token_ids": torch.randint(0, 67, (seq,), generator=gen),
              "labels": torch.randint(0, 67, (seq,), generator=gen),
              SEED: torch.rand(seq, 1, generator=gen) / seq}
    want = run_reference(plain, weights, inputs)
    got = run_reference(again, weights, inputs)
    assert len(got) == len(want) == 1 + len(shapes)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    fn = compile_graph(again, weights, setup("cpu", cache_dir=tmp_path))
    names = [n.name for n in again.inputs()]
    for a, b in zip(fn(*[inputs[n] for n in names]), want):
        assert_close(a.float(), b, "fp32")

    def arena(graph):
        plan, _ = optimize_graph(graph, CostModel(PROFILES["h200"], "bf16", MEMORY_PRICE))
        return plan_buffers(plan, 2, inputs=True).total

    assert arena(again) < arena(plain)


def test_a_length_that_would_not_fit_recomputes_the_glus_products(tmp_path, monkeypatch):
    # Trainer(recompute_products=None), the default: a length whose plan would not fit the
    # free memory is planned again with the GLUs' products computed in the backward, before
    # anything is allocated; a length that fits keeps the plain plan; a length that fits
    # neither way is refused
    from meganeura.errors import MeganeuraError
    from meganeura.models.llama import LlamaConfig
    from meganeura.models.weights import random_weights
    from meganeura.runtime import compiled

    # GLUs four times wider than the vocabulary (as a large model's are, relative to a
    # layer's other tensors): their gate and up make the peak
    cfg = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    model = meganeura.from_config(cfg, random_weights(cfg, 3), "cpu", torch.float32,
                                  cache_dir=tmp_path)
    plain = meganeura.Trainer(model, recompute_products=False).memory_needed(40)
    again = meganeura.Trainer(model, recompute_products=True).memory_needed(40)
    assert again < plain
    ids = _batch(model.config.vocab_size, (40,), 0)
    trainer = meganeura.Trainer(model)  # (its optimizer's state checked against the host's)
    before = {n: w.clone() for n, w in model.weights.items()}
    monkeypatch.setattr(compiled, "_host_available", lambda: again - 1)
    with pytest.raises(MeganeuraError, match="a training step of 40 tokens a sequence needs"):
        trainer.step(ids)  # too little either way: refused, nothing changed
    assert all(torch.equal(w, before[n]) for n, w in model.weights.items())
    assert trainer.memory_needed(40) == again  # (the length's choice is made)
    monkeypatch.setattr(compiled, "_host_available", lambda: (again + plain) // 2)
    trainer.step(ids)
    assert any(not torch.equal(w, before[n]) for n, w in model.weights.items())
    def glu_inputs(graph):  # of the GLUs computed again for the gradients
        return {i for n in graph.nodes if n.op == "glu" and n.block.endswith(".grad")
                for i in n.inputs}

    copies = glu_inputs(trainer.graph(40))  # gate and up: copies in the backward too
    assert copies and all(trainer.graph(40)[i].block.endswith(".grad") for i in copies)
    monkeypatch.undo()
    roomy = meganeura.Trainer(model)
    monkeypatch.setattr(compiled, "_host_available", lambda: plain)
    assert roomy._memory_to_allocate(40) == plain  # room for the plain arena: kept
    assert not any(n.block.endswith(".grad") for i in glu_inputs(roomy.graph(40))
                   for n in [roomy.graph(40)[i]])
