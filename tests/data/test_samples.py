"""The sample texts packaged with lowbit: content, names, ``"sample:NAME"`` in read_text and
calibration_batches, and that a built wheel carries them."""

import fnmatch
import gzip
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lowbit.data as data
from lowbit.data import (calibration_batches, read_text, sample_info, sample_text,
                         sample_text_names, split_tokens, tokenize)
from lowbit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOWBIT_DATA", ROOT.parent / "shared" / "data"))
TEXTS = ROOT / "src" / "lowbit" / "data" / "texts"


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_names_and_info():
    assert sample_text_names() == ("austen_pp",)
    info = sample_info("austen_pp")
    assert info is sample_info("sample:austen_pp")
    assert info.spec == "sample:austen_pp" and info.licence == "public domain"
    assert "Pride and Prejudice" in info.title


def test_sample_text_is_the_novel():
    text = sample_text("austen_pp")
    info = sample_info("austen_pp")
    assert len(text) == info.chars == 684_428
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\n"
                           "It is a truth universally acknowledged")
    assert text.rstrip().endswith("had been the means of uniting them.")
    assert sample_text() is text  # default name, decompressed once
    assert sample_text("sample:austen_pp") is text


@pytest.mark.skipif(not (SHARED / "austen_pp.txt").is_file(),
                    reason=f"the benchmarks' text {SHARED / 'austen_pp.txt'} is not here")
def test_sample_equals_the_benchmarks_text():
    """The package's text is the benchmarks' text to the byte, so its 80/20 split is theirs."""
    assert sample_text("austen_pp").encode() == (SHARED / "austen_pp.txt").read_bytes()


def test_unknown_sample_names_the_samples():
    with pytest.raises(ConfigError, match=r"no packaged sample text 'nope'.*'austen_pp'"):
        sample_text("nope")
    with pytest.raises(ConfigError, match=r"no packaged sample text 'nope'.*'austen_pp'"):
        read_text("sample:nope")
    with pytest.raises(ConfigError, match="is a str"):
        sample_info(3)


def test_read_text_sample_spelling(tmp_path, monkeypatch):
    assert read_text("sample:austen_pp") is sample_text("austen_pp")
    # "sample:" always means the package; a file of that name is read through a Path or "./"
    monkeypatch.chdir(tmp_path)
    Path("sample:austen_pp").write_text("my own file")
    assert read_text("sample:austen_pp") is sample_text("austen_pp")
    assert read_text(Path("sample:austen_pp")) == "my own file"
    assert read_text("./sample:austen_pp") == "my own file"


def test_missing_file_error_mentions_the_samples(tmp_path):
    for missing in (str(tmp_path / "austen_pp.txt"), tmp_path / "austen_pp.txt"):
        with pytest.raises(ConfigError, match=r"does not exist .*'sample:austen_pp'"):
            read_text(missing)


def test_calibration_batches_from_sample():
    tok = CharTokenizer()
    a = calibration_batches(tok, "sample:austen_pp", n_samples=4, seq_len=64, seed=3)
    b = calibration_batches(tok, sample_text("austen_pp"), n_samples=4, seq_len=64, seed=3)
    assert a.shape == (4, 64) and a.equal(b)
    # held-out windows come from the last 20% of the novel
    _, held_out = split_tokens(tokenize(tok, read_text("sample:austen_pp")))
    assert held_out.numel() == 684_428 - int(684_428 * 0.8)


def test_corrupt_package_file_is_an_error(tmp_path, monkeypatch):
    from lowbit.data import samples

    fake = tmp_path / "lowbit_data"
    (fake / "texts").mkdir(parents=True)
    (fake / "texts" / "austen_pp.txt.gz").write_bytes(gzip.compress(b"not the novel"))
    monkeypatch.setattr(samples.resources, "files", lambda pkg: fake)
    samples._read.cache_clear()
    try:
        with pytest.raises(ConfigError, match="does not match its recorded SHA-256"):
            sample_text("austen_pp")
        (fake / "texts" / "austen_pp.txt.gz").write_bytes(b"garbage")
        with pytest.raises(ConfigError, match="cannot be read"):
            sample_text("austen_pp")
    finally:
        samples._read.cache_clear()


def test_package_data_globs_cover_the_samples():
    """setuptools' package-data table lists every packaged text and the provenance note."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["lowbit"]
    files = [f"data/texts/{sample_info(n).file}" for n in sample_text_names()]
    files.append("data/texts/README.md")
    for rel in files:
        assert (ROOT / "src" / "lowbit" / rel).is_file(), rel
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} not in {globs}"
    listed = {p.name for p in TEXTS.iterdir() if p.suffix == ".gz"}
    assert listed == {sample_info(n).file for n in sample_text_names()}
    assert set(data.__all__) >= {"sample_text", "sample_text_names", "sample_info"}


@pytest.mark.slow
def test_built_wheel_contains_the_sample(tmp_path):
    """``pip wheel`` of a copy of the project: the wheel holds the gzip file, unchanged."""
    src = tmp_path / "proj"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "whl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("lowbit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for n in sample_text_names():
            member = f"lowbit/data/texts/{sample_info(n).file}"
            assert member in names
            assert gzip.decompress(z.read(member)).decode() == sample_text(n)
        assert "lowbit/data/texts/README.md" in names
        assert "lowbit/data/samples.py" in names
    print(f"\n{wheel.name}: {wheel.stat().st_size / 1e3:.0f} kB")
