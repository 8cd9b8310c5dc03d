"""What each CLI subcommand does, once its arguments have parsed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import ConfigError, MeganeuraError
from ..models import MODEL_NAMES, PRESETS, build, family, num_parameters
from ..models.weights import check_weights, load_weights, random_weights
from ..inference.pretrained import check_weight_memory, weight_bytes
from ..pipeline import Setup, bind, kernel_sources, optimize_graph, setup
from ..runtime.check import relative_error


def resolve_model(args):
    """(config, name, checkpoint or None) from --weights DIR (a checkpoint directory with its
    config.json), --config FILE or --model NAME."""
    from ..models.checkpoint import (CONFIG_NAME, config_of, looks_like_model_id, open_checkpoint,
                                     probe, read_json, resolve)

    if args.weights and looks_like_model_id(args.weights):  # a model id: its cached snapshot
        args.weights = str(resolve(args.weights))
    kind = probe(args.weights, "--weights") if args.weights else None
    if kind == "dir" and probe(Path(args.weights) / CONFIG_NAME, "--weights") is not None:
        if args.model or args.config:
            raise MeganeuraError(f"--weights {args.weights} holds its own config.json: leave out "
                                 f"--model and --config")
        ck = open_checkpoint(args.weights)
        return ck.config, str(args.weights), ck
    if kind == "dir" and not (args.model or args.config):
        raise ConfigError(f"--weights {args.weights}: no {CONFIG_NAME} in this directory (a "
                          f"checkpoint directory holds one; for bare weights name their model "
                          f"with --model or --config)")
    if args.config:
        ck = config_of(read_json(Path(args.config), "config"), args.config)
        return ck.config, args.config, ck
    from . import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    return PRESETS[MODEL_NAMES[name]], name, None


def resolve_setup(args, run: bool = True) -> Setup:
    """The pipeline's Setup from the flags, with the library's defaults and checks (what
    running needs only when the command runs the model)."""
    return setup(args.device, args.dtype, args.profile, args.cache_dir, args.debug, run)


def token_ids(args, seq_len: int, vocab: int) -> torch.Tensor:
    if args.tokens is not None:
        ids = torch.tensor(args.tokens, dtype=torch.int64)
        bad = [t for t in args.tokens if not 0 <= t < vocab]
        if bad:
            raise MeganeuraError(f"--tokens: id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (seq_len,), generator=gen)


def print_summary(name: str, config, graph, seq_len: int) -> None:
    print(f"model {name}: {family(config).summary(config)}")
    print(f"parameters: {num_parameters(config):,} in {len(graph.parameters())} tensors")
    counts = graph.op_counts()
    ops = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"graph: {len(graph)} nodes at seq_len {seq_len}: {ops}")


def print_top_tokens(logits: torch.Tensor, k: int) -> None:
    probs = torch.softmax(logits[-1].float(), dim=-1)
    p, idx = probs.topk(min(k, probs.numel()))
    top = ", ".join(f"{i} ({v:.4f})" for i, v in zip(idx.tolist(), p.tolist()))
    print(f"top tokens at position {logits.shape[0] - 1}: {top}")


def cmd_compile(args) -> int:
    config, name, ck = resolve_model(args)
    if args.tokens is not None and not args.tokens:
        raise MeganeuraError("--tokens: give at least one token id")
    seq_len = len(args.tokens) if args.tokens is not None else args.seq_len
    s = resolve_setup(args, run=args.run)
    if args.emit_dir:
        check_emit_dir(Path(args.emit_dir))
    if args.run:
        warn_cpu_size(config, s.device)
    graph = build(config, seq_len)
    graph.validate()
    for note in ck.notes if ck else []:
        print(f"{'checkpoint' if ck.path else 'config'}: {note}")
    print_summary(name, config, graph, seq_len)
    if args.weights:
        stored = check_weights(args.weights, config, ck.rename if ck else None)
        print(f"weights: {args.weights}: {len(stored)} tensors, names and shapes match")
    plan, report, optimize_s = optimize_and_report(args, graph, s)
    if args.run:
        run_compiled(args, config, graph, plan, report, s, optimize_s, ck.rename if ck else None)
    return 0


def optimize_and_report(args, graph, s: Setup):
    """Optimizes the graph, prints the report, and writes --emit-dir (no weights needed)."""
    from ..compiler.report import emit, format_report

    t0 = time.perf_counter()
    print(f"cost model: {s.profile.name}, {s.dtype_name}")
    # the report first: the debug channels print under it
    quiet = Setup(s.device, s.dtype, s.profile, s.cache_dir)
    plan, report = optimize_graph(graph, quiet, keep_egglog=bool(args.emit_dir) or
                                  "egraph" in s.debug)
    optimize_s = time.perf_counter() - t0
    print(format_report(plan, report))
    _debug(s, plan, report)
    sources = kernel_sources(plan, s)
    print(f"codegen: {len(set(sources))} distinct kernel sources for {len(sources)} launches")
    if args.emit_dir:
        written = emit(plan, report, args.emit_dir)
        written += s.kernel_cache().copy_to(sources, Path(args.emit_dir) / "kernels")
        print(f"wrote {len(written)} files to {args.emit_dir}")
    return plan, report, optimize_s


def run_compiled(args, config, graph, plan, report, s: Setup, optimize_s, rename=None) -> None:
    """Loads weights, binds the kernels, runs them and checks them against the reference."""
    from ..runtime.reference import run_reference

    device, dtype = s.device, s.dtype
    t0 = time.perf_counter()
    check_weight_memory(config, dtype, device)
    if args.weights:
        weights = load_weights(args.weights, config, dtype, device, rename)
    else:
        print(f"weights: none given, using deterministic random weights (seed {args.seed})")
        weights = random_weights(config, args.seed, dtype, device)
    print(f"weights ready in {time.perf_counter() - t0:.2f} s", flush=True)
    # the kernels were printed with the report; timing prints after the first call
    fn = bind(plan, report, weights, Setup(device, dtype, s.profile, s.cache_dir,
                                           s.debug & {"timing"}), optimize_s=optimize_s)
    print(f"kernels bound: {len(fn.launches)} launches of {len(set(fn.kernel_sources()))} "
          f"kernels", flush=True)
    if device.type == "cpu":
        fn.progress = _Progress("running kernels (Triton's interpreter)")
    ids = token_ids(args, graph.inputs()[0].shape[0], config.vocab_size).to(device)
    first = _timed_s(lambda: fn(ids, copy=False), device)
    steady = _timed_s(lambda: fn(ids, copy=False), device)
    print(f"compiled model on {device} ({str(dtype).removeprefix('torch.')}): first call "
          f"{first * 1e3:.1f} ms (kernel JIT), then {steady * 1e3:.1f} ms")
    logits = fn(ids)
    print_top_tokens(logits, args.top)
    # fp32 reference on the same weights, upcast one parameter at a time
    (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
    print(f"relative error vs the fp32 reference executor: {relative_error(logits, ref):.2e}")


def check_emit_dir(d: Path) -> None:
    """--emit-dir must be a directory we can write (made if missing), checked before any work."""
    try:
        if d.exists() and not d.is_dir():
            raise MeganeuraError(f"--emit-dir {d} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".meganeura-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MeganeuraError(f"--emit-dir {d} is not writable: {e.strerror or e}") from None


CPU_WARN_PARAMETERS = 50_000_000


def warn_cpu_size(config, device) -> None:
    """A model this size through Triton's interpreter takes long, and its fp32 weights take
    memory: say so before anything is loaded, and refuse what cannot fit."""
    if device.type != "cpu":
        return
    from ..runtime.compiled import _host_available

    n = num_parameters(config)
    need = 4 * n
    free = _host_available()
    if free is not None and need > free:
        raise MeganeuraError(f"the fp32 weights of this model need {need / 2**30:.1f} GiB; the "
                             f"machine has {free / 2**30:.1f} GiB available (run it on CUDA)")
    if n > CPU_WARN_PARAMETERS:
        print(f"warning: {n:,} parameters ({need / 2**30:.1f} GiB in fp32) through Triton's "
              f"interpreter on the CPU: every kernel program runs in Python, so this takes a "
              f"long time (minutes to hours); --device cuda runs it on a GPU", flush=True)


class _Progress:
    """A line every 10% of the launches of a run, with the time so far."""

    def __init__(self, what: str):
        self.what, self.t0, self.shown = what, None, -1

    def __call__(self, done: int, total: int) -> None:
        if done == 1 or self.t0 is None:
            self.t0, self.shown = time.perf_counter(), -1
        tenth = done * 10 // total
        if tenth > self.shown and total >= 50:
            self.shown = tenth
            print(f"  {self.what}: {done}/{total} launches, {time.perf_counter() - self.t0:.1f} s",
                  flush=True)


def _timed_s(fn, device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _debug(s: Setup, plan, report) -> None:
    """MEGANEURA_DEBUG=egraph,plan,kernels prints those stages under the report (timing
    prints after the first call)."""
    from ..compiler.report import plan_text

    if "egraph" in s.debug:
        for k, t in enumerate(report.templates):
            print(f"--- egglog program of template {k}\n{t.egglog}")
    if "plan" in s.debug:
        print("--- plan\n" + plan_text(plan))
    if "kernels" in s.debug:
        for src in dict.fromkeys(kernel_sources(plan, s)):
            print("--- kernel\n" + src)


def _prompt_texts(args) -> list[str] | None:
    """The text prompts: each --prompt, then the lines of --prompts-file (a .jsonl file: the
    "prompt" or "text" field of each line); None when the prompt is given as --tokens."""
    texts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        import json

        from ..models.weights import regular_file

        path = Path(args.prompts_file)
        regular_file(path, "--prompts-file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise MeganeuraError(f"--prompts-file {path} is not UTF-8 text") from None
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MeganeuraError(f"--prompts-file {path}:{k}: not JSON ({e.msg})") from None
                text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise MeganeuraError(f"--prompts-file {path}:{k}: a JSON object with a "
                                         f"\"prompt\" or \"text\" string is expected")
                line = text
            texts.append(line)
        if not texts:
            raise MeganeuraError(f"--prompts-file {path} holds no prompt")
    return texts if texts or args.tokens is None else None


def _load_model(args, config, name, ck, prompts: list, max_new: int, train: bool = False):
    """The model object, after checking that the weights and the caches the prompts need fit
    (before either is allocated); for training, the weights alone (the Trainer checks the
    rest)."""
    from ..inference.generation import (CHUNKS, _batch_rows, cache_shapes, capacity_for,
                                        check_cache_memory)
    from ..inference.pretrained import PretrainedModel

    s = resolve_setup(args)
    device, dtype = s.device, s.dtype
    warn_cpu_size(config, device)
    b = len(prompts)
    if train:
        check_weight_memory(config, dtype, device)
    else:
        longest = max(len(p) for p in prompts)
        capacity = capacity_for(config, longest + max_new)
        states = cache_shapes(config, capacity, _batch_rows(b),
                              min(CHUNKS[-1], capacity) if b == 1 else 1)
        if b > 1:  # and the one-sequence caches the prompts are prefilled in
            one = capacity_for(config, longest)
            states |= {f"prefill.{k}": v for k, v in
                       cache_shapes(config, one, 1, min(CHUNKS[-1], one)).items()}
        check_cache_memory(states, capacity, dtype, device, weight_bytes(config, dtype),
                           " and the weights beside them")
    for note in ck.notes if ck else []:
        print(f"{'checkpoint' if ck.path else 'config'}: {note}")
    t0 = time.perf_counter()
    if args.weights:
        weights = load_weights(args.weights, config, dtype, device, ck.rename if ck else None)
    else:
        print(f"weights: none given, using deterministic random weights (seed {args.seed})")
        weights = random_weights(config, args.seed, dtype, device)
    ready = f"model {name}: weights ready on {device} in {time.perf_counter() - t0:.2f} s"
    print(ready if train else ready + f"; caches for {capacity} positions"
          + (f" of {b} sequences" if b > 1 else ""), flush=True)
    model = PretrainedModel(config, weights, s, ck)
    model.generator.on_phase = lambda line: print(line, flush=True)
    return model


def _stats_line(st: dict) -> str:
    """Prompt and new token counts, time to first token, decode rate (all sequences')."""
    steps = st.get("steps", st["new_tokens"])
    rate = (st["new_tokens"] - st.get("sequences", 1)) / st["decode_s"] \
        if steps > 1 and st["decode_s"] else 0
    return (f"prompt {st['prompt_tokens']} tokens, {st['new_tokens']} new tokens"
            + (f" over {st['sequences']} sequences" if st.get("sequences", 1) > 1 else "")
            + f"; plans optimized and their kernels built in {st['plans_s']:.2f} s; time to "
            f"first token {st['time_to_first_token_s'] * 1e3:.1f} ms; decode {rate:.1f} tokens/s")


def cmd_generate(args) -> int:
    """Everything is checked (model, tokenizer, prompts, sampling, capacity) before weights
    load."""
    from ..inference.generation import SamplingParams, check_request

    config, name, ck = resolve_model(args)
    tokenizer = _tokenizer(args, ck)
    texts = _prompt_texts(args)
    if args.chat:
        from ..inference.chat import chat_ids

        if texts is None or ck is None or ck.path is None:
            raise MeganeuraError("--chat takes --prompt and a --weights checkpoint directory "
                                 "(its chat template)")
        prompts = [chat_ids(tokenizer, ck.path, [{"role": "user", "content": t}]) for t in texts]
    elif texts is not None:
        prompts = [tokenizer.encode(t).ids for t in texts]
    else:
        prompts = [args.tokens]
    for p in prompts:
        if not p:
            raise MeganeuraError(("the prompt is empty" if len(prompts) == 1 else
                                  "a prompt is empty") + (" after tokenization" if texts else ""))
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    eos = ck.eos_token_ids if ck else ()
    checked = [check_request(config, p, args.max_new_tokens, params, args.stop, eos)[0]
               for p in prompts]
    model = _load_model(args, config, name, ck, checked, args.max_new_tokens)
    if len(checked) == 1:
        stream = _Stream(tokenizer)
        out = [model.generate(checked[0], args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, args.seed, args.stop, on_token=stream.add)]
        stream.end()
    else:
        out = model.generate(checked, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, args.seed, args.stop)
        for i, (p, o) in enumerate(zip(checked, out)):
            new = o[p.numel():].tolist()
            text = tokenizer.decode(new, skip_special_tokens=False) if tokenizer else \
                " ".join(map(str, new))
            print(f"[{i}] {text}")
    from ..compiler.report import plan_summary

    session = model.generator.last_session
    for (kind, *size), fn in session.plans.items():
        label = {"chunk": f"prefill chunk plan ({size and size[0]} tokens)",
                 "prefill": f"prefill plan ({size and size[0]} tokens)"}.get(
            kind, f"decode plan ({session.sequences} rows)")
        print(f"{label}: {plan_summary(fn.report.plan)}")
    print(_stats_line(model.generator.last_stats))
    if texts is None:
        print(f"ids: {','.join(str(t) for t in out[0].tolist())}")
    return 0


def cmd_chat(args) -> int:
    """An interactive chat: each line read is a user turn, the reply streamed; the
    conversation's keys and values stay in the caches between turns (a turn prefills only
    what the template added since). /reset starts over, /exit (or end of input) ends."""
    import sys

    from ..inference.chat import chat_ids
    from ..inference.generation import SamplingParams

    config, name, ck = resolve_model(args)
    if ck is None or ck.path is None:
        raise MeganeuraError("chat takes --weights: a checkpoint directory or model id (its "
                             "tokenizer and chat template)")
    tokenizer = _tokenizer(args, ck)
    if tokenizer is None:
        raise MeganeuraError(f"chat needs a tokenizer: {ck.path} has no tokenizer.json (or "
                             f"give --tokenizer FILE)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    chat_ids(tokenizer, ck.path, system + [{"role": "user", "content": "hello"}])  # a template
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).check(config.vocab_size)
    limit = getattr(config, "max_position_embeddings", None) or 8192
    model = _load_model(args, config, name, ck, [[0] * min(args.max_context, limit)], 0)
    model.generator.on_phase = None
    model.generator.session(min(args.max_context, limit))  # every turn's caches: kept
    print("chat: type a message and Enter; /reset starts over, /exit ends", flush=True)
    messages = list(system)
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        context = min(args.max_context, limit)
        try:
            ids = chat_ids(tokenizer, ck.path, messages)
            room = min(args.max_new_tokens, context - len(ids))
            if room < 1:
                raise MeganeuraError(f"the conversation ({len(ids)} tokens) fills the context "
                                     f"({context} positions); /reset starts over")
            stream = _Stream(tokenizer)
            out = model.generator.generate(torch.tensor(ids), room, SamplingParams(
                args.temperature, args.top_k, args.top_p, args.seed), args.stop,
                on_token=stream.add, reuse=True)
            stream.end()
        except MeganeuraError as e:  # this turn fails; the conversation goes on without it
            print(f"error: {e}", flush=True)
            messages.pop()
            continue
        eos = set(args.stop) if args.stop else set(model.eos_token_ids)
        new = [t for t in out[len(ids):].tolist() if t not in eos]
        messages.append({"role": "assistant",
                         "content": tokenizer.decode(new, skip_special_tokens=True)})
        st = model.generator.last_stats
        print(f"({st['new_tokens']} tokens; {st['prompt_tokens'] - st['reused_tokens']} "
              f"prompt tokens prefilled, {st['reused_tokens']} kept from the last turn; first "
              f"token {st['time_to_first_token_s'] * 1e3:.0f} ms)", flush=True)
    return 0


def _tokenizer(args, ck):
    """The tokenizers library's Tokenizer of --tokenizer or the checkpoint's tokenizer.json,
    or None when the prompt is given as ids and no tokenizer is at hand."""
    path = Path(args.tokenizer) if args.tokenizer else (
        ck.path / "tokenizer.json" if ck is not None and ck.path is not None else None)
    from ..models.weights import probe

    if path is None or probe(path, "tokenizer") is None:
        if args.prompt or getattr(args, "prompts_file", None):
            raise MeganeuraError("--prompt needs a tokenizer: a --weights directory holding "
                                 "tokenizer.json, or --tokenizer FILE (or give --tokens IDS)"
                                 + (f"; {path} does not exist" if path else ""))
        return None
    from tokenizers import Tokenizer

    from ..models.weights import regular_file

    regular_file(path, "tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (the library raises its own exception type)
        raise MeganeuraError(f"cannot read tokenizer {path}: {str(e).splitlines()[0][:200]}") from None


class _Stream:
    """Prints the text of the new ids as they arrive (ids when there is no tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, tok: int) -> None:
        self.ids.append(tok)
        if self.tokenizer is None:
            print(tok, end=" ", flush=True)
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # a character still incomplete: wait for its bytes
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        """Prints what is left (text that ended in an incomplete character included)."""
        if self.tokenizer is not None and self.ids:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            print(text[len(self.shown):], end="")
            self.shown = text
        print(flush=True)


def cmd_train(args) -> int:
    from .train import cmd_train as run

    return run(args)


COMMANDS = {"compile": cmd_compile, "generate": cmd_generate, "chat": cmd_chat,
            "train": cmd_train}
