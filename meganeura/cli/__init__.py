"""Command line: `python -m meganeura compile ...`.

Bad arguments, bad input files and file-system errors (no permission, a full disk) exit with
status 2 and one line on stderr. TRITON_INTERPRET is decided here, before triton is imported;
MEGANEURA_DEBUG and MEGANEURA_CACHE_DIR are read by `pipeline.setup`, as for the library.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import MeganeuraError

DEFAULT_MODEL = "gemma4-small-test"


class _PresetNames:
    """--model's choices: every family's presets (models/registry.py), read when argparse
    first looks at them. The table loads torch, which a bad argument need not wait for."""

    @staticmethod
    def _names() -> dict:
        from ..models.registry import MODEL_NAMES

        return MODEL_NAMES

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


MODEL_CHOICES = _PresetNames()


class UsageError(MeganeuraError):
    """A bad command-line argument."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _token_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    bad = [t for t in ids if not 0 <= t < 2 ** 63]
    if bad:
        raise argparse.ArgumentTypeError(f"token id {bad[0]} is not an integer in [0, 2^63)")
    return ids


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63), got {v}")
    return v


def _number(low: float, high: float, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < v if open_low else low <= v) or not v <= high:
            raise argparse.ArgumentTypeError(f"expected a number in {'(' if open_low else '['}"
                                             f"{low:g}, {high:g}], got {text}")
        return v
    return parse


def _add_model_args(p: argparse.ArgumentParser, seq_len: bool = True) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument("--model", choices=MODEL_CHOICES, default=None, metavar="NAME",
                   help=f"built-in preset, random weights: %(choices)s (default: {DEFAULT_MODEL})")
    m.add_argument("--config", metavar="FILE", help="model config as JSON: a transformers "
                   "config.json, whose model_type picks the family (gemma4_text, gemma4, llama, "
                   "qwen3), or the seed's field names (vocab_size, hidden_size, ..., head_dim; "
                   "no model_type)")
    if seq_len:
        p.add_argument("--seq-len", type=_positive_int, default=16, metavar="N",
                       help="tokens per forward pass (default: 16)")
    p.add_argument("--weights", metavar="PATH", help="a checkpoint directory (config.json and "
                   "model.safetensors or shards: the model is read from it, no --model needed; "
                   "or a model id such as org/name, read from the local Hugging Face cache, "
                   "nothing downloaded), "
                   "or a .safetensors file / directory of the --model or --config model. Without "
                   "it, deterministic random weights from --seed are used")
    p.add_argument("--seed", type=_seed, default=0, help="seed for random weights, token ids and "
                   "sampling (default: 0)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--profile", choices=("h200", "h200-roofline", "cpu-interpreter"),
                   default=None, help="device profile the cost model prices kernels with: h200 "
                   "carries efficiencies measured on an H200, h200-roofline only its ceilings "
                   "(default: h200 on cuda, cpu-interpreter on cpu)")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="kernel source cache "
                   "(default: $MEGANEURA_CACHE_DIR or ~/.cache/meganeura/kernels)")


