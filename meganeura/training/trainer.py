"""`meganeura.Trainer`: gradients and AdamW steps of a loaded model, all weights, a subset, or
LoRA adapters.

    model = meganeura.from_pretrained(path)
    trainer = meganeura.Trainer(model, lr=1e-4, lora=meganeura.LoRA(rank=16, alpha=32))
    loss = trainer.step(input_ids)                 # [S] or [B, S] int64; labels = input_ids
    loss, grads = trainer.gradients(input_ids, labels)   # no update; {checkpoint name: fp32}
    model.save_pretrained(out)                     # LoRA merged into the weights

The training graph is the model's forward graph (the family's `build`), LoRA's low-rank
products added beside the targeted products, the causal-LM loss as transformers computes
it (the logits after the final soft-cap, labels shifted by one inside, -100 ignored, the
mean over the counted positions of the whole batch), and its backward built by
`compiler.autodiff.grad` in the same IR: one joint graph per sequence length, optimized by
the e-graph (forward and backward together; its `fused_loss` rules offer the lm_head, the
soft-cap and the loss as one op whose kernels never store the logits, and the cost model
picks) and run as generated kernels; the update is
the AdamW of `optim.py`, in generated kernels too (`executor="reference"` runs the joint
graph on the reference executor instead, plain PyTorch in the model's dtype). Rows of a
batch run one after another (`accumulate` micro-batches give the same gradient), their
gradients summed in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..compiler.autodiff import SEED, grad, live
from ..compiler.cost import MEMORY_PRICE
from ..compiler.graph import Graph
from ..errors import InputError
from ..runtime.compiled import check_memory, free_bytes
from ..runtime.reference import run_reference
from .loss import shift_labels
from .optim import AdamW, _number

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters as peft defines them: y = x W^T + (alpha / rank) (x A^T) B^T for each
    product whose weight's module (the checkpoint name without `.weight`) ends in one of
    `targets`; A [rank, in] starts uniform in +-1/sqrt(in), B [out, rank] at 0 (peft's
    defaults), named `<module>.lora_A.weight` / `.lora_B.weight`."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        _number("LoRA alpha", self.alpha, 0.0)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise InputError(f"LoRA targets must be module names (e.g. {', '.join(TARGETS)}), "
                             f"got {self.targets!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def module(self, weight_name: str) -> str | None:
        """The module a targeted weight belongs to, or None."""
        if not weight_name.endswith(".weight"):
            return None
        module = weight_name[:-len(".weight")]
        return module if module.rsplit(".", 1)[-1] in self.targets else None


def with_lora(graph: Graph, lora: LoRA) -> tuple[Graph, dict[str, tuple[int, ...]]]:
    """The graph with an adapter beside each targeted product x @ W^T, and the adapters'
    shapes by name."""
    g = Graph()
    new: dict[int, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for n in graph.nodes:
        with g.block(n.block):
            new[n.id] = g.copy_node(n, tuple(new[i] for i in n.inputs))
            module = _targeted(graph, n, lora)
            if module is not None:
                x = new[n.inputs[0]]
                out, inp = graph[graph[n.inputs[1]].inputs[0]].shape
                a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
                shapes[a], shapes[b] = (lora.rank, inp), (out, lora.rank)
                # the scaling on the rank-wide side, (s x A^T) B^T: its gradient's copy is
                # [tokens, rank], not [tokens, out] in fp32
                xa = g.scale(g.matmul(x, g.transpose(g.parameter(a, shapes[a]))), lora.scaling)
                new[n.id] = g.add(new[n.id], g.matmul(xa, g.transpose(g.parameter(b, shapes[b]))))
    g.set_outputs([new[o] for o in graph.outputs], [new[e] for e in graph.effects])
    return g, shapes


def _targeted(graph: Graph, n, lora: LoRA) -> str | None:
    if n.op != "matmul" or graph[n.inputs[1]].op != "transpose":
        return None
    w = graph[graph[n.inputs[1]].inputs[0]]
    return lora.module(w.name) if w.op == "parameter" else None


def lora_weights(shapes: dict, lora: LoRA, dtype, device, seed: int = 0) -> dict:
    """Fresh adapters: A uniform in +-1/sqrt(in) (kaiming-uniform with a = sqrt(5), as peft
    draws it), B zero."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("lora_A.weight"):
            bound = 1.0 / math.sqrt(shape[1])
            t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            t = torch.zeros(shape)
        out[name] = t.to(device=device, dtype=dtype)
    return out


