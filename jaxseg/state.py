"""Training state: a plain pytree, so it can be jitted, donated, sharded and checkpointed."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: model parameters; opt_state: optax state.

  The model's `apply` and the optax transformation live in the step's closure, not here, so
  the state holds arrays only.
  """
  step: jax.Array
  params: Any
  opt_state: Any
