"""A later micro-batch's gradient reaches ``.grad`` as a contribution that AccumulateGrad sums
in place; the tracer records which storage that was on the parameter's grad marker, and the
trace index reads it from there."""

from dpplan.planner.trace import TEMPORARY, TraceSettings, trace_step
from dpplan.planner.trace.index import trace_index
from dpplan.training.model_file import load_model_file

TIED_AND_FROZEN = """
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.fc = nn.Linear(8, 8)
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

        def forward(self, tokens):
            x = self.frozen(torch.relu(self.fc(self.embed(tokens))))
            return x @ self.embed.weight.t()  # the embedding's weight, tied as the head

    def build_model(): return Net()
    def example_batch(b): return torch.randint(0, 16, (b, 4))
    def loss_fn(output, batch): return output.logsumexp(-1).mean()
"""


def test_grad_accum_records_one_contribution_per_trainable_parameter(write_model):
    """Three trainable parameters (embed.weight, tied, so its two uses are summed before
    AccumulateGrad sees them; fc.weight; fc.bias) and two frozen ones: in micro-batch 0 each
    trainable parameter's contribution is its ``.grad``; in micro-batch 1 it is one new
    temporary of the gradient's size summed into that ``.grad``: 3 + 3 entries, none for the
    frozen parameters."""
    trace = trace_step(load_model_file(write_model(TIED_AND_FROZEN)),
                       TraceSettings(precision="fp32", num_micro_batches=2, grad_accum=2))
    names = [p.name for p in trace.params]
    trainable = [names.index(n) for n in ("embed.weight", "fc.weight", "fc.bias")]
    contributions = trace_index(trace).gradient_contributions
    assert sorted(contributions) == sorted((micro, p) for micro in (0, 1) for p in trainable)
    second_micro_batch = trace.markers_of("micro_batch")[1].event
    births = {int(trace.event_storage[e]): e for e in range(len(trace.event_storage)) if trace.event_sign[e] > 0}
    for p in trainable:
        param = trace.params[p]
        assert contributions[(0, p)] == [param.grad_storage]
        [summed] = contributions[(1, p)]
        assert summed != param.grad_storage
        assert int(trace.storage_bytes[summed]) == param.numel * 4
        assert int(trace.storage_category[summed]) == TEMPORARY
        assert births[summed] >= second_micro_batch
    grad_markers = [m for m in trace.markers if m.kind == "grad"]
    assert len(grad_markers) == 6
    assert sum(m.storage >= 0 for m in grad_markers) == 3  # recorded in micro-batch 1 only
