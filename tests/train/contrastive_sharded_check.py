"""Run in a fresh interpreter by test_contrastive_sharded.py: with 8 fake CPU devices, the
data-parallel contrastive losses (and their gradients) against the single-device ones.

Prints one JSON line: {loss kind: {"loss": [sharded, single], "grad_max_abs_diff": float}}.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from parallel.mesh import make_mesh  # noqa: E402
from train.contrastive import contrastive_loss, sharded_contrastive_loss  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh()  # data=8
    rng = np.random.default_rng(0)
    batch, dim = 32, 12

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    images = jnp.asarray(unit(rng.normal(size=(batch, dim))), jnp.float32)
    texts = jnp.asarray(unit(images + 0.5 * rng.normal(size=(batch, dim))), jnp.float32)
    log_scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-3.0)
    out = {}
    for kind in ("softmax", "sigmoid"):
        sharded = sharded_contrastive_loss(kind, mesh)

        def single_fn(i, t, s, b, kind=kind):
            return contrastive_loss(kind, i, t, s, b)

        args = (images, texts, log_scale, bias)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        sharded_args = (jax.device_put(images, sharding), jax.device_put(texts, sharding))
        sharded_args += (log_scale, bias)
        value_s, grads_s = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*sharded_args)
        value_1, grads_1 = jax.jit(jax.value_and_grad(single_fn, argnums=(0, 1, 2, 3)))(*args)
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads_s, grads_1, strict=True))
        out[kind] = {"loss": [float(value_s), float(value_1)], "grad_max_abs_diff": diff}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
