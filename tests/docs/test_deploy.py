"""docs/deploy.md: every command that can run on this machine is run, on tiny exports.

The page's fenced code blocks carry a tag in their info string:

* ```` ```bash deploy-test:NAME ```` / ```` ```python deploy-test:NAME ````: run here.
  Bash blocks hold ``lowbit ...`` command lines; each line is run through the CLI's app
  in-process (no 2-9 s interpreter start per line). Python blocks are executed as written,
  with the working directory holding the checkpoints that the ``make`` block wrote.
* ```` ```bash not-run-here ```` / ```` ```python not-run-here ````: needs an engine or
  hardware this machine lacks (vLLM, a GPU, the llama.cpp binaries). Python ones are still
  compiled, so a syntax error is caught.

The model is the tiny seeded Llama of ``tests/tiny_models.py`` (2 layers, width 64,
vocabulary 128), saved as a transformers folder with a tiny byte-level BPE tokenizer; the
one substitution made in the page's commands is ``smollm2-135m`` -> that folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")
for _mod in ("compressed_tensors", "onnx", "onnxscript", "onnxruntime", "gguf"):
    pytest.importorskip(_mod, reason=f"docs/deploy.md's commands need {_mod} (the engines "
                        "extra)")

from tests.tiny_models import build  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
FENCE = re.compile(r"^```(\w+)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MODEL_NAME = "smollm2-135m"
TINY = "tiny-llama"


def blocks() -> list[tuple[str, str, str]]:
    """``(language, tag, body)`` of every fenced block of docs/deploy.md."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(DOC.read_text())]


def tagged(name: str) -> str:
    """The body of the block tagged ``deploy-test:name`` (exactly one)."""
    found = [b for _, t, b in blocks() if t == f"deploy-test:{name}"]
    assert len(found) == 1, f"docs/deploy.md has {len(found)} blocks tagged deploy-test:{name}"
    return found[0]


RUN_HERE = {"make", "transformers", "transformers-bf16", "llama-cpp", "onnxruntime",
            "onnxruntime-fp8", "native", "native-cli"}


def test_every_block_is_tagged_and_every_tag_is_run():
    tags = [t for _, t, _ in blocks()]
    assert tags, "no code blocks found in docs/deploy.md"
    bad = [t for t in tags if t != "not-run-here" and not t.startswith("deploy-test:")]
    assert not bad, f"untagged code blocks in docs/deploy.md: {bad}"
    run = {t.split(":", 1)[1] for t in tags if t.startswith("deploy-test:")}
    assert run == RUN_HERE, f"tags without a test: {run - RUN_HERE}; tests without a " \
                            f"block: {RUN_HERE - run}"


def test_not_run_here_python_blocks_compile():
    for lang, tag, body in blocks():
        if lang == "python" and tag == "not-run-here":
            compile(body, "docs/deploy.md (not-run-here)", "exec")


# --- the checkpoints -------------------------------------------------------------------
def tiny_bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer with ids < 128 (one token per printable ASCII
    byte, newline, and an end-of-text token), what the GGUF writer accepts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 visible byte characters
    assert len(byte_to_char) == 256
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n
    table, n = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    vocab = {table[b]: i for i, b in enumerate([10, *range(32, 127)])}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")


