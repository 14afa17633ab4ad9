"""Which kernels a run will use, decided once at launch (memory_predictor.kernels) and recorded.

``cluster.transformer_engine=null`` is resolved here: a GPU cluster with a container image is
taken to have Transformer Engine (NGC/DLC PyTorch images carry it); without an image the nodes run
this launcher's Python environment (a shared venv), so it is probed here. The resolved value is
written into the run's config (the ranks check it: trainer.model.runtime_kernels) and the decision
into ``kernels.json``; the predictor sizes the layout with the same kernels. A GPU cluster without
Transformer Engine is said out loud: unfused attention keeps the s^2 scores (more memory, slower).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

from configs.schema import RootConfig
from memory_predictor.kernels import Kernels, choose_kernels

KERNELS_FILE = "kernels.json"


def resolve(root: RootConfig) -> tuple[RootConfig, Kernels, dict[str, str], list[str]]:
    """(config with cluster.transformer_engine resolved, the kernels, run-dir files, messages)."""
    c = root.cluster
    te = c.transformer_engine
    how = "set in cluster.transformer_engine"
    if c.gpu_type == "cpu":
        te, how = False, "CPU run"
    elif te is None:
        if c.container_image:
            te, how = True, f"assumed: the container image {c.container_image} (NGC/DLC images carry it)"
        else:
            te = importlib.util.find_spec("transformer_engine") is not None
            how = "probed in this Python environment (the nodes run the same one: no container image)"
    kernels = choose_kernels(c.gpu_type, transformer_engine=te)
    notes = []
    if c.gpu_type != "cpu" and not te:
        notes.append(f"warning: no Transformer Engine ({how}): {kernels.reason}; the fit check and the plan "
                     "use those kernels. Use an NGC/DLC image or `pip install transformer_engine[pytorch]` for "
                     "Megatron's fused kernels")
    record = {**kernels.as_dict(), "transformer_engine_source": how}
    resolved = replace(root, cluster=replace(c, transformer_engine=te))
    return resolved, kernels, {KERNELS_FILE: json.dumps(record, indent=2) + "\n"}, notes
