"""The command line starts light and reads as plain text: no torch for --help or formats, no
reST markup and no --no-no-x flags in any help, keywords translated to flags, bare sizes."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from lowbit.cli import app, cli_message

COMMANDS = sorted(typer.main.get_command(app).commands)

_PROBE = """
import sys
sys.argv = ["lowbit", *{args!r}]
import lowbit.cli
try:
    lowbit.cli.main()
except SystemExit as e:
    assert not e.code, e.code
print("HEAVY:", sorted(m for m in ("torch", "transformers", "numpy", "safetensors")
                       if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["formats"], ["formats", "--json"],
                                  ["quantize", "--help"], ["export", "--help"],
                                  ["demo", "--help"], ["estimate", "--help"]])
def test_help_and_formats_import_no_torch(args):
    p = subprocess.run([sys.executable, "-c", _PROBE.format(args=args)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "HEAVY: []", p.stdout[-500:]


def test_import_lowbit_is_lazy_and_complete():
    code = ("import sys, lowbit; assert 'torch' not in sys.modules; "
            "assert set(lowbit.__all__) <= set(dir(lowbit)); "
            "from lowbit import quantize, QuantSpec; assert lowbit.quantize is quantize; "
            "import lowbit.pipeline; assert quantize is lowbit.pipeline.quantize; "
            "assert lowbit.quantize_tensor is __import__('lowbit.core').core.quantize; "
            "assert 'int8' in lowbit.recipes.names(); "  # subpackages as attributes, as before
            "assert callable(lowbit.data.sample_text); "
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.strip() == "ok", p.stderr
    import lowbit

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lowbit.nope  # noqa: B018


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_is_plain_text(cmd):
    r = CliRunner().invoke(app, ([cmd] if cmd else []) + ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Usage" in r.output, r.output
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", ":data:", "--no-no-"):
        assert markup not in r.output, f"lowbit {cmd} --help shows {markup!r}:\n{r.output}"


def test_commands_are_all_checked():
    assert {"quantize", "export", "generate", "demo", "estimate", "formats"} <= set(COMMANDS)


def test_keywords_become_flags_only_where_the_command_has_them():
    msg = "GGUF export: layer x. Pass allow_requantize=True to requantize"
    assert cli_message(msg, {"--allow-requantize"}) == (
        "GGUF export: layer x. Pass --allow-requantize to requantize")
    assert cli_message(msg, {"--force"}) == msg  # a command without the flag: unchanged
    msg = "unfinished run with other recipe; pass resume=False (CLI: --restart) to start over"
    assert cli_message(msg, {"--resume", "--no-resume"}) == (
        "unfinished run with other recipe; pass --no-resume to start over")
    assert cli_message("fewer than one window of seq_len=512", {"--seq-len"}) == (
        "fewer than one window of --seq-len 512")
    assert cli_message("Pass tokenizer=None to write", {"--no-vocab"}) == (
        "Pass --no-vocab to write")


def _run(*args):
    """``lowbit ARGS`` in this process (estimate imports torch anyway): rc, stdout, stderr."""
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _row(out, prec):
    return next(ln for ln in out.splitlines() if ln.count("│") > 3
                and ln.split("│")[1].strip() == prec)


@pytest.mark.parametrize("size,fp16", [("70B", "140.0"), ("7.5B", "15.0"), ("135M", "270.0")])
def test_estimate_takes_a_bare_parameter_count(size, fp16):
    rc, out, err = _run("estimate", size)
    assert rc == 0, err
    assert fp16 in _row(out, "fp16")
    rc2, out2, _ = _run("estimate", "--params", size)
    assert rc2 == 0 and out2 == out  # the README's form and the flag agree


def test_estimate_a_path_or_name_wins_over_a_size(tmp_path, monkeypatch):
    (tmp_path / "7B").mkdir()
    (tmp_path / "7B" / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, '
        '"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, '
        '"vocab_size": 49152, "tie_word_embeddings": true}')
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run("estimate", "7B")
    assert rc == 0, err
    assert "0.13B" in out and "KV cache" in out  # the folder, not 7e9 parameters
    rc, out, err = _run("estimate", "smollm2-135m")
    assert rc == 0 and "smollm2-135m" in out and "KV cache" in out


@pytest.mark.parametrize("args,msg", [
    (["estimate", "70B", "--params", "7B"], "give the parameter count once"),
    (["estimate", "seventy"], "expected a parameter count like 70B"),
])
def test_estimate_bad_input(args, msg):
    rc, out, err = _run(*args)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_one_line_errors_translates_inside_a_running_command():
    from lowbit.cli import one_line_errors
    from lowbit.errors import ConfigError

    t = typer.Typer()

    @t.command()
    def x(allow_requantize: bool = typer.Option(False, "--allow-requantize")):
        with one_line_errors("x"):
            raise ConfigError("Pass allow_requantize=True to requantize; pass resume=False")

    @t.command()
    def y() -> None:
        pass

    r = CliRunner().invoke(t, ["x"])
    assert r.exit_code == 2
    assert "Pass --allow-requantize to requantize; pass resume=False" in r.stderr  # no --resume
