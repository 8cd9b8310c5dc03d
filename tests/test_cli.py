"""The command line: its output and exit status for a user's arguments.

Most tests call `meganeura.cli.main(argv)`, the function the console script and `python -m
meganeura` call, in this process with its output captured: a fresh interpreter per case
would spend its seconds importing torch. Where the process itself is under test (the module
entry point, a file that could block) `cli(..., subprocess=True)` runs it as a shell does.
"""

import contextlib
import io
import json
import os
import subprocess as sp
import sys
import tempfile

import pytest

from configs import SMALL
from meganeura.cli import main
from meganeura.models.weights import save_random_weights

KERNELS = tempfile.gettempdir() + "/meganeura-test-kernels"


def cli(*args, timeout=300, env=None, subprocess=False):
    """(exit status, stdout, stderr) of the command line on args; env: variables it sees."""
    env = {"MEGANEURA_CACHE_DIR": KERNELS, **(env or {})}
    if subprocess:
        p = sp.run([sys.executable, "-m", "meganeura", *args], capture_output=True, text=True,
                   timeout=timeout, env={**os.environ, **env})
        return p.returncode, p.stdout, p.stderr
    saved = {k: os.environ.get(k) for k in env}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse's errors and --help
                rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def test_emit_dir_writes_egglog_program_and_plan(tmp_path):
    rc, out, err = cli("compile", "--model", "gemma4-4b", "--seq-len", "64", "--emit-dir",
                       str(tmp_path / "out"))
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["kernels", "plan.json", "report.txt", "template0.egg", "template1.egg",
                     "template2.egg"]
    kernels = list((tmp_path / "out" / "kernels").iterdir())
    assert len(kernels) >= 5 and all("import triton" in k.read_text() for k in kernels)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    kinds = [n["kind"] for n in plan["nodes"]]
    assert kinds.count("launch") > 34 * 5 and "load" in kinds and "view" in kinds
    assert "(rule" in (tmp_path / "out" / "template1.egg").read_text() or \
        "rewrite" in (tmp_path / "out" / "template1.egg").read_text()


def test_compile_small_prints_summary_and_top_tokens():
    rc, out, err = cli("compile", "--run", "--seq-len", "7", "--top", "3", subprocess=True)
    assert rc == 0, err
    assert "model gemma4-small-test: 4 layers (1 global, 3 sliding-window 8)" in out
    assert "parameters: 45,600 in 47 tensors" in out
    assert "graph: " in out and "matmul 29" in out
    assert "deterministic random weights (seed 0)" in out
    assert "top tokens at position 6: " in out
    assert out.count("(0.") >= 3
    assert "compiled model on cpu (float32)" in out
    err_line = next(l for l in out.splitlines() if l.startswith("relative error"))
    assert float(err_line.split(": ")[1]) <= 1e-4


def test_compile_27b_without_run_materializes_nothing():
    rc, out, err = cli("compile", "--model", "gemma4-27b", "--seq-len", "2048")
    assert rc == 0, err
    assert "62 layers" in out and "parameters: 22,164,231,168" in out
    assert "template 1: 47 block(s)" in out and "template 2: 15 block(s)" in out
    assert "fusions chosen: " in out and "estimated time: " in out
    assert "top tokens" not in out and "\nweights:" not in out


def test_weights_file_checked_from_header_and_used(tmp_path):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f, seed=4)
    rc, out, err = cli("compile", "--weights", str(f), "--run", "--tokens", "1,2,3")
    assert rc == 0, err
    assert "47 tensors, names and shapes match" in out
    assert "random" not in out and "top tokens at position 2" in out


def test_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**SMALL.__dict__, "num_hidden_layers": 2}))
    rc, out, err = cli("compile", "--config", str(f), "--seq-len", "5", "--run")
    assert rc == 0, err
    assert "2 layers" in out and "top tokens at position 4" in out


@pytest.mark.parametrize("args, message", [
    (("compile", "--seq-len", "0"), "--seq-len: expected a positive integer, got 0"),
    (("compile", "--seq-len", "x"), "--seq-len: expected a positive integer, got 'x'"),
    (("compile", "--model", "gemma5"), "argument --model: invalid choice"),
    (("compile", "--model", "gemma4-4b", "--config", "c.json"), "not allowed with argument"),
    (("compile", "--dtype", "fp8"), "argument --dtype: invalid choice"),
    (("compile", "--bogus"), "unrecognized arguments: --bogus"),
    ((), "the following arguments are required: command"),
    (("compile", "--config", "/nonexistent.json"), "cannot read config /nonexistent.json"),
    (("compile", "--weights", "/nonexistent.safetensors"), "does not exist"),
    (("compile", "--run", "--tokens", "1,99"), "id 99 is outside the vocabulary [0, 64)"),
    (("compile", "--run", "--tokens", "1,a"), "expected comma-separated integers"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    rc, out, err = cli(*args)
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_mismatched_weights_exit_2(tmp_path):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f)
    rc, out, err = cli("compile", "--model", "gemma4-1b", "--weights", str(f))
    assert rc == 2 and "has shape [64, 32]" in err and err.count("\n") == 1


def test_debug_switch_prints_stages():
    rc, out, err = cli("compile", "--seq-len", "3", env={"MEGANEURA_DEBUG": "plan,kernels"})
    assert rc == 0, err
    assert "--- plan" in out and "product(" in out and "[rms_norm(" in out
    # (three rows: the few-row products' kernel)
    assert "--- kernel" in out and "def matvec_kernel(" in out


def test_help_for_each_subcommand():
    rc, out, _ = cli("--help")
    assert rc == 0 and "compile" in out
    rc, out, _ = cli("compile", "--help")
    assert rc == 0
    for flag in ("--model", "--config", "--seq-len", "--weights", "--dtype", "--device", "--run"):
        assert flag in out
