"""Generation: a prefill plan and a decode plan over persistent KV caches, and sampling.

    ids = model.generate(prompt_ids, max_new_tokens=64)          # greedy
    ids = model.generate(prompt_ids, 64, temperature=0.8, top_p=0.95, seed=1)

Both plans go through the e-graph at their own sizes (models/kv.py builds them): the
prefill writes the prompt's K/V into the caches and computes the last row's logits; the
decode step takes one token and its position as device inputs, so on CUDA one captured
graph replays at every position. The caches belong to the session (allocated once per
capacity), not to a plan's buffer arena. Sampling stays on the device: greedy is an
argmax, sampling an argmax of probabilities over exponential noise (a multinomial draw
without a host round trip), seeded by `seed`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..models.kv import Generation
from ..models.registry import build
from ..pipeline import compile_graph
from ..runtime.compiled import CompiledModel, check_memory

CAPACITY_STEP = 256  # caches and plans are made for capacities rounded up to a multiple


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self, vocab: int) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(
                self.top_k, int) or not 1 <= self.top_k <= vocab):
            raise InputError(f"top_k must be an integer in [1, {vocab}], got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0 < p <= 1):
            raise InputError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed < 2 ** 63):
            raise InputError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """The next token id, [1] on the logits' device: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k ids and the top_p mass."""
    if params.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    x = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        probs, order = torch.softmax(x, -1).sort(descending=True)
        outside = probs.cumsum(-1) - probs > params.top_p  # keeps the id that crosses top_p
        x = x.masked_fill(outside.scatter(0, order, outside), float("-inf"))
    probs = torch.softmax(x, -1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / noise).argmax(-1, keepdim=True)


