"""Generation: prompts prefilled in chunks through persistent KV caches, decode steps over
one or several sequences, and sampling.

    ids = model.generate(prompt_ids, max_new_tokens=64)          # greedy
    ids = model.generate(prompt_ids, 64, temperature=0.8, top_p=0.95, seed=1)
    outs = model.generate([ids_a, ids_b], 64)                    # several prompts at once

Every plan goes through the e-graph at its own size (models/kv.py builds them), and a few
plans serve every request:
- prefill chunks of a few sizes (CHUNKS rows, 16 to 2048): a prompt of any length is a run of chunks
  at consecutive positions, the last one padded past the prompt (its padding rows are
  written into cache slots that decode steps overwrite before any row reads them; their
  logits are not read: the chunk's logits row is a device input). The run is the cheapest
  one: on CUDA each chunk size priced by its time, measured when its plan is made (a chunk
  costs a pass over the weights and its launches whatever its rows; priced by the plans'
  estimates, prompts just past a size took a run of small chunks: 2629 tokens 64.1 ms
  against 56.8 for 3050 in one H200 run at b0d3597), elsewhere by its plan's estimate;
- a decode step: one row per sequence, each at its own position (a device input), so on
  CUDA one captured graph replays at every position.
Their extracted plans are kept in the kernel cache directory (pipeline.cached_plan): a new
process making the same plans reads them instead of running the e-graph again.
Plans belong to a session: KV caches of one capacity for one or several sequences
(allocated once, checked against free memory first). A new request reuses a session that
holds it, or replaces it with a larger one (capacities grow by eighths of powers of two); at most
MAX_SESSIONS sessions are kept, the least recently used dropped with their plans, so the
plans a model keeps are bounded (`Generator.plan_count()`). Several prompts are prefilled
one after the other in a one-sequence session, their caches then copied into their block
of the batch's caches. Sampling stays on the device: greedy is an argmax, sampling an
argmax of probabilities over exponential noise (a multinomial draw without a host round
trip), seeded by `seed` (sequence i of a batch by seed + i: a prompt draws the same ids
alone or in a batch).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import InputError, MeganeuraError
from ..models.kv import Generation
from ..models.registry import build
from ..pipeline import compile_graph
from ..runtime.compiled import CompiledModel, check_memory, timed

CAPACITY_STEP = 256  # the smallest capacity
CHUNKS = (16, 64, 256, 512, 1024, 2048)  # prefill chunk sizes (rows)
MEASURE_RUNS = 3  # timed runs of a chunk plan when it is made (the least is its price)
MAX_SESSIONS = 2  # a one-sequence session and a batch's, say
MIN_CAPACITY = 8192  # on CUDA, a one-sequence session holds at least this many positions
MAX_EXACT = 4  # whole-prompt prefill plans a session keeps (benchmarks compare with them)


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


def sample_rows(logits: torch.Tensor, params: SamplingParams, gens: list) -> torch.Tensor:
    """The next id of each row of logits [rows, vocab] (row i drawn with gens[i]): [rows]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.cat([sample(logits[i], params, gens[i]) for i in range(logits.shape[0])])


