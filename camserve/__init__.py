"""camserve: explained image classification.

The flow, one module per step:
``request`` (TorchServe item -> bytes + options) -> ``decode`` (bytes -> image) ->
``preprocess`` (image -> tensor) -> ``gradcam`` (tensor -> logits + signed map) ->
``zero_reference`` (map -> score) -> ``response`` (-> JSON) / ``render`` (-> PNG).

Nothing in this package imports TorchServe; ``handlers/`` is the thin adapter.
"""

__version__ = "0.1.0"
