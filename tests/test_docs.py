"""The documents agree with the repository: the README's results table is what
benchmarks/results_table.py prints from the committed CSVs, every relative link and path in
the manuals names a file that exists, and no file cites a document that does not."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_table  # noqa: E402

MANUALS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           ROOT / "benchmarks/results/HISTORY.md"]


def test_the_readme_table_is_what_the_script_prints():
    readme = (ROOT / "README.md").read_text()
    assert results_table.readme_table(readme) == results_table.table(), (
        "the README's results table differs from the CSVs: run "
        "python benchmarks/results_table.py --write")


def _write_csv(path: Path, like: Path, rows: list[dict]) -> None:
    with open(like, newline="") as f:
        fields = csv.DictReader(f).fieldnames
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_the_table_takes_the_latest_row_of_every_family(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
           "meganeura": "0.1.0", "dtype": "bf16"}
    prefill = [
        dict(env, date="2026-12-02", commit="aaaaaaa", model="llama-3.2-1b", seq="2048",
             meganeura_ms="9.5", eager_ms="20", torch_compile_ms="10", floor_ms="5"),
        dict(env, date="2026-12-03", commit="bbbbbbb", model="llama-3.2-1b", seq="2048",
             meganeura_ms="9", eager_ms="20", torch_compile_ms="12", floor_ms="5"),
        dict(env, date="2026-12-03", commit="ccccccc", model="llama-3.1-8b", seq="2048",
             meganeura_ms="50", eager_ms="80", floor_ms="40", init="unit"),  # no torch.compile
        # the seed's rows are always on random_weights: no marker
        dict(env, date="2026-12-03", commit="ddddddd", model="gemma4-4b", seq="2048",
             meganeura_ms="30", eager_ms="44", torch_compile_ms="30", floor_ms="21.73",
             init="unit"),
    ]
    decode = [
        dict(env, transformers="5.17.0", date="2026-12-03", commit="eeeeeee", model="qwen3-8b",
             context="4096", steps="64", meganeura_ms="6", floor_ms="5", hf_eager_ms="40",
             hf_compiled_ms="24", hf_static_cache="4176"),
        dict(env, transformers="5.17.0", date="2026-12-03", commit="fffffff", model="qwen3-8b",
             context="32768", steps="64", meganeura_ms="7", floor_ms="5.6"),
        dict(env, transformers="5.17.0", date="2026-12-03", commit="fffffff", model="qwen3-8b",
             context="2048", steps="0", meganeura_ttft_ms="40", hf_compiled_prefill_ms="50"),
    ]
    results = ROOT / "benchmarks" / "results"
    _write_csv(tmp_path / "prefill.csv", results / "prefill.csv", prefill)
    _write_csv(tmp_path / "decode.csv", results / "decode.csv", decode)
    lines = results_table.table(tmp_path / "prefill.csv", tmp_path / "decode.csv").splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    gpu = "H100 80GB HBM3"
    assert rows == [f"| {work} | {gpu} | {rest} |" for work, rest in [
        ("llama-3.2-1b prefill, 2048 tokens",
         "9 ms | transformers + torch.compile | 12 ms | 0.750 | 5 ms | bbbbbbb | 2026-12-03"),
        ("llama-3.1-8b prefill, 2048 tokens, unit init",
         "50 ms | transformers eager | 80 ms | 0.625 | 40 ms | ccccccc | 2026-12-03"),
        ("gemma4-4b prefill, 2048 tokens",
         "30 ms | torch.compile | 30 ms | 1.000 | 21.73 ms | ddddddd | 2026-12-03"),
        ("qwen3-8b decode, context 4096", ("6 ms | transformers + torch.compile, static cache "
                                           "4176 | 24 ms | 0.250 | 5 ms | eeeeeee | 2026-12-03")),
        ("qwen3-8b decode, context 32768",
         "7 ms | none in this run |  | 1.25x floor | 5.6 ms | fffffff | 2026-12-03"),
        ("qwen3-8b first token, 2048-token prompt", ("40 ms | transformers + torch.compile "
                                                     "prefill | 50 ms | 0.800 |  | fffffff | "
                                                     "2026-12-03")),
    ]]


def _resolves(target: str, doc: Path, bases=()) -> bool:
    target = target.split("#", 1)[0]
    return any((base / target).exists() for base in (doc.parent, ROOT, *bases))


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("doc", MANUALS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_path_exists(doc):
    text = _prose(doc.read_text())
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # Markdown links
        if not re.match(r"[a-z]+:|#", target) and not _resolves(target, doc):
            missing.append(target)
    for span in re.findall(r"`([^`\n]+)`", text):  # inline code that names a path
        path_like = "/" in span and re.fullmatch(r"[\w.\-/]+", span) and span[0] != "."
        if path_like and not _resolves(span, doc, (ROOT / "meganeura",)):
            missing.append(span)
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def _repo_files():
    """The repository's .md and .py files: what git tracks or would (ignored files left
    out); without git, every such file outside hidden folders, builds and caches."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / p for p in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        skip = ("build", "dist", "__pycache__")
        paths = [p for p in ROOT.rglob("*") if not any(
            part.startswith(".") or part in skip or part.endswith(".egg-info")
            for part in p.relative_to(ROOT).parts)]
    return [p for p in paths if p.suffix in (".md", ".py") and p.is_file()]


def test_no_file_cites_a_document_that_does_not_exist():
    # a Markdown document a .md or .py file names (a docstring's "see docs/extending.md")
    # exists beside that file or under the repository root
    missing = []
    for path in _repo_files():
        for k, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for cited in re.findall(r"[\w./\-]*[A-Za-z]\.md\b", line):
                if not _resolves(cited, path):
                    missing.append(f"{path.relative_to(ROOT)}:{k}: {cited}")
    assert not missing, "citations of missing documents:\n" + "\n".join(missing)