def merged(weights: dict, lora: LoRA) -> dict:
    """The base weights with each adapter folded in: W + (alpha / rank) B A (fp32, then the
    weights' dtype); the adapters themselves left out."""
    out = {}
    for name, w in weights.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        module = lora.module(name)
        a = weights.get(f"{module}.lora_A.weight") if module else None
        if a is None:
            out[name] = w
            continue
        b = weights[f"{module}.lora_B.weight"]
        out[name] = (w.float() + lora.scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def training_graph(g: Graph, names: list, config, recompute_products: bool = False) -> Graph:
    """The joint graph of a model graph `g` (its logits its output): inputs token_ids, labels
    (shifted) and d_loss (a row's weight), outputs [the rows' losses, d w for w in names].
    The loss is written plainly, cross_entropy of the logits; the e-graph offers the lm_head,
    its soft-cap and the loss as one op (rewrites/fused_loss.py) and extraction picks.
    recompute_products: a GLU's gate and up products are computed again in the backward too
    (see Trainer)."""
    seq_len = g[g.outputs[0]].shape[0]
    labels = g.input_u32("labels", (seq_len,))
    g.set_outputs([g.cross_entropy(g.outputs[0], labels)])
    g = live(g)
    pad = getattr(config, "pad_token_id", None)
    tables = {g[n.inputs[1]].name for n in g.nodes if n.op == "embedding"}
    padding = {t: pad for t in tables} if pad is not None else {}
    # what the gradients read of these is computed again in the backward, not held: each
    # from inputs their own gradients hold anyway (a GLU's gate and up, a norm's input; RoPE
    # over a head norm's output). e2b at 2048 tokens: arena 10.40 -> 8.48 GiB (the GLUs
    # alone: 9.10)
    return grad(g, g.outputs[0], names, padding=padding,
                recompute=("glu", "rms_norm", "head_rms_norm", "unit_rms_norm", "rope"),
                recompute_nodes=glu_products(g) if recompute_products else ())


def glu_products(g: Graph) -> set[int]:
    """The nodes that make a GLU's gate and up: each input, and where an input is a sum (a
    product plus its LoRA adapter's), the terms of the GLU's width (the adapter's narrow
    x A^T stays held: rank columns)."""
    found = set()
    for n in g.nodes:
        if n.op != "glu":
            continue
        for i in n.inputs:
            found.add(i)
            if g[i].op == "add":
                found.update(j for j in g[i].inputs if g[j].shape == g[i].shape)
    return found


def save_adapter(directory, model, overwrite: bool = False):
    """Writes the model's LoRA adapters as peft saves them (adapter_config.json and
    adapter_model.safetensors, the checkpoint's names under base_model.model.), for
    peft.PeftModel.from_pretrained on the base checkpoint; atomically, as save_pretrained."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from ..errors import ConfigError
    from ..models.checkpoint import probe

    lora = model.lora
    if lora is None:
        raise InputError("this model carries no LoRA adapters (Trainer(lora=...) attaches them)")
    out = Path(directory)
    kind = probe(out, "output directory")
    if kind == "file" or (kind == "dir" and any(out.iterdir()) and not overwrite):
        raise ConfigError(f"{out} is not an empty directory: pass overwrite=True to replace it")
    ck = model.checkpoint
    name = (lambda n: n) if ck is None or not ck.rename else ck.rename
    tensors = {"base_model.model." + name(n): w.detach().contiguous().cpu()
               for n, w in model.weights.items() if ".lora_A." in n or ".lora_B." in n}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(lora.targets), "fan_in_fan_out": False,
              "inference_mode": True,
              "base_model_name_or_path": str(ck.path) if ck is not None and ck.path else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors")
        if kind == "dir":
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


class Trainer:
    """Gradients and optimizer steps of `model`'s weights (see the module's doc).

    memory_price: seconds of step time per byte a kernel's output stores, the exchange rate
    at which the e-graph's extraction trades memory for time (compiler/cost.py's
    MEMORY_PRICE by default; 0: the fastest plan whatever it holds). fp32_products: a bf16
    plan holds in fp32 the forward products' outputs that no tensor core reads (norms, RoPE,
    GeGLU, the loss, residual adds; CostModel.fp32_products): gradients closer to fp32, for
    the bytes of those tensors. cuda_graph: on a GPU, each length's plan (about two thousand
    launches for e2b) is captured once in a CUDA graph and replayed, instead of launched
    kernel by kernel (off by default: a capture for each sequence length; on an H100, e2b's
    2048-token step 137.2 -> 129.2 ms, benchmarks/train.py --cuda-graph).
    recompute_products: every GLU's gate and up products are computed again in the backward
    (from the norm's input, which is held anyway) instead of held from the forward: a
    layer's two widest tensors fewer at the peak, for two more products a layer (on the
    CPU's count, LoRA's arena: 31b at 2048 tokens 23.6 -> 13.9 GiB, beside its 57.2 GiB of
    weights; e4b at 4096 tokens 14.7 -> 8.3 GiB). None (the default): for a sequence length
    whose plan would not fit the device's free memory without it, decided before its first
    step (that length's plan is then made twice); True / False: always / never."""

    def __init__(self, model, lr: float = 1e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 eps: float = 1e-8, trainable=None, lora: LoRA | None = None,
                 grad_clip: float | None = None, accumulate: int = 1,
                 master_weights: bool = False, seed: int = 0, executor: str = "compiled",
                 memory_price: float = MEMORY_PRICE, fp32_products: bool = False,
                 cuda_graph: bool = False, recompute_products: bool | None = None):
        from ..inference.pretrained import PretrainedModel

        if not isinstance(model, PretrainedModel):
            raise InputError(f"Trainer takes a model from meganeura.from_pretrained or "
                             f"from_config, got {type(model).__name__}")
        if model.dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"a model in {model.dtype} cannot train: load it in float32 or "
                             f"bfloat16")
        if lora is not None and not isinstance(lora, LoRA):
            raise InputError(f"lora must be a meganeura.LoRA, got {type(lora).__name__}")
        if lora is not None and trainable is not None:
            raise InputError("with lora, the adapters alone train: leave trainable out")
        if trainable is not None and not callable(trainable):
            raise InputError("trainable must be a predicate on checkpoint names (or None: all)")
        if executor not in ("compiled", "reference"):
            raise InputError(f"executor must be 'compiled' or 'reference', got {executor!r}")
        self.executor = executor
        self.memory_price = _number("memory_price", memory_price, 0.0)
        if not isinstance(fp32_products, bool):
            raise InputError(f"fp32_products must be True or False, got {fp32_products!r}")
        self.fp32_products = fp32_products
        if not isinstance(cuda_graph, bool):
            raise InputError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        if recompute_products is not None and not isinstance(recompute_products, bool):
            raise InputError(f"recompute_products must be True, False or None, got "
                             f"{recompute_products!r}")
        self.recompute_products = recompute_products
        self._recompute: dict[int, bool] = {}  # seq_len -> chosen where the option is None
        self._plans: dict = {}  # seq_len -> (plan, report, the CompiledModel bound last)
        self._stale: set = set()  # lengths whose bound plan has not seen the latest weights
        self._arena: dict = {}  # seq_len -> the plan's arena bytes
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise InputError(f"accumulate must be an integer >= 1, got {accumulate!r}")
        self.grad_clip = None if grad_clip is None else _number("grad_clip", grad_clip, 0.0)
        self.model, self.lora, self.accumulate = model, lora, accumulate
        self._graphs: dict[int, Graph] = {}
        specs = model.family.weight_specs(model.config)
        ck = model.checkpoint
        # graph name -> the checkpoint's (the multimodal Gemma-4 nests the text decoder)
        self.checkpoint_name = ck.rename if ck is not None and ck.rename else (lambda n: n)
        if lora is not None:
            if model.lora is not None:
                raise InputError("this model already carries LoRA adapters")
            shapes = with_lora(model.family.build(model.config, 1), lora)[1]
            if not shapes:
                raise InputError(f"no weight of this model belongs to a module named "
                                 f"{', '.join(lora.targets)}")
            adapters = lora_weights(shapes, lora, model.dtype, model.device, seed)
            model.attach_lora(lora, adapters)
            self.names = list(adapters)
        else:
            self.names = [n for n, spec in specs.items() if spec.trained
                          and (trainable is None or trainable(self.checkpoint_name(n)))]
            if not self.names:
                raise InputError("trainable selects no weight of this model")
        trained = sum(model.weights[n].numel() for n in self.names)
        state = trained * (4 * 3 + (4 if master_weights and model.dtype != torch.float32 else 0))
        check_memory(state, model.device, "the optimizer's moments and the gradients need {}")
        self.optimizer = AdamW({n: model.weights[n] for n in self.names}, lr=lr, betas=betas,
                               eps=eps, weight_decay=weight_decay, master_weights=master_weights,
                               cache_dir=model.setup.cache_dir)
        self.last_norm: float | None = None

    # ---- graphs ---------------------------------------------------------------------------

    def graph(self, seq_len: int) -> Graph:
        """The joint forward + loss + backward graph of one sequence of seq_len tokens:
        outputs [the rows' losses, d w for w in names]; inputs token_ids, labels (shifted),
        d_loss (1 / the batch's counted rows, a row)."""
        if seq_len not in self._graphs:
            again = self._recompute.get(seq_len, bool(self.recompute_products))
            self._graphs[seq_len] = training_graph(self.model.build(seq_len), self.names,
                                                   self.model.config, again)
        return self._graphs[seq_len]

    def memory_needed(self, seq_len: int) -> int:
        """Device bytes one sequence's forward and backward hold at their peak beyond the
        weights and the optimizer's state. Compiled: the plan's buffer arena (its tensors
        placed by liveness, as the run allocates it; the plan is built, nothing allocated).
        Reference: the executor's order replayed, each tensor freed after its last reader."""
        elem = torch.empty((), dtype=self.model.dtype).element_size()
        if self.executor == "compiled":  # (a second to place e2b's plan: once a length)
            from ..runtime.buffers import plan_buffers
            if seq_len not in self._arena:
                self._arena[seq_len] = plan_buffers(self._plan(seq_len)[0], elem,
                                                    inputs=True).total
            return self._arena[seq_len]
        g = self.graph(seq_len)
        users = g.users()
        left = [len(u) for u in users]
        for o in g.outputs:
            left[o] += 1
        live = peak = 0
        size = {}
        for n in g.nodes:
            if n.op in ("parameter", "state"):
                continue
            size[n.id] = math.prod(n.shape) * (8 if n.op == "input" else elem)
            live += size[n.id]
            if n.op == "cross_entropy_grad" or n.op == "cross_entropy":
                live += math.prod(g[n.inputs[0]].shape) * 4  # the fp32 softmax beside
            peak = max(peak, live)
            for i in set(n.inputs):
                left[i] -= n.inputs.count(i)
                if left[i] == 0 and i in size:
                    live -= size.pop(i)
        return peak

    # ---- inputs ---------------------------------------------------------------------------

    def _batch(self, input_ids, labels):
        vocab = self.model.config.vocab_size
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
                torch.int64, torch.int32) or input_ids.dim() not in (1, 2) or \
                input_ids.numel() == 0:
            what = (f"shape {list(input_ids.shape)} {input_ids.dtype}"
                    if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise InputError(f"input_ids must be an int64 tensor [S] or [B, S], got {what}")
        ids = input_ids.reshape(-1, input_ids.shape[-1]).long().cpu()
        if ids.shape[1] < 2:
            raise InputError("a sequence of one token predicts nothing: give at least 2")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise InputError(f"input_ids hold {int(bad[0])}, outside the vocabulary [0, {vocab})")
        if labels is None:
            lab = ids
        else:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape or \
                    labels.dtype not in (torch.int64, torch.int32):
                what = (f"shape {list(labels.shape)} {labels.dtype}"
                        if isinstance(labels, torch.Tensor) else type(labels).__name__)
                raise InputError(f"labels must be an int64 tensor of input_ids' shape "
                                 f"{list(input_ids.shape)}, got {what}")
            lab = labels.reshape(ids.shape).long().cpu()
            wrong = lab[(lab != IGNORE) & ((lab < 0) | (lab >= vocab))]
            if wrong.numel():
                raise InputError(f"labels hold {int(wrong[0])}: neither -100 nor in [0, {vocab})")
        target = shift_labels(lab)
        counted = int((target != IGNORE).sum())
        if counted == 0:
            raise InputError("every label is -100 (after the shift by one): no position to "
                             "learn from")
        if ids.shape[0] % self.accumulate:
            raise InputError(f"a batch of {ids.shape[0]} sequences does not split into "
                             f"accumulate={self.accumulate} micro-batches")
        return ids, target, counted

    # ---- gradients and steps ----------------------------------------------------------------

    def gradients(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """(loss, grads): the mean causal-LM loss of the batch (a float) and its gradient
        for each trained weight ({checkpoint name: fp32 tensor}); nothing is updated."""
        loss, grads = self._gradients(input_ids, labels)
        return loss, {self.checkpoint_name(n): g for n, g in grads.items()}

    def _gradients(self, input_ids, labels, keep: bool = True):
        """keep=False: a one-row batch's gradients may be the plan's own output buffers
        (fp32 or the plan dtype), valid until the plan runs again: a step reads them at
        once, with no copy of every gradient beside the arena."""
        ids, target, counted = self._batch(input_ids, labels)
        m = self.model
        seq = ids.shape[1]
        check_memory(self._memory_to_allocate(seq), m.device, f"a training step of {seq} "
                     f"tokens a sequence needs {{}} for its activations")
        seed = torch.full((ids.shape[1], 1), 1.0 / counted, dtype=torch.float32, device=m.device)
        run = self._runner(ids.shape[1])
        total = torch.zeros((), dtype=torch.float64)
        grads: dict = {}
        for b in range(ids.shape[0]):  # micro-batches of one row: the same sums
            loss, *ds = run(ids[b].to(m.device), target[b].to(m.device), seed,
                            copy=keep)  # not kept: read (or summed) before the next run
            total += loss.double().sum().cpu()
            last = b == ids.shape[0] - 1
            for n, d in zip(self.names, ds):
                if n in grads:
                    grads[n] += d.float()
                elif keep:  # the call's own copy
                    grads[n] = d.float()
                elif last:  # the plan's own buffer, read before its next run
                    grads[n] = d.contiguous()  # (a copy only of a strided view)
                else:  # the sum starts from a copy (the plan's buffers are reused)
                    grads[n] = d.float() if d.dtype != torch.float32 else d.clone()
        loss = float(total) / counted
        if not math.isfinite(loss):
            raise InputError(f"the loss is {loss}: no gradient is given and nothing changed")
        return loss, grads

    def _memory_to_allocate(self, seq_len: int) -> int:
        """Bytes a step of seq_len tokens still has to allocate (none once its plan's arena
        is held). Where recompute_products is None and the length's plan is not yet bound,
        a plan that would not fit the free memory is made again with the GLUs' products
        computed in the backward (the length keeps that choice)."""
        bound = self._plans.get(seq_len, (None, None, None))[2]  # its arena is held
        held = bound.buffer_bytes if bound is not None else 0
        need = self.memory_needed(seq_len) - held
        if self.recompute_products is not None or bound is not None or seq_len in self._recompute:
            return need  # (the choice is made: no query of the free memory here)
        free = free_bytes(self.model.device)
        if free is not None and need > free:
            self._recompute[seq_len] = True
            for kept in (self._graphs, self._plans, self._arena):
                kept.pop(seq_len, None)
            need = self.memory_needed(seq_len)
        return need

    def _runner(self, seq_len: int):
        """f(ids, labels, seed) -> [losses, grads...]: the joint graph's plan (optimized once a
        length, bound again after the weights change) or the reference executor."""
        m, g = self.model, self.graph(seq_len)
        if self.executor == "reference":
            return lambda ids, labels, seed, copy=True: run_reference(
                g, m.all_weights(),
                {"token_ids": ids, "labels": labels, SEED: seed.to(m.dtype)}, m.dtype, m.device)
        from ..pipeline import bind

        plan, report = self._plan(seq_len)
        fn = self._plans[seq_len][2]
        if fn is None:
            # (the weights change in place, and refresh_weights writes the load-time
            # tensors into their own buffers: a captured graph stays valid)
            fn = bind(plan, report, m.all_weights(), m.setup, cuda_graph=self.cuda_graph)
        elif seq_len in self._stale:  # the weights changed since it last ran
            fn.refresh_weights(m.all_weights())
        self._stale.discard(seq_len)
        self._plans[seq_len] = (plan, report, fn)
        return lambda ids, labels, seed, copy=True: fn(ids, labels, seed, copy=copy)

    def _plan(self, seq_len: int):
        """(plan, report) of the joint graph at seq_len, optimized once a length."""
        from ..pipeline import optimize_graph

        if seq_len not in self._plans:
            priced = dataclasses.replace(self.model.setup, memory_price=self.memory_price,
                                         fp32_products=self.fp32_products)
            plan, report = optimize_graph(self.graph(seq_len), priced)
            self._plans[seq_len] = (plan, report, None)
        return self._plans[seq_len][:2]

    def _weights_changed(self) -> None:
        """Plans may hold load-time copies of weights (transposes, concatenations): each
        bound plan computes them again before its next run, in its own buffers."""
        self._stale.update(self._plans)
        self.model.weights_changed()

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """One AdamW step on the batch's gradients (clipped by their global norm to
        grad_clip when given); returns the loss before the step. A non-finite loss or
        gradient raises InputError with the weights and the optimizer state unchanged."""
        loss, grads = self._gradients(input_ids, labels, keep=False)
        self.last_norm = self.optimizer.step(grads, max_norm=self.grad_clip)
        self._weights_changed()
        return loss
