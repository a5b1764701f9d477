"""Triton Python-backend model serving a qwen2edge bundle (copied here by `qwen2edge triton-repo`).

Runs only inside Triton's Python backend stub, which provides `triton_python_backend_utils`. The
work is done by the installed qwen2edge (`qwen2edge.triton.instance`); this file only makes it
importable: the config's `python_path` parameter (os.pathsep-separated directories, e.g. a virtual
environment's site-packages) is put in front of sys.path first, .pth files included, so editable
installs work. Leave it empty when qwen2edge is installed in the stub's own Python (NGC container).
"""

import json
import os
import site
import sys

import triton_python_backend_utils as pb_utils


def _add_python_path(paths):
    before = list(sys.path)
    for path in paths.split(os.pathsep):
        if path:
            site.addsitedir(path)  # processes .pth files, unlike sys.path.insert
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # ahead of the stub's own site-packages: the environment's versions win


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        _add_python_path(params.get("python_path", ""))
        try:
            from qwen2edge.triton.config import ModelSettings
            from qwen2edge.triton.instance import ModelInstance
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"cannot import qwen2edge ({exc}): install qwen2edge[triton] into the Python that runs Triton's "
                "Python backend, or point the config's python_path parameter at the site-packages holding it")
        try:
            self.instance = ModelInstance(pb_utils, ModelSettings.from_parameters(params),
                                          os.path.dirname(os.path.abspath(__file__)))
        except Exception as exc:  # e.g. a bundle failing its checksums: one line in Triton's load error
            raise pb_utils.TritonModelException(f"{type(exc).__name__}: {exc}") from exc

    def execute(self, requests):
        self.instance.execute(requests)
        return None  # decoupled: responses go through each request's response sender

    def finalize(self):
        self.instance.close()