class LateIds:
    """Sampled ids read by the host without stalling the device: `send(t)` queues a copy of
    the device ids t ([width]) into pinned host memory and marks the stream; `take()` waits
    for the oldest ids sent and returns them. Reading ids with tolist() would instead wait for
    all the work queued since (the next step included). Two sends may be in flight (a ring
    of two pinned slots); on the CPU ids are read as they are sent."""

    def __init__(self, device: torch.device, width: int = 1):
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(width, dtype=torch.int64, pin_memory=True) for _ in range(2)] \
            if self.cuda else []
        self.pending: list = []
        self.sent = 0
        self.ready = 0.0  # when the ids take() returned last were on the host

    def send(self, t: torch.Tensor) -> None:
        if not self.cuda:  # computed already (the CPU runs each step as it is queued)
            self.pending.append((t.reshape(-1).tolist(), time.perf_counter()))
            return
        slot = self.slots[self.sent % 2]
        slot.copy_(t.reshape(-1), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((slot, done))
        self.sent += 1

    def take(self) -> list[int]:
        """The oldest ids sent; `ready` is then the time they were on the host (on the CPU,
        when they were sent: the steps queued since ran before the host asked for them)."""
        item = self.pending.pop(0)
        if not self.cuda:
            ids, self.ready = item
            return ids
        slot, done = item
        done.synchronize()
        self.ready = time.perf_counter()
        return slot.tolist()


@dataclass
class Session:
    """KV caches of one capacity for `sequences` sequences, and the plans that use them
    (in least-recently-used order)."""

    capacity: int
    sequences: int
    reach: int  # the most rows a chunk takes (the sliding rings' extra slots)
    caches: dict[str, torch.Tensor]
    plans: OrderedDict = field(default_factory=OrderedDict)
    # one sequence: the ids whose keys and values the caches hold at positions 0, 1, ...,
    # and how many of them the last prefill wrote (a conversation's next turn reuses them)
    held: list = field(default_factory=list)
    prefilled: int = 0
    measured: dict = field(default_factory=dict)  # chunk rows -> seconds a run took

    @property
    def decode(self) -> CompiledModel | None:
        return self.plans.get(("step",))


class Generator:
    """Generation for one model object (PretrainedModel): sessions of caches and their plans."""

    def __init__(self, model):
        self.model = model
        self.sessions: list[Session] = []  # least recently used first
        self.last_session: Session | None = None  # the caches and plans of the last call
        self.chunks = CHUNKS  # prefill chunk sizes; a session made later uses them
        # at least 2: a batch uses its own session and the one-sequence one
        self.max_sessions = MAX_SESSIONS
        # decode steps launch each kernel as a programmatic dependent of the one before
        # (Hopper and later; set False before the first call to launch them plainly)
        self.dependent_launches = True
        # one-sequence decode steps as one persistent kernel of this many programs (0: one
        # per SM; codegen/megakernel.py), from the step's next use on; None: its launches
        self.megakernel: int | None = None
        # its build: registers (a thread's at most) and prefetch (bytes of weights a task
        # asks L2 for before it waits); codegen/megakernel.Megakernel's options
        self.megakernel_options: dict = {}
        # chunk plans timed when made, their times the schedule's prices (on CUDA; on the
        # interpreter a run's time says nothing of a GPU's and takes seconds)
        self.measure_chunks = model.device.type == "cuda"
        self.last_stats: dict = {}
        self._chunk_costs: dict[tuple, float] = {}  # chunk -> estimated s, unplanned
        # called with a line before and after each plan is built (the command line prints
        # them: on the CPU a plan takes seconds to minutes)
        self.on_phase = None

    # ---- sessions and plans ----------------------------------------------------------------

    def forget_plans(self) -> None:
        """Drops every plan and what the caches hold (the weights or the graph changed: a
        plan may keep load-time copies of weights, and cached keys came from the old ones)."""
        for s in self.sessions:
            s.plans.clear()
            s.measured.clear()
            s.held, s.prefilled = [], 0
        self._chunk_costs.clear()

    def plan_count(self) -> int:
        return sum(len(s.plans) for s in self.sessions)

    def capacity_for(self, positions: int) -> int:
        return capacity_for(self.model.config, positions)

    def session(self, positions: int, sequences: int = 1, floor: bool = True) -> Session:
        """A session whose caches hold `positions` positions of `sequences` sequences: the
        last one that does, else a new one (replacing a smaller one of as many sequences;
        its caches are checked against the device's free memory first). floor: on CUDA a
        new one-sequence session holds at least MIN_CAPACITY positions (False: just what
        is asked, as benchmarks of a given context want)."""
        for s in self.sessions:
            if s.sequences == sequences and s.capacity >= positions:
                self.sessions.remove(s)
                self.sessions.append(s)
                return s
        capacity = self.capacity_for(positions)
        old = [s for s in self.sessions if s.sequences == sequences]
        capacity = max([capacity] + [s.capacity for s in old])
        m = self.model
        # on CUDA one size serves most requests (and the plans kept for it serve the next
        # process): MIN_CAPACITY where it fits
        if floor and m.device.type == "cuda" and sequences == 1:
            least = self.capacity_for(min(MIN_CAPACITY, getattr(
                m.config, "max_position_embeddings", None) or MIN_CAPACITY))
            if least > capacity:
                try:
                    check_cache_memory(cache_shapes(m.config, least, 1, min(max(self.chunks),
                                                                            least)),
                                       least, m.dtype, m.device, extra=1 << 30)
                    capacity = least
                except MeganeuraError:
                    pass
        for s in old:  # its caches go before the larger ones are made
            self.sessions.remove(s)
        while len(self.sessions) >= self.max_sessions:
            self.sessions.pop(0)
        if self.last_session is not None and self.last_session not in self.sessions:
            self.last_session = None
        # a batch's caches take one row per sequence a step (its prompts are prefilled in
        # the one-sequence caches): rings of the window alone
        reach = min(max(self.chunks), capacity) if sequences == 1 else 1
        states = cache_shapes(m.config, capacity, sequences, reach)
        check_cache_memory(states, capacity, m.dtype, m.device)
        caches = {name: torch.zeros(shape, dtype=m.dtype, device=m.device)
                  for name, shape in states.items()}
        s = Session(capacity, sequences, reach, caches)
        self.sessions.append(s)
        return s

    def _plan(self, s: Session, key: tuple, what: str, rows: int, gen: Generation,
              inputs: list[torch.Tensor]) -> CompiledModel:
        """The session's plan `key`, made (and its kernels built by one run on `inputs`) on
        first use."""
        if key in s.plans:
            s.plans.move_to_end(key)
            return s.plans[key]
        m = self.model
        t0 = self._phase(f"building the {what} plan")
        fn = compile_graph(m.build(rows, gen), m.weights, m.setup, state=s.caches,
                           dependent_launches=key == ("step",) and self.dependent_launches,
                           keep_plan=True)
        fn(*inputs, copy=False)
        s.held, s.prefilled = [], 0  # (that run wrote its rows into the caches)
        s.plans[key] = fn
        self._phase(f"{what} plan ready in {time.perf_counter() - t0:.1f} s")
        return fn

    def chunk_plan(self, s: Session, rows: int) -> CompiledModel:
        """A prefill chunk of `rows` rows at device-given positions, the logits of a
        device-given row. Its kernels are built by one run at positions 0 .. rows-1 (before
        any prompt of the call is written)."""
        dev = self.model.device
        z = torch.zeros(rows, dtype=torch.int64, device=dev)
        pos = torch.arange(rows, dtype=torch.int64, device=dev)
        gen = Generation(s.capacity, True, 1, s.reach, "row")
        made = ("chunk", rows) not in s.plans
        fn = self._plan(s, ("chunk", rows), f"prefill chunk ({rows} tokens)", rows, gen,
                        [z, pos, z[:1]])
        # timed only as it is made, before any prompt is written (a later run would
        # overwrite a prompt's first positions)
        if made and self.measure_chunks:
            # random ids: rows of one id would all route alike through experts
            ids = torch.randint(0, self.model.config.vocab_size, (rows,),
                                generator=torch.Generator().manual_seed(rows)).to(dev)
            s.measured[rows] = self._measure(fn, [ids, pos, z[:1]])
            s.held, s.prefilled = [], 0  # (the runs wrote their rows into the caches)
        return fn

    def _measure(self, fn: CompiledModel, inputs: list[torch.Tensor]) -> float:
        """Seconds of a run of fn (queued from the host, the device waited for): the least
        of MEASURE_RUNS after one more (a captured graph's first replay). Times vary between
        processes, and so may a prompt's chunks where two runs price alike: its logits then
        differ by bf16 rounding (measure_chunks = False keeps the estimates' fixed runs)."""
        run = lambda: timed(lambda: fn.run_trusted(*inputs), self.model.device)  # noqa: E731
        run()
        return min(run() for _ in range(MEASURE_RUNS))

    def decode_plan(self, s: Session) -> CompiledModel:
        """The decode step: a row per sequence at its position; on CUDA its graph captured by
        one run at position 0, whose slot a real step writes before any step reads it. (For
        callers that run it themselves: what the caches held is forgotten.)"""
        s.held, s.prefilled = [], 0
        return self._decode_plan(s)

    def _decode_plan(self, s: Session) -> CompiledModel:
        b = s.sequences
        z = torch.zeros(b, dtype=torch.int64, device=self.model.device)
        gen = Generation(s.capacity, True, b, s.reach, "all" if b > 1 else "last")
        what = "decode" + (f" ({b} sequences)" if b > 1 else "")
        step = self._plan(s, ("step",), what, b, gen, [z, z])
        if self.megakernel is not None and b == 1 and step.persistent is None:
            step.use_persistent(self._persistent(step))
        return step

    def _persistent(self, step: CompiledModel):
        """The decode step as one persistent kernel of `self.megakernel` programs (0: one
        per SM; one on the interpreter, which runs programs one after another)."""
        from ..codegen.megakernel import Megakernel
        from ..compiler.schedule import build, works_of

        dev = self.model.device
        programs = self.megakernel or (torch.cuda.get_device_properties(dev).multi_processor_count
                                       if dev.type == "cuda" else 1)
        return Megakernel(step, build(works_of(step), programs), **self.megakernel_options)

    def prefill_plan(self, s: Session, seq_len: int) -> CompiledModel:
        """The whole prompt of seq_len tokens from position 0 in one plan (benchmarks compare
        chunked prefills with it); kernels built by one run on token 0."""
        s.held, s.prefilled = [], 0  # (its caller runs it: what the caches held is forgotten)
        exact = [k for k in s.plans if k[0] == "prefill" and k[1] != seq_len]
        for k in exact[:max(0, len(exact) - MAX_EXACT + 1)]:  # the least recently used go
            del s.plans[k]
        z = torch.zeros(seq_len, dtype=torch.int64, device=self.model.device)
        gen = Generation(s.capacity, False, 1, s.reach)
        return self._plan(s, ("prefill", seq_len), f"prefill ({seq_len} tokens)", seq_len, gen,
                          [z])

    def warmup(self, max_tokens: int, sequences: int = 1) -> None:
        """Makes the session for prompts and new tokens of up to `max_tokens` positions and
        every plan it may use (the chunks, the decode step)."""
        s = self.session(max_tokens, 1)
        for c in self.chunk_sizes(s):
            self.chunk_plan(s, c)
        self._decode_plan(s)
        if sequences > 1:
            self._decode_plan(self.session(max_tokens, _batch_rows(sequences)))

    def chunk_sizes(self, s: Session) -> list[int]:
        """The chunk sizes a session takes: those within its reach (at least the reach)."""
        return sorted(c for c in self.chunks if c <= s.reach) or [s.reach]

    def chunk_cost(self, s: Session, rows: int) -> float:
        """Seconds of a chunk: its measured time (Generator.measure_chunks), else its plan's
        estimate once made (where none is measured), else the cost model's estimate of the
        chunk's graph before optimization times the ratio of the two known for the sizes
        that have them (so every size is priced alike)."""
        known = dict(s.measured) or {k[1]: f.plan.estimated_time for k, f in s.plans.items()
                                     if k[0] == "chunk"}
        if rows in known:
            return known[rows]
        ratio = (sum(t / self._unplanned(s, r) for r, t in known.items()) / len(known)
                 if known else 1.0)
        return self._unplanned(s, rows) * ratio

    def _unplanned(self, s: Session, rows: int) -> float:
        key = (s.capacity, s.reach, rows)
        if key not in self._chunk_costs:
            m = self.model
            g = m.build(rows, Generation(s.capacity, True, 1, s.reach, "row"))
            self._chunk_costs[key] = m.setup.cost.graph_time(g)
        return self._chunk_costs[key]

    def schedule(self, s: Session, n: int, start: int = 0,
                 costs: dict | None = None) -> list[tuple[int, int]]:
        """(start, rows) of the chunks that prefill tokens start .. n-1 in s, at consecutive
        positions, the last one padded past n: the run of least estimated time (by `costs`,
        chunk size -> seconds, when given)."""
        sizes = self.chunk_sizes(s)
        costs = costs or {c: self.chunk_cost(s, c) for c in sizes}
        return chunk_schedule(n, sizes, costs, s.capacity, start)

    def kept(self, s: Session, prompt: list[int]) -> int:
        """How many leading ids of prompt s's caches already hold (a conversation's earlier
        turns): their common prefix with what the caches hold, short of the last id (whose
        logits are wanted), if the sliding rings still hold every key the rest attends to
        (the prefix reaches past the last prefill and the caches hold at most `reach`
        positions beyond it); else 0."""
        held = s.held
        c = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            c += 1
        return c if c >= s.prefilled and len(held) - c <= s.reach else 0

    def _phase(self, line: str) -> float:
        if self.on_phase is not None:
            self.on_phase(line)
        return time.perf_counter()

    # ---- generation ------------------------------------------------------------------------

    def _prefill(self, s: Session, prompt: torch.Tensor, plan: list) -> torch.Tensor:
        """Runs the chunks of `plan` over prompt (in s's one-sequence caches): the logits of
        its last token, [vocab] on the device."""
        dev, n = self.model.device, prompt.numel()
        ids = torch.zeros(plan[-1][0] + plan[-1][1], dtype=torch.int64)
        ids[:n] = prompt
        ids = ids.to(dev)
        s.held, s.prefilled = [], 0  # (set again when the call ends well)
        logits = None
        for start, rows in plan:
            fn = self.chunk_plan(s, rows)
            pos = torch.arange(start, start + rows, dtype=torch.int64, device=dev)
            # (filled on the device: a copy from the host would wait for the chunks queued)
            row = torch.full((1,), min(n - start, rows) - 1, dtype=torch.int64, device=dev)
            logits = fn.run_trusted(ids[start:start + rows], pos, row)
        return logits[0]

    def generate(self, token_ids, max_new_tokens: int, params: SamplingParams, stop=None,
                 on_token=None, on_logits=None, on_step=None, reuse: bool = False) -> torch.Tensor:
        """See PretrainedModel.generate; on_logits(logits [vocab]) sees the prefill's and each
        step's logits before the next id is drawn from them (checks compare them with full forwards);
        on_step() is called after each step's work is queued, before the host waits for its
        id (benchmarks record CUDA events there). reuse: the leading ids the caches still hold
        from the last call (a chat's earlier turns) are not prefilled again (Generator.kept)."""
        m = self.model
        prompt, stops, _ = check_request(m.config, token_ids, max_new_tokens, params, stop,
                                         m.eos_token_ids)
        if on_token is not None and not callable(on_token):
            raise InputError("on_token must be callable (it is called with each new id)")
        if max_new_tokens == 0:
            return prompt
        tok = (lambda i, t: on_token(t)) if on_token is not None else None
        logit = (lambda x: on_logits(x[0])) if on_logits is not None else None
        return self._run([prompt], max_new_tokens, params, stops, tok, logit, on_step,
                         reuse)[0]

    def generate_batch(self, prompts, max_new_tokens: int, params: SamplingParams, stop=None,
                       on_token=None) -> list[torch.Tensor]:
        """Several prompts (a list of 1-D id sequences, any lengths): a list of prompt + new
        ids, each sequence stopping on its own. on_token(i, id) sees sequence i's new ids."""
        m = self.model
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("prompts must be a non-empty list of 1-D id sequences")
        checked = [check_request(m.config, p, max_new_tokens, params, stop, m.eos_token_ids)
                   for p in prompts]
        if on_token is not None and not callable(on_token):
            raise InputError("on_token must be callable (it is called with each new id)")
        if max_new_tokens == 0:
            return [p for p, _, _ in checked]
        return self._run([p for p, _, _ in checked], max_new_tokens, params, checked[0][1],
                         on_token, None, None)

    def _run(self, prompts: list[torch.Tensor], max_new_tokens: int, params: SamplingParams,
             stops: set[int], on_token, on_logits, on_step,
             reuse: bool = False) -> list[torch.Tensor]:
        """The decode loop. The device runs one step ahead of the host: step t + 1 is queued
        with step t's ids still on the device, before the host reads them (copied to pinned
        memory behind step t, not behind step t + 1) to stream them and test them against the
        stop ids. A stop found that way leaves one step computed and unused (on_logits and
        on_step have seen it). Finished sequences of a batch ride along (their rows are
        computed and not read) until every sequence has stopped."""
        dev, b = self.model.device, len(prompts)
        lengths = [p.numel() for p in prompts]
        t0 = time.perf_counter()
        # every plan the call uses is made before any prompt is written into the caches
        s = self.session(max(lengths) + max_new_tokens, _batch_rows(b)) if b > 1 else None
        one = self.session(max(lengths) + (max_new_tokens if b == 1 else 0), 1)
        s = s or one
        step = self._decode_plan(s)
        # the prices the runs are chosen by, fixed for the call (a plan made prices its size
        # anew: the runs chosen before it would change)
        costs = {c: self.chunk_cost(one, c) for c in self.chunk_sizes(one)}
        while True:  # (a plan made here writes into the caches: nothing is kept then)
            kept = self.kept(one, prompts[0].tolist()) if reuse and b == 1 else 0
            plans = [self.schedule(one, n, kept, costs) for n in lengths]
            missing = sorted({r for p in plans for _, r in p} -
                             {k[1] for k in one.plans if k[0] == "chunk"})
            if not missing:
                break
            for rows in missing:
                self.chunk_plan(one, rows)
        self.last_session = s
        rows = s.sequences
        gens = [torch.Generator(device=dev).manual_seed(params.seed + i)
                if params.seed is not None else None for i in range(b)]
        t_ready = time.perf_counter()
        first, seen = [], []
        for i, prompt in enumerate(prompts):
            logits = self._prefill(one, prompt, plans[i])
            if on_logits is not None:
                seen.append(logits.clone() if b > 1 else logits)
            first.append(sample(logits, params, gens[i]))
            if s is not one:  # into its block of the batch's caches
                copy_caches(one, s, i, lengths[i])
        if on_logits is not None:
            on_logits(torch.stack(seen))  # [sequences, vocab]
        # every row's position on the device; rows past the batch stay at 0
        pos = torch.zeros(rows, dtype=torch.int64)
        pos[:b] = torch.tensor(lengths)
        pos = pos.to(dev)
        advance = (torch.arange(rows) < b).to(torch.int64).to(dev)
        nxt = torch.zeros(rows, dtype=torch.int64, device=dev)
        nxt[:b] = torch.cat(first)
        ids = LateIds(dev, rows)
        ids.send(nxt)
        if on_step is not None:
            on_step()
        new: list[list[int]] = [[] for _ in range(b)]
        live = [True] * b
        t_first = t_end = None
        fed = 0  # steps run: their ids' keys and values are in the caches
        for k in range(max_new_tokens):
            last = k == max_new_tokens - 1
            if not last:  # queue the next step before waiting for this one's ids
                logits = step.run_trusted(nxt, pos)
                fed += 1
                if on_logits is not None:
                    on_logits(logits)
                following = torch.zeros_like(nxt)
                following[:b] = sample_rows(logits[:b], params, gens)
                ids.send(following)
                pos = pos + advance
                if on_step is not None:
                    on_step()
            got = ids.take()  # the host needs them: streaming and the stop test
            if t_first is None:
                t_first = ids.ready
            t_end = ids.ready
            for i in range(b):
                if live[i]:
                    new[i].append(got[i])
                    if on_token is not None:
                        on_token(i, got[i])
                    live[i] = got[i] not in stops
            if last or not any(live):
                break
            nxt = following
        if b == 1:  # what the caches now hold: the prompt and the ids fed back
            one.held, one.prefilled = prompts[0].tolist() + new[0][:fed], lengths[0]
        self.last_stats = {"prompt_tokens": sum(lengths), "new_tokens": sum(map(len, new)),
                           "sequences": b, "steps": max(map(len, new)), "reused_tokens": kept,
                           "plans_s": t_ready - t0, "time_to_first_token_s": t_first - t_ready,
                           "decode_s": t_end - t_first}
        return [torch.cat([p, torch.tensor(x, dtype=p.dtype)]) for p, x in zip(prompts, new)]


def _batch_rows(b: int) -> int:
    """Rows of the decode step that serves b sequences: the next power of two (a few plans
    serve every batch size; the rows past b are idle)."""
    return 1 << (b - 1).bit_length()


def chunk_schedule(n: int, sizes: list[int], costs: dict[int, float], capacity: int,
                   start: int = 0) -> list[tuple[int, int]]:
    """(start, rows) of chunks covering positions [start, n) one after the other, the last
    one padded past n but not past `capacity` (where it would be, it starts earlier instead,
    computing again positions before it: their ids are the prompt's, their keys and values
    the same): the run of least total cost (a dynamic program over the covered length, in
    steps of the sizes' common divisor)."""
    if n > capacity or not 0 <= start < n or not any(c <= capacity for c in sizes):
        raise InputError(f"{n} prompt tokens do not fit caches of {capacity} positions")
    sizes = [c for c in sizes if c <= capacity]
    step = math.gcd(*sizes)
    # best[d]: (cost, rows of the first chunk) to cover [d, n) from a covered length d
    best: dict[int, tuple[float, int]] = {}
    for d in range(start + (n - 1 - start) // step * step, start - 1, -step):
        options = []
        for c in sizes:
            if d + c >= n:  # the last chunk (moved back to end at the capacity if need be)
                options.append((costs[c], c))
            elif d + c <= capacity:
                options.append((costs[c] + best[d + c][0], c))
        best[d] = min(options)
    out, d = [], start
    while d < n:
        c = best[d][1]
        out.append((min(d, capacity - c), c))
        d += c
    return out


def copy_caches(src: Session, dst: Session, block: int, n: int) -> None:
    """The cached positions of a prompt of n tokens in src's one-sequence caches, into
    sequence `block`'s block of dst's caches (position p at slot p % slots of each)."""
    for name, t in src.caches.items():
        out = dst.caches[name]
        r_src, r_dst = t.shape[0], out.shape[0] // dst.sequences
        p = torch.arange(max(0, n - min(r_src, r_dst)), n, device=t.device)
        out[block * r_dst + p % r_dst] = t[p % r_src]


def capacity_for(config, positions: int) -> int:
    """Cache capacity for `positions` (prompt + new tokens): rounded up to an eighth of the
    next power of two (..., 4096, 5120, 6144, 7168, 8192, 10240, ...: at most 25 % more, and
    few distinct sizes), at least CAPACITY_STEP, never past the model's
    max_position_embeddings (a request beyond it is refused)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and positions > limit:
        raise InputError(f"the prompt and the new tokens need {positions} positions, the model "
                         f"has {limit} (max_position_embeddings)")
    eighth = max(1, (1 << (positions - 1).bit_length()) // 8)
    cap = max(CAPACITY_STEP, -(-positions // eighth) * eighth)
    return min(cap, limit) if limit is not None else cap


def cache_shapes(config, capacity: int, sequences: int = 1,
                 reach: int = CHUNKS[-1]) -> dict[str, tuple[int, ...]]:
    """The KV caches a session of `capacity` positions for `sequences` sequences holds, its
    chunks of up to `reach` rows: name -> shape."""
    reach = min(reach, capacity)
    step = build(config, sequences, Generation(capacity, True, sequences, reach,
                                               "all" if sequences > 1 else "last"))
    return {n.name: tuple(n.shape) for n in step.states()}


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
