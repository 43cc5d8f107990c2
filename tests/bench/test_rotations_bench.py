"""bench/rotations.py's pieces that need no model: row names and sets, step edits of a preset,
the JSON merge of --append, deltas, the table, the command line; bench/peer_quant.py's method
names and recipes (without the peer installed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lowbit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench_rotations", "rotations.py")
peer = _load("bench_peer_quant", "peer_quant.py")


def test_parse_rows_sets_order_and_repeats():
    assert bench.parse_rows("fp32, nvfp4,fp32") == ["fp32", "nvfp4"]
    assert bench.parse_rows("lowbit") == bench.LOWBIT_ROWS
    assert bench.parse_rows("fp32,peers") == ["fp32", *bench.PEER_ROWS]
    assert bench.parse_rows("all") == bench.LOWBIT_ROWS + bench.PEER_ROWS
    assert bench.parse_rows("fp32,a+spinquant@steps=2,samples=2+gptq@x=1,y=2,b") == [
        "fp32", "a+spinquant@steps=2,samples=2+gptq@x=1,y=2", "b"]
    with pytest.raises(ValueError, match="names no row"):
        bench.parse_rows(" , ")


def test_parse_row_steps_and_arguments():
    assert bench.parse_row("nvfp4") == ("nvfp4", [])
    assert bench.parse_row("nvfp4+spinquant@steps=20,lr=0.5+gptq~rotate") == (
        "nvfp4", [("+", "spinquant", {"steps": 20, "lr": 0.5}), ("+", "gptq", {}),
                  ("~", "rotate", {})])
    for bad, msg in (("+gptq", "no preset"), ("nvfp4+", "empty step"),
                     ("nvfp4+gptq@x", "not key=value"), ("kv-int4~rotate@r3=1", "no arguments")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_row(bad)


def test_every_default_row_parses_and_peer_rows_are_peer_methods():
    for name in bench.LOWBIT_ROWS:
        bench.parse_row(name)
    for name in bench.PEER_ROWS:
        assert name.startswith("peer:")
        method = name.split(":", 1)[1]
        assert method in peer.METHODS and peer.evaluated_here(method)


def test_build_recipe_edits_steps_and_group_size():
    r, over = bench.build_recipe("int4-weight-only+gptq@act_order=true", 64)
    assert [(a.name, a.args) for a in r.algorithms] == [("gptq", {"act_order": True})]
    assert over == {"group_size": 64}
    assert r.targets[0].weight.group_size == 64
    r, over = bench.build_recipe("int8-smoothquant~smoothquant", 64)
    assert r.algorithms == [] and over == {}  # no grouped spec: no group size
    with pytest.raises(ConfigError, match="no 'gptq' step to remove"):
        bench.build_recipe("nvfp4~gptq", 64)
    with pytest.raises(ConfigError, match="unknown recipe"):
        bench.build_recipe("no-such-preset", 64)


def _row(name, ppl, off=None):
    return {"row": name, "ppl": ppl, "offdomain_ppl": off, "quant_s": 1.0, "peak_rss_mb": 100}


META = {"calib_samples": 2, "seq_len": 64, "windows": 1, "group_size": 64, "threads": 1,
        "argv": ["--rows", "fp32"]}


def test_merge_replaces_rows_in_place_and_refuses_other_settings():
    first = bench.merge(None, META, [_row("fp32", 10.0, 5.0), _row("a", 12.0, 6.0)])
    assert first["meta"]["runs"] == [["--rows", "fp32"]]
    meta2 = {**META, "argv": ["--rows", "a,b"]}
    got = bench.merge(first, meta2, [_row("b", 11.0), _row("a", 13.0, 7.0)])
    assert [r["row"] for r in got["rows"]] == ["fp32", "a", "b"]
    assert got["rows"][1]["ppl"] == 13.0
    assert got["meta"]["runs"] == [["--rows", "fp32"], ["--rows", "a,b"]]
    with pytest.raises(ValueError, match="calib_samples=2, this run has calib_samples=128"):
        bench.merge(first, {**META, "calib_samples": 128}, [])


def test_deltas_and_table_show_failed_rows():
    rows = [_row("fp32", 10.0, 5.0), _row("a", 12.0, 6.0),
            {"row": "b", "error": "ConfigError: unknown recipe 'b'"}]
    bench.add_deltas(rows)
    assert rows[1]["delta_pct"] == 20.0 and rows[1]["offdomain_delta_pct"] == 20.0
    assert "delta_pct" not in rows[2]
    text = bench.table({"meta": META, "rows": rows})
    assert "+20.00%" in text and "b" in text and "FAILED: ConfigError: unknown recipe" in text


def test_main_records_failed_rows_and_appends(tmp_path, monkeypatch):
    """No model runs: run_row is replaced; a failing row is recorded, the run goes on, exit 1;
    --append merges a second piece into the same file."""
    def fake(args, name):
        if name == "bad":
            return {"row": name, "error": "ConfigError: unknown recipe 'bad'"}
        return _row(name, {"fp32": 10.0, "good": 11.0}[name], 5.0)

    monkeypatch.setattr(bench, "run_row", fake)
    out = tmp_path / "r.json"
    common = ["--calib-samples", "2", "--windows", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(["--rows", "fp32,bad", *common]) == 1
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["rows"]] == ["fp32", "bad"]
    assert bench.main(["--rows", "good", "--append", *common]) == 0
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["rows"]] == ["fp32", "bad", "good"]
    assert data["rows"][2]["delta_pct"] == 10.0 and data["meta"]["calib_samples"] == 2
    assert len(data["meta"]["runs"]) == 2
    with pytest.raises(SystemExit):  # other settings: refused before any row runs
        bench.main(["--rows", "good", "--append", *common[:-2], "--calib-samples", "3",
                    "--out", str(out)])


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rows", "nvfp4+"])
    assert "empty step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--windows", "0"])


def test_peer_method_names():
    assert peer.parse_llmc_method("llmc-quip-gptq-nvfp4") == ("quip", "gptq", "nvfp4")
    assert peer.evaluated_here("modelopt-int8-sq") and not peer.evaluated_here("llmc-gptq")
    with pytest.raises(ValueError, match="llmc-<transform>-<quantizer>-<scheme>"):
        peer.parse_llmc_method("llmc-quip-gptq-int3")


def test_peer_quant_needs_eval_for_methods_evaluated_there(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peer_quant.py", "--method", "llmc-quip-gptq-nvfp4",
                                      "--model", "m", "--calib", "c", "--report", "r"])
    with pytest.raises(SystemExit):
        peer.main()
    assert "pass --eval windows" in capsys.readouterr().err
