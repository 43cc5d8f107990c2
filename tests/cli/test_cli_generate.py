"""`lowbit generate` on a tiny quantized checkpoint: packed kernels, both decode loops."""

import pytest

from tests.cli.test_cli_quantize import model_dir, quantized_checkpoint, run  # noqa: F401


@pytest.fixture(scope="module")
def int4_ckpt(model_dir, tmp_path_factory):  # noqa: F811
    # group 32: the smallest group torch's int4 CPU kernel takes (16 would run the reference)
    return quantized_checkpoint(model_dir, tmp_path_factory, "int4-weight-only", 32)


@pytest.mark.parametrize("loop", ["lowbit", "hf"])
def test_generate_runs_packed_kernels(int4_ckpt, loop):
    rc, o, e = run("generate", str(int4_ckpt), "-p", "the quick brown", "-n", "6", "--loop",
                   loop, "--threads", "1")
    assert rc == 0, e
    assert "tokens/s" in o and f"({loop} loop" in o
    assert "int4_weight_only x14" in o  # 7 linears x 2 layers on the real int4 kernel


def test_generate_compiled_loop(int4_ckpt):
    rc, o, e = run("generate", str(int4_ckpt), "-p", "the quick brown", "-n", "4",
                   "--compile", "--threads", "1")
    assert rc == 0, e
    assert "(lowbit loop, compiled: its build included" in o


@pytest.mark.parametrize("args,msg", [
    (["--loop", "vllm"], "--loop 'vllm'; expected lowbit or hf"),
    (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--chat"], "no chat template"),
    (["--loop", "hf", "--compile"], "--compile captures lowbit's decode loop"),
])
def test_generate_bad_input(int4_ckpt, args, msg):
    rc, o, e = run("generate", str(int4_ckpt), "-p", "abc", *args)
    assert rc == 2, (o, e)
    assert msg in e and len(e.strip().splitlines()) == 1, e


def test_generate_refuses_unsupported_family(model_dir, tmp_path):  # noqa: F811
    import shutil

    from tests.tiny_models import build

    build("gpt2").save_pretrained(tmp_path)
    for f in model_dir[0].glob("*token*"):
        shutil.copy(f, tmp_path)
    rc, o, e = run("generate", str(tmp_path), "-p", "abc")
    assert rc == 2 and "FastDecoder supports model_type" in e and "'gpt2'" in e, e
    rc, o, e = run("generate", str(tmp_path), "-p", "abc", "-n", "3", "--loop", "hf")
    assert rc == 0, e
