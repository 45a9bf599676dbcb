"""A complete sparsec plugin pass: zero every weight whose magnitude is below a threshold.

    sparsec compile minilm -o out --plugin examples/custom_pass.py --passes "threshold-prune{threshold=0.02}"
"""

from dataclasses import dataclass

from compiler import Pass, PassResult, option, register_pass


@register_pass
@dataclass(frozen=True)
class ThresholdPrune(Pass):
    """Zero weights with |w| < threshold in every prunable layer inside the model's blocks."""

    name = "threshold-prune"
    threshold: float = option(0.01, "magnitude below which weights become exact zeros")

    def validate(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    def call(self, ir, ctx) -> PassResult:
        zeroed = 0
        for name, layer in ir.layers.items():
            if layer.block is None:  # heads and poolers outside the blocks stay dense
                continue
            w = ir.weight(name)
            mask = w.abs() < self.threshold
            zeroed += int(mask.sum())
            ir.set_weight(name, w.masked_fill(mask, 0.0))
        return PassResult(ir, modified=zeroed > 0, metrics={"zeroed_weights": zeroed})
