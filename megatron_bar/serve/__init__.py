"""Serving a BAR model: post-training quantization (nvidia-modelopt) and inference cost.

* :mod:`megatron_bar.serve.quantize` - ``tools/quantize.py``: fp8 / int8 / int4_awq on the
  megatron model, calibrated on a stratified sample of every domain, router kept in fp32.
* :mod:`megatron_bar.serve.cost` - parameters total and active per token, tokens/s, peak
  memory (``bench/inference.py``).

Expert selection at load time lives with the model: ``load_model(path, drop_experts=...,
layer_topk=...)`` (:mod:`megatron_bar.model.expert_select`).
"""
