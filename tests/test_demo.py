"""`qwen2edge demo`: the README's first quick-start command, end to end on the embedded default model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_validates_the_default_model_and_answers_paris(smollm2_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "qwen2edge.cli", "demo"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[ort] PASS" in res.stdout, res.stdout[-2000:]  # validated against transformers
    answer = next(line for line in res.stdout.splitlines() if line.startswith("A: "))
    assert "Paris" in answer, answer
