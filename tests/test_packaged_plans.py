"""The plan files shipped with the package (escort_jax/plans/*.json): every
entry parses into what dispatch reads, so that a merge of tuning results
that broke one fails here rather than at a user's trace."""

import json
import math

import pytest

from escort_jax import frames, plans, tune
from escort_jax.ops import KernelConfig, VectorConfig

FILES = sorted(plans.PACKAGED_DIR.glob("*.json"))
CLASSES = {"escort": KernelConfig, "vector": VectorConfig,
           "framed": VectorConfig}


def test_there_are_packaged_plans():
  assert FILES, "no plan file shipped"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_packaged_plan_entry_is_well_formed(path):
  data = json.loads(path.read_text())
  assert data["device"] == path.stem
  assert data["plans"]
  for key, entry in data["plans"].items():
    where = f"{path.name} {key}"
    digest, shape, conv, dtype, precision = key.split("|")
    assert len(digest) == 40 and shape.startswith("n"), where
    assert entry["method"] in ("escort", "vector", "dense"), where
    for kernel, recorded in entry.get("best_configs", {}).items():
      cfg = plans.config_from_entry(entry, kernel)
      assert isinstance(cfg, CLASSES[kernel]), where
      assert set(recorded) <= {f for f in cfg.__dataclass_fields__}, where
      if kernel == "framed":
        assert cfg.block_q <= frames.FRAME_SLACK, where
    if entry["method"] != "dense":
      # The method's config is there to run.
      assert plans.config_from_entry(entry) is not None, where
    best = tune.best_times(entry)
    assert math.isfinite(best["dense"]) and best["dense"] > 0, where
    if entry["method"] != "dense":
      # The recorded winner is the fastest of what was timed, against dense.
      assert best[entry["method"]] <= best["dense"], where
