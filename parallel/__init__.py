"""Parallelism: device meshes, logical-axis sharding rules, the sharded train step, multi-host.

    parallel.initialize()                                    # before touching devices
    parallel.cpu.use_cpu_cores(2)                            # CPU: a device per core, first
    mesh = parallel.make_mesh({"fsdp": -1, "tensor": 2})     # mesh.py
    # sharding.py: PRESETS "dp", "fsdp", "tp", "dp_tp", "fsdp_tp", "pp*"; use_rules(mesh, rules)
    # train.py: init_sharded_train_state, make_sharded_train_step, shard_batch
    # aot.py: compile_train_step(cfg, mesh_config, rules, tpu_topology("v5e:2x4"), B, T) (libtpu)
    # pipeline.py: PipelineConfig (GPipe / circular over the `pipeline` axis), bubble_fraction

Model code names logical axes only; the rules table here maps them to mesh axes.
"""

from parallel import cpu
from parallel.distributed import initialize
from parallel.mesh import MESH_AXES, make_mesh
from parallel.pipeline import PipelineConfig, bubble_fraction
from parallel.sharding import PRESETS, logical_to_spec, train_state_shardings, use_rules

__all__ = [
    "MESH_AXES",
    "PRESETS",
    "PipelineConfig",
    "bubble_fraction",
    "cpu",
    "initialize",
    "logical_to_spec",
    "make_mesh",
    "train_state_shardings",
    "use_rules",
]
