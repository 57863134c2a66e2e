"""The contract the planner and the profiler share: what a model file must provide
(model_file.py), the one training step both trace and run (training_step.py), the optimizers
both build (optimizers.py) and the units FSDP wraps and checkpointing recomputes (units.py).

The planner traces exactly what the profiler runs because both import these modules; neither
package owns them.
"""
