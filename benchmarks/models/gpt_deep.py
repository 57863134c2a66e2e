"""gpt.py at 10 layers: a stack deep enough (at least 8 alike layers) that dpplan traces it at
3 and 4 layers and builds the full depth from those (dpplan/planner/trace/repeated_layers.py). The
accuracy benchmark runs it for real, so the shortcut is checked against measured memory."""

import importlib.util
from pathlib import Path

DEEP_LAYERS = 10

_spec = importlib.util.spec_from_file_location("_gpt_base", Path(__file__).with_name("gpt.py"))
_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gpt)
_gpt.LAYERS = DEEP_LAYERS  # read by GPT.__init__

build_model = _gpt.build_model
example_batch = _gpt.example_batch
loss_fn = _gpt.loss_fn
