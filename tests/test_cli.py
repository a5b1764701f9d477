"""The CLI as a user runs it: real subprocesses, one-line errors, exit codes, torch-free generate."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qwen2edge.errors import BundleError, InputError

BLOCK_TORCH = textwrap.dedent("""
    import sys
    for name in ("torch", "transformers"):
        sys.modules[name] = None  # any import of these now raises ImportError
    from qwen2edge.cli import main
    sys.argv = ["qwen2edge"] + sys.argv[1:]
    main()
""")


def run_cli(*args, block_torch=False, timeout=300):
    cmd = [sys.executable, "-c", BLOCK_TORCH, *args] if block_torch else [sys.executable, "-m", "qwen2edge.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, code, needle):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    err = lines[-1]  # progress lines may precede it; the error is exactly one line, last
    assert err.startswith("error: ") and sum(l.startswith("error:") for l in lines) == 1, proc.stderr
    assert needle in err, err


def test_generate_json_runs_without_torch(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("generate", str(bundle), "--prompt", "Hello", "--chat", "--max-new-tokens", "5", "--json",
                   block_torch=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_ids"][:1] == [151644]  # <|im_start|> from the ChatML template
    assert 1 <= len(out["token_ids"]) <= 5 and set(out) >= {"prompt_ids", "token_ids", "text", "timings"}


def test_generate_streams_text_and_greedy_is_deterministic(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    a = run_cli("generate", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json")
    b = run_cli("generate", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "6")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["text"] == b.stdout.rstrip("\n")


def test_export_refuses_non_qwen2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = run_cli("export", str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, InputError.exit_code, "model_type 'llama'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "truncated", "misshaped", "no_weights", "max_seq_len", "too_long"])
def test_export_bad_inputs(case, tiny_model_factory, tmp_path):
    import shutil

    src = tiny_model_factory("gqa")
    model = tmp_path / "model"
    shutil.copytree(src, model)
    args = []
    if case == "missing":
        model = tmp_path / "does-not-exist"
        needle = "does not exist"
    elif case == "truncated":
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[: 100_000])
        needle = "truncated or corrupt"
    elif case == "misshaped":
        cfg = json.loads((model / "config.json").read_text())
        cfg["intermediate_size"] += 8
        (model / "config.json").write_text(json.dumps(cfg))
        needle = "mis-shaped"
    elif case == "no_weights":
        (model / "model.safetensors").unlink()
        needle = "no *.safetensors"
    elif case == "max_seq_len":
        args, needle = ["--max-seq-len", "0"], "must be positive"
    else:
        args, needle = ["--max-seq-len", "100000"], "exceeds what this model supports"
    out = tmp_path / "out"
    proc = run_cli("export", str(model), "-o", str(out), *args)
    assert_one_line_error(proc, InputError.exit_code, needle)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--temperature", "-0.1"], "temperature"),
    (["--max-new-tokens", "1000"], "exceeds the bundle's max_seq_len"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
])
def test_generate_bad_inputs(args, needle, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    base = ["--prompt", "hi"] if "--prompt-ids" not in args else []
    proc = run_cli("generate", str(bundle), *base, *args, block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, needle)


def test_generate_refuses_tampered_bundle(tiny_bundle_factory, tmp_path):
    import shutil

    _, bundle = tiny_bundle_factory("mqa")
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    proc = run_cli("generate", str(copy), "--prompt", "hi")
    assert_one_line_error(proc, BundleError.exit_code, "fails its manifest checksum")
    (copy / "manifest.json").unlink()
    proc = run_cli("generate", str(copy), "--prompt", "hi")
    assert_one_line_error(proc, BundleError.exit_code, "manifest.json is missing")


def test_verbose_shows_traceback(tmp_path):
    proc = run_cli("--verbose", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert proc.returncode == InputError.exit_code and "Traceback" in proc.stderr


def test_interrupted_export_leaves_nothing(tiny_model_factory, tmp_path):
    """SIGINT in the middle of an export: no OUT_DIR, no temp directory left behind."""
    import signal

    model = tiny_model_factory("gqa")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A job started in the background inherits SIGINT as ignored, and Python then keeps ignoring it;
    # restore the default so the child gets its KeyboardInterrupt wherever the suite runs.
    proc = subprocess.Popen([sys.executable, "-m", "qwen2edge.cli", "export", str(model), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Wait until the export is past loading and into tracing, then interrupt it.
    for line in proc.stderr:
        if "[2/4]" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