class LateIds:
    """Sampled ids read by the host without stalling the device: `send(t)` queues a copy of
    the device id t into pinned host memory and marks the stream; `take()` waits for the
    oldest id sent and returns it. Reading an id with int() would instead wait for all the
    work queued since (the next step included). Two ids may be in flight (a ring of two
    pinned slots); on the CPU an id is read as it is sent."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(1, dtype=torch.int64, pin_memory=True) for _ in range(2)] \
            if self.cuda else []
        self.pending: list = []
        self.sent = 0
        self.ready = 0.0  # when the id take() returned last was on the host

    def send(self, t: torch.Tensor) -> None:
        if not self.cuda:  # computed already (the CPU runs each step as it is queued)
            self.pending.append((int(t), time.perf_counter()))
            return
        slot = self.slots[self.sent % 2]
        slot.copy_(t.reshape(1), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((slot, done))
        self.sent += 1

    def take(self) -> int:
        """The oldest id sent; `ready` is then the time it was on the host (on the CPU, when
        it was sent: the steps queued since ran before the host asked for it)."""
        item = self.pending.pop(0)
        if not self.cuda:
            tok, self.ready = item
            return tok
        slot, done = item
        done.synchronize()
        self.ready = time.perf_counter()
        return int(slot[0])


@dataclass
class Session:
    """KV caches of one capacity and the plans that use them."""

    capacity: int
    caches: dict[str, torch.Tensor]
    prefills: dict[int, CompiledModel] = field(default_factory=dict)
    decode: CompiledModel | None = None


class Generator:
    """Generation for one model object (PretrainedModel): sessions by capacity."""

    def __init__(self, model):
        self.model = model
        self.sessions: dict[int, Session] = {}
        self.last_session: Session | None = None  # the caches and plans of the last call
        # decode steps launch each kernel as a programmatic dependent of the one before
        # (Hopper and later; set False before the first call to launch them plainly)
        self.dependent_launches = True
        self.last_stats: dict = {}
        # called with a line before and after each plan is built (the command line prints
        # them: on the CPU a plan takes seconds to minutes)
        self.on_phase = None

    def capacity_for(self, positions: int) -> int:
        return capacity_for(self.model.config, positions)

    def session(self, capacity: int) -> Session:
        """The caches for `capacity` positions, made once (their size is checked against the
        device's free memory first)."""
        if capacity not in self.sessions:
            m = self.model
            states = cache_shapes(m.config, capacity)
            check_cache_memory(states, capacity, m.dtype, m.device)
            caches = {name: torch.zeros(shape, dtype=m.dtype, device=m.device)
                      for name, shape in states.items()}
            self.sessions[capacity] = Session(capacity, caches)
        return self.sessions[capacity]

    def _plan(self, s: Session, seq_len: int, decode: bool) -> CompiledModel:
        m = self.model
        graph = build(m.config, seq_len, Generation(s.capacity, decode))
        return compile_graph(graph, m.weights, m.setup, state=s.caches,
                             dependent_launches=decode and self.dependent_launches)

    def prefill_plan(self, s: Session, seq_len: int) -> CompiledModel:
        """The prefill of seq_len tokens, its kernels built by one run on token 0: what that
        run writes into the caches is overwritten by every real prefill before it is read."""
        if seq_len not in s.prefills:
            t0 = self._phase(f"building the prefill plan ({seq_len} tokens)")
            fn = self._plan(s, seq_len, False)
            fn(torch.zeros(seq_len, dtype=torch.int64, device=self.model.device), copy=False)
            s.prefills[seq_len] = fn
            self._phase(f"prefill plan ready in {time.perf_counter() - t0:.1f} s")
        return s.prefills[seq_len]

    def decode_plan(self, s: Session) -> CompiledModel:
        """The decode step, its kernels built (and on CUDA its graph captured) by one run at
        position 0, whose cache slot a real step writes before any step reads it."""
        if s.decode is None:
            t0 = self._phase("building the decode plan (1 token)")
            fn = self._plan(s, 1, True)
            zero = torch.zeros(1, dtype=torch.int64, device=self.model.device)
            fn(zero, zero, copy=False)
            s.decode = fn
            self._phase(f"decode plan ready in {time.perf_counter() - t0:.1f} s")
        return s.decode

    def _phase(self, line: str) -> float:
        if self.on_phase is not None:
            self.on_phase(line)
        return time.perf_counter()

    def generate(self, token_ids, max_new_tokens: int, params: SamplingParams, stop=None,
                 on_token=None, on_logits=None, on_step=None) -> torch.Tensor:
        """See PretrainedModel.generate; on_logits(logits [vocab]) sees each step's logits
        before the next id is drawn from them (checks compare them with full forwards);
        on_step() is called after each step's work is queued, before the host waits for its
        id (benchmarks record CUDA events there).

        The device runs one step ahead of the host: step t + 1 is queued with step t's id
        still on the device, before the host reads that id (copied to pinned memory behind
        step t, not behind step t + 1) to stream it and test it against the stop ids. A stop
        found that way leaves one step computed and unused (on_logits and on_step have seen
        it)."""
        m = self.model
        prompt, stops, capacity = check_request(m.config, token_ids, max_new_tokens, params, stop,
                                                m.eos_token_ids)
        if on_token is not None and not callable(on_token):
            raise InputError("on_token must be callable (it is called with each new id)")
        if max_new_tokens == 0:
            return prompt
        s = self.session(capacity)
        self.last_session = s
        dev = m.device
        gen = torch.Generator(device=dev).manual_seed(params.seed) if params.seed is not None \
            else None
        t0 = time.perf_counter()
        prefill, decode = self.prefill_plan(s, prompt.numel()), self.decode_plan(s)
        # every step's position, on the device once: step t reads row t
        positions = torch.arange(prompt.numel(), prompt.numel() + max_new_tokens,
                                 dtype=torch.int64).to(dev)
        t_ready = time.perf_counter()
        logits = prefill(prompt.to(dev), copy=False)
        if on_logits is not None:
            on_logits(logits[-1])
        nxt = sample(logits[-1], params, gen)
        ids = LateIds(dev)
        ids.send(nxt)
        if on_step is not None:
            on_step()
        new: list[int] = []
        t_first = t_end = None
        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1
            if not last:  # queue the next step before waiting for this one's id
                logits = decode.run_trusted(nxt, positions[step:step + 1])
                if on_logits is not None:
                    on_logits(logits[-1])
                following = sample(logits[-1], params, gen)
                ids.send(following)
                if on_step is not None:
                    on_step()
            tok = ids.take()  # the host needs it: streaming and the stop test
            if t_first is None:
                t_first = ids.ready
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            t_end = ids.ready
            if tok in stops or last:
                break
            nxt = following
        self.last_stats = {"prompt_tokens": prompt.numel(), "new_tokens": len(new),
                           "plans_s": t_ready - t0, "time_to_first_token_s": t_first - t_ready,
                           "decode_s": t_end - t_first}
        return torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)])


