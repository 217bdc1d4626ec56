"""camserve: explained image classification, the serving core.

The flow, one module per step:
``protocols`` (a wire format's item -> bytes + options) -> ``decode`` (bytes -> image) ->
``preprocess`` (image -> tensor) -> ``gradcam`` (tensor -> logits + signed map) ->
``zero_reference`` (signed map -> score) -> ``encode_json`` (-> JSON) / ``encode_png`` (-> PNG)
-> ``protocols`` (outcomes -> the format's reply).
``explainer`` runs the flow; the rest supports it (model building, layer choice, the
load-time compensation probe, labels, errors, metrics).

Nothing in this package imports TorchServe; ``handlers/`` is the thin adapter. The archive
ships this package without ``camserve.tools`` (archive, calibrate, kserve-bundle, client).
"""

__version__ = "0.1.0"