def _add_sampling_args(p: argparse.ArgumentParser, default_new: int = 32) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=default_new, metavar="N",
                   help=f"tokens to generate at most (default: {default_new})")
    p.add_argument("--temperature", type=_number(0, 1e6), default=0.0, metavar="T",
                   help="0 (the default) is greedy; above 0, sample from softmax(logits / T)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="sample among the K most likely ids only")
    p.add_argument("--top-p", type=_number(0, 1, open_low=True), default=None, metavar="P",
                   help="sample within the smallest set of ids holding probability P")
    p.add_argument("--stop", type=_token_list, default=None, metavar="IDS", help="ids that end "
                   "generation (default: the checkpoint's end-of-sequence ids)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meganeura", description="An e-graph compiler for transformer models: "
                     "graph -> egglog fusion rewrites -> cost-based extraction -> Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="build, optimize and (with --run) run a model",
                       description="Build a model graph and compile it. Without --run no weights "
                       "are materialized, so any preset compiles on a small machine; a given "
                       "--weights file is checked from its header alone.")
    _add_model_args(c)
    c.add_argument("--emit-dir", metavar="DIR", help="write the egglog program of each template, "
                   "the plan as JSON and the full report into DIR")
    c.add_argument("--run", action="store_true", help="load weights, run the model and print the "
                   "top tokens of the last position")
    c.add_argument("--tokens", type=_token_list, metavar="IDS", help="comma-separated token ids "
                   "for --run (default: random ids from --seed); their count sets --seq-len")
    c.add_argument("--top", type=_positive_int, default=5, metavar="K",
                   help="how many top tokens to print (default: 5)")
    gen = sub.add_parser("generate", help="generate text (or token ids) after one prompt or "
                         "several", description="Generate after a prompt with KV caches: the "
                         "prompt prefilled in chunks of a few sizes, then decode steps, every "
                         "plan optimized by the e-graph. One prompt's text is streamed as "
                         "tokens arrive; several prompts (--prompt more than once, or "
                         "--prompts-file) decode together and print when done. A last line "
                         "gives the prompt and new token counts, the time to the first token "
                         "and the decode rate.")
    _add_model_args(gen, seq_len=False)
    what = gen.add_argument_group("the prompt (one of --prompt, --prompts-file, --tokens)")
    what.add_argument("--prompt", metavar="TEXT", action="append", help="a prompt, tokenized "
                      "with the checkpoint's tokenizer.json (the tokenizers library; nothing is "
                      "downloaded); more than once for several prompts")
    what.add_argument("--prompts-file", metavar="FILE", help="prompts, one a line (a .jsonl "
                      "file: a \"prompt\" or \"text\" field a line), after any --prompt")
    what.add_argument("--tokens", type=_token_list, metavar="IDS", help="the prompt as "
                      "comma-separated token ids (no tokenizer needed)")
    gen.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use (default: the "
                     "one in the --weights directory)")
    gen.add_argument("--chat", action="store_true", help="each prompt is a user message: put it "
                     "in the checkpoint's chat template (chat_template.jinja or "
                     "tokenizer_config.json's), as transformers' apply_chat_template does "
                     "with add_generation_prompt")
    _add_sampling_args(gen)
    chat = sub.add_parser("chat", help="talk to an instruction-tuned checkpoint",
                          description="An interactive chat in the checkpoint's chat template: "
                          "each line typed is a user message, the reply is streamed. The "
                          "conversation stays in the KV caches between turns (a turn prefills "
                          "only what it adds). /reset starts over, /exit or end of input ends.")
    _add_model_args(chat, seq_len=False)
    chat.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use (default: the "
                      "one in the --weights directory)")
    chat.add_argument("--system", metavar="TEXT", help="a system message to begin with")
    chat.add_argument("--max-context", type=_positive_int, default=8192, metavar="N",
                      help="positions the conversation may fill (caches are made for them; "
                      "default: 8192, at most the model's)")
    _add_sampling_args(chat, default_new=256)
    tr = sub.add_parser("train", help="fine-tune a checkpoint on a text file",
                        description="Fine-tune on a text: --data is tokenized with the "
                        "checkpoint's tokenizer, packed into sequences of --seq-len tokens and "
                        "trained on for --steps AdamW steps (every weight but buffers, or "
                        "LoRA adapters with --lora-rank), the causal-LM loss as transformers "
                        "computes it. A line a step shows the loss and tokens/s; --out gets "
                        "the checkpoint (LoRA merged), loss.csv and loss.png. Forward and "
                        "backward are one graph, optimized by the e-graph and run as "
                        "generated kernels.")
    _add_model_args(tr, seq_len=False)
    tr.add_argument("--data", required=True, metavar="FILE", help="a .txt file (one document) "
                    "or .jsonl (a \"text\" field a line)")
    tr.add_argument("--out", required=True, metavar="DIR", help="where the trained checkpoint, "
                    "loss.csv and loss.png go (must be empty, or --overwrite)")
    tr.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    tr.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use (default: the "
                    "one in the --weights directory)")
    tr.add_argument("--steps", type=_positive_int, default=100, metavar="N",
                    help="optimizer steps (default: 100)")
    tr.add_argument("--seq-len", type=_positive_int, default=512, metavar="S",
                    help="tokens a sequence (default: 512)")
    tr.add_argument("--batch", type=_positive_int, default=1, metavar="B",
                    help="sequences a step (default: 1)")
    tr.add_argument("--lr", type=_number(0, 1e3, open_low=True), default=1e-4, metavar="LR",
                    help="learning rate (default: 1e-4)")
    tr.add_argument("--weight-decay", type=_number(0, 1e3), default=0.0, metavar="WD",
                    help="AdamW's decoupled weight decay (default: 0)")
    tr.add_argument("--grad-clip", type=_number(0, 1e9, open_low=True), default=1.0,
                    metavar="NORM", help="clip the gradients' global norm (default: 1.0)")
    tr.add_argument("--lora-rank", type=_positive_int, default=None, metavar="R",
                    help="train LoRA adapters of rank R instead of the weights")
    tr.add_argument("--lora-alpha", type=_number(0, 1e6, open_low=True), default=None,
                    metavar="A", help="LoRA's alpha (default: 2 R)")
    tr.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                    "down_proj", metavar="NAMES", help="modules that get adapters, by "
                    "checkpoint name (default: every attention and MLP projection)")
    tr.add_argument("--executor", choices=("compiled", "reference"), default="compiled",
                    help="run the training graph as generated kernels (default) or on the "
                    "reference executor (plain PyTorch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "generate":
            texts = bool(args.prompt) or bool(args.prompts_file)
            if texts == (args.tokens is not None):
                parser.error("give the prompt as --prompt / --prompts-file, or as --tokens"
                             if texts else "one of the arguments --prompt --prompts-file "
                             "--tokens is required")
        _environment(args)
        from . import commands  # heavy imports (torch) only after the arguments are known

        return commands.COMMANDS[args.command](args)
    except MeganeuraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no where no check saw it coming
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _environment(args) -> None:
    """TRITON_INTERPRET for a run on the CPU, set before anything imports triton."""
    import os

    args.debug = None  # pipeline.setup reads MEGANEURA_DEBUG
    # On a machine without CUDA the kernels run through Triton's interpreter, which is
    # chosen when triton is imported: decide it here, before anything imports triton.
    if getattr(args, "device", None) != "cuda" and "triton" not in sys.modules:
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


def elapsed(t0: float) -> str:
    return f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
