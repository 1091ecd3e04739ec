"""Tuned plans: which path and which tile config runs each layer.

A plan is keyed by (structure digest, convolution geometry, dtype, precision)
and records the chosen method ("escort", "vector" or "dense"), the winning
sparse kernel's config (`config`, of kernel `config_method`), the best config
of each sparse kernel tried (`best_configs`), and the device times that
justified the choice. Plans live in JSON files:

  escort_jax/plans/<device-slug>.json   shipped with the package, committable
  $ESCORT_JAX_PLAN_DIR/<device-slug>.json   the user's own (searched first)

so a fresh machine starts from the recorded choices. Tuning writes them
(escort_jax.tune); nothing here measures anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import threading
from typing import Any

import jax

from escort_jax.conv_geometry import ConvGeometry

PACKAGED_DIR = pathlib.Path(__file__).parent / "plans"
_lock = threading.Lock()
_cache: dict[pathlib.Path, dict[str, Any]] = {}


def device_slug(device=None) -> str:
  """'nvidia-h100-80gb-hbm3' for the default device; 'cpu' on the CPU."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "") or device.platform
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def plan_key(structure_digest: str, geometry: ConvGeometry, dtype,
             precision) -> str:
  """The key of a plan: structure digest, geometry, dtype and precision."""
  g = geometry
  return (f"{structure_digest}|n{g.batch}h{g.in_h}w{g.in_w}c{g.in_channels}|"
          f"s{g.strides}d{g.dilation}p{g.padding}g{g.groups}|"
          f"{jax.numpy.dtype(dtype).name}|{precision}")


def user_dir() -> pathlib.Path | None:
  """$ESCORT_JAX_PLAN_DIR, searched before the packaged plans, or None."""
  d = os.environ.get("ESCORT_JAX_PLAN_DIR")
  return pathlib.Path(d) if d else None


def _load(path: pathlib.Path) -> dict[str, Any]:
  with _lock:
    if path not in _cache:
      try:
        _cache[path] = json.loads(path.read_text())["plans"]
      except FileNotFoundError:
        _cache[path] = {}
    return _cache[path]


def lookup(key: str, slug: str | None = None) -> dict[str, Any] | None:
  """The recorded plan for `key` on this device, or None."""
  slug = slug or device_slug()
  for d in (user_dir(), PACKAGED_DIR):
    if d is not None:
      entry = _load(d / f"{slug}.json").get(key)
      if entry is not None:
        return entry
  return None


def record(key: str, entry: dict[str, Any], slug: str | None = None,
           directory: pathlib.Path | None = None) -> pathlib.Path:
  """Stores a plan (in `directory`, else the user dir, else the package)."""
  slug = slug or device_slug()
  directory = directory or user_dir() or PACKAGED_DIR
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"{slug}.json"
  plans = dict(_load(path))
  plans[key] = entry
  with _lock:
    _cache[path] = plans
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": slug, "plans": plans}, indent=1,
                              sort_keys=True))
    tmp.replace(path)
  return path


def clear_cache() -> None:
  """Forgets loaded plan files (after editing them on disk)."""
  with _lock:
    _cache.clear()


def config_class(method: str):
  """The config class of a sparse method's kernel (None for "dense");
  "framed" is the vector kernel on a frame (escort_jax.frames), whose
  config the tuner records apart from the NHWC call's."""
  from escort_jax.ops import KernelConfig, VectorConfig  # ops imports us
  return {"escort": KernelConfig, "vector": VectorConfig,
          "framed": VectorConfig}.get(method)


def config_from_entry(entry: dict[str, Any], method: str | None = None):
  """The config recorded in a plan entry for `method` (default: the entry's
  method): a KernelConfig for "escort", a VectorConfig for "vector". It is
  the tuner's best config of that kernel (`best_configs`), else `config` if
  that was tuned for it; None when the entry has none for that kernel.
  Unknown fields are ignored.
  """
  method = method or entry.get("method")
  cls = config_class(method)
  if cls is None:
    return None
  recorded = entry.get("best_configs", {}).get(method)
  if recorded is None:
    # The kernel `config` belongs to; entries written before the vector
    # kernel existed say nothing, and theirs is the escort kernel's.
    tuned_for = entry.get("config_method") or (
        entry.get("method") if entry.get("method") == "vector" else "escort")
    if method != tuned_for:
      return None
    recorded = entry.get("config", {})
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in recorded.items() if k in fields})
