"""`lowbit quantize --group-size N` is the user's group size: one that does not divide a
layer's width exits 2 naming the layer and the sizes that would work (issue 16)."""

from tests.cli.test_cli_quantize import model_dir, run  # noqa: F401  (fixture)


def test_indivisible_group_size_exits_2(model_dir, tmp_path):  # noqa: F811
    d, _ = model_dir
    out = tmp_path / "q"
    rc, o, e = run("quantize", str(d), "--recipe", "int4-weight-only", "--group-size", "7",
                   "--out", str(out))
    assert rc == 2, (o, e)
    msg = " ".join(e.split())  # rich may wrap the line
    assert "layer model.layers.0.self_attn.q_proj: input width 64 is not a multiple of group " \
           "size 7; group sizes <= 256 that divide it: 1, 2, 4, 8, 16, 32, 64" in msg
    assert "Traceback" not in e and not out.exists()
