"""The fake device: a training step run on tensors that are meta underneath but report the
target device (fake_tensor.py), under a dispatch mode that reports every storage's
birth and death (storage_tracer.py), with an op-output cache for speed (op_cache.py) and what
the trace changes in torch while it runs (torch_patches.py). The kernels' device-specific
rules live beside it: planner/meta_kernels.py, cpu_kernels.py, known_values.py,
data_dependent.py.

What the rest of dpplan uses is importable from here.
"""

from dpplan.planner.fake_device.fake_tensor import (
    CPU,
    META,
    FakeDeviceError,
    FakeDeviceTensor,
    module_to_fake_device,
    to_fake_device,
    tree_to_fake_device,
)
from dpplan.planner.fake_device.storage_tracer import StorageTracer
from dpplan.planner.fake_device.torch_patches import (
    always_stepping,
    current_graph_task_id,
    host_rng_state_as_traced_tensor,
    skip_weight_init,
)

__all__ = [
    "CPU", "META", "FakeDeviceError", "FakeDeviceTensor", "StorageTracer", "always_stepping",
    "current_graph_task_id", "host_rng_state_as_traced_tensor", "module_to_fake_device",
    "skip_weight_init", "to_fake_device", "tree_to_fake_device",
]
