"""The README's current-results table, made from the benchmark CSVs.

    python benchmarks/results_table.py            # print the table (Markdown)
    python benchmarks/results_table.py --write    # put it into README.md between its markers

One row per work (a model's prefill at a sequence length, its decode step at a context
length, its time to first token) and GPU: the latest measurement of that work on that GPU
in `results/prefill.csv` or `results/decode.csv` (the last row of the latest date; rows are
appended as they are measured). A ratio is only taken inside one row, that is one run of
one process: meganeura over the strongest baseline that row measured (torch.compile, else
eager), or over the row's floor where it measured no baseline. Each row keeps the commit
and date it was measured at; the versions are listed under the table. Rows of any model
are shown, so families added later appear as soon as their rows do.
"""

from __future__ import annotations

import argparse
import csv
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN = "<!-- results: python benchmarks/results_table.py --write -->"
END = "<!-- /results -->"
HEADER = ("| work | GPU | meganeura | baseline | its time | ratio | floor | commit | date |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _num(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _latest(entries: list[dict]) -> list[dict]:
    """The last entry of the latest date per (work, GPU), in order of first appearance."""
    out: dict[tuple, dict] = {}
    for e in entries:  # file order: a later line of the same date is a later measurement
        key = e["key"]
        if key not in out or e["date"] >= out[key]["date"]:
            out[key] = e
    return list(out.values())


def has_transformers(model: str) -> bool:
    """Whether the preset's baseline is transformers' model (as prefill.py and decode.py
    choose it); the seed's presets have none and run against benchmarks/torch_forward.py.
    A name the registry does not know is taken to be a transformers family."""
    sys.path.insert(0, str(HERE))
    from hf_forward import has_transformers as known

    from meganeura.models import MODEL_NAMES, PRESETS

    key = MODEL_NAMES.get(model)
    return key is None or known(PRESETS[key])


def _dtype(row: dict) -> str:
    d = row.get("dtype") or "bf16"
    return "" if d == "bf16" else f", {d}"


def _init(row: dict) -> str:
    """A transformers family's row on meganeura's random_weights (`--init unit`) says so."""
    return ", unit init" if row.get("init") == "unit" and has_transformers(row["model"]) else ""


def prefill_entries(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        ms = _num(r.get("meganeura_ms"))
        if ms is None:
            continue
        seed = not has_transformers(r["model"])
        compiled, eager = _num(r.get("torch_compile_ms")), _num(r.get("eager_ms"))
        if compiled is not None:
            base = ("torch.compile" if seed else "transformers + torch.compile", compiled)
        elif eager is not None:
            base = ("PyTorch eager" if seed else "transformers eager", eager)
        else:
            base = None
        out.append(dict(r, key=("prefill", r["model"], int(r["seq"]), r.get("dtype"), r["gpu"]),
                        work=f"{r['model']} prefill, {r['seq']} tokens{_dtype(r)}{_init(r)}", ms=ms,
                        base=base, floor=_num(r.get("floor_ms")), floor_what="FLOPs"))
    return out


def decode_entries(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        ms, ttft = _num(r.get("meganeura_ms")), _num(r.get("meganeura_ttft_ms"))
        if ms is not None:
            compiled, eager = _num(r.get("hf_compiled_ms")), _num(r.get("hf_eager_ms"))
            if compiled is not None:
                cache = r.get("hf_static_cache")
                what = "transformers + torch.compile" + (f", static cache {cache}" if cache else "")
                base = (what, compiled)
            elif eager is not None:
                base = ("transformers eager", eager)
            else:
                base = None
            mk = r.get("megakernel_programs")  # the persistent kernel: a work of its own
            out.append(dict(r, key=("decode", r["model"], int(r["context"]), r.get("dtype"),
                                    r["gpu"], bool(mk)),
                            work=f"{r['model']} decode, context {r['context']}{_dtype(r)}{_init(r)}"
                                 + (" (one persistent kernel)" if mk else ""),
                            ms=ms, base=base, floor=_num(r.get("floor_ms")), floor_what="bytes"))
        if ttft is not None:
            prefill = _num(r.get("hf_compiled_prefill_ms"))
            base = ("transformers + torch.compile prefill", prefill) if prefill else None
            out.append(dict(r, key=("ttft", r["model"], int(r["context"]), r.get("dtype"),
                                    r["gpu"]),
                            work=f"{r['model']} first token, {r['context']}-token prompt"
                                 f"{_dtype(r)}", ms=ttft, base=base, floor=None, floor_what=""))
    return out


def _ms(v: float) -> str:
    return f"{v:.4g} ms"


def _line(e: dict) -> str:
    gpu = e["gpu"].removeprefix("NVIDIA ")
    floor = _ms(e["floor"]) if e["floor"] is not None else ""
    if e["base"] is not None:
        name, ms = e["base"]
        base, base_ms, ratio = name, _ms(ms), f"{e['ms'] / ms:.3f}"
    elif e["floor"] is not None:
        base, base_ms, ratio = "none in this run", "", f"{e['ms'] / e['floor']:.2f}x floor"
    else:
        base, base_ms, ratio = "", "", ""
    return (f"| {e['work']} | {gpu} | {_ms(e['ms'])} | {base} | {base_ms} | {ratio} | {floor} "
            f"| {e['commit']} | {e['date']} |")


def _versions(entries: list[dict]) -> str:
    """The versions the rows record, each field's distinct values in order of appearance."""
    parts = []
    for field in ("torch", "triton", "transformers"):
        values = list(dict.fromkeys(e[field] for e in entries if e.get(field)))
        if values:
            where = "" if all(e.get(field) for e in entries) else " (the rows that record it)"
            parts.append(f"{field} {', '.join(values)}{where}")
    return "; ".join(parts)


def table(prefill_csv: Path = RESULTS / "prefill.csv",
          decode_csv: Path = RESULTS / "decode.csv") -> str:
    """The Markdown table (and the lines under it) of the latest rows of both CSVs."""
    entries = _latest(prefill_entries(_read(prefill_csv)))
    entries += _latest(decode_entries(_read(decode_csv)))
    order = {"prefill": 0, "decode": 1, "ttft": 2}
    first: dict[tuple, int] = {}
    for k, e in enumerate(entries):
        first.setdefault((e["key"][0], e["model"]), k)
    entries.sort(key=lambda e: (order[e["key"][0]], first[(e["key"][0], e["model"])],
                                e["key"][2], e["key"][4]))
    lines = [HEADER] + [_line(e) for e in entries]
    note = ("Batch 1, bf16 unless the work says otherwise; meganeura and its baseline in one "
            "process on the same random weights and ids (transformers' initialization, or "
            "meganeura's N(0, 1/fan_in) `random_weights` where it says unit init). Ratio: over "
            "the baseline, or over the floor (prefill: matmul FLOPs at 790 TFLOP/s; decode: "
            "bytes at 4.3 TB/s). The seed's baseline is `benchmarks/torch_forward.py`, the "
            f"others' transformers. Versions: {_versions(entries)}.")
    lines += [""] + textwrap.wrap(note, 92)
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """What README text holds between the results markers."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the README has no {BEGIN} ... {END} markers")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write(readme: Path = README) -> None:
    text = readme.read_text()
    readme_table(text)  # the markers are there
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = ap.parse_args(argv)
    if args.write:
        write()
        print(f"wrote the results table into {README}")
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
