"""`meganeura.from_pretrained`: a checkpoint directory as a model object.

    model = meganeura.from_pretrained("path/to/gemma-4-E4B-it")
    logits = model(token_ids)          # [len(token_ids), vocab]
    ids = model.generate(token_ids, max_new_tokens=64)

The weights are loaded once, onto the device in the plan dtype; a plan is optimized and
its kernels compiled the first time a sequence length is seen, and kept (every plan reads
the same weight tensors). Calls are serialized: one model may be shared by threads.
`meganeura.from_config` makes the same object from a config and weights (random ones by
default), for any family's config or preset (models.PRESETS).
"""

from __future__ import annotations

import threading

import torch

from ..errors import InputError, WeightsError
from ..models.checkpoint import Checkpoint, open_checkpoint
from ..models.registry import build, family, num_parameters
from ..models.weights import load_weights, random_weights
from ..pipeline import Setup, compile_graph, setup
from ..runtime.compiled import CompiledModel, check_memory
from .generation import Generator, SamplingParams


class PretrainedModel:
    """A loaded model: `model(token_ids)` -> logits; compiled plans kept per sequence length."""

    def __init__(self, config, weights: dict, s: Setup, checkpoint: Checkpoint | None = None):
        self.config = config
        self.family = family(config)
        self.checkpoint = checkpoint
        self.weights = weights
        self.setup = s
        self.device, self.dtype = s.device, s.dtype
        self.plans: dict[int, CompiledModel] = {}
        self.report = None  # the report of the plan compiled or run last
        self.eos_token_ids: tuple[int, ...] = checkpoint.eos_token_ids if checkpoint else ()
        self.generator = Generator(self)
        self.lora = None  # LoRA adapters a Trainer attached (their weights in self.weights)
        self._lock = threading.Lock()

    @property
    def notes(self) -> list[str]:
        return self.checkpoint.notes if self.checkpoint else []

    def build(self, seq_len: int, generation=None):
        """The model's graph (the family's, with the LoRA adapters a Trainer attached)."""
        g = build(self.config, seq_len, generation)
        if self.lora is not None:
            from ..training.trainer import with_lora

            g = with_lora(g, self.lora)[0]
        return g

    def attach_lora(self, lora, adapters: dict) -> None:
        """Every graph made from now on carries these adapters (Trainer(lora=...) does this);
        `merged_weights` folds them into the base weights."""
        with self._lock:
            self.weights.update(adapters)
            self.lora = lora
            self._forget_plans()

    def merged_weights(self) -> dict:
        """The weights in the family's layout, the LoRA adapters folded in when attached."""
        if self.lora is None:
            return self.weights
        from ..training.trainer import merged

        return merged(self.weights, self.lora)

    def all_weights(self) -> dict:
        """Every tensor the model's graphs read by name (adapters included)."""
        return self.weights

    def weights_changed(self) -> None:
        """Called after the weights were updated in place (a training step): plans that
        hold load-time copies of them and the KV caches' contents are dropped."""
        with self._lock:
            self._forget_plans()

    def _forget_plans(self) -> None:
        self.plans.clear()
        self.generator.forget_plans()

    def compiled(self, seq_len: int) -> CompiledModel:
        """The compiled prefill plan for `seq_len` tokens (optimized and compiled on first use)."""
        if seq_len not in self.plans:
            self.plans[seq_len] = compile_graph(self.build(seq_len), self.weights, self.setup)
        return self.plans[seq_len]

    def __call__(self, token_ids: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """Logits [len(token_ids), vocab] of a 1-D integer tensor of token ids, a tensor the
        caller owns. copy=False returns the plan's output buffer itself (no copy: the next
        call with as many tokens overwrites it), for loops that read each result at once."""
        if not isinstance(token_ids, torch.Tensor):
            raise InputError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise InputError(f"token_ids must be a non-empty 1-D tensor, got shape "
                             f"{list(token_ids.shape)}")
        with self._lock:
            fn = self.compiled(token_ids.shape[0])
            self.report = fn.report
            return fn(token_ids.to(self.device), copy=copy)

    def save_pretrained(self, directory, overwrite: bool = False, lora: str = "merge"):
        """Writes the model as a checkpoint directory that transformers and from_pretrained
        load (config.json, model.safetensors in the weights' dtype, the read checkpoint's
        generation config and tokenizer files; LoRA adapters merged into the weights); see
        models.checkpoint.save_checkpoint. lora="adapter" writes the adapters alone, as
        peft saves them (for peft.PeftModel.from_pretrained on the base checkpoint)."""
        from ..models.checkpoint import save_checkpoint

        if lora not in ("merge", "adapter"):
            raise InputError(f"lora must be 'merge' or 'adapter', got {lora!r}")
        if lora == "adapter":
            from ..training.trainer import save_adapter

            with self._lock:
                return save_adapter(directory, self, overwrite)
        with self._lock:
            return save_checkpoint(directory, self.config, self.merged_weights(),
                                   self.checkpoint, overwrite)

    def generate(self, token_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop=None, on_token=None):
        """The prompt followed by up to max_new_tokens new ids (1-D int64, on the CPU); given
        a list of prompts (1-D tensors of any lengths), a list of them, decoded together.

        Greedy at temperature 0; else a draw from softmax(logits / temperature) over the
        top_k ids and the top_p probability mass, reproducible for a given seed (prompt i of
        a list drawn with seed + i). Stops after an end-of-sequence id (the checkpoint's
        generation_config.json or config.json) or one of `stop` when given (which replaces
        them), each prompt of a list on its own. on_token(id) is called with each new id as
        it is produced (for a list: on_token(i, id)). The KV caches hold the prompt and the
        new tokens (never more than max_position_embeddings): a request beyond raises before
        anything is allocated. Prompts of any length share a few plans (see
        inference/generation.py); `model.generator.last_stats` has the counts and times of
        the last call.
        """
        with self._lock:
            params = SamplingParams(temperature, top_k, top_p, seed)
            if isinstance(token_ids, list) and token_ids and all(
                    isinstance(t, (torch.Tensor, list, tuple)) for t in token_ids):
                out = self.generator.generate_batch(token_ids, max_new_tokens, params, stop,
                                                    on_token)
            else:
                out = self.generator.generate(token_ids, max_new_tokens, params, stop, on_token)
            s = self.generator.last_session
            if s is not None and s.decode is not None:
                self.report = s.decode.report
            return out

    def warmup(self, max_tokens: int, sequences: int = 1) -> None:
        """Makes, ahead of the first request, the caches and every plan that prompts and new
        tokens of up to max_tokens positions use (and a decode step for `sequences` prompts
        at once): the first token then waits for no plan."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1:
            raise InputError(f"sequences must be an integer >= 1, got {sequences!r}")
        with self._lock:
            self.generator.capacity_for(max_tokens)  # refuses a count beyond the model
            self.generator.warmup(max_tokens, sequences)


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the config's weights in `dtype`."""
    return num_parameters(config) * torch.empty((), dtype=dtype).element_size()


def check_weight_memory(config, dtype: torch.dtype, device: torch.device) -> None:
    """Refuses weights that do not fit the device's free memory, before one is made."""
    check_memory(weight_bytes(config, dtype), device, "the weights need {}")


def from_config(config, weights: dict | None = None, device=None, dtype=None, cache_dir=None,
                profile=None, seed: int = 0, debug=None) -> PretrainedModel:
    """A model object for a config (a preset of any family): its weights in graph layout,
    or deterministic random ones from `seed`. debug: channels of the pipeline to print
    (egraph, plan, kernels, timing), as for meganeura.compile."""
    s = setup(device, dtype, profile, cache_dir, debug)
    device, dtype = s.device, s.dtype
    if weights is None:
        check_weight_memory(config, dtype, device)
        weights = random_weights(config, seed, dtype, device)
    if not isinstance(weights, dict):
        raise WeightsError(f"weights must be a dict of name -> tensor, got {type(weights).__name__}")
    weights = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
               for k, v in weights.items()}
    return PretrainedModel(config, weights, s)


def from_pretrained(path, device=None, dtype=None, cache_dir=None, profile=None,
                    debug=None) -> PretrainedModel:
    """Loads a checkpoint directory (config.json + safetensors) of any family of
    models.registry.FAMILIES, chosen by config.json's `model_type`: Llama (`llama`), Qwen3
    (`qwen3`), the published Gemma-4 (`gemma4_text`, or the text decoder of `gemma4`), or the
    seed's model (its field names, no `model_type`).

    device: "cuda" or "cpu" (default: cuda when available); dtype: torch.bfloat16 or
    torch.float32 (default: bf16 on cuda, fp32 on cpu); the stored dtype (bf16, fp16,
    fp32) is cast once at load. cache_dir: the kernel source cache. Nothing is downloaded.
    """
    s = setup(device, dtype, profile, cache_dir, debug)
    ck = open_checkpoint(path)  # a directory, or a model id in the local Hugging Face cache
    check_weight_memory(ck.config, s.dtype, s.device)
    weights = load_weights(ck.path, ck.config, s.dtype, s.device, ck.rename)
    return PretrainedModel(ck.config, weights, s, ck)
