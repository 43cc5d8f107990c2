"""`lowbit quantize` and `lowbit eval` as a user runs them, on a tiny model saved to disk."""

import subprocess
import sys

import pytest
import torch

from tests.tiny_models import build


def run(*args):
    p = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def quantized_checkpoint(model_dir, tmp_path_factory, recipe: str, group_size: int):
    """``lowbit quantize`` the tiny model (no calibration) into a fresh folder; its path."""
    d, _ = model_dir
    out = tmp_path_factory.mktemp(recipe) / "q"
    rc, o, e = run("quantize", str(d), "--recipe", recipe, "--group-size", str(group_size),
                   "--out", str(out))
    assert rc == 0, e
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = build("llama")
    m.save_pretrained(d)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)}
    vocab.update({"[UNK]": 26, " ": 27})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    text = d / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    return d, text


def test_quantize_and_eval(model_dir, tmp_path):
    d, text = model_dir
    out = tmp_path / "q"
    rc, o, e = run("quantize", str(d), "--recipe", "int8", "--calib", str(text), "--samples",
                   "4", "--seq-len", "32", "--out", str(out))
    assert rc == 0, e
    assert "weight memory after" in o and (out / "lowbit_checkpoint.json").exists()
    rc, o, e = run("eval", str(out), "--text", str(text), "--seq-len", "32", "--windows", "4",
                   "--baseline", str(d))
    assert rc == 0, e
    assert "top1_agreement" in o


@pytest.mark.parametrize("args,msg", [
    (["quantize", "/no/such/model", "-r", "int8", "-o", "X"], "does not exist"),
    (["quantize", "{d}", "-r", "int9-magic", "-o", "{tmp}/a"], "unknown recipe 'int9-magic'"),
    (["quantize", "{d}", "-r", "int8", "-o", "{tmp}/a"], "needs calibration data"),
    (["quantize", "{d}", "-r", "int8", "--calib", "{text}", "--seq-len", "4096", "-o",
      "{tmp}/a"], "beyond the model's context"),
    (["quantize", "{d}", "-r", "int8", "--calib", "{tmp}/empty.txt", "-o", "{tmp}/a"],
     "empty"),
    (["quantize", "{d}", "-r", "int8-dynamic", "-o", "{d}"], "exists; pass --force"),
    (["eval", "{text}", "--text", "{text}"], "is not a model"),
    (["quantize", "{d}", "-r", "int8", "--calib", "{tmp}/nosuch.txt", "-o", "{tmp}/a"],
     "no such text file"),
    (["quantize", "{d}", "-r", "int8", "--calib", "nosuch", "-o", "{tmp}/a"],
     "no such text file"),  # never the option's characters taken as the text itself
    (["quantize", "{d}", "-r", "int8", "--calib", "sample:nope", "-o", "{tmp}/a"],
     "no such packaged text; expected one of: sample:austen_pp"),
])
def test_bad_input(model_dir, tmp_path, args, msg):
    d, text = model_dir
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(d=d, tmp=tmp_path, text=text) for a in args]
    rc, o, e = run(*args)
    assert rc == 2, (o, e)
    assert msg in e and len(e.strip().splitlines()) == 1, e
    assert not (tmp_path / "a").exists()


def test_quantize_calibrates_on_the_packaged_text(model_dir, tmp_path):
    d, _ = model_dir
    out = tmp_path / "q"
    rc, o, e = run("quantize", str(d), "--recipe", "int8", "--calib", "sample:austen_pp",
                   "--samples", "2", "--seq-len", "32", "--out", str(out))
    assert rc == 0, e
    assert (out / "lowbit_checkpoint.json").exists()


def test_recommend_measures_candidates(model_dir):
    d, text = model_dir
    rc, o, e = run("recommend", "--model", str(d), "--text", str(text), "--candidates",
                   "int8-dynamic,int4-weight-only", "--seq-len", "32", "--windows", "2",
                   "--samples", "2", "--group-size", "32", "--max-size", "1")
    assert rc == 0, e
    assert "recommended:" in o and "int4-weight-only" in o


def test_report_command(model_dir, tmp_path):
    d, text = model_dir
    out = tmp_path / "r.html"
    rc, o, e = run("report", str(d), "-r", "int8", "--text", str(text), "--out", str(out),
                   "--seq-len", "32", "--samples", "2", "--windows", "2")
    assert rc == 0, e
    assert out.read_text().count("data:image/png;base64,") == 3