def capacity_for(config, positions: int) -> int:
    """Cache capacity for `positions` (prompt + new tokens): rounded up to CAPACITY_STEP, never
    past the model's max_position_embeddings (a request beyond it is refused)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and positions > limit:
        raise InputError(f"the prompt and the new tokens need {positions} positions, the model "
                         f"has {limit} (max_position_embeddings)")
    cap = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
    return min(cap, limit) if limit is not None else cap


def cache_shapes(config, capacity: int) -> dict[str, tuple[int, ...]]:
    """The KV caches a session of `capacity` positions holds: name -> shape."""
    decode = build(config, 1, Generation(capacity, decode=True))
    return {n.name: tuple(n.shape) for n in decode.states()}


def check_cache_memory(states: dict, capacity: int, dtype: torch.dtype, device: torch.device,
                       extra: int = 0, extra_what: str = "") -> None:
    """Refuses (MeganeuraError) caches that do not fit the device's free memory, before any
    is made; `extra` bytes (e.g. the weights, not loaded yet) must fit beside them."""
    size = torch.empty((), dtype=dtype).element_size()
    need = sum(math.prod(shape) for shape in states.values()) * size
    check_memory(need + extra, device, f"the KV caches for {capacity} positions{extra_what} "
                 f"need {{}}")


def check_request(config, token_ids, max_new_tokens, params: SamplingParams, stop,
                  eos: tuple[int, ...]) -> tuple[torch.Tensor, set[int], int]:
    """(prompt ids on the CPU, stop ids, cache capacity) of a valid request; InputError for
    anything out of range. Nothing is allocated on the device."""
    prompt = _prompt(token_ids, config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # (a count beyond the model's positions is refused by capacity_for, naming them)
    params.check(config.vocab_size)
    stops = _stop_ids(stop, eos, config.vocab_size)
    return prompt, stops, capacity_for(config, prompt.numel() + max_new_tokens)


def _prompt(token_ids, vocab: int) -> torch.Tensor:
    if isinstance(token_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise InputError("token ids must be integers")
        if any(not -2 ** 63 <= t < 2 ** 63 for t in token_ids):
            raise InputError(f"token ids must lie in [0, {vocab})")
        token_ids = torch.tensor(token_ids, dtype=torch.int64)
    if not isinstance(token_ids, torch.Tensor):
        raise InputError(f"token ids must be a 1-D tensor or a list, got {type(token_ids).__name__}")
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise InputError(f"the prompt must be a non-empty 1-D sequence of ids, got shape "
                         f"{list(token_ids.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"token ids must be integers, got {token_ids.dtype}")
    ids = token_ids.detach().to("cpu", torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return ids


def _stop_ids(stop, default: tuple[int, ...], vocab: int) -> set[int]:
    if stop is None:
        return set(default)
    if isinstance(stop, int) and not isinstance(stop, bool):
        stop = [stop]
    if isinstance(stop, torch.Tensor):
        if stop.dim() > 1 or stop.dtype.is_floating_point or stop.dtype.is_complex or \
                stop.dtype == torch.bool:
            raise InputError(f"stop must be a token id or a list of ids: a tensor of them must "
                             f"be 0-D or 1-D integers, got shape {list(stop.shape)} {stop.dtype}")
        stop = stop.reshape(-1).tolist()
    try:
        ids = list(stop)
    except TypeError:
        raise InputError(f"stop must be a token id or a list of ids, got "
                         f"{type(stop).__name__}") from None
    bad = [t for t in ids
           if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)]
    if bad:
        raise InputError(f"stop ids must be integers in [0, {vocab}), got {str(bad[0])[:40]}")
    return set(ids)
