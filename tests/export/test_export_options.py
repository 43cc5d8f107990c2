"""Export options are checked by name: an option a format does not take is a ConfigError
naming it, the format, the options it takes and the closest name; nothing is written."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.export import exporter_names, get_exporter
from lowbit.options import accepted_options, check_options, reject_unknown

# what each format takes (besides model and out_dir); a new option is added here on purpose
TAKES = {
    "lowbit": ["tokenizer", "max_shard_size"],
    "compressed-tensors": ["tokenizer", "max_shard_size", "dtype"],
    "gguf": ["tokenizer", "float_type", "embedding_type", "output_type", "allow_requantize",
             "requantize_type", "tokenizer_pre", "name"],
    "onnx": ["example_inputs", "opset", "input_names", "output_names", "dynamic_shapes",
             "example_kwargs", "tokenizer"],
}


def _quantized_linear():
    m = nn.Sequential(nn.Linear(32, 16))
    lowbit.quantize(m, {"name": "t", "targets": [
        {"pattern": "*", "weight": {"format": "int8", "granularity": "channel"}}]})
    return m


def test_every_format_is_listed():
    assert sorted(TAKES) == sorted(exporter_names())
    for fmt, names in TAKES.items():
        assert accepted_options(get_exporter(fmt), ("model", "out_dir")) == names, fmt


@pytest.mark.parametrize("fmt", sorted(TAKES))
def test_unknown_option_raises_for_each_format(tmp_path, fmt):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        lowbit.save(_quantized_linear(), out, format=fmt, max_shard=1000)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"export format '{fmt}': unknown option 'max_shard'")
    assert f"it takes: {', '.join(TAKES[fmt])}" in msg
    if "max_shard_size" in TAKES[fmt]:
        assert "(did you mean 'max_shard_size'?)" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_misspelt_float_type_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"export format 'gguf': unknown option 'flaot_type' "
                                          r"\(did you mean 'float_type'\?\)"):
        lowbit.save(_quantized_linear(), tmp_path / "g", format="gguf", flaot_type="f16")


def test_several_unknown_options_are_all_named():
    with pytest.raises(ConfigError, match=r"unknown options 'tokenzier' \(did you mean "
                                          r"'tokenizer'\?\), 'zzz'; it takes: tokenizer"):
        reject_unknown({"zzz": 1, "tokenzier": 2}, "f", ["tokenizer"])
    check_options({"tokenizer": None}, "f", ["tokenizer"])  # known names pass
    with pytest.raises(ConfigError, match="it takes: [(]no options[)]"):
        check_options({"a": 1}, "f", [])


def test_cli_passes_each_format_only_options_it_takes():
    from lowbit.cli.export_cmd import export_options

    class Tok:
        def __call__(self, text, return_tensors):
            return {"input_ids": torch.arange(20)[None]}

    for fmt in exporter_names():
        given = export_options(_quantized_linear(), Tok(), fmt)
        assert set(given) <= set(TAKES[fmt]), (fmt, given)


def test_onnx_saves_the_tokenizer(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")

    class Tok:
        def save_pretrained(self, d):
            (d / "tokenizer.json").write_text(json.dumps({"model": "tiny"}))

    out = lowbit.save(_quantized_linear(), tmp_path / "o", format="onnx",
                      example_inputs=(torch.randn(2, 32),), tokenizer=Tok())
    assert (out / "model.onnx").is_file()
    assert json.loads((out / "tokenizer.json").read_text()) == {"model": "tiny"}
