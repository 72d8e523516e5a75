"""The backbone contract: what every landmark network gives and what the rest of star-jax asks.

A backbone is a flax module registered in `star_jax.models.registry`. Besides
`from_config(model_config, spec, *, bn_axis_name=None)` and a `__call__(images, train=False)`
returning `ModelOutput`, it answers (class attributes and methods; see `Backbone`):

- `architecture_defaults`: the `config.model` fields that describe its architecture, with the
  values used when neither the config nor an `init_from` checkpoint sets them (fine-tuning takes
  them from the checkpoint).
- `is_scheme_dependent(module)`: whether a top-level module's weights mean particular landmarks
  (re-initialised when fine-tuning on another landmark scheme).
- `freeze_groups()` / `freeze_group(module)`: the names `config.freeze` accepts and the group a
  top-level module belongs to.
- `min_image_size`: the smallest square input it accepts (sizes must be multiples of it).
- `onnx_graph`: the module path of a hand-written ONNX graph writer (`build_model`, `OPSET`,
  `IR_VERSION`, as `star_jax.deploy.export.onnx_graph` for the hourglass), or None: ONNX
  export is then refused with a UsageError, while the traced formats (TFLite, SavedModel,
  StableHLO) take any backbone.

The helpers below work on any backbone: parameter counts, shapes without allocation, and fresh
variables drawn on the host with torch's default initialisation.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ModelOutput:
  """Per-stack outputs; index -1 is the final prediction (one-stack networks give one).

  landmarks: (B, N, 2) decoded (x, y) in [-1, 1] on the heatmap grid (pixel j at -1 + 2j/(n-1)).
  heatmaps: (B, H/4, W/4, N) the maps the losses read (the hourglass: fused heatmaps; HRNet: the
    head's raw output).
  pointmaps: (B, H/4, W/4, N) sigmoid point maps (empty tuple without AAM heads).
  edgemaps: (B, H/4, W/4, E) sigmoid edge maps (empty tuple without AAM heads).
  """

  landmarks: tuple[jnp.ndarray, ...]
  heatmaps: tuple[jnp.ndarray, ...]
  pointmaps: tuple[jnp.ndarray, ...]
  edgemaps: tuple[jnp.ndarray, ...]


class Backbone(Protocol):
  """What star-jax asks of a registered network class (see the module docstring)."""

  registry_name: str
  architecture_defaults: Mapping[str, Any]
  onnx_graph: str | None

  @classmethod
  def from_config(cls, model_config: Any, spec: Any, *, bn_axis_name: str | None = None
                  ) -> "Backbone": ...

  @classmethod
  def is_scheme_dependent(cls, module: str) -> bool: ...

  def freeze_groups(self) -> tuple[str, ...]: ...

  def freeze_group(self, module: str) -> str | None: ...

  @property
  def min_image_size(self) -> int: ...


def count_parameters(params: Any) -> int:
  """Number of scalar parameters in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(params)))


def parameter_shapes(model: Any, image_size: int | None = None) -> Any:
  """The variables' shapes (no allocation) for `(1, image_size, image_size, 3)` input
  (default: the model's smallest input)."""
  size = image_size or model.min_image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images.shape,
                                                                           images.dtype)))


def _host_seed(rng: Any) -> list[int]:
  if isinstance(rng, (int, np.integer)):
    return [int(rng)]
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return [int(v) for v in np.asarray(rng, np.uint32).ravel()]


def init_variables(model: Any, rng: Any, image_size: int | None = None) -> dict[str, Any]:
  """Fresh {"params", "batch_stats"} (float32 numpy) drawn on the host, without compiling.

  Same distributions as `model.init` with torch's defaults (conv kernels and biases
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm scale 1, bias 0, mean 0, var 1), determined by
  `rng` (a JAX key or an int). Exists because `jax.jit(model.init)` compiles one random-number
  kernel per parameter tensor, which takes tens of seconds on a CPU; this takes a fraction of a
  second for a full model.
  """
  shapes = parameter_shapes(model, image_size)
  generator = np.random.default_rng(_host_seed(rng))
  flat_params = flax.traverse_util.flatten_dict(shapes["params"])
  params = {}
  for path in sorted(flat_params):
    shape = flat_params[path].shape
    module, leaf = path[:-1], path[-1]
    if leaf == "scale":
      value = np.ones(shape, np.float32)
    elif leaf == "bias" and module + ("scale",) in flat_params:
      value = np.zeros(shape, np.float32)  # BatchNorm shift
    else:
      kernel_shape = flat_params[module + ("kernel",)].shape
      bound = 1.0 / np.sqrt(np.prod(kernel_shape[:-1]))
      value = generator.uniform(-bound, bound, shape).astype(np.float32)
    params[path] = value
  stats = {path: (np.zeros if path[-1] == "mean" else np.ones)(leaf.shape, np.float32)
           for path, leaf in flax.traverse_util.flatten_dict(shapes["batch_stats"]).items()}
  return {"params": flax.traverse_util.unflatten_dict(params),
          "batch_stats": flax.traverse_util.unflatten_dict(stats)}