@contextlib.contextmanager
def inside(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli_line(line: str) -> str:
    """One ``lowbit ...`` command line of the page, through the CLI's app in-process."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    argv = shlex.split(line, comments=True)
    if not argv:
        return ""
    assert argv[0] == "lowbit", f"not a lowbit command: {line}"
    argv = [TINY if a == MODEL_NAME else a for a in argv[1:]]
    r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert r.exit_code == 0, f"`{line}` exited {r.exit_code}:\n{r.output[-3000:]}" + (
        f"\n{r.exception!r}" if r.exception and not isinstance(r.exception, SystemExit) else "")
    return r.output


def run_bash_block(body: str) -> list[str]:
    """Each command line of a bash block (``\\`` continuations joined)."""
    outs = []
    for line in body.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            outs.append(run_cli_line(line))
    return outs


def make_lines() -> dict[str, str]:
    """The ``make`` block's command lines by the folder each writes (``-o``)."""
    lines = {}
    for line in tagged("make").replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            lines[argv[argv.index("-o") + 1]] = line
    return lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding the tiny model and a calibration text; :func:`ensure` fills it with
    the checkpoints of the ``make`` block as tests ask for them."""
    from lowbit.data import sample_text

    d = tmp_path_factory.mktemp("deploy")
    build("llama").save_pretrained(d / TINY)
    tiny_bpe_tokenizer().save_pretrained(d / TINY)
    (d / "my_corpus.txt").write_text(sample_text("austen_pp")[:60_000])
    return d


def ensure(workdir: Path, *names: str) -> None:
    """Run the ``make`` lines that write ``names`` (and the checkpoints they read) once."""
    lines = make_lines()
    for name in names:
        if (workdir / name).is_dir():
            continue
        line = lines[name]
        argv = shlex.split(line, comments=True)
        if argv[1] == "export":
            ensure(workdir, argv[2])
        with inside(workdir):
            run_cli_line(line)
        assert (workdir / name).is_dir(), f"`{line}` wrote no {name}"


def test_make_block_writes_what_the_page_loads():
    """The ``make`` block writes every folder the other blocks read."""
    written = set(make_lines())
    text = DOC.read_text()
    read = set(re.findall(r"smollm2-[\w.-]+?-(?:lowbit|ct|onnx|gguf)\b", text))
    assert read <= written, f"read but never written: {read - written}"


def exec_block(name: str, workdir: Path) -> dict:
    """Execute the page's python block ``name`` in ``workdir``; returns its globals."""
    g = {"__name__": f"deploy_{name}"}
    with inside(workdir):
        exec(compile(tagged(name), f"docs/deploy.md [deploy-test:{name}]", "exec"), g)
    return g


def test_make_fast_checkpoints(workdir):
    ensure(workdir, "smollm2-int4-lowbit", "smollm2-int4-ct", "smollm2-q4_0-gguf")
    assert (workdir / "smollm2-q4_0-gguf" / "model.gguf").is_file()
    assert (workdir / "smollm2-int4-lowbit" / "lowbit_checkpoint.json").is_file()
    assert (workdir / "smollm2-int4-lowbit" / "tokenizer.json").is_file()
    assert (workdir / "smollm2-int4-ct" / "tokenizer.json").is_file()


def test_transformers_loads_compressed_tensors(workdir, capsys):
    import lowbit

    ensure(workdir, "smollm2-int4-ct", "smollm2-int4-lowbit")
    g = exec_block("transformers", workdir)
    assert g["out"].shape[1] == g["ids"].shape[1] + 16
    assert g["model"].config.quantization_config is not None
    # the reloaded model computes what lowbit's checkpoint computes
    ref = lowbit.load(workdir / "smollm2-int4-lowbit")
    import torch

    with torch.no_grad():
        a = g["model"](g["ids"]).logits
        b = ref(g["ids"]).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_transformers_nvfp4_needs_bfloat16(workdir):
    import json

    import torch

    ensure(workdir, "smollm2-nvfp4-ct")
    cfg = json.loads((workdir / "smollm2-nvfp4-ct" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"  # what the page tells the reader to pass
    g = exec_block("transformers-bf16", workdir)
    with torch.no_grad():
        logits = g["model"](torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.slow  # the ONNX export traces the model with torch.export: 15-50 s here
def test_onnxruntime_int4(workdir, capsys):
    ensure(workdir, "smollm2-int4-onnx")
    assert (workdir / "smollm2-int4-onnx" / "tokenizer.json").is_file()  # as the page says
    g = exec_block("onnxruntime", workdir)
    out = capsys.readouterr().out
    assert "input_ids" in out and "tensor(int64)" in out
    (inp,) = g["sess"].get_inputs()
    assert (inp.name, inp.type) == ("input_ids", "tensor(int64)") and len(inp.shape) == 2
    assert [o.name for o in g["sess"].get_outputs()] == ["logits"]
    assert g["ids"].shape[1] == len(g["tok"]("It is a truth universally acknowledged")
                                    ["input_ids"]) + 16
    import onnx

    m = onnx.load(str(workdir / "smollm2-int4-onnx" / "model.onnx"), load_external_data=False)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 21


@pytest.mark.slow  # calibration + the ONNX export's trace
def test_onnxruntime_fp8_with_basic_optimization(workdir):
    import numpy as np
    import onnx

    ensure(workdir, "smollm2-fp8-onnx")
    g = exec_block("onnxruntime-fp8", workdir)
    m = onnx.load(str(workdir / "smollm2-fp8-onnx" / "model.onnx"), load_external_data=False)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 19
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.int64)
    logits = g["sess"].run(["logits"], {"input_ids": ids})[0]
    assert logits.shape == (2, 5, 128) and np.isfinite(logits).all()


def test_native_load_packed(workdir):
    from lowbit.runtime import PackedLinear

    ensure(workdir, "smollm2-int4-lowbit")
    g = exec_block("native", workdir)
    assert g["out"].shape[1] == g["ids"].shape[1] + 16
    assert any(isinstance(m, PackedLinear) for m in g["model"].modules())


def test_native_cli_generate(workdir):
    ensure(workdir, "smollm2-int4-lowbit")
    with inside(workdir):
        (out,) = run_bash_block(tagged("native-cli"))
    assert "tokens/s" in out


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (a 25-50 min source build: "
                    "see docs/deploy.md)")
def test_llama_cpp_python(workdir):
    ensure(workdir, "smollm2-q4_0-gguf")
    g = exec_block("llama-cpp", workdir)
    assert g["llm"].n_vocab() == 128
